"""`Die`: one 910C die — its GM, its HBM bandwidth, its cores and streams — and `launch`.

A launch runs its blocks on physical cores, each core a greenlet under the deterministic
scheduler (scheduler.py), all in one virtual time. A "mix" kernel runs groups of 1 AIC +
2 AIV (group g: AIC g, AIV 2g and 2g+1). Blocks beyond the cores available run in later
rounds on the same cores. `die.stream(i)` launches in order; launches on different
streams with disjoint core sets overlap in virtual time and share the die's HBM;
overlapping core sets at overlapping times are an error.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

from threadpoolctl import threadpool_limits

from . import spec as spec_mod
from .bandwidth import SharedLink
from .checks import DEFAULT_CHECKS, Checks
from .core import Core, CoreContext, CoreStats
from .crosscore import CrossCoreState
from .errors import ParamError
from .gm import GlobalMemory
from .kernel import Kernel
from .pipes import CORE_PIPES, Pipe
from .report import CoreReport, Report
from .scheduler import Scheduler


@dataclass(frozen=True)
class CoreSet:
    """Physical cores a launch may use: `CoreSet(aic=range(16), aiv=range(32))`."""

    aic: tuple = ()
    aiv: tuple = ()

    def __init__(self, aic=(), aiv=()):
        object.__setattr__(self, "aic", tuple(int(i) for i in aic))
        object.__setattr__(self, "aiv", tuple(int(i) for i in aiv))

    @classmethod
    def all(cls, spec) -> "CoreSet":
        return cls(range(spec.aic_per_die), range(spec.aiv_per_die))


class Event:
    """A point in a stream's virtual time (`stream.record_event()`)."""

    def __init__(self, time: int):
        self.time = time


class Stream:
    """An in-order queue of launches on one die."""

    def __init__(self, die: "Die", index: int):
        self.die, self.index = die, index
        self.time = 0

    def launch(self, kern: Kernel, block_dim: int = 1, args: tuple = (), kwargs: dict | None = None,
               cores: CoreSet | None = None) -> Report:
        (report,) = run_launches([LaunchSpec(self.die, kern, block_dim, args, kwargs or {}, cores, self)])
        return report

    def record_event(self) -> Event:
        return Event(self.time)

    def wait_event(self, event: Event) -> None:
        self.time = max(self.time, event.time)


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

    def __init__(self, spec="910c", *, functional: bool = True, checks: Checks = DEFAULT_CHECKS, index: int = 0,
                 cluster=None):
        self.spec = spec_mod.get(spec)
        self.functional = functional
        self.checks = checks
        self.index = index
        self.gm = GlobalMemory(self.spec.hbm_bytes, self.spec.gm_alloc_align_bytes, functional,
                               where=f"die {index} · GM", poison=checks.poison)
        self.gm.die = self
        self.hbm = SharedLink(f"die {index} HBM", self.spec.hbm_bytes_per_cycle, self.spec.bandwidth_window_cycles)
        self.last_report: Report | None = None
        self._recordings: list[Recording] = []
        self._streams: dict[int, Stream] = {}
        self._occupancy: list = []  # (kind, core index, start, end, kernel name, stream index)
        self.watch: dict = {}  # GM words written by remote flag writes (see remote.py)
        if cluster is None:
            from .cluster import Cluster
            cluster = Cluster._of_one(self)
        self.cluster = cluster

    def __repr__(self) -> str:
        return f"Die({self.spec.name!r}, index={self.index}, functional={self.functional})"

    def stream(self, i: int = 0) -> Stream:
        if i not in self._streams:
            self._streams[i] = Stream(self, i)
        return self._streams[i]

    def synchronize(self) -> int:
        """The cycle at which every stream of the die is idle."""
        return max([0] + [s.time for s in self._streams.values()])

    @contextlib.contextmanager
    def recording(self):
        rec = Recording()
        self._recordings.append(rec)
        try:
            yield rec
        finally:
            self._recordings.remove(rec)

    def launch(self, kern: Kernel, block_dim: int = 1, args: tuple = (), kwargs: dict | None = None,
               cores: CoreSet | None = None, stream: int = 0) -> Report:
        """Run `kern` on `block_dim` blocks (cores, or 1 AIC + 2 AIV groups for mix kernels) on stream `stream`;
        returns (and keeps as `last_report`) its Report."""
        return self.stream(stream).launch(kern, block_dim, args, kwargs, cores)

    def _check_free(self, ls: "LaunchSpec") -> None:
        """Refuse a launch whose cores another stream still holds when it starts."""
        start = ls.stream.time
        for kind, idx, _ in _plan(ls):
            for k, i, s, e, n, si in self._occupancy:
                if k == kind and i == idx and si != ls.stream.index and s <= start < e:
                    raise ParamError(f"launch {ls.kernel.name} on stream {ls.stream.index} needs {kind.upper()} {idx} "
                                     f"at cycle {start}, while {n} on stream {si} holds it during [{s}, {e}): "
                                     f"concurrent launches need disjoint core sets", where=f"die {self.index}")

    def _occupy(self, kind, idx, start, end, name, stream_idx):
        for k, i, s, e, n, si in self._occupancy:
            if k == kind and i == idx and s < end and start < e and si != stream_idx:
                raise ParamError(f"launch {name} on stream {stream_idx} uses {kind.upper()} {idx} during cycles "
                                 f"[{start}, {end}), while {n} on stream {si} holds it during [{s}, {e}): concurrent "
                                 f"launches need disjoint core sets", where=f"die {self.index}")
        self._occupancy.append((kind, idx, start, end, name, stream_idx))


