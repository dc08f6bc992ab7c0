"""Unit tests of ascendemu.numerics: vector Cast and Fixpipe conversions, bit-exact against independent references.

The references here never call the implementation's helpers: float narrowing uses an exhaustive sorted table of
every fp16 / bf16 value and picks neighbours by search; float→int and int→float use Python int/float arithmetic;
Fixpipe uses per-element Python with ``struct`` for the fp32/fp16 roundings.
"""

import math
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ascendemu.numerics import (
    CAST_PAIRS, DTYPES, QuantMode, QuantWord, RoundMode, as_dtype, bf16_bits, cast, check_cast_pair,
    decode_quant_word, dtype_name, fixpipe_convert, fixpipe_out_dtype, fp16_bits, from_bf16_bits, from_fp16_bits,
    is_float, is_int, make_quant_word, quant_words,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
MODES = list(RoundMode)
R = RoundMode


# ------------------------------------------------------------------------------------------- independent references


def conv(x, dt):
    """numpy / ml_dtypes conversion without the NaN/overflow RuntimeWarnings (which the implementation never emits)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(x).astype(dt)


def _table(dt, emax):
    """Sorted finite values of a 16-bit float format (+0 once) with their odd-last-bit flags, extended by the
    virtual next power of two ±2**(emax+1) (even), which stands for overflow."""
    bits = np.arange(65536, dtype=np.uint16)
    with np.errstate(invalid="ignore"):
        vals = bits.view(dt).astype(np.float64)
    keep = np.isfinite(vals) & ~((vals == 0) & (bits >= 0x8000))
    vals, bits = vals[keep], bits[keep]
    order = np.argsort(vals, kind="stable")
    vals, odd = vals[order], (bits[order] & 1).astype(bool)
    ext = 2.0 ** (emax + 1)
    return np.concatenate([[-ext], vals, [ext]]), np.concatenate([[False], odd, [False]])


TABLES = {F16: _table(F16, 15), BF16: _table(BF16, 127)}


def ref_narrow(x, dt, mode):
    """Reference float64 → dt rounding by neighbour search in the exhaustive table (IEEE overflow rules)."""
    vals, odd = TABLES[dt]
    ext, fmax = vals[-1], vals[-2]
    x = np.asarray(x, dtype=np.float64)
    out = x.copy()
    fin = np.isfinite(x)
    big = fin & (np.abs(x) >= ext)
    mid = fin & ~big
    xm = x[mid]
    j = np.searchsorted(vals, xm, side="left")  # vals[j-1] < xm <= vals[j]
    lo, hi, lo_odd = vals[j - 1], vals[j], odd[j - 1]
    dlo, dhi = xm - lo, hi - xm
    if mode in (R.CAST_RINT, R.CAST_NONE):
        pick = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo_odd, hi, lo)))
    elif mode is R.CAST_ROUND:
        pick = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(xm > 0, hi, lo)))
    elif mode is R.CAST_FLOOR:
        pick = lo
    elif mode is R.CAST_CEIL:
        pick = hi
    elif mode is R.CAST_TRUNC:
        pick = np.where(xm > 0, lo, hi)
    else:
        pick = np.where(lo_odd, lo, hi)
    pick = np.where(hi == xm, xm, pick)
    pick = np.where(np.abs(pick) == ext, np.copysign(np.inf, pick), pick)
    out[mid] = pick
    xb = x[big]
    pos = xb > 0
    if mode in (R.CAST_RINT, R.CAST_NONE, R.CAST_ROUND):
        out[big] = np.copysign(np.inf, xb)
    elif mode in (R.CAST_TRUNC, R.CAST_ODD):
        out[big] = np.copysign(fmax, xb)
    elif mode is R.CAST_FLOOR:
        out[big] = np.where(pos, fmax, -np.inf)
    else:
        out[big] = np.where(pos, np.inf, -fmax)
    out = np.where(out == 0, np.copysign(0.0, x), out)
    return conv(out, dt)


def ref_round_int(x: float, mode) -> int:
    """Python reference: round a finite float to an int by mode."""
    f, c = math.floor(x), math.ceil(x)
    if f == c:
        return f
    d = x - f
    if mode in (R.CAST_RINT, R.CAST_NONE):
        return f if d < 0.5 else c if d > 0.5 else (f if f % 2 == 0 else c)
    if mode is R.CAST_ROUND:
        return f if d < 0.5 else c if d > 0.5 else (c if x > 0 else f)
    if mode is R.CAST_FLOOR:
        return f
    if mode is R.CAST_CEIL:
        return c
    if mode is R.CAST_TRUNC:
        return math.trunc(x)
    return f if f % 2 else c


def ref_float_to_int(xs, dt, mode):
    info = np.iinfo(dt)
    out = []
    for x in np.asarray(xs, dtype=np.float64).tolist():
        if math.isnan(x):
            out.append(0)
        elif math.isinf(x):
            out.append(info.max if x > 0 else info.min)
        else:
            out.append(min(max(ref_round_int(x, mode), int(info.min)), int(info.max)))
    return np.array(out, dtype=dt)


def ref_int_to_f32(n: int, mode) -> float:
    """Python-int reference of integer → fp32 (24-bit significand; no overflow for |n| < 2**64)."""
    a, neg = abs(n), n < 0
    shift = max(a.bit_length() - 24, 0)
    k, rem = a >> shift, a & ((1 << shift) - 1)
    half = (1 << (shift - 1)) if shift else 0
    if rem == 0:
        up = False
    elif mode in (R.CAST_RINT, R.CAST_NONE):
        up = rem > half or (rem == half and k % 2 == 1)
    elif mode is R.CAST_ROUND:
        up = rem >= half
    elif mode is R.CAST_FLOOR:
        up = neg
    elif mode is R.CAST_CEIL:
        up = not neg
    elif mode is R.CAST_TRUNC:
        up = False
    else:
        up = k % 2 == 0
    mag = float((k + up) << shift)
    return -mag if neg else mag


def assert_same_float(got, want):
    """Bit-exact equality, NaN matching NaN (any payload)."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    u = {2: np.uint16, 4: np.uint32}[got.dtype.itemsize]
    with np.errstate(invalid="ignore"):
        gn = np.isnan(got.astype(np.float64))
        wn = np.isnan(want.astype(np.float64))
    np.testing.assert_array_equal(gn, wn)
    gb, wb = got.view(u)[~gn], want.view(u)[~wn]
    bad = np.nonzero(gb != wb)[0]
    assert bad.size == 0, f"{bad.size} mismatches, first: got {got[~gn][bad[:5]]} want {want[~wn][bad[:5]]}"


def neighbourhood_inputs(dt):
    """fp32 inputs at and around every value and every midpoint of the 16-bit format dt (exact ties, subnormals,
    the overflow threshold), plus fp32 specials."""
    vals = TABLES[dt][0]
    mids = (vals[:-1] + vals[1:]) / 2  # exact in float64 and representable in fp32
    pts = np.concatenate([vals[1:-1], mids]).astype(np.float32)
    up = np.nextafter(pts, np.float32(np.inf))
    down = np.nextafter(pts, np.float32(-np.inf))
    f32 = np.finfo(np.float32)
    specials = np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, f32.max, -f32.max, f32.smallest_subnormal,
                         -f32.smallest_subnormal, f32.tiny, 2.0 ** 127, -(2.0 ** 127)], dtype=np.float32)
    return np.concatenate([pts, up, down, specials])


