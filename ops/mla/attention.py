"""FlashMLA-equivalent decode attention over the paged NZ latent cache: `mla_attention_decode`.

    o[b, j, h] = softmax_t(scale · q[b, j, h] · [c_kv; k_pe][t]ᵀ) · c_kv[t]      t < length_b − s_q + 1 + j

q [B, s_q, h_q, 576] bf16 (576 = kv_dim + pe_dim: the absorbed query q_nope·W_UK and q_pe), one KV head, returns
o [B, s_q, h_q, 512] bf16. Products exact, sums in fp32 (cube), softmax and its statistics in fp32 (vector), P and
o rounded once each to bf16. With MTP (s_q = 2), query token j sees the cache up to and including its own position.

Two launches (the CANN/FlashMLA structure: attention with split-KV, then a combine):

1. `mla_decode_kernel`, a mix kernel on up to 24 groups of 1 AIC + 2 AIV. Work item = (batch, row tile, KV split):
   a row tile is up to 128 rows of the BSND-flattened query (rows ordered (query token, head), so with MTP the two
   query tokens of a sequence share one read of the cache when s_q·h_q ≤ 128, else get a tile each), and a split is
   a run of KV *tiles* (T = `tile_blocks` cache blocks). Items are spread over the groups longest-first (host-side
   tiling data, as Ascend kernels receive theirs). Per tile:

   AIC  GM ──DataCopy (MTE2)──▶ L1  the tile's cache blocks (c_kv then k_pe: one Nz matrix of 576 columns)
        S  = Q·Kᵀ:  L1 Q (Zz strips) ─Load2D─▶ L0A;  L1 block ─Load2D, no transpose─▶ L0B  (Nz(K) ≡ Zn(Kᵀ))
             Mmad bf16→fp32 per 128-dim K chunk; Fixpipe fp32 → GM workspace S          ──CrossCoreSetFlag(0)──▶
   AIV  (each AIV half the rows) GM → UB, ×scale, mask (causal / past the length), row max, exp, row sum (fp32),
        cast P to bf16 → GM workspace; the tile's (max, sum) → GM                    ──CrossCoreSetFlag(1)──▶
   AIC  Oᵀ_tile = Vᵀ·Pᵀ:  L1 block ─Load2D with transpose─▶ L0A  (Zz(Vᵀ): the block's Nz fractals in order, each
                          transposed: one Load2D per 128-dim chunk);
                          P GM ─DataCopy Nd2Nz─▶ L1 as Nz ─Load2D─▶ L0B  (Nz(P) ≡ Zn(Pᵀ))
        Mmad accumulating over the tile's blocks per 128-dim chunk; Fixpipe fp32 → GM (the tile's partial, dims × rows)

   Why Oᵀ: for O = P·V the same block would have to reach L0B as Zn(V), whose fractal order (token-major) is the
   transpose of the block's (dim-major) as well as each fractal's inside: one transposing Load2D per 16-token
   fractal row (block_size / 16 per 128-dim chunk, src_stride block_size / 16). As Vᵀ in L0A only the insides
   transpose, so one Load2D moves a whole chunk, at L1→L0A's 256 B/cycle instead of L1→L0B's 128.

   Every tile is a flash-decoding partial (o unnormalised, max m, sum l): no running rescale is needed, which
   matters because L0C cannot be rescaled and UB cannot hold a 128 × 512 fp32 accumulator beside an S tile.
   With `depth` 2 the AIC computes S of tile i+1 before P·V of tile i, so the cube works while the AIVs do the
   softmax of tile i (L1 holds two tiles); with depth 1 (when two tiles do not fit L1) the three stages of a tile
   run in turn and the other groups keep HBM busy. The block table and lengths reach the kernel as host tiling data
   (on hardware the AIC would read the block table from GM with scalar loads, which the emulator does not model).

2. `mla_decode_merge_kernel`, an AIV kernel: per (batch, row tile, up to 512 output dims), g = max_p m_p,
   w_p = exp(m_p − g), o = Σ_p w_p·o_p / Σ_p w_p·l_p, cast to bf16 and transposed back to rows × dims (Gather).

Splits fall on tile boundaries and tiles on a grid fixed by token position, and the merge sums the partials in
token order, so the result does not depend on `num_splits` at all (bit for bit).

Two facts of the cube shape the tiling: L0A/L0B hold 64 KiB (so Q is re-staged from L1 per 128-dim chunk and the
output is produced 128 columns at a time) and L0C 128 KiB (two 64 KiB tiles: S of one block or one 128-column
output chunk of up to 128 rows). L1 holds Q (≤ 144 KiB), `depth` × `tile_blocks` cache blocks (144 KiB each at
block_size 128) and P.

⚠ Modelled cost: the S, P and partial-o workspaces are GM, and the emulator charges every GM byte to HBM (it has no
L2). On hardware they are small and hot and would mostly hit the 192 MiB L2; here, at h_q = 128, they move about
three times the bytes of the cache itself. See benchmarks/test_bench_mla.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import ascendemu
from ascendemu import (PIPE_FIX, PIPE_M, PIPE_MTE3, PIPE_V, BinaryRepeatParams, DataCopyParams, FixpipeParamsV220,
                       GlobalTensor, HardEvent, LoadData2DParams, MmadParams, Nd2NzParams, QuantMode, ReduceOrder,
                       RoundMode, UnaryRepeatParams)
from ascendemu.layouts import ceil_div
from ascendemu.numerics import as_dtype, dtype_name
from ascendemu.ops.matmul import copy_gm_to_l1_strips
from ascendemu.ops.rowwise import Staging

from .cache import MLACache

__all__ = ["mla_attention_decode", "mla_attention_decode_reference", "MLATiling", "DecodePlan", "plan_decode",
           "mla_decode_kernel", "mla_decode_merge_kernel"]

BF16, F32 = as_dtype("bfloat16"), as_dtype("float32")
FRAC = 16  # rows of a fractal, C0 of a 16-bit type
FE = 256  # elements of a 16 × 16 fractal
KC = 128  # K chunk of S = Q·Kᵀ (dims per Mmad)
NC = 128  # output columns per P·V chunk
MT = 128  # most query rows per work item (row tile)
L0AB_ELEMS = MT * KC  # one L0A/L0B ping-pong slot: 32 KiB of bf16
L0C_ELEMS = MT * NC  # one L0C slot: 64 KiB of fp32
MAX_TILE = 512  # tokens per tile at most
MAX_BLOCK = 128  # block sizes the kernel takes (ATB: ≤ 128)
NEG = -1.0e30  # masked score (finite: a fully masked row of a partial gets weight exp(NEG − g) = 0 in the merge)
FLAG_S, FLAG_P = 0, 1  # cross-core flags: S tile in GM (AIC → AIVs), P and stats in GM (AIVs → AIC)
# intra-core event ids (AIC)
ID_KVL, ID_QL, ID_PL = 0, 1, 2  # MTE2_MTE1: a cache block / Q / P is in L1
ID_Q, ID_P, ID_SLOT = 0, 1, 2  # MTE1_MTE2: Q, P, tile slot s (ids 2, 3) free again
MAX_SQ, MAX_HQ = 2, 128


_cdiv = ceil_div  # the shape helper of ascendemu.layouts


# ------------------------------------------------------------------------------------------------ host-side tiling


@dataclass(frozen=True)
class MLATiling:
    """`tile_blocks` cache blocks per KV tile (one softmax partial); `depth` 2 = two tiles in L1 (S of the next
    tile overlaps the softmax of this one), 1 = one. None picks the largest tile that fits L1 and UB (≤ 512
    tokens, fewer partials to write and merge), with depth 2 if that still fits."""

    tile_blocks: int | None = None
    depth: int | None = None


@dataclass(frozen=True)
class _Tile:
    pid: int  # partial index (global, in (batch, row tile, token) order)
    t0: int  # first token
    ntok: int  # tokens in the tile
    blocks: tuple  # physical cache block ids
    kpv: tuple  # Mmad k of P·V per block: tokens some row of the tile may see (0 = no Mmad; the first is ≥ 1)


@dataclass(frozen=True)
class _Item:
    b: int
    rt: int
    rows: int  # query rows of this row tile
    q_off: int  # element offset of its first row in q (flattened)
    groups: tuple  # (first row, end row, causal limit v) per query token: positions < v are visible
    tiles: tuple


@dataclass(frozen=True)
class DecodePlan:
    """The host-side tiling of one `mla_attention_decode` call (what an Ascend kernel gets as tiling data)."""

    kv_dim: int
    pe_dim: int
    block_size: int
    tile_blocks: int
    depth: int
    rows: int  # rows of every workspace tile: the largest row tile, rounded up to 16
    scale: float
    splits: tuple  # KV splits per (batch, row tile)
    groups: tuple  # per AIC group, its work items in order
    n_partials: int
    merge_units: tuple  # (row tile rows, first partial, end partial, first column, columns, output offset)
    merge_chunk: int  # partials whose (m, l) the merge holds in UB at once
    merge_cols: int  # output dims per merge unit

    @property
    def tile(self) -> int:
        return self.tile_blocks * self.block_size

    @property
    def aiv_rows(self) -> int:
        return self.rows // 2


def _pick_tiling(spec, rows: int, kv: int, pe: int, bs: int, max_len: int, tiling: MLATiling) -> tuple[int, int]:
    kd = kv + pe
    slot = bs * kd * 2
    q_bytes = rows * kd * 2
    r = rows // 2

    def fits(nb: int, depth: int) -> str | None:
        t = nb * bs
        l1 = q_bytes + depth * nb * slot + rows * t * 2
        if l1 > spec.l1_bytes:
            return f"L1 needs {l1} B (Q {q_bytes}, {depth}×{nb} blocks of {slot}, P {rows * t * 2}) of {spec.l1_bytes}"
        ub = r * t * 6 + r * 64 * 4 + r * 48 + 1024
        if ub > spec.ub_bytes:
            return f"UB needs {ub} B (S and P of {r} rows × {t} tokens) of {spec.ub_bytes}"
        if t // 8 > 255:
            return f"a tile of {t} tokens exceeds the vector repeat stride (255 blocks of 32 B)"
        return None

    if tiling.tile_blocks is not None:
        nb = tiling.tile_blocks
        if isinstance(nb, bool) or not isinstance(nb, (int, np.integer)) or nb < 1:
            raise ValueError(f"mla_attention_decode: tiling.tile_blocks must be a positive int, got {nb!r}")
        depths = (tiling.depth,) if tiling.depth is not None else (2, 1)
        for d in depths:
            if d not in (1, 2):
                raise ValueError(f"mla_attention_decode: tiling.depth must be 1 or 2, got {d!r}")
            why = fits(nb, d)
            if why is None:
                return int(nb), d
        raise ValueError(f"mla_attention_decode: tiling {tiling} does not fit: {why}")
    cap = max(1, min(MAX_TILE // bs, _cdiv(max(max_len, 1), bs)))
    depths = (tiling.depth,) if tiling.depth is not None else (2, 1)
    for nb in range(cap, 0, -1):
        for d in depths:
            if d not in (1, 2):
                raise ValueError(f"mla_attention_decode: tiling.depth must be 1 or 2, got {d!r}")
            if fits(nb, d) is None:
                return nb, d
    raise ValueError(f"mla_attention_decode: no tiling fits: {fits(1, 1)}")


def lpt(costs: list, n_groups: int) -> list[list[int]]:
    """Longest processing time first: the item indices of each of `n_groups` groups (each list ascending), items
    taken by decreasing cost onto the least loaded group. Shared by the decode and prefill planners."""
    loads = [0] * n_groups
    out = [[] for _ in range(n_groups)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        g = min(range(n_groups), key=lambda k: (loads[k], k))
        loads[g] += costs[i]
        out[g].append(i)
    return [sorted(x) for x in out]


def _auto_splits(tile_counts: list, n_groups: int) -> int:
    """The split count (per (batch, row tile)) that minimises the longest group's work (in tiles, +1 per item for
    its Q load and pipeline fill); ties go to fewer splits."""
    best, best_s = None, 1
    for s in range(1, max(tile_counts) + 1):
        costs = []
        for n in tile_counts:
            k = min(s, n)
            costs += [(n * (i + 1) // k - n * i // k) + 1 for i in range(k)]
        g = min(n_groups, len(costs))
        loads = [0] * g
        for c in sorted(costs, reverse=True):
            loads[loads.index(min(loads))] += c
        span = max(loads)
        if best is None or span < best:
            best, best_s = span, s
        if len(costs) >= 4 * n_groups:
            break
    return best_s


def plan_decode(spec, q_shape, kv_dim: int, pe_dim: int, block_size: int, lengths, tables, *, scale: float,
                num_splits: int | None = None, tiling: MLATiling | None = None) -> DecodePlan:
    """The host-side tiling of `mla_attention_decode` (exposed for benchmarks and tests)."""
    B, s_q, h_q, _ = q_shape
    bs = block_size
    m_total = s_q * h_q
    n_rt = _cdiv(m_total, MT)
    per_rt = _cdiv(_cdiv(m_total, n_rt), FRAC) * FRAC
    row_tiles = [(r0, min(per_rt, m_total - r0)) for r0 in range(0, m_total, per_rt)]
    rows = max(_cdiv(m, FRAC) * FRAC for _, m in row_tiles)
    nb, depth = _pick_tiling(spec, rows, kv_dim, pe_dim, bs, max(lengths), tiling or MLATiling())
    t = nb * bs
    n_tiles = [_cdiv(L, t) for L in lengths]
    n_aic = spec.aic_per_die
    if num_splits is None:
        splits = _auto_splits([n for n in n_tiles for _ in row_tiles], n_aic)
    else:
        if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)) or num_splits < 1:
            raise ValueError(f"mla_attention_decode: num_splits must be a positive int, got {num_splits!r}")
        splits = int(num_splits)
    items, costs, split_list = [], [], []
    pid = 0
    units = []
    for b in range(B):
        L, table = lengths[b], tables[b]
        for rt, (r0, m) in enumerate(row_tiles):
            groups = []
            for j in range(s_q):
                lo, hi = max(j * h_q, r0), min((j + 1) * h_q, r0 + m)
                if lo < hi:
                    groups.append((lo - r0, hi - r0, L - s_q + 1 + j))
            vmax = groups[-1][2]
            k = min(splits, n_tiles[b])
            split_list.append(k)
            pb = pid
            for si in range(k):
                tl = []
                for ti in range(n_tiles[b] * si // k, n_tiles[b] * (si + 1) // k):
                    t0 = ti * t
                    ntok = min(t, L - t0)
                    nblk = _cdiv(ntok, bs)
                    blocks = tuple(int(x) for x in table[t0 // bs: t0 // bs + nblk])
                    kpv = []
                    for jb in range(nblk):
                        n_j = min(bs, ntok - jb * bs)
                        kpv.append(min(max(vmax - (t0 + jb * bs), 0), n_j))
                    kpv[0] = max(kpv[0], 1)
                    tl.append(_Tile(pid, t0, ntok, blocks, tuple(kpv)))
                    pid += 1
                items.append(_Item(b, rt, m, (b * m_total + r0) * (kv_dim + pe_dim), tuple(groups), tuple(tl)))
                costs.append((sum(x.ntok for x in tl) + t) * (rows + 64))  # ~bytes moved; + a tile for the fill
            units.append((m, pb, pid, (b * m_total + r0) * kv_dim))
    n_groups = min(n_aic, len(items))
    groups = tuple(tuple(items[i] for i in g) for g in lpt(costs, n_groups))
    # merge: dc output dims per unit; UB holds 2 + 1 fp32 and 2 bf16 dc × rows tiles, the Gather offsets (u32),
    # and (m, l, w) of `chunk` partials
    dc = next(d for d in (512, 256, 128, 64, 32, 16) if d <= max(kv_dim, 16) and
              20 * d * rows + 12 * 16 * rows + 8 * rows + 2048 <= spec.ub_bytes)
    chunk = max(1, min(255, (spec.ub_bytes - 20 * dc * rows - 8 * rows - 2048) // (12 * rows)))
    merge_units = tuple((m, pb, pe, d0, min(dc, kv_dim - d0), off + d0)
                        for m, pb, pe, off in units for d0 in range(0, kv_dim, dc))
    return DecodePlan(kv_dim, pe_dim, bs, nb, depth, rows, float(scale), tuple(split_list), groups, pid,
                      merge_units, chunk, dc)


# ------------------------------------------------------------------------------------------------------- kernels


def views():
    """A memo of `t[offset:]` for 1-D tensors, for one kernel body: slicing a tensor costs more host time than the
    bookkeeping of an instruction, and the kernels take the same views again and again."""
    memo = {}

    def view(t, offset: int):
        key = (id(t), offset)
        v = memo.get(key)
        if v is None:
            v = memo[key] = (t, t[offset:])  # keep t alive, so its id stays its own
            return v[1]
        return v[1]
    return view


def sync(ctx, event: HardEvent, i: int = 0) -> None:
    """set_flag then wait_flag of one event id: the next instruction of the waiting pipe starts after the
    setting pipe's earlier ones (the usual SetFlag/WaitFlag pair of Ascend C)."""
    ctx.set_flag(event, i)
    ctx.wait_flag(event, i)


