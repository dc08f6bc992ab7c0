"""RMSNorm and residual-add + RMSNorm (ops/norm.py) on a 910C die's AIV, with Hugging Face's numerics.

Exact: y and the new residual equal `rmsnorm_reference` / `add_rmsnorm_reference` bit for bit, whose fp32
sum of squares follows the kernel's stated order (rowwise.fold_chunk per chunk, then a 64-lane tree).
Tolerance: against HF's formula in float64 (normalise, round to the dtype, multiply by the weight, round),
y is within 2 ulps of the dtype: the fp32 Σx² and rsqrt move the normalised value by a few fp32 ulps, which
can flip each of the two roundings to the dtype by one ulp.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu
from ascendemu.ops.norm import add_rmsnorm, add_rmsnorm_reference, rmsnorm, rmsnorm_reference
from ascendemu.ops.rowwise import RowTiling, fold_sum_reference

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
TILINGS = [None, RowTiling(chunk=64), RowTiling(chunk=128, resident=False), RowTiling(group=False)]


def values(rng, shape, dtype, kind):
    dt = np.dtype(dtype)
    if kind == "normal":  # finite in fp16 too
        return (rng.standard_normal(shape) * 2.0 ** rng.integers(-12, 9 if dt == F16 else 30)).astype(dt)
    if kind == "ints":
        return rng.integers(-8, 9, shape).astype(dt)
    x = (rng.standard_normal(shape) * 3).astype(dt)
    return np.where(rng.random(shape) < 0.95, dt.type(0), x).astype(dt)


def bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint16), b.view(np.uint16))


def ulps(a, b, dtype) -> np.ndarray:
    """|a − b| in ulps of `dtype` at b."""
    fi = ml_dtypes.finfo(dtype)
    b = b.astype(np.float64)
    e = np.floor(np.log2(np.maximum(np.abs(b), float(fi.smallest_normal))))
    return np.abs(a.astype(np.float64) - b) / np.exp2(e - fi.nmant)


@settings(deadline=None)
@given(m=st.integers(1, 40), h=st.integers(1, 600), dtype=st.sampled_from([BF16, F16]),
       kind=st.sampled_from(["normal", "ints", "sparse"]), eps=st.sampled_from([1e-6, 1e-5, 0.5]),
       tiling=st.sampled_from(TILINGS), seed=st.integers(0, 2**32 - 1))
def test_rmsnorm_matches_reference(m, h, dtype, kind, eps, tiling, seed):
    rng = np.random.default_rng(seed)
    x, w = values(rng, (m, h), dtype, kind), values(rng, (h,), dtype, "normal")
    y = rmsnorm(ascendemu.Die("910c"), x, w, eps, tiling=tiling)
    assert bits_equal(y, rmsnorm_reference(x, w, eps, tiling=tiling))


@settings(deadline=None)
@given(m=st.integers(1, 40), h=st.integers(1, 600), dtype=st.sampled_from([BF16, F16]),
       kind=st.sampled_from(["normal", "ints", "sparse"]), tiling=st.sampled_from(TILINGS),
       seed=st.integers(0, 2**32 - 1))
def test_add_rmsnorm_matches_reference(m, h, dtype, kind, tiling, seed):
    rng = np.random.default_rng(seed)
    x, r, w = values(rng, (m, h), dtype, kind), values(rng, (m, h), dtype, kind), values(rng, (h,), dtype, "normal")
    y, new_r = add_rmsnorm(ascendemu.Die("910c"), x, r, w, 1e-6, tiling=tiling)
    y_ref, r_ref = add_rmsnorm_reference(x, r, w, 1e-6, tiling=tiling)
    assert bits_equal(new_r, r_ref) and bits_equal(y, y_ref)


@pytest.mark.parametrize("m,h", [(1000, 64), (600, 100), (300, 512), (200, 2048)])
def test_many_rows_per_core(m, h):
    """Several tiles per core (short-row tiles of several rows for H = 64, 512, 2048) and partial last tiles."""
    rng = np.random.default_rng(m + h)
    x, r = values(rng, (m, h), BF16, "normal"), values(rng, (m, h), BF16, "normal")
    w = values(rng, (h,), BF16, "normal")
    y, new_r = add_rmsnorm(ascendemu.Die("910c"), x, r, w)
    y_ref, r_ref = add_rmsnorm_reference(x, r, w)
    assert bits_equal(new_r, r_ref) and bits_equal(y, y_ref)
    assert bits_equal(rmsnorm(ascendemu.Die("910c"), x, w), rmsnorm_reference(x, w))


@pytest.mark.parametrize("h", [7168, 1024, 200])
def test_close_to_hf_in_float64(h):
    rng = np.random.default_rng(h)
    x, w = values(rng, (40, h), BF16, "normal"), (1 + rng.standard_normal(h) * 0.1).astype(BF16)
    y = rmsnorm(ascendemu.Die("910c"), x, w)
    x64 = x.astype(np.float64)
    n = (x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-6)).astype(BF16)
    hf = (n.astype(np.float64) * w.astype(np.float64)).astype(BF16)
    assert ulps(y, hf, BF16).max() <= 2


def test_sum_order_is_the_stated_one():
    """Σ of 600 values with chunk 128, written out independently: per chunk, pairwise trees of 8 (the last
    block padded with 0), added lane-wise into 64 zeroed lanes; then a pairwise tree of the 64 lanes."""
    def tree(a):
        a = np.asarray(a, np.float32)
        while a.shape[-1] > 1:
            a = (a[..., 0::2] + a[..., 1::2]).astype(np.float32)
        return a[..., 0]

    v = np.random.default_rng(0).standard_normal((3, 600)).astype(np.float32)
    run = np.zeros((3, 64), np.float32)
    for c0 in range(0, 600, 128):
        c = v[:, c0:c0 + 128]
        c = np.concatenate([c, np.zeros((3, -c.shape[1] % 8), np.float32)], axis=1)
        sums = tree(c.reshape(3, -1, 8))
        run[:, :sums.shape[1]] = (run[:, :sums.shape[1]] + sums).astype(np.float32)
    assert np.array_equal(fold_sum_reference(v, 128), tree(run))
    assert not np.array_equal(fold_sum_reference(v, 128), fold_sum_reference(v, 64))  # the order shows
    x = v.astype(BF16)
    w = np.ones(600, BF16)
    for tiling in (RowTiling(chunk=128), RowTiling(chunk=128, resident=False)):
        y = rmsnorm(ascendemu.Die("910c"), x, w, tiling=tiling)
        assert bits_equal(y, rmsnorm_reference(x, w, tiling=tiling))


def test_extreme_values():
    fi = ml_dtypes.finfo(BF16)
    h = 300
    rows = np.array([np.zeros(h),                          # zero row: rs = rsqrt(ε), y = 0
                     np.full(h, float(fi.max)),            # x² overflows fp32: Σ = inf, rs = 0, y = 0
                     np.full(h, 1e20),                     # Σ = 3e42 overflows fp32 too
                     np.full(h, 1e-30),                    # x² underflows: y = x · rsqrt(ε)
                     np.eye(1, h, 7)[0] * 3.0,             # a single nonzero
                     np.linspace(-1e15, 1e15, h)]).astype(BF16)
    w = np.full(h, 2.0, BF16)
    y = rmsnorm(ascendemu.Die("910c"), rows, w)
    assert bits_equal(y, rmsnorm_reference(rows, w))
    assert not y[:3].astype(np.float32).any() and np.isfinite(y.astype(np.float32)).all()
    y0 = rmsnorm(ascendemu.Die("910c"), rows[:1], w, 0.0)  # zero row, ε = 0: 0 · rsqrt(0) = 0 · inf = NaN
    assert bits_equal(y0, rmsnorm_reference(rows[:1], w, 0.0)) and np.isnan(y0.astype(np.float32)).all()


def test_add_rmsnorm_rounds_the_residual_like_torch():
    x = np.array([[1.0, 256.0, -3.0, 1e-3]], BF16)
    r = np.array([[2.0 ** -8, 1.0, 3.0, 0.0]], BF16)
    _, new_r = add_rmsnorm(ascendemu.Die("910c"), x, r, np.ones(4, BF16))
    expected = (x.astype(np.float32) + r.astype(np.float32)).astype(BF16)  # fp32 add, then one rounding
    assert bits_equal(new_r, expected) and new_r[0, 1] == 256 and new_r[0, 2] == 0


@pytest.mark.parametrize("m,h,tiling", [(1, 1, None), (40, 600, None), (96, 7168, None), (50, 512, None),
                                        (7, 1000, RowTiling(chunk=256, resident=False))])
@pytest.mark.parametrize("add", [False, True])
def test_timing_only_matches_functional(m, h, tiling, add):
    rng = np.random.default_rng(m + h)
    x, r, w = values(rng, (m, h), BF16, "normal"), values(rng, (m, h), BF16, "normal"), values(rng, (h,), BF16, "ints")
    fun = ascendemu.Die("910c")
    timing = ascendemu.Die("910c", functional=False)
    ph = [timing.gm.empty(a.shape, "bfloat16") for a in (x, r, w)]
    if add:
        add_rmsnorm(fun, x, r, w, tiling=tiling)
        y, new_r = add_rmsnorm(timing, *ph, tiling=tiling)
        assert new_r.is_phantom and new_r.shape == (m, h)
    else:
        rmsnorm(fun, x, w, tiling=tiling)
        y = rmsnorm(timing, ph[0], ph[2], tiling=tiling)
    assert y.is_phantom and y.shape == (m, h)
    assert timing.last_report.cycles == fun.last_report.cycles
    assert len(fun.last_report.cores) == min(48, m)


def test_global_tensors_in_and_out():
    die = ascendemu.Die("910c")
    rng = np.random.default_rng(5)
    x, r = values(rng, (9, 100), F16, "normal"), values(rng, (9, 100), F16, "normal")
    w = values(rng, (100,), F16, "ints")
    y, new_r = add_rmsnorm(die, die.gm.from_numpy(x), die.gm.from_numpy(r), w)
    assert isinstance(y, ascendemu.GlobalTensor) and isinstance(new_r, ascendemu.GlobalTensor)
    y_ref, r_ref = add_rmsnorm_reference(x, r, w)
    assert bits_equal(y.numpy(), y_ref) and bits_equal(new_r.numpy(), r_ref)


@pytest.mark.parametrize("h", [18432, 30000])
def test_long_rows_timing_only(h):
    """Rows beyond the resident limit are streamed (add_rmsnorm reads the new residual back from GM)."""
    die = ascendemu.Die("910c", functional=False)
    y, r = add_rmsnorm(die, *(die.gm.empty(s, "bfloat16") for s in ((3, h), (3, h), (h,))))
    assert y.is_phantom and die.last_report.hbm_bytes >= 3 * h * 2 * 4


X = np.zeros((2, 8), BF16)
W = np.zeros(8, BF16)


@pytest.mark.parametrize("args,err,msg", [
    ((np.zeros(8, BF16), W), ValueError, "x must be 2-D"),
    ((X.astype(np.float32), W), TypeError, "x is float32; it must be bfloat16 or float16"),
    ((X, np.zeros(9, BF16)), ValueError, "weight has shape \\(9,\\); it must be \\[H\\] = \\(8,\\)"),
    ((X, np.zeros((1, 8), BF16)), ValueError, "weight has shape"),
    ((X, np.zeros(8, np.float16)), TypeError, "weight is float16; it must be bfloat16"),
    ((X, [0.0] * 8), TypeError, "weight must be a numpy array"),
    ((X, W, -1.0), ValueError, "eps must be a finite number ≥ 0"),
    ((X, W, float("nan")), ValueError, "eps must be a finite number ≥ 0"),
    ((X, W, "1e-6"), ValueError, "eps must be a finite number ≥ 0"),
])
def test_rmsnorm_rejects_bad_inputs(args, err, msg):
    with pytest.raises(err, match=msg):
        rmsnorm(ascendemu.Die("910c"), *args)


@pytest.mark.parametrize("residual,err,msg", [
    (np.zeros((2, 9), BF16), ValueError, "residual has shape \\(2, 9\\); it must match x"),
    (np.zeros((2, 8), np.float16), TypeError, "residual is float16; it must be bfloat16"),
    (np.zeros(8, BF16), ValueError, "residual must be 2-D"),
])
def test_add_rmsnorm_rejects_bad_residual(residual, err, msg):
    with pytest.raises(err, match=msg):
        add_rmsnorm(ascendemu.Die("910c"), X, residual, W)
