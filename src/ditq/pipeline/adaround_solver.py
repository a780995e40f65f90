"""BRECQ / AdaRound: the reconstruction solver of the sequential driver (Q-Diffusion /
BRECQ; METHODS.md, PTQ4DiT, "Quantizers and reconstruction (official)").

For one unit (a block, or a linear) with cached inputs from the quantized model so far and
targets from the full-precision model, the AdaRound variables V of its quantized weights
(Adam, ``weight_lr``) and the step sizes of its static activation quantizers, attention
matmul inputs included (Adam, ``act_lr`` with cosine decay, LSQ gradients) are learned
jointly on minibatches of the cached entries, minimizing

    L = ‖ŷ - y‖_p^p + λ Σ_layers Σ 1 - |2h(V) - 1|^β

where the first term is BRECQ's L_p loss (``|ŷ - y|^p`` summed over axis 1, the tokens
of a block output, and averaged over the rest, as in the official code, against which
λ = ``round_reg`` = 0.01 is set), the regularizer is off for the first ``warmup``
fraction of the iterations and β then decays linearly from ``beta_start`` to ``beta_end``
(:func:`rounding_beta`). The rounding is then hardened into the float weights (grid
values, see :mod:`ditq.quant.adaround`) and the learned step sizes are frozen into buffers.

A block's step (forward, loss and backward) is small next to the cost of launching its
hundreds of element-wise kernels, so on a GPU it runs through ``torch.compile``
(``compile``); the blocks of a model share the compiled graphs (one with the rounding
regularizer, one without), and the Adam updates are fused. ``compile="graphs"`` also
replays the compiled forward and backward as CUDA graphs (``mode="reduce-overhead"``: no
per-kernel launch cost; each unit's graphs are recorded once, on its first steps), for the
layer-wise units too.
The official code runs eagerly; the compiled step computes the same loss up to float
rounding (tested against the eager one). Its script (``quant_sample.py``) allows TF32 for
every CUDA matmul and convolution; here (``tf32``) the reconstruction steps only, the
calibration passes and the targets stay in full fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.errors import DitqError
from ditq.pipeline.sequential import UnitCall, UnitData, call_unit
from ditq.pipeline.steps import activation_quantizers, quantized_layers
from ditq.quant.adaround import AdaRoundWeight, adaround, supports_adaround
from ditq.quant.quantizer import Quantizer

LOG_EVERY = 200
"""Iterations between loss updates of the progress bar (each one syncs the device)."""
COMPILE_MODES = ("auto", "on", "graphs", "off")
RECOMPILE_LIMIT = 64
"""Graphs of the compiled objective allowed per run. Every unit kind compiles two (with and
without the rounding regularizer): PTQ4DiT's official coverage has six kinds with
``graphs``, more than dynamo's default limit of 8, past which the later units would run
eagerly."""


@dataclass
class ReconSettings:
    """Reconstruction hyper-parameters (defaults: the official PTQ4DiT / Q-Diffusion ones).

    ``iters``: optimization steps per unit (0 skips reconstruction); ``batch_size``:
    calibration entries per step; ``weight_lr``/``act_lr``: Adam learning rates of the
    AdaRound variables and of the activation step sizes; ``round_reg``: λ of the rounding
    regularizer; ``beta_start``/``beta_end``/``warmup``: its annealing; ``loss_p``: p of
    the L_p reconstruction loss; ``learn_act_scales``: learn static activation step sizes;
    ``chunks``: the data schedule of the official code (the calibration entries shuffled
    once and split in ``chunks`` parts, ``iters / chunks`` steps drawing minibatches from
    each part in turn; 1: every step draws from all entries); ``seed``: shuffling and
    minibatches (unit k of the run uses ``seed + k``); ``compile``: a block's step through
    ``torch.compile`` (``auto``: when its cached data is on a GPU; ``on``; ``graphs``:
    compiled and replayed as CUDA graphs on a GPU; ``off``); ``tf32``: the steps' CUDA
    matmuls and convolutions in TF32 (the official script's setting; off: full fp32).
    """

    iters: int = 20000
    batch_size: int = 32
    weight_lr: float = 1e-3
    act_lr: float = 4e-5
    round_reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    loss_p: float = 2.0
    learn_act_scales: bool = True
    chunks: int = 1
    seed: int = 0
    compile: str = "auto"
    tf32: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.iters < 0:
            problems.append(f"iters={self.iters} (use 0 to skip reconstruction, e.g. 20000)")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} (at least 1, e.g. 32)")
        if self.chunks < 1:
            problems.append(f"chunks={self.chunks} (at least 1; the official code uses 10)")
        for name in ("weight_lr", "act_lr", "loss_p"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} (must be positive)")
        if self.round_reg < 0:
            problems.append(f"round_reg={self.round_reg} (must be at least 0, e.g. 0.01)")
        if not 0 < self.beta_end <= self.beta_start:
            problems.append(
                f"beta_start={self.beta_start}, beta_end={self.beta_end} "
                "(need 0 < beta_end <= beta_start, e.g. 20 -> 2)"
            )
        if self.compile not in COMPILE_MODES:
            problems.append(f"compile={self.compile!r} (one of {', '.join(COMPILE_MODES)})")
        if not 0 <= self.warmup < 1:
            problems.append(f"warmup={self.warmup} (a fraction in [0, 1), e.g. 0.2)")
        if problems:
            raise DitqError("bad reconstruction settings: " + "; ".join(problems))


def rounding_beta(iteration: int, settings: ReconSettings) -> float | None:
    """β of the rounding regularizer at 0-based ``iteration``: ``None`` (regularizer off)
    while ``iteration + 1 < warmup · iters``, then linear from ``beta_start`` (at the end of
    the warm-up) to ``beta_end`` (at the last iteration), as BRECQ's ``LinearTempDecay``."""
    step = iteration + 1
    start = settings.warmup * settings.iters
    if step < start:
        return None
    remaining = max(0.0, 1.0 - (step - start) / (settings.iters - start))
    return settings.beta_end + (settings.beta_start - settings.beta_end) * remaining


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """BRECQ's L_p loss: ``|output - target|^p`` summed over axis 1 (a block output's
    tokens, a 2-D output's features) and averaged over the other axes."""
    return (output - target).abs().pow(p).sum(1).mean()


def minibatch_pools(entries: int, chunks: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The entries each part of the reconstruction draws its minibatches from: all of them
    for one chunk, else a seeded shuffle split in ``chunks`` near-equal parts (the official
    schedule: ``iters / chunks`` steps on each part in turn)."""
    if chunks == 1:
        return [torch.arange(entries)]
    if chunks > entries:
        raise DitqError(
            f"cannot split {entries} calibration entries into {chunks} reconstruction chunks; "
            f"use at most {entries} (--recon-chunks)"
        )
    return list(torch.randperm(entries, generator=generator).tensor_split(chunks))


def pool_of_iteration(iteration: int, iters: int, pools: int) -> int:
    """Which of ``pools`` minibatch pools step ``iteration`` of ``iters`` draws from: the
    first ``iters / pools`` steps the first pool, and so on in turn."""
    return min(iteration * pools // iters, pools - 1)


def minibatch_indices(
    entries: int, settings: ReconSettings, generator: torch.Generator
) -> list[torch.Tensor]:
    """Every step's minibatch (sorted entry indices), drawn in advance: ``batch_size``
    random entries of the step's pool (:func:`minibatch_pools`, :func:`pool_of_iteration`).
    Drawn before the loop so that the steps never wait for the host."""
    pools = minibatch_pools(entries, settings.chunks, generator)
    indices = []
    for iteration in range(settings.iters):
        pool = pools[pool_of_iteration(iteration, settings.iters, len(pools))]
        chosen = pool[torch.randperm(len(pool), generator=generator)[: settings.batch_size]]
        indices.append(chosen.sort().values)
    return indices


class AdaRoundSolver:
    """The sequential driver's solver for BRECQ / AdaRound reconstruction (module
    docstring); ``solve`` returns ``initial_loss``, ``final_loss`` (:func:`reconstruction_loss`
    over all cached entries before and after), ``iterations``, ``rounding_layers`` and
    ``act_scales``."""

    name = "adaround"
    needs_targets = True

    def __init__(self, settings: ReconSettings) -> None:
        self.settings = settings

    def result_fields(self) -> dict[str, Any]:
        return asdict(self.settings)

    def has_work(self, module: nn.Module) -> bool:
        layers = quantized_layers(module).values()
        learns_rounding = any(supports_adaround(layer) for layer in layers)
        learns_scales = self.settings.learn_act_scales and bool(_static_act_quantizers(module))
        return self.settings.iters > 0 and (learns_rounding or learns_scales)

    def solve(
        self, unit: UnitCall, data: UnitData, position: int, progress: bool
    ) -> dict[str, Any]:
        initial = self._evaluate(unit, data)
        learned = self._optimize(unit, data, self.settings.seed + position, progress)
        final = self._evaluate(unit, data)
        return {
            "initial_loss": initial,
            "final_loss": final,
            "iterations": self.settings.iters,
            **learned,
        }

    @torch.no_grad()
    def _evaluate(self, unit: UnitCall, data: UnitData) -> float:
        """:func:`reconstruction_loss` over all cached entries."""
        total = 0.0
        for index in torch.arange(len(data)).split(self.settings.batch_size):
            batch = data.batch(index)
            loss = reconstruction_loss(unit.forward(batch), batch["target"], self.settings.loss_p)
            total += float(loss) * len(index)
        return total / len(data)

    def compiles(self, unit: UnitCall, data: UnitData) -> bool:
        """Whether ``unit``'s steps run compiled, per ``settings.compile``: blocks (a lone
        linear has few kernels to fuse), and with ``graphs`` every unit (its few kernels
        are launch-bound: the graphs remove the launches)."""
        mode = self.settings.compile
        on_gpu = data.device.type == "cuda"
        if mode == "graphs":
            return True
        return unit.is_block and (mode == "on" or (mode == "auto" and on_gpu))

    def _optimize(
        self, unit: UnitCall, data: UnitData, seed: int, progress: bool
    ) -> dict[str, int]:
        """Learn the unit's rounding and activation step sizes; harden and freeze them."""
        settings = self.settings
        act_quantizers = _static_act_quantizers(unit.module) if settings.learn_act_scales else []
        layers = quantized_layers(unit.module).values()
        generator = torch.Generator().manual_seed(seed)
        compiled = self.compiles(unit, data)
        graphs = compiled and settings.compile == "graphs"
        objective = compiled_objective(graphs) if compiled else unit_objective
        fused = data.device.type == "cuda"
        with (
            _room_for_graphs() if compiled else nullcontext(),
            _tf32(settings.tf32),
            torch.enable_grad(),
            _frozen(unit.module),
            adaround(layers) as rounders,
            _learned_scales(act_quantizers) as scales,
        ):
            steps: list[Callable[[], None]] = []
            optimizers: list[torch.optim.Optimizer] = []
            if rounders:
                weights = [r.V for r in rounders]
                optimizers.append(torch.optim.Adam(weights, lr=settings.weight_lr, fused=fused))
                steps.append(optimizers[-1].step)
            if scales:
                act_optimizer = torch.optim.Adam(scales, lr=settings.act_lr, fused=fused)
                schedule = torch.optim.lr_scheduler.CosineAnnealingLR(act_optimizer, settings.iters)
                optimizers.append(act_optimizer)
                steps += [act_optimizer.step, schedule.step]
            regularized = bool(rounders) and settings.round_reg > 0
            beta_value = torch.zeros((), device=data.device)  # an input, not a constant
            indices = minibatch_indices(len(data), settings, generator)
            if data.place == "device":  # one copy: a copy per step would wait for the GPU
                sizes = [len(index) for index in indices]
                indices = list(torch.cat(indices).to(data.device).split(sizes))
            bar = tqdm(range(settings.iters), desc=unit.name, leave=False, disable=not progress)
            for iteration in bar:
                if graphs:  # the last step's outputs (loss, gradients) may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                for optimizer in optimizers:  # no gradient alive across steps
                    optimizer.zero_grad(set_to_none=True)
                batch = data.batch(indices[iteration])
                beta = rounding_beta(iteration, settings)
                if beta is not None and regularized:
                    loss = objective(unit.module, batch, rounders, beta_value.fill_(beta), settings)
                else:
                    loss = objective(unit.module, batch, [], None, settings)
                loss.backward()
                for step in steps:
                    step()
                if progress and iteration % LOG_EVERY == 0:
                    bar.set_postfix(loss=f"{float(loss):.4g}")
        return {"rounding_layers": len(rounders), "act_scales": len(scales)}


