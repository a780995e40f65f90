"""CPU diagnostic: how far a simulated layer moves between the two ways of computing its
dynamic activation step sizes.

    python benchmarks/scale_rounding.py OUT.json

torch on CUDA divides a tensor by a Python number as a product with the number's fp32
reciprocal (ATen's ``div_true_kernel_cuda``: "may lose one bit of precision"), so the step
size ``Δ = max / q_max`` can be one ulp off the correctly rounded quotient that torch
computes on a CPU and that ditq's Triton kernels computed (``div_rn``) until
``compute_qparams`` and the kernels took the product too. A value at an exact rounding tie
of ``x / Δ`` (with BF16 inputs a common case, e.g. ``x = max / 2``, ``x / Δ = 3.5`` at 4
bits) goes to one level or the other depending on which Δ. For each format of
``kernels_check.py`` with dynamic int activation ranges this script builds the kernel
check's random DiT-XL/2 proj layer and its BF16 input (512 rows) and runs the simulated
layer twice on the CPU, with Δ as the quotient and as the product, reporting the relative
difference of the outputs, the share of activation values whose level (code minus zero
point) differs, the share of those at an exact tie of the quotient ``x / Δ``, and the
share of ties among all values. Set beside the GPU kernel check of the kernels before the
change (the Triton kernels against the simulated layer on CUDA), it tells how much of that
check's error was the two arithmetics.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import ditq.quant.quantizer as quantizer
from ditq.kernels.linear import RealQuantLinear, quantize_activation
from ditq.quant.spec import integer_range

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels_check  # noqa: E402  (the kernel check's formats and random layers)

SIZE = (1152, 1152)  # DiT-XL/2 proj


def quotient_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ditq.quant.quantizer.compute_qparams` with Δ a correctly rounded quotient."""
    x_min, x_max = x_min.clamp(max=0), x_max.clamp(min=0)
    levels = torch.tensor(float(integer_range(bits, symmetric)[1]), dtype=x_max.dtype)
    if symmetric:
        scale = (torch.maximum(-x_min, x_max) / levels).clamp(min=quantizer.MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((x_max - x_min) / levels).clamp(min=quantizer.MIN_SCALE)
    return scale, torch.round(-x_min / scale)


@contextmanager
def quotient_step_sizes() -> Iterator[None]:
    """Inside, every dynamic range's step size is the correctly rounded quotient."""
    product = quantizer.compute_qparams
    quantizer.compute_qparams = quotient_qparams
    try:
        yield
    finally:
        quantizer.compute_qparams = product


def _per_value(table: torch.Tensor, group_size: int, width: int) -> torch.Tensor:
    """A (M,) or (M, K / g) table of step sizes expanded to (M, K)."""
    if group_size:
        return table.repeat_interleave(group_size, dim=1)
    return table.reshape(-1, 1).expand(-1, width)


@torch.no_grad()
def compare(fmt: str) -> dict:
    """The simulated layer of ``fmt`` with its step sizes as quotients and as products."""
    layer, x = kernels_check.random_layer(fmt, SIZE, False, "cpu")
    act = RealQuantLinear.from_quant_linear(layer).act
    width = x.shape[1]

    def levels() -> tuple[torch.Tensor, torch.Tensor]:
        """Each value's level ``code - zero point`` (the integer its dequantized value is a
        multiple of the step size by) and the step sizes, per value."""
        codes, scale, zero, _ = quantize_activation(x, act, None, None, code_sums=False)
        level = codes.int() - _per_value(zero, act.group_size, width)
        return level, _per_value(scale, act.group_size, width)

    with quotient_step_sizes():
        reference = layer(x.float()).double()
        level, scale = levels()
    shifted = layer(x.float()).double()
    product_level, _ = levels()
    differ = level != product_level
    quotient = x.float() / scale
    tie = (quotient - quotient.floor()) == 0.5
    return {
        "format": fmt,
        "rel_difference": float((shifted - reference).norm() / reference.norm()),
        "levels_differing": float(differ.float().mean()),
        "differing_at_ties": float((differ & tie).sum() / differ.sum().clamp(min=1)),
        "ties": float(tie.float().mean()),
    }


def main(out_path: str) -> None:
    kernels_check.TOKENS = 512  # the kernel check's rows
    rows = [compare(fmt) for fmt in kernels_check.DYNAMIC_INT_FORMATS]
    Path(out_path).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    print("| format | output difference | levels differing | of them at a tie | ties |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['format']} | {r['rel_difference']:.3e} | {r['levels_differing']:.3%} "
            f"| {r['differing_at_ties']:.1%} | {r['ties']:.3%} |"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/scale_rounding.py OUT.json")
    main(sys.argv[1])
