"""The deterministic scheduler: every core of a launch (or of a cluster step) is a greenlet.

Kernel code stays plain, straight-line Python. A core that must wait for another core
(a cross-core flag, `sync_all`, a GM word written by a remote die) is *suspended* by
switching to the scheduler's greenlet and resumed when what it waits for happens.

Why greenlets rather than threads: switching is explicit, so the schedule is exactly
the one this module chooses — no OS thread interleaving, no locks, and a switch costs
about a microsecond, which matters with 15,360 cores (320 dies × 48 AIV).

The rule: always resume the runnable core with the smallest virtual clock (the cycle at
which its scalar unit will issue next), ties broken by a fixed core order. A core also
yields before each GM transfer if some other core is behind it in virtual time, so
that transfers reach the shared bandwidth resources in virtual-time order. When no core
is runnable but some have not finished, every unfinished core is waiting: that is a
deadlock, and `DeadlockError` lists who waits on what, and where.
"""
from __future__ import annotations

import heapq

import greenlet

from .errors import DeadlockError


class Task:
    """One core's kernel body as a greenlet."""

    __slots__ = ("name", "order", "clock_fn", "glet", "done", "waiting", "wait_line", "sched", "error")

    def __init__(self, sched, name, order, body, clock_fn):
        self.sched, self.name, self.order, self.clock_fn = sched, name, order, clock_fn
        self.done = False
        self.waiting = None  # a description of what it waits on, while suspended
        self.wait_line = None
        self.error = None
        self.glet = greenlet.greenlet(self._run(body), parent=sched.main)

    def _run(self, body):
        def run():
            try:
                body()
            finally:
                self.done = True
        return run


# The ready heap holds plain ints, key(clock, order, seq) = (clock·ORDERS + order)·SEQS + seq, which sort exactly as
# the tuples (clock, order, seq) would (0 ≤ order < ORDERS, 0 ≤ seq < SEQS) but compare in C without building or
# walking a tuple (up to 15,360 cores share one heap in an EP320 launch).
ORDERS = 1 << 24
SEQS = 1 << 40


def _cycle(c) -> int:
    """A clock as an exact int (a float clock would make the heap key inexact)."""
    if type(c) is int:
        return c
    i = int(c)
    if i != c:
        raise TypeError(f"scheduler clock {c!r} is not a whole cycle")
    return i


class Scheduler:
    def __init__(self):
        self.main = greenlet.getcurrent()
        self.tasks: list[Task] = []
        self.ready: list[int] = []  # heap of key(clock, order, seq); the task is self.tasks[order]
        self.current: Task | None = None
        self._seq = 0
        self._start: Task | None = None  # a task `_pass_on` chose that has not started: `run` starts it

    def spawn(self, name: str, body, clock_fn) -> Task:
        if len(self.tasks) >= ORDERS:
            raise ValueError(f"the scheduler takes at most {ORDERS} cores")
        t = Task(self, name, len(self.tasks), body, clock_fn)
        self.tasks.append(t)
        self._push(t)
        return t

    def _push(self, t: Task, clock=None) -> None:
        self._seq += 1
        c = _cycle(t.clock_fn() if clock is None else clock)
        heapq.heappush(self.ready, (c * ORDERS + t.order) * SEQS + self._seq)

    def _next_ready(self) -> Task | None:
        """Pop the runnable task with the earliest key (skipping entries of tasks done or waiting), or None."""
        ready, tasks = self.ready, self.tasks
        while ready:
            t = tasks[heapq.heappop(ready) // SEQS % ORDERS]
            if not t.done and t.waiting is None:
                return t
        return None

    # --- called from inside a task ---------------------------------------------------------
    def _pass_on(self) -> None:
        """Switch from the current task straight to the next runnable one (the one `run` would pick), or back to
        `run` when there is none. One greenlet switch instead of two through `run`; the order is the same."""
        t = self._next_ready()
        if t is self.current:
            return
        if t is not None and t.glet:
            self.current = t
            t.glet.switch()
            return
        self._start = t  # not started yet: `run` starts it (a greenlet started here would stack its frames on ours)
        self.current = None
        self.main.switch()

    def yield_if_behind(self) -> None:
        """Let a core with an earlier clock run first (keeps shared resources in time order)."""
        t = self.current
        if t is None or not self.ready:
            return
        c = _cycle(t.clock_fn())
        if self.ready[0] < c * ORDERS * SEQS:  # the earliest ready core's clock is before c
            self._push(t, c)
            self._pass_on()

    def sleep_until(self, cycle: int) -> None:
        """Let every core whose clock is before `cycle` run first (it might still produce an earlier event)."""
        self._push(self.current, cycle)
        self._pass_on()

    def block(self, what: str, line) -> None:
        """Suspend the current task until `wake(task)`."""
        t = self.current
        t.waiting, t.wait_line = what, line
        self._pass_on()

    def wake(self, t: Task) -> None:
        if t.waiting is not None:
            t.waiting = None
            self._push(t)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            t, self._start = self._start, None  # the next task, popped by a task that passed on to it
            if t is None:
                t = self._next_ready()
                if t is None:
                    break
            self.current = t
            t.glet.switch()
            self.current = None
        stuck = [t for t in self.tasks if not t.done]
        if stuck:
            lines = "\n".join(f"    {t.name}: waits on {t.waiting}" + (f" at {t.wait_line.short}: "
                              f"{t.wait_line.text.strip()}" if t.wait_line else "") for t in stuck)
            for t in stuck:  # end the suspended greenlets quietly
                t.glet = None
            raise DeadlockError(f"every unfinished core is waiting ({len(stuck)} cores):\n{lines}", line=None)
