"""DeepSeek-V3 routing on the die's AIV in fp32 (issue 6, item 1; deepseek-v3.md §6).

    topk_ids, topk_weights = moe_gate(die, x, gate_weight, correction_bias, config)

x [T, H] bf16, gate_weight [E, H] bf16 (HF `mlp.gate.weight`), correction_bias [E] fp32
(`mlp.gate.e_score_correction_bias`) → topk_ids int32 [T, k], topk_weights fp32 [T, k].

One `@ascendemu.kernel("aiv")` kernel on B = min(spec.aiv_per_die, T) AIV; block b takes the contiguous tokens
[b·T/B, (b+1)·T/B) and walks them in token blocks of `plan.tokens` (as many as UB holds, so that each core streams
W_gate once per block).

Logits (the bulk of the work: E·H MACs per token). Vector formulation: W_gate streams through UB in chunks of
`ec` ≤ 64 experts × `hc` columns (bf16 DataCopy, double-buffered, Cast to fp32 once per chunk); for each token of
the block, per 64-column block j of the chunk, one Mul with `ec` repeats (src1 = the token's 64 fp32 x values with
repeat stride 0, i.e. broadcast down the expert rows) and one Add into the token's accumulator [ec × 64 lanes].
After the last column chunk one WholeReduceSum per expert row (`ec` repeats) gives the chunk's logits. So:

    logit[e] = tree64_l( fold_c( fp32(x[64c + l] · W[e, 64c + l]) ) )      (the kernel's fp32 summation order)

fold_c: acc_l = 0, then acc_l = fp32(acc_l + p_c,l) for the 64-column blocks c = 0, 1, … in order (a partial last
block adds nothing to the lanes past H); tree64: WholeReduceSum's pairwise tree over the 64 lanes, rounding to fp32 at
every level. Products of bf16 values are exact in fp32. `routing_reference` (ops/moe/reference.py) sums in exactly
this order, so the routing equals it bit for bit.

Selection, per token, in fp32 on the vector unit with scalar index reads (GetValue/SetValue on PIPE_S):

    s  = 1 / (1 + exp(−logit))          Muls −1, Exp, Adds 1, Reciprocal (each rounded to fp32)
    s' = s + bias                       Add (selection only)
    group g (experts [g·G, (g+1)·G)): score = fp32(max1 + max2), the top-2 of s' in the group: WholeReduceMax with
        index per group (one repeat per group), the first maximum excluded (SetValue −inf in a copy), WholeReduceMax
        again, Add
    keep topk_group groups: repeated WholeReduceMax with index over the group scores (the chosen set to −inf)
    sel = s' + mask (0 in kept groups, −inf elsewhere)
    top-k: k rounds of argmax(sel) (WholeReduceMax per 64 lanes, then over those maxima, then within the winning
        64 lanes), the chosen set to −inf
    w = s[ids]; if norm_topk_prob: w = fp32(w / fp32(Σw + 1e-20)) (Σ: WholeReduceSum's pairwise tree over the k
        lanes); w = fp32(w · routed_scaling_factor)

Tie rule (everywhere): the lower index wins — WholeReduceMax returns the first maximum lane, and the two-stage argmax
keeps the first maximum of the lowest 64-lane block — the order of a stable descending sort. A group with two equal
maxima scores 2·max. Order of topk_ids within a token: descending by s', ties lower expert id first.

Shapes the kernel takes (others raise ValueError): H a multiple of 16 (32 B rows of bf16), E a multiple of 8 and at
most 4096, group size G = E / n_group a multiple of 8 and at most 64 (one WholeReduce repeat per group, 32 B aligned),
n_group ≤ 64, k ≤ 64. DeepSeek-V3/R1: H 7168, E 256, G 32, k 8.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import ascendemu
from ascendemu import (BinaryRepeatParams, DataCopyExtParams, DataCopyParams, GlobalTensor, HardEvent, ReduceOrder,
                       RoundMode)
from ascendemu.layouts import ceil_div, round_up

from ..rowwise import LANES, Staging, bar, check_dtype
from .config import MoEConfig

__all__ = ["moe_gate", "GatePlan", "plan_gate"]

EC_MAX = 64  # expert rows per W_gate chunk (repeats of one Mul/Add)
HC_MAX = 128  # columns per W_gate chunk
NEG_INF = float("-inf")
W0, X_ID, B_ID = 0, 2, 3  # MTE2_V / V_MTE2 ids: W chunk ring 0..1, the x block, the bias


@dataclass(frozen=True)
class GatePlan:
    """The host tiling of one moe_gate launch."""

    t: int  # tokens
    h: int  # hidden size
    e: int  # routed experts
    k: int
    n_group: int
    topk_group: int
    norm: bool
    scale: float  # routed_scaling_factor
    ec: int  # experts per W chunk
    hc: int  # columns per W chunk (a multiple of 64: the UB row pitch)
    tokens: int  # tokens per block
    ub_bytes: int

    @property
    def group_size(self) -> int:
        return self.e // self.n_group

    @property
    def ep(self) -> int:
        """E padded to whole 64-lane repeats (the score buffers)."""
        return round_up(self.e, LANES)

    @property
    def kp(self) -> int:
        """k padded to a 32 B row of int32/fp32 (the staging pitch)."""
        return round_up(self.k, 8)


def _ub_bytes(ec: int, hc: int, h: int, ep: int, kp: int, tb: int) -> int:
    sizes = [tb * h * 2, 2 * ec * hc * 2, ec * hc * 4, hc * 4, ec * LANES * 4, tb * ec * LANES * 4, tb * ep * 4,
             6 * ep * 4, 4 * LANES * 4 + 4 * 2 * LANES * 4, 2 * tb * kp * 4, kp * 4, 32]
    return sum(round_up(b, 32) for b in sizes)


def plan_gate(spec, t: int, h: int, config: MoEConfig) -> GatePlan:
    """Check the shapes the kernel takes (module docstring) and pick the chunking and the token block."""
    e, k, ng = config.n_routed_experts, config.num_experts_per_tok, config.n_group
    g = config.group_size
    if h % 16:
        raise ValueError(f"moe_gate: hidden size {h} must be a multiple of 16 (32 B rows of bf16)")
    if e % 8 or e > LANES * LANES:
        raise ValueError(f"moe_gate: {e} routed experts: the kernel takes a multiple of 8 up to {LANES * LANES}")
    if g % 8 or g > LANES:
        raise ValueError(f"moe_gate: group size {g} (= {e} experts / {ng} groups) must be a multiple of 8 and at "
                         f"most {LANES} (one 32 B-aligned WholeReduceMax repeat per group)")
    if ng > LANES or k > LANES:
        raise ValueError(f"moe_gate: n_group = {ng} and k = {k} must be at most {LANES}")
    ec = min(EC_MAX, e)
    hc = min(HC_MAX, round_up(h, LANES))
    ep, kp = round_up(e, LANES), round_up(k, 8)
    per_core = ceil_div(t, min(t, spec.aiv_per_die)) if t else 1
    tb = 0
    for cand in range(min(per_core, 255), 0, -1):
        if _ub_bytes(ec, hc, h, ep, kp, cand) <= spec.ub_bytes:
            tb = cand
            break
    if not tb:
        raise ValueError(f"moe_gate: one token of hidden size {h} needs {_ub_bytes(ec, hc, h, ep, kp, 1)} B of UB, "
                         f"which holds {spec.ub_bytes} B")
    return GatePlan(t, h, e, k, ng, config.topk_group, bool(config.norm_topk_prob),
                    float(config.routed_scaling_factor), ec, hc, tb, _ub_bytes(ec, hc, h, ep, kp, tb))


# ------------------------------------------------------------------------------------------------ kernel


def _sync(ctx, event) -> None:
    ctx.set_flag(event, 0)
    ctx.wait_flag(event, 0)


def _argmax(ctx, sel, red, red_u, m1, ep: int) -> int:
    """Index of the first maximum of sel[0:ep] (ep a multiple of 64): WholeReduceMax per 64 lanes, over those
    maxima, then within the winning 64 lanes. Leaves V → S synchronised."""
    reps = ep // LANES
    if reps == 1:
        ctx.whole_reduce_max(red, sel, LANES, 1, order=ReduceOrder.ORDER_VALUE_INDEX)
        _sync(ctx, HardEvent.V_S)
        return int(ctx.get_value(red_u, 1))
    ctx.whole_reduce_max(m1, sel, LANES, reps, 1, 1, 8, order=ReduceOrder.ORDER_ONLY_VALUE)
    bar(ctx)
    ctx.whole_reduce_max(red, m1, reps, 1, order=ReduceOrder.ORDER_VALUE_INDEX)
    _sync(ctx, HardEvent.V_S)
    r = int(ctx.get_value(red_u, 1))
    ctx.whole_reduce_max(red[2 * LANES:], sel[r * LANES:], LANES, 1, order=ReduceOrder.ORDER_VALUE_INDEX)
    _sync(ctx, HardEvent.V_S)
    return r * LANES + int(ctx.get_value(red_u, 2 * LANES + 1))


@ascendemu.kernel("aiv")
def moe_gate_kernel(ctx, x, w, bias, ids_out, wts_out, plan):
    """Routing of tokens [b·T/B, (b+1)·T/B) on AIV b (module docstring)."""
    p = plan
    b, nb = ctx.block_idx, ctx.block_num
    r_begin, r_end = b * p.t // nb, (b + 1) * p.t // nb
    if r_begin == r_end:
        return
    h, e, ep, k, kp, ec, hc, tb = p.h, p.e, p.ep, p.k, p.kp, p.ec, p.hc, p.tokens
    ng, gsz = p.n_group, p.group_size
    x_gm, w_gm = x.flatten(), w.flatten()
    ids_gm, wts_gm = ids_out.flatten(), wts_out.flatten()

    ub = ctx.ub
    xb = ub.alloc((tb * h,), "bfloat16")
    wb = [ub.alloc((ec * hc,), "bfloat16") for _ in range(2)]
    wf = ub.alloc((ec * hc,), "float32")
    xf = ub.alloc((hc,), "float32")
    tmp = ub.alloc((ec * LANES,), "float32")
    acc = ub.alloc((tb * ec * LANES,), "float32")
    lg = ub.alloc((tb * ep,), "float32")
    bias_ub, s, sp, work, sel, gmask = (ub.alloc((ep,), "float32") for _ in range(6))
    red = ub.alloc((4 * LANES,), "float32")  # (value, index) pairs: per group, then the argmax stages
    g1, g2, gs, m1 = (ub.alloc((2 * LANES,), "float32") for _ in range(4))
    red_u = red.reinterpret_cast("uint32")
    ids_st = ub.alloc((tb * kp,), "int32")
    w_st = ub.alloc((tb * kp,), "float32")
    dvec = ub.alloc((kp,), "float32")
    dsum = ub.alloc((8,), "float32")

    ctx.data_copy_pad(bias_ub, bias, DataCopyExtParams(block_count=1, block_len=e * 4))
    ctx.set_flag(HardEvent.MTE2_V, B_ID)
    ctx.duplicate(sel, NEG_INF, ep)  # lanes E..Ep stay −inf for every token
    ctx.wait_flag(HardEvent.MTE2_V, B_ID)
    for j in range(2):
        ctx.set_flag(HardEvent.V_MTE2, W0 + j)
    bar(ctx)

    iw = 0
    blocks = [(r, min(tb, r_end - r)) for r in range(r_begin, r_end, tb)]
    for bi, (r0, n) in enumerate(blocks):
        # CopyIn: the block's x rows
        if bi:
            ctx.wait_flag(HardEvent.V_MTE2, X_ID)
        ctx.data_copy(xb, x_gm[r0 * h:], n * h)
        ctx.set_flag(HardEvent.MTE2_V, X_ID)
        ctx.wait_flag(HardEvent.MTE2_V, X_ID)
        # Logits: W_gate chunk by chunk, every token of the block per chunk
        for e0 in range(0, e, ec):
            ecc = min(ec, e - e0)
            for t in range(n):
                ctx.duplicate(acc[t * ec * LANES:], 0.0, ecc * LANES)
            for c0 in range(0, h, hc):
                hcur = min(hc, h - c0)
                pw = iw % 2
                iw += 1
                ctx.wait_flag(HardEvent.V_MTE2, W0 + pw)
                blk = hcur * 2 // 32
                ctx.data_copy(wb[pw], w_gm[e0 * h + c0:],
                              DataCopyParams(block_count=ecc, block_len=blk, src_stride=(h - hcur) * 2 // 32,
                                             dst_stride=(hc - hcur) * 2 // 32))
                ctx.set_flag(HardEvent.MTE2_V, W0 + pw)
                ctx.wait_flag(HardEvent.MTE2_V, W0 + pw)
                ctx.cast(wf, wb[pw], RoundMode.CAST_NONE, ecc * hc)
                ctx.set_flag(HardEvent.V_MTE2, W0 + pw)
                bar(ctx)
                for t in range(n):
                    at = acc[t * ec * LANES:]
                    ctx.cast(xf, xb[t * h + c0:], RoundMode.CAST_NONE, hcur)
                    bar(ctx)
                    for j in range(ceil_div(hcur, LANES)):
                        lanes = min(LANES, hcur - j * LANES)
                        ctx.mul(tmp, wf[j * LANES:], xf[j * LANES:], lanes, ecc,
                                BinaryRepeatParams(1, 1, 1, 8, hc // 8, 0))
                        bar(ctx)
                        ctx.add(at, at, tmp, lanes, ecc, BinaryRepeatParams(1, 1, 1, 8, 8, 8))
                        bar(ctx)
            for t in range(n):
                ctx.whole_reduce_sum(lg[t * ep + e0:], acc[t * ec * LANES:], LANES, ecc, 1, 1, 8)
        if bi + 1 < len(blocks):
            ctx.set_flag(HardEvent.V_MTE2, X_ID)  # xb may be refilled
        bar(ctx)
        if bi:  # the previous block's outputs have left the staging buffers
            ctx.wait_flag(HardEvent.MTE3_S, 0)
            ctx.wait_flag(HardEvent.MTE3_V, 0)
        # Selection, token by token
        for t in range(n):
            lt = lg[t * ep:]
            ctx.muls(s, lt, -1.0, e)
            bar(ctx)
            ctx.exp(s, s, e)
            bar(ctx)
            ctx.adds(s, s, 1.0, e)
            bar(ctx)
            ctx.reciprocal(s, s, e)
            bar(ctx)
            ctx.add(sp, s, bias_ub, e)
            bar(ctx)
            # group scores: top-2 sum per group
            ctx.whole_reduce_max(red, sp, gsz, ng, 1, 1, gsz // 8, order=ReduceOrder.ORDER_VALUE_INDEX)
            ctx.whole_reduce_max(g1, sp, gsz, ng, 1, 1, gsz // 8, order=ReduceOrder.ORDER_ONLY_VALUE)
            ctx.adds(work, sp, 0.0, e)
            ctx.duplicate(gmask, NEG_INF, e)
            _sync(ctx, HardEvent.V_S)
            for g in range(ng):
                ctx.set_value(work, g * gsz + int(ctx.get_value(red_u, 2 * g + 1)), NEG_INF)
            _sync(ctx, HardEvent.S_V)
            ctx.whole_reduce_max(g2, work, gsz, ng, 1, 1, gsz // 8, order=ReduceOrder.ORDER_ONLY_VALUE)
            bar(ctx)
            ctx.add(gs, g1, g2, ng)
            bar(ctx)
            # keep topk_group groups
            for _ in range(p.topk_group):
                ctx.whole_reduce_max(red, gs, ng, 1, order=ReduceOrder.ORDER_VALUE_INDEX)
                _sync(ctx, HardEvent.V_S)
                g = int(ctx.get_value(red_u, 1))
                ctx.set_value(gs, g, NEG_INF)
                _sync(ctx, HardEvent.S_V)
                ctx.duplicate(gmask[g * gsz:], 0.0, gsz)
                bar(ctx)
            ctx.add(sel, sp, gmask, e)
            bar(ctx)
            # top-k by argmax rounds
            row = t * kp
            for j in range(k):
                i = _argmax(ctx, sel, red, red_u, m1, ep)
                ctx.set_value(sel, i, NEG_INF)
                ctx.set_value(ids_st, row + j, i)
                ctx.set_value(w_st, row + j, ctx.get_value(s, i))
                _sync(ctx, HardEvent.S_V)
            wt = w_st[row:]
            if p.norm:
                ctx.whole_reduce_sum(dsum, wt, k, 1)
                bar(ctx)
                ctx.adds(dsum, dsum, 1e-20, 1)
                _sync(ctx, HardEvent.V_S)
                ctx.duplicate(dvec, ctx.get_value(dsum, 0), k)
                bar(ctx)
                ctx.div(wt, wt, dvec, k)
                bar(ctx)
            ctx.muls(wt, wt, p.scale, k)
            bar(ctx)
        # CopyOut: the block's ids and weights (UB rows of kp, GM rows of k)
        ctx.set_flag(HardEvent.S_MTE3, 0)
        ctx.set_flag(HardEvent.V_MTE3, 0)
        ctx.wait_flag(HardEvent.S_MTE3, 0)
        ctx.wait_flag(HardEvent.V_MTE3, 0)
        ctx.data_copy_pad(ids_gm[r0 * k:], ids_st, DataCopyExtParams(block_count=n, block_len=k * 4))
        ctx.data_copy_pad(wts_gm[r0 * k:], w_st, DataCopyExtParams(block_count=n, block_len=k * 4))
        ctx.set_flag(HardEvent.MTE3_S, 0)
        ctx.set_flag(HardEvent.MTE3_V, 0)

    ctx.wait_flag(HardEvent.MTE3_S, 0)
    ctx.wait_flag(HardEvent.MTE3_V, 0)
    for j in range(2):
        ctx.wait_flag(HardEvent.V_MTE2, W0 + j)


# ------------------------------------------------------------------------------------------------ host side


def _check(name, a, dtype, shape, die):
    if not isinstance(a, (np.ndarray, GlobalTensor)):
        raise TypeError(f"moe_gate: {name} must be a numpy array or a GlobalTensor, got {type(a).__name__}")
    check_dtype("moe_gate", name, a, (dtype,))
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"moe_gate: {name} has shape {tuple(a.shape)}; expected {tuple(shape)}")
    if isinstance(a, GlobalTensor) and a.gm is not die.gm:
        raise ValueError(f"moe_gate: {name} is a GlobalTensor of another die's GM")


def moe_gate(die, x, gate_weight, correction_bias, config: MoEConfig):
    """DeepSeek-V3 routing of x [T, H] bf16 on the AIV of `die` (module docstring for the order and the tie rule).

    gate_weight: [E, H] bf16; correction_bias: [E] float32; arrays are numpy arrays or GlobalTensors of `die`
    (phantoms on a timing-only die). Returns (topk_ids int32 [T, k], topk_weights float32 [T, k]): numpy arrays
    when every input is a numpy array and the die is functional (or T = 0), else GlobalTensors. T = 0 launches
    nothing. The report is `die.last_report`.
    """
    if not isinstance(die, ascendemu.Die):
        raise TypeError(f"moe_gate: die must be an ascendemu.Die, got {type(die).__name__}")
    if not isinstance(config, MoEConfig):
        raise TypeError(f"moe_gate: config must be a MoEConfig, got {type(config).__name__}")
    if not isinstance(x, (np.ndarray, GlobalTensor)):
        raise TypeError(f"moe_gate: x must be a numpy array or a GlobalTensor, got {type(x).__name__}")
    if len(x.shape) != 2:
        raise ValueError(f"moe_gate: x must be 2-D [T, H], got shape {tuple(x.shape)}")
    t, h = (int(v) for v in x.shape)
    e, k = config.n_routed_experts, config.num_experts_per_tok
    if h != config.hidden_size:
        raise ValueError(f"moe_gate: x has hidden size {h} but config.hidden_size is {config.hidden_size}")
    _check("x", x, "bfloat16", (t, h), die)
    _check("gate_weight", gate_weight, "bfloat16", (e, h), die)
    _check("correction_bias", correction_bias, "float32", (e,), die)
    plan = plan_gate(die.spec, t, h, config)
    if t == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    with Staging(die, "moe_gate") as st:
        gx, gw, gb = st.put(x, "x"), st.put(gate_weight, "gate_weight"), st.put(correction_bias, "correction_bias")
        ids, wts = st.output((t, k), "int32"), st.output((t, k), "float32")
        return st.launch(moe_gate_kernel, min(t, die.spec.aiv_per_die), (gx, gw, gb, ids, wts, plan))
