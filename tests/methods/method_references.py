"""Reference outputs of every method, recorded once so that refactors keep the numerics.

``python tests/methods/method_references.py`` records them into
``tests/data/method_references.npz`` (only when a change of numerics is intended, and said
in its commit); ``test_method_references.py`` recomputes and compares. Each case quantizes
the same tiny random DiT on the same calibration set, then keeps the denoiser output on
fixed inputs and every tensor of the packed model (integer codes, scales, folded float
weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ditq  # noqa: E402
from ditq.calib.dataset import build_calibration_set  # noqa: E402
from ditq.diffusion.pipeline import SamplingSettings  # noqa: E402
from ditq.methods import METHODS  # noqa: E402

from conftest import tiny_dit  # noqa: E402

PATH = Path(__file__).resolve().parents[1] / "data" / "method_references.npz"
CASES = {
    f"{method}-w{wbits}a8": (method, dict(wbits=wbits, abits=8, **extra))
    for method, extra in (
        ("rtn", {}),
        ("smoothquant", {}),
        ("single-step", {"w_group_size": 16}),
        ("ptq4dit", {"recon_iters": 3, "recon_batch_size": 4, "recon_chunks": 2}),
        ("ditas", {"lowrank_rank": 4}),
    )
    for wbits in (8, 4)
}


def calibration_set():
    settings = SamplingSettings(sampler="ddim", steps=6, cfg_scale=1.5, seed=11)
    return build_calibration_set(tiny_dit(), 4, settings, steps="all", progress=False)


def fixed_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(6, 3, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (6,), generator=generator)
    y = torch.randint(0, 5, (6,), generator=generator)  # includes the null class 4
    return x, t, y


def run_case(name: str, calib) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The case's denoiser output on :func:`fixed_inputs` and its packed tensors."""
    method_name, settings = CASES[name]
    method = METHODS[method_name]
    model = tiny_dit()
    torch.manual_seed(0)
    ditq.quantize(model, method.config_class(**settings), calib, progress=False)
    with torch.no_grad():
        output = model(*fixed_inputs()).numpy()
    tensors = {key: t.detach().float().numpy() for key, t in model.state_dict().items()}
    return output, tensors


def record() -> None:
    calib = calibration_set()
    arrays = {}
    for name in CASES:
        output, tensors = run_case(name, calib)
        arrays[f"{name}/output"] = output
        arrays.update({f"{name}/state/{key}": value for key, value in tensors.items()})
        print(f"{name}: |output| {np.abs(output).mean():.5f}, {len(tensors)} tensors")
    np.savez_compressed(PATH, **arrays)


if __name__ == "__main__":
    record()
