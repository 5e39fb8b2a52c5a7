import pytest
import torch

from treeq.deploy.pack import pack, pack_planes, packed_size, planes_size, unpack, unpack_planes


def _random_codes(bits, numel, signed):
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    codes = torch.randint(low, high + 1, (numel,), generator=torch.Generator().manual_seed(bits))
    codes[:2] = torch.tensor([low, high])  # the extremes exercise every bit of a field
    return codes


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("numel", [2, 7, 8, 9, 1001])
@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_is_exact_and_dense(bits, numel, signed):
    codes = _random_codes(bits, numel, signed)
    packed = pack(codes, bits, signed=signed)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(numel, bits) == -(-numel * bits // 8)
    assert torch.equal(unpack(packed, bits, numel, signed=signed).long(), codes)


def test_unpack_dtypes_hold_the_codes():
    assert unpack(pack(torch.tensor([-128, 127]), 8), 8, 2).dtype == torch.int8
    unsigned = unpack(pack(torch.tensor([0, 255]), 8, signed=False), 8, 2, signed=False)
    assert unsigned.dtype == torch.uint8 and unsigned.tolist() == [0, 255]


def test_fields_run_lsb_first_across_bytes():
    # 3-bit fields 1..7, 0: byte 0 holds 1, 2 and the low two bits of 3.
    packed = pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3, signed=False)
    assert packed.tolist() == [0b11010001, 0b01011000, 0b00011111]


def test_shape_is_flattened():
    codes = torch.randint(-4, 4, (3, 5, 7), dtype=torch.int8)
    assert torch.equal(unpack(pack(codes, 3), 3, codes.numel()).view_as(codes), codes)


def test_empty():
    assert pack(torch.zeros(0, dtype=torch.int8), 5).numel() == 0
    assert unpack(torch.zeros(0, dtype=torch.uint8), 5, 0).numel() == 0


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be"):
        pack(torch.zeros(4, dtype=torch.int8), bits)


def test_codes_out_of_range():
    with pytest.raises(ValueError, match=r"4-bit range \[-8, 7\]"):
        pack(torch.tensor([8]), 4)
    with pytest.raises(ValueError, match=r"range \[0, 15\]"):
        pack(torch.tensor([-1]), 4, signed=False)


def test_float_codes_refused():
    with pytest.raises(ValueError, match="integer tensor"):
        pack(torch.zeros(4), 4)


def test_wrong_packed_length():
    with pytest.raises(ValueError, match="take 2 bytes, got 1"):
        unpack(torch.zeros(1, dtype=torch.uint8), 4, 4)
    with pytest.raises(ValueError, match="flat uint8"):
        unpack(torch.zeros(2, dtype=torch.int8), 4, 4)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("numel", [2, 7, 8, 9, 1001])
def test_planes_round_trip_at_b_bits_per_code(bits, numel):
    codes = _random_codes(bits, numel, signed=True)
    planes = pack_planes(codes, bits)
    assert planes.dtype == torch.uint8 and planes.numel() == planes_size(numel, bits)
    assert planes_size(numel, bits) <= packed_size(numel, bits) + 3  # at most a byte of padding per plane
    assert torch.equal(unpack_planes(planes, bits, numel).long(), codes)
    out = torch.empty(numel, dtype=torch.int8)
    assert unpack_planes(planes, bits, numel, out=out) is not None and torch.equal(out.long(), codes)


def test_four_bit_planes_are_two_codes_per_byte():
    assert planes_size(1000, 4) == 500 and planes_size(1000, 3) == 250 + 125
    with pytest.raises(ValueError, match="plane bytes"):
        unpack_planes(torch.zeros(3, dtype=torch.uint8), 4, 1000)
