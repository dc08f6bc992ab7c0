"""INT8 GEMM family on one 910C die: per-channel weight quantisation, INT8 × INT8 → INT32 GEMM on all 24 AIC
with dequantisation to bf16 on their 48 AIV, and the grouped (MoE expert) form.

    q, s_w = quantize_weight_per_channel(w)            # host, [N, K] float → int8 [N, K], fp32 [N]
    w_p = pack_weight(q)                               # host, once: the Nz layout the kernel reads
    y = int8_gemm(die, a_q, a_scale, w_p, s_w)         # y[M, N] bf16 = (a_q @ qᵀ) · a_scale[:, None] · s_w[None, :]
    y = grouped_int8_gemm(die, a_q, a_scale, group_sizes, [w_p0, w_p1, …], [s_w0, s_w1, …])

One `@ascendemu.kernel("mix")` kernel (`int8_gemm_kernel`) serves both host functions: 24 groups of 1 AIC + 2 AIV.

AIC: `ascendemu.ops.gemm.aic_gemm_body`, shared with the BF16 GEMMs (one home for the tiling, the L1/L0 pipeline
and the host planner: see ops/gemm.py). The weight is Nz-packed with C0 = 32 (`pack_weight`); the AIC Fixpipes each
int32 tile to GM: y itself for out_dtype="int32", else a per-group workspace ring for the AIVs.

AIV (bf16 output): the AIC Fixpipes each int32 tile into a ring of `WS_SLOTS` workspace slots of its group and
signals `cross_core_set_flag(2, PIPE_FIX, READY)`; each of its two AIVs takes half of the tile's rows, in chunks:

    GM workspace int32 ─DataCopy (MTE2)─▶ UB ─Cast s32→f32 RINT─▶ ·w_scale[n] (Mul, the row vector, rep stride 0)
        ─▶ ·a_scale[m] (Brcb the row scales to one 32 B block each, then Mul with blk stride 0, rep stride 1)
        ─▶ Cast f32→bf16 RINT (V) ─DataCopyPad (MTE3)─▶ GM y

  and frees the workspace slot with `cross_core_set_flag(2, PIPE_MTE2, FREE)` as soon as its last load of the
  slot has completed (MTE2 is the only reader of the slot, so this is the earliest correct point).

Dequantisation order (the reference and the tests use exactly this, and the kernel is bit-exact to it):

    y = bf16_rint( f32( f32( f32_rint(acc) · w_scale[n] ) · a_scale[m] ) )

  each product rounded to fp32 (round half to even); the final cast rounds half to even.

Work distribution and tile choice: `plan_int8_gemm` = `ascendemu.ops.gemm.plan_gemm` with int8 inputs (work items
(group, m-tile, n-tile) cut into 24 runs of equal estimated cost; tiles scored by a cost model that tracks the
emulator within ~5 %).

What limits it in the model: HBM, for every DeepSeek-R1 shape (benchmarks/test_bench_int8_gemm.py). A 128 KiB L0C
caps a tile's reuse at m·n/(m+n) ≈ 85 MACs per GM byte (n per byte with B resident), the cube's peak needs ~227 per
HBM byte, and no L2 is modelled. The int32 workspace adds 10 B of HBM traffic per output element (int32 out and
back, bf16 out); Fixpipe DEQF16 would halve the round trip but rounds to fp16 first, so it is not used.
"""
from __future__ import annotations

import numpy as np

import ascendemu
from ascendemu import BinaryRepeatParams, DataCopyExtParams, GlobalTensor, HardEvent, RoundMode
from ascendemu.layouts import ceil_div, round_up
from ascendemu.numerics import as_dtype

from .gemm import (C0, FRAC, FREE, READY, U16_MAX, WS_SLOTS, GemmPlan, GemmTiles,  # noqa: F401 (re-exported)
                   PackedWeight, aic_gemm_body, check_array, check_die, check_out_dtype, check_weight,
                   pack_weight, packed_shape, plan_gemm, unpack_weight)
from .rowwise import Staging

OUT_DTYPES = ("bfloat16", "int32")
W_ID = 2  # AIV: MTE2_V / V_MTE2 ids 2, 3 for the w_scale row of an item (0, 1: the chunk ring)
BF16 = as_dtype("bfloat16")


_cdiv, _up = ceil_div, round_up  # the shape helpers of ascendemu.layouts


# ------------------------------------------------------------------------------------------------ weights


