"""The INT8 GEMM family (ops/int8_gemm.py) against NumPy, on a whole die with the race checker on.

Goldens: the int32 accumulator must equal NumPy's int64 product exactly; the bf16 output must equal
`int8_gemm_reference` bit for bit (it follows the kernel's operation order in fp32) and be within one bf16 ulp of a
float64 reference of the same order, (acc · w_scale[n]) · a_scale[m]; weight quantisation must equal an independent
pure-Python implementation exactly.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu
from ascendemu.layouts import nd_to_nz, nd_to_zn
from ascendemu.ops.int8_gemm import (GemmTiles, PackedWeight, grouped_int8_gemm, grouped_int8_gemm_reference,
                                     int8_gemm, int8_gemm_reference, pack_weight, packed_shape, plan_int8_gemm,
                                     quantize_weight_per_channel, unpack_weight)

BF16 = np.dtype(ml_dtypes.bfloat16)

# Tilings that exercise the kernel's paths on small shapes: several k-steps per chunk, several chunks, the L1 ring
# wrapping, resident and streamed B, one and two L0C slots, one-stage L1, AIV row chunks.
TILINGS = [
    None,  # the planner's choice
    GemmTiles(m=32, n=32, k=32, kc=64, stages=2),  # resident B (K ≤ 4 chunks), two L0C slots
    GemmTiles(m=32, n=48, k=32, kc=64, stages=2, resident=False),  # streamed B, ring of 2
    GemmTiles(m=16, n=16, k=64, kc=64, stages=1, resident=False),  # one stage: MTE2 waits for MTE1 each chunk
    GemmTiles(m=128, n=256, k=128, kc=256, stages=2),  # one L0C slot (128 KiB accumulator)
]


def ulp_bf16(x: np.ndarray) -> np.ndarray:
    """Spacing of bf16 at the float64 values x (subnormal spacing below the normal range)."""
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.abs(x)))
    e = np.maximum(np.where(np.isfinite(e), e, -126), -126)
    return np.exp2(e - 7)


def operands(m, n, k, seed, extreme=False):
    rng = np.random.default_rng(seed)
    if extreme:
        a = rng.choice(np.array([-128, -127, 127], np.int8), (m, k))
        w = rng.choice(np.array([-127, 127], np.int8), (n, k))
    else:
        a = rng.integers(-128, 128, (m, k)).astype(np.int8)
        w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    a_scale = np.exp2(rng.uniform(-20, 4, m)).astype(np.float32)
    w_scale = np.exp2(rng.uniform(-20, 4, n)).astype(np.float32)
    return a, a_scale, w, w_scale


def check_bf16(y, a, a_scale, w, w_scale):
    assert y.dtype == BF16 and y.shape == (a.shape[0], w.shape[0])
    ref = int8_gemm_reference(a, a_scale, w, w_scale)
    np.testing.assert_array_equal(y.view(np.uint16), ref.view(np.uint16))
    acc = a.astype(np.int64) @ w.astype(np.int64).T
    exact = (acc.astype(np.float64) * w_scale.astype(np.float64)[None, :]) * a_scale.astype(np.float64)[:, None]
    err = np.abs(y.astype(np.float64) - exact)
    assert np.all(err <= ulp_bf16(exact)), f"max error {np.max(err / ulp_bf16(exact))} ulp"


dims_m, dims_n, dims_k = st.integers(1, 70), st.integers(1, 70), st.integers(1, 200)


@settings(deadline=None)
@given(m=dims_m, n=dims_n, k=dims_k, seed=st.integers(0, 2**32 - 1), extreme=st.booleans(),
       tiles=st.sampled_from(TILINGS))
def test_int32_accumulator_is_exact(m, n, k, seed, extreme, tiles):
    a, a_scale, w, w_scale = operands(m, n, k, seed, extreme)
    die = ascendemu.Die("910c")
    acc = int8_gemm(die, a, a_scale, pack_weight(w), w_scale, "int32", tiles=tiles)
    assert acc.dtype == np.int32
    np.testing.assert_array_equal(acc.astype(np.int64), a.astype(np.int64) @ w.astype(np.int64).T)
    assert die.last_report.flops == 2 * m * n * k


@settings(deadline=None)
@given(m=dims_m, n=dims_n, k=dims_k, seed=st.integers(0, 2**32 - 1), extreme=st.booleans(),
       tiles=st.sampled_from(TILINGS))
def test_bf16_output_within_one_ulp(m, n, k, seed, extreme, tiles):
    a, a_scale, w, w_scale = operands(m, n, k, seed, extreme)
    die = ascendemu.Die("910c")
    check_bf16(int8_gemm(die, a, a_scale, pack_weight(w), w_scale, tiles=tiles), a, a_scale, w, w_scale)


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (1, 70, 200), (1, 300, 33), (2, 1, 31), (17, 33, 32), (16, 16, 64),
                                     (3, 129, 65), (300, 20, 7)])
@pytest.mark.parametrize("out", ["bfloat16", "int32"])
def test_edge_shapes(m, n, k, out):
    """M = 1 (GEMV shape on a Zz L0A: disable_gemv; the second AIV of each group has no rows), K = 1, K below,
    at and past one 32-wide k-block, N tails, more m-tiles than cores."""
    a, a_scale, w, w_scale = operands(m, n, k, m * 1000 + n * 10 + k)
    die = ascendemu.Die("910c")
    y = int8_gemm(die, a, a_scale, pack_weight(w), w_scale, out)
    if out == "int32":
        np.testing.assert_array_equal(y, a.astype(np.int64) @ w.astype(np.int64).T)
    else:
        check_bf16(y, a, a_scale, w, w_scale)


def test_extreme_accumulators():
    """Every product ±16384 (−128 · −128 is allowed: the activation quantiser never makes −128, but the cube
    takes it) and ±16129, summed over K = 200: the largest magnitudes these shapes can produce."""
    for av, wv in ((-128, -128), (-128, 127), (127, 127), (127, -127)):
        a = np.full((33, 200), av, np.int8)
        w = np.full((40, 200), wv, np.int8)
        die = ascendemu.Die("910c")
        acc = int8_gemm(die, a, np.ones(33, np.float32), pack_weight(w), np.ones(40, np.float32), "int32")
        assert np.all(acc == av * wv * 200)
        y = int8_gemm(die, a, np.full(33, 0.5, np.float32), pack_weight(w), np.full(40, 2.0 ** -20, np.float32))
        check_bf16(y, a, np.full(33, 0.5, np.float32), w, np.full(40, 2.0 ** -20, np.float32))


# ----------------------------------------------------------------------------------------- weight quantisation


def quantize_python(w):
    """Independent golden: plain Python floats, Python's round() (half to even), row by row."""
    q = np.zeros(w.shape, np.int8)
    scale = np.zeros(w.shape[0], np.float32)
    for i, row in enumerate(w.astype(np.float64).tolist()):
        amax = max(abs(x) for x in row)
        s = np.float32(amax / 127) if amax > 0 else np.float32(1.0)
        scale[i] = s
        q[i] = [max(-127, min(127, round(x / float(s)))) for x in row]
    return q, scale


