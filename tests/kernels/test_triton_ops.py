"""The Triton kernels (run by the Triton interpreter on the CPU) against float64 references."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
_TRITON = tuple(int(v) for v in triton.__version__.split(".")[:2])
if (
    os.environ["TRITON_INTERPRET"] == "1"
    and np.lib.NumpyVersion(np.__version__) >= "2.4.0"
    and _TRITON < (3, 9)
):
    # Triton 3.6's interpreter calls int() on 1-element arrays, an error from numpy 2.4 on
    # (seen with 2.4.6 and 3.6.0; 3.9.0 runs them): install numpy<2.4 or a newer triton.
    pytest.skip("this Triton's interpreter needs numpy < 2.4", allow_module_level=True)

import triton.language as tl  # noqa: E402
from kernel_cases import FORMATS, packed_layer  # noqa: E402

from ditq.kernels import RealQuantLinear, quantize_activation, triton_ops  # noqa: E402
from ditq.quant.spec import PerChannel, PerGroup, PerToken, QuantSpec  # noqa: E402


@pytest.fixture(
    params=[(0, False), (2, False), (0, True), (2, True)],
    ids=["tile-per-program", "persistent", "tma", "tma-persistent"],
)
def gemm_schedule(request, monkeypatch):
    """``int_gemm`` with one program per output tile or two persistent programs striding
    over the tiles, operands loaded through pointers or TMA tensor descriptors."""
    persistent, tma = request.param
    if tma and triton_ops.TensorDescriptor is None:
        pytest.skip("this Triton has no host-side tensor descriptors")
    monkeypatch.setitem(triton_ops.INTERPRETER_OPTIONS, "PERSISTENT", persistent)
    monkeypatch.setitem(triton_ops.INTERPRETER_OPTIONS, "TMA", tma)


def reference64(real: RealQuantLinear, rows: torch.Tensor) -> torch.Tensor:
    """``x̂ Ŵᵀ + b + (x R'ᵀ) Lᵀ`` in float64 from the layer's prepared tensors."""
    x = rows.double()
    if real.act.fmt is None:
        x_hat = x / real.input_scale.double() if real.input_scale is not None else x
    else:
        codes, scale, zero, _ = quantize_activation(
            rows, real.act, real.input_scale, real.static_qparams
        )
        repeat = real.act.group_size or real.in_features  # per-row tables to (M, K)
        scale = scale.double().reshape(len(rows), -1).repeat_interleave(repeat, dim=1)
        zero = zero.double().reshape(len(rows), -1).repeat_interleave(repeat, dim=1)
        x_hat = (codes.double() - zero) * scale
    y = x_hat @ real.dequantized_weight().double().T
    if real.bias is not None:
        y = y + real.bias.double()
    if real.lowrank_down is not None:
        y = y + (x @ real.lowrank_down.double().T) @ real.lowrank_up.double().T
    return y


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "scale+lowrank"])
def test_kernels_match_float64(name, extras, gemm_schedule):
    layer, x = packed_layer(*FORMATS[name], online_scale=extras, rank=4 if extras else 0, K=96)
    real = RealQuantLinear.from_quant_linear(layer)
    rows = x.reshape(-1, 96)
    out = real._forward_cuda(rows)
    ref = reference64(real, rows)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_weight_groups_wider_than_the_activation_groups_match_float64(gemm_schedule):
    """4-bit weights in groups of 64 under asymmetric 4-bit activation groups of 32 (SVDQuant
    with ``--a-group-size 32 --no-a-symmetric``): the kernel's K block is the activation
    group, each weight scale read by both halves of its group."""
    w_spec = QuantSpec(4, True, PerGroup(64))
    a_spec = QuantSpec(4, False, PerGroup(32), dynamic=True)
    layer, x = packed_layer(w_spec, a_spec, online_scale=True, rank=8, K=128)
    real = RealQuantLinear.from_quant_linear(layer)
    assert (real.kind, real.group_size) == ("int", 32)
    rows = x.reshape(-1, 128)
    ref = reference64(real, rows)
    assert float((real._forward_cuda(rows).double() - ref).norm() / ref.norm()) < 1e-5


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


@pytest.mark.parametrize("name", ["w4a4 groups (svdquant)", "w4a8 channel, a asym groups"])
@pytest.mark.parametrize("K", [64, 96], ids=["groups-power-of-two", "three-groups"])
def test_group_activation_codes_equal_torch_twin(name, K):
    layer, x = packed_layer(*FORMATS[name], online_scale=True, rank=0, K=K)
    real = RealQuantLinear.from_quant_linear(layer)
    rows = x.reshape(-1, K)
    codes, scale, zero, sums = quantize_activation(rows, real.act, real.input_scale, None)
    assert sums is None and scale.shape == zero.shape == (len(rows), K // 32)
    got = triton_ops.quantize_act_groups(
        rows, real.input_scale, 32, real.act.qmin, real.act.qmax, real.act.symmetric
    )
    for a, b in zip(got, (codes, scale, zero), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the simulated quantizer's values, from the codes
    x_hat = (
        codes.double() - zero.double().repeat_interleave(32, 1)
    ) * scale.double().repeat_interleave(32, 1)
    simulated = layer.act_quantizer(rows / layer.input_scale).double()
    torch.testing.assert_close(x_hat, simulated, rtol=1e-6, atol=1e-6)


def fused_mlp_case(w_spec, fc2_scale, K=64, H=128, seed=0, a_spec=None):
    """A DiT ``Mlp`` with packed fc1/fc2 (static inputs, asymmetric int8 unless ``a_spec``;
    fc2's range calibrated on the GELU output) and an input."""
    import copy

    from kernel_cases import STATIC_ASYM

    from ditq.models.dit import Mlp
    from ditq.quant.layers import QuantLinear

    torch.manual_seed(seed)
    mlp, x = Mlp(K, H), 2 * torch.randn(3, 5, K)
    a_spec = a_spec or STATIC_ASYM
    fc1 = QuantLinear.from_linear(mlp.fc1, w_spec, a_spec)
    fc1.calibrate_weight()
    fc1.act_quantizer.find_params(x)
    hidden = mlp.act(fc1(x))
    fc2 = QuantLinear.from_linear(mlp.fc2, w_spec, a_spec)
    if fc2_scale:
        fc2.input_scale = torch.rand(H) + 0.5
        hidden = hidden / fc2.input_scale
    fc2.calibrate_weight()
    fc2.act_quantizer.find_params(hidden)
    fc1.pack()
    fc2.pack()
    mlp.fc1, mlp.fc2 = fc1, fc2
    return mlp.requires_grad_(False), copy.deepcopy(mlp), x


FP8_STATIC = FORMATS["fp8 static"]


@pytest.mark.parametrize(
    "w_spec, a_spec",
    [
        (QuantSpec(8, True, PerChannel()), None),
        (QuantSpec(8, False, PerChannel()), None),
        (QuantSpec(4, False, PerGroup(32)), None),
        FP8_STATIC,
    ],
    ids=["w8-sym-channel", "w8-asym-channel", "w4-asym-group32", "fp8-static"],
)
@pytest.mark.parametrize("fc2_scale", [False, True], ids=["plain", "fc2-input-scale"])
def test_fused_mlp_equals_the_unfused_kernels_and_the_simulated_mlp(
    w_spec, a_spec, fc2_scale, gemm_schedule
):
    from ditq.kernels import FusedQuantMlp, convert_model

    mlp, simulated, x = fused_mlp_case(w_spec, fc2_scale, a_spec=a_spec)
    convert_model(mlp)
    assert FusedQuantMlp.fusable(mlp)
    fused = FusedQuantMlp(mlp.fc1, mlp.fc2)
    rows = x.reshape(-1, 64)
    unfused = mlp.fc2._forward_cuda(mlp.act(mlp.fc1._forward_cuda(rows)))
    out = fused._forward_fused(rows)
    torch.testing.assert_close(out, unfused, rtol=1e-5, atol=1e-5)
    ref = simulated(x).reshape(-1, simulated.fc2.out_features)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize(
    "w_spec, a_spec",
    [
        (QuantSpec(4, True, PerChannel()), QuantSpec(8, True, PerToken(), dynamic=True)),
        (QuantSpec(4, False, PerGroup(64)), QuantSpec(8, False)),
        (QuantSpec(4, True, PerGroup(64)), QuantSpec(4, True, PerGroup(64), dynamic=True)),
        (QuantSpec(4, True, PerGroup(32)), QuantSpec(8, True, PerToken(), dynamic=True)),
        (QuantSpec(4, False, PerChannel()), QuantSpec(8, True, fmt="fp8_e4m3")),
    ],
    ids=["w4-channel", "w4-asym-group64", "w4a4-groups64", "w4-group32", "w4-asym-a-fp8"],
)
@pytest.mark.parametrize("K", [128, 192], ids=["K128", "K192"])
def test_int4_unpacked_in_the_kernel_equals_unpacking_first(w_spec, a_spec, K, gemm_schedule):
    """Packed int4 bytes read by the GEMM (each K block's nibbles interleaved back into
    input-channel order in registers) give the integer sums of the int8 codes: the same
    output, bit for bit; with e4m3 activations (the codes minus zero points as e4m3, exact)
    the same fp32 products, summed in another order."""
    layer, x = packed_layer(w_spec, a_spec, online_scale=True, rank=4, K=K)
    real = RealQuantLinear.from_quant_linear(layer)
    rows = x.reshape(-1, K)
    first = real._quantized_cuda(rows)
    real.int4_in_kernel = True
    assert real.unpacks_in_kernel
    exact = real.kind == "int"
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(real._quantized_cuda(rows), first, **tolerance)
    assert float((first.double() - reference64(real, rows)).norm()) < 1e-4 * float(first.norm())


def gated_case(N: int, B: int = 3, T: int = 5, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, N, generator=generator), torch.randn(B, N, generator=generator)


@pytest.mark.parametrize(
    "name", ["w8a8 sym/static", "w4a8 group", "w4a4 groups (svdquant)", "fp8", "fp8 static"]
)
def test_gated_residual_epilogue_matches_float64(name, gemm_schedule):
    """``x + gate ⊙ y`` in the GEMM's epilogue, gate rows per sample (M / B tokens)."""
    layer, x = packed_layer(*FORMATS[name], online_scale=True, rank=4, K=96)
    real = RealQuantLinear.from_quant_linear(layer)
    residual, gate = gated_case(real.out_features)
    rows = x.reshape(-1, 96)
    out = real._quantized_cuda(rows, residual.reshape(-1, real.out_features), gate)
    y = reference64(real, rows).reshape(residual.shape)
    ref = residual.double() + gate.double()[:, None, :] * y
    assert float((out.double().reshape(ref.shape) - ref).norm() / ref.norm()) < 1e-5


def test_fused_mlp_adds_the_gated_residual_in_fc2s_epilogue(gemm_schedule):
    from ditq.kernels import FusedQuantMlp, convert_model

    mlp, _, x = fused_mlp_case(QuantSpec(8, False, PerChannel()), fc2_scale=True)
    convert_model(mlp)
    fused = FusedQuantMlp(mlp.fc1, mlp.fc2)
    residual, gate = gated_case(64)
    rows = x.reshape(-1, 64)
    out = fused._forward_fused(rows, residual.reshape(-1, 64), gate)
    expected = residual + gate[:, None, :] * fused._forward_fused(rows).reshape(residual.shape)
    torch.testing.assert_close(out.reshape(residual.shape), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("epilogue", ["plain", "lowrank", "residual", "next-codes"])
def test_fp8_cublas_twin_computes_the_kernels_epilogues(epilogue):
    """``fp8_gemm`` on ``torch._scaled_mm`` (the faster choice for some shapes on the GPU)
    gives the Triton kernel's results, up to its BF16 output: y, y + T Lᵀ, the gated
    residual, and the next layer's e4m3 codes of GELU(y) (within one e4m3 step)."""
    layer, x = packed_layer(*FP8_STATIC, online_scale=True, rank=4, K=64, N=48)
    real = RealQuantLinear.from_quant_linear(layer)
    rows = x.reshape(-1, 64)
    codes, scale, _, _ = real._quantize_cuda(rows)
    options = {}
    t, up = (real._lowrank_t(rows), real.lowrank_up) if epilogue == "lowrank" else (None, None)
    if epilogue == "residual":
        residual, gate = gated_case(48)
        options = dict(residual=residual.reshape(-1, 48), gate=gate)
    if epilogue == "next-codes":
        options = dict(next_scale=torch.tensor([0.05, 0.0]), next_input_scale=torch.rand(48) + 0.5)
    args = (codes, scale, real.weight, real.w_scale, real.bias, t, up, torch.float32)
    kernel = triton_ops._fp8_triton(*args, **options).float()
    cublas = triton_ops._fp8_cublas(*args, **options).float()
    if epilogue == "next-codes":
        assert kernel.abs().max() > 1
        torch.testing.assert_close(cublas, kernel, rtol=0.125, atol=2**-9)
    else:
        assert float((cublas - kernel).norm() / kernel.norm()) < 1e-2


@pytest.mark.parametrize("epilogue", ["", "residual", "next-codes"])
def test_fp8_choice_times_each_path_with_the_calls_epilogue(epilogue):
    """``fp8_gemm`` chooses per shape and epilogue between the Triton kernel (epilogue
    fused) and cuBLAS (epilogue as torch ops after it): the two timed runs must do the
    work the call does, the gated residual or the next layer's codes included, and agree."""
    torch.manual_seed(0)
    runs = triton_ops._fp8_gemm_runs(64, 48, 32, epilogue, torch.device("cpu"))
    kernel, cublas = (runs[name]().float() for name in ("triton", "cublas"))
    assert kernel.shape == (64, 48)
    expected_dtype = torch.float8_e4m3fn if epilogue == "next-codes" else torch.bfloat16
    assert runs["triton"]().dtype == runs["cublas"]().dtype == expected_dtype
    if epilogue == "residual":  # the same operands (seed), without the residual
        torch.manual_seed(0)
        plain = triton_ops._fp8_gemm_runs(64, 48, 32, "", torch.device("cpu"))["triton"]()
        assert float((kernel - plain.float()).norm() / plain.float().norm()) > 0.1
    torch.testing.assert_close(cublas, kernel, rtol=0.125, atol=0.125)


def test_a_measured_choice_keeps_the_fastest_path_and_its_times(monkeypatch):
    """``_chosen`` times every path once per key (here with a stand-in for the GPU's
    ``_gpu_ms``), keeps the fastest for the later calls and records the times it saw."""
    table, timed = {}, []
    runs = {"cublas": lambda: "cublas", "triton": lambda: "triton"}
    fake_ms = {"cublas": 0.30, "triton": 0.20}

    def gpu_ms(fn):
        timed.append(fn())
        return fake_ms[fn()]

    monkeypatch.setattr(triton_ops, "INTERPRETED", False)
    monkeypatch.setattr(triton_ops, "_gpu_ms", gpu_ms)
    monkeypatch.setattr(triton_ops, "CHOICE_TIMES", {})
    key = (32, 16, 8, "residual")
    assert triton_ops._chosen(table, key, lambda: runs, default="cublas") == "triton"
    assert triton_ops._chosen(table, key, lambda: runs, default="cublas") == "triton"
    assert timed == ["cublas", "triton"]  # measured once
    recorded = triton_ops.CHOICE_TIMES
    assert recorded == {key: fake_ms}


class QueuedGpu:
    """The CUDA calls of ``_gpu_ms``, simulated: the GPU reaches the first timed run before
    the host has issued them all unless the sleep before them has ``needed`` cycles; a
    run's events then span the host's launch time (``host_ms``), otherwise its GPU time
    (``gpu_ms``, one value per run)."""

    def __init__(self, needed: int, host_ms: float, gpu_ms: list[float]):
        self.needed, self.host_ms, self.gpu_ms = needed, host_ms, gpu_ms
        self.sleeps, self.recorded, self.flushes, self.runs = [], [], 0, 0
        self.active = self  # as triton.runtime.driver, whose .active is the driver

    def install(self, monkeypatch) -> None:
        """Stand in for the driver and the CUDA calls ``_gpu_ms`` makes."""
        monkeypatch.setattr(triton_ops.triton.runtime, "driver", self)
        monkeypatch.setattr(torch.cuda, "_sleep", self.sleep)
        monkeypatch.setattr(torch.cuda, "Event", self.event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def sleep(self, cycles: int) -> None:
        self.sleeps.append(cycles)
        self.recorded = []

    def too_short(self) -> bool:
        return self.sleeps[-1] < self.needed

    def get_empty_cache_for_benchmark(self) -> str:
        return "L2"

    def clear_cache(self, cache: str) -> None:
        assert cache == "L2"
        self.flushes += 1

    def run(self) -> None:
        self.runs += 1

    def event(self, enable_timing: bool):
        gpu = self

        class Event:  # recorded as start, end, start, end, ... after each sleep
            def record(self) -> None:
                gpu.recorded.append(self)

            def query(self) -> bool:  # reached by the GPU
                return gpu.too_short()

            def elapsed_time(self, end) -> float:
                assert gpu.recorded.index(end) == gpu.recorded.index(self) + 1
                return gpu.host_ms if gpu.too_short() else gpu.gpu_ms[gpu.recorded.index(self) // 2]

        return Event()


def test_gpu_time_queues_the_runs_behind_a_sleep_that_outlasts_their_issuing(monkeypatch):
    """``_gpu_ms`` (the kernel choices' timer) reports the GPU's time of a run, not its
    launch time on the host: a sleep too short for the host to issue every timed run is
    made 4× longer and the runs timed again; the median of the runs behind a long enough
    sleep is returned, each run after an L2 flush, one untimed run first."""
    reps = 5
    gpu = QueuedGpu(needed=1 << 27, host_ms=0.15, gpu_ms=[0.013, 0.011, 0.012, 0.020, 0.010])
    gpu.install(monkeypatch)
    assert triton_ops._gpu_ms(gpu.run, reps=reps) == pytest.approx(0.012)
    first, longest = triton_ops.SLEEP_CYCLES
    assert gpu.sleeps == [first, first * 4, first * 16] and first * 16 >= gpu.needed
    assert gpu.runs == 1 + 3 * reps and gpu.flushes == 3 * reps


def test_gpu_time_stops_at_the_longest_sleep(monkeypatch):
    """A host that never finishes issuing in time (a run that waits for the GPU) ends the
    retries at the longest sleep, with that try's times."""
    gpu = QueuedGpu(needed=1 << 40, host_ms=0.15, gpu_ms=[])
    gpu.install(monkeypatch)
    assert triton_ops._gpu_ms(gpu.run, reps=3) == pytest.approx(0.15)
    first, longest = triton_ops.SLEEP_CYCLES
    assert gpu.sleeps == [first * 4**i for i in range(len(gpu.sleeps))]
    assert gpu.sleeps[-1] == longest


def test_convert_model_fuses_only_fusable_mlps():
    from ditq.eval.speed import denoiser_inputs, quantize_random
    from ditq.kernels import FusedQuantMlp, convert_model
    from ditq.methods import RTNConfig

    from conftest import tiny_dit

    inputs = denoiser_inputs(tiny_dit(), 1, "cpu", torch.float32)
    static = quantize_random(tiny_dit(), RTNConfig(wbits=8, abits=8), inputs)
    reference = static(*inputs)
    fused = convert_model(static, fuse_mlp=True)
    assert sum(isinstance(m, FusedQuantMlp) for m in fused.modules()) == len(fused.blocks)
    torch.testing.assert_close(fused(*inputs), reference, rtol=1e-4, atol=1e-5)  # CPU: unfused
    dynamic = RTNConfig(wbits=8, abits=8, a_dynamic=True)  # no static range for fc2
    model = convert_model(quantize_random(tiny_dit(), dynamic, inputs), fuse_mlp=True)
    assert not any(isinstance(m, FusedQuantMlp) for m in model.modules())


@pytest.mark.parametrize("K", [12, 16], ids=["pixel-patch-2x2x3", "latent-patch-2x2x4"])
@pytest.mark.parametrize("name", ["w8a8 sym/static", "w8a8 asym/token", "w4a8 channel"])
def test_patch_embedding_widths_run_on_the_kernels(name, K, gemm_schedule):
    """PTQ4DiT quantizes the patch embedding: a linear over 2x2 patches of 3 or 4 channels,
    K = 12 or 16 input features, narrower than any GEMM tile and, for 12, not 16-byte
    aligned (no TMA load)."""
    layer, x = packed_layer(*FORMATS[name], online_scale=False, rank=0, K=K)
    real = RealQuantLinear.from_quant_linear(layer)
    rows = x.reshape(-1, K)
    out = real._forward_cuda(rows)
    ref = reference64(real, rows)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def modulated_norm_case(B: int = 3, T: int = 10, K: int = 48, seed: int = 2):
    """Rows of B samples, and shift / scale as the adaLN output's chunks (row stride 6K)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B * T, K, generator=generator) * 3 + 1
    modulation = torch.randn(B, 6 * K, generator=generator) * 0.5
    shift, scale = modulation[:, :K], modulation[:, 2 * K : 3 * K]
    return x, shift, scale


@pytest.mark.parametrize(
    "fmt", ["int8 sym", "uint8 asym", "int4 asym", "e4m3"], ids=lambda name: name.replace(" ", "-")
)
@pytest.mark.parametrize("online_scale", [False, True], ids=["plain", "input-scale"])
@pytest.mark.parametrize(
    "K, split",
    [(48, False), (48, True), (44, True), (64, True)],
    ids=["48", "32+16", "32+12", "64"],
)
def test_norm_quantize_matches_float64(fmt, online_scale, K, split, monkeypatch):
    """A DiT block's modulated LayerNorm and its quantization in one kernel, against the
    float64 formulas: ``h = (x - μ) / sqrt(σ² + ε) ⊙ (1 + scale_b) + shift_b``, divided by
    the online scale, then ``clamp(round(h / Δ) + z) - shift`` (or the e4m3 cast); each row
    in registers in one piece, or split in two (the second piece masked where K is not a sum
    of two powers of two, absent where K is one)."""
    monkeypatch.setattr(triton_ops, "ROW_LAYOUTS", (split,))
    x, shift, scale = modulated_norm_case(K=K)
    B, K = shift.shape
    s = torch.rand(K) + 0.5 if online_scale else None
    qmin, qmax, symmetric = {
        "int8 sym": (-127, 127, True), "uint8 asym": (0, 255, False), "int4 asym": (0, 15, False),
        "e4m3": (0, 0, True),
    }[fmt]  # fmt: skip
    static = torch.tensor([0.9 if fmt == "int4 asym" else 0.05, 0.0 if symmetric else 7.0])
    codes, sums = triton_ops.norm_quantize(
        x, shift, scale, 1e-6, s, static, qmin, qmax, symmetric, fmt == "e4m3"
    )
    xd = x.double()
    h = (xd - xd.mean(1, keepdim=True)) / torch.sqrt(xd.var(1, unbiased=False, keepdim=True) + 1e-6)
    batch = torch.arange(len(x)) // (len(x) // B)
    h = h * (1 + scale.double()[batch]) + shift.double()[batch]
    if s is not None:
        h = h / s.double()
    if fmt == "e4m3":
        expected = (h / static[0]).clamp(-448, 448).float().to(torch.float8_e4m3fn).float()
        assert codes.dtype == torch.float8_e4m3fn and sums.numel() == 0
        torch.testing.assert_close(codes.float(), expected, rtol=0.07, atol=2**-9)
        assert float((codes.float() != expected).float().mean()) < 0.02  # ties of fp32 rounding
        return
    shift_codes = 0 if symmetric else 128
    expected = (torch.round(h / static[0].double()) + static[1]).clamp(qmin, qmax) - shift_codes
    assert codes.dtype == torch.int8
    assert int((codes.double() - expected).abs().max()) <= 1
    assert float((codes.double() != expected).float().mean()) < 0.01
    torch.testing.assert_close(sums, codes.sum(1, dtype=torch.int32), rtol=0, atol=0)
    assert len(torch.unique(codes)) > 8  # the range is used, not one clamped code
    unsummed, no_sums = triton_ops.norm_quantize(
        x, shift, scale, 1e-6, s, static, qmin, qmax, symmetric, False, False
    )
    assert torch.equal(unsummed, codes) and no_sums.numel() == 0


def test_blocks_quantize_their_inputs_in_the_norm_kernel():
    """A converted DiT block's two branches from x itself (``norm_branch``: the norm,
    modulation and input quantization in one kernel, the gated residual in proj's and
    fc2's epilogues) equal the simulated block's branches, for int8 with asymmetric weights
    (code sums), int4 and static FP8."""
    import copy

    from ditq.eval.speed import denoiser_inputs, quantize_random
    from ditq.kernels import FusedQuantMlp, convert_model
    from ditq.methods import RTNConfig
    from ditq.models.dit import gated_residual, modulate

    from conftest import tiny_dit

    configs = {
        "w8a8": RTNConfig(wbits=8, abits=8),
        "w4a8": RTNConfig(wbits=4, abits=8),
        "fp8": RTNConfig(wbits=8, abits=8, w_fmt="fp8_e4m3", a_fmt="fp8_e4m3"),
        "w4 int, a fp8": RTNConfig(wbits=4, abits=8, a_fmt="fp8_e4m3"),
    }
    for name, config in configs.items():
        model = tiny_dit()
        inputs = denoiser_inputs(model, 2, "cpu", torch.float32)
        quantize_random(model, config, inputs)
        simulated = copy.deepcopy(model).blocks[0]
        block = convert_model(model).blocks[0]
        assert block.attn.quantizes_norm and block.mlp.quantizes_norm
        assert isinstance(block.mlp, FusedQuantMlp)
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(4, 16, model.config.hidden_size, generator=generator)
        chunks = torch.randn(4, 6 * model.config.hidden_size, generator=generator).chunk(6, 1)
        shift, scale, gate = chunks[:3]
        with torch.no_grad():
            for module, reference, norm in (
                (block.attn, simulated.attn, simulated.norm1),
                (block.mlp, simulated.mlp, simulated.norm2),
            ):
                out = module.norm_branch(x, norm.eps, shift, scale, gate)
                ref = gated_residual(reference, modulate(norm(x), shift, scale), x, gate)
                error = float((out - ref).norm() / (ref - x).norm())
                assert error < 2e-3, (name, type(module).__name__, error)


def test_norm_quantize_autotuner_tries_each_row_layout_with_each_tile():
    """The GPU's autotuner (not run here) gets every (ROWS, warps) tile in each row layout
    of :data:`ROW_LAYOUTS`, with the kernel's own constexpr names; ``row_layouts`` narrows
    the layouts and restores them."""
    tuner = triton_ops._tuned_norm_quantize(1152, triton_ops.ROW_LAYOUTS)
    tried = {
        (c.kwargs["ROWS"], c.num_warps, c.kwargs["HEAD"], c.kwargs["TAIL"]) for c in tuner.configs
    }
    tiles = triton_ops.NORM_QUANTIZE_TILES
    assert tried == {(r, w, 2048, 0) for r, w in tiles} | {(r, w, 1024, 128) for r, w in tiles}
    kernel_args = set(triton_ops._norm_quantize_kernel.arg_names)
    assert all(set(c.kwargs) <= kernel_args for c in tuner.configs)
    with triton_ops.row_layouts(True):
        assert triton_ops.ROW_LAYOUTS == (True,)
    assert triton_ops.ROW_LAYOUTS == (False, True)


def test_norm_quantize_takes_modulations_of_any_layout():
    """shift and scale whose channels are not contiguous (a transposed table) give the
    codes of their contiguous copies."""
    x, shift, scale = modulated_norm_case()
    static = torch.tensor([0.05, 7.0])
    transposed = [t.t().contiguous().t() for t in (shift, scale)]
    assert transposed[0].stride(-1) != 1
    args = (1e-6, None, static, 0, 255, False, False)
    expected = triton_ops.norm_quantize(x, shift.contiguous(), scale.contiguous(), *args)
    ours = triton_ops.norm_quantize(x, *transposed, *args)
    for tensor, reference in zip(ours, expected, strict=True):
        torch.testing.assert_close(tensor, reference, rtol=0, atol=0)


def test_blocks_kernel_paths_compile_with_inductor():
    """``torch.compile`` (Inductor) of a converted block's fused branches, as ``ditq bench``
    and ``ditq sample --compile`` run them: the custom ops' schemas must lower (an op that
    declares a mutated argument did not), and the compiled branches give the eager ones."""
    import copy

    from ditq.eval.speed import denoiser_inputs, quantize_random
    from ditq.kernels import convert_model
    from ditq.methods import RTNConfig

    from conftest import tiny_dit

    model = tiny_dit()
    inputs = denoiser_inputs(model, 2, "cpu", torch.float32)
    quantize_random(model, RTNConfig(wbits=8, abits=8), inputs)  # asymmetric: code sums
    block = convert_model(copy.deepcopy(model)).blocks[0]
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, model.config.hidden_size, generator=generator)
    shift, scale, gate = torch.randn(2, 3 * model.config.hidden_size, generator=generator).chunk(
        3, 1
    )
    with torch.no_grad():
        for module, norm in ((block.attn, block.norm1), (block.mlp, block.norm2)):
            eager = module.norm_branch(x, norm.eps, shift, scale, gate)
            compiled = torch.compile(module.norm_branch)(x, norm.eps, shift, scale, gate)
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fc2_symmetric", [False, True], ids=["fc2-zero-points", "fc2-symmetric"])
def test_fc1_epilogue_adds_up_fc2s_code_sums(fc2_symmetric, gemm_schedule):
    """Where fc2's weights have zero points its input's code sums are needed: fc1's epilogue
    adds them up as it writes the codes (one atomic add per row and tile), equal to the
    codes' row sums; none where fc2's weights are symmetric."""
    from ditq.kernels import convert_model

    mlp, _, x = fused_mlp_case(QuantSpec(8, fc2_symmetric, PerChannel()), fc2_scale=True)
    convert_model(mlp)
    rows = x.reshape(-1, 64)
    activation = mlp.fc1._quantize_cuda(rows)
    codes, sums = mlp.fc1._next_layer_codes(activation, None, rows.dtype, mlp.fc2)
    assert codes.dtype == torch.int8 and codes.shape == (15, 128)
    if fc2_symmetric:
        assert sums is None
    else:
        torch.testing.assert_close(sums, codes.sum(1, dtype=torch.int32), rtol=0, atol=0)
        assert int(sums.abs().max()) > 0


@triton.jit
def _quotient_kernel(x_ptr, d_ptr, out_ptr, N: tl.constexpr):
    """Row r of x divided by d[r] with ``_quotient`` (one divisor per row, as a scale)."""
    row = tl.program_id(0)
    offs = row * N + tl.arange(0, N)
    out = triton_ops._quotient(tl.load(x_ptr + offs), tl.load(d_ptr + row))
    tl.store(out_ptr + offs, out)


def test_quotient_is_the_correctly_rounded_division():
    """``_quotient`` (a reciprocal and an FMA correction) equals IEEE fp32 division bit for
    bit: random quotients over many binades, and quotients next to the half-integers where
    a code's rounding turns."""
    generator = torch.Generator().manual_seed(7)
    rows, N = 64, 256
    d = torch.exp2(torch.empty(rows).uniform_(-12, 4, generator=generator)).float()
    d = d * (1 + torch.rand(rows, generator=generator))
    spread = torch.randn(rows, N // 2, generator=generator) * torch.exp2(
        torch.empty(rows, N // 2).uniform_(-6, 10, generator=generator)
    )
    halves = torch.randint(-300, 300, (rows, N // 2), generator=generator) + 0.5
    near_ties = halves.double() * d.double()[:, None]
    x = torch.cat([spread * d[:, None], near_ties.float()], 1).contiguous()
    out = torch.empty_like(x)
    _quotient_kernel[(rows,)](x, d, out, N)
    expected = x / d[:, None]
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


def test_absent_inputs_point_at_no_memory():
    """Optional kernel inputs that are absent point at one empty tensor per device: no
    allocation per argument and call (host time), and no memory in a CUDA graph's pool,
    where ``torch.compile``'s CUDA graphs refuse a tensor that outlives the capture (on an
    H100 the first graphed quantized model of a process failed with a one-element one).
    A kernel that read it would dereference a null pointer (the interpreter crashes), and
    the kernel tests run every path with absent inputs."""
    x = torch.randn(8, 64)
    placeholder = triton_ops._placeholder(x)
    assert placeholder is triton_ops._placeholder(torch.zeros(3))
    assert placeholder.numel() == 0 and placeholder.untyped_storage().nbytes() == 0
    codes, scale, zero, _ = triton_ops.quantize_act(
        x, None, torch.tensor([0.05, 3.0]), 0, 255, False
    )
    expected = (x / 0.05).round().add(3.0).clamp(0, 255) - 128
    torch.testing.assert_close(codes.float(), expected, rtol=0, atol=0)


def test_autotuners_zero_what_the_kernels_accumulate_before_every_trial():
    """Triton's autotuner times every candidate configuration on the call's own arguments,
    many runs each: an output that a kernel adds to atomically must be zeroed before each
    run and before the real one, or a shape's first call returns the sum of all the trials
    (fc2's code sums, fc1's epilogue: relative error 1.36 on an H100; the interpreter does
    not autotune)."""
    import inspect
    import re

    source = inspect.getsource(triton_ops)
    accumulated = set(re.findall(r"tl\.atomic_\w+\((\w+)", source))
    assert accumulated == {"nsum_ptr"}  # a new one needs its autotuners' reset_to_zero
    for tuner in triton_ops._TUNED_INT_GEMM.values():
        sums = torch.arange(1, 6, dtype=torch.int32)
        tuner.pre_hook({"nsum_ptr": sums}, reset_only=True)
        assert not sums.any()


def _gptq_lazy_batch(rows: int, width: int, spec: QuantSpec, seed: int):
    """A lazy batch's operands: weights, the upper factor of a damped inverse Hessian,
    per-row steps (zero points on the grid) of column groups of 8."""
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(rows, width, generator=generator)
    mix = torch.randn(3 * width, width, generator=generator)
    hessian = mix.T @ mix / len(mix) + 0.01 * torch.eye(width)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    groups = torch.arange(width) // 8
    step = 0.05 + 0.3 * torch.rand(rows, int(groups[-1]) + 1, generator=generator)
    zero = torch.randint(0, 2**spec.bits, step.shape, generator=generator).float()
    if spec.symmetric or spec.fmt == "fp8_e4m3":
        zero.zero_()
    return block, hinv.contiguous(), step[:, groups].contiguous(), zero[:, groups].contiguous()


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, granularity=PerGroup(8)),
        QuantSpec(bits=3, symmetric=True, granularity=PerChannel()),
        QuantSpec(bits=8, fmt="fp8_e4m3", symmetric=True, granularity=PerChannel()),
    ],
    ids=["int4-asymmetric", "int3-symmetric", "fp8"],
)
@pytest.mark.parametrize("first,last", [(0, 20), (3, 11)])
def test_gptq_columns_kernel_equals_the_torch_loop(spec, first, last):
    """The kernel runs ``solve_columns``'s arithmetic: the same codes, errors and block
    (17 rows: a partial program; 20 columns: a padded tile; a run inside the batch)."""
    from ditq.quant.gptq import LazyBatch, solve_columns

    block, hinv, scale, zero = _gptq_lazy_batch(17, 20, spec, seed=first)
    zeros = torch.zeros_like(block)
    expected = LazyBatch(block.clone(), hinv, scale, zero, zeros.clone(), zeros.clone())
    solve_columns(expected, spec, first, last)
    wide = torch.zeros(17, 25)  # the quantized columns as a view of a wider matrix
    got = LazyBatch(block.clone(), hinv, scale, zero, wide[:, 2:22], zeros.clone())
    triton_ops.gptq_columns(got, spec, first, last)
    for name in ("block", "quantized", "errors"):
        torch.testing.assert_close(
            getattr(got, name), getattr(expected, name), rtol=1e-6, atol=1e-6, msg=name
        )
    assert torch.equal(got.quantized, expected.quantized)  # the same grid values
    assert not wide[:, :2].any() and not wide[:, 22:].any()


@pytest.mark.parametrize("act_order", [False, True], ids=["groups-as-they-come", "act-order"])
def test_gptq_with_the_kernel_equals_gptq_with_the_torch_loop(act_order):
    """Whole GPTQ solves (lazy batches of 16 over 40 columns, groups of 8 fixed as the
    columns come or before the loop) give the same grid values with either inner loop."""
    from ditq.quant.gptq import GPTQSettings, gptq_quantize
    from ditq.quant.quantizer import Quantizer

    generator = torch.Generator().manual_seed(5)
    w = torch.randn(24, 40, generator=generator)
    x = torch.randn(200, 40, generator=generator) @ torch.randn(40, 40, generator=generator)
    hessian = 2 * x.T @ x / len(x)
    settings = GPTQSettings(block_size=16, act_order=act_order)
    solved = {}
    for name, solve in (("torch", None), ("kernel", triton_ops.gptq_columns)):
        quantizer = Quantizer(QuantSpec(bits=4, granularity=PerGroup(8)))
        quantizer.find_params(w)
        extra = () if solve is None else (solve,)
        solved[name] = gptq_quantize(w, hessian, quantizer, settings, *extra)
    assert torch.equal(solved["kernel"], solved["torch"])
