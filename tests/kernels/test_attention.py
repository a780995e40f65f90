"""The fused quantized attention kernel (Triton interpreter on the CPU) against the
simulated explicit matmuls and against float64 arithmetic; the cuda backend installs it in
quantized attentions and leaves everything else as it was."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from ditq.kernels import convert_model, triton_ops
from ditq.kernels.attention import FusedQuantAttention, fusable
from ditq.models.adapter import MATMUL_POINTS, explicit_attention
from ditq.quant.quantizer import Quantizer
from ditq.quant.spec import PerTensor, PerToken, QuantSpec

from conftest import tiny_dit


def _attention(spec: QuantSpec, q, k, v, scale):
    """An attention's four matmul quantizers; static ones calibrated on these inputs (P on
    90% of its range, so that some probabilities clip)."""
    attn = SimpleNamespace(**{point: Quantizer(spec) for point in MATMUL_POINTS})
    if not spec.dynamic:
        for point, x in zip(MATMUL_POINTS[:3], (q, k, v), strict=True):
            getattr(attn, point).find_params(x)
        probabilities = ((q * scale) @ k.transpose(-2, -1)).softmax(-1)
        attn.attn_act.set_range(0.0, 0.9 * float(probabilities.max()))
    return attn


def _float64_reference(attn, q, k, v, scale):
    """Quantize, multiply, softmax, quantize, multiply, all in float64 from the quantizers'
    step sizes and zero points (dynamic ones from the inputs' own min/max)."""

    def quantized(x, quantizer):
        spec = quantizer.spec
        if spec.dynamic:
            low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            qmax = 2 ** (spec.bits - 1) - 1 if spec.symmetric else 2**spec.bits - 1
            step = max(-low, high) / qmax if spec.symmetric else (high - low) / qmax
            zero = 0.0 if spec.symmetric else round(-low / step)
        else:
            step, zero = float(quantizer.scale), float(quantizer.zero_point)
        qmin = -(2 ** (spec.bits - 1)) if spec.symmetric else 0
        qmax = 2 ** (spec.bits - 1) - 1 if spec.symmetric else 2**spec.bits - 1
        codes = torch.clamp(torch.round(x.double() / step) + zero, qmin, qmax)
        return (codes - zero) * step

    scores = (quantized(q, attn.q_act) * scale) @ quantized(k, attn.k_act).transpose(-2, -1)
    return quantized(scores.softmax(-1), attn.attn_act) @ quantized(v, attn.v_act)


def _simulated_and_fused(spec: QuantSpec, q, k, v, scale, mask=None):
    """An attention's quantizers (:func:`_attention`) and its output through the simulated
    explicit matmuls, then through the fused kernel."""
    attn = _attention(spec, q, k, v, scale)
    simulated = explicit_attention(attn, q, k, v, scale, mask)
    attn.fused_matmuls = FusedQuantAttention([getattr(attn, p) for p in MATMUL_POINTS])
    return attn, simulated, explicit_attention(attn, q, k, v, scale, mask)


PASSES = [
    pytest.param(False, "one-pass", id="static-one-pass"),
    pytest.param(False, "two-pass", id="static-two-pass"),
    pytest.param(True, "two-pass", id="dynamic"),  # P's range needs every row's l first
    pytest.param(False, "one-pass tile codes", id="static-one-pass-tile-codes"),
    pytest.param(True, "two-pass tile codes", id="dynamic-tile-codes"),
]


def _use_passes(monkeypatch, passes: str, shape: tuple, dynamic: bool) -> None:
    """Run the kernel with ``passes`` for attentions of ``shape`` (Nq, Nk, D), masked or
    not; one pass must not launch pass 1, tile codes not the codes pass."""
    choice = {(*shape, masked, not dynamic): passes for masked in (False, True)}
    monkeypatch.setattr(triton_ops, "ATTENTION_CHOICE", choice)
    if passes.startswith("one-pass"):
        monkeypatch.setattr(triton_ops, "_attention_stats_kernel", None)  # not subscriptable
    if passes.endswith(triton_ops.TILE_CODES):
        monkeypatch.setattr(triton_ops, "_attention_codes_kernel", None)


@pytest.mark.parametrize(("dynamic", "passes"), PASSES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_kernel_equals_the_simulated_matmuls(dynamic, passes, symmetric, monkeypatch):
    """Batch 2, 3 heads, 40 queries over 23 keys (cross-attention, tiles cut at both ends),
    head dim 24 (not a power of 2), q/k/v strided views of one projection like a qkv's;
    one pass (every key in one tile, P's range static) or two."""
    _use_passes(monkeypatch, passes, (40, 23, 24), dynamic)
    torch.manual_seed(0)
    projection = torch.randn(2, 40, 3, 3, 24) * torch.tensor([1.0, 2.0, 0.5]).view(1, 1, 3, 1, 1)
    q, k, v = projection.permute(2, 0, 3, 1, 4).unbind(0)
    k, v = k[:, :, :23], v[:, :, :23]
    assert not q.is_contiguous()
    spec = QuantSpec(bits=8, symmetric=symmetric, granularity=PerTensor(), dynamic=dynamic)
    scale = 24**-0.5
    attn, simulated, fused = _simulated_and_fused(spec, q, k, v, scale)
    assert fused.shape == simulated.shape == (2, 3, 40, 24)
    assert fused.transpose(1, 2).is_contiguous()  # the layout proj reads, without a copy
    torch.testing.assert_close(fused, simulated, rtol=0, atol=1e-5 * float(simulated.abs().max()))
    reference = _float64_reference(attn, q, k, v, scale)
    error = float((fused.double() - reference).norm() / reference.norm())
    assert error < 1e-5


@pytest.mark.parametrize("D", [16, 32, 72, 80], ids=lambda d: f"head-{d}")
@pytest.mark.parametrize("passes", ["one-pass", "two-pass tile codes"])
def test_head_widths_padded_to_a_power_of_two_equal_the_simulated_matmuls(D, passes, monkeypatch):
    """The kernels pad a head's D channels to a power of two of at least 16 (DiT-XL/2's
    72 to 128, 56 channels masked): powers of two, widths that need the mask, the
    smallest."""
    block = triton_ops._head_block(D)
    assert block & (block - 1) == 0 and block >= 16 and block // 2 < D <= block or D < 16
    _use_passes(monkeypatch, passes, (20, 20, D), dynamic=False)
    torch.manual_seed(4)
    q, k, v = torch.randn(3, 1, 2, 20, D).unbind(0)
    spec = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
    _, simulated, fused = _simulated_and_fused(spec, q, k, v, D**-0.5)
    torch.testing.assert_close(fused, simulated, rtol=0, atol=1e-5 * float(simulated.abs().max()))


def test_fused_only_for_int_per_tensor_specs_of_at_most_8_bits():
    tensor = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
    dynamic = QuantSpec(bits=8, symmetric=False, granularity=PerTensor(), dynamic=True)
    token = QuantSpec(bits=8, symmetric=False, granularity=PerToken(), dynamic=True)
    calibrated = [Quantizer(tensor) for _ in MATMUL_POINTS]
    for quantizer in calibrated:
        quantizer.set_range(-1.0, 1.0)
    assert fusable(calibrated)
    assert fusable([Quantizer(dynamic) for _ in MATMUL_POINTS])
    assert not fusable([Quantizer(tensor) for _ in MATMUL_POINTS])  # not calibrated
    assert not fusable([Quantizer(token) for _ in MATMUL_POINTS])
    assert not fusable(calibrated[:3] + [Quantizer(dynamic)])  # specs differ
    assert not fusable([torch.nn.Identity() for _ in MATMUL_POINTS])


def test_convert_model_fuses_quantized_attention():
    from ditq.eval.speed import denoiser_inputs, quantize_random
    from ditq.methods import RTNConfig

    model = tiny_dit()
    inputs = denoiser_inputs(model, 2, "cpu", torch.float32)
    quantize_random(model, RTNConfig(wbits=8, abits=8, attn_bits=8), inputs)
    with torch.no_grad():
        ref = model(*inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every attention is fused: nothing to warn of
            out = convert_model(model)(*inputs)
    fused = [m.fused_matmuls for m in model.modules() if hasattr(m, "fused_matmuls")]
    assert len(fused) == 2 and all(isinstance(f, FusedQuantAttention) for f in fused)
    assert not any("fused_matmuls" in key for key in model.state_dict())  # ranges not saved
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    model.to(torch.bfloat16)  # the ranges stay fp32: cast, they would be rounded
    assert all(f.qkv_qparams.dtype == f.p_qparams.dtype == torch.float32 for f in fused)


@pytest.mark.parametrize(("dynamic", "passes"), PASSES)
@pytest.mark.parametrize(
    "mask_shape", [(2, 3, 1, 23), (2, 1, 40, 23)], ids=["per-key (diffusers)", "per-query"]
)
def test_masked_attention_runs_the_kernel_and_equals_the_simulated_matmuls(
    dynamic, passes, mask_shape, monkeypatch
):
    """An additive score mask (diffusers' cross-attention: -10000 on the padded keys of each
    sample) broadcast over heads or queries: the kernel adds it to its scores as the
    explicit matmuls do."""
    _use_passes(monkeypatch, passes, (40, 23, 24), dynamic)
    torch.manual_seed(2)
    q = torch.randn(2, 3, 40, 24)
    k, v = torch.randn(2, 2, 3, 23, 24).unbind(0)
    mask = torch.zeros(mask_shape)
    mask[0, ..., 17:] = -10000.0  # sample 0 attends to its first 17 keys only
    if mask_shape[2] > 1:
        mask[1, :, ::3, :5] = -10000.0  # every third query of sample 1 skips the first keys
    spec = QuantSpec(bits=8, symmetric=False, granularity=PerTensor(), dynamic=dynamic)
    scale = 24**-0.5
    attn, simulated, fused = _simulated_and_fused(spec, q, k, v, scale, mask)
    unmasked = explicit_attention(attn, q, k, v, scale)
    torch.testing.assert_close(fused, simulated, rtol=0, atol=1e-5 * float(simulated.abs().max()))
    assert float((fused - unmasked).abs().max()) > 0.1  # the mask changed the output


@pytest.mark.parametrize(("dynamic", "passes"), PASSES)
def test_a_query_masked_everywhere_by_the_float_minimum_attends_uniformly(
    dynamic, passes, monkeypatch
):
    """A mask of ``torch.finfo(float32).min`` on every key of a query (a padding convention)
    gives that query uniform weights in the simulated matmuls; the kernel's base-2 scores
    must not overflow it to -inf (NaN)."""
    _use_passes(monkeypatch, passes, (40, 23, 24), dynamic)
    torch.manual_seed(3)
    q = torch.randn(2, 3, 40, 24)
    k, v = torch.randn(2, 2, 3, 23, 24).unbind(0)
    mask = torch.zeros(2, 1, 40, 23)
    mask[0, :, 5] = torch.finfo(torch.float32).min  # query 5 of sample 0 sees no key
    spec = QuantSpec(bits=8, symmetric=False, granularity=PerTensor(), dynamic=dynamic)
    scale = 24**-0.5
    _, simulated, fused = _simulated_and_fused(spec, q, k, v, scale, mask)
    assert not simulated.isnan().any()
    torch.testing.assert_close(fused, simulated, rtol=0, atol=1e-5 * float(simulated.abs().max()))
