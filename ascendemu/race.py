"""The race checker: vector clocks over the pipes of one core.

Each pipe P keeps a vector clock VC[P] (one counter per pipe). An instruction on P ticks
VC[P][P] and stamps its accesses with that value. `set_flag` captures VC[SRC]; `wait_flag`
merges it into VC[DST]; `pipe_barrier(PIPE_ALL)` merges all clocks. An earlier access A
(pipe P, stamp c) is ordered before the current instruction on pipe Q when P == Q (a pipe
runs in order) or VC[Q][P] ≥ c. Two accesses to overlapping bytes of one buffer, at least
one a write, on different pipes and not ordered, are a race.

The scalar pipe S issues everything, which gives it two special rules:
- a wait_flag whose destination is S blocks the scalar, so nothing later is even issued
  before the flag's source work is done: its clock merges into every pipe;
- a scalar read (GetValue) completes before the scalar issues anything else, so a later
  write by any pipe is ordered after it (assumption: loads are blocking).
A scalar *write* (SetValue) is not seen by other pipes until an S_V / S_MTE2 / S_MTE3
flag orders it, as in Ascend C; and a scalar read of data another pipe wrote needs that
pipe's V_S / MTE2_S / MTE3_S flag.

Regions are byte ranges [start, end); a strided access is checked by its bounding range
(conservative). History is pruned: an access fully covered by a later write that is
ordered after it can never be the only witness of a race, nor can a read covered by a
later read of the same pipe.
"""
from __future__ import annotations

from .errors import RaceError
from .pipes import N_PIPES, Pipe


PAGE_BYTES = 2048  # histories are kept per page of a buffer, so a check scans only nearby accesses


class Access:
    __slots__ = ("pipe", "stamp", "start", "end", "write", "name", "line")

    def __init__(self, pipe, stamp, start, end, write, name, line):
        self.pipe, self.stamp, self.start, self.end = pipe, stamp, start, end
        self.write, self.name, self.line = write, name, line

    def describe(self, kind: str) -> str:
        rw = "writes" if self.write else "reads"
        where = f" at {self.line.short}" if self.line else ""
        text = f"{self.name} on {Pipe(self.pipe).name} {rw} {kind}[{self.start:#x}, {self.end:#x}){where}"
        src = self.line.text.strip() if self.line else ""
        return text + (f"\n        {src}" if src else "")


class RaceChecker:
    def __init__(self, where: str):
        self.where = where
        self.vc = [[0] * N_PIPES for _ in range(N_PIPES)]
        self.history: dict[int, dict[int, list[Access]]] = {}  # id(buffer) → page → accesses touching it

    # --- clocks --------------------------------------------------------------------------
    def tick(self, pipe: int) -> int:
        v = self.vc[pipe]
        v[pipe] += 1
        return v[pipe]

    def snapshot(self, pipe: int) -> list[int]:
        return list(self.vc[pipe])

    def merge(self, pipe: int, clock: list[int]) -> None:
        """A wait_flag on `pipe` for a flag that captured `clock`. A wait on the scalar blocks issue,
        so every pipe learns the clock."""
        for q in (range(N_PIPES) if pipe == Pipe.PIPE_S else (pipe,)):
            row = self.vc[q]
            for i in range(N_PIPES):
                if clock[i] > row[i]:
                    row[i] = clock[i]

    def barrier_all(self) -> None:
        top = [max(self.vc[p][i] for p in range(N_PIPES)) for i in range(N_PIPES)]
        for p in range(N_PIPES):
            self.vc[p] = list(top)

    # --- accesses ------------------------------------------------------------------------
    def access(self, buffer, start: int, end: int, write: bool, pipe: int, stamp: int, name: str, line) -> None:
        """Check one access against the history of the pages it touches, then record it there."""
        if end <= start:
            return
        pages = self.history.setdefault(id(buffer), {})
        row = self.vc[pipe]
        new = Access(pipe, stamp, start, end, write, name, line)
        for pg in range(start // PAGE_BYTES, (end - 1) // PAGE_BYTES + 1):
            keep = []
            for a in pages.get(pg, ()):
                if a.start < end and start < a.end and a.pipe != pipe and (a.write or write) \
                        and row[a.pipe] < a.stamp \
                        and (a.write or a.pipe != Pipe.PIPE_S):  # a scalar read is done before later issue
                    lo, hi = max(a.start, start), min(a.end, end)
                    raise RaceError(
                        f"race on {buffer.kind}[{lo:#x}, {hi:#x}): no flag, barrier or queue operation orders\n"
                        f"    earlier: {a.describe(buffer.kind)}\n    later:   {new.describe(buffer.kind)}",
                        where=f"{self.where} · {buffer.kind}", line=line)
                covered = start <= a.start and a.end <= end
                ordered = a.pipe == pipe or row[a.pipe] >= a.stamp or (a.pipe == Pipe.PIPE_S and not a.write)
                if covered and ordered and (write or (not a.write and a.pipe == pipe)):
                    continue
                keep.append(a)
            keep.append(new)
            pages[pg] = keep
