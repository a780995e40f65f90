"""Randomized Hadamard rotations (METHODS.md, "Beyond the seeds: Rotation").

For an input width n, ``R = diag(signs) · blockdiag(H_b, ..., H_b) / √b`` with ``H_b`` the
Sylvester Hadamard matrix of the largest power of two ``b`` dividing n (capped at
``MAX_BLOCK``) and random ``signs`` ∈ {±1}ⁿ. R is orthogonal, so ``X Wᵀ = (X R)(W R)ᵀ``:
the weight is rotated once offline and the input online, by a fast Walsh–Hadamard
transform (O(n log b) per token, torch only). Widths that are not powers of two (DiT:
384 = 3 · 128, 1152 = 9 · 128, 4608 = 9 · 512) use the block-diagonal form, one of the two
METHODS.md names; a block spreads an outlier channel over b channels.
"""

from __future__ import annotations

import math

import torch

from ditq.errors import DitqError

MAX_BLOCK = 4096


def hadamard_block(width: int) -> int:
    """The block size b of a width: its largest power-of-two divisor, at most MAX_BLOCK."""
    if width < 1:
        raise DitqError(f"a rotation needs a positive width, got {width}")
    return min(width & -width, MAX_BLOCK)


def walsh_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x · blockdiag(H_block) / √block`` over the last dim (Sylvester order: H_1 = [1],
    H_2k = [[H_k, H_k], [H_k, -H_k]]), by log2(block) butterfly stages."""
    width = x.shape[-1]
    if block & (block - 1) or width % block:
        raise DitqError(f"Hadamard block {block} must be a power of two dividing {width}")
    lead = x.shape[:-1]
    y = x.reshape(-1, width // block, block)
    h = 1
    while h < block:
        y = y.reshape(-1, width // block, block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(*lead, width) / math.sqrt(block)).to(x.dtype)


def random_signs(width: int, seed: int) -> torch.Tensor:
    """``width`` random ±1 values (float32) from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (width,), generator=generator).float() * 2 - 1


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x R`` over the last dim with ``R = diag(signs) · blockdiag(H_b) / √b`` (module
    docstring); also the offline rotation of a weight's rows, ``W R``."""
    return walsh_hadamard(x * signs.to(x.dtype), hadamard_block(x.shape[-1]))
