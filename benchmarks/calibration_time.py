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
import json
import platform
import time

import torch

import ditq
from ditq.eval.speed import shape_model
from ditq.methods import METHODS
from ditq.pipeline.run import record_of


def parse_method(text: str) -> tuple[str, dict]:
    name, _, overrides = text.partition(":")
    return name, json.loads(overrides) if overrides else {}


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
        start = time.perf_counter()
        ditq.quantize(model, config, batch_size=args.batch_size, progress=not args.quiet)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
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
