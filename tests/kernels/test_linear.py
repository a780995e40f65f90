"""The CPU path of ``RealQuantLinear`` equals the simulated ``QuantLinear``, for every format."""

import warnings

import pytest
import torch
from kernel_cases import FORMATS, packed_layer

from ditq.errors import DitqError
from ditq.kernels import RealQuantLinear, convert_model, resolve_backend
from ditq.kernels.linear import layer_kind
from ditq.quant.hadamard import random_signs
from ditq.quant.layers import QuantLinear

from conftest import tiny_dit


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "scale+lowrank"])
def test_cpu_path_equals_simulated(name, extras):
    layer, x = packed_layer(*FORMATS[name], online_scale=extras, rank=4 if extras else 0)
    real = RealQuantLinear.from_quant_linear(layer)
    ref = layer(x)
    out = real(x)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_layout_is_codes_only_and_survives_dtype_casts():
    layer, x = packed_layer(*FORMATS["w4a8 group"])
    real = RealQuantLinear.from_quant_linear(layer).to(torch.bfloat16)
    assert real.weight.dtype == torch.uint8 and real.weight.shape == (48, 32)  # 2 codes per byte
    assert real.w_scale.dtype == torch.float32 and real.w_zero.dtype == torch.int32
    assert not any(b.dtype == torch.float32 and b.shape == (48, 64) for b in real.buffers())
    fp8, _ = packed_layer(*FORMATS["fp8"])
    assert RealQuantLinear(fp8).to(torch.bfloat16).weight.dtype == torch.float8_e4m3fn


def test_convert_model_matches_simulated_model():
    from ditq.eval.speed import denoiser_inputs, quantize_random
    from ditq.methods import RTNConfig

    model = tiny_dit()
    config = RTNConfig(wbits=4, abits=8, w_granularity="group", w_group_size=32)
    inputs = denoiser_inputs(model, 2, "cpu", torch.float32)
    quantize_random(model, config, inputs)
    with torch.no_grad():
        ref = model(*inputs)
        out = convert_model(model)(*inputs)
    kinds = {m.kind for m in model.modules() if isinstance(m, RealQuantLinear)}
    assert kinds == {"int"}
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_converted_blocks_hand_their_gated_residuals_to_the_kernels(monkeypatch):
    """DiT blocks give proj and the MLP ``x + gate ⊙ out`` to add (the int kernel's
    epilogue on CUDA, torch here): every block twice, outputs as the simulated model's."""
    from ditq.eval.speed import denoiser_inputs, quantize_random
    from ditq.kernels import FusedQuantMlp
    from ditq.methods import RTNConfig

    model = tiny_dit()
    inputs = denoiser_inputs(model, 2, "cpu", torch.float32)
    quantize_random(model, RTNConfig(wbits=8, abits=8), inputs)
    with torch.no_grad():
        ref = model(*inputs)
    convert_model(model)
    calls = []
    for cls in (RealQuantLinear, FusedQuantMlp):
        original = cls.gated_residual

        def spy(self, *args, _original=original):
            calls.append(type(self).__name__)
            return _original(self, *args)

        monkeypatch.setattr(cls, "gated_residual", spy)
    with torch.no_grad():
        out = model(*inputs)
    assert calls == ["RealQuantLinear", "FusedQuantMlp"] * model.config.depth
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unpacked_layers_are_refused_with_a_fix():
    layer = QuantLinear.from_linear(torch.nn.Linear(8, 4), *FORMATS["w8a8 sym/static"])
    with pytest.raises(DitqError, match="pack_model"):
        RealQuantLinear(layer)


def test_backend_resolution():
    assert resolve_backend(None, "cpu", quantized=True) == "simulated"
    assert resolve_backend("simulated", "cpu", quantized=True) == "simulated"
    with pytest.raises(DitqError, match="unknown backend 'fast'"):
        resolve_backend("fast", "cpu", quantized=True)
    if not torch.cuda.is_available():
        with pytest.raises(DitqError, match="needs a CUDA GPU"):
            resolve_backend("cuda", "cpu", quantized=True)


@pytest.mark.parametrize("name", ["w4a8 group", "w4a8 channel", "w8a8 sym/static"])
def test_int8_weight_codes_dequantize_to_the_simulated_weight(name):
    layer, _ = packed_layer(*FORMATS[name], online_scale=False, rank=0)
    real = RealQuantLinear.from_quant_linear(layer)
    codes = real._int8_weight()
    assert codes.dtype == torch.int8 and codes.shape == (real.out_features, real.in_features)
    zero = 0 if real.w_zero is None else real._expand(real.w_zero.float())
    weight = (codes.double() - zero) * real._expand(real.w_scale).double()
    torch.testing.assert_close(weight.float(), layer.quantized_weight())


