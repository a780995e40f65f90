"""Compile ditq's Triton kernels for an sm_90 GPU (Hopper) on a machine without one:
Triton's code generation and ptxas run on the CPU, so errors that the interpreter never
meets (a non-constexpr global read inside a kernel, a loop-carried value that changes type,
a constexpr branch that does not type-check) fail here instead of on a leased GPU. Run as
a script (the kernels must not be the interpreter's: no ``TRITON_INTERPRET``); prints one
line per compiled kernel and exits non-zero on the first failure."""

import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("unset TRITON_INTERPRET: the interpreter's kernels do not compile")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ditq.kernels import triton_ops as ops  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY = 232_448
"""Bytes of shared memory one program may use on an H100/H200 (227 KiB)."""


def compile_kernel(
    fn, types: dict[str, str], constexprs: dict, label: str = "", aligned: tuple = (), **options
):
    """Compile ``fn`` with pointer/scalar ``types`` (others: i32) and ``constexprs``;
    ``aligned`` arguments are multiples of 16 (pointers: 16-byte aligned), as Triton's JIT
    specializes them at run time on DiT-sized tensors. Returns the compiled kernel."""
    signature = {
        name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names
    }
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned},
    )
    kernel = triton.compile(source, target=TARGET, options=options)
    shared = kernel.metadata.shared
    shown = label or {k: v for k, v in constexprs.items() if not isinstance(v, tl.dtype)}
    print(f"{fn.__name__} {shown} {options}: shared {shared} B{resources(kernel)}", flush=True)
    if shared > SHARED_MEMORY:
        raise RuntimeError(f"{fn.__name__} needs {shared} B of shared memory")
    return kernel


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resources(kernel) -> str:
    """Registers per thread and stack bytes (register spills) of a compiled kernel, as
    ``cuobjdump -res-usage`` reads them from its cubin (empty where this Triton has none)."""
    if not CUOBJDUMP.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return f", {found[1]} registers, stack {found[2]} B" if found else ""


BYTE_LOADS = re.compile(r"ld\.global[.\w]*\.[bsu]8\b")
"""A global load of one byte: an operand tile read element by element, which neither
vectorizes nor pipelines through asynchronous copies (the int4 GEMM whose activation loads
were strided took 4-11x the GEMM time of unpacking first: ``benchmarks/RESULTS.md``)."""


