"""The vector unit (PIPE_V): elementwise, scalar, unary, cast, compare/select, reductions,
Brcb and Gather, in both Ascend C API forms.

Count form: `add(dst, a, b, count)`. Repeat form: `add(dst, a, b, mask, repeat_times,
BinaryRepeatParams(...))`. A repeat is 8 blocks of 32 B; block b of repeat r of an operand
sits at `(r·rep_stride + b·blk_stride)·32 B` from its base. `mask` is an int k (the first k
lanes), or `[mask0, mask1]` (u64 bit masks, lane i ↔ bit i). After `set_mask_count()` the
mask is the total element count over all repeats and `repeat_times` is ignored.
Masked-off lanes keep dst. Results are what the hardware computes in the operand dtype:
fp16 arithmetic is rounded to fp16 after every operation.

Semantics that the reference leaves open, stated here once:
- exp, ln, sqrt, rsqrt, reciprocal and div are computed in float64 and rounded once to the
  dtype: correctly rounded for sqrt, reciprocal, div (and every fp16 rsqrt: checked
  exhaustively); exp, ln and fp32 rsqrt are as good as float64 libm plus one rounding.
  Integer add/sub/mul wrap (two's complement).
- WholeReduceSum/BlockReduceSum add lanes as a pairwise tree (0+1, 2+3, …), masked lanes as
  0, rounding to the dtype at every level. Max/min with index return the first extreme lane.
- BlockReduce writes 8 results per repeat; its dst_rep_stride counts groups of 8 results.
"""
from __future__ import annotations

import enum

import numba
import numpy as np

from . import costs
from .buffers import LocalTensor
from .errors import BoundsError, DTypeError, ParamError
from .numerics import CAST_PAIRS, RoundMode, as_dtype, cast, dtype_name
from .params import BinaryRepeatParams, BrcbRepeatParams, UnaryRepeatParams
from .pipes import Pipe

MASK_PLACEHOLDER = object()  # use the mask set by set_vector_mask


class CMPMODE(enum.Enum):
    LT = "lt"
    GT = "gt"
    EQ = "eq"
    LE = "le"
    GE = "ge"
    NE = "ne"


class SELMODE(enum.Enum):
    VSEL_CMPMASK_SPR = 0
    VSEL_TENSOR_SCALAR_MODE = 1
    VSEL_TENSOR_TENSOR_MODE = 2


class ReduceOrder(enum.Enum):
    ORDER_VALUE_INDEX = 0
    ORDER_INDEX_VALUE = 1
    ORDER_ONLY_VALUE = 2


_FLOAT = ("float16", "float32")
_ARITH = ("float16", "float32", "int16", "int32")
_CMP = {CMPMODE.LT: np.less, CMPMODE.GT: np.greater, CMPMODE.EQ: np.equal, CMPMODE.LE: np.less_equal,
        CMPMODE.GE: np.greater_equal, CMPMODE.NE: np.not_equal}


