"""The BF16 GEMMs (ops/gemm.py: bf16_gemm, batched_bf16_gemm) against NumPy, on a whole die with the race checker on.

Goldens: the kernel must equal `bf16_gemm_reference(..., k_step=plan.tiles.k)` bit for bit — exact sums per k-step
added to an fp32 accumulator with one fp32 rounding each, then rounded once to bf16 (half to even), which is what
the cube and the Fixpipe do. Against the float64 product rounded once (the plain reference) the tolerance is

    |y − y64| ≤ 2⁻⁸·|y64| + 2·⌈K/16⌉·2⁻²⁴·Σ_k |a·w|     (bf16 output)

one bf16 rounding (half an ulp, 2⁻⁸ relative) plus at most one fp32 rounding of a partial sum bounded by Σ|a·w| per
k-step (k-steps are ≥ 16 wide), and the extra half-ulp that the two roundings can add. The rounding helper itself is
checked against a nearest-bf16 search written independently here.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ascendemu
from ascendemu.layouts import nd_to_nz
from ascendemu.ops.gemm import (GemmTiles, PackedWeight, batched_bf16_gemm, batched_bf16_gemm_reference, bf16_gemm,
                                bf16_gemm_reference, pack_heads, pack_weight, packed_heads, packed_shape, plan_gemm,
                                round_once)
from ascendemu.ops.int8_gemm import grouped_int8_gemm, int8_gemm

BF16 = np.dtype(ml_dtypes.bfloat16)

# Tilings that exercise the AIC paths with bf16 (C0 = 16): several k-steps per chunk, several chunks, resident and
# streamed B, one L1 stage, one L0C slot.
TILINGS = [
    None,
    GemmTiles(m=32, n=32, k=16, kc=48, stages=2),  # resident B over 3 chunks, 3 k-steps each
    GemmTiles(m=16, n=48, k=32, kc=64, stages=2, resident=False),  # streamed B, ring of 2
    GemmTiles(m=16, n=16, k=48, kc=48, stages=1, resident=False),  # one stage
    GemmTiles(m=128, n=256, k=64, kc=128, stages=2),  # one L0C slot (128 KiB accumulator)
]


def _die(functional=True):
    return ascendemu.Die("910c", functional=functional, checks=ascendemu.Checks(trace=False))


def _operands(rng, *shapes):
    return [rng.standard_normal(s).astype(BF16) for s in shapes]


def _plan(die, m, n, k, out="bfloat16", tiles=None, heads=None):
    if heads is None:
        return plan_gemm(die.spec, [m], n, k, in_dtype="bfloat16", out_dtype=out, tiles=tiles)
    return plan_gemm(die.spec, [m] * heads, n, k, in_dtype="bfloat16", out_dtype=out, tiles=tiles,
                     a_pitch=heads * k, a_group_stride=k, y_pitch=heads * n, y_group_stride=n)


def _check_bound(y, a, w):
    """The stated tolerance against the float64 product rounded once: the fp32 accumulation error (one fp32 rounding
    per 16-wide k-step, twice over for the partial sums) plus one bf16 ulp, at most 2⁻⁷ of the value, because the
    exact product and the fp32 sum can sit on either side of a bf16 rounding midpoint and round one ulp apart
    (seed 29519, 11 × 93 × 77: −0.3271485 exact rounds to −0.328125, its fp32 sum to −0.326171875)."""
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    y64 = round_once(a64 @ w64.T).astype(np.float64)
    s = np.abs(a64) @ np.abs(w64).T
    k = a.shape[1]
    bound = 2.0 ** -7 * np.abs(y64) + 2 * -(-k // 16) * 2.0 ** -24 * s + 2.0 ** -133
    assert np.all(np.abs(y.astype(np.float64) - y64) <= bound)


def _same_bits(y, ref):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    np.testing.assert_array_equal(y.view(np.uint8), ref.view(np.uint8))


@given(m=st.integers(1, 40), k=st.integers(1, 200), n=st.integers(1, 80), out=st.sampled_from(["bfloat16", "float32"]),
       tiles=st.sampled_from(TILINGS), seed=st.integers(0, 2 ** 16))
def test_bf16_gemm_matches_reference(m, k, n, out, tiles, seed):
    rng = np.random.default_rng(seed)
    a, w = _operands(rng, (m, k), (n, k))
    die = _die()
    y = bf16_gemm(die, a, pack_weight(w), out, tiles=tiles)
    plan = _plan(die, m, n, k, out, tiles)
    _same_bits(y, bf16_gemm_reference(a, w, out, k_step=plan.tiles.k))
    if out == "bfloat16":
        _check_bound(y, a, w)
    assert die.last_report.flops == 2 * m * n * k
    assert not any(c.cycles for c in die.last_report.cores if c.kind == "aiv")


@given(m=st.integers(1, 20), h=st.integers(1, 6), k=st.integers(1, 120), n=st.integers(1, 60),
       out=st.sampled_from(["bfloat16", "float32"]), tiles=st.sampled_from(TILINGS[:3]), seed=st.integers(0, 2 ** 16))
def test_batched_bf16_gemm_matches_reference(m, h, k, n, out, tiles, seed):
    rng = np.random.default_rng(seed)
    a, w = _operands(rng, (m, h, k), (h, n, k))
    die = _die()
    y = batched_bf16_gemm(die, a, pack_heads(w), out, tiles=tiles)
    plan = _plan(die, m, n, k, out, tiles, heads=h)
    _same_bits(y, batched_bf16_gemm_reference(a, w, out, k_step=plan.tiles.k))
    for j in range(h):  # each head against the float64 product rounded once
        if out == "bfloat16":
            _check_bound(y[:, j], a[:, j], w[j])
    assert die.last_report.flops == 2 * m * n * k * h


def test_batched_wide_pitch_moves_pairs():
    """H·K = 128·512 > 65535 (MLA's W_UV): A moves as fp32 pairs; still bit-exact, and the same as per-head GEMMs."""
    rng = np.random.default_rng(7)
    m, h, k, n = 3, 128, 512, 16
    a, w = _operands(rng, (m, h, k), (h, n, k))
    die = _die()
    y = batched_bf16_gemm(die, a, pack_heads(w))
    plan = _plan(die, m, n, k, heads=h)
    assert plan.a_pitch > 65535 and plan.cores_used == 24
    _same_bits(y, batched_bf16_gemm_reference(a, w, k_step=plan.tiles.k))
    _same_bits(y[:, 5], bf16_gemm(die, np.ascontiguousarray(a[:, 5]), pack_weight(w[5]), tiles=plan.tiles))


def test_mla_stacked_nz_weights():
    """The per-head NZ stacks MLAWeights holds (w_uk_nz = Nz(w_uk[h]ᵀ), w_uv_nz = Nz(w_uv[h])) feed
    batched_bf16_gemm through packed_heads: q_lat[h] = q_nope[h]·w_uk[h] and o[h] = o_lat[h]·w_uv[h]ᵀ."""
    rng = np.random.default_rng(11)
    m, h, nope, c, v = 4, 3, 32, 64, 16
    w_uk, w_uv = _operands(rng, (h, nope, c), (h, v, c))
    q_nope, o_lat = _operands(rng, (m, h, nope), (m, h, c))
    w_uk_nz = nd_to_nz(np.ascontiguousarray(w_uk.transpose(0, 2, 1)))
    w_uv_nz = nd_to_nz(w_uv)
    die = _die()
    q_lat = batched_bf16_gemm(die, q_nope, packed_heads(w_uk_nz, c, nope))
    assert q_lat.shape == (m, h, c)
    _check_bound(q_lat[:, 1], q_nope[:, 1], np.ascontiguousarray(w_uk[1].T))
    o = batched_bf16_gemm(die, o_lat, packed_heads(w_uv_nz, v, c))
    plan = _plan(die, m, v, c, heads=h)
    _same_bits(o, batched_bf16_gemm_reference(o_lat, w_uv, k_step=plan.tiles.k))


def test_timing_only_cycles_equal_functional():
    rng = np.random.default_rng(3)
    for m, k, n in ((37, 300, 90), (1, 16, 16)):
        a, w = _operands(rng, (m, k), (n, k))
        fun, tim = _die(), _die(False)
        bf16_gemm(fun, a, pack_weight(w))
        y = bf16_gemm(tim, tim.gm.empty((m, k), "bfloat16"), pack_weight(tim.gm.empty((n, k), "bfloat16")))
        assert isinstance(y, ascendemu.GlobalTensor) and y.shape == (m, n)
        assert fun.last_report.cycles == tim.last_report.cycles > 0
    m, h, k, n = 5, 130, 510, 24  # the wide-pitch path
    a, w = _operands(rng, (m, h, k), (h, n, k))
    fun, tim = _die(), _die(False)
    batched_bf16_gemm(fun, a, pack_heads(w), "float32")
    y = batched_bf16_gemm(tim, tim.gm.empty((m, h, k), "bfloat16"),
                          packed_heads(tim.gm.empty((h,) + packed_shape(n, k, "bfloat16"), "bfloat16"), n, k),
                          "float32")
    assert y.shape == (m, h, n) and fun.last_report.cycles == tim.last_report.cycles > 0


def test_global_tensor_operands_and_packing():
    rng = np.random.default_rng(5)
    a, w = _operands(rng, (20, 50), (33, 50))
    die = _die()
    p = pack_weight(w)
    assert p.dtype == "bfloat16" and p.data.shape == packed_shape(33, 50, "bfloat16") == (4, 3, 16, 16)
    np.testing.assert_array_equal(p.data.view(np.uint16), nd_to_nz(w).view(np.uint16))
    np.testing.assert_array_equal(p.numpy().view(np.uint16), w.view(np.uint16))
    pg = pack_weight(die.gm.from_numpy(w))  # packed on the die
    np.testing.assert_array_equal(pg.data.numpy().view(np.uint16), p.data.view(np.uint16))
    pu = pack_weight(w, gm=die.gm)  # uploaded once
    ga = die.gm.from_numpy(a)
    y = bf16_gemm(die, ga, pu)
    assert isinstance(y, ascendemu.GlobalTensor)
    ref = bf16_gemm(die, a, p)
    _same_bits(y.numpy(), ref)
    _same_bits(bf16_gemm(die, a, pg).numpy(), ref)  # a weight in GM: the result stays in GM
    heads = pack_heads(np.stack([w, w]), gm=die.gm)
    assert all(isinstance(x.data, ascendemu.GlobalTensor) for x in heads)
    yb = batched_bf16_gemm(die, die.gm.from_numpy(np.stack([a, a], axis=1)), heads)
    _same_bits(yb.numpy()[:, 1], ref)


@given(x=st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-3e38, max_value=3e38)
       | st.sampled_from([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8) - 2.0 ** -40, 2.0 ** -133, 0.0]))
