"""Tests of the whole die (issue 3): many cores in one virtual time, cross-core flags, mix kernels, streams and
core sets, the shared HBM, deadlock detection and determinism.

References: ascend-910c.md §10 (cross-core flags: counters, modes 0/1/2, max 15), §11 (launch and block indices:
AIV of a mix kernel has block_idx = 2·group + sub_block_idx), the spec's `hbm_bytes_per_cycle` (865 B/cycle die-wide)
and `gm_read_bytes_per_cycle` (110 B/cycle per core), and bandwidth.py's sharing rule (first come per window; a lone
transfer takes exactly head + ⌈bytes / per-core rate⌉).

Expectations are computed here independently: results with NumPy (exactly: small-integer fp16 operands keep every
product and sum exact in the cube's fp32 accumulator), times from the spec's numbers.
"""
import inspect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu as ae
from ascendemu import (PIPE_FIX, PIPE_MTE2, PIPE_MTE3, PIPE_V, CoreSet, DeadlockError, FixpipeParamsV220, HardEvent,
                       LoadData2DParams, MmadParams, Nd2NzParams, ParamError, SyncError)
from ascendemu.bandwidth import SharedLink

E = HardEvent
SPEC = ae.spec.get("910c")
LAT = SPEC.cross_core_flag_latency_cycles
HEAD = SPEC.mte_gm_head_cycles
RD = SPEC.gm_read_bytes_per_cycle  # per-core GM→UB cap
HBM = SPEC.hbm_bytes_per_cycle  # die-wide cap
W = SPEC.bandwidth_window_cycles


