"""FixPipe (PIPE_FIX): L0C → GM or L1, with NZ→ND, cast, (de)quantisation and ReLU on the way.

The conversion itself is `numerics.fixpipe_convert`, defined once. This module reads the
L0C tile (Nz, 16×16 fractals, `src_stride` rows per column block), converts it, and
writes it row-major (ND: `dst_stride` = row pitch in elements) or NZ (`dst_stride` = 32 B
units between column blocks, C0 of the output dtype).

⚠ The reference lists nSize as a multiple of 16; this emulator accepts any n_size for ND
output so a GEMM can write its N tail directly, and requires a multiple of C0 for NZ output.
"""
from __future__ import annotations

import numpy as np

from . import costs
from .errors import DTypeError, ParamError
from .gm import GlobalTensor
from .numerics import (FIXPIPE_ACC_DTYPE, SCALAR_QUANT_MODES, VECTOR_QUANT_MODES, QuantMode, dtype_name,
                       fixpipe_convert, fixpipe_out_dtype)
from .params import FixpipeParamsV220
from .pipes import Pipe


class FixpipeInstructions:
    """FixPipe instructions of `ctx` (mixed into CoreContext)."""

    def fixpipe(self, dst, src, params: FixpipeParamsV220, *, cfg: str = "row_major", quant=None) -> None:
        """`Fixpipe<T, U, CFG_ROW_MAJOR | CFG_NZ>(dst, srcL0C[, cbufWorkspace], FixpipeParamsV220)`.

        cfg: "row_major" (NZ→ND on the fly) or "nz". quant: for the V* modes, a uint64 tensor of
        per-column quant words in L1 (staged to the Fixpipe buffer on the way) or in the FB."""
        core = self._core
        src = core.local(src, ("L0C",), "fixpipe src")
        if not (isinstance(dst, GlobalTensor) or getattr(dst, "kind", None) == "L1"):
            raise ParamError(f"fixpipe destination must be GM or L1, got {getattr(dst, 'kind', type(dst).__name__)}; "
                             f"L0C→UB does not exist on 910B/910C", where=core.label)
        if not isinstance(dst, GlobalTensor):
            dst = core.local(dst, ("L1",), "fixpipe dst")
        elif dst.gm is not core.gm:
            raise ParamError("fixpipe destination is in another die's GM", where=core.label)
        p = params
        if cfg not in ("row_major", "nz"):
            raise ParamError(f"fixpipe cfg {cfg!r}: use 'row_major' or 'nz'", where=core.label)
        if p.nd_num != 1 or p.is_channel_split:
            raise ParamError("fixpipe: nd_num > 1 and channel split are not modelled", where=core.label)
        m, n = p.m_size, p.n_size
        if not (0 <= n <= 4095 and 0 <= m <= (8192 if cfg == "row_major" else 65535)):
            raise ParamError(f"fixpipe n_size {n} / m_size {m} out of range (n ≤ 4095; m ≤ 8192 with NZ→ND)",
                             where=core.label)
        src_rows = p.src_stride or -(-m // 16) * 16
        if src_rows < m or src_rows % 16:
            raise ParamError(f"fixpipe src_stride {src_rows} must be a multiple of 16 ≥ m_size {m}", where=core.label)
        mode = p.quant_pre
        acc_name = dtype_name(src.dtype)
        if mode != QuantMode.NoQuant and mode not in FIXPIPE_ACC_DTYPE:
            raise ParamError(f"fixpipe quant mode {mode} is not supported", where=core.label)
        want_in = acc_name if mode == QuantMode.NoQuant else dtype_name(FIXPIPE_ACC_DTYPE[mode])
        if acc_name != want_in:
            raise DTypeError(f"fixpipe {mode.name} needs a {want_in} L0C tile, got {acc_name}", where=core.label)
        word = None
        if mode in SCALAR_QUANT_MODES:
            w = p.deq_scalar
            if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 0 <= int(w) < 1 << 64:
                raise ParamError(f"fixpipe {mode.name}: deq_scalar must be a u64 quant word, got {w!r}",
                                 where=core.label)
            word = int(w)
        # int8 or uint8 by the word's sign bit (46): known at issue for one word, at run time for per-channel words
        by_words = mode in VECTOR_QUANT_MODES and mode != QuantMode.VDEQF16
        out_name = None if by_words else dtype_name(fixpipe_out_dtype(mode, word, acc_dtype=src.dtype))
        if out_name is None:
            if dtype_name(dst.dtype) not in ("int8", "uint8"):
                raise DTypeError(f"fixpipe {mode.name} writes int8/uint8, destination is {dtype_name(dst.dtype)}",
                                 where=core.label)
        elif dtype_name(dst.dtype) != out_name:
            why = " (by the sign bit 46 of deq_scalar)" if out_name in ("int8", "uint8") else ""
            raise DTypeError(f"fixpipe {mode.name} writes {out_name}{why}, destination is {dtype_name(dst.dtype)}",
                             where=core.label)
        sz = dst.dtype.itemsize
        c0 = 32 // sz
        if cfg == "row_major":
            pitch = p.dst_stride or n
            if pitch < n:
                raise ParamError(f"fixpipe dst_stride {pitch} is smaller than n_size {n}", where=core.label)
            dst_end = (m - 1) * pitch + n if m and n else 0
        else:
            if n % c0:
                raise ParamError(f"fixpipe NZ output: n_size {n} must be a multiple of C0 = {c0}", where=core.label)
            col_pitch = p.dst_stride * c0
            if n > c0 and col_pitch < m * c0:
                raise ParamError(f"fixpipe NZ output: dst_stride {p.dst_stride} (32 B units) is smaller than "
                                 f"m_size {m}", where=core.label)
            dst_end = (n // c0 - 1) * col_pitch + m * c0 if m and n else 0
        reads = [core.span(src, 0, (-(-n // 16) - 1) * src_rows * 16 + src_rows * 16 if n else 0, "fixpipe src")]
        qwords = None
        extra = 0
        if mode in VECTOR_QUANT_MODES:
            if quant is None:
                raise ParamError(f"fixpipe {mode.name} needs a per-channel quant tensor (quant=…)", where=core.label)
            q = core.local(quant, ("L1", "FB"), "fixpipe quant")
            if dtype_name(q.dtype) != "uint64":
                raise DTypeError(f"fixpipe quant words must be uint64, got {dtype_name(q.dtype)}", where=core.label)
            reads.append(core.span(q, 0, n, "fixpipe quant"))
            if q.kind == "L1":
                extra = costs.ceil_div(n * 8, self.spec.l1_to_fb_bytes_per_cycle)
            qwords = q
        elif quant is not None:
            raise ParamError(f"fixpipe {mode.name} takes no per-channel quant tensor", where=core.label)
        if isinstance(dst, GlobalTensor):
            from .errors import BoundsError
            if dst_end > dst.size:
                raise BoundsError(f"fixpipe writes elements [0, {dst_end}) of a {dst.size}-element GM tensor",
                                  where=core.label)
            writes = []
        else:
            writes = [core.span(dst, 0, dst_end, "fixpipe dst")]
        add = isinstance(dst, GlobalTensor) and core.check_atomic(dst.dtype, "fixpipe")
        if isinstance(dst, GlobalTensor) and m * n:
            head, nbytes, rate = costs.fixpipe_gm_transfer(self.spec, m * n, m * n * sz)
            core.issue("fixpipe", Pipe.PIPE_FIX, 0, reads, writes, gm=(head + extra, nbytes, rate))
        else:
            core.issue("fixpipe", Pipe.PIPE_FIX, costs.fixpipe(self.spec, m * n, m * n * sz, False) + extra, reads,
                       writes)
        core.count_bytes(f"L0C->{dst.kind}", m * n * sz)
        if not self.functional or not m or not n:
            return
        n16 = -(-n // 16)
        tile = src.flat_view(0, n16 * src_rows * 16).reshape(n16, src_rows, 16)[:, :m, :]
        acc = tile.transpose(1, 0, 2).reshape(m, n16 * 16)[:, :n]
        words = qwords.flat_view(0, n).copy() if mode in VECTOR_QUANT_MODES else word
        try:
            out = fixpipe_convert(np.ascontiguousarray(acc), mode, words=words, relu=p.relu_en)
        except (TypeError, ValueError) as e:  # data-dependent: e.g. per-channel words disagree on the sign bit
            raise ParamError(f"fixpipe: {e}", where=core.label) from None
        if out.dtype != dst.dtype:
            raise DTypeError(f"fixpipe {mode.name} produced {dtype_name(out.dtype)} (by the quant word's sign bit); "
                             f"destination is {dtype_name(dst.dtype)}", where=core.label)
        flat = dst.flat_view(0, dst_end)
        if cfg == "row_major":
            view = np.lib.stride_tricks.as_strided(flat, shape=(m, n), strides=(pitch * sz, sz), writeable=True)
        else:
            view = np.lib.stride_tricks.as_strided(flat, shape=(n // c0, m, c0), strides=(col_pitch * sz, c0 * sz, sz),
                                                   writeable=True)
            out = out.reshape(m, n // c0, c0).transpose(1, 0, 2)
        core.store_gm(view, out, add)
