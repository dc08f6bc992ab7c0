"""Exact numeric semantics of the 910B/910C conversions, defined once.

Pure functions over NumPy arrays; no hardware state and no imports from the rest of ``ascendemu``.

* dtypes: :data:`DTYPES`, :func:`as_dtype`, :func:`dtype_name`, :func:`is_float`, :func:`is_int`.
* vector ``Cast`` (Ascend C ``AscendC::Cast``): :class:`RoundMode`, :data:`CAST_PAIRS`, :func:`check_cast_pair`,
  :func:`cast`.
* Fixpipe conversion on the way out of L0C (Ascend C ``Fixpipe`` with ``quantPre`` / ``deqScalar`` / ``reluEn``):
  :class:`QuantMode`, :func:`make_quant_word`, :func:`decode_quant_word`, :func:`quant_words`,
  :func:`fixpipe_convert`, :func:`fixpipe_out_dtype`.
* raw 16-bit patterns: :func:`fp16_bits`, :func:`from_fp16_bits`, :func:`bf16_bits`, :func:`from_bf16_bits`.

Reference: ``shared/reference/ascend-910c.md`` §3 (Cast rows), §12 (QuantMode_t, quant word, REQ8/DEQF16 algorithm),
§14 (Cast rounding modes). Where the hardware manual is silent (overflow, NaN to integer, int→int narrowing), the
choices below are the project's stated semantics and are marked "project semantics".
"""

from __future__ import annotations

import enum
import operator
from typing import NamedTuple

import ml_dtypes
from types import MappingProxyType

import numpy as np

__all__ = [
    "DTYPES", "as_dtype", "dtype_name", "is_float", "is_int",
    "RoundMode", "CAST_PAIRS", "check_cast_pair", "cast",
    "QuantMode", "QuantWord", "make_quant_word", "decode_quant_word", "quant_words",
    "fixpipe_convert", "fixpipe_out_dtype",
    "fp16_bits", "from_fp16_bits", "bf16_bits", "from_bf16_bits",
]

# ----------------------------------------------------------------------------------------------------------- dtypes

DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "int64": np.dtype(np.int64),
    "uint64": np.dtype(np.uint64),
}
_NAME_OF: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items()}
_F16, _BF16, _F32 = DTYPES["float16"], DTYPES["bfloat16"], DTYPES["float32"]
_FLOATS = frozenset({_F16, _BF16, _F32})


def _unsupported(x) -> TypeError:
    try:
        shown = repr(x) if isinstance(x, str) else repr(str(np.dtype(x)))
    except Exception:  # noqa: BLE001 - anything numpy cannot read as a dtype is shown as itself
        shown = repr(x)
    return TypeError(f"unsupported dtype {shown}; supported: {', '.join(DTYPES)}")


def as_dtype(x) -> np.dtype:
    """Canonical numpy dtype for a name ("float16", ...), a numpy dtype or scalar type, or ``ml_dtypes.bfloat16``.

    Only the names of :data:`DTYPES` are accepted as strings (no numpy aliases such as "f4" or "float").
    Anything else raises ``TypeError`` naming it and listing the supported names.
    """
    if isinstance(x, str):
        if x in DTYPES:
            return DTYPES[x]
        raise _unsupported(x)
    try:
        dt = np.dtype(x)
    except (TypeError, ValueError):
        raise _unsupported(x) from None
    if dt not in _NAME_OF:  # also rejects non-native byte orders
        raise _unsupported(x)
    return dt


def dtype_name(dt) -> str:
    """Canonical name ("float16", "bfloat16", ...) of anything :func:`as_dtype` accepts."""
    return _NAME_OF[as_dtype(dt)]


def is_float(dt) -> bool:
    """True for float16, bfloat16, float32 (note ``np.issubdtype(bfloat16, np.floating)`` is False)."""
    return as_dtype(dt) in _FLOATS


def is_int(dt) -> bool:
    """True for the signed and unsigned integer dtypes of :data:`DTYPES`."""
    return as_dtype(dt).kind in "iu"


# -------------------------------------------------------------------------------------------------- rounding modes


