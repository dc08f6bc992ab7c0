"""Exceptions the emulator raises, and how they say where things went wrong.

Every error is an `EmulatorError`. Its message leads with *where*: the core, the
buffer or pipe, and the kernel's source line with a caret under it, e.g.

    AIV 0 · UB · my_kernel.py:12: allocation of 200 KiB exceeds UB (192 KiB; 0 B in use)
        ub = ctx.ub.alloc((102400,), "float16")
        ^
"""
from __future__ import annotations

import linecache
import os
import sys

_MACHINE_DIR = os.path.dirname(os.path.abspath(__file__))


class SourceLine(tuple):
    """A kernel source location (filename, lineno): the innermost frame outside the machine package. (A plain
    tuple underneath, made without a Python-level constructor: set_flag records one per flag.)"""

    __slots__ = ()

    def __new__(cls, filename: str, lineno: int):
        return _new_tuple(cls, (filename, lineno))

    def __getnewargs__(self):  # pickling (an error crossing a process boundary) calls __new__(cls, *these)
        return tuple(self)

    @property
    def filename(self) -> str:
        return self[0]

    @property
    def lineno(self) -> int:
        return self[1]

    @property
    def short(self) -> str:
        return f"{os.path.basename(self.filename)}:{self.lineno}"

    @property
    def text(self) -> str:
        return linecache.getline(self.filename, self.lineno).rstrip()

    def with_caret(self) -> str:
        text = self.text
        if not text:
            return ""
        return f"\n    {text.strip()}\n    ^"

    def __str__(self) -> str:
        return self.short

    def __repr__(self) -> str:
        return f"SourceLine({self.filename!r}, {self.lineno})"


_new_tuple = tuple.__new__
_IN_MACHINE: dict[str, str | None] = {}  # code filename → its absolute path, or None inside the machine
_UNSEEN = object()


def caller_line() -> SourceLine | None:
    """The innermost stack frame whose file is not part of the machine (`ascendemu/`). (Hot: set_flag records
    one per flag, so that a sync error can name the line that set it.)"""
    frame = sys._getframe(1)
    seen = _IN_MACHINE.get
    while frame is not None:
        fn = frame.f_code.co_filename
        path = seen(fn, _UNSEEN)
        if path is _UNSEEN:
            path = os.path.abspath(fn)
            # the machine is the package's own modules; ascendemu/ops and ascendemu/layouts (where an
            # installed copy puts them) are kernel and format code, whose lines errors must show
            path = _IN_MACHINE[fn] = None if os.path.dirname(path) == _MACHINE_DIR else path
        if path is not None:
            return _new_tuple(SourceLine, (path, frame.f_lineno))
        frame = frame.f_back
    return None


def operand_name(what) -> str:
    """An operand's name for an error message: a string, or a tuple of strings joined by spaces (hot instruction
    paths pass (instruction, role) and leave the joining to the rare error)."""
    return " ".join(what) if isinstance(what, tuple) else what


class EmulatorError(Exception):
    """Base class of every error the emulator raises."""

    def __init__(self, message: str, *, where: str = "", line: SourceLine | None = None):
        self.where = where
        self.line = line if line is not None else caller_line()
        self.detail = message
        head = " · ".join(p for p in (where, self.line.short if self.line else "") if p)
        text = f"{head}: {message}" if head else message
        if self.line is not None:
            text += self.line.with_caret()
        super().__init__(text)


class AllocationError(EmulatorError):
    """An allocation does not fit in its buffer (or in GM)."""


class AlignmentError(EmulatorError):
    """An address, length or stride breaks an alignment rule of the hardware."""


class BoundsError(EmulatorError):
    """A view or an access reaches outside its tensor or buffer."""


class DTypeError(EmulatorError, TypeError):
    """An operand has a dtype the instruction does not accept, or dtypes disagree."""


class ParamError(EmulatorError, ValueError):
    """An instruction parameter is out of its legal range, or a combination is unsupported."""


class SyncError(EmulatorError):
    """A flag, barrier or queue is used in a way that would hang or is undefined on hardware."""


class RaceError(EmulatorError):
    """Two pipes touch the same local-buffer region with no synchronisation between them."""


class PhantomError(EmulatorError):
    """Data was asked of a phantom tensor (timing-only mode has no data)."""


class DeadlockError(EmulatorError):
    """Every unfinished core is waiting."""


def fmt_bytes(n: int) -> str:
    """Human-readable byte count: 512 B, 192 KiB, 1.5 MiB."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"
