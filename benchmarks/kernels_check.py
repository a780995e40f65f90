"""GPU check of the ``cuda`` backend against the simulated (fake-quant) model.

    python benchmarks/kernels_check.py OUT.json [--only PART,PART]

For each format: random layers of DiT-XL/2 sizes (and the same with DiTAS' online input
scale and rank-32 low-rank branch), then whole models (a tiny random DiT, and the testbed
when ``../shared/models/dit_s2_cifar10.pt`` exists; for static int formats also with the
unfused MLP of ``convert_model(..., fuse_mlp=False)``), comparing the real kernels (BF16)
with the simulated layer (fp32) on the same inputs: relative error ‖out − ref‖ / ‖ref‖
and a NaN check, with the allocator's memory poisoned with NaN first so that an output
the kernel forgets to write shows up. Also the ``model.safetensors`` sizes of DiT-XL/2
(random weights, RTN) at W8 and W4 next to FP32 and BF16. Quantized attention (the fused
kernel) on DiT-XL/2-shaped q, k, v and in whole models. FP8 layers through each of
``fp8_gemm``'s two paths (the Triton kernel and ``torch._scaled_mm``) whichever would be
measured faster; whole FP8 models (static: with the fused MLP) on the measured choice. A
failing check is recorded and the script goes on; the table is printed last and everything
is written to OUT.json (rewritten after every row: a run stopped early keeps its rows).
``--only`` keeps the checks whose name and format contain one of the PARTs (a quick check
of the kernels a run is about to use, e.g. ``--only attention``). For the formats with
dynamic int activation ranges, the activation kernel's codes against its torch twin's, code
by code, and the GEMM alone on the twin's codes (``--only codes``; RESULTS.md, "The W4A4
layers' kernel-check error"); then the same quantization compiled by Inductor against
eager, with Inductor's default division, with correctly rounded division, and with that and
eager's BF16 casts (``--only compiled``)."""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

import ditq
from ditq import load_model
from ditq.eval.speed import denoiser_inputs, quantize_random
from ditq.kernels import FusedQuantMlp, RealQuantLinear, convert_model, triton_ops
from ditq.kernels.attention import FusedQuantAttention
from ditq.kernels.linear import layer_kind, quantize_activation
from ditq.methods import RTNConfig
from ditq.models.adapter import MATMUL_POINTS, explicit_attention
from ditq.models.dit import DiT, DiTConfig, config_for
from ditq.pipeline.checkpoint import WEIGHTS
from ditq.quant.layers import QuantLinear
from ditq.quant.quantizer import Quantizer


def svdquant_w4a4(a_group_size: int = 64, a_symmetric: bool = True) -> dict:
    """SVDQuant's layout: 4-bit symmetric weights in groups of 64, 4-bit dynamic activations
    per token and group of ``a_group_size`` input channels."""
    return dict(
        wbits=4,
        abits=4,
        w_symmetric=True,
        w_granularity="group",
        w_group_size=64,
        a_symmetric=a_symmetric,
        a_granularity="group",
        a_group_size=a_group_size,
        a_dynamic=True,
    )