def test_round_once_is_nearest_even(x):
    """round_once(float64 → bf16) against a search over the neighbouring bf16 values."""
    y = round_once(np.array([x]))[0]
    bits = int(np.array([y], BF16).view(np.uint16)[0])
    cands = []
    for b in (bits - 1, bits, bits + 1):
        c = np.array([b & 0xFFFF], np.uint16).view(BF16)[0]
        if np.isfinite(float(c)):
            cands.append((abs(float(c) - x), b & 1, float(c)))
    best = min(cands)
    assert abs(float(y) - x) == best[0]
    if sum(1 for c in cands if c[0] == best[0]) > 1 and float(y) != 0.0:
        assert bits & 1 == 0  # a tie goes to the even neighbour


# ------------------------------------------------------------------------------------------------ errors


def _ok():
    rng = np.random.default_rng(0)
    a, w = _operands(rng, (4, 40), (5, 40))
    return a, pack_weight(w)


@pytest.mark.parametrize("change, exc, text", [
    ({"die": "910c"}, TypeError, "die must be an ascendemu.Die, got str"),
    ({"out_dtype": "float16"}, TypeError, "out_dtype 'float16' is not one of bfloat16, float32"),
    ({"a": [[1.0]]}, TypeError, "a must be a numpy array or a GlobalTensor, got list"),
    ({"a": np.zeros((4, 40), np.float32)}, TypeError, "a is float32; it must be bfloat16"),
    ({"a": np.zeros((2, 4, 40), BF16)}, ValueError, "a must be 2-D [M, K], got shape (2, 4, 40)"),
    ({"a": np.zeros((4, 41), BF16)}, ValueError, "w_packed is [5, 40] but a has K = 41; the inner dimensions differ"),
    ({"a": np.zeros((0, 40), BF16)}, ValueError, "every dimension of a must be ≥ 1, got shape (0, 40)"),
    ({"w_packed": np.zeros((5, 40), BF16)}, TypeError, "w_packed must be a PackedWeight from pack_weight()"),
    ({"w_packed": pack_weight(np.zeros((5, 40), np.int8))}, TypeError, "w_packed.data is int8; it must be bfloat16"),
    ({"w_packed": PackedWeight(np.zeros((2, 1, 16, 16), BF16), 5, 40)}, ValueError,
     "w_packed.data has shape (2, 1, 16, 16); a packed [5, 40] weight is (3, 1, 16, 16)"),
    ({"w_packed": [pack_weight(np.zeros((5, 40), BF16))]}, TypeError, "use batched_bf16_gemm for one per head"),
    ({"tiles": GemmTiles(k=24)}, ValueError, "tiles.k = 24 must be a positive multiple of 16"),
    ({"tiles": GemmTiles(m=256, n=128, k=128)}, ValueError, "need 131072 B of L0A"),
])
def test_bf16_gemm_rejects_bad_inputs(change, exc, text):
    a, w = _ok()
    kw = {"die": _die(), "a": a, "w_packed": w}
    kw.update(change)
    with pytest.raises(exc) as info:
        bf16_gemm(**kw)
    assert text in str(info.value)


