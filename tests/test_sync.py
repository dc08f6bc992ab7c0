"""Tests of intra-core synchronisation and its checkers (ascend-910c.md §8, §9).

Every checker has a passing and a failing example side by side; the failing one asserts
the message. Messages lead with where (core · buffer · file:line) and end with the
kernel's source line and a caret.
"""
import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu
import ascendemu as ae
from ascendemu import HardEvent, Pipe

E = HardEvent
AIV_LEGAL = "MTE2_MTE3, MTE2_S, MTE2_V, MTE3_MTE2, MTE3_S, MTE3_V, S_MTE2, S_MTE3, S_V, V_MTE2, V_MTE3, V_S"
AIC_LEGAL = ("FIX_M, FIX_MTE1, MTE1_FIX, MTE1_M, MTE1_MTE2, MTE1_MTE3, MTE2_M, MTE2_MTE1, MTE2_MTE3, "
             "MTE3_MTE1, MTE3_MTE2, M_FIX, M_MTE1, M_MTE2")


# The issue's example, as written.
@ascendemu.kernel("aiv")
def add_one(ctx, x, y, n):
    ub = ctx.ub.alloc((n,), "float16")
    ctx.data_copy(ub, x)
    ctx.set_flag(HardEvent.MTE2_V, 0); ctx.wait_flag(HardEvent.MTE2_V, 0)
    ctx.adds(ub, ub, 1.0, n)
    ctx.set_flag(HardEvent.V_MTE3, 0); ctx.wait_flag(HardEvent.V_MTE3, 0)
    ctx.data_copy(y, ub)


@ascendemu.kernel("aiv")
def add_one_no_load_flag(ctx, x, y, n):
    ub = ctx.ub.alloc((n,), "float16")
    ctx.data_copy(ub, x)
    ctx.adds(ub, ub, 1.0, n)
    ctx.set_flag(HardEvent.V_MTE3, 0); ctx.wait_flag(HardEvent.V_MTE3, 0)
    ctx.data_copy(y, ub)


@ascendemu.kernel("aiv")
def add_one_no_store_flag(ctx, x, y, n):
    ub = ctx.ub.alloc((n,), "float16")
    ctx.data_copy(ub, x)
    ctx.set_flag(HardEvent.MTE2_V, 0); ctx.wait_flag(HardEvent.MTE2_V, 0)
    ctx.adds(ub, ub, 1.0, n)
    ctx.data_copy(y, ub)


@ascendemu.kernel("aiv")
def add_one_barriers(ctx, x, y, n):
    ub = ctx.ub.alloc((n,), "float16")
    ctx.data_copy(ub, x)
    ctx.pipe_barrier(Pipe.PIPE_ALL)
    ctx.adds(ub, ub, 1.0, n)
    ctx.pipe_barrier(Pipe.PIPE_ALL)
    ctx.data_copy(y, ub)


def line_of(fn, text):
    """The file line number of the one line of `fn`'s source that contains `text`."""
    fn = getattr(fn, "fn", fn)
    lines, first = inspect.getsourcelines(fn)
    hits = [first + i for i, ln in enumerate(lines) if text in ln]
    assert len(hits) == 1, hits
    return hits[0]


def run(body, *args, kind="aiv", die=None):
    die = die or ae.Die("910c")
    k = body if isinstance(body, ae.Kernel) else ae.kernel(kind)(body)
    return die.launch(k, 1, args)


def io(n, die=None, seed=0):
    die = die or ae.Die("910c")
    xs = np.random.default_rng(seed).uniform(-100, 100, n).astype(np.float16)
    return die, xs, die.gm.from_numpy(xs), die.gm.empty(n, "float16")


