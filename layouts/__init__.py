"""Fractal data layouts of the Ascend 910C cube unit, as pure data-format code.

Implements reference sections 16 ("Fractal layouts": Nz for L1/GM/L0C, Zz for
L0A, Zn for L0B, C0 = 32 B / itemsize, 16 x 16 fractals in L0C) and 17 ("KV
cache in NZ", paged).  No hardware model here: shapes, element offsets and
ND <-> fractal conversions on numpy arrays (numba-jitted for large arrays).
"""

from .fractal import (
    JIT_THRESHOLD,
    nd_to_nz,
    nd_to_zn,
    nd_to_zz,
    nz_to_nd,
    zn_to_nd,
    zz_to_nd,
)
from .kvcache import kv_nz_block_shape, kv_nz_gather, kv_nz_offset, kv_nz_scatter
from .shapes import (
    FRACTAL_ROWS,
    SUPPORTED_DTYPES,
    as_dtype,
    c0_of,
    ceil_div,
    fractal_count,
    nz_offset,
    nz_shape,
    padded_shape,
    round_up,
    zn_offset,
    zn_shape,
    zz_offset,
    zz_shape,
)

__all__ = [
    "FRACTAL_ROWS",
    "JIT_THRESHOLD",
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
    "nd_to_nz",
    "nz_to_nd",
    "nd_to_zz",
    "zz_to_nd",
    "nd_to_zn",
    "zn_to_nd",
    "kv_nz_block_shape",
    "kv_nz_offset",
    "kv_nz_scatter",
    "kv_nz_gather",
]