def unit_objective(
    module: nn.Module,
    batch: dict[str, torch.Tensor],
    rounders: list[AdaRoundWeight],
    beta: torch.Tensor | None,
    settings: ReconSettings,
) -> torch.Tensor:
    """L of the module docstring on one minibatch: the L_p loss of ``module``'s output
    against ``batch["target"]``, plus λ times the rounding regularizer of ``rounders`` at
    ``beta`` when it is given."""
    loss = reconstruction_loss(call_unit(module, batch), batch["target"], settings.loss_p)
    if beta is not None:
        loss = loss + settings.round_reg * sum(r.regularizer(beta) for r in rounders)
    return loss


def compiled_objective(graphs: bool) -> Callable[..., torch.Tensor]:
    """:func:`unit_objective` through ``torch.compile``; ``graphs``: its forward and backward
    replayed as CUDA graphs (on a GPU; the caller marks each step's begin)."""
    return torch.compile(unit_objective, mode="reduce-overhead" if graphs else None)


@contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    """CUDA matmuls and cuDNN convolutions allowed (or not) to use TF32 inside, the global
    settings restored after."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def _room_for_graphs() -> Any:
    """Dynamo's recompilation limit raised to :data:`RECOMPILE_LIMIT` (named
    ``cache_size_limit`` before torch 2.6)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch({name: max(RECOMPILE_LIMIT, getattr(config, name))})


def _static_act_quantizers(module: nn.Module) -> list[Quantizer]:
    return [q for q in activation_quantizers(module).values() if q.spec.needs_calibration]


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No gradients for the module's own parameters (weights, biases) inside the block."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


@contextmanager
def _learned_scales(quantizers: list[Quantizer]) -> Iterator[list[nn.Parameter]]:
    """Learnable step sizes inside the block, frozen back into buffers on a normal exit;
    an exception restores the calibrated ones."""
    calibrated = [q.scale.detach().clone() for q in quantizers]
    try:
        yield [q.enable_learning() for q in quantizers]
    except BaseException:
        for quantizer, scale in zip(quantizers, calibrated, strict=True):
            quantizer.scale.data = scale
        raise
    finally:
        for quantizer in quantizers:
            quantizer.disable_learning()
