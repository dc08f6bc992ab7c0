"""What the row-wise AIV kernels share: tiling, the row split, the two-pass row walk, reductions, host staging.

Per-token quantisation, SwiGLU + quantisation and RMSNorm finish each row of an [M, N] input with a
whole-row statistic (max|v| or Σv²). They run on every AIV of the die: block b of B takes the contiguous
rows [b·M/B, (b+1)·M/B) (B = min(48, M)). A block walks its rows in *tiles* through double-buffered TQues:

* long rows (or N not a multiple of 64): a tile is one row, walked in column chunks of `RowTiling.chunk`;
* short rows (N a multiple of 64, N ≤ chunk/2, and N ≤ 512 or a multiple of 512): a tile is G rows
  (G ≤ chunk // N, ≤ 64; see `_group`), one CopyIn, and every elementwise instruction covers all G rows.

Each tile takes two passes (`RowKernel.process`, Ascend C's Process):

    pass 1   per chunk: CopyIn (MTE2) → the fp32 values (V) → the statistic: the chunk's |v| or v² is
             reduced by BlockReduce stages (8 → 1 per 32 B block) to ≤ 64 partials per row, which are
             folded lane-wise into a 64-lane running vector (long rows) or WholeReduced per row at once
             (short rows, one repeat per row) into `stat[g]`
    factors  per-row factors on the G lanes of `stat` (scale, rsqrt, …), Brcb'd into one 32 B block per row
    pass 2   per chunk: apply each row's block (a Div/Mul whose src1 block has block and repeat stride 0),
             cast, CopyOut (MTE3)

When a long row's fp32 values fit in UB (`resident`), pass 1 keeps them and pass 2 starts from there, so the
input is read from GM once. Otherwise pass 2 copies the chunk in again and recomputes it (the same values:
every vector op is deterministic), which costs a second read of the input. Short-row tiles always stay in UB.

Sum order (the only reduction whose order shows). Per chunk of `chunk` columns (RMSNorm: 4096 unless the
tiling says otherwise): BlockReduceSum stages while more than 64 values remain, each adding every 32 B
block's 8 lanes as the pairwise tree ((0+1)+(2+3))+((4+5)+(6+7)) (a partial last block over its lanes),
rounding to fp32 at every level; the ≤ 64 partials are added lane-wise into a zeroed 64-lane vector (long
rows: one Add per chunk); the 64 lanes are summed as a pairwise tree (WholeReduceSum, missing lanes 0). A
short-row tile computes exactly the same numbers. `fold_sum_reference` mirrors it on whole arrays.

Dependent vector instructions are separated by PipeBarrier<PIPE_V>, as in Ascend C.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ascendemu import (PIPE_V, BinaryRepeatParams, DataCopyExtParams, GlobalTensor, ReduceOrder, TBuf, TPosition)
from ascendemu.layouts import ceil_div, round_up  # noqa: F401 (round_up is re-exported)
from ascendemu.numerics import as_dtype, dtype_name

F32 = np.dtype(np.float32)
BF16 = np.dtype(ml_dtypes.bfloat16)
LANES = 64  # fp32 lanes of one 256 B repeat: the width of the running vector
BLOCK = 8  # fp32 lanes of one 32 B block
MAX_GROUP = 64  # rows of a short-row tile (the lanes of `stat`)


cdiv = ceil_div  # the shape helpers of ascendemu.layouts, re-exported for the row-wise ops


@dataclass(frozen=True)
class RowTiling:
    """How a row-wise kernel walks its rows.

    chunk: columns per chunk, and elements per tile buffer (a multiple of 64); None = chosen per shape.
    resident: keep a long row's fp32 values in UB between the passes; None = whenever they fit.
    group: allow short-row tiles of several rows (see the module docstring).
    scale_rows: per-token scales staged in UB before one copy out (a multiple of 8); also caps the rows of a
        short-row tile.
    """

    chunk: int | None = None
    resident: bool | None = None
    group: bool = True
    scale_rows: int = 128

    def check(self) -> str | None:
        """None if the fields are well formed, else the reason."""
        if self.chunk is not None and (not isinstance(self.chunk, (int, np.integer)) or isinstance(self.chunk, bool)
                                       or self.chunk < LANES or self.chunk % LANES):
            return f"tiling.chunk = {self.chunk!r} must be a positive multiple of {LANES}"
        if self.resident not in (None, True, False):
            return f"tiling.resident = {self.resident!r} must be True, False or None"
        if self.group not in (True, False):
            return f"tiling.group = {self.group!r} must be True or False"
        if not isinstance(self.scale_rows, (int, np.integer)) or not BLOCK <= self.scale_rows <= 4088 \
                or self.scale_rows % BLOCK:
            return f"tiling.scale_rows = {self.scale_rows!r} must be a multiple of {BLOCK} in 8..4088"
        return None


@dataclass(frozen=True)
class RowPlan:
    """A tiling resolved for rows of `cols` columns."""

    cols: int
    chunk: int  # chunk boundaries are at multiples of this (long rows)
    group: int  # rows per tile: 1 = long-row tiles
    width: int  # elements of one tile buffer
    resident: bool
    ub_bytes: int
    scale_rows: int

    @property
    def parts(self) -> list:
        """(start, count) of the column chunks of one tile."""
        if self.group > 1:
            return [(0, self.cols)]
        return [(c0, min(self.chunk, self.cols - c0)) for c0 in range(0, self.cols, self.chunk)]

    @property
    def cached(self) -> int:
        """Elements of the fp32 value buffer."""
        return round_up(self.cols, LANES) if self.resident and self.group == 1 else self.width


def _group(cols: int, chunk: int, rows_per_core: int) -> int:
    """Rows per short-row tile: as many as fit a chunk (at most 64), but no more than give a core PIECES tiles
    to overlap CopyIn, compute and CopyOut with, unless the tiles would then hold under 1024 elements (where
    instruction heads, not transfers, dominate)."""
    if cols % LANES or 2 * cols > chunk or (cols > 512 and cols % 512):  # rows must stay block-aligned through
        return 1                                                           # every BlockReduce stage
    return max(1, min(chunk // cols, MAX_GROUP, max(cdiv(rows_per_core, PIECES), cdiv(MIN_AUTO_CHUNK, cols))))


AUTO_CHUNKS = (8192, 4096, 2048, 1024, 512, 256, 128, 64)
MIN_AUTO_CHUNK = 1024  # the auto chunk goes below this only when nothing larger fits
PIECES = 4  # CopyIns per core the auto choice aims at, so that the double buffering has work to overlap


def plan_rows(op: str, spec, m: int, cols: int, tiling: RowTiling | None, layout) -> RowPlan:
    """Resolve `tiling` for M rows of `cols` columns. `layout(width, cached, scale_rows)` returns the UB bytes
    of the op's own buffers ({name: bytes}), beside those of `RowKernel` (`cached`: RowPlan.cached).

    With `tiling.chunk` None the chunk is the largest of AUTO_CHUNKS whose plan keeps a row resident in UB and
    gives each core at least PIECES CopyIns (not below MIN_AUTO_CHUNK for the latter); if no chunk keeps the
    row resident, the largest that fits streamed."""
    tiling = RowTiling() if tiling is None else tiling
    if not isinstance(tiling, RowTiling):
        raise TypeError(f"{op}: tiling must be a RowTiling, got {type(tiling).__name__}")
    why = tiling.check()
    if why:
        raise ValueError(f"{op}: {why}")
    rows_per_core = cdiv(m, min(m, spec.aiv_per_die))

    def plan(chunk, resident):
        group = min(_group(cols, chunk, rows_per_core), tiling.scale_rows) if tiling.group else 1
        width = group * cols if group > 1 else min(chunk, round_up(cols, LANES))
        resident = resident or group > 1
        p = RowPlan(cols, chunk, group, width, resident, 0, tiling.scale_rows)
        parts = {**layout(width, p.cached, tiling.scale_rows), **RowKernel.layout(width, p.cached)}
        total = sum(round_up(b, 32) for b in parts.values())
        pieces = rows_per_core * len(p.parts) if group == 1 else cdiv(rows_per_core, group)
        return RowPlan(cols, chunk, group, width, resident, total, tiling.scale_rows), parts, pieces

    residency = (True, False) if tiling.resident is None else (tiling.resident,)
    for resident in residency:
        fitting = []
        for chunk in (tiling.chunk,) if tiling.chunk else AUTO_CHUNKS:
            p, parts, pieces = plan(chunk, resident)
            if p.ub_bytes <= spec.ub_bytes:
                if pieces >= PIECES or chunk <= MIN_AUTO_CHUNK or tiling.chunk:
                    return p
                fitting.append(p)
        if fitting:
            return fitting[-1]
    detail = ", ".join(f"{k} {v}" for k, v in parts.items())
    raise ValueError(f"{op}: rows of {cols} columns with chunk {p.chunk} ({'resident' if p.resident else 'streamed'}) "
                     f"need {p.ub_bytes} B of UB, which holds {spec.ub_bytes} B ({detail}); use a smaller chunk or "
                     f"resident=False")


# ------------------------------------------------------------------------------------------- kernel helpers


def bar(ctx) -> None:
    """`PipeBarrier<PIPE_V>()` between dependent vector instructions."""
    ctx.pipe_barrier(PIPE_V)


def calc_buffer(pipe, nbytes: int, dtype="float32"):
    """A VECCALC TBuf of `nbytes` (Ascend C `pipe.InitBuffer(tbuf, bytes); tbuf.Get<T>()`)."""
    b = TBuf(TPosition.VECCALC)
    pipe.init_buffer(b, nbytes)
    return b.get(dtype)


def copy_gm_to_ub(ctx, dst, src: GlobalTensor, n: int) -> None:
    """`DataCopy` of n elements when they are whole 32 B blocks, else `DataCopyPad` (the tail of the last block
    is left as it was: every vector instruction after it counts exactly n elements)."""
    if n * src.dtype.itemsize % 32 == 0:
        ctx.data_copy(dst[:n], src, n)
    else:
        ctx.data_copy_pad(dst, src, DataCopyExtParams(block_count=1, block_len=n * src.dtype.itemsize))


def copy_ub_to_gm(ctx, dst: GlobalTensor, src, n: int) -> None:
    """`DataCopy` of n elements when they are whole 32 B blocks, else `DataCopyPad` (exactly n elements land)."""
    if n * dst.dtype.itemsize % 32 == 0:
        ctx.data_copy(dst, src[:n], n)
    else:
        ctx.data_copy_pad(dst, src, DataCopyExtParams(block_count=1, block_len=n * dst.dtype.itemsize))


@contextlib.contextmanager
def counter_mode(ctx):
    """`SetMaskCount()` … `SetMaskNorm()`: inside, a repeat-form mask is the element count over all repeats."""
    ctx.set_mask_count()
    try:
        yield
    finally:
        ctx.set_mask_norm()


def apply_rows(ctx, fn, v, blocks, g: int, n: int) -> None:
    """v[row j] = fn(v[row j], block j) for the g rows of n fp32 lanes of a tile, `blocks` holding one 32 B
    block per row: one instruction per row whose src1 is that block for every block of every repeat (block
    and repeat stride 0), in counter mode so that any n works."""
    with counter_mode(ctx):
        for j in range(g):
            row = v[j * n:(j + 1) * n]
            fn(row, row, blocks[BLOCK * j:BLOCK * (j + 1)], n, 1, BinaryRepeatParams(src1_blk_stride=0,
                                                                                      src1_rep_stride=0))
    bar(ctx)


class RowKernel:
    """The two-pass row walk of the module docstring, in Ascend C's kernel-class shape (`__init__` = Init,
    `process` = Process). An op supplies:

    - `stat_op` ("max" or "sum") and `prepare(v, n)`: the values whose statistic is taken (|v| or v²), in
      `self.tmp`;
    - `compute(r, g, c0, n, v, first)`: CopyIn rows r..r+g-1, columns [c0, c0+n), and write their fp32
      values to v (pass 1: first=True; pass 2 of a streamed row: first=False);
    - `factors(r, g)`: from `self.stat[0:g]`, the per-row factors, staged as needed;
    - `finish(v, r, g, c0, n)`: pass 2 of one chunk (apply the factors, cast, CopyOut);
    - `end()`: after the last tile.
    """

    stat_op = "max"

    @staticmethod
    def layout(width: int, cached: int) -> dict:
        """UB bytes of the buffers `RowKernel.__init__` allocates."""
        return {"values": 4 * cached, "tmp": 4 * width,
                "reduce": 4 * (round_up(cdiv(width, 8), 8) + round_up(cdiv(width, 64), 8) + 2 * LANES)}

    def __init__(self, ctx, pipe, plan: RowPlan, m: int):
        self.ctx, self.pipe, self.plan = ctx, pipe, plan
        b, nb = ctx.block_idx, ctx.block_num
        self.rows = range(b * m // nb, (b + 1) * m // nb)
        w = plan.width
        self.values = calc_buffer(pipe, 4 * plan.cached)
        self.tmp = calc_buffer(pipe, 4 * w)
        self.red = (calc_buffer(pipe, 4 * round_up(cdiv(w, 8), 8)), calc_buffer(pipe, 4 * round_up(cdiv(w, 64), 8)))
        self.run = calc_buffer(pipe, 4 * LANES)
        self.stat = calc_buffer(pipe, 4 * LANES)

    def value_view(self, g: int, c0: int, n: int):
        p = self.plan
        if p.group > 1:
            return self.values[:g * n]
        return self.values[c0:c0 + n] if p.resident else self.values[:n]

    def process(self) -> None:
        ctx, p = self.ctx, self.plan
        g_max = p.group
        tiles = [(r, min(g_max, self.rows.stop - r)) for r in range(self.rows.start, self.rows.stop, g_max)]
        for r, g in tiles:
            if g_max == 1:
                ctx.duplicate(self.run, 0.0, LANES)  # |v| ≥ 0 and v² ≥ 0: 0 is neutral for both
                bar(ctx)
            for c0, n in p.parts:
                v = self.value_view(g, c0, n)
                self.compute(r, g, c0, n, v, True)
                self.prepare(v, g * n)
                if g_max == 1:
                    self.fold_chunk(n)
                else:
                    self.reduce_rows(g, n)
            if g_max == 1:
                self.whole_reduce(self.stat, self.run, LANES, 1, 8)
            self.factors(r, g)
            for c0, n in p.parts:
                v = self.value_view(g, c0, n)
                if not p.resident:
                    self.compute(r, g, c0, n, v, False)
                self.finish(v, r, g, c0, n)
        self.end()

    # --- the statistic -----------------------------------------------------------------------
    def block_reduce(self, dst, src, count: int) -> None:
        """One BlockReduceMax/Sum stage over `count` values (in counter mode): ⌈count/8⌉ results."""
        ctx = self.ctx
        (ctx.block_reduce_max if self.stat_op == "max" else ctx.block_reduce_sum)(dst, src, 1, count)
        bar(ctx)

    def whole_reduce(self, dst, src, mask: int, repeats: int, rep_stride: int) -> None:
        """WholeReduceMax/Sum: one result per repeat (a pairwise tree of the lanes for sums) → dst[r]."""
        ctx = self.ctx
        if self.stat_op == "max":
            ctx.whole_reduce_max(dst, src, mask, repeats, 1, 1, rep_stride, order=ReduceOrder.ORDER_ONLY_VALUE)
        else:
            ctx.whole_reduce_sum(dst, src, mask, repeats, 1, 1, rep_stride)
        bar(ctx)

    def fold_chunk(self, n: int) -> None:
        """Long rows: reduce the n values in `tmp` to ≤ 64 partials, fold them lane-wise into `run`."""
        ctx = self.ctx
        cur, cnt, i = self.tmp, n, 0
        if cnt > LANES:
            with counter_mode(ctx):
                while cnt > LANES:
                    self.block_reduce(self.red[i % 2], cur, cnt)
                    cur, cnt, i = self.red[i % 2], cdiv(cnt, BLOCK), i + 1
        (ctx.max if self.stat_op == "max" else ctx.add)(self.run, self.run, cur, cnt)
        bar(ctx)

    def reduce_rows(self, g: int, n: int) -> None:
        """Short rows: g rows of n values in `tmp` (n a multiple of 64) → stat[0:g], one repeat per row."""
        cur, cnt, i = self.tmp, n, 0
        if cnt > LANES:
            with counter_mode(self.ctx):
                while cnt > LANES:
                    self.block_reduce(self.red[i % 2], cur, g * cnt)
                    cur, cnt, i = self.red[i % 2], cnt // BLOCK, i + 1
        self.whole_reduce(self.stat, cur, cnt, g, cnt // BLOCK)

    # --- hooks ---------------------------------------------------------------------------------
    def prepare(self, v, count: int) -> None:
        raise NotImplementedError

    def compute(self, r: int, g: int, c0: int, n: int, v, first: bool) -> None:
        raise NotImplementedError

    def factors(self, r: int, g: int) -> None:
        raise NotImplementedError

    def finish(self, v, r: int, g: int, c0: int, n: int) -> None:
        raise NotImplementedError

    def end(self) -> None:
        pass


# --------------------------------------------------------------------------------------------- references


def _pairwise(v: np.ndarray, width: int, fill) -> np.ndarray:
    """The pairwise tree over groups of `width` along the last axis (padded with `fill`), in fp32."""
    pad = (-v.shape[-1]) % width
    if pad:
        v = np.concatenate([v, np.full(v.shape[:-1] + (pad,), fill, F32)], axis=-1)
    v = v.reshape(v.shape[:-1] + (-1, width))
    while v.shape[-1] > 1:
        v = (v[..., 0::2] + v[..., 1::2]).astype(F32)
    return v[..., 0]


def fold_sum_reference(v: np.ndarray, chunk: int) -> np.ndarray:
    """Σ over the last axis of the fp32 array v [M, N] in exactly the kernels' order (module docstring)."""
    v = np.asarray(v, F32)
    m, n = v.shape
    run = np.zeros((m, LANES), F32)
    with np.errstate(over="ignore", invalid="ignore"):
        for c0 in range(0, n, chunk):
            cur = v[:, c0:c0 + chunk]
            while cur.shape[1] > LANES:
                cur = _pairwise(cur, BLOCK, 0.0)
            c = cur.shape[1]
            run[:, :c] = (run[:, :c] + cur).astype(F32)
        return _pairwise(run, LANES, 0.0)[:, 0]


