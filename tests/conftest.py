"""Shared fixtures: tiny random DiTs for speed, the testbed and data from ../shared for realism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ditq.calib.dataset import build_calibration_set
from ditq.diffusion.pipeline import SamplingSettings
from ditq.models import DiT, DiTConfig
from ditq.pipeline.method import Method, RunContext
from ditq.pipeline.run import run_method

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TESTBED = SHARED / "models" / "dit_s2_cifar10.pt"
CIFAR_TEST = SHARED / "data" / "cifar_test.npz"

TINY = DiTConfig(
    depth=2, hidden_size=32, patch_size=2, num_heads=2, input_size=8, in_channels=3, num_classes=4
)


def tiny_dit(seed: int = 0, **overrides) -> DiT:
    """A random DiT small enough for millisecond forwards."""
    torch.manual_seed(seed)
    config = DiTConfig(**{**TINY.to_dict(), **overrides})
    return DiT(config).eval()


def output_error(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """Relative L2 distance of ``model``'s output to ``reference``'s on fixed random inputs
    of the tiny DiT."""
    torch.manual_seed(9)
    x, t, y = torch.randn(6, 3, 8, 8), torch.randint(0, 1000, (6,)), torch.randint(0, 5, (6,))
    with torch.no_grad():
        out, ref = model(x, t, y), reference(x, t, y)
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def calib():
    """The tiny DiT's calibration set: 4 DDIM trajectories of 6 steps, every step recorded
    (a test module may define its own)."""
    settings = SamplingSettings(sampler="ddim", steps=6, cfg_scale=1.5, seed=11)
    return build_calibration_set(tiny_dit(), 4, settings, steps="all", progress=False)


def run_unpacked(method: Method, model: DiT, config, calib, **context) -> dict:
    """The pipeline's sequence without packing (float weights kept for inspection): what
    ``method`` did to ``model``; returns the method's report."""
    return run_method(model, method, config, calib, RunContext(**{"progress": False, **context}))


def save_checkpoint(model: DiT, path: Path) -> list[str]:
    """Save ``model``'s state dict to ``path``; returns the CLI flags that load it."""
    torch.save(model.state_dict(), path)
    return ["--model", str(path), "--num-heads", str(model.config.num_heads), "--vae", "none"]


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    """CLI model flags of a tiny random DiT saved once per test module."""
    return save_checkpoint(tiny_dit(), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def tiny_model() -> DiT:
    return tiny_dit()


@pytest.fixture(scope="session")
def testbed_path() -> Path:
    if not TESTBED.is_file():
        pytest.skip(f"testbed checkpoint not found at {TESTBED}")
    return TESTBED


@pytest.fixture(scope="session")
def cifar_test_path() -> Path:
    if not CIFAR_TEST.is_file():
        pytest.skip(f"CIFAR-10 test set not found at {CIFAR_TEST}")
    return CIFAR_TEST
