"""Dynamic per-token INT8 quantisation on the die's 48 AIV (CloudMatrix-Infer's activation scheme, design §6;
CANN's counterpart is aclnnDynamicQuant, symmetric). The kernel walk is rowwise.RowKernel's.

    scale[t] = max_j |x[t, j]| / 127                       (fp32 Div)
    q[t, j]  = clamp(rint(x[t, j] / max(scale[t], 2⁻¹⁴⁹)), −127, 127)

Numerics, exactly as the kernel computes them (and as `quantize_per_token_reference` does):

* x (bf16 or fp16) is cast to fp32 (exact). max|x| is exact whatever the order.
* scale = fp32(max / 127.0): a correctly rounded fp32 division (one vector Div over the tile's rows).
* The divisor is max(scale, 2⁻¹⁴⁹), the smallest fp32 subnormal. It equals scale for every row with a
  nonzero element (the smallest bf16/fp16 subnormal over 127 is still ≥ 2⁻¹⁴⁹). An **all-zero row returns
  scale 0.0** and q = 0 (0 / 2⁻¹⁴⁹ = 0): dequantising q · scale gives 0 either way, and no NaN appears.
* v = fp32(x / divisor): a correctly rounded vector Div (not a multiply by a reciprocal: 1/scale overflows to
  inf for rows whose max is below ~3.7e-37, which bf16 can hold).
* v → int8 goes fp32 → fp16 with CAST_ODD (round to odd), clamp to [−127, 127] in fp16 (Maxs, Mins), then
  fp16 → int8 with CAST_RINT. Rounding to odd at fp16 keeps at least 4 fraction bits for |v| < 128, so the
  second rounding gives exactly rint(v) (ties to even): the chain equals clamp(rint(v), −127, 127). Both casts
  are vector Cast pairs of numerics.CAST_PAIRS; |v| ≤ 127·(1 + 2⁻²³) unless the scale is subnormal, where the
  clamp matters.
* Inputs must be finite (inf or NaN give unspecified q).

`QuantRows` is the kernel minus where the rows' fp32 values come from; swiglu_quant shares it.
"""
from __future__ import annotations

import numpy as np

import ascendemu
from ascendemu import DataCopyExtParams, RoundMode, TPosition, TQue
from ascendemu.numerics import as_dtype

from .rowwise import (BLOCK, F32, LANES, RowKernel, RowTiling, Staging, apply_rows, bar, calc_buffer, cdiv,
                      check_2d, copy_gm_to_ub, copy_ub_to_gm, plan_rows)

IN_DTYPES = ("bfloat16", "float16")
QMAX = 127.0
TINY = float(np.finfo(np.float32).smallest_subnormal)  # 2⁻¹⁴⁹: the divisor of an all-zero row


def quant_layout(width: int, scale_rows: int) -> dict:
    """UB bytes of `QuantRows`' own buffers."""
    return {"out_q": 2 * width, "scale_q": 2 * 32 * (scale_rows + BLOCK), "half": 2 * width,
            "vectors": 4 * 3 * LANES, "blocks": 4 * BLOCK * LANES}


class QuantRows(RowKernel):
    """Per-token quantisation of fp32 rows (the rows' values come from `compute`, which a subclass supplies).

    Pass 1 takes max|v|; `factors` computes scale = max / 127 and the divisor max(scale, 2⁻¹⁴⁹) on the
    tile's rows at once and stages the scales in UB, one 32 B block per row (Brcb), copied out by one strided
    DataCopyPad (block_len 4 B) per `scale_rows` rows; pass 2 (`finish`) divides, casts and copies q out."""

    stat_op = "max"

    def __init__(self, ctx, pipe, plan, m, q_gm, scale_gm):
        super().__init__(ctx, pipe, plan, m)
        self.q_gm, self.scale_gm = q_gm, scale_gm
        self.out_q = TQue(TPosition.VECOUT, 1)
        pipe.init_buffer(self.out_q, 2, plan.width)
        self.scale_q = TQue(TPosition.VECOUT, 1)
        pipe.init_buffer(self.scale_q, 2, 32 * (plan.scale_rows + BLOCK))
        self.half = calc_buffer(pipe, 2 * plan.width, "float16")
        self.c127, self.scale, self.div = (calc_buffer(pipe, 4 * LANES) for _ in range(3))
        self.div_blocks = calc_buffer(pipe, 4 * BLOCK * LANES)
        ctx.duplicate(self.c127, QMAX, LANES)
        bar(ctx)
        self.stage, self.staged, self.stage_first = None, 0, 0

    def prepare(self, v, count):
        self.ctx.abs(self.tmp, v, count)
        bar(self.ctx)

    def factors(self, r, g):
        ctx = self.ctx
        ctx.div(self.scale, self.stat, self.c127, g)
        bar(ctx)
        ctx.maxs(self.div, self.scale, TINY, g)
        if self.stage is not None and self.staged + g > self.plan.scale_rows:
            self.flush()
        if self.stage is None:
            self.stage, self.staged, self.stage_first = self.scale_q.alloc_tensor("float32"), 0, r
        ctx.brcb(self.stage[BLOCK * self.staged:], self.scale, cdiv(g, BLOCK))  # row i's scale in block i
        self.staged += g
        bar(ctx)
        ctx.brcb(self.div_blocks, self.div, cdiv(g, BLOCK))
        bar(ctx)

    def flush(self):
        """CopyOut the staged scales: lane 0 of each 32 B block → consecutive fp32 in GM."""
        self.scale_q.enque(self.stage)
        st = self.scale_q.deque()
        first, cnt = self.stage_first, self.staged
        self.ctx.data_copy_pad(self.scale_gm[first:first + cnt], st, DataCopyExtParams(block_count=cnt, block_len=4))
        self.scale_q.free_tensor(st)
        self.stage = None

    def finish(self, v, r, g, c0, n):
        ctx = self.ctx
        apply_rows(ctx, ctx.div, v, self.div_blocks, g, n)
        count = g * n
        ctx.cast(self.half, v, RoundMode.CAST_ODD, count)
        bar(ctx)
        ctx.maxs(self.half, self.half, -QMAX, count)
        bar(ctx)
        ctx.mins(self.half, self.half, QMAX, count)
        bar(ctx)
        o = self.out_q.alloc_tensor("int8")
        ctx.cast(o, self.half, RoundMode.CAST_RINT, count)
        self.out_q.enque(o)
        o = self.out_q.deque()
        k = self.q_gm.shape[1]
        dst = self.q_gm.flatten()[r * k:(r + g) * k] if g > 1 else self.q_gm[r, c0:c0 + n]
        copy_ub_to_gm(ctx, dst, o, count)
        self.out_q.free_tensor(o)

    def end(self):
        if self.stage is not None:
            self.flush()


