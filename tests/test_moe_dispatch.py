"""FusedDispatch / FusedCombine (ops/moe/dispatch.py) on small clusters, against NumPy references.

Dispatch: every (token, expert) copy — and the shared copy for remote-shared placements — lands exactly once on the
die and slot group the placement's rules name, in the stated order (slot, home die, token, k), with INT8 bytes and
scale equal to `quantize_per_token_reference` of the token (exact). Combine: bit-exact against `combine_reference`
(fp32 products and sums in top-k order, then shared, RINT to bf16), because the kernel rounds in exactly that order.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu
from ascendemu.ops.moe.dispatch import (SCALE_TAIL_BYTES, combine_reference, dispatch_reference, fused_combine,
                                        fused_dispatch, message_bytes, sdma_combine, sdma_dispatch)
from ascendemu.ops.moe.placement import ExpertPlacement

BF16 = np.dtype(ml_dtypes.bfloat16)


def make_inputs(rng, placement, T, k, H, distinct=True):
    x = [(rng.standard_normal((t, H)) * 2.0 ** rng.integers(-8, 8)).astype(BF16) for t in T]
    E = placement.num_experts
    ids = [np.array([rng.choice(E, k, replace=not distinct) for _ in range(t)], np.int32).reshape(t, k) for t in T]
    w = [rng.random((t, k)).astype(np.float32) for t in T]
    return x, ids, w


def check_dispatch(handle, x, ids, placement):
    ref = dispatch_reference(x, ids, placement)
    for d in range(placement.num_dies):
        tokens, scales, counts = handle.received(d)
        want = ref[d]
        assert handle.num_received(d) == len(want) == tokens.shape[0] == scales.shape[0]
        assert counts.dtype == np.int64 and counts.tolist() == np.bincount(
            [r[0] for r in want], minlength=len(placement.slots[d])).tolist()
        assert handle.origin(d).tolist() == [[r[1], r[2], r[3]] for r in want]
        if want:
            q, s = tokens.numpy(), scales.numpy()
            assert np.array_equal(q, np.stack([r[4] for r in want]))
            assert np.array_equal(s.view(np.uint32), np.array([r[5] for r in want], np.float32).view(np.uint32))
        rt = handle.for_die(d)
        assert rt.die == d and rt.slots == placement.slots[d] and rt.counts.tolist() == counts.tolist()


def expert_outputs(rng, handle, n, H):
    return [(rng.standard_normal((handle.num_received(d), H)) * 3).astype(BF16) for d in range(n)]


def check_combine(out, handle, eo, w, T, H, shared=None):
    n = len(T)
    kk = handle.k + int(handle.placement.shared_remote())
    for home in range(n):
        rows = np.full((T[home], kk, H), np.nan, BF16)
        for d in range(n):
            for r, (h, t, col) in enumerate(handle.origin(d).tolist()):
                if h == home:
                    rows[t, col] = eo[d][r]
        assert not np.isnan(rows.astype(np.float32)).any(), "a (token, k) copy never came back"
        want = combine_reference(rows, w[home], None if shared is None else shared[home])
        assert out[home].dtype == BF16 and out[home].shape == (T[home], H)
        assert np.array_equal(out[home].view(np.uint16), want.view(np.uint16)), home


def placement_for(kind, n):
    if kind == "uniform":
        return ExpertPlacement.uniform(2 * n, n)
    if kind == "prefill":
        return ExpertPlacement.prefill_ep32(2 * n, n)
    # decode-style: S shared dies, E routed, the rest redundant replicas
    S = 1 if n < 4 else 2
    E = n - S - (n // 4)
    return ExpertPlacement.decode_ep320(E, n, S)


@settings(deadline=None)
@given(n=st.integers(2, 5), kind=st.sampled_from(["uniform", "prefill", "decode"]), k=st.integers(1, 4),
       H=st.sampled_from([32, 64, 96, 256]), transport=st.sampled_from(["aiv", "sdma"]),
       use_shared=st.booleans(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_dispatch_and_combine(n, kind, k, H, transport, use_shared, data, seed):
    rng = np.random.default_rng(seed)
    p = placement_for(kind, n)
    k = min(k, p.num_experts)
    T = data.draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))
    x, ids, w = make_inputs(rng, p, T, k, H)
    c = ascendemu.Cluster("910c", dies=n)
    h = fused_dispatch(c, x, ids, w, p, max(1, max(T)), transport=transport, block_dim=2)
    check_dispatch(h, x, ids, p)
    eo = expert_outputs(rng, h, n, H)
    shared = None
    if use_shared and not p.shared_remote():
        shared = [rng.standard_normal((t, H)).astype(BF16) for t in T]
    out = fused_combine(c, eo, h, shared, block_dim=3, chunk=data.draw(st.sampled_from([None, 64])))
    check_combine(out, h, eo, w, T, H, shared)


def test_decode_16_dies_one_hot_expert_with_replicas():
    """16 dies, 2 shared, 8 routed, 6 redundant (4 of them replicas of expert 3): every token picks expert 3
    first, so its 4 replicas split the load by the stated rule; shared copies go to die h·2 // 16."""
    rng = np.random.default_rng(7)
    p = ExpertPlacement.decode_ep320(8, 16, 2, redundant=[3, 3, 3, 0, 1, 2])
    T = [int(t) for t in rng.integers(0, 9, 16)]
    T[5] = 0
    k, H = 2, 64
    x, ids, w = make_inputs(rng, p, T, k, H)
    for t_ids in ids:
        if len(t_ids):
            t_ids[:, 0] = 3
            t_ids[:, 1] = np.where(t_ids[:, 1] == 3, 4, t_ids[:, 1])
    c = ascendemu.Cluster("910c", dies=16)
    h = fused_dispatch(c, x, ids, w, p, 8, block_dim=2)
    check_dispatch(h, x, ids, p)
    reps = p.replicas(3)
    got = [h.received(d)[2][0] for d in reps]
    want = [sum(1 for s in range(16) for t in range(T[s]) if reps[(s + t) % 4] == d) for d in reps]
    assert got == want and sum(got) == sum(T)
    assert max(got) - min(got) <= 16  # at most one token per home die apart
    assert [h.num_received(d) for d in (0, 1)] == [sum(T[:8]), sum(T[8:])]
    eo = expert_outputs(rng, h, 16, H)
    check_combine(fused_combine(c, eo, h, block_dim=2), h, eo, w, T, H)


