"""Dtypes, C0, fractal shapes and element offsets (reference section 16).

Naming (reference section 16): capital letter = order *between* fractals,
small letter = order *inside* a fractal; Z = row-major, N = column-major.

* Nz (L1, GM, L0C): an R x C matrix is stored as (C1, R1, 16, C0).
* Zz (L0A, A is M x K): stored as (M1, K1, 16, K0).
* Zn (L0B, B is K x N): stored as (K1, N1, 16, K0), fractal inner index
  [n % 16][k % K0].

R1 = ceil(R / 16), C1 = ceil(C / C0), C0 = 32 B / itemsize.  In L0C the
fractal is always 16 x 16, so pass ``c0=16`` for the L0C shape of fp32/int32.
"""

from __future__ import annotations

import operator

import ml_dtypes
import numpy as np

__all__ = [
    "FRACTAL_ROWS",
    "FRACTAL_BYTES_PER_ROW",
    "SUPPORTED_DTYPES",
    "as_dtype",
    "c0_of",
    "ceil_div",
    "round_up",
    "nz_shape",
    "zz_shape",
    "zn_shape",
    "fractal_count",
    "padded_shape",
    "nz_offset",
    "zz_offset",
    "zn_offset",
]

#: Rows of a fractal (the "16" of 16 x C0).
FRACTAL_ROWS = 16
#: A fractal row is 32 bytes: C0 = 32 / itemsize.
FRACTAL_BYTES_PER_ROW = 32

#: Element types the cube / fractal formats accept, by name.
SUPPORTED_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "int16": np.dtype(np.int16),
    "uint16": np.dtype(np.uint16),
    "int32": np.dtype(np.int32),
    "uint32": np.dtype(np.uint32),
}


def as_dtype(dtype) -> np.dtype:
    """Normalise ``dtype`` (numpy dtype, scalar type such as
    ``ml_dtypes.bfloat16``, or a name string) to a supported ``np.dtype``.

    Raises ValueError naming the dtype if it is not a supported fractal type.
    """
    if isinstance(dtype, str):
        dt = SUPPORTED_DTYPES.get(dtype)
        if dt is None:
            raise ValueError(
                f"unsupported dtype {dtype!r}: expected one of {sorted(SUPPORTED_DTYPES)}"
            )
        return dt
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(
            f"unsupported dtype {dtype!r}: expected one of {sorted(SUPPORTED_DTYPES)}"
        ) from exc
    # note: never compare a dtype with None (np.dtype(None) is float64)
    known = SUPPORTED_DTYPES.get(dt.name)
    if known is not None and known != dt:
        raise ValueError(f"unsupported dtype {dt.str!r}: only native byte order is supported")
    if known is None:
        raise ValueError(
            f"unsupported dtype {dt.name!r}: expected one of {sorted(SUPPORTED_DTYPES)}"
        )
    return dt


def c0_of(dtype) -> int:
    """C0 = 32 B / sizeof(T): 8 (fp32/int32), 16 (fp16/bf16/int16), 32 (int8/uint8).

    Reference section 16.  int4 (C0 = 64) has no numpy storage type and is
    rejected.
    """
    return FRACTAL_BYTES_PER_ROW // as_dtype(dtype).itemsize


