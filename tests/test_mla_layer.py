"""The MLA sublayer on the die: mla_prolog (ops/mla/prolog.py), mla_prefill and mla_decode (ops/mla/layer.py).

Golden: `mla_forward_reference` (naive form, act_dtype bfloat16; ops/mla/reference.py), written from the math
independently of the kernels, and `mla_prolog_reference` for the prolog alone.

Tolerances (stated, with the reason):
* the cache written on the device equals the reference latents after bf16 rounding **exactly** when the
  projections are bf16 (the GEMMs accumulate exactly-formed bf16 products in fp32 and round once, as the reference
  rounds its float64 result once; RMSNorm follows HF's order; RoPE is fp32 then one rounding: a 1-ulp flip is
  possible in principle, so the prolog comparisons allow 1 bf16 ulp of the value);
* the sublayer output, bf16 projections: attention rounds P and o to bf16 (decode also q_lat and o_lat) where the
  reference keeps float64, so values move by a few 2⁻⁹ relative steps and o_proj sums them over h·v terms:
  we check max|out − ref| ≤ 2⁻⁵·max|ref| and ‖out − ref‖ ≤ 2⁻⁶·‖ref‖ — an error of structure (a wrong position,
  head, token or mask) moves outputs by O(max|ref|) and fails both;
* INT8 projections (per-token activations × per-channel weights, ~2⁻⁸ relative per quantisation, four
  projections): max ≤ 2⁻³·max|ref| and ‖·‖ ≤ 2⁻⁴·‖ref‖.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu
from ascendemu.ops.mla import MLACache, MLAConfig, MLATiling, MLAWeights, mla_forward_reference, \
    mla_prolog_reference, random_state_dict
from ascendemu.ops.mla.cache import CacheFullError
from ascendemu.ops.mla.layer import (MLAStats, can_implement, mla_decode, mla_prefill, mla_prefill_kv_kernel,
                                     plan_prefill_kv)
from ascendemu.ops.mla.prolog import mla_prolog, rope_tables, swap_offsets
from ascendemu.ops.mla.rope import apply_rope_interleaved, rope_cos_sin

BF16 = np.dtype(ml_dtypes.bfloat16)
F64 = np.float64


def make_config(hidden=64, heads=2, q_lora=32, kv=32, nope=16, rope=16, v=16, max_pos=512):
    return MLAConfig(hidden_size=hidden, num_heads=heads, q_lora_rank=q_lora, kv_lora_rank=kv, qk_nope_head_dim=nope,
                     qk_rope_head_dim=rope, v_head_dim=v, max_position_embeddings=max_pos)


@st.composite
def configs(draw):
    return make_config(hidden=draw(st.sampled_from([64, 128])), heads=draw(st.integers(1, 4)),
                       q_lora=draw(st.sampled_from([None, 32, 48])), kv=draw(st.sampled_from([32, 48, 64])),
                       nope=draw(st.sampled_from([16, 32])), v=draw(st.sampled_from([16, 32])))


def weights_of(cfg, seed=0, int8=False):
    return MLAWeights.from_hf(random_state_dict(cfg, seed=seed), 0, cfg, int8=int8)


def hidden_of(rng, t, cfg):
    return rng.standard_normal((t, cfg.hidden_size)).astype(BF16)


def check_out(out, ref, int8=False):
    assert out.dtype == BF16 and out.shape == ref.shape
    o = out.astype(F64)
    assert np.all(np.isfinite(o)), "non-finite output (poison reached the result?)"
    mx, fro = (2.0 ** -3, 2.0 ** -4) if int8 else (2.0 ** -5, 2.0 ** -6)
    err = np.abs(o - ref)
    assert err.max() <= mx * np.abs(ref).max(), f"max error {err.max()} > {mx} · {np.abs(ref).max()}"
    assert np.linalg.norm(o - ref) <= fro * np.linalg.norm(ref), \
        f"relative error {np.linalg.norm(o - ref) / np.linalg.norm(ref)} > {fro}"


def check_cache(cache, seq_id, ref_c, ref_k):
    """The cache the device wrote against the reference latents (bf16). c_kv: equal, or 1 bf16 ulp where the fp32
    Σx² (a different summation order from NumPy's) rounds the other way; k_pe: 1 ulp, plus fp32 RoPE's cancellation
    error (≤ 2⁻²¹ of the row's largest value) where x·cos − x'·sin nearly cancels."""
    c, k = cache.gather(seq_id)
    ref_c, ref_k = np.asarray(ref_c, F64), np.asarray(ref_k, F64)
    assert c.shape == ref_c.shape and k.shape == ref_k.shape
    within_ulp(c, ref_c)
    within_ulp(k, ref_k, floor=2.0 ** -21 * np.abs(ref_k).max(axis=1, keepdims=True))
    assert np.mean(c.astype(F64) == ref_c) > 0.99, "c_kv should be bit-exact almost everywhere"


def within_ulp(x, ref, floor=0.0):
    """|x − ref| ≤ 1 bf16 ulp of ref (2⁻⁷·|ref|, or the smallest normal's for tiny values) + floor."""
    x, ref = np.asarray(x, F64), np.asarray(ref, F64)
    ulp = np.maximum(np.abs(ref), 2.0 ** -126) * 2.0 ** -7 + floor
    assert np.all(np.abs(x - ref) <= ulp), f"worst {np.max(np.abs(x - ref) - ulp)} over 1 ulp"


# ------------------------------------------------------------------------------------------------- host pieces


def test_rope_tables_match_interleaved_rope():
    cfg = make_config(rope=16)
    pos = np.array([0, 3, 500])
    cs = rope_tables(cfg, pos)
    x = np.random.default_rng(1).standard_normal((3, 16))
    sw = swap_offsets(16) // 4
    got = x * cs[:, :16] + x[:, sw] * cs[:, 16:]
    cos, sin = rope_cos_sin(cfg, pos)
    np.testing.assert_allclose(got, apply_rope_interleaved(x, cos, sin), rtol=0, atol=2e-6)  # fp32 tables


# ---------------------------------------------------------------------------------------------------- prolog


@settings(max_examples=4)
@given(cfg=configs(), t=st.integers(1, 24), bs=st.sampled_from([16, 32]), start=st.integers(0, 200),
       seed=st.integers(0, 2 ** 16))
def test_prolog_matches_reference(cfg, t, bs, start, seed):
    """Both query forms and the cache write against mla_prolog_reference (positions start..start+t-1)."""
    rng = np.random.default_rng(seed)
    w = weights_of(cfg, seed)
    x = hidden_of(rng, t, cfg)
    pos = np.arange(start, start + t)
    q_nope, q_pe, c_kv, k_pe = mla_prolog_reference(x, w, pos, act_dtype=BF16)
    for absorb in (False, True):
        die = ascendemu.Die("910c")
        cache = MLACache(die, cfg, -(-(start + t) // bs) + 1, bs)
        cache.allocate([7], [start + t])
        slots = cache.slot_mapping(7, pos)
        gx = die.gm.from_numpy(x)
        out = mla_prolog(die, gx, w, cache, pos, slots, absorb=absorb)
        q = out.q.numpy().astype(F64)
        c, k = cache.gather(7)
        within_ulp(c[start:], c_kv)
        within_ulp(k[start:], k_pe, floor=2.0 ** -21 * np.abs(k_pe).max(axis=1, keepdims=True))
        d = cfg.qk_nope_head_dim
        if absorb:
            q_lat = np.einsum("thd,hdc->thc", q_nope, w.w_uk.astype(F64)).astype(BF16).astype(F64)
            within_ulp(q[..., : cfg.kv_lora_rank], q_lat)
            within_ulp(q[..., cfg.kv_lora_rank:], q_pe, floor=2.0 ** -21 * np.abs(q_pe).max(axis=-1, keepdims=True))
        else:
            within_ulp(q[..., :d], q_nope)
            within_ulp(q[..., d:], q_pe, floor=2.0 ** -21 * np.abs(q_pe).max(axis=-1, keepdims=True))


# --------------------------------------------------------------------------------------------------- prefill


@settings(max_examples=3)
@given(cfg=configs(), lens=st.lists(st.integers(1, 48), min_size=1, max_size=3), bs=st.sampled_from([16, 32, 64]),
       seed=st.integers(0, 2 ** 16))
def test_prefill_several_sequences(cfg, lens, bs, seed):
    rng = np.random.default_rng(seed)
    w = weights_of(cfg, seed)
    x = hidden_of(rng, sum(lens), cfg)
    ref, ref_cache = mla_forward_reference(x, w, seq_lens=lens, return_cache=True, act_dtype=BF16)
    die = ascendemu.Die("910c")
    cache = MLACache(die, cfg, sum(-(-n // bs) for n in lens) + 1, bs)
    ids = [40 + 3 * i for i in range(len(lens))]
    out, stats = mla_prefill(die, x, w, cache, ids, lens, return_stats=True)
    check_out(out, ref)
    for s, (c, k) in zip(ids, ref_cache):
        assert cache.length(s) == len(c)
        check_cache(cache, s, c, k)
    assert isinstance(stats, MLAStats) and stats.prolog_us > 0 and stats.attention_us > 0 and stats.o_proj_us > 0
    assert stats.total_us == pytest.approx(stats.prolog_us + stats.attention_us + stats.o_proj_us)


@settings(max_examples=3)
@given(cfg=configs(), n1=st.integers(1, 40), n2=st.integers(1, 40), bs=st.sampled_from([16, 32, 64]),
       seed=st.integers(0, 2 ** 16))
def test_chunked_prefill_equals_one_prefill(cfg, n1, n2, bs, seed):
    """Two chunks of one sequence (plus an unrelated sequence in the second launch) == one prefill of the whole."""
    rng = np.random.default_rng(seed)
    w = weights_of(cfg, seed)
    x = hidden_of(rng, n1 + n2, cfg)
    other = hidden_of(rng, 5, cfg)
    ref, ref_cache = mla_forward_reference(x, w, return_cache=True, act_dtype=BF16)
    ref_other = mla_forward_reference(other, w, act_dtype=BF16)
    die = ascendemu.Die("910c")
    cache = MLACache(die, cfg, -(-(n1 + n2) // bs) + 2, bs)
    out1 = mla_prefill(die, x[:n1], w, cache, [9], [n1])
    out2 = mla_prefill(die, np.concatenate([x[n1:], other]), w, cache, [9, 2], [n2, 5])
    check_out(np.concatenate([out1, out2[:n2]]), ref)
    check_out(out2[n2:], ref_other)
    check_cache(cache, 9, *ref_cache[0])


# ---------------------------------------------------------------------------------------------------- decode


@settings(max_examples=3)
@given(cfg=configs(), lens=st.lists(st.integers(1, 40), min_size=1, max_size=3), steps=st.integers(1, 2),
       tps=st.sampled_from([1, 2]), bs=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2 ** 16))
def test_decode_steps_equal_whole_prefill(cfg, lens, steps, tps, bs, seed):
    """Prefill, then `steps` decode steps of tps tokens (tps 2 = MTP): each step's rows equal the reference over the
    whole sequences, and the cache the device wrote equals the reference latents (bf16) exactly."""
    rng = np.random.default_rng(seed)
    w = weights_of(cfg, seed)
    ids = [5 + i for i in range(len(lens))]
    total = [n + steps * tps for n in lens]
    xs = [hidden_of(rng, n, cfg) for n in total]
    die = ascendemu.Die("910c")
    cache = MLACache(die, cfg, sum(-(-n // bs) for n in total) + 1, bs)
    mla_prefill(die, np.concatenate([x[:n] for x, n in zip(xs, lens)]), w, cache, ids, lens)
    got = [[] for _ in ids]
    for s in range(steps):
        rows = np.concatenate([x[n + s * tps: n + (s + 1) * tps] for x, n in zip(xs, lens)])
        out = mla_decode(die, rows, w, cache, ids, tps)
        for i in range(len(ids)):
            got[i].append(out[i * tps:(i + 1) * tps])
    for i, (x, n) in enumerate(zip(xs, lens)):
        ref, ref_cache = mla_forward_reference(x, w, return_cache=True, act_dtype=BF16)
        check_out(np.concatenate(got[i]), ref[n:])
        check_cache(cache, ids[i], *ref_cache[0])


def _decode_case(cfg, lens, seed, bs=16, die=None):
    rng = np.random.default_rng(seed)
    w = weights_of(cfg, seed)
    die = die or ascendemu.Die("910c")
    cache = MLACache(die, cfg, sum(-(-(n + 2) // bs) for n in lens) + 1, bs)
    past = []
    for i, n in enumerate(lens):
        _, pc = mla_forward_reference(hidden_of(rng, n, cfg), w, return_cache=True, act_dtype=BF16)
        cache.append(i, *pc[0])
        past.append(pc[0])
    return die, w, cache, past, rng


@settings(max_examples=3)
@given(cfg=configs(), lens=st.lists(st.integers(1, 200), min_size=1, max_size=3), tps=st.sampled_from([1, 2]),
       bs=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2 ** 16))
def test_decode_after_long_past(cfg, lens, tps, bs, seed):
    """Decode (and MTP) after pasts up to 200 tokens (written by the host's cache.append from the reference)."""
    die, w, cache, past, rng = _decode_case(cfg, lens, seed, bs=bs)
    ids = list(range(len(lens)))
    x = hidden_of(rng, len(lens) * tps, cfg)
    out = mla_decode(die, x, w, cache, ids, tokens_per_seq=tps)
    ref, ref_cache = mla_forward_reference(x, w, seq_lens=[tps] * len(lens), past=past, return_cache=True,
                                           act_dtype=BF16)
    check_out(out, ref)
    for s, (c, k) in zip(ids, ref_cache):
        check_cache(cache, s, c, k)


def test_mtp_decode_against_reference():
    cfg = make_config(heads=3, q_lora=None, kv=48, nope=32, v=32)
    die, w, cache, past, rng = _decode_case(cfg, [1, 37, 64], seed=3)
    x = hidden_of(rng, 6, cfg)
    out = mla_decode(die, x, w, cache, [0, 1, 2], tokens_per_seq=2)
    ref = mla_forward_reference(x, w, seq_lens=[2, 2, 2], past=past, act_dtype=BF16)
    check_out(out, ref)
    assert [cache.length(s) for s in (0, 1, 2)] == [3, 39, 66]


def test_decode_independent_of_attention_split():
    """mla_attention_decode's num_splits does not change the sublayer's output, bit for bit; another KV tile grid
    (tiling) changes only the fp32 summation order, so it stays within the tolerance."""
    cfg = make_config(heads=2)
    lens = [150, 70]
    outs = []
    for num_splits, tiling in ((1, None), (3, None), (None, MLATiling(tile_blocks=1, depth=1))):
        die, w, cache, past, rng = _decode_case(cfg, lens, seed=11)
        x = hidden_of(rng, 2, cfg)
        outs.append(mla_decode(die, x, w, cache, [0, 1], num_splits=num_splits, tiling=tiling))
    ref = mla_forward_reference(x, w, seq_lens=[1, 1], past=past, act_dtype=BF16)
    for o in outs:
        check_out(o, ref)
    np.testing.assert_array_equal(outs[1].view(np.uint16), outs[0].view(np.uint16))


# ------------------------------------------------------------------------------------------------------ INT8


@settings(max_examples=2)
@given(cfg=configs(), lens=st.lists(st.integers(1, 32), min_size=1, max_size=2), seed=st.integers(0, 2 ** 16))
def test_int8_projections(cfg, lens, seed):
    """Prefill then one decode step with the INT8 projections (auto: the weights carry them), looser tolerance."""
    rng = np.random.default_rng(seed)
    w = weights_of(cfg, seed, int8=True)
    ids = list(range(len(lens)))
    xs = [hidden_of(rng, n + 1, cfg) for n in lens]
    die = ascendemu.Die("910c")
    cache = MLACache(die, cfg, sum(-(-(n + 1) // 16) for n in lens) + 1, 16)
    out_p = mla_prefill(die, np.concatenate([x[:n] for x, n in zip(xs, lens)]), w, cache, ids, lens)
    out_d = mla_decode(die, np.concatenate([x[n:] for x, n in zip(xs, lens)]), w, cache, ids)
    start = 0
    for i, (x, n) in enumerate(zip(xs, lens)):
        ref = mla_forward_reference(x, w, act_dtype=BF16)
        check_out(out_p[start:start + n], ref[:n], int8=True)
        check_out(out_d[i:i + 1], ref[n:], int8=True)
        start += n
    # int8=False on the same weights runs the bf16 path: a different (closer) answer
    die2, w2, cache2, past, rng2 = _decode_case(cfg, [4], seed=seed)
    w8 = weights_of(cfg, seed, int8=True)
    x = hidden_of(rng2, 1, cfg)
    ref = mla_forward_reference(x, w8, seq_lens=[1], past=past, act_dtype=BF16)
    check_out(mla_decode(die2, x, w8, cache2, [0], int8=False), ref)


# ---------------------------------------------------------------------------------------------- timing-only


@pytest.mark.parametrize("int8", [False, True])
def test_timing_only_same_cycles(int8):
    """Phantom hidden states on a timing-only die, the cache `allocate`d: every launch of both sublayer calls
    takes the same cycles as the functional run."""
    cfg = make_config(heads=2, q_lora=32)
    w = weights_of(cfg, 1, int8=int8)
    cycles = []
    for functional in (True, False):
        die = ascendemu.Die("910c", functional=functional)
        cache = MLACache(die, cfg, 12, 32)
        cache.allocate([1], [40])
        x = np.zeros((50, cfg.hidden_size), BF16)
        hx = x if functional else die.gm.empty(x.shape, BF16)
        out, sp = mla_prefill(die, hx[:30], w, cache, [2, 1], [20, 10], return_stats=True)
        xd = x[:4] if functional else die.gm.empty((4, cfg.hidden_size), BF16)
        out_d, sd = mla_decode(die, xd, w, cache, [1, 2], 2, return_stats=True)
        assert isinstance(out_d, np.ndarray) == functional
        cycles.append([[r.cycles for r in s.reports[p]] for s in (sp, sd) for p in ("prolog", "attention", "o_proj")])
        assert cache.length(1) == 52 and cache.length(2) == 22
    assert cycles[0] == cycles[1]


# ------------------------------------------------------------------------------------------------------ errors


def test_errors():
    cfg = make_config()
    w = weights_of(cfg)
    die = ascendemu.Die("910c")
    cache = MLACache(die, cfg, 4, 16)
    x = np.zeros((3, cfg.hidden_size), BF16)
    cache.append(1, np.zeros((3, 32)), np.zeros((3, 16)))

    with pytest.raises(KeyError, match="sequence 8 is not in the cache"):
        mla_decode(die, x[:1], w, cache, [8])
    with pytest.raises(ValueError, match="tokens_per_seq = 3"):
        mla_decode(die, x, w, cache, [1], tokens_per_seq=3)
    with pytest.raises(ValueError, match="tokens_per_seq"):
        mla_decode(die, x[:1], w, cache, [1], tokens_per_seq=True)
    with pytest.raises(ValueError, match="hidden has 3 rows; 1 sequences × 2 tokens need 2"):
        mla_decode(die, x, w, cache, [1], tokens_per_seq=2)
    with pytest.raises(ValueError, match=r"seq_lens \[1, 1\] must be ≥ 1 each and sum to T = 3"):
        mla_prefill(die, x, w, cache, [2, 3], [1, 1])
    with pytest.raises(ValueError, match="must be ≥ 1 each"):
        mla_prefill(die, x, w, cache, [2, 3], [3, 0])
    with pytest.raises(ValueError, match="seq_lens must be 2 ints"):
        mla_prefill(die, x, w, cache, [2, 3], [3])
    with pytest.raises(ValueError, match=r"duplicate sequence ids \[2\]"):
        mla_prefill(die, x, w, cache, [2, 2], [1, 2])
    with pytest.raises(ValueError, match=r"duplicate sequence ids \[1\]"):
        mla_decode(die, x[:2], w, cache, [1, 1])
    with pytest.raises(TypeError, match="sequence ids are ints"):
        mla_decode(die, x[:1], w, cache, ["a"])
    with pytest.raises(TypeError, match="must be bfloat16"):
        mla_prefill(die, x.astype(np.float32), w, cache, [2], [3])
    with pytest.raises(ValueError, match=r"hidden must be \[T, 64\]"):
        mla_prefill(die, x[:, :32], w, cache, [2], [3])
    with pytest.raises(TypeError, match="hidden must be a numpy array or a GlobalTensor"):
        mla_prefill(die, x.tolist(), w, cache, [2], [3])
    with pytest.raises(TypeError, match="weights must be an MLAWeights"):
        mla_decode(die, x[:1], None, cache, [1])
    with pytest.raises(TypeError, match="cache must be an MLACache"):
        mla_decode(die, x[:1], w, None, [1])
    with pytest.raises(ValueError, match="another die's GM"):
        mla_decode(ascendemu.Die("910c"), x[:1], w, cache, [1])
    with pytest.raises(ValueError, match="int8=True but the weights have no INT8 variant"):
        mla_decode(die, x[:1], w, cache, [1], int8=True)
    with pytest.raises(TypeError, match="int8 must be None, True or False"):
        mla_decode(die, x[:1], w, cache, [1], int8="yes")
    other = MLACache(die, None, 4, 16, kv_dim=64, pe_dim=16, max_position=512)
    with pytest.raises(ValueError, match="the cache holds 64 \\+ 16 values per token"):
        mla_decode(die, x[:1], w, other, [1])
    other = MLACache(die, cfg, 4, 16, max_position=1024)
    with pytest.raises(ValueError, match="max_position 1024 differs"):
        mla_decode(die, x[:1], w, other, [1])
    g_other = ascendemu.Die("910c").gm.from_numpy(x)
    with pytest.raises(ValueError, match="hidden is a GlobalTensor of another die's GM"):
        mla_prefill(die, g_other, w, cache, [2], [3])
    assert cache.seq_ids == [1] and cache.length(1) == 3, "a refused call left the cache changed"

    # cache full: all or nothing, nothing changes
    with pytest.raises(CacheFullError, match="MLACache is full"):
        mla_prefill(die, np.zeros((60, cfg.hidden_size), BF16), w, cache, [2], [60])
    assert cache.seq_ids == [1] and cache.num_free_blocks == 3

    # past max_position_embeddings
    small = make_config(max_pos=20)
    ws = weights_of(small)
    c2 = MLACache(die, small, 4, 16)
    c2.append(0, np.zeros((19, 32)), np.zeros((19, 16)))
    mla_decode(die, x[:1], ws, c2, [0])
    with pytest.raises(ValueError, match="past max_position_embeddings = 20"):
        mla_decode(die, x[:1], ws, c2, [0])
    assert c2.length(0) == 20

    # unsupported shapes are refused before anything runs
    assert "multiple of 16" in can_implement(make_config(kv=40))
    assert "q_lora_rank = 40" in can_implement(make_config(q_lora=40))
    assert "> 64" in can_implement(make_config(rope=80))
    bad = make_config(nope=24)
    with pytest.raises(ValueError, match="qk_nope_head_dim = 24 must be a multiple of 16"):
        mla_prefill(die, x, weights_of(bad), MLACache(die, bad, 4, 16), [0], [3])


def test_failed_step_is_undone():
    """A failure after the reservation (here: attention refuses the cache's block size) rolls the cache back."""
    cfg = make_config()
    w = weights_of(cfg)
    die = ascendemu.Die("910c")
    cache = MLACache(die, cfg, 4, 256)
    cache.allocate([1], [5])
    before = die.gm.in_use
    with pytest.raises(ValueError, match="block_size"):
        mla_decode(die, np.zeros((1, 64), BF16), w, cache, [1])
    assert cache.length(1) == 5
    assert die.gm.in_use == before, "the failed step left GM allocated"
    # a failure inside a launch of the prefill's attention phase: the new sequence is dropped, GM freed
    real = die.launch

    def launch(kernel, *args, **kwargs):
        if kernel is mla_prefill_kv_kernel:
            raise RuntimeError("launch failed")
        return real(kernel, *args, **kwargs)

    die.launch = launch
    with pytest.raises(RuntimeError, match="launch failed"):
        mla_prefill(die, np.zeros((3, 64), BF16), w, cache, [2, 1], [2, 1])
    assert cache.seq_ids == [1] and cache.length(1) == 5 and die.gm.in_use == before


def test_shape_limits_of_the_kernels():
    """Configs beyond what the AIV kernels take are refused by can_implement (and mla_prolog, which also checks its
    hidden / positions / slots); the k/v builder splits a token's heads into chunks of ≤ 255 (one vector repeat
    per head) and covers every (token, head) once."""
    assert "kv_lora_rank = 4112 > 4096" in can_implement(make_config(kv=4112))
    assert "q_lora_rank = 4608 > 4096" in can_implement(make_config(q_lora=4608))
    cfg = make_config(kv=4112)
    die = ascendemu.Die("910c", functional=False)
    with pytest.raises(ValueError, match="mla_prolog: kv_lora_rank = 4112"):
        mla_prolog(die, die.gm.empty((1, 64), BF16), weights_of(cfg), None, [0], [0], absorb=False)
    w = weights_of(make_config())
    with pytest.raises(TypeError, match="mla_prolog: hidden must be a GlobalTensor of this die's GM, got ndarray"):
        mla_prolog(die, np.zeros((1, 64), BF16), w, None, [0], [0], absorb=False)
    with pytest.raises(ValueError, match=r"mla_prolog: positions \(2,\) and slots \(1,\) must have one entry per"):
        mla_prolog(die, die.gm.empty((2, 64), BF16), w, None, [0, 1], [0], absorb=False)
    plan = plan_prefill_kv(die.spec, 3, 300, 16, 16, 16)
    items = [it for core in plan.cores for it in core]
    assert all(hn <= 255 for _, _, _, hn in items)
    assert sorted((t, h0 + j) for t, g, h0, hn in items for j in range(hn)) == [(t, h) for t in range(3)
                                                                               for h in range(300)]

