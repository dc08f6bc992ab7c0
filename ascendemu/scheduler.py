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


class Scheduler:
    def __init__(self):
        self.main = greenlet.getcurrent()
        self.tasks: list[Task] = []
        self.ready: list = []  # heap of (clock, order, seq, task)
        self.current: Task | None = None
        self._seq = 0

    def spawn(self, name: str, body, clock_fn) -> Task:
        t = Task(self, name, len(self.tasks), body, clock_fn)
        self.tasks.append(t)
        self._push(t)
        return t

    def _push(self, t: Task) -> None:
        self._seq += 1
        heapq.heappush(self.ready, (t.clock_fn(), t.order, self._seq, t))

    # --- called from inside a task ---------------------------------------------------------
    def yield_if_behind(self) -> None:
        """Let a core with an earlier clock run first (keeps shared resources in time order)."""
        t = self.current
        if t is None or not self.ready:
            return
        if self.ready[0][0] < t.clock_fn():
            self._push(t)
            self.main.switch()

    def sleep_until(self, cycle: int) -> None:
        """Let every core whose clock is before `cycle` run first (it might still produce an earlier event)."""
        t = self.current
        self._seq += 1
        heapq.heappush(self.ready, (cycle, t.order, self._seq, t))
        self.main.switch()

    def block(self, what: str, line) -> None:
        """Suspend the current task until `wake(task)`."""
        t = self.current
        t.waiting, t.wait_line = what, line
        self.main.switch()

    def wake(self, t: Task) -> None:
        if t.waiting is not None:
            t.waiting = None
            self._push(t)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        while self.ready:
            _, _, _, t = heapq.heappop(self.ready)
            if t.done or t.waiting is not None:
                continue
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
