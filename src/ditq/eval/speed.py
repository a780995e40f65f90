"""Speed and memory of BF16 and low-bit DiTs: the library half of ``ditq bench``.

Shapes are official architectures at an image size (``DiT-XL/2@256``: latent 32×32×4,
random weights) or checkpoints. Every batch size runs with guidance (the denoiser sees
twice the batch). Variants (``VARIANTS``): BF16 eager and ``torch.compile``d (the baseline
of every ratio, measured in the same process), the simulated W8A8 model, the real-kernel
formats of ``ditq.kernels`` and torchao's int8-dynamic and float8 row-wise configurations
when torchao imports, and a directory written by ``ditq quantize`` as saved
(``quantized``). Quantized variants use round to nearest (per-channel or group-128
weights; static ranges from one forward of random latents), the layers of every block;
compiled variants compile each block (regional compilation).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ditq.api import quantize
from ditq.calib.dataset import CalibrationSet
from ditq.diffusion.pipeline import SamplingSettings, generate
from ditq.errors import DitqError
from ditq.kernels import (
    DEFAULT_COMPILE_SCOPE,
    FusedQuantMlp,
    RealQuantLinear,
    compile_denoiser,
    convert_model,
    triton_ops,
)
from ditq.kernels.attention import FusedQuantAttention
from ditq.methods.rtn import RTNConfig
from ditq.models.adapter import adapter_for
from ditq.models.diffusers_pixart import DiffusersPixArt
from ditq.models.dit import DiT, config_for
from ditq.pipeline.checkpoint import cast_unquantized
from ditq.pipeline.config import LayerSelection
from ditq.quant.layers import QuantLinear

BASELINE = "bf16-compile"
QUANT_CONFIGS: dict[str, dict[str, Any]] = {
    "sim-w8a8": dict(wbits=8, abits=8),
    "w8a8-static": dict(wbits=8, abits=8),
    "w8a8-static-symw": dict(wbits=8, abits=8, w_symmetric=True),
    "w8a8-attn8": dict(wbits=8, abits=8, w_symmetric=True, attn_bits=8),
    "w8a8-dynamic": dict(
        wbits=8, abits=8, w_symmetric=True, a_symmetric=True, a_granularity="token", a_dynamic=True
    ),
    "w8a8-fp8": dict(
        wbits=8, abits=8, w_fmt="fp8_e4m3", a_fmt="fp8_e4m3", a_granularity="token", a_dynamic=True
    ),
    "w8a8-fp8-static": dict(wbits=8, abits=8, w_fmt="fp8_e4m3", a_fmt="fp8_e4m3"),
    "w4a8": dict(wbits=4, abits=8, w_symmetric=True, w_granularity="group"),
    "w4a8-channel": dict(wbits=4, abits=8),
    "w4a8-fp8": dict(wbits=4, abits=8, a_fmt="fp8_e4m3"),
    "w4a8-all": dict(wbits=4, abits=8, layers=LayerSelection(adaln=True, final_layer=True)),
    "w4a16": dict(wbits=4, abits=16, w_symmetric=True, w_granularity="group"),
    "w4a4-groups": dict(
        wbits=4,
        abits=4,
        w_symmetric=True,
        w_granularity="group",
        a_symmetric=True,
        a_granularity="group",
        a_group_size=64,
        a_dynamic=True,
    ),
}
"""RTN configurations of the quantized variants (``w_group_size``: 128, or 32 when 128
does not divide the width). Weights are asymmetric per output channel unless noted
(``symw``: symmetric, which spares the activation code sums), activations 8-bit static
per tensor unless noted, attention matmuls in BF16 (SDPA) except ``w8a8-attn8``'s (8-bit
static, PTQ4DiT's ``--attn-bits 8``: the fused quantized attention kernel);
``w4a8-channel`` is PTQ4DiT's W4A8 layout, ``w4a8`` groups of 128, ``w4a8-fp8`` the
same weights with e4m3 activations (the FP8 GEMM, int4 codes unpacked to e4m3).
Block linears only, except ``w4a8-all``: ``w4a8-channel`` on the adaLN and final linears too
(a third of DiT-XL/2's parameters are adaLN's)."""
TORCHAO = ("torchao-int8dyn", "torchao-fp8row")
AS_QUANTIZED = "quantized"
"""The variant of a ``--model`` directory written by ``ditq quantize``: the model as
quantized, on the device's backend (the real kernels on a GPU, the CPU path otherwise). The
other variants of such a directory run on its float architecture with random weights."""
VARIANTS = ("bf16", BASELINE, *QUANT_CONFIGS, *TORCHAO, AS_QUANTIZED)
NAMED_SHAPES = {"testbed": ("DiT-S/2", {"input_size": 32, "in_channels": 3, "num_classes": 10})}
"""Shapes by name: ``testbed`` is the architecture of ``../shared``'s DiT-S/2 on CIFAR-10
(32×32×3 pixels, patch 2: 256 tokens like DiT-XL/2 at 256 px; 10 classes)."""
DEFAULT_SHAPES = "DiT-XL/2@256,DiT-XL/2@512,testbed"


PIXART = "PixArt-XL/2"
PIXART_PROMPT_TOKENS = 300
"""``PixArt-XL/2@PIXELS``: diffusers' PixArt transformer (28 blocks, width 1152, T5-XXL
captions of 4096 channels, PixArt-Σ's 300 text tokens) with a random prompt table."""
PIXART_OVERRIDES: dict[str, int] = {}
"""Configuration overrides of the PixArt shape (tests shrink it)."""