def race_message(kern, region, first, second, line_kernel=None):
    """The exact RaceError text: first/second = (instruction, pipe, reads|writes, source text)."""
    f = kern.fn if isinstance(kern, ae.Kernel) else kern
    l1, l2 = line_of(f, first[3]), line_of(f, second[3])
    lo, hi = region
    return (f"AIV 0 · UB · test_sync.py:{l2}: race on UB[{lo:#x}, {hi:#x}): no flag, barrier or queue operation orders\n"
            f"    earlier: {first[0]} on {first[1]} {first[2]} UB[{first[4][0]:#x}, {first[4][1]:#x}) at test_sync.py:{l1}\n"
            f"        {first[3]}\n"
            f"    later:   {second[0]} on {second[1]} {second[2]} UB[{second[4][0]:#x}, {second[4][1]:#x}) "
            f"at test_sync.py:{l2}\n"
            f"        {second[3]}\n"
            f"    {second[3]}\n    ^")


# --- the issue's example --------------------------------------------------------------------------------
@settings(deadline=None)
@given(blocks=st.integers(1, 300))
def test_add_one_as_written(blocks):
    n = 16 * blocks
    die, xs, x, y = io(n)
    die.launch(add_one, block_dim=1, args=(x, y, n))
    np.testing.assert_array_equal(y.numpy(), (xs.astype(np.float32) + 1).astype(np.float16))


def test_add_one_without_the_load_flag_is_a_race():
    die, _, x, y = io(256)
    with pytest.raises(ae.RaceError) as ei:
        die.launch(add_one_no_load_flag, block_dim=1, args=(x, y, 256))
    assert str(ei.value) == race_message(
        add_one_no_load_flag, (0, 0x200),
        ("data_copy", "PIPE_MTE2", "writes", "ctx.data_copy(ub, x)", (0, 0x200)),
        ("adds", "PIPE_V", "reads", "ctx.adds(ub, ub, 1.0, n)", (0, 0x200)))
    assert ei.value.line.lineno == line_of(add_one_no_load_flag, "ctx.adds(")


def test_add_one_without_the_store_flag_is_a_race():
    die, _, x, y = io(64)
    with pytest.raises(ae.RaceError) as ei:
        die.launch(add_one_no_store_flag, block_dim=1, args=(x, y, 64))
    assert str(ei.value) == race_message(
        add_one_no_store_flag, (0, 0x80),
        ("adds", "PIPE_V", "writes", "ctx.adds(ub, ub, 1.0, n)", (0, 0x80)),
        ("data_copy", "PIPE_MTE3", "reads", "ctx.data_copy(y, ub)", (0, 0x80)))


def test_pipe_barrier_all_orders_everything():
    die, xs, x, y = io(512)
    rep = die.launch(add_one_barriers, block_dim=1, args=(x, y, 512))
    np.testing.assert_array_equal(y.numpy(), (xs.astype(np.float32) + 1).astype(np.float16))
    (load, *_), (adds,), (store,) = [[(s, d) for p, s, d, name in rep.cores[0].events if p == pipe and d]
                                      for pipe in (Pipe.PIPE_MTE2, Pipe.PIPE_V, Pipe.PIPE_MTE3)]
    assert adds[0] >= load[0] + load[1] and store[0] >= adds[0] + adds[1]


def test_a_single_pipe_barrier_does_not_order_other_pipes():
    def body(ctx, x, y, n):
        ub = ctx.ub.alloc((n,), "float16")
        ctx.data_copy(ub, x)
        ctx.pipe_barrier(Pipe.PIPE_V)
        ctx.adds(ub, ub, 1.0, n)
    die, _, x, y = io(128)
    with pytest.raises(ae.RaceError, match="race on UB"):
        run(body, x, y, 128, die=die)


def test_race_checking_can_be_turned_off():
    die, xs, x, y = io(256, ae.Die("910c", checks=ae.Checks(race=False)))
    die.launch(add_one_no_load_flag, block_dim=1, args=(x, y, 256))  # no RaceError
    np.testing.assert_array_equal(y.numpy(), (xs.astype(np.float32) + 1).astype(np.float16))


