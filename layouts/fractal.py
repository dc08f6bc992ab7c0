"""ND <-> Nz / Zz / Zn conversions (reference section 16).

All conversions zero-pad to whole fractals and accept leading batch dims
(..., R, C).  Two implementations give byte-identical results:

* numpy: zero pad + reshape + transpose (C speed, no compile cost);
* numba: one pass over raw uint8/uint16/uint32 views (``_jit.py``).

``method="auto"`` picks numba for arrays of at least ``JIT_THRESHOLD``
elements, numpy otherwise; ``method="numpy"`` / ``"jit"`` force one.
"""

from __future__ import annotations

import operator

import numpy as np

from .shapes import FRACTAL_ROWS, _resolve_c0, as_dtype

__all__ = [
    "JIT_THRESHOLD",
    "nd_to_nz",
    "nz_to_nd",
    "nd_to_zz",
    "zz_to_nd",
    "nd_to_zn",
    "zn_to_nd",
]

#: Element count from which ``method="auto"`` uses the numba kernels.
#: Measured (2-core dev box): numba dispatch costs ~15 us, so numpy wins below
#: ~64 Ki elements; at 4096 x 4096 fp16 numba is ~2-3x faster than numpy
#: (Nz 8 ms vs 22 ms, Zz 9 vs 12-21 ms, Zn 7 vs 16 ms; inverse similar).
JIT_THRESHOLD = 1 << 16

_METHODS = ("auto", "numpy", "jit")


def _spec(fmt: str, c0: int):
    """(ra, ca, perm): ND (R, C) is padded to (R1*ra, C1*ca), reshaped to
    (R1, ra, C1, ca) and transposed by ``perm`` to the stored 4-D shape."""
    if fmt == "nz":  # (C1, R1, 16, C0)
        return FRACTAL_ROWS, c0, (2, 0, 1, 3)
    if fmt == "zz":  # (M1, K1, 16, K0)
        return FRACTAL_ROWS, c0, (0, 2, 1, 3)
    if fmt == "zn":  # rows = k (C0 per fractal), cols = n (16): (K1, N1, 16n, K0k)
        return c0, FRACTAL_ROWS, (0, 2, 3, 1)
    raise AssertionError(fmt)


