"""Channel scaling that costs nothing at inference: pure functions that fold a
per-input-channel factor into whatever produces a layer's input (SmoothQuant style).

For linears with one input X and weights W, ``smooth_layers(model, names, s)`` computes
``X ← X / s`` and ``W ← W · diag(s)`` for each, so that every ``X Wᵀ`` is unchanged
(METHODS.md: PTQ4DiT's offline re-parameterization with ``B^X = diag(1/s)``,
``B^W = diag(s)``; DiTAS' folding).
Where the divisor goes, the model's adapter says (``ModelAdapter.input_fold``):

- an input ``modulate(norm(x), shift, scale)`` (a DiT's qkv and fc1): into the rows of the
  adaLN linear that produce that shift/scale chunk (exact for every timestep and class);
- the attention output ``softmax(QKᵀ) V`` (proj): into the V rows of qkv (and of qkv's
  low-rank branch, if any);
- anything else (fc2 reads ``GELU(fc1(x))``): applied online
  (``QuantLinear.input_scale``); ``online=True`` does the same for any layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ditq.calib.hooks import get_layer
from ditq.errors import DitqError
from ditq.models.adapter import AdaLNFold, adapter_for


@torch.no_grad()
def fold_into_adaln(adaln: nn.Linear, shift_chunk: int, scale_chunk: int, factor: torch.Tensor):
    """Multiply ``modulate(x, shift, scale)`` by ``factor`` per channel via the adaLN linear.

    ``(1 + scale) · f = 1 + scale'`` with ``scale' = (1 + scale) f - 1``: rows of the scale
    chunk become ``W f``, bias ``(b + 1) f - 1``; the shift chunk becomes ``W f``, ``b f``.
    """
    hidden = factor.numel()
    f = factor.to(adaln.weight.dtype)
    shift = slice(shift_chunk * hidden, (shift_chunk + 1) * hidden)
    scale = slice(scale_chunk * hidden, (scale_chunk + 1) * hidden)
    adaln.weight[shift] *= f[:, None]
    adaln.bias[shift] *= f
    adaln.weight[scale] *= f[:, None]
    adaln.bias[scale] = (adaln.bias[scale] + 1) * f - 1


@torch.no_grad()
def fold_into_value_rows(qkv: nn.Module, factor: torch.Tensor, fused: bool = True) -> None:
    """Multiply the attention output channels by ``factor`` via the V rows of qkv (of a
    separate v projection when not ``fused``: all its rows).

    ``P·(V f) = (P·V) f`` for every head since V's output channel ``j`` (rows ``2C + j`` of
    qkv, head-major) is channel ``j`` of the attention output that proj reads.
    """
    hidden = factor.numel()
    rows = slice(2 * hidden, 3 * hidden) if fused else slice(0, hidden)
    if getattr(qkv, "packed", False):
        raise DitqError("fold smoothing factors before quantized layers are packed")
    qkv.weight[rows] *= factor.to(qkv.weight.dtype)[:, None]
    if qkv.bias is not None:
        qkv.bias[rows] *= factor.to(qkv.bias.dtype)
    if getattr(qkv, "lowrank_up", None) is not None:
        qkv.lowrank_up[rows] *= factor.to(qkv.lowrank_up.dtype)[:, None]


@torch.no_grad()
def scale_weight_columns(linear: nn.Module, factor: torch.Tensor) -> None:
    """``W ← W · diag(factor)`` (input channel j of W scaled by ``factor[j]``)."""
    linear.weight *= factor.to(linear.weight.dtype)[None, :]
    if getattr(linear, "lowrank_down", None) is not None:
        linear.lowrank_down *= factor.to(linear.lowrank_down.dtype)[None, :]


@torch.no_grad()
def smooth_layers(
    model: nn.Module, layers: Sequence[str], s: torch.Tensor, online: bool = False
) -> None:
    """Divide the input that ``layers`` share by ``s`` and multiply the weight columns of
    each by ``s`` (a role's linears: ``ModelAdapter.role_groups``).

    The model computes the same function afterwards (to float rounding) for every input,
    timestep and label. Linears whose input has no producer to fold into (fc2), and any
    with ``online``, divide their input online, which needs ``QuantLinear`` layers.
    """
    adapter = adapter_for(model)
    targets = [get_layer(model, layer) for layer in layers]
    folds = {adapter.input_fold(layer) for layer in layers}
    if len(folds) != 1:
        raise DitqError(f"{', '.join(layers)} do not read one input: smooth them one by one")
    (fold,) = folds
    s = s.detach().float().to(targets[0].weight.device)
    if online or fold is None:
        for layer, target in zip(layers, targets, strict=True):
            if not hasattr(target, "input_scale"):
                raise DitqError(
                    f"smoothing {layer} online needs a QuantLinear: quantize the model first"
                )
            previous = target.input_scale if target.input_scale is not None else torch.ones_like(s)
            target.input_scale = previous * s
    elif isinstance(fold, AdaLNFold):
        producer = get_layer(model, fold.producer)
        fold_into_adaln(producer, fold.shift_chunk, fold.scale_chunk, 1.0 / s)
    else:
        fold_into_value_rows(get_layer(model, fold.producer), 1.0 / s, fold.fused)
    for target in targets:
        scale_weight_columns(target, s)
