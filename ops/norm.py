"""RMSNorm and fused residual-add + RMSNorm on the die's 48 AIV, with Hugging Face's numerics (DeepSeek-V3 §9;
CANN's counterparts: aclnnRmsNorm, aclnnAddRmsNorm). The kernel walk is rowwise.RowKernel's.

    rmsnorm(x, w)                 y = w ⊙ dt( x / √(mean(x²) + ε) )
    add_rmsnorm(x, residual, w)   r = dt(x + residual);  y = rmsnorm(r, w);  returns (y, r)

dt is the activation dtype (bf16, or fp16), w has the same dtype. The exact order, in fp32 on the vector
unit and in `rmsnorm_reference` (NumPy fp32):

    (add)  r  = dt_RINT(fp32(x) + fp32(residual))    Cast, Add, Cast: torch's bf16 add (HF's `residual + h`)
           v  = fp32(x) (or fp32(r))                 Cast (exact)
           ss = Σ v·v                                Mul, then rowwise's sum order: per chunk of
                                                     `tiling.chunk` columns (default NORM_CHUNK = 4096, so
                                                     one chunk for H ≤ 4096 and two for H = 7168),
                                                     BlockReduceSum stages (pairwise trees of 8) down to
                                                     ≤ 64 partials, added lane-wise into 64 zeroed lanes;
                                                     the 64 lanes summed as a pairwise tree
                                                     (WholeReduceSum)
           var = ss / fp32(H)                        Div (HF: pow(2).mean(-1))
           rs  = rsqrt(var + fp32(ε))                Adds, Rsqrt (float64 1/√ rounded once, as vector.py)
           n   = dt_RINT(v · rs)                     Mul, Cast (HF: hidden * rsqrt(...), .to(input_dtype))
           y   = dt_RINT(fp32(n) · fp32(w))          Cast, Mul (exact: two 8- or 11-bit mantissas), Cast

So y and r equal `rmsnorm_reference` / `add_rmsnorm_reference` bit for bit (pass the same tiling). Against
torch the only difference is the order of the fp32 sum (torch's is its own); against HF's formula in float64
y is within 2 ulps of the dtype (tests/test_norm.py). A row whose Σx² overflows fp32 (|x| ≳ 1e18) gets
rs = 0 and y = 0, as HF's fp32 would; with ε = 0 an all-zero row gives NaN (0 · rsqrt(0)), as HF's would.
"""
from __future__ import annotations

import dataclasses

import numpy as np

import ascendemu
from ascendemu import HardEvent, RoundMode, TPosition, TQue
from ascendemu.numerics import as_dtype, dtype_name

from .rowwise import (BLOCK, F32, LANES, RowKernel, RowTiling, Staging, apply_rows, bar, calc_buffer, cdiv,
                      check_2d, check_dtype, copy_gm_to_ub, copy_ub_to_gm, fold_sum_reference, plan_rows)

DTYPES = ("bfloat16", "float16")
DEFAULT_EPS = 1e-6  # DeepSeek-V3 rms_norm_eps
NORM_CHUNK = 4096  # the default chunk: it fixes the order of the sum of squares, so it does not vary with UB room
RES_EVENT_ID = 0  # MTE3_MTE2: the new residual is in GM before pass 2 reads it back (streamed add_rmsnorm)


