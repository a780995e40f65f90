"""PTQ4DiT (Wu et al., NeurIPS 2024): Channel-wise Salience Balancing (CSB) guided by
Spearman's ρ-guided Salience Calibration (SSC), folded offline into the FP model, then
static quantization and optional BRECQ/AdaRound block reconstruction.

Equations (METHODS.md, section "PTQ4DiT"), for the input X and weight W of qkv, proj and
fc1 of every block (never fc2, whose input comes from GELU):

- salience ``s(X_j^(t)) = max |X_j|`` over the entries at calibration timestep t (taken on
  the FP model before any change), ``s(W_j) = max_i |W_ij|``;
- SSC: ``ρ_t = ρ(s(X^(t)), s(W))`` (Spearman over channels,
  :func:`ditq.calib.stats.spearman_rho`), ``η_t = exp(-ρ_t) / Σ_τ exp(-ρ_τ)``,
  ``s_ρ(X) = Σ_t η_t s(X^(t))`` (:func:`ssc_weights`, :func:`calibrated_salience`);
- CSB: ``B^X = diag(sqrt(s(W_j) / s_ρ(X_j)))``, ``B^W = (B^X)^-1``, i.e. the smoothing
  factor ``s = smoothing_factor(s_ρ(X), s(W), α=1/2)`` with ``X̃ = X / s``, ``W̃ = W s``;
  both channel maxima become the geometric mean ``sqrt(s(X_j) s(W_j))``;
- offline re-parameterization (:func:`ditq.pipeline.folding.smooth_layers`): ``B^X`` is folded
  into the adaLN shift/scale rows (qkv, fc1) and into the V rows of qkv (proj); the folded
  FP model equals the original to float rounding.

``balance`` selects the paper's ablation rows: ``none`` (the "baseline": no balancing),
``csb`` (CSB with the salience of one timestep: the median of the sorted calibration
timesteps, the lower one of the middle two for an even count) and ``csb+ssc`` (the method).

What the official code does (adreamwu/PTQ4DiT, ``models.py`` lines 134-236, ``Mlp`` and
``Attention``): in the first forward pass, for each of qkv, proj and fc1, ``w_scale`` is the
per-input-channel max of |W| over the output rows, ``x_scale`` the per-entry max of |X| over
the tokens (one row per entry of that batch), ρ_i the Spearman correlation of entry i's
``x_scale`` with ``w_scale``, η = softmax(-ρ) over the entries, ``s_ρ(X) = Σ_i η_i
x_scale_i``, and the factor ``(s_ρ(X) / (w_scale + 1e-8))^½`` multiplies W's columns once
while every later forward divides the layer's input by it online.

Defaults as published (``quant_sample.py``): every ``nn.Linear`` and the patch-embedding
``nn.Conv2d`` quantized (block linears, adaLN linears, timestep MLP, patch embedding, final
layer; ``--layers blocks`` for the block linears only); weights per output channel,
asymmetric, activations per tensor, asymmetric, static, both ranges by the official "mse"
search (``percentile_search``: the best of the 99.9/99.99/99.999th percentiles by L2 error;
the 80-ratio clipping sweep is ``--w-range mse --a-range mse``); attention matmul inputs
(q, k, v, softmax output) at 8 bits; calibration on steps 0, 10, ..., 240 of a 250-step DDPM
run with cfg 1.5, 32 samples, two per class for classes 0..15 (cycled on models with fewer
classes), cond and uncond entries; block reconstruction (the sequential driver,
:mod:`ditq.pipeline.sequential`, with the AdaRound solver,
:mod:`ditq.pipeline.adaround_solver`):
each block with its adaLN linear as one unit, the linears outside the blocks one by one,
AdaRound with rounding regularizer 0.01, β 20→2, 20% warm-up, weight lr 1e-3, activation
step-size lr 4e-5, batch 32, 20k iterations in 10 chunks of the shuffled calibration set
(2,000 iterations on each in turn).

Deviations from the official code:

- Balancing is folded offline, not applied online: ``B^X`` goes into the adaLN shift/scale
  rows (qkv, fc1) and into the V rows of qkv (proj), which computes the same function
  (tested) and costs nothing at inference; the official code divides each input by the
  factor at every forward.
- Because proj's factor is folded into qkv's V rows, qkv is balanced after proj and its
  ``s(W)`` is taken from the folded weight (the one that is quantized); the official qkv
  factor uses the unfolded weight.
- ρ per calibration timestep (the paper's formula) by default; ``ssc_per_sample`` gives
  the official ρ per entry, over every entry of the calibration set rather than the first
  forward's batch (4 entries per timestep). Memory: entries x C floats per balanced layer.
- The factor is ``smoothing_factor`` with its floor instead of ``+ 1e-8`` in ``w_scale``.
- One ``attn_bits`` for q, k, v and the softmax output (the official code quantizes q, k, v
  at the activation bits and the softmax output at ``sm_abit = 8``: the same at W*A8).
- Activation ranges are searched on the whole calibration set with the weights quantized
  and every activation quantizer bypassed, before reconstruction; the official code
  initialises them on 4 entries per timestep with the earlier layers quantized, then
  learns them.
- The percentiles and L2 errors of an activation's search are computed on a uniform random
  sample of at most 1,000,000 of its values (``SampleObserver``, drawn with the run
  device's random generator, so a CPU and a GPU run differ slightly); the official code
  uses every value of its batch. The sample moves a range by up to 15% of its width
  (benchmarks/RESULTS.md, "The percentile search on a sample of the activations").
- The final layer's two linears are reconstructed one by one; the official code
  reconstructs the final layer as one unit. The reconstruction shuffles single entries
  (the official code shuffles groups of 4 entries).
- A ρ that is undefined (a constant salience vector has no rank order) counts as 0.
- TF32 (``recon_tf32``, on by default as in the official script, which allows it for every
  CUDA matmul and convolution) only in the reconstruction steps; the calibration passes,
  the range search and the reconstruction targets run in full fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ditq.calib.dataset import CalibrationSet
from ditq.calib.hooks import collect_input_stats
from ditq.calib.settings import PAIRED_CLASSES, CalibSettings
from ditq.calib.stats import activation_salience, spearman_rho, weight_salience
from ditq.errors import DitqError
from ditq.models.adapter import adapter_for
from ditq.pipeline.adaround_solver import COMPILE_MODES, AdaRoundSolver, ReconSettings
from ditq.pipeline.config import LayerSelection, QuantConfig
from ditq.pipeline.folding import smooth_layers
from ditq.pipeline.method import Method, RunContext
from ditq.pipeline.sequential import Solver
from ditq.quant.smoothing import smoothing_factor

BALANCE_MODES = ("none", "csb", "csb+ssc")
BALANCED_ROLES = ("proj", "qkv", "fc1")
"""The layers CSB/SSC balance, in the order they are folded within a block (proj first: its
factor goes into qkv's V rows, which changes qkv's weight salience)."""
CSB_ALPHA = 0.5
"""CSB's fixed exponent: ``B^X = sqrt(s(W) / s(X))`` (SmoothQuant with α = 1/2)."""


