"""SwiGLU fused with per-token INT8 re-quantisation: the middle of an expert MLP (DeepSeek-V3 §7).

    h[t, i]         = SiLU(gate[t, i]) · up[t, i]
    (q, scale)[t]   = per-token quantisation of h[t] (ops/quant.py), for the down projection

`gate_up` [M, 2·I] (bf16 or fp16) is the output of a fused gate_up GEMM whose weight stacks gate_proj over
up_proj ([2·I, H], as vLLM's MergedColumnParallelLinear): columns [0, I) are gate, [I, 2·I) are up.

Operation order, in fp32 on the vector unit (and in `swiglu_reference`, with NumPy fp32 and np.exp on
float64 rounded once to fp32, as the vector Exp is defined):

    g = fp32(gate), u = fp32(up)                     Cast (exact)
    t = −g                                           Muls by −1 (exact)
    t = exp(t)                                       Exp
    t = t + 1                                        Adds
    s = g / t                                        Div: SiLU(g) = g / (1 + e^(−g)), one rounding
    h = s · u                                        Mul

h is then quantised exactly as `quantize_per_token` quantises fp32 rows (quant.QuantRows), so q and scale
equal the reference bit for bit. For g below −88.72, e^(−g) overflows fp32 to inf and SiLU(g) = g / inf = −0
(the true value is below 3.2e-37 in magnitude), as in NumPy fp32. h must stay finite (|gate · up| < 3.4e38).
The short-row tiles (I a multiple of 64, e.g. DeepSeek's 2048) copy G rows of gate and of up in with one
strided DataCopy each (GM row pitch 2·I).
"""
from __future__ import annotations

import numpy as np

import ascendemu
from ascendemu import DataCopyParams, RoundMode, TPosition, TQue
from ascendemu.numerics import as_dtype

from .quant import QuantRows, quant_layout, quantize_rows_reference
from .rowwise import F32, RowTiling, Staging, bar, calc_buffer, check_2d, copy_gm_to_ub, plan_rows

IN_DTYPES = ("bfloat16", "float16")


class SwigluQuant(QuantRows):
    """The rows' values are h = SiLU(gate) · up, computed from one [gate | up] CopyIn per chunk."""

    def __init__(self, ctx, gate_up, q, scale, plan):
        pipe = ctx.tpipe()
        super().__init__(ctx, pipe, plan, gate_up.shape[0], q, scale)
        self.gate_up = gate_up
        self.in_q = TQue(TPosition.VECIN, 1)  # one slot holds [gate chunk | up chunk]
        pipe.init_buffer(self.in_q, 2, 2 * plan.width * gate_up.dtype.itemsize)
        self.g, self.u = (calc_buffer(pipe, 4 * plan.width) for _ in range(2))

    def copy_in(self, dst, r, g, c0, n, half):
        """gate (half 0) or up (half 1) of rows r..r+g-1, columns [c0, c0+n) of that half → dst."""
        gu = self.gate_up
        two_i = gu.shape[1]
        inter = two_i // 2
        if g == 1:
            copy_gm_to_ub(self.ctx, dst, gu[r, half * inter + c0:half * inter + c0 + n], n)
        else:  # g rows of n = I elements at a GM pitch of 2·I (I is a multiple of 64: whole 32 B blocks)
            blk = n * gu.dtype.itemsize // 32
            src = gu.flatten()[r * two_i + half * inter:(r + g) * two_i]
            self.ctx.data_copy(dst, src, DataCopyParams(block_count=g, block_len=blk, src_stride=blk))

    def compute(self, r, g, c0, n, v, first):
        ctx, w, count = self.ctx, self.plan.width, g * n
        x = self.in_q.alloc_tensor(self.gate_up.dtype)
        self.copy_in(x, r, g, c0, n, 0)
        self.copy_in(x[w:], r, g, c0, n, 1)
        self.in_q.enque(x)
        x = self.in_q.deque()
        ctx.cast(self.g, x, RoundMode.CAST_NONE, count)
        ctx.cast(self.u, x[w:], RoundMode.CAST_NONE, count)
        self.in_q.free_tensor(x)
        bar(ctx)
        t = self.tmp
        ctx.muls(t, self.g, -1.0, count)
        bar(ctx)
        ctx.exp(t, t, count)
        bar(ctx)
        ctx.adds(t, t, 1.0, count)
        bar(ctx)
        ctx.div(t, self.g, t, count)
        bar(ctx)
        ctx.mul(v, t, self.u, count)
        bar(ctx)


@ascendemu.kernel("aiv")
def swiglu_quant_kernel(ctx, gate_up, q, scale, plan):
    """q[M, I] int8, scale[M] fp32 = per-token quantisation of SiLU(gate) · up; rows split over the AIV."""
    SwigluQuant(ctx, gate_up, q, scale, plan).process()


def _layout(itemsize):
    def layout(width, _cached, scale_rows):
        return {"in_q": 2 * 2 * itemsize * width, "gate": 4 * width, "up": 4 * width,
                **quant_layout(width, scale_rows)}
    return layout


def swiglu_quant(die, gate_up, *, tiling: RowTiling | None = None):
    """SiLU(gate) · up of gate_up [M, 2·I] (bf16 or fp16; gate = columns [0, I), up = [I, 2·I)), quantised per
    token on all AIV of `die`: returns (q int8 [M, I], scale fp32 [M]) — numpy arrays when gate_up is one and
    the die is functional, else GlobalTensors. The report is `die.last_report`."""
    op = "swiglu_quant"
    check_2d(op, "gate_up", gate_up, IN_DTYPES)
    m, two_i = gate_up.shape
    if two_i % 2:
        raise ValueError(f"swiglu_quant: gate_up has {two_i} columns; it must be [M, 2·I] (gate then up)")
    inter = two_i // 2
    plan = plan_rows(op, die.spec, m, inter, tiling, _layout(as_dtype(gate_up.dtype).itemsize))
    with Staging(die, op) as st:
        g = st.put(gate_up, "gate_up")
        q, scale = st.output((m, inter), "int8"), st.output((m,), "float32")
        return st.launch(swiglu_quant_kernel, min(die.spec.aiv_per_die, m), (g, q, scale, plan))


def swiglu_reference(gate_up) -> np.ndarray:
    """h = SiLU(gate) · up in fp32 [M, I], in the kernel's operation order (module docstring)."""
    x = np.asarray(gate_up)
    inter = x.shape[1] // 2
    g = x[:, :inter].astype(F32)
    u = x[:, inter:].astype(F32)
    with np.errstate(over="ignore", invalid="ignore"):
        t = (-g).astype(F32)
        t = np.exp(t.astype(np.float64)).astype(F32)
        t = (t + F32.type(1.0)).astype(F32)
        s = (g / t).astype(F32)
        return (s * u).astype(F32)


def swiglu_quant_reference(gate_up):
    """NumPy golden of `swiglu_quant` (equal bit for bit): (q, scale)."""
    return quantize_rows_reference(swiglu_reference(gate_up))