# --- a double-buffered tile loop: the WAR hazard -----------------------------------------------------------
def tile_loop(ctx, x, y, n, tile, war_flag):
    """y = x + 1 in tiles, two input and two output slots. `war_flag`: protect input slots with V_MTE2."""
    ins = [ctx.ub.alloc((tile,), "float16") for _ in range(2)]
    outs = [ctx.ub.alloc((tile,), "float16") for _ in range(2)]
    tiles = n // tile
    for i in range(tiles):
        b = i % 2
        if i >= 2:
            if war_flag:
                ctx.wait_flag(E.V_MTE2, b)  # V is done reading ins[b]
            ctx.wait_flag(E.MTE3_V, b)  # MTE3 is done reading outs[b]
        ctx.data_copy(ins[b], x[i * tile:(i + 1) * tile])
        ctx.set_flag(E.MTE2_V, b)
        ctx.wait_flag(E.MTE2_V, b)
        ctx.adds(outs[b], ins[b], 1.0, tile)
        if war_flag:
            ctx.set_flag(E.V_MTE2, b)
        ctx.set_flag(E.V_MTE3, b)
        ctx.wait_flag(E.V_MTE3, b)
        ctx.data_copy(y[i * tile:(i + 1) * tile], outs[b])
        ctx.set_flag(E.MTE3_V, b)
    for b in range(min(2, tiles)):
        if war_flag:
            ctx.wait_flag(E.V_MTE2, b)
        ctx.wait_flag(E.MTE3_V, b)


@settings(deadline=None)
@given(tile_blocks=st.integers(1, 16), tiles=st.integers(1, 7))
def test_double_buffered_loop_with_flags(tile_blocks, tiles):
    tile = 16 * tile_blocks
    n = tile * tiles
    die, xs, x, y = io(n, seed=tiles)
    run(tile_loop, x, y, n, tile, True, die=die)
    np.testing.assert_array_equal(y.numpy(), (xs.astype(np.float32) + 1).astype(np.float16))


def test_double_buffered_loop_without_v_mte2_is_a_war_race():
    die, _, x, y = io(1024)
    with pytest.raises(ae.RaceError) as ei:
        run(tile_loop, x, y, 1024, 256, False, die=die)
    assert str(ei.value) == race_message(
        tile_loop, (0, 0x200),
        ("adds", "PIPE_V", "reads", "ctx.adds(outs[b], ins[b], 1.0, tile)", (0, 0x200)),
        ("data_copy", "PIPE_MTE2", "writes", "ctx.data_copy(ins[b], x[i * tile:(i + 1) * tile])", (0, 0x200)))


def test_two_tiles_need_no_war_flag():
    die, xs, x, y = io(512)
    run(tile_loop, x, y, 512, 256, False, die=die)  # each slot is used once
    np.testing.assert_array_equal(y.numpy(), (xs.astype(np.float32) + 1).astype(np.float16))


# --- flag misuse ---------------------------------------------------------------------------------------------
def test_wait_after_set_passes_and_wait_without_set_would_hang():
    def good(ctx):
        ctx.set_flag(E.MTE2_V, 3)
        ctx.wait_flag(E.MTE2_V, 3)
    run(good)

    def bad(ctx):
        ctx.wait_flag(E.MTE2_V, 3)
    n = line_of(bad, "ctx.wait_flag")
    with pytest.raises(ae.SyncError) as ei:
        run(bad)
    assert str(ei.value) == (f"AIV 0 · test_sync.py:{n}: wait_flag(MTE2_V, 3) has no earlier set_flag: it would "
                             f"hang on hardware\n    ctx.wait_flag(E.MTE2_V, 3)\n    ^")


