"""Tests of ascendemu.layouts (reference sections 16 and 17).

References are written here independently of the implementation: offsets
come from the reference's table, typed out again below.
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ascendemu import layouts as L
from ascendemu.layouts import fractal as F

DTYPES = ["float16", "bfloat16", "float32", "int8", "int32"]
ALL_DTYPES = DTYPES + ["uint8", "int16"]
C0 = {"float16": 16, "bfloat16": 16, "float32": 8, "int8": 32, "int32": 8, "uint8": 32, "int16": 16}
NP_DTYPE = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "int8": np.dtype(np.int8),
    "int32": np.dtype(np.int32),
    "uint8": np.dtype(np.uint8),
    "int16": np.dtype(np.int16),
}

dims = st.integers(1, 70)
dtypes = st.sampled_from(DTYPES)
methods = st.sampled_from(["numpy", "jit"])
batches = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


def rand_array(shape, dtype, seed):
    """Random raw bytes (includes NaN/inf patterns for floats)."""
    dt = NP_DTYPE[dtype]
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def cdiv(a, b):
    return (a + b - 1) // b


# ---- independent offset formulas (reference section 16 table) -------------


def ref_nz_off(r, c, R, c0):
    R1 = cdiv(R, 16)
    return (c // c0) * (R1 * 16 * c0) + (r // 16) * (16 * c0) + (r % 16) * c0 + c % c0


def ref_zz_off(m, k, K, c0):
    K1 = cdiv(K, c0)
    return (m // 16) * (K1 * 16 * c0) + (k // c0) * (16 * c0) + (m % 16) * c0 + k % c0


def ref_zn_off(k, n, N, c0):
    N1 = cdiv(N, 16)
    return (k // c0) * (N1 * 16 * c0) + (n // 16) * (16 * c0) + (n % 16) * c0 + k % c0


def ref_convert(x, off_fn, size):
    """Scatter 2-D x into a zero buffer of `size` elements at off_fn(r, c)."""
    out = np.zeros(size, dtype=x.dtype)
    r, c = np.indices(x.shape)
    out[off_fn(r.ravel(), c.ravel())] = x.ravel()
    return out


# ---- dtypes and shapes -----------------------------------------------------


@pytest.mark.parametrize("name", ALL_DTYPES)
def test_c0_of_names_dtypes_and_types(name):
    dt = NP_DTYPE[name]
    assert L.c0_of(name) == C0[name]
    assert L.c0_of(dt) == C0[name]
    assert L.c0_of(dt.type) == C0[name]


def test_c0_of_bfloat16_type():
    assert L.c0_of(ml_dtypes.bfloat16) == 16


@pytest.mark.parametrize("bad", ["float64", "int64", "foo", np.float64, ml_dtypes.int4, ">f2", np.dtype(">f2")])
def test_c0_of_unsupported(bad):
    name = bad if isinstance(bad, str) else np.dtype(bad).name
    with pytest.raises(ValueError, match="unsupported dtype") as info:
        L.c0_of(bad)
    assert name in str(info.value) or np.dtype(bad).str in str(info.value)


@settings(deadline=None)
@given(a=st.integers(0, 10**6), b=st.integers(1, 1000))
def test_ceil_div_round_up(a, b):
    q = L.ceil_div(a, b)
    assert (q - 1) * b < a <= q * b or (a == 0 and q == 0)
    r = L.round_up(a, b)
    assert r % b == 0 and r >= a and r - a < b


def test_ceil_div_errors():
    with pytest.raises(ValueError, match="b must be > 0"):
        L.ceil_div(3, 0)
    with pytest.raises(ValueError, match="a must be >= 0"):
        L.ceil_div(-1, 4)
    with pytest.raises(ValueError, match="must be an integer"):
        L.round_up(2.5, 4)


@settings(deadline=None)
@given(r=st.integers(0, 300), c=st.integers(0, 300), dtype=st.sampled_from(ALL_DTYPES))
def test_shapes(r, c, dtype):
    c0 = C0[dtype]
    r1, c1 = cdiv(r, 16), cdiv(c, c0)
    assert L.nz_shape(r, c, dtype) == (c1, r1, 16, c0)
    assert L.zz_shape(r, c, dtype) == (r1, c1, 16, c0)
    # Zn of B[K=r, N=c]: (K1, N1, 16, K0)
    assert L.zn_shape(r, c, dtype) == (cdiv(r, c0), cdiv(c, 16), 16, c0)
    assert L.fractal_count(r, c, dtype) == r1 * c1
    assert L.padded_shape(r, c, dtype) == (r1 * 16, c1 * c0)


@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_l0c_shape_c0_override(dtype):
    # L0C fractal is always 16 x 16
    assert L.nz_shape(20, 40, dtype, c0=16) == (3, 2, 16, 16)
    assert L.nz_shape(20, 40, dtype) == (5, 2, 16, 8)
    assert L.padded_shape(20, 40, dtype, c0=16) == (32, 48)
    assert L.fractal_count(20, 40, dtype, c0=16) == 6


def test_int8_weight_shape_from_reference():
    # int8 weight [16384, 7168] in NZ has shape [224, 1024, 16, 32]
    assert L.nz_shape(16384, 7168, "int8") == (224, 1024, 16, 32)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: L.nz_shape(-1, 4, "float16"), "nz_shape: rows must be >= 0"),
        (lambda: L.nz_shape(4, 2.0, "float16"), "nz_shape: cols must be an integer"),
        (lambda: L.zz_shape(4, -3, "float16"), "zz_shape: k must be >= 0"),
        (lambda: L.zn_shape(4, 4, "float64"), "zn_shape: unsupported dtype 'float64'"),
        (lambda: L.nz_shape(4, 4, "float32", c0=0), "nz_shape: c0 must be > 0"),
        (lambda: L.padded_shape(True, 4, "int8"), "rows must be an integer"),
    ],
)
def test_shape_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- offsets ----------------------------------------------------------------


def test_worked_example_20x40_fp16():
    """Reference section 16 worked example, exact numbers."""
    table = {
        (0, 0): (0, 0, 0),
        (0, 16): (512, 256, 256),
        (16, 0): (256, 768, 768),
        (5, 20): (596, 340, 325),
        (19, 39): (1335, 1335, 1395),
    }
    for (r, c), (nz, zz, zn) in table.items():
        assert L.nz_offset(r, c, 20, 40, "float16") == nz
        assert L.zz_offset(r, c, 20, 40, "float16") == zz
        assert L.zn_offset(r, c, 20, 40, "float16") == zn
    assert L.nz_shape(20, 40, "float16") == (3, 2, 16, 16)
    x = np.arange(20 * 40, dtype=np.float16).reshape(20, 40) + 1
    x_nz = L.nd_to_nz(x)
    assert x_nz.shape == (3, 2, 16, 16) and x_nz.size == 1536 and x_nz.nbytes == 3072
    assert x_nz.ravel()[596] == x[5, 20] and x_nz.ravel()[1335] == x[19, 39]
    assert L.nd_to_zz(x).ravel()[340] == x[5, 20]
    assert L.nd_to_zn(x).ravel()[325] == x[5, 20]
    assert L.nd_to_zn(x).ravel()[1395] == x[19, 39]
    # rows 20..31 and columns 40..47 are zeros
    padded = x_nz.transpose(1, 2, 0, 3).reshape(32, 48)
    assert not padded[20:].any() and not padded[:, 40:].any()


@settings(deadline=None)
@given(R=dims, C=dims, dtype=st.sampled_from(ALL_DTYPES), data=st.data())
def test_offsets_scalar_and_vectorised(R, C, dtype, data):
    c0 = C0[dtype]
    r = data.draw(st.integers(0, R - 1))
    c = data.draw(st.integers(0, C - 1))
    assert L.nz_offset(r, c, R, C, dtype) == ref_nz_off(r, c, R, c0)
    assert L.zz_offset(r, c, R, C, dtype) == ref_zz_off(r, c, C, c0)
    assert L.zn_offset(r, c, R, C, dtype) == ref_zn_off(r, c, C, c0)
    assert isinstance(L.nz_offset(r, c, R, C, dtype), int)
    rr, cc = np.indices((R, C))
    np.testing.assert_array_equal(L.nz_offset(rr, cc, R, C, dtype), ref_nz_off(rr, cc, R, c0))
    np.testing.assert_array_equal(L.zz_offset(rr, cc, R, C, dtype), ref_zz_off(rr, cc, C, c0))
    np.testing.assert_array_equal(L.zn_offset(rr, cc, R, C, dtype), ref_zn_off(rr, cc, C, c0))


def test_offset_errors():
    with pytest.raises(IndexError, match=r"nz_offset: r=20 out of range \[0, 20\)"):
        L.nz_offset(20, 0, 20, 40, "float16")
    with pytest.raises(IndexError, match=r"zz_offset: k=-1 out of range"):
        L.zz_offset(0, -1, 20, 40, "float16")
    with pytest.raises(IndexError, match=r"zn_offset: n=40 out of range"):
        L.zn_offset(0, np.array([0, 40]), 20, 40, "float16")
    with pytest.raises(ValueError, match="nz_offset: r must be integer"):
        L.nz_offset(1.5, 0, 20, 40, "float16")
    with pytest.raises(ValueError, match="unsupported dtype"):
        L.nz_offset(0, 0, 20, 40, "float64")


# ---- conversions: reference layout, round trips ----------------------------


@settings(deadline=None)
@given(batch=batches, M=dims, N=dims, dtype=dtypes, method=methods, seed=st.integers(0, 2**32 - 1))
def test_nz_matches_reference_and_round_trips(batch, M, N, dtype, method, seed):
    c0 = C0[dtype]
    x = rand_array((*batch, M, N), dtype, seed)
    x_nz = L.nd_to_nz(x, method=method)
    assert x_nz.shape == (*batch, cdiv(N, c0), cdiv(M, 16), 16, c0)
    assert x_nz.dtype == x.dtype and x_nz.flags.c_contiguous
    size = int(np.prod(L.nz_shape(M, N, dtype)))
    flat = x_nz.reshape(-1, size)
    for i, x2 in enumerate(x.reshape(-1, M, N)):
        ref = ref_convert(x2, lambda r, c: ref_nz_off(r, c, M, c0), size)
        assert same_bytes(flat[i], ref)  # includes: padding is zero
    back = L.nz_to_nd(x_nz, x.shape, method=method)
    assert same_bytes(back, x)


@settings(deadline=None)
@given(M=dims, K=dims, dtype=dtypes, method=methods, seed=st.integers(0, 2**32 - 1))
def test_zz_matches_reference_and_round_trips(M, K, dtype, method, seed):
    c0 = C0[dtype]
    a = rand_array((M, K), dtype, seed)
    a_zz = L.nd_to_zz(a, method=method)
    assert a_zz.shape == (cdiv(M, 16), cdiv(K, c0), 16, c0)
    ref = ref_convert(a, lambda m, k: ref_zz_off(m, k, K, c0), a_zz.size)
    assert same_bytes(a_zz.ravel(), ref)
    assert same_bytes(L.zz_to_nd(a_zz, (M, K), method=method), a)


@settings(deadline=None)
@given(K=dims, N=dims, dtype=dtypes, method=methods, seed=st.integers(0, 2**32 - 1))
def test_zn_matches_reference_and_round_trips(K, N, dtype, method, seed):
    c0 = C0[dtype]
    b = rand_array((K, N), dtype, seed)
    b_zn = L.nd_to_zn(b, method=method)
    assert b_zn.shape == (cdiv(K, c0), cdiv(N, 16), 16, c0)
    ref = ref_convert(b, lambda k, n: ref_zn_off(k, n, N, c0), b_zn.size)
    assert same_bytes(b_zn.ravel(), ref)
    # fractal (k1, n1), inner [n % 16][k % K0]
    k, n = K - 1, N - 1
    assert same_bytes(b_zn[k // c0, n // 16, n % 16, k % c0], b[k, n])
    assert same_bytes(L.zn_to_nd(b_zn, (K, N), method=method), b)


@settings(deadline=None)
@given(batch=batches, R=dims, C=dims, dtype=dtypes, seed=st.integers(0, 2**32 - 1))
def test_zz_zn_batched(batch, R, C, dtype, seed):
    x = rand_array((*batch, R, C), dtype, seed)
    for fwd, inv in [(L.nd_to_zz, L.zz_to_nd), (L.nd_to_zn, L.zn_to_nd)]:
        y = fwd(x)
        for i, x2 in enumerate(x.reshape(-1, R, C)):
            assert same_bytes(y.reshape(-1, *y.shape[len(batch):])[i], fwd(x2))
        assert same_bytes(inv(y, x.shape), x)


@settings(deadline=None)
@given(N=dims, K=dims, dtype=dtypes, method=methods, seed=st.integers(0, 2**32 - 1))
def test_nz_of_weight_is_zn_of_transpose(N, K, dtype, method, seed):
    """Reference: a weight W stored [out=N, in=K] is B^T, and Nz(W) == Zn(B) byte for byte."""
    w = rand_array((N, K), dtype, seed)
    assert same_bytes(L.nd_to_nz(w, method=method), L.nd_to_zn(w.T, method=method))


@settings(deadline=None)
@given(M=dims, N=dims, dtype=st.sampled_from(["float32", "int32"]), method=methods, seed=st.integers(0, 2**32 - 1))
def test_l0c_nz_c0_16(M, N, dtype, method, seed):
    x = rand_array((M, N), dtype, seed)
    x_nz = L.nd_to_nz(x, c0=16, method=method)
    assert x_nz.shape == (cdiv(N, 16), cdiv(M, 16), 16, 16)
    ref = ref_convert(x, lambda r, c: ref_nz_off(r, c, M, 16), x_nz.size)
    assert same_bytes(x_nz.ravel(), ref)
    assert same_bytes(L.nz_to_nd(x_nz, (M, N), c0=16, method=method), x)


def test_nz_small_loop_reference():
    """Plain element loop, no numpy indexing tricks."""
    x = np.arange(1, 3 * 20 + 1, dtype=np.int32).reshape(3, 20)
    out = L.nd_to_nz(x).ravel()
    for r in range(3):
        for c in range(20):
            assert out[(c // 8) * (1 * 16 * 8) + (r // 16) * (16 * 8) + (r % 16) * 8 + c % 8] == x[r, c]
    assert np.count_nonzero(out) == 60 and out.size == 3 * 16 * 8


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_all_dtypes_round_trip(dtype):
    x = rand_array((2, 33, 45), dtype, 7)
    for fwd, inv in [(L.nd_to_nz, L.nz_to_nd), (L.nd_to_zz, L.zz_to_nd), (L.nd_to_zn, L.zn_to_nd)]:
        for method in ("numpy", "jit"):
            assert same_bytes(inv(fwd(x, method=method), x.shape, method=method), x)


# ---- jitted vs numpy ---------------------------------------------------------


@settings(deadline=None)
@given(batch=batches, R=dims, C=dims, dtype=dtypes, seed=st.integers(0, 2**32 - 1),
       c0=st.sampled_from([None, 16]))
def test_jit_and_numpy_byte_identical(batch, R, C, dtype, seed, c0):
    x = rand_array((*batch, R, C), dtype, seed)
    for fwd, inv in [(L.nd_to_nz, L.nz_to_nd), (L.nd_to_zz, L.zz_to_nd), (L.nd_to_zn, L.zn_to_nd)]:
        a = fwd(x, c0=c0, method="numpy")
        b = fwd(x, c0=c0, method="jit")
        assert same_bytes(a, b)
        assert same_bytes(inv(a, x.shape, c0=c0, method="numpy"), inv(a, x.shape, c0=c0, method="jit"))


def test_auto_uses_jit_above_threshold(monkeypatch):
    calls = []
    real = F._to_frac_jit
    monkeypatch.setattr(F, "_to_frac_jit", lambda *a: calls.append(1) or real(*a))
    small = rand_array((16, 16), "float16", 1)
    L.nd_to_nz(small)
    assert calls == []
    side = int(np.ceil(np.sqrt(L.JIT_THRESHOLD))) + 3
    big = rand_array((side, side), "bfloat16", 2)
    y = L.nd_to_nz(big)
    assert calls == [1]
    assert same_bytes(y, L.nd_to_nz(big, method="numpy"))
    assert same_bytes(L.nz_to_nd(y, big.shape), big)


def test_non_contiguous_input():
    x = rand_array((40, 50), "float16", 3)
    for method in ("numpy", "jit"):
        assert same_bytes(L.nd_to_nz(x[::2, 1::3], method=method), L.nd_to_nz(x[::2, 1::3].copy()))


# ---- conversion error paths ------------------------------------------------


def test_nz_to_nd_shape_mismatch_message():
    with pytest.raises(ValueError) as info:
        L.nz_to_nd(np.zeros((3, 2, 16, 8), np.float16), (20, 40))
    assert str(info.value) == (
        "nz_to_nd: x_nz shape (3, 2, 16, 8) does not match ND shape (20, 40) float16: "
        "expected (3, 2, 16, 16)"
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: L.nd_to_nz(np.zeros(5, np.float16)), r"nd_to_nz: expected an array with >= 2 dims, got shape \(5,\)"),
        (lambda: L.nd_to_nz([[1, 2]]), "nd_to_nz: expected a numpy array, got list"),
        (lambda: L.nd_to_nz(np.zeros((4, 4))), "nd_to_nz: unsupported dtype 'float64'"),
        (lambda: L.nd_to_zz(np.zeros((4, 4), np.int64)), "nd_to_zz: unsupported dtype 'int64'"),
        (lambda: L.nd_to_zn(np.zeros((4, 4), np.float16), method="fast"), "nd_to_zn: method must be one of"),
        (lambda: L.nd_to_nz(np.zeros((4, 4), np.float32), c0=0), "nd_to_nz: c0 must be > 0"),
        (lambda: L.zz_to_nd(np.zeros((1, 1, 16, 16), np.float16), (20, 40)), r"zz_to_nd: a_zz shape .* expected \(2, 3, 16, 16\)"),
        (lambda: L.zn_to_nd(np.zeros((1, 1, 16, 16), np.float16), (20, 40)), r"zn_to_nd: b_zn shape .* expected \(2, 3, 16, 16\)"),
        (lambda: L.nz_to_nd(np.zeros((3, 2, 16, 16), np.float16), (2, 20, 40)), r"expected \(2, 3, 2, 16, 16\)"),
        (lambda: L.nz_to_nd(np.zeros((3, 2, 16, 16), np.float16), (40,)), "ND shape must be"),
        (lambda: L.nz_to_nd(np.zeros((3, 2, 16, 16), np.float16), (20.0, 40)), "shape must be a sequence of ints"),
        (lambda: L.nz_to_nd(np.zeros((3, 2, 16), np.float16), (20, 40)), ">= 4 dims"),
        (lambda: L.nz_to_nd(np.zeros((3, 2, 16, 16), np.float16), (20, 40), c0=8), r"expected \(5, 2, 16, 8\)"),
    ],
)
def test_conversion_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- KV cache in NZ (section 17) ----------------------------------------------


def test_kv_block_shapes_from_reference():
    # MLA: bf16 c_kv [nb, 32, bs, 16], k_pe [nb, 4, bs, 16]; int8 c_kv [nb, 16, bs, 32]
    assert L.kv_nz_block_shape(7, 512, 128, ml_dtypes.bfloat16) == (7, 32, 128, 16)
    assert L.kv_nz_block_shape(7, 64, 128, "bfloat16") == (7, 4, 128, 16)
    assert L.kv_nz_block_shape(7, 512, 128, "int8") == (7, 16, 128, 32)
    # value cache uses C0 = 16 regardless of dtype
    assert L.kv_nz_block_shape(7, 512, 128, "int8", c0=16) == (7, 32, 128, 16)


@pytest.mark.parametrize(
    "args, match",
    [
        ((4, 512, 24, "float16"), "block_size=24 must be a multiple of 16"),
        ((4, 512, 0, "float16"), "block_size must be > 0"),
        ((4, 72, 16, "int8"), r"dim=72 must be a multiple of C0=32"),
        ((4, 0, 16, "int8"), "dim must be > 0"),
        ((-1, 64, 16, "int8"), "num_blocks must be >= 0"),
        ((4, 64, 16, "float64"), "kv_nz_block_shape: unsupported dtype 'float64'"),
    ],
)
def test_kv_block_shape_errors(args, match):
    with pytest.raises(ValueError, match=match):
        L.kv_nz_block_shape(*args)


@settings(deadline=None)
@given(block=st.integers(0, 50), bs_mult=st.integers(1, 8), d1=st.integers(1, 8),
       dtype=st.sampled_from(["float16", "bfloat16", "int8", "float32"]), data=st.data())
def test_kv_offset_formula(block, bs_mult, d1, dtype, data):
    c0 = C0[dtype]
    bs, D = 16 * bs_mult, d1 * c0
    t = data.draw(st.integers(0, bs - 1))
    d = data.draw(st.integers(0, D - 1))
    expect = block * (bs * D) + (d // c0) * (bs * c0) + t * c0 + d % c0
    assert L.kv_nz_offset(block, t, d, D, bs, dtype) == expect
    # a token's adjacent 32 B chunks are 32 B * block_size apart
    if d + c0 < D:
        step = L.kv_nz_offset(block, t, d + c0, D, bs, dtype) - expect
        assert step * NP_DTYPE[dtype].itemsize == 32 * bs
    # each block is one Nz matrix (rows = tokens, cols = dims)
    assert expect - block * bs * D == ref_nz_off(t, d, bs, c0)


def test_kv_offset_vectorised_and_errors():
    b, t, d = np.meshgrid(np.arange(2), np.arange(16), np.arange(32), indexing="ij")
    off = L.kv_nz_offset(b, t, d, 32, 16, "float16")
    assert sorted(off.ravel().tolist()) == list(range(2 * 16 * 32))
    with pytest.raises(IndexError, match=r"kv_nz_offset: t=16 out of range \[0, 16\)"):
        L.kv_nz_offset(0, 16, 0, 32, 16, "float16")
    with pytest.raises(IndexError, match=r"kv_nz_offset: d=32 out of range"):
        L.kv_nz_offset(0, 0, 32, 32, 16, "float16")
    with pytest.raises(IndexError, match=r"kv_nz_offset: block=3 out of range \[0, 3\)"):
        L.kv_nz_offset(3, 0, 0, 32, 16, "float16", num_blocks=3)
    with pytest.raises(ValueError, match="block_size=8 must be a multiple of 16"):
        L.kv_nz_offset(0, 0, 0, 32, 8, "float16")


@settings(deadline=None)
@given(nb=st.integers(1, 6), bs_mult=st.integers(1, 3), d1=st.integers(1, 4),
       dtype=st.sampled_from(["float16", "bfloat16", "int8", "float32"]), data=st.data())
def test_kv_scatter_gather_round_trip(nb, bs_mult, d1, dtype, data):
    c0 = C0[dtype]
    bs, D = 16 * bs_mult, d1 * c0
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = L.kv_nz_block_shape(nb, D, bs, dtype)
    cache = rand_array(shape, dtype, seed + 1)  # garbage that must survive where not written
    before = cache.copy()
    length = data.draw(st.integers(0, nb * bs))
    nblk = cdiv(length, bs)
    table = rng.permutation(nb)[:nblk]
    pos = np.arange(length)
    slots = table[pos // bs] * bs + pos % bs if length else np.zeros(0, np.int64)
    skip = rng.random(length) < 0.25
    slots = np.where(skip, -1, slots).astype(np.int32)
    x = rand_array((length, D), dtype, seed + 2)
    out = L.kv_nz_scatter(cache, x, slots)
    assert out is cache
    got = L.kv_nz_gather(cache, np.concatenate([table, [-5]]), length)  # trailing unused entry ignored
    assert got.shape == (length, D)
    old = L.kv_nz_gather(before, table, length)
    for i in range(length):
        assert same_bytes(got[i], old[i] if skip[i] else x[i])
    # element check by the offset formula, independent of gather
    flat = cache.reshape(-1)
    for i in np.flatnonzero(~skip)[:20]:
        b, t = divmod(int(slots[i]), bs)
        for d in (0, D - 1):
            o = b * (bs * D) + (d // c0) * (bs * c0) + t * c0 + d % c0
            assert same_bytes(flat[o], x[i, d])
    # blocks not in the table untouched
    untouched = np.setdiff1d(np.arange(nb), table)
    assert same_bytes(cache[untouched], before[untouched])


def test_kv_scatter_heads_layout_and_last_wins():
    cache = np.zeros(L.kv_nz_block_shape(2, 64, 16, "float16"), np.float16)
    x = np.arange(3 * 4 * 16, dtype=np.float16).reshape(3, 4, 16)  # [T, heads, head_dim]
    L.kv_nz_scatter(cache, x, np.array([5, 5, 17]))
    got = L.kv_nz_gather(cache, [0, 1], 32)
    np.testing.assert_array_equal(got[5], x[1].ravel())
    np.testing.assert_array_equal(got[17], x[2].ravel())
    assert not got[[0, 1, 2, 3, 4, 6, 16, 18]].any()


def test_kv_scatter_gather_errors():
    cache = np.zeros(L.kv_nz_block_shape(2, 32, 16, "float16"), np.float16)
    x = np.ones((2, 32), np.float16)
    with pytest.raises(IndexError, match="kv_nz_scatter: slot 32 out of range for cache capacity 32 slots"):
        L.kv_nz_scatter(cache, x, np.array([0, 32], np.int32))
    with pytest.raises(ValueError, match="slot_mapping has 1 entries for 2 tokens"):
        L.kv_nz_scatter(cache, x, np.array([0]))
    with pytest.raises(ValueError, match="slot_mapping must be a 1-D integer array"):
        L.kv_nz_scatter(cache, x, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="x dtype float32 differs from cache dtype float16"):
        L.kv_nz_scatter(cache, x.astype(np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"x shape \(2, 16\) must be .* D=32"):
        L.kv_nz_scatter(cache, np.ones((2, 16), np.float16), np.array([0, 1]))
    with pytest.raises(ValueError, match="block_size=8 must be a positive multiple of 16"):
        L.kv_nz_scatter(np.zeros((2, 2, 8, 16), np.float16), x, np.array([0, 1]))
    with pytest.raises(ValueError, match="cache must have shape"):
        L.kv_nz_gather(np.zeros((2, 16, 16), np.float16), [0], 4)
    with pytest.raises(ValueError, match="length=33 needs 3 blocks of 16 tokens, block_table has 2"):
        L.kv_nz_gather(cache, [0, 1], 33)
    with pytest.raises(IndexError, match="kv_nz_gather: block 2 out of range for cache with 2 blocks"):
        L.kv_nz_gather(cache, [0, 2], 20)
    with pytest.raises(IndexError, match="kv_nz_gather: block -1 out of range"):
        L.kv_nz_gather(cache, [-1], 1)
    with pytest.raises(ValueError, match="length must be >= 0"):
        L.kv_nz_gather(cache, [0], -1)
    assert not cache.any()


def test_jit_specialisations_at_most_three():
    from ascendemu.layouts import _jit

    ro = np.frombuffer(rand_array((40, 70), "bfloat16", 4).tobytes(), dtype=ml_dtypes.bfloat16).reshape(40, 70)
    assert not ro.flags.writeable
    y = L.nd_to_nz(ro, method="jit")
    assert same_bytes(y, L.nd_to_nz(ro.copy(), method="numpy"))
    assert same_bytes(L.nz_to_nd(np.broadcast_to(y, y.shape), ro.shape, method="jit"), ro)
    for dtype in ALL_DTYPES:
        L.nd_to_zn(rand_array((3, 5), dtype, 0), method="jit")
    assert len(_jit.nd_to_frac_kernel.signatures) == 3
    assert len(_jit.frac_to_nd_kernel.signatures) == 3
