"""Local buffers (L1, L0A, L0B, L0C, BiasTable, Fixpipe buffer, UB) and `LocalTensor`.

A buffer is a byte array (none in timing-only mode) with a bump allocator, a capacity and
an alignment rule from the spec. A `LocalTensor` is a typed, shaped view at a byte offset
in one buffer; its `.array` is a NumPy view of the bytes, so every instruction reads and
writes the real buffer contents, and reinterpreting a tensor is exact.
"""
from __future__ import annotations

import enum

import math

import numpy as np

from .errors import AlignmentError, AllocationError, BoundsError, DTypeError, PhantomError, fmt_bytes
from .numerics import as_dtype, dtype_name


class TPosition(enum.Enum):
    """Ascend C `TPosition`; `.buffer` is the memory it lives in [TPosition.md]."""

    GM = "GM"
    VECIN = "VECIN"
    VECOUT = "VECOUT"
    VECCALC = "VECCALC"
    A1 = "A1"
    B1 = "B1"
    C1 = "C1"
    TSCM = "TSCM"
    A2 = "A2"
    B2 = "B2"
    CO1 = "CO1"
    C2 = "C2"
    C2PIPE2GM = "C2PIPE2GM"
    CO2 = "CO2"

    @property
    def buffer(self) -> str:
        return _POSITION_BUFFER[self]


_POSITION_BUFFER = {
    TPosition.GM: "GM", TPosition.CO2: "GM",
    TPosition.VECIN: "UB", TPosition.VECOUT: "UB", TPosition.VECCALC: "UB",
    TPosition.A1: "L1", TPosition.B1: "L1", TPosition.C1: "L1", TPosition.TSCM: "L1",
    TPosition.A2: "L0A", TPosition.B2: "L0B", TPosition.CO1: "L0C",
    TPosition.C2: "BT", TPosition.C2PIPE2GM: "FB",
}


# Buffer kind → (spec capacity field, spec alignment field, core kind that owns it)
BUFFER_KINDS = {
    "UB": ("ub_bytes", "ub_align_bytes", "aiv"),
    "L1": ("l1_bytes", "l1_align_bytes", "aic"),
    "L0A": ("l0a_bytes", "l0a_align_bytes", "aic"),
    "L0B": ("l0b_bytes", "l0b_align_bytes", "aic"),
    "L0C": ("l0c_bytes", "l0c_align_bytes", "aic"),
    "BT": ("bias_table_bytes", "bias_table_align_bytes", "aic"),
    "FB": ("fixpipe_buffer_bytes", "fixpipe_buffer_align_bytes", "aic"),
}

# Poison bytes for fresh allocations: NaN for floats, 0xBE for integers.
_POISON = {"float32": np.array([0x7FC00000], np.uint32).view(np.uint8),
           "float16": np.array([0x7E00], np.uint16).view(np.uint8),
           "bfloat16": np.array([0x7FC0], np.uint16).view(np.uint8)}
INT_POISON_BYTE = 0xBE
# Untyped storage (TQue slots, TBuf) is filled with 0xFF: NaN in fp32, fp16 and bf16 at any 2-byte offset,
# so a float view of a slot never written still shows as NaN.
RAW_POISON_BYTE = 0xFF


def machine_dtype(x, where: str) -> np.dtype:
    """`numerics.as_dtype`, raising the machine's DTypeError (which names where) instead of a bare TypeError."""
    try:
        return as_dtype(x)
    except TypeError as e:
        raise DTypeError(str(e), where=where) from None


def poison(data: np.ndarray, dtype: np.dtype) -> None:
    """Fill a byte array with the poison pattern of `dtype` (NaN for floats, 0xBE for integers)."""
    pat = _POISON.get(dtype_name(dtype))
    if pat is None:
        data.fill(INT_POISON_BYTE)
    else:
        n = len(pat)
        data[: len(data) - len(data) % n].view(pat.view(dtype).dtype)[...] = pat.view(dtype)[0]
        if len(data) % n:
            data[len(data) - len(data) % n:] = INT_POISON_BYTE