@dataclass
class PTQ4DiTConfig(QuantConfig):
    """PTQ4DiT with the official quantizer settings (module docstring)."""

    w_range: str = "percentile_search"
    a_range: str = "percentile_search"
    attn_bits: int = 8
    layers: LayerSelection = field(default_factory=LayerSelection.everything)
    balance: str = field(
        default="csb+ssc",
        metadata={
            "help": "channel balancing: none (baseline), csb (salience of the middle "
            "calibration timestep) or csb+ssc (Spearman-weighted salience over timesteps)"
        },
    )
    ssc_per_sample: bool = field(
        default=False,
        metadata={
            "help": "SSC weights per calibration entry instead of per timestep (the official "
            "code's variant)"
        },
    )
    recon_iters: int = field(
        default=20000,
        metadata={"help": "block reconstruction (AdaRound) iterations per block; 0 = off"},
    )
    recon_batch_size: int = field(
        default=32, metadata={"help": "block reconstruction mini-batch size"}
    )
    recon_weight_lr: float = field(
        default=1e-3, metadata={"help": "block reconstruction learning rate of the rounding"}
    )
    recon_act_lr: float = field(
        default=4e-5,
        metadata={"help": "block reconstruction learning rate of the activation step sizes"},
    )
    recon_chunks: int = field(
        default=10,
        metadata={
            "help": "block reconstruction data schedule: the shuffled calibration set in N "
            "chunks, iterations/N on each in turn (official 10); 1 = every step draws from "
            "the whole set"
        },
    )
    recon_compile: str = field(
        default="auto",
        metadata={
            "help": "block reconstruction step through torch.compile: auto (on a GPU), on, "
            "graphs (compiled and replayed as CUDA graphs on a GPU), off"
        },
    )
    recon_tf32: bool = field(
        default=True,
        metadata={
            "help": "block reconstruction matmuls in TF32 on a GPU, as the official script "
            "allows (false: full fp32)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.balance not in BALANCE_MODES:
            raise DitqError(
                f"--balance {self.balance!r} is not known; choose one of {', '.join(BALANCE_MODES)}"
            )
        if self.ssc_per_sample and self.balance != "csb+ssc":
            raise DitqError(
                f"--ssc-per-sample changes SSC, which --balance {self.balance} does not run; "
                "use --balance csb+ssc or drop --ssc-per-sample"
            )
        if self.recon_iters < 0:
            raise DitqError(f"--recon-iters must be 0 (off) or positive, got {self.recon_iters}")
        if self.weight_solver != "rtn" and self.recon_iters:
            raise DitqError(
                "PTQ4DiT's weights are rounded by its block reconstruction; --weight-solver "
                f"{self.weight_solver} replaces it only with --recon-iters 0"
            )
        if self.recon_batch_size < 1:
            raise DitqError(f"--recon-batch-size must be at least 1, got {self.recon_batch_size}")
        if self.recon_chunks < 1:
            raise DitqError(f"--recon-chunks must be at least 1, got {self.recon_chunks}")
        if self.recon_compile not in COMPILE_MODES:
            raise DitqError(
                f"--recon-compile {self.recon_compile!r} is not known; choose one of "
                f"{', '.join(COMPILE_MODES)}"
            )
        for name in ("recon_weight_lr", "recon_act_lr"):
            if not getattr(self, name) > 0:
                flag = "--" + name.replace("_", "-")
                raise DitqError(f"{flag} must be positive, got {getattr(self, name)}")


def ssc_weights(rho: torch.Tensor) -> torch.Tensor:
    """``η_k = exp(-ρ_k) / Σ_τ exp(-ρ_τ)`` (METHODS.md, SSC): less correlated rows weigh more.
    An undefined ρ (nan: constant salience) counts as 0."""
    return torch.softmax(-torch.nan_to_num(rho.double(), nan=0.0), dim=0)


def calibrated_salience(
    saliences: torch.Tensor, weight_salience: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SSC over the rows k of ``saliences`` (K, C) (timesteps, or calibration entries):
    ``ρ_k = ρ(s(X^(k)), s(W))``, ``η = softmax(-ρ)``, ``s_ρ(X) = Σ_k η_k s(X^(k))``.

    Returns ``(s_ρ(X) (C,) float32, ρ (K,), η (K,))``.
    """
    s_w = weight_salience.detach().double().cpu()
    rho = torch.tensor([spearman_rho(row, s_w) for row in saliences], dtype=torch.float64)
    eta = ssc_weights(rho)
    return (eta[:, None] * saliences.double()).sum(dim=0).float(), rho, eta


def csb_timestep(timesteps: list[int]) -> int:
    """The timestep whose salience CSB-only uses: the median of the sorted calibration
    timesteps (the lower middle one for an even count)."""
    ordered = sorted(timesteps)
    return ordered[(len(ordered) - 1) // 2]


def balanced_groups(model: nn.Module, config: QuantConfig) -> list[tuple[str, ...]]:
    """qkv, proj and fc1 of every block that ``config`` quantizes, by role (the linears of
    a role share one input and one factor), in folding order."""
    selected = {n for n in config.layers.names(model) if not config.keeps_float(n)}
    groups = adapter_for(model).role_groups(BALANCED_ROLES)
    return [group for group in groups if all(name in selected for name in group)]


class _EntrySalience:
    """``s(X^(i))`` of every calibration entry i seen: the channel max of |X| over that
    entry's ``tokens`` rows (observed rows arrive entry by entry, ``tokens`` rows each)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.rows: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        if x.shape[0] % self.tokens:
            raise DitqError(
                f"per-sample SSC expects {self.tokens} tokens per entry, got {x.shape[0]} rows"
            )
        per_entry = x.detach().reshape(-1, self.tokens, x.shape[-1]).abs().amax(dim=1)
        self.rows.append(per_entry.float().cpu())

    def result(self) -> torch.Tensor:
        return torch.cat(self.rows)


def salience_rows(
    model: nn.Module,
    calib: CalibrationSet,
    names: list[str],
    config: PTQ4DiTConfig,
    *,
    batch_size: int,
    device: str,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The activation saliences SSC weighs, per layer ``(K, C)``, and the timestep of each
    row: one row per calibration timestep (``csb+ssc``), per calibration entry
    (``ssc_per_sample``), or the single row of :func:`csb_timestep` (``csb``)."""
    common = {"batch_size": batch_size, "device": device, "progress": progress}
    timesteps = calib.timesteps()
    if config.ssc_per_sample:
        tokens = adapter_for(model).tokens_per_entry()
        by_t = collect_input_stats(
            model, calib, lambda _name: _EntrySalience(tokens), names, per_timestep=True, **common
        )
        rows = {n: torch.cat([by_t[n][t].result() for t in timesteps]) for n in names}
        labels = [t for t in timesteps for _ in range(int((calib.t == t).sum()))]
        return rows, labels
    by_t = activation_salience(model, calib, names, per_timestep=True, **common)
    if config.balance == "csb":
        timesteps = [csb_timestep(timesteps)]
    return {n: torch.stack([by_t[n][t] for t in timesteps]) for n in names}, timesteps


def balance_layers(
    model: nn.Module, group: tuple[str, ...], saliences: torch.Tensor
) -> dict[str, Any]:
    """CSB with the SSC salience of ``saliences`` (K, C) of the input that the linears of
    ``group`` share, folded offline (METHODS.md); ``s(W)`` over all their rows."""
    s_w = weight_salience(*(model.get_submodule(name).weight for name in group)).cpu()
    s_x, rho, eta = calibrated_salience(saliences, s_w)
    factor = smoothing_factor(s_x, s_w, CSB_ALPHA)
    smooth_layers(model, group, factor)
    return {
        "rho": rho.tolist(),
        "eta": eta.tolist(),
        "factor": {"min": float(factor.min()), "max": float(factor.max())},
    }


@dataclass
class _Salience:
    """What the FP model's statistics gave: the layers to balance, their salience rows and
    the timestep of each row."""

    groups: list[tuple[str, ...]]
    rows: dict[str, torch.Tensor]
    timesteps: list[int]


@dataclass(frozen=True)
class PTQ4DiT(Method):
    """Salience on the FP model → (wrap) → CSB/SSC folded per layer → (weight ranges →
    static activation ranges) → block reconstruction when ``recon_iters > 0``."""

    def needs_calibration(self, config: QuantConfig) -> bool:
        return True

    def analyze(
        self, model: nn.Module, config: QuantConfig, calib: CalibrationSet | None, ctx: RunContext
    ) -> _Salience:
        groups = balanced_groups(model, config) if config.balance != "none" else []
        names = [group[0] for group in groups]  # one input per group
        if not names:
            return _Salience([], {}, [])
        rows, timesteps = salience_rows(
            model,
            calib,
            names,
            config,
            batch_size=ctx.batch_size,
            device=ctx.device,
            progress=ctx.progress,
        )
        return _Salience(groups, rows, timesteps)

    def transform(
        self, model: nn.Module, config: QuantConfig, analysis: Any, ctx: RunContext
    ) -> dict[str, Any]:
        balanced = {
            ",".join(group): balance_layers(model, group, analysis.rows[group[0]])
            for group in analysis.groups
        }
        return {
            "balance": config.balance,
            "salience_rows": "entry" if config.ssc_per_sample else "timestep",
            "timesteps": analysis.timesteps,
            "balanced_layers": balanced,
        }

    def solver(self, config: QuantConfig) -> Solver | None:
        if config.recon_iters == 0:
            return super().solver(config)
        settings = ReconSettings(
            iters=config.recon_iters,
            batch_size=config.recon_batch_size,
            weight_lr=config.recon_weight_lr,
            act_lr=config.recon_act_lr,
            chunks=config.recon_chunks,
            compile=config.recon_compile,
            tf32=config.recon_tf32,
        )
        return AdaRoundSolver(settings)


PTQ4DIT = PTQ4DiT(
    "ptq4dit",
    PTQ4DiTConfig,
    # 32 samples of DDPM 250 with cfg 1.5, recorded at steps 0, 10, ..., 240 (the
    # official 25), two samples per class for classes 0..15, cond and uncond entries.
    default_calib=CalibSettings(
        num_samples=32,
        steps=list(range(0, 250, 10)),
        sampler="ddpm",
        num_steps=250,
        cfg_scale=1.5,
        classes=PAIRED_CLASSES,
    ),
    summary="Wu et al.: Spearman-guided channel salience balancing folded offline, "
    "static W/A quantization, block reconstruction",
    published_bits=((8, 8), (4, 8)),
)
