"""One AI core (an AIC or an AIV) and the context `ctx` that a kernel runs on.

The scalar unit issues every instruction in program order into its pipe's in-order queue
(`_issue`). An instruction starts when the scalar has issued it, its pipe is free, its
queue had room and every flag it waits on is set; it then occupies its pipe for the
spec's cycles. Data work happens at issue, in program order: for a race-free kernel that
gives the same bytes as any legal hardware order, and the race checker proves freedom.

`CoreContext` combines the per-unit instruction sets (dma, vector, cube, fixpipe) with
sync and scalar instructions. Instruction names follow Ascend C in snake_case.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from .buffers import BUFFER_KINDS, LocalBuffer, LocalTensor, TPosition, machine_dtype
from .checks import Checks
from .crosscore import CrossCoreInstructions
from .cube import CubeInstructions
from .dma import DmaInstructions
from .errors import BoundsError, DTypeError, EmulatorError, ParamError, SyncError, caller_line, operand_name
from .fixpipe import FixpipeInstructions
from .numerics import dtype_name
from .pipes import CORE_PIPES, LEGAL_EVENTS, N_PIPES, HardEvent, Pipe
from .race import RaceChecker
from .remote import RemoteInstructions
from .spec import Spec
from .tpipe import TPipe
from .vector import VectorInstructions


_PIPE_S = int(Pipe.PIPE_S)


# per event: its pipes, and the instruction names of set_flag / wait_flag per (event, id), made once rather than
# per flag (Enum attribute access and f-strings are slow next to the rest of a flag's bookkeeping)
_SRC_PIPE = {e: e.value[0] for e in HardEvent}
_DST_PIPE = {e: e.value[1] for e in HardEvent}
_SET_NAMES: dict = {}
_WAIT_NAMES: dict = {}
_F32 = np.dtype(np.float32)
_SCALARS: dict = {}  # (dtype, float) → the scalar operand rounded via fp32 to dtype (kernels reuse a few values)


_BARRIER_NAMES = {p: f"pipe_barrier {p.short}" for p in Pipe}


class CoreStats:
    """What a core did: busy cycles per pipe, bytes per data path, cube ops, trace events."""

    def __init__(self):
        self.busy = [0] * N_PIPES
        self.bytes = {}  # path name ("GM->UB", …) → bytes
        self.cube_ops = 0  # 2·m·n·k per Mmad (useful work, unpadded)
        self.cube_ops_by_dtype = {}
        self.vector_elems = 0
        self.instructions = 0
        self.events = []  # (pipe, start, duration, name)
        self.end = 0


class Core:
    """Machine state of one core during one launch."""

    def __init__(self, kind: str, index: int, spec: Spec, checks: Checks, functional: bool, gm,
                 label: str | None = None, start: int = 0, stats: CoreStats | None = None, env=None):
        self.kind, self.index, self.spec, self.checks, self.functional = kind, index, spec, checks, functional
        self.gm = gm
        self.env = env  # the launch this core runs in (die, scheduler, HBM, cross-core state); None when standalone
        self.task = None  # its scheduler task
        self.label = label or f"{kind.upper()} {index}"
        self.pipes = CORE_PIPES[kind]
        self.stats = stats or CoreStats()
        self.queues = [deque(maxlen=spec.queue_depth) for _ in range(N_PIPES)]
        self.scalar_t = start
        self.pipe_free = [start] * N_PIPES
        self._fresh()

    def _fresh(self) -> None:
        """Buffers, flags and checker state of a new block (the timeline carries on)."""
        spec, checks = self.spec, self.checks
        self.buffers = {k: LocalBuffer(k, getattr(spec, cap), getattr(spec, al), self.functional, self.label,
                                       poison=checks.poison)
                        for k, (cap, al, owner) in BUFFER_KINDS.items() if owner == self.kind}
        self.flags = {}  # (HardEvent, id) → (time, clock, SourceLine)
        self.race = RaceChecker(self.label) if checks.race else None
        self.atomic = None  # dtype of SetAtomicAdd, or None
        self.tpipes = []
        self._event_ids = {}  # HardEvent → ids handed out by TPipe
        self.remote_floor = 0  # fence: later remote writes arrive no earlier than this
        self.remote_last = 0  # arrival of this core's latest remote write

    def reset_for_next_block(self) -> None:
        """A later round of blocks on this core starts when the previous one has finished."""
        t = self.end_time
        self.scalar_t = t
        self.pipe_free = [t] * N_PIPES
        self._fresh()

    def alloc_event_id(self, event: HardEvent) -> int:
        """An event id for a TQue slot, from the top down (Ascend C `AllocEventID`)."""
        used = self._event_ids.setdefault(event, set())
        for i in range(self.spec.max_flag_id, -1, -1):
            if i not in used:
                used.add(i)
                return i
        raise SyncError(f"no free event id for {event.name}: all {self.spec.max_flag_id + 1} are taken by TQue slots",
                        where=self.label)

    # --- the issue model -----------------------------------------------------------------
    def issue(self, name: str, pipe: Pipe, cycles: int, reads=(), writes=(), not_before: int = 0,
              gm: tuple | None = None, xfer=None) -> int:
        """Issue one instruction; returns its start cycle. reads/writes: (buffer, start, end).

        gm = (head, charged_bytes, per-core rate): a transfer through the die's HBM, whose data
        phase shares the HBM bandwidth with every other core (see bandwidth.py); `cycles` is
        then ignored. xfer(start) -> end: any other shared-resource transfer (the network)."""
        if pipe not in self.pipes:
            raise EmulatorError(f"{name} runs on {pipe.name}, which an {self.kind.upper()} does not have",
                                where=self.label)
        p = int(pipe)
        env = self.env
        if (gm is not None or xfer is not None) and env is not None:
            env.sched.yield_if_behind()
        # (hot: one call per instruction, so plain comparisons instead of max() on a few ints)
        t = self.scalar_t
        q = self.queues[p]
        if len(q) == q.maxlen and q[0] > t:  # queue full: the scalar stalls until the oldest entry starts
            t = q[0]
        pipe_free = self.pipe_free
        free = pipe_free[p]
        if p == _PIPE_S:
            start = t if t >= not_before else not_before
            self.scalar_t = start + cycles
        else:
            start = t if t >= free else free
            if not_before > start:
                start = not_before
            self.scalar_t = t + self.spec.scalar_issue_cycles
        if gm is not None:
            head, nbytes, rate = gm
            if env is not None:
                cycles = env.hbm.transfer(start + head, nbytes, rate) - start
            else:
                cycles = head + -(-nbytes // rate)
        elif xfer is not None:
            cycles = xfer(start) - start
        end = start + cycles
        if end > free:
            pipe_free[p] = end
        q.append(start)
        st = self.stats
        st.busy[p] += cycles
        st.instructions += 1
        if end > st.end:
            st.end = end
        if self.checks.trace:
            st.events.append((p, start, cycles, name))
        if self.race is not None:
            line = caller_line()  # only the race checker's reports need the kernel line
            stamp = self.race.tick(p)
            for buf, lo, hi in reads:
                self.race.access(buf, lo, hi, False, p, stamp, name, line)
            for buf, lo, hi in writes:
                self.race.access(buf, lo, hi, True, p, stamp, name, line)
        return start

    def scalar(self, dt: np.dtype, value, what: str):
        """A scalar operand in dtype `dt`: floats are rounded via fp32 to `dt`; an integer must fit `dt`
        (nothing is silently wrapped). In timing-only mode a Python float or int for a float dtype comes back as
        given: no data path reads it there."""
        if dt.kind in "iu":
            if isinstance(value, float) and not float(value).is_integer():
                raise ParamError(f"{operand_name(what)}: {value!r} is not an integer, and the operand is "
                                 f"{dtype_name(dt)}", where=self.label)
            v = int(value)
            info = np.iinfo(dt)
            if not info.min <= v <= info.max:
                raise ParamError(f"{operand_name(what)}: {v} does not fit {dtype_name(dt)} [{info.min}, {info.max}]",
                                 where=self.label)
            return np.array(v).astype(dt)
        if not self.functional and type(value) in (float, int):
            return value  # a float operand is only read when data moves, and any float or int is one
        key = (dt, value) if type(value) is float and value != 0.0 else None  # (±0.0 compare equal: not cached)
        got = _SCALARS.get(key) if key is not None else None
        if got is None:
            got = np.array(value, np.float64).astype(np.float32)
            if dt != _F32:
                got = got.astype(dt)
            if key is not None:
                got.flags.writeable = False  # shared by every instruction that uses this value
                if len(_SCALARS) >= 1 << 16:
                    _SCALARS.clear()
                _SCALARS[key] = got
        return got

    def check_atomic(self, dst_dtype, what: str) -> bool:
        """At issue, in both modes: under SetAtomicAdd a move into GM adds in the atomic dtype, which must be the
        destination's. Returns whether the move adds."""
        if self.atomic is None:
            return False
        if self.atomic != dst_dtype:
            raise DTypeError(f"{what}: atomic add in {dtype_name(self.atomic)} into a {dtype_name(dst_dtype)} GM "
                             f"tensor", where=self.label)
        return True

    def store_gm(self, view: np.ndarray, values, add: bool) -> None:
        """Write `values` into a typed GM view: overwrite, or read-add-write in the view's dtype."""
        view[...] = (view + values).astype(view.dtype) if add else values

    def count_bytes(self, path: str, nbytes: int) -> None:
        self.stats.bytes[path] = self.stats.bytes.get(path, 0) + nbytes

    # --- helpers for the instruction sets ----------------------------------------------------
    def local(self, t, kinds, what) -> LocalTensor:
        """Check that `t` is a LocalTensor of this core in one of `kinds`. `what` names the operand in errors: a
        string, or a tuple of strings joined by spaces (hot callers pass (instruction, role) and save building
        a string that is only needed when something is wrong)."""
        if not isinstance(t, LocalTensor):
            raise DTypeError(f"{operand_name(what)} must be a LocalTensor in {'/'.join(kinds)}, got "
                             f"{type(t).__name__}", where=self.label)
        buf = t.buffer
        kind = buf.kind
        if kind not in kinds:
            raise ParamError(f"{operand_name(what)} is in {kind}; expected {'/'.join(kinds)}", where=self.label)
        if self.buffers.get(kind) is not buf:
            if buf.where == self.label:
                raise ParamError(f"{operand_name(what)} belongs to an earlier block or launch of {self.label}; local "
                                 f"tensors do not outlive their block", where=self.label)
            raise ParamError(f"{operand_name(what)} belongs to {buf.where}, not to {self.label}", where=self.label)
        return t

    def span(self, t, first: int, last_end: int, what):
        """Byte region (buffer, start, end) of elements [first, last_end) of `t`, bounds-checked (`what`: as for
        `local`)."""
        if first < 0 or last_end > t.size or last_end < first:
            raise BoundsError(f"{operand_name(what)} touches elements [{first}, {last_end}) of a {t.size}-element "
                              f"{t.kind} tensor {t.shape}", where=self.label)
        isz = t.dtype.itemsize
        return (t.buffer, t.offset + first * isz, t.offset + last_end * isz)

    def end_of_kernel(self) -> None:
        for tp in self.tpipes:
            tp.destroy()
        if self.checks.flag_balance and self.flags:
            left = ", ".join(f"{ev.name}[{i}] (set at {ln.short if ln else '?'})"
                             for (ev, i), (_, _, ln) in self.flags.items())
            raise SyncError(f"kernel ended with flags set but never waited on: {left}", where=self.label)

    @property
    def end_time(self) -> int:
        # a kernel is done when its pipes are idle and its remote writes and SDMA copies have landed
        return max([self.scalar_t, self.remote_last] + [self.pipe_free[int(p)] for p in self.pipes])

    def clock(self) -> int:
        """The cycle at which the scalar unit issues next (the scheduler's ordering key)."""
        return self.scalar_t


