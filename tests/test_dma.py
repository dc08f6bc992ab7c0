"""Tests of the data-movement engines (ascendemu/dma.py; reference sections 4, 6, 12, 15, 16).

Every test runs real kernels on an emulated die with the race checker on. Expectations are byte-level NumPy
references written here from the reference, not from the implementation:

* DataCopy with DataCopyParams: block b moves `block_len`·32 B from src byte b·(block_len + src_stride)·32 to dst
  byte b·(block_len + dst_stride)·32 (strides are gaps between blocks, §12); contiguous = one block of count·size.
* DataCopyPad GM→UB: block b (block_len bytes, GM pitch block_len + src_stride bytes) lands in UB after
  left_padding elements; the UB block is lp + block_len + rp rounded up to 32 B and the UB pitch adds
  dst_stride·32 B; with is_pad the rest of the UB block holds padding_value, otherwise it keeps its old bytes.
  UB→GM: exactly block_len bytes per block; UB pitch ceil32(block_len) + src_stride·32, GM pitch
  block_len + dst_stride bytes (§12).
* ND→NZ: element (r, c) of matrix i goes to i·dst_nz_matrix_stride + (c // C0)·dst_nz_c0_stride·C0 +
  r·dst_nz_n_stride·C0 + c % C0 (elements; the two middle strides are in 32 B units), columns d..ceil_C0(d) are
  zeros, rows ≥ n_value are not touched (§12, §16); also cross-checked against `layouts.nd_to_nz`.
* Load2D: repeat i copies 512 B fractal start_index + i·src_stride to destination fractal i·(1 + dst_gap); with
  if_transpose each 16×16 (16-bit) fractal is transposed (§12).
* Atomic add: the destination GM bytes become dst + src in the atomic dtype (§15).

Local buffers have no path back to GM for L0A/L0B, so Load2D results are read through `LocalTensor.numpy()`
inside the kernel (the buffers' real bytes, right after the instruction executed).
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu as ae
from ascendemu import (AlignmentError, BoundsError, DataCopyExtParams, DataCopyPadExtParams, DataCopyParams,
                       DTypeError, HardEvent, LoadData2DParams, Nd2NzParams, ParamError)
from ascendemu.layouts import nd_to_nz

BF16 = np.dtype(ml_dtypes.bfloat16)
DT = {"float16": np.dtype(np.float16), "bfloat16": BF16, "float32": np.dtype(np.float32),
      "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "int16": np.dtype(np.int16),
      "int32": np.dtype(np.int32)}
ALL = list(DT)
SPEC = ae.spec.get("910c")
E = HardEvent


def ceil(a, b):
    return -(-a // b) * b


def rand_bytes(rng, nbytes, dtype):
    """Random bytes seen as `dtype` (any bit pattern, NaNs included: the moves are compared as bytes)."""
    return rng.integers(0, 256, nbytes, dtype=np.uint8).view(DT[dtype])


def sync(ctx, event):
    ctx.set_flag(event, 0)
    ctx.wait_flag(event, 0)


def as_bytes(a):
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def move_blocks(dst, src, count, width, src_pitch, dst_pitch, src_first=0, dst_first=0):
    """The reference of every strided move: `count` blocks of `width` bytes (byte arrays, in place)."""
    for b in range(count):
        s, d = src_first + b * src_pitch, dst_first + b * dst_pitch
        dst[d:d + width] = src[s:s + width]


# ------------------------------------------------------------------------------------------------ DataCopy

PATHS = ["GM->UB", "UB->GM", "UB->UB", "GM->L1", "L1->GM"]


@st.composite
def copy_case(draw):
    path = draw(st.sampled_from(PATHS))
    dtype = draw(st.sampled_from(ALL))
    form = draw(st.sampled_from(["params", "count", "whole"]))
    if form == "params":
        p = DataCopyParams(draw(st.integers(0, 6)), draw(st.integers(0, 4)), draw(st.integers(0, 3)),
                           draw(st.integers(0, 3)))
    else:
        p = draw(st.integers(0, 12))  # number of 32 B blocks
    return path, dtype, form, p, draw(st.integers(0, 2**32 - 1))


@settings(deadline=None)
@given(case=copy_case())
def test_data_copy(case):
    """DataCopy on every GM/UB/L1 path: contiguous (count, or the whole source) and strided (DataCopyParams);
    bytes outside the moved blocks keep their previous contents."""
    path, dtype, form, p, seed = case
    rng = np.random.default_rng(seed)
    sz = DT[dtype].itemsize
    if form == "params":
        count, width = (p.block_count if p.block_len else 0), p.block_len * 32
        sp, dp = (p.block_len + p.src_stride) * 32, (p.block_len + p.dst_stride) * 32
        src_span = (count - 1) * sp + width if count else 0
        dst_span = (count - 1) * dp + width if count else 0
        arg = p
    else:
        count, width = 1, p * 32
        sp = dp = width
        src_span = dst_span = width
        arg = width // sz if form == "count" else None
    src_nb = ceil(src_span, 32) + 32 * (0 if form == "whole" else int(rng.integers(0, 3)))
    dst_nb = ceil(dst_span, 32) + 32 * int(rng.integers(0, 3))
    src_nb, dst_nb = max(src_nb, 32), max(dst_nb, 32)
    if form == "whole":  # no count: the whole source
        width = sp = dp = src_nb
        dst_nb = max(dst_nb, src_nb)
    src = rand_bytes(rng, src_nb, dtype)
    bg = rand_bytes(rng, dst_nb, dtype)
    a, b = path.split("->")
    kind = "aic" if "L1" in path else "aiv"
    local = "l1" if kind == "aic" else "ub"
    die = ae.Die("910c")
    g_src, g_bg = die.gm.from_numpy(src), die.gm.from_numpy(bg)

    @ae.kernel(kind)
    def k(ctx):
        buf = getattr(ctx, local)
        if a == "GM":  # GM → local: background first (same pipe, in order), then the move, then read back
            d = buf.alloc(dst_nb // sz, dtype)
            ctx.data_copy(d, g_bg)
            ctx.data_copy(d, g_src, arg)
            sync(ctx, E.MTE2_MTE3)
            ctx.data_copy(g_bg, d)
        elif b == "GM":  # local → GM onto a background already in GM
            s = buf.alloc(src_nb // sz, dtype)
            ctx.data_copy(s, g_src)
            sync(ctx, E.MTE2_MTE3)
            ctx.data_copy(g_bg, s, arg)
        else:  # UB → UB on PIPE_V
            s, d = buf.alloc(src_nb // sz, dtype), buf.alloc(dst_nb // sz, dtype)
            ctx.data_copy(s, g_src)
            ctx.data_copy(d, g_bg)
            sync(ctx, E.MTE2_V)
            ctx.data_copy(d, s, arg)
            sync(ctx, E.V_MTE3)
            ctx.data_copy(g_bg, d)

    rep = die.launch(k)
    exp = as_bytes(bg).copy()
    move_blocks(exp, as_bytes(src), count, width, sp, dp)
    np.testing.assert_array_equal(as_bytes(g_bg.numpy()), exp)
    moved = count * width
    key = f"{a}->{b}"
    assert rep.bytes.get(key, 0) >= moved
    # the move's own cost on its pipe: GM moves charge whole 32 B bursts per block at the path's rate
    if key == "UB->UB":
        want = SPEC.mte_local_head_cycles + -(-moved // SPEC.ub_to_ub_bytes_per_cycle) if count and width else 0
        assert rep.cores[0].busy["V"] == want


def test_data_copy_cycles_and_timing_only():
    """A strided GM→UB→GM program: per-pipe busy cycles are the GM move formula, and a timing-only run with
    phantom tensors gives the same cycles."""
    p = DataCopyParams(block_count=5, block_len=3, src_stride=2, dst_stride=1)

    def run(functional):
        die = ae.Die("910c", functional=functional)
        x = die.gm.empty((5 * 5 * 32 // 4,), "float32")
        y = die.gm.empty((5 * 3 * 32 // 4,), "float32")

        @ae.kernel("aiv")
        def k(ctx):
            u = ctx.ub.alloc((5 * 4 * 32 // 4,), "float32")
            ctx.data_copy(u, x, p)
            sync(ctx, E.MTE2_MTE3)
            ctx.data_copy(y, u, DataCopyParams(5, 3, 1, 0))
        return die.launch(k)

    f, t = run(True), run(False)
    read = SPEC.mte_gm_head_cycles + -(-(5 * 96) // SPEC.gm_read_bytes_per_cycle)
    write = SPEC.mte_gm_head_cycles + -(-(5 * 96) // SPEC.aiv_gm_write_bytes_per_cycle)
    assert f.cores[0].busy["MTE2"] == read and f.cores[0].busy["MTE3"] == write
    # MTE2 starts at 0; the flag is visible flag_latency later; MTE3 then runs
    assert f.cycles == read + SPEC.flag_latency_cycles + write
    assert t.cycles == f.cycles and t.cores[0].busy == f.cores[0].busy


# --------------------------------------------------------------------------------------------- DataCopyPad


@st.composite
def pad_in_case(draw):
    dtype = draw(st.sampled_from(["float16", "bfloat16", "float32", "int8", "int16", "int32"]))
    sz = DT[dtype].itemsize
    e32 = 32 // sz
    bc = draw(st.integers(0, 5))
    bl = draw(st.integers(0, 48)) * sz
    ss = draw(st.integers(0, 40))  # bytes, any
    ds = draw(st.integers(0, 2))
    lp, rp = draw(st.integers(0, e32)), draw(st.integers(0, e32))
    is_pad = draw(st.booleans())
    val = draw(st.integers(-100, 100))
    return (dtype, DataCopyExtParams(bc, bl, ss, ds), DataCopyPadExtParams(is_pad, lp, rp, val),
            draw(st.booleans()), draw(st.sampled_from(["UB", "L1"])), draw(st.integers(0, 2**32 - 1)))


@settings(deadline=None)
@given(case=pad_in_case())
def test_data_copy_pad_gm_to_local(case):
    """DataCopyPad GM→UB (and GM→L1): padding on both sides, padding_value with is_pad, old bytes (poison or a
    prior copy) without it."""
    dtype, p, pad, prefill, where, seed = case
    rng = np.random.default_rng(seed)
    sz = DT[dtype].itemsize
    lp, rp = pad.left_padding * sz, pad.right_padding * sz
    count = p.block_count if p.block_len else 0
    ub_block = ceil(lp + p.block_len + rp, 32)
    pitch = ub_block + p.dst_stride * 32
    src_nb = max(count * (p.block_len + p.src_stride), sz)
    dst_nb = max(ceil((count - 1) * pitch + ub_block if count else 0, 32), 32) + 32
    src = rand_bytes(rng, ceil(src_nb, sz), dtype)
    bg = rand_bytes(rng, dst_nb, dtype)
    die = ae.Die("910c")
    g_src, g_bg, g_out = die.gm.from_numpy(src), die.gm.from_numpy(bg), die.gm.empty(bg.shape, dtype)
    before = {}

    @ae.kernel("aiv" if where == "UB" else "aic")
    def k(ctx):
        d = (ctx.ub if where == "UB" else ctx.l1).alloc(bg.shape, dtype)
        before["bytes"] = as_bytes(d.numpy()).copy()  # fresh memory: the poison pattern
        if prefill:
            ctx.data_copy(d, g_bg)
            before["bytes"] = as_bytes(bg).copy()
        ctx.data_copy_pad(d, g_src, p, pad)
        sync(ctx, E.MTE2_MTE3)
        ctx.data_copy(g_out, d)

    die.launch(k)
    exp = before["bytes"].copy()
    srcb = as_bytes(src)
    fill = np.full(32, pad.padding_value).astype(DT[dtype]).view(np.uint8)
    for b in range(count):
        base = b * pitch
        exp[base + lp:base + lp + p.block_len] = srcb[b * (p.block_len + p.src_stride):][:p.block_len]
        if pad.is_pad:
            exp[base:base + lp] = fill[:lp]
            tail = ub_block - lp - p.block_len
            exp[base + lp + p.block_len:base + ub_block] = np.tile(fill, 2)[:tail]
    np.testing.assert_array_equal(as_bytes(g_out.numpy()), exp)


@settings(deadline=None)
@given(dtype=st.sampled_from(ALL), bc=st.integers(0, 5), bl_elems=st.integers(0, 40), ss=st.integers(0, 2),
       ds=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
def test_data_copy_pad_ub_to_gm(dtype, bc, bl_elems, ss, ds, seed):
    """DataCopyPad UB→GM writes exactly block_len bytes per block: UB pitch in 32 B blocks, GM pitch in bytes."""
    rng = np.random.default_rng(seed)
    sz = DT[dtype].itemsize
    bl = bl_elems * sz
    count = bc if bl else 0
    ub_pitch = ceil(bl, 32) + ss * 32
    src_nb = max(ceil(count * ub_pitch, 32), 32)
    dst_nb = ceil(max(count * (bl + ds), sz) + 7, sz)
    src = rand_bytes(rng, src_nb, dtype)
    bg = rand_bytes(rng, dst_nb, dtype)
    die = ae.Die("910c")
    g_src, g_out = die.gm.from_numpy(src), die.gm.from_numpy(bg)

    @ae.kernel("aiv")
    def k(ctx):
        u = ctx.ub.alloc(src.shape, dtype)
        ctx.data_copy(u, g_src)
        sync(ctx, E.MTE2_MTE3)
        ctx.data_copy_pad(g_out, u, DataCopyExtParams(bc, bl, ss, ds))

    rep = die.launch(k)
    exp = as_bytes(bg).copy()
    move_blocks(exp, as_bytes(src), count, bl, ub_pitch, bl + ds)
    np.testing.assert_array_equal(as_bytes(g_out.numpy()), exp)
    assert rep.bytes.get("UB->GM", 0) == count * bl
    charged = count * ceil(bl, SPEC.gm_burst_bytes)
    want = SPEC.mte_gm_head_cycles + -(-charged // SPEC.aiv_gm_write_bytes_per_cycle) if count else 0
    assert rep.cores[0].busy["MTE3"] == want


# -------------------------------------------------------------------------------------------------- ND → NZ


def nd2nz_reference(dst, src, p, c0):
    """Element-level reference of DataCopy with Nd2NzParams (dst, src: flat element arrays; dst in place)."""
    c1 = -(-p.d_value // c0)
    for i in range(p.nd_num):
        r = np.arange(p.n_value)[:, None]
        c = np.arange(c1 * c0)[None, :]
        vals = np.zeros((p.n_value, c1 * c0), src.dtype)
        vals[:, :p.d_value] = src[i * p.src_nd_matrix_stride + r * p.src_d_value + np.arange(p.d_value)[None, :]]
        at = i * p.dst_nz_matrix_stride + (c // c0) * p.dst_nz_c0_stride * c0 + r * p.dst_nz_n_stride * c0 + c % c0
        dst[at] = vals


@st.composite
def nd2nz_case(draw):
    dtype = draw(st.sampled_from(["float16", "bfloat16", "float32", "int8"]))
    c0 = 32 // DT[dtype].itemsize
    nd, n, d = draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 70))
    standard = draw(st.booleans())  # the usual layout: back to back padded Nz matrices
    src_d = d + (0 if standard else draw(st.integers(0, 5)))
    src_ms = n * src_d + (0 if standard else draw(st.integers(0, 7)))
    c1 = -(-d // c0)
    if standard:
        ns, c0s = 1, ceil(n, 16)
    else:
        ns = draw(st.integers(1, 2))
        c0s = n * ns + draw(st.integers(0, 3))
    dst_ms = c1 * c0s * c0 + (0 if standard else c0 * draw(st.integers(0, 3)))
    return dtype, Nd2NzParams(nd, n, d, src_ms, src_d, c0s, ns, dst_ms), standard, draw(st.integers(0, 2**32 - 1))


@settings(deadline=None)
@given(case=nd2nz_case())
def test_nd2nz(case):
    """ND→NZ into L1 on random shapes, dtypes, nd_num > 1 and strides; rows beyond n_value are untouched."""
    dtype, p, standard, seed = case
    rng = np.random.default_rng(seed)
    dt = DT[dtype]
    c0 = 32 // dt.itemsize
    c1 = -(-p.d_value // c0)
    src_n = (p.nd_num - 1) * p.src_nd_matrix_stride + (p.n_value - 1) * p.src_d_value + p.d_value
    dst_n = ceil((p.nd_num - 1) * p.dst_nz_matrix_stride + (c1 - 1) * p.dst_nz_c0_stride * c0
                 + (p.n_value - 1) * p.dst_nz_n_stride * c0 + c0, c0) + c0
    dst_n = max(dst_n, p.nd_num * p.dst_nz_matrix_stride)  # whole padded matrices (the `standard` check)
    src = rand_bytes(rng, src_n * dt.itemsize, dtype)
    bg = rand_bytes(rng, dst_n * dt.itemsize, dtype)
    die = ae.Die("910c")
    g_src, g_out = die.gm.from_numpy(src), die.gm.from_numpy(bg)

    @ae.kernel("aic")
    def k(ctx):
        l1 = ctx.l1.alloc((dst_n,), dtype)
        ctx.data_copy(l1, g_out)  # background
        ctx.data_copy(l1, g_src, p)
        sync(ctx, E.MTE2_MTE3)
        ctx.data_copy(g_out, l1)

    rep = die.launch(k)
    got = g_out.numpy()
    exp = bg.copy()
    nd2nz_reference(exp.view(np.uint8 if dt.itemsize == 1 else f"u{dt.itemsize}"),
                    src.view(np.uint8 if dt.itemsize == 1 else f"u{dt.itemsize}"), p, c0)
    np.testing.assert_array_equal(as_bytes(got), as_bytes(exp))
    if standard:  # the same against the layouts package: an Nz matrix per nd, rows ≥ n_value untouched
        r16 = ceil(p.n_value, 16)
        for i in range(p.nd_num):
            m = src[i * p.src_nd_matrix_stride:][:p.n_value * p.src_d_value].reshape(p.n_value, p.src_d_value)
            nz = nd_to_nz(np.ascontiguousarray(m[:, :p.d_value])).reshape(c1, r16, c0)
            blk = got[i * p.dst_nz_matrix_stride:][:c1 * r16 * c0].reshape(c1, r16, c0)
            old = bg[i * p.dst_nz_matrix_stride:][:c1 * r16 * c0].reshape(c1, r16, c0)
            np.testing.assert_array_equal(as_bytes(blk[:, :p.n_value]), as_bytes(nz[:, :p.n_value]))
            np.testing.assert_array_equal(as_bytes(blk[:, p.n_value:]), as_bytes(old[:, p.n_value:]))
    charged = p.nd_num * p.n_value * ceil(p.d_value * dt.itemsize, SPEC.gm_burst_bytes)
    nd2nz_cycles = SPEC.mte_gm_head_cycles + -(-charged // SPEC.gm_read_bytes_per_cycle)
    bg_cycles = SPEC.mte_gm_head_cycles + -(-(dst_n * dt.itemsize) // SPEC.gm_read_bytes_per_cycle)
    assert rep.cores[0].busy["MTE2"] == nd2nz_cycles + bg_cycles


# --------------------------------------------------------------------------------------------------- Load2D


@st.composite
def load_case(draw):
    src = draw(st.sampled_from(["L1", "GM"]))
    transpose = src == "L1" and draw(st.booleans())
    dtype = draw(st.sampled_from(["float16", "bfloat16"] if transpose else ["float16", "bfloat16", "float32",
                                                                               "int8", "int32"]))
    rep = draw(st.integers(0, 8))
    p = LoadData2DParams(start_index=draw(st.integers(0, 4)), repeat_times=rep, src_stride=draw(st.integers(0, 3)),
                         dst_gap=draw(st.integers(0, 2)), if_transpose=transpose)
    return (src, draw(st.sampled_from(["L0A", "L0B"])), dtype, p, draw(st.integers(0, 2)),
            draw(st.integers(0, 2**32 - 1)))


@settings(deadline=None)
@given(case=load_case())
def test_load2d(case):
    """Load2D from L1 (with and without transpose) and from GM into L0A / L0B: whole 512 B fractals, start_index,
    src_stride (0 = the same fractal again), dst_gap; fractals not written keep their bytes."""
    src_kind, dst_kind, dtype, p, lead, seed = case
    rng = np.random.default_rng(seed)
    dt = DT[dtype]
    fe = 512 // dt.itemsize  # elements per fractal
    n_src = p.start_index + max(p.repeat_times - 1, 0) * p.src_stride + 1
    n_dst = max(p.repeat_times - 1, 0) * (1 + p.dst_gap) + 1 + int(rng.integers(0, 2))
    src = rand_bytes(rng, n_src * 512, dtype)
    die = ae.Die("910c")
    g_src = die.gm.from_numpy(src)
    seen = {}

    @ae.kernel("aic")
    def k(ctx):
        if src_kind == "L1":  # `lead` fractals before the source tensor: start_index is relative to it
            big = ctx.l1.alloc(((lead + n_src) * fe,), dtype)
            s = big[lead * fe:]
            ctx.data_copy(s, g_src)
            sync(ctx, E.MTE2_MTE1)
        else:
            s = g_src
        d = (ctx.l0a if dst_kind == "L0A" else ctx.l0b).alloc((n_dst * fe,), dtype)
        seen["before"] = d.numpy()
        ctx.load_data(d, s, p)
        seen["after"] = d.numpy()

    rep = die.launch(k)
    exp = seen["before"].copy().reshape(n_dst, fe)
    fr = src.reshape(n_src, fe)
    for i in range(p.repeat_times):
        f = fr[p.start_index + i * p.src_stride]
        if p.if_transpose:
            f = f.reshape(16, 16).T.reshape(-1)
        exp[i * (1 + p.dst_gap)] = f
    np.testing.assert_array_equal(as_bytes(seen["after"]), as_bytes(exp))
    nb = 512 * p.repeat_times
    if src_kind == "L1":
        rate = SPEC.l1_to_l0a_bytes_per_cycle if dst_kind == "L0A" else SPEC.l1_to_l0b_bytes_per_cycle
        want = SPEC.mte_local_head_cycles + -(-nb // rate) if nb else 0
        assert rep.cores[0].busy["MTE1"] == want
    else:
        want = SPEC.mte_gm_head_cycles + -(-nb // SPEC.gm_read_bytes_per_cycle) if nb else 0
        assert rep.cores[0].busy["MTE2"] == want and rep.cores[0].busy["MTE1"] == 0


# ---------------------------------------------------------------------------------------------- atomic add


def numeric(rng, shape, dtype):
    """Values whose sums are representable without overflow (int32) or are ordinary floats."""
    if dtype == "int32":
        return rng.integers(-2**20, 2**20, shape).astype(np.int32)
    return (rng.standard_normal(shape) * 4).astype(np.float32).astype(DT[dtype])


def atomic_sum(a, b, dtype):
    """a + b rounded once to `dtype` (float64 holds the exact sum of two fp16 / of two similar fp32)."""
    if dtype == "int32":
        return (a.astype(np.int64) + b.astype(np.int64)).astype(np.int32)
    if dtype == "float32":
        return a + b  # IEEE fp32 add: one rounding
    return (a.astype(np.float64) + b.astype(np.float64)).astype(DT[dtype])


@settings(deadline=None)
@given(dtype=st.sampled_from(["float32", "float16", "int32"]), src=st.sampled_from(["UB", "L1"]),
       form=st.sampled_from(["count", "params", "pad"]), seed=st.integers(0, 2**32 - 1))
def test_atomic_add(dtype, src, form, seed):
    """set_atomic_add makes UB→GM and L1→GM moves read-add-write in its dtype; disable_dma_atomic restores
    plain writes."""
    if src == "L1" and form == "pad":
        form = "params"
    rng = np.random.default_rng(seed)
    sz = DT[dtype].itemsize
    n = 4 * 32 // sz
    x = numeric(rng, (n,), dtype)
    bg = numeric(rng, (n,), dtype)
    die = ae.Die("910c")
    g_x, g_acc, g_plain = die.gm.from_numpy(x), die.gm.from_numpy(bg), die.gm.from_numpy(bg)
    e32 = 32 // sz
    arg = {"count": n, "params": DataCopyParams(2, 1, 1, 1)}.get(form)

    @ae.kernel("aic" if src == "L1" else "aiv")
    def k(ctx):
        t = (ctx.l1 if src == "L1" else ctx.ub).alloc((n,), dtype)
        ctx.data_copy(t, g_x)
        sync(ctx, E.MTE2_MTE3)
        ctx.set_atomic_add(dtype)
        if form == "pad":
            ctx.data_copy_pad(g_acc, t, DataCopyExtParams(2, 3 * sz, 1, 5 * sz))
        else:
            ctx.data_copy(g_acc, t, arg)
            ctx.data_copy(g_acc, t, arg)  # twice: accumulates twice
        ctx.disable_dma_atomic()
        ctx.data_copy(g_plain, t, arg if form != "pad" else n)

    die.launch(k)
    exp = bg.copy()
    if form == "count":
        exp = atomic_sum(atomic_sum(exp, x, dtype), x, dtype)
    elif form == "params":  # blocks 0 and 2 of x (src gap 1) onto blocks 0 and 2 of bg (dst gap 1)
        for blk in (0, 2):
            sl = slice(blk * e32, (blk + 1) * e32)
            exp[sl] = atomic_sum(atomic_sum(exp[sl], x[sl], dtype), x[sl], dtype)
    else:  # pad: 3 elements per block; UB pitch 32 + 32 B, GM pitch 3 + 5 elements
        for b in range(2):
            d, s = slice(b * 8, b * 8 + 3), slice(b * 2 * e32, b * 2 * e32 + 3)
            exp[d] = atomic_sum(exp[d], x[s], dtype)
    np.testing.assert_array_equal(g_acc.numpy(), exp)
    plain = bg.copy()
    if form == "params":
        for blk in (0, 2):
            plain[blk * e32:(blk + 1) * e32] = x[blk * e32:(blk + 1) * e32]
    else:
        plain = x
    np.testing.assert_array_equal(g_plain.numpy(), plain)


def test_atomic_dtype_mismatch():
    die = ae.Die("910c")
    g = die.gm.zeros((64,), "float16")

    @ae.kernel("aiv")
    def k(ctx):
        u = ctx.ub.alloc((64,), "float16", zero=True)
        ctx.set_atomic_add("float32")
        ctx.data_copy(g, u)

    with pytest.raises(DTypeError, match="atomic add in float32 into a float16 GM tensor"):
        die.launch(k)


# ---------------------------------------------------------------------------------------------- error paths


def expect(kind, body, exc, match, **gm):
    """Launch a one-off kernel `body(ctx, **gm_tensors)` and expect `exc` matching `match`."""
    die = ae.Die("910c")
    tensors = {name: (die.gm.from_numpy(v) if isinstance(v, np.ndarray) else die.gm.empty(*v))
               for name, v in gm.items()}

    @ae.kernel(kind)
    def k(ctx):
        body(ctx, **tensors)

    with pytest.raises(exc, match=match):
        die.launch(k)


def foreign_tensors():
    """An L1 and an L0C tensor of an AIC and a UB tensor of an AIV (kept from earlier launches), to ask for
    paths between buffers that no single core has."""
    die = ae.Die("910c")
    kept = {}

    @ae.kernel("aic")
    def c(ctx):
        kept["L1"] = ctx.l1.alloc((256,), "float32")
        kept["L0C"] = ctx.l0c.alloc((256,), "float32")

    @ae.kernel("aiv")
    def v(ctx):
        kept["UB"] = ctx.ub.alloc((256,), "float32")

    die.launch(c)
    die.launch(v)
    return kept


def test_error_unsupported_paths():
    kept = foreign_tensors()
    expect("aiv", lambda ctx: ctx.data_copy(kept["L1"], ctx.ub.alloc((256,), "float32")), ParamError,
           r"data_copy: no UB→L1 path: UB→L1 has no hardware path; go UB→GM→L1; supported: GM→UB, UB→GM, GM→L1")
    expect("aiv", lambda ctx: ctx.data_copy(ctx.ub.alloc((256,), "float32"), kept["L0C"]), ParamError,
           r"no L0C→UB path: L0C→UB does not exist on 910B/910C \(950 only\); use fixpipe to GM; supported: GM→UB")
    expect("aiv", lambda ctx: ctx.data_copy(ctx.ub.alloc((256,), "float32"), kept["L1"]), ParamError,
           r"no L1→UB path: L1→UB does not exist on 910B/910C; go through GM; supported: .*UB→UB")
    expect("aiv", lambda ctx: ctx.data_copy_pad(kept["L1"], ctx.ub.alloc((256,), "float32"),
                                                DataCopyExtParams(1, 32)), ParamError,
           r"data_copy_pad: no UB→L1 path: UB→L1 has no hardware path.*; supported: GM→UB, GM→L1, UB→GM")
    # a foreign tensor on a legal path is still refused: it is not this core's buffer
    expect("aiv", lambda ctx, g: ctx.data_copy(g, kept["UB"]), ParamError, r"data_copy source belongs to ",
           g=((256,), "float32"))
    expect("aic", lambda ctx: ctx.data_copy(ctx.l1.alloc((256,), "float32"), ctx.l0c.alloc((256,), "float32")),
           ParamError, r"data_copy: no L0C→L1 path; supported: GM→UB, UB→GM, GM→L1, L1→GM, UB→UB, L1→BT, L1→FB")
    expect("aic", lambda ctx: ctx.data_copy(ctx.l0a.alloc((256,), "float16"), ctx.l1.alloc((256,), "float16")),
           ParamError, r"no L1→L0A path; supported")
    expect("aiv", lambda ctx, a, b: ctx.data_copy(a, b), ParamError, r"no GM→GM path",
           a=((64,), "float32"), b=((64,), "float32"))
    expect("aic", lambda ctx, g: ctx.data_copy(ctx.l0a.alloc((256,), "float16"), g, Nd2NzParams(1, 16, 16, 0, 16,
                                                                                                16)),
           ParamError, r"Nd2NzParams: no GM→L0A path; supported: GM→L1", g=((256,), "float16"))
    expect("aic", lambda ctx: ctx.load_data(ctx.l0a.alloc((256,), "float16"), ctx.l0b.alloc((256,), "float16"),
                                            LoadData2DParams()),
           ParamError, r"load_data: no L0B→L0A path; supported: L1→L0A, L1→L0B, GM→L0A, GM→L0B")
    expect("aiv", lambda ctx: ctx.data_copy(ctx.ub.alloc((256,), "float32"), np.zeros(256, np.float32)),
           DTypeError, r"must be a GlobalTensor or a LocalTensor, got ndarray")


def test_error_dtype_mismatch():
    expect("aiv", lambda ctx, g: ctx.data_copy(ctx.ub.alloc((64,), "float16"), g), DTypeError,
           r"data_copy does not convert: source is float32, destination float16", g=((64,), "float32"))
    expect("aiv", lambda ctx, g: ctx.data_copy_pad(ctx.ub.alloc((64,), "int8"), g, DataCopyExtParams(1, 4)),
           DTypeError, r"data_copy_pad does not convert: uint8 → int8", g=((64,), "uint8"))
    expect("aic", lambda ctx, g: ctx.data_copy(ctx.l1.alloc((256,), "bfloat16"), g, Nd2NzParams(1, 4, 16, 0, 16, 16)),
           DTypeError, r"ND→NZ does not convert: float16 → bfloat16", g=((64,), "float16"))
    expect("aic", lambda ctx, g: ctx.load_data(ctx.l0a.alloc((256,), "bfloat16"), g, LoadData2DParams()),
           DTypeError, r"load_data does not convert: float16 → bfloat16", g=((256,), "float16"))


def test_error_alignment():
    # count·size not a multiple of 32 B: the hardware would round down, the emulator refuses
    expect("aiv", lambda ctx, g: ctx.data_copy(ctx.ub.alloc((64,), "float16"), g, 15), AlignmentError,
           r"data_copy of 15 float16 = 30 B is not a multiple of 32 B.*use data_copy_pad", g=((64,), "float16"))
    expect("aiv", lambda ctx, g: ctx.data_copy(g, ctx.ub.alloc((50,), "float16")), AlignmentError,
           r"100 B is not a multiple of 32 B", g=((64,), "float16"))
    # a local address that is not 32 B aligned
    expect("aiv", lambda ctx, g: ctx.data_copy(ctx.ub.alloc((64,), "float16")[1:17], g, 16), AlignmentError,
           r"data_copy destination: UB address 0x2 is not 32 B aligned", g=((64,), "float16"))
    expect("aic", lambda ctx, g: ctx.data_copy(g, ctx.l1.alloc((64,), "float32")[4:12]), AlignmentError,
           r"data_copy source: L1 address 0x10 is not 32 B aligned", g=((8,), "float32"))
    expect("aic", lambda ctx, g: ctx.load_data(ctx.l0a.alloc((1024,), "float16")[128:], g, LoadData2DParams()),
           AlignmentError, r"load_data destination: L0A address 0x100 is not 512 B aligned", g=((256,), "float16"))
    expect("aiv", lambda ctx, g: ctx.data_copy_pad(ctx.ub.alloc((64,), "float16")[8:], g, DataCopyExtParams(1, 4)),
           AlignmentError, r"data_copy_pad destination: UB address 0x10 is not 32 B aligned", g=((64,), "float16"))
    expect("aiv", lambda ctx, g: ctx.data_copy_pad(g, ctx.ub.alloc((64,), "float16"), DataCopyExtParams(1, 3)),
           AlignmentError, r"block_len 3 B is not a whole number of float16 elements", g=((64,), "float16"))


def test_error_bounds():
    expect("aiv", lambda ctx, g: ctx.data_copy(ctx.ub.alloc((32,), "float16"), g), BoundsError,
           r"data_copy destination touches bytes \[0, 128\) of a 64 B UB tensor", g=((64,), "float16"))
    expect("aiv", lambda ctx, g: ctx.data_copy(g, ctx.ub.alloc((64,), "float16"), 64), BoundsError,
           r"data_copy destination touches bytes \[0, 128\) of a 96 B GM tensor", g=((48,), "float16"))
    expect("aiv", lambda ctx, g: ctx.data_copy(ctx.ub.alloc((256,), "float32"), g, DataCopyParams(3, 1, 1, 0)),
           BoundsError, r"data_copy source touches bytes \[0, 160\) of a 128 B GM tensor", g=((32,), "float32"))
    expect("aiv", lambda ctx, g: ctx.data_copy_pad(ctx.ub.alloc((16,), "float16"), g, DataCopyExtParams(2, 8, 0, 0),
                                                   DataCopyPadExtParams(True, 0, 0, 0)),
           BoundsError, r"data_copy_pad destination touches bytes \[0, 64\) of a 32 B UB tensor", g=((64,), "float16"))
    expect("aic", lambda ctx, g: ctx.data_copy(ctx.l1.alloc((256,), "float16"), g, Nd2NzParams(1, 16, 20, 0, 20, 16)),
           BoundsError, r"ND→NZ destination touches bytes \[0, 1024\) of a 512 B L1 tensor", g=((320,), "float16"))
    expect("aic", lambda ctx, g: ctx.data_copy(ctx.l1.alloc((512,), "float16"), g, Nd2NzParams(1, 16, 20, 0, 20, 16)),
           BoundsError, r"ND→NZ source touches bytes \[0, 640\) of a 600 B GM tensor", g=((300,), "float16"))
    expect("aic", lambda ctx, g: ctx.load_data(ctx.l0a.alloc((1024,), "float16"), g,
                                               LoadData2DParams(start_index=1, repeat_times=2)),
           BoundsError, r"load_data source touches bytes \[512, 1536\) of a 1024 B GM tensor", g=((512,), "float16"))
    expect("aic", lambda ctx, g: ctx.load_data(ctx.l0b.alloc((512,), "float16"), g,
                                               LoadData2DParams(repeat_times=2, dst_gap=1)),
           BoundsError, r"load_data destination touches bytes \[0, 1536\) of a 1024 B L0B tensor",
           g=((1024,), "float16"))


def test_error_params():
    expect("aic", lambda ctx, g: ctx.load_data(ctx.l0a.alloc((1024,), "int8"), ctx.l1.alloc((1024,), "int8"),
                                               LoadData2DParams(if_transpose=True)),
           ParamError, r"if_transpose needs a 16-bit type from L1, got int8 from L1", g=((64,), "int8"))
    expect("aic", lambda ctx, g: ctx.load_data(ctx.l0a.alloc((1024,), "float16"), g,
                                               LoadData2DParams(if_transpose=True)),
           ParamError, r"if_transpose needs a 16-bit type from L1, got float16 from GM", g=((1024,), "float16"))
    expect("aic", lambda ctx, g: ctx.load_data(ctx.l0a.alloc((1024,), "float16"), g,
                                               LoadData2DParams(repeat_times=256)),
           ParamError, r"repeat_times 0\.\.255", g=((1024,), "float16"))
    for bad in (DataCopyParams(4096, 1), DataCopyParams(1, 65536), DataCopyParams(1, 1, 65536),
                DataCopyParams(1, 1, 0, -1), DataCopyParams(-1, 1)):
        expect("aiv", lambda ctx, g: ctx.data_copy(ctx.ub.alloc((64,), "float16"), g, bad), ParamError,
               r"is out of range \(block_count ≤ 4095, u16 lengths and strides\)", g=((64,), "float16"))
    expect("aiv", lambda ctx, g: ctx.data_copy(ctx.ub.alloc((64,), "float16"), g, -16), ParamError,
           r"negative count -16", g=((64,), "float16"))
    expect("aiv", lambda ctx, g: ctx.data_copy_pad(ctx.ub.alloc((64,), "float16"), g, DataCopyExtParams(4096, 2)),
           ParamError, r"block_count ≤ 4095", g=((64,), "float16"))
    expect("aiv", lambda ctx, g: ctx.data_copy_pad(ctx.ub.alloc((64,), "float16"), g, DataCopyExtParams(1, 2),
                                                   DataCopyPadExtParams(True, 17, 0, 0)),
           ParamError, r"left/right padding 17/0 elements exceed 32 B", g=((64,), "float16"))
    expect("aic", lambda ctx, g: ctx.data_copy(ctx.l1.alloc((512,), "float16"), g, Nd2NzParams(1, 4, 16, 0, 8, 16)),
           ParamError, r"src_d_value ≥ d_value", g=((64,), "float16"))
    expect("aic", lambda ctx, g: ctx.data_copy(ctx.l1.alloc((512,), "float16"), g, Nd2NzParams(1, 4, 32, 0, 32, 0)),
           ParamError, r"dst_nz_c0_stride must be ≥ 1", g=((128,), "float16"))
