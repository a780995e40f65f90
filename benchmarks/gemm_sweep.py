"""GEMM-level timing at DiT-XL/2 layer sizes: BF16 cuBLAS, FP8 row-wise ``_scaled_mm``,
``torch._int_mm``, ditq's autotuned Triton ``int_gemm`` (optionally each tile configuration
of a sweep) and its FP8 twin (``fp8_gemm``'s Triton path, plain and with the gated residual
in its epilogue).

    python benchmarks/gemm_sweep.py OUT.json [--tokens 32768,8192,512] [--sweep] [--only fp8,bf16]

Tokens 32768 is one call at batch 64 with guidance at 256 px (2 x 64 x 256). Each entry is
the median of ``triton.testing.do_bench``; the activation quantization kernels (Triton
``quantize_act`` and the ``torch.compile``d torch twin; a DiT block's LayerNorm, modulation
and quantization as ``norm_quantize``, autotuned over both row layouts and in each alone,
and as compiled torch) are timed on the same inputs. W4
rows include the per-call unpacking of the int4 codes to int8. ``--sweep`` also times each
configuration of ``TILES`` alone (a one-configuration autotuner in place of the tuned one)
for per-channel weights: that sweep chose ``triton_ops.TUNED_TILES``.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from ditq.kernels import triton_ops
from ditq.kernels.linear import ActFormat, quantize_activation
from ditq.quant.packing import unpack_int4
from ditq.quant.spec import QuantSpec

XL_LAYERS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
TILES = [  # (BM, BN, BK, warps, stages, PERSISTENT, TMA); BK: group size if grouped
    *triton_ops.TUNED_TILES["per_channel"],
    (128, 128, 128, 8, 3, 0, 0),
    (128, 128, 128, 4, 4, 0, 0),
    (128, 256, 64, 8, 4, 0, 0),
    (128, 256, 128, 8, 3, 1, 1),
    (128, 128, 128, 8, 4, 1, 1),
    # Triton waits for each int8 wgmma before the next (it keeps only fp32-accumulator dots
    # in flight): deeper K steps and two warp groups per tile amortize or hide that wait
    (128, 128, 128, 4, 4, 0, 1),
    (128, 128, 256, 4, 3, 0, 1),
    (128, 256, 128, 8, 3, 0, 1),
    (256, 128, 128, 8, 3, 0, 1),
]


def bench(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def with_tiles(tiles: tuple[int, ...] | None, grouped: bool, fn: Callable[[], object]) -> float:
    """Time ``fn`` with ``int_gemm`` autotuned (``tiles`` None) or fixed to ``tiles``."""
    if tiles is None:
        return bench(fn)
    with triton_ops.fixed_tiles(tiles, grouped):
        return bench(fn)


def autotuner_choices() -> list[dict]:
    """The configuration each ``int_gemm`` autotuner chose, by (M, N, K)."""
    return [
        {"grouped": grouped, "tma": tma, "key": str(key), "config": str(config)}
        for (grouped, tma), tuner in triton_ops._TUNED_INT_GEMM.items()
        for key, config in tuner.cache.items()
    ]


def layer_cases(M: int, K: int, N: int, device: str) -> dict[str, Callable[[], object]]:
    """The GEMM implementations of one (M, K) x (K, N) layer, as zero-argument calls."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, generator=g).bfloat16()
    w = torch.randn(N, K, device=device, generator=g).bfloat16() * 0.02
    bias = torch.randn(N, device=device, generator=g)
    a8 = torch.randint(-128, 128, (M, K), device=device, generator=g, dtype=torch.int8)
    w8 = torch.randint(-128, 128, (N, K), device=device, generator=g, dtype=torch.int8)
    w4 = torch.randint(0, 256, (N, K // 2), device=device, generator=g, dtype=torch.uint8)
    w4_sum = torch.zeros(N, device=device, dtype=torch.int32)
    xs, ws = torch.rand(M, device=device) * 0.01, torch.rand(N, device=device) * 0.01
    xz = torch.randint(-10, 10, (M,), device=device, dtype=torch.int32)
    wz = torch.randint(-10, 10, (N,), device=device, dtype=torch.int32)
    xsum = a8.sum(1, dtype=torch.int32)
    wsum = w8.sum(1, dtype=torch.int32)
    groups = K // 128
    gs = torch.rand(N, groups, device=device) * 0.01
    gsum = torch.zeros(N, groups, device=device, dtype=torch.int32)
    f8 = x.to(torch.float8_e4m3fn)
    wf8 = w.to(torch.float8_e4m3fn)
    bf = torch.bfloat16
    residual = torch.randn(M, N, device=device, generator=g).bfloat16()
    gate = torch.randn(M // 256 or 1, N, device=device, generator=g).bfloat16()
    gemm, fp8 = triton_ops.int_gemm, triton_ops._fp8_triton
    unpack = lambda: unpack_int4(w4).to(torch.int8) - 8  # noqa: E731 - as RealQuantLinear

    return {
        "bf16 F.linear": lambda: F.linear(x, w, bias.to(bf)),
        "fp8 _scaled_mm rowwise": lambda: torch._scaled_mm(
            f8, wf8.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=bf
        ),
        "ditq fp8 triton": lambda: fp8(f8, xs, wf8, ws, bias, None, None, bf),
        "ditq fp8 triton + gated residual": lambda: fp8(
            f8, xs, wf8, ws, bias, None, None, bf, residual=residual, gate=gate
        ),
        "int8 torch._int_mm": lambda: torch._int_mm(a8, w8.t()),
        "ditq int w8 sym": lambda: gemm(
            a8, xs, xz, None, w8, ws, None, wsum, bias, None, None, 0, True, False, bf
        ),
        "ditq int w8 asym": lambda: gemm(
            a8, xs, xz, xsum, w8, ws, wz, wsum, bias, None, None, 0, True, False, bf
        ),
        "ditq int w8 group128": lambda: gemm(
            a8, xs, xz, None, w8, gs, None, gsum, bias, None, None, 128, True, False, bf
        ),
        "ditq int w4 sym (unpack + int8)": lambda: gemm(
            a8, xs, xz, None, unpack(), ws, None, w4_sum, bias, None, None, 0, True, False, bf
        ),
        "ditq int w4 group128 (unpack + int8)": lambda: gemm(
            a8, xs, xz, None, unpack(), gs, None, gsum, bias, None, None, 128, True, False, bf
        ),
        "w4 unpack alone": unpack,
    }  # fmt: skip


def quantize_cases(M: int, K: int, device: str) -> dict[str, Callable[[], object]]:
    x = torch.randn(M, K, device=device).bfloat16()
    qp = torch.tensor([0.02, 3.0], device=device)
    act = ActFormat("int", qmin=0, qmax=255, symmetric=False, spec=QuantSpec(8, False))
    twin = torch.compile(lambda v: quantize_activation(v, act, None, qp))
    samples = max(1, M // 256)  # DiT-XL/2 at 256 px: 256 tokens a sample
    modulation = (torch.randn(samples, 6 * K, device=device) * 0.1).bfloat16()
    shift, scale = modulation[:, :K], modulation[:, K : 2 * K]

    def block_input(v: torch.Tensor) -> tuple:  # what a DiT block quantizes: modulate(LN(x))
        h = F.layer_norm(v.view(samples, -1, K), (K,), eps=1e-6)
        h = h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return quantize_activation(h.reshape(-1, K), act, None, qp)

    def norm_quantize(layouts: tuple[bool, ...]) -> tuple:
        with triton_ops.row_layouts(*layouts):
            return triton_ops.norm_quantize(x, shift, scale, 1e-6, None, qp, 0, 255, False, False)

    norm_twin = torch.compile(block_input)
    return {
        "triton quantize_act static": lambda: triton_ops.quantize_act(x, None, qp, 0, 255, False),
        "compiled torch twin static": lambda: twin(x),
        "triton norm_quantize static": lambda: norm_quantize(triton_ops.ROW_LAYOUTS),
        "triton norm_quantize static, row in one piece": lambda: norm_quantize((False,)),
        "triton norm_quantize static, row split": lambda: norm_quantize((True,)),
        "compiled torch norm + quantize static": lambda: norm_twin(x),
        "bf16 copy (memory floor)": lambda: x.clone(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--tokens", default="32768,8192,512")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sweep", action="store_true", help="also time each of TILES alone")
    parser.add_argument(
        "--only", help="comma-separated parts of implementation names: time only those"
    )
    args = parser.parse_args()
    rows = []

    def record(**row) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for M in (int(v) for v in args.tokens.split(",")):
        for layer, (K, N) in XL_LAYERS.items():
            flops = 2 * M * N * K
            for impl, fn in layer_cases(M, K, N, args.device).items():
                if args.only and not any(part in impl for part in args.only.split(",")):
                    continue
                swept = args.sweep and impl.startswith("ditq") and "group" not in impl
                sweep = [None, *TILES] if swept else [None]
                for tiles in sweep:
                    grouped = "group" in impl
                    try:
                        ms = with_tiles(tiles, grouped, fn)
                        record(M=M, layer=layer, impl=impl, tiles=tiles, ms=ms,
                               tflops=flops / ms / 1e9)  # fmt: skip
                    except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
                        traceback.print_exc()
                        record(M=M, layer=layer, impl=impl, tiles=tiles, error=str(err)[:300])
            for impl, fn in quantize_cases(M, K, args.device).items():
                if args.only and not any(part in impl for part in args.only.split(",")):
                    continue
                record(M=M, layer=layer, impl=impl, tiles=None, ms=bench(fn))
    choices = autotuner_choices()
    Path(args.out).write_text(json.dumps({"rows": rows, "autotuned": choices}, indent=1) + "\n")
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["M"], r["layer"], r["impl"])
        if "ms" in r and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    print(f"\n{'M':>6} {'layer':<5} {'impl':<30} {'ms':>8} {'TFLOPS':>7} tiles")
    for (M, layer, impl), r in best.items():
        print(f"{M:>6} {layer:<5} {impl:<30} {r['ms']:8.3f} {r.get('tflops', 0):7.0f} {r['tiles']}")
    for choice in choices:
        print(choice)


if __name__ == "__main__":
    main()