@pytest.mark.parametrize(
    ("name", "needs"),
    [("w8a8 sym/static", False), ("w8a8 asym/token", True), ("w4a8 group", False)],
)
def test_code_sums_only_where_weight_zero_points_need_them(name, needs):
    from ditq.kernels import quantize_activation

    layer, x = packed_layer(*FORMATS[name], online_scale=False, rank=0)
    real = RealQuantLinear.from_quant_linear(layer)
    assert real.needs_code_sums is needs  # grouped weights sum their codes per K block
    rows = x.reshape(-1, real.in_features)
    with_sums = quantize_activation(rows, real.act, None, real.static_qparams)
    without = quantize_activation(rows, real.act, None, real.static_qparams, code_sums=False)
    assert without[3] is None
    torch.testing.assert_close(with_sums[3], with_sums[0].sum(-1, dtype=torch.int32))
    for a, b in zip(with_sums[:3], without[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_convert_model_warns_about_formats_without_a_kernel():
    from ditq.eval.speed import denoiser_inputs, quantize_random
    from ditq.methods import RTNConfig

    model = tiny_dit()
    inputs = denoiser_inputs(model, 1, "cpu", torch.float32)
    slow = RTNConfig(wbits=8, abits=8, w_fmt="fp8_e4m3", a_fmt="fp8_e4m3", w_granularity="group",
                       w_group_size=32)  # fmt: skip
    quantize_random(model, slow, inputs)
    with pytest.warns(UserWarning, match=r"8 layers have a format without a fast kernel"):
        convert_model(model)
    fast = tiny_dit()
    quantize_random(fast, RTNConfig(wbits=8, abits=8), inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_model(fast)


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "scale+lowrank"])
def test_fp8_gemm_path_equals_simulated(extras):
    """The CUDA FP8 path's arithmetic (``triton_ops.fp8_gemm``: ``torch._scaled_mm`` with
    row-wise scales on the CPU, the Triton kernel in its interpreter) against the simulated
    layer."""
    layer, x = packed_layer(*FORMATS["fp8"], online_scale=extras, rank=4 if extras else 0)
    real = RealQuantLinear.from_quant_linear(layer)
    rows = x.reshape(-1, x.shape[-1])
    out = real._forward_cuda(rows).float()
    ref = layer(x).reshape(out.shape)
    assert float((out - ref).norm() / ref.norm()) < 1e-2  # BF16 output of the FP8 GEMM


def test_fp8_layers_narrower_than_scaled_mm_takes_dequantize():
    """_scaled_mm needs widths divisible by 16: a 2x2x3 patch embedding (12 inputs) falls
    back to the dequantizing path, a 16-wide one keeps the FP8 GEMM."""
    narrow, _ = packed_layer(*FORMATS["fp8"], K=12, rank=0)
    wide, _ = packed_layer(*FORMATS["fp8"], K=16, rank=0)
    assert layer_kind(narrow) == "reference" and layer_kind(wide) == "fp8"


def test_int_weights_with_fp8_activations_take_the_fp8_gemm_only_at_4_bits():
    """int4 codes minus their zero point are exact in e4m3, so int4 weights with e4m3
    activations run on the FP8 GEMM; int8 codes are not, and are dequantized."""
    w4, _ = packed_layer(*FORMATS["w4 int asym, a fp8"], rank=0)
    w8, _ = packed_layer(*FORMATS["w8 int, a fp8"], rank=0)
    assert layer_kind(w4) == "fp8" and layer_kind(w8) == "reference"
    real = RealQuantLinear.from_quant_linear(w4).to(torch.bfloat16)
    assert real.weight.dtype == torch.uint8 and real.weight.shape == (48, 32)  # 4-bit at rest
    codes = real._e4m3_weight()
    assert codes.dtype == torch.float8_e4m3fn and codes.float().abs().max() <= 15
    torch.testing.assert_close(
        codes.float() * real.w_scale[:, None], real.dequantized_weight(), rtol=0, atol=0
    )


@pytest.mark.parametrize("name", FORMATS)
def test_rotated_layers_run_real_after_the_hadamard_transform(name):
    """The cuda backend's claim for ``--rotate``: a rotated layer (online scale and low-rank
    branch too) converts, and its path equals the simulated layer."""
    w_spec, a_spec = FORMATS[name]
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 48), w_spec, a_spec)
    layer.input_scale = torch.rand(64) + 0.5
    layer.set_lowrank(0.1 * torch.randn(48, 4), 0.1 * torch.randn(4, 64))
    layer.set_rotation(random_signs(64, 3))
    layer.calibrate_weight()
    x = 2 * torch.randn(3, 5, 64)
    if a_spec.needs_calibration:
        layer.act_quantizer.find_params(layer.transformed_input(x))
    layer.pack()
    out, ref = RealQuantLinear.from_quant_linear(layer)(x), layer(x)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize(
    "dynamic, group, kind",
    [(True, 32, "int"), (True, 16, "dequant"), (False, 16, None)],
    ids=["dynamic-kernel-group", "dynamic-other-group", "static-groups"],
)
def test_per_group_activation_layers_convert_where_a_kernel_takes_them(dynamic, group, kind):
    """Dynamic per-token-group activations run on the int kernel (K block = the group) or
    dequantize; static per-group ranges stay simulated, named in a warning."""
    from ditq.eval.speed import denoiser_inputs, quantize_random
    from ditq.methods import RTNConfig

    model = tiny_dit()
    inputs = denoiser_inputs(model, 1, "cpu", torch.float32)
    config = RTNConfig(wbits=8, abits=8, a_dynamic=dynamic, a_granularity="group",
                       a_group_size=group)  # fmt: skip
    quantize_random(model, config, inputs)
    with torch.no_grad():
        ref = model(*inputs)
    if kind is None:
        with pytest.warns(UserWarning, match=r"8 layers stay simulated .* blocks\.0\.attn\.qkv"):
            convert_model(model)
        assert not any(isinstance(m, RealQuantLinear) for m in model.modules())
    else:
        convert_model(model)
        kinds = {m.kind for m in model.modules() if isinstance(m, RealQuantLinear)}
        assert kinds == {kind}
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), ref, rtol=1e-4, atol=1e-5)
