"""Instruction parameter structs, named and laid out as in Ascend C (snake_case fields).

Units follow the reference (ascend-910c.md §12, §13): DataCopy strides in 32 B blocks,
DataCopyPad block lengths in bytes, Load2D indices in 512 B fractals, vector strides in
32 B blocks (blk) and blocks-per-repeat (rep).
"""
from __future__ import annotations

from dataclasses import dataclass

from .numerics import QuantMode


@dataclass(frozen=True)
class DataCopyParams:
    """GM↔UB, GM↔L1 strided copy: `block_count` blocks of `block_len` × 32 B; strides are gaps (32 B units)."""
    block_count: int = 1
    block_len: int = 0
    src_stride: int = 0
    dst_stride: int = 0


@dataclass(frozen=True)
class DataCopyExtParams:
    """DataCopyPad: block_len in bytes. GM→UB: src_stride bytes (GM), dst_stride 32 B blocks (UB).
    UB→GM: src_stride 32 B blocks (UB), dst_stride bytes (GM)."""
    block_count: int = 1
    block_len: int = 0
    src_stride: int = 0
    dst_stride: int = 0
    rsv: int = 0


@dataclass(frozen=True)
class DataCopyPadExtParams:
    """DataCopyPad GM→UB padding: `left_padding`/`right_padding` elements (each ≤ 32 B) per block."""
    is_pad: bool = False
    left_padding: int = 0
    right_padding: int = 0
    padding_value: float = 0


@dataclass(frozen=True)
class Nd2NzParams:
    """GM (ND) → L1 (NZ). Matrix strides and src_d_value in elements; dst_nz_c0_stride and
    dst_nz_n_stride in 32 B units; dst_nz_matrix_stride in elements."""
    nd_num: int = 1
    n_value: int = 0
    d_value: int = 0
    src_nd_matrix_stride: int = 0
    src_d_value: int = 0
    dst_nz_c0_stride: int = 0
    dst_nz_n_stride: int = 1
    dst_nz_matrix_stride: int = 0


@dataclass(frozen=True)
class LoadData2DParams:
    """Load2D: one 512 B fractal per repeat; start_index, src_stride, dst_gap in fractals."""
    start_index: int = 0
    repeat_times: int = 1
    src_stride: int = 1
    sid: int = 0
    dst_gap: int = 0
    if_transpose: bool = False
    addr_mode: int = 0


@dataclass(frozen=True)
class MmadParams:
    """Mmad: C[m, n] (+)= A[m, k] · B[k, n]. cmatrix_init_val: C starts at 0 (else accumulate);
    cmatrix_source: C starts from the BiasTable. With m = 1 the cube runs as a GEMV and reads L0A as a
    plain ND row [GEMV.md], unless disable_gemv."""
    m: int = 0
    n: int = 0
    k: int = 0
    cmatrix_init_val: bool = True
    cmatrix_source: bool = False
    is_bias: bool = False
    unit_flag: int = 0
    k_direction_align: bool = False
    disable_gemv: bool = False


@dataclass(frozen=True)
class FixpipeParamsV220:
    """Fixpipe L0C→GM/L1. n_size, m_size: the output block; src_stride: rows of the L0C tile
    (ceil16(m_size) by default when 0); dst_stride: row pitch in elements (ND) or 32 B units
    between column blocks (NZ); quant_pre: QuantMode; deq_scalar: a quant word (u64)."""
    n_size: int = 0
    m_size: int = 0
    src_stride: int = 0
    dst_stride: int = 0
    quant_pre: QuantMode = QuantMode.NoQuant
    deq_scalar: int = 0
    relu_en: bool = False
    unit_flag: int = 0
    is_channel_split: bool = False
    nd_num: int = 1
    src_nd_stride: int = 0
    dst_nd_stride: int = 0


@dataclass(frozen=True)
class BinaryRepeatParams:
    dst_blk_stride: int = 1
    src0_blk_stride: int = 1
    src1_blk_stride: int = 1
    dst_rep_stride: int = 8
    src0_rep_stride: int = 8
    src1_rep_stride: int = 8


@dataclass(frozen=True)
class UnaryRepeatParams:
    dst_blk_stride: int = 1
    src_blk_stride: int = 1
    dst_rep_stride: int = 8
    src_rep_stride: int = 8


@dataclass(frozen=True)
class BrcbRepeatParams:
    dst_blk_stride: int = 1
    dst_rep_stride: int = 8