def pixart_shape_model(pixels: int) -> nn.Module:
    """A random fp32 PixArt-XL/2 for ``pixels`` (latent side pixels / 8) with two random
    prompts (and the empty one) of ``PIXART_PROMPT_TOKENS`` tokens."""
    try:
        from diffusers import PixArtTransformer2DModel
    except ImportError as err:
        raise DitqError(
            f"the {PIXART} shape needs diffusers: pip install 'ditq[diffusers]'"
        ) from err
    torch.manual_seed(0)
    config = {
        "sample_size": pixels // 8,
        "caption_channels": 4096,  # T5-XXL; diffusers' default None builds no caption projection
        "use_additional_conditions": False,
        **PIXART_OVERRIDES,
    }
    transformer = PixArtTransformer2DModel(**config).eval()
    channels = transformer.config.caption_channels
    embeds = torch.randn(3, PIXART_PROMPT_TOKENS, channels) * 0.1
    return DiffusersPixArt(transformer, embeds, torch.ones(3, PIXART_PROMPT_TOKENS)).eval()


def shape_model(shape: str) -> nn.Module:
    """A random fp32 model for ``ARCH@PIXELS`` (latent side PIXELS / 8, 4 channels): an
    official DiT architecture or ``PixArt-XL/2``; or a name of :data:`NAMED_SHAPES`."""
    if shape in NAMED_SHAPES:
        arch, overrides = NAMED_SHAPES[shape]
    else:
        arch, _, pixels = shape.partition("@")
        if not pixels.isdigit() or int(pixels) % 8:
            raise DitqError(
                f"shape {shape!r}: write ARCH@PIXELS with PIXELS a multiple of 8, or one of "
                f"{', '.join(NAMED_SHAPES)}"
            )
        if arch == PIXART:
            return pixart_shape_model(int(pixels))
        overrides = {"input_size": int(pixels) // 8}
    torch.manual_seed(0)
    return DiT(config_for(arch, **overrides)).eval()


def denoiser_inputs(
    model: DiT, batch: int, device: str, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, ...]:
    """Guided inputs of one denoiser call: doubled latents, timesteps, labels + null."""
    config = model.config
    gen = torch.Generator().manual_seed(0)
    size = (batch, config.in_channels, config.input_size, config.input_size)
    x = torch.randn(size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, config.num_classes, (batch,), generator=gen)
    y = torch.cat([y, torch.full_like(y, config.num_classes)])
    return torch.cat([x, x]).to(device, dtype), torch.cat([t, t]).to(device), y.to(device)


@torch.no_grad()
def quantize_random(model: DiT, config: RTNConfig, example: tuple[torch.Tensor, ...]) -> DiT:
    """RTN-quantize ``model`` in place through the pipeline (:func:`ditq.quantize`); static
    activation ranges are the min/max of each layer's input on the denoiser inputs
    ``example`` = (x, t, y), a one-step calibration set (for timing and kernel checks;
    empty for dynamic activations)."""
    if not example:  # dynamic activations: no ranges to calibrate
        return quantize(model, config, progress=False)
    x, t, y = (v.cpu() for v in example)
    calib = CalibrationSet(x.float(), t, y, torch.zeros(len(x), dtype=torch.long))
    return quantize(model, config, calib, batch_size=len(x), progress=False)


def quant_config(variant: str, hidden: int) -> RTNConfig:
    """The variant's configuration; weight groups of 128 where the width allows, else 32,
    or the activation group where the weight group is not a multiple of it."""
    settings = QUANT_CONFIGS[variant]
    group = 128 if hidden % 128 == 0 else 32
    if group % settings.get("a_group_size", group):
        group = settings["a_group_size"]
    return RTNConfig(**settings, w_group_size=group)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; tensor subclasses (torchao's quantized weights) are counted
    through the inner tensors they flatten to, not their logical dtype."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what a checkpoint of this module holds)."""
    return sum(tensor_bytes(t) for t in model.state_dict().values())


def _torchao_apply(model: DiT, variant: str) -> None:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        quantize_,
    )

    config = (
        Int8DynamicActivationInt8WeightConfig()
        if variant == "torchao-int8dyn"
        else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    )
    block_linears = set(adapter_for(model).layer_names(("blocks",)))
    quantize_(model, config, filter_fn=lambda _module, name: name in block_linears)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds quantized layers (a directory written by ``ditq quantize``)."""
    return any(isinstance(m, QuantLinear) for m in model.modules())


def float_architecture(model: nn.Module) -> DiT:
    """A random fp32 DiT of a quantized DiT's architecture: the other variants' base."""
    if not isinstance(model, DiT):
        raise DitqError(
            f"a quantized {type(model).__name__} times as saved only (--variants quantized); "
            "the other variants need its float model (pass its checkpoint with --model)"
        )
    return DiT(model.config)


def _kernel_counts(model: nn.Module) -> dict[str, int]:
    """Layers per real-kernel kind, the fused MLPs and attentions, and the layers whose
    GEMM reads packed int4 weights itself (``int4-in-kernel``)."""
    kinds: Counter[str] = Counter()
    extras = dict.fromkeys(("fused-mlp", "fused-attention", "int4-in-kernel"), 0)
    for module in model.modules():
        if isinstance(module, RealQuantLinear):
            kinds[module.kind] += 1
            extras["int4-in-kernel"] += int(module.unpacks_in_kernel)
        elif isinstance(module, FusedQuantMlp):
            extras["fused-mlp"] += 1
        elif isinstance(module, FusedQuantAttention):
            extras["fused-attention"] += 1
    return dict(kinds) | {name: count for name, count in extras.items() if count}


def build_variant(
    base: DiT,
    variant: str,
    device: str,
    compile_models: bool,
    fuse_mlp: bool = True,
    cuda_graphs: bool = False,
    int4_in_kernel: bool = False,
    compile_scope: str = DEFAULT_COMPILE_SCOPE,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``variant`` (from a copy of the fp32 ``base``: a model written by ``ditq
    quantize`` for :data:`AS_QUANTIZED`, a float one, e.g. its :func:`float_architecture`,
    for the others) and facts about it; compiled per ``compile_scope`` (each block or the
    whole call), replaying CUDA graphs with ``cuda_graphs``."""
    # Every variant compiles its blocks afresh: they share DiTBlock.forward, whose compiled
    # graphs would otherwise pile up to Dynamo's cache limit and leave later variants eager.
    torch._dynamo.reset()
    if (variant == AS_QUANTIZED) != is_quantized(base):
        raise DitqError(
            f"variant {variant!r} times a directory written by ditq quantize (--model RUN)"
            if variant == AS_QUANTIZED
            else f"variant {variant!r} starts from a float model, not a quantized one"
        )
    model = copy.deepcopy(base).to(device)
    info: dict[str, Any] = {
        "compiled": variant == BASELINE or (compile_models and variant != "bf16")
    }
    if variant == AS_QUANTIZED:
        info["disk_bytes"] = state_bytes(model)
        if torch.device(device).type == "cuda":
            convert_model(model, fuse_mlp=fuse_mlp, int4_in_kernel=int4_in_kernel)
            info["kernels"] = _kernel_counts(model)
        cast_unquantized(model, torch.bfloat16)
    elif variant in QUANT_CONFIGS:
        example = tuple(t[:2] for t in denoiser_inputs(model, 1, device, torch.float32))
        quantize_random(model, quant_config(variant, model.config.hidden_size), example)
        info["disk_bytes"] = state_bytes(model)
        if variant != "sim-w8a8":
            convert_model(model, fuse_mlp=fuse_mlp, int4_in_kernel=int4_in_kernel)
            info["kernels"] = _kernel_counts(model)
        cast_unquantized(model, torch.bfloat16)
    else:
        model.to(torch.bfloat16)
        info["disk_bytes"] = state_bytes(model)
        if variant in TORCHAO:
            _torchao_apply(model, variant)
    if info["compiled"]:
        compile_denoiser(model, cuda_graphs, compile_scope)
        info["compile_scope"] = compile_scope
        if cuda_graphs:
            info["cuda_graphs"] = True
    info["memory_bytes"] = state_bytes(model)
    return model, info


SCOPE_LABELS = {"model": ", whole call", "blocks": ", each block"}
"""How a report names a compiled row's scope (:data:`ditq.kernels.COMPILE_SCOPES`)."""


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


WARMUP_TOLERANCE = 0.03
WARMUP_MAX_ROUNDS = 20


def warm_up(call: Callable[[], object], device: str, calls_per_round: int) -> int:
    """Untimed calls until the call time has settled (compilation and every kernel's
    autotuning done): rounds of ``calls_per_round`` calls until a round's median time is
    within ``WARMUP_TOLERANCE`` of the previous round's, at most ``WARMUP_MAX_ROUNDS``
    rounds. Returns the number of calls made (0 when ``calls_per_round`` is 0)."""
    previous, calls = None, 0
    for _ in range(WARMUP_MAX_ROUNDS if calls_per_round else 0):
        times = []
        for _ in range(calls_per_round):
            start = time.perf_counter()
            call()
            synchronize(device)
            times.append(time.perf_counter() - start)
        calls += calls_per_round
        median = statistics.median(times)
        if previous is not None and abs(median - previous) <= WARMUP_TOLERANCE * previous:
            break
        previous = median
    return calls


@torch.no_grad()
def time_calls(model: DiT, inputs: tuple, device: str, iters: int, warmup: int) -> dict:
    """Median and spread of per-call latency (CUDA events on GPU), first call separately,
    after :func:`warm_up` in rounds of ``warmup`` calls; on the GPU also the median host
    time of a call (until it returns, launches queued): a call whose host time reaches its
    latency is bound by the CPU, which CUDA graphs remove."""
    call = lambda: model.forward_with_cfg(*inputs, cfg_scale=1.5)  # noqa: E731
    start = time.perf_counter()
    call()
    synchronize(device)
    first = time.perf_counter() - start
    warmup_calls = warm_up(call, device, warmup)
    times, host = [], []
    cuda = torch.device(device).type == "cuda"
    for _ in range(iters):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            begin_s = time.perf_counter()
            call()
            host.append((time.perf_counter() - begin_s) * 1000)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            begin_s = time.perf_counter()
            call()
            times.append((time.perf_counter() - begin_s) * 1000)
    times.sort()
    return {
        "latency_ms": statistics.median(times),
        "latency_p10_ms": times[len(times) // 10],
        "latency_p90_ms": times[(9 * len(times)) // 10],
        **({"host_ms": statistics.median(host)} if host else {}),
        "first_call_s": first,
        "warmup_calls": warmup_calls,
    }


KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "softmax")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "_int_mm", "aten::mm", "aten::addmm",
              "aten::bmm", "aten::linear", "scaled_mm")),
    ("quantize", ("quantize", "round", "aminmax", "clamp", "float8")),
    ("norm/elementwise", ("triton_", "elementwise", "layer_norm", "reduce", "gelu", "copy")),
)  # fmt: skip
"""Kernel (or CPU operator) name fragments of each category of the profile, first match
wins; everything else is ``other``."""
PROFILE_CALLS = 3