class RoundMode(enum.Enum):
    """Ascend C ``RoundMode`` of ``Cast`` (reference §14). CAST_HYBRID (hif8 only) does not exist on 910C."""

    CAST_NONE = "CAST_NONE"    # exact; CAST_RINT when the conversion is lossy
    CAST_RINT = "CAST_RINT"    # nearest, ties to even
    CAST_ROUND = "CAST_ROUND"  # nearest, ties away from zero
    CAST_FLOOR = "CAST_FLOOR"  # toward -inf
    CAST_CEIL = "CAST_CEIL"    # toward +inf
    CAST_TRUNC = "CAST_TRUNC"  # toward 0
    CAST_ODD = "CAST_ODD"      # round to odd (von Neumann): exact, else the neighbour with an odd last bit


def _as_mode(mode) -> RoundMode:
    if isinstance(mode, RoundMode):
        return mode
    if isinstance(mode, str) and mode in RoundMode.__members__:
        return RoundMode[mode]
    raise TypeError(f"rounding mode must be a RoundMode ({', '.join(RoundMode.__members__)}), got {mode!r}")


# ------------------------------------------------------------------------------------------------------ cast pairs

CAST_PAIRS: frozenset[tuple[str, str]] = frozenset({
    # §3 row "Cast int8/uint8/int16/int4 → half; half → int8/uint8/int16/int4" (128 elem/cycle).
    # int4 is left out: no numpy dtype in DTYPES.
    ("int8", "float16"), ("uint8", "float16"), ("int16", "float16"),
    ("float16", "int8"), ("float16", "uint8"), ("float16", "int16"),
    # §3 row "Cast half↔float, half→int32, bf16→float/int32, float→half/bf16/int16/int32, int16→float,
    # int32→half/int16/float" (64 elem/cycle).
    ("float16", "float32"), ("float32", "float16"),
    ("float16", "int32"),
    ("bfloat16", "float32"), ("bfloat16", "int32"),
    ("float32", "bfloat16"), ("float32", "int16"), ("float32", "int32"),
    ("int16", "float32"),
    ("int32", "float16"), ("int32", "int16"), ("int32", "float32"),
    # §3 row "Cast int32→int64, float→int64" (32 elem/cycle).
    ("int32", "int64"), ("float32", "int64"),
    # Not in the §3 table: float→float rounding to integral values (CAST_RINT/ROUND/FLOOR/CEIL/TRUNC), which the
    # Ascend C Cast page lists for Atlas A2 (910B/910C).
    ("float32", "float32"),
})
# Deliberately absent because the table does not list them (two-step routes):
#   int32 → int8/uint8: no direct vector cast; goes through half (int32→float16→int8) or int16.
#   float32 → int8/uint8: through half (float32→float16→int8).
#   bfloat16 → float16 and float16 → bfloat16: through float32.


def check_cast_pair(src, dst) -> tuple[str, str]:
    """Raise ``TypeError`` unless (src, dst) is a vector Cast pair of :data:`CAST_PAIRS`; return the names."""
    s, d = dtype_name(src), dtype_name(dst)
    if (s, d) in CAST_PAIRS:
        return s, d
    legal = sorted(b for a, b in CAST_PAIRS if a == s)
    if legal:
        raise TypeError(f"vector Cast has no {s} -> {d} pair; legal destinations for {s}: {', '.join(legal)}")
    sources = sorted({a for a, _ in CAST_PAIRS})
    raise TypeError(f"vector Cast has no {s} -> {d} pair; no Cast from {s} at all (sources: {', '.join(sources)})")


# ------------------------------------------------------------------------------------------------------------- cast

# Float formats: (precision incl. the hidden bit, minimum normal exponent, largest finite value).
_FMT = {
    _F16: (11, -14, 65504.0),
    _BF16: (8, -126, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)),
    _F32: (24, -126, float(np.finfo(np.float32).max)),
}


def _round_mag(t: np.ndarray, neg: np.ndarray, mode: RoundMode) -> np.ndarray:
    """Round non-negative finite float64 magnitudes ``t`` to integers by ``mode`` (``neg`` = sign of the value)."""
    k = np.floor(t)
    frac = t - k  # exact
    inexact = frac > 0
    odd = np.fmod(k, 2.0) == 1.0
    if mode in (RoundMode.CAST_RINT, RoundMode.CAST_NONE):
        up = (frac > 0.5) | ((frac == 0.5) & odd)
    elif mode is RoundMode.CAST_ROUND:
        up = frac >= 0.5
    elif mode is RoundMode.CAST_TRUNC:
        up = np.zeros_like(inexact)
    elif mode is RoundMode.CAST_FLOOR:
        up = inexact & neg
    elif mode is RoundMode.CAST_CEIL:
        up = inexact & ~neg
    else:  # CAST_ODD
        up = inexact & ~odd
    return k + up  # k + 1 is exact whenever frac > 0 (then k < 2**52)


