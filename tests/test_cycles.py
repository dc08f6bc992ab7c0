"""Tests of the cycle model on small AIV programs whose timing can be worked out by hand.

The rules (ascend-910c.md §7, §8, §18; the spec's assumptions):
- a GM move costs mte_gm_head_cycles + ceil(charged bytes / per-core rate), charged in 32 B bursts;
- a vector op costs vector_head_cycles + ceil(repeats × lanes / elements per cycle);
- each pipe runs its instructions in order, one after another; different pipes overlap;
- the scalar issues one instruction per scalar_issue_cycles, a scalar access costs scalar_access_cycles;
- a wait_flag lets its pipe go on at (the set's start) + flag_latency_cycles;
- a pipe's queue holds queue_depth instructions; when it is full the scalar stalls.
Expected numbers below are worked out from those rules, not read from the model.
"""
import json
from math import ceil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu as ae
from ascendemu import HardEvent as E
from ascendemu import Pipe
from ascendemu import spec as S
from ascendemu.params import DataCopyExtParams, DataCopyParams

SP = S.get("910c")
HEAD, RD, WR = SP.mte_gm_head_cycles, SP.gm_read_bytes_per_cycle, SP.aiv_gm_write_bytes_per_cycle
VHEAD, FLAG = SP.vector_head_cycles, SP.flag_latency_cycles


def read_cost(nbytes, sp=SP):
    return sp.mte_gm_head_cycles + ceil(nbytes / sp.gm_read_bytes_per_cycle)


def write_cost(nbytes, sp=SP):
    return sp.mte_gm_head_cycles + ceil(nbytes / sp.aiv_gm_write_bytes_per_cycle)


def adds_cost(n, sp=SP):
    """A float16 adds over n elements: whole 128-lane repeats at 128 elements/cycle."""
    return sp.vector_head_cycles + ceil(n / 128) * 128 // sp.vec_simple_b16_elems_per_cycle


def launch(body, die, *args, block_dim=1):
    return die.launch(ae.kernel("aiv")(body), block_dim, args)


def events(rep, pipe, core=0):
    """(start, duration, name) of the instructions on `pipe` that take time, relative to the launch."""
    return [(s - rep.start, d, name) for p, s, d, name in rep.cores[core].events if p == int(pipe) and d]


def add_one(ctx, x, y, n):
    ub = ctx.ub.alloc((n,), "float16")
    ctx.data_copy(ub, x)
    ctx.set_flag(E.MTE2_V, 0)
    ctx.wait_flag(E.MTE2_V, 0)
    ctx.adds(ub, ub, 1.0, n)
    ctx.set_flag(E.V_MTE3, 0)
    ctx.wait_flag(E.V_MTE3, 0)
    ctx.data_copy(y, ub)


# --- one move, two moves --------------------------------------------------------------------------------
@settings(deadline=None)
@given(blocks=st.integers(1, 3000), head=st.integers(0, 400), rate=st.integers(1, 512))
def test_a_single_copy_costs_head_plus_bytes_over_rate(blocks, head, rate):
    sp = S.replace(SP, "test", mte_gm_head_cycles=head, gm_read_bytes_per_cycle=rate)
    n = 16 * blocks  # float16 elements: whole 32 B blocks

    def body(ctx, x):
        ctx.data_copy(ctx.ub.alloc((n,), "float16"), x)
    die = ae.Die(sp, functional=False)
    rep = die.launch(ae.kernel("aiv")(body), 1, (die.gm.empty(n, "float16"),))
    want = head + ceil(2 * n / rate)
    assert rep.cycles == want
    assert events(rep, Pipe.PIPE_MTE2) == [(0, want, "data_copy")]