fp32_bits = hnp.arrays(np.uint32, st.integers(1, 64), elements=st.integers(0, 2**32 - 1))


# ---------------------------------------------------------------------------------------------------------- dtypes


def test_dtypes_and_names():
    assert set(DTYPES) == {"float16", "bfloat16", "float32", "int32", "int16", "int8", "uint8", "uint16", "uint32",
                           "int64", "uint64"}
    assert as_dtype("bfloat16") == BF16 and as_dtype(ml_dtypes.bfloat16) == BF16
    assert as_dtype(np.float16) == F16 and as_dtype(np.dtype("int8")) == np.int8
    for name, dt in DTYPES.items():
        assert dtype_name(dt) == name and dtype_name(name) == name
    assert is_float("bfloat16") and is_float(np.float32) and not is_float("int32")
    assert is_int("uint64") and not is_int(BF16)


@pytest.mark.parametrize("bad", ["float64", "f4", "float", np.float64, np.dtype(">f4"), complex, "int4"])
def test_as_dtype_rejects(bad):
    with pytest.raises(TypeError, match=r"unsupported dtype .*supported: float16, bfloat16, float32"):
        as_dtype(bad)


def test_cast_pairs_table():
    for s, d in CAST_PAIRS:
        assert s in DTYPES and d in DTYPES
    must = {("float32", "float16"), ("float32", "bfloat16"), ("float32", "int32"), ("float32", "int16"),
            ("float16", "float32"), ("float16", "int32"), ("float16", "int8"), ("float16", "uint8"),
            ("float16", "int16"), ("int8", "float16"), ("uint8", "float16"), ("int16", "float16"),
            ("int16", "float32"), ("int32", "float32"), ("int32", "float16"), ("int32", "int16"),
            ("bfloat16", "float32"), ("bfloat16", "int32"), ("float32", "float32"), ("int32", "int64"),
            ("float32", "int64")}
    assert CAST_PAIRS == must
    assert check_cast_pair(np.float32, ml_dtypes.bfloat16) == ("float32", "bfloat16")


