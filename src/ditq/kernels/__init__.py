"""Real low-bit execution: Triton / cuBLAS kernels for packed ``QuantLinear`` layers.

``backend="simulated"`` runs the fake-quantized model as calibrated; ``backend="cuda"``
swaps every packed ``QuantLinear`` for a :class:`RealQuantLinear` (``ditq.kernels.linear``
documents the formats and kernels). A converted model also runs on the CPU, through
the dequantize-then-matmul path. Quantized attention matmuls run as one fused kernel
(``ditq.kernels.attention``).
"""

from __future__ import annotations

import torch
from torch import nn

from ditq.errors import DitqError
from ditq.kernels.compile import (
    COMPILE_SCOPES,
    DEFAULT_COMPILE_SCOPE,
    compile_denoiser,
    use_cuda_graphs,
)
from ditq.kernels.linear import (
    FusedQuantMlp,
    RealQuantLinear,
    convert_model,
    layer_kind,
    quantize_activation,
)

BACKENDS = ("simulated", "cuda")


def resolve_backend(backend: str | None, device: str | torch.device, quantized: bool) -> str:
    """The backend to run: ``backend`` checked against ``device``, or by default ``cuda``
    for a quantized model on a CUDA device and ``simulated`` otherwise."""
    if backend is None:
        on_gpu = torch.device(device).type == "cuda" and torch.cuda.is_available()
        return "cuda" if quantized and on_gpu else "simulated"
    if backend not in BACKENDS:
        raise DitqError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "cuda":
        if not torch.cuda.is_available():
            raise DitqError(
                "backend 'cuda' needs a CUDA GPU and none is available; use --backend "
                "simulated (or leave --backend out) on this machine"
            )
        if torch.device(device).type != "cuda":
            raise DitqError(
                f"backend 'cuda' runs on a CUDA device, not {device!r}: pass --device cuda"
            )
    return backend


def apply_backend(model: nn.Module, backend: str) -> nn.Module:
    """``model`` ready for ``backend`` (converted in place for ``cuda``)."""
    return convert_model(model) if backend == "cuda" else model


__all__ = [
    "BACKENDS",
    "COMPILE_SCOPES",
    "DEFAULT_COMPILE_SCOPE",
    "FusedQuantMlp",
    "RealQuantLinear",
    "apply_backend",
    "compile_denoiser",
    "convert_model",
    "layer_kind",
    "quantize_activation",
    "resolve_backend",
    "use_cuda_graphs",
]
