"""SwiGLU fused with per-token quantisation (ops/swiglu.py) on a 910C die's AIV, against its NumPy reference.

q and scale must equal `swiglu_quant_reference` bit for bit: the fp32 intermediate h = SiLU(gate) · up is
computed by the same sequence of correctly rounded fp32 operations (and exp as float64 rounded once) as the
vector unit, so the quantisation sees the very same h. The reference itself is checked against float64.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu
from ascendemu.ops.quant import quantize_per_token
from ascendemu.ops.rowwise import RowTiling
from ascendemu.ops.swiglu import swiglu_quant, swiglu_quant_reference, swiglu_reference

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
TILINGS = [None, RowTiling(chunk=64), RowTiling(chunk=128, resident=False), RowTiling(group=False)]


def gate_up(rng, m, inter, dtype, kind):
    """[gate | up]: 'normal' at a random scale (h stays finite), 'wide' = gate across SiLU's whole range
    (e^−g overflows below −88.7), 'sparse' = mostly zero."""
    dt = np.dtype(dtype)
    shape = (m, 2 * inter)
    if kind == "normal":
        return (rng.standard_normal(shape) * 2.0 ** rng.integers(-12, 5)).astype(dt)
    if kind == "wide":
        g = rng.uniform(-200, 200, (m, inter)) if dt == BF16 else rng.uniform(-100, 100, (m, inter))
        return np.concatenate([g, rng.standard_normal((m, inter))], axis=1).astype(dt)
    x = (rng.standard_normal(shape) * 4).astype(dt)
    return np.where(rng.random(shape) < 0.95, dt.type(0), x).astype(dt)


def assert_same(q, scale, x):
    qr, sr = swiglu_quant_reference(x)
    assert q.dtype == np.int8 and q.shape == (x.shape[0], x.shape[1] // 2) and scale.shape == (x.shape[0],)
    bad = np.argwhere(q != qr)
    assert not bad.size, f"q differs at {bad[:5].tolist()}: got {q[tuple(bad[0])]}, expected {qr[tuple(bad[0])]}"
    assert np.array_equal(scale.view(np.uint32), sr.view(np.uint32)), (scale, sr)


@settings(deadline=None)
@given(m=st.integers(1, 40), inter=st.integers(1, 300), dtype=st.sampled_from([BF16, F16]),
       kind=st.sampled_from(["normal", "wide", "sparse"]), tiling=st.sampled_from(TILINGS),
       seed=st.integers(0, 2**32 - 1))
def test_matches_reference(m, inter, dtype, kind, tiling, seed):
    x = gate_up(np.random.default_rng(seed), m, inter, dtype, kind)
    q, scale = swiglu_quant(ascendemu.Die("910c"), x, tiling=tiling)
    assert_same(q, scale, x)


@pytest.mark.parametrize("inter", [64, 512, 2048])
def test_short_row_tiles(inter):
    """I a multiple of 64: several rows per tile, gate and up copied in with one strided DataCopy each."""
    x = gate_up(np.random.default_rng(inter), 70, inter, BF16, "normal")
    q, scale = swiglu_quant(ascendemu.Die("910c"), x)
    assert_same(q, scale, x)


@pytest.mark.parametrize("m,inter,tiling", [(1000, 64, RowTiling(scale_rows=16)), (600, 100, RowTiling(scale_rows=8)),
                                            (300, 512, None)])
def test_many_rows_per_core(m, inter, tiling):
    """Several tiles per core, partial last tiles and several scale flushes per core."""
    x = gate_up(np.random.default_rng(m + inter), m, inter, BF16, "normal")
    q, scale = swiglu_quant(ascendemu.Die("910c"), x, tiling=tiling)
    assert_same(q, scale, x)


def test_reference_is_silu_times_up():
    """The fp32 reference is within a few fp32 ulps of float64 SiLU(g) · u (5 roundings); where SiLU(g) is
    fp32-subnormal (g ≲ −80) within a few 2⁻¹⁴⁹ · |u|; and where e^−g overflows fp32 (g < −88.72) it
    is −0, while the true value is below 89 · e^−88.72 · |u| < 3.2e-37 · |u|."""
    x = gate_up(np.random.default_rng(3), 64, 256, BF16, "wide")
    h = swiglu_reference(x).astype(np.float64)
    g, u = x[:, :256].astype(np.float64), x[:, 256:].astype(np.float64)
    with np.errstate(over="ignore"):
        exact = g / (1 + np.exp(-g)) * u
    overflow = g < -88.72
    assert np.all(h[overflow] == 0) and np.all(np.abs(exact[overflow]) < 3.2e-37 * np.abs(u[overflow]) + 1e-45)
    ok = np.abs(h - exact) <= 4 * 2.0 ** -24 * np.abs(exact) + 4 * 2.0 ** -149 * (1 + np.abs(u))
    assert np.all(ok | overflow)


def test_silu_saturation_and_zeros():
    gate = np.array([[-200.0, -89.0, -88.0, -1.0, 0.0, 1.0, 88.0, 200.0],  # e^−g overflows for g < −88.72
                     [0.0] * 8,  # h = 0: scale 0, q 0
                     [-1e30, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]])  # SiLU(−1e30) = −0
    up = np.array([[1.0] * 8, [5.0] * 8, [3.0] * 8])
    x = np.concatenate([gate, up], axis=1).astype(BF16)
    q, scale = swiglu_quant(ascendemu.Die("910c"), x)
    assert_same(q, scale, x)
    assert q[0, 0] == 0 and q[0, -1] == 127 and scale[1] == 0 and not q[1].any()
    assert q[2, -1] == 127 and not q[2, :-1].any()


def test_equals_quantize_of_the_fp32_intermediate_rounded():
    """When h is exactly representable in bf16, swiglu_quant(x) quantises like quantize_per_token(bf16(h))."""
    inter = 96
    g = np.full((5, inter), 30.0)  # SiLU(30) = 30 / (1 + e⁻³⁰) rounds to 30 in fp32
    up = np.random.default_rng(0).integers(-8, 9, (5, inter)) / 8
    x = np.concatenate([g, up], axis=1).astype(BF16)
    q, scale = swiglu_quant(ascendemu.Die("910c"), x)
    h = swiglu_reference(x)
    q2, scale2 = quantize_per_token(ascendemu.Die("910c"), h.astype(BF16))
    assert np.array_equal(q, q2) and np.array_equal(scale, scale2)


@pytest.mark.parametrize("m,inter,tiling", [(1, 1, None), (40, 300, None), (96, 2048, None), (64, 256, None),
                                            (5, 700, RowTiling(chunk=256, resident=False))])
def test_timing_only_matches_functional(m, inter, tiling):
    x = gate_up(np.random.default_rng(m + inter), m, inter, BF16, "normal")
    fun = ascendemu.Die("910c")
    swiglu_quant(fun, x, tiling=tiling)
    timing = ascendemu.Die("910c", functional=False)
    q, scale = swiglu_quant(timing, timing.gm.empty((m, 2 * inter), "bfloat16"), tiling=tiling)
    assert q.is_phantom and q.shape == (m, inter) and scale.shape == (m,)
    assert timing.last_report.cycles == fun.last_report.cycles
    assert len(fun.last_report.cores) == min(48, m)


def test_global_tensors_in_and_out():
    die = ascendemu.Die("910c")
    x = gate_up(np.random.default_rng(2), 9, 50, F16, "normal")
    q, scale = swiglu_quant(die, die.gm.from_numpy(x))
    assert isinstance(q, ascendemu.GlobalTensor) and isinstance(scale, ascendemu.GlobalTensor)
    assert_same(q.numpy(), scale.numpy(), x)


@pytest.mark.parametrize("x,err,msg", [
    (np.zeros((2, 7), BF16), ValueError, "7 columns; it must be \\[M, 2·I\\]"),
    (np.zeros(8, BF16), ValueError, "must be 2-D"),
    (np.zeros((0, 8), BF16), ValueError, "at least one row"),
    (np.zeros((2, 8), np.float32), TypeError, "gate_up is float32; it must be bfloat16 or float16"),
    ("gate_up", TypeError, "numpy array or a GlobalTensor"),
])
def test_rejects_bad_inputs(x, err, msg):
    with pytest.raises(err, match=msg):
        swiglu_quant(ascendemu.Die("910c"), x)
