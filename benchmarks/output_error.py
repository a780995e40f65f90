"""Relative error of a quantized model's output against the FP model's, per sampling step,
on held-out inputs from FP trajectories: a quick diagnostic of method variants (seconds to
minutes on a CPU), not a substitute for FID.

    python benchmarks/output_error.py --model ../shared/models/dit_s2_cifar10.pt --bits W4A8 \
        --variant 'rtn' --variant 'ptq4dit:{"recon_iters": 0}' \
        --variant 'ptq4dit:{"recon_iters": 0, "balance": "none"}' \
        --variant 'ptq4dit:{"recon_iters": 0, "layers": ["blocks"], "w_range": "mse"}'

Calibration and held-out sets are recorded from different seeds with the same settings
(``--calib`` JSON overrides, default 4 samples x 5 of 20 DDIM steps, cfg 1.5). The error of
entry i is ||out_i - ref_i|| / ||ref_i|| over the model output (eps and variance channels).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import ditq
from ditq import load_model
from ditq.calib.settings import CalibSettings
from ditq.methods import METHODS
from ditq.models.adapter import LAYER_GROUPS
from ditq.pipeline.config import LayerSelection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--bits", default="W4A8")
    parser.add_argument("--variant", action="append", required=True, help="METHOD[:JSON config]")
    parser.add_argument(
        "--calib", default='{"num_samples": 4, "steps": 5, "sampler": "ddim", "num_steps": 20}'
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    wbits, abits = (int(b) for b in args.bits.upper().removeprefix("W").split("A"))
    fp = load_model(args.model, device=args.device)
    settings = json.loads(args.calib)
    calib = CalibSettings(**settings).build(fp, device=args.device, progress=False)
    held = CalibSettings(**{**settings, "seed": 7}).build(fp, device=args.device, progress=False)
    x, t, y = (v.to(args.device) for v in (held.x, held.t, held.y))
    with torch.no_grad():
        reference = fp(x, t, y).flatten(1)
    steps = sorted(set(held.step.tolist()))
    print(f"{'variant':44s} {args.bits} mean   per recorded step {steps}")
    for variant in args.variant:
        name, _, extra = variant.partition(":")
        method = METHODS[name]
        options = json.loads(extra or "{}")
        if "layers" in options:  # a list of layer groups, as --layers takes them
            groups = options["layers"]
            options["layers"] = LayerSelection(**{g: g in groups for g in LAYER_GROUPS})
        config = method.config_class(wbits=wbits, abits=abits, **options)
        model = copy.deepcopy(fp)
        start = time.perf_counter()
        ditq.quantize(model, config, calib, progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = model(x, t, y).flatten(1)
        error = ((out - reference).norm(dim=1) / reference.norm(dim=1)).cpu()
        per_step = [round(float(error[held.step == s].mean()), 4) for s in steps]
        print(f"{variant:44s} {float(error.mean()):.4f} {per_step} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
