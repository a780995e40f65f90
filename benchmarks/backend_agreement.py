"""The ``cuda`` backend against the simulated one on models quantized by the methods.

    ditq demo --device cuda --out DEMO        # the bundled DiT by each method, W8A8 and W4A8
    python benchmarks/backend_agreement.py DEMO OUT.json [--device cuda]

For each quantized run directory of DEMO: the model is loaded twice from disk in bf16, with
``--backend simulated`` and ``--backend cuda``, and compared (1) on one denoiser call with
random latents, timesteps and labels (relative error of the output) and (2) on 16 images
sampled from the same noise (DDIM 25, cfg 1.5, seed 0): PSNR/SSIM of the real-kernel
images against the simulated ones, next to the simulated images' PSNR against FP for scale.
Runs on the CPU too (then both backends take the dequantizing path).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ditq import load_model
from ditq.diffusion.pipeline import SamplingSettings, generate
from ditq.eval.metrics import distance_to_reference
from ditq.eval.speed import denoiser_inputs
from ditq.kernels import RealQuantLinear
from ditq.pipeline.checkpoint import is_quantized_dir

SETTINGS = SamplingSettings(sampler="ddim", steps=25, cfg_scale=1.5, seed=0)
NUM_SAMPLES = 16


def sample(model: torch.nn.Module, device: str):
    classes = list(range(model.num_classes))
    images, _ = generate(
        model, NUM_SAMPLES, SETTINGS, classes=classes, batch_size=NUM_SAMPLES, device=device,
        progress=False,
    )  # fmt: skip
    return images


@torch.no_grad()
def compare(run: Path, fp_images, device: str) -> dict:
    simulated = load_model(run, device=device, dtype="bf16", backend="simulated", progress=False)
    real = load_model(run, device=device, dtype="bf16", backend="cuda" if device != "cpu" else None,
                      progress=False)  # fmt: skip
    kinds = sorted({m.kind for m in real.modules() if isinstance(m, RealQuantLinear)})
    inputs = denoiser_inputs(simulated, 8, device)
    ref = simulated.forward_with_cfg(*inputs, cfg_scale=1.5).float()
    out = real.forward_with_cfg(*inputs, cfg_scale=1.5).float()
    sim_images, real_images = sample(simulated, device), sample(real, device)
    return {
        "run": run.name,
        "kernels": kinds,
        "output_rel_error": float((out - ref).norm() / ref.norm()),
        "nan": bool(torch.isnan(out).any()),
        "cuda_vs_simulated": distance_to_reference(real_images, sim_images),
        "simulated_vs_fp": distance_to_reference(sim_images, fp_images),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir")
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    runs = sorted(p for p in Path(args.demo_dir).iterdir() if is_quantized_dir(p))
    fp = load_model("demo", device=args.device, dtype="bf16", progress=False)
    fp_images = sample(fp, args.device)
    rows = []
    for run in runs:
        rows.append(compare(run, fp_images, args.device))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "rows": rows}, indent=2) + "\n")
    head = ("run", "kernels", "out rel.err", "PSNR cuda/sim", "PSNR sim/FP")
    print("\n{:<18} {:<14} {:>11} {:>13} {:>11}".format(*head))
    for r in rows:
        print(
            f"{r['run']:<18} {','.join(r['kernels']):<14} {r['output_rel_error']:11.2e} "
            f"{r['cuda_vs_simulated']['psnr'] or float('inf'):13.2f} "
            f"{r['simulated_vs_fp']['psnr']:11.2f}"
        )


if __name__ == "__main__":
    main()