class RmsNorm(RowKernel):
    """y = RMSNorm(x [+ residual]) · weight; with a residual, also new_residual = x + residual.

    The weight is cast to fp32 once per core (long resident rows: all of it; short-row tiles: once per row of
    the tile, so one Mul covers the tile); a streamed row copies its weight chunk in again in pass 2."""

    stat_op = "sum"

    def __init__(self, ctx, x, residual, weight, y, new_residual, eps, plan):
        pipe = ctx.tpipe()
        super().__init__(ctx, pipe, plan, x.shape[0])
        self.x, self.residual, self.weight, self.y, self.new_residual = x, residual, weight, y, new_residual
        self.eps, self.dt, self.add = eps, x.dtype, residual is not None
        w = plan.width
        self.in_q = TQue(TPosition.VECIN, 1)  # one slot: [x chunk | residual or weight chunk]
        pipe.init_buffer(self.in_q, 2, 2 * w * self.dt.itemsize)
        self.out_q = TQue(TPosition.VECOUT, 1)
        pipe.init_buffer(self.out_q, 2, w * self.dt.itemsize)
        if self.add:
            self.res_q = TQue(TPosition.VECOUT, 1)
            pipe.init_buffer(self.res_q, 2, w * self.dt.itemsize)
        self.wf = calc_buffer(pipe, 4 * plan.cached)
        self.h, self.rs = calc_buffer(pipe, 4 * LANES), calc_buffer(pipe, 4 * LANES)
        self.rs_blocks = calc_buffer(pipe, 4 * BLOCK * LANES)
        ctx.duplicate(self.h, float(x.shape[1]), LANES)
        if plan.resident:
            self.load_weight()
        bar(ctx)

    def copy_in(self, srcs, count):
        """CopyIn up to two GM ranges of `count` elements into one in_q slot (at 0 and at width)."""
        t = self.in_q.alloc_tensor(self.dt)
        for i, s in enumerate(srcs):
            copy_gm_to_ub(self.ctx, t[i * self.plan.width:], s, count)
        self.in_q.enque(t)
        return self.in_q.deque()

    def load_weight(self):
        ctx, p = self.ctx, self.plan
        for c0, n in p.parts:
            t = self.copy_in([self.weight[c0:c0 + n]], n)
            for j in range(p.group if p.group > 1 else 1):  # a short-row tile: one copy per row
                ctx.cast(self.wf[c0 + j * n:c0 + (j + 1) * n], t, RoundMode.CAST_NONE, n)
            self.in_q.free_tensor(t)

    def rows_of(self, t, r, g, c0, n):
        """GM view of rows r..r+g-1, columns [c0, c0+n) (one contiguous range)."""
        h = t.shape[1]
        return t.flatten()[r * h:(r + g) * h] if g > 1 else t[r, c0:c0 + n]

    def compute(self, r, g, c0, n, v, first):
        ctx, count, w = self.ctx, g * n, self.plan.width
        if first:
            srcs = [self.rows_of(t, r, g, c0, n) for t in ((self.x, self.residual) if self.add else (self.x,))]
        else:  # a streamed row: the new residual (or x) again, and the weight chunk
            src = self.new_residual if self.add else self.x
            srcs = [self.rows_of(src, r, g, c0, n), self.weight[c0:c0 + n]]
        t = self.copy_in(srcs, count)
        ctx.cast(v, t, RoundMode.CAST_NONE, count)
        if first and self.add:
            ctx.cast(self.tmp, t[w:], RoundMode.CAST_NONE, count)
        elif not first:
            ctx.cast(self.wf[:n], t[w:], RoundMode.CAST_NONE, n)
        self.in_q.free_tensor(t)
        bar(ctx)
        if first and self.add:  # r = dt(x + residual), kept in v as fp32 and copied out
            ctx.add(v, v, self.tmp, count)
            bar(ctx)
            o = self.res_q.alloc_tensor(self.dt)
            ctx.cast(o, v, RoundMode.CAST_RINT, count)
            bar(ctx)
            ctx.cast(v, o, RoundMode.CAST_NONE, count)
            self.res_q.enque(o)
            o = self.res_q.deque()
            copy_ub_to_gm(ctx, self.rows_of(self.new_residual, r, g, c0, n), o, count)
            self.res_q.free_tensor(o)
            bar(ctx)

    def prepare(self, v, count):
        self.ctx.mul(self.tmp, v, v, count)
        bar(self.ctx)

    def factors(self, r, g):
        """rs = rsqrt(Σ / H + ε) for the tile's rows, one 32 B block per row."""
        ctx = self.ctx
        ctx.div(self.rs, self.stat, self.h, g)
        bar(ctx)
        ctx.adds(self.rs, self.rs, self.eps, g)
        bar(ctx)
        ctx.rsqrt(self.rs, self.rs, g)
        bar(ctx)
        ctx.brcb(self.rs_blocks, self.rs, cdiv(g, BLOCK))
        bar(ctx)
        if self.add and not self.plan.resident:  # pass 2 reads the new residual back from GM
            ctx.set_flag(HardEvent.MTE3_MTE2, RES_EVENT_ID)
            ctx.wait_flag(HardEvent.MTE3_MTE2, RES_EVENT_ID)

    def finish(self, v, r, g, c0, n):
        """y = dt(dt(v · rs) · w)."""
        ctx, count = self.ctx, g * n
        apply_rows(ctx, ctx.mul, v, self.rs_blocks, g, n)
        o = self.out_q.alloc_tensor(self.dt)
        ctx.cast(o, v, RoundMode.CAST_RINT, count)
        bar(ctx)
        ctx.cast(v, o, RoundMode.CAST_NONE, count)
        bar(ctx)
        wv = self.wf[c0:c0 + n] if self.plan.resident and g == 1 else self.wf[:count]
        ctx.mul(v, v, wv, count)
        bar(ctx)
        ctx.cast(o, v, RoundMode.CAST_RINT, count)
        self.out_q.enque(o)
        o = self.out_q.deque()
        copy_ub_to_gm(ctx, self.rows_of(self.y, r, g, c0, n), o, count)
        self.out_q.free_tensor(o)


