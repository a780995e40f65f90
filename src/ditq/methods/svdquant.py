"""SVDQuant (Li et al., ICLR 2025; METHODS.md "Beyond the seeds"): smoothing that moves
activation outliers into the weights, then a 16-bit low-rank branch that absorbs the
weight's outliers, so that only a residual is quantized; W4A4 with 4-bit activations per
token in groups of 64 input channels (dynamic) and 4-bit symmetric weights in groups of 64.

Per block role (qkv, proj, fc1, fc2; the linears of a role read one input):

1. ``λ_j = max|X_j|^α / max|W_j|^(1−α)`` (:func:`ditq.quant.smoothing.smoothing_factor`,
   statistics of the FP model over the whole calibration set), with α from
   ``alpha_grid_points`` values evenly spaced in [0, 1] minimizing, on a subsample of the
   FP inputs X of the role, ``Σ_layers ‖X Wᵀ − (Q(X̂) Q(R)ᵀ + X̂ (L₁L₂)ᵀ)‖²`` for
   ``X̂ = X / λ`` and ``Ŵ = W diag(λ) = L₁L₂ + R`` (the whole layer as it will run, residual
   rounded to nearest);
2. λ folded where the model allows (:func:`ditq.pipeline.folding.smooth_layers`: adaLN rows
   for qkv and fc1, V rows for proj, online for fc2);
3. with ``rotate``, the role's Hadamard rotations (smooth, then rotate; the search above
   scores the rotated layer);
4. ``L₁L₂`` = the rank-``lowrank_rank`` truncated SVD of the weight; the layer keeps
   ``R = Ŵ − L₁L₂`` for its quantizer and the branch
   (:meth:`ditq.quant.layers.QuantLinear.set_lowrank`).

The residual is then rounded to nearest, or by GPTQ with ``--weight-solver gptq`` (on the
inputs it multiplies, ``X̂``). Linears outside the blocks, when selected, are quantized
plainly.

Where we differ from the published method (deepcompressor/nunchaku): α is searched per
role on the layer output error (theirs per layer, on their own objective), λ folds into a
producer where one exists (theirs is fused into the activation quantization kernel); the
low-rank branch reads the float smoothed input ``X̂`` as theirs does; activations are
integer (their NVFP4 variant is not offered) and symmetric in every layer (theirs quantize
fc2's input, the GELU output shifted by +0.171875, unsigned; ``--no-a-symmetric`` gives
every group a zero point instead); on the cuda backend the layers run on
ditq's int8 Triton GEMM (int4 codes held in int8, the low-rank branch in its epilogue),
not on a 4-bit tensor-core kernel like theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from ditq.calib.dataset import CalibrationSet
from ditq.calib.hooks import capture_layer_inputs
from ditq.calib.stats import weight_salience
from ditq.errors import DitqError
from ditq.models.adapter import BLOCK_ROLES
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.folding import smooth_layers
from ditq.pipeline.method import Method, RunContext
from ditq.pipeline.rotation import layer_signs, rotate_layers
from ditq.pipeline.steps import quantized_role_groups
from ditq.quant.hadamard import rotate
from ditq.quant.lowrank import rank_r_factors
from ditq.quant.observer import ChannelAbsMaxObserver, observer_for, range_from_observer
from ditq.quant.quantizer import Quantizer
from ditq.quant.smoothing import smoothing_factor
from ditq.quant.spec import QuantSpec

SEARCH_ROWS = 4096
"""Input rows (tokens) per role on which α is searched."""


@dataclass
class SVDQuantConfig(QuantConfig):
    """W4A4 as published: weights int4 symmetric in groups of 64, activations int4
    symmetric per token in groups of 64 (dynamic), a rank-32 branch."""

    wbits: int = 4
    abits: int = 4
    w_granularity: str = "group"
    w_group_size: int = 64
    w_symmetric: bool = True
    a_granularity: str = "group"
    a_group_size: int = 64
    a_dynamic: bool = True
    a_symmetric: bool = True
    lowrank_rank: int = field(default=32, metadata={"help": "rank r of the 16-bit low-rank branch"})
    alpha_grid_points: int = field(
        default=11, metadata={"help": "α values searched, evenly spaced in [0, 1]"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lowrank_rank < 1:
            raise DitqError(f"--lowrank-rank must be at least 1, got {self.lowrank_rank}")
        if self.alpha_grid_points < 1:
            raise DitqError(f"--alpha-grid-points must be at least 1, got {self.alpha_grid_points}")

    def alpha_grid(self) -> list[float]:
        if self.alpha_grid_points == 1:
            return [0.5]
        return torch.linspace(0, 1, self.alpha_grid_points, dtype=torch.float64).tolist()


def quantize_activation(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(x)`` for an activation spec, a static range taken on ``x`` itself."""
    if not spec.enabled:
        return x
    quantizer = Quantizer(spec).to(x.device)
    if spec.needs_calibration:
        observer = observer_for(spec)
        observer.update(x)
        quantizer.set_range(*range_from_observer(observer, spec))
    return quantizer(x)