def test_check_cast_pair_errors():
    with pytest.raises(TypeError, match=r"no int32 -> int8 pair; legal destinations for int32: float16, float32, "
                                        r"int16, int64$"):
        check_cast_pair("int32", "int8")
    with pytest.raises(TypeError, match=r"no float32 -> uint8 pair; legal destinations for float32: bfloat16, "
                                        r"float16, float32, int16, int32, int64$"):
        check_cast_pair(np.float32, np.uint8)
    with pytest.raises(TypeError, match=r"no uint16 -> float16 pair; no Cast from uint16 at all \(sources: "):
        check_cast_pair("uint16", "float16")
    with pytest.raises(TypeError, match="unsupported dtype 'float64'"):
        check_cast_pair("float64", "float16")


def test_cast_rejects_bad_mode_and_dtype():
    with pytest.raises(TypeError, match=r"rounding mode must be a RoundMode \(CAST_NONE, CAST_RINT"):
        cast(np.zeros(2, np.float32), "float16", "nearest")
    with pytest.raises(TypeError, match="unsupported dtype 'float64'"):
        cast(np.zeros(2), "float16", R.CAST_RINT)
    assert cast(np.ones(2, np.float32), "float16", "CAST_RINT").dtype == F16


# ------------------------------------------------------------------------------------------- float → float narrowing


