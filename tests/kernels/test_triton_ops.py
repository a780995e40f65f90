"""The Triton kernels (run by the Triton interpreter on the CPU) against float64 references."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
if os.environ["TRITON_INTERPRET"] == "1" and np.lib.NumpyVersion(np.__version__) >= "2.4.0":
    # Triton 3.6's interpreter calls int() on 1-element arrays, an error from numpy 2.4 on
    # (seen with 2.4.6; 2.2 works): install numpy<2.4 next to triton to run these tests.
    pytest.skip("the Triton interpreter needs numpy < 2.4", allow_module_level=True)

from kernel_cases import FORMATS, packed_layer  # noqa: E402

from ditq.kernels import RealQuantLinear, quantize_activation, triton_ops  # noqa: E402

KERNEL_FORMATS = [name for name in FORMATS if name not in ("fp8", "w8 int, a fp8")]


def reference64(real: RealQuantLinear, rows: torch.Tensor) -> torch.Tensor:
    """``x̂ Ŵᵀ + b + (x R'ᵀ) Lᵀ`` in float64 from the layer's prepared tensors."""
    x = rows.double()
    if real.act.fmt is None:
        x_hat = x / real.input_scale.double() if real.input_scale is not None else x
    else:
        codes, scale, zero, _ = quantize_activation(
            rows, real.act, real.input_scale, real.static_qparams
        )
        x_hat = (codes.double() - zero.double()[:, None]) * scale.double()[:, None]
    y = x_hat @ real.dequantized_weight().double().T
    if real.bias is not None:
        y = y + real.bias.double()
    if real.lowrank_down is not None:
        y = y + (x @ real.lowrank_down.double().T) @ real.lowrank_up.double().T
    return y


@pytest.mark.parametrize("name", KERNEL_FORMATS)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "scale+lowrank"])
def test_kernels_match_float64(name, extras):
    layer, x = packed_layer(*FORMATS[name], online_scale=extras, rank=4 if extras else 0, K=96)
    real = RealQuantLinear.from_quant_linear(layer)
    rows = x.reshape(-1, 96)
    out = real._forward_cuda(rows)
    ref = reference64(real, rows)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("name", ["w8a8 sym/static", "w8a8 asym/token", "w3a6"])
def test_activation_codes_equal_torch_twin(name):
    layer, x = packed_layer(*FORMATS[name], online_scale=True, rank=0)
    real = RealQuantLinear.from_quant_linear(layer)
    rows = x.reshape(-1, 64)
    qp = real.static_qparams
    expected = quantize_activation(rows, real.act, real.input_scale, qp)
    got = triton_ops.quantize_act(
        rows, real.input_scale, qp, real.act.qmin, real.act.qmax, real.act.symmetric
    )
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
