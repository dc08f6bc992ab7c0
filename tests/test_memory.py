"""Tests of the machine's memory: local buffers, GM, tensors and their views (ascend-910c.md §4).

Each error check sits beside a passing example; error messages are asserted with `match=`.
"""
import inspect
import re

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu as ae

KIB, GIB = 1 << 10, 1 << 30
FLOATS = ["float16", "bfloat16", "float32"]
INTS = ["int8", "uint8", "int16", "int32"]
NP = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
      "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32}
# Buffer → (core kind, capacity, minimum alignment), typed from the reference's §4 table.
BUFFERS = {"ub": ("aiv", 192 * KIB, 32), "l1": ("aic", 512 * KIB, 32), "l0a": ("aic", 64 * KIB, 512),
           "l0b": ("aic", 64 * KIB, 512), "l0c": ("aic", 128 * KIB, 64), "bt": ("aic", 1 * KIB, 64),
           "fb": ("aic", 7 * KIB, 128)}


def run(body, *args, kind="aiv", die=None, block_dim=1):
    """Launch `body(ctx, *args)` as a kernel; returns the die."""
    die = die or ae.Die("910c")
    die.launch(ae.kernel(kind)(body), block_dim, args)
    return die


def line_of(fn, text):
    """The file line number of the one line of `fn`'s source that contains `text`."""
    lines, first = inspect.getsourcelines(fn)
    hits = [first + i for i, ln in enumerate(lines) if text in ln]
    assert len(hits) == 1, hits
    return hits[0]


# --- allocation past capacity ----------------------------------------------------------------------
def test_ub_allocation_fits_exactly():
    def body(ctx):
        a = ctx.ub.alloc((4 * KIB,), "float32")
        b = ctx.ub.alloc((88 * KIB,), "float16")  # 16 + 176 = 192 KiB
        assert (a.offset, b.offset, ctx.ub.top) == (0, 16 * KIB, 192 * KIB)
    run(body)


def test_ub_allocation_past_capacity_names_buffer_sizes_and_line():
    def body(ctx):
        ctx.ub.alloc((4 * KIB,), "float32")
        ctx.ub.alloc((100 * KIB,), "float16")  # too big
    n = line_of(body, "# too big")
    msg = (f"AIV 0 · UB · test_memory.py:{n}: allocation of 200 KiB ((102400,) float16) exceeds UB "
           f"(192 KiB; 16 KiB in use)\n    ctx.ub.alloc((100 * KIB,), \"float16\")  # too big\n    ^")
    with pytest.raises(ae.AllocationError) as ei:
        run(body)
    assert str(ei.value) == msg
    assert ei.value.line.lineno == n


@settings(deadline=None)
@given(name=st.sampled_from(sorted(BUFFERS)), over=st.integers(1, 4096))
def test_every_buffer_has_its_capacity(name, over):
    kind, cap, _ = BUFFERS[name]

    def body(ctx):
        buf = getattr(ctx, name)
        assert buf.capacity == cap
        buf.alloc((cap,), "uint8")
        buf.reset()
        with pytest.raises(ae.AllocationError, match=rf"allocation of .* exceeds {buf.kind} \(.*; 0 B in use\)"):
            buf.alloc((cap + over,), "uint8")
    run(body, kind=kind)


def test_a_core_has_only_its_own_buffers():
    def body(ctx):
        with pytest.raises(ae.EmulatorError, match="an AIV has no L0A; its buffers are UB"):
            ctx.l0a
    run(body)

    def cube(ctx):
        with pytest.raises(ae.EmulatorError, match="an AIC has no UB; its buffers are L1, L0A, L0B, L0C, BT, FB"):
            ctx.ub
    run(cube, kind="aic")


