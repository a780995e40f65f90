"""Triton kernels of the ``cuda`` backend (written for sm_90; they also run in the Triton
interpreter, ``TRITON_INTERPRET=1``, which is how the CPU tests check them).

The kernels, each wrapped as a ``torch.library`` custom op so that ``torch.compile`` keeps
them as opaque calls and fuses the BF16 code around them:

- ``quantize_act``: activation codes of a (M, K) tensor, one program per row: optional
  online ``input_scale`` division, static per-tensor (scale and zero point read from the
  device, so dynamic per-tensor ranges computed by torch need no host sync) or dynamic
  per-token ranges, round half to even as ``torch.round``. Asymmetric codes are shifted by
  -128 into int8 (``q' = q - 128``, ``z' = z - 128``) so that tensor cores take them.
  Returns codes, per-row scale, per-row zero point ``z'`` and per-row code sum ``Σ_k q'``.
  (Under ``torch.compile`` the torch twin runs instead, fused into the preceding op.)
- ``quantize_act_groups``: the same with a dynamic range per token and group of g input
  channels (SVDQuant's W4A4 activations): scale and zero point (M, K / g).
- ``int_gemm``: int8 activation codes x int8 weight codes -> int32 on tensor cores,
  dequantization in the epilogue. Per-channel weights accumulate the whole K in int32:
  ``y = Δx·Δw·(Σ q'x q'w − z'w Σ q'x − z'x Σ q'w + K z'x z'w) + b``. Per-group weights
  (W4A8, W8A8 with groups) use BLOCK_K = group size: each K block's int32 partial sum,
  zero-point corrected with the block's code sums, is scaled by that group's weight scale
  and added to an fp32 accumulator; activations with a range per group (BLOCK_K = their
  group, the weight tables laid out per that group) scale it by their own group's scale
  too. Packed int4 weights are unpacked to int8 codes by the
  caller first by default (one small elementwise kernel per call); ``packed_int4`` reads
  the bytes instead and interleaves each K block's nibbles back into input-channel order
  in registers (``convert_model(int4_in_kernel=True)``, ``ditq bench --int4-in-kernel``).
  Every in-kernel unpacking timed was slower than unpacking first (``benchmarks/RESULTS.md``):
  this interleaving in an earlier version of the kernel, two dots per block over the even
  and the odd input channels (strided activation loads), and this version, which saves
  the per-call unpacked weights' memory. Tile sizes are
  autotuned per (M, N, K) on the GPU among the configurations that won the sweep of
  ``benchmarks/gemm_sweep.py``.

- ``fp8_gemm``: the same kernel on e4m3 activation and weight codes (FP8 tensor cores,
  fp32 accumulation, per-row activation and per-channel weight scales in the epilogue),
  with ``int_gemm``'s epilogues below (the next layer's input as e4m3 codes); per GEMM shape
  it runs on this kernel or on ``torch._scaled_mm`` (cuBLAS), whichever measured faster
  on the shape's first call.

``int_gemm`` adds ``T · Lᵀ`` in its epilogue when given the DiTAS low-rank intermediate
``T = x Rᵀ`` (M, r) and ``L`` (N, r): one extra small dot per output tile instead of a
second GEMM launch and an add. Given the next layer's static input range it also applies
GELU and that layer's quantization in the epilogue and writes int8 codes instead of ``y``
(``FusedQuantMlp``: fc1 writing fc2's input).
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ditq.quant.gptq import LazyBatch
from ditq.quant.quantizer import FP8_E4M3_MAX, compute_qparams
from ditq.quant.spec import QuantSpec, integer_range

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.4: no host-side tensor descriptors, no TMA configurations
    TensorDescriptor = None

_SHIFT = 128  # asymmetric codes [0, 2^b - 1] are stored shifted by -128 into int8
FP8_MAX = tl.constexpr(FP8_E4M3_MAX)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HARDWARE_RINT = tl.constexpr(not INTERPRETED)
_DOT_DTYPE = tl.float32 if INTERPRETED else tl.bfloat16
"""BF16 tensor-core dots; fp32 under the interpreter, whose BF16 dot is wrong (numpy has
no bfloat16), so the CPU tests check the same kernels with exact operands."""


@triton.jit
def _round_half_even(v):
    """``torch.round``: the rint instruction on the GPU, the same in arithmetic for the
    interpreter (exact for |v| < 2^22, far beyond any clamped code)."""
    if HARDWARE_RINT:
        return libdevice.rint(v)
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _round_to_e4m3(v):
    """``v`` (fp32, within ±448) rounded half to even to the e4m3 grid, in fp32 arithmetic:
    steps of 2^(e - 3) for the exponent e of ``v``, 2^-9 below 2^-6 (subnormals). For the
    interpreter, whose fp32 -> e4m3 cast drops a mantissa carry and rounds subnormals
    wrongly; the GPU's cast rounds the same way itself."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return _round_half_even(v / step) * step


@triton.jit
def _e4m3_codes(v):
    """e4m3 codes of ``v`` (fp32): saturated at ±448, rounded to nearest even by the cast
    (in the interpreter by :func:`_round_to_e4m3` first)."""
    v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
    if not HARDWARE_RINT:
        v = _round_to_e4m3(v)
    return v.to(tl.float8e4nv)


@triton.jit
def _scaled_input(x_ptr, s_ptr, offs, mask, HAS_S: tl.constexpr):
    """The input at ``offs`` in fp32, divided by the online scale first (as torch: x / s in
    the input's dtype)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_S:
        s = tl.load(s_ptr + offs, mask=mask, other=1.0).to(x.dtype)
        x = tl.math.div_rn(x.to(tl.float32), s.to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _dynamic_qparams(x_min, x_max, QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr):
    """(scale, zero point) of the range [x_min, x_max] (x_min <= 0 <= x_max), as the
    simulated quantizer computes them: the range times the fp32 reciprocal of the levels
    (``compute_qparams``), the zero point a correctly rounded quotient."""
    if SYMMETRIC:
        scale = tl.maximum(tl.maximum(-x_min, x_max) * (1.0 / QMAX), 1e-8)
        zero = scale * 0.0
    else:
        scale = tl.maximum((x_max - x_min) * (1.0 / (QMAX - QMIN)), 1e-8)
        zero = _round_half_even(tl.math.div_rn(-x_min, scale))
    return scale, zero


@triton.jit
def _quotient(x, d):
    """``x / d`` in fp32 rounded as IEEE division (``div_rn``), for a divisor shared by many
    ``x`` (a tensor's or a row's scale): d's correctly rounded reciprocal once, then per
    element a product and one FMA correction (Markstein's theorem: ``q + (x - q d) / d``
    with the exact residual of an FMA is the correctly rounded quotient, barring underflow,
    where the codes are 0 anyway), instead of a slower ``div_rn`` per element."""
    inv = tl.math.div_rn(1.0, d)
    q = x * inv
    return tl.math.fma(tl.math.fma(-q, d, x), inv, q)


@triton.jit
def _codes(x, scale, zero, QMIN: tl.constexpr, QMAX: tl.constexpr, SHIFT: tl.constexpr):
    """``clamp(round(x / scale) + zero) - SHIFT`` in fp32, rounding half to even."""
    codes = _round_half_even(_quotient(x, scale)) + zero
    return tl.minimum(tl.maximum(codes, QMIN), QMAX) - SHIFT


@triton.jit
def _quantize_act_kernel(
    x_ptr,
    s_ptr,
    q_ptr,
    scale_ptr,
    zp_ptr,
    sum_ptr,
    static_ptr,
    K,
    stride_xm,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    SHIFT: tl.constexpr,
    HAS_S: tl.constexpr,
    DYNAMIC: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = _scaled_input(x_ptr + row * stride_xm, s_ptr, offs, mask, HAS_S)
    if DYNAMIC:  # masked entries are 0: inside every range
        x_min = tl.minimum(tl.min(x, axis=0), 0.0)
        x_max = tl.maximum(tl.max(x, axis=0), 0.0)
        scale, zero = _dynamic_qparams(x_min, x_max, QMIN, QMAX, SYMMETRIC)
    else:
        scale = tl.load(static_ptr)
        zero = tl.load(static_ptr + 1)
    codes = tl.where(mask, _codes(x, scale, zero, QMIN, QMAX, SHIFT), 0.0).to(tl.int32)
    tl.store(q_ptr + row * K + offs, codes.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)
    tl.store(zp_ptr + row, (zero - SHIFT).to(tl.int32))
    tl.store(sum_ptr + row, tl.sum(codes, axis=0))


@triton.jit
def _row_piece(x_ptr, rows, row_ok, offs, K, stride_xm):
    """A piece of ROWS rows (fp32; 0 outside the row) and its mask."""
    mask = row_ok[:, None] & (offs < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs[None, :], mask=mask, other=0.0)
    return x.to(tl.float32), mask


@triton.jit
def _modulated_codes(
    centered, rstd, mask, offs, batch, shift_ptr, mscale_ptr, s_ptr, static_ptr, q_ptr, rows,
    K, stride_shift, stride_mscale,
    QMIN: tl.constexpr, QMAX: tl.constexpr, SHIFT: tl.constexpr, HAS_S: tl.constexpr,
    FP8: tl.constexpr,
):  # fmt: skip
    """A piece's ``h = centered ⊙ rstd ⊙ (1 + scale_b) + shift_b`` (divided by s), stored as
    codes; returns the piece's row sums of the int codes (0 for e4m3)."""
    shift = tl.load(shift_ptr + batch * stride_shift + offs[None, :], mask=mask, other=0.0)
    mscale = tl.load(mscale_ptr + batch * stride_mscale + offs[None, :], mask=mask, other=0.0)
    h = centered * rstd[:, None] * (1.0 + mscale.to(tl.float32)) + shift.to(tl.float32)
    if HAS_S:
        h = h / tl.load(s_ptr + offs, mask=offs < K, other=1.0).to(tl.float32)[None, :]
    out = q_ptr + rows[:, None] * K + offs[None, :]
    if FP8:
        tl.store(out, _e4m3_codes(h / tl.load(static_ptr)), mask=mask)
        sums = tl.zeros_like(rstd).to(tl.int32)  # e4m3 codes have no sums
    else:
        codes = _codes(h, tl.load(static_ptr), tl.load(static_ptr + 1), QMIN, QMAX, SHIFT)
        codes = tl.where(mask, codes, 0.0).to(tl.int32)
        tl.store(out, codes.to(tl.int8), mask=mask)
        sums = tl.sum(codes, axis=1)
    return sums


