"""The cube unit (PIPE_M): Mmad, L0A (Zz) × L0B (Zn) → L0C (Nz, 16×16 fractals).

The arithmetic is handed to BLAS: int8 in float32 when k ≤ 1024 (every partial sum is an
integer below 2^24, so exact in any order) and in float64 otherwise (|Σ| < 2^53); the int32
accumulator wraps as two's complement. Float inputs give exact
products; the sum is formed in float64 and rounded once to fp32 (at most as far from the
true value as the cube's own fp32 accumulation, which the tests bound by a tolerance).
Whole fractals are computed (padding rows and columns included, from whatever L0A/L0B
hold there); k stops at k.
"""
from __future__ import annotations

import numpy as np

from . import costs
from .errors import AlignmentError, DTypeError, ParamError
from .layouts import zn_to_nd, zz_to_nd
from .numerics import dtype_name
from .params import MmadParams
from .pipes import Pipe

# (A dtype, B dtype) → C dtype [Mmad.md]
MMAD_TYPES = {("int8", "int8"): "int32", ("float16", "float16"): "float32",
              ("bfloat16", "bfloat16"): "float32", ("float32", "float32"): "float32"}


def _ceil(a: int, b: int) -> int:
    return costs.ceil_div(a, b) * b


class CubeInstructions:
    """Cube instructions of `ctx` (mixed into CoreContext)."""

    def mmad(self, dst, fm, filter, params: MmadParams, bias=None) -> None:
        """`Mmad(dst, fm, filter[, bias], MmadParams)`: C = A·B (cmatrix_init_val), C += A·B, or
        C = bias + A·B (cmatrix_source, bias in the BiasTable)."""
        core = self._core
        c = core.local(dst, ("L0C",), "mmad dst")
        a = core.local(fm, ("L0A",), "mmad fm (A)")
        b = core.local(filter, ("L0B",), "mmad filter (B)")
        p = params
        key = (dtype_name(a.dtype), dtype_name(b.dtype))
        if key not in MMAD_TYPES or dtype_name(c.dtype) != MMAD_TYPES[key]:
            ok = ", ".join(f"{x}×{y}→{z}" for (x, y), z in MMAD_TYPES.items())
            raise DTypeError(f"mmad {key[0]}×{key[1]}→{dtype_name(c.dtype)} is not a cube type on 910B/C; "
                             f"legal: {ok} (no FP8)", where=core.label)
        for v, nm in ((p.m, "m"), (p.n, "n"), (p.k, "k")):
            if not 0 <= v <= 4095:
                raise ParamError(f"mmad {nm} = {v} is outside 0..4095", where=core.label)
        for t, al, nm in ((a, self.spec.l0a_align_bytes, "fm"), (b, self.spec.l0b_align_bytes, "filter"),
                          (c, self.spec.mmad_l0c_align_bytes, "dst")):
            if t.offset % al:
                raise AlignmentError(f"mmad {nm}: {t.kind} address {t.offset:#x} is not {al} B aligned",
                                     where=core.label)
        if p.m == 0 or p.n == 0 or p.k == 0:
            core.issue("mmad", Pipe.PIPE_M, 0)
            return
        k0 = self.spec.block_bytes // a.dtype.itemsize
        mp, np_, kp = _ceil(p.m, 16), _ceil(p.n, 16), _ceil(p.k, k0)
        gemv = p.m == 1 and not p.disable_gemv
        reads = [core.span(a, 0, kp if gemv else mp * kp, "mmad fm (A)"), core.span(b, 0, kp * np_, "mmad filter (B)")]
        writes = [core.span(c, 0, mp * np_, "mmad dst")]
        if p.cmatrix_source:
            if bias is None:
                raise ParamError("mmad: cmatrix_source needs a bias tensor in the BiasTable", where=core.label)
            bias = core.local(bias, ("BT",), "mmad bias")
            if bias.dtype != c.dtype:
                raise DTypeError(f"mmad bias is {dtype_name(bias.dtype)}; it must be {dtype_name(c.dtype)}",
                                 where=core.label)
            reads.append(core.span(bias, 0, np_, "mmad bias"))
        elif not p.cmatrix_init_val:
            reads.append(writes[0])
        core.issue("mmad", Pipe.PIPE_M, costs.mmad(self.spec, p.m, p.n, p.k, key[0], a.dtype.itemsize), reads, writes)
        ops = 2 * p.m * p.n * p.k
        core.stats.cube_ops += ops
        core.stats.cube_ops_by_dtype[key[0]] = core.stats.cube_ops_by_dtype.get(key[0], 0) + ops
        if not self.functional:
            return
        if gemv:  # the 1×k row is read as ND; the other 15 rows of the fractal are computed from zeros
            a_nd = np.zeros((mp, p.k), a.dtype)
            a_nd[0] = a.flat_view(0, p.k)
        else:
            a_nd = zz_to_nd(a.flat_view(0, mp * kp).reshape(mp // 16, kp // k0, 16, k0), (mp, kp))[:, :p.k]
        b_nd = zn_to_nd(b.flat_view(0, kp * np_).reshape(kp // k0, np_ // 16, 16, k0), (kp, np_))[:p.k, :]
        if c.dtype.kind == "i" and p.k <= 1024:
            # |Σ| ≤ 1024 · 128 · 128 = 2^24: every partial sum is an integer float32 holds exactly
            prod = (a_nd.astype(np.float32) @ b_nd.astype(np.float32)).astype(np.float64)
        else:
            prod = a_nd.astype(np.float64) @ b_nd.astype(np.float64)  # (mp, np_)
        cv = c.flat_view(0, mp * np_).reshape(np_ // 16, mp // 16, 16, 16)  # Nz with 16×16 fractals
        if p.cmatrix_source:
            prod = prod + bias.flat_view(0, np_).astype(np.float64)[None, :]
        elif not p.cmatrix_init_val:
            prod = prod + cv.transpose(1, 2, 0, 3).reshape(mp, np_).astype(np.float64)
        if c.dtype.kind == "i":
            res = prod.astype(np.int64).astype(np.int32)
        else:
            with np.errstate(all="ignore"):
                res = prod.astype(np.float32)
        cv[...] = res.reshape(mp // 16, 16, np_ // 16, 16).transpose(2, 0, 1, 3)
