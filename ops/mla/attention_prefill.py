"""Causal flash attention for MLA prefill: `mla_attention_prefill`.

    o[t, h] = softmax_s(scale · q[t, h] · k[s, h]ᵀ) · v[s, h]      over the keys s of t's sequence at positions ≤ t's

q [Tq, h, d_qk], k [Tk, h, d_qk], v [Tk, h, d_v], bf16, ND in GM, sequences packed back to back (seq_lens[i] query
tokens and kv_lens[i] ≥ seq_lens[i] key/value tokens of sequence i). Causal, bottom-right aligned: query j of
sequence i sits at position kv_lens[i] − seq_lens[i] + j (the past tokens of a chunked prefill come first in k/v).
Returns o [Tq, h, d_v] bf16. DeepSeek-R1 (naive form of prefill): h = 128, d_qk = 128 + 64 = 192, d_v = 128.

One launch: `mla_prefill_kernel`, a mix kernel on up to 24 groups of 1 AIC + 2 AIV. Work item = (sequence, head,
query tile of up to `q_tile` rows). Its KV tiles are laid out backwards from the causal diagonal: the *diagonal
tile* holds the keys at the positions of the tile's own queries, [D, D + m) with D = kv_len − seq_len + q0, and the
past is cut into `kv_tile`-token tiles [D − k·T, D − (k−1)·T) down to position 0, the first one partial. So every
diagonal tile has the same mask (row r sees columns c ≤ r, one constant bit mask in GM, applied with Select), the
first tile masks its columns past its width (Duplicate), every other tile is fully visible, and no fully masked
tile is ever computed (the triangle is skipped exactly). Items are spread over the groups longest first (causal
work is triangular: the last query tile of a sequence sees the whole sequence, the first sees one tile). Per tile:

   AIC  K tile  GM ─DataCopy Nd2Nz, srcDValue h·d_qk (one head)─▶ L1 as Nz(K) ≡ Zn(Kᵀ) ─Load2D─▶ L0B
        V tile  GM ─DataCopy Nd2Nz, 16-row strips per 128 dims──▶ L1 ─Load2D, transpose─▶ L0B (Zn(V))
        Q tile  GM ─Nd2Nz, Zz strips per 128-dim chunk, once per item─▶ L1 ─Load2D─▶ L0A
        S = Q·Kᵀ  Mmad bf16→fp32 per 128-dim chunk of d_qk; Fixpipe fp32 → GM workspace S    ──CrossCoreSetFlag(0)─▶
   AIV  (each AIV half the rows) S → UB, ×scale, mask, running max m, α = exp(m_old − m_new), P = exp(S − m),
        running sum l = α·l + Σ P (all fp32); P cast to bf16 → GM workspace P               ──CrossCoreSetFlag(1)─▶
   AIC  O_tile = P·V  P GM ─Nd2Nz (Zz strips)─▶ L1 ─Load2D─▶ L0A; Mmad k = the tile's tokens; per 128 output dims;
        Fixpipe fp32 → GM workspace O                                                       ──CrossCoreSetFlag(2)─▶
   AIV  acc = α·acc + O_tile (fp32, in UB); after the item's last tile o = acc / l, cast to bf16, DataCopy to o
        with a destination stride of (h − 1)·d_v (one head's rows of o [Tq, h, d_v]).

Pipelining: the AIC computes S of tile j+1 before P·V of tile j (K and V of two tiles in L1), so the cube works
while the AIVs run the softmax of tile j; the AIV order is softmax(j+1) then accumulate(j), so α of tile j waits in
one of two UB slots. S, P and O workspaces are double-buffered per group and reused in tile order, each reuse
ordered by the cross-core flags of the tile two steps back.

Tiling (the default `PrefillTiling()`): q_tile 128 × kv_tile 128. L0C holds two 128 × 128 fp32 tiles (64 KiB
each: S of a tile, or one 128-column chunk of O); L0A/L0B two 32 KiB slots (a 128 × 128 bf16 operand). With
d_qk 192 a tile is 768 + 512 = 1280 cube cycles. UB (per AIV, 64 rows): S 32 KiB, P 16 KiB, O in and the fp32
accumulator 32 KiB each, the output 16 KiB; L1: Q 48 KiB, K and V of two tiles 160 KiB, P 32 KiB. When d_v or
d_qk are larger the host picks a smaller q_tile (then kv_tile) that fits; an explicit tiling that does not fit is
refused with the buffer that overflows. Larger kv tiles would halve the instruction count but an S tile of
128 × 256 fp32 fills L0C and UB alone.

Numerics: q·k products exact and summed in fp32 (cube), the softmax and its statistics fp32, P rounded to bf16
once per tile (l sums the fp32 P, as FlashAttention does), O accumulated in fp32 and rounded once. Results do not
depend on the number of groups (items are computed whole on one group); a different tiling changes the rounding
only (the online rescale regroups the sums).

⚠ Modelled cost: S (fp32), P (bf16) and O (fp32) go through GM workspaces, and the emulator charges every GM byte to
HBM (it has no L2 model). Per 128 × 128 tile that is S 64 + 64, P 32 + 32 and O 64 + 64 KiB (written, read) of
workspace traffic beside 80 KiB of K and V, so the modelled kernel is HBM-bound (~99 % of HBM, ~8 % of the bf16
cube peak at R1 dims); on hardware the workspaces (7.5 MiB for 24 groups) are small and hot and would mostly hit
the 192 MiB L2. See benchmarks/test_bench_mla_prefill.py.

Known cost in the model, not in the math: at h·d_v ≥ 4096 a V tile's 16-row strips cannot be one Nd2Nz (the
srcNdMatrixStride field is a uint16), so a V tile is one DataCopy per 16 keys (8 at kv_tile 128), each paying the
MTE2 head; MTE2 is not the binding pipe (about half busy at R1 dims).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import ascendemu
from ascendemu import (PIPE_FIX, PIPE_MTE3, PIPE_V, SELMODE, BinaryRepeatParams, DataCopyParams,
                       FixpipeParamsV220, GlobalTensor, HardEvent, LoadData2DParams, MmadParams, Nd2NzParams,
                       QuantMode, ReduceOrder, RoundMode, UnaryRepeatParams)
from ascendemu.layouts import ceil_div
from ascendemu.numerics import as_dtype
from ascendemu.ops.matmul import copy_gm_to_l1_strips

from .attention import (ID_P, ID_Q, ID_SLOT, NEG, AicState, aic_events_drain, aic_events_free, lpt, mask_columns,
                        qk_scores, sync, views)

__all__ = ["mla_attention_prefill", "mla_attention_prefill_reference", "PrefillTiling", "PrefillPlan",
           "plan_prefill", "mla_prefill_kernel"]

BF16, F32 = as_dtype("bfloat16"), as_dtype("float32")
FRAC = 16  # rows of a fractal, C0 of a 16-bit type
KC = 128  # K chunk of S = Q·Kᵀ (dims per Mmad)
NC = 128  # output columns per P·V Mmad
MAX_Q_TILE, MAX_KV_TILE = 128, 512
U16_MAX = 65535  # Nd2NzParams.srcDValue is a uint16_t: the row pitch h·d of q/k/v in elements
FLAG_S, FLAG_P, FLAG_O = 0, 1, 2  # cross-core: S in GM (AIC → AIVs), P in GM (AIVs → AIC), O in GM (AIC → AIVs)
# intra-core event ids, AIC
# MTE1_MTE2 (attention.py's, shared with decode): ID_Q, ID_P, ID_SLOT + s — Q, P, K/V slot s (ids 2, 3) free again
ID_KL, ID_QL, ID_PL, ID_VL = 0, 1, 2, 3  # MTE2_MTE1: K / Q / P in L1; V of slot s (ids 3, 4)
# intra-core event ids, AIV
EV_S, EV_O, EV_MASK = 0, 1, 2  # V_MTE2: the S / O-in / mask buffer is free again
EV_P, EV_OUT = 0, 1  # MTE3_V: the P / output buffer is free again

_cdiv = ceil_div


# ------------------------------------------------------------------------------------------------ host-side tiling


@dataclass(frozen=True)
class PrefillTiling:
    """q_tile: query rows per work item (a multiple of 16, ≤ 128); kv_tile: keys per KV tile (a multiple of 32,
    ≤ 512, ≥ q_tile: the diagonal tile holds as many keys as the item has queries); block_dim: AIC groups (≤ the
    die's AIC count). None picks: the largest q_tile / kv_tile (128, 128 first) that fit L0C, L1 and UB, and
    min(AIC count, items) groups."""

    q_tile: int | None = None
    kv_tile: int | None = None
    block_dim: int | None = None


@dataclass(frozen=True)
class _Tile:
    k0: int  # first key position within the sequence
    ntok: int  # keys in the tile
    kind: int  # 0 full, 1 first (columns ≥ ntok masked), 2 diagonal (the causal triangle)


@dataclass(frozen=True)
class _Item:
    seq: int
    head: int
    q_tok: int  # global row of q / o of the first query
    m: int  # query rows
    kv_tok: int  # global row of k / v of the sequence's first key
    tiles: tuple


@dataclass(frozen=True)
class PrefillPlan:
    """The host-side tiling of one `mla_attention_prefill` call (what an Ascend kernel gets as tiling data)."""

    h: int
    d_qk: int
    d_v: int
    q_tile: int
    kv_tile: int
    scale: float
    groups: tuple  # per AIC group, its work items in order
    n_items: int


def _fits(spec, mq: int, t: int, dqk: int, dv: int) -> str | None:
    """None if a q_tile × kv_tile tiling fits the core's buffers, else what overflows."""
    if t < mq:  # the diagonal tile holds the keys of all the item's queries: up to q_tile of them
        return f"kv_tile {t} < q_tile {mq}: the diagonal KV tile holds up to q_tile keys"
    r = mq // 2
    kc, nc = min(KC, dqk), min(NC, dv)
    need = {"L0C": (2 * max(mq * t, mq * nc) * 4, spec.l0c_bytes),
            "L0A": (2 * max(mq * kc, mq * t) * 2, spec.l0a_bytes),
            "L0B": (2 * max(t * kc, t * nc) * 2, spec.l0b_bytes),
            "L1": ((mq * dqk + 2 * t * (dqk + dv) + mq * t) * 2, spec.l1_bytes),
            "UB": (r * t * 6 + r * 64 * 4 + r * dv * 10 + r * t // 8 + r * 8 * 4 + r * 4 * 6 + 1024, spec.ub_bytes)}
    for buf, (used, cap) in need.items():
        if used > cap:
            return f"{buf} needs {used} B of {cap} (q_tile {mq}, kv_tile {t}, d_qk {dqk}, d_v {dv})"
    if t // 8 > 255 or dv // 8 > 255:
        return f"a vector repeat stride of {max(t, dv) // 8} blocks exceeds 255 (kv_tile {t}, d_v {dv})"
    return None


def _check_int(name: str, v, lo: int, hi: int, mult: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi or v % mult:
        raise ValueError(f"mla_attention_prefill: tiling.{name} must be an int in {lo}..{hi}, a multiple of {mult}; "
                         f"got {v!r}")
    return int(v)


def _pick_tiling(spec, dqk: int, dv: int, max_m: int, tiling: PrefillTiling) -> tuple[int, int]:
    if tiling.q_tile is not None:
        qs = [_check_int("q_tile", tiling.q_tile, FRAC, MAX_Q_TILE, FRAC)]
    else:
        qs = [q for q in (128, 64, 32, 16) if q <= max(FRAC, _cdiv(max_m, FRAC) * FRAC)] or [FRAC]
    ts = [_check_int("kv_tile", tiling.kv_tile, 32, MAX_KV_TILE, 32)] if tiling.kv_tile is not None \
        else [128, 64, 32]
    why = None
    for t in ts:
        for mq in qs:
            why = _fits(spec, mq, t, dqk, dv)
            if why is None:
                return mq, t
    raise ValueError(f"mla_attention_prefill: no tiling fits ({tiling}): {why}")


def plan_prefill(spec, h: int, d_qk: int, d_v: int, seq_lens, kv_lens, *, scale: float,
                 tiling: PrefillTiling | None = None) -> PrefillPlan:
    """The host-side tiling of `mla_attention_prefill` (exposed for benchmarks and tests)."""
    tiling = tiling or PrefillTiling()
    mq, t = _pick_tiling(spec, d_qk, d_v, max(seq_lens), tiling)
    items, costs = [], []
    q_tok = kv_tok = 0
    for i, (sl, kl) in enumerate(zip(seq_lens, kv_lens)):
        off = kl - sl
        for q0 in range(0, sl, mq):
            m = min(mq, sl - q0)
            d = off + q0  # key position of the diagonal tile's first column
            past = [(max(e - t, 0), e - max(e - t, 0)) for e in range(d, 0, -t)][::-1]
            tiles = [_Tile(k0, n, 1 if n < t else 0) for k0, n in past] + [_Tile(d, m, 2)]
            rows = _cdiv(m, FRAC) * FRAC
            cost = sum(_cdiv(x.ntok, FRAC) * FRAC + 64 for x in tiles) * (rows + 32)
            for hh in range(h):
                items.append(_Item(i, hh, q_tok + q0, m, kv_tok, tuple(tiles)))
                costs.append(cost)
        q_tok += sl
        kv_tok += kl
    n_aic = spec.aic_per_die
    if tiling.block_dim is not None:
        bd = tiling.block_dim
        if isinstance(bd, bool) or not isinstance(bd, (int, np.integer)) or not 1 <= bd <= n_aic:
            raise ValueError(f"mla_attention_prefill: tiling.block_dim must be an int in 1..{n_aic}, got {bd!r}")
        n_groups = min(int(bd), len(items))
    else:
        n_groups = min(n_aic, len(items))
    groups = tuple(tuple(items[i] for i in g) for g in lpt(costs, n_groups))
    return PrefillPlan(h, d_qk, d_v, mq, t, float(scale), groups, len(items))


# ------------------------------------------------------------------------------------------------------- kernels


def _aic_body(ctx, g, items, plan: PrefillPlan, q, k, v, s_ws, p_ws, o_ws):
    h, dqk, dv, mq, t = plan.h, plan.d_qk, plan.d_v, plan.q_tile, plan.kv_tile
    view = views()
    kchunks = [(k0, min(KC, dqk - k0)) for k0 in range(0, dqk, KC)]
    vchunks = [(d0, min(NC, dv - d0)) for d0 in range(0, dv, NC)]
    l1_q = ctx.l1.alloc((mq * dqk,), BF16)  # Q in Zz strips, one region per K chunk
    q_chunks = [view(l1_q, mq * k0) for k0, _ in kchunks]
    l1_k = [ctx.l1.alloc((t * dqk,), BF16) for _ in range(2)]  # K tile as Nz, per slot
    l1_v = [ctx.l1.alloc((t * dv,), BF16) for _ in range(2)]  # V tile, 16-row strips per 128-dim chunk, per slot
    v_chunks = [[view(b, t * d0) for d0, _ in vchunks] for b in l1_v]
    l1_p = ctx.l1.alloc((mq * t,), BF16)
    l0a = [ctx.l0a.alloc((max(mq * min(KC, dqk), mq * t),), BF16) for _ in range(2)]
    l0b = [ctx.l0b.alloc((max(t * min(KC, dqk), t * min(NC, dv)),), BF16) for _ in range(2)]
    l0c = [ctx.l0c.alloc((max(mq * t, mq * min(NC, dv)),), F32) for _ in range(2)]
    rk, rv = h * dqk, h * dv  # GM row pitch of q/k and of v
    E = HardEvent
    aic_events_free(ctx, 2)  # two K/V tile slots
    st = AicState()

    def s_tile(item, tile, slot, buf, m, m1):
        """Load K and V of the tile into `slot`; S = Q·Kᵀ → S workspace (m × ntok of a q_tile × kv_tile tile)."""
        n = tile.ntok
        n1 = _cdiv(n, FRAC)
        row = (item.kv_tok + tile.k0) * rk + item.head * dqk
        ctx.wait_flag(E.MTE1_MTE2, ID_SLOT + slot)
        ctx.data_copy(l1_k[slot], view(k, row), Nd2NzParams(nd_num=1, n_value=n, d_value=dqk, src_d_value=rk,
                                                            dst_nz_c0_stride=n1 * FRAC, dst_nz_n_stride=1))
        sync(ctx, E.MTE2_MTE1, ID_KL)
        vrow = (item.kv_tok + tile.k0) * rv + item.head * dv
        for (d0, dw), dst in zip(vchunks, v_chunks[slot]):
            copy_gm_to_l1_strips(ctx, dst, view(v, vrow + d0), n, dw, rv)
        ctx.set_flag(E.MTE2_MTE1, ID_VL + slot)
        qk_scores(ctx, st, l0a, l0b, l0c, q_chunks, kchunks, l1_k[slot], n1, m, m1, n, view(s_ws, buf * mq * t), t)

    def pv_tile(item, tile, slot, buf, m, m1):
        """O_tile = P·V per 128 output dims → O workspace (m × d_v fp32)."""
        n = tile.ntok
        n1 = _cdiv(n, FRAC)
        ctx.cross_core_wait_flag(FLAG_P)  # both AIVs wrote their rows of P
        ctx.wait_flag(E.MTE1_MTE2, ID_P)
        copy_gm_to_l1_strips(ctx, l1_p, view(p_ws, buf * mq * t), m, n, t)  # Zz: m1 strips of n1 fractals
        sync(ctx, E.MTE2_MTE1, ID_PL)
        ctx.wait_flag(E.MTE2_MTE1, ID_VL + slot)
        for ci, (d0, dw) in enumerate(vchunks):
            dw1 = dw // FRAC
            cq = st.ic % 2
            st.ic += 1
            ctx.wait_flag(E.FIX_M, cq)
            p = st.il0 % 2
            st.il0 += 1
            ctx.wait_flag(E.M_MTE1, p)
            ctx.load_data(l0a[p], l1_p, LoadData2DParams(repeat_times=m1 * n1))
            ctx.load_data(l0b[p], v_chunks[slot][ci], LoadData2DParams(repeat_times=n1 * dw1, if_transpose=True))
            if ci == len(vchunks) - 1:
                ctx.set_flag(E.MTE1_MTE2, ID_P)
                ctx.set_flag(E.MTE1_MTE2, ID_SLOT + slot)
            sync(ctx, E.MTE1_M, p)
            ctx.mmad(l0c[cq], l0a[p], l0b[p], MmadParams(m=m, n=dw, k=n, cmatrix_init_val=True, disable_gemv=True))
            ctx.set_flag(E.M_MTE1, p)
            sync(ctx, E.M_FIX, cq)
            ctx.fixpipe(view(o_ws, buf * mq * dv + d0), l0c[cq],
                        FixpipeParamsV220(n_size=dw, m_size=m, dst_stride=dv, quant_pre=QuantMode.NoQuant))
            ctx.set_flag(E.FIX_M, cq)
        ctx.cross_core_set_flag(2, PIPE_FIX, FLAG_O)

    for item in items:
        m = item.m
        m1 = _cdiv(m, FRAC)
        ctx.wait_flag(E.MTE1_MTE2, ID_Q)
        qrow = item.q_tok * rk + item.head * dqk
        for (k0, kw), dst in zip(kchunks, q_chunks):
            copy_gm_to_l1_strips(ctx, dst, view(q, qrow + k0), m, kw, rk)
        sync(ctx, E.MTE2_MTE1, ID_QL)
        pending = []
        for i, tile in enumerate(item.tiles):
            slot = buf = st.gt % 2
            st.gt += 1
            s_tile(item, tile, slot, buf, m, m1)
            if i == len(item.tiles) - 1:
                ctx.set_flag(E.MTE1_MTE2, ID_Q)  # the item's last S has staged its Q chunks
            ctx.cross_core_set_flag(2, PIPE_FIX, FLAG_S)
            pending.append((tile, slot, buf))
            if len(pending) == 2:
                pv_tile(item, *pending.pop(0), m, m1)
        while pending:
            pv_tile(item, *pending.pop(0), m, m1)

    aic_events_drain(ctx, 2)


def _aiv_body(ctx, g, items, plan: PrefillPlan, s_ws, p_ws, o_ws, mask, out):
    """Online softmax and the O accumulator of the AIV's half of each item's rows."""
    sub = ctx.sub_block_idx
    view = views()
    h, dv, mq, t, scale = plan.h, plan.d_v, plan.q_tile, plan.kv_tile, plan.scale
    rmax = mq // 2
    s_ub = ctx.ub.alloc((rmax * t,), F32)
    p_ub = ctx.ub.alloc((rmax * t,), BF16)
    red = ctx.ub.alloc((rmax * 64,), F32)  # row reductions: 64-lane column chunks folded
    mx = ctx.ub.alloc((rmax,), F32)  # running max
    mt = ctx.ub.alloc((rmax,), F32)  # the tile's max, then the new max
    sm = ctx.ub.alloc((rmax,), F32)  # running sum
    rs = ctx.ub.alloc((rmax,), F32)  # the tile's sum
    alpha = [ctx.ub.alloc((rmax,), F32) for _ in range(2)]  # exp(m_old − m_new) of the tile in workspace slot s
    bc = ctx.ub.alloc((rmax * 8,), F32)  # one row value per 32 B block (Brcb)
    o_in = ctx.ub.alloc((rmax * dv,), F32)
    acc = ctx.ub.alloc((rmax * dv,), F32)
    o16 = ctx.ub.alloc((rmax * dv,), BF16)
    m_ub = ctx.ub.alloc((rmax * t // 8,), "uint8")
    rep, vrep = t // 8, dv // 8  # 32 B blocks per row of S and of O
    chunks = [(view(s_ub, c0), min(64, t - c0)) for c0 in range(0, t, 64)]  # 64-lane column chunks of S rows
    ochunks = [(view(acc, c0), min(64, dv - c0)) for c0 in range(0, dv, 64)]
    w0 = chunks[0][1]
    E = HardEvent
    for i in (EV_S, EV_O, EV_MASK):
        ctx.set_flag(E.V_MTE2, i)
    for i in (EV_P, EV_OUT):
        ctx.set_flag(E.MTE3_V, i)
    gt = 0

    def row_reduce(dst, r, fold, whole):
        ctx.adds(red, s_ub, 0.0, w0, r, UnaryRepeatParams(1, 1, 8, rep))
        for sc, w in chunks[1:]:
            fold(red, red, sc, w, r, BinaryRepeatParams(1, 1, 1, 8, 8, rep))
        ctx.pipe_barrier(PIPE_V)
        whole(dst, r)

    def softmax(item, tile, buf, first, r, ra):
        ctx.cross_core_wait_flag(FLAG_S)
        ctx.wait_flag(E.V_MTE2, EV_S)
        ctx.data_copy(s_ub, view(s_ws, buf * mq * t + ra * t), r * t)
        sync(ctx, E.MTE2_V, EV_S)
        ctx.muls(s_ub, s_ub, scale, r * t)
        ctx.pipe_barrier(PIPE_V)
        if tile.kind == 2:  # the diagonal tile: row i sees columns ≤ i (mask rows ra.. of the constant triangle)
            ctx.wait_flag(E.V_MTE2, EV_MASK)
            ctx.data_copy(m_ub, view(mask, ra * t // 8), r * t // 8)
            sync(ctx, E.MTE2_V, EV_MASK)
            ctx.select(s_ub, m_ub, s_ub, NEG, SELMODE.VSEL_TENSOR_SCALAR_MODE, r * t)
            ctx.set_flag(E.V_MTE2, EV_MASK)
            ctx.pipe_barrier(PIPE_V)
        elif tile.kind == 1:  # the first tile of a sequence is short: columns past its keys
            mask_columns(ctx, s_ub, 0, r, tile.ntok, t)
            ctx.pipe_barrier(PIPE_V)
        row_reduce(mx if first else mt, r, ctx.max,
                   lambda dst, n: ctx.whole_reduce_max(dst, red, w0, n, 1, 1, 8, ReduceOrder.ORDER_ONLY_VALUE))
        ctx.pipe_barrier(PIPE_V)
        if not first:
            a = alpha[buf]
            ctx.max(mt, mt, mx, r)  # the new max
            ctx.pipe_barrier(PIPE_V)
            ctx.sub(a, mx, mt, r)
            ctx.adds(mx, mt, 0.0, r)
            ctx.pipe_barrier(PIPE_V)
            ctx.exp(a, a, r)
        ctx.brcb(bc, mx, r // 8)  # each row's max in one 32 B block
        ctx.pipe_barrier(PIPE_V)
        for sc, w in chunks:
            ctx.sub(sc, sc, bc, w, r, BinaryRepeatParams(1, 1, 0, rep, rep, 1))
        ctx.pipe_barrier(PIPE_V)
        ctx.exp(s_ub, s_ub, r * t)
        ctx.pipe_barrier(PIPE_V)
        row_reduce(sm if first else rs, r, ctx.add, lambda dst, n: ctx.whole_reduce_sum(dst, red, w0, n, 1, 1, 8))
        ctx.wait_flag(E.MTE3_V, EV_P)
        ctx.cast(p_ub, s_ub, RoundMode.CAST_RINT, r * t)
        if not first:
            ctx.pipe_barrier(PIPE_V)
            ctx.mul(sm, sm, alpha[buf], r)
            ctx.pipe_barrier(PIPE_V)
            ctx.add(sm, sm, rs, r)
        ctx.set_flag(E.V_MTE2, EV_S)
        sync(ctx, E.V_MTE3, EV_P)
        ctx.data_copy(view(p_ws, buf * mq * t + ra * t), p_ub, r * t)
        ctx.cross_core_set_flag(2, PIPE_MTE3, FLAG_P)
        ctx.set_flag(E.MTE3_V, EV_P)

    def scale_rows(op, vec, r):  # acc[i, :] op= vec[i]
        ctx.brcb(bc, vec, r // 8)
        ctx.pipe_barrier(PIPE_V)
        for oc, w in ochunks:
            op(oc, oc, bc, w, r, BinaryRepeatParams(1, 1, 0, vrep, vrep, 1))
        ctx.pipe_barrier(PIPE_V)

    def accumulate(buf, first, r, ra):
        ctx.cross_core_wait_flag(FLAG_O)
        ctx.wait_flag(E.V_MTE2, EV_O)
        ctx.data_copy(o_in, view(o_ws, buf * mq * dv + ra * dv), r * dv)
        sync(ctx, E.MTE2_V, EV_O)
        ctx.pipe_barrier(PIPE_V)
        if first:
            ctx.adds(acc, o_in, 0.0, r * dv)
        else:
            scale_rows(ctx.mul, alpha[buf], r)
            ctx.add(acc, acc, o_in, r * dv)
        ctx.set_flag(E.V_MTE2, EV_O)

    for item in items:
        r = _cdiv(item.m, FRAC) * FRAC // 2
        ra = sub * r
        pending = []
        for i, tile in enumerate(item.tiles):
            buf = gt % 2
            gt += 1
            softmax(item, tile, buf, i == 0, r, ra)
            pending.append((buf, i == 0))
            if len(pending) == 2:
                accumulate(*pending.pop(0), r, ra)
        while pending:
            accumulate(*pending.pop(0), r, ra)
        ctx.pipe_barrier(PIPE_V)
        scale_rows(ctx.div, sm, r)
        ctx.wait_flag(E.MTE3_V, EV_OUT)
        ctx.cast(o16, acc, RoundMode.CAST_RINT, r * dv)
        sync(ctx, E.V_MTE3, EV_OUT)
        mv = min(r, item.m - ra)  # real rows of this AIV's half
        if mv > 0:
            ctx.data_copy(view(out, ((item.q_tok + ra) * h + item.head) * dv), o16,
                          DataCopyParams(block_count=mv, block_len=dv // 16, src_stride=0,
                                         dst_stride=(h - 1) * dv // 16))
        ctx.set_flag(E.MTE3_V, EV_OUT)
    for i in (EV_S, EV_O, EV_MASK):
        ctx.wait_flag(E.V_MTE2, i)
    for i in (EV_P, EV_OUT):
        ctx.wait_flag(E.MTE3_V, i)


@ascendemu.kernel("mix")
def mla_prefill_kernel(ctx, q, k, v, s_ws, p_ws, o_ws, mask, out, plan: PrefillPlan):
    """Causal flash attention: per group, its work items (see the module docstring). Workspaces: per group two
    q_tile × kv_tile S (fp32) and P (bf16) tiles and two q_tile × d_v O (fp32) tiles."""
    g = ctx.block_idx if ctx.is_aic else ctx.block_idx // 2
    items = plan.groups[g]
    mq, t, dv = plan.q_tile, plan.kv_tile, plan.d_v
    s_g = s_ws[g * 2 * mq * t:]
    p_g = p_ws[g * 2 * mq * t:]
    o_g = o_ws[g * 2 * mq * dv:]
    if ctx.is_aic:
        _aic_body(ctx, g, items, plan, q, k, v, s_g, p_g, o_g)
    else:
        _aiv_body(ctx, g, items, plan, s_g, p_g, o_g, mask, out)


# ------------------------------------------------------------------------------------------------------- host side


def mla_attention_prefill_reference(q, k, v, seq_lens, kv_lens=None, *, softmax_scale=None) -> np.ndarray:
    """float64 golden from the math. q [Tq, h, d_qk], k [Tk, h, d_qk], v [Tk, h, d_v]; query j of sequence i sees
    the keys of sequence i at positions ≤ kv_lens[i] − seq_lens[i] + j. Returns o [Tq, h, d_v] float64."""
    q = np.asarray(q).astype(np.float64)
    k = np.asarray(k).astype(np.float64)
    v = np.asarray(v).astype(np.float64)
    seq_lens = [int(x) for x in np.atleast_1d(seq_lens)]
    kv_lens = seq_lens if kv_lens is None else [int(x) for x in np.atleast_1d(kv_lens)]
    scale = q.shape[2] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out = np.zeros(q.shape[:2] + (v.shape[2],))
    qs = ks = 0
    for sl, kl in zip(seq_lens, kv_lens):
        if sl == 0:
            ks += kl
            continue
        s = scale * np.einsum("jhd,thd->hjt", q[qs:qs + sl], k[ks:ks + kl])
        visible = np.arange(kl)[None, :] <= (kl - sl + np.arange(sl))[:, None]  # [j, t]
        s = np.where(visible[None], s, -np.inf)
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        out[qs:qs + sl] = np.einsum("hjt,thd->jhd", p, v[ks:ks + kl])
        qs += sl
        ks += kl
    return out


def _lengths(name: str, x, n: int | None) -> list[int]:
    arr = np.atleast_1d(np.asarray(x, dtype=object))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"mla_attention_prefill: {name} must be a non-empty 1-D sequence of ints, got {x!r}")
    out = []
    for e in arr:
        if isinstance(e, (bool, np.bool_)) or not isinstance(e, (int, np.integer)):
            raise TypeError(f"mla_attention_prefill: {name} must hold ints, got {e!r} ({type(e).__name__})")
        if e < 0:
            raise ValueError(f"mla_attention_prefill: {name} holds a negative length {int(e)}")
        out.append(int(e))
    if n is not None and len(out) != n:
        raise ValueError(f"mla_attention_prefill: {name} has {len(out)} entries for {n} sequences")
    return out


def mla_attention_prefill(die, q, k, v, seq_lens, kv_lens=None, *, softmax_scale=None,
                          tiling: PrefillTiling | None = None):
    """Causal flash attention of packed sequences (see the module docstring). q [Tq, h, d_qk], k [Tk, h, d_qk],
    v [Tk, h, d_v] bf16: numpy arrays, or GlobalTensors of `die` (phantoms on a timing-only die). seq_lens: query
    tokens per sequence (Σ = Tq); kv_lens: key tokens per sequence (Σ = Tk, each ≥ its seq_len; default
    seq_lens). softmax_scale: default d_qk^−½. Returns o [Tq, h, d_v] bf16: a numpy array if the inputs are numpy
    and the die is functional, else a GlobalTensor. One launch."""
    if not isinstance(die, ascendemu.Die):
        raise TypeError(f"mla_attention_prefill: die must be an ascendemu.Die, got {type(die).__name__}")
    names = ("q", "k", "v")
    host = []
    for name, x in zip(names, (q, k, v)):
        if isinstance(x, GlobalTensor):
            if x.gm is not die.gm:
                raise ValueError(f"mla_attention_prefill: {name} is a GlobalTensor of another die's GM")
            host.append(False)
        elif isinstance(x, np.ndarray):
            host.append(True)
        else:
            raise TypeError(f"mla_attention_prefill: {name} must be a numpy array or a GlobalTensor, "
                            f"got {type(x).__name__}")
        if len(x.shape) != 3:
            raise ValueError(f"mla_attention_prefill: {name} must be 3-D [tokens, heads, dims], got shape "
                             f"{tuple(x.shape)}")
        if np.dtype(x.dtype) != BF16:
            raise TypeError(f"mla_attention_prefill: {name} is {x.dtype}; it must be bfloat16")
    (tq, h, dqk), (tk, hk, dqk_k), (tv, hv, dv) = (tuple(int(s) for s in x.shape) for x in (q, k, v))
    if not (h == hk == hv) or h < 1:
        raise ValueError(f"mla_attention_prefill: q, k, v must have the same number of heads ≥ 1, got {h}, {hk}, {hv}")
    if dqk != dqk_k:
        raise ValueError(f"mla_attention_prefill: q has d_qk {dqk} but k has {dqk_k}")
    if tk != tv:
        raise ValueError(f"mla_attention_prefill: k has {tk} tokens but v has {tv}")
    for name, d in (("d_qk", dqk), ("d_v", dv)):
        if d < FRAC or d % FRAC:
            raise ValueError(f"mla_attention_prefill: {name} = {d} must be a positive multiple of {FRAC}")
        if h * d > U16_MAX:
            raise ValueError(f"mla_attention_prefill: heads × {name} = {h * d} exceeds {U16_MAX}, the largest row "
                             f"pitch DataCopy Nd2Nz takes (srcDValue is a uint16)")
    sl = _lengths("seq_lens", seq_lens, None)
    kl = list(sl) if kv_lens is None else _lengths("kv_lens", kv_lens, len(sl))
    for i, (a, b) in enumerate(zip(sl, kl)):
        if b < a:
            raise ValueError(f"mla_attention_prefill: sequence {i} has kv_len {b} < seq_len {a} (its own query "
                             f"tokens' keys must be in k/v)")
    if sum(sl) != tq:
        raise ValueError(f"mla_attention_prefill: seq_lens sum to {sum(sl)} but q has {tq} tokens")
    if sum(kl) != tk:
        raise ValueError(f"mla_attention_prefill: kv_lens sum to {sum(kl)} but k/v have {tk} tokens")
    if tq == 0:
        raise ValueError("mla_attention_prefill: no query tokens (every seq_len is 0)")
    if softmax_scale is None:
        softmax_scale = dqk ** -0.5
    if isinstance(softmax_scale, bool) or not (isinstance(softmax_scale, (float, int, np.floating))
                                               and math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"mla_attention_prefill: softmax_scale must be a positive finite number, got "
                         f"{softmax_scale!r}")
    if tiling is not None and not isinstance(tiling, PrefillTiling):
        raise TypeError(f"mla_attention_prefill: tiling must be a PrefillTiling, got {type(tiling).__name__}")
    plan = plan_prefill(die.spec, h, dqk, dv, sl, kl, scale=float(softmax_scale), tiling=tiling)
    mq, t = plan.q_tile, plan.kv_tile
    tri = np.arange(t)[None, :] <= np.arange(mq)[:, None]  # [row, column]: column visible
    n_groups = len(plan.groups)
    staged, ws, out = [], [], None  # everything allocated here is freed if any step fails (out: kept on success)
    try:
        gin = []
        for x, hst in zip((q, k, v), host):
            gin.append(die.gm.from_numpy(x) if hst else x)
            if hst:
                staged.append(gin[-1])
        ws.append(die.gm.empty((n_groups * 2 * mq * t,), F32))  # S tiles
        ws.append(die.gm.empty((n_groups * 2 * mq * t,), BF16))  # P tiles
        ws.append(die.gm.empty((n_groups * 2 * mq * dv,), F32))  # O tiles
        ws.append(die.gm.from_numpy(np.packbits(tri, axis=1, bitorder="little").reshape(-1)))  # the diagonal's mask
        out = die.gm.empty((tq, h, dv), BF16)
        die.launch(mla_prefill_kernel, block_dim=n_groups,
                   args=(*(x.flatten() for x in gin), *ws, out.flatten(), plan))
    except BaseException:
        if out is not None:
            die.gm.free(out)
        raise
    finally:
        for x in ws + staged:
            die.gm.free(x)
    if all(host) and die.functional:
        res = out.numpy()
        die.gm.free(out)
        return res
    return out