@dataclass
class LaunchSpec:
    die: Die
    kernel: Kernel
    block_dim: int
    args: tuple
    kwargs: dict
    cores: CoreSet | None
    stream: Stream


class LaunchEnv:
    """What the cores of one launch share: their die, the scheduler, HBM, cross-core state."""

    def __init__(self, die: Die, sched: Scheduler):
        self.die, self.sched = die, sched
        self.hbm = die.hbm
        self.cluster = die.cluster
        self.cores: list[Core] = []
        self.groups: list = []  # mix: group → (aic core, aiv core sub 0, aiv core sub 1)
        self.group_of: dict = {}  # core label → (group, "aic" | 0 | 1)
        self.crosscore = CrossCoreState(die.spec)


def _plan(ls: LaunchSpec):
    """[(kind, physical index, [(block_idx, sub_block_idx, group), …])] for a launch."""
    spec, kern = ls.die.spec, ls.kernel
    n = int(ls.block_dim)
    if not 1 <= n <= 65535:
        raise ParamError(f"launch: block_dim {n} is outside 1..65535")
    cs = ls.cores or CoreSet.all(spec)
    for kind, avail, total in (("aic", cs.aic, spec.aic_per_die), ("aiv", cs.aiv, spec.aiv_per_die)):
        bad = [i for i in avail if not 0 <= i < total]
        if bad or len(set(avail)) != len(avail):
            raise ParamError(f"launch: CoreSet {kind} {list(avail)} must be distinct indices in 0..{total - 1}")
    if kern.kind == "mix":
        if n > len(cs.aic):
            raise ParamError(f"launch: a mix kernel runs block_dim ≤ {len(cs.aic)} groups (1 AIC + 2 AIV) here, "
                             f"got {n}")
        plan = []
        for g in range(n):
            a = cs.aic[g]
            if 2 * a not in cs.aiv or 2 * a + 1 not in cs.aiv:
                raise ParamError(f"launch: mix group on AIC {a} needs AIV {2 * a} and {2 * a + 1} in the CoreSet")
            plan.append(("aic", a, [(g, 0, g)]))
            plan.append(("aiv", 2 * a, [(2 * g, 0, g)]))
            plan.append(("aiv", 2 * a + 1, [(2 * g + 1, 1, g)]))
        return plan
    avail = cs.aic if kern.kind == "aic" else cs.aiv
    if not avail:
        raise ParamError(f"launch: the CoreSet has no {kern.kind.upper()} for this {kern.kind} kernel")
    used = min(n, len(avail))
    return [(kern.kind, avail[i], [(b, 0, None) for b in range(i, n, used)]) for i in range(used)]