@pytest.mark.parametrize("dt", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_fp32_narrowing_neighbourhoods(dt, mode):
    x = neighbourhood_inputs(dt)
    assert_same_float(cast(x, dt, mode), ref_narrow(x, dt, mode))


@pytest.mark.parametrize("dt", [F16, BF16], ids=["fp16", "bf16"])
@given(bits=fp32_bits)
def test_fp32_narrowing_random_bits(dt, bits):
    x = bits.view(np.float32)
    for mode in MODES:
        assert_same_float(cast(x, dt, mode), ref_narrow(x, dt, mode))


def test_rint_matches_numpy_and_ml_dtypes():
    for dt in (F16, BF16):
        x = neighbourhood_inputs(dt)
        assert_same_float(cast(x, dt, R.CAST_RINT), conv(x, dt))
        assert_same_float(cast(x, dt, R.CAST_NONE), conv(x, dt))


def test_narrowing_overflow_rules_explicit():
    x = np.array([65519.0, 65520.0, 1e6, -65520.0, -1e6], np.float32)
    m = 65504.0
    want = {R.CAST_RINT: [m, np.inf, np.inf, -np.inf, -np.inf], R.CAST_ROUND: [m, np.inf, np.inf, -np.inf, -np.inf],
            R.CAST_FLOOR: [m, m, m, -np.inf, -np.inf], R.CAST_CEIL: [np.inf, np.inf, np.inf, -m, -m],
            R.CAST_TRUNC: [m, m, m, -m, -m], R.CAST_ODD: [m, m, m, -m, -m]}
    for mode, w in want.items():
        assert_same_float(cast(x, F16, mode), np.array(w, F16))


def test_fp16_to_bf16_all_values():
    x = np.arange(65536, dtype=np.uint16).view(np.float16)
    for mode in MODES:
        assert_same_float(cast(x, BF16, mode), ref_narrow(x.astype(np.float64), BF16, mode))


def test_widening_is_exact_in_every_mode():
    for dt in (F16, BF16):
        x = np.arange(65536, dtype=np.uint16).view(dt)
        for mode in MODES:
            assert_same_float(cast(x, np.float32, mode), x.astype(np.float32))


@given(bits=fp32_bits)
def test_fp32_to_fp32_rounds_to_integral(bits):
    x = bits.view(np.float32)
    assert_same_float(cast(x, np.float32, R.CAST_NONE), x)
    for mode in MODES[1:]:
        want = []
        for v in x.astype(np.float64).tolist():
            want.append(v if not math.isfinite(v) else math.copysign(float(ref_round_int(v, mode)), v))
        assert_same_float(cast(x, np.float32, mode), np.array(want, dtype=np.float32))


# ----------------------------------------------------------------------------------------------------- float → int


def test_fp16_and_bf16_to_int_exhaustive():
    for src in (F16, BF16):
        x = np.arange(65536, dtype=np.uint16).view(src)
        xf = conv(x, np.float64)
        fin = np.isfinite(xf)
        for mode in MODES:
            r = np.zeros(xf.shape, dtype=object)
            r[fin] = [ref_round_int(v, mode) for v in xf[fin].tolist()]
            r[np.isnan(xf)] = 0
            r[xf == np.inf], r[xf == -np.inf] = 10**30, -(10**30)
            for dst in (np.int8, np.uint8, np.int16, np.int32):
                info = np.iinfo(dst)
                want = np.array([min(max(v, int(info.min)), int(info.max)) for v in r.tolist()], dtype=dst)
                got = cast(x, dst, mode)
                assert got.dtype == dst
                np.testing.assert_array_equal(got, want, err_msg=f"{src} -> {np.dtype(dst)} {mode}")


F32_INT_EDGES = np.array([2.0**31, -(2.0**31), 2.0**31 - 128, -(2.0**31) - 256, 2.0**63, -(2.0**63), 2.0**62,
                          -(2.0**63) - 2.0**40, 32767.5, -32768.5, 127.5, -128.5, 255.5, 0.5, -0.5, 1.5, 2.5, -2.5,
                          np.inf, -np.inf, np.nan, 1e30, -1e30, 2.0**-149], dtype=np.float32)


@pytest.mark.parametrize("dst", [np.int32, np.int16, np.int8, np.uint8, np.int64])
def test_fp32_to_int_edges(dst):
    for mode in MODES:
        np.testing.assert_array_equal(cast(F32_INT_EDGES, dst, mode), ref_float_to_int(F32_INT_EDGES, dst, mode))


@given(bits=fp32_bits)
def test_fp32_to_int_random(bits):
    x = bits.view(np.float32)
    for dst in (np.int32, np.int16, np.int8, np.int64):
        for mode in MODES:
            got = cast(x, dst, mode)
            assert got.dtype == dst
            np.testing.assert_array_equal(got, ref_float_to_int(x, dst, mode))


@given(x=hnp.arrays(np.float32, st.integers(1, 64),
                    elements=st.floats(-300, 300, width=32) | st.integers(-300, 300).map(lambda i: i + 0.5)))
def test_fp32_small_values_to_int8(x):
    for mode in MODES:
        np.testing.assert_array_equal(cast(x, np.int8, mode), ref_float_to_int(x, np.int8, mode))


# ----------------------------------------------------------------------------------------------------- int → float


def test_small_ints_to_fp16_exhaustive():
    for src in (np.int8, np.uint8, np.int16):
        info = np.iinfo(src)
        x = np.arange(int(info.min), int(info.max) + 1).astype(src)
        for mode in MODES:
            assert_same_float(cast(x, F16, mode), ref_narrow(x.astype(np.float64), F16, mode))
    x8 = np.arange(-128, 128).astype(np.int8)  # int8/uint8 → fp16 is exact
    assert_same_float(cast(x8, F16, R.CAST_NONE), x8.astype(np.float64).astype(F16))


int32s = hnp.arrays(np.int32, st.integers(1, 64),
                    elements=st.integers(-(2**31), 2**31 - 1) | st.integers(-70000, 70000)
                    | st.integers(0, 30).map(lambda k: 2**k + 1) | st.integers(0, 31).map(lambda k: -(2**k)))


@given(x=int32s)
def test_int32_to_fp16_and_fp32(x):
    for mode in MODES:
        assert_same_float(cast(x, F16, mode), ref_narrow(x.astype(np.float64), F16, mode))
        want = np.array([ref_int_to_f32(n, mode) for n in x.tolist()], dtype=np.float32)
        assert_same_float(cast(x, np.float32, mode), want)


@given(x=hnp.arrays(np.int64, st.integers(1, 32),
                    elements=st.integers(-(2**63), 2**63 - 1) | st.integers(0, 62).map(lambda k: 2**k + 2**(k // 2))
                    | st.sampled_from([2**63 - 1, -(2**63), 2**63 - 2**39, 2**63 - 2**39 - 1, 2**40 + 2**16])))
def test_int64_to_fp32_single_rounding(x):
    # 64-bit integers are not exact in float64: checks the implementation does not double-round.
    for mode in MODES:
        want = np.array([ref_int_to_f32(n, mode) for n in x.tolist()], dtype=np.float32)
        assert_same_float(cast(x, np.float32, mode), want)
    u = x.view(np.uint64)
    for mode in (R.CAST_RINT, R.CAST_TRUNC, R.CAST_ODD):
        want = np.array([ref_int_to_f32(n, mode) for n in u.tolist()], dtype=np.float32)
        assert_same_float(cast(u, np.float32, mode), want)


def test_int32_to_fp32_exact_when_representable():
    x = np.array([0, 1, -1, 2**24, -(2**24), 2**31 - 128, 12345678], np.int32)
    for mode in MODES:
        np.testing.assert_array_equal(cast(x, np.float32, mode).astype(np.int64), x.astype(np.int64))


# ------------------------------------------------------------------------------------------------------ int → int


@given(x=hnp.arrays(np.int64, st.integers(1, 32), elements=st.integers(-(2**63), 2**63 - 1)))
def test_int_to_int_saturates(x):
    for src, dst in [(np.int32, np.int16), (np.int64, np.int32), (np.int64, np.uint8), (np.int64, np.uint64),
                     (np.int32, np.int64), (np.uint64, np.int64), (np.int16, np.int8)]:
        xs = x.astype(src)  # wraps: any bit pattern of src
        info = np.iinfo(dst)
        want = np.array([min(max(v, int(info.min)), int(info.max)) for v in xs.tolist()], dtype=dst)
        for mode in (R.CAST_NONE, R.CAST_RINT):
            np.testing.assert_array_equal(cast(xs, dst, mode), want)


def test_cast_keeps_shape_and_returns_new_array():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    y = cast(x, np.float32, R.CAST_NONE)
    assert y.shape == (2, 3, 4) and y is not x and not np.shares_memory(x, y)
    assert cast(np.float32(2.5), np.int32, R.CAST_RINT).shape == ()


def test_bits_helpers():
    x = np.array([1.0, -2.5, np.inf], np.float16)
    np.testing.assert_array_equal(fp16_bits(x), [0x3C00, 0xC100, 0x7C00])
    assert_same_float(from_fp16_bits(fp16_bits(x)), x)
    b = np.array([1.0, -2.5], BF16)
    np.testing.assert_array_equal(bf16_bits(b), [0x3F80, 0xC020])
    assert_same_float(from_bf16_bits(np.array([0x3F80, 0x0001], np.uint16)),
                      np.array([1.0, 2.0**-133], np.float64).astype(BF16))
    with pytest.raises(TypeError, match="bf16_bits expects a bfloat16 array, got float32"):
        bf16_bits(np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="from_fp16_bits expects a uint16 array of raw bits, got int32"):
        from_fp16_bits(np.zeros(2, np.int32))


# ------------------------------------------------------------------------------------------------------ quant words


def f32(v: float) -> float:
    """fp32 rounding (half even) of a Python float via struct; ±inf past the overflow threshold."""
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def trunc10(scale: float) -> tuple[int, float]:
    b = struct.unpack("<I", struct.pack("<f", scale))[0] & 0xFFFFE000
    return b, struct.unpack("<f", struct.pack("<I", b))[0]


def test_quant_word_layout_literal():
    w = make_quant_word(1.0, shift=3, offset=-1, signed=True, mcb=True)
    assert w == 0x3F800000 | (3 << 32) | (1 << 36) | (0x1FF << 37) | (1 << 46)
    assert make_quant_word(1.0, signed=False) == 0x3F800000
    assert decode_quant_word((256 << 37) | 0x3F800000).offset == -256
    assert decode_quant_word((255 << 37)).offset == 255
    # the mantissa is truncated (not rounded) to 10 bits: fp32 0x3F801FFF (1 + 2**-10 - 2**-23) → 1.0
    assert make_quant_word(1.0 + 2.0**-10 - 2.0**-23) & 0xFFFFFFFF == 0x3F800000
    assert decode_quant_word(make_quant_word(1.0 + 2.0**-10 - 2.0**-23)).scale == 1.0
    assert decode_quant_word(make_quant_word(1.0 + 2.0**-10)).scale == 1.0 + 2.0**-10


@given(scale=st.floats(width=32, allow_nan=False, allow_infinity=False), offset=st.integers(-256, 255),
       shift=st.integers(0, 15), signed=st.booleans(), mcb=st.booleans())
def test_quant_word_round_trip(scale, offset, shift, signed, mcb):
    w = make_quant_word(scale, offset=offset, shift=shift, signed=signed, mcb=mcb)
    assert isinstance(w, int) and 0 <= w < 2**47
    bits, m1 = trunc10(scale)
    assert w & 0xFFFFFFFF == bits and w & 0x1FFF == 0
    assert (w >> 32) & 0xF == shift and (w >> 36) & 1 == mcb and (w >> 46) & 1 == signed
    assert (w >> 37) & 0x1FF == offset % 512
    assert decode_quant_word(w) == QuantWord(m1, shift, mcb, offset, signed)
    # bits 12..0 and 63..47 are ignored when decoding
    assert decode_quant_word(w | 0x1FFF | (0x1FFFF << 47)) == decode_quant_word(w)
    assert decode_quant_word(np.uint64(w)) == decode_quant_word(w)


@given(scales=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=16), data=st.data())
def test_quant_words_vectorised(scales, data):
    n = len(scales)
    offs = data.draw(st.lists(st.integers(-256, 255), min_size=n, max_size=n))
    shifts = data.draw(st.lists(st.integers(0, 15), min_size=n, max_size=n))
    signed = data.draw(st.booleans())
    got = quant_words(np.array(scales, np.float32), offset=offs, shift=shifts, signed=signed, mcb=True)
    assert got.dtype == np.uint64 and got.shape == (n,)
    want = [make_quant_word(s, offset=o, shift=k, signed=signed, mcb=True) for s, o, k in zip(scales, offs, shifts)]
    assert [int(v) for v in got] == want


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(shift=16), ValueError, r"field 'shift' must be in 0\.\.15"),
    (dict(shift=-1), ValueError, r"field 'shift' must be in 0\.\.15"),
    (dict(offset=256), ValueError, r"field 'offset' must be in -256\.\.255"),
    (dict(offset=-257), ValueError, r"field 'offset' must be in -256\.\.255"),
    (dict(shift=1.5), TypeError, r"field 'shift' must be an integer"),
    (dict(scale=math.inf), ValueError, r"field 'scale' must be finite"),
    (dict(scale=1e39), ValueError, r"field 'scale' must be finite in fp32"),
    (dict(scale=math.nan), ValueError, r"field 'scale' must be finite"),
])
def test_make_quant_word_errors(kwargs, exc, msg):
    kwargs = {"scale": 1.0, **kwargs}
    with pytest.raises(exc, match=msg):
        make_quant_word(kwargs.pop("scale"), **kwargs)


