"""INT8 GEMM family on one 910C die: per-channel weight quantisation, INT8 × INT8 → INT32 GEMM on all 24 AIC
with dequantisation to bf16 on their 48 AIV, and the grouped (MoE expert) form.

    q, s_w = quantize_weight_per_channel(w)            # host, [N, K] float → int8 [N, K], fp32 [N]
    w_p = pack_weight(q)                               # host, once: the Nz layout the kernel reads
    y = int8_gemm(die, a_q, a_scale, w_p, s_w)         # y[M, N] bf16 = (a_q @ qᵀ) · a_scale[:, None] · s_w[None, :]
    y = grouped_int8_gemm(die, a_q, a_scale, group_sizes, [w_p0, w_p1, …], [s_w0, s_w1, …])

One `@ascendemu.kernel("mix")` kernel (`int8_gemm_kernel`) serves both host functions: 24 groups of 1 AIC + 2 AIV.

AIC (per work item = one output tile of `tiles.m × tiles.n`, accumulated over all of K in L0C):

    GM a_q  ──DataCopy Nd2Nz (MTE2)──▶ L1 A chunk (Nz, m × kc)   ──LoadData 2D, one per k-block (MTE1)──▶ L0A (Zz)
    GM w_p  ──DataCopy strided (MTE2)─▶ L1 B chunk (Zn, kc × n)  ──LoadData 2D, one move (MTE1)─────────▶ L0B (Zn)
    Mmad s8·s8→s32 (M): L0A × L0B → L0C, accumulating over K (k-steps of `tiles.k`)
    Fixpipe NoQuant (FIX): L0C int32 → GM (y itself for out_dtype="int32", else a per-group workspace ring)

  * The packed weight W [N, K] in Nz (C0 = 32) is byte-identical to Zn(Wᵀ): a k-chunk of one n-tile is
    ⌈kc/32⌉ runs of ⌈n/16⌉ whole fractals, one strided DataCopy, and one plain Load2D feeds L0B.
  * A goes GM→L1 as ONE Nd2Nz (Nz, column blocks of ⌈m/16⌉ fractals); L0A needs Zz, so each k-step issues one
    Load2D per 32-wide k-block with dst_gap = k1 − 1 (Nz → Zz only reorders whole fractals) — CATLASS's way.
  * L1 holds a ring of `tiles.stages` k-chunks (A, and B when streamed); L0A/L0B ping-pong; L0C ping-pongs when
    two accumulators fit (else one, and the next tile's first Mmad waits for the Fixpipe). When K is small enough
    (`tiles.resident`), an n-tile's whole B panel stays in L1 while the core walks down consecutive m-tiles of
    that n-tile, so B is read once per run instead of once per tile.
  * m = 1 is computed with `disable_gemv=True` (L0A holds Zz, not the GEMV's ND row).

AIV (bf16 output): the AIC Fixpipes each int32 tile into a ring of `WS_SLOTS` workspace slots of its group and
signals `cross_core_set_flag(2, PIPE_FIX, READY)`; each of its two AIVs takes half of the tile's rows, in chunks:

    GM workspace int32 ─DataCopy (MTE2)─▶ UB ─Cast s32→f32 RINT─▶ ·w_scale[n] (Mul, the row vector, rep stride 0)
        ─▶ ·a_scale[m] (Brcb the row scales to one 32 B block each, then Mul with blk stride 0, rep stride 1)
        ─▶ Cast f32→bf16 RINT (V) ─DataCopyPad (MTE3)─▶ GM y

  and frees the workspace slot with `cross_core_set_flag(2, PIPE_MTE2, FREE)` as soon as its last load of the
  slot has completed (MTE2 is the only reader of the slot, so this is the earliest correct point).

Dequantisation order (the reference and the tests use exactly this, and the kernel is bit-exact to it):

    y = bf16_rint( f32( f32( f32_rint(acc) · w_scale[n] ) · a_scale[m] ) )

  each product rounded to fp32 (round half to even); the final cast rounds half to even.

Work distribution: the host "tiling" (`plan_int8_gemm`, as Ascend C's host-side tiling) lists the work items
(group, m-tile, n-tile) in the order group → n-tile → m-tile, weighs each by its cycles when every core streams
(max(Mmad cycles, GM bytes / the core's share of HBM)), and cuts the list into `block_dim` contiguous runs of equal
weight (item i goes to core ⌊P · midpoint_i / total⌋, with no core left empty while items ≥ cores). The busiest
core carries about total / P + one item whatever the group sizes; empty groups have no items; contiguity keeps an
n-tile's m-tiles on one core, so a resident B panel is reused.

Tile choice, unless `tiles` is given: every (m, n) with an L0C accumulator ≤ 128 KiB (m ∈ {64, 128, 256} or the
rows of the largest group, n a multiple of 16 up to 512) is scored by a cost model — per-core sums of
max(Mmad, GM bytes at 110 B/cycle) against the die's HBM bytes / 865 B/cycle; it tracks the emulator within ~5 % —
among the shapes that keep ≥ 90 % of the cores that any shape could keep busy. (Why not fewer cores: the emulator
does not model L2, so 24 cores re-reading the same A rows look costly here; on the 910C the 192 MB L2 serves those
re-reads, and a plan that idled cores to avoid them would optimise a model artefact.) Within 3 % of the best score
it takes the plan with the fewest instructions (bigger tiles: fewer instruction heads, faster emulation).

What limits it in the model: HBM, for every DeepSeek-R1 shape (benchmarks/test_bench_int8_gemm.py). A 128 KiB L0C
caps a tile's reuse at m·n/(m+n) ≈ 85 MACs per GM byte (n per byte with B resident), the cube's peak needs ~227 per
HBM byte, and no L2 is modelled. The int32 workspace adds 10 B of HBM traffic per output element (int32 out and
back, bf16 out); Fixpipe DEQF16 would halve the round trip but rounds to fp16 first, so it is not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import ascendemu
from ascendemu import (BinaryRepeatParams, DataCopyExtParams, DataCopyParams, FixpipeParamsV220, GlobalTensor,
                       HardEvent, LoadData2DParams, MmadParams, Nd2NzParams, QuantMode, RoundMode)
from ascendemu.layouts import ceil_div, nd_to_nz, nz_to_nd, round_up
from ascendemu.numerics import as_dtype, dtype_name

FRAC = 16  # rows of a fractal
C0 = 32  # int8 elements per fractal row (k0 of the int8 cube)
FRACTAL_BYTES = 512
U16_MAX = 65535
OUT_DTYPES = ("bfloat16", "int32")
WS_SLOTS = 2  # workspace tiles per group in flight between the AIC and its AIVs
READY, FREE = 0, 1  # cross-core flag ids: AIC → AIVs "tile in workspace", AIVs → AIC "slot free"
B_ID = 2  # MTE2_MTE1 / MTE1_MTE2 ids of the resident B chunks (the A/stage ring uses 0..stages-1)
MAX_RESIDENT_CHUNKS = 4  # B_ID + 3 = 5: ids 6 and 7 are left to the system and TPipe
W_ID = 2  # AIV: MTE2_V / V_MTE2 ids 2, 3 for the w_scale row of an item (0, 1: the chunk ring)
BF16 = as_dtype("bfloat16")


_cdiv, _up = ceil_div, round_up  # the shape helpers of ascendemu.layouts


# ------------------------------------------------------------------------------------------------ packed weights


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """An int8 weight [N, K] (Hugging Face [out_features, in_features]) in the Nz layout the kernel reads.

    `data` is a numpy int8 array or a GlobalTensor (a phantom in timing-only mode) of shape
    (⌈K/32⌉, ⌈N/16⌉, 16, 32): Nz of W with C0 = 32, zero-padded — byte-identical to Zn(Wᵀ), the L0B operand.
    (n, k) is the logical shape, which the padded array alone does not carry.
    """

    data: object
    n: int
    k: int

    @property
    def shape(self) -> tuple:
        return (self.n, self.k)

    @property
    def packed_shape(self) -> tuple:
        return packed_shape(self.n, self.k)

    def numpy(self) -> np.ndarray:
        """The int8 [N, K] weight (unpacked on the host)."""
        return unpack_weight(self)


def packed_shape(n: int, k: int) -> tuple:
    """Shape of the Nz-packed int8 weight [n, k]: (⌈k/32⌉, ⌈n/16⌉, 16, 32)."""
    return (_cdiv(k, C0), _cdiv(n, FRAC), FRAC, C0)


def quantize_weight_per_channel(w) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel INT8 quantisation of a weight w [N, K] (host, NumPy).

    scale[n] = fp32(max_k |w[n, k]| / 127) (the quotient formed in float64, rounded once to fp32);
    q[n, k] = clip(round_half_even(float64(w[n, k]) / float64(scale[n])), -127, 127).
    An all-zero row gets scale 1.0 and q = 0. A row whose scale would underflow fp32 (|w| < 127 · 2⁻¹⁴⁹,
    float64 input only) gets the smallest fp32 subnormal. Returns (q int8 [N, K], scale float32 [N]).
    """
    if isinstance(w, GlobalTensor):
        raise TypeError("quantize_weight_per_channel runs on the host: pass a numpy array, not a GlobalTensor")
    if not isinstance(w, np.ndarray):
        raise TypeError(f"quantize_weight_per_channel: w must be a numpy array, got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"quantize_weight_per_channel: w must be 2-D [N, K], got shape {w.shape}")
    if w.dtype not in (np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"quantize_weight_per_channel: w is {w.dtype}; expected float16, bfloat16, float32 or "
                        f"float64")
    if min(w.shape) < 1:
        raise ValueError(f"quantize_weight_per_channel: N and K must be ≥ 1, got shape {w.shape}")
    w64 = w.astype(np.float64)
    if not np.all(np.isfinite(w64)):
        raise ValueError("quantize_weight_per_channel: w has non-finite values (inf or NaN)")
    amax = np.abs(w64).max(axis=1)
    with np.errstate(over="ignore"):
        scale = (amax / 127.0).astype(np.float32)
    if not np.all(np.isfinite(scale)):
        raise ValueError("quantize_weight_per_channel: max|w| / 127 overflows fp32")
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    scale = np.where(amax == 0, np.float32(1.0), np.maximum(scale, tiny)).astype(np.float32)
    q = np.clip(np.rint(w64 / scale.astype(np.float64)[:, None]), -127, 127).astype(np.int8)
    return q, scale


def pack_weight(w_q, *, gm=None) -> PackedWeight:
    """Pack an int8 weight [N, K] once into the kernel's Nz layout (host).

    w_q: a numpy int8 array → a PackedWeight holding a numpy array (staged into GM by each GEMM call), or a
    GlobalTensor int8 [N, K] → a PackedWeight holding a GlobalTensor of the packed shape in the same GM (a phantom
    when w_q is a phantom: timing-only dies need no data). `gm`: optionally upload a numpy result to this
    GlobalMemory (e.g. `die.gm`) once, so repeated GEMMs do not stage it again.
    """
    if isinstance(w_q, GlobalTensor):
        if len(w_q.shape) != 2:
            raise ValueError(f"pack_weight: w_q must be 2-D [N, K], got shape {tuple(w_q.shape)}")
        if dtype_name(w_q.dtype) != "int8":
            raise TypeError(f"pack_weight: w_q is {dtype_name(w_q.dtype)}; it must be int8")
        n, k = w_q.shape
        if min(n, k) < 1:
            raise ValueError(f"pack_weight: N and K must be ≥ 1, got shape {(n, k)}")
        if w_q.is_phantom:
            return PackedWeight(w_q.gm.empty(packed_shape(n, k), "int8"), n, k)
        return PackedWeight(w_q.gm.from_numpy(nd_to_nz(w_q.numpy())), n, k)
    if not isinstance(w_q, np.ndarray):
        raise TypeError(f"pack_weight: w_q must be a numpy array or a GlobalTensor, got {type(w_q).__name__}")
    if w_q.ndim != 2:
        raise ValueError(f"pack_weight: w_q must be 2-D [N, K], got shape {w_q.shape}")
    if w_q.dtype != np.int8:
        raise TypeError(f"pack_weight: w_q is {w_q.dtype}; it must be int8 (quantize_weight_per_channel gives it)")
    if min(w_q.shape) < 1:
        raise ValueError(f"pack_weight: N and K must be ≥ 1, got shape {w_q.shape}")
    n, k = w_q.shape
    data = nd_to_nz(np.ascontiguousarray(w_q))
    return PackedWeight(gm.from_numpy(data) if gm is not None else data, n, k)


def unpack_weight(w: PackedWeight) -> np.ndarray:
    """The int8 [N, K] weight of a PackedWeight (host; not for phantoms)."""
    data = w.data.numpy() if isinstance(w.data, GlobalTensor) else w.data
    return nz_to_nd(np.asarray(data), (w.n, w.k))


# ------------------------------------------------------------------------------------------------ references


def int8_gemm_reference(a_q, a_scale, w_q, w_scale, out_dtype="bfloat16") -> np.ndarray:
    """NumPy golden, bit-exact to the kernel: acc = a_q @ w_qᵀ (exact, via float64 BLAS: |acc| < 2⁵³), then
    y = bf16_rint(f32(f32(f32_rint(acc) · w_scale[None, :]) · a_scale[:, None])), or acc as int32."""
    a_q, w_q = np.asarray(a_q), np.asarray(w_q)
    acc = (a_q.astype(np.float64) @ w_q.astype(np.float64).T).astype(np.int64).astype(np.int32)
    if out_dtype == "int32":
        return acc
    y = (acc.astype(np.float32) * np.asarray(w_scale, np.float32)[None, :]) * np.asarray(a_scale, np.float32)[:, None]
    return y.astype(BF16)


def grouped_int8_gemm_reference(a_q, a_scale, group_sizes, w_q_list, w_scale_list, out_dtype="bfloat16"):
    """NumPy golden of grouped_int8_gemm: rows of group g (consecutive) times weight g."""
    a_q = np.asarray(a_q)
    n = np.asarray(w_q_list[0]).shape[0]
    out = np.zeros((a_q.shape[0], n), np.int32 if out_dtype == "int32" else BF16)
    r = 0
    for g, size in enumerate(group_sizes):
        if size:
            out[r:r + size] = int8_gemm_reference(a_q[r:r + size], np.asarray(a_scale)[r:r + size], w_q_list[g],
                                                  w_scale_list[g], out_dtype)
        r += size
    return out


# ------------------------------------------------------------------------------------------------ tiling


@dataclass(frozen=True)
class GemmTiles:
    """Block sizes in elements. m × n: one output tile (one L0C accumulator); k: one Mmad's K (L0A/L0B
    ping-pong); kc: K of one GM→L1 chunk (a multiple of k); stages: L1 ring depth; resident: keep an n-tile's
    whole B panel in L1 across consecutive m-tiles (None: when it fits)."""

    m: int = 256
    n: int = 128
    k: int = 128
    kc: int = 512
    stages: int = 2
    resident: bool | None = None

    def l0c_slots(self, spec) -> int:
        return 2 if 2 * self.m * self.n * 4 <= spec.l0c_bytes else 1

    def l1_bytes(self, k: int, resident: bool) -> int:
        a = self.stages * self.m * self.kc
        return a + (_cdiv(k, self.kc) * self.n * self.kc if resident else self.stages * self.n * self.kc)

    def fits_resident(self, spec, k: int) -> bool:
        return _cdiv(k, self.kc) <= MAX_RESIDENT_CHUNKS and self.l1_bytes(k, True) <= spec.l1_bytes

    def use_resident(self, spec, k: int) -> bool:
        return self.fits_resident(spec, k) if self.resident is None else bool(self.resident)

    def can_implement(self, spec, k: int | None = None) -> str | None:
        """None if these tiles fit the core of `spec` (int8 inputs, int32 accumulator), else the reason."""
        for name, mult in (("m", FRAC), ("n", FRAC), ("k", C0), ("kc", C0)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < mult or v % mult:
                return f"tiles.{name} = {v!r} must be a positive multiple of {mult}"
        if self.kc % self.k:
            return f"tiles.kc = {self.kc} must be a multiple of tiles.k = {self.k}"
        if not isinstance(self.stages, int) or not 1 <= self.stages <= 2:
            return f"tiles.stages = {self.stages!r} must be 1 or 2 (event ids 0..1; B chunks use {B_ID}..)"
        if self.m > 4095 or self.n > 4095:
            return f"tiles {self}: Mmad m and n are at most 4095"
        need = {"L0A": (2 * self.m * self.k, spec.l0a_bytes), "L0B": (2 * self.k * self.n, spec.l0b_bytes),
                "L0C": (self.m * self.n * 4, spec.l0c_bytes)}
        if k is not None:
            need["L1"] = (self.l1_bytes(k, self.use_resident(spec, k)), spec.l1_bytes)
        for buf, (used, cap) in need.items():
            if used > cap:
                return f"tiles {self} need {used} B of {buf}, which holds {cap} B"
        if (self.k // C0) * (self.n // FRAC) > 255 or self.m // FRAC > 255:
            return f"tiles {self}: one Load2D moves at most 255 fractals"
        if self.n // 8 > 255:
            return f"tiles.n = {self.n}: the AIV's row stride (n/8 blocks) must fit a u8 repeat stride"
        if self.resident and k is not None and _cdiv(k, self.kc) > MAX_RESIDENT_CHUNKS:
            return f"tiles {self}: a resident B panel of K = {k} needs more than {MAX_RESIDENT_CHUNKS} chunks"
        return None


@dataclass(frozen=True)
class GemmPlan:
    """The host tiling of one launch: tiles and each core group's work items (row0, rows, n0, cols, group)."""

    n: int
    k: int
    tiles: GemmTiles
    resident: bool
    int32_out: bool
    items: tuple  # per core group: tuple of (row0, mm, n0, nn, g)
    aiv_rows: int  # rows per AIV chunk

    @property
    def cores_used(self) -> int:
        return sum(1 for it in self.items if it)


def _auto_kc(spec, m: int, n: int, bk: int, k: int, stages: int = 2) -> tuple[int, bool]:
    """(kc, resident): the largest chunk that keeps the B panel resident, else the largest streamed chunk."""
    kp = _up(k, C0)
    for kc in range(_up(min(kp, 1024), bk), bk - 1, -bk):
        t = GemmTiles(m, n, bk, kc, stages)
        if t.fits_resident(spec, k):
            return kc, True
    for kc in range(max(bk, min(kp, 512) // bk * bk), bk - 1, -bk):  # streamed: ≤ 512 fills the pipeline sooner
        if GemmTiles(m, n, bk, kc, stages).l1_bytes(k, False) <= spec.l1_bytes:
            return kc, False
    return bk, False


def _auto_bk(spec, m: int, n: int) -> int:
    for bk in range(256, C0 - 1, -C0):
        if 2 * m * bk <= spec.l0a_bytes and 2 * n * bk <= spec.l0b_bytes and (bk // C0) * (n // FRAC) <= 255:
            return bk
    return 0


def _auto_tiles(spec, m: int, n: int, k: int) -> GemmTiles | None:
    bk = _auto_bk(spec, m, n)
    if not bk:
        return None
    kc, resident = _auto_kc(spec, m, n, bk, k)
    t = GemmTiles(m, n, bk, kc, 2, resident)
    return t if t.can_implement(spec, k) is None else None


def _items(groups, n: int, tiles: GemmTiles):
    """Work items in order group → n-tile → m-tile, as an int64 array of (row0, mm, n0, nn, g)."""
    out = []
    bm, bn = tiles.m, tiles.n
    n0s = np.arange(0, n, bn)
    nns = np.minimum(bn, n - n0s)
    for g, (row0, rows) in enumerate(groups):
        if rows <= 0:
            continue
        m0s = np.arange(0, rows, bm)
        mms = np.minimum(bm, rows - m0s)
        nt, mt = len(n0s), len(m0s)
        blk = np.empty((nt * mt, 5), np.int64)
        blk[:, 0] = row0 + np.tile(m0s, nt)
        blk[:, 1] = np.tile(mms, nt)
        blk[:, 2] = np.repeat(n0s, mt)
        blk[:, 3] = np.repeat(nns, mt)
        blk[:, 4] = g
        out.append(blk)
    return np.concatenate(out) if out else np.zeros((0, 5), np.int64)


def _partition(cost: np.ndarray, parts: int) -> np.ndarray:
    """The core of each item: `parts` contiguous runs of equal cost (item i goes to run ⌊parts · midpoint_i /
    total⌋), so the busiest core carries about total/parts + one item; no run is empty when items ≥ parts."""
    n = len(cost)
    idx = np.arange(n)
    if n <= parts:
        return idx
    mid = np.cumsum(cost) - cost / 2
    core = np.minimum(parts - 1, (mid * parts / cost.sum()).astype(np.int64))
    # no core left empty: steps of at most one core, and enough items left for the cores after
    core = np.minimum.accumulate(np.minimum(core, idx) - idx) + idx
    return np.maximum(core, parts - n + idx)


def _estimate(spec, tiles: GemmTiles, items: np.ndarray, k: int, resident: bool, int32_out: bool, cores: int):
    """(estimated cycles, core of each item): the cost model the planner minimises (see the module docstring)."""
    if not len(items):
        return 0.0, np.zeros(0, np.int64)
    kp = _up(k, C0)
    mm, nn = items[:, 1].astype(np.float64), items[:, 3].astype(np.float64)
    mp, np_ = np.ceil(mm / 16) * 16, np.ceil(nn / 16) * 16
    steps = _cdiv(kp, tiles.k)
    mmad = mp * np_ * kp / spec.cube_int8_macs_per_cycle + steps * spec.mmad_head_cycles
    out_b = mm * nn * (4 if int32_out else 10)  # int32 tile; or workspace write + read and bf16 write
    a_b, b_b = mm * kp, np_ * kp
    # Partition weights: an item's cycles when every core streams (its share of the die's HBM); the estimate:
    # per-core sums at the core's own MTE2 rate, against the die's HBM (checked against the model within ~5 %).
    share = min(spec.gm_read_bytes_per_cycle, spec.hbm_bytes_per_cycle / cores)
    core = _partition(np.maximum(mmad, (a_b + b_b + out_b) / share), cores)
    if resident:  # B is read once per run of the same (group, n-tile) on a core
        for _ in range(2):
            same = np.zeros(len(items), bool)
            same[1:] = (core[1:] == core[:-1]) & (items[1:, 2] == items[:-1, 2]) & (items[1:, 4] == items[:-1, 4])
            b_run = np.where(same, 0.0, b_b)
            core = _partition(np.maximum(mmad, (a_b + b_run + out_b) / share), cores)
        b_b = b_run
    cost = np.maximum(mmad, (a_b + b_b + out_b) / spec.gm_read_bytes_per_cycle)
    per_core = np.bincount(core, weights=cost, minlength=cores)
    hbm = (a_b + b_b + out_b).sum() / spec.hbm_bytes_per_cycle
    return max(per_core.max(), hbm), core


def plan_int8_gemm(spec, group_rows, n: int, k: int, *, out_dtype="bfloat16", tiles: GemmTiles | None = None,
                   cores: int | None = None) -> GemmPlan:
    """The host tiling: tiles (given or chosen) and each core group's work items.

    group_rows: the row count of each group (one entry for a plain GEMM); rows of the groups are consecutive.
    """
    cores = spec.aic_per_die if cores is None else cores
    int32_out = out_dtype == "int32"
    offs = np.concatenate([[0], np.cumsum(group_rows)]).astype(np.int64)
    groups = [(int(offs[g]), int(r)) for g, r in enumerate(group_rows)]
    if tiles is not None:
        why = tiles.can_implement(spec, k)
        if why:
            raise ValueError(f"int8_gemm: {why}")
        chosen = tiles
    else:
        max_rows = max([r for r in group_rows if r > 0], default=1)
        bms = {bm for bm in (256, 128, 64) if bm < _up(max_rows, FRAC)} | {min(256, _up(max_rows, FRAC))}
        cands = []
        for bm in sorted(bms):
            for bn in range(FRAC, min(512, _up(n, FRAC)) + 1, FRAC):
                if bm * bn * 4 > spec.l0c_bytes:
                    continue
                nitems = sum(_cdiv(r, bm) for _, r in groups if r > 0) * _cdiv(n, bn)
                if nitems > 60000:
                    continue
                t = _auto_tiles(spec, bm, bn, k)
                if t is not None:
                    cands.append((t, nitems))
        if not cands:
            chosen = GemmTiles(16, 16, 32, 32, 2, False)
        else:
            best_used = max(min(cores, ni) for _, ni in cands)
            scored = []
            for t, ni in cands:
                if min(cores, ni) < 0.9 * best_used:
                    continue
                est, _ = _estimate(spec, t, _items(groups, n, t), k, t.use_resident(spec, k), int32_out, cores)
                instr = ni * _cdiv(_up(k, C0), t.k) * (t.k // C0 + 4)  # ~ Load2Ds, Mmad and flags per k-step
                scored.append((est, instr, t.m, t.n, t))
            best = min(s[0] for s in scored)
            # within 3 % of the best estimate, the fewest instructions (bigger tiles: fewer heads, faster host)
            chosen = min((s for s in scored if s[0] <= 1.03 * best), key=lambda s: s[1:4])[-1]
    resident = chosen.use_resident(spec, k)
    items = _items(groups, n, chosen)
    _, core = _estimate(spec, chosen, items, k, resident, int32_out, cores)
    per = [[] for _ in range(cores)]
    for it, c in zip(items.tolist(), core.tolist()):
        per[c].append(tuple(it))
    aiv_rows = max(8, min(64, (32768 // (chosen.n * 4)) // 8 * 8))
    return GemmPlan(n=n, k=k, tiles=chosen, resident=resident, int32_out=int32_out,
                    items=tuple(tuple(p) for p in per), aiv_rows=aiv_rows)


# ------------------------------------------------------------------------------------------------ the kernel


@ascendemu.kernel("mix")
def int8_gemm_kernel(ctx, a, a_scale, weights, w_scales, y, work, plan):
    """y = dequant(a @ Wᵀ) on groups of 1 AIC + 2 AIV. a: int8 [M, K] GM; weights: packed int8 GM tensors;
    a_scale, w_scales: fp32 GM; y: bf16 or int32 [M, N] GM; work: int32 GM workspace (bf16 output only)."""
    if ctx.is_aic:
        _aic_body(ctx, a, weights, y, work, plan)
    elif not plan.int32_out:
        _aiv_body(ctx, a_scale, w_scales, y, work, plan)


def _aic_body(ctx, a, weights, y, work, plan):
    items = plan.items[ctx.block_idx]
    if not items:
        return
    t = plan.tiles
    n_total, k_total = plan.n, plan.k
    bm, bn, bk, kc, stages = t.m, t.n, t.k, t.kc, t.stages
    n1_total = _cdiv(n_total, FRAC)
    resident = plan.resident
    nk = _cdiv(k_total, kc)
    c_slots = t.l0c_slots(ctx.spec)
    a_gm, y_gm = a.flatten(), y.flatten()
    w_gm = [w.flatten() for w in weights]

    l1_a = [ctx.l1.alloc((bm * kc,), "int8") for _ in range(stages)]
    l1_b = [ctx.l1.alloc((bn * kc,), "int8") for _ in range(nk if resident else stages)]
    l0a = [ctx.l0a.alloc((bm * bk,), "int8") for _ in range(2)]
    l0a_col = [[t[c * FRACTAL_BYTES:] for c in range(bk // C0)] for t in l0a]  # k-block c of a Zz tile
    l0b = [ctx.l0b.alloc((bk * bn,), "int8") for _ in range(2)]
    l0c = [ctx.l0c.alloc((bm * bn,), "int32") for _ in range(c_slots)]

    # Every "buffer free" flag starts set; the end drains them (CATLASS style: every set has its wait).
    for s in range(stages):
        ctx.set_flag(HardEvent.MTE1_MTE2, s)
    if resident:
        for j in range(nk):
            ctx.set_flag(HardEvent.MTE1_MTE2, B_ID + j)
    for p in range(2):
        ctx.set_flag(HardEvent.M_MTE1, p)
    for q in range(c_slots):
        ctx.set_flag(HardEvent.FIX_M, q)

    ia = il0 = 0
    for idx, (row0, mm, n0, nn, g) in enumerate(items):
        m1, n1 = _cdiv(mm, FRAC), _cdiv(nn, FRAC)
        key = (g, n0)
        load_b = not resident or idx == 0 or key != (items[idx - 1][4], items[idx - 1][2])
        free_b = resident and (idx == len(items) - 1 or key != (items[idx + 1][4], items[idx + 1][2]))
        q = idx % c_slots
        ctx.wait_flag(HardEvent.FIX_M, q)  # L0C tile q: its last Fixpipe is done
        for j in range(nk):
            k0c = j * kc
            kkc = min(kc, k_total - k0c)
            kb = _cdiv(kkc, C0)
            s = ia % stages
            ia += 1
            # CopyIn A: mm × kkc → L1 Nz (column blocks of m1 fractals), one Nd2Nz
            ctx.wait_flag(HardEvent.MTE1_MTE2, s)
            ctx.data_copy(l1_a[s], a_gm[row0 * k_total + k0c:],
                          Nd2NzParams(nd_num=1, n_value=mm, d_value=kkc, src_d_value=k_total,
                                      dst_nz_c0_stride=m1 * FRAC, dst_nz_n_stride=1))
            # CopyIn B: kb runs of n1 whole fractals of the packed weight (already Zn) → L1
            b_src = w_gm[g][((k0c // C0) * n1_total + n0 // FRAC) * FRACTAL_BYTES:]
            b_params = DataCopyParams(block_count=kb, block_len=n1 * FRAC, src_stride=(n1_total - n1) * FRAC)
            if resident:
                sb = l1_b[j]
                if load_b:
                    ctx.wait_flag(HardEvent.MTE1_MTE2, B_ID + j)
                    ctx.data_copy(sb, b_src, b_params)
                    ctx.set_flag(HardEvent.MTE2_MTE1, B_ID + j)
                    ctx.wait_flag(HardEvent.MTE2_MTE1, B_ID + j)
            else:
                sb = l1_b[s]
                ctx.data_copy(sb, b_src, b_params)
            ctx.set_flag(HardEvent.MTE2_MTE1, s)
            ctx.wait_flag(HardEvent.MTE2_MTE1, s)
            for s0 in range(0, kkc, bk):
                kk = min(bk, kkc - s0)
                k1 = _cdiv(kk, C0)
                p = il0 % 2
                il0 += 1
                # Split: L1 → L0A (Nz → Zz: one Load2D per k-block) and L1 → L0B (Zn as is)
                ctx.wait_flag(HardEvent.M_MTE1, p)
                for c in range(k1):
                    ctx.load_data(l0a_col[p][c], l1_a[s],
                                  LoadData2DParams(start_index=(s0 // C0 + c) * m1, repeat_times=m1, src_stride=1,
                                                   dst_gap=k1 - 1))
                ctx.load_data(l0b[p], sb, LoadData2DParams(start_index=(s0 // C0) * n1, repeat_times=k1 * n1))
                if s0 + bk >= kkc:
                    ctx.set_flag(HardEvent.MTE1_MTE2, s)
                ctx.set_flag(HardEvent.MTE1_M, p)
                # Compute: Mmad accumulating over K into L0C tile q
                ctx.wait_flag(HardEvent.MTE1_M, p)
                first = j == 0 and s0 == 0
                if not first and m1 * n1 < 10:  # [Mmad.md] hazard on small accumulating tiles
                    ctx.pipe_barrier(ascendemu.PIPE_M)
                ctx.mmad(l0c[q], l0a[p], l0b[p],
                         MmadParams(m=mm, n=nn, k=kk, cmatrix_init_val=first, disable_gemv=True))
                ctx.set_flag(HardEvent.M_MTE1, p)
            if free_b:
                ctx.set_flag(HardEvent.MTE1_MTE2, B_ID + j)
        # CopyOut: L0C int32 → GM (y, or the workspace slot the AIVs dequantise)
        ctx.set_flag(HardEvent.M_FIX, q)
        ctx.wait_flag(HardEvent.M_FIX, q)
        if plan.int32_out:
            ctx.fixpipe(y_gm[row0 * n_total + n0:], l0c[q],
                        FixpipeParamsV220(n_size=nn, m_size=mm, src_stride=m1 * FRAC, dst_stride=n_total,
                                          quant_pre=QuantMode.NoQuant))
        else:
            if idx >= WS_SLOTS:
                ctx.cross_core_wait_flag(FREE)  # both AIVs have loaded what was in this slot
            slot = (ctx.block_idx * WS_SLOTS + idx % WS_SLOTS) * bm * bn
            ctx.fixpipe(work[slot:], l0c[q], FixpipeParamsV220(n_size=nn, m_size=mm, src_stride=m1 * FRAC,
                                                               dst_stride=_up(nn, FRAC), quant_pre=QuantMode.NoQuant))
            ctx.cross_core_set_flag(2, ascendemu.PIPE_FIX, READY)
        ctx.set_flag(HardEvent.FIX_M, q)

    for s in range(stages):
        ctx.wait_flag(HardEvent.MTE1_MTE2, s)
    if resident:
        for j in range(nk):
            ctx.wait_flag(HardEvent.MTE1_MTE2, B_ID + j)
    for p in range(2):
        ctx.wait_flag(HardEvent.M_MTE1, p)
    for q in range(c_slots):
        ctx.wait_flag(HardEvent.FIX_M, q)
    if not plan.int32_out:
        for _ in range(min(WS_SLOTS, len(items))):
            ctx.cross_core_wait_flag(FREE)  # the last tiles' slots: no cross-core counter is left over


def _aiv_body(ctx, a_scale, w_scales, y, work, plan):
    group = ctx.block_idx // 2
    sub = ctx.get_sub_block_idx()
    items = plan.items[group]
    if not items:
        return
    n_total = plan.n
    bm, bn = plan.tiles.m, plan.tiles.n
    rc = plan.aiv_rows
    y_gm = y.flatten()

    xbuf = [ctx.ub.alloc((rc * bn,), "int32") for _ in range(2)]
    obuf = [ctx.ub.alloc((rc * bn,), "bfloat16") for _ in range(2)]
    abuf = [ctx.ub.alloc((_up(rc, 8),), "float32") for _ in range(2)]
    abrc = [ctx.ub.alloc((_up(rc, 8) * 8,), "float32") for _ in range(2)]
    wrow = [ctx.ub.alloc((bn,), "float32") for _ in range(2)]
    xf_all = [x.reinterpret_cast("float32") for x in xbuf]
    xf_col = [[x[c:] for c in range(0, bn, 64)] for x in xf_all]  # 64-lane column blocks of the fp32 rows
    w_col = [[x[c:] for c in range(0, bn, 64)] for x in wrow]

    for j in range(2):
        ctx.set_flag(HardEvent.V_MTE2, j)  # chunk slot j free
        ctx.set_flag(HardEvent.MTE3_V, j)  # output slot j free
        ctx.set_flag(HardEvent.V_MTE2, W_ID + j)  # w_scale row slot j free

    ix = iw = 0
    for idx, (row0, mm, n0, nn, g) in enumerate(items):
        half = _cdiv(mm, 2)
        r0 = sub * half
        rr = min(half, mm - r0)
        ctx.cross_core_wait_flag(READY)  # the AIC's Fixpipe of this tile has landed in the workspace
        if rr <= 0:  # m = 1: the second AIV has no rows; it still frees the slot
            ctx.cross_core_set_flag(2, ascendemu.PIPE_MTE2, FREE)
            continue
        wp = _up(nn, FRAC)  # the workspace row pitch (and the UB row pitch): 64 B fp32 rows, 32 B bf16 rows
        slot = (group * WS_SLOTS + idx % WS_SLOTS) * bm * bn
        pw = iw % 2
        iw += 1
        ctx.wait_flag(HardEvent.V_MTE2, W_ID + pw)
        ctx.data_copy_pad(wrow[pw], w_scales[g][n0:], DataCopyExtParams(block_count=1, block_len=nn * 4))
        ctx.set_flag(HardEvent.MTE2_V, W_ID + pw)
        chunks = _cdiv(rr, rc)
        cols = [(c, min(64, nn - c * 64)) for c in range(_cdiv(nn, 64))]
        for ci in range(chunks):
            c0 = r0 + ci * rc
            cr = min(rc, r0 + rr - c0)
            jx = ix % 2
            ix += 1
            # CopyIn: the int32 rows (contiguous in the workspace) and their a_scale
            ctx.wait_flag(HardEvent.V_MTE2, jx)
            ctx.data_copy(xbuf[jx], work[slot + c0 * wp:], cr * wp)
            ctx.data_copy_pad(abuf[jx], a_scale[row0 + c0:], DataCopyExtParams(block_count=1, block_len=cr * 4))
            ctx.set_flag(HardEvent.MTE2_V, jx)
            if ci == chunks - 1:
                ctx.cross_core_set_flag(2, ascendemu.PIPE_MTE2, FREE)  # this AIV is done reading the slot
            # Compute: f32(acc) · w_scale[n] · a_scale[m], then bf16
            ctx.wait_flag(HardEvent.MTE2_V, jx)
            if ci == 0:
                ctx.wait_flag(HardEvent.MTE2_V, W_ID + pw)
            xf, xc = xf_all[jx], xf_col[jx]
            ctx.cast(xf, xbuf[jx], RoundMode.CAST_RINT, cr * wp)
            rs = wp // 8  # row pitch in 32 B blocks
            for c, lanes in cols:
                ctx.mul(xc[c], xc[c], w_col[pw][c], lanes, cr, BinaryRepeatParams(1, 1, 1, rs, rs, 0))
            ctx.brcb(abrc[jx], abuf[jx], _cdiv(cr, 8))
            for c, lanes in cols:
                ctx.mul(xc[c], xc[c], abrc[jx], lanes, cr, BinaryRepeatParams(1, 1, 0, rs, rs, 1))
            ctx.wait_flag(HardEvent.MTE3_V, jx)
            ctx.cast(obuf[jx], xf, RoundMode.CAST_RINT, cr * wp)
            ctx.set_flag(HardEvent.V_MTE2, jx)
            # CopyOut: cr rows of nn bf16 into y
            ctx.set_flag(HardEvent.V_MTE3, jx)
            ctx.wait_flag(HardEvent.V_MTE3, jx)
            ctx.data_copy_pad(y_gm[(row0 + c0) * n_total + n0:], obuf[jx],
                              DataCopyExtParams(block_count=cr, block_len=nn * 2, src_stride=0,
                                                dst_stride=(n_total - nn) * 2))
            ctx.set_flag(HardEvent.MTE3_V, jx)
        ctx.set_flag(HardEvent.V_MTE2, W_ID + pw)

    for j in range(2):
        ctx.wait_flag(HardEvent.V_MTE2, j)
        ctx.wait_flag(HardEvent.MTE3_V, j)
        ctx.wait_flag(HardEvent.V_MTE2, W_ID + j)


# ------------------------------------------------------------------------------------------------ host side


def _check_array(die, x, name: str, dtype: str, shape: tuple, fn: str):
    """A numpy array or GlobalTensor of `die` with this dtype and shape."""
    if isinstance(x, GlobalTensor):
        if x.gm is not die.gm:
            raise ValueError(f"{fn}: {name} is a GlobalTensor of another die's GM")
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy array or a GlobalTensor, got {type(x).__name__}")
    if not _known(x.dtype) or dtype_name(x.dtype) != dtype:
        shown = dtype_name(x.dtype) if _known(x.dtype) else str(x.dtype)
        raise TypeError(f"{fn}: {name} is {shown}; it must be {dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}; expected {tuple(shape)}")
    return x


def _known(dt) -> bool:
    try:
        dtype_name(as_dtype(dt))
        return True
    except TypeError:
        return False


def _check_weight(die, w, name: str, fn: str):
    if not isinstance(w, PackedWeight):
        raise TypeError(f"{fn}: {name} must be a PackedWeight from pack_weight(), got {type(w).__name__}")
    d = w.data
    if isinstance(d, GlobalTensor):
        if d.gm is not die.gm:
            raise ValueError(f"{fn}: {name} lives in another die's GM")
    elif not isinstance(d, np.ndarray):
        raise TypeError(f"{fn}: {name}.data must be a numpy array or a GlobalTensor, got {type(d).__name__}")
    if not _known(d.dtype) or dtype_name(d.dtype) != "int8":
        raise TypeError(f"{fn}: {name}.data is {d.dtype}; it must be int8")
    if tuple(d.shape) != packed_shape(w.n, w.k):
        raise ValueError(f"{fn}: {name}.data has shape {tuple(d.shape)}; a packed [{w.n}, {w.k}] weight is "
                         f"{packed_shape(w.n, w.k)}")


def _run(die, a_q, a_scale, group_sizes, weights, w_scales, out_dtype, tiles, fn):
    """Validate, stage, plan, launch; shared by int8_gemm and grouped_int8_gemm."""
    if not isinstance(die, ascendemu.Die):
        raise TypeError(f"{fn}: die must be an ascendemu.Die, got {type(die).__name__}")
    if out_dtype not in OUT_DTYPES:
        try:
            name = dtype_name(as_dtype(out_dtype))
        except TypeError:
            name = None
        if name not in OUT_DTYPES:
            raise TypeError(f"{fn}: out_dtype {out_dtype!r} is not one of {', '.join(OUT_DTYPES)}")
        out_dtype = name
    if not isinstance(a_q, (np.ndarray, GlobalTensor)):
        raise TypeError(f"{fn}: a_q must be a numpy array or a GlobalTensor, got {type(a_q).__name__}")
    if len(a_q.shape) != 2:
        raise ValueError(f"{fn}: a_q must be 2-D [M, K], got shape {tuple(a_q.shape)}")
    m, k = (int(v) for v in a_q.shape)
    _check_array(die, a_q, "a_q", "int8", (m, k), fn)
    if min(m, k) < 1:
        raise ValueError(f"{fn}: M and K must be ≥ 1, got a_q of shape {(m, k)}")
    _check_array(die, a_scale, "a_scale", "float32", (m,), fn)
    grouped = fn.startswith("grouped")
    for i, w in enumerate(weights):
        _check_weight(die, w, f"w_packed_list[{i}]" if grouped else "w_packed", fn)
    if not weights:
        raise ValueError(f"{fn}: no weights")
    n = weights[0].n
    for i, w in enumerate(weights):
        wname = f"w_packed_list[{i}]" if grouped else "w_packed"
        if w.k != k:
            raise ValueError(f"{fn}: {wname} is [{w.n}, {w.k}] but a_q has K = {k}; the inner dimensions differ")
        if w.n != n:
            raise ValueError(f"{fn}: {wname} is [{w.n}, {w.k}] but w_packed[0] has N = {n}; all groups need one N")
    for i, s in enumerate(w_scales):
        _check_array(die, s, f"w_scale_list[{i}]" if grouped else "w_scale", "float32", (n,), fn)
    if k > U16_MAX or n > U16_MAX:
        raise ValueError(f"{fn}: K = {k} and N = {n} must be ≤ {U16_MAX} (Nd2NzParams.srcDValue and "
                         f"DataCopyParams.srcStride are uint16)")

    plan = plan_int8_gemm(die.spec, group_sizes, n, k, out_dtype=out_dtype, tiles=tiles)
    arrays = [a_q, a_scale] + [w.data for w in weights] + list(w_scales)
    staged = []

    def gm_of(x):
        if isinstance(x, np.ndarray):
            g = die.gm.from_numpy(x)
            staged.append(g)
            return g
        return x

    ga, gs = gm_of(a_q), gm_of(a_scale)
    gw = [gm_of(w.data) for w in weights]
    gws = [gm_of(s) for s in w_scales]
    y = die.gm.empty((m, n), "int32" if plan.int32_out else "bfloat16")
    work = None
    if not plan.int32_out:
        work = die.gm.empty((die.spec.aic_per_die * WS_SLOTS * plan.tiles.m * plan.tiles.n,), "int32")
        staged.append(work)
    try:
        die.launch(int8_gemm_kernel, block_dim=die.spec.aic_per_die, args=(ga, gs, gw, gws, y, work, plan))
    finally:
        for g in staged:
            die.gm.free(g)
    if die.functional and all(isinstance(x, np.ndarray) for x in arrays):
        host = y.numpy()
        die.gm.free(y)
        return host
    return y


def int8_gemm(die, a_q, a_scale, w_packed, w_scale, out_dtype="bfloat16", *, tiles: GemmTiles | None = None):
    """y[M, N] = (a_q @ w_qᵀ in int32) · a_scale[:, None] · w_scale[None, :] on all AICs (and AIVs) of `die`.

    a_q: int8 [M, K]; a_scale: float32 [M]; w_packed: a PackedWeight of an int8 [N, K] weight; w_scale:
    float32 [N]. Arrays are numpy arrays or GlobalTensors of `die` (phantoms on a timing-only die). out_dtype:
    "bfloat16" (dequantised in the order of the module docstring, round half to even) or "int32" (the exact
    accumulator). Returns a numpy array when every array argument is a numpy array and the die is functional,
    else the GlobalTensor y. `die.last_report` holds the launch's report. `tiles` overrides the host tiling.
    """
    if isinstance(w_packed, (list, tuple)):
        raise TypeError("int8_gemm: w_packed must be one PackedWeight; use grouped_int8_gemm for several")
    _check_weight(die, w_packed, "w_packed", "int8_gemm")
    m = int(a_q.shape[0]) if hasattr(a_q, "shape") and len(a_q.shape) == 2 else 0
    return _run(die, a_q, a_scale, [m], [w_packed], [w_scale], out_dtype, tiles, "int8_gemm")


def grouped_int8_gemm(die, a_q, a_scale, group_sizes, w_packed_list, w_scale_list, out_dtype="bfloat16", *,
                      tiles: GemmTiles | None = None):
    """The expert form: rows of a_q belong to G consecutive groups of `group_sizes` rows (host integers, ≥ 0,
    summing to M: they are the launch's tiling data); group g is multiplied by w_packed_list[g] and
    dequantised with w_scale_list[g]. All weights share one [N, K]. Work items (group, m-tile, n-tile) are
    spread over the cores by estimated cost, so very uneven or empty groups stay balanced. Otherwise as
    int8_gemm."""
    if isinstance(group_sizes, GlobalTensor):
        raise TypeError("grouped_int8_gemm: group_sizes are host integers (the launch's tiling), not a GlobalTensor")
    sizes = np.asarray(group_sizes)
    if sizes.ndim != 1 or not np.issubdtype(sizes.dtype, np.integer):
        raise TypeError(f"grouped_int8_gemm: group_sizes must be a 1-D sequence of ints, got {group_sizes!r}")
    if sizes.size < 1:
        raise ValueError("grouped_int8_gemm: group_sizes is empty; give at least one group")
    if (sizes < 0).any():
        raise ValueError(f"grouped_int8_gemm: group sizes must be ≥ 0, got {sizes.tolist()}")
    ws, ss = list(w_packed_list), list(w_scale_list)
    if len(ws) != sizes.size or len(ss) != sizes.size:
        raise ValueError(f"grouped_int8_gemm: {sizes.size} groups but {len(ws)} weights and {len(ss)} weight scales")
    m = int(a_q.shape[0]) if hasattr(a_q, "shape") and len(a_q.shape) >= 1 else 0
    if int(sizes.sum()) != m:
        raise ValueError(f"grouped_int8_gemm: group sizes sum to {int(sizes.sum())} but a_q has M = {m} rows")
    if m == 0:  # no token reached any local expert: nothing to launch, an empty result
        n = ws[0].n if isinstance(ws[0], PackedWeight) else None
        if n is None:
            raise TypeError("grouped_int8_gemm: w_packed_list must hold PackedWeight objects from pack_weight")
        dt = np.int32 if out_dtype == "int32" else BF16
        return np.zeros((0, n), dt) if isinstance(a_q, np.ndarray) else die.gm.empty((0, n), dt)
    return _run(die, a_q, a_scale, [int(s) for s in sizes], ws, ss, out_dtype, tiles, "grouped_int8_gemm")
