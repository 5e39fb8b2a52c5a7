"""Dense bit packing of quantization codes: b-bit integers stored b bits apiece in uint8.

Part of the deployment path: an exported checkpoint holds each weight at its own
bit-width, so a 3-bit layer costs 3/8 of a byte per weight. Fields run LSB-first
across byte boundaries; eight codes fill exactly `bits` bytes.
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
