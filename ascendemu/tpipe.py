"""TPipe / TQue / TBuf: Ascend C's buffer-and-queue conveniences, built on flags.

[TPipe-TQue框架编程原理.md]: EnQue = SetFlag (producer done), DeQue = WaitFlag (RAW),
AllocTensor = WaitFlag (the slot's last readers are done, WAR), FreeTensor = SetFlag.
The events follow the queue's position (VECIN: MTE2→V, VECOUT: V→MTE3, A1/B1: MTE2→MTE1,
A2/B2: MTE1→M, CO1: M→FIX). Each slot takes its own event ids, allocated from 7 downward
(users conventionally take the low ids). At the end of the kernel the pipe drains the
pending "slot free" flags, as `TPipe::Destroy` does.
"""
from __future__ import annotations

from collections import deque

from .buffers import LocalTensor, TPosition, machine_dtype
from .errors import ParamError, SyncError
from .numerics import as_dtype
from .pipes import HardEvent

# position → (enque event: producer→consumer, free event: consumer→producer)
QUEUE_EVENTS = {
    TPosition.VECIN: (HardEvent.MTE2_V, HardEvent.V_MTE2),
    TPosition.VECOUT: (HardEvent.V_MTE3, HardEvent.MTE3_V),
    TPosition.A1: (HardEvent.MTE2_MTE1, HardEvent.MTE1_MTE2),
    TPosition.B1: (HardEvent.MTE2_MTE1, HardEvent.MTE1_MTE2),
    TPosition.A2: (HardEvent.MTE1_M, HardEvent.M_MTE1),
    TPosition.B2: (HardEvent.MTE1_M, HardEvent.M_MTE1),
    TPosition.CO1: (HardEvent.M_FIX, HardEvent.FIX_M),
}

_FREE, _ALLOCATED, _QUEUED, _DEQUEUED, _RELEASED = "free", "allocated", "enqueued", "dequeued", "released"


class _Slot:
    __slots__ = ("tensor", "state", "enque_id", "free_id", "view", "typed")

    def __init__(self, tensor, enque_id, free_id):
        self.tensor, self.state, self.enque_id, self.free_id = tensor, _FREE, enque_id, free_id
        self.view = tensor  # the typed tensor last handed out or enqueued (what deque() returns)
        self.typed = {}  # dtype as asked for → the whole slot as that dtype (views are immutable: made once)


