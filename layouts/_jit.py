"""Numba kernels for ND <-> fractal conversion (imported lazily: numba is slow to import).

Both kernels work on flat raw unsigned-integer views (uint8 / uint16 / uint32
by itemsize) of C-contiguous arrays, so each has at most three
specialisations.  A fractal layout is described by the element offset of ND
element (r, c)::

    (r // ra) * SR + (r % ra) * sr + (c // ca) * SC + (c % ca) * sc

which covers Nz, Zz and Zn (see ``fractal._spec``).  The kernels walk one
fractal at a time with unsigned index arithmetic (no negative-index
wraparound checks, so LLVM vectorises the contiguous copies).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types

_U = np.uint64

# Explicit signatures: exactly one compiled (and disk-cached) specialisation
# per unsigned element width; src is declared read-only so writable and
# read-only inputs share it.
_SIGS = [
    types.void(types.Array(t, 1, "C", readonly=True), types.Array(t, 1, "C"), *([types.int64] * 9))
    for t in (types.uint8, types.uint16, types.uint32)
]


@numba.njit(_SIGS, cache=True, nogil=True)
def nd_to_frac_kernel(src, dst, nb, nr, nc, ra, sr_big, sr, ca, sc_big, sc):  # pragma: no cover
    """src flat (nb*nr*nc) ND -> dst flat (nb*S) fractal; dst must be zero-filled."""
    nr = _U(nr)
    nc = _U(nc)
    ra = _U(ra)
    ca = _U(ca)
    sr_big = _U(sr_big)
    sr = _U(sr)
    sc_big = _U(sc_big)
    sc = _U(sc)
    r1 = (nr + ra - _U(1)) // ra
    c1 = (nc + ca - _U(1)) // ca
    total = r1 * c1 * ra * ca
    for b in range(_U(nb)):
        sb = b * nr * nc
        ob = b * total
        for fr in range(r1):
            r_lo = fr * ra
            n_i = min(ra, nr - r_lo)
            for fc in range(c1):
                c_lo = fc * ca
                n_j = min(ca, nc - c_lo)
                o = ob + fr * sr_big + fc * sc_big
                s0 = sb + r_lo * nc + c_lo
                if sc == _U(1):
                    for i in range(n_i):
                        oi = o + i * sr
                        si = s0 + i * nc
                        for j in range(n_j):
                            dst[oi + j] = src[si + j]
                else:
                    for i in range(n_i):
                        oi = o + i * sr
                        si = s0 + i * nc
                        for j in range(n_j):
                            dst[oi + j * sc] = src[si + j]


@numba.njit(_SIGS, cache=True, nogil=True)
def frac_to_nd_kernel(src, dst, nb, nr, nc, ra, sr_big, sr, ca, sc_big, sc):  # pragma: no cover
    """src flat (nb*S) fractal -> dst flat (nb*nr*nc) ND; padding dropped."""
    nr = _U(nr)
    nc = _U(nc)
    ra = _U(ra)
    ca = _U(ca)
    sr_big = _U(sr_big)
    sr = _U(sr)
    sc_big = _U(sc_big)
    sc = _U(sc)
    r1 = (nr + ra - _U(1)) // ra
    c1 = (nc + ca - _U(1)) // ca
    total = r1 * c1 * ra * ca
    for b in range(_U(nb)):
        db = b * nr * nc
        ob = b * total
        for fr in range(r1):
            r_lo = fr * ra
            n_i = min(ra, nr - r_lo)
            for fc in range(c1):
                c_lo = fc * ca
                n_j = min(ca, nc - c_lo)
                o = ob + fr * sr_big + fc * sc_big
                d0 = db + r_lo * nc + c_lo
                if sc == _U(1):
                    for i in range(n_i):
                        oi = o + i * sr
                        di = d0 + i * nc
                        for j in range(n_j):
                            dst[di + j] = src[oi + j]
                else:
                    for i in range(n_i):
                        oi = o + i * sr
                        di = d0 + i * nc
                        for j in range(n_j):
                            dst[di + j] = src[oi + j * sc]


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def flat_uint_view(a: np.ndarray) -> np.ndarray:
    """Flat raw unsigned-integer view of ``a`` (copied to C order if needed)."""
    return np.ascontiguousarray(a).reshape(-1).view(_UINT[a.dtype.itemsize])