FORMATS = {
    "w8a8-int-static-asym": dict(wbits=8, abits=8),
    "w8a8-int-static-sym": dict(wbits=8, abits=8, w_symmetric=True, a_symmetric=True),
    "w8a8-int-dynamic-token": dict(wbits=8, abits=8, a_granularity="token", a_dynamic=True),
    "w8a8-int-dynamic-tensor": dict(wbits=8, abits=8, a_dynamic=True),
    "w8a8-fp8-token": dict(
        wbits=8, abits=8, w_fmt="fp8_e4m3", a_fmt="fp8_e4m3", a_granularity="token", a_dynamic=True
    ),
    "w8a8-fp8-static": dict(wbits=8, abits=8, w_fmt="fp8_e4m3", a_fmt="fp8_e4m3"),
    "w4a8-group128-sym": dict(wbits=4, abits=8, w_symmetric=True, w_granularity="group"),
    "w4a8-group128-asym": dict(wbits=4, abits=8, w_granularity="group"),
    "w4a8-channel": dict(wbits=4, abits=8),
    "w4a8-channel-fp8-static": dict(wbits=4, abits=8, a_fmt="fp8_e4m3"),
    "w4a8-ditas-colgroup": dict(
        wbits=4, abits=8, w_granularity="column_group_strided", w_group_size=32, a_dynamic=True
    ),
    "w4a16-group128": dict(wbits=4, abits=16, w_symmetric=True, w_granularity="group"),
    "w8a16-channel": dict(wbits=8, abits=16),
    "w4a4-groups64-sym": svdquant_w4a4(),
    "w4a4-groups64-asym-act": svdquant_w4a4(a_symmetric=False),  # --no-a-symmetric
    # the CPU diagnostic's best SVDQuant (with rank 64): activation groups of 32
    "w4a4-wgroups64-agroups32-asym": svdquant_w4a4(a_group_size=32, a_symmetric=False),
    "w4a8-channel-agroups64-asym": dict(
        wbits=4, abits=8, a_granularity="group", a_group_size=64, a_dynamic=True
    ),
}
FP8_FORMATS = tuple(name for name in FORMATS if "fp8" in name)
PER_TILE_FORMATS = ("w4a4-groups64-sym", "w4a8-channel-agroups64-asym")
"""Formats also checked with each grouped GEMM tile alone: the third lease's W4A4 layer
error (1.4e-2) was eight times these 8-bit-activation groups' (1.8e-3) on the GPU, while
the Triton interpreter gives both 3.3e-3 at the same shape (the reference's step sizes on
CUDA: RESULTS.md, "The W4A4 layers' kernel-check error")."""


def _layer_kind(config: dict) -> str:
    """The cuda backend's kind (``layer_kind``) of a layer quantized with ``config``."""
    rtn = RTNConfig(**config)
    linear = torch.nn.Linear(128, 128)
    return layer_kind(QuantLinear.from_linear(linear, rtn.weight_spec(), rtn.act_spec()))


DYNAMIC_INT_FORMATS = tuple(
    name
    for name, config in FORMATS.items()
    if config.get("a_dynamic") and _layer_kind(config) == "int"
)
"""Formats whose activation codes the Triton kernels compute from dynamic ranges for the
int8 GEMM: checked against the torch twin code by code."""
UNFUSED_MLP_FORMATS = ("w8a8-int-static-asym", "w8a8-int-static-sym", "w4a8-group128-asym")
"""Formats whose MLPs ``convert_model`` fuses (static int inputs): also checked unfused."""
INT4_FORMATS = tuple(name for name, config in FORMATS.items() if config["wbits"] == 4)
"""Formats also checked with the int4 weights read packed by the GEMM (``int4_in_kernel``)."""
ATTENTION_FORMATS = {
    "w8a8-attn8-static-asym": dict(wbits=8, abits=8, attn_bits=8),
    "w8a8-attn8-static-sym": dict(wbits=8, abits=8, attn_bits=8, a_symmetric=True),
    "w8a8-attn8-dynamic": dict(wbits=8, abits=8, attn_bits=8, a_dynamic=True),
}
"""Whole models with quantized attention matmuls (PTQ4DiT's ``--attn-bits 8``): the fused
attention kernel; the same specs on DiT-XL/2-shaped q, k, v alone."""
XL_LAYERS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
TOKENS = 2 * 256  # one guided DiT-XL/2 256 px sample


