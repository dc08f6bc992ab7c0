"""Cross-core synchronisation: CrossCoreSetFlag / CrossCoreWaitFlag and SyncAll.

Each flag id is a counter per receiving core, starting at 0 [CrossCoreSetFlag_ISASI.md].
`cross_core_set_flag(mode, pipe, id)` runs on `pipe` after its earlier work and, after
`cross_core_flag_latency_cycles`, increments the counters of its receivers:
- mode 0: every core of the same kind in the launch (a barrier: each core's n-th wait
  completes once all of them have set n times);
- mode 1: the other AIV of the same group (mix kernels);
- mode 2: from an AIC, both AIVs of its group; from an AIV, its AIC — and an AIC's wait
  needs one set from each of its two AIVs.
`cross_core_wait_flag(id)` runs on PIPE_S and blocks issue until the counter is positive,
then decrements it. A counter may hold at most `cross_core_counter_max` (15) sets.
"""
from __future__ import annotations

from collections import deque

from .errors import ParamError, SyncError, caller_line
from .pipes import Pipe


class CrossCoreState:
    """The counters of one launch."""

    def __init__(self, spec):
        self.spec = spec
        self.counters: dict = {}  # (core label, flag id, source tag) → deque of visible-at cycles
        self.mode0: dict = {}  # (kind, flag id) → {core label → its set times}
        self.mode0_waits: dict = {}  # (core label, flag id) → waits done
        self.sync_times: list = []
        self.sync_release: dict = {}  # generation → release cycle
        self.sync_gen = 0

    def counter(self, key) -> deque:
        return self.counters.setdefault(key, deque())