@triton.jit
def _norm_quantize_kernel(
    x_ptr, shift_ptr, mscale_ptr, s_ptr, static_ptr, q_ptr, sum_ptr, M, K, rows_per_batch,
    stride_xm, stride_shift, stride_mscale, eps,
    QMIN: tl.constexpr, QMAX: tl.constexpr, SHIFT: tl.constexpr, HAS_S: tl.constexpr,
    FP8: tl.constexpr, SUMS: tl.constexpr, ROWS: tl.constexpr, HEAD: tl.constexpr,
    TAIL: tl.constexpr,
):  # fmt: skip
    """ROWS rows of ``h = LayerNorm(x) ⊙ (1 + scale_b) + shift_b`` (no affine; b = row //
    rows_per_batch), divided by the online scale s, quantized with the static range
    [Δ, z]: int codes (and with ``SUMS`` their row sums), or e4m3 codes. The whole row in
    registers as two pieces, channels [0, HEAD) and [HEAD, HEAD + TAIL) (TAIL 0: one
    piece), its statistics and ``h`` in fp32."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    head = tl.arange(0, HEAD)
    x, mask = _row_piece(x_ptr, rows, row_ok, head, K, stride_xm)
    total = tl.sum(x, axis=1)
    if TAIL:
        tail = HEAD + tl.arange(0, TAIL)
        x_tail, mask_tail = _row_piece(x_ptr, rows, row_ok, tail, K, stride_xm)
        total += tl.sum(x_tail, axis=1)
    mean = total / K
    centered = tl.where(mask, x - mean[:, None], 0.0)
    squares = tl.sum(centered * centered, axis=1)
    if TAIL:
        centered_tail = tl.where(mask_tail, x_tail - mean[:, None], 0.0)
        squares += tl.sum(centered_tail * centered_tail, axis=1)
    rstd = 1.0 / tl.sqrt(squares / K + eps)
    batch = (rows // rows_per_batch)[:, None]
    sums = _modulated_codes(
        centered, rstd, mask, head, batch, shift_ptr, mscale_ptr, s_ptr, static_ptr, q_ptr,
        rows, K, stride_shift, stride_mscale, QMIN, QMAX, SHIFT, HAS_S, FP8,
    )  # fmt: skip
    if TAIL:
        sums += _modulated_codes(
            centered_tail, rstd, mask_tail, tail, batch, shift_ptr, mscale_ptr, s_ptr,
            static_ptr, q_ptr, rows, K, stride_shift, stride_mscale, QMIN, QMAX, SHIFT, HAS_S,
            FP8,
        )  # fmt: skip
    if SUMS:
        tl.store(sum_ptr + rows, sums, mask=row_ok)


def _row_pieces(K: int, split: bool) -> dict[str, int]:
    """``_norm_quantize_kernel``'s pieces of a row of K channels: one of the next power of
    two (masked beyond K), or with ``split`` the largest power of two within K and the
    rest's next power of two (K = 1,152: 1,024 + 128, nothing masked)."""
    if not split:
        return {"HEAD": triton.next_power_of_2(K), "TAIL": 0}
    head = 1 << (K.bit_length() - 1)
    return {"HEAD": head, "TAIL": triton.next_power_of_2(K - head) if head < K else 0}


ROW_LAYOUTS: tuple[bool, ...] = (False, True)
"""The row layouts :func:`norm_quantize` tries: in one piece (False), split in two (True;
:func:`_row_pieces`); the autotuner times each, the interpreter runs the last."""
NORM_QUANTIZE_TILES = ((1, 1), (1, 2), (1, 4), (2, 4), (4, 4), (4, 8))
"""``(ROWS, num_warps)`` the autotuner tries for :func:`norm_quantize`, per K, in each of
:data:`ROW_LAYOUTS`: on an H100 at 32,768 × 1,152 the one-piece int codes ran fastest with
one row per program and one or two warps, e4m3 with four rows and four warps
(benchmarks/RESULTS.md); the split rows are not yet timed."""


@functools.cache
def _tuned_norm_quantize(K: int, layouts: tuple[bool, ...]) -> triton.runtime.Autotuner:
    """The autotuned :func:`_norm_quantize_kernel` for rows of K channels in ``layouts``."""
    configs = [
        triton.Config({"ROWS": rows, **_row_pieces(K, split)}, num_warps=warps)
        for split in layouts
        for rows, warps in NORM_QUANTIZE_TILES
    ]
    return triton.autotune(configs, key=["K"])(_norm_quantize_kernel)


@contextlib.contextmanager
def row_layouts(*layouts: bool) -> Iterator[None]:
    """:func:`norm_quantize` with only these :data:`ROW_LAYOUTS` (e.g. to time each alone,
    ``benchmarks/gemm_sweep.py``)."""
    global ROW_LAYOUTS
    saved, ROW_LAYOUTS = ROW_LAYOUTS, layouts
    try:
        yield
    finally:
        ROW_LAYOUTS = saved


@triton.jit
def _quantize_act_groups_kernel(
    x_ptr,
    s_ptr,
    q_ptr,
    scale_ptr,
    zp_ptr,
    K,
    NUM_GROUPS,
    stride_xm,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    SHIFT: tl.constexpr,
    HAS_S: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    G: tl.constexpr,
    GROUPS_P: tl.constexpr,
):
    """One row's codes with a dynamic range per group of G channels (a GROUPS_P x G tile)."""
    row = tl.program_id(0)
    group = tl.arange(0, GROUPS_P)
    offs = group[:, None] * G + tl.arange(0, G)[None, :]
    mask = (group < NUM_GROUPS)[:, None] & (offs < K)
    x = _scaled_input(x_ptr + row * stride_xm, s_ptr, offs, mask, HAS_S)
    x_min = tl.minimum(tl.min(x, axis=1), 0.0)  # masked entries are 0: inside every range
    x_max = tl.maximum(tl.max(x, axis=1), 0.0)
    scale, zero = _dynamic_qparams(x_min, x_max, QMIN, QMAX, SYMMETRIC)
    codes = _codes(x, scale[:, None], zero[:, None], QMIN, QMAX, SHIFT)
    tl.store(q_ptr + row * K + offs, codes.to(tl.int32).to(tl.int8), mask=mask)
    group_ok = group < NUM_GROUPS
    tl.store(scale_ptr + row * NUM_GROUPS + group, scale, mask=group_ok)
    tl.store(zp_ptr + row * NUM_GROUPS + group, (zero - SHIFT).to(tl.int32), mask=group_ok)