@numba.njit(cache=True)
def repeat_offsets(repeats, lanes, elems_per_block, blk_stride, rep_stride):
    """Element offset of lane j of repeat r: (r·rep + (j // E)·blk)·E + j % E."""
    out = np.empty((repeats, lanes), np.int64)
    for r in range(repeats):
        for j in range(lanes):
            out[r, j] = (r * rep_stride + (j // elems_per_block) * blk_stride) * elems_per_block + j % elems_per_block
    return out


_BITS: dict = {}  # (mask0, mask1, lanes) → the lane bits of a bit mask (kernels reuse a few masks)


def _mask_bits(m0: int, m1: int, lanes: int) -> np.ndarray:
    """bool[lanes]: lane i is active when bit i of [mask0 (lanes 0–63), mask1 (64–127)] is set."""
    key = (m0, m1, lanes)
    bits = _BITS.get(key)
    if bits is None:
        bits = np.array([(m0 >> i) & 1 for i in range(64)] + [(m1 >> i) & 1 for i in range(64)], bool)[:lanes]
        bits.flags.writeable = False
        if len(_BITS) < 4096:
            _BITS[key] = bits
    return bits


def _active(reps: int, lanes: int, rows) -> np.ndarray:
    """bool[reps, lanes], the active lanes of each repeat, from `VectorInstructions._lane_rows`'s description."""
    kind, v = rows
    if kind == "count":
        return (np.arange(reps * lanes) < v).reshape(reps, lanes)
    bits = np.arange(lanes) < v if kind == "prefix" else v
    return np.broadcast_to(bits, (reps, lanes))


def _prefix_max(k: int, e: int, blk: int) -> int:
    """max over lanes j < k (k ≥ 1) of the in-repeat offset (j // E)·blk·E + j % E."""
    if blk >= 1:  # non-decreasing in j: the last lane
        return ((k - 1) // e) * blk * e + (k - 1) % e
    return min(k, e) - 1  # blk = 0: every block at offset 0


def _span_of_repeats(reps, rows, lanes, e, blk, rep):
    """[lo, hi) of the element offsets `repeat_offsets` gives for the active lanes (`rows` as `_lane_rows` gives
    it), in closed form.

    Offsets grow with the repeat (strides are ≥ 0) and a later repeat's active lanes are a subset of the first's
    (the same mask, or a shorter count), so the minimum is in repeat 0 and the maximum in one of the last two
    repeats that have an active lane. (Hot in timing-only mode: this is all a repeat-form instruction needs of its
    mask there; tests/test_vector.py checks it against the offsets themselves.)"""
    kind, v = rows
    if not reps:
        return 0, 0
    if kind == "bits":
        if not v.any():
            return 0, 0
        j = np.flatnonzero(v)
        base = (j // e) * blk * e + j % e
        return int(base.min()), (reps - 1) * rep * e + int(base.max()) + 1
    if kind == "prefix":
        k_all = k_last = v
    else:  # counter mode: every repeat full but the last
        k_all, k_last = lanes, v - (reps - 1) * lanes
    hi = (reps - 1) * rep * e + _prefix_max(k_last, e, blk)
    if reps > 1:
        hi = max(hi, (reps - 2) * rep * e + _prefix_max(k_all, e, blk))
    return 0, hi + 1


_UB = ("UB",)
_SCALAR_FNS = {"adds": np.add, "muls": np.multiply, "maxs": np.maximum, "mins": np.minimum}
_DTYPE_SETS: dict = {}  # a tuple of dtype names → the set of numpy dtypes it names


def _dtype_set(names: tuple) -> frozenset:
    got = _DTYPE_SETS.get(names)
    if got is None:
        got = _DTYPE_SETS[names] = frozenset(as_dtype(n) for n in names)
    return got


def _exact(fn, dt):
    """A float op computed in float64 and rounded once to `dt`."""
    return lambda *xs: fn(*(x.astype(np.float64) for x in xs)).astype(dt)


_BINARY_FNS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _binary_fn(name, dt):
    f = _BINARY_FNS.get(name)
    if f is not None:
        return lambda a, b: f(a, b).astype(dt)  # numpy rounds fp16 results to fp16; ints wrap
    if name == "div":
        return _exact(np.divide, dt)
    raise AssertionError(name)


_UNARY = {
    "exp": ("transcendental", _FLOAT, np.exp),
    "ln": ("transcendental", _FLOAT, np.log),
    "sqrt": ("transcendental", _FLOAT, np.sqrt),
    "rsqrt": ("simple", _FLOAT, lambda x: 1.0 / np.sqrt(x)),
    "reciprocal": ("simple", _FLOAT, lambda x: 1.0 / x),
    "abs": ("simple", _FLOAT, np.abs),
    "relu": ("simple", _FLOAT + ("int32",), lambda x: np.maximum(x, 0)),
}


def _tree_sum(vals: np.ndarray, dt) -> np.ndarray:
    """Pairwise-tree sum along the last axis, rounding to `dt` at every level."""
    v = vals.astype(dt)
    while v.shape[-1] > 1:
        if v.shape[-1] % 2:
            v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), dt)], axis=-1)
        v = (v[..., 0::2] + v[..., 1::2]).astype(dt)
    return v[..., 0]


