"""Messaging between dies, as instructions a kernel issues.

- `aiv_direct_write(dst, src)`: an AIV stores from its UB (or from its die's GM) straight
  into another die's GM over UB, on MTE3, with memory semantics and no launch overhead.
  MTE3 is busy until the last byte has left; the bytes arrive one network latency later.
- `sdma_copy(dst, src, flag=…)`: the die's SDMA engines copy GM → remote GM after a launch
  overhead; the issuing core only pays the issue slot. Suited to bulk transfers.
- `remote_write_flag(word, value)`: a flag word written into any die's GM (MTE3). Under
  `set_atomic_add` (which makes every move into GM a read-add-write) it adds `value`
  instead, so many senders can count into one word.
- `fence()`: later remote writes of this core arrive no earlier than its earlier ones.
- `wait_until(word, predicate)`: PIPE_S blocks until a local GM word, as written by
  remote flag writes, satisfies `predicate(value)`; it completes at the arrival of the
  write that made it true.

Data moves exactly as sent, at issue (program order); only its arrival is in the future,
which is why a receiver must wait for the flag before reading. Flag words are tracked
with their arrival times (`die.watch`); in timing-only mode they start at 0.
"""
from __future__ import annotations

import bisect
import math

import numpy as np

from .buffers import LocalTensor
from .errors import BoundsError, DTypeError, ParamError, caller_line
from .gm import GlobalTensor
from .numerics import dtype_name
from .pipes import Pipe


_SEND_PATHS: dict = {}  # (from GM?, destination die) → the byte-count path name of a remote write


def _word_key(word: GlobalTensor):
    return (id(word.allocation), word.offset)


def _word_value(word: GlobalTensor):
    if word.is_phantom:
        return 0
    return word.flat_view(0, 1)[0].item()


def _history(die, word: GlobalTensor) -> "_WordHistory":
    """The write history of `word` (in `die`'s GM) in this launch, made on first use."""
    key = _word_key(word)
    hist = die.watch.get(key)
    if hist is None:
        hist = die.watch[key] = _WordHistory(_word_value(word))
    return hist


class _WordHistory:
    """The remote writes one GM flag word receives during a launch, in arrival order, with the word's value after
    each. The values are brought up to date lazily, by the waiter, from the earliest write that arrived out of
    order; and a waiter re-tests only values that changed since it last looked. (An arrival counter that hundreds
    of dies add into is re-read on every arrival: re-folding the whole history each time was quadratic.)"""

    __slots__ = ("initial", "keys", "writes", "values", "valid", "waiters", "scan_from")

    def __init__(self, initial):
        self.initial = initial
        self.keys = []  # (arrival, seq), ascending: the arrival order (ties: the order of issue)
        self.writes = []  # (value, add) of each
        self.values = []  # the word's value once each has arrived; right for the first `valid` only
        self.valid = 0
        self.waiters = []  # tasks blocked until the next write
        self.scan_from = {}  # waiting task → first index whose value it has not yet tested (see wait_until)

    def add(self, arrival: int, value: int, add: bool) -> None:
        key = (arrival, len(self.keys))
        j = bisect.bisect(self.keys, key)
        self.keys.insert(j, key)
        self.writes.insert(j, (value, add))
        self.values.insert(j, None)
        if j < self.valid:
            self.valid = j
        for task, i in self.scan_from.items():
            if j < i:
                self.scan_from[task] = j

    def settle(self) -> None:
        """Bring every value up to date."""
        i, n = self.valid, len(self.values)
        if i < n:
            v = self.values[i - 1] if i else self.initial
            for i in range(i, n):
                w, a = self.writes[i]
                v = v + w if a else w
                self.values[i] = v
            self.valid = n

    def arrived_by(self, t: int) -> int:
        """How many writes have arrived by cycle t."""
        return bisect.bisect(self.keys, (t, math.inf))

    def value_at(self, k: int):
        """The word's value once the first k writes (in arrival order) have arrived (after `settle`)."""
        return self.values[k - 1] if k else self.initial