@triton.jit
def _int_gemm_kernel(
    a_ptr,
    w_ptr,
    a_desc,
    w_desc,
    xs_ptr,
    xz_ptr,
    xsum_ptr,
    ws_ptr,
    wz_ptr,
    wsum_ptr,
    bias_ptr,
    t_ptr,
    l_ptr,
    out_ptr,
    oq_ptr,
    os_ptr,
    res_ptr,
    gate_ptr,
    nsum_ptr,
    M,
    N,
    K,
    NUM_GROUPS,
    stride_wn,
    stride_om,
    ROWS_PER_GATE,
    GROUPED: tl.constexpr,
    X_GROUPED: tl.constexpr,
    HAS_XZP: tl.constexpr,
    HAS_WZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    DOT: tl.constexpr,
    GELU_QUANT: tl.constexpr,
    HAS_OS: tl.constexpr,
    NEXT_SUMS: tl.constexpr,
    RESIDUAL: tl.constexpr,
    PACKED: tl.constexpr,
    FP8: tl.constexpr,
    NEXT_FP8: tl.constexpr,
    FAST_MATH: tl.constexpr,
    ACT: tl.constexpr,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    SHIFT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
    TMA: tl.constexpr,
):
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    # One output tile per program, or (PERSISTENT) a grid of PERSISTENT programs per
    # multiprocessor striding over the tiles as one flattened loop, so that the compiler
    # pipelines the next tile's loads under this tile's epilogue.
    for tile in tl.range(
        tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=PERSISTENT > 0
    ):
        group = tile // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * num_n)) % size_m
        pid_n = (tile % (GROUP_M * num_n)) // size_m
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        m_ok, n_ok = offs_m < M, offs_n < N
        if HAS_XZP and not X_GROUPED:
            xz = tl.load(xz_ptr + offs_m, mask=m_ok, other=0)
        if FP8 and PACKED:  # int4 weights for e4m3 dots: u - 8 minus the channel's zero point
            w_off = tl.full((BN,), 8.0, tl.float32)
            if HAS_WZP:
                w_off += tl.load(wz_ptr + offs_n, mask=n_ok, other=0.0)
        acc_i = tl.zeros((BM, BN), dtype=tl.int32)
        acc_f = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BK)):
            if TMA:  # the copy engine; out-of-bounds rows and columns read as zeros
                a = a_desc.load([pid_m * BM, kb * BK])
                w = w_desc.load([pid_n * BN, kb * BK]).T
            else:
                offs_k = kb * BK + tl.arange(0, BK)
                a = tl.load(
                    a_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k[None, :] < K),
                    other=0.0 if FP8 else 0,
                )
                if PACKED:  # int4 bytes: low nibble input channel 2j, high nibble 2j + 1
                    offs_j = kb * (BK // 2) + tl.arange(0, BK // 2)
                    nibbles = tl.load(
                        w_ptr + offs_n[:, None] * stride_wn + offs_j[None, :],
                        mask=n_ok[:, None] & (offs_j[None, :] < K // 2),
                        other=0x88,  # codes 8 - 8 = 0 beyond K
                    ).to(tl.int32)
                    u = tl.interleave(nibbles & 0xF, (nibbles >> 4) & 0xF)  # (BN, BK)
                    if FP8:  # |u - 8 - z| <= 15: exact in e4m3
                        w = (u.to(tl.float32) - w_off[:, None]).to(tl.float8e4nv).T
                    else:
                        w = (u - 8).to(tl.int8).T
                else:
                    w = tl.load(
                        w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                        mask=(offs_k[:, None] < K) & n_ok[None, :],
                        other=0.0 if FP8 else 0,
                    )
            if FP8:  # e4m3 codes, fp32 accumulation; row and channel scales in the epilogue
                acc_f = tl.dot(a, w, acc_f)
            else:
                part = tl.dot(a, w, out_dtype=tl.int32)
                if GROUPED:
                    g_idx = offs_n * NUM_GROUPS + kb
                    if X_GROUPED:  # the activation's own range in this K block
                        xz = tl.load(xz_ptr + offs_m * NUM_GROUPS + kb, mask=m_ok, other=0)
                    if HAS_WZP:
                        wz = tl.load(wz_ptr + g_idx, mask=n_ok, other=0)
                        a_sum = tl.sum(a.to(tl.int32), axis=1)
                        part -= wz[None, :] * a_sum[:, None]
                        if HAS_XZP:
                            part += BK * xz[:, None] * wz[None, :]
                    if HAS_XZP:
                        part -= xz[:, None] * tl.load(wsum_ptr + g_idx, mask=n_ok, other=0)[None, :]
                    ws = tl.load(ws_ptr + g_idx, mask=n_ok, other=0.0)
                    if X_GROUPED:
                        xs = tl.load(xs_ptr + offs_m * NUM_GROUPS + kb, mask=m_ok, other=0.0)
                        acc_f += part.to(tl.float32) * (xs[:, None] * ws[None, :])
                    else:
                        acc_f += part.to(tl.float32) * ws[None, :]
                else:
                    acc_i += part
        if X_GROUPED:
            acc = acc_f
        elif GROUPED:
            acc = acc_f * tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
        elif FP8:
            xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
            ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
            acc = acc_f * (xs[:, None] * ws[None, :])
        else:
            xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
            if HAS_WZP:
                wz = tl.load(wz_ptr + offs_n, mask=n_ok, other=0)
                acc_i -= wz[None, :] * tl.load(xsum_ptr + offs_m, mask=m_ok, other=0)[:, None]
                if HAS_XZP:
                    acc_i += K * xz[:, None] * wz[None, :]
            if HAS_XZP:
                acc_i -= xz[:, None] * tl.load(wsum_ptr + offs_n, mask=n_ok, other=0)[None, :]
            ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
            acc = acc_i.to(tl.float32) * (xs[:, None] * ws[None, :])
        # Epilogue: y = acc (+ bias) (+ T Lᵀ) stored in the output's dtype, or with GELU_QUANT
        # the next layer's int8 input codes: y rounded to the activation dtype ACT, GELU
        # (tanh), optionally divided by that layer's online input scale, then quantized with
        # its static [scale, zero point], rounding half to even. Cheap arithmetic, as the
        # epilogue runs at the GEMM's low occupancy: products by reciprocals instead of
        # divisions (a code may differ by one from quantize_act's where y / s lies within
        # an ulp of a rounding tie) and, with FAST_MATH (on the GPU), the hardware tanh
        # instead of its arithmetic form.
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        if R > 0:
            offs_r = tl.arange(0, RP)
            t = tl.load(
                t_ptr + offs_m[:, None] * R + offs_r[None, :],
                mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
                other=0.0,
            )
            lt = tl.load(
                l_ptr + offs_n[None, :] * R + offs_r[:, None],
                mask=(offs_r[:, None] < R) & (offs_n[None, :] < N),
                other=0.0,
            )
            acc += tl.dot(t.to(DOT), lt.to(DOT))
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        if GELU_QUANT:
            y = acc.to(ACT).to(tl.float32)
            inner = 0.7978845608028654 * (y + 0.044715 * (y * y * y))
            if FAST_MATH:  # one MUFU op (|error| ~ 2^-11, below ACT's rounding)
                tanh = tl.inline_asm_elementwise(
                    "tanh.approx.f32 $0, $1;", "=f,f", [inner], tl.float32, True, 1
                )
            else:
                tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
            y = (0.5 * y * (1.0 + tanh)).to(ACT).to(tl.float32)
            if HAS_OS:  # reciprocals once per tile, products per element
                s = tl.load(os_ptr + offs_n, mask=offs_n < N, other=1.0).to(ACT).to(tl.float32)
                y = (y * (1.0 / s)[None, :]).to(ACT).to(tl.float32)
            v = y * (1.0 / tl.load(oq_ptr))
            if NEXT_FP8:
                tl.store(out, _e4m3_codes(v), mask=mask)
            else:
                v = _round_half_even(v)
                codes = tl.minimum(tl.maximum(v + tl.load(oq_ptr + 1), QMIN), QMAX) - SHIFT
                codes = codes.to(tl.int32)
                tl.store(out, codes.to(tl.int8), mask=mask)
                if NEXT_SUMS:  # this tile's part of each row's code sum (integers: exact)
                    part = tl.sum(tl.where(mask, codes, 0), axis=1)
                    tl.atomic_add(nsum_ptr + offs_m, part, mask=offs_m < M, sem="relaxed")
        else:
            if RESIDUAL:  # x + gate ⊙ y (DiT's gated residual), y rounded as stored unfused
                y = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
                g_row = offs_m // ROWS_PER_GATE
                g = tl.load(gate_ptr + g_row[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
                r = tl.load(res_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
                acc = r.to(tl.float32) + g.to(tl.float32) * y
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _rank_padding(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank)) if rank else 0


TUNED_TILES = {
    "per_channel": (
        (128, 128, 64, 4, 5, 0, 1),
        (128, 128, 64, 4, 4, 2, 1),
        (128, 256, 128, 8, 3, 1, 1),
        (128, 128, 64, 4, 5, 0, 0),
        (128, 128, 64, 4, 4, 2, 0),
        (256, 128, 128, 8, 3, 0, 0),
        (128, 256, 128, 8, 3, 0, 0),
        (64, 128, 128, 4, 4, 0, 0),
        (64, 64, 128, 4, 4, 0, 0),
    ),
    "grouped": (
        (64, 128, 0, 4, 4, 0, 0),
        (64, 64, 0, 4, 4, 0, 0),
        (128, 128, 0, 8, 3, 0, 0),
        (64, 128, 0, 4, 4, 1, 0),
    ),
}
"""``(BM, BN, BK, num_warps, num_stages, PERSISTENT, TMA)`` the autotuner tries for
``int_gemm`` (BK 0: the weight group size; PERSISTENT: programs per multiprocessor, 0 for
one program per tile; TMA: operands loaded by the copy engine through tensor descriptors,
per-channel weights only): the winners of ``benchmarks/gemm_sweep.py --sweep`` on an H200
at DiT-XL/2 sizes and 512-32768 tokens. At 32,768 tokens TMA loads with 5 stages, or two
persistent programs per multiprocessor, beat the best pointer-loaded tile; one persistent
program per multiprocessor was slower (``benchmarks/RESULTS.md``: ``gemm_sweep.py --sweep``)."""


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook of TMA configurations: the descriptors' boxes are the tiles."""
    nargs["a_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["w_desc"].block_shape = [nargs["BN"], nargs["BK"]]


def _autotuned(tiles: tuple[tuple[int, ...], ...]) -> triton.runtime.Autotuner:
    configs = [
        triton.Config(
            {"BM": bm, "BN": bn, "GROUP_M": 8, "PERSISTENT": persistent, "TMA": bool(tma)}
            | ({"BK": bk} if bk else {}),
            num_warps=warps,
            num_stages=stages,
            pre_hook=_set_block_shapes if tma else None,
        )
        for bm, bn, bk, warps, stages, persistent, tma in tiles
    ]
    # The autotuner times each configuration on the call's own arguments, many runs each:
    # the code sums that fc1's epilogue adds up atomically are zeroed before every run.
    return triton.autotune(configs, key=["M", "N", "K"], reset_to_zero=["nsum_ptr"])(
        _int_gemm_kernel
    )


def _tuner_tiles(grouped: bool, tma: bool) -> tuple[tuple[int, ...], ...]:
    tiles = TUNED_TILES["grouped" if grouped else "per_channel"]
    return tiles if tma else tuple(t for t in tiles if not t[6])


_TUNED_INT_GEMM = {
    (grouped, tma): _autotuned(_tuner_tiles(grouped, tma))
    for grouped in (False, True)
    for tma in (False, True)
}
"""Autotuners by (grouped weights, TMA usable): TMA needs Triton's host-side tensor
descriptors and 16-byte aligned operands and rows."""


@contextlib.contextmanager
def fixed_tiles(tiles: tuple[int, ...], grouped: bool) -> Iterator[None]:
    """``int_gemm`` (for ``grouped`` or per-channel weights) with the one tile configuration
    ``tiles`` (a :data:`TUNED_TILES` entry) instead of the autotuned ones, e.g. to time or
    check each alone (``benchmarks/gemm_sweep.py``, ``benchmarks/kernels_check.py``)."""
    saved = dict(_TUNED_INT_GEMM)
    for tma in (False, True):
        _TUNED_INT_GEMM[grouped, tma] = _autotuned((tiles,))
    try:
        yield
    finally:
        _TUNED_INT_GEMM.update(saved)


INTERPRETER_OPTIONS = {"PERSISTENT": 0, "TMA": False}
"""The persistent-grid and TMA options the interpreter runs (one tile size, no
autotuning without a GPU; the tests run each combination; TMA for per-channel weights
only, as on the GPU)."""


def _interpreter_meta(M: int, N: int, K: int, group_size: int) -> dict:
    """One small tile for the interpreter."""
    return {
        "BM": max(16, min(64, triton.next_power_of_2(M))),
        "BN": max(16, min(64, triton.next_power_of_2(N))),
        "BK": group_size or max(32, min(64, triton.next_power_of_2(K))),
        "GROUP_M": 8,
        **INTERPRETER_OPTIONS,
    }


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Programs per PERSISTENT unit: the multiprocessor count (1 in the interpreter)."""
    if INTERPRETED:
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tma_usable(*tensors: torch.Tensor) -> bool:
    """2-D row-major operands whose base and row stride are 16-byte aligned."""
    return TensorDescriptor is not None and all(
        t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
        for t in tensors
    )


@triton.jit
def _code_tile(
    ptr, s_n, s_d, offs_n, offs_d, N, D, qparams_ptr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, QUANTIZE: tl.constexpr,
):  # fmt: skip
    """Rows ``offs_n`` of one head's codes minus the zero point (0 outside), strides
    ``s_n``, ``s_d``: the codes pass's, or with ``QUANTIZE`` computed from the head's q, k
    or v as the tile loads, ``clamp(round(x / Δ) + z) - z`` with [Δ, z] at
    ``qparams_ptr``, as :func:`_attention_codes_kernel` computes them."""
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    x = tl.load(ptr + offs_n[:, None] * s_n + offs_d[None, :] * s_d, mask=mask, other=0.0)
    if QUANTIZE:
        zero = tl.load(qparams_ptr + 1)
        codes = _codes(x.to(tl.float32), tl.load(qparams_ptr), zero, QMIN, QMAX, 0) - zero
        x = tl.where(mask, codes, 0.0)
    return x


@triton.jit
def _attention_codes_kernel(
    x_ptr, qparams_ptr, out_ptr, N, D, H, sx_b, sx_h, sx_n, sx_d,
    QMIN: tl.constexpr, QMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``clamp(round(x / s) + z) - z`` of a (BLOCK_N, D) tile of q, k or v (B, H, N, D, any
    strides) into ``out`` (B·H, N, D) contiguous, in the dot dtype: integers of at most 9
    bits, exact in BF16. Once per tensor, so that the attention passes can read codes
    instead of quantizing every key and value tile again for each query tile (the "codes
    pass" of :data:`ATTENTION_CHOICE`)."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    codes = _code_tile(
        x_ptr + b * sx_b + h * sx_h, sx_n, sx_d, offs_n, offs_d, N, D, qparams_ptr, QMIN, QMAX,
        True,
    )  # fmt: skip
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    out = out_ptr + bh * N * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(out, codes.to(out_ptr.dtype.element_ty), mask=mask)


LOG2E = tl.constexpr(1.4426950408889634)
"""log2(e): the attention passes keep scores in the base-2 domain (``exp2`` of scaled
scores), one multiplication fewer per score than ``exp``."""
MASK_FLOOR = tl.constexpr(-1e38)
"""Mask values below this are raised to it before the base-2 scaling, which would take a
``torch.finfo(float32).min`` mask to -inf: a query masked on every key then attends
uniformly, as in the simulated matmuls, instead of getting NaN."""


@triton.jit
def _attention_scores(
    cq, k_ptr, skn, skd, k_qparams_ptr, offs_m, offs_n, offs_d, Nq, Nk, D,
    alpha2, mask_ptr, smq, smk, QMIN: tl.constexpr, QMAX: tl.constexpr,
    QUANTIZE: tl.constexpr, DOT: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Scores of a query tile (codes ``cq`` over the head channels ``offs_d``) against keys
    ``offs_n`` in the base-2 domain: ``log2(e) · (alpha ·
    Σ_d cq ck + mask)`` with ``alpha2 = log2(e) · alpha`` (the integer dots are exact in
    fp32), the additive mask this head's (strides ``smq``, ``smk``), -inf for keys past
    ``Nk``."""
    ck = _code_tile(k_ptr, skn, skd, offs_n, offs_d, Nk, D, k_qparams_ptr, QMIN, QMAX, QUANTIZE)
    s = tl.dot(cq.to(DOT), tl.trans(ck.to(DOT)), out_dtype=tl.float32) * alpha2
    if HAS_MASK:
        valid = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        offs = offs_m[:, None] * smq + offs_n[None, :] * smk
        additive = tl.load(mask_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        s += tl.maximum(additive, MASK_FLOOR) * LOG2E  # finite: no -inf from float-min masks
    return tl.where((offs_n < Nk)[None, :], s, float("-inf"))


@triton.jit
def _attention_stats_kernel(
    q_ptr, k_ptr, qparams_ptr, m_ptr, l_ptr, mask_ptr, softmax_scale, Nq, Nk, D, H,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smq, smk,
    QMIN: tl.constexpr, QMAX: tl.constexpr, QUANTIZE: tl.constexpr,
    DOT: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 1 of the quantized attention: each query row's maximum m of its base-2 scores
    and softmax denominator l = Σ 2^(s - m) = Σ exp(s_e - m_e) (online over key tiles).
    A head's D channels padded to BLOCK_D, a power of two (:func:`_head_block`)."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * sqb + h * sqh
    cq = _code_tile(q_base, sqn, sqd, offs_m, offs_d, Nq, D, qparams_ptr, QMIN, QMAX, QUANTIZE)
    alpha2 = tl.load(qparams_ptr) * tl.load(qparams_ptr + 2) * (softmax_scale * LOG2E)
    k_base = k_ptr + b * skb + h * skh
    mask_base = mask_ptr + b * smb + h * smh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, Nk, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s = _attention_scores(
            cq, k_base, skn, skd, qparams_ptr + 2, offs_m, offs_n, offs_d, Nq, Nk, D, alpha2,
            mask_base, smq, smk, QMIN, QMAX, QUANTIZE, DOT, HAS_MASK,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m = m_new
    rows = offs_m < Nq
    tl.store(m_ptr + bh * Nq + offs_m, m, mask=rows)
    tl.store(l_ptr + bh * Nq + offs_m, l, mask=rows)


@triton.jit
def _attention_out_kernel(
    q_ptr, k_ptr, v_ptr, qparams_ptr, p_qparams_ptr, m_ptr, l_ptr, mask_ptr, out_ptr,
    softmax_scale, Nq, Nk, D, H, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    smb, smh, smq, smk, so_b, so_h, so_n, so_d,
    QMIN: tl.constexpr, QMAX: tl.constexpr, QUANTIZE: tl.constexpr, DOT: tl.constexpr,
    HAS_MASK: tl.constexpr, WHOLE_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 2: P = 2^(s - m) / l quantized with P's range, ``out = Δp Δv Σ cp cv``. Per
    score one exp2, one multiplication by the row's 1 / (l Δp), a rounding and a clamp to
    the codes minus the zero point: ``clamp(round(p / Δp) + z) - z = clamp(round(p / Δp),
    QMIN - z, QMAX - z)``. ``WHOLE_ROW`` (one key tile holds every key, BLOCK_N ≥ Nk, and
    P's range is static): the only pass, m and l from that tile's scores, no pass 1."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m < Nq
    q_base = q_ptr + b * sqb + h * sqh
    cq = _code_tile(q_base, sqn, sqd, offs_m, offs_d, Nq, D, qparams_ptr, QMIN, QMAX, QUANTIZE)
    alpha2 = tl.load(qparams_ptr) * tl.load(qparams_ptr + 2) * (softmax_scale * LOG2E)
    p_scale = tl.load(p_qparams_ptr)
    p_zero = tl.load(p_qparams_ptr + 1)
    if WHOLE_ROW:  # set from the one key tile below
        m = tl.zeros([BLOCK_M], tl.float32)
        per_code = m
    else:
        m = tl.load(m_ptr + bh * Nq + offs_m, mask=rows, other=0.0)
        l = tl.load(l_ptr + bh * Nq + offs_m, mask=rows, other=1.0)
        per_code = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), l * p_scale)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    mask_base = mask_ptr + b * smb + h * smh
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, Nk, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s = _attention_scores(
            cq, k_base, skn, skd, qparams_ptr + 2, offs_m, offs_n, offs_d, Nq, Nk, D, alpha2,
            mask_base, smq, smk, QMIN, QMAX, QUANTIZE, DOT, HAS_MASK,
        )  # fmt: skip
        if WHOLE_ROW:
            m = tl.max(s, axis=1)
        e = tl.exp2(s - m[:, None])
        if WHOLE_ROW:
            per_code = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), tl.sum(e, 1) * p_scale)
        cp = _round_half_even(e * per_code[:, None])
        cp = tl.minimum(tl.maximum(cp, QMIN - p_zero), QMAX - p_zero)  # v's codes: 0 past Nk
        cp = cp.to(DOT)
        cv = _code_tile(
            v_base, svn, svd, offs_n, offs_d, Nk, D, qparams_ptr + 4, QMIN, QMAX, QUANTIZE
        )
        acc = tl.dot(cp, cv.to(DOT), acc=acc, out_dtype=tl.float32)
    out_scale = p_scale * tl.load(qparams_ptr + 4)
    out_rows = out_ptr + b * so_b + h * so_h + offs_m[:, None] * so_n
    mask = rows[:, None] & (offs_d < D)[None, :]
    out = (acc * out_scale).to(out_ptr.dtype.element_ty)
    tl.store(out_rows + offs_d[None, :] * so_d, out, mask=mask)


_PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


def _placeholder(like: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an absent optional input on ``like``'s device (never read):
    one empty tensor per device (a null pointer), not an allocation per argument and call
    (host time). It owns no memory, so none of it can lie in a CUDA graph's pool, which
    ``torch.compile``'s CUDA graphs refuse when it outlives the capture."""
    tensor = _PLACEHOLDERS.get(like.device)
    if tensor is None:
        tensor = _PLACEHOLDERS[like.device] = torch.empty(0, device=like.device)
    return tensor


@torch.library.custom_op("ditq::quantize_act", mutates_args=())
def quantize_act(
    x: torch.Tensor,
    input_scale: torch.Tensor | None,
    static_qparams: torch.Tensor | None,
    qmin: int,
    qmax: int,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (M, K) int8, scale (M,) fp32, shifted zero point (M,) int32, code sum (M,)
    int32 of a (M, K) tensor; ``static_qparams`` = [scale, zero point] (fp32, on the
    device) or None for dynamic per-token ranges."""
    M, K = x.shape
    codes = torch.empty((M, K), device=x.device, dtype=torch.int8)
    scale = torch.empty(M, device=x.device, dtype=torch.float32)
    zero = torch.empty(M, device=x.device, dtype=torch.int32)
    sums = torch.empty(M, device=x.device, dtype=torch.int32)
    if M:
        block = triton.next_power_of_2(K)
        _quantize_act_kernel[(M,)](
            x,
            input_scale if input_scale is not None else _placeholder(x),
            codes,
            scale,
            zero,
            sums,
            static_qparams if static_qparams is not None else _placeholder(x),
            K,
            x.stride(0),
            QMIN=qmin,
            QMAX=qmax,
            SHIFT=0 if symmetric else _SHIFT,
            HAS_S=input_scale is not None,
            DYNAMIC=static_qparams is None,
            SYMMETRIC=symmetric,
            BLOCK_K=block,
            num_warps=8 if block >= 2048 else 4,
        )
    return codes, scale, zero, sums


@quantize_act.register_fake
def _(x, input_scale, static_qparams, qmin, qmax, symmetric):
    M, K = x.shape
    rows = [x.new_empty(M, dtype=dtype) for dtype in (torch.float32, torch.int32, torch.int32)]
    return (x.new_empty((M, K), dtype=torch.int8), *rows)


@torch.library.custom_op("ditq::norm_quantize", mutates_args=())
def norm_quantize(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    input_scale: torch.Tensor | None,
    static_qparams: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    fp8: bool,
    code_sums: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (M, K), int8 or with ``fp8`` e4m3, and with ``code_sums`` their row sums (M,)
    int32 (else, and for e4m3, an empty tensor) of a DiT block's modulated LayerNorm
    ``LayerNorm(x) ⊙ (1 + scale) + shift`` with the static range ``static_qparams`` = [Δ,
    z] (after the division by ``input_scale``) in one kernel: x (M, K) holds B = len(shift)
    batches of M / B rows, shift and scale (B, K) (any row stride). The statistics and the
    modulated value stay in fp32, where the torch model rounds the norm's and the
    modulation's outputs to its dtype: a code may differ by one at a rounding tie."""
    M, K = x.shape
    x, shift, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, shift, scale))
    codes = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    summed = code_sums and not fp8
    sums = torch.empty(M if summed else 0, device=x.device, dtype=torch.int32)
    if not M:
        return codes, sums
    if INTERPRETED:  # no autotuning without a GPU
        pieces = _row_pieces(K, ROW_LAYOUTS[-1])
        kernel, tiles = _norm_quantize_kernel, dict(ROWS=2, **pieces)
    else:
        kernel, tiles = _tuned_norm_quantize(K, ROW_LAYOUTS), {}
    kernel[lambda meta: (triton.cdiv(M, meta["ROWS"]),)](
        x, shift, scale, input_scale if input_scale is not None else _placeholder(x),
        static_qparams, codes, sums, M, K, M // len(shift), x.stride(0), shift.stride(0),
        scale.stride(0), eps, QMIN=qmin, QMAX=qmax, SHIFT=0 if symmetric else _SHIFT,
        HAS_S=input_scale is not None, FP8=fp8, SUMS=summed, **tiles,
    )  # fmt: skip
    return codes, sums


@norm_quantize.register_fake
def _(
    x, shift, scale, eps, input_scale, static_qparams, qmin, qmax, symmetric, fp8, code_sums=True
):
    dtype = torch.float8_e4m3fn if fp8 else torch.int8
    rows = x.shape[0] if code_sums and not fp8 else 0
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(rows, dtype=torch.int32)


@torch.library.custom_op("ditq::quantize_act_groups", mutates_args=())
def quantize_act_groups(
    x: torch.Tensor,
    input_scale: torch.Tensor | None,
    group_size: int,
    qmin: int,
    qmax: int,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (M, K) int8, scale (M, K / g) fp32 and shifted zero point (M, K / g) int32 of a
    (M, K) tensor with a dynamic range per token and group of ``group_size`` channels."""
    M, K = x.shape
    groups = K // group_size
    codes = torch.empty((M, K), device=x.device, dtype=torch.int8)
    scale = torch.empty((M, groups), device=x.device, dtype=torch.float32)
    zero = torch.empty((M, groups), device=x.device, dtype=torch.int32)
    if M:
        groups_p = triton.next_power_of_2(groups)
        _quantize_act_groups_kernel[(M,)](
            x,
            input_scale if input_scale is not None else _placeholder(x),
            codes,
            scale,
            zero,
            K,
            groups,
            x.stride(0),
            QMIN=qmin,
            QMAX=qmax,
            SHIFT=0 if symmetric else _SHIFT,
            HAS_S=input_scale is not None,
            SYMMETRIC=symmetric,
            G=group_size,
            GROUPS_P=groups_p,
            num_warps=8 if groups_p * group_size >= 2048 else 4,
        )
    return codes, scale, zero


@quantize_act_groups.register_fake
def _(x, input_scale, group_size, qmin, qmax, symmetric):
    M, K = x.shape
    groups = K // group_size
    return (
        x.new_empty((M, K), dtype=torch.int8),
        x.new_empty((M, groups), dtype=torch.float32),
        x.new_empty((M, groups), dtype=torch.int32),
    )


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@torch.library.custom_op("ditq::int_gemm", mutates_args=())
def int_gemm(
    codes: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor | None,
    x_sum: torch.Tensor | None,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    w_sum: torch.Tensor | None,
    bias: torch.Tensor | None,
    lowrank_t: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    group_size: int,
    has_x_zero: bool,
    x_grouped: bool,
    out_dtype: torch.dtype,
    next_qparams: torch.Tensor | None = None,
    next_input_scale: torch.Tensor | None = None,
    next_qmin: int = 0,
    next_qmax: int = 0,
    next_symmetric: bool = True,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    packed_int4: bool = False,
    fp8: bool = False,
    next_sums: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` (M, N) in ``out_dtype`` from int8 activation codes (M, K) and int8 weight codes
    (N, K); ``group_size`` 0 for per-channel weight scales (w_scale (N,)), else the
    input-channel group size (w_scale (N, K / g)). ``x_grouped``: ``x_scale``/``x_zero`` are
    (M, K / g), one range per token and group (then ``group_size`` is that group). ``x_sum``
    is read only for per-channel weights with zero points.

    With ``next_qparams`` (the next layer's static input [scale, zero point]) the epilogue
    instead applies GELU (tanh) to ``y`` (rounded to ``out_dtype``), divides by
    ``next_input_scale`` if given and returns the next layer's int8 input codes (M, N), shifted
    by -128 when asymmetric as ``quantize_act``'s: ``y`` itself is never written. With
    ``next_sums`` the epilogue also adds up each row's int codes: the second output, (M,)
    int32, the next layer's code sums that weights with zero points need (else empty).

    With ``residual`` (M, N) and ``gate`` (B, N), M a multiple of B, the epilogue returns
    ``residual + gate[m // (M / B)] ⊙ y`` (a DiT block's gated residual; y rounded to
    ``out_dtype`` first, as an unfused ``y`` would be stored): ``y`` is never written.

    ``packed_int4``: ``weight`` holds packed int4 bytes (N, K / 2) of nibbles ``u`` (codes
    ``u - 8``, input channel 2j in byte j's low nibble), unpacked in registers: each K
    block's BK / 2 bytes per channel become BK codes in input-channel order (low and high
    nibbles interleaved), one dot with the block's contiguous activation codes.

    ``fp8``: e4m3 activation and weight codes instead (:func:`fp8_gemm`'s Triton path):
    per-row and per-channel float scales, no zero points or groups; the next layer's codes
    are e4m3."""
    M, N, K = codes.shape[0], weight.shape[0], codes.shape[1]
    quantized = next_qparams is not None
    code_dtype = torch.float8_e4m3fn if fp8 else torch.int8
    out = torch.empty((M, N), device=codes.device, dtype=code_dtype if quantized else out_dtype)
    summed = next_sums and quantized and not fp8
    sums = torch.zeros(M if summed else 0, device=codes.device, dtype=torch.int32)
    if not M:
        return out, sums
    rank = 0 if lowrank_t is None else lowrank_t.shape[1]
    if INTERPRETED:
        meta = _interpreter_meta(M, N, K, group_size)
        tma = meta["TMA"] = (
            meta["TMA"] and not group_size and not packed_int4 and _tma_usable(codes, weight)
        )
        launcher = _int_gemm_kernel
    else:
        tma = not group_size and not packed_int4 and _tma_usable(codes, weight)
        launcher = _TUNED_INT_GEMM[bool(group_size), tma]
        meta = {"BK": group_size} if group_size else {}
    a_desc = w_desc = _placeholder(codes)
    if tma:  # boxes set per configuration (_set_block_shapes); the interpreter's here
        box_k = meta.get("BK", 64)
        a_desc = TensorDescriptor.from_tensor(codes, [meta.get("BM", 64), box_k])
        w_desc = TensorDescriptor.from_tensor(weight, [meta.get("BN", 64), box_k])

    def grid(config: dict) -> tuple[int]:
        tiles = triton.cdiv(M, config["BM"]) * triton.cdiv(N, config["BN"])
        if config["PERSISTENT"]:
            return (min(tiles, config["PERSISTENT"] * _multiprocessors(codes.device)),)
        return (tiles,)

    kernel = launcher[grid]
    optional = lambda t: t if t is not None else _placeholder(codes)  # noqa: E731
    kernel(
        codes, weight, a_desc, w_desc, x_scale, optional(x_zero), optional(x_sum), w_scale,
        optional(w_zero), optional(w_sum), optional(bias), optional(lowrank_t),
        optional(lowrank_up), out,
        optional(next_qparams), optional(next_input_scale), optional(residual), optional(gate),
        sums, M, N, K, max(1, K // group_size) if group_size else 1, weight.stride(0),
        out.stride(0), M // gate.shape[0] if gate is not None else 1,
        GROUPED=bool(group_size), X_GROUPED=x_grouped, HAS_XZP=has_x_zero,
        HAS_WZP=w_zero is not None, HAS_BIAS=bias is not None, R=rank, RP=_rank_padding(rank),
        DOT=_DOT_DTYPE,
        GELU_QUANT=quantized, HAS_OS=next_input_scale is not None, NEXT_SUMS=summed,
        RESIDUAL=residual is not None,
        PACKED=packed_int4, FP8=fp8, NEXT_FP8=fp8 and quantized,
        FAST_MATH=not INTERPRETED, ACT=_TL_DTYPES[out_dtype],
        QMIN=next_qmin, QMAX=next_qmax, SHIFT=0 if next_symmetric else _SHIFT, **meta,
    )  # fmt: skip
    return out, sums


@int_gemm.register_fake
def _(codes, x_scale, x_zero, x_sum, weight, w_scale, w_zero, w_sum, bias, lowrank_t,
      lowrank_up, group_size, has_x_zero, x_grouped, out_dtype, next_qparams=None,
      next_input_scale=None, next_qmin=0, next_qmax=0, next_symmetric=True, residual=None,
      gate=None, packed_int4=False, fp8=False, next_sums=False):  # fmt: skip
    code_dtype = torch.float8_e4m3fn if fp8 else torch.int8
    quantized = next_qparams is not None
    dtype = code_dtype if quantized else out_dtype
    summed = next_sums and quantized and not fp8
    M = codes.shape[0]
    out = codes.new_empty((M, weight.shape[0]), dtype=dtype)
    return out, codes.new_empty(M if summed else 0, dtype=torch.int32)


@torch.library.custom_op("ditq::fp8_gemm", mutates_args=())
def fp8_gemm(
    codes: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    lowrank_t: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    out_dtype: torch.dtype,
    next_scale: torch.Tensor | None = None,
    next_input_scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    w_zero: torch.Tensor | None = None,
    packed_int4: bool = False,
) -> torch.Tensor:
    """``y = (a ⊙ x_scale) (w ⊙ w_scale)ᵀ + b (+ T Lᵀ)`` (M, N) in ``out_dtype`` from e4m3
    activation codes ``a`` (M, K), per-row scales (M,), e4m3 weight codes ``w`` (N, K) and
    per-channel scales (N,), accumulated in fp32 on FP8 tensor cores; the epilogues of
    :func:`int_gemm`: with ``next_scale`` (the next layer's static input [scale, ...]) GELU,
    the division by ``next_input_scale`` and that layer's e4m3 input codes (saturated at
    ±448, rounded to nearest even) instead of ``y``; with ``residual`` and ``gate`` the DiT
    block's gated residual ``residual + gate ⊙ y``. With ``packed_int4`` the weight is
    packed int4 bytes (N, K / 2) as :func:`int_gemm` reads them and ``w`` = ``u - 8 -
    w_zero`` (fp32 zero points (N,), or None), exact in e4m3 (|w| <= 15): the Triton kernel
    unpacks it in registers.

    Runs on the faster of the Triton kernel (epilogues fused) and ``torch._scaled_mm``
    (cuBLAS; the epilogues as torch ops after it) for the shape (M, N, K), measured once per
    shape on the GPU (:data:`FP8_GEMM_CHOICE`); the Triton kernel in the interpreter and for
    packed int4 weights, ``torch._scaled_mm`` on other CPUs."""
    if INTERPRETED or packed_int4:
        choice = "triton"
    elif codes.device.type != "cuda":
        choice = "cublas"
    else:
        epilogue = "residual" if gate is not None else ""
        epilogue = "next-codes" if next_scale is not None else epilogue
        key = (codes.shape[0], weight.shape[0], codes.shape[1], epilogue)
        runs = functools.partial(_fp8_gemm_runs, *key, codes.device)
        choice = _chosen(FP8_GEMM_CHOICE, key, runs, default="cublas")
    if choice == "triton":
        return _fp8_triton(
            codes, x_scale, weight, w_scale, bias, lowrank_t, lowrank_up, out_dtype, next_scale,
            next_input_scale, residual, gate, w_zero, packed_int4,
        )  # fmt: skip
    return _fp8_cublas(
        codes, x_scale, weight, w_scale, bias, lowrank_t, lowrank_up, out_dtype, next_scale,
        next_input_scale, residual, gate,
    )  # fmt: skip


FP8_GEMM_CHOICE: dict[tuple[int, int, int, str], str] = {}
"""``"triton"`` or ``"cublas"`` per GEMM shape and epilogue (M, N, K, epilogue of
:func:`_fp8_gemm_runs`), measured by :func:`fp8_gemm`'s first call of that key on the GPU
(:func:`_chosen`)."""


def _fp8_gemm_runs(M: int, N: int, K: int, epilogue: str, device: torch.device) -> dict:
    """The two paths of an FP8 GEMM of shape (M, N, K) with ``epilogue`` on random operands:
    ``""`` (BF16 output), ``"next-codes"`` (GELU and the next layer's e4m3 codes) or
    ``"residual"`` (the gated residual), each path with the work it does after the product
    (fused in the Triton kernel, torch ops after cuBLAS), so that the choice weighs both."""
    a = torch.randn(M, K, device=device).to(torch.float8_e4m3fn)
    w = torch.randn(N, K, device=device).to(torch.float8_e4m3fn)
    xs, ws = torch.ones(M, device=device), torch.ones(N, device=device)
    extra: dict[str, torch.Tensor] = {}
    if epilogue == "next-codes":
        extra["next_scale"] = torch.ones(2, device=device)
    elif epilogue == "residual":
        extra["residual"] = torch.randn(M, N, device=device, dtype=torch.bfloat16)
        extra["gate"] = torch.randn(1, N, device=device, dtype=torch.bfloat16)
    return {
        name: lambda run=run: run(a, xs, w, ws, None, None, None, torch.bfloat16, **extra)
        for name, run in (("triton", _fp8_triton), ("cublas", _fp8_cublas))
    }


def _fp8_triton(
    codes, x_scale, weight, w_scale, bias, lowrank_t, lowrank_up, out_dtype, next_scale=None,
    next_input_scale=None, residual=None, gate=None, w_zero=None, packed_int4=False,
) -> torch.Tensor:  # fmt: skip
    return int_gemm(
        codes, x_scale, None, None, weight, w_scale, w_zero, None, bias, lowrank_t, lowrank_up,
        0, False, False, out_dtype, next_scale, next_input_scale, 0, 0, True, residual, gate,
        packed_int4, fp8=True,
    )[0]  # fmt: skip


def _fp8_cublas(
    codes, x_scale, weight, w_scale, bias, lowrank_t, lowrank_up, out_dtype, next_scale=None,
    next_input_scale=None, residual=None, gate=None,
) -> torch.Tensor:  # fmt: skip
    """:func:`fp8_gemm` through ``torch._scaled_mm`` (bias in its epilogue, output in BF16:
    the FP8 GEMM's), then its epilogues as torch ops with the kernel's arithmetic."""
    y = torch._scaled_mm(
        codes,
        weight.t(),
        scale_a=x_scale.reshape(-1, 1),
        scale_b=w_scale.reshape(1, -1),
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    ).to(out_dtype)
    if lowrank_t is not None:
        y = y + torch.nn.functional.linear(lowrank_t.to(out_dtype), lowrank_up.to(out_dtype))
    if next_scale is not None:
        h = torch.nn.functional.gelu(y, approximate="tanh")
        if next_input_scale is not None:
            h = h * (1.0 / next_input_scale.to(out_dtype))
        v = h.float() * (1.0 / next_scale[0])
        return v.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    if residual is not None:  # one kernel: the gate broadcast over its sample's rows
        per_sample = (len(gate), len(y) // len(gate), y.shape[1])
        return torch.addcmul(
            residual.reshape(per_sample), gate.unsqueeze(1), y.view(per_sample)
        ).view_as(y)
    return y


@fp8_gemm.register_fake
def _(codes, x_scale, weight, w_scale, bias, lowrank_t, lowrank_up, out_dtype, next_scale=None,
      next_input_scale=None, residual=None, gate=None, w_zero=None, packed_int4=False):  # fmt: skip
    dtype = torch.float8_e4m3fn if next_scale is not None else out_dtype
    return codes.new_empty((codes.shape[0], weight.shape[0]), dtype=dtype)


CODE_ROWS = 64
"""Rows of q, k or v per program of the code pass (an elementwise kernel)."""
ATTENTION_TILES = ((64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 128, 4, 2),
                   (128, 64, 8, 2), (128, 128, 8, 2))  # fmt: skip
"""``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` the autotuner tries for each of the two
passes of ``quant_attention``, per (Nq, Nk, D); not yet swept on a GPU."""
ONE_PASS_TILES = ((32, 4, 1), (64, 4, 1), (64, 8, 1), (128, 8, 1))
"""``(BLOCK_M, num_warps, num_stages)`` the autotuner tries for the one-pass attention
(BLOCK_N: every key); not yet swept on a GPU."""
ONE_PASS_KEYS = 256
"""At most this many keys (DiT-XL/2 at 256 px has 256 tokens) for the one-pass attention:
a query tile's scores over every key held in registers."""


def _attention_tuner(kernel, configs: list[triton.Config]) -> triton.runtime.Autotuner:
    return triton.autotune(configs, key=["Nq", "Nk", "D"])(kernel)


_TUNED_ATTENTION = tuple(
    _attention_tuner(
        kernel,
        [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in ATTENTION_TILES
        ],
    )
    for kernel in (_attention_stats_kernel, _attention_out_kernel)
)
_TUNED_ONE_PASS = _attention_tuner(
    _attention_out_kernel,
    [
        triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)
        for bm, warps, stages in ONE_PASS_TILES
    ],
)


def _head_block(D: int) -> int:
    """The attention kernels' tile width of a head's D channels: the power of two of at
    least 16 (a dot's smallest) that holds them, the rest masked (DiT-XL/2's 72 in 128).
    Two parts (72 as 64 + 16) gave wrong outputs on an H100 with Triton 3.6 in six of the
    ten tile configurations and faulted in two (benchmarks/RESULTS.md, issue 19)."""
    return max(16, triton.next_power_of_2(D))


TILE_CODES = "tile codes"
"""Suffix of the attention paths that quantize q, k and v as each tile loads, instead of
once in a codes pass before the attention passes."""
ATTENTION_CHOICE: dict[tuple[int, int, int, bool, bool], str] = {}
"""The attention path per (Nq, Nk, D, masked, P's range static): ``"one-pass"`` (P's range
static, at most :data:`ONE_PASS_KEYS` keys) or ``"two-pass"``, each with the codes pass or
with ``" tile codes"`` (:data:`TILE_CODES`), measured by ``quant_attention``'s first call of
that key on the GPU (:func:`_chosen`); the interpreter runs one pass with the codes pass
(two where P's range is dynamic) unless this says otherwise."""


@torch.library.custom_op("ditq::quant_attention", mutates_args=())
def quant_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qkv_qparams: torch.Tensor,
    p_qparams: torch.Tensor | None,
    softmax_scale: float,
    bits: int,
    symmetric: bool,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with quantized matmul inputs, fused: q (B, H, Nq, D), k and v (B, H, Nk,
    D) in any strides, ``mask`` an additive score mask broadcastable to (B, H, Nq, Nk) (as
    diffusers' cross-attention has one) or None;
    ``qkv_qparams`` = [Δq, zq, Δk, zk, Δv, zv] (fp32, on the device);
    ``p_qparams`` = [Δp, zp], or None for P's dynamic per-tensor range (from the row
    denominators of pass 1: max P = max 1 / l, min P ≥ 0). q, k and v are quantized once
    (:func:`_attention_codes_kernel`) or as each tile loads; then two passes over the keys,
    with no score matrix in memory, or one where P's range is static and one tile holds
    every key: the fastest of these paths per shape (:data:`ATTENTION_CHOICE`). Output (B,
    H, Nq, D) in q's dtype, laid out (B, Nq, H, D)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = torch.empty((B, Nq, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    if not B * H * Nq:
        return out
    qmin, qmax = integer_range(bits, symmetric)
    mask_strides = (0, 0, 0, 0) if mask is None else mask.expand(B, H, Nq, Nk).stride()
    mask_ptr = _placeholder(q) if mask is None else mask
    meta = dict(DOT=_DOT_DTYPE, HAS_MASK=mask is not None, QMIN=qmin, QMAX=qmax)
    meta["BLOCK_D"] = _head_block(D)

    def codes_pass() -> list[torch.Tensor]:
        """q, k and v as codes (B, H, N, D), in the dot dtype."""
        code_dtype = torch.float32 if INTERPRETED else torch.bfloat16
        codes = []
        for i, x in enumerate((q, k, v)):
            N = x.shape[2]
            c = torch.empty((B, H, N, D), device=q.device, dtype=code_dtype)
            _attention_codes_kernel[(triton.cdiv(N, CODE_ROWS), B * H)](
                x, qkv_qparams[2 * i :], c, N, D, H, *x.stride(),
                QMIN=qmin, QMAX=qmax, BLOCK_N=CODE_ROWS, BLOCK_D=meta["BLOCK_D"],
            )  # fmt: skip
            codes.append(c)
        return codes

    def grid(config: dict) -> tuple[int, int]:
        return (triton.cdiv(Nq, config["BLOCK_M"]), B * H)

    def operands(quantize: bool) -> tuple[list[torch.Tensor], list[int]]:
        """q, k and v (``quantize``: the kernels quantize their tiles) or their codes, and
        the four strides of each."""
        tensors = [q, k, v] if quantize else codes_pass()
        return tensors, [stride for x in tensors for stride in x.stride()]

    def two_passes(quantize: bool) -> None:
        tensors, strides = operands(quantize)
        stats = torch.empty((2, B * H, Nq), device=q.device, dtype=torch.float32)
        stats_kernel, out_kernel = _TUNED_ATTENTION
        tiles = {}
        if INTERPRETED:  # one small tile, no autotuning without a GPU
            stats_kernel, out_kernel = _attention_stats_kernel, _attention_out_kernel
            tiles = dict(BLOCK_M=16, BLOCK_N=16)
        stats_kernel[grid](
            *tensors[:2], qkv_qparams, stats[0], stats[1], mask_ptr, softmax_scale, Nq, Nk, D,
            H, *strides[:8], *mask_strides, QUANTIZE=quantize, **meta, **tiles,
        )  # fmt: skip
        p_range = p_qparams
        if p_range is None:
            p_max = stats[1].reciprocal().amax().reshape(1, 1)
            p_range = torch.cat(compute_qparams(torch.zeros_like(p_max), p_max, bits, symmetric))
        out_kernel[grid](
            *tensors, qkv_qparams, p_range.reshape(2), stats[0], stats[1], mask_ptr, out,
            softmax_scale, Nq, Nk, D, H, *strides, *mask_strides, *out.stride(),
            QUANTIZE=quantize, WHOLE_ROW=False, **meta, **tiles,
        )  # fmt: skip

    def one_pass(quantize: bool) -> None:
        tensors, strides = operands(quantize)
        kernel = _attention_out_kernel if INTERPRETED else _TUNED_ONE_PASS
        tiles = dict(BLOCK_M=16) if INTERPRETED else {}
        unread = _placeholder(q)  # m and l: from the one key tile
        kernel[grid](
            *tensors, qkv_qparams, p_qparams.reshape(2), unread, unread, mask_ptr, out,
            softmax_scale, Nq, Nk, D, H, *strides, *mask_strides, *out.stride(),
            QUANTIZE=quantize, WHOLE_ROW=True, BLOCK_N=max(16, triton.next_power_of_2(Nk)),
            **meta, **tiles,
        )  # fmt: skip

    passes = {"two-pass": two_passes}
    if p_qparams is not None and Nk <= ONE_PASS_KEYS:
        passes["one-pass"] = one_pass
    runs = {
        f"{name}{' ' + TILE_CODES if quantize else ''}": functools.partial(run, quantize)
        for name, run in passes.items()
        for quantize in (False, True)
    }
    key = (Nq, Nk, D, mask is not None, p_qparams is not None)
    default = "one-pass" if "one-pass" in passes else "two-pass"
    runs[_chosen(ATTENTION_CHOICE, key, lambda: runs, default=default)]()
    return out


def _chosen(
    table: dict, key: tuple, runs: Callable[[], dict[str, Callable[[], object]]], default: str
) -> str:
    """``table[key]``: on a shape's first call on the GPU the fastest of ``runs()`` by
    :func:`_gpu_ms` (the GPU's time, which is what a call costs in a CUDA graph and wherever
    the GPU is the bottleneck), kept for the later calls; ``default`` in the interpreter and
    while a CUDA graph is being captured (untimed, until a call outside one)."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if key not in table and not INTERPRETED and not capturing:
        times = {name: _gpu_ms(run) for name, run in runs().items()}
        table[key] = min(times, key=times.get)
        CHOICE_TIMES[key] = times
    return table.get(key, default)


CHOICE_TIMES: dict[tuple, dict[str, float]] = {}
"""What :func:`_chosen` measured, per key of :data:`FP8_GEMM_CHOICE` and
:data:`ATTENTION_CHOICE`: GPU milliseconds per path (``ditq bench`` reports them)."""

GPU_MS_REPS = 25
"""Timed runs of :func:`_gpu_ms` (their median)."""
SLEEP_CYCLES = (1 << 24, 1 << 32)
"""The first and the longest GPU sleep of :func:`_gpu_ms`, in clock cycles (about 10 ms
and 2.5 s on an H100)."""


def _gpu_ms(run: Callable[[], object], reps: int = GPU_MS_REPS) -> float:
    """The median GPU time of ``run()`` in milliseconds, without the host's: the ``reps``
    timed runs, each after an L2 flush as in ``triton.testing.do_bench``, are queued behind
    a GPU sleep, so the host has issued them all before the GPU reaches them. Where the
    first run had started before the host was done, the sleep is 4× longer next time (up
    to :data:`SLEEP_CYCLES`, whose last try is kept as it is). One untimed run first (the
    Triton autotuning). ``do_bench`` times each run from its launch on the host, which for
    a short kernel behind a slow launch path (a custom op, the autotuner's dispatch) is
    the host's time."""
    run()
    torch.cuda.synchronize()
    driver = triton.runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()
    cycles, longest = SLEEP_CYCLES
    while True:
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(reps)
        ]
        torch.cuda._sleep(cycles)
        for start, end in events:
            driver.clear_cache(cache)
            start.record()
            run()
            end.record()
        queued = not events[0][0].query()
        torch.cuda.synchronize()
        if queued or cycles >= longest:
            return statistics.median(start.elapsed_time(end) for start, end in events)
        cycles *= 4


@quant_attention.register_fake
def _(q, k, v, qkv_qparams, p_qparams, softmax_scale, bits, symmetric, mask=None):
    B, H, Nq, D = q.shape
    return q.new_empty((B, Nq, H, D)).transpose(1, 2)


@triton.jit
def _gptq_columns_kernel(
    block_ptr,
    hinv_ptr,
    scale_ptr,
    zero_ptr,
    q_ptr,
    err_ptr,
    rows,
    B,
    first,
    last,
    q_stride,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """GPTQ's inner loop (``ditq.quant.gptq.solve_columns``) for BLOCK_R rows of a lazy
    batch of B columns, the rows' block held in registers through the columns
    ``first`` to ``last - 1``; IEEE divisions as torch's."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_B)
    live = r < rows
    tile = live[:, None] & (c < B)[None, :]
    block = tl.load(block_ptr + r[:, None] * B + c[None, :], mask=tile, other=0.0)
    for i in range(first, last):
        value = tl.sum(tl.where((c == i)[None, :], block, 0.0), axis=1)
        scale = tl.load(scale_ptr + r * B + i, mask=live, other=1.0)
        scaled = tl.math.div_rn(value, scale)
        if FP8:
            scaled = tl.minimum(tl.maximum(scaled, -FP8_MAX), FP8_MAX)
            quantized = _e4m3_codes(scaled).to(tl.float32) * scale
        else:
            zero = tl.load(zero_ptr + r * B + i, mask=live, other=0.0)
            codes = tl.minimum(tl.maximum(_round_half_even(scaled) + zero, QMIN), QMAX)
            quantized = (codes - zero) * scale
        error = tl.math.div_rn(value - quantized, tl.load(hinv_ptr + i * B + i))
        row = tl.load(hinv_ptr + i * B + c, mask=(c >= i) & (c < B), other=0.0)
        block -= error[:, None] * row[None, :]
        tl.store(q_ptr + r * q_stride + i, quantized, mask=live)
        tl.store(err_ptr + r * B + i, error, mask=live)
    tl.store(block_ptr + r[:, None] * B + c[None, :], block, mask=tile)


GPTQ_ROWS = 16
"""Rows of a lazy batch per program of the GPTQ kernel."""


def gptq_columns(batch: LazyBatch, spec: QuantSpec, first: int, last: int) -> None:
    """``ditq.quant.gptq.solve_columns`` in one kernel launch (fp32): every row of the
    lazy batch is independent, so each program keeps BLOCK_R rows' columns in registers
    for the whole loop instead of a dozen launches per column."""
    rows, width = batch.block.shape
    for tensor in (batch.block, batch.hinv, batch.scale, batch.zero, batch.errors):
        if not tensor.is_contiguous() or tensor.dtype != torch.float32:
            raise ValueError("gptq_columns takes contiguous fp32 tensors")
    if batch.quantized.stride(1) != 1:
        raise ValueError("gptq_columns needs the quantized columns' rows contiguous")
    fp8 = spec.fmt == "fp8_e4m3"
    qmin, qmax = (0, 0) if fp8 else integer_range(spec.bits, spec.symmetric)
    _gptq_columns_kernel[(triton.cdiv(rows, GPTQ_ROWS),)](
        batch.block,
        batch.hinv,
        batch.scale,
        batch.zero,
        batch.quantized,
        batch.errors,
        rows,
        width,
        first,
        last,
        batch.quantized.stride(0),
        QMIN=qmin,
        QMAX=qmax,
        FP8=fp8,
        BLOCK_R=GPTQ_ROWS,
        BLOCK_B=triton.next_power_of_2(width),
    )