class QuantizePerToken(QuantRows):
    """The rows' values are x itself, cast to fp32."""

    def __init__(self, ctx, x, q, scale, plan):
        pipe = ctx.tpipe()
        super().__init__(ctx, pipe, plan, x.shape[0], q, scale)
        self.x = x
        self.in_q = TQue(TPosition.VECIN, 1)
        pipe.init_buffer(self.in_q, 2, plan.width * x.dtype.itemsize)

    def compute(self, r, g, c0, n, v, first):
        ctx, k = self.ctx, self.x.shape[1]
        t = self.in_q.alloc_tensor(self.x.dtype)
        src = self.x.flatten()[r * k:(r + g) * k] if g > 1 else self.x[r, c0:c0 + n]
        copy_gm_to_ub(ctx, t, src, g * n)
        self.in_q.enque(t)
        t = self.in_q.deque()
        ctx.cast(v, t, RoundMode.CAST_NONE, g * n)
        self.in_q.free_tensor(t)
        bar(ctx)


@ascendemu.kernel("aiv")
def quantize_per_token_kernel(ctx, x, q, scale, plan):
    """q[M, K] int8, scale[M] fp32 = per-token quantisation of x[M, K] (bf16/fp16); rows split over the AIV."""
    QuantizePerToken(ctx, x, q, scale, plan).process()


def _layout(itemsize):
    def layout(width, _cached, scale_rows):
        return {"in_q": 2 * itemsize * width, **quant_layout(width, scale_rows)}
    return layout


def quantize_per_token(die, x, *, tiling: RowTiling | None = None):
    """Per-token INT8 quantisation of x [M, K] (bf16 or fp16) on all AIV of `die`: returns (q int8 [M, K],
    scale fp32 [M]), numpy arrays when x is one and the die is functional, else GlobalTensors (phantoms on a
    timing-only die). The report is `die.last_report`. Numerics: the module docstring."""
    op = "quantize_per_token"
    check_2d(op, "x", x, IN_DTYPES)
    m, k = x.shape
    plan = plan_rows(op, die.spec, m, k, tiling, _layout(as_dtype(x.dtype).itemsize))
    with Staging(die, op) as st:
        gx = st.put(x, "x")
        q, scale = st.output((m, k), "int8"), st.output((m,), "float32")
        return st.launch(quantize_per_token_kernel, min(die.spec.aiv_per_die, m), (gx, q, scale, plan))


def quantize_rows_reference(v: np.ndarray):
    """(q, scale) of fp32 rows v [M, K] by the rule of the module docstring, in NumPy fp32."""
    v = np.asarray(v, F32)
    mx = np.abs(v).max(axis=1)
    scale = (mx / F32.type(QMAX)).astype(F32)
    d = np.maximum(scale, F32.type(TINY))
    with np.errstate(over="ignore"):
        u = (v / d[:, None]).astype(F32)
    q = np.clip(np.rint(u.astype(np.float64)), -QMAX, QMAX).astype(np.int8)
    return q, scale


def quantize_per_token_reference(x):
    """NumPy golden of `quantize_per_token` (equal bit for bit)."""
    return quantize_rows_reference(np.asarray(x).astype(F32))