# --- alignment --------------------------------------------------------------------------------------
@settings(deadline=None)
@given(name=st.sampled_from(sorted(BUFFERS)), sizes=st.lists(st.integers(1, 700), min_size=1, max_size=4))
def test_allocations_are_aligned_per_buffer(name, sizes):
    kind, cap, align = BUFFERS[name]

    def body(ctx):
        buf = getattr(ctx, name)
        assert buf.align == align
        expect = 0
        for n in sizes:
            if expect + n > cap:
                break
            t = buf.alloc((n,), "int8")
            assert t.offset == expect
            expect = -(-(expect + n) // align) * align
    run(body, kind=kind)


def test_explicit_alignment_is_at_least_the_buffers():
    def body(ctx):
        ctx.ub.alloc((1,), "int8")
        assert ctx.ub.alloc((1,), "int8", align=1024).offset == 1024
        assert ctx.ub.alloc((1,), "int8", align=4).offset == 1024 + 32  # never below the buffer's 32 B
    run(body)


def test_gm_allocations_are_512_byte_aligned():
    die = ae.Die("910c")
    ts = [die.gm.empty((n,), "int8") for n in (1, 511, 512, 513, 7)]
    assert all(t.address % 512 == 0 for t in ts)
    assert len({t.address for t in ts}) == len(ts)


# --- poison -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS + INTS)
def test_fresh_memory_is_poisoned_unless_zero(dtype):
    die = ae.Die("910c")
    seen = {}

    def body(ctx):
        seen["ub"] = ctx.ub.alloc((64,), dtype).numpy()
        seen["ub0"] = ctx.ub.alloc((64,), dtype, zero=True).numpy()
    run(body, die=die)
    g, g0 = die.gm.empty((5, 7), dtype).numpy(), die.gm.zeros((5, 7), dtype).numpy()
    for a, a0 in ((seen["ub"], seen["ub0"]), (g, g0)):
        assert a.dtype == np.dtype(NP[dtype])
        if dtype in FLOATS:
            assert np.isnan(a.astype(np.float32)).all()
        else:
            assert (a.view(np.uint8) == 0xBE).all()
        assert (a0.view(np.uint8) == 0).all()


def test_poison_off_gives_zeros_in_gm():
    die = ae.Die("910c", checks=ae.Checks(poison=False))
    assert (die.gm.empty(100, "float32").numpy() == 0).all()
    seen = {}

    def body(ctx):
        seen["ub"] = ctx.ub.alloc((64,), "float16").numpy()
    run(body, die=die)
    assert not np.isnan(seen["ub"].astype(np.float32)).any()


def test_from_numpy_round_trips_exactly():
    die = ae.Die("910c")
    for dtype in FLOATS + INTS:
        raw = np.random.default_rng(0).integers(0, 256, size=96, dtype=np.uint8).view(NP[dtype])
        assert die.gm.from_numpy(raw).numpy().tobytes() == raw.tobytes()


# --- views of local tensors ----------------------------------------------------------------------------
def test_local_views_share_bytes_and_check_bounds():
    def body(ctx):
        t = ctx.ub.alloc((4, 16), "float16", zero=True)
        row = t[2]
        assert (row.offset, row.shape) == (t.offset + 64, (16,))
        assert t[1:3].shape == (2, 16) and t[1:3].offset == t.offset + 32
        row.array[...] = 7
        assert (t.numpy()[2] == 7).all() and (t.numpy()[[0, 1, 3]] == 0).all()
        with pytest.raises(ae.BoundsError, match=r"index 4 is out of bounds for axis 0 with length 4"):
            t[4]
        with pytest.raises(ae.BoundsError, match=r"slice slice\(0, 5, None\) of axis 0 \(length 4\) is out of bounds"):
            t[0:5]
        with pytest.raises(ae.BoundsError, match=r"too many indices"):
            t[0, 0, 0]
        with pytest.raises(ae.BoundsError, match="is not contiguous"):
            t[:, 3]
        with pytest.raises(ae.BoundsError, match=r"cannot reshape \(4, 16\) \(64 elements\) to \(65,\)"):
            t.reshape(65)
        assert t.reshape((8, 8)).shape == (8, 8) and t.reshape(64).offset == t.offset
    run(body)


def test_reinterpret_cast_is_exact_on_local_and_global():
    die = ae.Die("910c")
    g = die.gm.from_numpy(np.array([1.0, -2.0], np.float32))
    assert g.reinterpret_cast("int32").numpy().tolist() == [0x3F800000, -0x40000000]
    assert g.reinterpret_cast("uint8").shape == (8,)
    assert g.reinterpret_cast("float16").numpy().view(np.uint16).tolist() == [0, 0x3F80, 0, 0xC000]
    with pytest.raises(ae.DTypeError, match="3 B is not a whole number of float16 elements"):
        die.gm.empty(3, "int8").reinterpret_cast("float16")

    def body(ctx):
        t = ctx.ub.alloc((2,), "float32")
        t.array[...] = [1.0, -2.0]
        i = t.reinterpret_cast("int32")
        assert (i.offset, i.shape, i.numpy().tolist()) == (t.offset, (2,), [0x3F800000, -0x40000000])
        i.array[0] = 0x40400000
        assert t.numpy()[0] == 3.0
        with pytest.raises(ae.DTypeError, match="6 B is not a whole number of int32 elements"):
            ctx.ub.alloc((3,), "float16").reinterpret_cast("int32")
    run(body)


def test_dtype_mismatch_in_a_copy():
    die = ae.Die("910c")
    x = die.gm.zeros(256, "float16")

    def ok(ctx):
        ctx.data_copy(ctx.ub.alloc((256,), "float16"), x)
    run(ok, die=die)

    def bad(ctx):
        ctx.data_copy(ctx.ub.alloc((256,), "float32"), x)
    with pytest.raises(ae.DTypeError, match="data_copy does not convert: source is float16, destination float32"):
        run(bad, die=die)


def test_a_copy_beyond_a_tensor_is_a_bounds_error():
    die = ae.Die("910c")
    x = die.gm.zeros(512, "float16")

    def bad(ctx):
        ctx.data_copy(ctx.ub.alloc((256,), "float16"), x, 512)
    with pytest.raises(ae.BoundsError, match=r"data_copy destination touches bytes \[0, 1024\) of a 512 B UB"):
        run(bad, die=die)


# --- GlobalTensor slicing -----------------------------------------------------------------------------
@st.composite
def shape_and_key(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    key = []
    for n in shape[: draw(st.integers(1, len(shape)))]:
        if draw(st.booleans()):
            key.append(draw(st.integers(-n, n - 1)))
        else:
            a = draw(st.one_of(st.none(), st.integers(0, n)))
            b = draw(st.one_of(st.none(), st.integers(0, n)))
            key.append(slice(a, b))
    return shape, tuple(key)


@settings(deadline=None)
@given(shape_and_key())
def test_gm_slicing_matches_numpy_or_refuses_non_contiguous(sk):
    shape, key = sk
    die = ae.Die("910c")
    ref = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    g = die.gm.from_numpy(ref)
    want = ref[key]
    if want.size and not want.flags.c_contiguous:
        with pytest.raises(ae.BoundsError, match="is not contiguous"):
            g[key]
        return
    v = g[key]
    assert v.shape == want.shape
    np.testing.assert_array_equal(v.numpy(), want)
    if want.size:
        assert v.address == g.address + 4 * int(want.flat[0])
        v.array.flat[0] = -1  # a view, not a copy
        assert g.numpy().flat[int(want.flat[0])] == -1


def test_gm_slicing_examples_and_errors():
    die = ae.Die("910c")
    g = die.gm.from_numpy(np.arange(20, dtype=np.int32).reshape(4, 5))
    assert g[1].numpy().tolist() == [5, 6, 7, 8, 9]
    assert g[-1, 1:3].numpy().tolist() == [16, 17]
    assert g[1:3].numpy().ravel().tolist() == list(range(5, 15))
    assert g[2:3, 1:4].numpy().tolist() == [[11, 12, 13]]
    assert g.flatten()[3:7].numpy().tolist() == [3, 4, 5, 6]
    with pytest.raises(ae.BoundsError, match=r"index \(slice\(None, None, None\), 1\) of shape \(4, 5\) is not contiguous"):
        g[:, 1]
    with pytest.raises(ae.BoundsError, match="is not contiguous"):
        g[1:3, 1:3]
    with pytest.raises(ae.BoundsError, match=r"slice slice\(None, None, 2\) of axis 0 is strided"):
        g[::2]
    with pytest.raises(ae.BoundsError, match="index -5 is out of bounds for axis 0 with length 4"):
        g[-5]
    with pytest.raises(ae.BoundsError, match=r"cannot reshape \(4, 5\) \(20 elements\) to \(3, 7\)"):
        g.reshape((3, 7))
    assert g.reshape((5, 4))[4].numpy().tolist() == [16, 17, 18, 19]


# --- phantoms, GM capacity, free ----------------------------------------------------------------------
def test_phantoms_have_no_data():
    die = ae.Die("910c", functional=False)
    t = die.gm.from_numpy(np.ones((3, 4), np.float16))
    assert t.is_phantom and t.shape == (3, 4) and repr(t).endswith("float16, phantom)")
    with pytest.raises(ae.PhantomError, match=re.escape(
            "die 0 · GM · test_memory.py:") + r"\d+: GM tensor \(3, 4\) float16 has no data: it is a phantom"):
        t.numpy()
    seen = {}

    def body(ctx):
        u = ctx.ub.alloc((16,), "float16")
        with pytest.raises(ae.PhantomError, match="UB tensor has no data in timing-only mode"):
            u.numpy()
        seen["ok"] = True
    run(body, die=die)
    assert seen["ok"]


def test_gm_capacity_is_64_gib_of_phantoms():
    die = ae.Die("910c", functional=False)
    with pytest.raises(ae.AllocationError, match=r"die 0 · GM · .*: allocation of 65 GiB exceeds GM \(64 GiB; 0 B in use\)"):
        die.gm.empty((65 * GIB,), "uint8")
    a = die.gm.empty((8 * GIB,), "float32")  # 32 GiB
    b = die.gm.empty((16 * GIB,), "bfloat16")  # 32 GiB: exactly full
    assert die.gm.in_use == 64 * GIB
    with pytest.raises(ae.AllocationError, match=r"allocation of 1 B exceeds GM \(64 GiB; 64 GiB in use\)"):
        die.gm.empty(1, "int8")
    die.gm.free(a)
    die.gm.free(a)  # freeing twice is harmless
    assert die.gm.in_use == 32 * GIB
    die.gm.empty((32 * GIB,), "int8")
    assert die.gm.in_use == 64 * GIB and b.is_phantom


def test_freed_tensors_have_no_data():
    die = ae.Die("910c")
    t = die.gm.from_numpy(np.arange(8, dtype=np.int32))
    view = t[2:4]
    assert die.gm.in_use == 32
    die.gm.free(view)  # frees the whole allocation
    assert die.gm.in_use == 0
    with pytest.raises(ae.PhantomError, match=r"GM tensor \(8,\) int32 has no data: it was freed"):
        t.numpy()


def test_negative_shapes():
    die = ae.Die("910c")
    with pytest.raises(ae.BoundsError, match=r"negative shape \(2, -1\)"):
        die.gm.empty((2, -1), "int8")

    def body(ctx):
        with pytest.raises(ae.BoundsError, match=r"negative shape \(-4,\)"):
            ctx.ub.alloc(-4, "int8")
    run(body)


def test_error_lines_point_into_installed_ops_and_layouts():
    """Installed, ascendemu/ops and ascendemu/layouts sit under the machine's folder; their frames are still
    kernel code, whose source lines errors must show (only the machine's own modules are skipped)."""
    import os

    from ascendemu import errors
    for sub in ("ops", "layouts"):
        fake = os.path.join(errors._MACHINE_DIR, sub, "kernel_here.py")
        code = compile("line = caller_line()", fake, "exec")
        ns = {"caller_line": errors.caller_line}
        exec(code, ns)
        assert ns["line"] is not None and ns["line"].filename == fake
    code = compile("line = caller_line()", os.path.join(errors._MACHINE_DIR, "dma.py"), "exec")
    ns = {"caller_line": errors.caller_line}
    exec(code, ns)
    assert ns["line"] is None or ns["line"].filename != os.path.join(errors._MACHINE_DIR, "dma.py")


def test_review_guards_integer_scalars_raw_poison_and_dtype_errors():
    """Integer scalars that do not fit are refused (never wrapped); TQue slots read as NaN in float views;
    an unknown dtype is a DTypeError naming the core and buffer."""
    def set_big(ctx):
        t = ctx.ub.alloc((32,), "int8", zero=True)
        ctx.set_value(t, 0, 300)
    with pytest.raises(ae.ParamError, match=r"set_value: 300 does not fit int8 \[-128, 127\]"):
        run(set_big)

    def adds_big(ctx):
        t = ctx.ub.alloc((16,), "int16", zero=True)
        ctx.adds(t, t, 70000, 16)
    with pytest.raises(ae.ParamError, match="adds scalar: 70000 does not fit int16"):
        run(adds_big)

    seen = {}

    def slot(ctx):
        pipe = ctx.tpipe()
        q = ae.TQue(ae.TPosition.VECIN, 1)
        pipe.init_buffer(q, 1, 256)
        t = q.alloc_tensor("float32")
        seen["f32"] = t.numpy()
        seen["f16"] = t.reinterpret_cast("float16")[1:9].numpy()  # any 2-byte offset
        q.enque(t)
        q.free_tensor(q.deque())
    run(slot)
    assert np.isnan(seen["f32"]).all() and np.isnan(seen["f16"].astype(np.float32)).all()

    def bad(ctx):
        ctx.ub.alloc((8,), "complex64")
    with pytest.raises(ae.DTypeError, match="AIV 0 · UB"):
        run(bad)
