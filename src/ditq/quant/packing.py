"""Storage of integer codes: the low-bit weight format shared by simulated and real execution.

Codes from ``ditq.quant.quantize`` are int8 (symmetric) or uint8 (asymmetric), one per
element (METHODS.md, "Uniform quantizers"). For storage, codes of at most 4 bits are
packed two per byte along the last dim (low nibble first); symmetric ones are first
shifted by ``2^(b-1)`` into ``[0, 2^b - 1]``. Codes of 5 to 8 bits are stored one per
byte as they are. FP8 codes are ``torch.float8_e4m3fn`` tensors, one per byte.
"""

from __future__ import annotations

import torch

from ditq.errors import DitqError
from ditq.quant.spec import PACKED_BITS, integer_range


def code_dtype(symmetric: bool) -> torch.dtype:
    """Dtype of unpacked integer codes: int8 for symmetric, uint8 for asymmetric."""
    return torch.int8 if symmetric else torch.uint8


def storage_dtype_for(bits: int, symmetric: bool, fmt: str = "int") -> torch.dtype:
    """Dtype of stored codes: float8_e4m3fn for FP8, uint8 holding two codes per byte for
    at most 4 bits, else one code per byte (int8 symmetric, uint8 asymmetric)."""
    if fmt == "fp8_e4m3":
        return torch.float8_e4m3fn
    if not 2 <= bits <= 8:
        raise DitqError(f"no code storage for {bits}-bit tensors; codes exist for 2..8 bits")
    return torch.uint8 if bits <= PACKED_BITS else code_dtype(symmetric)


def pack_int4(codes: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Pack uint8 codes in [0, 15] two per byte along ``dim``: element 2i goes to the low
    nibble, 2i+1 to the high nibble (codes [1, 2] -> byte 0x21)."""
    if codes.dtype != torch.uint8:
        raise DitqError(f"pack_int4 takes uint8 codes, got {codes.dtype}; cast them first")
    if codes.shape[dim] % 2:
        raise DitqError(
            f"pack_int4 needs an even size along dim {dim}, got shape {tuple(codes.shape)}; "
            "pad the tensor or store these codes one per byte"
        )
    if codes.numel() and int(codes.max()) > 15:
        raise DitqError(f"pack_int4 takes codes in [0, 15], got {int(codes.max())}")
    pairs = codes.movedim(dim, -1)
    packed = pairs[..., 0::2] | (pairs[..., 1::2] << 4)
    return packed.movedim(-1, dim)


def unpack_int4(packed: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 codes in [0, 15], twice as long along ``dim``."""
    if packed.dtype != torch.uint8:
        raise DitqError(f"unpack_int4 takes uint8 bytes, got {packed.dtype}")
    nibbles = packed.movedim(dim, -1)
    codes = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-1).flatten(-2)
    return codes.movedim(-1, dim)


def pack_codes(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Integer codes (from ``quantize``) to their storage form (``storage_dtype_for``)."""
    if codes.dtype != code_dtype(symmetric):
        raise DitqError(
            f"{'symmetric' if symmetric else 'asymmetric'} codes must be "
            f"{code_dtype(symmetric)}, got {codes.dtype}"
        )
    if bits > PACKED_BITS:
        return codes
    offset = -integer_range(bits, symmetric)[0]
    return pack_int4((codes.to(torch.int16) + offset).to(torch.uint8))


def unpack_codes(stored: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Inverse of ``pack_codes``: int8 (symmetric) or uint8 (asymmetric) codes."""
    if bits > PACKED_BITS:
        return stored
    offset = -integer_range(bits, symmetric)[0]
    return (unpack_int4(stored).to(torch.int16) - offset).to(code_dtype(symmetric))