def _round_integral(v: np.ndarray, mode: RoundMode) -> np.ndarray:
    """float64 → float64 rounded to an integral value; keeps the sign of zero; inf and NaN pass through."""
    with np.errstate(invalid="ignore"):
        fin = np.isfinite(v)
        a = np.where(fin, np.abs(v), 0.0)
        mag = _round_mag(a, np.signbit(v), mode)
        return np.where(fin, np.copysign(mag, v), v)


def _narrow(v: np.ndarray, dst: np.dtype, mode: RoundMode) -> np.ndarray:
    """float64 → float64 holding the ``dst`` value chosen by ``mode`` (exact neighbours; see :func:`cast`)."""
    p, emin, fmax = _FMT[dst]
    with np.errstate(all="ignore"):
        fin = np.isfinite(v)
        neg = np.signbit(v)
        a = np.where(fin, np.abs(v), 0.0)
        _, e2 = np.frexp(a)                      # a = m·2**e2, m in [0.5, 1)
        e = np.maximum(e2 - 1, emin)             # binade exponent, clamped to the subnormal range
        q = np.ldexp(1.0, e - (p - 1))           # one unit in the last place of the target at a
        mag = _round_mag(a / q, neg, mode) * q   # a/q and the product are exact (powers of two)
        over = mag > fmax
        if over.any():
            if mode in (RoundMode.CAST_NONE, RoundMode.CAST_RINT, RoundMode.CAST_ROUND):
                to_inf = over
            elif mode is RoundMode.CAST_FLOOR:
                to_inf = over & neg
            elif mode is RoundMode.CAST_CEIL:
                to_inf = over & ~neg
            else:  # CAST_TRUNC, CAST_ODD
                to_inf = np.zeros_like(over)
            mag = np.where(over, np.where(to_inf, np.inf, fmax), mag)
        return np.where(fin, np.copysign(mag, v), v)


def _int_to_f64(x: np.ndarray) -> np.ndarray:
    """Integers → float64: exact up to 32 bits; 64-bit integers are rounded to odd, so that a second rounding to
    ≤ 24 bits of precision (any mode) equals a single correct rounding of the integer."""
    if x.dtype.itemsize < 8:
        return x.astype(np.float64)
    hi = (x >> 32).astype(np.float64) * 4294967296.0  # exact
    lo = (x & 0xFFFFFFFF).astype(np.float64)           # exact
    s = hi + lo
    bb = s - hi
    err = (hi - (s - bb)) + (lo - bb)                  # TwoSum: hi + lo == s + err exactly
    fix = (err != 0) & ((s.view(np.uint64) & np.uint64(1)) == 0)
    if fix.any():
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s


def _float_to_int(v: np.ndarray, dst: np.dtype, mode: RoundMode) -> np.ndarray:
    info = np.iinfo(dst)
    r = _round_integral(v, mode)
    with np.errstate(invalid="ignore"):
        nan = np.isnan(r)
        over = r >= float(info.max + 1)  # powers of two: exact in float64
        under = r < float(info.min)
    out = np.where(nan | over | under, 0.0, r).astype(dst)
    out[over] = info.max
    out[under] = info.min
    return out


def _int_to_int(x: np.ndarray, dst: np.dtype) -> np.ndarray:
    si, di = np.iinfo(x.dtype), np.iinfo(dst)
    lo, hi = max(si.min, di.min), min(si.max, di.max)
    if lo > si.min or hi < si.max:
        x = np.clip(x, x.dtype.type(lo), x.dtype.type(hi))
    return x.astype(dst)


