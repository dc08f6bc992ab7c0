"""`Report`: what a launch cost, per core and per pipe, and its Chrome trace."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .pipes import CORE_PIPES, N_PIPES, Pipe


@dataclass
class CoreReport:
    label: str
    kind: str
    cycles: int
    busy: dict  # pipe name → busy cycles
    bytes: dict  # path → bytes
    cube_ops: int
    vector_elems: int
    instructions: int
    events: list = field(repr=False, default_factory=list)

    def utilisation(self, pipe: str) -> float:
        return self.busy.get(pipe, 0) / self.cycles if self.cycles else 0.0


@dataclass
class Report:
    """One launch: total cycles (the latest completion of any core), per-core detail, totals."""

    kernel: str
    spec_name: str
    clock_mhz: float
    cycles: int
    cores: list
    functional: bool
    start: int = 0  # the cycle (on its stream) at which the launch began
    hbm_peak_bytes_per_s: float = 0.0
    die_index: int = 0

    @property
    def time_us(self) -> float:
        return self.cycles / self.clock_mhz

    @property
    def bytes(self) -> dict:
        out = {}
        for c in self.cores:
            for k, v in c.bytes.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def flops(self) -> int:
        """Useful cube operations, 2·m·n·k per Mmad (int8 ops count the same way)."""
        return sum(c.cube_ops for c in self.cores)

    @property
    def hbm_bytes(self) -> int:
        return sum(v for k, v in self.bytes.items() if "GM" in k.split("->"))

    @property
    def hbm_gbps(self) -> float:
        """Achieved HBM bandwidth: GM bytes moved over the launch's time."""
        return self.hbm_bytes / (self.time_us * 1e-6) / 1e9 if self.cycles else 0.0

    @property
    def hbm_pct_of_peak(self) -> float:
        return 100 * self.hbm_gbps * 1e9 / self.hbm_peak_bytes_per_s if self.hbm_peak_bytes_per_s else 0.0

    def utilisation(self, pipe: str, core: int = 0) -> float:
        """Busy fraction of `pipe` ("M", "V", "MTE2", …) on core `core` over the whole launch."""
        c = self.cores[core]
        return c.busy.get(pipe, 0) / self.cycles if self.cycles else 0.0

    def summary(self) -> str:
        lines = [f"kernel {self.kernel} on {self.spec_name} ({'functional' if self.functional else 'timing-only'}): "
                 f"{self.cycles} cycles = {self.time_us:.2f} µs at {self.clock_mhz:.0f} MHz"]
        for c in self.cores:
            pipes = "  ".join(f"{p} {c.busy[p]:>8} ({100 * c.busy[p] / self.cycles if self.cycles else 0:5.1f}%)"
                              for p in c.busy)
            lines.append(f"  {c.label:<7} {c.instructions:>6} instr  {pipes}")
        for k, v in sorted(self.bytes.items()):
            lines.append(f"  bytes {k:<9} {v:>12}")
        if self.hbm_bytes and self.cycles:
            lines.append(f"  HBM {self.hbm_gbps:.1f} GB/s = {self.hbm_pct_of_peak:.1f}% of the die's peak")
        if self.flops:
            lines.append(f"  cube ops {self.flops}  ({self.flops / (self.time_us * 1e6) if self.cycles else 0:.2f} "
                         f"TFLOPS, or TOPS for int8)")
        return "\n".join(lines)

    def trace_events(self, pid: int | None = None, pid_name: str | None = None) -> list:
        """Chrome trace events: one process per die, one thread (track) per pipe per core."""
        pid = self.die_index if pid is None else pid
        ev = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": pid_name or f"die {pid}"}}]
        us = 1.0 / self.clock_mhz
        for ci, c in enumerate(self.cores):
            for p in CORE_PIPES[c.kind]:
                tid = ci * N_PIPES + int(p)
                ev.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                           "args": {"name": f"{c.label} {Pipe(p).short}"}})
            for p, start, dur, name in c.events:
                ev.append({"name": name, "ph": "X", "pid": pid, "tid": ci * N_PIPES + p,
                           "ts": (start - self.start) * us, "dur": dur * us})
        return ev

    def write_trace(self, path) -> None:
        """Write the Chrome trace-event JSON (opens in Perfetto / chrome://tracing)."""
        with open(path, "w") as f:
            json.dump({"traceEvents": self.trace_events(), "displayTimeUnit": "ns"}, f)