@settings(deadline=None)
@given(count=st.integers(1, 20), block_len=st.integers(1, 200).map(lambda k: 2 * k))
def test_gm_traffic_is_charged_in_32_byte_bursts(count, block_len):
    def body(ctx, x):
        ub = ctx.ub.alloc((count * ceil(block_len / 32) * 16,), "float16")
        ctx.data_copy_pad(ub, x, DataCopyExtParams(count, block_len, 0, 0))
    die = ae.Die("910c", functional=False)
    rep = die.launch(ae.kernel("aiv")(body), 1, (die.gm.empty(count * block_len // 2, "float16"),))
    assert rep.cycles == HEAD + ceil(count * ceil(block_len / 32) * 32 / RD)
    assert rep.bytes == {"GM->UB": count * block_len}  # bytes moved are not the bytes charged


@settings(deadline=None)
@given(count=st.integers(1, 12), length=st.integers(1, 8), src_gap=st.integers(0, 5), dst_gap=st.integers(0, 5))
def test_a_strided_copy_is_charged_for_the_blocks_it_moves(count, length, src_gap, dst_gap):
    def body(ctx, x, y):
        ub = ctx.ub.alloc(((length + dst_gap) * count * 16,), "float16", zero=True)
        ctx.data_copy(ub, x, DataCopyParams(count, length, src_gap, dst_gap))
        ctx.set_flag(E.MTE2_MTE3, 0)
        ctx.wait_flag(E.MTE2_MTE3, 0)
        ctx.data_copy(y, ub)
    die = ae.Die("910c")
    xs = np.arange((length + src_gap) * count * 16).astype(np.float16)
    x, y = die.gm.from_numpy(xs), die.gm.empty(((length + dst_gap) * count * 16,), "float16")
    rep = die.launch(ae.kernel("aiv")(body), 1, (x, y))
    assert events(rep, Pipe.PIPE_MTE2) == [(0, read_cost(32 * count * length), "data_copy")]
    assert rep.bytes["GM->UB"] == 32 * count * length
    got = y.numpy().reshape(count, (length + dst_gap) * 16)
    want = xs.reshape(count, (length + src_gap) * 16)
    np.testing.assert_array_equal(got[:, :16 * length], want[:, :16 * length])
    assert (got[:, 16 * length:] == 0).all()


@settings(deadline=None)
@given(a=st.integers(1, 400), b=st.integers(1, 400))
def test_copies_on_different_pipes_overlap(a, b):
    def body(ctx, x, y):
        ctx.data_copy(ctx.ub.alloc((16 * a,), "float16"), x)  # MTE2, issued at 0
        ctx.data_copy(y, ctx.ub.alloc((16 * b,), "float16", zero=True))  # MTE3, issued at 1
    die = ae.Die("910c", functional=False)
    rep = die.launch(ae.kernel("aiv")(body), 1, (die.gm.empty(16 * a, "float16"), die.gm.empty(16 * b, "float16")))
    ra, wb = read_cost(32 * a), write_cost(32 * b)
    assert events(rep, Pipe.PIPE_MTE2) == [(0, ra, "data_copy")]
    assert events(rep, Pipe.PIPE_MTE3) == [(1, wb, "data_copy")]
    assert rep.cycles == max(ra, 1 + wb) < ra + wb


@settings(deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=2, max_size=6))
def test_instructions_on_one_pipe_serialise(sizes):
    def body(ctx, xs):
        for k, x in zip(sizes, xs):
            ctx.data_copy(ctx.ub.alloc((16 * k,), "float16"), x)
        for k in sizes:
            t = ctx.ub.alloc((16 * k,), "float16", zero=True)
            ctx.adds(t, t, 1.0, 16 * k)
    die = ae.Die("910c", functional=False)
    rep = die.launch(ae.kernel("aiv")(body), 1, ([die.gm.empty(16 * k, "float16") for k in sizes],))
    t, want = 0, []
    for k in sizes:
        want.append((t, read_cost(32 * k), "data_copy"))
        t += read_cost(32 * k)
    assert events(rep, Pipe.PIPE_MTE2) == want
    # the vector ops are issued right after the copies (scalar time = number issued) and run back to back
    t, want = len(sizes), []
    for k in sizes:
        want.append((t, adds_cost(16 * k), "adds"))
        t += adds_cost(16 * k)
    assert events(rep, Pipe.PIPE_V) == want
    assert rep.cores[0].busy == {"V": sum(adds_cost(16 * k) for k in sizes),
                                 "MTE2": sum(read_cost(32 * k) for k in sizes), "MTE3": 0}


# --- flags and the scalar ---------------------------------------------------------------------------------
@settings(deadline=None)
@given(latency=st.integers(0, 60), blocks=st.integers(1, 100))
def test_a_flag_wait_starts_the_consumer_at_set_time_plus_latency(latency, blocks):
    sp = S.replace(SP, "test", flag_latency_cycles=latency)
    n = 16 * blocks
    rep = launch(add_one, *_io(n, sp), n)
    c_in = read_cost(2 * n)
    (adds,) = events(rep, Pipe.PIPE_V)
    assert adds == (c_in + latency, adds_cost(n), "adds")
    (_, store) = events(rep, Pipe.PIPE_MTE3)[0], events(rep, Pipe.PIPE_MTE3)[-1]
    assert store[0] == c_in + latency + adds_cost(n) + latency
    assert rep.cycles == c_in + adds_cost(n) + write_cost(2 * n) + 2 * latency


def _io(n, sp=SP):
    """A timing-only die and its x, y."""
    die = ae.Die(sp, functional=False)
    return die, die.gm.empty(n, "float16"), die.gm.empty(n, "float16")


@settings(deadline=None)
@given(issue=st.integers(1, 20), access=st.integers(1, 40), reads=st.integers(0, 5))
def test_scalar_issue_and_access_costs(issue, access, reads):
    sp = S.replace(SP, "test", scalar_issue_cycles=issue, scalar_access_cycles=access)

    def body(ctx, x, y):
        a = ctx.ub.alloc((16,), "float16", zero=True)
        for _ in range(reads):
            ctx.get_value(a, 0)  # on PIPE_S: the scalar is busy `access` cycles each
        ctx.data_copy(ctx.ub.alloc((16,), "float16"), x)
        ctx.data_copy(y, a)
        b = ctx.ub.alloc((16,), "float16", zero=True)
        ctx.adds(b, b, 1.0, 16)
    die = ae.Die(sp, functional=False)
    rep = die.launch(ae.kernel("aiv")(body), 1, (die.gm.empty(16, "float16"), die.gm.empty(16, "float16")))
    t0 = reads * access
    assert [e[0] for e in events(rep, Pipe.PIPE_S)] == [i * access for i in range(reads)]
    assert events(rep, Pipe.PIPE_MTE2)[0][0] == t0
    assert events(rep, Pipe.PIPE_MTE3)[0][0] == t0 + issue
    assert events(rep, Pipe.PIPE_V)[0][0] == t0 + 2 * issue


def expected_issue_of_last(depth, n_adds, wait_start, c):
    """The queue rule by hand: the V queue holds the wait (entry 0) and the adds (entries 1…);
    entry m issues at max(previous + 1, start of entry m - depth) once the queue is full."""
    starts = [wait_start] + [wait_start + j * c for j in range(n_adds)]
    issue = [2]  # copy at 0, set_flag at 1, wait_flag at 2
    for m in range(1, n_adds + 1):
        t = issue[-1] + 1
        if m >= depth and starts[m - depth] > t:
            t = starts[m - depth]
        issue.append(t)
    return issue[-1]


@pytest.mark.parametrize("depth", [4, 16, 32, 41, 64])
def test_a_full_queue_stalls_issue(depth):
    sp = S.replace(SP, "test", queue_depth=depth)
    big, n_adds = 64 * 1024, 40

    def body(ctx, x, y):
        ctx.data_copy(ctx.ub.alloc((big // 2,), "float16"), x)
        ctx.set_flag(E.MTE2_V, 0)
        ctx.wait_flag(E.MTE2_V, 0)  # V waits for the long copy
        t = ctx.ub.alloc((128,), "float16", zero=True)
        for _ in range(n_adds):
            ctx.adds(t, t, 1.0, 128)
        ctx.data_copy(y, ctx.ub.alloc((128,), "float16", zero=True))  # independent; issued after the adds
    die = ae.Die(sp, functional=False)
    rep = die.launch(ae.kernel("aiv")(body), 1, (die.gm.empty(big // 2, "float16"), die.gm.empty(128, "float16")))
    wait_start = read_cost(big) + FLAG
    c = adds_cost(128)
    store = events(rep, Pipe.PIPE_MTE3)[0][0]
    assert store == expected_issue_of_last(depth, n_adds, wait_start, c) + 1
    if depth == 32:
        assert store == wait_start + 7 * c + 1  # 40 adds behind the wait: the 8th-to-last waits for add 7
    if depth > n_adds:
        assert store == 3 + n_adds  # never full: one issue per cycle


# --- the report --------------------------------------------------------------------------------------------
@settings(deadline=None)
@given(blocks=st.integers(1, 200))
def test_report_numbers(blocks):
    n = 16 * blocks
    rep = launch(add_one, *_io(n), n)
    c_in, a, c_out = read_cost(2 * n), adds_cost(n), write_cost(2 * n)
    total = c_in + FLAG + a + FLAG + c_out
    assert rep.cycles == total
    assert rep.time_us == pytest.approx(total / 1850.0)
    core = rep.cores[0]
    assert core.busy == {"V": a, "MTE2": c_in, "MTE3": c_out}
    assert rep.utilisation("MTE2") == pytest.approx(c_in / total)
    assert core.utilisation("V") == pytest.approx(a / total)
    assert rep.bytes == {"GM->UB": 2 * n, "UB->GM": 2 * n}
    assert rep.hbm_bytes == 4 * n
    assert core.instructions == 7
    assert f"{total} cycles" in rep.summary()


@settings(deadline=None)
@given(clock=st.floats(100.0, 5000.0, allow_nan=False))
def test_time_is_cycles_over_clock(clock):
    sp = S.replace(SP, "test", clock_mhz=clock)
    rep = launch(add_one, *_io(256, sp), 256)
    assert rep.time_us == rep.cycles / clock
    assert rep.cycles == launch(add_one, *_io(256), 256).cycles  # the clock does not change cycle counts


def test_chrome_trace(tmp_path):
    def body(ctx, x, y, n):
        b = ctx.get_block_idx()
        ub = ctx.ub.alloc((n,), "float16")
        ctx.data_copy(ub, x[b * n:(b + 1) * n])
        ctx.set_flag(E.MTE2_V, 0)
        ctx.wait_flag(E.MTE2_V, 0)
        ctx.get_value(ctx.ub.alloc((16,), "float16", zero=True), 0)  # one scalar access on S
        ctx.adds(ub, ub, 1.0, n)
        ctx.set_flag(E.V_MTE3, 0)
        ctx.wait_flag(E.V_MTE3, 0)
        ctx.data_copy(y[b * n:(b + 1) * n], ub)
    die = ae.Die("910c", functional=False)
    n = 512
    die.launch(ae.kernel("aiv")(lambda ctx: None), 1)  # an earlier launch: the trace is relative to this one
    rep = die.launch(ae.kernel("aiv")(body), 2, (die.gm.empty(2 * n, "float16"), die.gm.empty(2 * n, "float16"), n))
    path = tmp_path / "trace.json"
    rep.write_trace(path)
    doc = json.loads(path.read_text())
    evs = doc["traceEvents"]
    threads = {e["tid"]: e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(threads.values()) == sorted(f"AIV {c} {p}" for c in (0, 1) for p in ("S", "V", "MTE2", "MTE3"))
    assert len(threads) == 8
    xs = [e for e in evs if e["ph"] == "X"]
    assert {e["tid"] for e in xs} <= set(threads)
    for tid, name in threads.items():
        core, pipe = int(name.split()[1]), name.split()[2]
        total = sum(e["dur"] for e in xs if e["tid"] == tid) * rep.clock_mhz
        busy = rep.cores[core].busy.get(pipe, SP.scalar_access_cycles if pipe == "S" else None)
        assert total == pytest.approx(busy), name
    for e in xs:
        assert 0 <= e["ts"] and (e["ts"] + e["dur"]) * rep.clock_mhz <= rep.cycles + 1e-6


def test_recording_collects_launches():
    die = ae.Die("910c", functional=False)
    x, y = die.gm.empty(256, "float16"), die.gm.empty(256, "float16")
    k = ae.kernel("aiv")(add_one)
    die.launch(k, 1, (x, y, 256))  # not recorded
    with die.recording() as rec:
        r1 = die.launch(k, 1, (x, y, 256))
        with die.recording() as inner:
            r2 = die.launch(k, 2, (x[:128], y[:128], 128))
        r3 = die.launch(k, 1, (x[:64], y[:64], 64))
    die.launch(k, 1, (x, y, 256))  # not recorded
    assert rec.reports == [r1, r2, r3] and inner.reports == [r2]
    assert rec.cycles == r1.cycles + r2.cycles + r3.cycles
    assert rec.time_us == pytest.approx(rec.cycles / 1850.0)
    assert die.last_report is not r3


# --- functional vs timing-only, rounds ----------------------------------------------------------------------
def tile_loop(ctx, x, y, n, tile):
    """y = 3x in place in two UB slots; MTE3 → MTE2 frees a slot (V is ordered before MTE3 already)."""
    ins = [ctx.ub.alloc((tile,), "float16") for _ in range(2)]
    for i in range(n // tile):
        b = i % 2
        if i >= 2:
            ctx.wait_flag(E.MTE3_MTE2, b)
        ctx.data_copy(ins[b], x[i * tile:(i + 1) * tile])
        ctx.set_flag(E.MTE2_V, b)
        ctx.wait_flag(E.MTE2_V, b)
        ctx.muls(ins[b], ins[b], 3.0, tile)
        ctx.set_flag(E.V_MTE3, b)
        ctx.wait_flag(E.V_MTE3, b)
        ctx.data_copy(y[i * tile:(i + 1) * tile], ins[b])
        ctx.set_flag(E.MTE3_MTE2, b)
    for b in range(min(2, n // tile)):
        ctx.wait_flag(E.MTE3_MTE2, b)


@settings(deadline=None)
@given(tiles=st.integers(1, 8), tile_blocks=st.integers(1, 64))
def test_timing_only_mode_gives_the_same_cycles(tiles, tile_blocks):
    tile = 16 * tile_blocks
    n = tiles * tile
    reps = []
    for functional in (True, False):
        die = ae.Die("910c", functional=functional)
        x = die.gm.from_numpy(np.ones(n, np.float16))
        y = die.gm.empty(n, "float16")
        reps.append(die.launch(ae.kernel("aiv")(tile_loop), 1, (x, y, n, tile)))
        if functional:
            assert (y.numpy() == 3).all()
    f, t = reps
    assert (f.cycles, f.cores[0].busy, f.bytes, f.cores[0].events) == (t.cycles, t.cores[0].busy, t.bytes, t.cores[0].events)
    assert not t.functional and f.functional


def test_cores_run_in_parallel_and_extra_blocks_run_in_later_rounds():
    def body(ctx, x, y, n):
        b = ctx.get_block_idx()
        add_one(ctx, x[b * n:(b + 1) * n], y[b * n:(b + 1) * n], n)

    def run(blocks, n=1024):
        die = ae.Die("910c", functional=False)
        x, y = die.gm.empty(blocks * n, "float16"), die.gm.empty(blocks * n, "float16")
        return die.launch(ae.kernel("aiv")(body), blocks, (x, y, n))

    one, r48, r96 = run(1), run(48), run(96)
    assert len(r48.cores) == len(r96.cores) == 48
    assert one.cycles <= r48.cycles  # 48 cores share the die's HBM
    # A second round starts on each core when its first ends; with the HBM shared, the staggered
    # second round meets less contention than the first, so it is less than a full round longer.
    assert 1.5 * r48.cycles <= r96.cycles <= 2.1 * r48.cycles
    assert all(c.instructions == 2 * one.cores[0].instructions for c in r96.cores)
    assert r96.bytes == {k: 96 * v for k, v in one.bytes.items()}


def test_vector_only_cores_do_not_slow_each_other():
    def body(ctx):
        t = ctx.ub.alloc((4096,), "float16", zero=True)
        for _ in range(5):
            ctx.adds(t, t, 1.0, 4096)
    k = ae.kernel("aiv")(body)
    one = ae.Die("910c", functional=False).launch(k, 1)
    assert one.cycles == 5 * adds_cost(4096)
    assert ae.Die("910c", functional=False).launch(k, 48).cycles == one.cycles
    assert ae.Die("910c", functional=False).launch(k, 49).cycles == 2 * one.cycles


def test_cores_share_the_die_hbm():
    big = 64 * 1024

    def body(ctx, x):
        b = ctx.get_block_idx()
        ctx.data_copy(ctx.ub.alloc((big // 2,), "float16"), x[b * big // 2:(b + 1) * big // 2])
    die = ae.Die("910c", functional=False)
    rep = die.launch(ae.kernel("aiv")(body), 48, (die.gm.empty(48 * big // 2, "float16"),))
    assert rep.cycles >= HEAD + ceil(48 * big / SP.hbm_bytes_per_cycle)  # 865 B/cycle for the whole die


def test_launching_a_plain_function_is_a_clear_error():
    with pytest.raises(ae.ParamError, match="is not a @kernel-decorated function"):
        ae.Die("910c").launch(lambda ctx: None)