class LocalBuffer:
    """One on-core buffer: capacity, alignment, bump allocator and (when functional) its bytes."""

    def __init__(self, kind: str, capacity: int, align: int, functional: bool, where: str, poison: bool = True):
        self.kind, self.capacity, self.align = kind, capacity, align
        self.poison = poison  # Checks.poison: without it, fresh allocations keep the buffer's old bytes
        self.where = where  # e.g. "AIV 3"
        self.label = f"{where} · {kind}"  # what its tensors' errors lead with, e.g. "AIV 3 · UB"
        self.top = 0
        self.data = np.full(capacity, INT_POISON_BYTE, np.uint8) if functional else None

    def alloc(self, shape, dtype, *, zero: bool = False, align: int | None = None) -> "LocalTensor":
        """Allocate a tensor; fresh memory is poisoned unless `zero`."""
        dt = machine_dtype(dtype, self.label)
        shape = as_shape(shape, self.label)
        nbytes = math.prod(shape) * dt.itemsize
        a = max(self.align, align or 1)
        off = -(-self.top // a) * a
        if off + nbytes > self.capacity:
            raise AllocationError(
                f"allocation of {fmt_bytes(nbytes)} ({shape} {dtype_name(dt)}) exceeds {self.kind} "
                f"({fmt_bytes(self.capacity)}; {fmt_bytes(self.top)} in use)", where=self.label)
        self.top = off + nbytes
        if self.data is not None:
            region = self.data[off:off + nbytes]
            if zero:
                region.fill(0)
            elif self.poison:
                poison(region, dt)
        return LocalTensor(self, off, dt, shape)

    def alloc_raw(self, nbytes: int) -> "LocalTensor":
        """Untyped storage for TPipe queues and buffers: uint8, poisoned with RAW_POISON_BYTE."""
        t = self.alloc((nbytes,), "uint8")
        if self.data is not None and self.poison:
            self.data[t.offset:t.offset + t.nbytes] = RAW_POISON_BYTE
        return t

    def reset(self) -> None:
        """Free every allocation (Ascend C `TPipe::Reset`)."""
        self.top = 0

    def check_aligned(self, offset: int, align: int, what: str, where: str) -> None:
        if offset % align:
            raise AlignmentError(
                f"{what}: {self.kind} address {offset:#x} is not {align} B aligned", where=where)


def as_shape(shape, where: str) -> tuple:
    """A shape as a tuple of non-negative ints (an int is a 1-D shape)."""
    if type(shape) is tuple and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 0:
        return shape  # (n,): the commonest, already canonical
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise BoundsError(f"negative shape {shape}", where=where)
    return shape


class TensorView:
    """What LocalTensor and GlobalTensor share: a typed, shaped view at a byte offset into some storage.

    Subclasses give `_where` (for error messages) and `_view(offset, dtype, shape)` (a sibling view)."""

    __slots__ = ()

    def numpy(self) -> np.ndarray:
        """A host copy of the tensor."""
        return self.array.copy()

    def __getitem__(self, key):
        """A contiguous sub-view: ints and step-1 slices on leading axes (Ascend C's `tensor[offset]`)."""
        off, shape = _index(self.shape, key, self._where)
        return self._view(self.offset + off * self.dtype.itemsize, self.dtype, shape)

    def reshape(self, shape):
        shape = as_shape(shape, self._where)
        if math.prod(shape) != self.size:
            raise BoundsError(f"cannot reshape {self.shape} ({self.size} elements) to {shape}", where=self._where)
        return self._view(self.offset, self.dtype, shape)

    def flatten(self):
        return self._view(self.offset, self.dtype, (self.size,))

    def reinterpret_cast(self, dtype):
        """The same bytes seen as another dtype (Ascend C `ReinterpretCast<T>()`)."""
        dt = machine_dtype(dtype, self._where)
        if self.nbytes % dt.itemsize:
            raise DTypeError(f"{self.nbytes} B is not a whole number of {dtype_name(dt)} elements", where=self._where)
        return self._view(self.offset, dt, (self.nbytes // dt.itemsize,))


class LocalTensor(TensorView):
    """A typed view of `shape` at byte `offset` in one local buffer (Ascend C `LocalTensor<T>`)."""

    __slots__ = ("buffer", "offset", "dtype", "shape", "size", "nbytes")

    def __init__(self, buffer: LocalBuffer, offset: int, dtype: np.dtype, shape: tuple):
        self.buffer, self.offset, self.dtype, self.shape = buffer, offset, dtype, shape
        self.size = math.prod(shape)
        self.nbytes = self.size * dtype.itemsize

    @property
    def _where(self) -> str:
        return self.buffer.label

    def _view(self, offset: int, dtype: np.dtype, shape: tuple) -> "LocalTensor":
        return LocalTensor(self.buffer, offset, dtype, shape)

    @property
    def kind(self) -> str:
        return self.buffer.kind

    @property
    def is_global(self) -> bool:
        return False

    @property
    def array(self) -> np.ndarray:
        """The tensor's bytes as a NumPy view of `dtype` and `shape` (functional mode only)."""
        if self.buffer.data is None:
            raise PhantomError(f"{self.kind} tensor has no data in timing-only mode", where=self.buffer.where)
        return self.buffer.data[self.offset:self.offset + self.nbytes].view(self.dtype).reshape(self.shape)

    def flat_view(self, start: int, count: int) -> np.ndarray:
        """Elements [start, start+count) of the buffer seen as this tensor's dtype, from the tensor's base."""
        b = self.offset + start * self.dtype.itemsize
        return self.buffer.data[b:b + count * self.dtype.itemsize].view(self.dtype)

    def __repr__(self) -> str:
        return f"LocalTensor({self.kind}@{self.offset:#x}, {self.shape}, {dtype_name(self.dtype)})"


def _index(shape: tuple, key, where: str):
    """Element offset and shape of a contiguous sub-view: ints and step-1 slices on leading axes.

    The view must be one contiguous run of the row-major tensor: every axis before the last
    partially-indexed one must be narrowed to one element (an int, or a slice of length 1).
    `t[1:3]`, `t[2, 4:8]` and `t[0:1, 4:8]` are views; `t[:, 0]` and `t[:, 1:3]` are not.
    """
    if type(key) is slice and len(shape) == 1 and key.step is None:  # `t[a:b]` of a 1-D tensor: the commonest
        start, stop, n = key.start, key.stop, shape[0]
        if type(start) is int and type(stop) is int and 0 <= start <= stop <= n:
            return start, (stop - start,)
    if type(key) is not tuple:
        key = (key,)
    nk = len(key)
    if 0 < nk <= len(shape):
        # fast path, the commonest views: ints, then an int or a non-negative step-1 slice, then whole axes
        # (`t[i]`, `t[i, j]`, `t[i, a:b]`) — always one contiguous run; anything else takes the general path
        last, n = key[-1], shape[nk - 1]
        if type(last) is int:
            start, count = None, None
        elif type(last) is slice and last.step is None and \
                (last.start is None or type(last.start) is int and 0 <= last.start <= n) and \
                (last.stop is None or type(last.stop) is int and 0 <= last.stop <= n):
            start = 0 if last.start is None else last.start
            count = max(0, (n if last.stop is None else last.stop) - start)
        else:
            nk = 0
        off = 0
        for ax in range(nk - 1):
            i, m = key[ax], shape[ax]
            if type(i) is not int:
                nk = 0
                break
            if not -m <= i < m:
                raise BoundsError(f"index {i} is out of bounds for axis {ax} with length {m}", where=where)
            off = off * m + i % m
        if nk:
            if count is None:
                if not -n <= last < n:
                    raise BoundsError(f"index {last} is out of bounds for axis {nk - 1} with length {n}",
                                      where=where)
                start = last % n
            rest = shape[nk:]
            return (off * n + start) * math.prod(rest), rest if count is None else (count,) + rest
    if not isinstance(key, tuple):
        key = (key,)
    if len(key) > len(shape):
        raise BoundsError(f"too many indices {key} for shape {shape}", where=where)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    off, out, extent = 0, [], []
    for ax, k in enumerate(key):
        n = shape[ax]
        if isinstance(k, slice):
            if k.step not in (None, 1):
                raise BoundsError(f"slice {k} of axis {ax} is strided: only step-1 slices make a view", where=where)
            if (k.start is not None and not -n <= k.start <= n) or (k.stop is not None and not -n <= k.stop <= n):
                raise BoundsError(f"slice {k} of axis {ax} (length {n}) is out of bounds", where=where)
            start, stop, _ = k.indices(n)
            count = max(0, stop - start)
            off += start * strides[ax]
            out.append(count)
            extent.append(count)
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k)
            if not -n <= i < n:
                raise BoundsError(f"index {i} is out of bounds for axis {ax} with length {n}", where=where)
            off += (i % n) * strides[ax]
            extent.append(1)
        else:
            raise BoundsError(f"index {k!r} of axis {ax}: only ints and step-1 slices make a view", where=where)
    out.extend(shape[len(key):])
    extent.extend(shape[len(key):])
    partial = [ax for ax, e in enumerate(extent) if e != shape[ax]]
    if partial and 0 not in extent and any(e > 1 for e in extent[:partial[-1]]):
        raise BoundsError(f"index {key} of shape {shape} is not contiguous: axes before the last narrowed one "
                          f"must be narrowed to one element", where=where)
    return off, tuple(out)