def test_a_flag_can_be_reused_after_its_wait_but_not_set_twice():
    def good(ctx):
        for _ in range(3):
            ctx.set_flag(E.V_MTE3, 1)
            ctx.wait_flag(E.V_MTE3, 1)
    run(good)

    def bad(ctx):
        ctx.set_flag(E.V_MTE3, 1)  # first
        ctx.set_flag(E.V_MTE3, 1)  # second
    l1, l2 = line_of(bad, "# first"), line_of(bad, "# second")
    with pytest.raises(ae.SyncError, match=rf"AIV 0 · test_sync.py:{l2}: set_flag\(V_MTE3, 1\) while it is already "
                                           rf"set \(at test_sync.py:{l1}\) and not yet waited on: undefined on hardware"):
        run(bad)


def test_events_must_be_legal_for_the_core_kind():
    def cube_ok(ctx):
        ctx.set_flag(E.MTE1_M, 0)
        ctx.wait_flag(E.MTE1_M, 0)
    run(cube_ok, kind="aic")

    def vec_bad(ctx):
        ctx.set_flag(E.MTE1_M, 0)
    with pytest.raises(ae.ParamError, match=rf"set_flag: HardEvent.MTE1_M is not legal on an AIV; legal: {AIV_LEGAL}\n"):
        run(vec_bad)

    def cube_bad(ctx):
        ctx.wait_flag(E.MTE2_V, 0)
    with pytest.raises(ae.ParamError, match=rf"wait_flag: HardEvent.MTE2_V is not legal on an AIC; legal: {AIC_LEGAL}\n"):
        run(cube_bad, kind="aic")

    def not_an_event(ctx):
        ctx.set_flag("MTE2_V", 0)
    with pytest.raises(ae.ParamError, match="set_flag: expected a HardEvent, got 'MTE2_V'"):
        run(not_an_event)


@settings(deadline=None)
@given(event_id=st.integers(-20, 40), event=st.sampled_from([E.MTE2_V, E.V_MTE3, E.MTE3_MTE2, E.S_V]))
def test_event_ids_are_0_to_7(event_id, event):
    def body(ctx):
        ctx.set_flag(event, event_id)
        ctx.wait_flag(event, event_id)
    if 0 <= event_id <= 7:
        run(body)
    else:
        with pytest.raises(ae.ParamError, match=rf"set_flag: event id {event_id} is outside 0..7"):
            run(body)


def test_flags_left_set_at_kernel_end():
    def good(ctx):
        ctx.set_flag(E.MTE2_V, 1)
        ctx.wait_flag(E.MTE2_V, 1)
    run(good)

    def bad(ctx):
        ctx.set_flag(E.MTE2_V, 1)  # one
        ctx.set_flag(E.V_MTE3, 2)  # two
    l1, l2 = line_of(bad, "# one"), line_of(bad, "# two")
    with pytest.raises(ae.SyncError, match=rf"AIV 0\b.*: kernel ended with flags set but never waited on: "
                                           rf"MTE2_V\[1\] \(set at test_sync.py:{l1}\), "
                                           rf"V_MTE3\[2\] \(set at test_sync.py:{l2}\)"):
        run(bad)


def test_flag_balance_can_be_turned_off():
    def bad(ctx):
        ctx.set_flag(E.MTE2_V, 1)
    run(bad, die=ae.Die("910c", checks=ae.Checks(flag_balance=False)))


# --- scalar access -----------------------------------------------------------------------------------------
def scalar_kernel(ctx, x, y, flags, out):
    """Load x, read x[3] on the scalar, write x[4] = x[3] + 1, add 1 on V, read back y[5] on the scalar."""
    ub = ctx.ub.alloc((128,), "float16")
    ctx.data_copy(ub, x)
    if "MTE2_S" in flags:
        ctx.set_flag(E.MTE2_S, 0)
        ctx.wait_flag(E.MTE2_S, 0)
    v = ctx.get_value(ub, 3)
    ctx.set_value(ub, 4, v + 1)
    if "S_V" in flags:
        ctx.set_flag(E.S_V, 0)
        ctx.wait_flag(E.S_V, 0)
    ctx.adds(ub, ub, 1.0, 128)
    if "V_S" in flags:
        ctx.set_flag(E.V_S, 0)
        ctx.wait_flag(E.V_S, 0)
    out.append(ctx.get_value(ub, 5))
    ctx.set_flag(E.V_MTE3, 0)
    ctx.wait_flag(E.V_MTE3, 0)
    ctx.data_copy(y, ub)


