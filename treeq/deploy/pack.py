"""Dense bit packing of quantization codes: b-bit integers stored b bits apiece in uint8.

Part of the deployment path: an exported checkpoint holds each weight at its own
bit-width, so a 3-bit layer costs 3/8 of a byte per weight. Fields run LSB-first
across byte boundaries; eight codes fill exactly `bits` bytes.

`pack_planes` is the in-memory twin for deployed layers: the same bytes per code, laid out so that a
kernel unpacks with a few whole-tensor shifts (two 4-bit codes per byte; 3 bits as a 2-bit and a 1-bit plane).
"""
import torch

BIT_WIDTHS = range(2, 9)


def packed_size(numel, bits):
    """Bytes that `numel` codes of `bits` bits take: ceil(numel * bits / 8)."""
    return (numel * bits + 7) // 8


def pack(codes, bits, *, signed=True):
    """Integer codes (any shape) -> flat uint8 tensor of `packed_size(codes.numel(), bits)` bytes.

    Signed codes (symmetric quantizers) are stored offset by 2**(bits-1) so every field
    is unsigned; pass `signed=False` for codes already in [0, 2**bits - 1].
    """
    _check_bits(bits)
    fields = _to_fields(codes, bits, signed)
    numel = fields.numel()
    groups = torch.nn.functional.pad(fields, (0, -numel % 8)).view(-1, 8)
    # Eight b-bit fields make one 8b-bit word (at most 64 bits), which splits into b bytes.
    words = (groups << (bits * torch.arange(8, device=codes.device))).sum(dim=1, keepdim=True)
    data = (words >> (8 * torch.arange(bits, device=codes.device))) & 0xFF
    return data.to(torch.uint8).flatten()[:packed_size(numel, bits)]


def unpack(packed, bits, numel, *, signed=True):
    """Inverse of `pack`: the first `numel` codes as a flat int8 (signed) or uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a flat uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != packed_size(numel, bits):
        raise ValueError(f"{numel} codes of {bits} bits take {packed_size(numel, bits)} bytes, got {packed.numel()}")
    data = torch.nn.functional.pad(packed.long(), (0, -packed.numel() % bits)).view(-1, bits)
    words = (data << (8 * torch.arange(bits, device=packed.device))).sum(dim=1, keepdim=True)
    fields = ((words >> (bits * torch.arange(8, device=packed.device))) & ((1 << bits) - 1)).flatten()[:numel]
    if signed:
        return (fields - (1 << (bits - 1))).to(torch.int8)
    return fields.to(torch.uint8)


# Bit planes of each width: b = sum of its planes, widest first (3 = 2 + 1, 7 = 4 + 2 + 1).
_PLANES = {bits: tuple(width for width in (4, 2, 1) if bits & width) for bits in range(2, 8)}
_PLANES[8] = (8,)


def pack_planes(codes, bits):
    """Signed integer codes (any shape) -> flat uint8 planes of ceil(numel * bits / 8) bytes (plus < 1 byte
    per plane of padding), for `unpack_planes`.

    A plane of width p holds p bits of every code: its byte j carries, in bits s*p..s*p+p-1, the field of
    code s*L + j (L = bytes of the plane), so each of the 8/p segments unpacks with one shift and mask over
    a contiguous run of codes instead of per-code bit arithmetic.
    """
    _check_bits(bits)
    fields = _to_fields(codes, bits, signed=True).to(torch.uint8)
    planes, offset = [], 0
    for width in reversed(_PLANES[bits]):  # low bits first
        per_byte = 8 // width
        part = (fields >> offset) & ((1 << width) - 1)
        segments = torch.nn.functional.pad(part, (0, -part.numel() % per_byte)).view(per_byte, -1)
        plane = torch.zeros(segments.shape[1], dtype=torch.uint8, device=codes.device)
        for segment in range(per_byte):
            plane |= segments[segment] << (segment * width)
        planes.append(plane)
        offset += width
    return torch.cat(planes[::-1])


def planes_size(numel, bits):
    """Bytes of `pack_planes` for `numel` codes."""
    return sum(-(-numel // (8 // width)) for width in _PLANES[bits])


def unpack_planes(planes, bits, numel, out=None):
    """Inverse of `pack_planes`: the first `numel` codes as flat int8 (written into `out` when given)."""
    _check_bits(bits)
    if planes.numel() != planes_size(numel, bits):
        raise ValueError(f"{numel} codes of {bits} bits take {planes_size(numel, bits)} plane bytes, got {planes.numel()}")
    if bits == 8:
        result = planes.view(torch.int8).clone() if out is None else out.copy_(planes.view(torch.int8))
        return result.sub_(-128)  # stored offset by 128: adding 128 in int8 wraps back to the signed code
    fields = torch.zeros(numel, dtype=torch.uint8, device=planes.device) if out is None else out.view(torch.uint8).zero_()
    start, offset, widths = 0, bits, _PLANES[bits]
    for width in widths:  # widest (highest bits) first, as stored
        offset -= width
        per_byte, length = 8 // width, -(-numel // (8 // width))
        plane = planes[start:start + length]
        start += length
        for segment in range(per_byte):
            codes = fields[segment * length:(segment + 1) * length]  # the last segment may be short
            part = plane[:codes.numel()]
            part = part >> (segment * width) if segment else part
            if segment < per_byte - 1:
                part = part & ((1 << width) - 1)
            codes |= part << offset if offset else part
    # Fields are code + 2^(b-1) in [0, 2^b): the uint8 subtraction wraps negative codes to their int8 bits.
    return fields.sub_(1 << (bits - 1)).view(torch.int8)


def _to_fields(codes, bits, signed):
    """Codes -> flat int64 unsigned fields, refusing anything that does not fit `bits` bits."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    fields = codes.flatten().long()
    if signed:
        fields = fields + (1 << (bits - 1))
    if fields.numel() and (fields.min() < 0 or fields.max() >= 1 << bits):
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        raise ValueError(f"codes out of the {bits}-bit range [{low}, {high}]")
    return fields


def _check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BIT_WIDTHS:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