def test_other_bad_inputs():
    die, other = _die(), _die()
    a, w = _ok()
    with pytest.raises(ValueError, match="a is a GlobalTensor of another die's GM"):
        bf16_gemm(die, other.gm.from_numpy(a), w)
    with pytest.raises(ValueError, match="w_packed lives in another die's GM"):
        bf16_gemm(die, a, pack_weight(np.zeros((5, 40), BF16), gm=other.gm))
    tim = _die(False)
    with pytest.raises(ValueError, match="K = 70000 and N = 5 must be ≤ 65535"):
        bf16_gemm(tim, tim.gm.empty((4, 70000), "bfloat16"), pack_weight(tim.gm.empty((5, 70000), "bfloat16")))
    with pytest.raises(TypeError, match="w_q is float32; it must be int8 .* or bfloat16"):
        pack_weight(np.zeros((3, 4), np.float32))
    with pytest.raises(TypeError, match="w_q is float16; it must be int8"):
        pack_weight(tim.gm.empty((3, 4), "float16"))
    # batched
    wh = pack_heads(np.zeros((2, 5, 40), BF16))
    a3 = np.zeros((4, 2, 40), BF16)
    with pytest.raises(ValueError, match="a has H = 3 heads but 2 weights were given"):
        batched_bf16_gemm(die, np.zeros((4, 3, 40), BF16), wh)
    with pytest.raises(ValueError, match=r"a must be 3-D \[M, H, K\], got shape \(4, 40\)"):
        batched_bf16_gemm(die, np.zeros((4, 40), BF16), wh)
    with pytest.raises(ValueError, match=r"w_packed_heads\[1\] is \[6, 40\] but w_packed_heads\[0\] has N = 5"):
        batched_bf16_gemm(die, a3, [wh[0], pack_weight(np.zeros((6, 40), BF16))])
    with pytest.raises(ValueError, match=r"w_packed_heads\[0\] is \[5, 40\] but a has K = 39"):
        batched_bf16_gemm(die, np.zeros((4, 2, 39), BF16), wh)
    with pytest.raises(TypeError, match="w_packed_heads must be a sequence of PackedWeights"):
        batched_bf16_gemm(die, a3, wh[0])
    with pytest.raises(TypeError, match=r"w_packed_heads\[1\] must be a PackedWeight"):
        batched_bf16_gemm(die, a3, [wh[0], "w"])
    with pytest.raises(ValueError, match="row pitch H·K = 65661 exceeds"):
        batched_bf16_gemm(tim, tim.gm.empty((2, 129, 509), "bfloat16"),
                          pack_heads(np.zeros((129, 5, 509), BF16)))
    with pytest.raises(ValueError, match="every dimension of a must be ≥ 1"):
        batched_bf16_gemm(die, np.zeros((0, 2, 40), BF16), wh)
    with pytest.raises(ValueError, match=r"pack_heads: w_heads must be 3-D \[H, N, K\]"):
        pack_heads(np.zeros((5, 40), BF16))
    with pytest.raises(TypeError, match="pack_heads: w_heads is float64; it must be int8"):
        pack_heads(np.zeros((2, 5, 40)))
    with pytest.raises(ValueError, match=r"packed_heads: nz has shape \(2, 3, 1, 16, 16\); a stack of packed "
                                         r"\[5, 60\] bfloat16 weights is \[H, 4, 1, 16, 16\]"):
        packed_heads(np.zeros((2, 3, 1, 16, 16), BF16), 5, 60)
    with pytest.raises(TypeError, match="packed_heads: nz must be a numpy array or a GlobalTensor, got list"):
        packed_heads([], 5, 40)