def kernel_category(name: str) -> str:
    """The :data:`KERNEL_CATEGORIES` category of a kernel or operator name. Inductor's
    kernels (``triton_…_fused_<ops>``) name the ops they fuse, GEMMs included when they fuse
    a GEMM's epilogue, so they are only ever ``quantize`` or ``norm/elementwise``."""
    lowered = name.lower()
    inductor = lowered.startswith("triton_")
    for category, fragments in KERNEL_CATEGORIES:
        if inductor and category in ("attention", "gemm"):
            continue
        if any(fragment in lowered for fragment in fragments):
            return category
    return "other"


@torch.no_grad()
def profile_calls(model: DiT, inputs: tuple, device: str, top: int = 8) -> dict[str, Any]:
    """Where the time of one denoiser call goes: per-call milliseconds by kernel category
    and the ``top`` kernels, from ``torch.profiler`` over :data:`PROFILE_CALLS` calls (GPU
    kernel durations on CUDA; self time of CPU operators otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_CALLS):
            model.forward_with_cfg(*inputs, cfg_scale=1.5)
        synchronize(device)
    totals: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    if cuda:
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[event.name] += event.time_range.elapsed_us()
                counts[event.name] += 1
    else:
        for event in prof.key_averages():
            if event.self_cpu_time_total > 0 and event.key.startswith("aten::"):
                totals[event.key] += event.self_cpu_time_total
                counts[event.key] += event.count
    per_call = {name: us / 1000 / PROFILE_CALLS for name, us in totals.items()}
    categories: Counter[str] = Counter()
    for name, ms in per_call.items():
        categories[kernel_category(name)] += ms
    return {
        "total_ms": sum(per_call.values()),
        "categories_ms": dict(categories.most_common()),
        "top": [
            {"name": name[:160], "ms": ms, "launches": counts[name] // PROFILE_CALLS}
            for name, ms in Counter(per_call).most_common(top)
        ],
    }


def time_sampling(model: DiT, batch: int, steps: int, device: str) -> float:
    """Seconds for ``steps`` DDIM steps with guidance on ``batch`` samples (no VAE), after
    an untimed run of two steps (the sampler's inputs may recompile a compiled model, and
    its first calls pick kernels for their shapes)."""

    def sample(count: int) -> None:
        settings = SamplingSettings(sampler="ddim", steps=count, cfg_scale=1.5)
        generate(model, batch, settings, batch_size=batch, device=device, progress=False)

    sample(min(steps, 2))
    synchronize(device)
    start = time.perf_counter()
    sample(steps)
    synchronize(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class BenchSettings:
    """How each variant is timed: ``iters`` timed calls after warm-up rounds of ``warmup``
    calls, ``steps`` sampling steps end to end (0: none), a ``profile`` of where the time
    goes; models ``compile``d per ``compile_scope`` (each block or the whole call),
    ``fuse_mlp`` kernels, ``cuda_graphs``, packed int4 weights read by the GEMM
    (``int4_in_kernel``)."""

    device: str = "cpu"
    iters: int = 20
    warmup: int = 5
    steps: int = 0
    profile: bool = False
    compile: bool = False
    fuse_mlp: bool = True
    cuda_graphs: bool = False
    int4_in_kernel: bool = False
    compile_scope: str = DEFAULT_COMPILE_SCOPE


def bench_variant(
    base: DiT, variant: str, batches: list[int], settings: BenchSettings
) -> list[dict[str, Any]]:
    """Rows of one variant (one per batch size); a failure is recorded, not raised."""
    args = settings
    cuda = torch.device(args.device).type == "cuda"
    try:
        model, info = build_variant(
            base,
            variant,
            args.device,
            args.compile,
            args.fuse_mlp,
            args.cuda_graphs,
            args.int4_in_kernel,
            args.compile_scope,
        )
    except Exception as err:  # noqa: BLE001 - recorded for the report, the run goes on
        return [
            {"variant": variant, "batch": b, "error": f"{type(err).__name__}: {err}"}
            for b in batches
        ]
    rows = []
    for batch in batches:
        row: dict[str, Any] = {"variant": variant, "batch": batch, **info}
        skips = _cuda_graph_skips()
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(args.device)
            inputs = denoiser_inputs(model, batch, args.device)
            row.update(time_calls(model, inputs, args.device, args.iters, args.warmup))
            if info.get("cuda_graphs"):
                row["cuda_graph_skips"] = _cuda_graph_skips() - skips
            if args.steps:
                row["e2e_s"] = time_sampling(model, batch, args.steps, args.device)
            if cuda:
                row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(args.device)
            if args.profile:
                row["profile"] = profile_calls(model, inputs, args.device)
            if cuda:  # the kernel paths measured so far in this process, and their times
                row["kernel_choices"] = _kernel_choices()
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return rows


def _cuda_graph_skips() -> int:
    """Graphs Inductor compiled without CUDA graphs so far in this process (for a reason it
    logs only with ``TORCH_LOGS=cudagraphs``: its calls then pay every kernel launch)."""
    return torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]


def _kernel_choices() -> dict[str, dict[str, float]]:
    """The milliseconds per path of each per-shape kernel choice (FP8 GEMM: Triton or
    cuBLAS, attention paths) measured so far, keyed by the choice's key as text."""
    return {str(key): dict(times) for key, times in triton_ops.CHOICE_TIMES.items()}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up over the BF16 compiled baseline of the same shape and batch."""
    base = {(r["shape"], r["batch"]): r for r in rows if r["variant"] == BASELINE}
    for row in rows:
        ref = base.get((row["shape"], row["batch"]))
        if ref is None or "latency_ms" not in ref or "latency_ms" not in row:
            continue
        row["speedup"] = ref["latency_ms"] / row["latency_ms"]
        if "e2e_s" in row and "e2e_s" in ref:
            row["e2e_speedup"] = ref["e2e_s"] / row["e2e_s"]


def markdown(rows: list[dict[str, Any]], device_name: str) -> str:
    """The results as a markdown table."""
    head = (
        "| shape | batch (×2 cfg) | variant | kernels | ms / call (p10–p90) | host ms | ×BF16c "
        "| 50-step s | ×BF16c | peak GiB | weights MB (mem / disk) |\n|" + " --- |" * 11
    )
    warmups = sorted({r["warmup_calls"] for r in rows if "warmup_calls" in r})
    lines = [
        f"Device: {device_name}. Ratios: BF16 torch.compile time / variant time (medians). "
        f"Warm-up calls before timing (until the call time settled): "
        f"{', '.join(map(str, warmups)) or 'none'}. Host ms: the CPU's time to issue a call "
        f"(a call is CPU-bound where it reaches the latency).\n",
        head,
    ]

    def num(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
        return format(row[key] / scale, fmt) if key in row else "–"

    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['shape']} | {r['batch']} | {r['variant']} | error: {r['error'][:80]} |"
            )
            continue
        kernels = ", ".join(f"{k}×{n}" for k, n in r.get("kernels", {}).items()) or "torch"
        if r.get("compiled"):
            scope = SCOPE_LABELS.get(r.get("compile_scope"), "")
            graphs = ", CUDA graphs" if r.get("cuda_graphs") else ""
            graphs += f" ({r['cuda_graph_skips']} skipped)" if r.get("cuda_graph_skips") else ""
            kernels += f" (compiled{scope}{graphs})"
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['variant']} | {kernels} | "
            f"{num(r, 'latency_ms', '.2f')} ({num(r, 'latency_p10_ms', '.1f')}–"
            f"{num(r, 'latency_p90_ms', '.1f')}) | {num(r, 'host_ms', '.2f')} | "
            f"{num(r, 'speedup', '.2f')} | "
            f"{num(r, 'e2e_s', '.2f')} | {num(r, 'e2e_speedup', '.2f')} | "
            f"{num(r, 'peak_memory_bytes', '.2f', 2**30)} | "
            f"{num(r, 'memory_bytes', '.2f', 1e6)} / {num(r, 'disk_bytes', '.2f', 1e6)} |"
        )
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        lines += ["", "Where the time of one call goes (ms per call, `--profile`):", ""]
        names = sorted({c for r in profiled for c in r["profile"]["categories_ms"]})
        lines.append("| shape | batch | variant | " + " | ".join(names) + " | top kernels |")
        lines.append("|" + " --- |" * (len(names) + 4))
        for r in profiled:
            prof = r["profile"]
            cells = [format(prof["categories_ms"].get(c, 0.0), ".2f") for c in names]
            top = "; ".join(f"{k['name'][:60]} {k['ms']:.2f}" for k in prof["top"][:3])
            lines.append(
                f"| {r['shape']} | {r['batch']} | {r['variant']} | "
                + " | ".join(cells)
                + f" | {top} |"
            )
    return "\n".join(lines) + "\n"


def torchao_available() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True