@settings(deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float16, BF16, np.float64]), zero_rows=st.integers(0, 3),
       spread=st.floats(-30, 30))
def test_quantize_weight_per_channel_matches_python(n, k, seed, dtype, zero_rows, spread):
    rng = np.random.default_rng(seed)
    big = float(ml_dtypes.finfo(dtype).max) / 4
    w = np.clip(rng.standard_normal((n, k)) * 2.0 ** spread, -big, big).astype(dtype)
    w[rng.permutation(n)[:zero_rows]] = 0
    q, scale = quantize_weight_per_channel(w)
    q_ref, s_ref = quantize_python(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == (n, k) and scale.shape == (n,)
    np.testing.assert_array_equal(scale.view(np.uint32), s_ref.view(np.uint32))
    np.testing.assert_array_equal(q, q_ref)
    assert np.all(np.abs(q) <= 127)
    assert np.all(scale[np.all(w == 0, axis=1)] == 1.0)


def test_quantize_weight_extremes_and_ties():
    w = np.array([[0.0, 0.0, 0.0], [127.0, 0.5, -1.5], [-254.0, 1.0, 3.0], [1e-30, -1e-30, 0.0]], np.float32)
    q, scale = quantize_weight_per_channel(w)
    np.testing.assert_array_equal(scale, np.float32([1.0, 1.0, 2.0, np.float32(1e-30) / np.float32(127)]))
    np.testing.assert_array_equal(q, [[0, 0, 0], [127, 0, -2], [-127, 0, 2], [127, -127, 0]])  # ties to even


def test_pack_weight_layout():
    """The packed weight is Nz with C0 = 32 and byte-identical to Zn(Wᵀ), the L0B operand; unpack inverts it."""
    w = np.random.default_rng(5).integers(-127, 128, (37, 70)).astype(np.int8)
    p = pack_weight(w)
    assert isinstance(p, PackedWeight) and p.shape == (37, 70)
    assert p.data.shape == packed_shape(37, 70) == (3, 3, 16, 32)
    np.testing.assert_array_equal(p.data, nd_to_nz(w))
    np.testing.assert_array_equal(p.data.reshape(-1), nd_to_zn(np.ascontiguousarray(w.T)).reshape(-1))
    np.testing.assert_array_equal(unpack_weight(p), w)
    die = ascendemu.Die("910c")
    g = pack_weight(die.gm.from_numpy(w))
    assert isinstance(g.data, ascendemu.GlobalTensor)
    np.testing.assert_array_equal(g.data.numpy(), p.data)
    tim = ascendemu.Die("910c", functional=False)
    ph = pack_weight(tim.gm.empty((4096, 7168), "int8"))
    assert ph.data.is_phantom and ph.data.shape == (224, 256, 16, 32) and ph.shape == (4096, 7168)


# ----------------------------------------------------------------------------------------------- grouped


group_lists = st.lists(st.one_of(st.just(0), st.integers(1, 8), st.integers(20, 90)), min_size=1, max_size=6)


@settings(deadline=None)
@given(sizes=group_lists, n=st.integers(1, 50), k=st.integers(1, 120), seed=st.integers(0, 2**32 - 1),
       out=st.sampled_from(["bfloat16", "int32"]), tiles=st.sampled_from(TILINGS[:3]))
def test_grouped_matches_reference(sizes, n, k, seed, out, tiles):
    m = sum(sizes)
    if m == 0:
        sizes = sizes + [3]
        m = 3
    rng = np.random.default_rng(seed)
    a, a_scale, _, _ = operands(m, 1, k, seed)
    ws = [rng.integers(-127, 128, (n, k)).astype(np.int8) for _ in sizes]
    ss = [np.exp2(rng.uniform(-20, 4, n)).astype(np.float32) for _ in sizes]
    die = ascendemu.Die("910c")
    y = grouped_int8_gemm(die, a, a_scale, sizes, [pack_weight(w) for w in ws], ss, out, tiles=tiles)
    ref = grouped_int8_gemm_reference(a, a_scale, sizes, ws, ss, out)
    np.testing.assert_array_equal(y.view(np.uint16) if out != "int32" else y,
                                  ref.view(np.uint16) if out != "int32" else ref)
    assert die.last_report.flops == 2 * m * n * k


def test_grouped_balance_with_uneven_and_empty_groups():
    """One huge group, tiny ones and empty ones (timing-only): every AIC gets work, no empty group gets any, and
    the busiest AIC ends within 25 % of the mean (about 7 tiles per core here, so one tile is ~15 %)."""
    sizes, n, k = [0, 3000, 1, 0, 17, 0, 250, 5, 0], 512, 2048
    spec = ascendemu.spec.get("910c")
    plan = plan_int8_gemm(spec, sizes, n, k)
    assert plan.cores_used == 24
    assert {g for items in plan.items for *_, g in items} == {1, 2, 4, 6, 7}
    die = ascendemu.Die("910c", functional=False, checks=ascendemu.Checks(trace=False))
    m = sum(sizes)
    grouped_int8_gemm(die, die.gm.empty((m, k), "int8"), die.gm.empty(m, "float32"), sizes,
                      [pack_weight(die.gm.empty((n, k), "int8")) for _ in sizes],
                      [die.gm.empty(n, "float32") for _ in sizes])
    ends = [c.cycles for c in die.last_report.cores if c.kind == "aic"]
    assert min(c.cube_ops for c in die.last_report.cores if c.kind == "aic") > 0
    assert max(ends) <= 1.25 * np.mean(ends), ends


def test_grouped_all_empty_but_one_and_timing():
    """Functional grouped run on uneven groups equals the timing-only run on phantoms, cycle for cycle."""
    sizes, n, k = [0, 40, 0, 3, 0], 48, 96
    rng = np.random.default_rng(3)
    a, a_scale, _, _ = operands(43, 1, k, 9)
    ws = [rng.integers(-127, 128, (n, k)).astype(np.int8) for _ in sizes]
    ss = [np.ones(n, np.float32) for _ in sizes]
    fun = ascendemu.Die("910c")
    grouped_int8_gemm(fun, a, a_scale, sizes, [pack_weight(w) for w in ws], ss)
    tim = ascendemu.Die("910c", functional=False)
    y = grouped_int8_gemm(tim, tim.gm.empty((43, k), "int8"), tim.gm.empty(43, "float32"), sizes,
                          [pack_weight(tim.gm.empty((n, k), "int8")) for _ in sizes],
                          [tim.gm.empty(n, "float32") for _ in sizes])
    assert y.is_phantom and fun.last_report.cycles == tim.last_report.cycles


# ------------------------------------------------------------------------------------ timing-only and GM use


@pytest.mark.parametrize("m, n, k, out", [(150, 260, 300, "bfloat16"), (1, 90, 70, "bfloat16"), (70, 33, 200, "int32")])
def test_timing_only_cycles_equal_functional(m, n, k, out):
    a, a_scale, w, w_scale = operands(m, n, k, 4)
    fun = ascendemu.Die("910c")
    int8_gemm(fun, a, a_scale, pack_weight(w), w_scale, out)
    tim = ascendemu.Die("910c", functional=False)
    y = int8_gemm(tim, tim.gm.empty((m, k), "int8"), tim.gm.empty(m, "float32"),
                  pack_weight(tim.gm.empty((n, k), "int8")), tim.gm.empty(n, "float32"), out)
    assert y.is_phantom and y.shape == (m, n)
    rf, rt = fun.last_report, tim.last_report
    assert not rt.functional and rt.cycles == rf.cycles
    assert [c.busy for c in rt.cores] == [c.busy for c in rf.cores] and rt.bytes == rf.bytes


def test_global_tensors_in_and_out_and_all_cores():
    m, n, k = 200, 400, 64
    a, a_scale, w, w_scale = operands(m, n, k, 6)
    die = ascendemu.Die("910c")
    y = int8_gemm(die, die.gm.from_numpy(a), die.gm.from_numpy(a_scale), pack_weight(w, gm=die.gm),
                  die.gm.from_numpy(w_scale), tiles=GemmTiles(m=64, n=64, k=64, kc=64))  # 4 × 7 = 28 tiles
    assert isinstance(y, ascendemu.GlobalTensor)
    check_bf16(y.numpy(), a, a_scale, w, w_scale)
    r = die.last_report
    assert len([c for c in r.cores if c.kind == "aic"]) == 24 and len(r.cores) == 72  # 24 groups of 1 AIC + 2 AIV
    assert all(c.cube_ops > 0 for c in r.cores if c.kind == "aic")  # every AIC got work
    assert all(c.vector_elems > 0 for c in r.cores if c.kind == "aiv")


# ---------------------------------------------------------------------------------------------- validation


def _ok(m=4, n=5, k=6):
    return (np.zeros((m, k), np.int8), np.ones(m, np.float32), pack_weight(np.zeros((n, k), np.int8)),
            np.ones(n, np.float32))


@pytest.mark.parametrize("change, exc, text", [
    ({"a_q": np.zeros((4, 6), np.int16)}, TypeError, "a_q is int16; it must be int8"),
    ({"a_q": np.zeros((4, 6), np.float32)}, TypeError, "a_q is float32; it must be int8"),
    ({"a_q": np.zeros((4,), np.int8)}, ValueError, "a_q must be 2-D [M, K], got shape (4,)"),
    ({"a_q": np.zeros((4, 7), np.int8)}, ValueError, "w_packed is [5, 6] but a_q has K = 7"),
    ({"a_q": np.zeros((0, 6), np.int8), "a_scale": np.ones(0, np.float32)}, ValueError, "M and K must be ≥ 1"),
    ({"a_scale": np.ones(4, np.float64)}, TypeError, "a_scale is float64; it must be float32"),
    ({"a_scale": np.ones(3, np.float32)}, ValueError, "a_scale has shape (3,); expected (4,)"),
    ({"w_scale": np.ones(6, np.float32)}, ValueError, "w_scale has shape (6,); expected (5,)"),
    ({"w_scale": np.ones(5, np.float16)}, TypeError, "w_scale is float16; it must be float32"),
    ({"w_packed": np.zeros((5, 6), np.int8)}, TypeError, "w_packed must be a PackedWeight from pack_weight()"),
    ({"w_packed": PackedWeight(np.zeros((1, 1, 16, 32), np.int8), 5, 40)}, ValueError,
     "w_packed.data has shape (1, 1, 16, 32); a packed [5, 40] weight is (2, 1, 16, 32)"),
    ({"out_dtype": "float16"}, TypeError, "out_dtype 'float16' is not one of bfloat16, int32"),
    ({"a_q": [[1, 2]]}, TypeError, "a_q must be a numpy array or a GlobalTensor, got list"),
    ({"tiles": GemmTiles(m=24)}, ValueError, "tiles.m = 24 must be a positive multiple of 16"),
    ({"tiles": GemmTiles(k=48)}, ValueError, "tiles.k = 48 must be a positive multiple of 32"),
    ({"tiles": GemmTiles(m=256, n=256, k=32)}, ValueError, "need 262144 B of L0C"),
])
def test_int8_gemm_rejects_bad_inputs(change, exc, text):
    a, s, w, ws = _ok()
    kw = {"a_q": a, "a_scale": s, "w_packed": w, "w_scale": ws}
    kw.update(change)
    die = ascendemu.Die("910c")
    with pytest.raises(exc) as info:
        int8_gemm(die, **kw)
    assert text in str(info.value)


def test_other_bad_inputs():
    die, other = ascendemu.Die("910c"), ascendemu.Die("910c")
    a, s, w, ws = _ok()
    with pytest.raises(ValueError, match="a_q is a GlobalTensor of another die's GM"):
        int8_gemm(die, other.gm.from_numpy(a), s, w, ws)
    with pytest.raises(ValueError, match="K = 70000 and N = 5 must be ≤ 65535"):
        tim = ascendemu.Die("910c", functional=False)
        int8_gemm(tim, tim.gm.empty((4, 70000), "int8"), tim.gm.empty(4, "float32"),
                  pack_weight(tim.gm.empty((5, 70000), "int8")), tim.gm.empty(5, "float32"))
    with pytest.raises(ValueError, match="group sizes sum to 5 but a_q has M = 4 rows"):
        grouped_int8_gemm(die, a, s, [2, 3], [w, w], [ws, ws])
    with pytest.raises(ValueError, match="group sizes must be ≥ 0"):
        grouped_int8_gemm(die, a, s, [5, -1], [w, w], [ws, ws])
    with pytest.raises(ValueError, match="2 groups but 1 weights and 2 weight scales"):
        grouped_int8_gemm(die, a, s, [2, 2], [w], [ws, ws])
    with pytest.raises(ValueError, match=r"w_packed_list\[1\] is \[7, 6\] but w_packed\[0\] has N = 5"):
        grouped_int8_gemm(die, a, s, [2, 2], [w, pack_weight(np.zeros((7, 6), np.int8))], [ws, ws])
    with pytest.raises(TypeError, match="group_sizes must be a 1-D sequence of ints"):
        grouped_int8_gemm(die, a, s, [2.0, 2.0], [w, w], [ws, ws])
    with pytest.raises(TypeError, match="use grouped_int8_gemm for several"):
        int8_gemm(die, a, s, [w, w], ws)
    with pytest.raises(TypeError, match="w must be 2-D|w is int8"):
        quantize_weight_per_channel(np.zeros((3, 4), np.int8))
    with pytest.raises(ValueError, match="w must be 2-D"):
        quantize_weight_per_channel(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight_per_channel(np.array([[1.0, np.inf]], np.float32))
    with pytest.raises(TypeError, match="w_q is float32; it must be int8"):
        pack_weight(np.zeros((3, 4), np.float32))


def test_grouped_with_every_group_empty_returns_an_empty_result():
    """A die whose local experts received no token: nothing to launch, an empty [0, N] result."""
    die = ascendemu.Die("910c")
    w = np.ones((24, 40), np.float32)
    q, s = quantize_weight_per_channel(w)
    out = grouped_int8_gemm(die, np.zeros((0, 40), np.int8), np.zeros(0, np.float32), [0, 0],
                            [pack_weight(q), pack_weight(q)], [s, s])
    assert out.shape == (0, 24) and out.dtype == ml_dtypes.bfloat16