class CoreContext(DmaInstructions, VectorInstructions, CubeInstructions, FixpipeInstructions, CrossCoreInstructions,
                  RemoteInstructions):
    """`ctx`: what a kernel sees. Block indices, buffers, and every instruction as a method."""

    def __init__(self, core: Core, block_idx: int, block_num: int, sub_block_idx: int = 0):
        self._core = core
        self.block_idx, self.block_num, self.sub_block_idx = block_idx, block_num, sub_block_idx
        self.spec = core.spec
        self.kind = core.kind
        self.functional = core.functional
        self.mask_mode_counter = False
        self.vector_mask = None

    # --- Ascend C system variables --------------------------------------------------------
    def get_block_idx(self) -> int:
        return self.block_idx

    def get_block_num(self) -> int:
        return self.block_num

    def get_sub_block_idx(self) -> int:
        return self.sub_block_idx

    def get_task_ratio(self) -> int:
        return 1 if self.kind == "aic" else 2

    @property
    def is_aic(self) -> bool:
        return self.kind == "aic"

    @property
    def is_aiv(self) -> bool:
        return self.kind == "aiv"

    # --- buffers ------------------------------------------------------------------------------
    def _buffer(self, kind: str) -> LocalBuffer:
        b = self._core.buffers.get(kind)
        if b is None:
            raise EmulatorError(f"an {self.kind.upper()} has no {kind}; its buffers are "
                                f"{', '.join(self._core.buffers)}", where=self._core.label)
        return b

    ub = property(lambda self: self._buffer("UB"))
    l1 = property(lambda self: self._buffer("L1"))
    l0a = property(lambda self: self._buffer("L0A"))
    l0b = property(lambda self: self._buffer("L0B"))
    l0c = property(lambda self: self._buffer("L0C"))
    bt = property(lambda self: self._buffer("BT"))
    fb = property(lambda self: self._buffer("FB"))

    def buffer(self, position: TPosition) -> LocalBuffer:
        return self._buffer(position.buffer)

    def tpipe(self) -> TPipe:
        """A TPipe for this core: `pipe.init_buffer(que, num, nbytes)`, TQue, TBuf."""
        return TPipe(self)

    # --- intra-core synchronisation ------------------------------------------------------------
    def _event(self, event: HardEvent, event_id: int, what: str):
        core = self._core
        if not isinstance(event, HardEvent):
            raise ParamError(f"{what}: expected a HardEvent, got {event!r}", where=core.label)
        if event not in LEGAL_EVENTS[self.kind]:
            legal = ", ".join(sorted(e.name for e in LEGAL_EVENTS[self.kind]))
            raise ParamError(f"{what}: HardEvent.{event.name} is not legal on an {self.kind.upper()}; legal: {legal}",
                             where=core.label)
        if not 0 <= int(event_id) <= self.spec.max_flag_id:
            raise ParamError(f"{what}: event id {event_id} is outside 0..{self.spec.max_flag_id}", where=core.label)
        return (event, int(event_id))

    def set_flag(self, event: HardEvent, event_id: int = 0) -> None:
        """`SetFlag<HardEvent::SRC_DST>(id)`: runs on SRC after its earlier work; sets a 1-bit flag."""
        core = self._core
        key = self._event(event, event_id, "set_flag")
        if key in core.flags:
            _, _, ln = core.flags[key]
            raise SyncError(f"set_flag({event.name}, {event_id}) while it is already set (at "
                            f"{ln.short if ln else '?'}) and not yet waited on: undefined on hardware",
                            where=core.label)
        name = _SET_NAMES.get(key)
        if name is None:
            name = _SET_NAMES[key] = f"set_flag {event.name}[{key[1]}]"
        src = _SRC_PIPE[event]
        start = core.issue(name, src, 0)
        clock = core.race.snapshot(int(src)) if core.race else None
        core.flags[key] = (start + self.spec.flag_latency_cycles, clock, caller_line())

    def wait_flag(self, event: HardEvent, event_id: int = 0) -> None:
        """`WaitFlag<HardEvent::SRC_DST>(id)`: blocks DST until the flag is set, then clears it."""
        core = self._core
        key = self._event(event, event_id, "wait_flag")
        if key not in core.flags:
            raise SyncError(f"wait_flag({event.name}, {event_id}) has no earlier set_flag: it would hang on hardware",
                            where=core.label)
        t, clock, _ = core.flags.pop(key)
        dst = _DST_PIPE[event]
        if core.race:
            core.race.merge(int(dst), clock)
        name = _WAIT_NAMES.get(key)
        if name is None:
            name = _WAIT_NAMES[key] = f"wait_flag {event.name}[{key[1]}]"
        core.issue(name, dst, 0, not_before=t)

    def pipe_barrier(self, pipe: Pipe) -> None:
        """`PipeBarrier<pipe>()`. PIPE_ALL: every pipe drains before anything later starts.

        A single pipe already runs its instructions one after another in this model, so a
        one-pipe barrier only costs its issue slot.
        """
        core = self._core
        if not isinstance(pipe, Pipe):
            raise ParamError(f"pipe_barrier: expected a Pipe, got {pipe!r}", where=core.label)
        if pipe == Pipe.PIPE_ALL:
            t = max([core.scalar_t] + [core.pipe_free[int(p)] for p in core.pipes])
            core.issue("pipe_barrier ALL", Pipe.PIPE_S, 0, not_before=t)
            for p in core.pipes:
                core.pipe_free[int(p)] = max(core.pipe_free[int(p)], core.scalar_t)
            if core.race:
                core.race.barrier_all()
        else:
            core.issue(_BARRIER_NAMES[pipe], pipe, 0)

    # --- scalar access to local memory (PIPE_S) ----------------------------------------------
    def get_value(self, tensor: LocalTensor, index: int):
        """`tensor.GetValue(i)`: a scalar read on PIPE_S."""
        core = self._core
        t = core.local(tensor, tuple(core.buffers), "get_value tensor")
        i = int(index)
        core.issue("get_value", Pipe.PIPE_S, self.spec.scalar_access_cycles, reads=[core.span(t, i, i + 1, "get_value")])
        if not self.functional:
            return 0
        return t.flat_view(i, 1)[0].item() if t.dtype.kind in "iu" else float(t.flat_view(i, 1)[0])

    def set_value(self, tensor: LocalTensor, index: int, value) -> None:
        """`tensor.SetValue(i, v)`: a scalar write on PIPE_S."""
        core = self._core
        t = core.local(tensor, tuple(core.buffers), "set_value tensor")
        i = int(index)
        v = core.scalar(t.dtype, value, "set_value")
        core.issue("set_value", Pipe.PIPE_S, self.spec.scalar_access_cycles, writes=[core.span(t, i, i + 1, "set_value")])
        if self.functional:
            t.flat_view(i, 1)[0] = v

    # --- atomics ----------------------------------------------------------------------------------
    def set_atomic_add(self, dtype) -> None:
        """`SetAtomicAdd<T>()`: later moves into GM read-add-write in `dtype` [SetAtomicAdd.md]."""
        dt = machine_dtype(dtype, self._core.label)
        allowed = ("int8", "int16", "float16", "bfloat16", "int32", "float32")
        if dtype_name(dt) not in allowed:
            raise DTypeError(f"set_atomic_add: {dtype_name(dt)} is not supported; use one of {', '.join(allowed)}",
                             where=self._core.label)
        self._core.issue("set_atomic_add", Pipe.PIPE_S, 1)
        self._core.atomic = dt

    def disable_dma_atomic(self) -> None:
        """`DisableDmaAtomic()`: moves into GM overwrite again."""
        self._core.issue("disable_dma_atomic", Pipe.PIPE_S, 1)
        self._core.atomic = None
