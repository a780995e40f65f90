"""Triton kernels of the ``cuda`` backend (written for sm_90; they also run in the Triton
interpreter, ``TRITON_INTERPRET=1``, which is how the CPU tests check them).

Three kernels, each wrapped as a ``torch.library`` custom op so that ``torch.compile`` keeps
them as opaque calls and fuses the BF16 code around them:

- ``quantize_act``: activation codes of a (M, K) tensor, one program per row: optional
  online ``input_scale`` division, static per-tensor (scale and zero point read from the
  device, so dynamic per-tensor ranges computed by torch need no host sync) or dynamic
  per-token ranges, round half to even as ``torch.round``. Asymmetric codes are shifted by
  -128 into int8 (``q' = q - 128``, ``z' = z - 128``) so that tensor cores take them.
  Returns codes, per-row scale, per-row zero point ``z'`` and per-row code sum ``Σ_k q'``.
- ``int_gemm``: int8 activation codes x int8 or packed int4 weight codes -> int32 on tensor
  cores, dequantization in the epilogue. Per-channel weights accumulate the whole K in
  int32: ``y = Δx·Δw·(Σ q'x q'w − z'w Σ q'x − z'x Σ q'w + K z'x z'w) + b``. Per-group
  weights (W4A8, W8A8 with groups) use BLOCK_K = group size: each K block's int32 partial
  sum, zero-point corrected with the block's code sums, is scaled by that group's weight
  scale and added to an fp32 accumulator. Int4 nibbles are unpacked in registers.
- ``dequant_gemm``: weight codes (int8 or packed int4) dequantized in registers to BF16
  with scales and zero points gathered per element, so any weight granularity works
  (per-channel, per-group, DiTAS' per-column-group). Activations are BF16 (W4A16, W8A16)
  or int8 codes turned into the exact BF16 integers ``q'x − z'x`` (W4A8 with column-group
  weights, whose scale varies along K inside any block), scaled by Δx in the epilogue.

Both GEMMs add ``T · Lᵀ`` in their epilogue when given the DiTAS low-rank intermediate
``T = x Rᵀ`` (M, r) and ``L`` (N, r): one extra small dot per output tile instead of a
second GEMM launch and an add.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_SHIFT = 128  # asymmetric codes [0, 2^b - 1] are stored shifted by -128 into int8
_DOT_DTYPE = tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else tl.bfloat16
"""BF16 tensor-core dots; fp32 under the interpreter, whose BF16 dot is wrong (numpy has
no bfloat16), so the CPU tests check the same kernels with exact operands."""


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


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
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0)
    if HAS_S:
        s = tl.load(s_ptr + offs, mask=mask, other=1.0).to(x.dtype)
        x = tl.math.div_rn(x.to(tl.float32), s.to(tl.float32)).to(x.dtype)  # as torch: x / s
    x = x.to(tl.float32)
    if DYNAMIC:
        x_min = tl.minimum(tl.min(tl.where(mask, x, 0.0), axis=0), 0.0)
        x_max = tl.maximum(tl.max(tl.where(mask, x, 0.0), axis=0), 0.0)
        if SYMMETRIC:
            scale = tl.maximum(tl.math.div_rn(tl.maximum(-x_min, x_max), QMAX * 1.0), 1e-8)
            zero = 0.0
        else:
            scale = tl.maximum(tl.math.div_rn(x_max - x_min, (QMAX - QMIN) * 1.0), 1e-8)
            zero = _round_half_even(tl.math.div_rn(-x_min, scale))
    else:
        scale = tl.load(static_ptr)
        zero = tl.load(static_ptr + 1)
    codes = _round_half_even(tl.math.div_rn(x, scale)) + zero
    codes = tl.minimum(tl.maximum(codes, QMIN), QMAX) - SHIFT
    codes = tl.where(mask, codes, 0.0).to(tl.int32)
    tl.store(q_ptr + row * K + offs, codes.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)
    tl.store(zp_ptr + row, (zero - SHIFT).to(tl.int32))
    tl.store(sum_ptr + row, tl.sum(codes, axis=0))


@triton.jit
def _load_weight_codes(
    w_ptr, offs_n, k0, N, K, stride_wn, PACKED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr
):
    """(BK, BN) tile of int8 codes ``q'`` from input channel ``k0`` on (packed nibbles u are
    unpacked in registers to ``u - 8``)."""
    if PACKED:
        half = k0 // 2 + tl.arange(0, BK // 2)
        mask = (offs_n[:, None] < N) & (half[None, :] < K // 2)
        raw = tl.load(w_ptr + offs_n[:, None] * stride_wn + half[None, :], mask=mask, other=0x88)
        raw = raw.to(tl.int32)
        tile = tl.reshape(tl.join(raw & 0xF, (raw >> 4) & 0xF), (BN, BK)) - 8
        return tl.trans(tile.to(tl.int8))
    offs_k = k0 + tl.arange(0, BK)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    tile = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=mask, other=0)
    return tile.to(tl.int8)  # both branches must return one type (dead one included)


@triton.jit
def _epilogue(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    bias_ptr,
    t_ptr,
    l_ptr,
    out_ptr,
    stride_om,
    HAS_BIAS: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    DOT: tl.constexpr,
):
    """``acc (+ bias) (+ T Lᵀ)`` stored in the output's dtype."""
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
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int_gemm_kernel(
    a_ptr,
    w_ptr,
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
    M,
    N,
    K,
    NUM_GROUPS,
    stride_wn,
    stride_om,
    PACKED: tl.constexpr,
    GROUPED: tl.constexpr,
    HAS_XZP: tl.constexpr,
    HAS_WZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    DOT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok, n_ok = offs_m < M, offs_n < N
    xz = tl.load(xz_ptr + offs_m, mask=m_ok, other=0)
    acc_i = tl.zeros((BM, BN), dtype=tl.int32)
    acc_f = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        a = tl.load(
            a_ptr + offs_m[:, None] * K + offs_k[None, :],
            mask=m_ok[:, None] & (offs_k[None, :] < K),
            other=0,
        )
        w = _load_weight_codes(w_ptr, offs_n, kb * BK, N, K, stride_wn, PACKED, BN, BK)
        part = tl.dot(a, w, out_dtype=tl.int32)
        if GROUPED:
            g_idx = offs_n * NUM_GROUPS + kb
            if HAS_WZP:
                wz = tl.load(wz_ptr + g_idx, mask=n_ok, other=0)
                part -= wz[None, :] * tl.sum(a.to(tl.int32), axis=1)[:, None]
                if HAS_XZP:
                    part += BK * xz[:, None] * wz[None, :]
            if HAS_XZP:
                part -= xz[:, None] * tl.load(wsum_ptr + g_idx, mask=n_ok, other=0)[None, :]
            ws = tl.load(ws_ptr + g_idx, mask=n_ok, other=0.0)
            acc_f += part.to(tl.float32) * ws[None, :]
        else:
            acc_i += part
    xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
    if GROUPED:
        acc = acc_f * xs[:, None]
    else:
        if HAS_WZP:
            wz = tl.load(wz_ptr + offs_n, mask=n_ok, other=0)
            acc_i -= wz[None, :] * tl.load(xsum_ptr + offs_m, mask=m_ok, other=0)[:, None]
            if HAS_XZP:
                acc_i += K * xz[:, None] * wz[None, :]
        if HAS_XZP:
            acc_i -= xz[:, None] * tl.load(wsum_ptr + offs_n, mask=n_ok, other=0)[None, :]
        ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
        acc = acc_i.to(tl.float32) * (xs[:, None] * ws[None, :])
    _epilogue(
        acc, offs_m, offs_n, M, N, bias_ptr, t_ptr, l_ptr, out_ptr, stride_om, HAS_BIAS, R, RP, DOT
    )


@triton.jit
def _dequant_gemm_kernel(
    a_ptr,
    s_ptr,
    xs_ptr,
    xz_ptr,
    w_ptr,
    ws_ptr,
    wz_ptr,
    bias_ptr,
    t_ptr,
    l_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_om,
    GN,
    MN,
    GK,
    stride_sr,
    stride_sc,
    PACKED: tl.constexpr,
    A_INT: tl.constexpr,
    HAS_S: tl.constexpr,
    HAS_WZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    DOT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok, n_ok = offs_m < M, offs_n < N
    if A_INT:
        xz = tl.load(xz_ptr + offs_m, mask=m_ok, other=0)
    scale_row = ((offs_n // GN) % MN) * stride_sr
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        k_ok = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0,
        )
        if A_INT:
            a = tl.where(k_ok[None, :], a.to(tl.int32) - xz[:, None], 0).to(DOT)
        elif HAS_S:
            s = tl.load(s_ptr + offs_k, mask=k_ok, other=1.0).to(a.dtype)
            a = tl.math.div_rn(a.to(tl.float32), s[None, :].to(tl.float32)).to(a.dtype)
        q = _load_weight_codes(w_ptr, offs_n, kb * BK, N, K, stride_wn, PACKED, BN, BK)
        idx = scale_row[None, :] + (offs_k[:, None] // GK) * stride_sc
        wmask = k_ok[:, None] & n_ok[None, :]
        w = q.to(tl.float32)
        if HAS_WZP:
            w -= tl.load(wz_ptr + idx, mask=wmask, other=0.0)
        w *= tl.load(ws_ptr + idx, mask=wmask, other=0.0)
        acc += tl.dot(a.to(DOT), w.to(DOT))
    if A_INT:
        acc *= tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    _epilogue(
        acc, offs_m, offs_n, M, N, bias_ptr, t_ptr, l_ptr, out_ptr, stride_om, HAS_BIAS, R, RP, DOT
    )


def _rank_padding(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank)) if rank else 0


def _tiles(M: int, N: int, K: int, block_k: int | None = None) -> dict:
    """Tile sizes for sm_90 (small for small problems, which also keeps the interpreter fast)."""
    bm = 128 if M >= 128 else max(16, triton.next_power_of_2(M))
    bn = 128 if N >= 128 else max(16, triton.next_power_of_2(N))
    bk = block_k or (128 if K >= 128 else max(32, triton.next_power_of_2(K)))
    return {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}


def _grid(M: int, N: int, tiles: dict) -> tuple[int]:
    return (triton.cdiv(M, tiles["BM"]) * triton.cdiv(N, tiles["BN"]),)


def _launch_options(tiles: dict, num_stages: int = 3) -> dict:
    big = tiles["BM"] * tiles["BN"] >= 128 * 128
    return {"num_warps": 8 if big else 4, "num_stages": num_stages}


def _placeholder(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, device=like.device, dtype=torch.float32)


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


@torch.library.custom_op("ditq::int_gemm", mutates_args=())
def int_gemm(
    codes: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    x_sum: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    w_sum: torch.Tensor,
    bias: torch.Tensor | None,
    lowrank_t: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    in_features: int,
    packed: bool,
    group_size: int,
    has_x_zero: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``y`` (M, N) from int8 codes and int8 / packed int4 weight codes; ``group_size`` 0
    for per-channel weight scales (w_scale (N,)), else the input-channel group size
    (w_scale (N, K / g))."""
    M, N, K = codes.shape[0], weight.shape[0], in_features
    out = torch.empty((M, N), device=codes.device, dtype=out_dtype)
    rank = 0 if lowrank_t is None else lowrank_t.shape[1]
    tiles = _tiles(M, N, K, group_size or None)
    if M:
        _int_gemm_kernel[_grid(M, N, tiles)](
            codes,
            weight,
            x_scale,
            x_zero,
            x_sum,
            w_scale,
            w_zero if w_zero is not None else _placeholder(codes),
            w_sum,
            bias if bias is not None else _placeholder(codes),
            lowrank_t if lowrank_t is not None else _placeholder(codes),
            lowrank_up if lowrank_up is not None else _placeholder(codes),
            out,
            M,
            N,
            K,
            max(1, K // group_size) if group_size else 1,
            weight.stride(0),
            out.stride(0),
            PACKED=packed,
            GROUPED=bool(group_size),
            HAS_XZP=has_x_zero,
            HAS_WZP=w_zero is not None,
            HAS_BIAS=bias is not None,
            R=rank,
            RP=_rank_padding(rank),
            DOT=_DOT_DTYPE,
            **tiles,
            **_launch_options(tiles, num_stages=2),
        )
    return out


@int_gemm.register_fake
def _(codes, x_scale, x_zero, x_sum, weight, w_scale, w_zero, w_sum, bias, lowrank_t,
      lowrank_up, in_features, packed, group_size, has_x_zero, out_dtype):  # fmt: skip
    return codes.new_empty((codes.shape[0], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("ditq::dequant_gemm", mutates_args=())
def dequant_gemm(
    x: torch.Tensor,
    input_scale: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    x_zero: torch.Tensor | None,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    scale_index: list[int],
    bias: torch.Tensor | None,
    lowrank_t: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    in_features: int,
    packed: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``y`` (M, N) with the weight dequantized in registers. ``x`` is a float (M, K) tensor
    (divided by ``input_scale`` in the kernel when given) or int8 codes with per-row
    ``x_scale``/``x_zero``. The scale of weight element (n, k) is
    ``w_scale.flatten()[((n // GN) % MN) · SR + (k // GK) · SC]`` with ``scale_index`` =
    [GN, MN, GK, SR, SC]; ``w_zero`` has the same layout."""
    M, N, K = x.shape[0], weight.shape[0], in_features
    out = torch.empty((M, N), device=x.device, dtype=out_dtype)
    rank = 0 if lowrank_t is None else lowrank_t.shape[1]
    # The weight tile is dequantized through registers: 64-wide K blocks, 2 stages keep the
    # shared memory under sm_90's 227 KB (128-wide blocks asked for 420 KB).
    tiles = _tiles(M, N, K, 64 if K >= 64 else None)
    gn, mn, gk, sr, sc = scale_index
    if M:
        _dequant_gemm_kernel[_grid(M, N, tiles)](
            x,
            input_scale if input_scale is not None else _placeholder(x),
            x_scale if x_scale is not None else _placeholder(x),
            x_zero if x_zero is not None else _placeholder(x),
            weight,
            w_scale,
            w_zero if w_zero is not None else _placeholder(x),
            bias if bias is not None else _placeholder(x),
            lowrank_t if lowrank_t is not None else _placeholder(x),
            lowrank_up if lowrank_up is not None else _placeholder(x),
            out,
            M,
            N,
            K,
            x.stride(0),
            weight.stride(0),
            out.stride(0),
            gn,
            mn,
            gk,
            sr,
            sc,
            PACKED=packed,
            A_INT=x_scale is not None,
            HAS_S=input_scale is not None,
            HAS_WZP=w_zero is not None,
            HAS_BIAS=bias is not None,
            R=rank,
            RP=_rank_padding(rank),
            DOT=_DOT_DTYPE,
            **tiles,
            **_launch_options(tiles, num_stages=2),
        )
    return out


@dequant_gemm.register_fake
def _(x, input_scale, x_scale, x_zero, weight, w_scale, w_zero, scale_index, bias, lowrank_t,
      lowrank_up, in_features, packed, out_dtype):  # fmt: skip
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)
