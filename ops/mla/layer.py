"""The whole MLA attention sublayer on one die: `mla_prefill` and `mla_decode` (issue 5; deepseek-v3.md §4).

Both take the normalised hidden states [T, hidden_size] (what HF's ``DeepseekV3Attention`` receives), write the new
tokens' latents into the paged NZ cache on the device, and return the sublayer output [T, hidden_size] bf16 (after
o_proj). Three phases, each a short sequence of launches:

    prolog     `mla_prolog` (prolog.py): q_a / kv_a / q_b projections, RMSNorms, RoPE, the cache write
               (decode also: q_lat = q_nope·W_UK and [q_lat | q_pe])
    attention  prefill (naive form): the context's latents back from the cache (`gather_context`), kv_b_proj
               → k_nope / v, `mla_prefill_kv_kernel` builds k = [k_nope | k_pe broadcast over heads] and v, then
               `mla_attention_prefill` (causal, bottom-right aligned: chunked prefill continues a cached sequence)
               decode (absorbed form): `mla_attention_decode` over the cache, then o = o_lat·W_UVᵀ per head
    o_proj     out = o · W_Oᵀ

Projections are bf16 GEMMs, or with ``int8`` (default: when the weights carry the INT8 variant) the dense
projections q_a / q_b (q_proj) / kv_a / o_proj run as quantize_per_token + int8_gemm (cloudmatrix-design.md §6);
kv_b / W_UK / W_UV stay bf16, as in CANN.

Time split: ``return_stats=True`` returns ``(out, MLAStats)``; ``stats.prolog_us`` / ``attention_us`` /
``o_proj_us`` are the modelled times (sum of each phase's launch reports, which run one after another on stream 0)
and ``stats.reports[phase]`` the reports themselves, ``stats.host_s[phase]`` the host seconds.

The cache: prefill reserves blocks for new sequences (position 0) and grows existing ones (chunked prefill: the new
tokens continue at the cached length); decode needs every sequence in the cache. The reservation is all or nothing
(CacheFullError, position past max_position_embeddings) and is undone if a later step fails.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

import ascendemu
from ascendemu import DataCopyParams, GlobalTensor, HardEvent, UnaryRepeatParams
from ascendemu.ops.rowwise import Staging, calc_buffer

from .attention import mla_attention_decode, sync
from .attention_prefill import mla_attention_prefill
from .cache import MLACache
from .prolog import BF16, FRAC, batched_linear, can_implement, gather_context, linear, mla_prolog, split_items
from .weights import MLAWeights

__all__ = ["mla_prefill", "mla_decode", "MLAStats", "mla_prefill_kv_kernel", "PrefillKVPlan", "plan_prefill_kv",
           "can_implement"]  # can_implement: prolog.py's, re-exported

E = HardEvent
PHASES = ("prolog", "attention", "o_proj")


@dataclass
class MLAStats:
    """The launch reports of one sublayer call, by phase ("prolog", "attention", "o_proj")."""

    reports: dict = field(default_factory=lambda: {p: [] for p in PHASES})
    host_s: dict = field(default_factory=lambda: {p: 0.0 for p in PHASES})  # host seconds per phase

    @contextlib.contextmanager
    def phase(self, die, name: str):
        """Record the launches of one phase (die.recording) and its host time."""
        t0 = time.perf_counter()
        with die.recording() as rec:
            yield
        self.reports[name] = rec.reports
        self.host_s[name] = time.perf_counter() - t0

    def us(self, phase: str) -> float:
        return sum(r.time_us for r in self.reports[phase])

    @property
    def prolog_us(self) -> float:
        return self.us("prolog")

    @property
    def attention_us(self) -> float:
        return self.us("attention")

    @property
    def o_proj_us(self) -> float:
        return self.us("o_proj")

    @property
    def total_us(self) -> float:
        return sum(self.us(p) for p in PHASES)

    @property
    def launches(self) -> int:
        return sum(len(v) for v in self.reports.values())


# ------------------------------------------------------------------------------------ k / v of the naive form


@dataclass(frozen=True)
class PrefillKVPlan:
    """Tiling of `mla_prefill_kv_kernel`: per core, items (first token, tokens, first head, heads)."""

    heads: int
    nope: int
    pe: int
    v: int
    cores: tuple


def plan_prefill_kv(spec, tokens: int, heads: int, nope: int, pe: int, v: int) -> PrefillKVPlan:
    per_head = 2 * (nope + pe + v)
    room = spec.ub_bytes // 2  # k, v and p rows of one item in half the UB
    if heads * per_head <= room and heads <= 255:  # the k_pe broadcast: one vector repeat per head (≤ 255)
        g = int(max(1, min(room // (heads * per_head), 4095 // heads)))
        items = [(t, min(g, tokens - t), 0, heads) for t in range(0, tokens, g)]
    else:
        hc = int(max(1, min(255, room // per_head)))
        items = [(t, 1, h0, min(hc, heads - h0)) for t in range(tokens) for h0 in range(0, heads, hc)]
    cores = tuple(tuple(items[a:b]) for a, b in split_items(len(items), spec.aiv_per_die))
    return PrefillKVPlan(heads, nope, pe, v, cores)


@ascendemu.kernel("aiv")
def mla_prefill_kv_kernel(ctx, kv, p, k, v, plan: PrefillKVPlan):
    """k[t, h] = [kv[t, h, :D] | p[t]], v[t, h] = kv[t, h, D:] for kv [L, h·(D + V)] (kv_b_proj's output), p [L, R].

    k_nope and v reach UB by strided DataCopies straight into their row layouts (k rows leave an R gap); k_pe is
    broadcast over the heads by one vector copy per token (int16 Adds of 0, src repeat stride 0)."""
    hd, d, r, dv = plan.heads, plan.nope, plan.pe, plan.v
    qk = d + r
    items = plan.cores[ctx.block_idx]
    g_max = max((g * hn for _, g, _, hn in items), default=1)
    pipe = ctx.tpipe()
    ku = calc_buffer(pipe, 2 * g_max * qk, "bfloat16")
    vu = calc_buffer(pipe, 2 * g_max * dv, "bfloat16")
    pu = calc_buffer(pipe, 2 * max(g for _, g, _, _ in items) * r if items else 32, "bfloat16")
    k16, p16 = ku.reinterpret_cast("int16"), pu.reinterpret_cast("int16")
    kvf, kf, vf = kv.flatten(), k.flatten(), v.flatten()
    first = True
    for t0, g, h0, hn in items:
        if not first:
            ctx.wait_flag(E.MTE3_MTE2, 0)
            ctx.wait_flag(E.MTE3_V, 0)
        src = (t0 * hd + h0) * (d + dv)
        ctx.data_copy(ku, kvf[src:], DataCopyParams(block_count=g * hn, block_len=d // FRAC, src_stride=dv // FRAC,
                                                    dst_stride=r // FRAC))
        ctx.data_copy(vu, kvf[src + d:], DataCopyParams(block_count=g * hn, block_len=dv // FRAC,
                                                        src_stride=d // FRAC))
        ctx.data_copy(pu, p.flatten()[t0 * r:], g * r)
        sync(ctx, E.MTE2_V)
        for j in range(g):
            ctx.adds(k16[j * hn * qk + d:], p16[j * r:], 0, r, hn,
                     UnaryRepeatParams(dst_rep_stride=qk // FRAC, src_rep_stride=0))
        sync(ctx, E.V_MTE3)
        dst = (t0 * hd + h0)
        ctx.data_copy(kf[dst * qk:], ku, g * hn * qk)
        ctx.data_copy(vf[dst * dv:], vu, g * hn * dv)
        ctx.set_flag(E.MTE3_MTE2, 0)
        ctx.set_flag(E.MTE3_V, 0)
        first = False
    if not first:
        ctx.wait_flag(E.MTE3_MTE2, 0)
        ctx.wait_flag(E.MTE3_V, 0)


# ------------------------------------------------------------------------------------------------- arguments


def _check_common(fn, die, hidden, weights, cache, seq_ids, int8):
    if not isinstance(die, ascendemu.Die):
        raise TypeError(f"{fn}: die must be an ascendemu.Die, got {type(die).__name__}")
    if not isinstance(weights, MLAWeights):
        raise TypeError(f"{fn}: weights must be an MLAWeights, got {type(weights).__name__}")
    if not isinstance(cache, MLACache):
        raise TypeError(f"{fn}: cache must be an MLACache, got {type(cache).__name__}")
    if cache.die is not die:
        raise ValueError(f"{fn}: the cache lives in another die's GM")
    c = weights.config
    if (cache.kv_dim, cache.pe_dim) != (c.kv_lora_rank, c.qk_rope_head_dim):
        raise ValueError(f"{fn}: the cache holds {cache.kv_dim} + {cache.pe_dim} values per token; the config needs "
                         f"kv_lora_rank + qk_rope_head_dim = {c.kv_lora_rank} + {c.qk_rope_head_dim}")
    if cache.max_position != c.max_position_embeddings:
        raise ValueError(f"{fn}: cache.max_position {cache.max_position} differs from the config's "
                         f"max_position_embeddings {c.max_position_embeddings}")
    why = can_implement(c)
    if why:
        raise ValueError(f"{fn}: {why}")
    if not isinstance(hidden, (np.ndarray, GlobalTensor)):
        raise TypeError(f"{fn}: hidden must be a numpy array or a GlobalTensor, got {type(hidden).__name__}")
    if len(hidden.shape) != 2 or hidden.shape[1] != c.hidden_size:
        raise ValueError(f"{fn}: hidden must be [T, {c.hidden_size}], got shape {tuple(hidden.shape)}")
    if np.dtype(hidden.dtype) != BF16:
        raise TypeError(f"{fn}: hidden is {hidden.dtype}; it must be bfloat16")
    ids = list(np.atleast_1d(np.asarray(seq_ids, dtype=object)))
    for s in ids:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"{fn}: sequence ids are ints, got {s!r}")
    ids = [int(s) for s in ids]
    if len(set(ids)) != len(ids):
        dup = sorted({s for s in ids if ids.count(s) > 1})
        raise ValueError(f"{fn}: duplicate sequence ids {dup}")
    if int8 is None:
        int8 = weights.int8 is not None
    elif not isinstance(int8, (bool, np.bool_)):
        raise TypeError(f"{fn}: int8 must be None, True or False, got {int8!r}")
    elif int8 and weights.int8 is None:
        raise ValueError(f"{fn}: int8=True but the weights have no INT8 variant (MLAWeights.from_hf(..., int8=True))")
    return c, ids, bool(int8)


def _reserve(fn, cache: MLACache, ids, new_lengths):
    """Grow the sequences (all or nothing); returns the undo."""
    old = {s: (cache.length(s) if s in cache else None) for s in ids}
    cache.allocate(ids, np.asarray(new_lengths, np.int64))

    def undo():
        for s, L in old.items():
            if L is None:
                if s in cache:
                    cache.free(s)
            else:
                cache.allocate([s], [L])
    return undo


def _sublayer(fn, die, hidden, weights, cache, ids, past, new_lens, int8, absorb, attend):
    """What mla_prefill and mla_decode share: reserve the new tokens' cache slots, stage hidden, then the three
    phases (prolog; `attend(q, st)` → o [T, h, v_head_dim], which hands what it allocates to the Staging `st`;
    o_proj), each recorded in an MLAStats. On failure the reservation is undone and everything allocated here is
    freed. Returns (out, stats): out numpy if hidden is numpy and the die functional, else the GlobalTensor."""
    c = weights.config
    t = sum(new_lens)
    undo = _reserve(fn, cache, ids, [p + n for p, n in zip(past, new_lens)])
    stats = MLAStats()
    try:
        with Staging(die, fn) as st:
            gx = st.put(hidden, "hidden")
            positions = np.concatenate([np.arange(p, p + n) for p, n in zip(past, new_lens)])
            slots = np.concatenate([cache.slot_mapping(s, np.arange(p, p + n))
                                    for s, p, n in zip(ids, past, new_lens)])
            with stats.phase(die, "prolog"):
                q = st.own(mla_prolog(die, gx, weights, cache, positions, slots, absorb=absorb, int8=int8).q)
            with stats.phase(die, "attention"):
                o = attend(q, st)
            with stats.phase(die, "o_proj"):
                st.own(linear(die, o.reshape((t, c.num_heads * c.v_head_dim)), weights, "o_proj", int8), output=True)
            (out,) = st.result()
    except BaseException:
        undo()
        raise
    return out, stats


# -------------------------------------------------------------------------------------------------- prefill


def mla_prefill(die, hidden, weights: MLAWeights, cache: MLACache, seq_ids, seq_lens, *, int8: bool | None = None,
                return_stats: bool = False):
    """The attention sublayer on packed sequences: hidden [T, hidden_size] bf16 (numpy, or a GlobalTensor of `die`,
    a phantom on a timing-only die), sequence i = the next seq_lens[i] rows. A seq id not in the cache starts at
    position 0; one in the cache continues at its length (chunked prefill). Appends the tokens' latents to the
    cache and returns out [T, hidden_size] bf16 (numpy if hidden is numpy and the die functional, else a
    GlobalTensor); with return_stats, (out, MLAStats). See the module docstring."""
    fn = "mla_prefill"
    c, ids, int8 = _check_common(fn, die, hidden, weights, cache, seq_ids, int8)
    lens = np.atleast_1d(np.asarray(seq_lens))
    if lens.dtype.kind not in "iu" or lens.ndim != 1 or len(lens) != len(ids):
        raise ValueError(f"{fn}: seq_lens must be {len(ids)} ints (one per sequence id), got {seq_lens!r}")
    lens = [int(n) for n in lens]
    t = int(hidden.shape[0])
    if any(n < 1 for n in lens) or sum(lens) != t:
        raise ValueError(f"{fn}: seq_lens {lens} must be ≥ 1 each and sum to T = {t} (the rows of hidden)")
    past = [cache.length(s) if s in cache else 0 for s in ids]
    h, d, r, dv = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    kv_lens = [p + n for p, n in zip(past, lens)]

    def attend(q, st):  # the naive form over each sequence's whole context (past + new)
        ctx_slots = np.concatenate([cache.slot_mapping(s, np.arange(L)) for s, L in zip(ids, kv_lens)])
        c_ctx, p_ctx = gather_context(die, cache, ctx_slots)
        st.own(c_ctx)
        st.own(p_ctx)
        kv = st.own(linear(die, c_ctx, weights, "kv_b_proj", False))
        lk = len(ctx_slots)
        k = st.workspace((lk, h, d + r), BF16)
        v = st.workspace((lk, h, dv), BF16)
        plan = plan_prefill_kv(die.spec, lk, h, d, r, dv)
        die.launch(mla_prefill_kv_kernel, block_dim=len(plan.cores), args=(kv, p_ctx, k, v, plan))
        return st.own(mla_attention_prefill(die, q, k, v, lens, kv_lens, softmax_scale=c.softmax_scale))

    out, stats = _sublayer(fn, die, hidden, weights, cache, ids, past, lens, int8, False, attend)
    return (out, stats) if return_stats else out


# --------------------------------------------------------------------------------------------------- decode


def mla_decode(die, hidden, weights: MLAWeights, cache: MLACache, seq_ids, tokens_per_seq: int = 1, *,
               int8: bool | None = None, num_splits: int | None = None, tiling=None, return_stats: bool = False):
    """One decode step: hidden [B·tokens_per_seq, hidden_size] bf16, rows ordered (sequence, token); every sequence
    must be in the cache. Appends the tokens (tokens_per_seq 1, or 2 for MTP), runs the absorbed attention
    (`mla_attention_decode`, with `num_splits` / `tiling` passed through) and returns out [B·tokens_per_seq,
    hidden_size] bf16; with return_stats, (out, MLAStats). See the module docstring."""
    fn = "mla_decode"
    c, ids, int8 = _check_common(fn, die, hidden, weights, cache, seq_ids, int8)
    if isinstance(tokens_per_seq, (bool, np.bool_)) or tokens_per_seq not in (1, 2):
        raise ValueError(f"{fn}: tokens_per_seq = {tokens_per_seq!r}; 1, or 2 with MTP")
    b = len(ids)
    if b < 1 or int(hidden.shape[0]) != b * tokens_per_seq:
        raise ValueError(f"{fn}: hidden has {int(hidden.shape[0])} rows; {b} sequences × {tokens_per_seq} "
                         f"tokens need {b * tokens_per_seq}")
    for s in ids:
        if s not in cache:
            raise KeyError(f"{fn}: sequence {s} is not in the cache (prefill it first)")
    past = [cache.length(s) for s in ids]
    h, C, dv = c.num_heads, c.kv_lora_rank, c.v_head_dim
    t = b * tokens_per_seq

    def attend(q, st):  # the absorbed form over the cache, then o = o_lat · W_UVᵀ per head
        o_lat = st.own(mla_attention_decode(die, q.reshape((b, tokens_per_seq, h, C + c.qk_rope_head_dim)), cache,
                                            ids, softmax_scale=c.softmax_scale, num_splits=num_splits, tiling=tiling))
        return st.own(batched_linear(die, o_lat.reshape((t, h, C)), weights.w_uv_nz, dv, C))

    out, stats = _sublayer(fn, die, hidden, weights, cache, ids, past, [tokens_per_seq] * b, int8, True, attend)
    return (out, stats) if return_stats else out