def test_scalar_access_with_flags():
    die, xs, x, y = io(128)
    out = []
    run(scalar_kernel, x, y, {"MTE2_S", "S_V", "V_S"}, out, die=die)
    want = xs.astype(np.float32)
    want[4] = np.float16(want[3] + 1)
    want = (want.astype(np.float16).astype(np.float32) + 1).astype(np.float16)
    np.testing.assert_array_equal(y.numpy(), want)
    assert out == [float(want[5])]


@pytest.mark.parametrize("missing, earlier, later, region", [
    ("MTE2_S", ("data_copy", "PIPE_MTE2", "writes", "ctx.data_copy(ub, x)", (0, 0x100)),
     ("get_value", "PIPE_S", "reads", "v = ctx.get_value(ub, 3)", (6, 8)), (6, 8)),
    ("S_V", ("set_value", "PIPE_S", "writes", "ctx.set_value(ub, 4, v + 1)", (8, 10)),
     ("adds", "PIPE_V", "reads", "ctx.adds(ub, ub, 1.0, 128)", (0, 0x100)), (8, 10)),
    ("V_S", ("adds", "PIPE_V", "writes", "ctx.adds(ub, ub, 1.0, 128)", (0, 0x100)),
     ("get_value", "PIPE_S", "reads", "out.append(ctx.get_value(ub, 5))", (10, 12)), (10, 12)),
])
def test_scalar_access_without_a_flag_is_a_race(missing, earlier, later, region):
    die, _, x, y = io(128)
    with pytest.raises(ae.RaceError) as ei:
        run(scalar_kernel, x, y, {"MTE2_S", "S_V", "V_S"} - {missing}, [], die=die)
    assert str(ei.value) == race_message(scalar_kernel, region, earlier, later)


def scalar_wait_kernel(ctx, x, y, wait_event):
    """y = x + x[0]: the scalar reads x[0] after a wait on `wait_event`; V then reads what MTE2 wrote."""
    ub = ctx.ub.alloc((128,), "float16")
    out = ctx.ub.alloc((128,), "float16")
    ctx.data_copy(ub, x)
    ctx.set_flag(wait_event, 0)
    ctx.wait_flag(wait_event, 0)
    v = 2.0 if wait_event is E.MTE2_MTE3 else ctx.get_value(ub, 0)
    ctx.adds(out, ub, v, 128)
    ctx.set_flag(E.V_MTE3, 0)
    ctx.wait_flag(E.V_MTE3, 0)
    ctx.data_copy(y, out)


def test_a_scalar_wait_blocks_issue_so_it_orders_every_pipe():
    die, xs, x, y = io(128)
    run(scalar_wait_kernel, x, y, E.MTE2_S, die=die)  # no MTE2_V needed: nothing issues before MTE2 is done
    np.testing.assert_array_equal(y.numpy(), (xs.astype(np.float32) + xs[0]).astype(np.float16))


def test_a_wait_on_another_pipe_does_not_order_v():
    die, xs, x, y = io(128)
    with pytest.raises(ae.RaceError) as ei:
        run(scalar_wait_kernel, x, y, E.MTE2_MTE3, die=die)  # only MTE3 waits; V may still run early
    assert str(ei.value) == race_message(
        scalar_wait_kernel, (0, 0x100),
        ("data_copy", "PIPE_MTE2", "writes", "ctx.data_copy(ub, x)", (0, 0x100)),
        ("adds", "PIPE_V", "reads", "ctx.adds(out, ub, v, 128)", (0, 0x100)))


