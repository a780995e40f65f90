"""Randomized Hadamard rotation of quantized linears (METHODS.md, "Beyond the seeds:
Rotation"; QuaRot, applied to DiTs by ConvRot and DiRotQ): any method's ``--rotate``.

Each quantized linear gets its own random signs (seeded by the configuration's seed and
the layer's name) and computes ``Q_a((X / s) H) · Q_w(W H)ᵀ``: the weight (and a low-rank
branch's R) is rotated offline, the input online before the activation quantizer
(:meth:`ditq.quant.layers.QuantLinear.set_rotation`). The pipeline rotates after the
method's transform (smooth, then rotate) and before weight ranges and any solver (rotate,
then solve); a method may rotate earlier itself (SVDQuant, before its SVD), and layers
already rotated are left as they are.

Where we differ from the published recipes: every input is rotated online, including
proj's, which the papers fold head-wise into the V rows of qkv (a block-diagonal H per
head commutes with attention); the online form is exact for every layout and costs one
Walsh–Hadamard transform per token. A head-wise fold needs Hadamard blocks inside a head:
DiT-XL/2's heads are 72 wide, so its blocks would be 8 channels (128 online), too small
to spread an outlier.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ditq.pipeline.steps import quantized_layers
from ditq.quant.hadamard import hadamard_block, random_signs


def layer_signs(seed: int, name: str, width: int) -> torch.Tensor:
    """The random signs of layer ``name`` (``width`` input channels), seeded by the
    configuration's seed mixed with the name."""
    return random_signs(width, (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def rotate_layers(
    model: nn.Module, seed: int, names: Iterable[str] | None = None
) -> dict[str, Any]:
    """Rotate the quantized linears ``names`` (default: all) not rotated yet; returns
    ``{"seed", "layers", "block_sizes"}`` (Hadamard block size → layer count)."""
    layers = quantized_layers(model)
    chosen = list(layers) if names is None else list(names)
    blocks: Counter[int] = Counter()
    for name in chosen:
        layer = layers[name]
        if layer.rotation_signs is None:
            layer.set_rotation(layer_signs(seed, name, layer.in_features))
            blocks[hadamard_block(layer.in_features)] += 1
    return {"seed": seed, "layers": blocks.total(), "block_sizes": dict(blocks)}
