"""An all-to-all token exchange over AIV-Direct: the communication pattern of decode EP.

Every die's AIV cores send each of its tokens to `topk` destination dies (one message per
(token, destination) pair, `msg_bytes` each), straight into the destination's static
receive buffer, then count their messages into the destination's arrival counter with
an atomic remote flag write. One AIV per die waits until its counter reaches the number
of messages routed to it. Slot (src die, token · topk + k) of a die's receive buffer holds
message k of token `token` of die `src`, so nothing can collide.

This is the issue's scale microbenchmark; FusedDispatch (quantisation, metadata exchange,
the three-stage pipeline) builds on it in the MoE issue.
"""
from __future__ import annotations

import numpy as np

import ascendemu
from ascendemu import HardEvent, TPosition, TQue


def route(n_dies: int, tokens: int, topk: int, seed: int = 0) -> np.ndarray:
    """dest[die, token, k]: `topk` distinct destination dies other than the sender (with replacement when
    there are fewer than `topk` other dies), pseudo-random from `seed`."""
    rng = np.random.default_rng(seed)
    dest = np.empty((n_dies, tokens, topk), np.int64)
    for d in range(n_dies):
        others = np.array([x for x in range(n_dies) if x != d] or [d])
        for t in range(tokens):
            dest[d, t] = rng.choice(others, size=topk, replace=len(others) < topk)
    return dest


@ascendemu.kernel("aiv")
def all_to_all_kernel(ctx, src, dest, recv, counters, me, expected):
    """src: this die's [tokens, msg] int8; dest: [tokens, topk] die ids (host array); recv: every die's
    [n_dies, tokens·topk, msg] receive buffer; counters: every die's int32 arrival counter."""
    tokens, topk = dest.shape
    msg = src.shape[1]
    pipe = ctx.tpipe()
    que = TQue(TPosition.VECIN, 1, events=(HardEvent.MTE2_MTE3, HardEvent.MTE3_MTE2))
    pipe.init_buffer(que, 2, msg)
    sent = {}
    for t in range(ctx.block_idx, tokens, ctx.block_num):
        buf = que.alloc_tensor("int8")
        ctx.data_copy(buf, src[t])
        que.enque(buf)
        buf = que.deque("int8")
        for k in range(topk):
            d = int(dest[t, k])
            ctx.aiv_direct_write(recv[d][me, t * topk + k], buf)
            sent[d] = sent.get(d, 0) + 1
        que.free_tensor(buf)
    ctx.fence()  # every message lands before the counter says so
    ctx.set_atomic_add("int32")
    for d, n in sorted(sent.items()):
        ctx.remote_write_flag(counters[d], n)
    ctx.disable_dma_atomic()
    if ctx.block_idx == 0:
        ctx.wait_until(counters[me], lambda v: v >= expected, what=f"{expected} messages")


def all_to_all(cluster, dest: np.ndarray, msg_bytes: int, src=None, *, block_dim: int | None = None):
    """Run the exchange on every die of `cluster`. `dest[die, token, k]` routes the messages; `src` is a list
    of per-die [tokens, msg_bytes] int8 arrays (or GlobalTensors; phantoms when omitted in timing-only mode).
    Returns (ClusterReport, receive buffers)."""
    n, tokens, topk = dest.shape
    if n != len(cluster):
        raise ValueError(f"all_to_all: dest routes {n} dies, the cluster has {len(cluster)}")
    if msg_bytes % 32:
        raise ValueError(f"all_to_all: msg_bytes {msg_bytes} must be a whole number of 32 B blocks")
    dies = cluster.dies
    if src is None:
        if cluster.functional:
            raise ValueError("all_to_all: functional clusters need the tokens (src)")
        src = [d.gm.empty((tokens, msg_bytes), "int8") for d in dies]
    else:
        src = [s if isinstance(s, ascendemu.GlobalTensor) else d.gm.from_numpy(np.asarray(s, np.int8))
               for d, s in zip(dies, src)]
    recv = [d.gm.empty((n, tokens * topk, msg_bytes), "int8") for d in dies]
    counters = [d.gm.zeros((8,), "int32")[0:1] for d in dies]
    expected = np.bincount(dest.reshape(-1), minlength=n)
    bd = block_dim or cluster.spec.aiv_per_die
    report = cluster.launch(all_to_all_kernel, block_dim=bd,
                            args=lambda die: (src[die.index], dest[die.index], recv, counters, die.index,
                                              int(expected[die.index])))
    return report, recv


def all_to_all_reference(src: list, dest: np.ndarray) -> list:
    """What each die's receive buffer must hold: slot (s, t·topk + k) of die dest[s, t, k] = src[s][t]."""
    n, tokens, topk = dest.shape
    out = [{} for _ in range(n)]
    for s in range(n):
        for t in range(tokens):
            for k in range(topk):
                out[int(dest[s, t, k])][(s, t * topk + k)] = src[s][t]
    return out
