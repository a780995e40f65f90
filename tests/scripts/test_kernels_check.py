"""The GPU kernel check's code-by-code comparison (in the Triton interpreter at a small
size): the activation kernels' codes equal their torch twin's, and a code changed on
purpose is counted."""

from __future__ import annotations

import os

import pytest

from conftest import load_script

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter"
)


@pytest.fixture(scope="module")
def script():
    module = load_script("benchmarks/kernels_check.py")
    module.TOKENS = 16
    return module


def test_every_dynamic_int_format_is_an_int_layer_with_dynamic_ranges(script):
    assert "w4a4-groups64-sym" in script.DYNAMIC_INT_FORMATS
    assert "w8a8-int-dynamic-token" in script.DYNAMIC_INT_FORMATS
    assert "w8a8-int-static-asym" not in script.DYNAMIC_INT_FORMATS  # static ranges
    assert "w4a8-ditas-colgroup" not in script.DYNAMIC_INT_FORMATS  # runs dequantized


@pytest.mark.parametrize("fmt", ["w4a4-groups64-sym", "w8a8-int-dynamic-token"])
def test_codes_equal_the_torch_twin_and_the_gemm_is_exact_up_to_bf16(script, fmt):
    row = script.check_codes(fmt, (128, 64), "cpu")
    assert row["kind"] == "int"
    assert row["codes_differing"] == 0 and row["largest_code_difference"] == 0
    assert row["scale_rel_difference"] == 0
    assert 0 < row["rel_error"] < 2**-7  # the BF16 output's rounding only
    assert not row["nan"]


def test_a_changed_code_is_counted(script, monkeypatch):
    from ditq.kernels.linear import RealQuantLinear

    original = RealQuantLinear._quantize_cuda

    def one_code_off(self, rows):
        codes, *rest = original(self, rows)
        codes = codes.clone()
        codes[0, 0] += 1 if codes[0, 0] < 7 else -1
        return (codes, *rest)

    monkeypatch.setattr(RealQuantLinear, "_quantize_cuda", one_code_off)
    row = script.check_codes("w4a4-groups64-sym", (128, 64), "cpu")
    assert row["codes_differing"] == pytest.approx(1 / (16 * 128))
    assert row["largest_code_difference"] == 1


def test_inductor_numerics_patch_what_they_name(script):
    import torch._inductor.config as config

    def division() -> bool:
        if hasattr(config, "eager_numerics"):
            return config.eager_numerics.division_rounding
        return config.emulate_divison_rounding

    expected = {
        "default": (False, False),
        "division": (True, False),
        "division+casts": (True, True),
    }
    assert set(expected) == set(script.COMPILE_NUMERICS)
    for numerics, (rounded, casts) in expected.items():
        with script.inductor_numerics(numerics):
            assert (division(), config.emulate_precision_casts) == (rounded, casts)


@pytest.mark.slow  # Inductor's C++ compilation
def test_compiled_codes_on_a_cpu_equal_eager(script):
    """Inductor's C++ code divides correctly rounded: on a CPU compiled and eager codes agree
    (on a GPU its Triton code divides approximately by default: that is what the row
    measures)."""
    row = script.check_compiled_codes("w4a4-groups64-sym", (128, 64), "cpu", "default")
    assert row["codes_differing"] == 0 and row["largest_code_difference"] == 0
    assert row["rel_error"] == 0 and not row["nan"]


def test_a_compiled_code_that_differs_is_counted(script, monkeypatch):
    def compile_one_off(fn):
        def changed(rows):
            out = fn(rows).clone()
            out.view(-1)[0] += 1
            return out

        return changed

    monkeypatch.setattr(script.torch, "compile", compile_one_off)
    row = script.check_compiled_codes("w4a4-groups64-sym", (128, 64), "cpu", "default")
    assert row["codes_differing"] == pytest.approx(1 / (16 * 128))
    assert row["largest_code_difference"] == 1
    assert row["rel_error"] > 0


@pytest.mark.parametrize("fmt", ["w4a4-groups64-sym", "w8a8-int-dynamic-token"])
def test_a_layer_with_input_scale_and_lowrank_branch_is_at_the_bf16_level(script, fmt):
    """The reference divides by the online input scale in BF16, as the kernels and the
    simulated layer sampling in BF16 do; an fp32 division put 4-bit values that BF16 rounds
    across a level boundary on the other level (3e-2 on the GPU)."""
    row = script.check_layer(fmt, (128, 64), True, "cpu")
    assert row["kind"] == "int"
    assert 0 < row["rel_error"] < 2**-7 and not row["nan"]