def _geometry(fmt, rows, cols, c0):
    ra, ca, perm = _spec(fmt, c0)
    r1, c1 = -(-rows // ra), -(-cols // ca)
    src4 = (r1, ra, c1, ca)
    stored = tuple(src4[p] for p in perm)
    return ra, ca, r1, c1, perm, stored


def _check_array(fn, x, min_ndim=2):
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{fn}: expected a numpy array, got {type(x).__name__}")
    try:
        as_dtype(x.dtype)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None
    if x.ndim < min_ndim:
        raise ValueError(f"{fn}: expected an array with >= {min_ndim} dims, got shape {x.shape}")


def _check_method(fn, method):
    if method not in _METHODS:
        raise ValueError(f"{fn}: method must be one of {_METHODS}, got {method!r}")


def _use_jit(method, size):
    return method == "jit" or (method == "auto" and size >= JIT_THRESHOLD)


def _strides(stored, perm):
    """Element strides (SR, sr, SC, sc) of axes R1, ra, C1, ca in the stored array."""
    st = [1] * 4
    for i in range(2, -1, -1):
        st[i] = st[i + 1] * stored[i + 1]
    by_src = [0] * 4
    for i, p in enumerate(perm):
        by_src[p] = st[i]
    return by_src  # [SR, sr, SC, sc]


def _to_frac(fn, fmt, x, c0, method):
    _check_array(fn, x)
    _check_method(fn, method)
    c0 = _resolve_c0(fn, x.dtype, c0)
    *batch, rows, cols = x.shape
    ra, ca, r1, c1, perm, stored = _geometry(fmt, rows, cols, c0)
    if _use_jit(method, x.size):
        return _to_frac_jit(x, batch, ra, ca, perm, stored)
    return _to_frac_numpy(x, batch, ra, ca, r1, c1, perm, stored)


def _to_frac_numpy(x, batch, ra, ca, r1, c1, perm, stored):
    rows, cols = x.shape[-2:]
    rp, cp = r1 * ra, c1 * ca
    if (rp, cp) != (rows, cols):
        padded = np.zeros((*batch, rp, cp), dtype=x.dtype)
        padded[..., :rows, :cols] = x
    else:
        padded = x
    nb = len(batch)
    axes = tuple(range(nb)) + tuple(nb + p for p in perm)
    four = padded.reshape(*batch, r1, ra, c1, ca).transpose(axes)
    return np.ascontiguousarray(four)


def _to_frac_jit(x, batch, ra, ca, perm, stored):
    from . import _jit

    rows, cols = x.shape[-2:]
    nbatch = int(np.prod(batch, dtype=np.int64))
    src = _jit.flat_uint_view(x)
    dst = np.zeros(nbatch * int(np.prod(stored, dtype=np.int64)), dtype=src.dtype)
    sr_big, sr, sc_big, sc = _strides(stored, perm)
    _jit.nd_to_frac_kernel(src, dst, nbatch, rows, cols, ra, sr_big, sr, ca, sc_big, sc)
    return dst.view(x.dtype).reshape(*batch, *stored)


def _to_nd(fn, fmt, xf, shape, c0, method, in_name):
    _check_array(fn, xf, min_ndim=4)
    _check_method(fn, method)
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise ValueError(f"{fn}: shape must be a sequence of ints, got {shape!r}") from None
    if len(shape) < 2 or any(s < 0 for s in shape):
        raise ValueError(f"{fn}: ND shape must be (..., rows, cols) with sizes >= 0, got {shape}")
    c0 = _resolve_c0(fn, xf.dtype, c0)
    *batch, rows, cols = shape
    ra, ca, r1, c1, perm, stored = _geometry(fmt, rows, cols, c0)
    expected = (*batch, *stored)
    if xf.shape != expected:
        raise ValueError(
            f"{fn}: {in_name} shape {xf.shape} does not match ND shape {shape} "
            f"{xf.dtype.name}: expected {expected}"
        )
    if _use_jit(method, xf.size):
        return _to_nd_jit(xf, batch, rows, cols, ra, ca, perm, stored)
    nb = len(batch)
    inv = tuple(int(i) for i in np.argsort(perm))
    axes = tuple(range(nb)) + tuple(nb + i for i in inv)
    padded = xf.transpose(axes).reshape(*batch, r1 * ra, c1 * ca)
    return np.ascontiguousarray(padded[..., :rows, :cols])


def _to_nd_jit(xf, batch, rows, cols, ra, ca, perm, stored):
    from . import _jit

    nbatch = int(np.prod(batch, dtype=np.int64))
    src = _jit.flat_uint_view(xf)
    dst = np.empty(nbatch * rows * cols, dtype=src.dtype)
    sr_big, sr, sc_big, sc = _strides(stored, perm)
    _jit.frac_to_nd_kernel(src, dst, nbatch, rows, cols, ra, sr_big, sr, ca, sc_big, sc)
    return dst.view(xf.dtype).reshape(*batch, rows, cols)


# ------------------------------------------------------------------ public


def nd_to_nz(x: np.ndarray, *, c0: int | None = None, method: str = "auto") -> np.ndarray:
    """ND (..., M, N) -> Nz (..., N1, M1, 16, C0), zero padded (section 16, Nz row).

    ``c0=16`` for fp32/int32 gives the L0C (16 x 16 fractal) layout.
    """
    return _to_frac("nd_to_nz", "nz", x, c0, method)


def nz_to_nd(x_nz: np.ndarray, shape, *, c0: int | None = None, method: str = "auto") -> np.ndarray:
    """Nz (..., N1, M1, 16, C0) -> ND ``shape`` = (..., M, N); padding dropped."""
    return _to_nd("nz_to_nd", "nz", x_nz, shape, c0, method, "x_nz")


def nd_to_zz(a: np.ndarray, *, c0: int | None = None, method: str = "auto") -> np.ndarray:
    """A (..., M, K) -> Zz (..., M1, K1, 16, K0), zero padded (section 16, Zz row; L0A)."""
    return _to_frac("nd_to_zz", "zz", a, c0, method)


def zz_to_nd(a_zz: np.ndarray, shape, *, c0: int | None = None, method: str = "auto") -> np.ndarray:
    """Zz (..., M1, K1, 16, K0) -> A with ND ``shape`` = (..., M, K)."""
    return _to_nd("zz_to_nd", "zz", a_zz, shape, c0, method, "a_zz")


def nd_to_zn(b: np.ndarray, *, c0: int | None = None, method: str = "auto") -> np.ndarray:
    """B (..., K, N) -> Zn (..., K1, N1, 16, K0), zero padded (section 16, Zn row; L0B).

    Fractal (k1, n1) holds B^T's 16 x K0 block: inner index [n % 16][k % K0].
    Hence ``nd_to_zn(W.T)`` is byte-identical to ``nd_to_nz(W)`` for W[N, K].
    """
    return _to_frac("nd_to_zn", "zn", b, c0, method)


def zn_to_nd(b_zn: np.ndarray, shape, *, c0: int | None = None, method: str = "auto") -> np.ndarray:
    """Zn (..., K1, N1, 16, K0) -> B with ND ``shape`` = (..., K, N)."""
    return _to_nd("zn_to_nd", "zn", b_zn, shape, c0, method, "b_zn")
