"""Quantized attention on the ``cuda`` backend: Q·Kᵀ, softmax and P·V in one fused Triton
kernel (``triton_ops.quant_attention``) in place of a quantizable attention's explicit
matmuls (``ditq.models.adapter.explicit_attention``), which otherwise run simulated: four
fake-quantizations around two matmuls, with the (B, H, N, N) score and probability
matrices in memory.

q, k and v are quantized to their codes minus zero points (integers of at most 9 bits,
exact in BF16), once each in a code pass (stored as BF16) or by the attention passes as
each tile loads, whichever is measured faster per shape; the attention passes multiply
these codes on BF16 tensor cores (summed exactly in fp32; a head's channels padded to a
power of two, DiT-XL/2's 72 to 128): a first pass over the keys finds each query
row's softmax maximum and denominator, a second quantizes P = exp(s - m) / l in registers
with P's range and multiplies it with v's codes (with a static P range over at most 256
keys, where measured faster, one pass holds a query tile's scores over every key and does
both). The same arithmetic as the simulated
attention in fp32 up to the order of float operations: the scales multiply the integer
dots instead of each operand, the exponentials are taken in base 2 (scores times log2 e),
and P / Δp is one multiplication by each row's 1 / (l Δp) instead of two divisions, so a
probability within a few ulps of a rounding boundary may get the neighbouring code.
Taken: the four matmul inputs of one int spec, at most 8 bits, per tensor, static
(calibrated) or dynamic, with or without an additive score mask (diffusers'
cross-attention); other formats stay simulated.
"""

from __future__ import annotations

import torch
from torch import nn

from ditq.kernels.triton_ops import INTERPRETED, quant_attention
from ditq.models.adapter import MATMUL_POINTS
from ditq.quant.quantizer import MIN_SCALE, Quantizer, find_range, qparams_from_range
from ditq.quant.spec import PerTensor, QuantSpec


def fusable(quantizers: list[nn.Module]) -> bool:
    """Whether the four matmul quantizers (``MATMUL_POINTS`` order) can run fused."""
    if not all(isinstance(q, Quantizer) and q.spec.enabled for q in quantizers):
        return False
    spec = quantizers[0].spec
    same = all(q.spec == spec for q in quantizers)
    calibrated = spec.dynamic or all(q.calibrated for q in quantizers)
    int_tensor = spec.fmt == "int" and spec.bits <= 8 and isinstance(spec.granularity, PerTensor)
    return same and calibrated and int_tensor


class FusedQuantAttention(nn.Module):
    """The ``fused_matmuls`` of one attention module: its quantizers' spec and static
    ranges, kept as fp32 tensors outside the module's buffers (the state dict is unchanged,
    and ``model.to(torch.bfloat16)`` does not round them)."""

    def __init__(self, quantizers: list[Quantizer]) -> None:
        super().__init__()
        self.spec: QuantSpec = quantizers[0].spec
        self.qkv_qparams = self.p_qparams = None
        if not self.spec.dynamic:
            qparams = [
                torch.stack([q.scale.clamp(min=MIN_SCALE).reshape(()), q.zero_point.reshape(())])
                for q in quantizers
            ]
            self.qkv_qparams = torch.cat(qparams[:3]).float()
            self.p_qparams = qparams[3].float()

    @staticmethod
    def runs_on(device: torch.device) -> bool:
        """The kernel runs on CUDA tensors (and on CPU ones in the Triton interpreter)."""
        return device.type == "cuda" or INTERPRETED

    def _dynamic_qparams(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(qparams_from_range(*find_range(x, self.spec), self.spec)).reshape(2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention output (B, H, Nq, D) of q (B, H, Nq, D), k and v (B, H, Nk, D),
        with an additive score ``mask`` broadcastable to (B, H, Nq, Nk) if given."""
        if self.spec.dynamic:
            qkv = torch.cat([self._dynamic_qparams(x) for x in (q, k, v)]).float()
            p_qparams = None
        else:  # moved with the inputs if the model moved after conversion
            qkv, p_qparams = self.qkv_qparams.to(q.device), self.p_qparams.to(q.device)
        return quant_attention(
            q, k, v, qkv, p_qparams, float(scale), self.spec.bits, self.spec.symmetric, mask
        )


def fuse_attention(model: nn.Module) -> list[str]:
    """Give every attention of ``model`` that runs quantized matmuls a
    :class:`FusedQuantAttention` (in place); returns the names of those left simulated."""
    left = []
    for name, module in model.named_modules():
        if not getattr(module, "explicit_matmuls", False):
            continue
        quantizers = [getattr(module, point) for point in MATMUL_POINTS]
        if fusable(quantizers):
            module.fused_matmuls = FusedQuantAttention(quantizers)
        elif any(isinstance(q, Quantizer) and q.spec.enabled for q in quantizers):
            left.append(f"{name} ({quantizers[0].spec.describe()})")
    return left
