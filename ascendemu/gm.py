"""Global memory (the die's HBM) and `GlobalTensor`.

GM is 64 GiB per die, so it is not one array: each allocation is its own byte array
(none in timing-only mode, where tensors are *phantoms*) at a virtual address. The
allocator tracks the bytes in use against the spec's HBM size.
"""
from __future__ import annotations

import math

import numpy as np

from .buffers import TensorView, as_shape, machine_dtype, poison
from .errors import AllocationError, PhantomError, fmt_bytes
from .numerics import dtype_name


class _Allocation:
    __slots__ = ("address", "nbytes", "data", "live")

    def __init__(self, address: int, nbytes: int, data):
        self.address, self.nbytes, self.data, self.live = address, nbytes, data, True


class GlobalMemory:
    """One die's GM: `empty`, `zeros`, `from_numpy`, `free`."""

    def __init__(self, capacity: int, align: int, functional: bool, where: str = "GM", poison: bool = True):
        self.capacity, self.align, self.functional, self.where = capacity, align, functional, where
        self.poison = poison  # Checks.poison: without it, fresh GM is zeroed
        self.in_use = 0
        self._next = 0x1000_0000  # virtual address of the next allocation

    def _alloc(self, nbytes: int) -> _Allocation:
        if self.in_use + nbytes > self.capacity:
            raise AllocationError(f"allocation of {fmt_bytes(nbytes)} exceeds GM ({fmt_bytes(self.capacity)}; "
                                  f"{fmt_bytes(self.in_use)} in use)", where=self.where)
        addr = self._next
        self._next += -(-max(nbytes, 1) // self.align) * self.align
        self.in_use += nbytes
        data = np.empty(nbytes, np.uint8) if self.functional else None
        return _Allocation(addr, nbytes, data)

    def empty(self, shape, dtype, *, zero: bool = False) -> "GlobalTensor":
        """A new tensor, poisoned (NaN / 0xBE bytes) unless `zero`; a phantom in timing-only mode."""
        dt = machine_dtype(dtype, self.where)
        shape = as_shape(shape, self.where)
        nbytes = math.prod(shape) * dt.itemsize
        a = self._alloc(nbytes)
        if a.data is not None:
            if zero or not self.poison:
                a.data.fill(0)
            else:
                poison(a.data, dt)
        return GlobalTensor(self, a, 0, dt, shape)

    def zeros(self, shape, dtype) -> "GlobalTensor":
        return self.empty(shape, dtype, zero=True)

    def from_numpy(self, array) -> "GlobalTensor":
        """Copy a host array into GM. In timing-only mode only its shape and dtype are kept."""
        array = np.asarray(array)
        dt = machine_dtype(array.dtype, self.where)
        t = self.empty(array.shape, dt, zero=False)
        if t.allocation.data is not None:
            t.allocation.data[:] = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        return t

    def free(self, tensor: "GlobalTensor") -> None:
        a = tensor.allocation
        if a.live:
            a.live = False
            self.in_use -= a.nbytes
            a.data = None


class GlobalTensor(TensorView):
    """A typed, shaped, sliceable view into GM (Ascend C `GlobalTensor<T>`)."""

    __slots__ = ("gm", "allocation", "offset", "dtype", "shape", "size", "nbytes")

    def __init__(self, gm: GlobalMemory, allocation: _Allocation, offset: int, dtype: np.dtype, shape: tuple):
        self.gm, self.allocation, self.offset, self.dtype, self.shape = gm, allocation, offset, dtype, shape
        self.size = math.prod(shape)
        self.nbytes = self.size * dtype.itemsize

    kind = "GM"

    @property
    def _where(self) -> str:
        return self.gm.where

    def _view(self, offset: int, dtype: np.dtype, shape: tuple) -> "GlobalTensor":
        return GlobalTensor(self.gm, self.allocation, offset, dtype, shape)

    @property
    def is_global(self) -> bool:
        return True

    @property
    def is_phantom(self) -> bool:
        return self.allocation.data is None

    @property
    def address(self) -> int:
        return self.allocation.address + self.offset

    def _data(self) -> np.ndarray:
        if self.allocation.data is None:
            why = "it was freed" if not self.allocation.live else "it is a phantom (timing-only mode)"
            raise PhantomError(f"GM tensor {self.shape} {dtype_name(self.dtype)} has no data: {why}",
                               where=self.gm.where)
        return self.allocation.data

    @property
    def array(self) -> np.ndarray:
        """A live NumPy view of the tensor's bytes."""
        return self._data()[self.offset:self.offset + self.nbytes].view(self.dtype).reshape(self.shape)

    def flat_view(self, start: int, count: int) -> np.ndarray:
        b = self.offset + start * self.dtype.itemsize
        return self._data()[b:b + count * self.dtype.itemsize].view(self.dtype)

    def __repr__(self) -> str:
        ph = ", phantom" if self.is_phantom else ""
        return f"GlobalTensor(GM@{self.address:#x}, {self.shape}, {dtype_name(self.dtype)}{ph})"