class AicState:
    """The AIC's running counters of one kernel body: il0 (L0A/L0B ping-pong), ic (L0C ping-pong), gt (global tile
    index: the workspace slot)."""

    __slots__ = ("il0", "ic", "gt")

    def __init__(self):
        self.il0 = self.ic = self.gt = 0


def _aic_free_events(slots: int) -> list:
    """The attention AIC's "buffer free" events, in set (and drain) order: MTE1_MTE2 for the `slots` K/V tile slots
    (ID_SLOT + s), Q (ID_Q) and P (ID_P); M_MTE1 and FIX_M for both halves of the L0A/L0B and L0C ping-pong."""
    return ([(HardEvent.MTE1_MTE2, ID_SLOT + s) for s in range(slots)]
            + [(HardEvent.MTE1_MTE2, ID_Q), (HardEvent.MTE1_MTE2, ID_P)]
            + [(event, p) for p in range(2) for event in (HardEvent.M_MTE1, HardEvent.FIX_M)])


def aic_events_free(ctx, slots: int) -> None:
    """At the start of an attention AIC body, every "buffer free" event set once (CATLASS style: each set has its
    wait)."""
    for event, eid in _aic_free_events(slots):
        ctx.set_flag(event, eid)


def aic_events_drain(ctx, slots: int) -> None:
    """At the end of an attention AIC body, the waits matching `aic_events_free`: no event is left set."""
    for event, eid in _aic_free_events(slots):
        ctx.wait_flag(event, eid)

