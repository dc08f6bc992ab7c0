"""Tiled fp16 / bf16 matmul on one AIC: C[M, N] = A[M, K] · B[K, N], all ND in GM, fp32 accumulation.

The kernel mirrors a CATLASS basic matmul (BlockMmad with L1 and L0 ping-pong) written
straight out in Ascend C's vocabulary. Per C tile (`base_m × base_n`) and k-step (`base_k`):

    GM ──DataCopy Nd2Nz (MTE2)──▶ L1 A   16-row strips → Zz order   ──LoadData 2D (MTE1)──────────▶ L0A (Zz)
    GM ──DataCopy Nd2Nz (MTE2)──▶ L1 B   16-row strips of K          ──LoadData 2D, transpose (MTE1)─▶ L0B (Zn)
    Mmad (M): L0A × L0B → L0C (fp32, Nz), accumulating over K
    Fixpipe (FIX): L0C → GM, F322F16 / F322BF16 (or NoQuant fp32), NZ → ND on the way

Tiling (the default `MatmulTiles()`, reasoned from the cycle model in costs.py):

* base 128 × 128 × 128: one Mmad is 512 + 16 cycles; its operands are one Load2D of A
  (32 KiB, 128 + 16 cycles on MTE1) and one of B (32 KiB at 128 B/cycle, 256 + 16), so
  MTE1 is ~79 % of the cube and hides behind it with L0A/L0B ping-pong. L0C holds two
  fp32 128 × 128 tiles (ping-pong), so the Fixpipe of one tile (~413 cycles, capped by the
  86 B/cycle GM write) overlaps the Mmads of the next.
* A goes GM→L1 as `nd_num` = M1 strips of 16 rows (`dst_nz_matrix_stride` = 16·K1·16), which
  is Zz order already: ONE Load2D (repeat M1·K1) moves it. B goes as strips of 16 K-rows
  (Nz per strip); ONE transposing Load2D per k-step turns a run of strips into Zn.
* GM traffic: the loop is n-tile → m-tile → k. B's K × 128 panel stays in L1 (B_SLOTS = 2
  chunks of `b_chunk_k` = 512 rows, 256 KiB) while A streams through a ring of A_SLOTS = 4
  k-step tiles (128 KiB: MTE2 runs up to 4 k-steps ahead, which absorbs the burst of B loads
  at the start of each n-tile). Per-chunk flags let the next panel's chunk j load as soon as
  the last m-tile has finished with chunk j. At 1024³ MTE2 reads B once and A N/128 times:
  2 + 16 MiB ≈ 172 k cycles at 110 B/cycle, against 270 k cycles of Mmad; the model gives
  ~97 % cube utilisation. When K does not fit (K > B_SLOTS · b_chunk_k = 1024) B is streamed
  like A (re-read for every m-tile) and MTE2 becomes the binding pipe (~73 % cube at 2048³).

Synchronisation is flags only, CATLASS style: every "buffer free" flag is set once at the
start and drained (waited on) at the end, so every set has its wait. Event ids:
MTE2_MTE1 / MTE1_MTE2 0..3 for the A ring, 4..5 for the B slots; MTE1_M / M_MTE1 0..1 for
the L0A+L0B ping-pong; M_FIX / FIX_M 0..1 for the L0C ping-pong.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import ascendemu
from ascendemu import (FixpipeParamsV220, GlobalTensor, HardEvent, LoadData2DParams, MmadParams, Nd2NzParams,
                       QuantMode)
from ascendemu.layouts import ceil_div
from ascendemu.numerics import as_dtype, dtype_name

from .rowwise import Staging

IN_DTYPES = ("float16", "bfloat16")
OUT_QUANT = {"float16": QuantMode.F322F16, "bfloat16": QuantMode.F322BF16, "float32": QuantMode.NoQuant}
A_SLOTS, A_ID = 4, 0  # L1 ring of A k-step tiles: event ids 0..3
B_SLOTS, B_ID = 2, 4  # L1 slots of B chunks: event ids 4, 5 (ids 6, 7 are left to the system and TPipe)
FRAC = 16  # rows of a fractal; C0 of a 16-bit type
U16_MAX = 65535  # Nd2NzParams fields are uint16_t in Ascend C (srcDValue, srcNdMatrixStride, …)


_cdiv = ceil_div  # the shape helper of ascendemu.layouts


@dataclass(frozen=True)
class MatmulTiles:
    """Block sizes in elements. m, n, k: one C tile and one Mmad's K; b_chunk_k: rows of B per GM→L1 move."""

    m: int = 128
    n: int = 128
    k: int = 128
    b_chunk_k: int = 512

    def can_implement(self, spec) -> str | None:
        """None if these tiles fit the core of `spec` (16-bit inputs, fp32 accumulator), else the reason."""
        for name in ("m", "n", "k", "b_chunk_k"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < FRAC or v % FRAC:
                return f"tiles.{name} = {v!r} must be a positive multiple of {FRAC}"
        if self.b_chunk_k % self.k:
            return f"tiles.b_chunk_k = {self.b_chunk_k} must be a multiple of tiles.k = {self.k}"
        need = {"L0A": (2 * self.m * self.k * 2, spec.l0a_bytes), "L0B": (2 * self.k * self.n * 2, spec.l0b_bytes),
                "L0C": (2 * self.m * self.n * 4, spec.l0c_bytes),
                "L1": (A_SLOTS * self.m * self.k * 2 + B_SLOTS * self.b_chunk_k * self.n * 2, spec.l1_bytes)}
        for buf, (used, cap) in need.items():
            if used > cap:
                return f"tiles {self} need {used} B of {buf} (double-buffered), which holds {cap} B"
        if (self.m // FRAC) * (self.k // FRAC) > 255 or (self.k // FRAC) * (self.n // FRAC) > 255:
            return f"tiles {self}: one Load2D moves at most 255 fractals"
        return None


def copy_gm_to_l1_strips(ctx, dst, src, rows: int, cols: int, src_cols: int) -> None:
    """`DataCopy(dst, src, Nd2NzParams)`: ND rows × cols (row pitch src_cols) → L1 as 16-row strips,
    each strip ⌈cols/16⌉ fractals in a row — for A that is Zz order. A ragged last strip is a second
    move; so is every strip when 16 rows of the source overflow the u16 srcNdMatrixStride."""
    c1 = _cdiv(cols, FRAC)
    strip = FRAC * FRAC * c1  # elements from one strip to the next
    full, tail = divmod(rows, FRAC)
    moves = [(0, full, FRAC)] if FRAC * src_cols <= U16_MAX else [(i, 1, FRAC) for i in range(full)]
    if tail:
        moves.append((full, 1, tail))
    for first, nd_num, n_value in moves:
        if nd_num:
            ctx.data_copy(dst[first * strip:], src[first * FRAC * src_cols:],
                          Nd2NzParams(nd_num=nd_num, n_value=n_value, d_value=cols,
                                      src_nd_matrix_stride=FRAC * src_cols if nd_num > 1 else 0,
                                      src_d_value=src_cols, dst_nz_c0_stride=FRAC, dst_nz_n_stride=1,
                                      dst_nz_matrix_stride=strip))


@ascendemu.kernel("aic")
def matmul_kernel(ctx, a, b, c, m, n, k, tiles):
    """C = A · B on one AIC. a (m × k), b (k × n): fp16/bf16 GM tensors; c (m × n): fp16/bf16/fp32."""
    bm, bn, bk, bkc = tiles.m, tiles.n, tiles.k, tiles.b_chunk_k
    dt = a.dtype
    quant = OUT_QUANT[dtype_name(c.dtype)]
    a_gm, b_gm, c_gm = a.flatten(), b.flatten(), c.flatten()

    l1_a = [ctx.l1.alloc((bm * bk,), dt) for _ in range(A_SLOTS)]
    l1_b = [ctx.l1.alloc((bkc * bn,), dt) for _ in range(B_SLOTS)]
    l0a = [ctx.l0a.alloc((bm * bk,), dt) for _ in range(2)]
    l0b = [ctx.l0b.alloc((bk * bn,), dt) for _ in range(2)]
    l0c = [ctx.l0c.alloc((bm * bn,), "float32") for _ in range(2)]

    # Every "buffer free" flag starts set; the end of the kernel drains them.
    for i in range(A_SLOTS):
        ctx.set_flag(HardEvent.MTE1_MTE2, A_ID + i)
    for j in range(B_SLOTS):
        ctx.set_flag(HardEvent.MTE1_MTE2, B_ID + j)
    for p in range(2):
        ctx.set_flag(HardEvent.M_MTE1, p)
        ctx.set_flag(HardEvent.FIX_M, p)

    k_chunks = _cdiv(k, bkc)
    b_resident = k_chunks <= B_SLOTS  # B's K × bn panel stays in L1 across the m-tiles
    m_tiles = _cdiv(m, bm)
    ia = ib = il0 = ic = 0  # ring positions: L1 A, L1 B (streamed), L0A/L0B, L0C
    for n0 in range(0, n, bn):
        nn = min(bn, n - n0)
        n1 = _cdiv(nn, FRAC)
        for mt in range(m_tiles):
            m0 = mt * bm
            mm = min(bm, m - m0)
            m1 = _cdiv(mm, FRAC)
            q = ic % 2
            ic += 1
            ctx.wait_flag(HardEvent.FIX_M, q)  # L0C tile q: its last Fixpipe is done
            for kc in range(k_chunks):
                k0c = kc * bkc
                kkc = min(bkc, k - k0c)
                if b_resident:
                    sb, load_b, free_b = kc, mt == 0, mt == m_tiles - 1
                else:
                    sb, load_b, free_b = ib % B_SLOTS, True, True
                    ib += 1
                if load_b:  # CopyIn B: kkc × nn → L1, 16-row strips of K
                    ctx.wait_flag(HardEvent.MTE1_MTE2, B_ID + sb)
                    copy_gm_to_l1_strips(ctx, l1_b[sb], b_gm[k0c * n + n0:], kkc, nn, n)
                    ctx.set_flag(HardEvent.MTE2_MTE1, B_ID + sb)
                    ctx.wait_flag(HardEvent.MTE2_MTE1, B_ID + sb)
                for s0 in range(0, kkc, bk):
                    k0 = k0c + s0
                    kk = min(bk, k - k0)
                    k1 = _cdiv(kk, FRAC)
                    # CopyIn A: mm × kk → L1 in Zz order (one strip of 16 rows per ND matrix)
                    sa = ia % A_SLOTS
                    ia += 1
                    ctx.wait_flag(HardEvent.MTE1_MTE2, A_ID + sa)
                    copy_gm_to_l1_strips(ctx, l1_a[sa], a_gm[m0 * k + k0:], mm, kk, k)
                    ctx.set_flag(HardEvent.MTE2_MTE1, A_ID + sa)
                    ctx.wait_flag(HardEvent.MTE2_MTE1, A_ID + sa)
                    # Split: L1 → L0A (Zz, as is) and L1 → L0B (Zn, each fractal transposed)
                    p = il0 % 2
                    il0 += 1
                    ctx.wait_flag(HardEvent.M_MTE1, p)
                    ctx.load_data(l0a[p], l1_a[sa], LoadData2DParams(repeat_times=m1 * k1))
                    ctx.load_data(l0b[p], l1_b[sb], LoadData2DParams(start_index=(s0 // FRAC) * n1,
                                                                     repeat_times=k1 * n1, if_transpose=True))
                    ctx.set_flag(HardEvent.MTE1_MTE2, A_ID + sa)
                    ctx.set_flag(HardEvent.MTE1_M, p)
                    # Compute: Mmad accumulating over K into L0C tile q
                    ctx.wait_flag(HardEvent.MTE1_M, p)
                    first = k0 == 0
                    if not first and m1 * n1 < 10:  # [Mmad.md] hazard on small accumulating tiles
                        ctx.pipe_barrier(ascendemu.PIPE_M)
                    ctx.mmad(l0c[q], l0a[p], l0b[p], MmadParams(m=mm, n=nn, k=kk, cmatrix_init_val=first,
                                                                           disable_gemv=True))
                    ctx.set_flag(HardEvent.M_MTE1, p)
                if free_b:
                    ctx.set_flag(HardEvent.MTE1_MTE2, B_ID + sb)
            # CopyOut: L0C → GM, cast and NZ → ND on the way
            ctx.set_flag(HardEvent.M_FIX, q)
            ctx.wait_flag(HardEvent.M_FIX, q)
            ctx.fixpipe(c_gm[m0 * n + n0:], l0c[q], FixpipeParamsV220(n_size=nn, m_size=mm, dst_stride=n,
                                                                     quant_pre=quant))
            ctx.set_flag(HardEvent.FIX_M, q)

    for i in range(A_SLOTS):
        ctx.wait_flag(HardEvent.MTE1_MTE2, A_ID + i)
    for j in range(B_SLOTS):
        ctx.wait_flag(HardEvent.MTE1_MTE2, B_ID + j)
    for p in range(2):
        ctx.wait_flag(HardEvent.M_MTE1, p)
        ctx.wait_flag(HardEvent.FIX_M, p)


# ----------------------------------------------------------------------------------------------------- host side


def matmul_reference(a, b, out_dtype=None) -> np.ndarray:
    """NumPy golden: fp32 product of the inputs, rounded once to the output dtype (default: a's dtype)."""
    a, b = np.asarray(a), np.asarray(b)
    out = as_dtype(out_dtype) if out_dtype is not None else a.dtype
    return (a.astype(np.float32) @ b.astype(np.float32)).astype(out)


def _name_or_none(dt) -> str | None:
    try:
        return dtype_name(as_dtype(dt))
    except TypeError:
        return None


def _operand(die, x, name: str):
    if isinstance(x, GlobalTensor):
        if x.gm is not die.gm:
            raise ValueError(f"matmul: {name} is a GlobalTensor of another die's GM")
        return x
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"matmul: {name} must be a numpy array or a GlobalTensor, got {type(x).__name__}")


def matmul(die, a, b, *, out_dtype=None, tiles: MatmulTiles | None = None):
    """C = A · B on one AIC of `die` (block_dim 1); the launch's report is `die.last_report`.

    a (M × K) and b (K × N) are numpy arrays or GlobalTensors of `die` (phantoms in timing-only
    mode), both float16 or both bfloat16; out_dtype is float16, bfloat16 or float32 (default:
    the input dtype). Returns a numpy array if both inputs are numpy arrays and the die is
    functional, else the GlobalTensor C (a phantom in timing-only mode).
    """
    a, b = _operand(die, a, "a"), _operand(die, b, "b")
    for x, name in ((a, "a"), (b, "b")):
        if len(x.shape) != 2:
            raise ValueError(f"matmul: {name} must be 2-D, got shape {tuple(x.shape)}")
        if _name_or_none(x.dtype) not in IN_DTYPES:
            raise TypeError(f"matmul: {name} is {x.dtype}; the cube takes {' or '.join(IN_DTYPES)} here")
    if a.dtype != b.dtype:
        raise TypeError(f"matmul: a is {dtype_name(a.dtype)} but b is {dtype_name(b.dtype)}; they must match")
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"matmul: inner dimensions differ: a is {m} × {k}, b is {k2} × {n}")
    if min(m, n, k) < 1:
        raise ValueError(f"matmul: M, N, K must be ≥ 1, got M={m}, N={n}, K={k}")
    if max(n, k) > U16_MAX:
        raise ValueError(f"matmul: K = {k} and N = {n} are GM row pitches of A and B; Nd2NzParams.srcDValue "
                         f"(uint16) allows at most {U16_MAX}")
    try:
        out = as_dtype(a.dtype if out_dtype is None else out_dtype)
    except TypeError:
        raise TypeError(f"matmul: out_dtype {out_dtype!r} is not one of {', '.join(OUT_QUANT)}") from None
    if dtype_name(out) not in OUT_QUANT:
        raise TypeError(f"matmul: out_dtype {dtype_name(out)} is not one of {', '.join(OUT_QUANT)}")
    tiles = MatmulTiles() if tiles is None else tiles
    if not isinstance(tiles, MatmulTiles):
        raise TypeError(f"matmul: tiles must be a MatmulTiles, got {type(tiles).__name__}")
    why = tiles.can_implement(die.spec)
    if why:
        raise ValueError(f"matmul: {why}")

    with Staging(die, "matmul") as st:
        ga, gb = st.put(a, "a"), st.put(b, "b")
        c = st.output((m, n), out)
        (c,) = st.launch(matmul_kernel, 1, (ga, gb, c, m, n, k, tiles))
    return c

