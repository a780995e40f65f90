"""Shared fixtures: tiny random DiTs for speed, the testbed and data from ../shared for realism."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels read TRITON_INTERPRET when ditq.kernels.triton_ops is imported:
    # set it before any test imports them, whatever order the test files run in.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ditq.pipeline.sequential as sequential
from ditq.calib.dataset import build_calibration_set
from ditq.calib.hooks import capture_block_io
from ditq.diffusion.pipeline import SamplingSettings
from ditq.models import DiT, DiTConfig
from ditq.models.adapter import adapter_for
from ditq.pipeline.method import Method, RunContext
from ditq.pipeline.run import run_method
from ditq.quant.layers import QuantLinear

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED = REPOSITORY.parent / "shared"
TESTBED = SHARED / "models" / "dit_s2_cifar10.pt"
CIFAR_TEST = SHARED / "data" / "cifar_test.npz"


def load_script(path: str) -> ModuleType:
    """The repository's script at ``path`` (e.g. ``benchmarks/gemm_sweep.py``), imported as
    a module (scripts are not in the package)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPOSITORY / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


class ScalingRecorder:
    """A sequential-driver solver that records each unit's cached inputs and targets, then
    changes the unit (every quantized linear's weight x 0.9), so that what later units see
    depends on it."""

    name = "scaling-recorder"
    needs_targets = True

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, torch.Tensor]] = {}

    def result_fields(self) -> dict:
        return {}

    def has_work(self, module: torch.nn.Module) -> bool:
        return any(isinstance(m, QuantLinear) for m in module.modules())

    def solve(self, unit, data, position: int, progress: bool) -> dict:
        batch = data.batch(torch.arange(len(data)))
        self.seen[unit.name] = {key: value.cpu() for key, value in batch.items()}
        for module in unit.module.modules():
            if isinstance(module, QuantLinear):
                module.weight.data.mul_(0.9)
        return {}


def check_block_inputs_match_capture(qmodel, fp, calib, monkeypatch) -> None:
    """Every block unit of a sequential run sees the inputs that running the model up to
    it gives, and the FP model's block outputs as targets, although the driver captures
    only the first block of a chain and computes the others from the block before."""
    captured = []
    capture = sequential.capture_block_io

    def spy(model, calib, block, *args, **kwargs):
        captured.append(block)
        return capture(model, calib, block, *args, **kwargs)

    monkeypatch.setattr(sequential, "capture_block_io", spy)
    recorder = ScalingRecorder()
    sequential.run_sequential(qmodel, fp, calib, recorder, progress=False)
    monkeypatch.undo()
    adapter = adapter_for(qmodel)
    blocks = [adapter.block_name(i) for i in range(adapter.num_blocks())]
    assert captured == [blocks[0], blocks[0]]  # the quantized and the FP model, once
    for block in blocks:
        q = capture_block_io(qmodel, calib, block, progress=False)
        f = capture_block_io(fp, calib, block, progress=False)
        expected = {f"arg{i}": arg for i, arg in enumerate(q.args)}
        expected |= {sequential.KWARG + k: v for k, v in q.kwargs.items()}
        expected["target"] = f.out
        seen = recorder.seen[block]
        assert set(seen) == set(expected), block
        for key, value in expected.items():
            torch.testing.assert_close(seen[key], value, rtol=1e-5, atol=1e-6, msg=key)