def poison(device: str) -> None:
    """Fill free allocator memory with NaN so that unwritten outputs are caught."""
    if not device.startswith("cuda"):
        return
    free = torch.cuda.mem_get_info(device)[0]
    block = torch.full((min(free // 8, 2**30) // 4,), float("nan"), device=device)
    del block


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.float(), ref.float()
    return {
        "rel_error": float((out - ref).norm() / ref.norm()),
        "nan": bool(torch.isnan(out).any()),
    }


@torch.no_grad()
def random_layer(
    fmt: str, size: tuple[int, int], ditas: bool, device: str
) -> tuple[QuantLinear, torch.Tensor]:
    """A packed simulated layer of ``fmt`` and (K, N) ``size`` with random weights
    (``ditas``: with an online input scale and a rank-32 branch), calibrated on its random
    input of :data:`TOKENS` rows, and that input in BF16."""
    config = RTNConfig(**FORMATS[fmt])
    K, N = size
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N).to(device)
    layer = QuantLinear.from_linear(linear, config.weight_spec(), config.act_spec())
    x = torch.randn(TOKENS, K, device=device) * (1 + 3 * torch.rand(K, device=device))
    if ditas:
        layer.input_scale = 0.5 + torch.rand(K, device=device)
        layer.set_lowrank(
            0.02 * torch.randn(N, 32, device=device), 0.02 * torch.randn(32, K, device=device)
        )
    layer.calibrate_weight()
    if layer.act_quantizer.spec.needs_calibration:
        scaled = x if layer.input_scale is None else x / layer.input_scale
        layer.act_quantizer.find_params(scaled)
    layer.pack()
    return layer, x.bfloat16()


def simulated_reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The simulated layer in fp32 on the kernels' BF16 input ``x``, its online input scale
    divided in BF16 first, as the simulated layer divides it in BF16 sampling (in the input's
    dtype) and as the kernels do: quantizing an fp32 ``x / s`` instead puts the values that
    BF16 rounds across a level boundary on the other level (RESULTS.md, "PTQ4DiT and DiTAS at
    W4A4")."""
    scale = layer.input_scale
    if scale is None:
        return layer(x.float())
    layer.input_scale = None
    try:
        return layer((x / scale.to(x.dtype)).float())
    finally:
        layer.input_scale = scale


@torch.no_grad()
def check_layer(fmt: str, size: tuple[int, int], ditas: bool, device: str) -> dict:
    layer, x = random_layer(fmt, size, ditas, device)
    ref = simulated_reference(layer, x)
    real = RealQuantLinear.from_quant_linear(layer)
    poison(device)
    out = real(x)
    return {"kind": real.kind, **rel_error(out, ref)}


def torch_twin(real: RealQuantLinear, rows: torch.Tensor) -> tuple:
    """``real``'s activation quantization by its torch twin (``quantize_activation``: the
    simulated quantizer's arithmetic, which compiled models run): codes, scales, ..."""
    return quantize_activation(
        rows, real.act, real.input_scale, real.static_qparams, code_sums=real.needs_code_sums
    )


@torch.no_grad()
def check_codes(fmt: str, size: tuple[int, int], device: str) -> dict:
    """The activation quantization kernel alone against its torch twin
    (``quantize_activation``: the simulated quantizer's arithmetic, which compiled models
    run) on the same BF16 input: the share of codes that differ, the largest difference,
    the largest relative difference of the scales; then the GEMM alone, given the twin's
    codes, against the simulated layer (``rel_error``). Where ``check_layer``'s error is
    larger than this one, the difference is in the codes."""
    layer, x = random_layer(fmt, size, False, device)
    real = RealQuantLinear.from_quant_linear(layer)
    kernel, twin = real._quantize_cuda(x), torch_twin(real, x)
    code_difference = (kernel[0].int() - twin[0].int()).abs()
    poison(device)
    out = real._gemm(twin, None, x.dtype)
    return {
        "kind": real.kind,
        "codes_differing": float((code_difference > 0).float().mean()),
        "largest_code_difference": int(code_difference.max()),
        "scale_rel_difference": float(((kernel[1] - twin[1]).abs() / twin[1]).max()),
        **rel_error(out, simulated_reference(layer, x)),
    }


COMPILE_NUMERICS = ("default", "division", "division+casts")
"""Inductor's settings for ``check_compiled_codes``: its defaults, correctly rounded fp32
division in its Triton code, and that with BF16 intermediates rounded as eager rounds them."""


def inductor_numerics(numerics: str):
    """A patch of Inductor's configuration for one of :data:`COMPILE_NUMERICS`, under this
    torch's names (``eager_numerics.division_rounding`` from about 2.11,
    ``emulate_divison_rounding`` before)."""
    config = torch._inductor.config
    division = numerics.startswith("division")
    name = "eager_numerics.division_rounding"
    if not hasattr(config, "eager_numerics"):
        name = "emulate_divison_rounding"
    return config.patch({name: division, "emulate_precision_casts": numerics.endswith("casts")})


@torch.no_grad()
def check_compiled_codes(fmt: str, size: tuple[int, int], device: str, numerics: str) -> dict:
    """The activation quantization as ``--compile`` runs it, compiled by Inductor with
    ``numerics`` (:data:`COMPILE_NUMERICS`), against the same code run eagerly on the same
    device and BF16 input: the real layer's torch twin (``quantize_activation``: its codes)
    and the simulated quantizer (its fake-quantized BF16 output, ``rel_error``). Codes that
    differ are values that compiled sampling puts on another level than eager sampling."""
    layer, x = random_layer(fmt, size, False, device)
    real = RealQuantLinear.from_quant_linear(layer)

    def codes(rows: torch.Tensor) -> torch.Tensor:
        return torch_twin(real, rows)[0]

    torch._dynamo.reset()
    with inductor_numerics(numerics):
        compiled_codes = torch.compile(codes)(x)
        compiled_fake = torch.compile(layer.act_quantizer)(x)
    torch._dynamo.reset()
    code_difference = (compiled_codes.int() - codes(x).int()).abs()
    return {
        "kind": real.kind,
        "numerics": numerics,
        "codes_differing": float((code_difference > 0).float().mean()),
        "largest_code_difference": int(code_difference.max()),
        **rel_error(compiled_fake.float(), layer.act_quantizer(x).float()),
    }


@torch.no_grad()
def check_model(
    fmt: str, base: DiT, device: str, fuse_mlp: bool = True, int4_in_kernel: bool = False
) -> dict:
    simulated = quantize_random(
        _copy(base, device),
        RTNConfig(**{**FORMATS, **ATTENTION_FORMATS}[fmt]),
        denoiser_inputs(base, 2, device, torch.float32),
    )
    inputs = denoiser_inputs(base, 4, device, torch.float32)
    ref = simulated(inputs[0].bfloat16().float(), *inputs[1:])
    real = convert_model(_copy(simulated, device), fuse_mlp, int4_in_kernel).to(torch.bfloat16)
    poison(device)
    out = real(inputs[0].bfloat16(), *inputs[1:])
    kinds = sorted({m.kind for m in real.modules() if isinstance(m, RealQuantLinear)})
    if any(isinstance(m, FusedQuantMlp) for m in real.modules()):
        kinds.append("fused-mlp")
    if any(isinstance(m, FusedQuantAttention) for m in real.modules()):
        kinds.append("fused-attention")
    return {"kind": ",".join(kinds), **rel_error(out, ref)}


@torch.no_grad()
def check_attention(fmt: str, device: str, masked: bool = False) -> dict:
    """The fused kernel on DiT-XL/2 256 px attention inputs (4 guided samples, 16 heads,
    256 tokens, head dim 72) against the simulated explicit matmuls in fp32; ``masked``:
    with an additive per-key mask (-10000 on each sample's last 8·i keys, as diffusers'
    cross-attention pads its text tokens)."""
    spec = RTNConfig(**ATTENTION_FORMATS[fmt]).attention_spec()
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 16, 256, 72, device=device) * s for s in (1.0, 3.0, 0.5))
    q, k, v = (x.bfloat16().float() for x in (q, k, v))
    attn = SimpleNamespace(**{point: Quantizer(spec).to(device) for point in MATMUL_POINTS})
    if not spec.dynamic:
        for point, x in zip(MATMUL_POINTS[:3], (q, k, v), strict=True):
            getattr(attn, point).find_params(x)
        attn.attn_act.find_params(((q * 72**-0.5) @ k.transpose(-2, -1)).softmax(-1))
    mask = None
    if masked:
        mask = torch.zeros(8, 1, 1, 256, device=device)
        for i in range(8):
            mask[i, ..., 256 - 8 * i :] = -10000.0
    ref = explicit_attention(attn, q, k, v, 72**-0.5, mask)
    attn.fused_matmuls = FusedQuantAttention([getattr(attn, p) for p in MATMUL_POINTS])
    poison(device)
    low = (x.bfloat16() for x in (q, k, v))
    out = explicit_attention(attn, *low, 72**-0.5, None if mask is None else mask.bfloat16())
    return {"kind": "attention", **rel_error(out, ref)}


def with_attention_tiles(path: str, index: int, check) -> dict:
    """``check()`` with the attention kernels of ``path`` fixed to their ``index``-th tile
    configuration (a one-configuration autotuner, which does not benchmark): a
    configuration that computes wrong results must not hide behind the autotuner's
    choice."""
    tuners = (
        [triton_ops._TUNED_ONE_PASS]
        if path.startswith("one-pass")
        else list(triton_ops._TUNED_ATTENTION)
    )
    saved = [tuner.configs for tuner in tuners]
    try:
        for tuner in tuners:
            tuner.configs = [tuner.configs[index]]
        return {"tiles": str(tuners[0].configs[0]), **check()}
    finally:
        for tuner, configs in zip(tuners, saved, strict=True):
            tuner.configs = configs


def attention_paths(fmt: str) -> tuple[bool, list[str]]:
    """Whether ``fmt``'s P range is static, and the attention paths it can take."""
    static = not RTNConfig(**ATTENTION_FORMATS[fmt]).attention_spec().dynamic
    passes = ("one-pass", "two-pass") if static else ("two-pass",)
    return static, [f"{p}{codes}" for p in passes for codes in ("", f" {triton_ops.TILE_CODES}")]


def with_grouped_tiles(tiles: tuple[int, ...], check) -> dict:
    """``check()`` with the grouped-weight GEMM fixed to one tile configuration."""
    with triton_ops.fixed_tiles(tiles, grouped=True):
        return check()


def _copy(model: torch.nn.Module, device: str) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(device)


def checkpoint_sizes(device: str) -> dict:
    """Bytes of model.safetensors for DiT-XL/2 (random weights) at FP32, BF16, W8, W4."""
    sizes = {}
    torch.manual_seed(0)
    base = DiT(config_for("DiT-XL/2", input_size=32)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            path = Path(tmp) / f"{name}.safetensors"
            save_file({k: v.to(dtype).contiguous() for k, v in base.state_dict().items()}, path)
            sizes[name] = path.stat().st_size
        for name, bits in (("w8a8-rtn", 8), ("w4a8-rtn-group128", 4)):
            granularity = "group" if bits == 4 else "channel"
            config = RTNConfig(wbits=bits, abits=8, w_granularity=granularity, a_dynamic=True)
            model = quantize_random(_copy(base, device), config, ())
            out = ditq.save(model.cpu(), Path(tmp) / name)
            sizes[name] = (out / WEIGHTS).stat().st_size
    return sizes


def main(out_path: str, only: list[str]) -> None:
    device = "cuda"
    rows: list[dict] = []
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["rows"] = rows

    def write() -> None:  # after every row: a run stopped early keeps what it checked
        Path(out_path).write_text(json.dumps(results, indent=2) + "\n")

    def record(check: str, fmt: str, fn) -> None:
        if only and not any(part in f"{check} {fmt}" for part in only):
            return
        try:
            row = {"check": check, "format": fmt, **fn()}
        except Exception as err:  # noqa: BLE001 - recorded, the script goes on
            traceback.print_exc()
            row = {"check": check, "format": fmt, "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        write()
        print(json.dumps(row), flush=True)

    # first the fused attention, which the cuda backend's PTQ4DiT sampling runs
    for fmt in ATTENTION_FORMATS:  # each path, not the faster one
        static, paths = attention_paths(fmt)
        for path in paths:
            for masked in (False, True):
                triton_ops.ATTENTION_CHOICE[256, 256, 72, masked, static] = path
                record(
                    f"XL attention (8, 16, 256, 72){' key mask' if masked else ''} {path}",
                    fmt,
                    lambda f=fmt, m=masked: check_attention(f, device, m),
                )
    triton_ops.ATTENTION_CHOICE.clear()
    for fmt in FORMATS:
        for name, size in XL_LAYERS.items():
            record(f"XL {name} {size}", fmt, lambda f=fmt, s=size: check_layer(f, s, False, device))
        record(
            "XL fc2 +input_scale +lowrank32",
            fmt,
            lambda f=fmt: check_layer(f, (4608, 1152), True, device),
        )
    for fmt in DYNAMIC_INT_FORMATS:  # the activation kernel's codes, then the GEMM alone
        record(
            "XL proj (1152, 1152) codes vs torch",
            fmt,
            lambda f=fmt: check_codes(f, (1152, 1152), device),
        )
        for numerics in COMPILE_NUMERICS:  # Inductor's arithmetic against eager's
            record(
                f"XL proj (1152, 1152) compiled codes, {numerics} numerics",
                fmt,
                lambda f=fmt, n=numerics: check_compiled_codes(f, (1152, 1152), device, n),
            )
    for fmt in FP8_FORMATS:
        for path in ("triton", "cublas"):
            for name, (K, N) in XL_LAYERS.items():
                triton_ops.FP8_GEMM_CHOICE[TOKENS, N, K, ""] = path  # this path, not the faster
                record(
                    f"XL {name} ({K}, {N}) fp8 via {path}",
                    fmt,
                    lambda f=fmt, s=(K, N): check_layer(f, s, False, device),
                )
        triton_ops.FP8_GEMM_CHOICE.clear()
    for fmt in PER_TILE_FORMATS:  # the W4A4 rows' error, one grouped tile at a time
        for tiles in triton_ops.TUNED_TILES["grouped"]:
            record(
                f"XL proj (1152, 1152) tile {tiles}",
                fmt,
                lambda f=fmt, t=tiles: with_grouped_tiles(
                    t, lambda: check_layer(f, (1152, 1152), False, device)
                ),
            )
    torch.manual_seed(0)  # the same random tiny model whatever checks ran before
    models = {
        "tiny": DiT(DiTConfig(depth=2, hidden_size=256, num_heads=4, input_size=8, in_channels=4))
    }
    testbed = Path(__file__).resolve().parents[2] / "shared" / "models" / "dit_s2_cifar10.pt"
    if testbed.is_file():
        models["testbed"] = load_model(testbed, progress=False)
    for name, base in models.items():
        base.eval()
        for fmt in FORMATS:
            record(f"model {name}", fmt, lambda f=fmt, b=base: check_model(f, b, device))
        for fmt in ATTENTION_FORMATS:
            record(f"model {name}", fmt, lambda f=fmt, b=base: check_model(f, b, device))
        for fmt in UNFUSED_MLP_FORMATS:
            record(
                f"model {name} unfused MLP",
                fmt,
                lambda f=fmt, b=base: check_model(f, b, device, fuse_mlp=False),
            )
        for fmt in INT4_FORMATS:
            record(
                f"model {name} int4 in kernel",
                fmt,
                lambda f=fmt, b=base: check_model(f, b, device, int4_in_kernel=True),
            )
    try:
        results["checkpoint_bytes_dit_xl2_256"] = {} if only else checkpoint_sizes(device)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        results["checkpoint_bytes_dit_xl2_256"] = {"error": f"{type(err).__name__}: {err}"}
    write()
    # last (a faulting configuration ends the CUDA context): every tile configuration of
    # each attention path, unmasked
    for fmt in ATTENTION_FORMATS:
        static, paths = attention_paths(fmt)
        for path in paths:
            triton_ops.ATTENTION_CHOICE[256, 256, 72, False, static] = path
            tuner = triton_ops._TUNED_ONE_PASS if path.startswith("one-pass") else None
            count = len((tuner or triton_ops._TUNED_ATTENTION[0]).configs)
            for index in range(count):
                record(
                    f"XL attention (8, 16, 256, 72) {path} tile {index}",
                    fmt,
                    lambda f=fmt, p=path, i=index: with_attention_tiles(
                        p, i, lambda: check_attention(f, device)
                    ),
                )
    triton_ops.ATTENTION_CHOICE.clear()
    print(f"\n{'check':<34} {'format':<26} {'kind':<14} {'rel.err':>9} nan  codes differing")
    for r in rows:
        if "error" in r:
            print(f"{r['check']:<34} {r['format']:<26} ERROR {r['error'][:60]}")
        else:
            error = f"{r['rel_error']:9.2e} {r['nan']!s:<5}"
            if "codes_differing" in r:  # the share, and the largest difference in levels
                error += f" {r['codes_differing']:.2e} (at most {r['largest_code_difference']})"
            print(f"{r['check']:<34} {r['format']:<26} {r['kind']:<14} {error}")
    for name, size in results["checkpoint_bytes_dit_xl2_256"].items():
        shown = size if isinstance(size, str) else f"{size / 1e6:.1f} MB"
        print(f"DiT-XL/2 model.safetensors {name}: {shown}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 4) or (len(sys.argv) == 4 and sys.argv[2] != "--only"):
        sys.exit("usage: python benchmarks/kernels_check.py OUT.json [--only PART,PART]")
    main(sys.argv[1], sys.argv[3].split(",") if len(sys.argv) == 4 else [])