def cast(x, dst, mode: RoundMode) -> np.ndarray:
    """Convert ``x`` to ``dst`` exactly as the vector Cast does (Ascend C ``Cast(dst, src, roundMode, count)``).

    Does not check :data:`CAST_PAIRS` (see :func:`check_cast_pair`): any pair of :data:`DTYPES` is converted.
    ``mode`` is a :class:`RoundMode` (or its member name). Semantics:

    * float → float, narrowing (fp32→fp16/bf16, fp16→bf16, ...): the exact value lies between two neighbouring
      representable target values lo ≤ x ≤ hi (subnormals included); the mode picks one. RINT (and NONE): nearest,
      ties to the even last mantissa bit. ROUND: nearest, ties away from zero. FLOOR/CEIL/TRUNC: directed. ODD:
      x if representable, else the neighbour whose last mantissa bit is 1. Overflow (project semantics, IEEE 754
      §7.4; the manual does not say): RINT/ROUND/NONE give ±inf once the rounded value exceeds the largest finite
      value (i.e. from half an ulp above it); TRUNC gives ±max; FLOOR gives +max for positive and -inf for negative
      overflow; CEIL gives +inf for positive and -max for negative overflow; ODD gives ±max. A result that
      underflows to zero keeps the sign of x. NaN stays NaN; ±inf stays ±inf in every mode.
    * float → float, widening (fp16/bf16→fp32): exact.
    * float → same float type (float32→float32): round to an integral value in that type by the mode; CAST_NONE is
      the identity; CAST_ODD gives the odd integer neighbour of a non-integral x (project semantics). Zero keeps
      the sign of x (IEEE roundToIntegral).
    * float → integer: round to an integer by the mode (CAST_NONE = CAST_RINT, it is lossy), then SATURATE to the
      target range (±inf included); NaN → 0 (project semantics).
    * integer → float: exact when representable, else rounded by the mode (CAST_NONE = CAST_RINT), with the
      float overflow rules above (e.g. int32 → fp16 beyond 65520 under RINT is ±inf).
    * integer → integer: widening is exact; narrowing SATURATES to the target range (project semantics).
    """
    mode = _as_mode(mode)
    x = np.asarray(x)
    src = as_dtype(x.dtype)
    dst = as_dtype(dst)
    with np.errstate(invalid="ignore"):  # NaN bf16 ↔ float64 conversions warn in ml_dtypes
        return _cast(x, src, dst, mode)


def _cast(x: np.ndarray, src: np.dtype, dst: np.dtype, mode: RoundMode) -> np.ndarray:
    sf, df = src in _FLOATS, dst in _FLOATS
    if sf:
        v = x.astype(np.float64)  # exact for fp16/bf16/fp32
        if not df:
            return _float_to_int(v, dst, mode)
        if src == dst:
            return x.copy() if mode is RoundMode.CAST_NONE else _round_integral(v, mode).astype(dst)
        return _narrow(v, dst, mode).astype(dst)  # the value is representable: astype is exact
    if df:
        return _narrow(_int_to_f64(x), dst, mode).astype(dst)
    return _int_to_int(x, dst)


# -------------------------------------------------------------------------------------------------- 16-bit patterns


