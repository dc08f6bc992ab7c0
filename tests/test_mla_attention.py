"""The paged NZ latent cache (ops/mla/cache.py) and FlashMLA-style decode attention (ops/mla/attention.py).

Golden: `mla_attention_decode_reference`, float64 on the bf16 inputs. Tolerance (stated bound): the kernel rounds
twice to bf16 — P = exp(s − m) before P·V, and o at the end — and everything else is fp32 (scores, softmax
statistics, accumulation, merge). Rounding P moves o by a weighted mean of relative errors ≤ 2⁻⁹ of the values,
so by ≤ 2⁻⁹·max|c_kv|; rounding o adds ≤ 2⁻⁹·|o|; the fp32 parts add ~2⁻²⁰ relative. We check
|o − golden| ≤ 2⁻⁸·|golden| + 2⁻⁸·max|c_kv| (each term twice its bound: the row sum of the softmax is taken from
the fp32 p, not from the rounded P, which adds another ≤ 2⁻⁹·|o|).

Splits fall on tile boundaries and the merge adds the tile partials in token order, so outputs for different
`num_splits` are bit-identical, and the test asserts exactly that (a stronger form of "independent within fp32
accumulation tolerance").
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu
from ascendemu.layouts import kv_nz_offset
from ascendemu.ops.mla import CacheFullError, MLACache, MLATiling, mla_attention_decode, \
    mla_attention_decode_reference
from ascendemu.ops.mla.attention import plan_decode

BF16 = np.dtype(ml_dtypes.bfloat16)
KV, PE = 512, 64


def make_case(seed, batch, s_q, h_q, lengths, block_size, kv=KV, pe=PE, die=None, num_blocks=None):
    rng = np.random.default_rng(seed)
    die = die or ascendemu.Die("910c")
    need = sum(-(-L // block_size) for L in lengths)
    cache = MLACache(die, None, num_blocks or need + 2, block_size, kv_dim=kv, pe_dim=pe)
    ids = [1000 + 7 * b for b in range(batch)]  # ids the caller chooses, not 0..B-1
    ckv, kpe = [], []
    for sid, L in zip(ids, lengths):
        c = rng.standard_normal((L, kv)).astype(BF16)
        k = rng.standard_normal((L, pe)).astype(BF16)
        cache.append(sid, c, k)
        ckv.append(c)
        kpe.append(k)
    q = (rng.standard_normal((batch, s_q, h_q, kv + pe)) * 0.5).astype(BF16)
    return die, cache, ids, q, ckv, kpe


def check_close(o, ref, ckv):
    assert o.dtype == BF16 and o.shape == ref.shape
    o64 = o.astype(np.float64)
    assert np.all(np.isfinite(o64)), "non-finite output (poison or a masked row reached the result?)"
    vmax = max(float(np.abs(c.astype(np.float64)).max()) for c in ckv)
    bound = 2.0 ** -8 * np.abs(ref) + 2.0 ** -8 * vmax
    err = np.abs(o64 - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"o{worst}: |{o64[worst]} − {ref[worst]}| = {err[worst]} > {bound[worst]}"


@st.composite
def decode_cases(draw):
    batch = draw(st.integers(1, 3))
    s_q = draw(st.integers(1, 2))
    h_q = draw(st.integers(1, 16))
    lengths = draw(st.lists(st.integers(s_q, 300), min_size=batch, max_size=batch))
    block_size = draw(st.sampled_from([16, 32, 64, 128]))
    return batch, s_q, h_q, lengths, block_size


@settings(deadline=None)
@given(case=decode_cases(), num_splits=st.sampled_from([None, 1, 2, 3, 4]), seed=st.integers(0, 2**32 - 1))
def test_decode_matches_golden(case, num_splits, seed):
    batch, s_q, h_q, lengths, bs = case
    die, cache, ids, q, ckv, kpe = make_case(seed, batch, s_q, h_q, lengths, bs)
    scale = 0.1352338  # DeepSeek-V3's qk_head_dim^-½ · mscale²
    o = mla_attention_decode(die, q, cache, ids, softmax_scale=scale, num_splits=num_splits)
    check_close(o, mla_attention_decode_reference(q, ckv, kpe, lengths, scale), ckv)


@settings(deadline=None, max_examples=10)
@given(case=decode_cases(), seed=st.integers(0, 2**32 - 1))
def test_output_is_independent_of_the_split(case, seed):
    batch, s_q, h_q, lengths, bs = case
    die, cache, ids, q, ckv, kpe = make_case(seed, batch, s_q, h_q, lengths, bs)
    tiling = MLATiling(tile_blocks=1)  # the most tiles, so the splits really differ
    ref = mla_attention_decode_reference(q, ckv, kpe, lengths, (KV + PE) ** -0.5)
    outs = {s: mla_attention_decode(die, q, cache, ids, num_splits=s, tiling=tiling) for s in (1, 2, 3, 4, None)}
    for s, o in outs.items():
        check_close(o, ref, ckv)
        np.testing.assert_array_equal(o.view(np.uint16), outs[1].view(np.uint16), err_msg=f"num_splits={s}")


@pytest.mark.parametrize("tiling", [MLATiling(1, 1), MLATiling(1, 2), MLATiling(2, 1), MLATiling(3, 2),
                                    MLATiling(5, None)])
def test_tilings(tiling):
    lengths = [200, 33, 130]
    die, cache, ids, q, ckv, kpe = make_case(11, 3, 2, 6, lengths, 32)
    o = mla_attention_decode(die, q, cache, ids, tiling=tiling, num_splits=2)
    check_close(o, mla_attention_decode_reference(q, ckv, kpe, lengths, (KV + PE) ** -0.5), ckv)


def test_small_dims_and_a_large_row_tile():
    """Other latent widths (kv 48, pe 16: chunks shorter than 128) and h_q = 128 with MTP: two row tiles of 128."""
    lengths = [70]
    die, cache, ids, q, ckv, kpe = make_case(5, 1, 1, 9, lengths, 16, kv=48, pe=16)
    o = mla_attention_decode(die, q, cache, ids, softmax_scale=0.125)
    check_close(o, mla_attention_decode_reference(q, ckv, kpe, lengths, 0.125), ckv)
    lengths = [129, 64]
    die, cache, ids, q, ckv, kpe = make_case(6, 2, 2, 128, lengths, 64)
    o = mla_attention_decode(die, q, cache, ids)
    check_close(o, mla_attention_decode_reference(q, ckv, kpe, lengths, (KV + PE) ** -0.5), ckv)


@pytest.mark.parametrize("h_q, length, block_size, tile_blocks", [
    (4, 2, 16, 1),      # the shortest MTP sequence: query token 0 sees only position 0
    (4, 17, 16, 1),     # a tile holding only the last position: query token 0 sees none of it
    (72, 65, 32, 2),    # 144 rows: two row tiles of 80 and 64, the first mixing both query tokens
    (100, 257, 128, 2),  # two row tiles, one per query token; the last tile is invisible to the first
])
def test_mtp_causal_masking(h_q, length, block_size, tile_blocks):
    """With s_q = 2, query token 0 must not see the last cached position (its successor's own latent)."""
    die, cache, ids, q, ckv, kpe = make_case(3, 1, 2, h_q, [length], block_size)
    # a loud last position: query token 0's heads all carry q_pe = u and the last key has k_pe = 2u, so whoever sees
    # it gives it most of the weight and is pulled towards its c_kv = 2
    u = np.where(np.arange(PE) % 3 == 0, -1.0, 1.0)
    q[0, 0, :, KV:] = u.astype(BF16)
    ckv[0][-1], kpe[0][-1] = 2.0, (2 * u).astype(BF16)
    cache.free(ids[0])
    cache.append(ids[0], ckv[0], kpe[0])
    scale = (KV + PE) ** -0.5
    o = mla_attention_decode(die, q, cache, ids, tiling=MLATiling(tile_blocks))
    ref = mla_attention_decode_reference(q, ckv, kpe, [length], scale)
    check_close(o, ref, ckv)
    if length > 1:  # had query token 0 seen the last position, its output would be far off
        leaky = mla_attention_decode_reference(q[:, :1], ckv, kpe, [length], scale)  # s_q = 1: sees all
        assert np.abs(leaky[0, 0] - ref[0, 0]).mean() > 0.5


@pytest.mark.parametrize("batch, s_q, h_q, lengths, bs, splits", [
    (2, 1, 16, [300, 40], 128, None),
    (3, 2, 5, [17, 100, 2], 32, 3),
])
def test_timing_only_cycles_equal_functional(batch, s_q, h_q, lengths, bs, splits):
    die, cache, ids, q, _, _ = make_case(2, batch, s_q, h_q, lengths, bs)
    with die.recording() as fun:
        mla_attention_decode(die, q, cache, ids, num_splits=splits)
    tim = ascendemu.Die("910c", functional=False)
    tcache = MLACache(tim, None, cache.num_blocks, bs)
    tcache.allocate(ids, lengths)
    assert [list(tcache.block_table(s)) for s in ids] == [list(cache.block_table(s)) for s in ids]
    with tim.recording() as rec:
        o = mla_attention_decode(tim, tim.gm.empty(q.shape, "bfloat16"), tcache, ids, num_splits=splits)
    assert isinstance(o, ascendemu.GlobalTensor) and o.is_phantom and o.shape == (batch, s_q, h_q, KV)
    assert len(rec.reports) == len(fun.reports) == 2
    for rf, rt in zip(fun.reports, rec.reports):
        assert not rt.functional and rt.cycles == rf.cycles
        assert [c.busy for c in rt.cores] == [c.busy for c in rf.cores] and rt.bytes == rf.bytes


def test_global_tensor_in_and_out():
    die, cache, ids, q, ckv, kpe = make_case(4, 2, 1, 3, [50, 9], 16)
    o = mla_attention_decode(die, die.gm.from_numpy(q), cache, ids)
    assert isinstance(o, ascendemu.GlobalTensor)
    check_close(o.numpy(), mla_attention_decode_reference(q, ckv, kpe, [50, 9], (KV + PE) ** -0.5), ckv)


def test_plan_fills_the_die_and_splits_on_tiles():
    spec = ascendemu.Die("910c", functional=False).spec
    lengths = [4096] * 8
    tables = [np.arange(32 * b, 32 * b + 32) for b in range(8)]
    plan = plan_decode(spec, (8, 1, 128, 576), KV, PE, 128, lengths, tables, scale=0.1)
    assert (plan.tile_blocks, plan.depth, plan.rows) == (2, 1, 128)  # Q 144 KiB + 2 blocks + P fill L1
    assert len(plan.groups) == 24 and set(plan.splits) == {3}  # 8 sequences × 3 splits on 24 AIC
    tiles = [t for g in plan.groups for item in g for t in item.tiles]
    assert sorted(t.pid for t in tiles) == list(range(plan.n_partials)) == list(range(8 * 16))
    assert all(t.t0 % plan.tile == 0 for t in tiles)


# ------------------------------------------------------------------------------------------------------ the cache


@settings(deadline=None)
@given(block_size=st.sampled_from([16, 32, 48, 128]), pieces=st.lists(st.integers(0, 70), min_size=1, max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_cache_append_gather_round_trip(block_size, pieces, seed):
    rng = np.random.default_rng(seed)
    die = ascendemu.Die("910c")
    cache = MLACache(die, {"kv_dim": 32, "pe_dim": 16}, 20, block_size)
    other = rng.standard_normal((5, 32)).astype(BF16)
    cache.append(9, other, np.zeros((5, 16), BF16))  # a neighbour, so the blocks interleave
    rows_c, rows_k = [], []
    for n in pieces:  # chunked appends continue where the sequence ends
        c, k = rng.standard_normal((n, 32)).astype(BF16), rng.standard_normal((n, 16)).astype(BF16)
        cache.append(3, c, k)
        cache.append(9, other[:1], np.zeros((1, 16), BF16))
        rows_c.append(c)
        rows_k.append(k)
    c, k = cache.gather(3)
    np.testing.assert_array_equal(c.view(np.uint16), np.concatenate(rows_c).view(np.uint16))
    np.testing.assert_array_equal(k.view(np.uint16), np.concatenate(rows_k).view(np.uint16))
    assert cache.length(3) == sum(pieces) and cache.length(9) == 5 + len(pieces)
    assert len(cache.block_table(3)) == -(-sum(pieces) // block_size)


def test_cache_layout_is_nz_blocks():
    die = ascendemu.Die("910c")
    cache = MLACache(die, None, 4, 16)
    assert cache.c_kv.shape == (4, 32, 16, 16) and cache.k_pe.shape == (4, 4, 16, 16)
    assert cache.c_kv.dtype == BF16
    cache.allocate([5], [16])  # takes block 0
    c = (np.arange(20 * KV) % 251).reshape(20, KV).astype(BF16)
    slots = cache.append(6, c, np.zeros((20, PE), BF16))
    assert list(cache.block_table(6)) == [1, 2] and list(slots[[0, 16, 19]]) == [16, 32, 35]
    flat = cache.c_kv.array.reshape(-1)
    for t, d in [(0, 0), (3, 17), (16, 511), (19, 100)]:
        blk, off = cache.block_table(6)[t // 16], t % 16
        assert flat[kv_nz_offset(blk, off, d, KV, 16, BF16)] == c[t, d]


def test_cache_accepts_a_config_object():
    class Cfg:
        kv_lora_rank, qk_rope_head_dim, max_position_embeddings = 64, 32, 100
    cache = MLACache(ascendemu.Die("910c", functional=False), Cfg(), 3, 32)
    assert (cache.kv_dim, cache.pe_dim, cache.max_position) == (64, 32, 100)
    assert cache.c_kv.shape == (3, 4, 32, 16) and cache.c_kv.is_phantom
    cache2 = MLACache(ascendemu.Die("910c", functional=False), Cfg(), 3, 32, max_position=200)
    assert cache2.max_position == 200


def test_cache_allocate_free_and_reuse():
    die = ascendemu.Die("910c", functional=False)
    cache = MLACache(die, None, 10, 16)
    cache.allocate([4, 8], [33, 16])
    assert list(cache.block_table(4)) == [0, 1, 2] and list(cache.block_table(8)) == [3]
    assert cache.num_free_blocks == 6 and cache.seq_ids == [4, 8] and 4 in cache
    cache.free(4)
    assert 4 not in cache and cache.num_free_blocks == 9
    cache.allocate([8, 2], [40, 5])  # 8 grows into the freed blocks, lowest first
    assert list(cache.block_table(8)) == [3, 0, 1] and list(cache.block_table(2)) == [2]
    cache.allocate([8], [10])  # shrinking returns blocks
    assert list(cache.block_table(8)) == [3] and cache.length(8) == 10
    cache.append(8, np.zeros((7, KV), np.float32), np.zeros((7, PE), np.float32))  # timing-only: bookkeeping only
    assert cache.length(8) == 17 and len(cache.block_table(8)) == 2
    with pytest.raises(ValueError, match="timing-only"):
        cache.gather(8)


def test_cache_errors():
    die = ascendemu.Die("910c")
    cache = MLACache(die, None, 4, 32, max_position=100)
    cache.allocate([1], [70])  # 3 blocks
    with pytest.raises(CacheFullError, match="needs 2 more blocks of 32 tokens, 1 of 4 are free"):
        cache.allocate([2, 3], [20, 20])
    assert 2 not in cache and cache.num_free_blocks == 1  # all or nothing
    roomy = MLACache(die, None, 4, 32)
    roomy.allocate([1], [70])
    with pytest.raises(CacheFullError, match="needs 2 more blocks"):
        roomy.append(1, np.zeros((60, KV), BF16), np.zeros((60, PE), BF16))
    assert roomy.length(1) == 70
    with pytest.raises(KeyError, match="unknown sequence id 5 \\(live: 1\\)"):
        cache.length(5)
    for fn in (cache.block_table, cache.gather, cache.free):
        with pytest.raises(KeyError, match="unknown sequence id 6"):
            fn(6)
    with pytest.raises(ValueError, match="would reach position 100, past max_position_embeddings = 100"):
        cache.allocate([9], [101])
    with pytest.raises(ValueError, match="would reach position 100, past max_position_embeddings = 100"):
        MLACache(die, None, 40, 32, max_position=100).append(0, np.zeros((101, KV), BF16), np.zeros((101, PE), BF16))
    with pytest.raises(ValueError, match="c_kv_rows must be \\[n, 512\\]"):
        cache.append(1, np.zeros((1, 500), BF16), np.zeros((1, PE), BF16))
    with pytest.raises(ValueError, match="2 c_kv rows but 1 k_pe rows"):
        cache.append(1, np.zeros((2, KV), BF16), np.zeros((1, PE), BF16))
    with pytest.raises(TypeError, match="sequence ids are ints"):
        cache.length("a")
    with pytest.raises(ValueError, match="block_size = 20 must be a positive multiple of 16"):
        MLACache(die, None, 4, 20)
    with pytest.raises(ValueError, match="kv_dim = 40 must be a multiple of 16"):
        MLACache(die, None, 4, 16, kv_dim=40)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        MLACache(die, None, 0, 16)
    with pytest.raises(TypeError, match="has none of kv_lora_rank"):
        MLACache(die, object(), 4, 16)


def test_attention_errors():
    die, cache, ids, q, _, _ = make_case(0, 1, 1, 2, [10], 16)
    with pytest.raises(ValueError, match="s_q = 3; 1 or 2"):
        mla_attention_decode(die, np.zeros((1, 3, 2, 576), BF16), cache, ids)
    with pytest.raises(ValueError, match="h_q = 129 must be in 1..128"):
        mla_attention_decode(die, np.zeros((1, 1, 129, 576), BF16), cache, ids)
    with pytest.raises(ValueError, match="q must be \\[B, s_q, h_q, 576\\]"):
        mla_attention_decode(die, np.zeros((1, 1, 2, 512), BF16), cache, ids)
    with pytest.raises(TypeError, match="it must be bfloat16"):
        mla_attention_decode(die, q.astype(np.float32), cache, ids)
    with pytest.raises(ValueError, match="2 sequence ids for a batch of 1"):
        mla_attention_decode(die, q, cache, ids * 2)
    with pytest.raises(KeyError, match="unknown sequence id 4"):
        mla_attention_decode(die, q, cache, [4])
    short = make_case(0, 1, 2, 2, [2], 16)
    short[1].allocate(short[2], [1])
    with pytest.raises(ValueError, match="holds 1 tokens; with s_q = 2 it needs ≥ 2"):
        mla_attention_decode(short[0], short[3], short[1], short[2])
    with pytest.raises(ValueError, match="softmax_scale must be a positive finite number"):
        mla_attention_decode(die, q, cache, ids, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="num_splits must be a positive int"):
        mla_attention_decode(die, q, cache, ids, num_splits=0)
    with pytest.raises(ValueError, match="tiling.depth must be 1 or 2"):
        mla_attention_decode(die, q, cache, ids, tiling=MLATiling(1, 3))
    with pytest.raises(ValueError, match="does not fit: L1 needs"):
        mla_attention_decode(die, q, cache, ids, tiling=MLATiling(40, 2))
    with pytest.raises(ValueError, match="block_size 256 > 128"):
        big = MLACache(die, None, 2, 256)
        big.allocate([0], [10])
        mla_attention_decode(die, q, big, [0])
    with pytest.raises(ValueError, match="the cache lives in another die's GM"):
        mla_attention_decode(ascendemu.Die("910c"), q, cache, ids)
    with pytest.raises(TypeError, match="cache must be an MLACache"):
        mla_attention_decode(die, q, object(), ids)
