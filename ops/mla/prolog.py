"""MLAProlog on the die: projections, RMSNorms, RoPE and the cache write (cloudmatrix-design.md §5; deepseek-v3.md §4).

`mla_prolog(die, hidden, weights, cache, positions, slots, *, absorb, int8)` turns normalised hidden states [T, hidden]
into the queries of attention and writes each new token's latent into the paged NZ cache, on the device. It is a
short sequence of launches (the projections reuse the GEMM kernels; the rest are the AIV kernels of this module):

    1  q_kv_a: a = hidden · [W_DQ; W_DKV; W_KR]ᵀ  [T, q_lora + C + R]   one GEMM (weights.q_kv_a_proj)
       (q_lora_rank None: q = hidden · W_Qᵀ and a = hidden · [W_DKV; W_KR]ᵀ, two GEMMs)
    2  `mla_kv_cache_kernel` (AIV, 48 cores, one token per loop): c_q = RMSNorm(a[:q_lora]) · q_a_layernorm → GM;
       c_kv = RMSNorm(a[q_lora:+C]) · kv_a_layernorm and k_pe = RoPE(a[q_lora+C:]) DataCopied into the token's
       NZ cache slots (a token's 32 B chunks are block_size·32 B apart: one strided DataCopy each)
    3  q_b:   q = c_q · W_UQRᵀ  [T, h, D + R]           GEMM
    4a prefill (absorb=False): `mla_q_rope_kernel` rotates q_pe in place in q
    4b decode  (absorb=True):  q_nope sliced out (`copy_cols_kernel`), q_lat = q_nope · W_UK per head [T, h, C]
       (batched GEMM), then `mla_q_rope_kernel` writes [q_lat | RoPE(q_pe)] [T, h, C + R], the query of
       `mla_attention_decode`.

So a prefill prolog is 4 launches and a decode prolog 6 (bf16; INT8 adds a quantize_per_token before each dense
GEMM). CANN fuses all of it into one MLAProlog kernel; the parts left as separate launches are the
GEMMs (kernels of their own here) and the q_lat concatenation (CANN writes the GEMM output straight into the strided
query).

RoPE on the vector unit (interleaved pairs, rope.py): with cos/sin per token expanded to the rotary dim on the
host (cs[t] = [cos θ₀, cos θ₀, cos θ₁, cos θ₁, … | −sin θ₀, sin θ₀, −sin θ₁, sin θ₁, …], fp32, a GM input like any
tiling data) and xs = x with each pair swapped (one Gather with the byte offsets 4·(i xor 1)):

    out = x · cs_cos + xs · cs_sin        (fp32, then one Cast to bf16, RINT)

Numerics: RMSNorm as ops/norm.py (HF's: normalise in fp32, round to bf16, × weight, round); RoPE in fp32 and
rounded once (the reference rotates in float64: at most one bf16 ulp apart).

Also here: `mla_kv_gather_kernel` (the cache back to ND for prefill's kv_b up-projection; CANN's PagedCacheLoad)
and `linear`, the projection helper (bf16 GEMM, or quantize_per_token + int8_gemm when the weights carry INT8).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import ascendemu
from ascendemu import (BinaryRepeatParams, DataCopyParams, GlobalTensor, HardEvent, RoundMode, UnaryRepeatParams)
from ascendemu.numerics import as_dtype
from ascendemu.ops.gemm import PackedWeight, batched_bf16_gemm, bf16_gemm, packed_heads
from ascendemu.ops.int8_gemm import int8_gemm
from ascendemu.ops.quant import quantize_per_token
from ascendemu.ops.rowwise import BLOCK, LANES, Staging, apply_rows, bar, calc_buffer

from .attention import sync
from .cache import MLACache
from .rope import rope_cos_sin
from .weights import MLAWeights

__all__ = ["mla_prolog", "PrologOutput", "linear", "batched_linear", "rope_tables", "swap_offsets",
           "mla_kv_cache_kernel", "mla_q_rope_kernel", "mla_kv_gather_kernel", "KVCachePlan", "QRopePlan",
           "GatherPlan", "can_implement", "split_items", "plan_kv_cache", "plan_q_rope", "plan_kv_gather",
           "gather_context"]

BF16, F32, U32 = as_dtype("bfloat16"), as_dtype("float32"), as_dtype("uint32")
FRAC = 16  # bf16 elements of a 32 B block (C0)
E = HardEvent


def split_items(n_items: int, n_cores: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of items, one per core (the first n_items % n_cores get one more)."""
    n = min(n_items, n_cores)
    base, extra = divmod(n_items, n) if n else (0, 0)
    out, s = [], 0
    for i in range(n):
        k = base + (i < extra)
        out.append((s, s + k))
        s += k
    return out