def test_decode_quant_word_errors():
    with pytest.raises(ValueError, match="fit in u64"):
        decode_quant_word(-1)
    with pytest.raises(ValueError, match="fit in u64"):
        decode_quant_word(2**64)
    with pytest.raises(TypeError, match="must be an integer"):
        decode_quant_word(1.0)


# --------------------------------------------------------------------------------------------------------- fixpipe

I32_ELEMS = st.integers(-(2**31), 2**31 - 1) | st.integers(-3000, 3000) | st.integers(-70000, 70000)
F32_ELEMS = (st.floats(width=32) | st.floats(-3000, 3000, width=32)
             | st.integers(-300, 300).map(lambda i: float(i) + 0.5))
SCALES = st.floats(width=32, allow_nan=False, allow_infinity=False) | st.floats(-2, 2, width=32) \
    | st.sampled_from([1.0, 0.5, 1 / 64, 0.01, 3.0])


def acc_arrays(dtype, elems):
    return hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), elements=elems)


def ref_scale_step(x, scale, shift, mcb, relu, is_int):
    """float32(x)·M1 in fp32, after the optional ReLU and MCB shift; returns a Python float."""
    if is_int:
        x = int(x)
        if relu:
            x = max(x, 0)
        if mcb:
            x = min(max(x >> shift, -32768), 32767)
        xf = f32(float(x))
    else:
        xf = float(x)
        if relu and xf < 0:
            xf = 0.0
    return f32(xf * scale)  # the float64 product is exact (≤ 24 + 11 significant bits)