def run_launches(specs: list[LaunchSpec]) -> list[Report]:
    """Run several launches (on one die or many) together under one scheduler.

    BLAS is held to one thread meanwhile: the cube hands many small tile products to it,
    and a thread pool's wake-up costs more than such a product."""
    for ls in specs:  # concurrent launches on overlapping cores are refused before anything runs
        if not isinstance(ls.kernel, Kernel):
            raise ParamError(f"launch: {ls.kernel!r} is not a @kernel-decorated function")
        ls.die._check_free(ls)
        ls.die.watch.clear()  # flag words start each launch from what GM holds
    # The cyclic garbage collector is off for the launch's length. Its full passes walked every object alive (the
    # caller's plans, thousands of cores with their queues and views) again and again while the cores ran (16 % of
    # the host time of EP320 FusedDispatch and FusedCombine). A launch makes no cyclic garbage per instruction
    # (tests/test_die.py checks), only its cores' own structures, which live until it ends anyway; they are
    # collected after it. Cycles and results do not depend on it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            return _run_launches(specs)
    finally:
        if collecting:
            gc.enable()


def _run_launches(specs: list[LaunchSpec]) -> list[Report]:
    sched = Scheduler()
    runs = []
    for ls in specs:
        die = ls.die
        env = LaunchEnv(die, sched)
        start = ls.stream.time
        plan = _plan(ls)
        cores = []
        for kind, idx, blocks in plan:
            stats = CoreStats()
            core = Core(kind, idx, die.spec, die.checks, die.functional, die.gm, start=start, stats=stats, env=env,
                        label=(f"die {die.index} · " if len(die.cluster.dies) > 1 else "") + f"{kind.upper()} {idx}")
            env.cores.append(core)
            cores.append((core, blocks))
        if ls.kernel.kind == "mix":
            for g in range(len(cores) // 3):
                trio = tuple(c for c, _ in cores[3 * g:3 * g + 3])
                env.groups.append(trio)
                env.group_of[trio[0].label] = (g, "aic")
                env.group_of[trio[1].label] = (g, 0)
                env.group_of[trio[2].label] = (g, 1)
        for core, blocks in cores:
            core.task = sched.spawn(core.label, _body(core, blocks, ls), core.clock)
        runs.append((ls, env, start, cores))
    try:
        sched.run()
    except BaseException:
        for ls, env, start, cores in runs:  # a failed launch still used the time it ran
            ls.stream.time = max([start] + [c.end_time for c, _ in cores])
        raise
    reports = []
    for ls, env, start, cores in runs:
        die = ls.die
        end = max([start] + [c.end_time for c, _ in cores])
        for core, _ in cores:
            die._occupy(core.kind, core.index, start, core.end_time, ls.kernel.name, ls.stream.index)
        ls.stream.time = end
        creports = [CoreReport(label=core.label, kind=core.kind, cycles=core.end_time - start,
                               busy={Pipe(p).short: core.stats.busy[int(p)] for p in CORE_PIPES[core.kind]
                                     if p != Pipe.PIPE_S},
                               bytes=dict(core.stats.bytes), cube_ops=core.stats.cube_ops,
                               vector_elems=core.stats.vector_elems, instructions=core.stats.instructions,
                               events=core.stats.events)
                    for core, _ in cores]
        report = Report(kernel=ls.kernel.name, spec_name=die.spec.name, clock_mhz=die.spec.clock_mhz,
                        cycles=end - start, cores=creports, functional=die.functional, start=start,
                        hbm_peak_bytes_per_s=die.spec.peak_hbm_bytes_per_s, die_index=die.index)
        die.last_report = report
        for rec in die._recordings:
            rec.reports.append(report)
        reports.append(report)
    return reports


def _body(core: Core, blocks, ls: LaunchSpec):
    def run():
        for i, (block_idx, sub, _group) in enumerate(blocks):
            if i:  # a later round: fresh buffers and flags, the same timeline and stats
                core.reset_for_next_block()
            ctx = CoreContext(core, block_idx=block_idx, block_num=int(ls.block_dim), sub_block_idx=sub)
            ls.kernel.fn(ctx, *ls.args, **ls.kwargs)
            core.end_of_kernel()
    return run