# ---------------------------------------------------------------------------------------------- what runs


def can_implement(c) -> str | None:
    """Why the kernels cannot run this config, or None."""
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "hidden_size"):
        if getattr(c, name) % FRAC:
            return f"{name} = {getattr(c, name)} must be a multiple of {FRAC} (32 B rows of bf16)"
    if c.q_lora_rank is not None and c.q_lora_rank % FRAC:
        return f"q_lora_rank = {c.q_lora_rank} must be a multiple of {FRAC}"
    for name in ("q_lora_rank", "kv_lora_rank"):
        if (getattr(c, name) or 0) > 64 * LANES:
            return (f"{name} = {getattr(c, name)} > {64 * LANES} (RMSNorm's Σx² is two WholeReduceSum levels of "
                    f"{LANES} lanes)")
    if c.qk_rope_head_dim > 64:
        return f"qk_rope_head_dim = {c.qk_rope_head_dim} > 64 (RoPE takes one 64-lane repeat per head)"
    return None


# ------------------------------------------------------------------------------------------- host data for RoPE


def rope_tables(config, positions) -> np.ndarray:
    """cs [T, 2R] fp32: per token, cos θ_i at 2i and 2i+1, then −sin θ_i at 2i and +sin θ_i at 2i+1 (see above)."""
    cos, sin = rope_cos_sin(config, positions)
    r = 2 * cos.shape[-1]
    cs = np.empty(cos.shape[:-1] + (2 * r,), np.float32)
    cs[..., 0:r:2] = cos
    cs[..., 1:r:2] = cos
    cs[..., r::2] = -sin
    cs[..., r + 1::2] = sin
    return cs


def swap_offsets(n: int) -> np.ndarray:
    """Gather byte offsets that swap each fp32 pair: 4·(i xor 1), i < n (uint32)."""
    return (4 * (np.arange(n) ^ 1)).astype(np.uint32)


def _rope(ctx, out, x, xs, cs, swap, r: int, rows: int) -> None:
    """out[row] = x[row]·cos + swap(x[row])·(±sin) for `rows` rows of r fp32 (contiguous), cs = [cos r | sin r]
    shared by every row (src1 repeat stride 0). r ≤ 64 (one repeat per row); out may be x."""
    ctx.gather(xs, x, swap, 0, rows * r)
    bar(ctx)
    rep = r // BLOCK
    p = BinaryRepeatParams(dst_rep_stride=rep, src0_rep_stride=rep, src1_rep_stride=0)
    ctx.mul(xs, xs, cs[r:], r, rows, p)
    ctx.mul(out, x, cs, r, rows, p)
    bar(ctx)
    ctx.add(out, out, xs, rows * r)
    bar(ctx)


# ------------------------------------------------------------------------------- 2: RMSNorm + RoPE + cache write


@dataclass(frozen=True)
class KVCachePlan:
    """Tiling of `mla_kv_cache_kernel`: per core, its tokens as (row of a, c_kv element offset, k_pe element offset)
    in the flat caches (block·block_size·dim + offset_in_block·16). q_dim: the c_q columns leading each row of a
    (the fused down-projection's output [T, q_lora + C + R]), 0 when a is kv_a's alone [T, C + R]."""

    q_dim: int
    kv_dim: int
    pe_dim: int
    block_size: int
    eps: float
    cores: tuple  # per core: tuple of (row, c_off, p_off)


