"""`Cluster`: N dies — 2 per 910C package, 16 per node of 8 NPUs — joined by the network.

`Cluster("910c", dies=N)`; `cluster.die(i)` is a `Die`. A lone `Die` is a cluster of one.
`cluster.launch(kernel, block_dim, args=…)` runs the kernel on every die at once, under
one scheduler, so that dies can wait on each other's remote writes.
"""
from __future__ import annotations

import json

from . import spec as spec_mod
from .checks import DEFAULT_CHECKS, Checks
from .die import Die, LaunchSpec, run_launches
from .errors import ParamError
from .network import Network


class ClusterReport:
    """The reports of one launch on every die, and the network's link traffic."""

    def __init__(self, kernel: str, reports: list, link_bytes: dict, clock_mhz: float):
        self.kernel, self.reports, self.link_bytes, self.clock_mhz = kernel, reports, link_bytes, clock_mhz

    @property
    def cycles(self) -> int:
        return max(r.cycles for r in self.reports)

    @property
    def time_us(self) -> float:
        return self.cycles / self.clock_mhz

    def per_die_time_us(self) -> list:
        return [r.time_us for r in self.reports]

    def summary(self) -> str:
        t = self.per_die_time_us()
        lines = [f"kernel {self.kernel} on {len(self.reports)} dies: {self.cycles} cycles = {self.time_us:.2f} µs "
                 f"(per die: min {min(t):.2f}, mean {sum(t) / len(t):.2f}, max {max(t):.2f} µs)"]
        top = sorted(self.link_bytes.items(), key=lambda kv: -kv[1])[:6]
        for name, b in top:
            lines.append(f"  {name:<28} {b:>14} B")
        return "\n".join(lines)

    def write_trace(self, path) -> None:
        """Chrome trace with one process per die."""
        ev = []
        for r in self.reports:
            ev.extend(r.trace_events(pid=r.die_index))
        with open(path, "w") as f:
            json.dump({"traceEvents": ev, "displayTimeUnit": "ns"}, f)


class Cluster:
    def __init__(self, spec="910c", dies: int = 1, *, functional: bool = True, checks: Checks = DEFAULT_CHECKS):
        if int(dies) < 1:
            raise ParamError(f"Cluster: dies = {dies}; need at least 1")
        self.spec = spec_mod.get(spec)
        self.functional = functional
        self.network = Network(self.spec, int(dies))
        self.dies = [Die(self.spec, functional=functional, checks=checks, index=i, cluster=self)
                     for i in range(int(dies))]

    @classmethod
    def _of_one(cls, die: Die) -> "Cluster":
        c = cls.__new__(cls)
        c.spec, c.functional = die.spec, die.functional
        c.network = Network(die.spec, 1)
        c.dies = [die]
        return c

    def __len__(self) -> int:
        return len(self.dies)

    def die(self, i: int) -> Die:
        if not 0 <= i < len(self.dies):
            raise ParamError(f"cluster has dies 0..{len(self.dies) - 1}, not {i}")
        return self.dies[i]

    def package_of(self, d: int) -> int:
        return self.network.package_of(d)

    def node_of(self, d: int) -> int:
        return self.network.node_of(d)

    def launch(self, kern, block_dim: int = 1, args=(), kwargs=None, cores=None, stream: int = 0,
               dies=None) -> ClusterReport:
        """Run `kern` on every die (or on `dies`) at once. `args` is a tuple for all dies, or a callable
        `args(die) -> tuple` for per-die arguments."""
        targets = self.dies if dies is None else [self.die(i) for i in dies]
        specs = [LaunchSpec(d, kern, block_dim, args(d) if callable(args) else tuple(args), kwargs or {}, cores,
                            d.stream(stream)) for d in targets]
        before = self.network.link_bytes()
        reports = run_launches(specs)
        moved = {k: v - before.get(k, 0) for k, v in self.network.link_bytes().items() if v != before.get(k, 0)}
        return ClusterReport(kern.name, reports, moved, self.spec.clock_mhz)