def _bits(x, dt: np.dtype, fn: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != dt:
        raise TypeError(f"{fn} expects a {_NAME_OF[dt]} array, got {x.dtype}; cast() it first")
    return x.view(np.uint16)


def _from_bits(u, dt: np.dtype, fn: str) -> np.ndarray:
    u = np.asarray(u)
    if u.dtype != np.uint16:
        raise TypeError(f"{fn} expects a uint16 array of raw bits, got {u.dtype}")
    return u.view(dt)


def fp16_bits(x) -> np.ndarray:
    """Raw uint16 bits of a float16 array (a view)."""
    return _bits(x, _F16, "fp16_bits")


def from_fp16_bits(u) -> np.ndarray:
    """float16 array (a view) from raw uint16 bits."""
    return _from_bits(u, _F16, "from_fp16_bits")


def bf16_bits(x) -> np.ndarray:
    """Raw uint16 bits of a bfloat16 array (a view)."""
    return _bits(x, _BF16, "bf16_bits")


def from_bf16_bits(u) -> np.ndarray:
    """bfloat16 array (a view) from raw uint16 bits."""
    return _from_bits(u, _BF16, "from_bf16_bits")


# ------------------------------------------------------------------------------------------ Fixpipe quantisation


class QuantMode(enum.Enum):
    """``QuantMode_t`` of Fixpipe on 910B/910C (reference §12). ``V…`` = one u64 word per output channel."""

    NoQuant = "NoQuant"            # fp32 → fp32, int32 → int32
    F322F16 = "F322F16"            # fp32 → fp16, round half even
    F322BF16 = "F322BF16"          # fp32 → bf16, round half even
    DEQF16 = "DEQF16"              # int32 → fp16, scalar word
    VDEQF16 = "VDEQF16"            # int32 → fp16, per-channel words
    QF322B8_PRE = "QF322B8_PRE"    # fp32 → int8/uint8, scalar word
    VQF322B8_PRE = "VQF322B8_PRE"  # fp32 → int8/uint8, per-channel words
    REQ8 = "REQ8"                  # int32 → int8/uint8, scalar word
    VREQ8 = "VREQ8"                # int32 → int8/uint8, per-channel words


# Quant word fields (reference §12 table).
_SCALE_MASK = 0xFFFFE000  # bits 31..13: sign, 8-bit exponent, 10-bit mantissa; bits 12..0 ignored
_SHIFT_POS, _MCB_POS, _OFFSET_POS, _SIGN_POS = 32, 36, 37, 46
_U64_MAX = (1 << 64) - 1

_SCALAR_MODES = {QuantMode.DEQF16, QuantMode.REQ8, QuantMode.QF322B8_PRE}
_VECTOR_MODES = {QuantMode.VDEQF16, QuantMode.VREQ8, QuantMode.VQF322B8_PRE}
_DEQ = {QuantMode.DEQF16, QuantMode.VDEQF16}
_ACC_DTYPE = {
    QuantMode.F322F16: _F32, QuantMode.F322BF16: _F32,
    QuantMode.DEQF16: DTYPES["int32"], QuantMode.VDEQF16: DTYPES["int32"],
    QuantMode.REQ8: DTYPES["int32"], QuantMode.VREQ8: DTYPES["int32"],
    QuantMode.QF322B8_PRE: _F32, QuantMode.VQF322B8_PRE: _F32,
}
# Public views of the tables above, for the FixPipe instruction (one home for the mode facts).
SCALAR_QUANT_MODES = frozenset(_SCALAR_MODES)  # take one quant word (deq_scalar)
VECTOR_QUANT_MODES = frozenset(_VECTOR_MODES)  # take one word per output channel
FIXPIPE_ACC_DTYPE = MappingProxyType(_ACC_DTYPE)  # mode → the L0C dtype it converts from
_SCALAR_OF = {QuantMode.VDEQF16: "DEQF16", QuantMode.VREQ8: "REQ8", QuantMode.VQF322B8_PRE: "QF322B8_PRE"}
_VECTOR_OF = {v: k.name for k, v in _SCALAR_OF.items()}


class QuantWord(NamedTuple):
    """Decoded Fixpipe quant word. ``scale`` is M1 as a Python float (an fp32 with a 10-bit mantissa)."""

    scale: float
    shift: int
    mcb: bool
    offset: int
    signed: bool


def _scale_bits(scale) -> np.ndarray:
    """fp32 bits (uint32) of the scales, mantissa truncated to 10 bits; ValueError if not finite in fp32."""
    s = np.asarray(scale)
    if s.dtype.kind not in "iuf" and s.dtype != _BF16:
        raise TypeError(f"quant word field 'scale' must be a real number, got {s.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        f = s.astype(np.float32)  # a Python float becomes the fp32 the host code would hold (round half even)
    if not np.isfinite(f).all():
        raise ValueError(f"quant word field 'scale' must be finite in fp32, got {scale!r}")
    return f.view(np.uint32) & np.uint32(_SCALE_MASK)


def _check_field(name: str, values, lo: int, hi: int) -> np.ndarray:
    v = np.asarray(values)
    if v.dtype == bool and name in ("shift", "offset") or v.dtype.kind not in "iub":
        raise TypeError(f"quant word field {name!r} must be an integer, got {values!r}")
    v = v.astype(np.int64)
    if ((v < lo) | (v > hi)).any():
        raise ValueError(f"quant word field {name!r} must be in {lo}..{hi}, got {values!r}")
    return v


def make_quant_word(scale: float, *, offset: int = 0, shift: int = 0, signed: bool = True,
                    mcb: bool = False) -> int:
    """Pack one Fixpipe quant word (``deqScalar``, u64) from its fields (reference §12 table).

    * bits 31..0 — M1: the fp32 bit pattern of ``scale`` (a Python float is first rounded to fp32, half even, as a
      host ``float`` would be) with bits 12..0 cleared, i.e. the mantissa TRUNCATED to 10 bits. Must be finite.
    * bits 35..32 — N, the right shift, raw 0..15. ⚠ The manual says code 0..15 means a shift of 1..16; the
      reference script (quant-py) shifts by the raw value. We follow the script: N is the shift amount itself.
    * bit 36 — MCB: the int32 input is shifted right by N and saturated to int16 before conversion.
    * bits 45..37 — offset, 9 bits. ⚠ The script reads them as unsigned; we choose 9-bit TWO'S COMPLEMENT,
      range -256..255. Reason: the offset is added to ``round(clip(y, -256, 255))`` and the result is clipped to
      [-128, 127] or [0, 255], so unsigned codes 256..511 could only ever saturate to the maximum, while negative
      offsets (int8 zero points below 0) are useful. Codes 0..255 mean the same under both readings, so the
      script's words with offset ≤ 255 decode identically.
    * bit 46 — sign: 1 → int8 output, 0 → uint8 (REQ8/QF322B8 modes; ignored by DEQF16).
    * bits 63..47 — reserved, written as 0 (ignored by :func:`decode_quant_word`).

    Out-of-range fields raise ``ValueError`` naming the field. Returns a Python int < 2**64.
    """
    return int(quant_words(scale, offset=offset, shift=shift, signed=signed, mcb=mcb))


def quant_words(scales, *, offset=0, shift=0, signed=True, mcb=False) -> np.ndarray:
    """Vectorised :func:`make_quant_word`: one uint64 word per element of ``scales`` (e.g. per output channel).

    ``offset``, ``shift``, ``signed`` and ``mcb`` are scalars or arrays broadcast against ``scales``.
    """
    m1 = _scale_bits(scales).astype(np.uint64)
    n = _check_field("shift", shift, 0, 15)
    off = _check_field("offset", offset, -256, 255)
    sgn = _check_field("signed", signed, 0, 1)
    mc = _check_field("mcb", mcb, 0, 1)
    try:
        m1, n, off, sgn, mc = np.broadcast_arrays(m1, n, off, sgn, mc)
    except ValueError:
        raise ValueError(f"quant word fields do not broadcast against scales of shape {np.shape(scales)}") from None
    u = np.uint64
    return (m1 | (n.astype(u) << u(_SHIFT_POS)) | (mc.astype(u) << u(_MCB_POS))
            | ((off & 0x1FF).astype(u) << u(_OFFSET_POS)) | (sgn.astype(u) << u(_SIGN_POS)))


def _fields(words: np.ndarray):
    """Vectorised decode of uint64 words → (M1 float32, shift int32, mcb bool, offset int32, signed bool)."""
    w = words.astype(np.uint64)
    u = np.uint64
    m1 = (w & u(_SCALE_MASK)).astype(np.uint32).view(np.float32)
    n = ((w >> u(_SHIFT_POS)) & u(0xF)).astype(np.int32)
    mcb = ((w >> u(_MCB_POS)) & u(1)).astype(bool)
    raw = ((w >> u(_OFFSET_POS)) & u(0x1FF)).astype(np.int32)
    off = np.where(raw >= 256, raw - 512, raw).astype(np.int32)
    sgn = ((w >> u(_SIGN_POS)) & u(1)).astype(bool)
    return m1, n, mcb, off, sgn


def decode_quant_word(word) -> QuantWord:
    """Fields of one quant word (see :func:`make_quant_word`); bits 12..0 and 63..47 are ignored."""
    try:
        w = operator.index(word)
    except TypeError:
        raise TypeError(f"quant word must be an integer, got {word!r}") from None
    if not 0 <= w <= _U64_MAX:
        raise ValueError(f"quant word must fit in u64 (0..2**64-1), got {w}")
    m1, n, mcb, off, sgn = _fields(np.array(w, dtype=np.uint64))
    return QuantWord(float(m1), int(n), bool(mcb), int(off), bool(sgn))


def _as_mode_q(mode) -> QuantMode:
    if isinstance(mode, QuantMode):
        return mode
    if isinstance(mode, str) and mode in QuantMode.__members__:
        return QuantMode[mode]
    raise TypeError(f"quant mode must be a QuantMode ({', '.join(QuantMode.__members__)}), got {mode!r}")


def _check_words(mode: QuantMode, words, n: int | None) -> np.ndarray:
    """Validated words as a uint64 array: 0-d for scalar modes, shape (n,) for per-channel modes."""
    m = mode.name
    if mode not in _SCALAR_MODES and mode not in _VECTOR_MODES:
        if words is not None:
            raise ValueError(f"Fixpipe {m} takes no quant words (words=None), got {words!r}")
        return np.zeros((), np.uint64)
    if words is None:
        what = "one scalar u64 quant word (deqScalar)" if mode in _SCALAR_MODES else f"a ({n},) uint64 word vector"
        raise ValueError(f"Fixpipe {m} needs {what}; got words=None")
    if mode in _SCALAR_MODES:
        if isinstance(words, np.ndarray) and words.ndim > 0:
            raise ValueError(f"Fixpipe {m} takes one scalar quant word, got an array of shape {words.shape}; "
                             f"use {_VECTOR_OF[m]} for per-channel words")
        if isinstance(words, (list, tuple)):
            raise ValueError(f"Fixpipe {m} takes one scalar quant word, got a {type(words).__name__}; "
                             f"use {_VECTOR_OF[m]} for per-channel words")
        if isinstance(words, bool) or not isinstance(words, (int, np.integer, np.ndarray)) or (
                isinstance(words, np.ndarray) and words.dtype.kind not in "iu"):
            raise TypeError(f"Fixpipe {m} quant word must be an integer (u64), got {words!r}")
        w = int(words)
        if not 0 <= w <= _U64_MAX:
            raise ValueError(f"Fixpipe {m} quant word must fit in u64, got {w}")
        return np.array(w, dtype=np.uint64)
    if isinstance(words, np.ndarray):
        w = words
    else:  # a sequence of Python ints (np.asarray would turn [2**63, 1] into float64)
        obj = np.asarray(words, dtype=object)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in obj.flat):
            raise TypeError(f"Fixpipe {m} needs a 1-D uint64 array of quant words, got {words!r}")
        if not all(0 <= int(v) <= _U64_MAX for v in obj.flat):
            raise ValueError(f"Fixpipe {m} quant words must fit in u64")
        w = np.array(obj.tolist(), dtype=np.uint64) if obj.ndim else np.array(int(obj[()]), dtype=np.uint64)
    if w.dtype.kind not in "iu":
        raise TypeError(f"Fixpipe {m} needs a 1-D uint64 array of quant words, got dtype {w.dtype}")
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"Fixpipe {m} needs one quant word per output channel: shape ({n},), got {w.shape}"
                         + ("; use " + _SCALAR_OF[mode] + " for one scalar word" if w.ndim == 0 else ""))
    if w.dtype.kind == "i" and (w < 0).any():
        raise ValueError(f"Fixpipe {m} quant words must be non-negative (u64)")
    return w.astype(np.uint64)


