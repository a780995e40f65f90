"""Distance of quantized models to the FP model on the same noise (PSNR / SSIM), with
calibration wall time: one row per method x bits x sampler.

    python benchmarks/quality_vs_fp.py --model ../shared/models/dit_s2_cifar10.pt \
        --methods rtn,smoothquant,single-step --bits W8A8,W4A8 \
        --samplers ddim50,ddpm250 --num-samples 64 --out runs/quality

Writes OUT/results.json, OUT/results.md (a table for benchmarks/RESULTS.md) and a PNG grid
per model at the last sampler (FP first). Every quantized model samples with the same seed
and labels as the FP model, so sample i of each starts from the same x_T and sees the same
per-step noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch

import ditq
from ditq import load_model
from ditq.diffusion.pipeline import SamplingSettings, generate
from ditq.eval.grid import save_grid
from ditq.eval.metrics import psnr, ssim
from ditq.methods import METHODS


def parse_sampler(text: str) -> SamplingSettings:
    name = text.rstrip("0123456789")
    return SamplingSettings(sampler=name, steps=int(text[len(name) :]), cfg_scale=1.5)


def parse_bits(text: str) -> tuple[int, int]:
    w, a = text.upper().removeprefix("W").split("A")
    return int(w), int(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--methods", default="rtn,smoothquant,single-step")
    parser.add_argument("--bits", default="W8A8,W4A8")
    parser.add_argument("--samplers", default="ddim50,ddpm250")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--method-args", default="{}", help='JSON, e.g. {"ptq4dit": {...}}')
    parser.add_argument(
        "--calib", default="{}", help="JSON overriding every method's calibration settings"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    method_args = json.loads(args.method_args)
    samplers = [parse_sampler(s) for s in args.samplers.split(",")]
    samplers = [
        SamplingSettings(sampler=s.sampler, steps=s.steps, cfg_scale=args.cfg_scale, seed=args.seed)
        for s in samplers
    ]
    classes = list(range(10))
    fp = load_model(args.model, device=args.device)

    def sample(model, settings):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        images, _ = generate(
            model,
            args.num_samples,
            settings,
            classes=classes,
            batch_size=args.batch_size,
            device=args.device,
            progress=False,
        )
        return images, time.perf_counter() - start

    reference = {}
    rows = []
    for settings in samplers:
        images, seconds = sample(fp, settings)
        reference[(settings.sampler, settings.steps)] = images
        rows.append(
            dict(
                method="fp",
                bits="W32A32",
                sampler=f"{settings.sampler}{settings.steps}",
                psnr=float("inf"),
                ssim=1.0,
                calib_s=0.0,
                sample_s=seconds,
            )
        )
        print(rows[-1], flush=True)
    save_grid(
        out / "grid_fp.png", reference[(samplers[-1].sampler, samplers[-1].steps)][:40], ncols=10
    )
    for name in args.methods.split(","):
        method = METHODS[name]
        for bits in args.bits.split(","):
            wbits, abits = parse_bits(bits)
            model = copy.deepcopy(fp)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            calib_settings = replace(method.default_calib, **json.loads(args.calib))
            calib = calib_settings.build(
                model, batch_size=args.batch_size, device=args.device, progress=False
            )
            config = method.config_class(wbits=wbits, abits=abits, **method_args.get(name, {}))
            ditq.quantize(model, config, calib, batch_size=args.batch_size, progress=False)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            calib_seconds = time.perf_counter() - start
            for settings in samplers:
                images, seconds = sample(model, settings)
                fp_images = reference[(settings.sampler, settings.steps)]
                rows.append(
                    dict(
                        method=name,
                        bits=bits,
                        sampler=f"{settings.sampler}{settings.steps}",
                        psnr=float(np.mean(psnr(images, fp_images))),
                        ssim=float(np.mean(ssim(images, fp_images))),
                        calib_s=calib_seconds,
                        sample_s=seconds,
                        calib=f"{len(calib)} entries, {len(calib.timesteps())} timesteps",
                    )
                )
                print(rows[-1], flush=True)
            save_grid(out / f"grid_{name}_{bits}.png", images[:40], ncols=10)
            del model
    meta = {
        "command": "python benchmarks/quality_vs_fp.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor(),
        "torch": torch.__version__,
        "num_samples": args.num_samples,
        "cfg_scale": args.cfg_scale,
        "seed": args.seed,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "| method | bits | sampler | PSNR vs FP (dB) | SSIM vs FP | calibration (s) "
        "| sampling (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['sampler']} | {r['psnr']:.2f} | "
            f"{r['ssim']:.4f} | {r['calib_s']:.1f} | {r['sample_s']:.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
