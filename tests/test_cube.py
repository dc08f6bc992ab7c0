"""Tests of the cube unit (ascendemu/cube.py; reference sections 2, 4, 12 and 16) and of its cycle model.

Operands are staged the way a kernel stages them: A (m×k) and Wᵀ = B (as W[n, k], `out × in`) go GM → L1 by
ND→NZ; Load2D moves Nz(A) to Zz in L0A (per row block, the k fractals with source stride M1) and Nz(W), which
is byte-identical to Zn(B), to L0B as is; 16-bit B given as K×N goes through Load2D with transpose. The L0C tile
(Nz, 16×16 fractals) comes back through Fixpipe with NoQuant (float32 / int32, exact).

References are NumPy: int8 in int64 (exact; the int32 result must be equal), floats in float64. Tolerance for
fp16 / bf16 / fp32 inputs: the cube multiplies exactly and accumulates in fp32, in an order the reference does
not publish; any order of k fp32 additions (and one bias) is within γ ≈ (k+1)·2⁻²⁴ relative to Σ|a·b| (+|bias|)
of the exact sum (Higham, recursive summation), so we allow |err| ≤ (k+1)·2⁻²³·(Σ|a||b| + |bias|): twice the
worst case, which every legal accumulation order satisfies and which still catches any wrong element, lost
k-step or wrong layout (those give errors of order |a·b| itself).

⚠ m = 1 is left out: the reference (§16, GEMV.md) says that with m = 1 the cube reads L0A as ND (GEMV), which
cube.py does not model yet (it reads Zz as for any m); see the report to the lead.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu as ae
from ascendemu import (AlignmentError, DTypeError, FixpipeParamsV220, HardEvent, LoadData2DParams, MmadParams,
                       Nd2NzParams, ParamError, QuantMode)

BF16 = np.dtype(ml_dtypes.bfloat16)
DT = {"int8": np.dtype(np.int8), "float16": np.dtype(np.float16), "bfloat16": BF16,
      "float32": np.dtype(np.float32)}
ACC = {"int8": "int32", "float16": "float32", "bfloat16": "float32", "float32": "float32"}
MACS = {"int8": 8192, "float16": 4096, "bfloat16": 4096, "float32": 1024}  # §2 table
SPEC = ae.spec.get("910c")
E = HardEvent


def cdiv(a, b):
    return -(-a // b)


def sync(ctx, event, i=0):
    ctx.set_flag(event, i)
    ctx.wait_flag(event, i)


def operands(rng, m, n, k, dtype):
    if dtype == "int8":
        return (rng.integers(-128, 128, (m, k)).astype(np.int8), rng.integers(-128, 128, (k, n)).astype(np.int8))
    a = rng.standard_normal((m, k)).astype(np.float32).astype(DT[dtype])
    b = rng.standard_normal((k, n)).astype(np.float32).astype(DT[dtype])
    return a, b


def matmul_on_die(a, b, *, chunks=(), bias=None, transpose_b=False, functional=True):
    """C = A·B (+ bias) on one AIC, accumulating over k-steps that start at the k offsets `chunks` (multiples of
    k0). Returns (C as a NumPy array or None, report)."""
    dtype = a.dtype
    name = ae.numerics.dtype_name(dtype)
    acc = ACC[name]
    m, k = a.shape
    n = b.shape[1]
    k0 = 32 // dtype.itemsize
    m1, n1, k1 = cdiv(m, 16), cdiv(n, 16), cdiv(k, k0)
    fe = 512 // dtype.itemsize  # elements per 512 B fractal
    die = ae.Die("910c", functional=functional)
    if functional:
        g_a = die.gm.from_numpy(a)
        g_b = die.gm.from_numpy(np.ascontiguousarray(b if transpose_b else b.T))
        g_bias = die.gm.from_numpy(bias) if bias is not None else None
    else:
        g_a = die.gm.empty(a.shape, name)
        g_b = die.gm.empty(b.shape if transpose_b else b.T.shape, name)
        g_bias = die.gm.empty(bias.shape, acc) if bias is not None else None
    g_c = die.gm.empty((m, n), acc)
    steps = [s for s in sorted(set(chunks)) if 0 < s < k] if chunks else []
    bounds = [0] + steps + [k]

    @ae.kernel("aic")
    def mm(ctx):
        a1 = ctx.l1.alloc((k1 * m1 * fe,), name)
        ctx.data_copy(a1, g_a, Nd2NzParams(1, m, k, 0, k, m1 * 16, 1, 0))
        if transpose_b:  # B (k×n) in Nz: N1 column blocks of K1 = k/16 row blocks (16-bit: k0 = 16)
            b1 = ctx.l1.alloc((n1 * k1 * fe,), name)
            ctx.data_copy(b1, g_b, Nd2NzParams(1, k, n, 0, n, k1 * 16, 1, 0))
        else:  # W = Bᵀ (n×k) in Nz: fractal (k1, n1) at k1·N1 + n1, exactly Zn(B)
            b1 = ctx.l1.alloc((k1 * n1 * fe,), name)
            ctx.data_copy(b1, g_b, Nd2NzParams(1, n, k, 0, k, n1 * 16, 1, 0))
        if bias is not None:
            bias1 = ctx.l1.alloc(bias.shape, acc)
            ctx.data_copy(bias1, g_bias)
        sync(ctx, E.MTE2_MTE1)
        if bias is not None:
            bt = ctx.bt.alloc(bias.shape, acc)
            ctx.data_copy(bt, bias1)
        l0a = ctx.l0a.alloc((m1 * k1 * fe,), name)
        l0b = ctx.l0b.alloc((k1 * n1 * fe,), name)
        parts = []
        for lo, hi in zip(bounds, bounds[1:]):
            s1, kc = lo // k0, cdiv(hi - lo, k0)
            a0 = l0a[s1 * m1 * fe:(s1 + kc) * m1 * fe]
            b0 = l0b[s1 * n1 * fe:(s1 + kc) * n1 * fe]
            for i in range(m1):  # Zz: row block i, its kc fractals (source stride M1)
                ctx.load_data(a0[i * kc * fe:], a1, LoadData2DParams(start_index=s1 * m1 + i, repeat_times=kc,
                                                                     src_stride=m1))
            if transpose_b:
                for j in range(kc):  # Zn row of fractals (k1 = s1 + j), each transposed from Nz(B)
                    ctx.load_data(b0[j * n1 * fe:], b1, LoadData2DParams(start_index=s1 + j, repeat_times=n1,
                                                                         src_stride=k1, if_transpose=True))
            else:
                ctx.load_data(b0, b1, LoadData2DParams(start_index=s1 * n1, repeat_times=kc * n1))
            parts.append((a0, b0, hi - lo))
        sync(ctx, E.MTE1_M)
        c0 = ctx.l0c.alloc((m1 * n1 * 256,), acc)
        for i, (a0, b0, kk) in enumerate(parts):
            first = i == 0
            p = MmadParams(m, n, kk, cmatrix_init_val=first, cmatrix_source=first and bias is not None)
            ctx.mmad(c0, a0, b0, p, bias=bt if p.cmatrix_source else None)
        sync(ctx, E.M_FIX)
        ctx.fixpipe(g_c, c0, FixpipeParamsV220(n_size=n, m_size=m, dst_stride=n))

    rep = die.launch(mm)
    return (g_c.numpy() if functional else None), rep


def check(c, a, b, bias):
    m, n = c.shape
    if a.dtype == np.int8:
        exact = a.astype(np.int64) @ b.astype(np.int64)
        if bias is not None:
            exact = exact + bias[:n].astype(np.int64)
        assert c.dtype == np.int32
        np.testing.assert_array_equal(c, exact.astype(np.int32))
        return
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact = a64 @ b64
    mag = np.abs(a64) @ np.abs(b64)
    if bias is not None:
        exact = exact + bias[:n].astype(np.float64)
        mag = mag + np.abs(bias[:n].astype(np.float64))
    k = a.shape[1]
    bound = (k + 1) * 2.0 ** -23 * mag + 1e-38
    assert c.dtype == np.float32 and np.all(np.isfinite(c)), "non-finite result (poison reached it?)"
    err = np.abs(c.astype(np.float64) - exact)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"C{worst}: {c[worst]} vs {exact[worst]}, bound {bound[worst]}"


dims = st.integers(2, 80)  # m = 1 is GEMV: see the module docstring


@settings(deadline=None)
@given(m=dims, n=st.integers(1, 80), k=st.integers(1, 80), dtype=st.sampled_from(list(DT)),
       seed=st.integers(0, 2**32 - 1), nsteps=st.integers(1, 3), with_bias=st.booleans(), data=st.data())
def test_mmad(m, n, k, dtype, seed, nsteps, with_bias, data):
    """Mmad on random shapes (not multiples of the fractal) for every cube dtype, with k split into several
    accumulating k-steps (cmatrix_init_val False after the first) and an optional bias from the BiasTable."""
    rng = np.random.default_rng(seed)
    a, b = operands(rng, m, n, k, dtype)
    k0 = 32 // DT[dtype].itemsize
    k1 = cdiv(k, k0)
    chunks = sorted(data.draw(st.sets(st.integers(1, max(k1 - 1, 1)), max_size=nsteps - 1))) if k1 > 1 else []
    chunks = [c * k0 for c in chunks]
    bias = None
    if with_bias:  # the cube reads whole 16-column fractals of the BiasTable: ceil16(n) values
        nb = cdiv(n, 16) * 16
        bias = (rng.integers(-2**20, 2**20, nb).astype(np.int32) if dtype == "int8"
                else rng.standard_normal(nb).astype(np.float32) * 8)
    transpose_b = dtype in ("float16", "bfloat16") and data.draw(st.booleans())
    c, rep = matmul_on_die(a, b, chunks=chunks, bias=bias, transpose_b=transpose_b)
    check(c, a, b, bias)
    assert rep.cores[0].cube_ops == 2 * m * n * k
    # each Mmad costs head + ceil16(m)·ceil16(n)·ceil_k0(kk)/MACs, the k-steps add up
    bounds = [0] + chunks + [k]
    want = sum(SPEC.mmad_head_cycles + cdiv(cdiv(m, 16) * 16 * cdiv(n, 16) * 16 * cdiv(hi - lo, k0) * k0,
                                             MACS[dtype]) for lo, hi in zip(bounds, bounds[1:]))
    assert rep.cores[0].busy["M"] == want


def test_mmad_int8_wraps_and_is_exact_at_extremes():
    """All −128 operands: every product is +16384, k = 80 gives 1310720 exactly (no rounding anywhere)."""
    a = np.full((20, 80), -128, np.int8)
    b = np.full((80, 24), -128, np.int8)
    c, _ = matmul_on_die(a, b, chunks=[32, 64])
    assert np.all(c == 80 * 16384)


# ----------------------------------------------------------------------------------------------- cycle model


def cycle_program(functional):
    """One fp16 Mmad (m, n, k) = (40, 24, 72) and its loads, with an independent L1→GM copy issued first."""
    m, n, k = 40, 24, 72
    m1, n1, k1 = 3, 2, 5
    die = ae.Die("910c", functional=functional)
    rng = np.random.default_rng(1)
    if functional:
        a_nz = die.gm.from_numpy(ae.layouts.nd_to_nz(rng.standard_normal((m, k)).astype(np.float16)))
        w_nz = die.gm.from_numpy(ae.layouts.nd_to_nz(rng.standard_normal((n, k)).astype(np.float16)))
    else:
        a_nz = die.gm.empty((k1, m1, 16, 16), "float16")
        w_nz = die.gm.empty((k1, n1, 16, 16), "float16")
    junk = die.gm.empty((4096,), "float16")
    c = die.gm.empty((m, n), "float16")

    @ae.kernel("aic")
    def prog(ctx):
        scratch = ctx.l1.alloc((4096,), "float16", zero=True)
        ctx.data_copy(junk, scratch)  # MTE3 from cycle 0: pushes the matmul chain back by one issue slot
        a1 = ctx.l1.alloc((k1 * m1 * 256,), "float16")
        w1 = ctx.l1.alloc((k1 * n1 * 256,), "float16")
        ctx.data_copy(a1, a_nz)
        ctx.data_copy(w1, w_nz)
        sync(ctx, E.MTE2_MTE1)
        a0 = ctx.l0a.alloc((m1 * k1 * 256,), "float16")
        b0 = ctx.l0b.alloc((k1 * n1 * 256,), "float16")
        ctx.load_data(a0, a1, LoadData2DParams(0, k1, m1))  # row block 0 only…
        for i in range(1, m1):  # …then the others: three Load2D of k1 fractals each
            ctx.load_data(a0[i * k1 * 256:], a1, LoadData2DParams(i, k1, m1))
        ctx.load_data(b0, w1, LoadData2DParams(0, k1 * n1, 1))
        sync(ctx, E.MTE1_M)
        c0 = ctx.l0c.alloc((m1 * n1 * 256,), "float32")
        ctx.mmad(c0, a0, b0, MmadParams(m, n, k))
        sync(ctx, E.M_FIX)
        ctx.fixpipe(c, c0, FixpipeParamsV220(n_size=n, m_size=m, dst_stride=n, quant_pre=QuantMode.F322F16))

    return die.launch(prog)


def test_cycles_hand_computed():
    s = SPEC
    rep = cycle_program(True)
    busy = rep.cores[0].busy
    gm_read = lambda nb: s.mte_gm_head_cycles + cdiv(nb, s.gm_read_bytes_per_cycle)  # noqa: E731
    mte3 = s.mte_gm_head_cycles + cdiv(4096 * 2, s.aic_gm_write_bytes_per_cycle)
    copy_a, copy_w = gm_read(5 * 3 * 512), gm_read(5 * 2 * 512)
    load_a = s.mte_local_head_cycles + cdiv(512 * 5, s.l1_to_l0a_bytes_per_cycle)  # × 3
    load_b = s.mte_local_head_cycles + cdiv(512 * 10, s.l1_to_l0b_bytes_per_cycle)
    mmad = s.mmad_head_cycles + cdiv(48 * 32 * 80, s.cube_fp16_macs_per_cycle)
    fix = s.fixpipe_head_cycles + max(cdiv(40 * 24, s.fixpipe_elems_per_cycle),
                                      cdiv(40 * 24 * 2, s.aic_gm_write_bytes_per_cycle))
    assert busy["MTE3"] == mte3
    assert busy["MTE2"] == copy_a + copy_w
    assert busy["MTE1"] == 3 * load_a + load_b
    assert busy["M"] == mmad
    assert busy["FIX"] == fix
    # critical path: the A copy is issued one slot after the MTE3 copy; every flag adds its latency
    lat = s.flag_latency_cycles
    t = s.scalar_issue_cycles + copy_a + copy_w + lat + 3 * load_a + load_b + lat + mmad + lat + fix
    assert mte3 < t
    assert rep.cycles == t
    # timing-only mode (phantom GM tensors) gives the same cycles and busy times
    ph = cycle_program(False)
    assert ph.cycles == rep.cycles and ph.cores[0].busy == busy


# ---------------------------------------------------------------------------------------------------- errors


def expect(body, exc, match):
    die = ae.Die("910c")

    @ae.kernel("aic")
    def k(ctx):
        body(ctx)

    with pytest.raises(exc, match=match):
        die.launch(k)


def tiles(ctx, a="float16", b="float16", c="float32"):
    return ctx.l0c.alloc((1024,), c, zero=True), ctx.l0a.alloc((1024,), a, zero=True), \
        ctx.l0b.alloc((1024,), b, zero=True)


def test_error_dtypes():
    legal = r"legal: int8×int8→int32, float16×float16→float32, bfloat16×bfloat16→float32, float32×float32→float32"
    expect(lambda ctx: ctx.mmad(*tiles(ctx, a="float16", b="int8"), MmadParams(16, 16, 16)), DTypeError,
           r"mmad float16×int8→float32 is not a cube type on 910B/C; " + legal)
    expect(lambda ctx: ctx.mmad(*tiles(ctx, c="float16"), MmadParams(16, 16, 16)), DTypeError,
           r"mmad float16×float16→float16 is not a cube type.*\(no FP8\)")
    expect(lambda ctx: ctx.mmad(*tiles(ctx, a="int8", b="int8", c="float32"), MmadParams(16, 16, 32)), DTypeError,
           r"int8×int8→float32 is not a cube type")
    expect(lambda ctx: ctx.mmad(*tiles(ctx, a="bfloat16", b="float16"), MmadParams(16, 16, 16)), DTypeError,
           r"bfloat16×float16→float32")


def test_error_ranges():
    for p, nm in ((MmadParams(4096, 16, 16), "m = 4096"), (MmadParams(16, 4096, 16), "n = 4096"),
                  (MmadParams(16, 16, 4096), "k = 4096"), (MmadParams(-1, 16, 16), "m = -1")):
        expect(lambda ctx: ctx.mmad(*tiles(ctx), p), ParamError, rf"mmad {nm} is outside 0\.\.4095")
    # a shape that does not fit the tiles is a bounds error (whole fractals are read)
    expect(lambda ctx: ctx.mmad(*tiles(ctx), MmadParams(16, 16, 80)), ae.BoundsError,
           r"mmad fm \(A\) touches elements \[0, 1280\) of a 1024-element L0A")


def test_error_alignment():
    def misaligned(which):
        def body(ctx):
            c, a, b = tiles(ctx)
            if which == "A":
                big = ctx.l0a.alloc((2048,), "float16")
                a = big[128:128 + 1024]  # 256 B: not a whole fractal
            elif which == "B":
                big = ctx.l0b.alloc((2048,), "float16")
                b = big[64:64 + 1024]
            else:
                big = ctx.l0c.alloc((2048,), "float32")
                c = big[128:128 + 1024]  # 512 B: L0C is 64 B aligned, but Mmad wants 1024 B
            ctx.mmad(c, a, b, MmadParams(16, 16, 16))
        return body
    expect(misaligned("A"), AlignmentError, r"mmad fm: L0A address 0x\w+ is not 512 B aligned")
    expect(misaligned("B"), AlignmentError, r"mmad filter: L0B address 0x\w+ is not 512 B aligned")
    expect(misaligned("C"), AlignmentError, r"mmad dst: L0C address 0x\w+ is not 1024 B aligned")


def test_error_bias():
    def with_bias(bt_dtype, give=True, where="bt"):
        def body(ctx):
            c, a, b = tiles(ctx)
            bias = (ctx.bt if where == "bt" else ctx.l1).alloc((16,), bt_dtype, zero=True)
            ctx.mmad(c, a, b, MmadParams(16, 16, 16, cmatrix_source=True), bias=bias if give else None)
        return body
    expect(with_bias("float16"), DTypeError, r"mmad bias is float16; it must be float32")
    expect(with_bias("int32"), DTypeError, r"mmad bias is int32; it must be float32")
    expect(with_bias("float32", give=False), ParamError, r"cmatrix_source needs a bias tensor in the BiasTable")
    expect(with_bias("float32", where="l1"), ParamError, r"mmad bias is in L1; expected BT")
    expect(lambda ctx: ctx.mmad(ctx.l0c.alloc((1024,), "float32"), ctx.l0b.alloc((1024,), "float16"),
                                ctx.l0b.alloc((1024,), "float16"), MmadParams(16, 16, 16)),
           ParamError, r"mmad fm \(A\) is in L0B; expected L0A")


def test_mmad_gemv_m1_reads_l0a_as_nd():
    """m = 1: L0A holds the 1×k row contiguously (ND); k > k0 tells ND from Zz apart."""
    rng = np.random.default_rng(3)
    k, n = 48, 16
    a = rng.integers(-4, 5, (1, k)).astype(np.float16)
    w = rng.integers(-4, 5, (n, k)).astype(np.float16)
    die = ae.Die("910c")
    g_a = die.gm.from_numpy(np.concatenate([a.reshape(-1), np.zeros(3 * 256 - k, np.float16)]))
    g_w, g_c = die.gm.from_numpy(ae.layouts.nd_to_nz(w)), die.gm.empty((1, n), "float32")

    @ae.kernel("aic")
    def gemv(ctx):
        a1, w1 = ctx.l1.alloc((3 * 256,), "float16"), ctx.l1.alloc((3 * 256,), "float16")
        ctx.data_copy(a1, g_a)
        ctx.data_copy(w1, g_w)
        sync(ctx, E.MTE2_MTE1)
        a0, b0 = ctx.l0a.alloc((3 * 256,), "float16"), ctx.l0b.alloc((3 * 256,), "float16")
        ctx.load_data(a0, a1, LoadData2DParams(0, 3, 1))  # the ND row, fractal by fractal
        ctx.load_data(b0, w1, LoadData2DParams(0, 3, 1))
        sync(ctx, E.MTE1_M)
        c0 = ctx.l0c.alloc((256,), "float32")
        ctx.mmad(c0, a0, b0, MmadParams(1, n, k))
        sync(ctx, E.M_FIX)
        ctx.fixpipe(g_c, c0, FixpipeParamsV220(n_size=n, m_size=1, dst_stride=n))

    die.launch(gemv)
    np.testing.assert_array_equal(g_c.numpy(), a.astype(np.float32) @ w.T.astype(np.float32))