def _out_int_dtype(mode: QuantMode, sgn: np.ndarray) -> np.dtype:
    if sgn.size and not (sgn == sgn.flat[0]).all():
        raise ValueError(f"Fixpipe {mode.name}: per-channel words disagree on the sign bit (bit 46); "
                         "one output tensor is either int8 or uint8")
    return DTYPES["int8"] if (sgn.flat[0] if sgn.size else True) else DTYPES["uint8"]


def fixpipe_out_dtype(mode, words=None, *, acc_dtype=None) -> np.dtype:
    """Output dtype of :func:`fixpipe_convert` for ``mode`` (``acc_dtype`` is needed only for NoQuant).

    NoQuant → the accumulator dtype; F322F16/DEQF16/VDEQF16 → float16; F322BF16 → bfloat16; REQ8/QF322B8 modes →
    int8 if the word's sign bit (46) is set, else uint8.
    """
    mode = _as_mode_q(mode)
    if mode is QuantMode.NoQuant:
        if acc_dtype is None:
            raise ValueError("Fixpipe NoQuant keeps the accumulator dtype: pass acc_dtype (float32 or int32)")
        return as_dtype(acc_dtype)
    if mode in (QuantMode.F322F16, QuantMode.DEQF16, QuantMode.VDEQF16):
        return _F16
    if mode is QuantMode.F322BF16:
        return _BF16
    w = _check_words(mode, words, None if words is None else int(np.size(words)))
    return _out_int_dtype(mode, _fields(w)[4])