class RemoteInstructions:
    """Inter-die instructions of `ctx` (mixed into CoreContext)."""

    def _remote_env(self, what: str):
        core = self._core
        if core.env is None:
            raise ParamError(f"{what} needs a launch", where=core.label)
        return core.env

    def _target_die(self, t: GlobalTensor, what: str):
        env = self._remote_env(what)
        if not isinstance(t, GlobalTensor):
            raise ParamError(f"{what}: the destination must be a GlobalTensor, got {type(t).__name__}",
                             where=self._core.label)
        die = getattr(t.gm, "die", None)
        if die is None or die.cluster is not env.cluster:
            raise ParamError(f"{what}: the destination is not in a die of this cluster", where=self._core.label)
        return die

    def _send(self, name: str, dst_die, nbytes: int, *, from_gm: bool, cap: float, head: int, pipe: Pipe,
              plane: str = "ub"):
        """Issue a remote write on `pipe`; returns its arrival cycle."""
        core = self._core
        env = core.env
        src_die = env.die.index
        net = env.cluster.network
        arrival = [0]

        def xfer(start):
            t0 = start + head
            end = env.hbm.transfer(t0, nbytes, cap) if from_gm else t0
            sent, arr = net.send(src_die, dst_die.index, t0, nbytes, cap, plane)
            end, arr = max(end, sent), max(end, arr)
            # the bytes land in the receiver's HBM as they arrive: from the first byte's arrival on
            landed = dst_die.hbm.transfer(t0 + (arr - end), nbytes, cap)
            arrival[0] = max(arr, landed, core.remote_floor)
            return max(end, landed) if dst_die is env.die else end  # a store into its own die's HBM
        core.issue(name, pipe, 0, xfer=xfer, reads=self._remote_reads)
        core.remote_last = max(core.remote_last, arrival[0])
        path = _SEND_PATHS.get((from_gm, dst_die.index))
        if path is None:
            path = _SEND_PATHS[(from_gm, dst_die.index)] = f"{'GM' if from_gm else 'UB'}->die{dst_die.index}"
        core.count_bytes(path, nbytes)
        return arrival[0]

    _remote_reads = ()

    def aiv_direct_write(self, dst: GlobalTensor, src, count: int | None = None) -> int:
        """AIV-Direct: store `count` elements (default: all of src) from UB or local GM into `dst`, a
        GlobalTensor in any die's GM. Returns the cycle the data arrives."""
        core = self._core
        if self.kind != "aiv":
            raise ParamError("aiv_direct_write runs on an AIV's MTE3", where=core.label)
        die = self._target_die(dst, "aiv_direct_write")
        if isinstance(src, GlobalTensor):
            if src.gm is not core.gm:
                raise ParamError("aiv_direct_write: a GM source must be in this die's GM", where=core.label)
            reads = ()
        else:
            src = core.local(src, ("UB",), "aiv_direct_write source")
        if src.dtype != dst.dtype:
            raise DTypeError(f"aiv_direct_write does not convert: {dtype_name(src.dtype)} → {dtype_name(dst.dtype)}",
                             where=core.label)
        add = core.check_atomic(dst.dtype, "aiv_direct_write")  # an MTE3 store into GM: SetAtomicAdd applies
        n = src.size if count is None else int(count)
        if not 0 <= n <= min(src.size, dst.size):
            raise ParamError(f"aiv_direct_write of {n} elements: source has {src.size}, destination {dst.size}",
                             where=core.label)
        nbytes = n * src.dtype.itemsize
        reads = [core.span(src, 0, n, "aiv_direct_write source")] if isinstance(src, LocalTensor) else []
        self._remote_reads = reads
        try:
            t = self._send("aiv_direct_write", die, nbytes, from_gm=isinstance(src, GlobalTensor),
                           cap=self.spec.aiv_gm_write_bytes_per_cycle, head=self.spec.aiv_direct_head_cycles,
                           pipe=Pipe.PIPE_MTE3)
        finally:
            self._remote_reads = ()
        if self.functional and n:
            core.store_gm(dst.flat_view(0, n), src.flat_view(0, n), add)
        return t

    def sdma_copy(self, dst: GlobalTensor, src: GlobalTensor, flag=None, *, plane: str = "ub") -> int:
        """SDMA: copy all of `src` (this die's GM) into `dst` (any die's GM) after the SDMA launch overhead;
        `flag=(word, value)` writes `value` into `word` once the data has arrived. `plane="rdma"` sends it over
        the separate, slower RDMA network (as prefill→decode KV transfers do). Returns the arrival cycle."""
        core = self._core
        env = self._remote_env("sdma_copy")
        die = self._target_die(dst, "sdma_copy")
        if not isinstance(src, GlobalTensor) or src.gm is not core.gm:
            raise ParamError("sdma_copy: the source must be a GlobalTensor in this die's GM", where=core.label)
        if src.dtype != dst.dtype:
            raise DTypeError(f"sdma_copy does not convert: {dtype_name(src.dtype)} → {dtype_name(dst.dtype)}",
                             where=core.label)
        if src.size > dst.size:
            raise BoundsError(f"sdma_copy: {src.size} elements do not fit the {dst.size}-element destination",
                              where=core.label)
        if plane not in ("ub", "rdma"):
            raise ParamError(f"sdma_copy: plane {plane!r}; use 'ub' or 'rdma'", where=core.label)
        if flag is not None:
            self._check_flag_word(flag[0], "sdma_copy flag")
        nbytes = src.nbytes
        net = env.cluster.network
        spec = self.spec
        arrival = [0]
        # The core only issues the descriptor (PIPE_S); the engine runs on its own after the launch overhead.
        env.sched.yield_if_behind()
        start = core.issue("sdma_copy", Pipe.PIPE_S, spec.scalar_issue_cycles)
        t0 = start + spec.sdma_launch_cycles
        eng_end = net.sdma[env.die.index].transfer(t0, nbytes, spec.sdma_bytes_per_cycle)
        env.hbm.transfer(t0, nbytes, spec.sdma_bytes_per_cycle)
        end, arr = net.send(env.die.index, die.index, t0, nbytes, spec.sdma_bytes_per_cycle, plane)
        landed = die.hbm.transfer(t0 + (arr - end), nbytes, spec.sdma_bytes_per_cycle)
        arrival[0] = max(arr, eng_end, landed, core.remote_floor)
        core.remote_last = max(core.remote_last, arrival[0])
        core.count_bytes(f"SDMA->die{die.index}", nbytes)
        if self.functional and nbytes:
            dst.flat_view(0, src.size)[...] = src.flat_view(0, src.size)
        if flag is not None:
            word, value = flag
            self._record_flag(word, value, arrival[0])
        return arrival[0]

    def fence(self) -> None:
        """Order this core's earlier remote writes before its later ones (e.g. data before its flag)."""
        core = self._core
        core.issue("fence", Pipe.PIPE_S, 0)
        core.remote_floor = max(core.remote_floor, core.remote_last)

    def remote_write_flag(self, word: GlobalTensor, value: int) -> int:
        """Write `value` into the GM word `word` (any die, this one included) over MTE3; returns its arrival."""
        core = self._core
        die = self._check_flag_word(word, "remote_write_flag")
        add = core.check_atomic(word.dtype, "remote_write_flag")
        t = self._send("remote_write_flag", die, self.spec.block_bytes, from_gm=False,
                       cap=(self.spec.aiv_gm_write_bytes_per_cycle if self.kind == "aiv"
                            else self.spec.aic_gm_write_bytes_per_cycle),
                       head=self.spec.aiv_direct_head_cycles, pipe=Pipe.PIPE_MTE3)
        self._record_flag(word, value, t, add)
        return t

    def _check_flag_word(self, word, what: str):
        die = self._target_die(word, what)
        if word.dtype.kind not in "iu" or word.size < 1:
            raise DTypeError(f"{what}: the flag word must be an integer GM tensor, got "
                             f"{dtype_name(word.dtype)} {word.shape}", where=self._core.label)
        return die

    def _record_flag(self, word: GlobalTensor, value: int, arrival: int, add: bool = False) -> None:
        hist = _history(word.gm.die, word)
        hist.add(arrival, int(value), add)
        if self.functional and not word.is_phantom:
            cur = word.flat_view(0, 1)
            cur[0] = (cur.astype(np.int64) + value if add else np.array([value])).astype(word.dtype)[0]
        env = self._core.env
        for task in hist.waiters:
            env.sched.wake(task)
        hist.waiters = []

    def wait_until(self, word: GlobalTensor, predicate, what: str | None = None) -> int:
        """Block PIPE_S until `predicate(value)` holds for the local GM word `word`; returns that value."""
        core = self._core
        env = self._remote_env("wait_until")
        if not isinstance(word, GlobalTensor) or word.gm is not core.gm:
            raise ParamError("wait_until: the word must be a GlobalTensor in this die's GM", where=core.label)
        if not callable(predicate):
            raise ParamError(f"wait_until: predicate must be callable, got {predicate!r}", where=core.label)
        line = caller_line()
        now = core.scalar_t
        hist = _history(env.die, word)
        task = core.task
        hist.scan_from[task] = 0
        slept = None  # a later arrival we have let every earlier core run up to
        while True:
            # true now, or first true from a later arrival? The values of writes before scan_from were tested
            # (false) on an earlier pass and have not changed since (a write arriving in between lowers it)
            hist.settle()
            k = hist.arrived_by(now)
            value = hist.value_at(k)
            t = None
            if predicate(value):
                t = now
            else:
                i = max(k, hist.scan_from[task])
                n = len(hist.values)
                while i < n:
                    if predicate(hist.values[i]):
                        t, value = hist.keys[i][0], hist.values[i]
                        break
                    i += 1
                hist.scan_from[task] = i
            if t is not None and (t == now or (slept is not None and t <= slept)):
                break
            if t is not None:  # true only from a later arrival: first let cores behind it run, they may write sooner
                slept = t
                env.sched.sleep_until(t)
                continue
            hist.waiters.append(task)
            env.sched.block(what or f"wait_until on GM word {word!r}", line)
        del hist.scan_from[task]
        core.issue("wait_until", Pipe.PIPE_S, 0, not_before=t)
        return value
