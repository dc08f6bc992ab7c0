"""FusedDispatch and FusedCombine: MoE token exchange across the cluster over AIV-Direct (or SDMA) (issue 6, items
3, 5, 7, 8; cloudmatrix-design.md §4).

Dispatch — one `cluster.launch` of an AIV kernel on every die at once. Die s, AIV b (of B) owns the contiguous tokens
[b·T_s/B, (b+1)·T_s/B):

    per token, three stages pipelined through double-buffered TQues
      (1) CopyIn      x[t] (bf16) GM → UB                                           MTE2
      (2) quantise    fp32, max|x| → scale = max/127, q = rint(x / max(scale, 2⁻¹⁴⁹)) into the message buffer   V
                      (numerics of ops/quant.py, bit for bit) + the scale in the message tail; the destination
                      offsets of the token's copies (placement.route, running counts of this source) — scalar
      (3) send        one AIV-Direct write per (token, routed expert) copy, plus the shared-expert copy when
                      the shared expert is remote                                     MTE3

    message (MSG = H + SCALE_TAIL_BYTES; 7168 + 512 = 7680 B at R1 size):
      | q[0] … q[H−1]  int8 payload | scale fp32 | zeros … (SCALE_TAIL_BYTES − 4) |

Static receive buffer of die d (dispatch): one window per (local slot, source die) of max_tokens_per_rank messages:

    recv_d [slot 0: | src 0: max_tokens × MSG | src 1: … | … | src N−1 | ] [slot 1: …] …

A source writes its i-th copy for (d, slot) into window (slot, source) row i: it knows i from its own routing alone,
so no source ever needs another's counts and no two writes collide. Metadata, inside the op: once every AIV of the
source die has its data landed (each AIV fences and counts itself into a local "quiet" word; AIV 0 waits for B, then
SyncAll — one waiter per counter, the others sleep in SyncAll), AIV b writes the source's per-slot counts (int32, one
row of `meta_d [N, W]`) to each of its destinations d ≡ b (mod B) — to every die, zeros included, since a receiver
cannot know who sends — then fences once and atomically adds 1 to each one's arrival word (one fence for all its
destinations: every count lands before any of its flags). A receiver (AIV 0, then SyncAll) waits for N arrivals,
reads `meta_d`, and compacts the windows into its outputs grouped by local slot, in slot order; within a slot by
(source die, source token, k) — the `handle.received(d)` order:

    tokens_d [R_d, H] int8 ← window (slot, src) rows 0..count−1, payloads (strided DataCopy GM→UB, DataCopy UB→GM)
    scales_d [R_d] fp32    ← the same rows' tails (DataCopyPad of 4 B blocks)

The per-slot send counts of a source are its own routing's histogram, computed on the host from topk_ids (always real
arrays) and staged in the source's GM; the receiver's loop bounds come from the same host plan, because phantom GM has
no values in timing-only mode. In functional mode the receiver checks the metadata it read from GM against them.

Combine — one launch: each expert-output row goes home by AIV-Direct in BF16 (from GM, 2·H bytes) into the home die's
static combine buffer `comb_h [max_tokens, K', H]` at (token, k) (K' = k, + 1 for a remote shared copy at column k);
after the die's quiet barrier, AIV b flags each home die h ≡ b (mod B) that it sent rows to. The home die knows from its
own routing how many dies hold its copies and waits for that many flags, then per token

    out = bf16( Σ_{k in top-k order} fp32(w_k · fp32(row_k))  +  fp32(shared) )       fp32 accumulation, RINT to bf16

where `shared` is the remote shared row (weight 1.0) or `shared_out[t]` when given. Each product and each partial sum
is rounded to fp32 in that order (Muls, Add), so `combine_reference` is bit-exact. Per column chunk: one Cast
of all K' rows to fp32, k independent Muls (one PipeBarrier after them, not one per row), then the dependent Adds.

SDMA transport (`transport="sdma"`): the same kernels with bulk copies. Dispatch packs each message into a local send
buffer laid out like the destination windows (DataCopy UB→GM), SyncAll, then AIV b issues one `sdma_copy` per
(destination d ≡ b, slot) run and sends the metadata as above (its one fence also orders the bulk copies). Combine: AIV b copies, per home h ≡ b and slot,
the run of rows for h (contiguous in the received order) into h's SDMA window, at the offset the home computes from its
own routing; the home gathers its K' rows per token from there.

Static buffers are allocated per call (dispatch and combine separately) and sized from max_tokens_per_rank; a die with
more tokens, or a window that would overflow, raises ValueError naming the dies and counts before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import ascendemu
from ascendemu import (BinaryRepeatParams, DataCopyExtParams, DataCopyParams, GlobalTensor, HardEvent, RoundMode,
                       TPosition, TQue)

from ..quant import QMAX, TINY, quantize_per_token_reference
from ..rowwise import BF16, F32, bar, calc_buffer, cdiv, check_dtype, counter_mode, round_up
from .placement import ExpertPlacement

__all__ = ["SCALE_TAIL_BYTES", "DispatchHandle", "ReceivedTokens", "fused_dispatch", "fused_combine",
           "sdma_dispatch", "sdma_combine", "message_bytes", "dispatch_reference", "combine_reference"]

SCALE_TAIL_BYTES = 512  # the message tail holding the fp32 scale (then zeros): 7168 + 512 = 7680 B (design §4, §10)
TRANSPORTS = ("aiv", "sdma")
UB_BUDGET = 176 * 1024  # UB bytes the combine kernel plans its column chunks for


def message_bytes(hidden: int, tail: int = SCALE_TAIL_BYTES) -> int:
    """Bytes of one dispatch message: the INT8 payload and the scale tail."""
    return hidden + tail


# ------------------------------------------------------------------------------------------------ host plan


@dataclass(frozen=True)
class ReceivedTokens:
    """What one die received: rows grouped by local slot (`slots` = placement.slots[die]), counts per slot."""

    die: int
    tokens: GlobalTensor
    scales: GlobalTensor
    counts: np.ndarray
    slots: tuple


@dataclass
class _DiePlan:
    """Everything one die's kernels need, from the host's view of the routing (topk arrays are real)."""

    index: int
    tokens: int
    copies: list = field(default_factory=list)  # per token: tuple of (dst, slot, window row)
    send_counts: np.ndarray = None  # int32 [N, W]: copies to (dst, slot)
    recv_counts: np.ndarray = None  # int32 [N, W]: copies from (src, slot) — what meta must hold
    runs: list = field(default_factory=list)  # (slot, src, count, out_row) in received order
    chunks: list = field(default_factory=list)  # compaction pieces (slot, src, first row, count, out_row)
    homes: list = field(default_factory=list)  # home dies of the received rows, ascending
    received: int = 0
    slot_counts: np.ndarray = None  # int64 [nslots]
    origin: np.ndarray = None  # int64 [R, 3]: (src die, token, column) of each received row
    expected_senders: int = 0  # distinct dies holding this die's copies (combine)
    home_rows: dict = field(default_factory=dict)  # home die → row indices (received order) going there


def _check_bf16(op: str, label: str, a, die) -> None:
    """a per-die activation: a numpy array or a GlobalTensor of `die`'s GM, bfloat16."""
    if not isinstance(a, (np.ndarray, GlobalTensor)):
        raise TypeError(f"{op}: {label} must be a numpy array or a GlobalTensor, got {type(a).__name__}")
    if isinstance(a, GlobalTensor) and a.gm is not die.gm:
        raise ValueError(f"{op}: {label} is a GlobalTensor of another die's GM")
    check_dtype(op, label, a, ("bfloat16",))


