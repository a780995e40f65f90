"""The GEMM benchmark's ditq cases call the kernels' current signatures (in the Triton
interpreter at a small size): a lease's ``gemm`` stage once found them stale."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import load_script

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter"
)


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def test_ditq_gemm_cases_run_and_give_the_layer_output_shape():
    M, K, N = 32, 128, 64
    cases = load_script("benchmarks/gemm_sweep.py").layer_cases(M, K, N, "cpu")
    ditq_cases = {name: fn for name, fn in cases.items() if name.startswith("ditq")}
    assert len(ditq_cases) == 7
    for name, fn in ditq_cases.items():
        out = _first(fn())
        assert out.shape == (M, N), name
        assert torch.isfinite(out.float()).all(), name


def test_quantize_cases_run_and_norm_quantize_sums_its_codes():
    script = load_script("benchmarks/gemm_sweep.py")
    cases = script.quantize_cases(256, 64, "cpu")
    codes, *_ = cases["triton quantize_act static"]()
    norm_codes, norm_sums = cases["triton norm_quantize static"]()
    assert codes.shape == norm_codes.shape == (256, 64)
    assert torch.equal(norm_sums, norm_codes.int().sum(1))
    for layout in ("row in one piece", "row split"):  # the same codes in either layout
        codes, sums = cases[f"triton norm_quantize static, {layout}"]()
        assert torch.equal(codes, norm_codes) and torch.equal(sums, norm_sums), layout