def ref_b8(y, offset, signed):
    q = 0 if math.isnan(y) else round(min(max(y, -256.0), 255.0))  # round() ties to even
    lo, hi = (-128, 127) if signed else (0, 255)
    return min(max(q + offset, lo), hi)


def ref_f16(y):
    y = min(max(y, -65504.0), 65504.0)
    return np.frombuffer(struct.pack("<e", y), dtype=np.float16)[0]


def draw_fields(data, n, per_channel):
    k = n if per_channel else 1
    lists = lambda s: data.draw(st.lists(s, min_size=k, max_size=k))  # noqa: E731
    return dict(scale=lists(SCALES), offset=lists(st.integers(-256, 255)), shift=lists(st.integers(0, 15)),
                mcb=lists(st.booleans()), signed=data.draw(st.booleans()))


def words_for(fields, per_channel):
    if per_channel:
        return quant_words(np.array(fields["scale"], np.float32), offset=fields["offset"], shift=fields["shift"],
                           mcb=fields["mcb"], signed=fields["signed"])
    return make_quant_word(fields["scale"][0], offset=fields["offset"][0], shift=fields["shift"][0],
                           mcb=fields["mcb"][0], signed=fields["signed"])


def ref_fixpipe(acc, mode, fields, relu):
    n = acc.shape[-1]
    flat = acc.reshape(-1, n)
    is_int = acc.dtype == np.int32
    out = []
    for row in flat.tolist():
        r = []
        for c, x in enumerate(row):
            j = c if len(fields["scale"]) > 1 or mode.name.startswith("V") else 0
            _, m1 = trunc10(fields["scale"][j])
            y = ref_scale_step(x, m1, fields["shift"][j], fields["mcb"][j] and is_int, relu, is_int)
            r.append(ref_f16(y) if "DEQ" in mode.name else ref_b8(y, fields["offset"][j], fields["signed"]))
        out.append(r)
    if "DEQ" in mode.name:
        return np.array(out, dtype=np.float16).reshape(acc.shape)
    return np.array(out, dtype=np.int8 if fields["signed"] else np.uint8).reshape(acc.shape)