# ------------------------------------------------------------------------------------------------ host side


def check_2d(op: str, name: str, x, dtypes) -> None:
    if not isinstance(x, (np.ndarray, GlobalTensor)):
        raise TypeError(f"{op}: {name} must be a numpy array or a GlobalTensor, got {type(x).__name__}")
    if len(x.shape) != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(x.shape)}")
    if min(x.shape) < 1:
        raise ValueError(f"{op}: {name} must have at least one row and one column, got shape {tuple(x.shape)}")
    check_dtype(op, name, x, dtypes)


def check_dtype(op: str, name: str, x, dtypes) -> str:
    try:
        name_ = dtype_name(as_dtype(x.dtype))
    except TypeError:
        name_ = str(x.dtype)
    if name_ not in dtypes:
        raise TypeError(f"{op}: {name} is {name_}; it must be {' or '.join(dtypes)}")
    return name_


class Staging:
    """The host side of one launch on one die (Ascend C's aclrtMalloc + aclrtMemcpy H2D, the launch, aclrtMemcpy
    D2H + aclrtFree), shared by every single-die op:

        with Staging(die, op) as st:
            gx = st.put(x, "x")                        # numpy → staged into GM; a GlobalTensor of die → as it is
            gw = st.put_stack(datas, "w")              # numpy arrays of one shape and dtype → ONE upload, a view each
            y = st.output((m, n), "bfloat16")          # the kernel's output
            work = st.workspace((size,), "int32")      # GM scratch of this launch only
            (y,) = st.launch(kernel, block_dim, (gx, gw, y, work))

    What was staged and every workspace are freed when the launch ends, whether it succeeds or not. If anything
    in the block raises before `launch` returns (a `put` out of GM, a check, the kernel), the outputs are freed
    too: die.gm is left exactly as it was. `launch` returns the outputs in the order `output` made them: numpy
    arrays (and the outputs freed) when every operand given to `put`/`put_stack` was a numpy array and the die is
    functional, else the GlobalTensors (phantoms on a timing-only die), which the caller then owns.

    An op of several launches runs the earlier ones with `die.launch` inside the block (an error frees everything)
    and ends with `launch`; `own` takes what other ops hand back (their GlobalTensors) as workspaces or outputs,
    and `result` returns the outputs as `launch` would when the last launch was another op's.
    """

    def __init__(self, die, op: str):
        self.die, self.op = die, op
        self.scratch = []  # staged operands and workspaces: freed when the launch ends
        self.outputs = []  # freed unless `launch` hands them back
        self.all_host = True
        self.entered = False

    def __enter__(self) -> "Staging":
        self.entered = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.release()
        return False

    def release(self) -> None:
        """Free everything still held: the scratch, and the outputs not handed back by `launch`."""
        for g in self.scratch + self.outputs:
            self.die.gm.free(g)
        self.scratch, self.outputs = [], []

    def _hold(self, where: list, g: GlobalTensor) -> GlobalTensor:
        where.append(g)
        return g

    def _check_entered(self) -> None:
        if not self.entered:  # outside `with`, an error between two puts would leak what the first staged
            raise RuntimeError(f"{self.op}: use Staging as `with Staging(die, op) as st:`, so that nothing staged "
                               f"outlives an error")

    def put(self, x, name: str) -> GlobalTensor:
        """x as a GlobalTensor of the die: a numpy array is copied into GM (freed after the launch)."""
        self._check_entered()
        if isinstance(x, GlobalTensor):
            if x.gm is not self.die.gm:
                raise ValueError(f"{self.op}: {name} is a GlobalTensor of another die's GM")
            self.all_host = False
            return x
        return self._hold(self.scratch, self.die.gm.from_numpy(np.ascontiguousarray(x)))

    def put_stack(self, xs, name: str) -> list:
        """Several operands as GlobalTensors. Two or more numpy arrays of one shape and dtype are staged as one
        stacked array (one upload; each gets a view of it); anything else is `put` one by one."""
        self._check_entered()
        xs = list(xs)
        if len(xs) > 1 and all(isinstance(x, np.ndarray) and x.shape == xs[0].shape and x.dtype == xs[0].dtype
                               for x in xs):
            stack = self._hold(self.scratch, self.die.gm.from_numpy(np.stack(xs)))
            return [stack[i] for i in range(len(xs))]
        return [self.put(x, f"{name}[{i}]") for i, x in enumerate(xs)]

    def output(self, shape, dtype) -> GlobalTensor:
        """A new GM tensor the kernel writes; `launch` returns it (freed if the launch fails)."""
        self._check_entered()
        return self._hold(self.outputs, self.die.gm.empty(shape, dtype))

    def workspace(self, shape, dtype) -> GlobalTensor:
        """A new GM tensor for this launch only (freed when it ends)."""
        self._check_entered()
        return self._hold(self.scratch, self.die.gm.empty(shape, dtype))

    def own(self, g: GlobalTensor, *, output: bool = False) -> GlobalTensor:
        """Take a GlobalTensor of the die another op returned: freed like a workspace, or (output=True) handed
        back like an `output`."""
        self._check_entered()
        if not isinstance(g, GlobalTensor) or g.gm is not self.die.gm:
            raise ValueError(f"{self.op}: own takes a GlobalTensor of this die's GM, got {type(g).__name__}")
        return self._hold(self.outputs if output else self.scratch, g)

    def launch(self, kern, block_dim: int, args: tuple) -> tuple:
        """Run `kern` on `block_dim` blocks of the die; return the outputs (numpy or GlobalTensors: see above)."""
        self._check_entered()
        try:
            self.die.launch(kern, block_dim=block_dim, args=args)
        except BaseException:
            self.release()
            raise
        return self.result()

    def result(self) -> tuple:
        """The outputs, as `launch` returns them; everything else is freed."""
        self._check_entered()
        try:
            outs = tuple(self.outputs)
            if self.all_host and self.die.functional:
                return tuple(o.numpy() for o in outs)  # (the outputs are freed below)
            self.outputs = []  # the caller owns them now
            return outs
        finally:
            self.release()
