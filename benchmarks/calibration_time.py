"""Calibration wall time of methods, one after the other on one device, each on a fresh
copy of the model with its default calibration set (the GPU alone: nothing else should
run on it while this measures).

    python benchmarks/calibration_time.py --shape DiT-XL/2@256 --method gptq --out xl.json
    python benchmarks/calibration_time.py --model dit_s2_cifar10.pt \
        --method gptq --method 'ptq4dit:{"wbits": 4, "recon_iters": 2000}' --out s2.json

``--shape``: a random model of an official architecture at an image size (``ditq bench``'s
shapes); ``--model``: a checkpoint. Each row: the total, calibration-set and method wall
times of ``ditq.quantize``, the peak GPU memory and each reconstruction or GPTQ unit's
seconds (the first compiled block includes the compilation).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

import ditq
from ditq.eval.speed import shape_model, synchronize
from ditq.methods import METHODS
from ditq.pipeline import gptq_solver, sequential
from ditq.pipeline.run import record_of

TIMED = [
    (sequential, "_capture"),
    (sequential, "_outputs"),
    (sequential.UnitData, "__init__"),
    (gptq_solver.GPTQSolver, "_next_stage"),
    (gptq_solver.GPTQSolver, "_hessian_pass"),
    (gptq_solver, "gptq_quantize"),
    (gptq_solver, "_relative_error"),
]
"""The steps ``--breakdown`` times: ``(owner, attribute)``."""


def parse_method(text: str) -> tuple[str, dict]:
    name, _, overrides = text.partition(":")
    return name, json.loads(overrides) if overrides else {}


@contextmanager
def timed_steps(device: str):
    """Wrap the ``TIMED`` steps so each call's wall time, between device synchronizations,
    is added to the yielded ``{name: [seconds, calls]}``; the originals come back after."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    sync = functools.partial(synchronize, device)
    originals = [(owner, name, getattr(owner, name)) for owner, name in TIMED]

    def wrap(function, label):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync()
                totals[label][0] += time.perf_counter() - start
                totals[label][1] += 1

        return timed

    for owner, name, function in originals:
        setattr(owner, name, wrap(function, f"{getattr(owner, '__name__', owner)}.{name}"))
    try:
        yield totals
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shape", help="a random model, e.g. DiT-XL/2@256")
    source.add_argument("--model", help="a checkpoint file")
    parser.add_argument("--method", action="append", required=True, help="METHOD[:JSON config]")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--breakdown", action="store_true", help="time the steps (docstring)")
    args = parser.parse_args()

    base = shape_model(args.shape) if args.shape else ditq.load_model(args.model)
    base = base.to(args.device)
    rows = []
    for text in args.method:
        name, overrides = parse_method(text)
        config = METHODS[name].config_class(**overrides)
        model = copy.deepcopy(base)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with timed_steps(args.device) if args.breakdown else nullcontext({}) as steps:
            start = time.perf_counter()
            ditq.quantize(model, config, batch_size=args.batch_size, progress=not args.quiet)
            synchronize(args.device)
            seconds = time.perf_counter() - start
        report = record_of(model).report
        units = report["method"].get("reconstruction", {}).get("units", {})
        row = {
            "method": text,
            "seconds": round(seconds, 1),
            "wall_time_s": report["wall_time_s"],
            "calibration_entries": report.get("calibration_entries"),
            "unit_seconds": {name: round(unit["seconds"], 2) for name, unit in units.items()},
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if args.device.startswith("cuda")
            else None,
            "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2)
            if args.device.startswith("cuda")
            else None,
        }
        if args.breakdown:
            row["breakdown_s"] = {k: [round(t, 2), calls] for k, (t, calls) in steps.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    on_gpu = args.device.startswith("cuda")
    result = {
        "source": args.shape or args.model,
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    with open(args.out, "w") as file:
        json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
