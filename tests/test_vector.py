"""Tests of the vector unit (ascendemu/vector.py; reference sections 3, 13 and 14).

Every test runs real kernels on an emulated die: operands go GM → UB, one (or a few) vector
instructions run, and every operand comes back UB → GM, so the sources are checked unchanged
too. Expectations are computed here independently of the implementation:

* addressing: block b of repeat r of an operand sits at base + (r·rep_stride + b·blk_stride)·32 B
  (reference §13), typed out again in `offsets`;
* arithmetic: float ops are computed in float64 and rounded once to the operand dtype (exact
  for +, −, ×, ÷ of fp16/fp32 operands since 53 ≥ 2·24 + 2); integer ops in int64, then wrapped;
* reductions: the pairwise tree of vector.py's docstring, written again with float64 adds;
* cycles: vector_head_cycles + ceil(repeats · lanes / rate) with the rates of the §3 table.
"""

import math
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu as ae
from ascendemu import (CMPMODE, MASK_PLACEHOLDER, SELMODE, AlignmentError, BinaryRepeatParams, BoundsError,
                       BrcbRepeatParams, DTypeError, HardEvent, ParamError, ReduceOrder, RoundMode,
                       UnaryRepeatParams)
from ascendemu.numerics import CAST_PAIRS, cast as numerics_cast

F16, F32, I16, I32 = (np.dtype(t) for t in (np.float16, np.float32, np.int16, np.int32))
BF16 = np.dtype(ml_dtypes.bfloat16)
U8, I8, U16, U32, I64 = (np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.uint32, np.int64))
DT = {"float16": F16, "float32": F32, "int16": I16, "int32": I32, "bfloat16": BF16, "uint8": U8, "int8": I8,
      "uint16": U16, "uint32": U32, "int64": I64}
FLOATS = ["float16", "float32"]
ARITH = ["float16", "float32", "int16", "int32"]
SPEC = ae.spec.get("910c")
HEAD = SPEC.vector_head_cycles


# ------------------------------------------------------------------------------------------------ the harness


def run(fn, *arrays, functional=True, block_dim=1):
    """Copy `arrays` GM → UB, run `fn(ctx, *ub_tensors)`, copy every tensor back UB → GM.

    Returns (list of the arrays as they came back, the launch report)."""
    for a in arrays:
        assert a.nbytes % 32 == 0, "test bug: operands must be whole 32 B blocks"
    die = ae.Die("910c", functional=functional)
    gms = [die.gm.from_numpy(a) for a in arrays]

    @ae.kernel("aiv")
    def one_instruction(ctx):
        ubs = [ctx.ub.alloc(a.shape, a.dtype) for a in arrays]
        for u, g in zip(ubs, gms):
            ctx.data_copy(u, g)
        ctx.set_flag(HardEvent.MTE2_V, 0)
        ctx.wait_flag(HardEvent.MTE2_V, 0)
        fn(ctx, *ubs)
        ctx.set_flag(HardEvent.V_MTE3, 0)
        ctx.wait_flag(HardEvent.V_MTE3, 0)
        for u, g in zip(ubs, gms):
            ctx.data_copy(g, u)

    report = die.launch(one_instruction, block_dim=block_dim)
    return ([g.numpy() for g in gms] if functional else None), report


def v_cycles(report):
    return report.cores[0].busy["V"]