def quantize_weight_per_channel(w) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel INT8 quantisation of a weight w [N, K] (host, NumPy).

    scale[n] = fp32(max_k |w[n, k]| / 127) (the quotient formed in float64, rounded once to fp32);
    q[n, k] = clip(round_half_even(float64(w[n, k]) / float64(scale[n])), -127, 127).
    An all-zero row gets scale 1.0 and q = 0. A row whose scale would underflow fp32 (|w| < 127 · 2⁻¹⁴⁹,
    float64 input only) gets the smallest fp32 subnormal. Returns (q int8 [N, K], scale float32 [N]).
    """
    if isinstance(w, GlobalTensor):
        raise TypeError("quantize_weight_per_channel runs on the host: pass a numpy array, not a GlobalTensor")
    if not isinstance(w, np.ndarray):
        raise TypeError(f"quantize_weight_per_channel: w must be a numpy array, got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"quantize_weight_per_channel: w must be 2-D [N, K], got shape {w.shape}")
    if w.dtype not in (np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"quantize_weight_per_channel: w is {w.dtype}; expected float16, bfloat16, float32 or "
                        f"float64")
    if min(w.shape) < 1:
        raise ValueError(f"quantize_weight_per_channel: N and K must be ≥ 1, got shape {w.shape}")
    w64 = w.astype(np.float64)
    if not np.all(np.isfinite(w64)):
        raise ValueError("quantize_weight_per_channel: w has non-finite values (inf or NaN)")
    amax = np.abs(w64).max(axis=1)
    with np.errstate(over="ignore"):
        scale = (amax / 127.0).astype(np.float32)
    if not np.all(np.isfinite(scale)):
        raise ValueError("quantize_weight_per_channel: max|w| / 127 overflows fp32")
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    scale = np.where(amax == 0, np.float32(1.0), np.maximum(scale, tiny)).astype(np.float32)
    q = np.clip(np.rint(w64 / scale.astype(np.float64)[:, None]), -127, 127).astype(np.int8)
    return q, scale


# ------------------------------------------------------------------------------------------------ references


def int8_gemm_reference(a_q, a_scale, w_q, w_scale, out_dtype="bfloat16") -> np.ndarray:
    """NumPy golden, bit-exact to the kernel: acc = a_q @ w_qᵀ (exact, via float64 BLAS: |acc| < 2⁵³), then
    y = bf16_rint(f32(f32(f32_rint(acc) · w_scale[None, :]) · a_scale[:, None])), or acc as int32."""
    a_q, w_q = np.asarray(a_q), np.asarray(w_q)
    acc = (a_q.astype(np.float64) @ w_q.astype(np.float64).T).astype(np.int64).astype(np.int32)
    if out_dtype == "int32":
        return acc
    y = (acc.astype(np.float32) * np.asarray(w_scale, np.float32)[None, :]) * np.asarray(a_scale, np.float32)[:, None]
    return y.astype(BF16)


def grouped_int8_gemm_reference(a_q, a_scale, group_sizes, w_q_list, w_scale_list, out_dtype="bfloat16"):
    """NumPy golden of grouped_int8_gemm: rows of group g (consecutive) times weight g."""
    a_q = np.asarray(a_q)
    n = np.asarray(w_q_list[0]).shape[0]
    out = np.zeros((a_q.shape[0], n), np.int32 if out_dtype == "int32" else BF16)
    r = 0
    for g, size in enumerate(group_sizes):
        if size:
            out[r:r + size] = int8_gemm_reference(a_q[r:r + size], np.asarray(a_scale)[r:r + size], w_q_list[g],
                                                  w_scale_list[g], out_dtype)
        r += size
    return out


# ------------------------------------------------------------------------------------------------ tiling


def plan_int8_gemm(spec, group_rows, n: int, k: int, *, out_dtype="bfloat16", tiles: GemmTiles | None = None,
                   cores: int | None = None, fn: str = "int8_gemm") -> GemmPlan:
    """The host tiling of the INT8 GEMM (ops/gemm.py's plan_gemm with int8 inputs; consecutive groups)."""
    return plan_gemm(spec, group_rows, n, k, in_dtype="int8", out_dtype=out_dtype, tiles=tiles, cores=cores, fn=fn)


# ------------------------------------------------------------------------------------------------ the kernel


@ascendemu.kernel("mix")
def int8_gemm_kernel(ctx, a, a_scale, weights, w_scales, y, work, plan):
    """y = dequant(a @ Wᵀ) on groups of 1 AIC + 2 AIV. a: int8 [M, K] GM; weights: packed int8 GM tensors;
    a_scale, w_scales: fp32 GM; y: bf16 or int32 [M, N] GM; work: int32 GM workspace (bf16 output only)."""
    if ctx.is_aic:
        aic_gemm_body(ctx, a, weights, y, work, plan)
    elif not plan.int32_out:
        _aiv_body(ctx, a_scale, w_scales, y, work, plan)


def _aiv_body(ctx, a_scale, w_scales, y, work, plan):
    group = ctx.block_idx // 2
    sub = ctx.get_sub_block_idx()
    items = plan.items[group]
    if not items:
        return
    n_total = plan.n
    bm, bn = plan.tiles.m, plan.tiles.n
    rc = plan.aiv_rows
    y_gm = y.flatten()

    xbuf = [ctx.ub.alloc((rc * bn,), "int32") for _ in range(2)]
    obuf = [ctx.ub.alloc((rc * bn,), "bfloat16") for _ in range(2)]
    abuf = [ctx.ub.alloc((_up(rc, 8),), "float32") for _ in range(2)]
    abrc = [ctx.ub.alloc((_up(rc, 8) * 8,), "float32") for _ in range(2)]
    wrow = [ctx.ub.alloc((bn,), "float32") for _ in range(2)]
    xf_all = [x.reinterpret_cast("float32") for x in xbuf]
    xf_col = [[x[c:] for c in range(0, bn, 64)] for x in xf_all]  # 64-lane column blocks of the fp32 rows
    w_col = [[x[c:] for c in range(0, bn, 64)] for x in wrow]

    for j in range(2):
        ctx.set_flag(HardEvent.V_MTE2, j)  # chunk slot j free
        ctx.set_flag(HardEvent.MTE3_V, j)  # output slot j free
        ctx.set_flag(HardEvent.V_MTE2, W_ID + j)  # w_scale row slot j free

    ix = iw = 0
    for idx, (row0, mm, n0, nn, g) in enumerate(items):
        half = _cdiv(mm, 2)
        r0 = sub * half
        rr = min(half, mm - r0)
        ctx.cross_core_wait_flag(READY)  # the AIC's Fixpipe of this tile has landed in the workspace
        if rr <= 0:  # m = 1: the second AIV has no rows; it still frees the slot
            ctx.cross_core_set_flag(2, ascendemu.PIPE_MTE2, FREE)
            continue
        wp = _up(nn, FRAC)  # the workspace row pitch (and the UB row pitch): 64 B fp32 rows, 32 B bf16 rows
        slot = (group * WS_SLOTS + idx % WS_SLOTS) * bm * bn
        pw = iw % 2
        iw += 1
        ctx.wait_flag(HardEvent.V_MTE2, W_ID + pw)
        ctx.data_copy_pad(wrow[pw], w_scales[g][n0:], DataCopyExtParams(block_count=1, block_len=nn * 4))
        ctx.set_flag(HardEvent.MTE2_V, W_ID + pw)
        chunks = _cdiv(rr, rc)
        cols = [(c, min(64, nn - c * 64)) for c in range(_cdiv(nn, 64))]
        for ci in range(chunks):
            c0 = r0 + ci * rc
            cr = min(rc, r0 + rr - c0)
            jx = ix % 2
            ix += 1
            # CopyIn: the int32 rows (contiguous in the workspace) and their a_scale
            ctx.wait_flag(HardEvent.V_MTE2, jx)
            ctx.data_copy(xbuf[jx], work[slot + c0 * wp:], cr * wp)
            ctx.data_copy_pad(abuf[jx], a_scale[row0 + c0:], DataCopyExtParams(block_count=1, block_len=cr * 4))
            ctx.set_flag(HardEvent.MTE2_V, jx)
            if ci == chunks - 1:
                ctx.cross_core_set_flag(2, ascendemu.PIPE_MTE2, FREE)  # this AIV is done reading the slot
            # Compute: f32(acc) · w_scale[n] · a_scale[m], then bf16
            ctx.wait_flag(HardEvent.MTE2_V, jx)
            if ci == 0:
                ctx.wait_flag(HardEvent.MTE2_V, W_ID + pw)
            xf, xc = xf_all[jx], xf_col[jx]
            ctx.cast(xf, xbuf[jx], RoundMode.CAST_RINT, cr * wp)
            rs = wp // 8  # row pitch in 32 B blocks
            for c, lanes in cols:
                ctx.mul(xc[c], xc[c], w_col[pw][c], lanes, cr, BinaryRepeatParams(1, 1, 1, rs, rs, 0))
            ctx.brcb(abrc[jx], abuf[jx], _cdiv(cr, 8))
            for c, lanes in cols:
                ctx.mul(xc[c], xc[c], abrc[jx], lanes, cr, BinaryRepeatParams(1, 1, 0, rs, rs, 1))
            ctx.wait_flag(HardEvent.MTE3_V, jx)
            ctx.cast(obuf[jx], xf, RoundMode.CAST_RINT, cr * wp)
            ctx.set_flag(HardEvent.V_MTE2, jx)
            # CopyOut: cr rows of nn bf16 into y
            ctx.set_flag(HardEvent.V_MTE3, jx)
            ctx.wait_flag(HardEvent.V_MTE3, jx)
            ctx.data_copy_pad(y_gm[(row0 + c0) * n_total + n0:], obuf[jx],
                              DataCopyExtParams(block_count=cr, block_len=nn * 2, src_stride=0,
                                                dst_stride=(n_total - nn) * 2))
            ctx.set_flag(HardEvent.MTE3_V, jx)
        ctx.set_flag(HardEvent.V_MTE2, W_ID + pw)

    for j in range(2):
        ctx.wait_flag(HardEvent.V_MTE2, j)
        ctx.wait_flag(HardEvent.MTE3_V, j)
        ctx.wait_flag(HardEvent.V_MTE2, W_ID + j)


# ------------------------------------------------------------------------------------------------ host side


def _run(die, a_q, a_scale, group_sizes, weights, w_scales, out_dtype, tiles, fn):
    """Validate, stage, plan, launch; shared by int8_gemm and grouped_int8_gemm."""
    check_die(die, fn)
    out_dtype = check_out_dtype(out_dtype, OUT_DTYPES, fn)
    if not isinstance(a_q, (np.ndarray, GlobalTensor)):
        raise TypeError(f"{fn}: a_q must be a numpy array or a GlobalTensor, got {type(a_q).__name__}")
    if len(a_q.shape) != 2:
        raise ValueError(f"{fn}: a_q must be 2-D [M, K], got shape {tuple(a_q.shape)}")
    m, k = (int(v) for v in a_q.shape)
    check_array(die, a_q, "a_q", "int8", (m, k), fn)
    if min(m, k) < 1:
        raise ValueError(f"{fn}: M and K must be ≥ 1, got a_q of shape {(m, k)}")
    check_array(die, a_scale, "a_scale", "float32", (m,), fn)
    grouped = fn.startswith("grouped")
    for i, w in enumerate(weights):
        check_weight(die, w, f"w_packed_list[{i}]" if grouped else "w_packed", fn)
    if not weights:
        raise ValueError(f"{fn}: no weights")
    n = weights[0].n
    for i, w in enumerate(weights):
        wname = f"w_packed_list[{i}]" if grouped else "w_packed"
        if w.k != k:
            raise ValueError(f"{fn}: {wname} is [{w.n}, {w.k}] but a_q has K = {k}; the inner dimensions differ")
        if w.n != n:
            raise ValueError(f"{fn}: {wname} is [{w.n}, {w.k}] but w_packed[0] has N = {n}; all groups need one N")
    for i, s in enumerate(w_scales):
        check_array(die, s, f"w_scale_list[{i}]" if grouped else "w_scale", "float32", (n,), fn)
    if k > U16_MAX or n > U16_MAX:
        raise ValueError(f"{fn}: K = {k} and N = {n} must be ≤ {U16_MAX} (Nd2NzParams.srcDValue and "
                         f"DataCopyParams.srcStride are uint16)")

    plan = plan_int8_gemm(die.spec, group_sizes, n, k, out_dtype=out_dtype, tiles=tiles, fn=fn)
    with Staging(die, fn) as st:
        ga, gs = st.put(a_q, "a_q"), st.put(a_scale, "a_scale")
        gw = [st.put(w.data, f"w_packed_list[{i}]" if grouped else "w_packed") for i, w in enumerate(weights)]
        gws = [st.put(s, f"w_scale_list[{i}]" if grouped else "w_scale") for i, s in enumerate(w_scales)]
        y = st.output((m, n), "int32" if plan.int32_out else "bfloat16")
        work = None
        if not plan.int32_out:
            work = st.workspace((die.spec.aic_per_die * WS_SLOTS * plan.tiles.m * plan.tiles.n,), "int32")
        return st.launch(int8_gemm_kernel, die.spec.aic_per_die, (ga, gs, gw, gws, y, work, plan))[0]


def int8_gemm(die, a_q, a_scale, w_packed, w_scale, out_dtype="bfloat16", *, tiles: GemmTiles | None = None):
    """y[M, N] = (a_q @ w_qᵀ in int32) · a_scale[:, None] · w_scale[None, :] on all AICs (and AIVs) of `die`.

    a_q: int8 [M, K]; a_scale: float32 [M]; w_packed: a PackedWeight of an int8 [N, K] weight; w_scale:
    float32 [N]. Arrays are numpy arrays or GlobalTensors of `die` (phantoms on a timing-only die). out_dtype:
    "bfloat16" (dequantised in the order of the module docstring, round half to even) or "int32" (the exact
    accumulator). Returns a numpy array when every array argument is a numpy array and the die is functional,
    else the GlobalTensor y. `die.last_report` holds the launch's report. `tiles` overrides the host tiling.
    """
    if isinstance(w_packed, (list, tuple)):
        raise TypeError("int8_gemm: w_packed must be one PackedWeight; use grouped_int8_gemm for several")
    check_die(die, "int8_gemm")
    check_weight(die, w_packed, "w_packed", "int8_gemm")
    m = int(a_q.shape[0]) if hasattr(a_q, "shape") and len(a_q.shape) == 2 else 0
    return _run(die, a_q, a_scale, [m], [w_packed], [w_scale], out_dtype, tiles, "int8_gemm")


def grouped_int8_gemm(die, a_q, a_scale, group_sizes, w_packed_list, w_scale_list, out_dtype="bfloat16", *,
                      tiles: GemmTiles | None = None):
    """The expert form: rows of a_q belong to G consecutive groups of `group_sizes` rows (host integers, ≥ 0,
    summing to M: they are the launch's tiling data); group g is multiplied by w_packed_list[g] and
    dequantised with w_scale_list[g]. All weights share one [N, K]. Work items (group, m-tile, n-tile) are
    spread over the cores by estimated cost, so very uneven or empty groups stay balanced. Otherwise as
    int8_gemm."""
    if isinstance(group_sizes, GlobalTensor):
        raise TypeError("grouped_int8_gemm: group_sizes are host integers (the launch's tiling), not a GlobalTensor")
    sizes = np.asarray(group_sizes)
    if sizes.ndim != 1 or not np.issubdtype(sizes.dtype, np.integer):
        raise TypeError(f"grouped_int8_gemm: group_sizes must be a 1-D sequence of ints, got {group_sizes!r}")
    if sizes.size < 1:
        raise ValueError("grouped_int8_gemm: group_sizes is empty; give at least one group")
    if (sizes < 0).any():
        raise ValueError(f"grouped_int8_gemm: group sizes must be ≥ 0, got {sizes.tolist()}")
    ws, ss = list(w_packed_list), list(w_scale_list)
    if len(ws) != sizes.size or len(ss) != sizes.size:
        raise ValueError(f"grouped_int8_gemm: {sizes.size} groups but {len(ws)} weights and {len(ss)} weight scales")
    m = int(a_q.shape[0]) if hasattr(a_q, "shape") and len(a_q.shape) >= 1 else 0
    if int(sizes.sum()) != m:
        raise ValueError(f"grouped_int8_gemm: group sizes sum to {int(sizes.sum())} but a_q has M = {m} rows")
    if m == 0:  # no token reached any local expert: nothing to launch, an empty result
        check_die(die, "grouped_int8_gemm")
        out_dtype = check_out_dtype(out_dtype, OUT_DTYPES, "grouped_int8_gemm")
        n = ws[0].n if isinstance(ws[0], PackedWeight) else None
        if n is None:
            raise TypeError("grouped_int8_gemm: w_packed_list must hold PackedWeight objects from pack_weight")
        dt = np.int32 if out_dtype == "int32" else BF16
        return np.zeros((0, n), dt) if isinstance(a_q, np.ndarray) else die.gm.empty((0, n), dt)
    return _run(die, a_q, a_scale, [int(s) for s in sizes], ws, ss, out_dtype, tiles, "grouped_int8_gemm")