def attention() -> None:
    codes = dict(x_ptr="*bf16", qparams_ptr="*fp32", out_ptr="*bf16")
    compile_kernel(
        ops._attention_codes_kernel, codes, dict(QMIN=0, QMAX=255, BLOCK_N=64, BLOCK_D=128)
    )
    types = dict(
        q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", qparams_ptr="*fp32",
        p_qparams_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", mask_ptr="*bf16",
        out_ptr="*bf16", softmax_scale="fp32",
    )  # fmt: skip
    for mask, quantize in ((False, False), (True, True)):  # codes pass / tile codes
        common = dict(DOT=tl.bfloat16, HAS_MASK=mask, BLOCK_D=128, QUANTIZE=quantize)
        for bm, bn, warps, stages in ops.ATTENTION_TILES:
            tiles = dict(BLOCK_M=bm, BLOCK_N=bn)
            compile_kernel(
                ops._attention_stats_kernel, types, common | tiles | dict(QMIN=0, QMAX=255),
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
            compile_kernel(
                ops._attention_out_kernel, types,
                common | tiles | dict(QMIN=0, QMAX=255, WHOLE_ROW=False),
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
        for bm, warps, stages in ops.ONE_PASS_TILES:
            compile_kernel(
                ops._attention_out_kernel, types,
                common | dict(QMIN=-128, QMAX=127, WHOLE_ROW=True, BLOCK_M=bm, BLOCK_N=256),
                num_warps=warps, num_stages=stages,
            )  # fmt: skip


def activations() -> None:
    types = dict(
        x_ptr="*bf16", s_ptr="*bf16", q_ptr="*i8", scale_ptr="*fp32", zp_ptr="*i32",
        sum_ptr="*i32", static_ptr="*fp32",
    )  # fmt: skip
    for dynamic, symmetric in ((False, False), (True, True)):
        compile_kernel(
            ops._quantize_act_kernel, types,
            dict(QMIN=0, QMAX=255, SHIFT=128, HAS_S=True, DYNAMIC=dynamic,
                 SYMMETRIC=symmetric, BLOCK_K=2048),
        )  # fmt: skip
    compile_kernel(
        ops._quantize_act_groups_kernel, types,
        dict(QMIN=0, QMAX=15, SHIFT=0, HAS_S=True, SYMMETRIC=False, G=32, GROUPS_P=64),
    )  # fmt: skip
    norm = dict(
        x_ptr="*bf16", shift_ptr="*bf16", mscale_ptr="*bf16", s_ptr="*bf16", static_ptr="*fp32",
        sum_ptr="*i32", eps="fp32",
    )  # fmt: skip
    for fp8, sums in ((False, True), (False, False), (True, False)):
        for (rows, warps), split in itertools.product(ops.NORM_QUANTIZE_TILES, (False, True)):
            compile_kernel(
                ops._norm_quantize_kernel, norm | dict(q_ptr="*fp8e4nv" if fp8 else "*i8"),
                dict(QMIN=0, QMAX=255, SHIFT=128, HAS_S=True, FP8=fp8, SUMS=sums, ROWS=rows,
                     **ops._row_pieces(1152, split)),
                num_warps=warps,
            )  # fmt: skip


GEMM_FLAGS = dict(
    GROUPED=False, X_GROUPED=False, HAS_XZP=False, HAS_WZP=False, HAS_BIAS=True, R=0, RP=0,
    DOT=tl.bfloat16, GELU_QUANT=False, HAS_OS=False, NEXT_SUMS=False, RESIDUAL=False,
    PACKED=False, FP8=False,
    NEXT_FP8=False, FAST_MATH=True, ACT=tl.bfloat16, QMIN=0, QMAX=0, SHIFT=0,
    BM=128, BN=128, BK=64, GROUP_M=8, PERSISTENT=0, TMA=False,
)  # fmt: skip
"""A per-channel int8 GEMM with a bias; the cases below change what they name."""
GEMM_CASES = {
    "int8 asym": dict(HAS_XZP=True, HAS_WZP=True),
    "fused MLP fc1 (GELU, next int8 codes and their sums)": dict(
        GELU_QUANT=True, HAS_OS=True, NEXT_SUMS=True, QMIN=0, QMAX=255, SHIFT=128
    ),
    "gated residual": dict(RESIDUAL=True),
    "persistent": dict(PERSISTENT=2, BN=256, BK=128, HAS_XZP=True),
    "TMA loads": dict(TMA=True, HAS_XZP=True),
    "W4A4 asym groups of 32, rank 64": dict(GROUPED=True, X_GROUPED=True, HAS_XZP=True,
                                            BK=32, R=64, RP=64),
    "int4 in kernel, groups of 64": dict(GROUPED=True, PACKED=True, HAS_WZP=True, BM=64, BK=64),
    "int4 in kernel, groups of 32": dict(GROUPED=True, PACKED=True, HAS_WZP=True, BM=64, BK=32),
    "FP8 fused MLP fc1": dict(FP8=True, GELU_QUANT=True, NEXT_FP8=True),
    "FP8 gated residual": dict(FP8=True, RESIDUAL=True),
    "int4 weights in kernel, FP8 activations": dict(FP8=True, PACKED=True, HAS_WZP=True),
}  # fmt: skip


def gemm() -> None:
    for name, case in GEMM_CASES.items():
        flags = GEMM_FLAGS | case
        operand = "*u8" if flags["PACKED"] else ("*fp8e4nv" if flags["FP8"] else "*i8")
        out = "*bf16"
        if flags["GELU_QUANT"]:
            out = "*fp8e4nv" if flags["NEXT_FP8"] else "*i8"
        types = dict(
            a_ptr="*fp8e4nv" if flags["FP8"] else "*i8", w_ptr=operand, a_desc="*fp32",
            w_desc="*fp32", xs_ptr="*fp32", xz_ptr="*i32", xsum_ptr="*i32", ws_ptr="*fp32",
            wz_ptr="*fp32" if flags["FP8"] else "*i32", wsum_ptr="*i32", bias_ptr="*fp32",
            t_ptr="*bf16", l_ptr="*bf16",
            out_ptr=out, oq_ptr="*fp32", os_ptr="*bf16", res_ptr="*bf16", gate_ptr="*bf16",
            nsum_ptr="*i32",
        )  # fmt: skip
        if flags["TMA"]:  # the copy engine's descriptors, boxes of one tile
            types["a_desc"] = f"tensordesc<i8[{flags['BM']}, {flags['BK']}]>"
            types["w_desc"] = f"tensordesc<i8[{flags['BN']}, {flags['BK']}]>"
        aligned = [n for n in ops._int_gemm_kernel.arg_names if n in types and n not in flags]
        aligned += ["M", "N", "K", "stride_wn", "stride_om"]
        kernel = compile_kernel(
            ops._int_gemm_kernel, types, flags, name, aligned, num_warps=8, num_stages=3
        )
        if BYTE_LOADS.search(kernel.asm["ptx"]):
            raise RuntimeError(
                f"_int_gemm_kernel ({name}) loads single bytes: {BYTE_LOADS.pattern}"
            )


def gptq() -> None:
    types = dict(
        block_ptr="*fp32", hinv_ptr="*fp32", scale_ptr="*fp32", zero_ptr="*fp32",
        q_ptr="*fp32", err_ptr="*fp32",
    )  # fmt: skip
    for fp8 in (False, True):
        flags = dict(QMIN=0, QMAX=15, FP8=fp8, BLOCK_R=ops.GPTQ_ROWS, BLOCK_B=128)
        compile_kernel(ops._gptq_columns_kernel, types, flags)


if __name__ == "__main__":
    attention()
    activations()
    gemm()
    gptq()
