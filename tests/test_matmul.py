"""The tiled fp16 / bf16 matmul kernel (ops/matmul.py) against NumPy, on one AIC with the race checker on.

Golden rule (CATLASS-style, stated bound): the cube accumulates in fp32 and Fixpipe rounds once to the output
dtype, so the result is within 1 ulp (of the output dtype, at the exact value) of the float64 product, plus the
fp32 accumulation error, for which we take the order-free worst case K · 2⁻²⁴ · (|A| · |B|): the hardware's
summation order is not published and the emulator rounds to fp32 after every Mmad (every k-step).
Small-integer inputs make every fp32 sum exact, so there the result must equal `matmul_reference` bit for bit.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu
from ascendemu.ops.matmul import MatmulTiles, matmul, matmul_reference

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
# (mantissa bits, minimum normal exponent) of each output dtype
_FMT = {F16: (10, -14), BF16: (7, -126), np.dtype(np.float32): (23, -126)}


def ulp(x: np.ndarray, dtype) -> np.ndarray:
    """Spacing of `dtype` at the (float64) values x (the subnormal spacing below the normal range)."""
    mant, emin = _FMT[np.dtype(dtype)]
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.abs(x)))
    e = np.maximum(np.where(np.isfinite(e), e, emin), emin)
    return np.exp2(e - mant)


def check_close(c, a, b, out_dtype):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact = a64 @ b64
    bound = ulp(exact, out_dtype) + a.shape[1] * 2.0 ** -24 * (np.abs(a64) @ np.abs(b64))
    err = np.abs(c.astype(np.float64) - exact)
    assert c.dtype == out_dtype and c.shape == exact.shape
    assert np.all(np.isfinite(c)), "non-finite output (poison reached the result?)"
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"C{worst}: |{c[worst]} - {exact[worst]}| = {err[worst]} > bound {bound[worst]}"


def inputs(m, n, k, dtype, seed, integers):
    rng = np.random.default_rng(seed)
    if integers:
        return (rng.integers(-3, 4, (m, k)).astype(dtype), rng.integers(-3, 4, (k, n)).astype(dtype))
    return rng.uniform(-1, 1, (m, k)).astype(dtype), rng.uniform(-1, 1, (k, n)).astype(dtype)


dims = st.integers(1, 200)


@settings(deadline=None)
@given(m=dims, n=dims, k=dims, dtype=st.sampled_from([F16, BF16]), seed=st.integers(0, 2**32 - 1),
       integers=st.booleans())
def test_matmul_matches_numpy(m, n, k, dtype, seed, integers):
    a, b = inputs(m, n, k, dtype, seed, integers)
    die = ascendemu.Die("910c")
    c = matmul(die, a, b)
    if integers and (dtype == F16 or k * 9 <= 256):  # every sum exact in fp32 and in the output dtype
        np.testing.assert_array_equal(c.view(np.uint16), matmul_reference(a, b).view(np.uint16))
    check_close(c, a, b, dtype)
    assert die.last_report.flops == 2 * m * n * k


@pytest.mark.parametrize("tiles, shape", [
    (MatmulTiles(m=32, n=32, k=32, b_chunk_k=64), (70, 50, 300)),   # K > 4 chunks: B streamed per m-tile
    (MatmulTiles(m=64, n=48, k=32, b_chunk_k=96), (130, 100, 180)),  # resident B, 3 k-steps per chunk
    (MatmulTiles(), (17, 300, 1100)),                                 # default tiles, K beyond the L1 panel
    (MatmulTiles(), (20, 24, 4100)),  # 16 rows of A overflow the u16 srcNdMatrixStride: one Nd2Nz per strip
])
def test_other_tilings(tiles, shape):
    m, n, k = shape
    a, b = inputs(m, n, k, F16, 1, False)
    die = ascendemu.Die("910c")
    check_close(matmul(die, a, b, tiles=tiles), a, b, F16)


@pytest.mark.parametrize("in_dtype, out_dtype", [(F16, BF16), (F16, np.float32), (BF16, np.float32), (BF16, F16)])
def test_out_dtypes(in_dtype, out_dtype):
    a, b = inputs(40, 33, 50, in_dtype, 2, False)
    c = matmul(ascendemu.Die("910c"), a, b, out_dtype=out_dtype)
    check_close(c, a, b, np.dtype(out_dtype))


def test_global_tensors_in_and_out():
    die = ascendemu.Die("910c")
    a, b = inputs(48, 40, 64, F16, 3, True)
    ga, gb = die.gm.from_numpy(a), die.gm.from_numpy(b)
    c = matmul(die, ga, gb)
    assert isinstance(c, ascendemu.GlobalTensor)
    np.testing.assert_array_equal(c.numpy(), matmul_reference(a, b))


def test_timing_only_cycles_equal_functional():
    m, n, k = 150, 260, 300
    a, b = inputs(m, n, k, F16, 4, False)
    fun = ascendemu.Die("910c")
    matmul(fun, a, b)
    tim = ascendemu.Die("910c", functional=False)
    c = matmul(tim, tim.gm.empty((m, k), "float16"), tim.gm.empty((k, n), "float16"))
    assert c.is_phantom
    rf, rt = fun.last_report, tim.last_report
    assert not rt.functional and rt.cycles == rf.cycles
    assert rt.cores[0].busy == rf.cores[0].busy and rt.bytes == rf.bytes


def test_cube_is_the_binding_pipe():
    """1024³ in timing-only mode: the cube is the binding pipe, ≥ 85 % busy (the issue's target)."""
    die = ascendemu.Die("910c", functional=False)
    matmul(die, die.gm.empty((1024, 1024), "float16"), die.gm.empty((1024, 1024), "float16"))
    r = die.last_report
    busy = r.cores[0].busy
    assert max(busy, key=busy.get) == "M"
    assert r.utilisation("M") >= 0.85


@pytest.mark.parametrize("a_shape, b_shape, kwargs, exc, text", [
    ((4, 5), (6, 7), {}, ValueError, "inner dimensions differ: a is 4 × 5, b is 6 × 7"),
    ((4,), (4, 7), {}, ValueError, "a must be 2-D, got shape (4,)"),
    ((4, 5), (5, 0), {}, ValueError, "M, N, K must be ≥ 1, got M=4, N=0, K=5"),
    ((4, 65536), (65536, 7), {}, ValueError, "K = 65536 and N = 7 are GM row pitches of A and B"),
    ((4, 5), (5, 7), {"out_dtype": "int8"}, TypeError, "out_dtype int8 is not one of float16, bfloat16, float32"),
    ((4, 5), (5, 7), {"out_dtype": "half"}, TypeError, "out_dtype 'half' is not one of"),
    ((4, 5), (5, 7), {"tiles": MatmulTiles(m=24)}, ValueError, "tiles.m = 24 must be a positive multiple of 16"),
    ((4, 5), (5, 7), {"tiles": MatmulTiles(m=256, k=128)}, ValueError, "need 131072 B of L0A"),
    ((4, 5), (5, 7), {"tiles": (128, 128, 128)}, TypeError, "tiles must be a MatmulTiles, got tuple"),
])
def test_bad_inputs_raise(a_shape, b_shape, kwargs, exc, text):
    die = ascendemu.Die("910c")
    with pytest.raises(exc) as info:
        matmul(die, np.zeros(a_shape, F16), np.zeros(b_shape, F16), **kwargs)
    assert text in str(info.value)


def test_bad_dtypes_and_types_raise():
    die = ascendemu.Die("910c")
    with pytest.raises(TypeError, match="a is float32; the cube takes float16 or bfloat16 here"):
        matmul(die, np.zeros((4, 5), np.float32), np.zeros((5, 7), F16))
    with pytest.raises(TypeError, match="a is float16 but b is bfloat16; they must match"):
        matmul(die, np.zeros((4, 5), F16), np.zeros((5, 7), BF16))
    with pytest.raises(TypeError, match="b must be a numpy array or a GlobalTensor, got list"):
        matmul(die, np.zeros((4, 5), F16), [[0.0] * 7] * 5)
    other = ascendemu.Die("910c")
    with pytest.raises(ValueError, match="a is a GlobalTensor of another die's GM"):
        matmul(die, other.gm.empty((4, 5), "float16"), np.zeros((5, 7), F16))