def _nonneg_int(fn: str, name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{fn}: {name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{fn}: {name} must be an integer, got {value!r}") from None
    if v < 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {v}")
    return v


def _pos_int(fn: str, name: str, value) -> int:
    v = _nonneg_int(fn, name, value)
    if v == 0:
        raise ValueError(f"{fn}: {name} must be > 0, got 0")
    return v


def _resolve_c0(fn: str, dtype, c0) -> int:
    """C0 of ``dtype`` unless an explicit positive ``c0`` override is given."""
    try:
        natural = c0_of(dtype)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None
    return natural if c0 is None else _pos_int(fn, "c0", c0)


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0."""
    a = _nonneg_int("ceil_div", "a", a)
    b = _pos_int("ceil_div", "b", b)
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """Smallest multiple of b that is >= a (a >= 0, b > 0)."""
    return ceil_div(a, b) * b


def _blocks(fn, rows, cols, dtype, c0, names=("rows", "cols")):
    """(R1, C1, C0) for an R x C matrix whose fractal is 16 x C0."""
    rows = _nonneg_int(fn, names[0], rows)
    cols = _nonneg_int(fn, names[1], cols)
    c0 = _resolve_c0(fn, dtype, c0)
    return -(-rows // FRACTAL_ROWS), -(-cols // c0), c0


def nz_shape(rows: int, cols: int, dtype, *, c0: int | None = None) -> tuple:
    """Nz storage shape (C1, R1, 16, C0) of a rows x cols matrix (section 16).

    ``c0=16`` with float32/int32 gives the L0C shape.
    """
    r1, c1, c0 = _blocks("nz_shape", rows, cols, dtype, c0)
    return (c1, r1, FRACTAL_ROWS, c0)


def zz_shape(m: int, k: int, dtype, *, c0: int | None = None) -> tuple:
    """Zz (L0A) storage shape (M1, K1, 16, K0) of A[M, K] (section 16)."""
    m1, k1, c0 = _blocks("zz_shape", m, k, dtype, c0, ("m", "k"))
    return (m1, k1, FRACTAL_ROWS, c0)


def zn_shape(k: int, n: int, dtype, *, c0: int | None = None) -> tuple:
    """Zn (L0B) storage shape (K1, N1, 16, K0) of B[K, N] (section 16).

    Fractal (k1, n1) holds the 16 x K0 block of B^T: inner index [n%16][k%K0].
    """
    # rows of the fractal run over n (16), columns over k (C0)
    n1, k1, c0 = _blocks("zn_shape", n, k, dtype, c0, ("n", "k"))
    return (k1, n1, FRACTAL_ROWS, c0)


def fractal_count(rows: int, cols: int, dtype, *, c0: int | None = None) -> int:
    """Number of 16 x C0 fractals covering a rows x cols matrix: R1 * C1."""
    r1, c1, _ = _blocks("fractal_count", rows, cols, dtype, c0)
    return r1 * c1


def padded_shape(rows: int, cols: int, dtype, *, c0: int | None = None) -> tuple:
    """Zero-padded ND shape (R1*16, C1*C0) that Nz / Zz stores (section 16).

    For Zn of B[K, N] the padded shape is ``(round_up(K, C0), round_up(N, 16))``.
    """
    r1, c1, c0 = _blocks("padded_shape", rows, cols, dtype, c0)
    return (r1 * FRACTAL_ROWS, c1 * c0)


# ---------------------------------------------------------------- offsets


def _index(fn: str, name: str, value, limit: int):
    """Validate an integer index (scalar or array) against [0, limit)."""
    a = np.asarray(value)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{fn}: {name} must be integer, got dtype {a.dtype}")
    bad = (a < 0) | (a >= limit)
    if np.any(bad):
        first = a[bad].flat[0] if a.ndim else a
        raise IndexError(f"{fn}: {name}={int(first)} out of range [0, {limit})")
    return a.astype(np.int64, copy=False)


def _result(off, *inputs):
    if all(np.ndim(i) == 0 for i in inputs):
        return int(off)
    return off


def nz_offset(r, c, rows: int, cols: int, dtype, c0: int | None = None):
    """Element offset of (r, c) in the Nz layout of a rows x cols matrix.

    Reference section 16: ``(c//C0)·(R1·16·C0) + (r//16)·(16·C0) + (r%16)·C0 + c%C0``.
    Works on scalars (returns int) and on broadcastable integer arrays.
    """
    fn = "nz_offset"
    r1, _c1, c0 = _blocks(fn, rows, cols, dtype, c0)
    ri = _index(fn, "r", r, rows)
    ci = _index(fn, "c", c, cols)
    off = (ci // c0) * (r1 * 16 * c0) + (ri // 16) * (16 * c0) + (ri % 16) * c0 + ci % c0
    return _result(off, r, c)


def zz_offset(m, k, M: int, K: int, dtype, c0: int | None = None):
    """Element offset of A[m, k] in the Zz (L0A) layout of A[M, K].

    Reference section 16: ``(m//16)·(K1·16·C0) + (k//C0)·(16·C0) + (m%16)·C0 + k%C0``.
    """
    fn = "zz_offset"
    _m1, k1, c0 = _blocks(fn, M, K, dtype, c0, ("M", "K"))
    mi = _index(fn, "m", m, M)
    ki = _index(fn, "k", k, K)
    off = (mi // 16) * (k1 * 16 * c0) + (ki // c0) * (16 * c0) + (mi % 16) * c0 + ki % c0
    return _result(off, m, k)


def zn_offset(k, n, K: int, N: int, dtype, c0: int | None = None):
    """Element offset of B[k, n] in the Zn (L0B) layout of B[K, N].

    Reference section 16: ``(k//C0)·(N1·16·C0) + (n//16)·(16·C0) + (n%16)·C0 + k%C0``.
    """
    fn = "zn_offset"
    n1, _k1, c0 = _blocks(fn, N, K, dtype, c0, ("N", "K"))
    ki = _index(fn, "k", k, K)
    ni = _index(fn, "n", n, N)
    off = (ki // c0) * (n1 * 16 * c0) + (ni // 16) * (16 * c0) + (ni % 16) * c0 + ki % c0
    return _result(off, k, n)
