"""Pipes, hardware events and their legality: the names of Ascend C's sync vocabulary.

`Pipe` mirrors Ascend C's `pipe_t` (PIPE_S, PIPE_V, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3,
PIPE_FIX, PIPE_ALL). `HardEvent` mirrors `HardEvent::SRC_DST`: a flag set by the SRC pipe
after its earlier work and waited on by the DST pipe. Legal pairs per core kind come from
[核内同步能力概述.md] (ascend-910c.md §8).
"""
from __future__ import annotations

import enum


class Pipe(enum.IntEnum):
    PIPE_S = 0
    PIPE_V = 1
    PIPE_M = 2
    PIPE_MTE1 = 3
    PIPE_MTE2 = 4
    PIPE_MTE3 = 5
    PIPE_FIX = 6
    PIPE_ALL = 7

    @property
    def short(self) -> str:
        return self.name[5:]


PIPE_S, PIPE_V, PIPE_M = Pipe.PIPE_S, Pipe.PIPE_V, Pipe.PIPE_M
PIPE_MTE1, PIPE_MTE2, PIPE_MTE3 = Pipe.PIPE_MTE1, Pipe.PIPE_MTE2, Pipe.PIPE_MTE3
PIPE_FIX, PIPE_ALL = Pipe.PIPE_FIX, Pipe.PIPE_ALL

N_PIPES = 7  # execution pipes; PIPE_ALL only names barriers

# Pipes that exist on each core kind [arch]: AIC = Scalar + Cube + MTE1/2/3 + FixPipe;
# AIV = Scalar + Vector + MTE2/3.
CORE_PIPES = {
    "aic": (Pipe.PIPE_S, Pipe.PIPE_M, Pipe.PIPE_MTE1, Pipe.PIPE_MTE2, Pipe.PIPE_MTE3, Pipe.PIPE_FIX),
    "aiv": (Pipe.PIPE_S, Pipe.PIPE_V, Pipe.PIPE_MTE2, Pipe.PIPE_MTE3),
}


class HardEvent(enum.Enum):
    """`HardEvent::SRC_DST`: value = (source pipe, destination pipe)."""

    MTE2_MTE1 = (Pipe.PIPE_MTE2, Pipe.PIPE_MTE1)
    MTE1_MTE2 = (Pipe.PIPE_MTE1, Pipe.PIPE_MTE2)
    MTE1_M = (Pipe.PIPE_MTE1, Pipe.PIPE_M)
    M_MTE1 = (Pipe.PIPE_M, Pipe.PIPE_MTE1)
    MTE2_V = (Pipe.PIPE_MTE2, Pipe.PIPE_V)
    V_MTE2 = (Pipe.PIPE_V, Pipe.PIPE_MTE2)
    MTE3_V = (Pipe.PIPE_MTE3, Pipe.PIPE_V)
    V_MTE3 = (Pipe.PIPE_V, Pipe.PIPE_MTE3)
    M_V = (Pipe.PIPE_M, Pipe.PIPE_V)
    V_M = (Pipe.PIPE_V, Pipe.PIPE_M)
    V_V = (Pipe.PIPE_V, Pipe.PIPE_V)
    MTE3_MTE1 = (Pipe.PIPE_MTE3, Pipe.PIPE_MTE1)
    MTE1_MTE3 = (Pipe.PIPE_MTE1, Pipe.PIPE_MTE3)
    MTE1_V = (Pipe.PIPE_MTE1, Pipe.PIPE_V)
    MTE2_M = (Pipe.PIPE_MTE2, Pipe.PIPE_M)
    M_MTE2 = (Pipe.PIPE_M, Pipe.PIPE_MTE2)
    V_MTE1 = (Pipe.PIPE_V, Pipe.PIPE_MTE1)
    M_FIX = (Pipe.PIPE_M, Pipe.PIPE_FIX)
    FIX_M = (Pipe.PIPE_FIX, Pipe.PIPE_M)
    MTE3_MTE2 = (Pipe.PIPE_MTE3, Pipe.PIPE_MTE2)
    MTE2_MTE3 = (Pipe.PIPE_MTE2, Pipe.PIPE_MTE3)
    S_V = (Pipe.PIPE_S, Pipe.PIPE_V)
    V_S = (Pipe.PIPE_V, Pipe.PIPE_S)
    S_MTE2 = (Pipe.PIPE_S, Pipe.PIPE_MTE2)
    MTE2_S = (Pipe.PIPE_MTE2, Pipe.PIPE_S)
    S_MTE3 = (Pipe.PIPE_S, Pipe.PIPE_MTE3)
    MTE3_S = (Pipe.PIPE_MTE3, Pipe.PIPE_S)
    MTE2_FIX = (Pipe.PIPE_MTE2, Pipe.PIPE_FIX)
    FIX_MTE2 = (Pipe.PIPE_FIX, Pipe.PIPE_MTE2)
    FIX_S = (Pipe.PIPE_FIX, Pipe.PIPE_S)
    M_S = (Pipe.PIPE_M, Pipe.PIPE_S)
    FIX_MTE3 = (Pipe.PIPE_FIX, Pipe.PIPE_MTE3)
    MTE1_FIX = (Pipe.PIPE_MTE1, Pipe.PIPE_FIX)
    FIX_MTE1 = (Pipe.PIPE_FIX, Pipe.PIPE_MTE1)

    # Members are singletons compared by identity, so they hash by identity too: in C, where Enum's own hash calls
    # back into Python (every set_flag / wait_flag looks events up a few times). Nothing iterates a set of events
    # for its logic, so the order of such sets cannot change a result.
    __hash__ = object.__hash__

    @property
    def src(self) -> Pipe:
        return self.value[0]

    @property
    def dst(self) -> Pipe:
        return self.value[1]


_E = HardEvent
# The legal pairs of ascend-910c.md §8 ([核内同步能力概述.md]).
LEGAL_EVENTS = {
    "aic": frozenset({_E.M_MTE1, _E.M_MTE2, _E.M_FIX, _E.MTE1_M, _E.MTE1_MTE2, _E.MTE1_MTE3, _E.MTE1_FIX,
                      _E.MTE2_M, _E.MTE2_MTE1, _E.MTE2_MTE3, _E.MTE3_MTE1, _E.MTE3_MTE2, _E.FIX_M,
                      _E.FIX_MTE1}),
    "aiv": frozenset({_E.S_V, _E.S_MTE2, _E.S_MTE3, _E.V_S, _E.V_MTE2, _E.V_MTE3, _E.MTE2_S, _E.MTE2_V,
                      _E.MTE2_MTE3, _E.MTE3_S, _E.MTE3_V, _E.MTE3_MTE2}),
}