def test_a_failed_launch_frees_every_allocation(monkeypatch):
    """Staged operands and the output y are freed when the launch fails (nothing is left in GM); the INT8 GEMM,
    whose host side shares gemm.py's conventions, too."""
    die = _die()
    a, w, wh = _operands(np.random.default_rng(3), (8, 32), (16, 32), (2, 16, 32))

    def fail(*args, **kwargs):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(die, "launch", fail)
    with pytest.raises(RuntimeError, match="launch failed"):
        bf16_gemm(die, a, pack_weight(w))
    with pytest.raises(RuntimeError, match="launch failed"):
        batched_bf16_gemm(die, np.stack([a, a], axis=1), pack_heads(wh))
    a_q, w_q = np.ones((8, 32), np.int8), np.ones((16, 32), np.int8)
    for out in ("bfloat16", "int32"):
        with pytest.raises(RuntimeError, match="launch failed"):
            int8_gemm(die, a_q, np.ones(8, np.float32), pack_weight(w_q), np.ones(16, np.float32), out)
    assert die.gm.in_use == 0


def test_grouped_int8_gemm_without_rows_checks_out_dtype():
    w = pack_weight(np.ones((16, 32), np.int8))
    with pytest.raises(TypeError, match="grouped_int8_gemm: out_dtype 'float16' is not one of bfloat16, int32"):
        grouped_int8_gemm(_die(), np.zeros((0, 32), np.int8), np.zeros(0, np.float32), [0], [w],
                          [np.ones(16, np.float32)], "float16")
