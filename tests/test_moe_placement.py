"""ExpertPlacement (ops/moe/placement.py): deployments, replica routing, shared-die routing and validation.

The references here restate the module's rules independently: the home die h's j-th copy for an expert (counted in
(token, k) order) goes to replica (h + j) mod n over the ascending replica dies; shared die index h·S // num_dies.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ascendemu.ops.moe.placement import ExpertPlacement


def check_invariants(p):
    E = p.num_experts
    assert p.shared_id == E
    seen = {e: [] for e in range(E + 1)}
    for d, s in enumerate(p.slots):
        assert len(set(s)) == len(s)
        for pos, e in enumerate(s):
            seen[e].append(d)
            assert p.slot_of(d, e) == pos
    for e in range(E + 1):
        assert p.replicas(e) == tuple(seen[e])
        assert e == E or seen[e]


def test_uniform():
    p = ExpertPlacement.uniform(16, 4)
    check_invariants(p)
    assert p.slots[1] == (16, 4, 5, 6, 7)
    assert not p.shared_remote() and p.shared_route(0, 5) is None
    assert p.replicas(16) == (0, 1, 2, 3)
    ids = np.array([[0, 15], [5, 9]], np.int32)
    die, slot = p.route(2, ids)
    assert die.tolist() == [[0, 3], [1, 2]] and slot.tolist() == [[1, 4], [2, 2]]
    assert die.dtype == np.int64 and slot.dtype == np.int64


def test_decode_ep320_default():
    p = ExpertPlacement.decode_ep320()
    check_invariants(p)
    assert p.num_dies == 320 and p.shared_remote()
    assert all(p.slots[d] == (256,) for d in range(32))
    assert all(p.slots[32 + e] == (e,) for e in range(256))
    assert [p.slots[d][0] for d in range(288, 320)] == [i * 8 for i in range(32)]
    # each shared die serves 10 consecutive home dies
    for h in range(320):
        die, slot = p.shared_route(h, 3)
        assert die.tolist() == [h // 10] * 3 and slot.tolist() == [0, 0, 0]
    assert p.shared_route(7, 0)[0].shape == (0,)


def test_decode_small_with_redundant_replicas():
    p = ExpertPlacement.decode_ep320(num_experts=8, dies=16, shared_dies=2, redundant=[3, 3, 3, 0, 1, 2])
    check_invariants(p)
    assert p.replicas(3) == (5, 10, 11, 12) and p.replicas(8) == (0, 1)
    # one expert takes every token: its 4 replicas split 40 tokens of each home die evenly
    for h in range(16):
        die, slot = p.route(h, np.full((40, 1), 3))
        counts = np.bincount(die[:, 0], minlength=16)
        assert counts[[5, 10, 11, 12]].tolist() == [10, 10, 10, 10] and counts.sum() == 40
        assert (slot == 0).all()
        sd, _ = p.shared_route(h, 1)
        assert sd[0] == h * 2 // 16


@given(n=st.integers(2, 5), stride=st.integers(1, 6), T=st.integers(1, 60), h=st.integers(0, 7))
def test_replicas_split_any_load(n, stride, T, h):
    """Whatever subset of a die's tokens picks the hot expert (here every stride-th token, the pattern a rule keyed
    on the token index alone would send to one replica), its n replicas get within one copy of each other."""
    p = ExpertPlacement(2, 8, [(0,)] + [(1,)] * n + [()] * (7 - n))
    ids = np.zeros((T, 1), np.int64)
    ids[::stride] = 1
    die, _ = p.route(h, ids)
    counts = np.bincount(die[ids == 1], minlength=8)[1:1 + n]
    assert counts.sum() == len(range(0, T, stride)) and counts.max() - counts.min() <= 1


def test_prefill_ep32():
    p = ExpertPlacement.prefill_ep32()
    check_invariants(p)
    assert all(len(s) == 10 and s[0] == 256 for s in p.slots)
    assert p.slots[0] == (256, 0, 1, 2, 3, 4, 5, 6, 7, 8)
    assert p.slots[31][-1] == 0 and not p.shared_remote()
    assert p.replicas(8) == (0, 1)


@given(E=st.integers(1, 12), dies=st.integers(1, 12), extra=st.integers(0, 3), T=st.integers(0, 30),
       k=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_route_matches_rule(E, dies, extra, T, k, seed):
    """Random placements (each expert on ≥ 1 die, shared on a random subset); route follows the stated rule."""
    rng = np.random.default_rng(seed)
    holds = [set() for _ in range(dies)]
    for e in range(E):
        holds[rng.integers(dies)].add(e)
    for _ in range(extra * dies):
        holds[rng.integers(dies)].add(int(rng.integers(E + 1)))
    slots = [tuple(rng.permutation(sorted(h)).tolist()) for h in holds]
    p = ExpertPlacement(E, dies, slots)
    check_invariants(p)
    for h in range(dies):
        ids = rng.integers(0, E, (T, k)).astype(np.int32)
        die, slot = p.route(h, ids)
        assert die.shape == slot.shape == (T, k)
        seen = {}  # expert → copies of this home die so far
        for t in range(T):
            for j in range(k):
                e = int(ids[t, j])
                reps = sorted(d for d in range(dies) if e in slots[d])
                want = reps[(h + seen.get(e, 0)) % len(reps)]
                seen[e] = seen.get(e, 0) + 1
                assert die[t, j] == want and slots[want][slot[t, j]] == e
        shared = sorted(d for d in range(dies) if E in slots[d])
        sr = p.shared_route(h, T)
        if 0 < len(shared) < dies:
            assert sr[0].tolist() == [shared[h * len(shared) // dies]] * T
            assert all(slots[d][s] == E for d, s in zip(*sr))
        else:
            assert sr is None


@pytest.mark.parametrize("make,msg", [
    (lambda: ExpertPlacement(4, 2, [(0, 1), (2,)]), r"routed experts 3 \(1 of 4\) are held by no die"),
    (lambda: ExpertPlacement(4, 2, [(0, 1, 0), (2, 3)]), "die 0 holds expert 0 twice"),
    (lambda: ExpertPlacement(4, 2, [(0, 1), (2, 5)]), "die 1 slot 1 holds expert 5, outside 0..4"),
    (lambda: ExpertPlacement(4, 2, [(0, 1, 2, 3)]), "slots has 1 entries but num_dies is 2"),
    (lambda: ExpertPlacement(0, 1, [()]), "num_experts must be >= 1"),
    (lambda: ExpertPlacement(1, 0, []), "num_dies must be >= 1"),
    (lambda: ExpertPlacement.uniform(10, 4), "num_experts % dies == 0, got 10 experts over 4 dies"),
    (lambda: ExpertPlacement.uniform(0, 4), "needs num_experts >= 1"),
    (lambda: ExpertPlacement.decode_ep320(8, 9, 2), r"dies >= shared_dies \+ num_experts: 9 dies < 2 shared"),
    (lambda: ExpertPlacement.decode_ep320(8, 16, 2, redundant=[1, 2]), "has 6 redundant dies, but redundant lists 2"),
    (lambda: ExpertPlacement.decode_ep320(8, 11, 2, redundant=[8]), "redundant expert 8 outside"),
    (lambda: ExpertPlacement.decode_ep320(8, 11, 0), "shared_dies >= 1"),
    (lambda: ExpertPlacement.decode_ep320(0, 11, 1), "num_experts must be >= 1"),
    (lambda: ExpertPlacement.prefill_ep32(16, 4, redundant=[0, 1]), "one redundant expert per die"),
    (lambda: ExpertPlacement.prefill_ep32(16, 4, redundant=[0, 0, 0, 0]), "die 0 holds expert 0 twice"),
    (lambda: ExpertPlacement.prefill_ep32(16, 4, redundant=[4, 8, 12, 99]), "redundant expert 99 outside"),
    (lambda: ExpertPlacement.prefill_ep32(10, 4), "10 experts over 4 dies"),
    (lambda: ExpertPlacement.prefill_ep32(1, 0), "needs num_experts >= 1 and dies >= 1"),
    (lambda: ExpertPlacement.prefill_ep32(1, 1), "with 1 die: .* pass redundant"),
    (lambda: ExpertPlacement.prefill_ep32(2, 1, redundant=[1]), "die 0 holds expert 1 twice"),
])
def test_validation_errors(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_query_errors():
    p = ExpertPlacement.uniform(4, 2)
    with pytest.raises(ValueError, match="die 2 outside 0..1"):
        p.route(2, np.zeros((1, 1), np.int32))
    with pytest.raises(ValueError, match="names expert 4, outside the routed experts 0..3"):
        p.route(0, np.array([[0, 4]]))
    with pytest.raises(ValueError, match="must be 2-D"):
        p.route(0, np.array([0, 1]))
    with pytest.raises(TypeError, match="must be integers"):
        p.route(0, np.array([[0.0]]))
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        p.shared_route(0, -1)
    with pytest.raises(ValueError, match="expert 5 outside 0..4"):
        p.replicas(5)
    with pytest.raises(ValueError, match="die 0 does not hold expert 2"):
        p.slot_of(0, 2)
    with pytest.raises(TypeError, match="must be an int"):
        ExpertPlacement(4, 2.0, [(0, 1), (2, 3)])
    with pytest.raises(TypeError, match="must be an int"):
        ExpertPlacement(4, 2, [(0, 1), (2, "3")])
    with pytest.raises(TypeError, match="slots must be a sequence"):
        ExpertPlacement(4, 2, [(0, 1), 3])
    with pytest.raises(TypeError, match="must be an int"):
        p.replicas(True)
    with pytest.raises(TypeError, match="redundant must be a sequence"):
        ExpertPlacement.prefill_ep32(4, 2, redundant=3)
    with pytest.raises(TypeError, match="redundant expert id must be an int"):
        ExpertPlacement.decode_ep320(2, 4, 1, redundant=[1.0])
    assert p == ExpertPlacement(4, 2, [[4, 0, 1], [4, 2, 3]]) and hash(p) == hash(ExpertPlacement.uniform(4, 2))
