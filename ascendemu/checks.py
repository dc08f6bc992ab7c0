"""Every checking knob of the emulator, in one frozen record with documented defaults."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Checks:
    #: Raise RaceError when two pipes touch the same local-buffer bytes (one of them writing)
    #: with no flag, barrier or queue operation ordering them.
    race: bool = True
    #: Fill fresh allocations with a poison pattern (NaN for floats, 0xBE bytes for integers)
    #: unless zeros are asked for, so reads of never-written memory show.
    poison: bool = True
    #: At the end of a kernel, every flag that was set must have been waited on.
    flag_balance: bool = True
    #: Keep per-instruction events for the Chrome trace (cheap; turn off for huge timing runs).
    trace: bool = True


DEFAULT_CHECKS = Checks()
