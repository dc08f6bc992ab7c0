"""The data-movement engines: DataCopy, DataCopyPad, ND→NZ into L1, Load2D.

Paths are named src→dst and dispatched through `PATHS`; an unsupported pair raises an
error listing the supported ones. Functional copies are strided NumPy views over the raw
bytes (C speed); atomic add reads, adds in the atomic dtype and writes back.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import costs
from .buffers import BUFFER_KINDS, LocalTensor
from .errors import AlignmentError, BoundsError, DTypeError, ParamError, operand_name
from .gm import GlobalTensor
from .numerics import dtype_name
from .params import DataCopyExtParams, DataCopyPadExtParams, DataCopyParams, LoadData2DParams, Nd2NzParams
from .pipes import Pipe

BLK = 32
FRACTAL = 512

# (src kind, dst kind) → (pipe, spec field of the rate). GM moves are capped per core by the rate.
PATHS = {
    ("GM", "UB"): (Pipe.PIPE_MTE2, "gm_read_bytes_per_cycle"),
    ("UB", "GM"): (Pipe.PIPE_MTE3, "aiv_gm_write_bytes_per_cycle"),
    ("GM", "L1"): (Pipe.PIPE_MTE2, "gm_read_bytes_per_cycle"),
    ("L1", "GM"): (Pipe.PIPE_MTE3, "aic_gm_write_bytes_per_cycle"),
    ("UB", "UB"): (Pipe.PIPE_V, "ub_to_ub_bytes_per_cycle"),
    ("L1", "BT"): (Pipe.PIPE_MTE1, "l1_to_bt_bytes_per_cycle"),
    ("L1", "FB"): (Pipe.PIPE_MTE1, "l1_to_fb_bytes_per_cycle"),
}
LOAD_PATHS = {
    ("L1", "L0A"): (Pipe.PIPE_MTE1, "l1_to_l0a_bytes_per_cycle"),
    ("L1", "L0B"): (Pipe.PIPE_MTE1, "l1_to_l0b_bytes_per_cycle"),
    ("GM", "L0A"): (Pipe.PIPE_MTE2, "gm_read_bytes_per_cycle"),
    ("GM", "L0B"): (Pipe.PIPE_MTE2, "gm_read_bytes_per_cycle"),
}
PAD_PATHS = {("GM", "UB"): PATHS[("GM", "UB")], ("GM", "L1"): PATHS[("GM", "L1")],
             ("UB", "GM"): PATHS[("UB", "GM")]}
_PATH_NAMES = {(a, b): f"{a}->{b}" for a in ("GM", *BUFFER_KINDS) for b in ("GM", *BUFFER_KINDS)}  # count_bytes keys
_NO_PATH = {
    ("L0C", "UB"): "L0C→UB does not exist on 910B/910C (950 only); use fixpipe to GM",
    ("L1", "UB"): "L1→UB does not exist on 910B/910C; go through GM",
    ("UB", "L1"): "UB→L1 has no hardware path; go UB→GM→L1",
}


def _strided(data: np.ndarray, off: int, count: int, pitch: int, width: int) -> np.ndarray:
    """A (count, width) byte view starting at `off` with row pitch `pitch`."""
    base = data[off:]
    return as_strided(base, shape=(count, width), strides=(pitch, 1), writeable=True)


class DmaInstructions:
    """Data-movement instructions of `ctx` (mixed into CoreContext)."""

    # --- plumbing ----------------------------------------------------------------------------
    def _operand(self, t, what: str):
        core = self._core
        if type(t) is LocalTensor and core.buffers.get(t.buffer.kind) is t.buffer:
            return t  # a local tensor of this core: what local() would return
        if not isinstance(t, (GlobalTensor, LocalTensor)):
            raise DTypeError(f"{what} must be a GlobalTensor or a LocalTensor, got {type(t).__name__}",
                             where=core.label)
        if isinstance(t, GlobalTensor):
            if t.gm is not core.gm:
                raise ParamError(f"{what} is in another die's GM", where=core.label)
            return t
        return core.local(t, core.buffers, what)

    def _path(self, src, dst, table, name):
        key = (src.kind, dst.kind)
        if key in table:
            return table[key]
        why = _NO_PATH.get(key, "")
        ok = ", ".join(f"{a}→{b}" for a, b in table)
        raise ParamError(f"{name}: no {key[0]}→{key[1]} path{': ' + why if why else ''}; supported: {ok}",
                         where=self._core.label)

    def _region(self, t, start_byte: int, end_byte: int, what):
        """A race region (local) after a bounds check; GM regions are only bounds-checked. (`what`: a string, or
        a tuple of strings joined by spaces, made into a message only on an error.)"""
        if start_byte < 0 or end_byte > t.nbytes:
            what = operand_name(what)
            raise BoundsError(f"{what} touches bytes [{start_byte}, {end_byte}) of a {t.nbytes} B {t.kind} "
                              f"tensor {t.shape} {dtype_name(t.dtype)}", where=self._core.label)
        if isinstance(t, LocalTensor):
            return [(t.buffer, t.offset + start_byte, t.offset + end_byte)]
        return []

    def _bytes_of(self, t) -> tuple[np.ndarray, int]:
        if isinstance(t, LocalTensor):
            return t.buffer.data, t.offset
        return t._data(), t.offset

    def _check_align(self, t, align: int, what):
        if isinstance(t, LocalTensor) and t.offset % align:
            what = operand_name(what)
            raise AlignmentError(f"{what}: {t.kind} address {t.offset:#x} is not {align} B aligned",
                                 where=self._core.label)

    def _store(self, dst_rows: np.ndarray, src_rows: np.ndarray, dst) -> None:
        """Write byte rows into dst; into GM under set_atomic_add this is a read-add-write."""
        if self._core.atomic is not None and isinstance(dst, GlobalTensor):
            d = np.ascontiguousarray(dst_rows).view(dst.dtype)
            self._core.store_gm(d, np.ascontiguousarray(src_rows).view(dst.dtype), True)
            dst_rows[...] = d.view(np.uint8).reshape(dst_rows.shape)
        else:
            dst_rows[...] = src_rows

    def _move(self, name, path, src, dst, blocks, width, src_pitch, dst_pitch, src_first=0, dst_first=0,
              gm_side=None, extra_reads=(), extra_writes=()):
        """Issue a move of `blocks` rows of `width` bytes, with pitches, charged per the path."""
        core = self._core
        pipe, rate_field = path
        rate = getattr(self.spec, rate_field)
        src_end = src_first + (blocks - 1) * src_pitch + width if blocks else src_first
        dst_end = dst_first + (blocks - 1) * dst_pitch + width if blocks else dst_first
        if dst.kind == "GM":
            core.check_atomic(dst.dtype, name)
        reads = self._region(src, src_first, src_end, (name, "source"))
        writes = self._region(dst, dst_first, dst_end, (name, "destination"))
        if extra_reads:
            reads += extra_reads
        if extra_writes:
            writes += extra_writes
        nbytes = blocks * width
        if not blocks:
            core.issue(name, pipe, 0, reads, writes)
        elif src.kind == "GM" or dst.kind == "GM":
            core.issue(name, pipe, 0, reads, writes,
                       gm=costs.gm_transfer(self.spec, costs.gm_charged_bytes(self.spec, width, blocks), rate))
        else:
            core.issue(name, pipe, costs.local_move(self.spec, nbytes, rate), reads, writes)
        core.count_bytes(_PATH_NAMES[(src.kind, dst.kind)], nbytes)
        if self.functional and blocks and width:
            sd, so = self._bytes_of(src)
            dd, do = self._bytes_of(dst)
            self._store(_strided(dd, do + dst_first, blocks, dst_pitch, width),
                        _strided(sd, so + src_first, blocks, src_pitch, width).copy(), dst)

    # --- DataCopy ------------------------------------------------------------------------------
    def data_copy(self, dst, src, count_or_params=None) -> None:
        """`DataCopy(dst, src, count)` or `DataCopy(dst, src, DataCopyParams)` (GM↔UB, GM↔L1, UB→UB,
        L1→BT/FB), or `DataCopy(dst_l1, src_gm, Nd2NzParams)` (ND→NZ). Without a count, the whole of
        `src` is copied. A count whose bytes are not a multiple of 32 is an error (the hardware would
        round it down): use data_copy_pad."""
        nd2nz = isinstance(count_or_params, Nd2NzParams)
        if not nd2nz and isinstance(src, (GlobalTensor, LocalTensor)) and isinstance(dst, (GlobalTensor, LocalTensor)):
            path = self._path(src, dst, PATHS, "data_copy")  # first, so UB→L1 / L0C→UB say why they do not exist
        src = self._operand(src, "data_copy source")
        dst = self._operand(dst, "data_copy destination")
        if nd2nz:
            return self._nd2nz(dst, src, count_or_params)
        if src.dtype != dst.dtype:
            raise DTypeError(f"data_copy does not convert: source is {dtype_name(src.dtype)}, destination "
                             f"{dtype_name(dst.dtype)}", where=self._core.label)
        self._check_align(src, BLK, ("data_copy", "source"))
        self._check_align(dst, BLK, ("data_copy", "destination"))
        if isinstance(count_or_params, DataCopyParams):
            p = count_or_params
            if not (0 <= p.block_count <= 4095 and 0 <= p.block_len <= 65535 and 0 <= p.src_stride <= 65535
                    and 0 <= p.dst_stride <= 65535):
                raise ParamError(f"data_copy: {p} is out of range (block_count ≤ 4095, u16 lengths and strides)",
                                 where=self._core.label)
            blocks = p.block_count if p.block_len else 0
            w = p.block_len * BLK
            return self._move("data_copy", path, src, dst, blocks, w, (p.block_len + p.src_stride) * BLK,
                              (p.block_len + p.dst_stride) * BLK)
        count = src.size if count_or_params is None else int(count_or_params)
        nbytes = count * src.dtype.itemsize
        if count < 0:
            raise ParamError(f"data_copy: negative count {count}", where=self._core.label)
        if nbytes % BLK:
            raise AlignmentError(f"data_copy of {count} {dtype_name(src.dtype)} = {nbytes} B is not a multiple of "
                                 f"32 B: the hardware would round it down; use data_copy_pad",
                                 where=self._core.label)
        self._move("data_copy", path, src, dst, 1 if nbytes else 0, nbytes, nbytes, nbytes)

    # --- DataCopyPad -----------------------------------------------------------------------------
    def data_copy_pad(self, dst, src, params: DataCopyExtParams, pad: DataCopyPadExtParams | None = None) -> None:
        """`DataCopyPad`. GM→UB/L1: each block of `block_len` bytes lands in UB after `left_padding`
        elements and is padded up to a 32 B boundary (after `right_padding` elements); with `is_pad`
        the padding holds `padding_value`, otherwise those bytes are left as they were.
        UB→GM: exactly `block_len` bytes of each block land in GM."""
        core = self._core
        if all(isinstance(t, (GlobalTensor, LocalTensor)) for t in (src, dst)):
            self._path(src, dst, PAD_PATHS, "data_copy_pad")  # before the ownership checks (see data_copy)
        src = self._operand(src, "data_copy_pad source")
        dst = self._operand(dst, "data_copy_pad destination")
        key = (src.kind, dst.kind)
        if src.dtype != dst.dtype:
            raise DTypeError(f"data_copy_pad does not convert: {dtype_name(src.dtype)} → {dtype_name(dst.dtype)}",
                             where=core.label)
        p, pad = params, pad or DataCopyPadExtParams()
        sz = src.dtype.itemsize
        if not (0 <= p.block_count <= 4095 and 0 <= p.block_len <= 2097151 and p.src_stride >= 0 and p.dst_stride >= 0):
            raise ParamError(f"data_copy_pad: {p} is out of range (block_count ≤ 4095, block_len ≤ 2097151 B)",
                             where=core.label)
        if p.block_len % sz:
            raise AlignmentError(f"data_copy_pad: block_len {p.block_len} B is not a whole number of "
                                 f"{dtype_name(src.dtype)} elements", where=core.label)
        if key in (("GM", "UB"), ("GM", "L1")):
            self._check_align(dst, BLK, "data_copy_pad destination")
            lp, rp = pad.left_padding * sz, pad.right_padding * sz
            if not (0 <= lp <= BLK and 0 <= rp <= BLK):
                raise ParamError(f"data_copy_pad: left/right padding {pad.left_padding}/{pad.right_padding} "
                                 f"elements exceed 32 B", where=core.label)
            ub_block = -(-(lp + p.block_len + rp) // BLK) * BLK
            pitch = ub_block + p.dst_stride * BLK
            blocks = p.block_count if p.block_len else 0
            writes = self._region(dst, 0, (blocks - 1) * pitch + ub_block if blocks else 0, "data_copy_pad destination")
            self._move("data_copy_pad", PATHS[key], src, dst, blocks, p.block_len, p.block_len + p.src_stride,
                       pitch, dst_first=lp, extra_writes=writes)
            if self.functional and blocks and pad.is_pad:
                fill = np.zeros(1, dst.dtype)
                fill[0] = pad.padding_value
                rows = _strided(dst.buffer.data if isinstance(dst, LocalTensor) else dst._data(), dst.offset,
                                blocks, pitch, ub_block).view(dst.dtype)
                rows[:, : lp // sz] = fill[0]
                rows[:, (lp + p.block_len) // sz: ub_block // sz] = fill[0]
        elif key == ("UB", "GM"):
            self._check_align(src, BLK, "data_copy_pad source")
            ub_block = -(-p.block_len // BLK) * BLK
            blocks = p.block_count if p.block_len else 0
            self._move("data_copy_pad", PATHS[key], src, dst, blocks, p.block_len, ub_block + p.src_stride * BLK,
                       p.block_len + p.dst_stride)
        else:
            raise AssertionError(key)  # PAD_PATHS lists exactly the branches above

    # --- ND → NZ into L1 ---------------------------------------------------------------------------
    def _nd2nz(self, dst, src, p: Nd2NzParams) -> None:
        core = self._core
        if (src.kind, dst.kind) != ("GM", "L1"):
            raise ParamError(f"data_copy with Nd2NzParams: no {src.kind}→{dst.kind} path; supported: GM→L1",
                             where=core.label)
        if src.dtype != dst.dtype:
            raise DTypeError(f"ND→NZ does not convert: {dtype_name(src.dtype)} → {dtype_name(dst.dtype)}",
                             where=core.label)
        self._check_align(dst, BLK, "ND→NZ destination")
        sz = src.dtype.itemsize
        c0 = BLK // sz
        if not (0 <= p.n_value <= 16384 and p.d_value >= 0 and p.nd_num >= 0 and p.src_d_value >= p.d_value):
            raise ParamError(f"Nd2NzParams {p}: need n_value ≤ 16384 and src_d_value ≥ d_value", where=core.label)
        c1 = -(-p.d_value // c0)
        rows = p.n_value
        if p.nd_num == 0 or rows == 0 or c1 == 0:
            core.issue("data_copy_nd2nz", Pipe.PIPE_MTE2, 0)
            return
        if c1 > 1 and p.dst_nz_c0_stride < 1:
            raise ParamError("Nd2NzParams: dst_nz_c0_stride must be ≥ 1 for more than one column block",
                             where=core.label)
        # source: the elements read; destination: the bounding region written (C0-wide rows)
        src_last = (p.nd_num - 1) * p.src_nd_matrix_stride + (rows - 1) * p.src_d_value + p.d_value
        dst_last = (p.nd_num - 1) * p.dst_nz_matrix_stride + (c1 - 1) * p.dst_nz_c0_stride * c0 + \
            (rows - 1) * p.dst_nz_n_stride * c0 + c0
        reads = self._region(src, 0, src_last * sz, "ND→NZ source")
        writes = self._region(dst, 0, dst_last * sz, "ND→NZ destination")
        charged = p.nd_num * costs.gm_charged_bytes(self.spec, p.d_value * sz, rows)
        core.issue("data_copy_nd2nz", Pipe.PIPE_MTE2, 0, reads, writes,
                   gm=costs.gm_transfer(self.spec, charged, self.spec.gm_read_bytes_per_cycle))
        core.count_bytes("GM->L1", p.nd_num * rows * p.d_value * sz)
        if not self.functional:
            return
        s_all = src.flat_view(0, src_last)
        d_all = dst.flat_view(0, dst_last)
        for i in range(p.nd_num):
            s = as_strided(s_all[i * p.src_nd_matrix_stride:], shape=(rows, p.d_value), strides=(p.src_d_value * sz, sz))
            tmp = np.zeros((rows, c1 * c0), src.dtype)
            tmp[:, :p.d_value] = s
            d = as_strided(d_all[i * p.dst_nz_matrix_stride:], shape=(c1, rows, c0),
                           strides=(p.dst_nz_c0_stride * BLK, p.dst_nz_n_stride * BLK, sz), writeable=True)
            d[...] = tmp.reshape(rows, c1, c0).transpose(1, 0, 2)

    # --- Load2D -----------------------------------------------------------------------------------
    def load_data(self, dst: LocalTensor, src, params: LoadData2DParams) -> None:
        """`LoadData(dst, src, LoadData2DParams)`: Load2D of whole 512 B fractals into L0A/L0B.
        Repeat i copies source fractal `start_index + i·src_stride` to destination fractal
        `i·(1 + dst_gap)`; with `if_transpose` (16-bit, L1 source) each 16×16 fractal is transposed."""
        core = self._core
        src = self._operand(src, "load_data source")
        dst = core.local(dst, ("L0A", "L0B"), "load_data destination")
        path = self._path(src, dst, LOAD_PATHS, "load_data")
        p = params
        if src.dtype != dst.dtype:
            raise DTypeError(f"load_data does not convert: {dtype_name(src.dtype)} → {dtype_name(dst.dtype)}",
                             where=core.label)
        if not (0 <= p.repeat_times <= 255 and p.start_index >= 0 and p.src_stride >= 0 and p.dst_gap >= 0):
            raise ParamError(f"load_data: {p} is out of range (repeat_times 0..255)", where=core.label)
        if p.if_transpose and (src.dtype.itemsize != 2 or src.kind != "L1"):
            raise ParamError(f"load_data: if_transpose needs a 16-bit type from L1, got {dtype_name(src.dtype)} "
                             f"from {src.kind}", where=core.label)
        self._check_align(dst, self.spec.l0a_align_bytes if dst.kind == "L0A" else self.spec.l0b_align_bytes,
                          "load_data destination")
        self._check_align(src, BLK, "load_data source")
        n = p.repeat_times
        if n == 0:
            core.issue("load_data", path[0], 0)
            return
        src_last = p.start_index + (n - 1) * p.src_stride
        dst_last = (n - 1) * (1 + p.dst_gap)
        reads = self._region(src, p.start_index * FRACTAL, (src_last + 1) * FRACTAL, "load_data source")
        writes = self._region(dst, 0, (dst_last + 1) * FRACTAL, "load_data destination")
        rate = getattr(self.spec, path[1])
        name = "load_data" + ("_t" if p.if_transpose else "")
        if src.kind == "GM":
            core.issue(name, path[0], 0, reads, writes, gm=costs.gm_transfer(self.spec, n * FRACTAL, rate))
        else:
            core.issue(name, path[0], costs.local_move(self.spec, n * FRACTAL, rate), reads, writes)
        core.count_bytes(f"{src.kind}->{dst.kind}", n * FRACTAL)
        if not self.functional:
            return
        src_idx = p.start_index + np.arange(n) * p.src_stride
        dst_idx = np.arange(n) * (1 + p.dst_gap)
        sd, so = self._bytes_of(src)
        dd, do = self._bytes_of(dst)
        fr = sd[so:so + (src_last + 1) * FRACTAL].reshape(-1, FRACTAL)[src_idx]
        if p.if_transpose:
            fr = fr.view(src.dtype).reshape(n, 16, 16).transpose(0, 2, 1).copy().view(np.uint8).reshape(n, FRACTAL)
        dd[do:do + (dst_last + 1) * FRACTAL].reshape(-1, FRACTAL)[dst_idx] = fr
