"""GPTQ as a solver of the sequential driver (:mod:`ditq.pipeline.sequential`), the way
the reference implementation runs it (IST-DASLab/gptq ``opt_sequential``, sequential
within a block): the unit's inputs come from the model quantized so far, and the linears
of a unit are solved in forward order, stage by stage. A stage is the first unsolved
linear and every other unsolved one that reads the same input (a fused qkv alone, or
separate q, k and v together, found from one batch); its Hessians, and only its, come
from one pass of the cached inputs through the unit with the stages before it solved,
at the driver's calibration batch, each forward stopped once the stage's layers have
their inputs (a layer is assumed to be called once per forward of its unit, as in every
supported family).

A layer's Hessian is taken on what its weight multiplies: the input after its online
scale and rotation, before activation quantization (``QuantLinear.transformed_input``,
hooked at the activation quantizer), as the reference takes float inputs.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ditq.pipeline.sequential import UnitCall, UnitData
from ditq.quant.gptq import (
    ColumnSolver,
    GPTQSettings,
    HessianAccumulator,
    gptq_quantize,
    solve_columns,
    supports_gptq,
)
from ditq.quant.layers import QuantLinear
from ditq.quant.quantizer import range_dtype


def _solvable(module: nn.Module) -> dict[str, QuantLinear]:
    layers = {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
    return {n: m for n, m in layers.items() if not m.packed and supports_gptq(m.weight_quantizer)}


def _column_solver(weight: torch.Tensor) -> ColumnSolver:
    """GPTQ's inner loop as one Triton kernel per lazy batch for fp32 work on a GPU
    (``ditq.kernels.triton_ops.gptq_columns``), else the torch loop."""
    if weight.is_cuda and range_dtype(weight.dtype) == torch.float32:
        try:
            from ditq.kernels.triton_ops import gptq_columns
        except ImportError:  # a CUDA build without Triton
            return solve_columns
        return gptq_columns
    return solve_columns


def _relative_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``: the output error on the calibration inputs."""
    delta = (weight - quantized).to(hessian.dtype)
    reference = weight.to(hessian.dtype)
    error = ((delta @ hessian) * delta).sum()
    return float(error / ((reference @ hessian) * reference).sum().clamp(min=1e-30))


@dataclass
class GPTQSolver:
    """The sequential driver's GPTQ solver (module docstring)."""

    settings: GPTQSettings = field(default_factory=GPTQSettings)
    name: str = "gptq"
    needs_targets: bool = False

    def result_fields(self) -> dict[str, Any]:
        return asdict(self.settings)

    def has_work(self, module: nn.Module) -> bool:
        return bool(_solvable(module))

    def solve(
        self, unit: UnitCall, data: UnitData, position: int, progress: bool
    ) -> dict[str, Any]:
        pending = _solvable(unit.module)
        report: dict[str, Any] = {"stages": 0, "layers": {}}
        while pending:
            stage = {name: pending.pop(name) for name in self._next_stage(unit, data, pending)}
            hessians = self._hessian_pass(unit, data, stage)
            for name, layer in stage.items():
                hessian = hessians[name].result()
                weight = layer.weight.data
                rtn = layer.weight_quantizer(weight)
                solved = gptq_quantize(
                    weight, hessian, layer.weight_quantizer, self.settings, _column_solver(weight)
                )
                report["layers"][unit.name + (f".{name}" if name else "")] = {
                    "relative_sq_error": _relative_error(weight, solved, hessian),
                    "rtn_relative_sq_error": _relative_error(weight, rtn, hessian),
                }
                layer.weight.data = solved
            report["stages"] += 1
        return report

    @torch.no_grad()
    def _next_stage(
        self, unit: UnitCall, data: UnitData, pending: dict[str, QuantLinear]
    ) -> list[str]:
        """The first of ``pending`` to be called and those that read the same input tensor,
        from one batch through the unit up to the first layer that reads another (every
        pending layer when none is reached)."""
        stage: list[str] = []
        leader: list[torch.Tensor] = []

        def record(_module, args, name):
            if leader and args[0] is not leader[0]:
                raise _Reached
            leader[:] = [args[0]]
            stage.append(name)

        handles = [
            layer.register_forward_pre_hook(lambda m, args, name=name: record(m, args, name))
            for name, layer in pending.items()
        ]
        try:
            _forward_until_reached(unit, next(data.batches()))
        finally:
            for handle in handles:
                handle.remove()
        return stage or list(pending)

    @torch.no_grad()
    def _hessian_pass(
        self, unit: UnitCall, data: UnitData, layers: dict[str, QuantLinear]
    ) -> dict[str, HessianAccumulator]:
        """Hessians of ``layers`` from one pass of the cached inputs through the unit, each
        batch's forward ending once every layer of the stage has its input."""
        hessians = {name: HessianAccumulator() for name in layers}
        fed: set[str] = set()

        def accumulate(args, name):
            hessians[name].update(args[0])
            fed.add(name)
            if len(fed) == len(layers):
                raise _Reached

        handles = [
            layer.act_quantizer.register_forward_pre_hook(
                lambda _module, args, name=name: accumulate(args, name)
            )
            for name, layer in layers.items()
        ]
        try:
            for batch in data.batches():
                fed.clear()
                _forward_until_reached(unit, batch)
        finally:
            for handle in handles:
                handle.remove()
        return hessians


class _Reached(Exception):
    """Raised by a hook once a forward has given what the pass needs."""


def _forward_until_reached(unit: UnitCall, batch: dict[str, torch.Tensor]) -> None:
    with suppress(_Reached):
        unit.forward(batch)
