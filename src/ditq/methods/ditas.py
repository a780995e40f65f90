"""DiTAS (Dong & Zhang, WACV 2025; METHODS.md "DiTAS"): temporal-aggregated smoothing with a
layer-wise grid search of α and a training-free low-rank weight module, data-free.

Per block linear (qkv, proj, fc1, fc2), in the official code's order:

1. Low-rank module on the FP weight: ``(L, R) = lowrank_quantize(W, Q, r)``; the layer keeps
   ``W' = W − L R`` for its quantizer and the 16-bit branch ``L (R x)``.
2. TAS: ``A_j = max_t s(X_j^(t))`` over every calibration entry (one statistics pass over the
   FP model); ``B_j = max_i |Q(W')_ij|``; ``s_j(α) = max(A_j^α / B_j^(1-α), 1e-4)``.
3. α ∈ ``alpha_grid`` minimizing ``Σ ‖(W x + b) − (Q(W' s) Q(x / s) + L R x + b)‖²``
   ``= Σ ‖W' x − Q(W' s) Q(x / s)‖²`` over the layer's inputs at the search steps. As in the
   official code those inputs come from the FP model (not from already-quantized blocks);
   they are captured once per layer and reused for every α. Dynamic per-tensor activation
   ranges are those of each sampling step's whole batch (exact even when the rows are
   subsampled: they come from per-channel minima and maxima of all rows).
4. Folding (:func:`ditq.pipeline.folding.smooth_layers`): qkv and fc1 into adaLN, fc2 online,
   proj online by default (``fold_proj``: into the V rows of qkv and of its low-rank branch).
   A role held by several linears of one input (separate q, k and v projections) keeps a
   factor per linear, each divided online (one fold serves only one factor).

Why proj is smoothed online by default. The official code divides the V rows of qkv's
*already fake-quantized* weight by proj's factors: qkv's quantization error stays as it
was, but no per-group integer format holds the result. Real codes must quantize the folded
weight instead, and rows rescaled by different factors inside one column group (the
strided layout mixes q, k and V rows in every group) lose much of their precision: on a
tiny DiT this doubled the W4A8 error. Dividing proj's input online (one multiply per
element, fusable into the activation quantizer) computes exactly what the official
simulation computes, so it is the default; with ``fold_proj`` proj is searched before qkv
and qkv's search scores the weight it will really hold (V rows divided by proj's factors,
re-quantized).

Where we differ from the official code (documented choices): our low-rank branch reads the
smoothed input before activation quantization (theirs reads ``Q(x / s)``); the layer keeps
``W − L R`` from the last SVD and quantizes it (theirs keeps the quantized weight from the
step before that SVD, half an alternation apart); quantizers use ``2^b − 1`` levels with 0
exactly representable (theirs divides the range by ``2^b``); ``s_j = 1`` where ``A_j`` or
``B_j`` is 0 (theirs clamps both at 1e-4 first). The official search and model scale the
already-quantized weight, ``Q(W') s``; we quantize ``W' s``, the same thing for column groups
(a column group lies in one column, so column scaling commutes with its quantization) and
the honest thing for other granularities.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.calib.dataset import CalibrationSet
from ditq.calib.hooks import capture_layer_inputs
from ditq.calib.settings import CalibSettings
from ditq.calib.stats import activation_salience, weight_salience
from ditq.errors import DitqError
from ditq.models.adapter import adapter_for
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.folding import smooth_layers
from ditq.pipeline.method import Method, RunContext
from ditq.pipeline.steps import quantized_layers
from ditq.quant.lowrank import lowrank_quantize
from ditq.quant.quantizer import Quantizer
from ditq.quant.smoothing import smoothing_factor
from ditq.quant.spec import PerTensor, QuantSpec

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
"""The official grid: α = 0, 0.05, ..., 1."""
SMOOTHING_FLOOR = 1e-4
SEARCH_ORDER = ("proj", "qkv", "fc1", "fc2")
"""proj first: with ``fold_proj`` its factors divide the V rows of qkv, which qkv's search
must see."""
SEARCH_SEED = 0


@dataclass
class DiTASConfig(QuantConfig):
    """DiTAS with the official settings: W4A8; 4-bit weights asymmetric min/max in groups of
    32 output rows per input column (the official strided row layout; ``column_group`` for
    consecutive rows, ``group`` for input-channel groups); activations 8-bit asymmetric per
    tensor, dynamic (``a_dynamic=False`` for static ranges)."""

    wbits: int = 4
    abits: int = 8
    w_granularity: str = "column_group_strided"
    w_group_size: int = 32
    a_dynamic: bool = True
    alpha_grid: tuple[float, ...] = field(
        default=ALPHA_GRID,
        metadata={"help": "α values searched per layer, comma-separated, each in [0, 1]"},
    )
    lowrank_rank: int = field(
        default=32,
        metadata={"help": "rank of the 16-bit low-rank weight branch (0 = no branch)"},
    )
    lowrank_iters: int = field(
        default=10,
        metadata={"help": "alternations of quantization and truncated SVD for the branch"},
    )
    smooth_fc2: bool = field(
        default=True,
        metadata={"help": "also smooth fc2 (its input divisor is applied online)"},
    )
    fold_proj: bool = field(
        default=False,
        metadata={
            "help": "fold proj's smoothing into qkv's V rows (re-quantizing them) instead of "
            "dividing proj's input online, which matches the official numerics"
        },
    )
    search_steps: int = field(
        default=50,
        metadata={
            "help": "the α search uses the entries of the first N calibration steps (official: "
            "the first, noisiest 50 of a 100-step run); 0 = all steps"
        },
    )
    search_max_tokens: int = field(
        default=0,
        metadata={
            "help": "at most this many input rows per layer in the α search, drawn evenly "
            "from the search steps (bounds memory); 0 = all rows, as the official code"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.alpha_grid = tuple(float(a) for a in self.alpha_grid)
        except (TypeError, ValueError) as err:
            raise DitqError(
                f"--alpha-grid must be comma-separated numbers, got {self.alpha_grid!r}"
            ) from err
        if not self.alpha_grid or not all(0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise DitqError(
                f"--alpha-grid needs at least one α in [0, 1], got {list(self.alpha_grid)}; "
                "e.g. 0,0.25,0.5,0.75,1"
            )
        for name in ("lowrank_rank", "search_steps", "search_max_tokens"):
            if getattr(self, name) < 0:
                raise DitqError(f"--{name.replace('_', '-')} must be >= 0 (0 = off / all)")
        if self.lowrank_iters < 1:
            raise DitqError(f"--lowrank-iters must be at least 1, got {self.lowrank_iters}")


@dataclass
class _LayerPlan:
    """What the search decided for one layer: its smoothing factor and low-rank branch."""

    smoothing: torch.Tensor | None
    up: torch.Tensor | None
    down: torch.Tensor | None
    report: dict[str, Any]


class _ActivationQuantizer:
    """The layer's activation quantization as the search applies it to ``x / s``: dynamic
    per-tensor ranges per sampling step (the range of that step's whole batch), a static
    range pooled over the steps (min/max, whatever the spec's range method: the final
    static ranges are calibrated afterwards), or per-token ranges from each row."""

    def __init__(self, spec: QuantSpec, pooled: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.spec = spec
        self.per_tensor = spec.enabled and isinstance(spec.granularity, PerTensor)
        if self.per_tensor:
            self.static_twin = dataclasses.replace(spec, dynamic=False, range_method="minmax")
        self.pooled = None if spec.dynamic else pooled

    def __call__(
        self, rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor, s: torch.Tensor
    ) -> torch.Tensor:
        scaled = rows / s
        if not self.per_tensor:  # 16 bits, or per-token ranges taken from each row
            return Quantizer(self.spec)(scaled)
        low, high = self.pooled or (low, high)
        quantizer = Quantizer(self.static_twin)
        quantizer.set_range((low / s).min(), (high / s).max())
        return quantizer(scaled)


class _SearchInputs:
    """A layer's FP inputs at the search steps, captured once and kept per step as (rows,
    per-channel min, per-channel max of all the step's rows), with the output error of a
    quantized version of the layer on them."""

    def __init__(
        self,
        every_row: torch.Tensor,
        calib: CalibrationSet,
        max_tokens: int,
        device: str | torch.device,
    ) -> None:
        """``every_row``: the layer's inputs over ``calib`` in its entry order."""
        steps = torch.unique(calib.step).tolist()
        per_step = -(-max_tokens // len(steps)) if max_tokens else None
        generator = torch.Generator().manual_seed(SEARCH_SEED)
        self.groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        step_of_row = calib.step.repeat_interleave(len(every_row) // len(calib))
        for step in steps:
            rows = every_row[step_of_row == step].float()
            low, high = torch.aminmax(rows, dim=0)
            if per_step is not None and len(rows) > per_step:
                rows = rows[torch.randperm(len(rows), generator=generator)[:per_step]]
            self.groups.append((rows.to(device), low.to(device), high.to(device)))
        self.num_rows = sum(len(rows) for rows, _, _ in self.groups)
        self.pooled = (
            torch.stack([low for _, low, _ in self.groups]).amin(dim=0),
            torch.stack([high for _, _, high in self.groups]).amax(dim=0),
        )

    def squared_error(
        self, reference: torch.Tensor, quantized: torch.Tensor, s: torch.Tensor, act_spec: QuantSpec
    ) -> float:
        """``Σ_rows ‖x referenceᵀ − Q_a(x / s) quantizedᵀ‖²`` (float64 accumulation)."""
        quantize_input = _ActivationQuantizer(act_spec, self.pooled)
        total = 0.0
        for rows, low, high in self.groups:
            error = rows @ reference.T - quantize_input(rows, low, high, s) @ quantized.T
            total += float(error.double().pow(2).sum())
        return total


def _quantized_weight(
    residual: torch.Tensor, s: torch.Tensor, spec: QuantSpec, row_scale: torch.Tensor | None
) -> torch.Tensor:
    """The layer's quantized weight in the original coordinates: ``Q(W' diag(s))``, with the
    rows divided by ``row_scale`` before quantization (proj's factors in qkv's V rows) and
    multiplied back after."""
    weight = residual * s
    if row_scale is not None:
        weight = weight / row_scale[:, None]
    quantizer = Quantizer(spec)
    if spec.needs_calibration:
        quantizer.find_params(weight)
    weight = quantizer(weight)
    return weight if row_scale is None else weight * row_scale[:, None]


def _value_row_scale(qkv_rows: int, proj_smoothing: torch.Tensor | None) -> torch.Tensor | None:
    """Per-row factors of qkv's output that proj's smoothing divides out (1 for q and k)."""
    if proj_smoothing is None:
        return None
    ones = torch.ones(qkv_rows - proj_smoothing.numel(), device=proj_smoothing.device)
    return torch.cat([ones, proj_smoothing])


def _relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    return float((weight - approximation).double().norm() / weight.double().norm().clamp(min=1e-30))


def _plan_layer(
    model: nn.Module,
    name: str,
    config: DiTASConfig,
    act_salience: torch.Tensor,
    inputs: _SearchInputs,
    smooth: bool,
    row_scale: torch.Tensor | None,
    device: str | torch.device,
    advance: Callable[[int], object] = lambda _: None,
) -> _LayerPlan:
    """Low-rank branch, TAS factors and the α search for one layer (module docstring);
    ``advance(1)`` after each evaluated candidate (the progress bar)."""
    weight = model.get_submodule(name).weight.detach().float().to(device)
    w_spec, a_spec = config.weight_spec(name), config.act_spec(name)
    quantizer = Quantizer(w_spec)
    report: dict[str, Any] = {}
    ones = torch.ones(weight.shape[1], device=device)
    up = down = None
    residual = weight
    rank = min(config.lowrank_rank, *weight.shape)
    if rank:
        up, down = lowrank_quantize(weight, quantizer, rank, config.lowrank_iters)
        residual = weight - up @ down
        plain = _quantized_weight(weight, ones, w_spec, None)
        report["lowrank"] = {
            "rank": rank,
            "weight_error_plain": _relative_error(weight, plain),
            "weight_error_lowrank": _relative_error(weight, quantizer(residual) + up @ down),
        }
    elif w_spec.needs_calibration:
        quantizer.find_params(residual)
    count = inputs.num_rows * weight.shape[0]

    def mse(reference: torch.Tensor, s: torch.Tensor, rows_scale: torch.Tensor | None) -> float:
        quantized = _quantized_weight(reference, s, w_spec, rows_scale)
        error = inputs.squared_error(reference, quantized, s, a_spec) / count
        advance(1)
        return error

    output_mse = {"rtn": mse(weight, ones, None)}
    if rank:
        output_mse["lowrank"] = mse(residual, ones, None)
    best_s = None
    if smooth:
        a = act_salience.to(device)
        b = weight_salience(quantizer(residual))
        candidates = [smoothing_factor(a, b, alpha, SMOOTHING_FLOOR) for alpha in config.alpha_grid]
        losses = [mse(residual, s, row_scale) for s in candidates]
        best = min(range(len(losses)), key=losses.__getitem__)
        best_s = candidates[best]
        report["alpha"] = config.alpha_grid[best]
        report["mse_by_alpha"] = losses
        report["smoothing"] = {"min": float(best_s.min()), "max": float(best_s.max())}
        output_mse["ditas"] = losses[best]
    else:
        output_mse["ditas"] = output_mse.get("lowrank", output_mse["rtn"])
    report["output_mse"] = output_mse
    return _LayerPlan(best_s, up, down, report)


def _search_set(calib: CalibrationSet, search_steps: int) -> CalibrationSet:
    """The entries of the first ``search_steps`` recorded steps (all of them for 0)."""
    recorded = torch.unique(calib.step).tolist()
    return calib.subset(recorded[:search_steps] if search_steps else recorded)


@dataclass
class _Plans:
    """The α search's outcome on the FP model: per layer its plan, and the sets used."""

    plans: dict[str, _LayerPlan]
    tas_entries: int
    search: CalibrationSet


@dataclass(frozen=True)
class DiTAS(Method):
    """TAS statistics and the α search on the FP model, then the low-rank branches and the
    smoothing factors set in the wrapped model (module docstring)."""

    def needs_calibration(self, config: QuantConfig) -> bool:
        return True

    def analyze(
        self, model: nn.Module, config: QuantConfig, calib: CalibrationSet | None, ctx: RunContext
    ) -> _Plans:
        adapter = adapter_for(model)
        selected = set(config.layers.names(model))
        roles = {}
        for index in range(adapter.num_blocks()):
            layers = adapter.block_layers(index)
            for role in SEARCH_ORDER:
                for name in layers.get(role, ()):
                    if name in selected and not config.keeps_float(name):
                        roles[name] = (index, role)
        if not roles:
            raise DitqError("DiTAS works on the block linears; select --layers blocks")
        if config.fold_proj and len(adapter.block_layers(0)["qkv"]) > 1:
            raise DitqError(
                "--fold-proj folds proj's factors into a fused qkv's V rows; this model has "
                "separate q, k and v projections: leave --fold-proj out"
            )
        names = list(roles)
        search = _search_set(calib, config.search_steps)
        salience = activation_salience(
            model,
            calib,
            names,
            batch_size=ctx.batch_size,
            device=ctx.device,
            progress=ctx.progress,
        )
        plans: dict[str, _LayerPlan] = {}
        captured: dict[str, torch.Tensor] = {}
        evaluations = len(config.alpha_grid) + 2  # RTN, low-rank only, each α
        bar = tqdm(
            total=len(names) * evaluations,
            desc="DiTAS α search",
            unit="eval",
            disable=not ctx.progress,
        )
        for name in names:
            bar.set_postfix_str(name)
            block, role = roles[name]
            if name not in captured:  # the block's selected linears, captured in one pass
                in_block = [n for n in names if roles[n][0] == block]
                captured = capture_layer_inputs(
                    model, search, in_block, ctx.batch_size, ctx.device, False
                )
            inputs = _SearchInputs(captured.pop(name), search, config.search_max_tokens, ctx.device)
            row_scale = None
            if role == "qkv" and config.fold_proj:
                proj = plans.get(adapter.block_layers(block)["proj"][0])
                qkv_rows = model.get_submodule(name).out_features
                row_scale = _value_row_scale(qkv_rows, proj.smoothing if proj else None)
            smooth = role != "fc2" or config.smooth_fc2
            done = bar.n
            plans[name] = _plan_layer(
                model,
                name,
                config,
                salience[name],
                inputs,
                smooth,
                row_scale,
                ctx.device,
                bar.update,
            )
            bar.update(done + evaluations - bar.n)  # layers without smoothing skip the α grid
        bar.close()
        return _Plans(plans, len(calib), search)

    def transform(
        self, model: nn.Module, config: QuantConfig, analysis: Any, ctx: RunContext
    ) -> dict[str, Any]:
        layers = quantized_layers(model)
        adapter = adapter_for(model)
        for name, plan in analysis.plans.items():
            if plan.up is not None:
                target = layers[name]
                with torch.no_grad():
                    target.weight -= (plan.up @ plan.down).to(target.weight)
                target.set_lowrank(plan.up, plan.down)
        for name, plan in analysis.plans.items():
            if plan.smoothing is not None:
                index, role = adapter.role_of(name)
                shared = len(adapter.block_layers(index)[role]) > 1
                online = shared or (role == "proj" and not config.fold_proj)
                smooth_layers(model, (name,), plan.smoothing, online=online)
        return {
            "tas_entries": analysis.tas_entries,
            "search_steps": sorted(torch.unique(analysis.search.step).tolist()),
            "search_entries": len(analysis.search),
            "layers": {name: plan.report for name, plan in analysis.plans.items()},
        }


DITAS = DiTAS(
    "ditas",
    DiTASConfig,
    # 16 trajectories (32 guided entries per step, as the official 16 labels with cfg),
    # every step of a 100-step DDPM run for TAS; the α search takes the first 50.
    default_calib=CalibSettings(
        num_samples=16, steps="all", sampler="ddpm", num_steps=100, cfg_scale=1.5
    ),
    summary="Dong & Zhang: temporal-aggregated smoothing with per-layer α search and a "
    "training-free low-rank weight branch, W4A8 dynamic activations",
    published_bits=((8, 8), (4, 8)),
)