def test_one_expert_takes_every_token_uniform():
    rng = np.random.default_rng(3)
    p = ExpertPlacement.uniform(8, 4)
    T, H = [20, 0, 40, 5], 32
    x, ids, w = make_inputs(rng, p, T, 1, H)
    ids = [np.full((t, 1), 5, np.int32) for t in T]
    c = ascendemu.Cluster("910c", dies=4)
    h = fused_dispatch(c, x, ids, w, p, 40, block_dim=3)
    check_dispatch(h, x, ids, p)
    assert [h.num_received(d) for d in range(4)] == [0, 0, 65, 0]
    assert h.received(2)[2].tolist() == [0, 0, 65]
    eo = expert_outputs(rng, h, 4, H)
    check_combine(fused_combine(c, eo, h, block_dim=2), h, eo, w, T, H)


def test_independent_of_die_order_and_block_dim_and_transport():
    """Relabelling the dies (a permuted placement and inputs) permutes the results and nothing else; the core
    split and the transport change nothing either."""
    rng = np.random.default_rng(11)
    n, H, k = 4, 64, 2
    p = ExpertPlacement(6, n, [(6, 0, 1), (6, 2, 3), (6, 4, 5), (6,)])  # one replica each: relabelling is a symmetry
    T = [7, 3, 0, 9]
    x, ids, w = make_inputs(rng, p, T, k, H)
    perm = [2, 0, 3, 1]  # die d of the first run is die perm[d] of the second
    inv = np.argsort(perm)
    p2 = ExpertPlacement(6, n, [p.slots[inv[d]] for d in range(n)])
    c = ascendemu.Cluster("910c", dies=n)
    base = fused_dispatch(c, x, ids, w, p, 9, block_dim=1)
    eo = expert_outputs(rng, base, n, H)
    out = fused_combine(c, eo, base, block_dim=1)
    for kw in ({"block_dim": 4, "tail_bytes": 32}, {"block_dim": 2, "transport": "sdma"}):
        h = fused_dispatch(c, x, ids, w, p, 9, **kw)
        for d in range(n):
            assert np.array_equal(h.received(d)[0].numpy(), base.received(d)[0].numpy())
        o = (sdma_combine if kw.get("transport") else fused_combine)(c, eo, h, block_dim=3)
        assert all(np.array_equal(a.view(np.uint16), b.view(np.uint16)) for a, b in zip(o, out))
    c2 = ascendemu.Cluster("910c", dies=n)
    h2 = fused_dispatch(c2, [x[inv[d]] for d in range(n)], [ids[inv[d]] for d in range(n)],
                        [w[inv[d]] for d in range(n)], p2, 9, block_dim=2)
    # the rows a die receives are the same set (their order follows source die ids, which were relabelled)
    for d in range(n):
        a = base.received(d)[0].numpy()
        b = h2.received(perm[d])[0].numpy()
        assert sorted(map(bytes, a)) == sorted(map(bytes, b))
    eo2 = [None] * n
    for d in range(n):  # the same expert outputs, attached to the same (home, token, k)
        key = {tuple(o): eo[d][r] for r, o in enumerate(base.origin(d).tolist())}
        o2 = h2.origin(perm[d]).tolist()
        eo2[perm[d]] = np.stack([key[(int(inv[hh]), t, j)] for hh, t, j in o2]) if o2 else np.zeros((0, H), BF16)
    out2 = fused_combine(c2, eo2, h2, block_dim=2)
    for d in range(n):
        assert np.array_equal(out2[perm[d]].view(np.uint16), out[d].view(np.uint16))


