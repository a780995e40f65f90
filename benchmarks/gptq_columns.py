"""GPTQ's inner loop on a GPU: the torch loop against the Triton kernel
(``ditq.kernels.triton_ops.gptq_columns``), one whole ``gptq_quantize`` per layer shape of
the testbed and DiT-XL/2 (random weights, a Hessian of correlated random inputs), W4 in
groups of 128 with act-order (``--method gptq``'s defaults): seconds per solve and how
many grid values the two agree on.

    python benchmarks/gptq_columns.py out.json
"""

from __future__ import annotations

import json
import sys
import time

import torch

from ditq.kernels.triton_ops import gptq_columns
from ditq.quant.gptq import GPTQSettings, gptq_quantize, solve_columns
from ditq.quant.quantizer import Quantizer
from ditq.quant.spec import PerGroup, QuantSpec

SHAPES = {  # (out, in) of the block linears
    "testbed qkv": (1152, 384),
    "testbed fc2": (384, 1536),
    "XL qkv": (3456, 1152),
    "XL fc2": (1152, 4608),
}


def solve(weight, hessian, solver) -> tuple[torch.Tensor, float]:
    quantizer = Quantizer(QuantSpec(bits=4, granularity=PerGroup(128)))
    quantizer.find_params(weight)
    torch.cuda.synchronize()
    start = time.perf_counter()
    solved = gptq_quantize(weight, hessian, quantizer, GPTQSettings(), solver)
    torch.cuda.synchronize()
    return solved, time.perf_counter() - start


def main() -> None:
    rows = []
    for name, (out, inp) in SHAPES.items():
        generator = torch.Generator(device="cuda").manual_seed(0)
        weight = torch.randn(out, inp, device="cuda", generator=generator) / inp**0.5
        x = torch.randn(8192, inp, device="cuda", generator=generator)
        x = x @ torch.randn(inp, inp, device="cuda", generator=generator)
        hessian = 2 * x.T @ x / len(x)
        row = {"layer": name, "shape": [out, inp]}
        for label, solver in (("torch", solve_columns), ("kernel", gptq_columns)):
            solve(weight, hessian, solver)  # warm-up (the kernel's compilation)
            solved, seconds = solve(weight, hessian, solver)
            delta = (weight - solved).double()
            row[f"{label}_s"] = round(seconds, 4)
            row[f"{label}_error"] = float(((delta @ hessian.double()) * delta).sum())
            row[label] = solved
        row["equal_fraction"] = float((row.pop("torch") == row.pop("kernel")).float().mean())
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(sys.argv[1], "w") as file:
        json.dump(
            {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"),
                "rows": rows,
            },
            file,
            indent=2,
        )


if __name__ == "__main__":
    main()
