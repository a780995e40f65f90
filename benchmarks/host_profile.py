"""Where the host's time of a compiled denoiser call goes (``ditq bench``'s "host ms").

    python benchmarks/host_profile.py OUT.json [--shape DiT-XL/2@256] [--batch 64]
        [--variants bf16-compile,w8a8-static-symw,w8a8-fp8-static] [--calls 20] [--top 25]
        [--device cuda] [--compile-scope model|blocks] [--cuda-graphs]

For each variant of ``ditq bench`` (random weights, compiled as ``ditq bench`` compiles
them: the whole call, or each block with ``--compile-scope blocks``; without CUDA graphs
unless ``--cuda-graphs``: what the host still does per call when it replays them), after
warm-up: the host time per call with the calls queued back to back (no
synchronization between them) against the wall time per call once the GPU has finished
them, the same with Python's garbage collector off, and a cProfile of the queued calls
(the functions with the most own time, and the most cumulative time). A call is bound by
the host where its host time reaches its wall time. Printed, and written to OUT.json.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ditq.eval.speed import build_variant, denoiser_inputs, shape_model, synchronize, warm_up
from ditq.kernels import COMPILE_SCOPES, DEFAULT_COMPILE_SCOPE


def queued(call: Callable[[], object], calls: int, device: str) -> tuple[float, float]:
    """(host ms, wall ms) per call of ``calls`` calls issued back to back."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    host = time.perf_counter() - start
    synchronize(device)
    wall = time.perf_counter() - start
    return 1000 * host / calls, 1000 * wall / calls


def profile_rows(profile: cProfile.Profile, key: str, top: int, calls: int) -> list[dict]:
    """The ``top`` functions by ``key`` ("tottime" or "cumulative"), ms per denoiser call."""
    stats = pstats.Stats(profile)
    rows = []
    for (path, line, name), (_, ncalls, own, cumulative, _) in stats.stats.items():
        rows.append(
            {
                "function": f"{Path(path).name}:{line}({name})",
                "calls_per_call": ncalls / calls,
                "own_ms": 1000 * own / calls,
                "cumulative_ms": 1000 * cumulative / calls,
            }
        )
    field = "own_ms" if key == "tottime" else "cumulative_ms"
    return sorted(rows, key=lambda r: r[field], reverse=True)[:top]


@torch.no_grad()
def profile_variant(
    base, variant: str, batch: int, calls: int, top: int, device: str, **compiled
) -> dict:
    """One variant's row; ``compiled``: ``build_variant``'s ``cuda_graphs`` and
    ``compile_scope``."""
    model, info = build_variant(base, variant, device, compile_models=True, **compiled)
    inputs = denoiser_inputs(model, batch, device)
    call = lambda: model.forward_with_cfg(*inputs, cfg_scale=1.5)  # noqa: E731
    call()
    warm_up(call, device, 5)
    host, wall = queued(call, calls, device)
    gc.disable()
    try:
        host_no_gc, wall_no_gc = queued(call, calls, device)
    finally:
        gc.enable()
    profile = cProfile.Profile()
    synchronize(device)
    profile.enable()
    for _ in range(calls):
        call()
    profile.disable()
    synchronize(device)
    return {
        "variant": variant,
        "batch": batch,
        "compile_scope": info.get("compile_scope"),
        "cuda_graphs": info.get("cuda_graphs", False),
        "kernels": info.get("kernels", {}),
        "host_ms": host,
        "wall_ms": wall,
        "host_ms_gc_off": host_no_gc,
        "wall_ms_gc_off": wall_no_gc,
        "own_time": profile_rows(profile, "tottime", top, calls),
        "cumulative": profile_rows(profile, "cumulative", top, calls),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--shape", default="DiT-XL/2@256")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--variants", default="bf16-compile,w8a8-static-symw,w8a8-fp8-static")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-scope", choices=COMPILE_SCOPES, default=DEFAULT_COMPILE_SCOPE)
    parser.add_argument("--cuda-graphs", action="store_true")
    args = parser.parse_args()
    base = shape_model(args.shape).eval()
    rows = []
    for variant in args.variants.split(","):
        row = profile_variant(
            base, variant, args.batch, args.calls, args.top, args.device,
            cuda_graphs=args.cuda_graphs, compile_scope=args.compile_scope,
        )  # fmt: skip
        rows.append(row)
        Path(args.out).write_text(json.dumps({"shape": args.shape, "rows": rows}, indent=1))
        print(
            f"\n{variant} batch {args.batch}: host {row['host_ms']:.2f} ms / call, wall "
            f"{row['wall_ms']:.2f} ms; gc off: host {row['host_ms_gc_off']:.2f}, wall "
            f"{row['wall_ms_gc_off']:.2f}",
            flush=True,
        )
        for title, key in (("own time", "own_ms"), ("cumulative", "cumulative_ms")):
            print(f"  by {title} (ms per call, calls per call):")
            for r in row["own_time" if key == "own_ms" else "cumulative"]:
                print(f"    {r[key]:8.3f} {r['calls_per_call']:8.1f}  {r['function']}")


if __name__ == "__main__":
    main()
