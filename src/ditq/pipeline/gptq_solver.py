"""GPTQ as a solver of the sequential driver (:mod:`ditq.pipeline.sequential`), the way
the reference implementation runs it (IST-DASLab/gptq ``opt_sequential``, sequential
within a block): the unit's inputs come from the model quantized so far, and the linears
of a unit are solved in forward order, stage by stage. A stage is the first unsolved
linear and every other unsolved one that reads the same input (a fused qkv alone, or
separate q, k and v together); its Hessians come from one pass of the cached inputs
through the unit with the stages before it already solved.

A layer's Hessian is taken on what its weight multiplies: the input after its online
scale and rotation, before activation quantization (``QuantLinear.transformed_input``,
hooked at the activation quantizer), as the reference takes float inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ditq.pipeline.sequential import UnitCall, UnitData
from ditq.quant.gptq import GPTQSettings, HessianAccumulator, gptq_quantize, supports_gptq
from ditq.quant.layers import QuantLinear

PASS_BATCH = 16
"""Calibration entries per forward of a Hessian pass."""


def _solvable(module: nn.Module) -> dict[str, QuantLinear]:
    layers = {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
    return {n: m for n, m in layers.items() if not m.packed and supports_gptq(m.weight_quantizer)}


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
            hessians, first_inputs = self._hessian_pass(unit, data, pending)
            leader = first_inputs[next(iter(first_inputs))] if first_inputs else None
            stage = [n for n in pending if first_inputs.get(n) is leader] or list(pending)
            for name in stage:
                layer = pending.pop(name)
                hessian = hessians[name].result()
                weight = layer.weight.data
                rtn = layer.weight_quantizer(weight)
                solved = gptq_quantize(weight, hessian, layer.weight_quantizer, self.settings)
                report["layers"][unit.name + (f".{name}" if name else "")] = {
                    "relative_sq_error": _relative_error(weight, solved, hessian),
                    "rtn_relative_sq_error": _relative_error(weight, rtn, hessian),
                }
                layer.weight.data = solved
            report["stages"] += 1
        return report

    @torch.no_grad()
    def _hessian_pass(
        self, unit: UnitCall, data: UnitData, layers: dict[str, QuantLinear]
    ) -> tuple[dict[str, HessianAccumulator], dict[str, torch.Tensor]]:
        """Hessians of ``layers`` from the cached inputs, and each layer's raw input in
        the first batch, in call order (the same tensor for linears that read one input;
        held, so that no later tensor can reuse its memory)."""
        hessians = {name: HessianAccumulator() for name in layers}
        first_inputs: dict[str, torch.Tensor] = {}
        handles = []
        for name, layer in layers.items():
            accumulator = hessians[name]

            def raw(_module, args, name=name):
                first_inputs.setdefault(name, args[0])

            handles.append(layer.register_forward_pre_hook(raw))
            handles.append(
                layer.act_quantizer.register_forward_pre_hook(
                    lambda _module, args, acc=accumulator: acc.update(args[0])
                )
            )
        try:
            for index in torch.arange(len(data)).split(PASS_BATCH):
                unit.forward(data.batch(index))
        finally:
            for handle in handles:
                handle.remove()
        return hessians, first_inputs
