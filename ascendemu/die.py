"""`Die`: one 910C die — its GM and its cores — and `launch`.

In this version blocks run one after another on the host, each on its own core and its
own virtual timeline starting at cycle 0; a launch lasts until its latest core finishes.
That is exact while cores do not talk to each other (cross-core flags arrive with the
whole-die issue). Blocks beyond the core count run in later rounds on the same cores.
"""
from __future__ import annotations

import contextlib

from . import spec as spec_mod
from .checks import DEFAULT_CHECKS, Checks
from .core import Core, CoreContext, CoreStats
from .errors import ParamError
from .gm import GlobalMemory
from .kernel import Kernel
from .pipes import CORE_PIPES, Pipe
from .report import CoreReport, Report


class Recording:
    """The reports of every launch inside `with die.recording() as rec:`."""

    def __init__(self):
        self.reports: list[Report] = []

    @property
    def cycles(self) -> int:
        return sum(r.cycles for r in self.reports)

    @property
    def time_us(self) -> float:
        return sum(r.time_us for r in self.reports)


class Die:
    """One die: `Die("910c")`, `Die("910c", functional=False)` for timing only."""

    def __init__(self, spec="910c", *, functional: bool = True, checks: Checks = DEFAULT_CHECKS, index: int = 0):
        self.spec = spec_mod.get(spec)
        self.functional = functional
        self.checks = checks
        self.index = index
        self.gm = GlobalMemory(self.spec.hbm_bytes, self.spec.gm_alloc_align_bytes, functional, where=f"die {index} · GM")
        self.last_report: Report | None = None
        self._recordings: list[Recording] = []

    @contextlib.contextmanager
    def recording(self):
        rec = Recording()
        self._recordings.append(rec)
        try:
            yield rec
        finally:
            self._recordings.remove(rec)

    def launch(self, kern: Kernel, block_dim: int = 1, args: tuple = (), kwargs: dict | None = None) -> Report:
        """Run `kern` on `block_dim` cores of its kind; returns (and keeps as `last_report`) its Report."""
        if not isinstance(kern, Kernel):
            raise ParamError(f"launch: {kern!r} is not a @kernel-decorated function")
        if not 1 <= int(block_dim) <= 65535:
            raise ParamError(f"launch: block_dim {block_dim} is outside 1..65535")
        n_cores = self.spec.aic_per_die if kern.kind == "aic" else self.spec.aiv_per_die
        used = min(int(block_dim), n_cores)
        stats = [CoreStats() for _ in range(used)]
        ends = [0] * used
        for b in range(int(block_dim)):
            ci = b % used
            core = Core(kern.kind, ci, self.spec, self.checks, self.functional, self.gm, start=ends[ci], stats=stats[ci])
            ctx = CoreContext(core, block_idx=b, block_num=int(block_dim))
            kern.fn(ctx, *args, **(kwargs or {}))
            core.end_of_kernel()
            ends[ci] = core.end_time
        cycles = max(ends)
        cores = [CoreReport(label=f"{kern.kind.upper()} {i}", kind=kern.kind, cycles=ends[i],
                            busy={Pipe(p).short: s.busy[int(p)] for p in CORE_PIPES[kern.kind] if p != Pipe.PIPE_S},
                            bytes=dict(s.bytes), cube_ops=s.cube_ops, vector_elems=s.vector_elems,
                            instructions=s.instructions, events=s.events)
                 for i, s in enumerate(stats)]
        report = Report(kernel=kern.name, spec_name=self.spec.name, clock_mhz=self.spec.clock_mhz, cycles=cycles,
                        cores=cores, functional=self.functional)
        self.last_report = report
        for rec in self._recordings:
            rec.reports.append(report)
        return report