@pytest.mark.parametrize("transport", ["aiv", "sdma"])
def test_timing_only_same_cycles(transport):
    rng = np.random.default_rng(5)
    p = ExpertPlacement.decode_ep320(4, 8, 2)
    T, H, k = [6, 0, 3, 8, 1, 4, 2, 5], 128, 2
    x, ids, w = make_inputs(rng, p, T, k, H)
    cf = ascendemu.Cluster("910c", dies=8)
    hf = fused_dispatch(cf, x, ids, w, p, 8, transport=transport, block_dim=3)
    eo = expert_outputs(rng, hf, 8, H)
    fused_combine(cf, eo, hf, block_dim=3)
    ct = ascendemu.Cluster("910c", dies=8, functional=False)
    xt = [ct.dies[d].gm.empty((T[d], H), "bfloat16") for d in range(8)]
    ht = fused_dispatch(ct, xt, ids, w, p, 8, transport=transport, block_dim=3)
    assert ht.received(0)[0].is_phantom
    eot = [ct.dies[d].gm.empty((ht.num_received(d), H), "bfloat16") for d in range(8)]
    out = fused_combine(ct, eot, ht, block_dim=3)
    assert all(o.is_phantom for o in out) and [tuple(o.shape) for o in out] == [(t, H) for t in T]
    assert ht.report.per_die_time_us() == hf.report.per_die_time_us()
    assert ht.combine_report.per_die_time_us() == hf.combine_report.per_die_time_us()
    assert ht.report.cycles > 0 and ht.combine_report.cycles > 0


def test_message_layout():
    assert SCALE_TAIL_BYTES == 512 and message_bytes(7168) == 7680 and message_bytes(64, 32) == 96


def _simple():
    p = ExpertPlacement.uniform(4, 2)
    x = [np.ones((2, 32), BF16), np.ones((1, 32), BF16)]
    ids = [np.array([[0, 2], [1, 3]], np.int32), np.array([[3, 0]], np.int32)]
    w = [np.ones((2, 2), np.float32), np.ones((1, 2), np.float32)]
    return ascendemu.Cluster("910c", dies=2), x, ids, w, p


@pytest.mark.parametrize("mutate,exc,msg", [
    (lambda a: a.update(max_tokens=1), ValueError, "die 0 sends 2 tokens, more than max_tokens_per_rank = 1"),
    (lambda a: a.update(ids=[np.array([[0, 0], [0, 0]], np.int32), a["ids"][1]], max_tokens=2), ValueError,
     r"die 0 would send 4 copies to slot 1 \(expert 0\) of die 0, more than the receive window of "
     r"max_tokens_per_rank = 2"),
    (lambda a: a.update(x=a["x"][:1]), ValueError, r"x must be a list with one entry per die \(2\), got 1"),
    (lambda a: a.update(ids=tuple(a["ids"][:1])), ValueError, "topk_ids must be a list with one entry per die"),
    (lambda a: a.update(x=[a["x"][0].astype(np.float32), a["x"][1]]), TypeError, "x.0. is float32; it must be bf"),
    (lambda a: a.update(x=[a["x"][0][:, :16], a["x"][1][:, :16]]), ValueError, "multiple of 32"),
    (lambda a: a.update(x=[a["x"][0], np.ones((1, 64), BF16)]), ValueError, "hidden size 64, x.0. has 32"),
    (lambda a: a.update(x=[a["x"][0][0], a["x"][1]]), ValueError, r"x\[0\] must be 2-D"),
    (lambda a: a.update(x=[[1], a["x"][1]]), TypeError, "x.0. must be a numpy array or a GlobalTensor"),
    (lambda a: a.update(ids=[a["ids"][0][:1], a["ids"][1]]), ValueError, r"topk_ids\[0\] must be \[T, k\] with T = 2"),
    (lambda a: a.update(ids=[a["ids"][0].astype(float), a["ids"][1]]), TypeError, "must be integers"),
    (lambda a: a.update(ids=[a["ids"][0], np.array([[9, 0]], np.int32)]), ValueError, "names expert 9"),
    (lambda a: a.update(w=[a["w"][0][:, :1], a["w"][1]]), ValueError, r"topk_weights\[0\] has shape"),
    (lambda a: a.update(w=[a["w"][0].astype(np.float64), a["w"][1]]), TypeError, "must be float32"),
    (lambda a: a.update(ids=[a["ids"][0], np.array([[3]], np.int32)], w=[a["w"][0], np.ones((1, 1), np.float32)]),
     ValueError, "has k = 1, expected 2"),
    (lambda a: a.update(p=ExpertPlacement.uniform(4, 4)), ValueError, "placement covers 4 dies, the cluster has 2"),
    (lambda a: a.update(p="uniform"), TypeError, "placement must be an ExpertPlacement"),
    (lambda a: a.update(max_tokens=0), ValueError, "max_tokens_per_rank must be a positive int"),
    (lambda a: a.update(kw={"quant": "fp8"}), ValueError, "quant must be 'int8'"),
    (lambda a: a.update(kw={"transport": "rdma"}), ValueError, "transport must be one of"),
    (lambda a: a.update(kw={"tail_bytes": 20}), ValueError, "tail_bytes must be a positive multiple of 32"),
    (lambda a: a.update(kw={"block_dim": 49}), ValueError, "block_dim must be in 1..48"),
])
def test_dispatch_errors(mutate, exc, msg):
    c, x, ids, w, p = _simple()
    a = {"x": x, "ids": ids, "w": w, "p": p, "max_tokens": 4, "kw": {}}
    mutate(a)
    with pytest.raises(exc, match=msg):
        fused_dispatch(c, a["x"], a["ids"], a["w"], a["p"], a["max_tokens"], **a["kw"])


