"""Per-token INT8 quantisation (ops/quant.py) on a 910C die's AIV, against its NumPy reference, bit for bit.

The reference is the rule of the module docstring written in NumPy fp32: scale = max|x| / 127,
q = clip(rint(x / max(scale, 2⁻¹⁴⁹)), −127, 127). The kernel reaches rint through fp32 → fp16 (round to odd)
→ int8 (RINT); `test_cast_chain_is_rint` checks that claim on the cast semantics alone.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu
from ascendemu import RoundMode
from ascendemu.numerics import cast
from ascendemu.ops.quant import TINY, quantize_per_token, quantize_per_token_reference
from ascendemu.ops.rowwise import RowTiling

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
# long rows chunked and resident, streamed (read twice), short-row tiles off, and the automatic choice
TILINGS = [None, RowTiling(chunk=64), RowTiling(chunk=128, resident=False), RowTiling(group=False),
           RowTiling(chunk=256, scale_rows=8)]


def values(rng, shape, dtype, kind):
    """Test inputs: 'normal' at a random scale, 'bits' = random finite bit patterns (huge, tiny, subnormal),
    'ints' = small integers (ties), 'sparse' = mostly zero (all-zero rows, single nonzeros)."""
    dt = np.dtype(dtype)
    if kind == "normal":  # up to ~2⁴ · 2¹⁰ = 16384 for fp16, ~2²⁴ for bf16: always finite
        return (rng.standard_normal(shape) * 2.0 ** rng.integers(-20, 11 if dt == F16 else 21)).astype(dt)
    if kind == "bits":
        b = rng.integers(0, 1 << 16, shape, dtype=np.uint32).astype(np.uint16).view(dt)
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(b.astype(np.float64)), b, dt.type(0)).astype(dt)
    if kind == "ints":
        return rng.integers(-300, 301, shape).astype(dt)
    x = (rng.standard_normal(shape) * 10).astype(dt)
    return np.where(rng.random(shape) < 0.97, dt.type(0), x).astype(dt)


def assert_same(q, scale, x):
    qr, sr = quantize_per_token_reference(x)
    assert q.dtype == np.int8 and q.shape == x.shape and scale.dtype == np.float32 and scale.shape == x.shape[:1]
    bad = np.argwhere(q != qr)
    assert not bad.size, f"q differs at {bad[:5].tolist()}: got {q[tuple(bad[0])]}, expected {qr[tuple(bad[0])]}"
    assert np.array_equal(scale.view(np.uint32), sr.view(np.uint32)), (scale, sr)


@settings(deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 600), dtype=st.sampled_from([BF16, F16]),
       kind=st.sampled_from(["normal", "bits", "ints", "sparse"]), tiling=st.sampled_from(TILINGS),
       seed=st.integers(0, 2**32 - 1))
def test_matches_reference(m, k, dtype, kind, tiling, seed):
    x = values(np.random.default_rng(seed), (m, k), dtype, kind)
    q, scale = quantize_per_token(ascendemu.Die("910c"), x, tiling=tiling)
    assert_same(q, scale, x)


@pytest.mark.parametrize("m,k,tiling", [(1000, 100, RowTiling(scale_rows=8)), (1000, 64, RowTiling(scale_rows=16)),
                                        (1000, 64, RowTiling(scale_rows=24)), (500, 512, None),
                                        (400, 64, RowTiling(chunk=4096, scale_rows=8)),
                                        (300, 192, RowTiling(chunk=1024, scale_rows=8))])
def test_many_rows_per_core(m, k, tiling):
    """Several tiles per core, partial last tiles and several scale flushes per core."""
    x = values(np.random.default_rng(m + k), (m, k), BF16, "normal")
    q, scale = quantize_per_token(ascendemu.Die("910c"), x, tiling=tiling)
    assert_same(q, scale, x)


def _special(dtype):
    dt = np.dtype(dtype)
    fi = ml_dtypes.finfo(dt)
    big, tiny, sub = float(fi.max), float(fi.smallest_normal), float(fi.smallest_subnormal)
    rows = [
        np.zeros(200),                                            # all zero: q = 0, scale 0
        -np.zeros(200),                                           # all −0
        np.eye(1, 200, 37)[0] * -3.0,                             # a single nonzero
        np.linspace(-big, big, 200),                              # up to the largest finite value
        np.full(200, big),
        np.linspace(-tiny, tiny, 200),                            # around the smallest normal
        np.arange(200) % 3 * sub,                                 # subnormals only
        np.where(np.arange(200) == 5, sub, 0.0),                  # one smallest subnormal: scale underflows to 0?
        np.where(np.arange(200) % 2, big, sub),                   # both ends in one row
    ]
    return np.array(rows).astype(dt)


@pytest.mark.parametrize("tiling", [None, RowTiling(chunk=64, resident=False)])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_extreme_values(dtype, tiling):
    x = _special(dtype)
    q, scale = quantize_per_token(ascendemu.Die("910c"), x, tiling=tiling)
    assert_same(q, scale, x)
    assert scale[0] == 0 and scale[1] == 0 and not q[:2].any()  # zero rows: scale 0.0, q 0
    assert q[2, 37] == -127 and np.count_nonzero(q[2]) == 1
    assert np.abs(q).max() <= 127 and (np.abs(q).max(axis=1)[2:] == 127).all()  # every nonzero row reaches ±127
    assert (scale[2:] > 0).all()  # a nonzero row never gets scale 0 (the smallest subnormal / 127 ≥ 2⁻¹⁴⁹)


def test_ties_round_to_even():
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.5, -125.5]], BF16)  # scale = 1 exactly
    q, scale = quantize_per_token(ascendemu.Die("910c"), x)
    assert scale.tolist() == [1.0]
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, 4, -126]]


def test_cast_chain_is_rint():
    """fp32 → fp16 (CAST_ODD) → clamp ±127 in fp16 → int8 (CAST_RINT) equals clip(rint(v), −127, 127)."""
    rng = np.random.default_rng(7)
    v = np.concatenate([rng.uniform(-200, 200, 200_000), np.arange(-260, 261) / 2, rng.standard_normal(10_000) * 1e-30,
                        [3e38, -3e38, 65519.0, 65520.0, 127.5, -127.5, 127.49999, 0.49999997, 2.5000002]])
    v = v.astype(np.float32)
    h = cast(v, np.float16, RoundMode.CAST_ODD)
    h = np.minimum(np.maximum(h, np.float16(-127)), np.float16(127))
    got = cast(h, np.int8, RoundMode.CAST_RINT)
    expected = np.clip(np.rint(v.astype(np.float64)), -127, 127).astype(np.int8)
    assert np.array_equal(got, expected)


def test_zero_row_rule_in_reference():
    q, scale = quantize_per_token_reference(np.zeros((2, 5), BF16))
    assert scale.tolist() == [0.0, 0.0] and not q.any() and TINY == 2.0 ** -149


@pytest.mark.parametrize("m,k,tiling", [(1, 1, None), (40, 600, None), (96, 7168, None), (50, 512, None),
                                        (7, 1000, RowTiling(chunk=256, resident=False)), (100, 64, None)])
def test_timing_only_matches_functional(m, k, tiling):
    x = values(np.random.default_rng(m * k), (m, k), BF16, "normal")
    fun = ascendemu.Die("910c")
    quantize_per_token(fun, x, tiling=tiling)
    timing = ascendemu.Die("910c", functional=False)
    q, scale = quantize_per_token(timing, timing.gm.empty((m, k), "bfloat16"), tiling=tiling)
    assert q.is_phantom and scale.is_phantom and q.shape == (m, k) and scale.shape == (m,)
    assert timing.last_report.cycles == fun.last_report.cycles
    assert len(fun.last_report.cores) == min(48, m)  # rows are split over every AIV
    assert fun.last_report.hbm_bytes >= m * k * 3


def test_numpy_input_on_a_timing_only_die_gives_phantoms():
    die = ascendemu.Die("910c", functional=False)
    q, scale = quantize_per_token(die, np.ones((4, 32), BF16))
    assert q.is_phantom and scale.is_phantom and die.last_report.cycles > 0


def test_global_tensors_in_and_out():
    die = ascendemu.Die("910c")
    x = values(np.random.default_rng(1), (9, 100), F16, "normal")
    q, scale = quantize_per_token(die, die.gm.from_numpy(x))
    assert isinstance(q, ascendemu.GlobalTensor) and isinstance(scale, ascendemu.GlobalTensor)
    assert_same(q.numpy(), scale.numpy(), x)
    assert die.last_report.kernel == "quantize_per_token_kernel"


@pytest.mark.parametrize("x,err,msg", [
    (np.zeros(8, BF16), ValueError, "must be 2-D"),
    (np.zeros((2, 2, 2), BF16), ValueError, "must be 2-D"),
    (np.zeros((0, 8), BF16), ValueError, "at least one row"),
    (np.zeros((2, 0), BF16), ValueError, "at least one row"),
    (np.zeros((2, 8), np.float32), TypeError, "x is float32; it must be bfloat16 or float16"),
    (np.zeros((2, 8), np.int8), TypeError, "x is int8"),
    ([[1.0, 2.0]], TypeError, "numpy array or a GlobalTensor"),
])
def test_rejects_bad_inputs(x, err, msg):
    with pytest.raises(err, match=msg):
        quantize_per_token(ascendemu.Die("910c"), x)


@pytest.mark.parametrize("tiling,msg", [
    (RowTiling(chunk=100), "multiple of 64"),
    (RowTiling(chunk=0), "multiple of 64"),
    (RowTiling(scale_rows=12), "scale_rows"),
    (RowTiling(resident="yes"), "resident"),
    ("big", "must be a RowTiling"),
])
def test_rejects_bad_tiling(tiling, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        quantize_per_token(ascendemu.Die("910c"), np.zeros((2, 8), BF16), tiling=tiling)


@pytest.mark.parametrize("k", [30000, 33000, 45000])
def test_long_rows_near_the_ub_limit(k):
    """The planner's UB accounting matches what the kernel allocates: no AllocationError near the limit."""
    die = ascendemu.Die("910c", functional=False)
    quantize_per_token(die, die.gm.empty((3, k), "bfloat16"))
    assert die.last_report.hbm_bytes >= 3 * k * 3


def test_rejects_a_row_too_long_to_keep_in_ub():
    die = ascendemu.Die("910c", functional=False)
    with pytest.raises(ValueError, match="need .* B of UB"):
        quantize_per_token(die, die.gm.empty((2, 60000), "bfloat16"), tiling=RowTiling(resident=True))
    q, _ = quantize_per_token(die, die.gm.empty((2, 60000), "bfloat16"))  # streamed: reads x twice
    assert die.last_report.hbm_bytes >= 2 * 60000 * (2 + 2 + 1)