def qk_scores(ctx, st: AicState, l0a, l0b, l0c, q_chunks, kchunks, k_l1, n1: int, m: int, m1: int, n: int, dst,
              pitch: int) -> None:
    """S = Q·Kᵀ of m query rows and n keys → fp32 in GM at `dst` (row pitch `pitch`), on the AIC: per K chunk (k0, kw)
    of `kchunks`, Load2D Q's Zz strip chunk (`q_chunks`) to L0A and K's fractals to L0B — `k_l1` is Nz(K) ≡ Zn(Kᵀ)
    with n1 fractal rows, so dims k0..k0+kw are (kw/16)·n1 consecutive fractals — and Mmad, accumulating in L0C
    tile st.ic % 2; then one Fixpipe. The L0 ping-pongs advance st.il0 / st.ic (events M_MTE1, FIX_M by slot)."""
    E = HardEvent
    cq = st.ic % 2
    st.ic += 1
    ctx.wait_flag(E.FIX_M, cq)
    for ci, (k0, kw) in enumerate(kchunks):
        p = st.il0 % 2
        st.il0 += 1
        ctx.wait_flag(E.M_MTE1, p)
        ctx.load_data(l0a[p], q_chunks[ci], LoadData2DParams(repeat_times=m1 * (kw // FRAC)))
        ctx.load_data(l0b[p], k_l1, LoadData2DParams(start_index=(k0 // FRAC) * n1, repeat_times=(kw // FRAC) * n1))
        sync(ctx, E.MTE1_M, p)
        if ci and m1 * n1 < 10:  # [Mmad.md] hazard on small accumulating tiles
            ctx.pipe_barrier(PIPE_M)
        ctx.mmad(l0c[cq], l0a[p], l0b[p], MmadParams(m=m, n=n, k=kw, cmatrix_init_val=ci == 0, disable_gemv=True))
        ctx.set_flag(E.M_MTE1, p)
    sync(ctx, E.M_FIX, cq)
    ctx.fixpipe(dst, l0c[cq], FixpipeParamsV220(n_size=n, m_size=m, dst_stride=pitch, quant_pre=QuantMode.NoQuant))
    ctx.set_flag(E.FIX_M, cq)



def _aic_body(ctx, g, items, plan: DecodePlan, q, c_kv, k_pe, s_ws, p_ws, o_part):
    kv, pe, bs, nb, depth, rows, t = plan.kv_dim, plan.pe_dim, plan.block_size, plan.tile_blocks, plan.depth, \
        plan.rows, plan.tile
    kd = kv + pe
    nbs = bs // FRAC  # fractals of 16 tokens per block
    view = views()
    kchunks = [(k0, min(KC, kv - k0)) for k0 in range(0, kv, KC)] + \
              [(kv + k0, min(KC, pe - k0)) for k0 in range(0, pe, KC)]
    vchunks = [(d0, min(NC, kv - d0)) for d0 in range(0, kv, NC)]
    l1_q = ctx.l1.alloc((rows * kd,), BF16)  # Q in Zz strips, one region per K chunk
    q_chunks = [view(l1_q, rows * k0) for k0, _ in kchunks]
    l1_kv = [[view(slot, j * bs * kd) for j in range(nb)]  # tile slots of nb blocks of kd columns
             for slot in (ctx.l1.alloc((nb * bs * kd,), BF16) for _ in range(depth))]
    l1_pe = [[view(b, bs * kv) for b in slot] for slot in l1_kv]  # where each block's k_pe strips go
    l1_p = [view(buf, j * rows * bs) for buf in [ctx.l1.alloc((nb * rows * bs,), BF16)] for j in range(nb)]
    l0a = [ctx.l0a.alloc((L0AB_ELEMS,), BF16) for _ in range(2)]
    l0b = [ctx.l0b.alloc((L0AB_ELEMS,), BF16) for _ in range(2)]
    l0c = [ctx.l0c.alloc((L0C_ELEMS,), F32) for _ in range(2)]
    E = HardEvent
    aic_events_free(ctx, depth)
    st = AicState()

    def s_tile(item, tile, slot, buf, m, m1):
        """S = Q·Kᵀ for each block of the tile → S workspace (rows × T, fp32)."""
        ctx.wait_flag(E.MTE1_MTE2, ID_SLOT + slot)
        s_base = (g * 2 + buf) * rows * t
        for j, blk in enumerate(tile.blocks):
            kvb = l1_kv[slot][j]
            ctx.data_copy(kvb, view(c_kv, blk * bs * kv), bs * kv)  # one Nz block: (kv/16) strips of bs × 16
            ctx.data_copy(l1_pe[slot][j], view(k_pe, blk * bs * pe), bs * pe)  # k_pe strips follow: kd columns
            sync(ctx, E.MTE2_MTE1, ID_KVL)
            qk_scores(ctx, st, l0a, l0b, l0c, q_chunks, kchunks, kvb, nbs, m, m1, bs, view(s_ws, s_base + j * bs), t)

    def pv_tile(item, tile, slot, buf, m, m1):
        """Oᵀ_tile = Vᵀ·Pᵀ per 128 output dims, accumulated over the tile's blocks → the tile's partial (kv × rows)."""
        ctx.cross_core_wait_flag(FLAG_P)  # both AIVs wrote P (and the tile's max and sum)
        ctx.wait_flag(E.MTE1_MTE2, ID_P)
        p_base = (g * 2 + buf) * rows * t
        blocks = [(j, k) for j, k in enumerate(tile.kpv) if k]
        for j, k in blocks:  # P of block j (m × k) → L1 as Nz, which is Zn(Pᵀ); columns past k are zero-padded
            ctx.data_copy(l1_p[j], view(p_ws, p_base + j * bs), Nd2NzParams(
                nd_num=1, n_value=m, d_value=k, src_d_value=t, dst_nz_c0_stride=m1 * FRAC, dst_nz_n_stride=1))
        sync(ctx, E.MTE2_MTE1, ID_PL)
        for d0, dw in vchunks:
            dw1 = dw // FRAC
            cq = st.ic % 2
            st.ic += 1
            ctx.wait_flag(E.FIX_M, cq)
            for n, (j, k) in enumerate(blocks):
                k1 = _cdiv(k, FRAC)
                p = st.il0 % 2
                st.il0 += 1
                ctx.wait_flag(E.M_MTE1, p)
                kvb = l1_kv[slot][j]
                # Vᵀ as A (Zz: fractal (d1, t1), inside [d][t]) is the block's Nz run of fractals, each transposed
                if k1 == nbs:
                    ctx.load_data(l0a[p], kvb, LoadData2DParams(start_index=(d0 // FRAC) * nbs,
                                                                repeat_times=dw1 * nbs, if_transpose=True))
                else:  # a partly visible block: the first k1 fractals of each 16-dim strip
                    for i in range(dw1):
                        ctx.load_data(view(l0a[p], i * k1 * FE), kvb, LoadData2DParams(
                            start_index=(d0 // FRAC + i) * nbs, repeat_times=k1, if_transpose=True))
                ctx.load_data(l0b[p], l1_p[j], LoadData2DParams(repeat_times=k1 * m1))  # Zn(Pᵀ) = Nz(P)
                sync(ctx, E.MTE1_M, p)
                if n and m1 * dw1 < 10:
                    ctx.pipe_barrier(PIPE_M)
                ctx.mmad(l0c[cq], l0a[p], l0b[p], MmadParams(m=dw, n=m, k=k, cmatrix_init_val=n == 0,
                                                             disable_gemv=True))
                ctx.set_flag(E.M_MTE1, p)
            sync(ctx, E.M_FIX, cq)
            ctx.fixpipe(o_part[(tile.pid * kv + d0) * rows:], l0c[cq],
                        FixpipeParamsV220(n_size=m, m_size=dw, dst_stride=rows, quant_pre=QuantMode.NoQuant))
            ctx.set_flag(E.FIX_M, cq)
        ctx.set_flag(E.MTE1_MTE2, ID_P)
        ctx.set_flag(E.MTE1_MTE2, ID_SLOT + slot)

    for item in items:
        m = item.rows
        m1 = _cdiv(m, FRAC)
        ctx.wait_flag(E.MTE1_MTE2, ID_Q)
        for (k0, kw), dst in zip(kchunks, q_chunks):
            copy_gm_to_l1_strips(ctx, dst, q[item.q_off + k0:], m, kw, kd)
        sync(ctx, E.MTE2_MTE1, ID_QL)
        pending = []
        for i, tile in enumerate(item.tiles):
            slot, buf = st.gt % depth, st.gt % 2
            st.gt += 1
            s_tile(item, tile, slot, buf, m, m1)
            if i == len(item.tiles) - 1:
                ctx.set_flag(E.MTE1_MTE2, ID_Q)  # the last S of the item has staged its Q chunks
            ctx.cross_core_set_flag(2, PIPE_FIX, FLAG_S)
            pending.append((tile, slot, buf))
            if len(pending) == depth:
                pv_tile(item, *pending.pop(0), m, m1)
        while pending:
            pv_tile(item, *pending.pop(0), m, m1)

    aic_events_drain(ctx, depth)


def mask_columns(ctx, s_ub, r0: int, r1: int, v: int, t: int) -> None:
    """Columns ≥ v of rows [r0, r1) of the R × T score tile ← NEG (repeat form: one repeat per row)."""
    c = v // 64
    while c * 64 < t:
        lo, hi = max(v - c * 64, 0), min(64, t - c * 64)
        mask = hi if lo == 0 else [((1 << hi) - 1) & ~((1 << lo) - 1), 0]
        ctx.duplicate(s_ub[r0 * t + c * 64:], NEG, mask, r1 - r0, 1, t // 8)  # one repeat per row
        c += 1


def _aiv_body(ctx, g, items, plan: DecodePlan, s_ws, p_ws, ml_ws):
    """Softmax of the AIV's half of the rows of each S tile; P (bf16) and the tile's (max, sum) back to GM."""
    sub = ctx.sub_block_idx
    view = views()
    r, t, rows, scale = plan.aiv_rows, plan.tile, plan.rows, plan.scale
    ra = sub * r
    s_ub = ctx.ub.alloc((r * t,), F32)
    p_ub = ctx.ub.alloc((r * t,), BF16)
    acc = ctx.ub.alloc((r * 64,), F32)
    mx = ctx.ub.alloc((r,), F32)
    sm = ctx.ub.alloc((r,), F32)
    mb = ctx.ub.alloc((r * 8,), F32)
    rep = t // 8  # 32 B blocks per row of the tile
    chunks = [(view(s_ub, c0), min(64, t - c0)) for c0 in range(0, t, 64)]  # 64-lane column chunks of a row
    w0 = chunks[0][1]
    E = HardEvent
    ctx.set_flag(E.V_MTE2, 0)
    ctx.set_flag(E.MTE3_V, 0)
    gt = 0
    for item in items:
        groups = [(max(a, ra) - ra, min(z, ra + r) - ra, v) for a, z, v in item.groups if max(a, ra) < min(z, ra + r)]
        for tile in item.tiles:
            base = ((g * 2 + gt % 2) * rows + ra) * t
            gt += 1
            ctx.cross_core_wait_flag(FLAG_S)
            ctx.wait_flag(E.V_MTE2, 0)
            ctx.data_copy(s_ub, view(s_ws, base), r * t)
            sync(ctx, E.MTE2_V, 0)
            ctx.wait_flag(E.MTE3_V, 0)
            ctx.muls(s_ub, s_ub, scale, r * t)
            ctx.pipe_barrier(PIPE_V)
            for a, z, v in groups:
                mask_columns(ctx, s_ub, a, z, min(max(v - tile.t0, 0), tile.ntok), t)
            ctx.pipe_barrier(PIPE_V)
            # row max: fold the 64-lane column chunks, then reduce each row
            ctx.adds(acc, s_ub, 0.0, w0, r, UnaryRepeatParams(1, 1, 8, rep))
            for sc, w in chunks[1:]:
                ctx.max(acc, acc, sc, w, r, BinaryRepeatParams(1, 1, 1, 8, 8, rep))
            ctx.whole_reduce_max(mx, acc, w0, r, 1, 1, 8, ReduceOrder.ORDER_ONLY_VALUE)
            ctx.pipe_barrier(PIPE_V)
            ctx.brcb(mb, mx, r // 8)  # each row's max in one 32 B block
            ctx.pipe_barrier(PIPE_V)
            for sc, w in chunks:
                ctx.sub(sc, sc, mb, w, r, BinaryRepeatParams(1, 1, 0, rep, rep, 1))
            ctx.pipe_barrier(PIPE_V)
            ctx.exp(s_ub, s_ub, r * t)
            ctx.pipe_barrier(PIPE_V)
            ctx.adds(acc, s_ub, 0.0, w0, r, UnaryRepeatParams(1, 1, 8, rep))
            for sc, w in chunks[1:]:
                ctx.add(acc, acc, sc, w, r, BinaryRepeatParams(1, 1, 1, 8, 8, rep))
            ctx.whole_reduce_sum(sm, acc, w0, r, 1, 1, 8)
            ctx.cast(p_ub, s_ub, RoundMode.CAST_RINT, r * t)
            ctx.set_flag(E.V_MTE2, 0)
            sync(ctx, E.V_MTE3, 0)
            ctx.data_copy(view(p_ws, base), p_ub, r * t)
            ctx.data_copy(view(ml_ws, tile.pid * 2 * rows + ra), mx, r)
            ctx.data_copy(view(ml_ws, (tile.pid * 2 + 1) * rows + ra), sm, r)
            ctx.cross_core_set_flag(2, PIPE_MTE3, FLAG_P)
            ctx.set_flag(E.MTE3_V, 0)
    ctx.wait_flag(E.V_MTE2, 0)
    ctx.wait_flag(E.MTE3_V, 0)


@ascendemu.kernel("mix")
def mla_decode_kernel(ctx, q, c_kv, k_pe, s_ws, p_ws, o_part, ml_ws, plan: DecodePlan):
    """Split-KV MLA decode attention: per group, its work items (see the module docstring)."""
    g = ctx.block_idx if ctx.is_aic else ctx.block_idx // 2
    items = plan.groups[g]
    if ctx.is_aic:
        _aic_body(ctx, g, items, plan, q, c_kv, k_pe, s_ws, p_ws, o_part)
    else:
        _aiv_body(ctx, g, items, plan, s_ws, p_ws, ml_ws)


@ascendemu.kernel("aiv")
def mla_decode_merge_kernel(ctx, o_part, ml_ws, out, offsets, plan: DecodePlan):
    """Combine the tile partials: per (row tile, `merge_cols` dims), o = Σ w_p·o_p / Σ w_p·l_p, w_p = exp(m_p − max m).

    The partials are Oᵀ (dims × rows), so a partial's weights are one vector over the rows, applied to every dim with
    a source repeat stride of 0; the result is transposed back to rows × dims with Gather (`offsets`: the byte
    offsets (d·rows + r)·2 for r-major output; the vector Transpose instruction is not modelled)."""
    rows, kv, pc, dc = plan.rows, plan.kv_dim, plan.merge_chunk, plan.merge_cols
    view = views()
    rrep = rows // 8  # 32 B blocks per `rows` fp32
    rch = [(r0, min(64, rows - r0)) for r0 in range(0, rows, 64)]
    ml = ctx.ub.alloc((pc * 2 * rows,), F32)  # [partial, (m, l), rows]
    wv = ctx.ub.alloc((pc * rows,), F32)
    gmax = ctx.ub.alloc((rows,), F32)
    lsum = ctx.ub.alloc((rows,), F32)
    ob = [ctx.ub.alloc((dc * rows,), F32) for _ in range(2)]
    acc = ctx.ub.alloc((dc * rows,), F32)
    o16 = ctx.ub.alloc((dc * rows,), BF16)
    o16t = ctx.ub.alloc((rows * dc,), BF16)
    offs = ctx.ub.alloc((rows * dc,), "uint32")
    E = HardEvent
    ML, OFS = 2, 3
    ctx.data_copy(offs, offsets)
    ctx.set_flag(E.MTE2_V, OFS)
    for i in (0, 1, ML):
        ctx.set_flag(E.V_MTE2, i)
    ctx.set_flag(E.MTE3_V, 0)
    ctx.wait_flag(E.MTE2_V, OFS)
    k = 0

    def load_ml(p0, n):
        ctx.wait_flag(E.V_MTE2, ML)
        ctx.data_copy(ml, view(ml_ws, p0 * 2 * rows), n * 2 * rows)
        sync(ctx, E.MTE2_V, ML)

    def scale_rows(x, w, dw):  # x[d, r] *= w[r] for d < dw: one repeat per dim, ≤ 255 repeats an instruction
        for e0 in range(0, dw, 128):
            for r0, wr in rch:
                xe = view(x, e0 * rows + r0)
                ctx.mul(xe, xe, view(w, r0), wr, min(128, dw - e0), BinaryRepeatParams(1, 1, 1, rrep, rrep, 0))

    for m, pb, pe, d0, dw, out_off in plan.merge_units[ctx.block_idx::ctx.block_num]:
        chunks = [(p0, min(p0 + pc, pe)) for p0 in range(pb, pe, pc)]
        for ci, (p0, p1) in enumerate(chunks):  # pass 1: g = max_p m_p
            load_ml(p0, p1 - p0)
            first = 1 if ci == 0 else 0
            if first:
                ctx.adds(gmax, ml, 0.0, rows)
                ctx.pipe_barrier(PIPE_V)
            if p1 - p0 > first:
                for r0, w in rch:  # dst repeat stride 0: the repeats accumulate in order
                    ctx.max(view(gmax, r0), view(gmax, r0), view(ml, first * 2 * rows + r0), w, p1 - p0 - first,
                            BinaryRepeatParams(1, 1, 1, 0, 0, 2 * rrep))
            if len(chunks) > 1:
                ctx.set_flag(E.V_MTE2, ML)
        ctx.pipe_barrier(PIPE_V)
        n_done = 0
        for ci, (p0, p1) in enumerate(chunks):  # pass 2: weights, Σ w·l and Σ w·o
            n = p1 - p0
            if len(chunks) > 1:
                load_ml(p0, n)
            for r0, w in rch:
                ctx.sub(view(wv, r0), view(ml, r0), view(gmax, r0), w, n,
                        BinaryRepeatParams(1, 1, 1, rrep, 2 * rrep, 0))
            ctx.pipe_barrier(PIPE_V)
            ctx.exp(wv, wv, n * rows)
            ctx.pipe_barrier(PIPE_V)
            for r0, w in rch:  # w·l into the (spent) m rows
                ctx.mul(view(ml, r0), view(wv, r0), view(ml, rows + r0), w, n,
                        BinaryRepeatParams(1, 1, 1, 2 * rrep, rrep, 2 * rrep))
            ctx.pipe_barrier(PIPE_V)
            first = 1 if ci == 0 else 0
            if first:
                ctx.adds(lsum, ml, 0.0, rows)
                ctx.pipe_barrier(PIPE_V)
            if n > first:
                for r0, w in rch:
                    ctx.add(view(lsum, r0), view(lsum, r0), view(ml, first * 2 * rows + r0), w, n - first,
                            BinaryRepeatParams(1, 1, 1, 0, 0, 2 * rrep))
            for i in range(n):
                s = k % 2
                k += 1
                ctx.wait_flag(E.V_MTE2, s)
                ctx.data_copy(ob[s], view(o_part, ((p0 + i) * kv + d0) * rows), dw * rows)
                sync(ctx, E.MTE2_V, s)
                scale_rows(ob[s], view(wv, i * rows), dw)
                ctx.pipe_barrier(PIPE_V)
                if n_done == 0:
                    ctx.adds(acc, ob[s], 0.0, dw * rows)
                else:
                    ctx.add(acc, acc, ob[s], dw * rows)
                n_done += 1
                ctx.set_flag(E.V_MTE2, s)
            ctx.set_flag(E.V_MTE2, ML)
        ctx.pipe_barrier(PIPE_V)
        ctx.reciprocal(lsum, lsum, rows)
        ctx.pipe_barrier(PIPE_V)
        scale_rows(acc, lsum, dw)
        ctx.pipe_barrier(PIPE_V)
        ctx.wait_flag(E.MTE3_V, 0)
        ctx.cast(o16, acc, RoundMode.CAST_RINT, dw * rows)
        ctx.pipe_barrier(PIPE_V)
        ctx.gather(o16t, o16, offs, 0, m * dc)  # dims × rows → rows × dims (the m real rows)
        sync(ctx, E.V_MTE3, 0)
        ctx.data_copy(view(out, out_off), o16t, DataCopyParams(block_count=m, block_len=dw // 16,
                                                               src_stride=(dc - dw) // 16, dst_stride=(kv - dw) // 16))
        ctx.set_flag(E.MTE3_V, 0)
    for i in (0, 1, ML):
        ctx.wait_flag(E.V_MTE2, i)
    ctx.wait_flag(E.MTE3_V, 0)


# ------------------------------------------------------------------------------------------------------- host side


def mla_attention_decode_reference(q, c_kv, k_pe, lengths, scale) -> np.ndarray:
    """float64 golden. q [B, s_q, h_q, kv + pe]; c_kv / k_pe: per-sequence arrays [≥ L_b, kv] / [≥ L_b, pe] (a list,
    or one [B, L_max, ·] array); lengths [B]. Query token j of sequence b sees positions < L_b − s_q + 1 + j.
    Returns o [B, s_q, h_q, kv] in float64."""
    q = np.asarray(q).astype(np.float64)
    B, s_q, h_q, kd = q.shape
    kv = np.asarray(c_kv[0]).shape[-1]
    out = np.zeros((B, s_q, h_q, kv))
    for b in range(B):
        L = int(lengths[b])
        ckv = np.asarray(c_kv[b])[:L].astype(np.float64)
        kpe = np.asarray(k_pe[b])[:L].astype(np.float64)
        if ckv.shape[-1] + kpe.shape[-1] != kd:
            raise ValueError(f"reference: q has {kd} dims but c_kv + k_pe have {ckv.shape[-1] + kpe.shape[-1]}")
        kmat = np.concatenate([ckv, kpe], axis=1)
        s = scale * np.einsum("jhd,td->jht", q[b], kmat)
        pos = np.arange(L)
        for j in range(s_q):
            s[j][:, pos >= L - s_q + 1 + j] = -np.inf
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        out[b] = np.einsum("jht,td->jhd", p, ckv)
    return out


def _can_implement(cache: MLACache) -> str | None:
    if cache.block_size > MAX_BLOCK:
        return f"block_size {cache.block_size} > {MAX_BLOCK} (an S tile of 128 rows × block_size must fit an L0C slot)"
    return None


def mla_attention_decode(die, q, cache: MLACache, seq_ids, *, softmax_scale: float | None = None,
                         num_splits: int | None = None, tiling: MLATiling | None = None):
    """FlashMLA-style decode attention of `q` [B, s_q, h_q, kv_dim + pe_dim] (bf16, numpy or a GlobalTensor of
    `die`, a phantom on a timing-only die) over `cache` for the sequences `seq_ids` (B ids, lengths ≥ s_q).

    softmax_scale: default (kv_dim + pe_dim)^−½ (FlashMLA's default; DeepSeek-V3 passes
    qk_head_dim^−½ · mscale² = 0.1352338). num_splits: KV splits per (sequence, row tile); None fills the die's 24
    AIC. Returns o [B, s_q, h_q, kv_dim] bf16: a numpy array if q is one and the die is functional, else a
    GlobalTensor. Two launches (attention, merge): wrap the call in `with die.recording() as rec` for both reports.
    """
    if not isinstance(cache, MLACache):
        raise TypeError(f"mla_attention_decode: cache must be an MLACache, got {type(cache).__name__}")
    if cache.die is not die:
        raise ValueError("mla_attention_decode: the cache lives in another die's GM")
    why = _can_implement(cache)
    if why:
        raise ValueError(f"mla_attention_decode: {why}")
    if isinstance(q, GlobalTensor):
        if q.gm is not die.gm:
            raise ValueError("mla_attention_decode: q is a GlobalTensor of another die's GM")
    elif isinstance(q, np.ndarray):
        pass
    else:
        raise TypeError(f"mla_attention_decode: q must be a numpy array or a GlobalTensor, got {type(q).__name__}")
    kd = cache.kv_dim + cache.pe_dim
    if len(q.shape) != 4 or q.shape[3] != kd:
        raise ValueError(f"mla_attention_decode: q must be [B, s_q, h_q, {kd}], got shape {tuple(q.shape)}")
    if dtype_name(as_dtype(q.dtype)) != "bfloat16":
        raise TypeError(f"mla_attention_decode: q is {q.dtype}; it must be bfloat16")
    B, s_q, h_q, _ = (int(x) for x in q.shape)
    if not 1 <= s_q <= MAX_SQ:
        raise ValueError(f"mla_attention_decode: s_q = {s_q}; 1 or 2 (MTP) query tokens per sequence")
    if not 1 <= h_q <= MAX_HQ:
        raise ValueError(f"mla_attention_decode: h_q = {h_q} must be in 1..{MAX_HQ}")
    ids = list(np.atleast_1d(np.asarray(seq_ids, dtype=object)))
    if len(ids) != B or B < 1:
        raise ValueError(f"mla_attention_decode: {len(ids)} sequence ids for a batch of {B}")
    lengths = [cache.length(s) for s in ids]
    for s, L in zip(ids, lengths):
        if L < s_q:
            raise ValueError(f"mla_attention_decode: sequence {s} holds {L} tokens; with s_q = {s_q} it needs ≥ {s_q} "
                             f"(the query tokens' own latents are in the cache)")
    if softmax_scale is None:
        softmax_scale = kd ** -0.5
    if not (isinstance(softmax_scale, (float, int, np.floating)) and math.isfinite(softmax_scale)
            and softmax_scale > 0):
        raise ValueError(f"mla_attention_decode: softmax_scale must be a positive finite number, got {softmax_scale!r}")
    plan = plan_decode(die.spec, (B, s_q, h_q, kd), cache.kv_dim, cache.pe_dim, cache.block_size, lengths,
                       [cache.block_table(s) for s in ids], scale=float(softmax_scale), num_splits=num_splits,
                       tiling=tiling)
    n_groups = len(plan.groups)
    r_idx, d_idx = np.meshgrid(np.arange(plan.rows), np.arange(plan.merge_cols), indexing="ij")
    with Staging(die, "mla_attention_decode") as st:
        gq = st.put(q, "q")
        s_ws = st.workspace((n_groups * 2 * plan.rows * plan.tile,), F32)  # S tiles
        p_ws = st.workspace((n_groups * 2 * plan.rows * plan.tile,), BF16)  # P tiles
        o_part = st.workspace((plan.n_partials * cache.kv_dim * plan.rows,), F32)  # partial oᵀ (dims × rows)
        ml_ws = st.workspace((plan.n_partials * 2 * plan.rows,), F32)  # partial (max, sum)
        offsets = st.put(((d_idx * plan.rows + r_idx) * 2).astype(np.uint32).reshape(-1), "merge offsets")
        out = st.output((B, s_q, h_q, cache.kv_dim), BF16)
        die.launch(mla_decode_kernel, block_dim=n_groups,  # (a failure here: `with` frees everything)
                   args=(gq.flatten(), cache.c_kv.flatten(), cache.k_pe.flatten(), s_ws, p_ws, o_part, ml_ws, plan))
        (o,) = st.launch(mla_decode_merge_kernel, min(die.spec.aiv_per_die, len(plan.merge_units)),
                         (o_part, ml_ws, out.flatten(), offsets, plan))
    return o
