"""Tests of FixPipe (ascendemu/fixpipe.py; reference sections 6, 12, 15 and 16).

The L0C tile is set up by writing its bytes through the LocalTensor view before the Fixpipe is issued (a test
stand-in for an Mmad result, so that any int32 / float32 value, NaN and inf included, can be fed in); the
end-to-end Mmad → Fixpipe path is covered by test_cube.py. The tile is Nz with 16×16 fractals and `src_stride`
rows per 16-column block (§12, §16).

Expected values come from the reference algorithm of §12, written again here with NumPy (not numerics.py):

* quant word: bits 31..13 = M1 (fp32 with the mantissa truncated to 10 bits), 35..32 = N, 36 = MCB,
  45..37 = offset (9 bits; read as two's complement, the project's documented choice — the script reads it
  unsigned, which agrees for 0..255), 46 = sign (1 → int8, 0 → uint8);
* F322F16 / F322BF16: round half to even (fp16 by NumPy's conversion, bf16 by bit arithmetic); overflow → inf;
* DEQF16: x (int32; with MCB first x >> N saturated to int16) → fp32, y = x·M1 in fp32 (RNE), saturate to
  ±65504, round to fp16 (RNE);
* REQ8 / QF322B8_PRE: the same y (QF322B8 takes the fp32 L0C value, no MCB); y = rint(clip(y, −256, 255));
  y += offset; clip to [−128, 127] or [0, 255]; a NaN product counts as 0 (project semantics);
* ReLU applies to the L0C value before the conversion (project choice, numerics.py);
* output placement: ND: (r, c) at r·dst_stride + c; NZ: (c // C0)·dst_stride·C0 + r·C0 + c % C0 with C0 of the
  output dtype and dst_stride in 32 B units; nothing else is written;
* atomic add into GM: dst + converted value, rounded once to the atomic dtype (§15).
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu as ae
from ascendemu import BoundsError, DTypeError, FixpipeParamsV220, HardEvent, MmadParams, ParamError, QuantMode
from ascendemu.layouts import nd_to_nz

Q = QuantMode
BF16 = np.dtype(ml_dtypes.bfloat16)
F32, I32 = np.dtype(np.float32), np.dtype(np.int32)
SPEC = ae.spec.get("910c")
E = HardEvent
ACC = {Q.NoQuant: None, Q.F322F16: F32, Q.F322BF16: F32, Q.DEQF16: I32, Q.VDEQF16: I32, Q.REQ8: I32,
       Q.VREQ8: I32, Q.QF322B8_PRE: F32, Q.VQF322B8_PRE: F32}
VECTOR = {Q.VDEQF16, Q.VREQ8, Q.VQF322B8_PRE}
SCALAR = {Q.DEQF16, Q.REQ8, Q.QF322B8_PRE}
INT8_OUT = {Q.REQ8, Q.VREQ8, Q.QF322B8_PRE, Q.VQF322B8_PRE}


def cdiv(a, b):
    return -(-a // b)


def sync(ctx, event):
    ctx.set_flag(event, 0)
    ctx.wait_flag(event, 0)


# ------------------------------------------------------------------------------------------- the reference


def pack_word(scale_bits, shift, mcb, offset, signed):
    """u64 quant words from raw fields (scale_bits: the full fp32 bit pattern; its low 13 bits are ignored)."""
    u = np.uint64
    return (np.asarray(scale_bits, np.uint64) | (np.asarray(shift, np.uint64) << u(32))
            | (np.asarray(mcb, np.uint64) << u(36)) | ((np.asarray(offset, np.int64) & 0x1FF).astype(np.uint64)
                                                       << u(37)) | (np.asarray(signed, np.uint64) << u(46)))


def to_bf16(x32):
    """fp32 → bf16, round half to even, by bit arithmetic."""
    u = x32.view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = np.where(np.isnan(x32), (u >> 16) | 0x40, r)
    return r.astype(np.uint16).view(BF16)


def convert(acc, mode, words, relu):
    """The reference conversion of an (m, n) L0C block; words: (n,) uint64 (broadcast from a scalar word)."""
    if relu:
        acc = np.where(acc < 0, acc.dtype.type(0), acc)
    if mode == Q.NoQuant:
        return acc.copy()
    if mode == Q.F322F16:
        with np.errstate(over="ignore"):
            return acc.astype(np.float16)
    if mode == Q.F322BF16:
        return to_bf16(acc)
    w = np.broadcast_to(np.asarray(words, np.uint64), acc.shape[-1:])
    m1 = (w & np.uint64(0xFFFFE000)).astype(np.uint32).view(np.float32)
    shift = ((w >> np.uint64(32)) & np.uint64(0xF)).astype(np.int64)
    mcb = ((w >> np.uint64(36)) & np.uint64(1)).astype(bool)
    off = ((w >> np.uint64(37)) & np.uint64(0x1FF)).astype(np.int64)
    off = np.where(off >= 256, off - 512, off)
    signed = ((w >> np.uint64(46)) & np.uint64(1)).astype(bool)
    if acc.dtype == I32:
        shifted = np.clip(acc.astype(np.int64) >> shift, -32768, 32767)
        x = np.where(mcb, shifted, acc.astype(np.int64)).astype(np.float32)
    else:
        x = acc
    with np.errstate(over="ignore", invalid="ignore"):
        y = (x.astype(np.float64) * m1.astype(np.float64)).astype(np.float32)  # exact product, one rounding
        if mode in (Q.DEQF16, Q.VDEQF16):
            return np.clip(y, -65504, 65504).astype(np.float16)
        q = np.rint(np.clip(y.astype(np.float64), -256, 255))
    q = np.where(np.isnan(q), 0, q) + off
    if signed.all():
        return np.clip(q, -128, 127).astype(np.int8)
    assert not signed.any()
    return np.clip(q, 0, 255).astype(np.uint8)


def out_dtype(mode, acc_dtype, signed):
    if mode == Q.NoQuant:
        return acc_dtype
    if mode in (Q.F322F16, Q.DEQF16, Q.VDEQF16):
        return np.dtype(np.float16)
    if mode == Q.F322BF16:
        return BF16
    return np.dtype(np.int8 if signed else np.uint8)


def place(bg, out, cfg, stride):
    """bg (flat) with the converted block written at ND (row pitch `stride` elements) or NZ positions."""
    exp = bg.copy()
    m, n = out.shape
    r, c = np.arange(m)[:, None], np.arange(n)[None, :]
    if cfg == "row_major":
        at = r * stride + c
    else:
        c0 = 32 // out.dtype.itemsize
        at = (c // c0) * stride * c0 + r * c0 + c % c0
    exp[at] = out
    return exp, at


def atomic_add(a, b):
    if a.dtype == I32:
        return (a.astype(np.int64) + b).astype(np.int32)
    if a.dtype == F32:
        return a + b
    return (a.astype(np.float64) + b.astype(np.float64)).astype(a.dtype)


# ---------------------------------------------------------------------------------------------- the harness


def run_fixpipe(acc_tile, m, n, params, *, cfg="row_major", dst="GM", bg, quant=None, quant_in="L1", atomic=None,
                functional=True):
    """acc_tile: the (rows, ceil16(n)·16) L0C tile in ND; returns (flat output as it ends up in GM, report)."""
    rows, ncols = acc_tile.shape
    die = ae.Die("910c", functional=functional)
    g_out = die.gm.from_numpy(bg) if functional else die.gm.empty(bg.shape, bg.dtype)
    nq = cdiv(n, 4) * 4
    if quant is not None:
        qpad = np.zeros(nq, np.uint64)
        qpad[:n] = quant
        g_q = die.gm.from_numpy(qpad) if functional else die.gm.empty((nq,), "uint64")
    g_bg = die.gm.from_numpy(bg) if functional else die.gm.empty(bg.shape, bg.dtype)

    @ae.kernel("aic")
    def k(ctx):
        c0 = ctx.l0c.alloc((rows * ncols,), acc_tile.dtype)
        if functional:  # test-only set-up: the bytes an Mmad would have left (Nz, 16×16 fractals)
            c0.array[...] = nd_to_nz(acc_tile, c0=16).reshape(-1)
        q = None
        if dst == "L1":
            l1o = ctx.l1.alloc(bg.shape, bg.dtype)
            ctx.data_copy(l1o, g_bg)
        if quant is not None:
            q = ctx.l1.alloc((nq,), "uint64")
            ctx.data_copy(q, g_q)
        if quant is not None or dst == "L1":  # MTE2 → FIX has no event: go through MTE1
            sync(ctx, E.MTE2_MTE1)
            if quant is not None and quant_in == "FB":
                fb = ctx.fb.alloc((nq,), "uint64")
                ctx.data_copy(fb, q)
                q = fb
            sync(ctx, E.MTE1_FIX)
        if atomic is not None:
            ctx.set_atomic_add(atomic)
        if dst == "GM":
            ctx.fixpipe(g_out, c0, params, cfg=cfg, quant=q)
        else:
            ctx.fixpipe(l1o, c0, params, cfg=cfg, quant=q)
            sync(ctx, E.FIX_MTE1)  # FIX → MTE3 has no event either
            sync(ctx, E.MTE1_MTE3)
            ctx.data_copy(g_out, l1o)
        if atomic is not None:
            ctx.disable_dma_atomic()

    rep = die.launch(k)
    return (g_out.numpy() if functional else None), rep


def random_acc(rng, shape, dtype, mode):
    """L0C values spanning the interesting ranges of each conversion, with specials for the float ones."""
    if dtype == I32:
        mag = np.exp2(rng.uniform(0, 31, shape)).astype(np.int64)
        return (np.clip(mag, 0, 2**31 - 1) * rng.choice([-1, 1], shape)).astype(np.int32)
    x = (rng.standard_normal(shape) * np.exp2(rng.uniform(-16, 18, shape))).astype(np.float32)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 65504, 65519.99, 65520, -65536, 1 + 2**-11, 1 + 3 * 2**-11,
                         2**-24, 2**-25, 3 * 2**-26, 1 + 2**-8, 1 + 3 * 2**-8, 3.0e38, 255.5, -256.5, 0.5, 1.5,
                         2.5], np.float32)
    pick = rng.random(shape) < 0.1
    x[pick] = rng.choice(specials, int(pick.sum()))
    return x


def random_words(rng, n, mode, signed):
    """Per-channel (or one) quant words: log-uniform scales (random low bits, which must be ignored), shifts,
    MCB, offsets, and one sign for all channels."""
    k = n if mode in VECTOR else 1
    if mode in (Q.DEQF16, Q.VDEQF16):
        scale = np.exp2(rng.uniform(-24, 4, k))
    elif mode in (Q.REQ8, Q.VREQ8):
        scale = np.exp2(rng.uniform(-32, 2, k))
    else:
        scale = np.exp2(rng.uniform(-12, 12, k))
    scale = (scale * rng.choice([-1, 1], k)).astype(np.float32)
    bits = scale.view(np.uint32) | rng.integers(0, 1 << 13, k).astype(np.uint32)
    w = pack_word(bits, rng.integers(0, 16, k), rng.integers(0, 2, k), rng.integers(-256, 256, k), signed)
    return w if mode in VECTOR else int(w[0])


@st.composite
def fix_case(draw):
    mode = draw(st.sampled_from(list(Q)))
    acc = ACC[mode] or draw(st.sampled_from([F32, I32]))
    signed = draw(st.booleans())
    odt = out_dtype(mode, acc, signed)
    cfg = draw(st.sampled_from(["row_major", "nz"]))
    m = draw(st.integers(1, 40))
    if cfg == "nz":
        c0 = 32 // odt.itemsize
        n = c0 * draw(st.integers(1, max(1, 64 // c0)))
        stride = m + draw(st.integers(0, 3))  # 32 B units between column blocks
    else:
        n = draw(st.integers(1, 70))
        stride = n + draw(st.sampled_from([0, 0, 1, 7, 16]))  # elements
    extra_rows = 16 * draw(st.integers(0, 1))
    return dict(mode=mode, acc=acc, signed=signed, cfg=cfg, m=m, n=n, stride=stride, extra_rows=extra_rows,
                relu=draw(st.booleans()), dst=draw(st.sampled_from(["GM", "L1"])),
                quant_in=draw(st.sampled_from(["L1", "FB"])), seed=draw(st.integers(0, 2**32 - 1)))


@settings(deadline=None)
@given(case=fix_case())
def test_fixpipe_modes(case):
    """Every QuantMode, ReLU on/off, NZ→ND with dst_stride ≥ n, NZ output, src_stride > ceil16(m), to GM and to
    L1 (then L1 → GM), per-channel words from L1 or the Fixpipe buffer."""
    mode, m, n, cfg = case["mode"], case["m"], case["n"], case["cfg"]
    rng = np.random.default_rng(case["seed"])
    rows = cdiv(m, 16) * 16 + case["extra_rows"]
    tile = random_acc(rng, (rows, cdiv(n, 16) * 16), case["acc"], mode)
    words = random_words(rng, n, mode, case["signed"]) if mode in VECTOR | SCALAR else None
    odt = out_dtype(mode, case["acc"], case["signed"])
    if cfg == "row_major":
        span = (m - 1) * case["stride"] + n
    else:
        span = (n // (32 // odt.itemsize) - 1) * case["stride"] * (32 // odt.itemsize) + m * (32 // odt.itemsize)
    total = cdiv(span + int(rng.integers(0, 40)), 32 // odt.itemsize) * (32 // odt.itemsize)
    bg = rng.integers(0, 256, total * odt.itemsize, dtype=np.uint8).view(odt)
    params = FixpipeParamsV220(n_size=n, m_size=m, src_stride=rows if case["extra_rows"] or rng.random() < 0.5 else 0,
                               dst_stride=case["stride"], quant_pre=mode,
                               deq_scalar=words if mode in SCALAR else 0, relu_en=case["relu"])
    got, rep = run_fixpipe(tile, m, n, params, cfg=cfg, dst=case["dst"], bg=bg,
                           quant=words if mode in VECTOR else None, quant_in=case["quant_in"])
    conv = convert(tile[:m, :n], mode, words if words is not None else 0, case["relu"])
    assert conv.dtype == odt
    exp, _ = place(bg, conv, cfg, case["stride"])
    assert got.dtype == odt
    if odt.kind == "f" or odt == BF16:
        np.testing.assert_array_equal(got.astype(np.float32), exp.astype(np.float32))  # NaN == NaN
    else:
        np.testing.assert_array_equal(got, exp)
    # cost: head + max(elements / 64, bytes / GM write rate) to GM; + the quant words L1 → FB when in L1
    elems, nbytes = m * n, m * n * odt.itemsize
    body = cdiv(elems, SPEC.fixpipe_elems_per_cycle)
    if case["dst"] == "GM":
        body = max(body, cdiv(nbytes, SPEC.aic_gm_write_bytes_per_cycle))
    extra = cdiv(n * 8, SPEC.l1_to_fb_bytes_per_cycle) if mode in VECTOR and case["quant_in"] == "L1" else 0
    assert rep.cores[0].busy["FIX"] == SPEC.fixpipe_head_cycles + body + extra


@settings(deadline=None)
@given(mode=st.sampled_from([Q.NoQuant, Q.F322F16]), acc=st.sampled_from([F32, I32]),
       cfg=st.sampled_from(["row_major", "nz"]), seed=st.integers(0, 2**32 - 1))
def test_fixpipe_atomic_add(mode, acc, cfg, seed):
    """Fixpipe → GM under set_atomic_add: fp32 (NoQuant), fp16 (F322F16) and int32 (NoQuant) accumulate."""
    if mode == Q.F322F16:
        acc = F32
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(1, 33)), 16 * int(rng.integers(1, 4))
    if acc == I32:
        tile = rng.integers(-2**24, 2**24, (cdiv(m, 16) * 16, n)).astype(np.int32)
    else:
        tile = (rng.standard_normal((cdiv(m, 16) * 16, n)) * 100).astype(np.float32)
    odt = out_dtype(mode, acc, True)
    c0 = 32 // odt.itemsize
    stride = n + 8 if cfg == "row_major" else m
    total = (m - 1) * stride + n if cfg == "row_major" else (n // c0) * m * c0
    total = cdiv(total, c0) * c0
    bg = (rng.integers(-2**24, 2**24, total).astype(np.int32) if odt == I32
          else (rng.standard_normal(total) * 100).astype(odt))
    got, _ = run_fixpipe(tile, m, n, FixpipeParamsV220(n_size=n, m_size=m, dst_stride=stride, quant_pre=mode), cfg=cfg,
                         bg=bg, atomic=ae.numerics.dtype_name(odt))
    conv = convert(tile[:m, :n], mode, 0, False)
    _, at = place(bg, conv, cfg, stride)
    exp = bg.copy()
    exp[at] = atomic_add(bg[at], conv)
    np.testing.assert_array_equal(got, exp)


def test_fixpipe_after_mmad():
    """End to end: int8 Mmad → Fixpipe REQ8 with per-channel words (int32 tile never leaves the chip)."""
    rng = np.random.default_rng(7)
    m, n, k = 20, 40, 64
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)  # W[n, k]: Nz(W) is Zn(Wᵀ)
    words = pack_word(np.exp2(rng.uniform(-14, -10, n)).astype(np.float32).view(np.uint32), 0, 0,
                      rng.integers(-20, 20, n), 1)
    die = ae.Die("910c")
    g_a, g_w = die.gm.from_numpy(nd_to_nz(a)), die.gm.from_numpy(nd_to_nz(w))
    g_q, g_c = die.gm.from_numpy(words), die.gm.empty((m, n), "int8")

    @ae.kernel("aic")
    def k_(ctx):
        a1, w1 = ctx.l1.alloc(nd_to_nz(a).shape, "int8"), ctx.l1.alloc(nd_to_nz(w).shape, "int8")
        q = ctx.l1.alloc((n,), "uint64")
        for d, s in ((a1, g_a), (w1, g_w), (q, g_q)):
            ctx.data_copy(d, s)
        sync(ctx, E.MTE2_MTE1)
        a0, b0 = ctx.l0a.alloc((2 * 2 * 512,), "int8"), ctx.l0b.alloc((2 * 3 * 512,), "int8")
        for i in range(2):
            ctx.load_data(a0[i * 1024:], a1, ae.LoadData2DParams(i, 2, 2))
        ctx.load_data(b0, w1, ae.LoadData2DParams(0, 6, 1))
        sync(ctx, E.MTE1_M)
        c0 = ctx.l0c.alloc((2 * 3 * 256,), "int32")
        ctx.mmad(c0, a0, b0, MmadParams(m, n, k))
        sync(ctx, E.M_FIX)
        ctx.set_flag(E.MTE1_FIX, 0)  # the words came MTE2 → MTE1 above; MTE1 → FIX orders them for Fixpipe
        ctx.wait_flag(E.MTE1_FIX, 0)
        ctx.fixpipe(g_c, c0, FixpipeParamsV220(n_size=n, m_size=m, dst_stride=n, quant_pre=Q.VREQ8), quant=q)

    die.launch(k_)
    acc = (a.astype(np.int64) @ w.T.astype(np.int64)).astype(np.int32)
    np.testing.assert_array_equal(g_c.numpy(), convert(acc, Q.VREQ8, words, False))


# ---------------------------------------------------------------------------------------------- error paths


def expect(body, exc, match, functional=True):
    die = ae.Die("910c", functional=functional)
    gm = {"f16": die.gm.empty((64, 64), "float16"), "f32": die.gm.empty((64, 64), "float32"),
          "i8": die.gm.empty((64, 64), "int8"), "u8": die.gm.empty((64, 64), "uint8"),
          "small": die.gm.empty((100,), "float16")}

    @ae.kernel("aic")
    def k(ctx):
        body(ctx, gm)

    with pytest.raises(exc, match=match):
        die.launch(k)


def P(**kw):
    kw.setdefault("n_size", 32)
    kw.setdefault("m_size", 16)
    return FixpipeParamsV220(**kw)


def l0c(ctx, dtype="float32"):
    return ctx.l0c.alloc((2 * 256,), dtype, zero=True)


def test_error_l0c_dtype():
    expect(lambda ctx, g: ctx.fixpipe(g["f16"], l0c(ctx, "int32"), P(quant_pre=Q.F322F16)), DTypeError,
           r"fixpipe F322F16 needs a float32 L0C tile, got int32")
    expect(lambda ctx, g: ctx.fixpipe(g["f16"], l0c(ctx, "float32"), P(quant_pre=Q.DEQF16, deq_scalar=1 << 30)),
           DTypeError, r"fixpipe DEQF16 needs a int32 L0C tile, got float32")
    expect(lambda ctx, g: ctx.fixpipe(g["i8"], l0c(ctx, "int32"), P(quant_pre=Q.QF322B8_PRE, deq_scalar=1 << 46)),
           DTypeError, r"QF322B8_PRE needs a float32 L0C tile")
    expect(lambda ctx, g: ctx.fixpipe(g["f16"], ctx.l1.alloc((512,), "float32"), P()), ParamError,
           r"fixpipe src is in L1; expected L0C")


def test_error_destination_dtype():
    expect(lambda ctx, g: ctx.fixpipe(g["f32"], l0c(ctx), P(quant_pre=Q.F322F16)), DTypeError,
           r"fixpipe F322F16 writes float16, destination is float32")
    expect(lambda ctx, g: ctx.fixpipe(g["f16"], l0c(ctx), P(quant_pre=Q.F322BF16)), DTypeError,
           r"F322BF16 writes bfloat16, destination is float16")
    expect(lambda ctx, g: ctx.fixpipe(g["f16"], l0c(ctx), P()), DTypeError,
           r"fixpipe NoQuant writes float32, destination is float16")
    expect(lambda ctx, g: ctx.fixpipe(g["f16"], l0c(ctx, "int32"), P(quant_pre=Q.VREQ8), quant=ctx.l1.alloc(
        (32,), "uint64", zero=True)), DTypeError, r"fixpipe VREQ8 writes int8/uint8, destination is float16")
    # the scalar word's sign bit picks int8 / uint8: checked at issue, also in timing-only mode
    for functional in (True, False):
        expect(lambda ctx, g: ctx.fixpipe(g["u8"], l0c(ctx, "int32"), P(quant_pre=Q.REQ8, deq_scalar=1 << 46)),
               DTypeError, r"fixpipe REQ8 writes int8 \(by the sign bit 46 of deq_scalar\), destination is uint8",
               functional=functional)
        expect(lambda ctx, g: ctx.fixpipe(g["i8"], l0c(ctx), P(quant_pre=Q.QF322B8_PRE, deq_scalar=0x3F800000)),
               DTypeError, r"QF322B8_PRE writes uint8 .*destination is int8", functional=functional)
    # per-channel words that disagree on the sign bit: one output tensor cannot be both
    words = pack_word(np.full(32, 0x3F800000, np.uint32), 0, 0, 0, np.arange(32) % 2)
    with pytest.raises(ParamError, match=r"fixpipe: .*disagree on the sign bit"):
        run_fixpipe(np.zeros((16, 32), np.int32), 16, 32, P(quant_pre=Q.VREQ8), bg=np.zeros(512, np.int8),
                    quant=words)
    expect(lambda ctx, g: ctx.fixpipe(g["i8"], l0c(ctx, "int32"), P(quant_pre=Q.REQ8, deq_scalar=-1)), ParamError,
           r"REQ8: deq_scalar must be a u64 quant word, got -1")


def test_error_quant_tensor():
    for mode, dst in ((Q.VDEQF16, "f16"), (Q.VREQ8, "i8"), (Q.VQF322B8_PRE, "i8")):
        acc = "float32" if mode == Q.VQF322B8_PRE else "int32"
        expect(lambda ctx, g: ctx.fixpipe(g[dst], l0c(ctx, acc), P(quant_pre=mode)), ParamError,
               rf"fixpipe {mode.name} needs a per-channel quant tensor \(quant=…\)")
    expect(lambda ctx, g: ctx.fixpipe(g["f16"], l0c(ctx, "int32"), P(quant_pre=Q.VDEQF16),
                                      quant=ctx.l1.alloc((32,), "float32")), DTypeError,
           r"fixpipe quant words must be uint64, got float32")
    expect(lambda ctx, g: ctx.fixpipe(g["f16"], l0c(ctx, "int32"), P(quant_pre=Q.VDEQF16),
                                      quant=ctx.l1.alloc((16,), "uint64")), BoundsError,
           r"fixpipe quant touches elements \[0, 32\) of a 16-element L1 tensor")
    expect(lambda ctx, g: ctx.fixpipe(g["f16"], l0c(ctx), P(quant_pre=Q.F322F16),
                                      quant=ctx.l1.alloc((32,), "uint64")), ParamError,
           r"fixpipe F322F16 takes no per-channel quant tensor")


def test_error_strides_and_sizes():
    expect(lambda ctx, g: ctx.fixpipe(g["f32"], l0c(ctx), P(dst_stride=31)), ParamError,
           r"fixpipe dst_stride 31 is smaller than n_size 32")
    expect(lambda ctx, g: ctx.fixpipe(g["f32"], l0c(ctx), P(src_stride=8)), ParamError,
           r"fixpipe src_stride 8 must be a multiple of 16 ≥ m_size 16")
    expect(lambda ctx, g: ctx.fixpipe(g["f32"], l0c(ctx), P(n_size=20), cfg="nz"), ParamError,
           r"NZ output: n_size 20 must be a multiple of C0 = 8")
    expect(lambda ctx, g: ctx.fixpipe(g["f32"], l0c(ctx), P(dst_stride=15), cfg="nz"), ParamError,
           r"NZ output: dst_stride 15 \(32 B units\) is smaller than m_size 16")
    expect(lambda ctx, g: ctx.fixpipe(g["f32"], l0c(ctx), P(), cfg="col_major"), ParamError,
           r"fixpipe cfg 'col_major': use 'row_major' or 'nz'")
    expect(lambda ctx, g: ctx.fixpipe(g["f32"], l0c(ctx), P(n_size=4096)), ParamError, r"n_size 4096 .* out of range")
    expect(lambda ctx, g: ctx.fixpipe(g["small"], l0c(ctx), P(quant_pre=Q.F322F16)), BoundsError,
           r"fixpipe writes elements \[0, 512\) of a 100-element GM tensor")
    expect(lambda ctx, g: ctx.fixpipe(g["f32"], l0c(ctx), P(n_size=48)), BoundsError,
           r"fixpipe src touches elements \[0, 768\) of a 512-element L0C tensor")


def test_error_destination_kind():
    kept = {}
    die = ae.Die("910c")

    @ae.kernel("aiv")
    def v(ctx):
        kept["ub"] = ctx.ub.alloc((512,), "float32")

    die.launch(v)
    expect(lambda ctx, g: ctx.fixpipe(kept["ub"], l0c(ctx), P()), ParamError,
           r"fixpipe destination must be GM or L1, got UB; L0C→UB does not exist on 910B/910C")
    expect(lambda ctx, g: ctx.fixpipe(ctx.l0a.alloc((512,), "float32"), l0c(ctx), P()), ParamError,
           r"fixpipe destination must be GM or L1, got L0A")


def test_error_atomic_dtype():
    for functional in (True, False):
        def body(ctx, g):
            ctx.set_atomic_add("float32")
            ctx.fixpipe(g["f16"], l0c(ctx), P(quant_pre=Q.F322F16))
        expect(body, DTypeError, r"atomic add in float32 into a float16 GM tensor", functional=functional)