def plan_kv_cache(spec, slots, q_dim: int, kv_dim: int, pe_dim: int, block_size: int, eps: float) -> KVCachePlan:
    slots = np.asarray(slots, np.int64)
    blk, off = slots // block_size, slots % block_size
    c_off = blk * block_size * kv_dim + off * FRAC
    p_off = blk * block_size * pe_dim + off * FRAC
    cores = tuple(tuple((t, int(c_off[t]), int(p_off[t])) for t in range(a, b))
                  for a, b in split_items(len(slots), spec.aiv_per_die))
    return KVCachePlan(q_dim, kv_dim, pe_dim, block_size, float(eps), cores)


class _RmsNorm:
    """RMSNorm of one row segment in UB, HF's order (ops/norm.py): v·rsqrt(Σv² / n + ε) → bf16 → × w → bf16.

    Σv² is two WholeReduceSum levels over the segment zero-padded to whole 64-lane repeats (n ≤ 4096)."""

    def __init__(self, ctx, pipe, n: int, eps: float):
        self.ctx, self.n, self.eps = ctx, n, eps
        self.n64 = -(-n // LANES) * LANES
        self.sq = calc_buffer(pipe, 4 * self.n64)
        self.part, self.stat = calc_buffer(pipe, 4 * LANES), calc_buffer(pipe, 4 * BLOCK)
        self.hbuf, self.rsb = calc_buffer(pipe, 4 * BLOCK), calc_buffer(pipe, 4 * LANES)
        self.wf, self.w16 = calc_buffer(pipe, 4 * n), calc_buffer(pipe, 2 * n, "bfloat16")

    def load_weight(self, w):
        """CopyIn of the norm weight (MTE2); `cast_weight` after the caller's MTE2 → V flag."""
        ctx, n = self.ctx, self.n
        ctx.data_copy(self.w16, w, n)
        ctx.duplicate(self.sq, 0.0, self.n64)  # the tail past n stays 0 for the reduction
        ctx.duplicate(self.hbuf, float(n), BLOCK)

    def cast_weight(self):
        self.ctx.cast(self.wf, self.w16, RoundMode.CAST_NONE, self.n)

    def __call__(self, v, out16):
        """out16[:n] = RMSNorm(v[:n]) (v fp32, clobbered)."""
        ctx, n = self.ctx, self.n
        ctx.mul(self.sq, v, v, n)
        bar(ctx)
        ctx.whole_reduce_sum(self.part, self.sq, LANES, self.n64 // LANES, 1, 1, 8)
        bar(ctx)
        ctx.whole_reduce_sum(self.stat, self.part, self.n64 // LANES, 1, 1, 1, 8)
        bar(ctx)
        ctx.div(self.stat, self.stat, self.hbuf, 1)
        bar(ctx)
        ctx.adds(self.stat, self.stat, self.eps, 1)
        bar(ctx)
        ctx.rsqrt(self.stat, self.stat, 1)
        bar(ctx)
        ctx.brcb(self.rsb, self.stat, 1)
        bar(ctx)
        apply_rows(ctx, ctx.mul, v, self.rsb, 1, n)
        ctx.cast(out16, v, RoundMode.CAST_RINT, n)
        bar(ctx)
        ctx.cast(v, out16, RoundMode.CAST_NONE, n)
        bar(ctx)
        ctx.mul(v, v, self.wf, n)
        bar(ctx)
        ctx.cast(out16, v, RoundMode.CAST_RINT, n)


@ascendemu.kernel("aiv")
def mla_kv_cache_kernel(ctx, a, q_norm_w, kv_norm_w, cs, swap, cq_out, c_kv, k_pe, plan: KVCachePlan):
    """Per token t of a [T, q_dim + C + R] bf16 (the down-projections' output): c_q = RMSNorm(a[t, :q_dim]) · q_norm_w
    → cq_out[t] (when q_dim > 0), c_kv = RMSNorm(a[t, q_dim:q_dim + C]) · kv_norm_w and k_pe = RoPE(a[t, q_dim + C:]),
    both DataCopied into the token's NZ cache slots. cs [T, 2R] fp32, swap [R] uint32; c_kv / k_pe the flat caches.
    CANN: MLAProlog's RmsNorm + KvRmsNormRopeCache (one token per loop)."""
    tokens = plan.cores[ctx.block_idx]
    qd, c, r, bs = plan.q_dim, plan.kv_dim, plan.pe_dim, plan.block_size
    width = qd + c + r
    pipe = ctx.tpipe()
    raw = calc_buffer(pipe, 2 * width, "bfloat16")
    out16 = calc_buffer(pipe, 2 * width, "bfloat16")
    v = calc_buffer(pipe, 4 * width)
    csb, xs = calc_buffer(pipe, 8 * r), calc_buffer(pipe, 4 * r)
    sw = calc_buffer(pipe, 4 * r, "uint32")
    kv_norm = _RmsNorm(ctx, pipe, c, plan.eps)
    q_norm = _RmsNorm(ctx, pipe, qd, plan.eps) if qd else None
    kv_norm.load_weight(kv_norm_w)
    if q_norm:
        q_norm.load_weight(q_norm_w)
    ctx.data_copy(sw, swap, r)
    sync(ctx, E.MTE2_V)
    kv_norm.cast_weight()
    if q_norm:
        q_norm.cast_weight()
    bar(ctx)
    a_flat = a.flatten()
    first = True
    for t, c_off, p_off in tokens:
        if not first:
            ctx.wait_flag(E.V_MTE2, 0)  # raw / csb free
        ctx.data_copy(raw, a_flat[t * width:], width)
        ctx.data_copy(csb, cs[t], 2 * r)
        sync(ctx, E.MTE2_V)
        ctx.cast(v, raw, RoundMode.CAST_NONE, width)
        bar(ctx)
        if not first:
            ctx.wait_flag(E.MTE3_V, 0)  # out16 free
        if q_norm:
            q_norm(v, out16)
        kv_norm(v[qd:], out16[qd:])
        _rope(ctx, v[qd + c:], v[qd + c:], xs, csb, sw, r, 1)
        ctx.cast(out16[qd + c:], v[qd + c:], RoundMode.CAST_RINT, r)
        ctx.set_flag(E.V_MTE2, 0)
        sync(ctx, E.V_MTE3)
        if q_norm:
            ctx.data_copy(cq_out[t], out16, qd)
        ctx.data_copy(c_kv[c_off:], out16[qd:], DataCopyParams(block_count=c // FRAC, block_len=1,
                                                               dst_stride=bs - 1))
        ctx.data_copy(k_pe[p_off:], out16[qd + c:], DataCopyParams(block_count=r // FRAC, block_len=1,
                                                                   dst_stride=bs - 1))
        ctx.set_flag(E.MTE3_V, 0)
        first = False
    if not first:
        ctx.wait_flag(E.V_MTE2, 0)
        ctx.wait_flag(E.MTE3_V, 0)


# ------------------------------------------------------------------------------------------------- 4: q RoPE


@dataclass(frozen=True)
class QRopePlan:
    """Tiling of `mla_q_rope_kernel`: per core, work items (token, first head, heads); `absorb` selects the
    output (in place in q [T, h, D + R], or [q_lat | q_pe] [T, h, C + R])."""

    heads: int
    nope: int
    pe: int
    lat: int  # C when absorb, else 0
    head_chunk: int
    cores: tuple  # per core: tuple of (token, h0, hn)


def plan_q_rope(spec, t: int, heads: int, nope: int, pe: int, lat: int) -> QRopePlan:
    per_head = 2 * (lat + pe) + 4 * pe * 4 + 2 * pe  # out row, x / xs / swap (fp32, u32), q_pe bf16
    hc = int(max(1, min(heads, 255, (spec.ub_bytes // 2) // per_head)))  # half the UB; ≤ 255 repeats
    items = [(tok, h0, min(hc, heads - h0)) for tok in range(t) for h0 in range(0, heads, hc)]
    cores = tuple(tuple(items[a:b]) for a, b in split_items(len(items), spec.aiv_per_die))
    return QRopePlan(heads, nope, pe, lat, hc, cores)


@ascendemu.kernel("aiv")
def mla_q_rope_kernel(ctx, q, q_lat, cs, swap, out, plan: QRopePlan):
    """RoPE of q_pe per (token, head chunk). q [T, h·(D + R)] bf16 flat. Prefill (q_lat None): q_pe rotated in place
    (out is q). Decode: out [T, h·(C + R)] = [q_lat | RoPE(q_pe)] per head, q_lat [T, h·C]: q_lat lands in the
    out rows by a strided DataCopy into UB, q_pe by a strided Cast, and one DataCopy writes the rows."""
    hd, d, r, lat, hc = plan.heads, plan.nope, plan.pe, plan.lat, plan.head_chunk
    qk, row = d + r, lat + r
    pipe = ctx.tpipe()
    x16 = calc_buffer(pipe, 2 * hc * r, "bfloat16")
    x, xs = calc_buffer(pipe, 4 * hc * r), calc_buffer(pipe, 4 * hc * r)
    sw = calc_buffer(pipe, 4 * hc * r, "uint32")
    csb = calc_buffer(pipe, 8 * r)
    o16 = calc_buffer(pipe, 2 * hc * row, "bfloat16") if lat else None
    ctx.data_copy(sw, swap, hc * r)
    q_flat, o_flat = q.flatten(), out.flatten()
    first = True
    for tok, h0, hn in plan.cores[ctx.block_idx]:
        if not first:
            ctx.wait_flag(E.V_MTE2, 0)
            ctx.wait_flag(E.MTE3_MTE2, 0)
        base = (tok * hd + h0) * qk
        ctx.data_copy(x16, q_flat[base + d:], DataCopyParams(block_count=hn, block_len=r // FRAC,
                                                             src_stride=d // FRAC))
        ctx.data_copy(csb, cs[tok], 2 * r)
        if lat:
            ctx.data_copy(o16, q_lat.flatten()[(tok * hd + h0) * lat:],
                          DataCopyParams(block_count=hn, block_len=lat // FRAC, dst_stride=r // FRAC))
        sync(ctx, E.MTE2_V)
        ctx.cast(x, x16, RoundMode.CAST_NONE, hn * r)
        bar(ctx)
        _rope(ctx, x, x, xs, csb, sw, r, hn)
        if lat:
            ctx.cast(o16[lat:], x, RoundMode.CAST_RINT, r, hn,
                     UnaryRepeatParams(dst_rep_stride=row // FRAC, src_rep_stride=r // BLOCK))
            ctx.set_flag(E.V_MTE2, 0)
            sync(ctx, E.V_MTE3)
            ctx.data_copy(o_flat[(tok * hd + h0) * row:], o16, hn * row)
        else:
            ctx.cast(x16, x, RoundMode.CAST_RINT, hn * r)
            ctx.set_flag(E.V_MTE2, 0)
            sync(ctx, E.V_MTE3)
            ctx.data_copy(o_flat[base + d:], x16, DataCopyParams(block_count=hn, block_len=r // FRAC,
                                                                 dst_stride=d // FRAC))
        ctx.set_flag(E.MTE3_MTE2, 0)
        first = False
    if not first:
        ctx.wait_flag(E.V_MTE2, 0)
        ctx.wait_flag(E.MTE3_MTE2, 0)


# ----------------------------------------------------------------------------------- the cache back to ND (prefill)


@dataclass(frozen=True)
class GatherPlan:
    kv_dim: int
    pe_dim: int
    block_size: int
    chunk: int  # tokens per DataCopy pair (a run of consecutive slots in one block)
    cores: tuple  # per core: tuple of (out row, c_off, p_off, n tokens)


def plan_kv_gather(spec, slots, kv_dim: int, pe_dim: int, block_size: int) -> GatherPlan:
    """Runs of consecutive slots inside one cache block, cut at `chunk` tokens (UB room), spread over the AIVs."""
    chunk = int(max(FRAC, min(block_size, (spec.ub_bytes // 3) // (2 * (kv_dim + pe_dim)) // FRAC * FRAC)))
    slots = np.asarray(slots, np.int64)
    runs, i = [], 0
    while i < len(slots):
        j = i + 1
        while j < len(slots) and j - i < chunk and slots[j] == slots[j - 1] + 1 and slots[j] % block_size:
            j += 1
        b, off = divmod(int(slots[i]), block_size)
        runs.append((i, b * block_size * kv_dim + off * FRAC, b * block_size * pe_dim + off * FRAC, j - i))
        i = j
    cores = tuple(tuple(runs[a:b]) for a, b in split_items(len(runs), spec.aiv_per_die))
    return GatherPlan(kv_dim, pe_dim, block_size, chunk, cores)


@ascendemu.kernel("aiv")
def mla_kv_gather_kernel(ctx, c_kv, k_pe, c_out, p_out, plan: GatherPlan):
    """NZ cache → ND rows (PagedCacheLoad): for a run of n tokens in one block, strip s of the run is n contiguous
    32 B chunks in GM; one DataCopy per strip puts them into n ND rows in UB (dst gap dim/16 − 1), one DataCopy
    writes the rows. c_out [L, C], p_out [L, R] bf16."""
    c, r, bs, ch = plan.kv_dim, plan.pe_dim, plan.block_size, plan.chunk
    pipe = ctx.tpipe()
    cu = calc_buffer(pipe, 2 * ch * c, "bfloat16")
    pu = calc_buffer(pipe, 2 * ch * r, "bfloat16")
    co, po = c_out.flatten(), p_out.flatten()
    first = True
    for row, c_off, p_off, n in plan.cores[ctx.block_idx]:
        if not first:
            ctx.wait_flag(E.MTE3_MTE2, 0)
        for src, dst, dim, off in ((c_kv, cu, c, c_off), (k_pe, pu, r, p_off)):
            for s in range(dim // FRAC):
                ctx.data_copy(dst[s * FRAC:], src[off + s * bs * FRAC:],
                              DataCopyParams(block_count=n, block_len=1, dst_stride=dim // FRAC - 1))
        sync(ctx, E.MTE2_MTE3)
        ctx.data_copy(co[row * c:], cu, n * c)
        ctx.data_copy(po[row * r:], pu, n * r)
        ctx.set_flag(E.MTE3_MTE2, 0)
        first = False
    if not first:
        ctx.wait_flag(E.MTE3_MTE2, 0)


def gather_context(die, cache: MLACache, slots) -> tuple[GlobalTensor, GlobalTensor]:
    """The cache entries at `slots` (in order) as ND GlobalTensors (c_kv [L, C], k_pe [L, R]), one AIV launch."""
    plan = plan_kv_gather(die.spec, slots, cache.kv_dim, cache.pe_dim, cache.block_size)
    with Staging(die, "gather_context") as st:
        c_kv, k_pe = st.put(cache.c_kv.flatten(), "cache.c_kv"), st.put(cache.k_pe.flatten(), "cache.k_pe")
        c_out = st.output((len(slots), cache.kv_dim), BF16)
        p_out = st.output((len(slots), cache.pe_dim), BF16)
        return st.launch(mla_kv_gather_kernel, len(plan.cores), (c_kv, k_pe, c_out, p_out, plan))


# --------------------------------------------------------------------------------------------------- projections


def _packed(weights: MLAWeights, name: str) -> PackedWeight:
    """The bf16 projection `name` as the GEMM's PackedWeight: weights.<name>_nz is already Nz of [N, K] (the bytes
    pack_weight would produce), so nothing is repacked."""
    n, k = getattr(weights, name).shape
    return PackedWeight(getattr(weights, name + "_nz"), n, k)


def linear(die, x: GlobalTensor, weights: MLAWeights, name: str, int8: bool) -> GlobalTensor:
    """A projection y = x · W_nameᵀ [M, N] bf16: bf16 GEMM, or (int8) quantize_per_token + int8_gemm with the
    weight's INT8 variant (cloudmatrix-design.md §6: per-token activation, per-channel weight scales)."""
    if int8:
        wq = weights.q_kv_a_proj_int8 if name == "q_kv_a_proj" else weights.int8[name]
        with Staging(die, "linear") as st:  # a_q, a_s freed when the GEMM is done (or failed)
            a_q, a_s = quantize_per_token(die, x)
            return int8_gemm(die, st.own(a_q), st.own(a_s), wq.packed, wq.scale)
    return bf16_gemm(die, x, _packed(weights, name))


def batched_linear(die, x: GlobalTensor, nz_stack: np.ndarray, n: int, k: int) -> GlobalTensor:
    """Per head: y[:, h] = x[:, h] · W_hᵀ for x [M, H, K] and the packed stack of H weights [N, K] (MLAWeights.w_uk_nz
    with (n, k) = (C, D), or w_uv_nz with (V, C)) → [M, H, N] bf16 (batched_bf16_gemm)."""
    return batched_bf16_gemm(die, x, packed_heads(nz_stack, n, k))


@dataclass(frozen=True)
class ColsPlan:
    """dst[:, dst_c0:dst_c0+n] = src[:, src_c0:src_c0+n] for 2-D bf16 tensors; per core: (first row, rows) chunks."""

    src_cols: int
    src_c0: int
    dst_cols: int
    dst_c0: int
    n: int
    chunk: int
    cores: tuple


@ascendemu.kernel("aiv")
def copy_cols_kernel(ctx, dst, src, plan: ColsPlan):
    """A column slice of rows, GM → UB (src gap) → GM (dst gap), a chunk of rows per DataCopy pair."""
    n = plan.n
    ub = calc_buffer(ctx.tpipe(), 2 * plan.chunk * n, "bfloat16")
    sf, df = src.flatten(), dst.flatten()
    first = True
    for r0, rn in plan.cores[ctx.block_idx]:
        if not first:
            ctx.wait_flag(E.MTE3_MTE2, 0)
        ctx.data_copy(ub, sf[r0 * plan.src_cols + plan.src_c0:],
                      DataCopyParams(block_count=rn, block_len=n // FRAC, src_stride=(plan.src_cols - n) // FRAC))
        sync(ctx, E.MTE2_MTE3)
        ctx.data_copy(df[r0 * plan.dst_cols + plan.dst_c0:], ub,
                      DataCopyParams(block_count=rn, block_len=n // FRAC, dst_stride=(plan.dst_cols - n) // FRAC))
        ctx.set_flag(E.MTE3_MTE2, 0)
        first = False
    if not first:
        ctx.wait_flag(E.MTE3_MTE2, 0)


def copy_cols(die, dst: GlobalTensor, src: GlobalTensor, src_c0: int, n: int, dst_c0: int = 0) -> None:
    """dst[:, dst_c0:dst_c0+n] = src[:, src_c0:src_c0+n] (2-D bf16 GlobalTensors, columns multiples of 16)."""
    rows = int(src.shape[0])
    chunk = int(max(1, min(4095, (die.spec.ub_bytes // 3) // (2 * n))))  # a third of the UB; u12 block count
    cores = []
    for a, b in split_items(rows, die.spec.aiv_per_die):
        cores.append(tuple((r, min(chunk, b - r)) for r in range(a, b, chunk)))
    plan = ColsPlan(int(src.shape[1]), src_c0, int(dst.shape[1]), dst_c0, n, chunk, tuple(cores))
    if cores:
        die.launch(copy_cols_kernel, len(cores), args=(dst, src, plan))


# ------------------------------------------------------------------------------------------------ mla_prolog


@dataclass
class PrologOutput:
    """What `mla_prolog` hands to attention. q: [T, h, D + R] (rotated, absorb=False) or [T, h, C + R] ([q_lat |
    q_pe], absorb=True), a GlobalTensor the caller frees; slots: the cache slots written (int32 [T]);
    positions: the tokens' positions (int64 [T])."""

    q: GlobalTensor
    slots: np.ndarray
    positions: np.ndarray


def mla_prolog(die, hidden, weights: MLAWeights, cache: MLACache, positions, slots, *, absorb: bool,
               int8: bool = False) -> PrologOutput:
    """MLAProlog of hidden [T, hidden_size] (a GlobalTensor of `die`, bf16) for tokens at `positions` [T] whose
    cache slots are `slots` [T] (already reserved in `cache`). Writes c_kv / k_pe into the cache; returns the
    queries (see PrologOutput). The sequence of launches is the module docstring's. Callers normally use
    mla_prefill / mla_decode, which reserve the slots."""
    c = weights.config
    why = can_implement(c)
    if why:
        raise ValueError(f"mla_prolog: {why}")
    if not isinstance(hidden, GlobalTensor) or hidden.gm is not die.gm:
        raise TypeError(f"mla_prolog: hidden must be a GlobalTensor of this die's GM, got {type(hidden).__name__}")
    t = int(hidden.shape[0])
    positions = np.asarray(positions, np.int64)
    if positions.shape != (t,) or np.shape(slots) != (t,):
        raise ValueError(f"mla_prolog: positions {positions.shape} and slots {np.shape(slots)} must have one entry "
                         f"per token of hidden ({t})")
    h, d, r, qd = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.q_lora_rank or 0
    qp = _q_plan(die, c, t, absorb)
    # one Staging for the whole prolog: the other ops' launches (linear, copy_cols) and the cache write run in the
    # block, and what the other ops return is `own`ed; the last launch (RoPE of q) hands back the queries, a
    # GlobalTensor (hidden is one): [T, h, C + R] (absorb), else the q projection itself, rotated in place
    with Staging(die, "mla_prolog") as st:
        hidden = st.put(hidden, "hidden")  # a GlobalTensor: the output stays one
        cs = st.put(rope_tables(c, positions), "cos/sin tables")
        sw = st.put(swap_offsets(max(r, qp.head_chunk * r)), "swap offsets")
        # 1-2: the down-projection (one GEMM over [W_DQ; W_DKV; W_KR]), the norms, RoPE of k_pe and the cache write
        if qd:
            a = st.own(linear(die, hidden, weights, "q_kv_a_proj", int8))
            cq = st.workspace((t, qd), BF16)
            q_norm_w = st.put(weights.q_a_layernorm, "q_a_layernorm")
        else:
            q = st.own(linear(die, hidden, weights, "q_proj", int8), output=not absorb)
            a = st.own(linear(die, hidden, weights, "kv_a_proj_with_mqa", int8))
            cq = q_norm_w = None
        plan = plan_kv_cache(die.spec, slots, qd, cache.kv_dim, cache.pe_dim, cache.block_size, c.rms_norm_eps)
        if plan.cores:
            die.launch(mla_kv_cache_kernel, block_dim=len(plan.cores),
                       args=(a, q_norm_w, st.put(weights.kv_a_layernorm, "kv_a_layernorm"), cs, sw, cq,
                             cache.c_kv.flatten(), cache.k_pe.flatten(), plan))
        # 3: the q up-projection
        if qd:
            q = st.own(linear(die, cq, weights, "q_b_proj", int8), output=not absorb)
        # 4: RoPE of q_pe (and q_lat = q_nope · W_UK, concatenated)
        q = q.reshape((t, h, d + r))
        if absorb:
            q_nope = st.workspace((t, h, d), BF16)  # q[:, :, :D], contiguous
            copy_cols(die, q_nope.reshape((t * h, d)), q.reshape((t * h, d + r)), 0, d)
            q_lat = st.own(batched_linear(die, q_nope, weights.w_uk_nz, c.kv_lora_rank, d))
            out = st.output((t, h, c.kv_lora_rank + r), BF16)
            (out,) = st.launch(mla_q_rope_kernel, len(qp.cores), (q, q_lat, cs, sw, out, qp))
        else:
            (q_2d,) = st.launch(mla_q_rope_kernel, len(qp.cores), (q, None, cs, sw, q, qp))
            out = q_2d.reshape((t, h, d + r))  # (the output `own`ed above is the projection's [T, h·(D + R)])
    return PrologOutput(out, np.asarray(slots, np.int32), positions)


def _q_plan(die, c, t, absorb):
    return plan_q_rope(die.spec, t, c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim,
                       c.kv_lora_rank if absorb else 0)