def fixpipe_convert(acc, mode, *, words=None, relu: bool = False) -> np.ndarray:
    """Fixpipe's on-the-fly conversion of an L0C tile (Ascend C ``Fixpipe`` ``quantPre``/``deqScalar``/``reluEn``).

    ``acc``: the L0C values, shape (..., n) with the last axis the output channel (column); float32 for float
    cubes, int32 for int8 cubes. ``words``: one u64 quant word (int) for DEQF16/REQ8/QF322B8_PRE, a 1-D array of
    n words for VDEQF16/VREQ8/VQF322B8_PRE (see :func:`make_quant_word`), None for the other modes.

    * NoQuant: acc unchanged (float32 → float32, int32 → int32).
    * F322F16 / F322BF16: float32 → fp16 / bf16, round half even (the RINT rules of :func:`cast`: beyond the
      largest finite value by half an ulp gives ±inf).
    * DEQF16 / VDEQF16: int32 → fp16. If MCB: x = clip(x >> N, -32768, 32767) (arithmetic shift). Then
      y = float32(x) · M1 in fp32 arithmetic (round half even), saturated to ±65504, rounded to fp16 half even.
    * REQ8 / VREQ8: int32 → int8 (sign bit set) or uint8. MCB shift as above; y = float32(x) · M1 (fp32);
      y = round_half_even(clip(y, -256, 255)); y += offset; clip to [-128, 127] or [0, 255].
    * QF322B8_PRE / VQF322B8_PRE: float32 → int8/uint8 by the same scale/round/offset/clip steps (MCB does not
      apply to float input and is ignored). A NaN product counts as 0 before the offset is added (project
      semantics, as :func:`cast` maps NaN to integer 0); ±inf saturates.
    * relu: applied to ``acc`` BEFORE any conversion: x → 0 where x < 0 (NaN propagates). Project choice: the
      reference algorithm's ReLU variants select the scale by the sign of x (M2 for negative x; ReLU = M2 of 0),
      i.e. the decision is made on the L0C value. For M1 ≥ 0 and offset 0 this equals ReLU after conversion.

    Per-channel words must agree on the sign bit (one output dtype). A wrong acc dtype or words of the wrong kind
    raise ``TypeError``; missing, superfluous or wrongly shaped words raise ``ValueError``; both name the mode.
    """
    mode = _as_mode_q(mode)
    acc = np.asarray(acc)
    m = mode.name
    if mode is QuantMode.NoQuant:
        if acc.dtype not in (_F32, DTYPES["int32"]):
            raise TypeError(f"Fixpipe NoQuant expects a float32 or int32 L0C accumulator, got {acc.dtype}")
    elif acc.dtype != _ACC_DTYPE[mode]:
        raise TypeError(f"Fixpipe {m} expects a {_NAME_OF[_ACC_DTYPE[mode]]} L0C accumulator, got {acc.dtype}")
    if mode in _VECTOR_MODES and acc.ndim == 0:
        raise ValueError(f"Fixpipe {m} needs an accumulator of shape (..., n) for per-channel words, got a scalar")
    w = _check_words(mode, words, acc.shape[-1] if acc.ndim else None)
    if relu:
        acc = np.where(acc < 0, acc.dtype.type(0), acc)
    if mode is QuantMode.NoQuant:
        return acc.copy()
    if mode is QuantMode.F322F16:
        return cast(acc, _F16, RoundMode.CAST_RINT)
    if mode is QuantMode.F322BF16:
        return cast(acc, _BF16, RoundMode.CAST_RINT)

    m1, n, mcb, off, sgn = _fields(w)
    if acc.dtype == DTYPES["int32"]:
        shifted = np.clip(np.right_shift(acc, n), -32768, 32767).astype(np.int32)
        x = np.where(mcb, shifted, acc).astype(np.float32)  # float32(x): round half even
    else:
        x = acc
    with np.errstate(over="ignore", invalid="ignore"):
        y = (x * m1).astype(np.float32)  # fp32 product, round half even
    if mode in _DEQ:
        return cast(np.clip(y, np.float32(-65504.0), np.float32(65504.0)), _F16, RoundMode.CAST_RINT)
    out_dt = _out_int_dtype(mode, sgn)
    info = np.iinfo(out_dt)
    with np.errstate(invalid="ignore"):
        y = np.clip(y, np.float32(-256.0), np.float32(255.0))
    q = cast(y, DTYPES["int32"], RoundMode.CAST_RINT)  # exact integers in -256..255; NaN → 0
    return np.clip(q + off, info.min, info.max).astype(out_dt)