class CrossCoreInstructions:
    """Cross-core instructions of `ctx` (mixed into CoreContext)."""

    def _group(self, what: str):
        env = self._core.env
        g = env.group_of.get(self._core.label) if env is not None else None
        if g is None:
            raise ParamError(f"{what}: modes 1 and 2 pair cores of one AI Core group and need a mix kernel "
                             f"(@kernel('mix'))", where=self._core.label)
        return g

    def cross_core_set_flag(self, mode: int, pipe: Pipe, flag_id: int) -> None:
        """`CrossCoreSetFlag<mode, pipe>(flagId)`."""
        core = self._core
        env = core.env
        spec = self.spec
        if env is None:
            raise ParamError("cross_core_set_flag needs a launch", where=core.label)
        if not 0 <= int(flag_id) <= spec.max_cross_core_flag_id:
            raise ParamError(f"cross_core_set_flag: flag id {flag_id} is outside 0..{spec.max_cross_core_flag_id}",
                             where=core.label)
        if pipe not in core.pipes or pipe == Pipe.PIPE_S:
            raise ParamError(f"cross_core_set_flag: pipe {pipe!r} is not one of this {self.kind.upper()}'s "
                             f"V/M/MTE1/MTE2/MTE3/FIX pipes", where=core.label)
        start = core.issue(f"cross_core_set_flag m{mode}[{flag_id}]", pipe, 0)
        t = start + spec.cross_core_flag_latency_cycles
        st = env.crosscore
        if mode == 0:
            mine = st.mode0.setdefault((self.kind, int(flag_id)), {}).setdefault(core.label, [])
            slowest = min(st.mode0_waits.get((c.label, int(flag_id)), 0) for c in env.cores if c.kind == self.kind)
            if len(mine) - slowest >= spec.cross_core_counter_max:
                raise SyncError(f"cross_core_set_flag(0, {flag_id}): {len(mine) - slowest} barrier sets of "
                                f"{core.label} are pending; the counter holds at most {spec.cross_core_counter_max}",
                                where=core.label)
            mine.append(t)
            receivers = [c for c in env.cores if c.kind == self.kind]
        elif mode in (1, 2):
            group, role = self._group(f"cross_core_set_flag mode {mode}")
            aic, aiv0, aiv1 = env.groups[group]
            if mode == 1:
                if role == "aic":
                    raise ParamError("cross_core_set_flag mode 1 is between the two AIVs of a group; an AIC "
                                     "uses mode 2", where=core.label)
                receivers = [(aiv1 if role == 0 else aiv0, None)]
            elif role == "aic":
                receivers = [(aiv0, None), (aiv1, None)]
            else:
                receivers = [(aic, role)]
            pending = [(rc, st.counter((rc.label, int(flag_id), tag))) for rc, tag in receivers]
            if any(len(q) >= spec.cross_core_counter_max for _, q in pending):
                # Full only in scheduler order? A receiver behind in virtual time may still take sets before t
                # (it yields at its next wait once it passes t): let every core before t run, then judge.
                env.sched.sleep_until(t)
            for rc, q in pending:
                if len(q) >= spec.cross_core_counter_max:
                    raise SyncError(f"cross_core_set_flag({flag_id}) would push {rc.label}'s counter past "
                                    f"{spec.cross_core_counter_max}: the producer is too far ahead", where=core.label)
            for _, q in pending:
                q.append(t)
            receivers = [rc for rc, _ in receivers]
        else:
            raise ParamError(f"cross_core_set_flag: mode {mode} is not one of 0, 1, 2 on 910B/C (4 is 950 only)",
                             where=core.label)
        for rc in receivers:
            if rc.task is not None:
                env.sched.wake(rc.task)

    def cross_core_wait_flag(self, flag_id: int) -> None:
        """`CrossCoreWaitFlag(flagId)`: on PIPE_S; blocks issue while the counter is 0, then decrements it."""
        core = self._core
        env = core.env
        if env is None:
            raise ParamError("cross_core_wait_flag needs a launch", where=core.label)
        fid = int(flag_id)
        if not 0 <= fid <= self.spec.max_cross_core_flag_id:
            raise ParamError(f"cross_core_wait_flag: flag id {fid} is outside 0..{self.spec.max_cross_core_flag_id}",
                             where=core.label)
        st = env.crosscore
        line = caller_line()
        what = f"cross_core_wait_flag({fid})"
        env.sched.yield_if_behind()  # take sets in virtual-time order (a producer may sleep at a full counter)
        while True:
            t = self._try_take(st, fid)
            if t is not None:
                break
            env.sched.block(what, line)
        core.issue(what, Pipe.PIPE_S, 0, not_before=t)

    def _try_take(self, st: CrossCoreState, fid: int):
        core = self._core
        env = core.env
        role = env.group_of.get(core.label, (None, None))[1]
        if role == "aic":
            qs = [st.counter((core.label, fid, 0)), st.counter((core.label, fid, 1))]
            if all(qs):
                return max(q.popleft() for q in qs)
        q = st.counter((core.label, fid, None))
        if q:
            return q.popleft()
        # mode 0: a core's n-th wait completes once every core of its kind has set n times (each core's own
        # n-th set: one core setting twice must not stand in for another)
        sets = st.mode0.get((self.kind, fid), {})
        done = st.mode0_waits.get((core.label, fid), 0)
        peers = [c.label for c in env.cores if c.kind == self.kind]
        if all(len(sets.get(lb, ())) > done for lb in peers):
            st.mode0_waits[(core.label, fid)] = done + 1
            return max(sets[lb][done] for lb in peers)
        return None

    def sync_all(self) -> None:
        """`SyncAll()`: every core of the launch drains its pipes and waits for all the others."""
        core = self._core
        env = core.env
        if env is None:
            raise ParamError("sync_all needs a launch", where=core.label)
        st = env.crosscore
        gen = st.sync_gen
        st.sync_times.append(core.end_time)
        if len(st.sync_times) == len(env.cores):
            st.sync_release[gen] = max(st.sync_times) + self.spec.sync_all_latency_cycles
            st.sync_gen += 1
            st.sync_times = []
            for c in env.cores:
                if c.task is not None and c is not core:
                    env.sched.wake(c.task)
        line = caller_line()
        while gen not in st.sync_release:
            env.sched.block(f"sync_all (generation {gen})", line)
        core.issue("sync_all", Pipe.PIPE_S, 0, not_before=st.sync_release[gen])