class TQue:
    """`TQue<pos, depth>`: a ring of buffer slots handed between two pipes."""

    def __init__(self, position: TPosition, depth: int = 1, *, events: tuple[HardEvent, HardEvent] | None = None):
        if events is None and position not in QUEUE_EVENTS:
            raise ParamError(f"TQue at {position.name} has no default events; pass events=(enque, free) "
                             f"or use a TBuf for {position.name}")
        self.position, self.depth = position, depth
        self.enque_event, self.free_event = events or QUEUE_EVENTS[position]
        self.slots: list[_Slot] = []
        self.pipe: "TPipe | None" = None
        self._next = 0
        self._fifo: deque[_Slot] = deque()

    def _ctx(self):
        if self.pipe is None:
            raise SyncError(f"TQue({self.position.name}) used before pipe.init_buffer")
        return self.pipe.ctx

    def _where(self) -> str:
        return self.pipe.ctx._core.label if self.pipe is not None else ""

    def _slot_of(self, tensor: LocalTensor, what: str) -> _Slot:
        self._ctx()
        if isinstance(tensor, LocalTensor):
            for s in self.slots:
                if s.tensor.buffer is tensor.buffer and s.tensor.offset == tensor.offset:
                    return s
        raise SyncError(f"{what}: {tensor!r} is not a slot of TQue({self.position.name}); pass the tensor "
                        f"that alloc_tensor or deque returned", where=self._where())

    def alloc_tensor(self, dtype, shape=None) -> LocalTensor:
        """`AllocTensor<T>()`: the next slot, after its previous readers are done."""
        ctx = self._ctx()
        s = self.slots[self._next]
        if s.state not in (_FREE, _RELEASED):
            raise SyncError(f"alloc_tensor: all {len(self.slots)} slots of TQue({self.position.name}) are in use "
                            f"(slot {self._next} is {s.state}); free_tensor one first", where=self._where())
        self._next = (self._next + 1) % len(self.slots)
        if s.state == _RELEASED:
            ctx.wait_flag(self.free_event, s.free_id)
        s.state = _ALLOCATED
        try:
            base = s.typed.get(dtype)
        except TypeError:  # not hashable, so not a dtype: machine_dtype says so below
            base = None
        if base is None:
            base = s.tensor.reinterpret_cast(machine_dtype(dtype, ctx._core.label))
            s.typed[dtype] = base
        s.view = base if shape is None else base[: _count(shape)].reshape(shape)
        return s.view

    def enque(self, tensor: LocalTensor) -> None:
        """`EnQue(t)`: the producer is done with the slot."""
        s = self._slot_of(tensor, "enque")
        if s.state != _ALLOCATED:
            raise SyncError(f"enque: slot is {s.state}, not allocated", where=self._where())
        if len(self._fifo) >= self.depth:
            raise SyncError(f"enque: TQue({self.position.name}) depth {self.depth} is full; deque first",
                            where=self._where())
        self.pipe.ctx.set_flag(self.enque_event, s.enque_id)
        s.state = _QUEUED
        s.view = tensor
        self._fifo.append(s)

    def deque(self, dtype=None, shape=None) -> LocalTensor:
        """`DeQue<T>()`: wait for the oldest enqueued slot. Without `dtype`/`shape`, returns the
        tensor that was enqueued (same dtype and shape)."""
        self._ctx()
        if not self._fifo:
            raise SyncError(f"deque: TQue({self.position.name}) is empty: it would hang on hardware",
                            where=self._where())
        s = self._fifo.popleft()
        self.pipe.ctx.wait_flag(self.enque_event, s.enque_id)
        s.state = _DEQUEUED
        if dtype is None and shape is None:
            return s.view
        t = s.tensor.reinterpret_cast(as_dtype(dtype if dtype is not None else s.view.dtype))
        return t if shape is None else t[: _count(shape)].reshape(shape)

    def free_tensor(self, tensor: LocalTensor) -> None:
        """`FreeTensor(t)`: the consumer is done; the producer may reuse the slot."""
        s = self._slot_of(tensor, "free_tensor")
        if s.state != _DEQUEUED:
            raise SyncError(f"free_tensor: slot is {s.state}, not dequeued", where=self._where())
        self.pipe.ctx.set_flag(self.free_event, s.free_id)
        s.state = _RELEASED

    def _drain(self) -> None:
        for s in self.slots:
            if s.state == _RELEASED:
                self.pipe.ctx.wait_flag(self.free_event, s.free_id)
                s.state = _FREE


class TBuf:
    """`TBuf<pos>`: a scratch buffer with no queue (e.g. VECCALC)."""

    def __init__(self, position: TPosition = TPosition.VECCALC):
        self.position = position
        self.tensor: LocalTensor | None = None

    def get(self, dtype, count: int | None = None) -> LocalTensor:
        """`Get<T>(count)`."""
        if self.tensor is None:
            raise SyncError(f"TBuf({self.position.name}) used before pipe.init_buffer")
        t = self.tensor.reinterpret_cast(as_dtype(dtype))
        return t if count is None else t[:count]


def _count(shape) -> int:
    n = 1
    for s in (shape if isinstance(shape, tuple) else (shape,)):
        n *= int(s)
    return n


class TPipe:
    """`TPipe`: owns the queues' memory and event ids on one core."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.queues: list[TQue] = []
        ctx._core.tpipes.append(self)

    def init_buffer(self, que, num: int = 1, length: int = 0) -> None:
        """`InitBuffer(que, num, len)` (TQue) or `InitBuffer(buf, len)` (TBuf); len in bytes, rounded up to 32 B."""
        buffer = self.ctx.buffer(que.position)
        if isinstance(que, TBuf):
            length = num if length == 0 else length
            que.tensor = buffer.alloc_raw(-(-length // 32) * 32)
            return
        if que.slots:
            raise ParamError(f"init_buffer: TQue({que.position.name}) is already initialised")
        if not 1 <= num <= 4:
            raise ParamError(f"init_buffer: num = {num}; 1 = single, 2 = double buffering (at most 4)")
        core = self.ctx._core
        nbytes = -(-int(length) // 32) * 32
        for _ in range(num):
            t = buffer.alloc_raw(nbytes)
            que.slots.append(_Slot(t, core.alloc_event_id(que.enque_event), core.alloc_event_id(que.free_event)))
        que.pipe = self
        self.queues.append(que)

    def destroy(self) -> None:
        """`Destroy()`: wait for every pending slot-free flag."""
        for q in self.queues:
            q._drain()