def split_lowrank(
    weight: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Ŵ = L₁L₂ + R``: the rank-``rank`` truncated SVD as (up L₁, down L₂) and R."""
    up, down = rank_r_factors(weight, min(rank, min(weight.shape)))
    return up, down, weight - up @ down


def layer_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    smoothing: torch.Tensor,
    signs: torch.Tensor | None,
    rank: int,
    weight_spec: QuantSpec,
    act_spec: QuantSpec,
) -> float:
    """``‖X Wᵀ − (Q(X̂) Q(R)ᵀ + X̂ (L₁L₂)ᵀ)‖²`` for ``X̂ = (X / λ) H``, ``Ŵ = W diag(λ) H``
    (H = I without ``signs``)."""
    xs, ws = x / smoothing, weight * smoothing
    if signs is not None:
        xs, ws = rotate(xs, signs), rotate(ws, signs)
    up, down, residual = split_lowrank(ws, rank)
    quantizer = Quantizer(weight_spec).to(x.device)
    if weight_spec.needs_calibration:
        quantizer.find_params(residual)
    out = quantize_activation(xs, act_spec) @ quantizer(residual).T + (xs @ down.T) @ up.T
    return float((x @ weight.T - out).pow(2).sum())


def role_error(
    x: torch.Tensor,
    weights: dict[str, torch.Tensor],
    act_salience: torch.Tensor,
    w_salience: torch.Tensor,
    signs: dict[str, torch.Tensor | None],
    config: SVDQuantConfig,
    alpha: float,
) -> float:
    """:func:`layer_error` summed over the linears of a role (one input ``x``) for α."""
    smoothing = smoothing_factor(act_salience, w_salience, alpha)
    return sum(
        layer_error(
            x,
            weight,
            smoothing,
            signs[name],
            config.lowrank_rank,
            config.weight_spec(name),
            config.act_spec(name),
        )
        for name, weight in weights.items()
    )


@dataclass(frozen=True)
class SVDQuant(Method):
    """FP statistics and input samples per role; then per role α search, smoothing,
    rotation and the low-rank split."""

    def needs_calibration(self, config: QuantConfig) -> bool:
        return True

    def analyze(
        self, model: nn.Module, config: QuantConfig, calib: CalibrationSet | None, ctx: RunContext
    ) -> dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]]:
        groups = quantized_role_groups(model, config, BLOCK_ROLES)
        first = [group[0] for group in groups]  # one input per group
        salience = {name: ChannelAbsMaxObserver() for name in first}  # s(X_j), same pass
        rows = capture_layer_inputs(
            model,
            calib,
            first,
            ctx.batch_size,
            ctx.device,
            ctx.progress,
            max_tokens=SEARCH_ROWS,
            observers=salience,
        )
        return {
            group: (salience[group[0]].result().float().cpu(), rows[group[0]]) for group in groups
        }

    def transform(
        self, model: nn.Module, config: QuantConfig, analysis: Any, ctx: RunContext
    ) -> dict[str, Any]:
        chosen, ranks = {}, {}
        for group, (salience, rows) in analysis.items():
            layers = [model.get_submodule(name) for name in group]
            device = layers[0].weight.device
            x = rows.to(device=device, dtype=torch.float32)
            w_salience = weight_salience(*(layer.weight for layer in layers))
            signs = {
                name: layer_signs(config.rotate_seed, name, layer.in_features).to(device)
                if config.rotate
                else None
                for name, layer in zip(group, layers, strict=True)
            }

            salience = salience.to(device)
            weights = {
                name: layer.weight.detach() for name, layer in zip(group, layers, strict=True)
            }
            score = partial(role_error, x, weights, salience, w_salience, signs, config)
            alpha = min(config.alpha_grid(), key=score)
            smooth_layers(model, group, smoothing_factor(salience, w_salience, alpha))
            if config.rotate:
                rotate_layers(model, config.rotate_seed, group)
            for name, layer in zip(group, layers, strict=True):
                up, down, residual = split_lowrank(layer.weight.data, config.lowrank_rank)
                layer.weight.data = residual
                layer.set_lowrank(up, down)
                ranks[name] = up.shape[1]
            chosen[",".join(group)] = alpha
        return {"alpha": chosen, "lowrank_rank": ranks}


SVDQUANT = SVDQuant(
    "svdquant",
    SVDQuantConfig,
    summary="SVDQuant: smoothing + 16-bit low-rank branch, residual quantized (W4A4)",
)