@pytest.mark.parametrize("mode", [QuantMode.DEQF16, QuantMode.VDEQF16, QuantMode.REQ8, QuantMode.VREQ8,
                                  QuantMode.QF322B8_PRE, QuantMode.VQF322B8_PRE], ids=lambda m: m.name)
@given(data=st.data())
@settings(deadline=None)
def test_fixpipe_quant_modes(mode, data):
    is_int = "F32" not in mode.name
    acc = data.draw(acc_arrays(np.int32, I32_ELEMS) if is_int else acc_arrays(np.float32, F32_ELEMS))
    per_channel = mode.name.startswith("V")
    fields = draw_fields(data, acc.shape[-1], per_channel)
    relu = data.draw(st.booleans())
    got = fixpipe_convert(acc, mode, words=words_for(fields, per_channel), relu=relu)
    want = ref_fixpipe(acc, mode, fields, relu)
    if "DEQ" in mode.name:
        assert_same_float(got, want)
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert got.dtype == fixpipe_out_dtype(mode, words_for(fields, per_channel))


def test_fixpipe_req8_saturation_literal():
    acc = np.array([[-(2**31), -1000, -3, -1, 0, 1, 3, 5, 1000, 2**31 - 1]], np.int32)
    w = make_quant_word(0.5, offset=0, signed=True)
    np.testing.assert_array_equal(fixpipe_convert(acc, QuantMode.REQ8, words=w),
                                  [[-128, -128, -2, 0, 0, 0, 2, 2, 127, 127]])
    # clip(y, -256, 255) happens before the offset: 1000·0.5 → 255, + (-200) → 55
    w = make_quant_word(0.5, offset=-200, signed=False)
    np.testing.assert_array_equal(fixpipe_convert(acc, QuantMode.REQ8, words=w), [[0, 0, 0, 0, 0, 0, 0, 0, 55, 55]])
    w = make_quant_word(1.0, shift=4, mcb=True)  # (x >> 4) saturated to int16, then scaled
    got = fixpipe_convert(np.array([2**20, -(2**20), 47, -47], np.int32), QuantMode.DEQF16, words=w)
    assert_same_float(got, np.array([32767, -32768, 2, -3], np.float16))


@given(acc=acc_arrays(np.float32, F32_ELEMS), relu=st.booleans())
def test_fixpipe_float_modes(acc, relu):
    a = np.where(acc < 0, np.float32(0), acc) if relu else acc
    assert_same_float(fixpipe_convert(acc, QuantMode.F322F16, relu=relu), conv(a, np.float16))
    assert_same_float(fixpipe_convert(acc, QuantMode.F322BF16, relu=relu), conv(a, BF16))
    assert_same_float(fixpipe_convert(acc, QuantMode.NoQuant, relu=relu), a)