@ascendemu.kernel("aiv")
def rmsnorm_kernel(ctx, x, residual, weight, y, new_residual, eps, plan):
    """y = RMSNorm(x [+ residual]) · weight; with a residual also new_residual = x + residual."""
    RmsNorm(ctx, x, residual, weight, y, new_residual, eps, plan).process()


def _layout(itemsize, add):
    def layout(width, cached, _scale_rows):
        return {"in_q": 2 * 2 * itemsize * width, "out_q": 2 * itemsize * width,
                "res_q": 2 * itemsize * width if add else 0, "weight": 4 * cached, "vectors": 4 * 2 * LANES,
                "blocks": 4 * BLOCK * LANES}
    return layout


def _norm(die, op, x, residual, weight, eps, tiling):
    check_2d(op, "x", x, DTYPES)
    m, h = x.shape
    dt = dtype_name(as_dtype(x.dtype))
    if residual is not None:
        check_2d(op, "residual", residual, DTYPES)
        if tuple(residual.shape) != (m, h):
            raise ValueError(f"{op}: residual has shape {tuple(residual.shape)}; it must match x, {(m, h)}")
        check_dtype(op, "residual", residual, (dt,))
    if not isinstance(weight, (np.ndarray, ascendemu.GlobalTensor)):
        raise TypeError(f"{op}: weight must be a numpy array or a GlobalTensor, got {type(weight).__name__}")
    if tuple(weight.shape) != (h,):
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}; it must be [H] = ({h},)")
    check_dtype(op, "weight", weight, (dt,))
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.floating, np.integer)) \
            or not np.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number ≥ 0, got {eps!r}")
    tiling = RowTiling() if tiling is None else tiling
    if isinstance(tiling, RowTiling) and tiling.chunk is None:
        tiling = dataclasses.replace(tiling, chunk=NORM_CHUNK)
    plan = plan_rows(op, die.spec, m, h, tiling, _layout(as_dtype(dt).itemsize, residual is not None))
    with Staging(die, op) as st:
        gx = st.put(x, "x")
        gr = st.put(residual, "residual") if residual is not None else None
        gw = st.put(weight, "weight")
        y = st.output((m, h), dt)
        nr = st.output((m, h), dt) if residual is not None else None
        res = st.launch(rmsnorm_kernel, min(die.spec.aiv_per_die, m), (gx, gr, gw, y, nr, float(eps), plan))
    return res if residual is not None else res[0]


def rmsnorm(die, x, weight, eps: float = DEFAULT_EPS, *, tiling: RowTiling | None = None):
    """RMSNorm of x [M, H] (bf16 or fp16) with weight [H] (same dtype) on all AIV of `die`: returns y [M, H] —
    a numpy array when x and weight are numpy arrays and the die is functional, else a GlobalTensor. The
    report is `die.last_report`. Numerics: the module docstring."""
    return _norm(die, "rmsnorm", x, None, weight, eps, tiling)


def add_rmsnorm(die, x, residual, weight, eps: float = DEFAULT_EPS, *, tiling: RowTiling | None = None):
    """r = x + residual (rounded to their dtype), y = RMSNorm(r) · weight: returns (y, r), both [M, H]."""
    return _norm(die, "add_rmsnorm", x, residual, weight, eps, tiling)


def _chunk_of(tiling):
    return (tiling.chunk if tiling is not None else None) or NORM_CHUNK


def rmsnorm_reference(x, weight, eps: float = DEFAULT_EPS, *, tiling: RowTiling | None = None) -> np.ndarray:
    """NumPy golden of `rmsnorm` (equal bit for bit; the sum order depends on tiling.chunk)."""
    x = np.asarray(x)
    dt = x.dtype
    v = x.astype(F32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ss = fold_sum_reference((v * v).astype(F32), _chunk_of(tiling))
        var = (ss / F32.type(x.shape[1])).astype(F32)
        rs = (1.0 / np.sqrt((var + F32.type(eps)).astype(F32).astype(np.float64))).astype(F32)
        n = (v * rs[:, None]).astype(F32).astype(dt)
        return (n.astype(F32) * np.asarray(weight).astype(F32)[None, :]).astype(F32).astype(dt)


def add_rmsnorm_reference(x, residual, weight, eps: float = DEFAULT_EPS, *, tiling: RowTiling | None = None):
    """NumPy golden of `add_rmsnorm`: (y, r)."""
    x = np.asarray(x)
    r = (x.astype(F32) + np.asarray(residual).astype(F32)).astype(F32).astype(x.dtype)
    return rmsnorm_reference(r, weight, eps, tiling=tiling), r