def cdiv(a, b):
    return -(-a // b)


def sync(ctx, event, i=0):
    ctx.set_flag(event, i)
    ctx.wait_flag(event, i)


def events(report, label, name_prefix):
    """(start, duration) of a core's trace events whose name starts with `name_prefix`, in issue order."""
    (core,) = [c for c in report.cores if c.label == label]
    return [(s, d) for _, s, d, n in core.events if n.startswith(name_prefix)]


def line_of(fn, text):
    """The source line number of the first line of `fn` containing `text`."""
    src, first = inspect.getsourcelines(fn)
    return first + next(i for i, ln in enumerate(src) if text in ln)


# ------------------------------------------------------------------------------------------------ multi-core vector


@ae.kernel("aiv")
def axpb(ctx, x, z, y, n, per, a, b):
    """y[i] = (x[i] + z[i]) · a + b over this block's slice [block·per, min(n, (block+1)·per))."""
    lo = ctx.block_idx * per
    cnt = min(n, lo + per) - lo
    if cnt <= 0:
        return
    ux = ctx.ub.alloc((per,), "float32")
    uz = ctx.ub.alloc((per,), "float32")
    ctx.data_copy(ux, x[lo:lo + cnt], cnt)
    ctx.data_copy(uz, z[lo:lo + cnt], cnt)
    sync(ctx, E.MTE2_V)
    ctx.add(ux, ux, uz, cnt)
    ctx.muls(ux, ux, a, cnt)
    ctx.adds(ux, ux, b, cnt)
    sync(ctx, E.V_MTE3)
    ctx.data_copy(y[lo:lo + cnt], ux, cnt)


@settings(deadline=None)
@given(block_dim=st.integers(1, 48), n8=st.integers(1, 2048), seed=st.integers(0, 2**32 - 1))
def test_multicore_vector_equals_numpy(block_dim, n8, seed):
    rng = np.random.default_rng(seed)
    n = 8 * n8  # whole 32 B blocks of fp32
    per = 8 * cdiv(cdiv(n, block_dim), 8)
    x = rng.standard_normal(n).astype(np.float32)
    z = rng.standard_normal(n).astype(np.float32)
    a, b = np.float32(rng.uniform(-2, 2)), np.float32(rng.uniform(-2, 2))
    die = ae.Die("910c")
    gx, gz = die.gm.from_numpy(x), die.gm.from_numpy(z)
    gy = die.gm.empty((n,), "float32")
    rep = die.launch(axpb, block_dim=block_dim, args=(gx, gz, gy, n, per, float(a), float(b)))
    np.testing.assert_array_equal(gy.numpy(), (x + z) * a + b)  # fp32 ops, each rounded once, like NumPy's
    np.testing.assert_array_equal(gx.numpy(), x)
    used = sum(1 for blk in range(block_dim) if blk * per < n)
    assert len(rep.cores) == block_dim
    assert sum(1 for c in rep.cores if c.busy["V"] > 0) == used
    assert rep.hbm_bytes == 3 * 4 * n
    # the cores run concurrently: the launch is much shorter than the sum of the cores' times
    assert rep.cycles == max(c.cycles for c in rep.cores)
    if used > 4:
        assert rep.cycles < sum(c.cycles for c in rep.cores) / 2


@settings(deadline=None)
@given(block_dim=st.integers(49, 150), cores=st.integers(1, 48))
def test_blocks_beyond_the_cores_run_in_rounds(block_dim, cores):
    """numBlocks > cores: extra blocks run in later rounds on the same cores (§11), each with its own index."""
    seen = []

    @ae.kernel("aiv")
    def who(ctx, out):
        seen.append((ctx.block_idx, ctx.block_num))
        u = ctx.ub.alloc((8,), "int32")
        ctx.duplicate(u, ctx.block_idx, 8)
        sync(ctx, E.V_MTE3)
        ctx.data_copy(out[ctx.block_idx], u)

    die = ae.Die("910c")
    out = die.gm.zeros((block_dim, 8), "int32")
    rep = die.launch(who, block_dim=block_dim, args=(out,), cores=CoreSet(aiv=range(cores)))
    assert sorted(seen) == [(b, block_dim) for b in range(block_dim)]
    np.testing.assert_array_equal(out.numpy(), np.repeat(np.arange(block_dim), 8).reshape(block_dim, 8))
    assert len(rep.cores) == cores
    # a core with r rounds is busy for r times one block's time (the rounds are serial on it)
    die1 = ae.Die("910c")
    one = die1.launch(who, block_dim=1, args=(die1.gm.zeros((1, 8), "int32"),)).cycles
    rounds = cdiv(block_dim, cores)
    assert rep.cycles == rounds * one


def test_mix_block_indices():
    """Mix: group g = AIC g (block_idx g) + AIV 2g, 2g+1 (block_idx 2g + sub, sub_block_idx sub) (§11)."""
    seen = []

    @ae.kernel("mix")
    def idx(ctx):
        seen.append((ctx._core.label, ctx.is_aic, ctx.block_idx, ctx.sub_block_idx, ctx.block_num,
                     ctx.get_task_ratio()))

    ae.Die("910c").launch(idx, block_dim=3)
    exp = []
    for g in range(3):
        exp.append((f"AIC {g}", True, g, 0, 3, 1))
        exp += [(f"AIV {2 * g + s}", False, 2 * g + s, s, 3, 2) for s in (0, 1)]
    assert sorted(seen) == sorted(exp)
    with pytest.raises(ParamError, match="mix kernel runs block_dim ≤ 24"):
        ae.Die("910c").launch(idx, block_dim=25)


# ------------------------------------------------------------------------------------------------ cross-core flags


@ae.kernel("mix")
def aiv_ping_pong(ctx, rounds, ball):
    """Mode 1: AIV sub 0 and sub 1 of each group bounce a counter through GM, each adding 1 per turn."""
    if ctx.is_aic:
        return
    g = ctx.block_idx // 2
    u = ctx.ub.alloc((8,), "float32")
    me, other = (1, 2) if ctx.sub_block_idx == 0 else (2, 1)
    for r in range(rounds):
        if ctx.sub_block_idx == 1 or r:
            ctx.cross_core_wait_flag(other)  # sub 1 waits for the serve, sub 0 for every return
        ctx.data_copy(u, ball[g])
        sync(ctx, E.MTE2_V)
        ctx.adds(u, u, 1.0, 8)
        sync(ctx, E.V_MTE3)
        ctx.data_copy(ball[g], u)
        ctx.cross_core_set_flag(1, PIPE_MTE3, me)  # after the GM write has completed (on MTE3)
        sync(ctx, E.MTE3_MTE2)  # u may be loaded again
    if ctx.sub_block_idx == 0:
        ctx.cross_core_wait_flag(other)  # the last return


@settings(deadline=None)
@given(rounds=st.integers(1, 8), groups=st.integers(1, 4))
def test_mode1_ping_pong(rounds, groups):
    die = ae.Die("910c")
    ball = die.gm.zeros((groups, 8), "float32")
    rep = die.launch(aiv_ping_pong, block_dim=groups, args=(rounds, ball))
    np.testing.assert_array_equal(ball.numpy(), np.full((groups, 8), 2 * rounds, np.float32))
    for g in range(groups):
        waits0 = events(rep, f"AIV {2 * g}", "cross_core_wait_flag")
        waits1 = events(rep, f"AIV {2 * g + 1}", "cross_core_wait_flag")
        sets0 = events(rep, f"AIV {2 * g}", "cross_core_set_flag")
        sets1 = events(rep, f"AIV {2 * g + 1}", "cross_core_set_flag")
        assert len(waits0) == len(waits1) == len(sets0) == len(sets1) == rounds
        for r in range(rounds):
            # a wait completes no earlier than the other side's set plus the flag latency
            assert waits1[r][0] >= sets0[r][0] + LAT
            assert waits0[r][0] >= sets1[r][0] + LAT
        # per round trip, time grows by at least two flag hops (plus the GM round trips)
        for r in range(1, rounds):
            assert waits1[r][0] - waits1[r - 1][0] >= 2 * LAT + 2 * HEAD
    # more rounds take longer, by at least one round trip each
    if rounds > 1:
        d2 = ae.Die("910c")
        fewer = d2.launch(aiv_ping_pong, block_dim=groups, args=(rounds - 1, d2.gm.zeros((groups, 8), "float32")))
        assert rep.cycles - fewer.cycles >= 2 * LAT


@ae.kernel("mix")
def aic_aiv_ping_pong(ctx, rounds):
    """Mode 2: the AIC releases both AIVs (flag 3); its wait (flag 4) needs a set from each of them."""
    for _ in range(rounds):
        if ctx.is_aic:
            ctx.cross_core_set_flag(2, PIPE_FIX, 3)
            ctx.cross_core_wait_flag(4)
        else:
            ctx.cross_core_wait_flag(3)
            if ctx.sub_block_idx == 1:  # the second AIV answers late: the AIC must wait for it too
                u = ctx.ub.alloc((4096,), "float16")
                ctx.duplicate(u, 0.0, 4096)
                for _ in range(4):
                    ctx.adds(u, u, 1.0, 4096)
                ctx.cross_core_set_flag(2, PIPE_V, 4)
            else:
                ctx.cross_core_set_flag(2, PIPE_MTE3, 4)


@settings(deadline=None)
@given(rounds=st.integers(1, 10), groups=st.integers(1, 24))
def test_mode2_aic_aiv_ping_pong(rounds, groups):
    rep = ae.Die("910c").launch(aic_aiv_ping_pong, block_dim=groups, args=(rounds,))
    for g in range(groups):
        aic_sets = events(rep, f"AIC {g}", "cross_core_set_flag")
        aic_waits = events(rep, f"AIC {g}", "cross_core_wait_flag")
        v_sets = [events(rep, f"AIV {2 * g + s}", "cross_core_set_flag") for s in (0, 1)]
        v_waits = [events(rep, f"AIV {2 * g + s}", "cross_core_wait_flag") for s in (0, 1)]
        for r in range(rounds):
            for s in (0, 1):
                assert v_waits[s][r][0] >= aic_sets[r][0] + LAT  # one AIC set releases both AIVs
            # the AIC's wait needs both: the late AIV's set (after its vector work) plus the latency
            assert aic_waits[r][0] >= max(v_sets[0][r][0], v_sets[1][r][0]) + LAT
            assert v_sets[1][r][0] > v_sets[0][r][0]
            if r:
                assert aic_waits[r][0] - aic_waits[r - 1][0] >= 2 * LAT
    one = ae.Die("910c").launch(aic_aiv_ping_pong, block_dim=groups, args=(1,)).cycles
    assert rep.cycles >= rounds * 2 * LAT
    assert rep.cycles >= one + (rounds - 1) * 2 * LAT


@ae.kernel("aiv")
def uneven_then_barrier(ctx, work, rounds, out):
    """Mode 0 barrier among all AIVs: block b does work[b] vector ops before each barrier."""
    u = ctx.ub.alloc((2048,), "float32")
    ctx.duplicate(u, 0.0, 2048)
    for r in range(rounds):
        for _ in range(work[(ctx.block_idx + r) % len(work)]):
            ctx.adds(u, u, 1.0, 2048)
        ctx.cross_core_set_flag(0, PIPE_V, 5)
        ctx.cross_core_wait_flag(5)
    sync(ctx, E.V_MTE3)
    ctx.data_copy(out[ctx.block_idx], u[:8])


@settings(deadline=None)
@given(work=st.lists(st.integers(0, 6), min_size=2, max_size=48), rounds=st.integers(1, 3))
def test_mode0_barrier_among_all_aivs(work, rounds):
    k = len(work)
    die = ae.Die("910c")
    out = die.gm.zeros((k, 8), "float32")
    rep = die.launch(uneven_then_barrier, block_dim=k, args=(work, rounds, out))
    labels = [c.label for c in rep.cores]
    sets = {lb: events(rep, lb, "cross_core_set_flag") for lb in labels}
    waits = {lb: events(rep, lb, "cross_core_wait_flag") for lb in labels}
    for r in range(rounds):
        last_set = max(sets[lb][r][0] for lb in labels)
        for lb in labels:
            assert waits[lb][r][0] >= last_set + LAT  # nobody passes the barrier before the slowest has set
        # and nobody waits longer than needed: the barrier opens at the last set + latency for someone
        assert min(waits[lb][r][0] for lb in labels) == last_set + LAT
    exp = [sum(work[(b + r) % k] for r in range(rounds)) for b in range(k)]
    np.testing.assert_array_equal(out.numpy()[:, 0], np.array(exp, np.float32))


@ae.kernel("aiv")
def eager_setter(ctx, work):
    """Block 0 sets the mode-0 flag twice before its two waits; the others alternate set/wait after work."""
    if ctx.block_idx == 0:
        ctx.cross_core_set_flag(0, PIPE_MTE3, 5)
        ctx.cross_core_set_flag(0, PIPE_MTE3, 5)
        ctx.cross_core_wait_flag(5)
        ctx.cross_core_wait_flag(5)
    else:
        u = ctx.ub.alloc((4096,), "float16")
        ctx.duplicate(u, 0.0, 4096)
        for _ in range(2):
            for _ in range(work):
                ctx.adds(u, u, 1.0, 4096)
            ctx.cross_core_set_flag(0, PIPE_V, 5)
            ctx.cross_core_wait_flag(5)


@settings(deadline=None)
@given(k=st.integers(2, 48), work=st.integers(0, 10))
def test_mode0_counts_sets_per_core(k, work):
    """Generation n of the barrier opens when *every* core has set n times: one core's two sets must not stand in
    for another core's one."""
    rep = ae.Die("910c").launch(eager_setter, block_dim=k, args=(work,))
    labels = [c.label for c in rep.cores]
    sets = {lb: events(rep, lb, "cross_core_set_flag") for lb in labels}
    waits = {lb: events(rep, lb, "cross_core_wait_flag") for lb in labels}
    for gen in range(2):
        opens = max(sets[lb][gen][0] for lb in labels) + LAT
        assert all(waits[lb][gen][0] >= opens for lb in labels)
        assert min(waits[lb][gen][0] for lb in labels) == opens


@ae.kernel("aiv")
def partial_sums_then_sync_all(ctx, x, parts, total, per):
    """Each block sums its slice into parts[block]; after SyncAll, block 0 adds up every part."""
    u = ctx.ub.alloc((per,), "float32")
    ctx.data_copy(u, x[ctx.block_idx * per:(ctx.block_idx + 1) * per])
    sync(ctx, E.MTE2_V)
    s = ctx.ub.alloc((8,), "float32")
    acc = ctx.ub.alloc((8,), "float32")
    ctx.duplicate(acc, 0.0, 8)
    for i in range(0, per, 8):  # a fixed summation order, reproduced on the host
        ctx.add(acc, acc, u[i:i + 8], 8)
    sync(ctx, E.V_MTE3)
    ctx.data_copy(parts[ctx.block_idx], acc)
    ctx.sync_all()
    if ctx.block_idx == 0:
        t = ctx.ub.alloc((ctx.block_num, 8), "float32")
        ctx.data_copy(t, parts)
        sync(ctx, E.MTE2_V)
        ctx.duplicate(s, 0.0, 8)
        for b in range(ctx.block_num):
            ctx.add(s, s, t[b], 8)
        sync(ctx, E.V_MTE3)
        ctx.data_copy(total, s)


@settings(deadline=None)
@given(k=st.integers(1, 48), per8=st.integers(1, 32), seed=st.integers(0, 2**32 - 1))
def test_sync_all(k, per8, seed):
    per = 8 * per8
    x = np.random.default_rng(seed).integers(-100, 100, k * per).astype(np.float32)
    die = ae.Die("910c")
    gx = die.gm.from_numpy(x)
    parts = die.gm.empty((k, 8), "float32")
    total = die.gm.empty((8,), "float32")
    rep = die.launch(partial_sums_then_sync_all, block_dim=k, args=(gx, parts, total, per))
    np.testing.assert_array_equal(total.numpy(), x.reshape(k, per // 8, 8).sum(axis=(0, 1)))  # small ints: exact
    syncs = [events(rep, c.label, "sync_all")[0][0] for c in rep.cores]
    assert len(set(syncs)) == 1  # every core leaves SyncAll at the same cycle
    # SyncAll opens when the last core has drained its pipes (its store to parts ends), plus the latency
    stores = [events(rep, c.label, "data_copy")[1] for c in rep.cores]
    assert syncs[0] == max(s + d for s, d in stores) + SPEC.sync_all_latency_cycles


@ae.kernel("mix")
def flood(ctx, n_sets, prod_work, cons_work, consume=True):
    """AIV sub 0 sets flag 7 n_sets times (prod_work vector ops before each); AIV sub 1 waits as often (with
    cons_work vector ops after each), or never."""
    if ctx.is_aic:
        return
    u = ctx.ub.alloc((4096,), "float16")
    ctx.duplicate(u, 0.0, 4096)
    if ctx.sub_block_idx == 0:
        for _ in range(n_sets):
            for _ in range(prod_work):
                ctx.adds(u, u, 1.0, 4096)
            ctx.cross_core_set_flag(1, PIPE_V, 7)
    elif consume:
        for _ in range(n_sets):
            ctx.cross_core_wait_flag(7)
            for _ in range(cons_work):
                ctx.adds(u, u, 1.0, 4096)


def test_counter_overflow_raises_sync_error():
    ae.Die("910c").launch(flood, block_dim=1, args=(15, 0, 0, False))  # 15 sets never taken: the maximum
    with pytest.raises(SyncError, match=r"AIV 0 .*cross_core_set_flag\(7\).*AIV 1's counter past 15"):
        ae.Die("910c").launch(flood, block_dim=1, args=(16, 0, 0, False))
    # a consumer much slower than its producer: in virtual time 16 sets are pending at once
    with pytest.raises(SyncError, match="AIV 1's counter past 15"):
        ae.Die("910c").launch(flood, block_dim=1, args=(40, 0, 3))


@settings(deadline=None)
@given(n_sets=st.integers(16, 40), prod_work=st.integers(1, 4), cons_work=st.integers(0, 4))
def test_no_false_overflow_when_the_consumer_keeps_up(n_sets, prod_work, cons_work):
    """A producer with vector work between sets and a consumer at least as fast: in virtual time the counter
    stays small, so many sets must not overflow, however far ahead the scheduler lets the producer's Python run
    (its scalar unit only issues; the work is queued on PIPE_V)."""
    if cons_work > prod_work:
        cons_work = prod_work
    rep = ae.Die("910c").launch(flood, block_dim=1, args=(n_sets, prod_work, cons_work))
    waits = events(rep, "AIV 1", "cross_core_wait_flag")
    sets = events(rep, "AIV 0", "cross_core_set_flag")
    assert len(waits) == len(sets) == n_sets
    assert all(w[0] >= s[0] + LAT for w, s in zip(waits, sets))


def test_cross_core_errors():
    @ae.kernel("aiv")
    def mode1_without_mix(ctx):
        ctx.cross_core_set_flag(1, PIPE_MTE3, 0)

    with pytest.raises(ParamError, match="mix kernel"):
        ae.Die("910c").launch(mode1_without_mix, block_dim=2)

    @ae.kernel("mix")
    def bad_id(ctx):
        if ctx.is_aiv:
            ctx.cross_core_set_flag(2, PIPE_MTE3, 16)

    with pytest.raises(ParamError, match="flag id 16"):
        ae.Die("910c").launch(bad_id, block_dim=1)

    @ae.kernel("mix")
    def aic_mode1(ctx):
        if ctx.is_aic:
            ctx.cross_core_set_flag(1, PIPE_FIX, 0)

    with pytest.raises(ParamError, match="mode 2"):
        ae.Die("910c").launch(aic_mode1, block_dim=1)


# ------------------------------------------------------------------------------------------------ AIC → GM → AIV


M, N, K = 32, 32, 32  # one fp16 tile: M1 = N1 = K1 = 2 fractals; each AIV takes M/2 rows
FE = 256  # fp16 elements per 512 B fractal
M1, N1, K1 = M // 16, N // 16, K // 16


@ae.kernel("mix")
def cube_then_vector(ctx, a, w, ws, out, rounds, bias):
    """Per group: for each round the AIC computes C = A[g, r] · Wᵀ (fp32) into workspace slot r % 2 and sets
    flag 0 (mode 2, on FIX); each AIV waits, adds `bias` to its half of the rows and writes out[g, r], then
    frees the slot with flag 1 (mode 2, on MTE3). The AIC waits for the free before reusing a slot."""
    g = ctx.block_idx if ctx.is_aic else ctx.block_idx // 2
    if ctx.is_aic:
        b1 = ctx.l1.alloc((K1 * N1 * FE,), "float16")
        ctx.data_copy(b1, w, Nd2NzParams(1, N, K, 0, K, N1 * 16, 1, 0))  # W (n×k) in Nz = Zn(B)
        for r in range(rounds):
            a1 = ctx.l1.alloc((K1 * M1 * FE,), "float16")
            ctx.data_copy(a1, a[g, r], Nd2NzParams(1, M, K, 0, K, M1 * 16, 1, 0))
            sync(ctx, E.MTE2_MTE1)
            l0a = ctx.l0a.alloc((M1 * K1 * FE,), "float16")
            l0b = ctx.l0b.alloc((K1 * N1 * FE,), "float16")
            for i in range(M1):  # Zz: row block i, its K1 fractals (source stride M1)
                ctx.load_data(l0a[i * K1 * FE:], a1, LoadData2DParams(start_index=i, repeat_times=K1, src_stride=M1))
            ctx.load_data(l0b, b1, LoadData2DParams(start_index=0, repeat_times=K1 * N1))
            sync(ctx, E.MTE1_M)
            c0 = ctx.l0c.alloc((M1 * N1 * 256,), "float32")
            ctx.mmad(c0, l0a, l0b, MmadParams(M, N, K, cmatrix_init_val=True))
            sync(ctx, E.M_FIX)
            if r >= 2:
                ctx.cross_core_wait_flag(1)  # both AIVs are done with slot r % 2
            ctx.fixpipe(ws[g, r % 2], c0, FixpipeParamsV220(n_size=N, m_size=M, dst_stride=N))
            ctx.cross_core_set_flag(2, PIPE_FIX, 0)
        for _ in range(min(rounds, 2)):  # drain the last frees
            ctx.cross_core_wait_flag(1)
    else:
        half = M // 2
        rows = slice(ctx.sub_block_idx * half, (ctx.sub_block_idx + 1) * half)
        u = ctx.ub.alloc((half, N), "float32")
        for r in range(rounds):
            ctx.cross_core_wait_flag(0)
            ctx.data_copy(u, ws[g, r % 2, rows])
            sync(ctx, E.MTE2_V)
            ctx.adds(u, u, bias, half * N)
            sync(ctx, E.V_MTE3)
            ctx.data_copy(out[g, r, rows], u)
            ctx.cross_core_set_flag(2, PIPE_MTE3, 1)
            sync(ctx, E.MTE3_MTE2)  # u is free again for the next round's load


@settings(deadline=None)
@given(groups=st.integers(1, 6), rounds=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_mix_tiles_aic_gm_aiv(groups, rounds, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-4, 5, (groups, rounds, M, K)).astype(np.float16)  # small integers: exact in fp32
    wt = rng.integers(-4, 5, (N, K)).astype(np.float16)  # W = Bᵀ, out × in
    bias = float(rng.integers(-3, 4))
    die = ae.Die("910c")
    ga, gw = die.gm.from_numpy(a), die.gm.from_numpy(wt)
    ws = die.gm.empty((groups, 2, M, N), "float32")
    out = die.gm.empty((groups, rounds, M, N), "float32")
    rep = die.launch(cube_then_vector, block_dim=groups, args=(ga, gw, ws, out, rounds, bias))
    exp = (a.astype(np.float64) @ wt.T.astype(np.float64) + bias).astype(np.float32)
    np.testing.assert_array_equal(out.numpy(), exp)
    for g in range(groups):
        fix = events(rep, f"AIC {g}", "fixpipe")
        for s in (0, 1):
            waits = events(rep, f"AIV {2 * g + s}", "cross_core_wait_flag")
            loads = [e for e in events(rep, f"AIV {2 * g + s}", "data_copy")][0::2]
            for r in range(rounds):
                # an AIV sees the tile only after its Fixpipe has finished and the flag has crossed
                assert waits[r][0] >= fix[r][0] + fix[r][1] + LAT
                assert loads[r][0] >= waits[r][0]


# ------------------------------------------------------------------------------------------------ streams


@ae.kernel("aiv")
def stream_work(ctx, x, y, per, reps):
    lo = ctx.block_idx * per
    u = ctx.ub.alloc((per,), "float32")
    ctx.data_copy(u, x[lo:lo + per])
    sync(ctx, E.MTE2_V)
    for _ in range(reps):
        ctx.adds(u, u, 1.0, per)
    sync(ctx, E.V_MTE3)
    ctx.data_copy(y[lo:lo + per], u)


@settings(deadline=None)
@given(split=st.integers(1, 47), per8=st.integers(1, 256), reps=st.integers(1, 6))
def test_disjoint_streams_beat_serial(split, per8, reps):
    per = 8 * per8
    n0, n1 = split, 48 - split
    times = {}
    for mode in ("serial", "concurrent"):
        die = ae.Die("910c")
        x0 = die.gm.from_numpy(np.arange(n0 * per, dtype=np.float32))
        x1 = die.gm.from_numpy(np.arange(n1 * per, dtype=np.float32))
        y0, y1 = die.gm.empty((n0 * per,), "float32"), die.gm.empty((n1 * per,), "float32")
        s1 = 0 if mode == "serial" else 1
        r0 = die.launch(stream_work, block_dim=n0, args=(x0, y0, per, reps), cores=CoreSet(aiv=range(n0)), stream=0)
        r1 = die.launch(stream_work, block_dim=n1, args=(x1, y1, per, reps), cores=CoreSet(aiv=range(n0, 48)),
                        stream=s1)
        np.testing.assert_array_equal(y0.numpy(), np.arange(n0 * per, dtype=np.float32) + reps)
        np.testing.assert_array_equal(y1.numpy(), np.arange(n1 * per, dtype=np.float32) + reps)
        times[mode] = die.synchronize()
        if mode == "serial":
            assert r1.start == r0.start + r0.cycles  # in order on one stream
            assert times[mode] == r0.cycles + r1.cycles
        else:
            assert r0.start == r1.start == 0
            assert times[mode] == max(r0.cycles, r1.cycles)
    assert times["concurrent"] < times["serial"]


def test_decode_split_mix_streams():
    """The paper's split: a mix kernel on 16 AIC + 32 AIV beside one on 8 AIC + 16 AIV."""
    big = CoreSet(aic=range(16), aiv=range(32))
    small = CoreSet(aic=range(16, 24), aiv=range(32, 48))
    die = ae.Die("910c")
    ra = die.launch(aic_aiv_ping_pong, block_dim=16, args=(3,), cores=big, stream=0)
    rb = die.launch(aic_aiv_ping_pong, block_dim=8, args=(3,), cores=small, stream=1)
    assert {c.label for c in rb.cores} == {f"AIC {i}" for i in range(16, 24)} | {f"AIV {i}" for i in range(32, 48)}
    assert ra.start == rb.start == 0
    assert die.synchronize() == max(ra.cycles, rb.cycles)
    with pytest.raises(ParamError, match="AIV 33"):
        die.launch(aic_aiv_ping_pong, block_dim=1, args=(1,), cores=CoreSet(aic=[16], aiv=[32]))  # AIV 33 missing


def test_event_orders_streams():
    die = ae.Die("910c")
    n, per = 8, 256
    x = die.gm.from_numpy(np.zeros(n * per, np.float32))
    y = die.gm.empty((n * per,), "float32")
    z = die.gm.empty((n * per,), "float32")
    s0, s1 = die.stream(0), die.stream(1)
    r0 = s0.launch(stream_work, block_dim=n, args=(x, y, per, 2), cores=CoreSet(aiv=range(n)))
    ev = s0.record_event()
    assert ev.time == r0.start + r0.cycles
    s1.wait_event(ev)
    # stream 1 reads stream 0's output, on other cores, after the event
    r1 = s1.launch(stream_work, block_dim=n, args=(y, z, per, 3), cores=CoreSet(aiv=range(n, 2 * n)))
    assert r1.start == ev.time
    np.testing.assert_array_equal(z.numpy(), np.full(n * per, 5, np.float32))
    # the same cores as stream 0 are fine too once ordered by the event
    ev2 = s1.record_event()
    s0.wait_event(ev2)
    r2 = s0.launch(stream_work, block_dim=n, args=(z, y, per, 1), cores=CoreSet(aiv=range(n, 2 * n)))
    assert r2.start == r1.start + r1.cycles
    assert die.synchronize() == r2.start + r2.cycles
    # waiting on an older event does not move a stream back
    s1.wait_event(ae.Event(0))
    assert s1.record_event().time == ev2.time


def test_overlapping_core_sets_raise():
    die = ae.Die("910c")
    n, per = 16, 256
    x = die.gm.from_numpy(np.zeros(n * per, np.float32))
    y = die.gm.empty((n * per,), "float32")
    die.launch(stream_work, block_dim=n, args=(x, y, per, 2), cores=CoreSet(aiv=range(n)), stream=0)
    with pytest.raises(ParamError) as ei:
        die.launch(stream_work, block_dim=n, args=(x, y, per, 2), cores=CoreSet(aiv=range(8, 8 + n)), stream=1)
    msg = str(ei.value)
    for part in ("stream_work on stream 1", "AIV 8", "stream_work on stream 0", "disjoint"):
        assert part in msg, msg
    # disjoint cores at the same time are fine
    die2 = ae.Die("910c")
    x = die2.gm.from_numpy(np.zeros(2 * n * per, np.float32))
    y = die2.gm.empty((2 * n * per,), "float32")
    die2.launch(stream_work, block_dim=n, args=(x, y, per, 2), cores=CoreSet(aiv=range(n)), stream=0)
    die2.launch(stream_work, block_dim=n, args=(x, y, per, 2), cores=CoreSet(aiv=range(n, 2 * n)), stream=1)


def test_bad_core_sets():
    die = ae.Die("910c")
    with pytest.raises(ParamError, match="0..47"):
        die.launch(stream_work, block_dim=1, args=(None, None, 8, 1), cores=CoreSet(aiv=[48]))
    with pytest.raises(ParamError, match="no AIV"):
        die.launch(stream_work, block_dim=1, args=(None, None, 8, 1), cores=CoreSet(aic=[0]))


# ------------------------------------------------------------------------------------------------ shared HBM


CHUNK = 16 * 1024


@ae.kernel("aiv")
def stream_in(ctx, src, nchunks):
    """Back-to-back 16 KiB GM→UB copies on MTE2 (one UB buffer: a single pipe needs no flags)."""
    u = ctx.ub.alloc((CHUNK,), "int8")
    for c in range(nchunks):
        ctx.data_copy(u, src[ctx.block_idx * nchunks + c])


def streaming(k, nchunks):
    die = ae.Die("910c", functional=False)
    src = die.gm.empty((k * nchunks, CHUNK), "int8")
    return die.launch(stream_in, block_dim=k, args=(src, nchunks))


def test_hbm_unsaturated_is_exact():
    """While k·110 ≤ 865 (k ≤ 7) the cores never contend: each 16 KiB copy takes exactly
    head + ⌈16384 / 110⌉ cycles and the copies run back to back."""
    for k in range(1, HBM // RD + 1):
        for nch in (1, 3):
            rep = streaming(k, nch)
            assert rep.cycles == nch * (HEAD + cdiv(CHUNK, RD)), (k, nch)


@settings(deadline=None)
@given(k=st.integers(1, 48), nchunks=st.integers(4, 16))
def test_hbm_saturation(k, nchunks):
    """k cores each stream B = nchunks · 16 KiB. The model (bandwidth.py) gives each core at most 110 B/cycle and
    the die at most 865 B/cycle, so the time is ≈ max(per-core time, die time):
        per-core:  nchunks · (head + ⌈16 KiB / 110⌉)   (heads are serial on a core's MTE2)
        die:       head + k·B / 865                     (while saturated, one core's head overlaps others' data)
    Tolerance: down to 2 windows below (accounting is per 64-cycle window, and a window's capacity is granted
    to transfers that start inside it) and up to 20 % above (first come, first served: late transfers wait,
    and at the end fewer, capped, cores drain the rest — measured ≤ 16 % for ≥ 4 chunks)."""
    rep = streaming(k, nchunks)
    b = nchunks * CHUNK
    per_core = nchunks * (HEAD + cdiv(CHUNK, RD))
    die_time = HEAD + k * b / HBM
    pred = max(per_core, die_time)
    assert pred - 2 * W <= rep.cycles <= 1.2 * pred, (rep.cycles, per_core, die_time)
    assert rep.hbm_bytes == k * b
    assert rep.hbm_gbps <= SPEC.peak_hbm_bytes_per_s / 1e9
    assert 0 < rep.hbm_pct_of_peak <= 100
    if k * RD > 1.5 * HBM:  # well past saturation: the die's HBM is the bottleneck and mostly used
        assert rep.hbm_pct_of_peak >= 75


def test_hbm_gbps_grows_then_saturates():
    pct = [streaming(k, 8).hbm_pct_of_peak for k in (1, 2, 4, 8, 16, 32, 48)]
    assert all(b >= a - 1 for a, b in zip(pct, pct[1:]))
    assert pct[-1] <= 100 and pct[-1] >= 90
    assert pct[0] == pytest.approx(100 * 8 * CHUNK / streaming(1, 8).cycles / HBM)


@settings(deadline=None)
@given(xfers=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 20000), st.sampled_from([64, 86, 110, 400])),
                      min_size=1, max_size=60))
def test_shared_link_rule(xfers):
    """bandwidth.py's rule on its own: a lone transfer is exact; nothing finishes before its own cap allows; every
    64-cycle window carries at most rate × 64 bytes; all bytes are placed."""
    link = SharedLink("t", HBM, W)
    lone = SharedLink("lone", HBM, W)
    s, nb, cap = xfers[0]
    assert lone.transfer(s, nb, cap) == s + cdiv(nb, cap)
    for s, nb, cap in sorted(xfers):
        end = link.transfer(s, nb, cap)
        assert end >= s + nb / cap - 1e-6
    assert all(v <= HBM * W + 1e-6 for v in link.used.values())
    assert sum(link.used.values()) == pytest.approx(sum(nb for _, nb, _ in xfers))
    assert link.total_bytes == sum(nb for _, nb, _ in xfers)


# ------------------------------------------------------------------------------------------------ deadlock


@ae.kernel("mix")
def stuck(ctx):
    if ctx.is_aic:
        ctx.cross_core_wait_flag(4)  # only AIV 0 ever sets flag 4: the AIC needs both AIVs
    elif ctx.sub_block_idx == 0:
        ctx.cross_core_set_flag(2, PIPE_MTE3, 4)
        ctx.cross_core_wait_flag(9)  # nobody sets flag 9
    else:
        pass  # AIV 1 finishes


@ae.kernel("mix")
def crossed(ctx):
    if ctx.is_aiv:
        ctx.cross_core_wait_flag(2 + ctx.sub_block_idx)  # each AIV waits for the other first
        ctx.cross_core_set_flag(1, PIPE_MTE3, 3 - ctx.sub_block_idx)


def test_deadlock_lists_each_stuck_core():
    with pytest.raises(DeadlockError) as ei:
        ae.Die("910c").launch(stuck, block_dim=2)
    msg = str(ei.value)
    assert "every unfinished core is waiting (4 cores)" in msg, msg
    la = line_of(stuck.fn, "cross_core_wait_flag(4)")
    lv = line_of(stuck.fn, "cross_core_wait_flag(9)")
    for g in range(2):
        assert f"AIC {g}: waits on cross_core_wait_flag(4) at test_die.py:{la}: ctx.cross_core_wait_flag(4)" in msg
        assert f"AIV {2 * g}: waits on cross_core_wait_flag(9) at test_die.py:{lv}" in msg
        assert f"AIV {2 * g + 1}:" not in msg  # finished cores are not listed

    with pytest.raises(DeadlockError) as ei:
        ae.Die("910c").launch(crossed, block_dim=1)
    msg = str(ei.value)
    ln = line_of(crossed.fn, "cross_core_wait_flag(2 + ")
    assert f"AIV 0: waits on cross_core_wait_flag(2) at test_die.py:{ln}" in msg
    assert f"AIV 1: waits on cross_core_wait_flag(3) at test_die.py:{ln}" in msg


def test_deadlock_in_sync_all_and_recovery():
    @ae.kernel("aiv")
    def half_sync(ctx):
        if ctx.block_idx % 2 == 0:
            ctx.sync_all()  # the odd blocks never arrive

    with pytest.raises(DeadlockError, match=r"AIV 0: waits on sync_all \(generation 0\)"):
        ae.Die("910c").launch(half_sync, block_dim=4)
    # the machine is usable afterwards (the stuck greenlets were dropped)
    die = ae.Die("910c")
    die.launch(aic_aiv_ping_pong, block_dim=2, args=(2,))


# ------------------------------------------------------------------------------------------------ determinism


def contended_launch():
    """Shared HBM, cross-core flags, streams and several block rounds together."""
    die = ae.Die("910c")
    rng = np.random.default_rng(7)
    a = rng.integers(-4, 5, (4, 3, M, K)).astype(np.float16)
    wt = rng.integers(-4, 5, (N, K)).astype(np.float16)
    ga, gw = die.gm.from_numpy(a), die.gm.from_numpy(wt)
    ws = die.gm.empty((4, 2, M, N), "float32")
    out = die.gm.empty((4, 3, M, N), "float32")
    reps = [die.launch(cube_then_vector, block_dim=4, args=(ga, gw, ws, out, 3, 1.0),
                       cores=CoreSet(aic=range(4), aiv=range(8)), stream=0)]
    x = die.gm.from_numpy(np.arange(30 * 2048, dtype=np.float32))
    y = die.gm.empty((30 * 2048,), "float32")
    reps.append(die.launch(stream_work, block_dim=30, args=(x, y, 2048, 3), cores=CoreSet(aiv=range(8, 18)),
                           stream=1))
    src = die.gm.empty((30 * 4, CHUNK), "int8")
    reps.append(die.launch(stream_in, block_dim=30, args=(src, 4), cores=CoreSet(aiv=range(18, 48)), stream=2))
    return [(r.cycles, r.start, [(c.label, c.cycles, c.busy, c.bytes, c.instructions, c.events) for c in r.cores])
            for r in reps], out.numpy()


def test_determinism():
    r1, o1 = contended_launch()
    r2, o2 = contended_launch()
    assert r1 == r2
    np.testing.assert_array_equal(o1, o2)


def test_mode0_barrier_counter_is_bounded():
    """A core may not run 15 barrier sets ahead of the slowest waiter of its kind."""
    @ae.kernel("aiv")
    def ahead(ctx):
        if ctx.block_idx == 0:
            for _ in range(16):
                ctx.cross_core_set_flag(0, PIPE_MTE3, 2)
    with pytest.raises(ae.SyncError, match="barrier sets of AIV 0 are pending; the counter holds at most 15"):
        ae.Die("910c").launch(ahead, block_dim=2)


@ae.kernel("aiv")
def _rounds_kernel(ctx, x, rounds):
    """`rounds` times: a GM read, a vector op, a flag hand-off, a GM write (functional, race checks on)."""
    ub = ctx.ub.alloc((64,), "float32")
    for _ in range(rounds):
        ctx.data_copy(ub, x[0:64])
        sync(ctx, E.MTE2_V)
        ctx.adds(ub, ub, 1.0, 64)
        sync(ctx, E.V_MTE3)
        ctx.data_copy(x[64 * (ctx.block_idx + 1):64 * (ctx.block_idx + 2)], ub)
        sync(ctx, E.MTE3_MTE2)


def test_launch_makes_no_cyclic_garbage_per_instruction():
    """The collector is off during a launch (die.py): that is only safe while instructions make no reference
    cycles, so the cyclic garbage a launch leaves must not grow with its instruction count. The collector's state
    is restored afterwards, after a failed launch too."""
    import gc

    def garbage(rounds):
        die = ae.Die("910c")
        x = die.gm.zeros((64 * 9,), "float32")
        gc.collect()
        die.launch(_rounds_kernel, block_dim=8, args=(x, rounds))
        return gc.collect()

    assert gc.isenabled()
    few, many = garbage(2), garbage(40)
    assert many - few < 100, f"a launch of 20× the instructions left {many - few} more cyclic objects"
    assert gc.isenabled()
    with pytest.raises(TypeError):  # the kernel slices x = None
        ae.Die("910c").launch(_rounds_kernel, block_dim=1, args=(None, 1))
    assert gc.isenabled()