def test_get_value_then_mte2_overwrite_is_ordered():
    def body(ctx, x, y):
        ub = ctx.ub.alloc((128,), "float16")
        ctx.data_copy(ub, x)
        ctx.set_flag(E.MTE2_S, 0)
        ctx.wait_flag(E.MTE2_S, 0)
        v = ctx.get_value(ub, 7)
        ctx.data_copy(ub, x)  # overwriting what the scalar read is safe
        ctx.set_flag(E.MTE2_V, 0)
        ctx.wait_flag(E.MTE2_V, 0)
        ctx.adds(ub, ub, v, 128)
        ctx.set_flag(E.V_MTE3, 0)
        ctx.wait_flag(E.V_MTE3, 0)
        ctx.data_copy(y, ub)
    die, xs, x, y = io(128)
    run(body, x, y, die=die)
    np.testing.assert_array_equal(y.numpy(), (xs.astype(np.float32) + xs[7]).astype(np.float16))


# --- TPipe / TQue / TBuf ------------------------------------------------------------------------------------
def tque_kernel(ctx, x, y, n, tile):
    """y = 2x + 1 with a double-buffered VECIN and VECOUT queue."""
    pipe = ctx.tpipe()
    qin, qout = ae.TQue(ae.TPosition.VECIN, 1), ae.TQue(ae.TPosition.VECOUT, 1)
    pipe.init_buffer(qin, 2, tile * 2)
    pipe.init_buffer(qout, 2, tile * 2)
    for i in range(n // tile):
        t = qin.alloc_tensor("float16")
        ctx.data_copy(t, x[i * tile:(i + 1) * tile])
        qin.enque(t)
        t = qin.deque()
        o = qout.alloc_tensor("float16")
        ctx.muls(o, t, 2.0, tile)
        ctx.adds(o, o, 1.0, tile)
        qin.free_tensor(t)
        qout.enque(o)
        o = qout.deque()
        ctx.data_copy(y[i * tile:(i + 1) * tile], o)
        qout.free_tensor(o)


@settings(deadline=None)
@given(tile_blocks=st.integers(1, 32), tiles=st.integers(1, 6))
def test_tque_double_buffered_kernel(tile_blocks, tiles):
    tile = 16 * tile_blocks
    n = tile * tiles
    die, xs, x, y = io(n, seed=tile_blocks)
    run(tque_kernel, x, y, n, tile, die=die)
    want = ((xs.astype(np.float32) * 2).astype(np.float16).astype(np.float32) + 1).astype(np.float16)
    np.testing.assert_array_equal(y.numpy(), want)


def test_tque_deque_returns_the_enqueued_tensor():
    def body(ctx):
        pipe = ctx.tpipe()
        q = ae.TQue(ae.TPosition.VECIN, 1)
        pipe.init_buffer(q, 2, 100)  # rounded up to 128 B per slot
        t = q.alloc_tensor("float32", (4, 8))
        assert t.shape == (4, 8) and t.dtype == np.float32
        q.enque(t)
        d = q.deque()
        assert (d.offset, d.shape, d.dtype) == (t.offset, (4, 8), np.dtype(np.float32))
        assert q.slots[1].tensor.offset - q.slots[0].tensor.offset == 128
        q.free_tensor(d)
    run(body)


def test_tque_without_enque_deque_is_a_race():
    def body(ctx, x, y):
        pipe = ctx.tpipe()
        q = ae.TQue(ae.TPosition.VECIN, 1)
        pipe.init_buffer(q, 1, 256)
        t = q.alloc_tensor("float16")
        ctx.data_copy(t, x)
        ctx.adds(t, t, 1.0, 128)  # no enque/deque
    die, _, x, y = io(128)
    with pytest.raises(ae.RaceError, match=r"earlier: data_copy on PIPE_MTE2 writes UB.*\n.*\n    later:   adds on PIPE_V"):
        run(body, x, y, die=die)


def test_tque_reuse_without_free_tensor_is_refused():
    def body(ctx, x):
        pipe = ctx.tpipe()
        q = ae.TQue(ae.TPosition.VECIN, 1)
        pipe.init_buffer(q, 2, 256)
        q.alloc_tensor("float16")
        q.alloc_tensor("float16")
        q.alloc_tensor("float16")  # third
    n = line_of(body, "# third")
    with pytest.raises(ae.SyncError, match=rf"AIV 0 · test_sync.py:{n}: alloc_tensor: all 2 slots of TQue\(VECIN\) are "
                                           rf"in use \(slot 0 is allocated\); free_tensor one first"):
        run(body, None)


@pytest.mark.parametrize("misuse, match", [
    ("deque_empty", r"deque: TQue\(VECIN\) is empty: it would hang on hardware"),
    ("enque_foreign", r"enque: LocalTensor\(UB@0x200, \(128,\), float16\) is not a slot of TQue\(VECIN\)"),
    ("enque_gm", r"enque: GlobalTensor\(.*\) is not a slot of TQue\(VECIN\)"),
    ("enque_full", r"enque: TQue\(VECIN\) depth 1 is full; deque first"),
    ("enque_twice", r"enque: slot is enqueued, not allocated"),
    ("free_undequeued", r"free_tensor: slot is allocated, not dequeued"),
    ("before_init", r"TQue\(VECIN\) used before pipe.init_buffer"),
    ("left_enqueued", r"kernel ended with flags set but never waited on: MTE2_V\[7\]"),
])
def test_tque_misuse(misuse, match):
    def body(ctx, x):
        pipe = ctx.tpipe()
        q = ae.TQue(ae.TPosition.VECIN, 1)
        if misuse == "before_init":
            q.alloc_tensor("float16")
        pipe.init_buffer(q, 2, 256)
        t = q.alloc_tensor("float16")
        if misuse == "deque_empty":
            q.deque()
        if misuse == "enque_foreign":
            q.enque(ctx.ub.alloc((128,), "float16"))
        if misuse == "enque_gm":
            q.enque(x)
        if misuse == "free_undequeued":
            q.free_tensor(t)
        q.enque(t)
        if misuse == "enque_full":
            q.enque(q.alloc_tensor("float16"))
        if misuse == "enque_twice":
            q.enque(t)
        if misuse == "left_enqueued":
            return
        q.free_tensor(q.deque())
    die, _, x, _ = io(128)
    with pytest.raises(ae.SyncError, match=match):
        run(body, x, die=die)


def test_tque_positions_and_sizes():
    with pytest.raises(ae.ParamError, match=r"TQue at VECCALC has no default events; pass events=\(enque, free\) "
                                            r"or use a TBuf for VECCALC"):
        ae.TQue(ae.TPosition.VECCALC)

    def body(ctx):
        with pytest.raises(ae.ParamError, match="init_buffer: num = 5; 1 = single, 2 = double buffering"):
            ctx.tpipe().init_buffer(ae.TQue(ae.TPosition.VECOUT), 5, 64)
    run(body)


def test_tbuf_get():
    def body(ctx):
        pipe = ctx.tpipe()
        buf = ae.TBuf(ae.TPosition.VECCALC)
        with pytest.raises(ae.SyncError, match=r"TBuf\(VECCALC\) used before pipe.init_buffer"):
            buf.get("float32")
        pipe.init_buffer(buf, 1000)  # rounded up to 1024 B
        t = buf.get("float32")
        assert (t.kind, t.shape, t.dtype) == ("UB", (256,), np.dtype(np.float32))
        h = buf.get("float16", 100)
        assert (h.offset, h.shape) == (t.offset, (100,))
        ctx.duplicate(t, 2.5, 256)
        ctx.set_flag(E.V_S, 0)
        ctx.wait_flag(E.V_S, 0)
        assert ctx.get_value(t, 255) == 2.5
        other = ctx.ub.alloc((8,), "float32")
        assert other.offset >= t.offset + 1024
    run(body)
