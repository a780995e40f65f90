"""What a method contributes to the pipeline (:func:`ditq.pipeline.run.run_method`).

A method is a configuration dataclass (a :class:`~ditq.pipeline.config.QuantConfig`) and a
:class:`Method`: its published calibration set, statistics taken on the FP model before
any layer is wrapped (``analyze``), transformations of the wrapped model's float weights
(``transform``: smoothing folds, low-rank branches) and a solver for the sequential driver
(``solver``: e.g. block reconstruction; by default GPTQ when the configuration's
``weight_solver`` is ``gptq``). The pipeline owns the order; a method owns none of
the steps between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ditq.calib.dataset import CalibrationSet
from ditq.calib.settings import CalibSettings
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.gptq_solver import GPTQSolver
from ditq.pipeline.sequential import Solver


@dataclass(frozen=True)
class RunContext:
    """Where and how the steps run: the device of the model, the batch of calibration
    forwards, progress bars, and the directory where the sequential driver keeps each
    finished unit (a rerun resumes after the last one; None: nowhere)."""

    device: str = "cpu"
    batch_size: int = 64
    progress: bool = True
    resume_dir: str | None = None


@dataclass(frozen=True)
class Method:
    """A method's entry: name, configuration class, default calibration set, the
    (wbits, abits) settings its paper measured (``None``: no paper, any setting), and its
    contributions (the default ones contribute nothing: round to nearest)."""

    name: str
    config_class: type[QuantConfig]
    default_calib: CalibSettings = field(default_factory=CalibSettings)
    summary: str = ""
    published_bits: tuple[tuple[int, int], ...] | None = None

    def needs_calibration(self, config: QuantConfig) -> bool:
        """Whether ``config`` needs a calibration set (static activation ranges)."""
        specs = [config.act_spec(), config.attention_spec()]
        return any(spec.needs_calibration for spec in specs)

    def analyze(
        self, model: nn.Module, config: QuantConfig, calib: CalibrationSet | None, ctx: RunContext
    ) -> Any:
        """Statistics of the FP model, before any layer is wrapped; given to ``transform``."""
        return None

    def transform(
        self, model: nn.Module, config: QuantConfig, analysis: Any, ctx: RunContext
    ) -> dict[str, Any]:
        """Change the wrapped model's float weights (before their ranges are searched);
        returns the method's report."""
        return {}

    def solver(self, config: QuantConfig) -> Solver | None:
        """The solver the sequential driver runs after the ranges are set, if any: by
        default GPTQ when ``config.weight_solver`` asks for it."""
        if config.weight_solver == "gptq":
            return GPTQSolver(config.gptq_settings())
        return None

    def unpublished_setting(self, config: QuantConfig) -> str | None:
        """A sentence when ``config``'s bits lie outside the paper's settings, else None
        (W16A16, the float sanity check, is never flagged)."""
        bits = (config.wbits, config.abits)
        if self.published_bits is None or bits in self.published_bits or min(bits) >= 16:
            return None
        published = ", ".join(f"W{w}A{a}" for w, a in self.published_bits)
        return (
            f"W{bits[0]}A{bits[1]} is outside {self.name}'s published settings ({published}): "
            "allowed, but its paper did not measure it"
        )