def _check_inputs(op, cluster, x, topk_ids, topk_weights, placement, max_tokens):
    n = len(cluster)
    if not isinstance(placement, ExpertPlacement):
        raise TypeError(f"{op}: placement must be an ExpertPlacement, got {type(placement).__name__}")
    if placement.num_dies != n:
        raise ValueError(f"{op}: the placement covers {placement.num_dies} dies, the cluster has {n}")
    for name, v in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(v, (list, tuple)) or len(v) != n:
            got = len(v) if isinstance(v, (list, tuple)) else type(v).__name__
            raise ValueError(f"{op}: {name} must be a list with one entry per die ({n}), got {got}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"{op}: max_tokens_per_rank must be a positive int, got {max_tokens!r}")
    hidden, k = None, None
    ids_out, w_out = [], []
    for d in range(n):
        xd = x[d]
        _check_bf16(op, f"x[{d}]", xd, cluster.dies[d])
        if len(xd.shape) != 2:
            raise ValueError(f"{op}: x[{d}] must be 2-D [T, H], got shape {tuple(xd.shape)}")
        t, h = xd.shape
        hidden = h if hidden is None else hidden
        if h != hidden:
            raise ValueError(f"{op}: x[{d}] has hidden size {h}, x[0] has {hidden}")
        ids = np.asarray(topk_ids[d])
        w = np.asarray(topk_weights[d])
        if ids.ndim != 2 or ids.shape[0] != t:
            raise ValueError(f"{op}: topk_ids[{d}] must be [T, k] with T = {t} (x[{d}] rows), got {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{op}: topk_ids[{d}] must be integers, got {ids.dtype}")
        if w.shape != ids.shape:
            raise ValueError(f"{op}: topk_weights[{d}] has shape {w.shape}, topk_ids[{d}] {ids.shape}")
        if w.dtype != np.float32:
            raise TypeError(f"{op}: topk_weights[{d}] must be float32, got {w.dtype}")
        k = ids.shape[1] if k is None else k
        if ids.shape[1] != k or k < 1:
            raise ValueError(f"{op}: topk_ids[{d}] has k = {ids.shape[1]}, expected {k} "
                             f"(k >= 1, the same on every die)")
        if t > max_tokens:
            raise ValueError(f"{op}: die {d} sends {t} tokens, more than max_tokens_per_rank = {max_tokens}")
        ids_out.append(ids.astype(np.int64))
        w_out.append(w)
    if hidden < 32 or hidden % 32:
        raise ValueError(f"{op}: hidden size {hidden} must be a positive multiple of 32")
    return hidden, k, ids_out, w_out


def _plan(placement: ExpertPlacement, ids: list, max_tokens: int):
    """Per-die plans: routes, window rows, counts, received order, combine routes. Raises on overflow."""
    n = placement.num_dies
    width = round_up(max(1, max(len(s) for s in placement.slots)), 8)
    plans = [_DiePlan(d, ids[d].shape[0]) for d in range(n)]
    copies = []  # per source: every copy as (dst, slot, src, t, col)
    shared = placement.shared_remote()
    for s in range(n):
        p = plans[s]
        t_count = ids[s].shape[0]
        dd, ds = placement.route(s, ids[s])
        if shared:
            sd, ss = placement.shared_route(s, t_count)
            dd = np.concatenate([dd, sd[:, None]], axis=1)
            ds = np.concatenate([ds, ss[:, None]], axis=1)
        kk = dd.shape[1]
        key = (dd * width + ds).reshape(-1)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        first = np.searchsorted(sk, sk, side="left")
        row = np.empty_like(key)
        row[order] = np.arange(key.size) - first
        counts = np.bincount(key, minlength=n * width).reshape(n, width)
        if counts.size and counts.max() > max_tokens:
            d, sl = np.unravel_index(int(np.argmax(counts)), counts.shape)
            raise ValueError(f"fused_dispatch: die {s} would send {counts[d, sl]} copies to slot {sl} (expert "
                             f"{placement.slots[d][sl]}) of die {d}, more than the receive window of "
                             f"max_tokens_per_rank = {max_tokens} rows")
        p.send_counts = counts.astype(np.int32)
        row = row.reshape(t_count, kk)
        p.copies = [tuple(zip(dd[t].tolist(), ds[t].tolist(), row[t].tolist())) for t in range(t_count)]
        tt, cc = np.meshgrid(np.arange(t_count), np.arange(kk), indexing="ij")
        copies.append(np.stack([dd.ravel(), ds.ravel(), np.full(dd.size, s), tt.ravel(), cc.ravel()], axis=1))
        p.expected_senders = int(np.unique(dd).size)
    # every destination's arrivals in received order: by (slot, src, t, col), destinations apart
    every = np.concatenate(copies).astype(np.int64) if copies else np.zeros((0, 5), np.int64)
    every = every[np.lexsort(every.T[::-1])]
    bounds = np.searchsorted(every[:, 0], np.arange(n + 1))
    for d in range(n):
        p = plans[d]
        nslots = len(placement.slots[d])
        a = every[bounds[d]:bounds[d + 1], 1:]  # (slot, src, t, col)
        p.received = a.shape[0]
        p.origin = a[:, 1:].astype(np.int64)
        p.slot_counts = np.bincount(a[:, 0], minlength=nslots).astype(np.int64)
        p.recv_counts = np.stack([plans[s].send_counts[d] for s in range(n)])
        out = 0
        for sl in range(nslots):
            for s in range(n):
                c = int(p.recv_counts[s, sl])
                if c:
                    p.runs.append((sl, s, c, out))
                    out += c
        homes = p.origin[:, 0]
        p.home_rows = {int(h): np.nonzero(homes == h)[0] for h in np.unique(homes)}
        p.homes = sorted(p.home_rows)
    return plans, width


def _chunk_runs(plans, rows: int) -> None:
    """Cut each die's compaction runs into pieces of at most `rows` rows (the UB queue slot)."""
    for p in plans:
        p.chunks = [(sl, s, i, min(rows, c - i), out + i) for sl, s, c, out in p.runs for i in range(0, c, rows)]


# ------------------------------------------------------------------------------------------------ the kernels


def _send_ub_bytes(hidden: int, tail: int) -> int:
    """UB bytes of the dispatch kernel's send side (in_q, out_q, `_TokenQuant`), as allocated (32 B rounded)."""
    sizes = [2 * hidden] * 2 + [hidden + tail] * 2 + [4 * hidden] * 2 + [2 * hidden] \
        + [4 * round_up(cdiv(hidden, 8), 8), 4 * round_up(cdiv(hidden, 64), 8)] + [4 * 64] * 5
    return sum(round_up(x, 32) for x in sizes)


def _quiet(ctx, word, n):
    """Every AIV of this die fences its remote writes and counts itself into `word` (this die's GM); AIV 0 waits
    for n, then SyncAll. After it, a remote write of any of them arrives after every earlier remote write of all."""
    ctx.fence()
    ctx.set_atomic_add("int32")
    ctx.remote_write_flag(word, 1)
    ctx.disable_dma_atomic()
    _wait_then_sync(ctx, word, n, f"{n} AIVs of this die quiet")


def _wait_then_sync(ctx, word, n, what):
    """AIV 0 waits until the arrival counter `word` reaches n, then every AIV of the die meets it in SyncAll (one
    waiter per counter instead of all of them)."""
    if ctx.block_idx == 0:
        ctx.wait_until(word, lambda v: v >= n, what=what)
    ctx.sync_all()


class _TokenQuant:
    """Stage 2 of the dispatch pipeline: one token's fp32 row → INT8 payload + scale tail in a message buffer
    (ops/quant.py's instruction sequence and numerics, for a single whole row in UB)."""

    def __init__(self, ctx, pipe, hidden: int, tail: int):
        self.ctx, self.hidden, self.tail = ctx, hidden, tail
        self.v = calc_buffer(pipe, 4 * hidden)
        self.tmp = calc_buffer(pipe, 4 * hidden)
        self.half = calc_buffer(pipe, 2 * hidden, "float16")
        self.red = (calc_buffer(pipe, 4 * round_up(cdiv(hidden, 8), 8)),
                    calc_buffer(pipe, 4 * round_up(cdiv(hidden, 64), 8)))
        self.stat, self.scale, self.div, self.c127 = (calc_buffer(pipe, 4 * 64) for _ in range(4))
        self.div_blocks = calc_buffer(pipe, 4 * 64)
        self.divisor = self.div_blocks[0:8]  # block 0 after Brcb: the divisor in all 8 lanes
        ctx.duplicate(self.c127, QMAX, 64)
        bar(ctx)

    def run(self, src, msg) -> None:
        """src: the token's bf16 row in UB; msg: an int8 message buffer (hidden + tail) in UB."""
        ctx, h = self.ctx, self.hidden
        ctx.cast(self.v, src, RoundMode.CAST_NONE, h)
        bar(ctx)
        ctx.abs(self.tmp, self.v, h)
        bar(ctx)
        cur, cnt, i = self.tmp, h, 0
        with counter_mode(ctx):
            while cnt > 64:
                ctx.block_reduce_max(self.red[i % 2], cur, 1, cnt)
                bar(ctx)
                cur, cnt, i = self.red[i % 2], cdiv(cnt, 8), i + 1
        ctx.whole_reduce_max(self.stat, cur, cnt, 1, 1, 1, 8, order=ascendemu.ReduceOrder.ORDER_ONLY_VALUE)
        bar(ctx)
        ctx.div(self.scale, self.stat, self.c127, 8)
        bar(ctx)
        ctx.maxs(self.div, self.scale, TINY, 8)
        bar(ctx)
        ctx.brcb(self.div_blocks, self.div, 1)  # lane i → block i; block 0 = the divisor
        bar(ctx)
        with counter_mode(ctx):
            ctx.div(self.v, self.v, self.divisor, h, 1,
                    BinaryRepeatParams(src1_blk_stride=0, src1_rep_stride=0))
        bar(ctx)
        ctx.cast(self.half, self.v, RoundMode.CAST_ODD, h)
        bar(ctx)
        ctx.maxs(self.half, self.half, -QMAX, h)
        bar(ctx)
        ctx.mins(self.half, self.half, QMAX, h)
        bar(ctx)
        ctx.cast(msg[0:h], self.half, RoundMode.CAST_RINT, h)
        tail = msg[h:h + self.tail].reinterpret_cast("float32")
        ctx.duplicate(tail, 0.0, self.tail // 4)
        bar(ctx)
        ctx.adds(tail, self.scale, 0.0, 1)  # lane 0 = the scale (≥ 0, so + 0.0 is exact)


@ascendemu.kernel("aiv")
def fused_dispatch_kernel(ctx, x, recv, send_buf, meta, arrive, quiet, send_counts, tokens_out, scales_out, plan, cfg):
    """FusedDispatch on one die (module docstring). recv/meta/arrive: every die's; send_buf: this die's SDMA
    staging buffer (SDMA transport) or None; send_counts: this die's [N, W] int32 counts in GM."""
    me, b, nb = plan.index, ctx.block_idx, ctx.block_num
    h, tail, msg_bytes, n = cfg["hidden"], cfg["tail"], cfg["msg"], cfg["dies"]
    sdma = cfg["transport"] == "sdma"
    pipe = ctx.tpipe()
    in_q = TQue(TPosition.VECIN, 1)
    pipe.init_buffer(in_q, 2, 2 * h)
    out_q = TQue(TPosition.VECOUT, 1)
    pipe.init_buffer(out_q, 2, msg_bytes)
    quant = _TokenQuant(ctx, pipe, h, tail)
    # ---- send: CopyIn → quantise + address → AIV-Direct write (or local pack for SDMA), per token
    for t in range(b * plan.tokens // nb, (b + 1) * plan.tokens // nb):
        xin = in_q.alloc_tensor("bfloat16")
        ctx.data_copy(xin, x[t], h)
        in_q.enque(xin)
        xin = in_q.deque()
        msg = out_q.alloc_tensor("int8")
        quant.run(xin, msg)
        in_q.free_tensor(xin)
        out_q.enque(msg)
        msg = out_q.deque()
        for dst, slot, row in plan.copies[t]:
            if sdma:
                ctx.data_copy(send_buf[dst][slot, row], msg, msg_bytes)
            else:
                ctx.aiv_direct_write(recv[dst][slot, me, row], msg)
        out_q.free_tensor(msg)
    # ---- metadata: after every AIV's data has landed, AIV b tells destinations b, b+B, … the counts
    if sdma:
        ctx.pipe_barrier(ascendemu.PIPE_ALL)
        ctx.sync_all()
    else:
        _quiet(ctx, quiet, nb)
    for dst in range(b, n, nb):
        if sdma:
            for slot in np.nonzero(plan.send_counts[dst])[0].tolist():
                c = int(plan.send_counts[dst, slot])
                ctx.sdma_copy(recv[dst][slot, me, 0:c], send_buf[dst][slot, 0:c])
        ctx.aiv_direct_write(meta[dst][me], send_counts[dst])
    ctx.fence()  # every count (and bulk copy) of this AIV lands before any of its arrival flags
    ctx.set_atomic_add("int32")
    for dst in range(b, n, nb):
        ctx.remote_write_flag(arrive[dst], 1)
    ctx.disable_dma_atomic()
    # ---- receive: wait for every source's metadata, check it, compact the windows grouped by slot
    _wait_then_sync(ctx, arrive[me], n, f"metadata from all {n} dies")
    width = cfg["width"]
    mq = TQue(TPosition.VECIN, 1, events=(HardEvent.MTE2_S, HardEvent.S_MTE2))
    rows = cfg["chunk_rows"]
    pipe.init_buffer(mq, 1, 4 * round_up(n * width, 8))
    m = mq.alloc_tensor("int32")
    ctx.data_copy(m[:n * width], meta[me].flatten(), n * width)
    mq.enque(m)
    m = mq.deque()
    if ctx.functional:
        got = m.array[:n * width].reshape(n, width)
        if not np.array_equal(got, plan.recv_counts):
            bad = np.argwhere(got != plan.recv_counts)[0]
            want = plan.recv_counts[tuple(bad)]
            raise ascendemu.EmulatorError(f"fused_dispatch: die {me} read count {got[tuple(bad)]} from die "
                                          f"{bad[0]} for slot {bad[1]}, the routing says {want}")
    mq.free_tensor(m)
    cq = TQue(TPosition.VECIN, 1, events=(HardEvent.MTE2_MTE3, HardEvent.MTE3_MTE2))
    pipe.init_buffer(cq, 2, rows * (h + 32))  # one slot: `rows` payloads, then one 32 B block per scale
    win = recv[me]
    flat = win.flatten()
    for sl, s, r0, c, out in plan.chunks[b::nb]:
        buf = cq.alloc_tensor("int8")
        pay, sc = buf[0:c * h], buf[rows * h:rows * (h + 32)].reinterpret_cast("float32")
        ctx.data_copy(pay, win[sl, s, r0:r0 + c].flatten(),
                      DataCopyParams(block_count=c, block_len=h // 32, src_stride=tail // 32))
        base = ((sl * n + s) * cfg["max_tokens"] + r0) * msg_bytes + h
        ctx.data_copy_pad(sc, flat[base:base + (c - 1) * msg_bytes + 32].reinterpret_cast("float32"),
                          DataCopyExtParams(block_count=c, block_len=4, src_stride=msg_bytes - 4))
        cq.enque(buf)
        buf = cq.deque("int8")
        pay, sc = buf[0:c * h], buf[rows * h:rows * (h + 32)].reinterpret_cast("float32")
        ctx.data_copy(tokens_out.flatten()[out * h:(out + c) * h], pay, c * h)
        ctx.data_copy_pad(scales_out[out:out + c], sc, DataCopyExtParams(block_count=c, block_len=4))
        cq.free_tensor(buf)


@ascendemu.kernel("aiv")
def fused_combine_kernel(ctx, expert_out, comb, arrive, quiet, out, shared_out, weights, plan, cfg):
    """FusedCombine on one die (module docstring): rows home in BF16, then the weighted sum of this die's tokens."""
    me, b, nb = plan.index, ctx.block_idx, ctx.block_num
    h, kk, k = cfg["hidden"], cfg["kk"], cfg["k"]
    sdma = cfg["transport"] == "sdma"
    origin = plan.origin
    # ---- send every expert-output row home
    if sdma:
        for home in plan.homes[b::nb]:
            rows = plan.home_rows[home]
            base = cfg["sdma_base"][home][me]
            # rows for one home are in slot runs; each contiguous run is one bulk copy
            cuts = np.nonzero(np.diff(rows) != 1)[0] + 1
            pos = 0
            for run in np.split(rows, cuts):
                ctx.sdma_copy(comb[home][base + pos:base + pos + run.size], expert_out[int(run[0]):int(run[-1]) + 1])
                pos += run.size
            ctx.fence()
            ctx.set_atomic_add("int32")
            ctx.remote_write_flag(arrive[home], 1)
            ctx.disable_dma_atomic()
    else:
        lo, hi = b * plan.received // nb, (b + 1) * plan.received // nb
        for r, (home, t, col) in zip(range(lo, hi), origin[lo:hi].tolist()):
            ctx.aiv_direct_write(comb[home][t, col], expert_out[r])
        _quiet(ctx, quiet, nb)
        ctx.set_atomic_add("int32")
        for home in plan.homes[b::nb]:
            ctx.remote_write_flag(arrive[home], 1)
        ctx.disable_dma_atomic()
    _wait_then_sync(ctx, arrive[me], plan.expected_senders, f"{plan.expected_senders} dies' rows")
    # ---- weighted sum of this die's tokens, in fp32, top-k order, then shared; in column chunks of `cw`
    cw = cfg["chunk"]
    pipe = ctx.tpipe()
    in_q = TQue(TPosition.VECIN, 1)
    pipe.init_buffer(in_q, 1, 2 * kk * cw)
    sh_q = TQue(TPosition.VECIN, 1)
    pipe.init_buffer(sh_q, 2, 2 * cw)
    out_q = TQue(TPosition.VECOUT, 1)
    pipe.init_buffer(out_q, 2, 2 * cw)
    acc = calc_buffer(pipe, 4 * cw)
    prod = calc_buffer(pipe, 4 * kk * cw)  # the token's K' rows in fp32, weighted in place
    tmp = calc_buffer(pipe, 4 * cw)  # the shared_out row in fp32
    mine = comb[me]
    row_views = {}  # chunk width → the K' rows of `prod` (the same for every token and every full chunk)
    for t in range(b * plan.tokens // nb, (b + 1) * plan.tokens // nb):
        w_t = [float(v) for v in weights[t]]  # the token's routing weights, the Muls' scalars
        for c0 in range(0, h, cw):
            w_ = min(cw, h - c0)
            rows = row_views.get(w_)
            if rows is None:
                rows = row_views[w_] = [prod[col * w_:(col + 1) * w_] for col in range(kk)]
            rows_in = in_q.alloc_tensor("bfloat16")
            if sdma:
                for col in range(kk):
                    r = int(cfg["sdma_row"][t, col])
                    ctx.data_copy(rows_in[col * w_:(col + 1) * w_], mine[r, c0:c0 + w_], w_)
            elif w_ == h:
                ctx.data_copy(rows_in, mine[t].flatten(), kk * h)
            else:  # the chunk of each of the token's K' rows: one strided copy
                ctx.data_copy(rows_in, mine[t].flatten()[c0:(kk - 1) * h + c0 + w_],
                              DataCopyParams(block_count=kk, block_len=w_ * 2 // 32, src_stride=(h - w_) * 2 // 32))
            in_q.enque(rows_in)
            if shared_out is not None:
                sh = sh_q.alloc_tensor("bfloat16")
                ctx.data_copy(sh, shared_out[t, c0:c0 + w_], w_)
                sh_q.enque(sh)
            rows_in = in_q.deque()
            # the K' rows to fp32 in one Cast; the k weights by independent Muls (no barrier between them); then
            # the sum in top-k order, each Add depending on the previous one
            ctx.cast(prod, rows_in, RoundMode.CAST_NONE, kk * w_)
            in_q.free_tensor(rows_in)
            bar(ctx)
            for col in range(k):
                ctx.muls(acc if col == 0 else rows[col], rows[col], w_t[col], w_)
            bar(ctx)
            for col in range(1, kk):
                ctx.add(acc, acc, rows[col], w_)
                bar(ctx)
            if shared_out is not None:
                sh = sh_q.deque()
                ctx.cast(tmp, sh, RoundMode.CAST_NONE, w_)
                bar(ctx)
                ctx.add(acc, acc, tmp, w_)
                bar(ctx)
                sh_q.free_tensor(sh)
            o = out_q.alloc_tensor("bfloat16")
            ctx.cast(o, acc, RoundMode.CAST_RINT, w_)
            out_q.enque(o)
            o = out_q.deque()
            ctx.data_copy(out[t, c0:c0 + w_], o, w_)
            out_q.free_tensor(o)


# ------------------------------------------------------------------------------------------------ host functions


class DispatchHandle:
    """What `fused_dispatch` returns: per die the received rows (grouped by local slot), and the routes home."""

    def __init__(self, cluster, placement, plans, tokens, scales, weights, hidden, k, max_tokens, transport, report):
        self.cluster, self.placement, self.plans = cluster, placement, plans
        self._tokens, self._scales, self.topk_weights = tokens, scales, weights
        self.hidden, self.k, self.max_tokens, self.transport = hidden, k, max_tokens, transport
        self.report = report  # the dispatch launch's ClusterReport

    def _die(self, d) -> int:
        n = len(self.plans)
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 <= d < n:
            raise ValueError(f"die {d!r} outside 0..{n - 1}")
        return int(d)

    def num_received(self, d) -> int:
        return self.plans[self._die(d)].received

    def received(self, d):
        """(tokens int8 [R_d, H], scales fp32 [R_d]) GlobalTensors in die d's GM, counts int64 [slots of d]."""
        d = self._die(d)
        r = self.plans[d].received
        return self._tokens[d][0:r], self._scales[d][0:r], self.plans[d].slot_counts.copy()

    def origin(self, d) -> np.ndarray:
        """int64 [R_d, 3]: (home die, token, column) of each received row; column k is the shared-expert copy."""
        return self.plans[self._die(d)].origin.copy()

    def for_die(self, d) -> ReceivedTokens:
        tokens, scales, counts = self.received(d)
        return ReceivedTokens(int(d), tokens, scales, counts, self.placement.slots[int(d)])


def _transport(op, transport):
    if transport not in TRANSPORTS:
        raise ValueError(f"{op}: transport must be one of {TRANSPORTS}, got {transport!r}")


def fused_dispatch(cluster, x, topk_ids, topk_weights, placement, max_tokens_per_rank, quant="int8", *,
                   transport="aiv", block_dim=None, tail_bytes=SCALE_TAIL_BYTES) -> DispatchHandle:
    """FusedDispatch over the cluster (module docstring). x[d]: [T_d, H] bf16 ndarray or GlobalTensor of die d
    (a phantom on a timing-only cluster); topk_ids[d] int [T_d, k], topk_weights[d] float32 [T_d, k], real."""
    op = "fused_dispatch"
    _transport(op, transport)
    if quant != "int8":
        raise ValueError(f"{op}: quant must be 'int8' (per-token dynamic INT8), got {quant!r}")
    if isinstance(tail_bytes, bool) or not isinstance(tail_bytes, int) or tail_bytes < 32 or tail_bytes % 32:
        raise ValueError(f"{op}: tail_bytes must be a positive multiple of 32 (it holds the fp32 scale), "
                         f"got {tail_bytes!r}")
    hidden, k, ids, weights = _check_inputs(op, cluster, x, topk_ids, topk_weights, placement, max_tokens_per_rank)
    plans, width = _plan(placement, ids, max_tokens_per_rank)
    spec = cluster.spec
    nb = spec.aiv_per_die if block_dim is None else int(block_dim)
    if not 1 <= nb <= spec.aiv_per_die:
        raise ValueError(f"{op}: block_dim must be in 1..{spec.aiv_per_die}, got {block_dim!r}")
    n = len(cluster)
    dies = cluster.dies
    msg = message_bytes(hidden, tail_bytes)
    ub_send = _send_ub_bytes(hidden, tail_bytes)
    if ub_send > spec.ub_bytes:
        raise ValueError(f"{op}: hidden size {hidden} needs {ub_send} B of UB per AIV, which holds {spec.ub_bytes} B")
    ub_left = spec.ub_bytes - ub_send - 4 * round_up(n * width, 8)
    chunk_rows = min(4095, ub_left // (2 * (hidden + 32)))
    if chunk_rows < 1:
        raise ValueError(f"{op}: the metadata of {n} dies × {width} slots leaves no UB to compact rows of {hidden} B")
    _chunk_runs(plans, chunk_rows)
    staged = []
    xs = []
    for d, xd in enumerate(x):
        if isinstance(xd, GlobalTensor):
            xs.append(xd)
        else:
            g = dies[d].gm.from_numpy(np.ascontiguousarray(xd)) if xd.shape[0] else dies[d].gm.empty((1, hidden),
                                                                                                     "bfloat16")
            staged.append((d, g))
            xs.append(g)
    recv = [dies[d].gm.empty((len(placement.slots[d]), n, max_tokens_per_rank, msg), "int8") for d in range(n)]
    send_buf = None
    if transport == "sdma":
        send_buf = [[dies[s].gm.empty((len(placement.slots[d]), max_tokens_per_rank, msg), "int8")
                     if plans[s].send_counts[d].any() else None for d in range(n)] for s in range(n)]
    meta = [dies[d].gm.empty((n, width), "int32") for d in range(n)]
    words = [dies[d].gm.zeros((16,), "int32") for d in range(n)]
    arrive = [w[0:1] for w in words]
    quiet = [w[8:9] for w in words]
    counts_gm = [dies[d].gm.from_numpy(plans[d].send_counts) for d in range(n)]
    tokens = [dies[d].gm.empty((max(1, plans[d].received), hidden), "int8") for d in range(n)]
    scales = [dies[d].gm.empty((max(1, plans[d].received),), "float32") for d in range(n)]
    cfg = {"hidden": hidden, "tail": tail_bytes, "msg": msg, "dies": n, "width": width, "chunk_rows": chunk_rows,
           "max_tokens": max_tokens_per_rank, "transport": transport}
    try:
        report = cluster.launch(fused_dispatch_kernel, block_dim=nb,
                                args=lambda die: (xs[die.index], recv,
                                                  None if send_buf is None else send_buf[die.index], meta, arrive,
                                                  quiet[die.index], counts_gm[die.index], tokens[die.index],
                                                  scales[die.index], plans[die.index], cfg))
    finally:
        for d, g in staged:
            dies[d].gm.free(g)
        for d in range(n):
            dies[d].gm.free(recv[d])
            dies[d].gm.free(meta[d])
            dies[d].gm.free(counts_gm[d])
            dies[d].gm.free(words[d])
            if send_buf is not None:
                for b in send_buf[d]:
                    if b is not None:
                        dies[d].gm.free(b)
    return DispatchHandle(cluster, placement, plans, tokens, scales, weights, hidden, k, max_tokens_per_rank,
                          transport, report)


def fused_combine(cluster, expert_out, handle: DispatchHandle, shared_out=None, *, block_dim=None, chunk=None):
    """FusedCombine (module docstring): expert_out[d] bf16 [R_d, H] in handle.received(d)'s order; shared_out[d]
    (optional) bf16 [T_d, H]. Returns per die bf16 [T_d, H]: numpy arrays on a functional cluster, else
    GlobalTensors. The launch's ClusterReport is `handle.combine_report`. `chunk`: hidden columns summed per step
    (a multiple of 64; default: the most that fit UB with the token's K' rows double-buffered)."""
    op = "fused_combine"
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"{op}: handle must be the DispatchHandle of fused_dispatch, got {type(handle).__name__}")
    if handle.cluster is not cluster:
        raise ValueError(f"{op}: the handle belongs to another cluster")
    n, h, k = len(cluster), handle.hidden, handle.k
    plans, dies, spec = handle.plans, cluster.dies, cluster.spec
    shared_remote = handle.placement.shared_remote()
    kk = k + int(shared_remote)
    nb = spec.aiv_per_die if block_dim is None else int(block_dim)
    if not 1 <= nb <= spec.aiv_per_die:
        raise ValueError(f"{op}: block_dim must be in 1..{spec.aiv_per_die}, got {block_dim!r}")
    # UB bytes per column: K' bf16 rows in (one buffer: freed by the Cast, so the next load overlaps the Muls and
    # Adds), shared in and out (two buffers each), acc, the K' rows in fp32, tmp
    per_col = 2 * kk + 2 * 2 + 2 * 2 + 4 + 4 * kk + 4
    if chunk is None:
        chunk = min(h, UB_BUDGET // per_col // 64 * 64)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or \
            not (chunk == h or (chunk >= 64 and chunk % 64 == 0)):
        raise ValueError(f"{op}: chunk must be a positive multiple of 64 (or H), got {chunk!r}")
    chunk = min(int(chunk), h)
    if chunk * per_col > spec.ub_bytes:
        raise ValueError(f"{op}: a chunk of {chunk} columns with {kk} rows per token needs {chunk * per_col} B of "
                         f"UB, which holds {spec.ub_bytes} B")
    if not isinstance(expert_out, (list, tuple)) or len(expert_out) != n:
        raise ValueError(f"{op}: expert_out must be a list with one entry per die ({n})")
    if shared_out is not None and (not isinstance(shared_out, (list, tuple)) or len(shared_out) != n):
        raise ValueError(f"{op}: shared_out must be None or a list with one entry per die ({n})")
    staged = []

    def put(d, a, rows, name):
        _check_bf16(op, f"{name}[{d}]", a, dies[d])
        if tuple(a.shape) != (rows, h):
            raise ValueError(f"{op}: {name}[{d}] must be [{rows}, {h}], got {tuple(a.shape)}")
        if isinstance(a, GlobalTensor):
            return a
        g = dies[d].gm.from_numpy(np.ascontiguousarray(a)) if rows else dies[d].gm.empty((1, h), "bfloat16")
        staged.append((d, g))
        return g

    eo = [put(d, expert_out[d], plans[d].received, "expert_out") for d in range(n)]
    so = None if shared_out is None else [put(d, shared_out[d], plans[d].tokens, "shared_out") for d in range(n)]
    cfg = {"hidden": h, "kk": kk, "k": k, "dies": n, "transport": handle.transport, "chunk": chunk}
    if handle.transport == "sdma":
        # home h's window: source d's rows at offset Σ_{d' < d} (h's copies on d'), in d's received order
        base = [[0] * n for _ in range(n)]
        sdma_row = []
        for home in range(n):
            sizes = [plans[d].home_rows.get(home, np.zeros(0)).size for d in range(n)]
            base[home] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
            rows = np.zeros((plans[home].tokens, kk), np.int64)
            for d in range(n):
                idx = plans[d].home_rows.get(home)
                if idx is not None:
                    o = plans[d].origin[idx]
                    rows[o[:, 1], o[:, 2]] = base[home][d] + np.arange(idx.size)
            sdma_row.append(rows)
        comb = [dies[d].gm.empty((max(1, plans[d].tokens * kk), h), "bfloat16") for d in range(n)]
    else:
        comb = [dies[d].gm.empty((handle.max_tokens, kk, h), "bfloat16") for d in range(n)]
    words = [dies[d].gm.zeros((16,), "int32") for d in range(n)]
    out = [dies[d].gm.empty((max(1, plans[d].tokens), h), "bfloat16") for d in range(n)]

    def args(die):
        d = die.index
        c = cfg if handle.transport != "sdma" else {**cfg, "sdma_base": base, "sdma_row": sdma_row[d]}
        return (eo[d], comb, [w[0:1] for w in words], words[d][8:9], out[d], None if so is None else so[d],
                handle.topk_weights[d], plans[d], c)

    try:
        handle.combine_report = cluster.launch(fused_combine_kernel, block_dim=nb, args=args)
    finally:
        for d, g in staged:
            dies[d].gm.free(g)
        for d in range(n):
            dies[d].gm.free(comb[d])
            dies[d].gm.free(words[d])
    result = [out[d][0:plans[d].tokens] for d in range(n)]
    if cluster.functional:
        host = [r.numpy().copy() for r in result]
        for d in range(n):
            dies[d].gm.free(out[d])
        return host
    return result


def sdma_dispatch(cluster, x, topk_ids, topk_weights, placement, max_tokens_per_rank, quant="int8", **kw):
    """`fused_dispatch` over SDMA bulk copies (module docstring)."""
    return fused_dispatch(cluster, x, topk_ids, topk_weights, placement, max_tokens_per_rank, quant,
                          transport="sdma", **kw)


def sdma_combine(cluster, expert_out, handle, shared_out=None, **kw):
    """`fused_combine` for a handle of `sdma_dispatch` (the transport follows the handle)."""
    if handle.transport != "sdma":
        raise ValueError("sdma_combine: the handle comes from an AIV-Direct dispatch; use fused_combine")
    return fused_combine(cluster, expert_out, handle, shared_out, **kw)


# ------------------------------------------------------------------------------------------------ references


def dispatch_reference(x, topk_ids, placement):
    """Per die d: list of (slot, home die, token, column) in the received order, and the expected (q, scale) of
    each row — written from the rules (route, shared_route, slot-then-(src, token, k) order), not from the plan."""
    n = placement.num_dies
    rows = [[] for _ in range(n)]
    for s in range(n):
        ids = np.asarray(topk_ids[s]).astype(np.int64)
        t_count = ids.shape[0]
        dd, ds = placement.route(s, ids)
        sh = placement.shared_route(s, t_count)
        q, sc = quantize_per_token_reference(np.asarray(x[s])) if t_count else (None, None)
        for t in range(t_count):
            for j in range(ids.shape[1]):
                rows[int(dd[t, j])].append((int(ds[t, j]), s, t, j, q[t], sc[t]))
            if sh is not None:
                rows[int(sh[0][t])].append((int(sh[1][t]), s, t, ids.shape[1], q[t], sc[t]))
    for d in range(n):
        rows[d].sort(key=lambda r: r[:4])
    return rows


def combine_reference(rows, topk_weights, shared=None):
    """bf16 [T, H] = bf16(Σ_k fp32(w_k · fp32(rows[:, k])) + fp32(shared)), accumulated in fp32 in top-k order.
    rows: [T, K', H] bf16 (K' = k, or k + 1 with the remote shared row last, entering with weight 1)."""
    rows = np.asarray(rows)
    w = np.asarray(topk_weights, F32)
    k = w.shape[1]
    acc = None
    for j in range(rows.shape[1]):
        v = rows[:, j].astype(F32)
        term = (w[:, j:j + 1] * v).astype(F32) if j < k else v
        acc = term if acc is None else (acc + term).astype(F32)
    if shared is not None:
        acc = (acc + np.asarray(shared).astype(F32)).astype(F32)
    return acc.astype(BF16)