def test_dispatch_errors_other_die_gm_and_hidden_too_large():
    c, x, ids, w, p = _simple()
    g = c.dies[1].gm.from_numpy(x[0])
    with pytest.raises(ValueError, match=r"x\[0\] is a GlobalTensor of another die's GM"):
        fused_dispatch(c, [g, x[1]], ids, w, p, 4)
    big = [np.ones((2, 32768), BF16), np.ones((1, 32768), BF16)]
    with pytest.raises(ValueError, match="hidden size 32768 needs"):
        fused_dispatch(c, big, ids, w, p, 4)


def test_combine_errors():
    c, x, ids, w, p = _simple()
    h = fused_dispatch(c, x, ids, w, p, 4, block_dim=1)
    eo = [np.zeros((h.num_received(d), 32), BF16) for d in range(2)]
    with pytest.raises(ValueError, match=r"expert_out\[0\] must be \[3, 32\], got \(2, 32\)"):
        fused_combine(c, [eo[0][:2], eo[1]], h)
    with pytest.raises(TypeError, match=r"expert_out\[1\] is float32"):
        fused_combine(c, [eo[0], eo[1].astype(np.float32)], h)
    with pytest.raises(TypeError, match="must be a numpy array or a GlobalTensor"):
        fused_combine(c, [eo[0], None], h)
    with pytest.raises(ValueError, match="expert_out must be a list with one entry per die"):
        fused_combine(c, eo[:1], h)
    with pytest.raises(ValueError, match="shared_out must be None or a list"):
        fused_combine(c, eo, h, shared_out=[None])
    with pytest.raises(ValueError, match=r"shared_out\[0\] must be \[2, 32\]"):
        fused_combine(c, eo, h, shared_out=[np.zeros((1, 32), BF16), np.zeros((1, 32), BF16)])
    with pytest.raises(ValueError, match="expert_out.0. is a GlobalTensor of another die's GM"):
        fused_combine(c, [c.dies[1].gm.from_numpy(eo[0]), eo[1]], h)
    with pytest.raises(TypeError, match="handle must be the DispatchHandle"):
        fused_combine(c, eo, object())
    with pytest.raises(ValueError, match="belongs to another cluster"):
        fused_combine(ascendemu.Cluster("910c", dies=2), eo, h)
    with pytest.raises(ValueError, match="block_dim must be in 1..48"):
        fused_combine(c, eo, h, block_dim=0)
    with pytest.raises(ValueError, match="comes from an AIV-Direct dispatch"):
        sdma_combine(c, eo, h)
    with pytest.raises(ValueError, match="die 2 outside 0..1"):
        h.received(2)
    for bad in (16, 100, True):
        with pytest.raises(ValueError, match="chunk must be a positive multiple of 64"):
            fused_combine(c, eo, h, chunk=bad)
    hb = fused_dispatch(c, [np.ones((2, 8256), BF16), np.ones((1, 8256), BF16)], ids, w, p, 4, block_dim=1)
    with pytest.raises(ValueError, match=r"a chunk of 8256 columns with 2 rows per token needs 231168 B of UB"):
        fused_combine(c, [np.zeros((hb.num_received(d), 8256), BF16) for d in range(2)], hb, chunk=8256)
    hs = sdma_dispatch(c, x, ids, w, p, 4, block_dim=1)
    out = sdma_combine(c, eo, hs, block_dim=1)
    assert [o.shape for o in out] == [(2, 32), (1, 32)]
