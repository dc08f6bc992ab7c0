"""A shared bandwidth resource in virtual time: the die's HBM, a die's UB port, an RDMA port.

Sharing rule (first come, first served per window): time is cut into windows of
`window_cycles`; each window can carry `bytes_per_cycle × window_cycles` bytes in total.
A transfer that starts at cycle s with a per-transfer cap r moves, in each window from s
on, as many bytes as both its cap (r × the cycles of the window it covers) and what is
left of the window allow, until all its bytes are placed. Transfers are placed in the
order the scheduler processes them, which is the order of their issue in virtual time
(the scheduler always runs the core with the earliest clock). So
- a transfer alone finishes at exactly s + ⌈bytes / r⌉;
- a transfer that starts part-way into a window may use only that part of the window's remaining room
  (the bytes already placed are taken as spread evenly over the window), so transfers that overlap in
  time never move more than bytes_per_cycle together;
- when the link is saturated, earlier transfers keep their share and later ones wait.

Full windows are skipped with a union-find "next window with room" map, so a transfer
behind a long backlog costs O(1) amortised, not O(backlog).
"""
from __future__ import annotations

import math


class SharedLink:
    def __init__(self, name: str, bytes_per_cycle: float, window_cycles: int = 64):
        self.name = name
        self.rate = float(bytes_per_cycle)
        self.window = int(window_cycles)
        self.cap = self.rate * self.window
        self.used: dict[int, float] = {}  # window index → bytes placed
        self.skip: dict[int, int] = {}  # full window → a later window that may have room
        self.total_bytes = 0
        self.busy_until = 0

    def _open(self, wi: int) -> int:
        """The first window at or after `wi` that is not full."""
        skip = self.skip
        root = wi
        while root in skip:
            root = skip[root]
        while wi in skip and skip[wi] != root:  # path compression
            skip[wi], wi = root, skip[wi]
        return root

    def transfer(self, start: int, nbytes: int, cap: float) -> int:
        """Place `nbytes` starting at cycle `start` at ≤ `cap` bytes/cycle; return the finish cycle.

        (Hot: every GM and network transfer of every core comes through here, so locals, not attributes; the
        arithmetic is exactly the sharing rule of the module docstring, in the same floating-point order.)"""
        self.total_bytes += nbytes
        if nbytes <= 0:
            return start
        rate = self.rate
        cap = float(cap)
        if rate < cap:
            cap = rate
        w = self.window
        wcap = self.cap
        used, skip = self.used, self.skip
        full = wcap - 1e-6
        t = float(start)
        left = float(nbytes)
        while True:
            wi = int(t // w)
            if wi in skip:  # a full window: jump to the first one with room
                open_wi = self._open(wi)
                wi, t = open_wi, float(open_wi * w)
            w_end = (wi + 1) * w
            span = w_end - t
            # what is left of the window, assumed spread evenly over it: only the part after t is usable
            u = used.get(wi, 0.0)
            room = (wcap - u) * span / w
            cs = cap * span
            can = room if room < cs else cs
            if can >= left:
                # finishes in this window: at the slower of the cap and the window's remaining share
                finish = t + left / (cap if room >= cs else room / span)
                u += left
                used[wi] = u
                if u >= full:
                    skip[wi] = wi + 1
                end = math.ceil(finish - 1e-9)
                if end > self.busy_until:
                    self.busy_until = end
                return end
            if can > 0:
                u += can
                used[wi] = u
                left -= can
                if u >= full:
                    skip[wi] = wi + 1
            t = float(w_end)
