"""Causal flash attention for MLA prefill (ops/mla/attention_prefill.py).

Golden: `mla_attention_prefill_reference`, float64 on the bf16 inputs with a float64 softmax. Tolerance (stated
bound): the kernel rounds twice to bf16 — P = exp(s − m) once per KV tile before P·V, and o at the end — and
everything else is fp32 (products exact, sums, the scale, the softmax statistics, the rescaled accumulator).
Rounding P moves o by a weighted mean of relative errors ≤ 2⁻⁹ of the values, so by ≤ 2⁻⁹·max|v|; rounding o adds
≤ 2⁻⁹·|o|; the row sum l is taken from the fp32 P (not the rounded one), which adds another ≤ 2⁻⁹·|o|; the fp32
parts add ~2⁻²⁰ relative. We check |o − golden| ≤ 2⁻⁸·|golden| + 2⁻⁸·max|v| (each term at least twice its bound).

Structure checked exactly: outputs are bit-identical for any number of AIC groups (an item runs whole on one
group), and a query's output is bit-identical when keys/values it must not see change (masked scores become −1e30
by Select/Duplicate before the max, so their P is exactly 0 and adds nothing to the cube's sums). A different
tiling regroups the online-softmax sums, so it is checked against the golden within the tolerance.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu
from ascendemu.ops.mla.attention_prefill import (PrefillTiling, mla_attention_prefill,
                                                 mla_attention_prefill_reference, plan_prefill)

BF16 = np.dtype(ml_dtypes.bfloat16)


def make_inputs(seed, seq_lens, kv_lens, h, d_qk, d_v, q_scale=1.0):
    rng = np.random.default_rng(seed)
    tq, tk = sum(seq_lens), sum(kv_lens)
    q = (rng.standard_normal((tq, h, d_qk)) * q_scale).astype(BF16)
    k = rng.standard_normal((tk, h, d_qk)).astype(BF16)
    v = rng.standard_normal((tk, h, d_v)).astype(BF16)
    return q, k, v


def check_close(o, ref, v):
    assert o.dtype == BF16 and o.shape == ref.shape
    o64 = o.astype(np.float64)
    assert np.all(np.isfinite(o64)), "non-finite output (poison or a masked row reached the result?)"
    bound = 2.0 ** -8 * np.abs(ref) + 2.0 ** -8 * float(np.abs(v.astype(np.float64)).max())
    err = np.abs(o64 - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"o{worst}: |{o64[worst]} − {ref[worst]}| = {err[worst]} > {bound[worst]}"


@st.composite
def prefill_cases(draw):
    n = draw(st.integers(1, 3))
    seq_lens = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    if draw(st.booleans()):
        seq_lens[draw(st.integers(0, n - 1))] = 1  # a single-token sequence
    past = draw(st.lists(st.integers(0, 150), min_size=n, max_size=n))
    kv_lens = [s + p for s, p in zip(seq_lens, past)]
    h = draw(st.integers(1, 4))
    d_qk = draw(st.sampled_from([16, 32, 48, 64]))
    d_v = draw(st.sampled_from([16, 32, 64]))
    tiling = draw(st.sampled_from([None, PrefillTiling(16, 32), PrefillTiling(32, 64), PrefillTiling(64, 96),
                                   PrefillTiling(128, 128)]))
    return seq_lens, kv_lens, h, d_qk, d_v, tiling


@settings(deadline=None)
@given(case=prefill_cases(), seed=st.integers(0, 2**32 - 1), q_scale=st.sampled_from([0.5, 1.0, 3.0]))
def test_prefill_matches_golden(case, seed, q_scale):
    seq_lens, kv_lens, h, d_qk, d_v, tiling = case
    q, k, v = make_inputs(seed, seq_lens, kv_lens, h, d_qk, d_v, q_scale)
    die = ascendemu.Die("910c")
    o = mla_attention_prefill(die, q, k, v, seq_lens, kv_lens, tiling=tiling)
    check_close(o, mla_attention_prefill_reference(q, k, v, seq_lens, kv_lens), v)


def test_default_kv_lens_and_softmax_scale():
    q, k, v = make_inputs(1, [70, 9], [70, 9], 2, 32, 16)
    o = mla_attention_prefill(ascendemu.Die("910c"), q, k, v, [70, 9], softmax_scale=0.3)
    check_close(o, mla_attention_prefill_reference(q, k, v, [70, 9], softmax_scale=0.3), v)
    die = ascendemu.Die("910c")
    o = mla_attention_prefill(die, q, k, v, np.array([70, 9]))
    assert die.gm.in_use == 0  # inputs, workspaces and the output freed
    ref = mla_attention_prefill_reference(q, k, v, [70, 9], [70, 9], softmax_scale=32 ** -0.5)
    check_close(o, ref, v)


@pytest.mark.parametrize("kv_len", [1, 2, 129, 300])
def test_single_query_token(kv_len):
    """One query token at the last position: it sees every key (a decode step through the prefill kernel)."""
    q, k, v = make_inputs(kv_len, [1], [kv_len], 3, 48, 32)
    o = mla_attention_prefill(ascendemu.Die("910c"), q, k, v, [1], [kv_len])
    ref = mla_attention_prefill_reference(q, k, v, [1], [kv_len])
    check_close(o, ref, v)
    # and it is the plain (unmasked) softmax over all keys, computed here directly
    s = np.einsum("hd,thd->ht", q[0].astype(np.float64), k.astype(np.float64)) * 48 ** -0.5
    p = np.exp(s - s.max(axis=1, keepdims=True))
    np.testing.assert_allclose(ref[0], np.einsum("ht,thd->hd", p / p.sum(axis=1, keepdims=True), v.astype(float)))


def test_reference_is_causal_bottom_right():
    """The golden itself: query j of a chunk sees the past plus keys up to its own position, nothing later."""
    q, k, v = make_inputs(3, [2], [5], 1, 16, 16)
    ref = mla_attention_prefill_reference(q, k, v, [2], [5], softmax_scale=1.0)
    for j, n_vis in ((0, 4), (1, 5)):
        s = k[:n_vis, 0].astype(np.float64) @ q[j, 0].astype(np.float64)
        p = np.exp(s - s.max())
        np.testing.assert_allclose(ref[j, 0], p @ v[:n_vis, 0].astype(np.float64) / p.sum())


@settings(deadline=None, max_examples=8)
@given(seed=st.integers(0, 2**32 - 1), sl=st.integers(2, 200), past=st.integers(0, 100), cut=st.data(),
       tiling=st.sampled_from([None, PrefillTiling(16, 32), PrefillTiling(32, 64)]))
def test_causal_future_keys_do_not_matter(seed, sl, past, cut, tiling):
    """Changing the keys/values after position P changes no output of a query at position ≤ P (bit for bit), and
    nothing of the other sequence."""
    j0 = cut.draw(st.integers(0, sl - 2))  # queries 0..j0 must not change
    seq_lens, kv_lens = [sl, 5], [sl + past, 7]
    q, k, v = make_inputs(seed, seq_lens, kv_lens, 2, 32, 16)
    die = ascendemu.Die("910c")
    o1 = mla_attention_prefill(die, q, k, v, seq_lens, kv_lens, tiling=tiling)
    k2, v2 = k.copy(), v.copy()
    first_hidden = past + j0 + 1  # keys at positions > past + j0
    rng = np.random.default_rng(seed + 1)
    k2[first_hidden:sl + past] = (rng.standard_normal(k2[first_hidden:sl + past].shape) * 4).astype(BF16)
    v2[first_hidden:sl + past] = (rng.standard_normal(v2[first_hidden:sl + past].shape) * 4).astype(BF16)
    o2 = mla_attention_prefill(die, q, k2, v2, seq_lens, kv_lens, tiling=tiling)
    np.testing.assert_array_equal(o2[:j0 + 1].view(np.uint16), o1[:j0 + 1].view(np.uint16))
    np.testing.assert_array_equal(o2[sl:].view(np.uint16), o1[sl:].view(np.uint16))
    assert not np.array_equal(o2[j0 + 1:sl].view(np.uint16), o1[j0 + 1:sl].view(np.uint16))  # later ones do change
    check_close(o2, mla_attention_prefill_reference(q, k2, v2, seq_lens, kv_lens), v2)


def test_independent_of_the_number_of_groups_and_within_tolerance_across_tilings():
    seq_lens, kv_lens = [150, 1, 40], [180, 1, 40]
    q, k, v = make_inputs(7, seq_lens, kv_lens, 3, 64, 32)
    die = ascendemu.Die("910c")
    outs = {bd: mla_attention_prefill(die, q, k, v, seq_lens, kv_lens, tiling=PrefillTiling(32, 64, bd))
            for bd in (1, 2, 5, 24)}
    for bd, o in outs.items():
        np.testing.assert_array_equal(o.view(np.uint16), outs[1].view(np.uint16), err_msg=f"block_dim={bd}")
    ref = mla_attention_prefill_reference(q, k, v, seq_lens, kv_lens)
    for tiling in (PrefillTiling(16, 32), PrefillTiling(64, 128), PrefillTiling(64, 256), None):
        check_close(mla_attention_prefill(die, q, k, v, seq_lens, kv_lens, tiling=tiling), ref, v)


def test_wide_heads_several_chunks():
    """d_qk 192 (two K chunks of S, as DeepSeek-R1's 128 + 64) and d_v 256 (two P·V chunks); a smaller q_tile is
    picked automatically when d_v is large."""
    seq_lens, kv_lens = [40, 3], [150, 3]
    q, k, v = make_inputs(5, seq_lens, kv_lens, 2, 192, 256)
    die = ascendemu.Die("910c")
    check_close(mla_attention_prefill(die, q, k, v, seq_lens, kv_lens),
                mla_attention_prefill_reference(q, k, v, seq_lens, kv_lens), v)
    plan = plan_prefill(die.spec, 1, 32, 512, [300], [300], scale=1.0)
    assert plan.q_tile < 128
    # 24 heads × 192 dims: 16 rows of q/k/v overflow Nd2Nz's uint16 matrix stride, so Q, V and P go strip by strip
    q, k, v = make_inputs(6, [20], [37], 24, 192, 192)
    check_close(mla_attention_prefill(die, q, k, v, [20], [37]), mla_attention_prefill_reference(q, k, v, [20], [37]), v)


def test_zero_length_query_sequences_are_skipped():
    seq_lens, kv_lens = [0, 20, 0], [5, 30, 0]
    q, k, v = make_inputs(2, seq_lens, kv_lens, 1, 16, 16)
    o = mla_attention_prefill(ascendemu.Die("910c"), q, k, v, seq_lens, kv_lens)
    check_close(o, mla_attention_prefill_reference(q, k, v, seq_lens, kv_lens), v)


def test_global_tensors_in_and_out():
    q, k, v = make_inputs(4, [33], [40], 2, 16, 32)
    die = ascendemu.Die("910c")
    o = mla_attention_prefill(die, die.gm.from_numpy(q), k, v, [33], [40])
    assert isinstance(o, ascendemu.GlobalTensor) and o.shape == (33, 2, 32)
    check_close(o.numpy(), mla_attention_prefill_reference(q, k, v, [33], [40]), v)


@pytest.mark.parametrize("seq_lens, kv_lens, h, d_qk, d_v, tiling", [
    ([100, 1, 37], [130, 1, 37], 3, 48, 32, None),
    ([300], [300], 1, 64, 64, PrefillTiling(16, 32)),
    ([17, 64], [81, 64], 2, 192, 128, PrefillTiling(64, 128, 3)),
])
def test_timing_only_equals_functional(seq_lens, kv_lens, h, d_qk, d_v, tiling):
    q, k, v = make_inputs(9, seq_lens, kv_lens, h, d_qk, d_v)
    fun = ascendemu.Die("910c")
    with fun.recording() as rf:
        mla_attention_prefill(fun, q, k, v, seq_lens, kv_lens, tiling=tiling)
    tim = ascendemu.Die("910c", functional=False)
    with tim.recording() as rt:
        o = mla_attention_prefill(tim, *(tim.gm.empty(x.shape, "bfloat16") for x in (q, k, v)), seq_lens, kv_lens,
                                  tiling=tiling)
    assert isinstance(o, ascendemu.GlobalTensor) and o.is_phantom and o.shape == (sum(seq_lens), h, d_v)
    assert len(rt.reports) == len(rf.reports) == 1
    a, b = rf.reports[0], rt.reports[0]
    assert not b.functional and a.cycles == b.cycles > 0
    assert [c.busy for c in a.cores] == [c.busy for c in b.cores] and a.bytes == b.bytes


def test_plan_skips_masked_tiles_and_balances():
    spec = ascendemu.Die("910c", functional=False).spec
    plan = plan_prefill(spec, 128, 192, 128, [4096], [4096], scale=0.1)
    assert (plan.q_tile, plan.kv_tile) == (128, 128) and len(plan.groups) == 24
    items = [it for g in plan.groups for it in g]
    assert len(items) == plan.n_items == 32 * 128
    # query tile i sees i past tiles and its diagonal: Σ (i + 1) tiles per head, none fully masked
    assert sum(len(it.tiles) for it in items) == 128 * 32 * 33 // 2
    for it in items:
        q0 = it.q_tok
        assert it.tiles[-1].kind == 2 and it.tiles[-1].k0 == q0 and it.tiles[-1].ntok == it.m
        assert [t.k0 for t in it.tiles[:-1]] == list(range(0, q0, 128))
    loads = [sum(len(t.tiles) for t in g) for g in plan.groups]
    assert max(loads) <= 1.01 * sum(loads) / len(loads)  # longest first evens out the triangle
    # chunked prefill: the past comes first and the first tile is short
    plan = plan_prefill(spec, 1, 64, 64, [10], [300], scale=0.1, tiling=PrefillTiling(16, 128))
    (it,) = [it for g in plan.groups for it in g]
    assert [(t.k0, t.ntok, t.kind) for t in it.tiles] == [(0, 34, 1), (34, 128, 0), (162, 128, 0), (290, 10, 2)]


def test_errors():
    die = ascendemu.Die("910c")
    q, k, v = make_inputs(0, [8], [8], 2, 32, 16)
    run = mla_attention_prefill
    with pytest.raises(TypeError, match="q must be a numpy array or a GlobalTensor, got list"):
        run(die, q.tolist(), k, v, [8])
    with pytest.raises(ValueError, match="k must be 3-D"):
        run(die, q, k[0], v, [8])
    with pytest.raises(TypeError, match="v is float32; it must be bfloat16"):
        run(die, q, k, v.astype(np.float32), [8])
    with pytest.raises(ValueError, match="same number of heads"):
        run(die, q, k[:, :1], v, [8])
    with pytest.raises(ValueError, match="q has d_qk 32 but k has 16"):
        run(die, q, k[:, :, :16], v, [8])
    with pytest.raises(ValueError, match="k has 8 tokens but v has 7"):
        run(die, q, k, v[:7], [8])
    with pytest.raises(ValueError, match="d_qk = 24 must be a positive multiple of 16"):
        run(die, q[:, :, :24], k[:, :, :24], v, [8])
    with pytest.raises(ValueError, match="d_v = 8 must be"):
        run(die, q, k, v[:, :, :8], [8])
    big = np.zeros((1, 512, 144), BF16)
    with pytest.raises(ValueError, match="heads × d_qk = 73728 exceeds 65535"):
        run(die, big, big, big[:, :, :16], [1])
    with pytest.raises(ValueError, match="seq_lens sum to 7 but q has 8 tokens"):
        run(die, q, k, v, [3, 4])
    with pytest.raises(ValueError, match="kv_lens sum to 9 but k/v have 8 tokens"):
        run(die, q, k, v, [8], [9])
    with pytest.raises(ValueError, match="sequence 1 has kv_len 2 < seq_len 4"):
        run(die, q, k, v, [4, 4], [6, 2])
    with pytest.raises(ValueError, match="seq_lens holds a negative length -1"):
        run(die, q, k, v, [9, -1])
    with pytest.raises(ValueError, match="kv_lens has 1 entries for 2 sequences"):
        run(die, q, k, v, [4, 4], [8])
    with pytest.raises(TypeError, match="seq_lens must hold ints, got 2.5"):
        run(die, q, k, v, [2.5, 5.5])
    with pytest.raises(TypeError, match="kv_lens must hold ints, got True"):
        run(die, q, k, v, [8], [True])
    with pytest.raises(ValueError, match="seq_lens must be a non-empty 1-D"):
        run(die, q, k, v, [])
    with pytest.raises(ValueError, match="no query tokens"):
        run(die, q[:0], k, v, [0], [8])
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="softmax_scale must be a positive finite number"):
            run(die, q, k, v, [8], softmax_scale=bad)
    other = ascendemu.Die("910c")
    with pytest.raises(ValueError, match="v is a GlobalTensor of another die's GM"):
        run(die, q, k, other.gm.from_numpy(v), [8])
    with pytest.raises(TypeError, match="tiling must be a PrefillTiling, got tuple"):
        run(die, q, k, v, [8], tiling=(16, 32))
    with pytest.raises(ValueError, match="tiling.q_tile must be an int in 16..128, a multiple of 16; got 24"):
        run(die, q, k, v, [8], tiling=PrefillTiling(q_tile=24))
    with pytest.raises(ValueError, match="tiling.kv_tile must be an int in 32..512, a multiple of 32; got 16"):
        run(die, q, k, v, [8], tiling=PrefillTiling(kv_tile=16))
    with pytest.raises(ValueError, match="tiling.block_dim must be an int in 1..24, got 25"):
        run(die, q, k, v, [8], tiling=PrefillTiling(block_dim=25))
    with pytest.raises(ValueError, match="no tiling fits .*L0C needs 524288 B of 131072"):
        run(die, q, k, v, [8], tiling=PrefillTiling(128, 512))
    with pytest.raises(ValueError, match="kv_tile 32 < q_tile 128: the diagonal KV tile holds up to q_tile keys"):
        run(die, q, k, v, [8], tiling=PrefillTiling(128, 32))
    narrow = np.zeros((8, 1, 32), BF16)
    with pytest.raises(ValueError, match="no tiling fits .*UB needs"):
        run(die, narrow, narrow, np.zeros((8, 1, 512), BF16), [8], tiling=PrefillTiling(128, 128))
    assert die.gm.in_use == 0  # nothing allocated before the checks, nothing leaked


def test_kv_tile_below_the_default_q_tile():
    """An explicit kv_tile of 32 makes the planner pick q_tile ≤ 32 (the diagonal tile holds q_tile keys), and the
    result still matches the golden on a sequence long enough for several query tiles."""
    spec = ascendemu.Die("910c", functional=False).spec
    plan = plan_prefill(spec, 1, 32, 16, [100], [100], scale=1.0, tiling=PrefillTiling(kv_tile=32))
    assert plan.kv_tile == 32 and plan.q_tile <= 32
    q, k, v = make_inputs(12, [100], [130], 2, 32, 16)
    o = mla_attention_prefill(ascendemu.Die("910c"), q, k, v, [100], [130], tiling=PrefillTiling(kv_tile=32))
    check_close(o, mla_attention_prefill_reference(q, k, v, [100], [130]), v)


def test_a_failed_launch_frees_every_allocation(monkeypatch):
    """Staged inputs, workspaces and the output are all freed when the launch fails."""
    die = ascendemu.Die("910c")
    q, k, v = make_inputs(0, [8], [8], 2, 32, 16)

    def fail(*args, **kwargs):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(die, "launch", fail)
    with pytest.raises(RuntimeError, match="launch failed"):
        mla_attention_prefill(die, q, k, v, [8])
    assert die.gm.in_use == 0
