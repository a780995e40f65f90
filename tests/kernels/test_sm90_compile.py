"""Every Triton kernel compiles for Hopper (sm_90) on this CPU (``sm90_compile.py``): errors
of GPU code generation, which the Triton interpreter of the other kernel tests never meets,
fail here and not on a leased GPU."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_compile.py")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no NVIDIA backend (ptxas)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    compiled = result.stdout.splitlines()
    assert sum("_attention_out_kernel" in line for line in compiled) == 2 * (6 + 4)
    assert sum("_int_gemm_kernel" in line for line in compiled) == 11
    assert sum("_gptq_columns_kernel" in line for line in compiled) == 2