def offsets(reps, lanes, dtype, blk, rep):
    """Element offset of lane j of repeat r: block j // E of repeat r sits at (r·rep + b·blk)·32 B."""
    e = 32 // np.dtype(dtype).itemsize
    r = np.arange(reps)[:, None]
    j = np.arange(lanes)[None, :]
    return ((r * rep + (j // e) * blk) * 32) // np.dtype(dtype).itemsize + j % e


def mask_lanes(mask, reps, lanes):
    """bool[reps, lanes]: an int k = the first k lanes; [m0, m1] = lane i ↔ bit i of the 128-bit mask."""
    if isinstance(mask, (list, tuple)):
        word = int(mask[0]) | (int(mask[1]) << 64)
        row = np.array([(word >> i) & 1 for i in range(lanes)], bool)
    else:
        row = np.arange(lanes) < int(mask)
    return np.tile(row, (reps, 1))


def counter_lanes(total, lanes):
    reps = -(-total // lanes)
    return reps, (np.arange(reps * lanes) < total).reshape(reps, lanes)


def whole_blocks(n, dtype):
    """n rounded up to whole 32 B blocks of `dtype` (at least one block)."""
    e = 32 // np.dtype(dtype).itemsize
    return max(e, -(-n // e) * e)


def rand_values(rng, dtype, n):
    """Random values: for floats a mix of random finite bit patterns, moderate normals and small
    integers (so that ties, cancellations and exact results occur); for integers the full range."""
    dt = np.dtype(dtype)
    if dt == BF16 or dt.kind == "f":
        bits = rng.integers(0, 1 << (8 * dt.itemsize), n, dtype=np.uint64).astype(f"u{dt.itemsize}").view(dt)
        with np.errstate(invalid="ignore"):
            bits = np.where(np.isfinite(bits.astype(np.float64)), bits, dt.type(1))
        normal = (rng.standard_normal(n) * 4).astype(dt)
        small = rng.integers(-4, 5, n).astype(dt)
        pick = rng.integers(0, 3, n)
        return np.where(pick == 0, bits, np.where(pick == 1, normal, small)).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, int(info.max) + 1, n, dtype=np.int64).astype(dt)


def assert_bits(got, exp, signed_zero=True):
    """Bit-exact equality (NaN matches any NaN); with signed_zero=False, +0 and −0 match too."""
    got, exp = np.asarray(got), np.asarray(exp)
    assert got.dtype == exp.dtype and got.shape == exp.shape
    if exp.dtype.kind in "iu":
        np.testing.assert_array_equal(got, exp)
        return
    g64, e64 = got.astype(np.float64), exp.astype(np.float64)
    nan = np.isnan(e64)
    assert (np.isnan(g64) == nan).all(), f"NaN positions differ: {np.flatnonzero(np.isnan(g64) != nan)[:10]}"
    u = f"u{exp.dtype.itemsize}"
    same = got.view(u) == exp.view(u)
    if not signed_zero:
        same |= (g64 == 0) & (e64 == 0)
    bad = ~same & ~nan
    assert not bad.any(), (f"{bad.sum()} lanes differ, first at {np.flatnonzero(bad)[:8]}: "
                           f"got {got[bad][:8]}, expected {exp[bad][:8]}")


def f64_op(fn, dtype):
    """An op computed in float64 (float dtypes) or int64 (integers, then wrapped) and rounded to dtype."""
    dt = np.dtype(dtype)

    def op(*xs):
        with np.errstate(all="ignore"):
            if dt.kind == "f":
                return np.asarray(fn(*(x.astype(np.float64) for x in xs))).astype(dt)
            return np.asarray(fn(*(x.astype(np.int64) for x in xs))).astype(dt)
    return op


BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "max": np.maximum,
          "min": np.minimum}
SCALAR = {"adds": np.add, "muls": np.multiply, "maxs": np.maximum, "mins": np.minimum}
UNARY = {"exp": np.exp, "ln": np.log, "sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x),
         "reciprocal": lambda x: 1.0 / x, "abs": np.abs, "relu": lambda x: np.maximum(x, 0)}
# max/min/relu of (+0, −0) may return either zero: the hardware does not say which.
SIGNED_ZERO = {"max": False, "min": False, "maxs": False, "mins": False, "relu": False}


def draw_mask(data, lanes):
    k = st.integers(1, lanes)
    bits = st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1) if lanes > 64 else st.just(0))
    return data.draw(st.one_of(k, bits.map(list)), label="mask")


def draw_strides(data, n_srcs, max_rep=20):
    """[(blk, rep)] for dst (blk ≥ 1) then each source (blk ≥ 0)."""
    out = [(data.draw(st.integers(1, 3)), data.draw(st.integers(0, max_rep)))]
    for _ in range(n_srcs):
        out.append((data.draw(st.integers(0, 3)), data.draw(st.integers(0, max_rep))))
    return out


def binary_params(s):
    (db, dr), (ab, ar), (bb, br) = s
    return BinaryRepeatParams(dst_blk_stride=db, src0_blk_stride=ab, src1_blk_stride=bb, dst_rep_stride=dr,
                              src0_rep_stride=ar, src1_rep_stride=br)


def unary_params(s):
    (db, dr), (sb, sr) = s
    return UnaryRepeatParams(dst_blk_stride=db, src_blk_stride=sb, dst_rep_stride=dr, src_rep_stride=sr)


def repeat_case(rng, dtypes, strides, act, slack):
    """Random operands big enough for every lane of `act`'s repeats (+ `slack` blocks), and their offsets."""
    reps, lanes = act.shape
    offs, arrays = [], []
    for dt, (blk, rep), extra in zip(dtypes, strides, slack):
        o = offsets(reps, lanes, dt, blk, rep)
        offs.append(o)
        n = whole_blocks((int(o.max()) + 1 if reps else 0) + extra * 32 // np.dtype(dt).itemsize, dt)
        arrays.append(rand_values(rng, dt, n))
    return offs, arrays


def expect_repeats(ref, arrays, offs, act):
    """dst after running `ref` over the repeats in order (later repeats see earlier results)."""
    out = [a.copy() for a in arrays]
    for r in range(act.shape[0]):
        a = act[r]
        vals = ref(*(s[o[r][a]] for s, o in zip(out[1:], offs[1:])))
        out[0][offs[0][r][a]] = vals
    return out[0]


def check_repeat_form(data, call, ref, dtypes, lanes, n_srcs, params, signed_zero=True, counter=False,
                      max_rep=20):
    """Draw a mask (or a counter-mode total), repeats and strides; run `call(ctx, dst, *srcs, mask, reps, params)`."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
    strides = draw_strides(data, n_srcs, max_rep)
    if counter:
        total = data.draw(st.integers(0, 6 * lanes), label="total")
        mask = total
        reps_arg = data.draw(st.integers(0, 255), label="ignored repeat_times")
        reps, act = counter_lanes(total, lanes)
    else:
        mask = draw_mask(data, lanes)
        reps = reps_arg = data.draw(st.integers(0, 8), label="repeat_times")
        act = mask_lanes(mask, reps, lanes)
    slack = [data.draw(st.integers(0, 2)) for _ in range(1 + n_srcs)]
    offs, arrays = repeat_case(rng, dtypes, strides, act, slack)
    p = params(strides)

    def fn(ctx, dst, *srcs):
        if counter:
            ctx.set_mask_count()
        call(ctx, dst, *srcs, mask, reps_arg, p)
        if counter:
            ctx.set_mask_norm()

    outs, _ = run(fn, *arrays)
    assert_bits(outs[0], expect_repeats(ref, arrays, offs, act), signed_zero)
    for got, a in zip(outs[1:], arrays[1:]):
        assert_bits(got, a)


# ------------------------------------------------------------------------------------- binary and scalar ops


binary_cases = st.sampled_from([(op, dt) for op in BINARY for dt in (FLOATS if op == "div" else ARITH)])
scalar_cases = st.sampled_from([(op, dt) for op in SCALAR for dt in ARITH])


@settings(deadline=None)
@given(case=binary_cases, data=st.data())
def test_binary_count_form(case, data):
    op, dtype = case
    dt = DT[dtype]
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    count = data.draw(st.integers(0, 3 * 256 // dt.itemsize + 5), label="count")
    n = whole_blocks(count + data.draw(st.integers(0, 40)), dt)
    dst, a, b = (rand_values(rng, dt, n) for _ in range(3))
    (got, ga, gb), _ = run(lambda ctx, d, x, y: getattr(ctx, op)(d, x, y, count), dst, a, b)
    exp = dst.copy()
    exp[:count] = f64_op(BINARY[op], dt)(a[:count], b[:count])
    assert_bits(got, exp, SIGNED_ZERO.get(op, True))
    assert_bits(ga, a)
    assert_bits(gb, b)


@settings(deadline=None)
@given(case=binary_cases, data=st.data())
def test_binary_repeat_form(case, data):
    op, dtype = case
    dt = DT[dtype]
    check_repeat_form(data, lambda ctx, d, x, y, m, r, p: getattr(ctx, op)(d, x, y, m, r, p),
                      f64_op(BINARY[op], dt), [dt] * 3, 256 // dt.itemsize, 2, binary_params,
                      SIGNED_ZERO.get(op, True))


def scalar_for(rng, dt):
    v = rand_values(rng, dt, 1)[0]
    return float(v) if dt.kind == "f" else int(v)


@settings(deadline=None)
@given(case=scalar_cases, data=st.data())
def test_scalar_count_form(case, data):
    op, dtype = case
    dt = DT[dtype]
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    count = data.draw(st.integers(0, 3 * 256 // dt.itemsize + 5), label="count")
    n = whole_blocks(count + data.draw(st.integers(0, 40)), dt)
    dst, a = rand_values(rng, dt, n), rand_values(rng, dt, n)
    s = scalar_for(rng, dt)
    (got, ga), _ = run(lambda ctx, d, x: getattr(ctx, op)(d, x, s, count), dst, a)
    exp = dst.copy()
    exp[:count] = f64_op(SCALAR[op], dt)(a[:count], np.array(s).astype(dt))
    assert_bits(got, exp, SIGNED_ZERO.get(op, True))
    assert_bits(ga, a)


@settings(deadline=None)
@given(case=scalar_cases, data=st.data())
def test_scalar_repeat_form(case, data):
    op, dtype = case
    dt = DT[dtype]
    s = scalar_for(np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1))), dt)
    sv = np.array(s).astype(dt)
    check_repeat_form(data, lambda ctx, d, x, m, r, p: getattr(ctx, op)(d, x, s, m, r, p),
                      lambda x: f64_op(SCALAR[op], dt)(x, sv), [dt] * 2, 256 // dt.itemsize, 1, unary_params,
                      SIGNED_ZERO.get(op, True))


def test_scalar_is_rounded_to_the_dtype_first():
    x = np.arange(16, dtype=np.float16)
    (got, _), _ = run(lambda ctx, d, a: ctx.adds(d, a, 0.1, 16), np.zeros(16, np.float16), x)
    assert_bits(got, (x.astype(np.float64) + float(np.float16(0.1))).astype(np.float16))
    xi = np.full(16, 7, np.int16)
    (gi, _), _ = run(lambda ctx, d, a: ctx.muls(d, a, -3, 16), np.zeros(16, np.int16), xi)
    np.testing.assert_array_equal(gi, np.full(16, -21, np.int16))


def test_integer_ops_wrap():
    a = np.array([32767, -32768, 200, -1] * 4, np.int16)
    b = np.array([1, -1, 200, 1] * 4, np.int16)
    (s, _, _), _ = run(lambda ctx, d, x, y: ctx.add(d, x, y, 16), np.zeros(16, np.int16), a, b)
    (p, _, _), _ = run(lambda ctx, d, x, y: ctx.mul(d, x, y, 16), np.zeros(16, np.int16), a, b)
    np.testing.assert_array_equal(s, np.array([-32768, 32767, 400, 0] * 4, np.int16))
    np.testing.assert_array_equal(p, np.array([32767, -32768, -25536, -1] * 4, np.int16))


def test_fp16_rounds_after_every_operation():
    # 2048 + 1 is a tie in fp16 and rounds to 2048 (even) each time; in fp32 the two adds would give 2050
    a = np.full(16, 2048, np.float16)
    (got, _), _ = run(lambda ctx, d, x: (ctx.adds(d, x, 1.0, 16), ctx.adds(d, d, 1.0, 16)), np.zeros(16, np.float16), a)
    np.testing.assert_array_equal(got, np.full(16, 2048, np.float16))


# ------------------------------------------------------------------------------------------------ unary ops


unary_cases = st.sampled_from([(op, dt) for op in UNARY for dt in FLOATS + (["int32"] if op == "relu" else [])])


@settings(deadline=None)
@given(case=unary_cases, data=st.data())
def test_unary_count_form(case, data):
    op, dtype = case
    dt = DT[dtype]
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    count = data.draw(st.integers(0, 3 * 256 // dt.itemsize + 5), label="count")
    n = whole_blocks(count + data.draw(st.integers(0, 40)), dt)
    dst, a = rand_values(rng, dt, n), rand_values(rng, dt, n)
    (got, ga), _ = run(lambda ctx, d, x: getattr(ctx, op)(d, x, count), dst, a)
    exp = dst.copy()
    exp[:count] = f64_op(UNARY[op], dt)(a[:count])
    assert_bits(got, exp, SIGNED_ZERO.get(op, True))
    assert_bits(ga, a)


@settings(deadline=None)
@given(case=unary_cases, data=st.data())
def test_unary_repeat_form(case, data):
    op, dtype = case
    dt = DT[dtype]
    check_repeat_form(data, lambda ctx, d, x, m, r, p: getattr(ctx, op)(d, x, m, r, p), f64_op(UNARY[op], dt),
                      [dt] * 2, 256 // dt.itemsize, 1, unary_params, SIGNED_ZERO.get(op, True))


@pytest.mark.parametrize("dtype", FLOATS)
def test_unary_special_values(dtype):
    dt = DT[dtype]
    x = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 4.0] * (32 // dt.itemsize), dt)
    with np.errstate(all="ignore"):
        for op, exp in [("exp", [1, 1, math.e, 1 / math.e, np.inf, 0, np.nan, math.exp(4)]),
                        ("ln", [-np.inf, -np.inf, 0, np.nan, np.inf, np.nan, np.nan, math.log(4)]),
                        ("sqrt", [0, -0.0, 1, np.nan, np.inf, np.nan, np.nan, 2]),
                        ("rsqrt", [np.inf, -np.inf, 1, np.nan, 0, np.nan, np.nan, 0.5]),
                        ("reciprocal", [np.inf, -np.inf, 1, -1, 0, -0.0, np.nan, 0.25]),
                        ("abs", [0, 0, 1, 1, np.inf, np.inf, np.nan, 4])]:
            (got, _), _ = run(lambda ctx, d, a: getattr(ctx, op)(d, a, x.size), np.zeros_like(x), x)
            assert_bits(got, np.array(exp * (32 // dt.itemsize), np.float64).astype(dt))


ALL_FP16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16)


@pytest.mark.parametrize("op", list(UNARY))
def test_unary_fp16_exhaustive(op):
    """Every fp16 input (in two halves that fit UB): float64 result rounded once to fp16."""
    for half in (ALL_FP16[:1 << 15], ALL_FP16[1 << 15:]):
        (got, _), _ = run(lambda ctx, d, a: getattr(ctx, op)(d, a, half.size), np.zeros_like(half), half)
        assert_bits(got, f64_op(UNARY[op], F16)(half), SIGNED_ZERO.get(op, True))


def test_fp16_sqrt_rsqrt_reciprocal_are_correctly_rounded():
    """Independent of float64 libm: r is the correctly rounded fp16 value of v = f(x) iff v lies between the
    midpoints of r and its neighbours. v ≥ a is decided exactly: sqrt x ≥ a ⇔ x ≥ a²; 1/√x ≥ a ⇔ x·a² ≤ 1;
    1/x ≥ a ⇔ x·a ≤ 1 (a has ≤ 12 significant bits, so every product is exact in float64; no ties occur)."""
    x = ALL_FP16[:0x7C00]  # +0 and every positive finite value; +0 is left out of the check
    x64 = x[1:].astype(np.float64)
    ge = {"sqrt": lambda a: x64 >= a * a, "rsqrt": lambda a: x64 * a * a <= 1, "reciprocal": lambda a: x64 * a <= 1}
    # the fp16 value line: 0, every positive finite value, then 65536 standing for overflow to inf
    line = np.concatenate([ALL_FP16[:0x7C00].astype(np.float64), [65536.0]])
    for op in ge:
        (got, _), _ = run(lambda ctx, d, a: getattr(ctx, op)(d, a, x.size), np.zeros_like(x), x)
        got = got[1:]
        k = np.where(np.isinf(got), 0x7C00, got.view(np.uint16).astype(np.int64))  # position on the line
        assert (got > 0).all() and (k < 0x7C00 + 1).all()
        lo = (line[k] + line[np.maximum(k - 1, 0)]) / 2
        hi = (line[k] + line[np.minimum(k + 1, 0x7C00)]) / 2
        ok = ge[op](lo) & ((k == 0x7C00) | ~ge[op](hi))
        assert ok.all(), f"{op}: {np.flatnonzero(~ok).size} inputs not correctly rounded, e.g. {x[1:][~ok][:4]}"


# ------------------------------------------------------------------------------------------------ mask modes


counter_cases = st.sampled_from([("add", "float16"), ("sub", "float32"), ("max", "int32"), ("muls", "float16"),
                                 ("adds", "int16"), ("sqrt", "float32"), ("exp", "float16")])


@settings(deadline=None)
@given(case=counter_cases, data=st.data())
def test_counter_mode(case, data):
    op, dtype = case
    dt = DT[dtype]
    lanes = 256 // dt.itemsize
    if op in BINARY:
        check_repeat_form(data, lambda ctx, d, x, y, m, r, p: getattr(ctx, op)(d, x, y, m, r, p),
                          f64_op(BINARY[op], dt), [dt] * 3, lanes, 2, binary_params, counter=True)
    elif op in SCALAR:
        sv = np.array(3).astype(dt)
        check_repeat_form(data, lambda ctx, d, x, m, r, p: getattr(ctx, op)(d, x, 3, m, r, p),
                          lambda x: f64_op(SCALAR[op], dt)(x, sv), [dt] * 2, lanes, 1, unary_params, counter=True)
    else:
        check_repeat_form(data, lambda ctx, d, x, m, r, p: getattr(ctx, op)(d, x, m, r, p), f64_op(UNARY[op], dt),
                          [dt] * 2, lanes, 1, unary_params, counter=True)


def test_counter_mode_then_norm_and_mask_placeholder():
    """set_mask_count / set_mask_norm switch the meaning of the mask; MASK_PLACEHOLDER uses set_vector_mask's."""
    a = np.arange(256, dtype=np.float32)

    def fn(ctx, d1, d2, d3, x):
        ctx.set_mask_count()
        ctx.adds(d1, x, 1.0, 100, 1, UnaryRepeatParams())      # 100 elements over two repeats; repeat_times ignored
        ctx.set_mask_norm()
        ctx.adds(d2, x, 1.0, 10, 2, UnaryRepeatParams())       # first 10 lanes of 2 repeats
        ctx.set_vector_mask([0b1011, 0])
        ctx.adds(d3, x, 1.0, MASK_PLACEHOLDER, 3, UnaryRepeatParams())
    z = np.zeros(256, np.float32)
    (d1, d2, d3, _), _ = run(fn, z, z, z, a)
    np.testing.assert_array_equal(d1, np.where(np.arange(256) < 100, a + 1, 0))
    lane = np.arange(256) % 64
    np.testing.assert_array_equal(d2, np.where((lane < 10) & (np.arange(256) < 128), a + 1, 0))
    np.testing.assert_array_equal(d3, np.where(np.isin(lane, [0, 1, 3]) & (np.arange(256) < 192), a + 1, 0))


def test_repeat_times_zero_and_count_zero_are_nops():
    x = np.ones(128, np.float16)
    d = np.full(128, 5, np.float16)
    (got, _, _), rep = run(lambda ctx, dd, a, b: (ctx.add(dd, a, b, 0), ctx.add(dd, a, b, 128, 0, BinaryRepeatParams())),
                           d, x, x)
    np.testing.assert_array_equal(got, d)
    assert v_cycles(rep) == 2 * HEAD


def test_large_strides():
    """blk/rep strides up to 255 address far into UB."""
    dt = F32
    reps, blk, rep = 2, 255, 3
    o = offsets(reps, 64, dt, blk, rep)
    n = whole_blocks(int(o.max()) + 1, dt)
    rng = np.random.default_rng(7)
    src, dst = rand_values(rng, dt, n), rand_values(rng, dt, n)
    p = UnaryRepeatParams(dst_blk_stride=blk, src_blk_stride=blk, dst_rep_stride=rep, src_rep_stride=rep)
    (got, _), _ = run(lambda ctx, d, s: ctx.abs(d, s, 64, reps, p), dst, src)
    exp = dst.copy()
    exp[o.reshape(-1)] = np.abs(src[o.reshape(-1)])
    assert_bits(got, exp)


# ------------------------------------------------------------------------------- in-place accumulation (§13)


accumulate_cases = st.sampled_from([(op, dt) for op in ("add", "sub", "mul", "max", "min")
                                    for dt in ("float16", "float32", "int32")])


@settings(deadline=None)
@given(case=accumulate_cases, data=st.data())
def test_in_place_accumulation(case, data):
    """dst overlaps src1 with rep stride 0: the repeats run one after another, each adding into the last."""
    op, dtype = case
    dt = DT[dtype]
    lanes = 256 // dt.itemsize
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    counter = data.draw(st.booleans(), label="counter mode")
    if counter:
        total = data.draw(st.integers(1, 6 * lanes), label="total")
        reps, act = counter_lanes(total, lanes)
        mask, reps_arg = total, 1
    else:
        mask = draw_mask(data, lanes)
        reps = reps_arg = data.draw(st.integers(1, 8))
        act = mask_lanes(mask, reps, lanes)
    # which variant: acc (one repeat) += x[r]  (dst_rep = src1_rep = 0), or
    # y[r] = x[r] op y[0] with dst = y (rep 8) overlapping src1 = y[:lanes] (rep 0)
    variant = data.draw(st.sampled_from(["acc", "prefix"]))
    x = rand_values(rng, dt, reps * lanes)
    if dt.kind == "f":
        x = (rng.standard_normal(reps * lanes) * 8).astype(dt)  # keep sums finite and order-sensitive
    if variant == "acc":
        acc = rand_values(rng, dt, lanes) if dt.kind != "f" else (rng.standard_normal(lanes) * 8).astype(dt)
        p = BinaryRepeatParams(dst_rep_stride=0, src0_rep_stride=8, src1_rep_stride=0)

        def fn(ctx, d, s0):
            if counter:
                ctx.set_mask_count()
            getattr(ctx, op)(d, s0, d, mask, reps_arg, p)
            if counter:
                ctx.set_mask_norm()
        (got, _), _ = run(fn, acc, x)
        exp = acc.copy()
        f = f64_op(BINARY[op], dt)
        for r in range(reps):
            a = act[r]
            exp[a] = f(x[r * lanes:(r + 1) * lanes][a], exp[a])
    else:
        y = rand_values(rng, dt, reps * lanes) if dt.kind != "f" else (rng.standard_normal(reps * lanes) * 8).astype(dt)
        p = BinaryRepeatParams(dst_rep_stride=8, src0_rep_stride=8, src1_rep_stride=0)

        def fn(ctx, d, s0):
            if counter:
                ctx.set_mask_count()
            getattr(ctx, op)(d, s0, d[:lanes], mask, reps_arg, p)
            if counter:
                ctx.set_mask_norm()
        (got, _), _ = run(fn, y, x)
        exp = y.copy()
        f = f64_op(BINARY[op], dt)
        for r in range(reps):
            a = act[r]
            exp[r * lanes:(r + 1) * lanes][a] = f(x[r * lanes:(r + 1) * lanes][a], exp[:lanes][a])
    assert_bits(got, exp)


# ------------------------------------------------------------------------------------------------- duplicate


dup_dtypes = st.sampled_from(["float16", "float32", "int16", "int32", "bfloat16", "uint16", "uint32"])


def dup_scalar(rng, dt):
    if dt == BF16:
        return float(rand_values(rng, dt, 1)[0].astype(np.float32))
    return scalar_for(rng, dt)


@settings(deadline=None)
@given(dtype=dup_dtypes, data=st.data())
def test_duplicate(dtype, data):
    dt = DT[dtype]
    lanes = 256 // dt.itemsize
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    s = dup_scalar(rng, dt)
    sv = np.array(s).astype(dt)
    if data.draw(st.booleans(), label="count form"):
        count = data.draw(st.integers(0, 3 * lanes + 5))
        dst = rand_values(rng, dt, whole_blocks(count + data.draw(st.integers(0, 40)), dt))
        (got,), _ = run(lambda ctx, d: ctx.duplicate(d, s, count), dst)
        exp = dst.copy()
        exp[:count] = sv
    else:
        mask = draw_mask(data, lanes)
        reps = data.draw(st.integers(0, 8))
        blk, rep = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 20))
        act = mask_lanes(mask, reps, lanes)
        o = offsets(reps, lanes, dt, blk, rep)
        dst = rand_values(rng, dt, whole_blocks((int(o.max()) + 1 if reps else 0) + 16, dt))
        (got,), _ = run(lambda ctx, d: ctx.duplicate(d, s, mask, reps, blk, rep), dst)
        exp = dst.copy()
        exp[o[act]] = sv
    assert_bits(got, exp)


def test_duplicate_default_strides():
    (got,), _ = run(lambda ctx, d: ctx.duplicate(d, 2.5, 3, 2), np.zeros(128, np.float32))
    np.testing.assert_array_equal(got, np.where((np.arange(128) % 64 < 3), 2.5, 0).astype(np.float32))


# ------------------------------------------------------------------------------------------------------ cast


def cast_in_range(rng, src, n):
    """Source values for a cast: random values plus ties (x.5) and out-of-range magnitudes for narrowing."""
    v = rand_values(rng, src, n)
    if np.dtype(src) == BF16 or np.dtype(src).kind == "f":
        ties = (rng.integers(-300, 300, n) + 0.5).astype(src)
        with np.errstate(over="ignore"):
            big = (rng.standard_normal(n) * 1e5).astype(np.float32).astype(src)
        pick = rng.integers(0, 3, n)
        v = np.where(pick == 0, v, np.where(pick == 1, ties, big)).astype(src)
    return v


@pytest.mark.parametrize("pair", sorted(CAST_PAIRS))
@pytest.mark.parametrize("mode", list(RoundMode), ids=lambda m: m.name)
def test_cast_every_pair_and_mode(pair, mode):
    """The Cast instruction converts the selected lanes as numerics.cast does (numerics is tested on its own)."""
    src, dst = DT[pair[0]], DT[pair[1]]
    wide = max(src.itemsize, dst.itemsize)
    lanes = 256 // wide
    rng = np.random.default_rng(zlib.crc32(f"{pair}{mode.name}".encode()))
    count = 2 * lanes + 7
    x = cast_in_range(rng, src, whole_blocks(count, src) + 32 // src.itemsize)
    d = rand_values(rng, dst, whole_blocks(count, dst) + 32 // dst.itemsize)
    (got, gx), rep = run(lambda ctx, o, a: ctx.cast(o, a, mode, count), d, x)
    exp = d.copy()
    exp[:count] = numerics_cast(x[:count], dst, mode)
    assert_bits(got, exp)
    assert_bits(gx, x)


def test_cast_independent_references():
    rng = np.random.default_rng(1)
    # fp32 → fp16, RINT = numpy's round-to-nearest-even conversion (overflow to inf)
    x = rand_values(rng, F32, 512)
    with np.errstate(over="ignore"):
        (got, _), _ = run(lambda ctx, o, a: ctx.cast(o, a, RoundMode.CAST_RINT, 512), np.zeros(512, F16), x)
        assert_bits(got, x.astype(F16))
    # fp16 → fp32 is exact in every mode
    h = rand_values(rng, F16, 256)
    for mode in RoundMode:
        (got, _), _ = run(lambda ctx, o, a: ctx.cast(o, a, mode, 256), np.zeros(256, F32), h)
        assert_bits(got, h.astype(F32))
    # fp16 → int8, TRUNC: toward zero, saturating
    h = np.concatenate([(rng.standard_normal(224) * 100).astype(F16),
                        np.array([127.9, 128, -128.9, -129, 300, -300, np.inf, -np.inf] * 4, F16)])
    (got, _), _ = run(lambda ctx, o, a: ctx.cast(o, a, RoundMode.CAST_TRUNC, 256), np.zeros(256, I8), h)
    np.testing.assert_array_equal(got, np.clip(np.trunc(h.astype(np.float64)), -128, 127).astype(I8))
    # fp32 → int32 FLOOR / CEIL / ROUND (ties away from zero)
    f = np.concatenate([(rng.standard_normal(56) * 1000).astype(F32), np.array([2.5, -2.5, 3.5, -0.5, 0.5, 1e10,
                                                                                -1e10, 7], F32)])
    v = f.astype(np.float64)
    for mode, ref in [(RoundMode.CAST_FLOOR, np.floor(v)), (RoundMode.CAST_CEIL, np.ceil(v)),
                      (RoundMode.CAST_ROUND, np.sign(v) * np.floor(np.abs(v) + 0.5)),
                      (RoundMode.CAST_RINT, np.rint(v)), (RoundMode.CAST_TRUNC, np.trunc(v))]:
        (got, _), _ = run(lambda ctx, o, a: ctx.cast(o, a, mode, 64), np.zeros(64, I32), f)
        np.testing.assert_array_equal(got, np.clip(ref, -2 ** 31, 2 ** 31 - 1).astype(I32), err_msg=mode.name)
    # int32 → fp32 RINT = numpy's conversion; int16 → fp32 exact
    i = rand_values(rng, I32, 64)
    (got, _), _ = run(lambda ctx, o, a: ctx.cast(o, a, RoundMode.CAST_RINT, 64), np.zeros(64, F32), i)
    assert_bits(got, i.astype(F32))
    s = rand_values(rng, I16, 64)
    (got, _), _ = run(lambda ctx, o, a: ctx.cast(o, a, RoundMode.CAST_NONE, 64), np.zeros(64, F32), s)
    assert_bits(got, s.astype(F32))
    # int8 / uint8 → fp16 exact
    b = rand_values(rng, U8, 128)
    (got, _), _ = run(lambda ctx, o, a: ctx.cast(o, a, RoundMode.CAST_NONE, 128), np.zeros(128, F16), b)
    assert_bits(got, b.astype(F16))


cast_repeat_pairs = st.sampled_from([("float32", "float16"), ("float16", "float32"), ("int8", "float16"),
                                     ("float16", "uint8"), ("int32", "int64"), ("float32", "int32"),
                                     ("bfloat16", "float32")])


@settings(deadline=None)
@given(pair=cast_repeat_pairs, mode=st.sampled_from(list(RoundMode)), data=st.data())
def test_cast_repeat_form(pair, mode, data):
    """A repeat covers 256 B of the wider type; each operand's blocks are 32 B of its own type."""
    src, dst = DT[pair[0]], DT[pair[1]]
    lanes = 256 // max(src.itemsize, dst.itemsize)
    check_repeat_form(data, lambda ctx, d, x, m, r, p: ctx.cast(d, x, mode, m, r, p),
                      lambda x: numerics_cast(x, dst, mode), [dst, src], lanes, 1, unary_params)


# ----------------------------------------------------------------------------------------- compare and select


def bits_of(bytes_):
    """Bits of a uint8 array, little-endian within each byte (bit i of byte k = element 8k + i)."""
    return ((np.asarray(bytes_, np.uint8)[:, None] >> np.arange(8)[None, :]) & 1).astype(bool).reshape(-1)


CMP_REF = {CMPMODE.LT: lambda a, b: a < b, CMPMODE.GT: lambda a, b: a > b, CMPMODE.EQ: lambda a, b: a == b,
           CMPMODE.LE: lambda a, b: a <= b, CMPMODE.GE: lambda a, b: a >= b, CMPMODE.NE: lambda a, b: a != b}


def cmp_operands(rng, dt, n):
    a = rand_values(rng, dt, n)
    b = rand_values(rng, dt, n)
    b = np.where(rng.integers(0, 3, n) == 0, a, b).astype(dt)  # many equal lanes
    if dt.kind == "f":
        a[rng.integers(0, n, 3)] = np.nan
    return a, b


@settings(deadline=None)
@given(dtype=st.sampled_from(["float16", "float32", "int32"]), mode=st.sampled_from(list(CMPMODE)), data=st.data())
def test_compare_count_form(dtype, mode, data):
    dt = DT[dtype]
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    lanes = 256 // dt.itemsize
    count = lanes * data.draw(st.integers(0, 4))
    n = whole_blocks(count + data.draw(st.integers(0, 40)), dt)
    a, b = cmp_operands(rng, dt, n)
    dst = rng.integers(0, 256, whole_blocks(count // 8 + 32, U8), dtype=np.uint8)
    scalar = data.draw(st.booleans(), label="compare_scalar")
    if scalar:
        s = scalar_for(rng, dt)
        (got, _, _), _ = run(lambda ctx, d, x, y: ctx.compare_scalar(d, x, s, mode, count), dst, a, b)
        with np.errstate(invalid="ignore"):
            pred = CMP_REF[mode](a[:count], np.array(s).astype(dt))
    else:
        (got, _, _), _ = run(lambda ctx, d, x, y: ctx.compare(d, x, y, mode, count), dst, a, b)
        with np.errstate(invalid="ignore"):
            pred = CMP_REF[mode](a[:count], b[:count])
    np.testing.assert_array_equal(bits_of(got[:count // 8]), pred)
    np.testing.assert_array_equal(got[count // 8:], dst[count // 8:])


@settings(deadline=None)
@given(dtype=st.sampled_from(["float16", "float32", "int32"]), mode=st.sampled_from(list(CMPMODE)), data=st.data())
def test_compare_repeat_form(dtype, mode, data):
    """Repeat r writes lanes/8 bytes at byte r·lanes/8 of dst; masked lanes keep their old bits."""
    dt = DT[dtype]
    lanes = 256 // dt.itemsize
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    mask = draw_mask(data, lanes)
    reps = data.draw(st.integers(0, 8))
    strides = draw_strides(data, 2)
    act = mask_lanes(mask, reps, lanes)
    o = [offsets(reps, lanes, dt, blk, rep) for blk, rep in strides[1:]]
    n = [whole_blocks((int(oo.max()) + 1 if reps else 0) + 8, dt) for oo in o]
    a, b = rand_values(rng, dt, n[0]), rand_values(rng, dt, n[1])
    dst = rng.integers(0, 256, whole_blocks(reps * lanes // 8 + 1, U8), dtype=np.uint8)
    (got, _, _), _ = run(lambda ctx, d, x, y: ctx.compare(d, x, y, mode, mask, reps, binary_params(strides)),
                         dst, a, b)
    old = bits_of(dst[:reps * lanes // 8]).reshape(reps, lanes)
    with np.errstate(invalid="ignore"):
        new = CMP_REF[mode](a[o[0]], b[o[1]])
    np.testing.assert_array_equal(bits_of(got[:reps * lanes // 8]).reshape(reps, lanes), np.where(act, new, old))
    np.testing.assert_array_equal(got[reps * lanes // 8:], dst[reps * lanes // 8:])


@settings(deadline=None)
@given(dtype=st.sampled_from(FLOATS), tensor_scalar=st.booleans(), data=st.data())
def test_select(dtype, tensor_scalar, data):
    dt = DT[dtype]
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    count = 8 * data.draw(st.integers(0, 80))
    n = whole_blocks(count + data.draw(st.integers(0, 40)), dt)
    dst, a, b = (rand_values(rng, dt, n) for _ in range(3))
    sel = rng.integers(0, 256, whole_blocks(count // 8, U8), dtype=np.uint8)
    bit = bits_of(sel)[:count]
    exp = dst.copy()
    if tensor_scalar:
        s = scalar_for(rng, dt)
        (got, _, _, _), _ = run(lambda ctx, d, m, x, y: ctx.select(d, m, x, s, SELMODE.VSEL_TENSOR_SCALAR_MODE, count),
                                dst, sel, a, b)
        exp[:count] = np.where(bit, a[:count], np.array(s).astype(dt))
    else:
        (got, _, _, _), _ = run(lambda ctx, d, m, x, y: ctx.select(d, m, x, y, SELMODE.VSEL_TENSOR_TENSOR_MODE, count),
                                dst, sel, a, b)
        exp[:count] = np.where(bit, a[:count], b[:count])
    assert_bits(got, exp)


def test_compare_then_select_pipeline():
    """relu by hand: mask = x > 0, select(x, 0)."""
    x = np.linspace(-3, 3, 128).astype(np.float16)

    def fn(ctx, d, m, a):
        ctx.compare_scalar(m, a, 0.0, CMPMODE.GT, 128)
        ctx.select(d, m, a, 0.0, SELMODE.VSEL_TENSOR_SCALAR_MODE, 128)
    (got, m, _), _ = run(fn, np.zeros(128, np.float16), np.zeros(32, np.uint8), x)
    np.testing.assert_array_equal(got, np.maximum(x, 0))
    np.testing.assert_array_equal(m[:16], np.packbits(x > 0, bitorder="little"))


# -------------------------------------------------------------------------------------------------- reductions


def tree_sum(v, dt):
    """Adjacent pairs, level by level, each sum rounded to dt (vector.py's stated WholeReduceSum order)."""
    v = np.asarray(v, dt)
    while v.size > 1:
        v = (v[0::2].astype(np.float64) + v[1::2].astype(np.float64)).astype(dt)
    return v[0]


def reduce_case(data, dt, max_rep=20):
    lanes = 256 // dt.itemsize
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    mask = draw_mask(data, lanes)
    reps = data.draw(st.integers(0, 8))
    blk, rep = data.draw(st.integers(0, 3)), data.draw(st.integers(0, max_rep))
    act = mask_lanes(mask, reps, lanes)
    o = offsets(reps, lanes, dt, blk, rep)
    n = whole_blocks((int(o.max()) + 1 if reps else 0) + 4, dt)
    if data.draw(st.booleans(), label="small integers (ties)"):
        src = rng.integers(-3, 4, n).astype(dt)
    else:
        src = (rng.standard_normal(n) * 16).astype(dt)
    return rng, mask, reps, blk, rep, act, o, src


@settings(deadline=None)
@given(dtype=st.sampled_from(FLOATS), data=st.data())
def test_whole_reduce_sum(dtype, data):
    dt = DT[dtype]
    rng, mask, reps, blk, rep, act, o, src = reduce_case(data, dt)
    dstride = data.draw(st.integers(1, 3))
    dst = rand_values(rng, dt, whole_blocks(reps * dstride + 3, dt))
    (got, gs), _ = run(lambda ctx, d, s: ctx.whole_reduce_sum(d, s, mask, reps, dstride, blk, rep), dst, src)
    exp = dst.copy()
    for r in range(reps):
        exp[r * dstride] = tree_sum(np.where(act[r], src[o[r]], 0), dt)
    assert_bits(got, exp)
    assert_bits(gs, src)


def test_whole_reduce_sum_is_a_pairwise_tree():
    # fp16: 2048 + 1 + 1 + ... left to right stays 2048; the tree adds the ones first
    x = np.ones(128, np.float16)
    x[0] = 2048
    (got, _), _ = run(lambda ctx, d, s: ctx.whole_reduce_sum(d, s, 128, 1), np.zeros(16, np.float16), x)
    assert got[0] == tree_sum(x, F16) and tree_sum(x, F16) != np.float16(2048)


@settings(deadline=None)
@given(dtype=st.sampled_from(FLOATS), pick=st.sampled_from(["max", "min"]), order=st.sampled_from(list(ReduceOrder)),
       data=st.data())
def test_whole_reduce_max_min(dtype, pick, order, data):
    dt = DT[dtype]
    rng, mask, reps, blk, rep, act, o, src = reduce_case(data, dt)
    if isinstance(mask, list) and reps and not act[0].any():
        mask = [1, 0]  # at least one active lane
        act = mask_lanes(mask, reps, act.shape[1])
    dstride = data.draw(st.integers(1, 3))
    width = 1 if order == ReduceOrder.ORDER_ONLY_VALUE else 2
    dst = rand_values(rng, dt, whole_blocks(reps * dstride * width + 3, dt))
    (got, _), _ = run(lambda ctx, d, s: getattr(ctx, f"whole_reduce_{pick}")(d, s, mask, reps, dstride, blk, rep,
                                                                              order), dst, src)
    exp = dst.copy()
    ix = exp.view(U16 if dt.itemsize == 2 else U32)
    for r in range(reps):
        lanes = np.flatnonzero(act[r])
        vals = src[o[r][lanes]].astype(np.float64)
        best = vals.max() if pick == "max" else vals.min()
        first = lanes[np.flatnonzero(vals == best)[0]]
        at = r * dstride * width
        if order == ReduceOrder.ORDER_ONLY_VALUE:
            exp[at] = src[o[r][first]]
        elif order == ReduceOrder.ORDER_VALUE_INDEX:
            exp[at] = src[o[r][first]]
            ix[at + 1] = first
        else:
            ix[at] = first
            exp[at + 1] = src[o[r][first]]
    assert_bits(got, exp)


@settings(deadline=None)
@given(dtype=st.sampled_from(FLOATS), which=st.sampled_from(["sum", "max", "min"]), data=st.data())
def test_block_reduce(dtype, which, data):
    """One result per 32 B block, 8 per repeat; dst_rep_stride counts groups of 8 results."""
    dt = DT[dtype]
    rng, mask, reps, blk, rep, act, o, src = reduce_case(data, dt)
    e = 32 // dt.itemsize
    dstride = data.draw(st.integers(1, 3))
    dst = rand_values(rng, dt, whole_blocks(reps * dstride * 8 + 8, dt))
    (got, _), _ = run(lambda ctx, d, s: getattr(ctx, f"block_reduce_{which}")(d, s, reps, mask, dstride, blk, rep),
                      dst, src)
    exp = dst.copy()
    for r in range(reps):
        for b in range(8):
            lanes = np.arange(b * e, (b + 1) * e)
            a = act[r][lanes]
            if not a.any():
                continue  # vector.py: a block with no active lane writes nothing
            v = src[o[r][lanes]]
            if which == "sum":
                res = tree_sum(np.where(a, v, 0), dt)
            else:
                res = (v[a].max() if which == "max" else v[a].min())
            exp[r * dstride * 8 + b] = res
    assert_bits(got, exp)


# ------------------------------------------------------------------------------------------------ brcb, gather


@settings(deadline=None)
@given(dtype=st.sampled_from(["float16", "float32", "int16", "int32", "uint16", "uint32"]), data=st.data())
def test_brcb(dtype, data):
    dt = DT[dtype]
    e = 32 // dt.itemsize
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    reps = data.draw(st.integers(0, 8))
    blk, rep = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 30))
    src = rand_values(rng, dt, whole_blocks(8 * reps + data.draw(st.integers(0, 20)), dt))
    o = offsets(reps, 8 * e, dt, blk, rep)
    dst = rand_values(rng, dt, whole_blocks((int(o.max()) + 1 if reps else 0) + 8, dt))
    (got, _), _ = run(lambda ctx, d, s: ctx.brcb(d, s, reps, BrcbRepeatParams(dst_blk_stride=blk, dst_rep_stride=rep)),
                      dst, src)
    exp = dst.copy()
    for r in range(reps):
        for b in range(8):
            start = (r * rep + b * blk) * e
            exp[start:start + e] = src[8 * r + b]
    assert_bits(got, exp)


@settings(deadline=None)
@given(dtype=st.sampled_from(["float16", "float32", "int32", "uint16", "bfloat16"]), data=st.data())
def test_gather(dtype, data):
    dt = DT[dtype]
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    src = rand_values(rng, dt, whole_blocks(data.draw(st.integers(1, 300)), dt) + 64 // dt.itemsize)
    base = 32 * data.draw(st.integers(0, 2))
    count = data.draw(st.integers(0, 200))
    idx = rng.integers(base // dt.itemsize, src.size, max(count, 1))[:count]
    off = np.zeros(whole_blocks(count, U32), U32)
    off[:count] = idx * dt.itemsize - base
    dst = rand_values(rng, dt, whole_blocks(count + 5, dt))
    (got, _, _), _ = run(lambda ctx, d, s, of: ctx.gather(d, s, of, base, count), dst, src, off)
    exp = dst.copy()
    exp[:count] = src[idx]
    assert_bits(got, exp)


# ---------------------------------------------------------------------------------------------------- timing


def timing_case(fn, *arrays):
    _, rep = run(fn, *arrays)
    return v_cycles(rep)


@settings(deadline=None)
@given(r=st.integers(1, 60))
def test_cycles_fp32_add(r):
    z = np.zeros(64 * r, np.float32)
    assert timing_case(lambda ctx, d, a, b: ctx.add(d, a, b, 64 * r), z, z, z) == HEAD + r
    # the repeat form costs whole repeats whatever the mask
    assert timing_case(lambda ctx, d, a, b: ctx.add(d, a, b, 1, r, BinaryRepeatParams()), z, z, z) == HEAD + r


def test_cycles_by_class():
    """head + ceil(repeats·lanes / rate), with the §3 rates (elements/cycle)."""
    h, f, i8, u8, i32, u32, i64 = (np.zeros(n, t) for n, t in ((1024, F16), (512, F32), (1024, I8), (128, U8),
                                                               (512, I32), (512, U32), (512, I64)))
    c = lambda n, rate: HEAD + -(-n // rate)  # noqa: E731
    cases = [
        ("fp16 exp, 1 repeat", lambda ctx, d, s: ctx.exp(d, s, 128), (h, h), HEAD + 4),
        ("fp16 exp, 3 repeats", lambda ctx, d, s: ctx.exp(d, s, 128, 3, UnaryRepeatParams()), (h, h), c(384, 32)),
        ("fp32 sqrt", lambda ctx, d, s: ctx.sqrt(d, s, 100), (f, f), c(128, 32)),
        ("fp16 div", lambda ctx, d, s: ctx.div(d, s, s, 256), (h, h), c(256, 32)),
        ("fp16 add", lambda ctx, d, s: ctx.add(d, s, s, 1000), (h, h), c(1024, 128)),
        ("fp16 muls", lambda ctx, d, s: ctx.muls(d, s, 2.0, 129), (h, h), c(256, 128)),
        ("int32 relu", lambda ctx, d, s: ctx.relu(d, s, 64), (i32, i32), c(64, 64)),
        ("fp32 duplicate", lambda ctx, d: ctx.duplicate(d, 1.0, 512), (f,), c(512, 64)),
        ("fp32→fp16 cast", lambda ctx, d, s: ctx.cast(d, s, RoundMode.CAST_RINT, 256), (h, f), c(256, 64)),
        ("int8→fp16 cast", lambda ctx, d, s: ctx.cast(d, s, RoundMode.CAST_NONE, 1024), (h, i8), c(1024, 128)),
        ("fp16 compare", lambda ctx, d, s: ctx.compare(d, s, s, CMPMODE.LT, 1024), (u8, h), c(1024, 128)),
        ("fp32 select", lambda ctx, d, m, s: ctx.select(d, m, s, s, SELMODE.VSEL_TENSOR_TENSOR_MODE, 512),
         (f, u8, f), c(512, 64)),
        ("fp16 whole_reduce_sum", lambda ctx, d, s: ctx.whole_reduce_sum(d, s, 128, 5), (h, h), HEAD + 5 * 7),
        ("fp32 whole_reduce_max", lambda ctx, d, s: ctx.whole_reduce_max(d, s, 64, 3), (f, f), HEAD + 3 * 7),
        ("fp16 block_reduce_sum", lambda ctx, d, s: ctx.block_reduce_sum(d, s, 2, 128), (h, h), HEAD + 2 * 7),
        ("fp32 block_reduce_max", lambda ctx, d, s: ctx.block_reduce_max(d, s, 6, 64), (f, f), HEAD + 6),
        ("fp32 brcb", lambda ctx, d, s: ctx.brcb(d, s, 4), (f, f), HEAD + 4),
        ("fp32 gather", lambda ctx, d, s, o: ctx.gather(d, s, o, 0, 64), (f, f, u32), c(64, 5)),
    ]
    for name, fn, arrays, want in cases:
        assert timing_case(fn, *arrays) == want, name


def test_cycles_cast_to_int64():
    i32, i64 = np.zeros(256, I32), np.zeros(256, I64)
    assert timing_case(lambda ctx, d, s: ctx.cast(d, s, RoundMode.CAST_NONE, 256), i64, i32) == HEAD + 256 // 32


def timing_kernel(die, x, y, out, n):
    @ae.kernel("aiv")
    def k(ctx):
        a = ctx.ub.alloc((n,), "float16")
        b = ctx.ub.alloc((n,), "float16")
        c = ctx.ub.alloc((n,), "float16")
        f = ctx.ub.alloc((n,), "float32")
        m = ctx.ub.alloc((n // 8,), "uint8")
        s = ctx.ub.alloc((16,), "float16", zero=True)
        ctx.data_copy(a, x)
        ctx.data_copy(b, y)
        ctx.set_flag(HardEvent.MTE2_V, 0)
        ctx.wait_flag(HardEvent.MTE2_V, 0)
        ctx.add(c, a, b, n)
        ctx.exp(c, c, 128, n // 128, UnaryRepeatParams())
        ctx.compare(m, a, b, CMPMODE.GT, n)
        ctx.select(c, m, c, 0.0, SELMODE.VSEL_TENSOR_SCALAR_MODE, n)
        ctx.cast(f, c, RoundMode.CAST_NONE, n)
        ctx.whole_reduce_max(s, c, 128, 4, 1, 1, 8, ReduceOrder.ORDER_ONLY_VALUE)
        ctx.set_mask_count()
        ctx.muls(c, c, 0.5, n - 3, 1, UnaryRepeatParams())
        ctx.set_mask_norm()
        ctx.set_flag(HardEvent.V_MTE3, 0)
        ctx.wait_flag(HardEvent.V_MTE3, 0)
        ctx.data_copy(out, c)
    return die.launch(k)


def test_timing_only_mode_matches_functional():
    n = 1024
    die = ae.Die("910c")
    rng = np.random.default_rng(3)
    x = die.gm.from_numpy(rng.standard_normal(n).astype(np.float16))
    y = die.gm.from_numpy(rng.standard_normal(n).astype(np.float16))
    functional = timing_kernel(die, x, y, die.gm.empty(n, "float16"), n)
    tdie = ae.Die("910c", functional=False)
    timing = timing_kernel(tdie, tdie.gm.empty(n, "float16"), tdie.gm.empty(n, "float16"),
                           tdie.gm.empty(n, "float16"), n)
    assert not timing.functional and functional.functional
    assert timing.cycles == functional.cycles
    assert timing.cores[0].busy == functional.cores[0].busy
    assert functional.cores[0].busy["V"] == (HEAD + n // 128) + (HEAD + n // 32) + (HEAD + n // 128) * 2 + \
        (HEAD + n // 64) + (HEAD + 4 * 7) + (HEAD + n // 128)


# ---------------------------------------------------------------------------------------------------- errors


def z(n, dtype="float16"):
    return np.zeros(n, DT[dtype])


ERRORS = [
    # wrong dtypes
    ("add uint8", lambda c, d, a: c.add(d, a, a, 32), (z(32, "uint8"), z(32, "uint8")), DTypeError,
     r"add dst is uint8; add takes float16, float32, int16, int32"),
    ("div int32", lambda c, d, a: c.div(d, a, a, 8), (z(8, "int32"), z(8, "int32")), DTypeError, r"div takes float16, float32"),
    ("exp int32", lambda c, d, a: c.exp(d, a, 8), (z(8, "int32"), z(8, "int32")), DTypeError, r"exp dst is int32"),
    ("relu int16", lambda c, d, a: c.relu(d, a, 16), (z(16, "int16"), z(16, "int16")), DTypeError, r"relu dst is int16"),
    ("adds bf16", lambda c, d, a: c.adds(d, a, 1.0, 16), (z(16, "bfloat16"), z(16, "bfloat16")), DTypeError, "adds"),
    ("mixed dtypes", lambda c, d, a: c.add(d, a, a, 8), (z(8, "float32"), z(16)), DTypeError,
     r"add: operands differ in dtype \(float32, float16, float16\)"),
    ("compare dst", lambda c, d, a: c.compare(d, a, a, CMPMODE.LT, 128), (z(128), z(128)), DTypeError,
     "compare dst must be uint8"),
    ("compare_scalar dst", lambda c, d, a: c.compare_scalar(d, a, 0.0, CMPMODE.LT, 128), (z(128), z(128)),
     DTypeError, "compare_scalar dst must be uint8"),
    ("compare mode", lambda c, m, a: c.compare(m, a, a, "LT", 128), (z(32, "uint8"), z(128)), ParamError,
     "expected a CMPMODE"),
    ("select mask dtype", lambda c, d, a: c.select(d, a, d, d, SELMODE.VSEL_TENSOR_TENSOR_MODE, 16), (z(16), z(16)),
     DTypeError, "select mask must be uint8"),
    ("gather offsets dtype", lambda c, d, o: c.gather(d, d, o, 0, 8), (z(16), z(8, "int32")), DTypeError,
     "gather src_offset must be uint32"),
    ("not a tensor", lambda c, d: c.abs(d, np.zeros(16, np.float16), 16), (z(16),), DTypeError,
     "must be a LocalTensor in UB, got ndarray"),
    # cast
    ("cast fp32→int8", lambda c, d, a: c.cast(d, a, RoundMode.CAST_RINT, 32), (z(32, "int8"), z(32, "float32")),
     DTypeError, r"cast float32 → int8 is not a vector Cast"),
    ("cast bf16→fp16", lambda c, d, a: c.cast(d, a, RoundMode.CAST_RINT, 16), (z(16), z(16, "bfloat16")),
     DTypeError, r"cast bfloat16 → float16 is not a vector Cast.*float32, int32"),
    ("cast round mode", lambda c, d, a: c.cast(d, a, "CAST_RINT", 16), (z(16), z(16, "float32")), ParamError,
     "expected a RoundMode"),
    # masks
    ("mask 0", lambda c, d, a: c.abs(d, a, 0, 1, UnaryRepeatParams()), (z(128), z(128)), ParamError,
     r"contiguous mask 0 is outside 1\.\.128"),
    ("mask 129 fp16", lambda c, d, a: c.abs(d, a, 129, 1, UnaryRepeatParams()), (z(128), z(128)), ParamError,
     r"contiguous mask 129 is outside 1\.\.128"),
    ("mask 65 fp32", lambda c, d, a: c.add(d, a, a, 65, 1, BinaryRepeatParams()), (z(64, "float32"), z(64, "float32")),
     ParamError, r"contiguous mask 65 is outside 1\.\.64"),
    ("mask1 with fp32", lambda c, d, a: c.abs(d, a, [1, 1], 1, UnaryRepeatParams()), (z(64, "float32"),) * 2,
     ParamError, "does not fit 64 lanes"),
    ("mask word too big", lambda c, d, a: c.abs(d, a, [1 << 64, 0], 1, UnaryRepeatParams()), (z(128), z(128)),
     ParamError, "does not fit 128 lanes"),
    ("mask negative", lambda c, d, a: c.abs(d, a, [-1, 0], 1, UnaryRepeatParams()), (z(128), z(128)),
     ParamError, "does not fit"),
    ("mask three words", lambda c, d, a: c.abs(d, a, [1, 0, 0], 1, UnaryRepeatParams()), (z(128), z(128)),
     ParamError, r"\[mask0, mask1\]"),
    ("placeholder unset", lambda c, d, a: c.abs(d, a, MASK_PLACEHOLDER, 1, UnaryRepeatParams()), (z(128), z(128)),
     ParamError, "MASK_PLACEHOLDER with no set_vector_mask"),
    ("counter negative", lambda c, d, a: (c.set_mask_count(), c.abs(d, a, -1, 1, UnaryRepeatParams())),
     (z(128), z(128)), ParamError, "negative element count"),
    ("counter bit mask", lambda c, d, a: (c.set_mask_count(), c.abs(d, a, [3, 0], 1, UnaryRepeatParams())),
     (z(128), z(128)), ParamError, "in counter mode .* the mask is one element count"),
    # repeat times and strides
    ("repeat 256", lambda c, d, a: c.abs(d, a, 128, 256, UnaryRepeatParams(1, 1, 0, 0)), (z(128), z(128)),
     ParamError, r"repeat_times 256 is outside 0\.\.255"),
    ("repeat -1", lambda c, d, a: c.abs(d, a, 128, -1, UnaryRepeatParams()), (z(128), z(128)), ParamError,
     r"repeat_times -1 is outside"),
    ("blk stride 256", lambda c, d, a: c.add(d, a, a, 16, 1, BinaryRepeatParams(src1_blk_stride=256)),
     (z(128), z(128)), ParamError, r"strides blk=256 rep=8 are outside 0\.\.255"),
    ("rep stride 256", lambda c, d, a: c.abs(d, a, 16, 1, UnaryRepeatParams(dst_rep_stride=256)),
     (z(128), z(128)), ParamError, r"rep=256 are outside 0\.\.255"),
    ("dst blk stride 0", lambda c, d, a: c.abs(d, a, 16, 1, UnaryRepeatParams(dst_blk_stride=0)),
     (z(128), z(128)), ParamError, "dst_blk_stride 0 is undefined"),
    ("duplicate dst blk 0", lambda c, d: c.duplicate(d, 1.0, 16, 1, 0, 8), (z(128),), ParamError,
     "dst_blk_stride 0"),
    ("compare stride 256", lambda c, m, a: c.compare(m, a, a, CMPMODE.LT, 128, 1, BinaryRepeatParams(src0_rep_stride=256)),
     (z(32, "uint8"), z(128)), ParamError, r"outside 0\.\.255"),
    ("reduce stride 256", lambda c, d, a: c.whole_reduce_sum(d, a, 128, 1, 1, 256, 8), (z(128), z(128)),
     ParamError, r"outside 0\.\.255"),
    ("reduce negative dst stride", lambda c, d, a: c.whole_reduce_sum(d, a, 128, 2, -1, 1, 0), (z(128), z(128)),
     ParamError, "negative dst_rep_stride -1"),
    ("negative stride", lambda c, d, a: c.add(d, a, a, 128, 2, BinaryRepeatParams(src0_rep_stride=-8)),
     (z(256), z(256)), ParamError, r"strides blk=1 rep=-8 are outside 0\.\.255"),
    ("block reduce repeat 256", lambda c, d, a: c.block_reduce_max(d, a, 256, 128, 1, 1, 0), (z(128), z(128)),
     ParamError, r"repeat_times 256 is outside"),
    ("brcb repeat 256", lambda c, d, a: c.brcb(d, a, 256), (z(128), z(128)), ParamError, r"repeat_times 256"),
    ("brcb dst blk 0", lambda c, d, a: c.brcb(d, a, 1, BrcbRepeatParams(dst_blk_stride=0)), (z(128), z(16)),
     ParamError, "dst_blk_stride 0"),
    ("wrong params type", lambda c, d, a: c.abs(d, a, 16, 1, BrcbRepeatParams()), (z(128), z(128)), ParamError,
     "expected UnaryRepeatParams, got BrcbRepeatParams"),
    ("wrong arity", lambda c, d, a: c.abs(d, a, 16, 1, UnaryRepeatParams(), 0), (z(128), z(128)), ParamError,
     "pass `count`"),
    ("negative count", lambda c, d, a: c.abs(d, a, -16), (z(128), z(128)), ParamError, "negative count -16"),
    ("compare negative count", lambda c, m, a: c.compare(m, a, a, CMPMODE.LT, -128), (z(32, "uint8"), z(128)),
     ParamError, "compare: negative count -128"),
    ("gather negative count", lambda c, d, o: c.gather(d, d, o, 0, -8), (z(16), z(8, "uint32")), ParamError,
     "gather: negative count -8"),
    # bounds
    ("count past end", lambda c, d, a: c.add(d, a, a, 129), (z(128), z(256)), BoundsError,
     r"add destination touches elements \[0, 129\) of a 128-element UB tensor"),
    ("count past src end", lambda c, d, a: c.exp(d, a[:64], 65), (z(128), z(128)), BoundsError,
     r"exp source touches elements \[0, 65\) of a 64-element"),
    ("repeats past end", lambda c, d, a: c.add(d, a, a, 128, 2, BinaryRepeatParams()), (z(256), z(128)),
     BoundsError, r"add source touches elements \[0, 256\) of a 128-element"),
    ("strides past end", lambda c, d, a: c.add(d, a, a, 1, 2, BinaryRepeatParams(src0_rep_stride=9)),
     (z(256), z(128)), BoundsError, r"add source touches elements \[0, 145\)"),
    ("bit mask past end", lambda c, d, a: c.abs(d, a[:16], [0, 1], 1, UnaryRepeatParams()), (z(128), z(128)),
     BoundsError, r"abs source touches elements \[64, 65\)"),
    ("compare past end", lambda c, m, a: c.compare(m, a, a, CMPMODE.EQ, 256), (z(32, "uint8"), z(128)),
     BoundsError, "compare"),
    ("reduce past end", lambda c, d, a: c.whole_reduce_sum(d, a, 128, 2), (z(128), z(128)), BoundsError,
     "whole_reduce_sum src"),
    ("reduce dst past end", lambda c, d, a: c.whole_reduce_max(d[:16], a, 128, 9, 1, 1, 0), (z(128), z(128)),
     BoundsError, "whole_reduce_max dst"),
    ("brcb src past end", lambda c, d, a: c.brcb(d, a, 3), (z(1024), z(16)), BoundsError, "brcb src"),
    ("gather offset out of range", lambda c, d, o: c.gather(d, d, o, 0, 8),
     (z(16), np.array([0, 2, 4, 32, 0, 0, 0, 0], np.uint32)), BoundsError, r"offset\[3\] = 32 B .* 32 B source"),
    ("gather offset misaligned", lambda c, d, o: c.gather(d, d, o, 0, 8),
     (z(16), np.array([0, 2, 3, 0, 0, 0, 0, 0], np.uint32)), BoundsError, r"offset\[2\] = 3 B is misaligned"),
    ("gather base out of range", lambda c, d, o: c.gather(d, d, o, 32, 8), (z(16), z(8, "uint32")), BoundsError,
     r"offset\[0\] = 32 B"),
    # alignment
    ("misaligned dst", lambda c, d, a: c.add(d[1:], a[:127], a[:127], 127), (z(128), z(128)), AlignmentError,
     r"add dst: UB address 0x2 is not 32 B aligned"),
    ("misaligned src", lambda c, d, a: c.exp(d, a[8:], 16), (z(128), z(128)), AlignmentError,
     r"exp src: UB address 0x110 is not 32 B aligned"),
    ("misaligned compare dst", lambda c, m, a: c.compare(m[1:], a, a, CMPMODE.LT, 128), (z(32, "uint8"), z(128)),
     AlignmentError, "not 32 B aligned"),
    ("misaligned select mask", lambda c, m, a: c.select(a, m[4:], a, a, SELMODE.VSEL_TENSOR_TENSOR_MODE, 16),
     (z(32, "uint8"), z(128)), AlignmentError, "not 32 B aligned"),
    # compare / select shapes
    ("compare count", lambda c, m, a: c.compare(m, a, a, CMPMODE.LT, 64), (z(32, "uint8"), z(128)), ParamError,
     r"count 64 × 2 B is not a multiple of 256 B"),
    ("compare_scalar count", lambda c, m, a: c.compare_scalar(m, a, 0.0, CMPMODE.LT, 32),
     (z(32, "uint8"), z(128, "float32")), ParamError, r"count 32 × 4 B is not a multiple of 256 B"),
    ("select count", lambda c, m, a: c.select(a, m, a, a, SELMODE.VSEL_TENSOR_TENSOR_MODE, 12),
     (z(32, "uint8"), z(128)), ParamError, "multiple of 8"),
    ("select mode", lambda c, m, a: c.select(a, m, a, a, SELMODE.VSEL_CMPMASK_SPR, 16),
     (z(32, "uint8"), z(128)), ParamError, "is not supported"),
]


@pytest.mark.parametrize("fn, arrays, exc, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(fn, arrays, exc, match):
    with pytest.raises(exc, match=match):
        run(fn, *arrays)


def test_error_tensor_in_wrong_buffer():
    l1 = ae.LocalBuffer("L1", 4096, 32, True, "AIC 0").alloc((128,), "float16")
    with pytest.raises(ae.ParamError, match="abs src is in L1; expected UB"):
        run(lambda c, d: c.abs(d, l1, 128), z(128))


def test_error_tensor_of_another_core():
    kept = []

    def fn(c, d, a):
        if kept:
            c.abs(d, kept[0], 128)
        kept.append(a)
    with pytest.raises(ae.ParamError, match="abs src belongs to AIV (0, not to AIV 1|1, not to AIV 0)"):
        run(fn, z(128), z(128), block_dim=2)


def test_error_messages_name_the_kernel_line():
    with pytest.raises(ae.ParamError) as info:
        run(lambda c, d, a: c.abs(d, a, 0, 1, UnaryRepeatParams()), z(128), z(128))
    assert "AIV 0" in str(info.value) and "test_vector.py" in str(info.value)


@given(reps=st.integers(1, 12), lanes=st.sampled_from([64, 128]), blk=st.integers(0, 20), rep=st.integers(0, 20),
       kind=st.sampled_from(["count", "prefix", "bits"]), k=st.integers(1, 128), total=st.integers(1, 12 * 128),
       m0=st.integers(0, 2 ** 64 - 1), m1=st.integers(0, 2 ** 64 - 1))
def test_timing_only_bounds_equal_the_full_offsets(reps, lanes, blk, rep, kind, k, total, m0, m1):
    """Timing-only mode bounds-checks from a closed form of the mask; it must equal the bounds of every active
    offset, for counter-mode counts, contiguous masks and bit masks."""
    from ascendemu.vector import _active, _mask_bits, _span_of_repeats, repeat_offsets
    e = 8 if lanes == 64 else 16
    if kind == "count":
        total = min(total, reps * lanes)
        reps = -(-total // lanes)  # as _lane_rows derives it
        rows = ("count", total)
    elif kind == "prefix":
        rows = ("prefix", min(k, lanes))
    else:
        rows = ("bits", _mask_bits(m0, 0 if lanes == 64 else m1, lanes))
    act = _active(reps, lanes, rows)
    full = repeat_offsets(reps, lanes, e, blk, rep)[act]
    want = (int(full.min()), int(full.max()) + 1) if full.size else (0, 0)
    assert _span_of_repeats(reps, rows, lanes, e, blk, rep) == want