@given(acc=acc_arrays(np.int32, I32_ELEMS), relu=st.booleans())
def test_fixpipe_noquant_int(acc, relu):
    got = fixpipe_convert(acc, "NoQuant", relu=relu)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.maximum(acc, 0) if relu else acc)


def test_fixpipe_out_dtype():
    assert fixpipe_out_dtype(QuantMode.F322BF16) == BF16
    assert fixpipe_out_dtype(QuantMode.DEQF16, make_quant_word(1.0)) == np.float16
    assert fixpipe_out_dtype(QuantMode.REQ8, make_quant_word(1.0, signed=False)) == np.uint8
    assert fixpipe_out_dtype(QuantMode.VREQ8, quant_words([1.0, 2.0])) == np.int8
    assert fixpipe_out_dtype(QuantMode.NoQuant, acc_dtype="int32") == np.int32


I32 = np.zeros((2, 4), np.int32)
F32 = np.zeros((2, 4), np.float32)
W1 = make_quant_word(1.0)


@pytest.mark.parametrize("acc, mode, words, exc, msg", [
    (F32, QuantMode.REQ8, W1, TypeError, r"Fixpipe REQ8 expects a int32 L0C accumulator, got float32"),
    (I32, QuantMode.F322F16, None, TypeError, r"Fixpipe F322F16 expects a float32 L0C accumulator, got int32"),
    (I32, QuantMode.QF322B8_PRE, W1, TypeError, r"QF322B8_PRE expects a float32"),
    (np.zeros(4, np.float16), QuantMode.NoQuant, None, TypeError, r"NoQuant expects a float32 or int32"),
    (I32, QuantMode.DEQF16, None, ValueError, r"Fixpipe DEQF16 needs one scalar u64 quant word"),
    (I32, QuantMode.VREQ8, None, ValueError, r"Fixpipe VREQ8 needs a \(4,\) uint64 word vector"),
    (I32, QuantMode.REQ8, quant_words([1.0] * 4), ValueError, r"REQ8 takes one scalar quant word.*use VREQ8"),
    (I32, QuantMode.REQ8, [W1], ValueError, r"REQ8 takes one scalar quant word.*use VREQ8"),
    (I32, QuantMode.VREQ8, quant_words([1.0] * 3), ValueError,
     r"VREQ8 needs one quant word per output channel: shape \(4,\), got \(3,\)"),
    (I32, QuantMode.VDEQF16, np.uint64(W1), ValueError, r"shape \(4,\), got \(\); use DEQF16"),
    (F32, QuantMode.VQF322B8_PRE, np.ones((2, 4), np.uint64), ValueError, r"shape \(4,\), got \(2, 4\)"),
    (F32, QuantMode.F322F16, W1, ValueError, r"Fixpipe F322F16 takes no quant words"),
    (I32, QuantMode.REQ8, 1.0, TypeError, r"REQ8 quant word must be an integer"),
    (I32, QuantMode.REQ8, -1, ValueError, r"REQ8 quant word must fit in u64"),
    (I32, QuantMode.VREQ8, np.ones(4, np.float32), TypeError, r"VREQ8 needs a 1-D uint64 array.*float32"),
    (I32, QuantMode.VREQ8, [1.0, 2, 3, 4], TypeError, r"VREQ8 needs a 1-D uint64 array"),
    (I32, QuantMode.VREQ8, np.array([-1, 0, 0, 0]), ValueError, r"VREQ8 quant words must be non-negative"),
    (I32, QuantMode.VREQ8, quant_words([1.0] * 4, signed=[True, False, True, True]), ValueError,
     r"VREQ8: per-channel words disagree on the sign bit"),
    (np.int32(3), QuantMode.VREQ8, quant_words([1.0]), ValueError, r"VREQ8 needs an accumulator of shape"),
    (I32, "REQ9", W1, TypeError, r"quant mode must be a QuantMode \(NoQuant, F322F16"),
])
def test_fixpipe_errors(acc, mode, words, exc, msg):
    with pytest.raises(exc, match=msg):
        fixpipe_convert(acc, mode, words=words)


def test_fixpipe_accepts_python_int_lists():
    words = [int(w) for w in quant_words([0.5, 1.0, 2.0, 4.0])]
    got = fixpipe_convert(np.array([[2, 2, 2, 2]], np.int32), QuantMode.VREQ8, words=words)
    np.testing.assert_array_equal(got, [[1, 2, 4, 8]])
