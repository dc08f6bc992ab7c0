"""A shared bandwidth resource in virtual time: the die's HBM, a die's UB port, an RDMA port.

Sharing rule (first come, first served per window): time is cut into windows of
`window_cycles`; each window can carry `bytes_per_cycle × window_cycles` bytes in total.
A transfer that starts at cycle s with a per-transfer cap r moves, in each window from s
on, as many bytes as both its cap (r × the cycles of the window it covers) and what is
left of the window allow, until all its bytes are placed. Transfers are placed in the
order the scheduler processes them, which is the order of their issue in virtual time
(the scheduler always runs the core with the earliest clock). So
- a transfer alone finishes at exactly s + ⌈bytes / r⌉;
- N transfers that overlap in time can never move more than bytes_per_cycle together;
- when the link is saturated, earlier transfers keep their share and later ones wait.
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
        self.total_bytes = 0
        self.busy_until = 0
        self.full_below = 0  # every window before this index is full (windows fill in time order)

    def transfer(self, start: int, nbytes: int, cap: float) -> int:
        """Place `nbytes` starting at cycle `start` at ≤ `cap` bytes/cycle; return the finish cycle."""
        self.total_bytes += nbytes
        if nbytes <= 0:
            return start
        cap = min(float(cap), self.rate)
        w = self.window
        used = self.used
        t = float(max(start, self.full_below * w))
        left = float(nbytes)
        while True:
            wi = int(t // w)
            w_end = (wi + 1) * w
            room = self.cap - used.get(wi, 0.0)
            span = w_end - t
            can = min(cap * span, room)
            if can >= left:
                # finishes in this window: at the slower of the cap and the window's remaining share
                rate_here = cap if room >= cap * span else room / span
                finish = t + left / rate_here
                used[wi] = used.get(wi, 0.0) + left
                end = math.ceil(finish - 1e-9)
                self.busy_until = max(self.busy_until, end)
                return end
            if can > 0:
                used[wi] = used.get(wi, 0.0) + can
                left -= can
            if wi == self.full_below and used.get(wi, 0.0) >= self.cap - 1e-6:
                self.full_below += 1
            t = float(w_end)