class VectorInstructions:
    """Vector instructions of `ctx` (mixed into CoreContext)."""

    # --- masks ---------------------------------------------------------------------------
    def set_mask_count(self) -> None:
        """`SetMaskCount()`: masks become element counts over all repeats."""
        self._core.issue("set_mask_count", Pipe.PIPE_S, 1)
        self.mask_mode_counter = True

    def set_mask_norm(self) -> None:
        """`SetMaskNorm()`: masks are per-repeat lane masks again."""
        self._core.issue("set_mask_norm", Pipe.PIPE_S, 1)
        self.mask_mode_counter = False

    def set_vector_mask(self, mask) -> None:
        """`SetVectorMask(mask)`: the mask that MASK_PLACEHOLDER stands for."""
        self._core.issue("set_vector_mask", Pipe.PIPE_S, 1)
        self.vector_mask = mask

    def _lane_rows(self, name, mask, repeat_times, lanes):
        """(repeats, rows) for the repeat form, after checking the mask: `rows` says which lanes of each repeat are
        active without building the [repeats, lanes] array (timing-only mode never needs it):
        ("count", n): counter mode, the first n elements over all repeats; ("prefix", k): lanes 0..k−1 of every
        repeat; ("bits", bool[lanes]): the same bit mask in every repeat."""
        if mask is MASK_PLACEHOLDER:
            if self.vector_mask is None:
                raise ParamError(f"{name}: MASK_PLACEHOLDER with no set_vector_mask", where=self._core.label)
            mask = self.vector_mask
        if self.mask_mode_counter:
            if isinstance(mask, (list, tuple, np.ndarray)):
                raise ParamError(f"{name}: in counter mode (set_mask_count) the mask is one element count, "
                                 f"not a bit mask", where=self._core.label)
            total = int(mask)
            if total < 0:
                raise ParamError(f"{name}: negative element count {total} in counter mode", where=self._core.label)
            return -(-total // lanes), ("count", total)
        if not 0 <= int(repeat_times) <= self.spec.max_repeat_times:
            raise ParamError(f"{name}: repeat_times {repeat_times} is outside 0..{self.spec.max_repeat_times}",
                             where=self._core.label)
        reps = int(repeat_times)
        if isinstance(mask, (list, tuple, np.ndarray)):
            if len(mask) != 2:
                raise ParamError(f"{name}: a bit mask is [mask0, mask1] (two u64), got {len(mask)} words",
                                 where=self._core.label)
            m0, m1 = (int(x) for x in mask)
            if not (0 <= m0 < 1 << 64 and 0 <= m1 < 1 << 64) or (lanes <= 64 and m1):
                raise ParamError(f"{name}: bit mask [{m0:#x}, {m1:#x}] does not fit {lanes} lanes",
                                 where=self._core.label)
            return reps, ("bits", _mask_bits(m0, m1, lanes))
        k = int(mask)
        if not 1 <= k <= lanes:
            raise ParamError(f"{name}: contiguous mask {k} is outside 1..{lanes} lanes", where=self._core.label)
        return reps, ("prefix", k)

    def _lane_mask(self, name, mask, repeat_times, lanes):
        """(repeats, bool[repeats, lanes]) for the repeat form."""
        reps, rows = self._lane_rows(name, mask, repeat_times, lanes)
        return reps, _active(reps, lanes, rows)

    def _operands(self, name, tensors, dtypes):
        core = self._core
        out = []
        block = self.spec.block_bytes
        ub = core.buffers.get("UB")
        for t, what in tensors:
            if type(t) is not LocalTensor or t.buffer is not ub:  # (the common case, a UB tensor of this core, is
                t = core.local(t, _UB, (name, what))             # what local() would return unchanged)
            if t.offset % block:
                from .errors import AlignmentError
                raise AlignmentError(f"{name} {what}: UB address {t.offset:#x} is not 32 B aligned", where=core.label)
            out.append(t)
        if dtypes is not None:
            allowed = _dtype_set(dtypes)
            for t, (_, what) in zip(out, tensors):
                if t.dtype not in allowed:
                    raise DTypeError(f"{name} {what} is {dtype_name(t.dtype)}; {name} takes {', '.join(dtypes)}",
                                     where=core.label)
        return out

    def _check_strides(self, name, strides, reps, dst_blk=True):
        """Vector strides are u8 (0..255); dst_blk_stride 0 is undefined on hardware (reference §13).

        strides: [(blk, rep)], dst first when `dst_blk`."""
        core = self._core
        for blk, rep in strides:
            if not (0 <= blk <= 255 and 0 <= rep <= 255):
                raise ParamError(f"{name}: strides blk={blk} rep={rep} are outside 0..255", where=core.label)
        if dst_blk and strides[0][0] == 0 and reps:
            raise ParamError(f"{name}: dst_blk_stride 0 is undefined on hardware", where=core.label)

    def _same_dtype(self, name, ts):
        dt = ts[0].dtype
        for t in ts:
            if t.dtype != dt:
                raise DTypeError(f"{name}: operands differ in dtype ({', '.join(dtype_name(t.dtype) for t in ts)})",
                                 where=self._core.label)

    # --- the generic elementwise executor ---------------------------------------------------------
    def _elementwise(self, name, op_class, dst, srcs, fn, count, mask, repeat_times, strides, lane_bytes=None,
                     cost_itemsize=None):
        """dst[lanes] = fn(*srcs[lanes]) over the count or repeat form.

        strides: [(blk, rep)] for dst then each src (repeat form only)."""
        core = self._core
        ops = [dst, *srcs]
        isz = dst.dtype.itemsize
        for t in srcs:
            if t.dtype.itemsize > isz:
                isz = t.dtype.itemsize
        lanes = self.spec.block_bytes * self.spec.repeat_blocks // (lane_bytes or isz)
        if repeat_times is None:
            n = int(count)
            if n < 0:
                raise ParamError(f"{name}: negative count {n}", where=core.label)
            reps = -(-n // lanes)
            # core.span's regions, inline (the commonest vector form): elements [0, n) of each operand
            regions = []
            for i, t in enumerate(ops):
                if n > t.size:
                    core.span(t, 0, n, (name, "source" if i else "destination"))  # raises, naming it
                regions.append((t.buffer, t.offset, t.offset + n * t.dtype.itemsize))
            idx = None
        else:
            reps, rows = self._lane_rows(name, mask, repeat_times, lanes)
            self._check_strides(name, strides, reps)
            idx = [] if self.functional else None
            act = _active(reps, lanes, rows) if self.functional else None
            regions = []
            for i, (t, (blk, rep)) in enumerate(zip(ops, strides)):
                e = self.spec.block_bytes // t.dtype.itemsize
                if idx is not None:
                    full = repeat_offsets(reps, lanes, e, blk, rep)[act] if reps else np.zeros(0, np.int64)
                    idx.append(full)
                    lo, hi = (int(full.min()), int(full.max()) + 1) if full.size else (0, 0)
                else:  # timing only: the same bounds without building every offset
                    lo, hi = _span_of_repeats(reps, rows, lanes, e, blk, rep)
                regions.append(core.span(t, lo, hi, (name, "destination" if i == 0 else "source")))
        cycles = costs.vector(self.spec, op_class, cost_itemsize or isz, reps)
        core.issue(name, Pipe.PIPE_V, cycles, reads=regions[1:], writes=regions[:1])
        core.stats.vector_elems += reps * lanes
        if not self.functional:
            return
        if repeat_times is None:
            vals = [s.flat_view(0, int(count)) for s in srcs]
            with np.errstate(all="ignore"):
                dst.flat_view(0, int(count))[...] = fn(*vals)
            return
        flats = [t.flat_view(0, t.size) for t in ops]
        with np.errstate(all="ignore"):  # overflow to inf and NaN results are the hardware's answer
            if self._sequential(dst, srcs, strides, reps):
                ends = np.cumsum(act.sum(axis=1))  # active lanes per repeat differ in counter mode
                for r in range(reps):
                    sl = slice(int(ends[r - 1]) if r else 0, int(ends[r]))
                    flats[0][idx[0][sl]] = fn(*(f[i[sl]] for f, i in zip(flats[1:], idx[1:])))
            else:
                flats[0][idx[0]] = fn(*(f[i] for f, i in zip(flats[1:], idx[1:])))

    def _sequential(self, dst, srcs, strides, reps) -> bool:
        """The in-place accumulation exception: dst overlaps a source and a repeat stride is 0."""
        if reps <= 1 or not srcs:
            return False
        for s, (_, rep) in zip(srcs, strides[1:]):
            if s.buffer is dst.buffer and s.offset < dst.offset + dst.nbytes and dst.offset < s.offset + s.nbytes \
                    and (rep == 0 or strides[0][1] == 0):
                return True
        return False

    def _unpack_repeat(self, args, params_cls, n_srcs):
        """(count, mask, repeat_times, strides) from the trailing arguments of either form."""
        if len(args) == 1:
            return int(args[0]), None, None, None
        if len(args) in (2, 3):
            mask, repeat_times = args[0], args[1]
            p = args[2] if len(args) == 3 else params_cls()
            if isinstance(p, BinaryRepeatParams):
                strides = [(p.dst_blk_stride, p.dst_rep_stride), (p.src0_blk_stride, p.src0_rep_stride),
                           (p.src1_blk_stride, p.src1_rep_stride)]
            elif isinstance(p, UnaryRepeatParams):
                strides = [(p.dst_blk_stride, p.dst_rep_stride)] + [(p.src_blk_stride, p.src_rep_stride)] * n_srcs
            else:
                raise ParamError(f"expected {params_cls.__name__}, got {type(p).__name__}", where=self._core.label)
            return None, mask, repeat_times, strides[: 1 + n_srcs]
        raise ParamError("vector instruction: pass `count`, or `mask, repeat_times[, params]`", where=self._core.label)

    # --- binary -------------------------------------------------------------------------------------
    def _binary(self, name, dst, a, b, args):
        dtypes = _FLOAT if name == "div" else _ARITH
        dst, a, b = self._operands(name, [(dst, "dst"), (a, "src0"), (b, "src1")], dtypes)
        self._same_dtype(name, (dst, a, b))
        count, mask, reps, strides = self._unpack_repeat(args, BinaryRepeatParams, 2)
        op_class = "transcendental" if name == "div" else "simple"
        self._elementwise(name, op_class, dst, [a, b], _binary_fn(name, dst.dtype), count, mask, reps, strides)

    def add(self, dst, src0, src1, *args):
        """`Add(dst, src0, src1, count | mask, repeatTime, BinaryRepeatParams)`."""
        self._binary("add", dst, src0, src1, args)

    def sub(self, dst, src0, src1, *args):
        """`Sub`."""
        self._binary("sub", dst, src0, src1, args)

    def mul(self, dst, src0, src1, *args):
        """`Mul`."""
        self._binary("mul", dst, src0, src1, args)

    def div(self, dst, src0, src1, *args):
        """`Div` (fp16/fp32; correctly rounded)."""
        self._binary("div", dst, src0, src1, args)

    def max(self, dst, src0, src1, *args):
        """`Max`."""
        self._binary("max", dst, src0, src1, args)

    def min(self, dst, src0, src1, *args):
        """`Min`."""
        self._binary("min", dst, src0, src1, args)

    # --- tensor-scalar ------------------------------------------------------------------------------------
    def _scalar_op(self, name, dst, src, scalar, args):
        dst, src = self._operands(name, [(dst, "dst"), (src, "src")], _ARITH)
        self._same_dtype(name, (dst, src))
        dt = dst.dtype
        s = self._core.scalar(dt, scalar, (name, "scalar"))
        f = _SCALAR_FNS[name]
        count, mask, reps, strides = self._unpack_repeat(args, UnaryRepeatParams, 1)
        self._elementwise(name, "simple", dst, [src], lambda x: f(x, s).astype(dt), count, mask, reps, strides)

    def adds(self, dst, src, scalar, *args):
        """`Adds(dst, src, scalar, count | mask, repeatTime, UnaryRepeatParams)`; the scalar is first cast to the dtype."""
        self._scalar_op("adds", dst, src, scalar, args)

    def muls(self, dst, src, scalar, *args):
        """`Muls`."""
        self._scalar_op("muls", dst, src, scalar, args)

    def maxs(self, dst, src, scalar, *args):
        """`Maxs`."""
        self._scalar_op("maxs", dst, src, scalar, args)

    def mins(self, dst, src, scalar, *args):
        """`Mins`."""
        self._scalar_op("mins", dst, src, scalar, args)

    # --- unary --------------------------------------------------------------------------------------------
    def _unary(self, name, dst, src, args):
        op_class, dtypes, f = _UNARY[name]
        dst, src = self._operands(name, [(dst, "dst"), (src, "src")], dtypes)
        self._same_dtype(name, (dst, src))
        dt = dst.dtype
        fn = (lambda x: f(x).astype(dt)) if dt.kind == "i" else _exact(f, dt)
        count, mask, reps, strides = self._unpack_repeat(args, UnaryRepeatParams, 1)
        with np.errstate(all="ignore"):
            self._elementwise(name, op_class, dst, [src], fn, count, mask, reps, strides)

    def exp(self, dst, src, *args):
        """`Exp`."""
        self._unary("exp", dst, src, args)

    def ln(self, dst, src, *args):
        """`Ln`."""
        self._unary("ln", dst, src, args)

    def sqrt(self, dst, src, *args):
        """`Sqrt`."""
        self._unary("sqrt", dst, src, args)

    def rsqrt(self, dst, src, *args):
        """`Rsqrt`: 1/√x."""
        self._unary("rsqrt", dst, src, args)

    def reciprocal(self, dst, src, *args):
        """`Reciprocal`: 1/x."""
        self._unary("reciprocal", dst, src, args)

    def abs(self, dst, src, *args):
        """`Abs`."""
        self._unary("abs", dst, src, args)

    def relu(self, dst, src, *args):
        """`Relu`: max(x, 0)."""
        self._unary("relu", dst, src, args)

    # --- duplicate ------------------------------------------------------------------------------------------
    def duplicate(self, dst, scalar, *args):
        """`Duplicate(dst, scalar, count)` or `Duplicate(dst, scalar, mask, repeatTime, dstBlkStride, dstRepStride)`."""
        (dst,) = self._operands("duplicate", [(dst, "dst")], _ARITH + ("bfloat16", "uint16", "uint32"))
        dt = dst.dtype
        v = self._core.scalar(dt, scalar, "duplicate scalar")
        if len(args) == 1:
            count, mask, reps, strides = int(args[0]), None, None, None
        elif len(args) in (2, 4):
            count, mask, reps = None, args[0], args[1]
            strides = [(args[2], args[3])] if len(args) == 4 else [(1, 8)]
        else:
            raise ParamError("duplicate: pass `count`, or `mask, repeat_times[, dst_blk_stride, dst_rep_stride]`",
                             where=self._core.label)
        self._elementwise("duplicate", "simple", dst, [], lambda: v, count, mask, reps, strides)

    # --- cast ----------------------------------------------------------------------------------------------------
    def cast(self, dst, src, round_mode: RoundMode, *args):
        """`Cast(dst, src, RoundMode, count | mask, repeatTime, UnaryRepeatParams)`; legal pairs: numerics.CAST_PAIRS.
        A repeat covers 256 B of the wider type."""
        core = self._core
        dst, src = self._operands("cast", [(dst, "dst"), (src, "src")], None)
        pair = (dtype_name(src.dtype), dtype_name(dst.dtype))
        if pair not in CAST_PAIRS:
            legal = sorted(d for s, d in CAST_PAIRS if s == pair[0])
            raise DTypeError(f"cast {pair[0]} → {pair[1]} is not a vector Cast on 910B/C; from {pair[0]} "
                             f"it can cast to: {', '.join(legal) or 'nothing'}", where=core.label)
        if not isinstance(round_mode, RoundMode):
            raise ParamError(f"cast: expected a RoundMode, got {round_mode!r}", where=core.label)
        narrow = {"int8", "uint8", "int16"}
        op_class = "cast_b8" if (pair[0] in narrow and pair[1] == "float16") or \
            (pair[0] == "float16" and pair[1] in narrow) else "cast_b64" if pair[1] == "int64" else "cast"
        count, mask, reps, strides = self._unpack_repeat(args, UnaryRepeatParams, 1)
        dt = dst.dtype
        self._elementwise("cast", op_class, dst, [src], lambda x: cast(x, dt, round_mode), count, mask, reps, strides)

    # --- compare / select --------------------------------------------------------------------------------------
    def compare(self, dst, src0, src1, cmp_mode: CMPMODE, *args):
        """`Compare(dst, src0, src1, CMPMODE, count)`: bit i of the uint8 dst = src0[i] <op> src1[i].
        count·sizeof(T) must be a multiple of 256 B. Repeat form: each repeat writes lanes/8 bytes."""
        core = self._core
        (dst,) = self._operands("compare", [(dst, "dst")], None)
        a, b = self._operands("compare", [(src0, "src0"), (src1, "src1")], _FLOAT + ("int32",))
        self._same_dtype("compare", (a, b))
        if dtype_name(dst.dtype) != "uint8":
            raise DTypeError(f"compare dst must be uint8 bits, got {dtype_name(dst.dtype)}", where=core.label)
        f = self._cmp("compare", cmp_mode)
        self._bits_op("compare", dst, [a, b], lambda x, y: f(x, y), args)

    def _cmp(self, name, cmp_mode):
        if not isinstance(cmp_mode, CMPMODE):
            raise ParamError(f"{name}: expected a CMPMODE, got {cmp_mode!r}", where=self._core.label)
        return _CMP[cmp_mode]

    def compare_scalar(self, dst, src0, scalar, cmp_mode: CMPMODE, count: int):
        """`CompareScalar(dst, src0, scalar, CMPMODE, count)`."""
        core = self._core
        (dst,) = self._operands("compare_scalar", [(dst, "dst")], None)
        (a,) = self._operands("compare_scalar", [(src0, "src0")], _FLOAT + ("int32",))
        if dtype_name(dst.dtype) != "uint8":
            raise DTypeError(f"compare_scalar dst must be uint8 bits, got {dtype_name(dst.dtype)}", where=core.label)
        s = self._core.scalar(a.dtype, scalar, "compare_scalar scalar")
        f = self._cmp("compare_scalar", cmp_mode)
        self._bits_op("compare_scalar", dst, [a], lambda x: f(x, s), (count,))

    def _bits_op(self, name, dst, srcs, pred, args):
        core = self._core
        lanes = 256 // srcs[0].dtype.itemsize
        if len(args) == 1:
            n = int(args[0])
            if n < 0:
                raise ParamError(f"{name}: negative count {n}", where=core.label)
            if n * srcs[0].dtype.itemsize % 256:
                raise ParamError(f"{name}: count {n} × {srcs[0].dtype.itemsize} B is not a multiple of 256 B",
                                 where=core.label)
            reps = n // lanes
            regions = [core.span(dst, 0, n // 8, f"{name} dst")] + [core.span(s, 0, n, f"{name} src") for s in srcs]
            core.issue(name, Pipe.PIPE_V, costs.vector(self.spec, "simple", srcs[0].dtype.itemsize, reps),
                       reads=regions[1:], writes=regions[:1])
            if self.functional:
                bits = pred(*(s.flat_view(0, n) for s in srcs))
                dst.flat_view(0, n // 8)[...] = np.packbits(bits, bitorder="little")
            return
        count, mask, reps, strides = self._unpack_repeat(args, BinaryRepeatParams, len(srcs))
        nrep, act = self._lane_mask(name, mask, reps, lanes)
        self._check_strides(name, strides, nrep, dst_blk=False)
        idx = []
        for t, (blk, rep) in zip(srcs, strides[1:]):
            e = 32 // t.dtype.itemsize
            idx.append(repeat_offsets(nrep, lanes, e, blk, rep) if nrep else np.zeros((0, lanes), np.int64))
        regions = [core.span(dst, 0, nrep * lanes // 8, f"{name} dst")]
        for t, i in zip(srcs, idx):  # only active lanes are read (as in _elementwise)
            a = i[act]
            regions.append(core.span(t, int(a.min()) if a.size else 0, int(a.max()) + 1 if a.size else 0, f"{name} src"))
        core.issue(name, Pipe.PIPE_V, costs.vector(self.spec, "simple", srcs[0].dtype.itemsize, nrep),
                   reads=regions[1:], writes=regions[:1])
        if self.functional and nrep:
            old = np.unpackbits(dst.flat_view(0, nrep * lanes // 8), bitorder="little").reshape(nrep, lanes).astype(bool)
            with np.errstate(invalid="ignore"):
                new = pred(*(s.flat_view(0, s.size)[np.where(act, i, 0)] for s, i in zip(srcs, idx)))
            dst.flat_view(0, nrep * lanes // 8)[...] = np.packbits(np.where(act, new, old), bitorder="little")

    def select(self, dst, sel_mask, src0, src1, sel_mode: SELMODE, count: int):
        """`Select(dst, selMask, src0, src1 | scalar, SELMODE, count)`: dst[i] = src0[i] if bit i else src1[i]."""
        core = self._core
        (sel,) = self._operands("select", [(sel_mask, "mask")], None)
        if dtype_name(sel.dtype) != "uint8":
            raise DTypeError(f"select mask must be uint8 bits, got {dtype_name(sel.dtype)}", where=core.label)
        if sel_mode == SELMODE.VSEL_TENSOR_TENSOR_MODE:
            dst, a, b = self._operands("select", [(dst, "dst"), (src0, "src0"), (src1, "src1")], _FLOAT)
            self._same_dtype("select", (dst, a, b))
            srcs = [a, b]
        elif sel_mode == SELMODE.VSEL_TENSOR_SCALAR_MODE:
            dst, a = self._operands("select", [(dst, "dst"), (src0, "src0")], _FLOAT)
            self._same_dtype("select", (dst, a))
            srcs = [a]
            scalar = self._core.scalar(dst.dtype, src1, "select scalar")
        else:
            raise ParamError(f"select: mode {sel_mode} is not supported; use VSEL_TENSOR_TENSOR_MODE or "
                             f"VSEL_TENSOR_SCALAR_MODE", where=core.label)
        n = int(count)
        if n < 0 or n % 8:
            raise ParamError(f"select: count {n} must be a non-negative multiple of 8 (one mask byte)", where=core.label)
        reps = -(-n // (256 // dst.dtype.itemsize))
        regions = [core.span(dst, 0, n, "select dst"), core.span(sel, 0, n // 8, "select mask")] + \
            [core.span(s, 0, n, "select src") for s in srcs]
        core.issue("select", Pipe.PIPE_V, costs.vector(self.spec, "simple", dst.dtype.itemsize, reps),
                   reads=regions[1:], writes=regions[:1])
        if self.functional:
            bits = np.unpackbits(sel.flat_view(0, n // 8), bitorder="little").astype(bool)
            other = srcs[1].flat_view(0, n) if len(srcs) == 2 else scalar
            dst.flat_view(0, n)[...] = np.where(bits, srcs[0].flat_view(0, n), other)

    # --- reductions ------------------------------------------------------------------------------------------------
    def _reduce_in(self, name, src, mask, repeat_times, dst_rep_stride, src_blk_stride, src_rep_stride):
        core = self._core
        lanes = 256 // src.dtype.itemsize
        reps, rows = self._lane_rows(name, mask, repeat_times, lanes)
        self._check_strides(name, [(src_blk_stride, src_rep_stride)], reps, dst_blk=False)
        if dst_rep_stride < 0:
            raise ParamError(f"{name}: negative dst_rep_stride {dst_rep_stride}", where=core.label)
        e = 32 // src.dtype.itemsize
        lo, hi = _span_of_repeats(reps, rows, lanes, e, src_blk_stride, src_rep_stride)
        region = core.span(src, lo, hi, (name, "src"))
        if not self.functional:  # timing only: the region is all that is needed
            return reps, None, None, region
        act = _active(reps, lanes, rows)
        idx = repeat_offsets(reps, lanes, e, src_blk_stride, src_rep_stride) if reps \
            else np.zeros((0, lanes), np.int64)
        return reps, act, idx, region

    def whole_reduce_sum(self, dst, src, mask, repeat_times, dst_rep_stride=1, src_blk_stride=1, src_rep_stride=8):
        """`WholeReduceSum`: the sum of each repeat's active lanes → dst[r·dst_rep_stride]."""
        dst, src = self._operands("whole_reduce_sum", [(dst, "dst"), (src, "src")], _FLOAT)
        self._same_dtype("whole_reduce_sum", (dst, src))
        reps, act, idx, region = self._reduce_in("whole_reduce_sum", src, mask, repeat_times, dst_rep_stride,
                                                src_blk_stride, src_rep_stride)
        w = self._core.span(dst, 0, (reps - 1) * dst_rep_stride + 1 if reps else 0, "whole_reduce_sum dst")
        self._core.issue("whole_reduce_sum", Pipe.PIPE_V, costs.vector(self.spec, "whole_reduce", src.dtype.itemsize, reps),
                         reads=[region], writes=[w])
        if self.functional and reps:
            out = np.arange(reps) * dst_rep_stride
            vals = np.where(act, src.flat_view(0, src.size)[np.where(act, idx, 0)], 0).astype(src.dtype)
            dst.flat_view(0, dst.size)[out] = _tree_sum(vals, src.dtype)

    def _whole_reduce_ext(self, name, pick, dst, src, mask, repeat_times, dst_rep_stride, src_blk_stride, src_rep_stride,
                          order):
        dst, src = self._operands(name, [(dst, "dst"), (src, "src")], _FLOAT)
        self._same_dtype(name, (dst, src))
        reps, act, idx, region = self._reduce_in(name, src, mask, repeat_times, dst_rep_stride, src_blk_stride,
                                                 src_rep_stride)
        width = 1 if order == ReduceOrder.ORDER_ONLY_VALUE else 2
        w = self._core.span(dst, 0, (reps - 1) * dst_rep_stride * width + width if reps else 0, (name, "dst"))
        self._core.issue(name, Pipe.PIPE_V, costs.vector(self.spec, "whole_reduce", src.dtype.itemsize, reps),
                         reads=[region], writes=[w])
        if self.functional and reps:
            out = np.arange(reps) * dst_rep_stride * width
            vals = src.flat_view(0, src.size)[np.where(act, idx, 0)].astype(np.float64)
            fill = -np.inf if pick == "max" else np.inf
            vals = np.where(act, vals, fill)
            arg = (np.argmax if pick == "max" else np.argmin)(vals, axis=1)
            best = vals[np.arange(reps), arg].astype(src.dtype)
            itype = np.uint16 if src.dtype.itemsize == 2 else np.uint32
            index = arg.astype(itype).view(src.dtype)
            flat = dst.flat_view(0, dst.size)
            if order == ReduceOrder.ORDER_ONLY_VALUE:
                flat[out] = best
            elif order == ReduceOrder.ORDER_VALUE_INDEX:
                flat[out], flat[out + 1] = best, index
            else:
                flat[out], flat[out + 1] = index, best

    def whole_reduce_max(self, dst, src, mask, repeat_times, dst_rep_stride=1, src_blk_stride=1, src_rep_stride=8,
                         order: ReduceOrder = ReduceOrder.ORDER_VALUE_INDEX):
        """`WholeReduceMax`: per repeat (value, index) of the first maximum lane; dst_rep_stride counts results."""
        self._whole_reduce_ext("whole_reduce_max", "max", dst, src, mask, repeat_times, dst_rep_stride,
                               src_blk_stride, src_rep_stride, order)

    def whole_reduce_min(self, dst, src, mask, repeat_times, dst_rep_stride=1, src_blk_stride=1, src_rep_stride=8,
                         order: ReduceOrder = ReduceOrder.ORDER_VALUE_INDEX):
        """`WholeReduceMin`."""
        self._whole_reduce_ext("whole_reduce_min", "min", dst, src, mask, repeat_times, dst_rep_stride,
                               src_blk_stride, src_rep_stride, order)

    def _block_reduce(self, name, dst, src, repeat_times, mask, dst_rep_stride, src_blk_stride, src_rep_stride):
        dst, src = self._operands(name, [(dst, "dst"), (src, "src")], _FLOAT)
        self._same_dtype(name, (dst, src))
        reps, act, idx, region = self._reduce_in(name, src, mask, repeat_times, dst_rep_stride, src_blk_stride,
                                                 src_rep_stride)
        e = 32 // src.dtype.itemsize
        w = self._core.span(dst, 0, (reps - 1) * dst_rep_stride * 8 + 8 if reps else 0, (name, "dst"))
        self._core.issue(name, Pipe.PIPE_V, costs.vector(self.spec, "block_reduce", src.dtype.itemsize, reps),
                         reads=[region], writes=[w])
        if self.functional and reps:
            out = (np.arange(reps)[:, None] * dst_rep_stride * 8 + np.arange(8)[None, :]).reshape(-1)
            vals = src.flat_view(0, src.size)[np.where(act, idx, 0)].reshape(reps, 8, e)
            a = act.reshape(reps, 8, e)
            if name == "block_reduce_sum":
                res = _tree_sum(np.where(a, vals, 0).astype(src.dtype), src.dtype)
            else:
                fill = -np.inf if name == "block_reduce_max" else np.inf
                f = np.max if name == "block_reduce_max" else np.min
                res = f(np.where(a, vals.astype(np.float64), fill), axis=2).astype(src.dtype)
            flat = dst.flat_view(0, dst.size)
            keep = a.any(axis=2).reshape(-1)  # a block with no active lane writes nothing
            flat[out[keep]] = res.reshape(-1)[keep]

    def block_reduce_sum(self, dst, src, repeat_times, mask, dst_rep_stride=1, src_blk_stride=1, src_rep_stride=8):
        """`BlockReduceSum`: one sum per 32 B block, 8 per repeat."""
        self._block_reduce("block_reduce_sum", dst, src, repeat_times, mask, dst_rep_stride, src_blk_stride, src_rep_stride)

    def block_reduce_max(self, dst, src, repeat_times, mask, dst_rep_stride=1, src_blk_stride=1, src_rep_stride=8):
        """`BlockReduceMax`."""
        self._block_reduce("block_reduce_max", dst, src, repeat_times, mask, dst_rep_stride, src_blk_stride, src_rep_stride)

    def block_reduce_min(self, dst, src, repeat_times, mask, dst_rep_stride=1, src_blk_stride=1, src_rep_stride=8):
        """`BlockReduceMin`."""
        self._block_reduce("block_reduce_min", dst, src, repeat_times, mask, dst_rep_stride, src_blk_stride, src_rep_stride)

    # --- brcb / gather -----------------------------------------------------------------------------------------------
    def brcb(self, dst, src, repeat_times: int, params: BrcbRepeatParams = BrcbRepeatParams()):
        """`Brcb`: each repeat takes 8 consecutive src elements and fills one 32 B dst block with each."""
        core = self._core
        dst, src = self._operands("brcb", [(dst, "dst"), (src, "src")], ("float16", "float32", "int16", "int32",
                                                                         "uint16", "uint32"))
        self._same_dtype("brcb", (dst, src))
        reps = int(repeat_times)
        if not 0 <= reps <= self.spec.max_repeat_times:
            raise ParamError(f"brcb: repeat_times {reps} is outside 0..{self.spec.max_repeat_times}", where=core.label)
        self._check_strides("brcb", [(params.dst_blk_stride, params.dst_rep_stride)], reps)
        e = 32 // dst.dtype.itemsize
        r_src = core.span(src, 0, 8 * reps, "brcb src")
        r_dst = core.span(dst, *_span_of_repeats(reps, ("prefix", 8 * e), 8 * e, e, params.dst_blk_stride,
                                                  params.dst_rep_stride), "brcb dst")
        core.issue("brcb", Pipe.PIPE_V, costs.vector(self.spec, "brcb", dst.dtype.itemsize, reps),
                   reads=[r_src], writes=[r_dst])
        if self.functional and reps:
            didx = repeat_offsets(reps, 8 * e, e, params.dst_blk_stride, params.dst_rep_stride)
            vals = np.repeat(src.flat_view(0, 8 * reps), e)
            dst.flat_view(0, dst.size)[didx.reshape(-1)] = vals

    def gather(self, dst, src, src_offset, src_base_addr: int, count: int):
        """`Gather(dst, src, srcOffset, srcBaseAddr, count)`: dst[i] = the src element at byte
        src_base_addr + src_offset[i] (uint32 byte offsets from src's base)."""
        core = self._core
        dst, src = self._operands("gather", [(dst, "dst"), (src, "src")], ("float16", "float32", "int16", "int32",
                                                                           "uint16", "uint32", "bfloat16"))
        self._same_dtype("gather", (dst, src))
        (off,) = self._operands("gather", [(src_offset, "src_offset")], None)
        if dtype_name(off.dtype) != "uint32":
            raise DTypeError(f"gather src_offset must be uint32 byte offsets, got {dtype_name(off.dtype)}",
                             where=core.label)
        n = int(count)
        if n < 0:
            raise ParamError(f"gather: negative count {n}", where=core.label)
        regions = [core.span(dst, 0, n, "gather dst"), core.span(off, 0, n, "gather src_offset"),
                   core.span(src, 0, src.size, "gather src")]
        reps = -(-n // (256 // dst.dtype.itemsize))
        core.issue("gather", Pipe.PIPE_V, costs.vector(self.spec, "gather", dst.dtype.itemsize, reps),
                   reads=regions[1:], writes=regions[:1])
        if self.functional and n:
            byte = int(src_base_addr) + off.flat_view(0, n).astype(np.int64)
            sz = src.dtype.itemsize
            bad = (byte % sz != 0) | (byte < 0) | (byte + sz > src.nbytes)
            if bad.any():
                i = int(np.argmax(bad))
                raise BoundsError(f"gather: offset[{i}] = {int(byte[i])} B is misaligned or outside the "
                                  f"{src.nbytes} B source", where=core.label)
            dst.flat_view(0, n)[...] = src.flat_view(0, src.size)[byte // sz]
