"""The whole-die GEMM core shared by the INT8 and BF16 GEMMs: packed weights, the host tiling and the AIC body;
and the BF16 GEMMs built on it (the MLA projections: issue 5).

    w_p = pack_weight(w)                               # host, once: bf16 (or int8) [N, K] → Nz, what L0B reads
    y = bf16_gemm(die, a, w_p)                         # y[M, N] = a · Wᵀ, fp32 accumulation, rounded once
    ws = pack_heads(w_heads)                           # [H, N, K] → H PackedWeights (or packed_heads(nz, n, k))
    y = batched_bf16_gemm(die, a, ws)                  # y[M, H, N], y[:, h] = a[:, h] · W_hᵀ

`bf16_gemm` / `batched_bf16_gemm` run one `@ascendemu.kernel("aic")` kernel (`bf16_gemm_kernel`) on all 24 AICs:
no AIV is needed, Fixpipe converts the fp32 accumulator to bf16 (F322BF16, round half to even) on its way to GM.
`ascendemu.ops.int8_gemm` runs the same AIC body inside its mix kernel and dequantises on the AIVs.

AIC (per work item = one output tile of `tiles.m × tiles.n` of one group, accumulated over all of K in L0C):

    GM a    ──DataCopy Nd2Nz (MTE2)──▶ L1 A chunk (Nz, m × kc)   ──LoadData 2D, one per k-block (MTE1)──▶ L0A (Zz)
    GM w_p  ──DataCopy strided (MTE2)─▶ L1 B chunk (Zn, kc × n)  ──LoadData 2D, one move (MTE1)─────────▶ L0B (Zn)
    Mmad (M): L0A × L0B → L0C (s8·s8→s32 or bf16·bf16→f32), accumulating over K (k-steps of `tiles.k`)
    Fixpipe (FIX): L0C → GM: y itself (F322BF16, or NoQuant for fp32 / int32), or the int8 GEMM's workspace ring

  * The packed weight W [N, K] in Nz (C0 = 32 B: 32 int8 or 16 bf16) is byte-identical to Zn(Wᵀ): a k-chunk of
    one n-tile is ⌈kc/C0⌉ runs of ⌈n/16⌉ whole fractals, one strided DataCopy, and one plain Load2D feeds L0B.
  * A goes GM→L1 as ONE Nd2Nz (Nz, column blocks of ⌈m/16⌉ fractals); L0A needs Zz, so each k-step issues one
    Load2D per C0-wide k-block with dst_gap = k1 − 1 (Nz → Zz only reorders whole fractals) — CATLASS's way.
    The rows of a group may be strided (`GemmPlan.a_pitch`): the batched GEMM reads head h of a [M, H, K] as the
    rows a[:, h, :], row pitch H·K. Nd2NzParams.srcDValue is uint16; a 16-bit A whose pitch exceeds 65535
    elements (W_UV: H·K = 128·512) is moved as pairs of elements, a float32 view of the same bytes (C0 = 8 fp32
    = 16 bf16: the Nz bytes are identical), which needs K even.
  * L1 holds a ring of `tiles.stages` k-chunks (A, and B when streamed); L0A/L0B ping-pong; L0C ping-pongs when
    two accumulators fit (else one, and the next tile's first Mmad waits for the Fixpipe). When K is small enough
    (`tiles.resident`), an n-tile's whole B panel stays in L1 while the core walks down consecutive m-tiles of
    that n-tile, so B is read once per run instead of once per tile.
  * m = 1 is computed with `disable_gemv=True` (L0A holds Zz, not the GEMV's ND row).

Work distribution: the host "tiling" (`plan_gemm`, as Ascend C's host-side tiling) lists the work items
(group, m-tile, n-tile) in the order group → n-tile → m-tile, weighs each by its cycles when every core streams
(max(Mmad cycles, GM bytes / the core's share of HBM)), and cuts the list into `block_dim` contiguous runs of equal
weight (item i goes to core ⌊P · midpoint_i / total⌋, with no core left empty while items ≥ cores). The busiest
core carries about total / P + one item whatever the group sizes; empty groups have no items; contiguity keeps an
n-tile's m-tiles on one core, so a resident B panel is reused. A group is an expert (grouped INT8 GEMM: its rows
are consecutive) or a head (batched BF16 GEMM: every head has all M rows, at column offset h·K of A and h·N of y).

Tile choice, unless `tiles` is given: every (m, n) whose fp32/int32 accumulator fits L0C (`spec.l0c_bytes`; m ∈
{64, 128, 256} or the rows of the largest group, n a multiple of 16 up to 512) is scored by a cost model — per-core
sums of max(Mmad, GM bytes at `spec.gm_read_bytes_per_cycle`) against the die's HBM bytes at
`spec.hbm_bytes_per_cycle`; it tracks the emulator within ~5 % —
among the shapes that keep ≥ 90 % of the cores that any shape could keep busy. (Why not fewer cores: the emulator
does not model L2, so 24 cores re-reading the same A rows look costly here; on the 910C the 192 MB L2 serves those
re-reads, and a plan that idled cores to avoid them would optimise a model artefact.) Within 3 % of the best score
it takes the plan with the fewest instructions (bigger tiles: fewer instruction heads, faster emulation).

BF16 numerics: each Mmad forms its k-step's sum exactly and adds it to the fp32 accumulator with one fp32 rounding
(the emulator's Mmad); Fixpipe rounds the fp32 result once to bf16 (half to even). `bf16_gemm_reference` gives the
float64 product rounded once; with `k_step=plan.tiles.k` it reproduces the kernel's fp32 accumulation exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import ascendemu
from ascendemu import (DataCopyParams, FixpipeParamsV220, GlobalTensor, HardEvent, LoadData2DParams, MmadParams,
                       Nd2NzParams, QuantMode)
from ascendemu.layouts import ceil_div, nd_to_nz, nz_to_nd, round_up
from ascendemu.numerics import as_dtype, dtype_name

from .rowwise import Staging, check_dtype

FRAC = 16  # rows of a fractal
BLOCK = 32  # bytes of one fractal row (C0 · element size)
FRACTAL_BYTES = 512
C0 = 32  # int8 elements per fractal row (k0 of the int8 cube)
U16_MAX = 65535
IN_DTYPES = ("int8", "bfloat16")
ACC_DTYPE = {"int8": "int32", "bfloat16": "float32"}
WS_SLOTS = 2  # workspace tiles per group in flight between the AIC and its AIVs (int8 GEMM, bf16 output)
READY, FREE = 0, 1  # cross-core flag ids: AIC → AIVs "tile in workspace", AIVs → AIC "slot free"
B_ID = 2  # MTE2_MTE1 / MTE1_MTE2 ids of the resident B chunks (the A/stage ring uses 0..stages-1)
MAX_RESIDENT_CHUNKS = 4  # B_ID + 3 = 5: ids 6 and 7 are left to the system and TPipe
BF16 = as_dtype("bfloat16")
BF16_OUT = ("bfloat16", "float32")


_cdiv, _up = ceil_div, round_up  # the shape helpers of ascendemu.layouts


def c0_of(dtype: str) -> int:
    """Elements of one 32 B fractal row (the cube's k0) for an input dtype name."""
    return BLOCK // as_dtype(dtype).itemsize


# ------------------------------------------------------------------------------------------------ packed weights


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight [N, K] (Hugging Face [out_features, in_features]), int8 or bf16, in the Nz layout the kernel reads.

    `data` is a numpy array or a GlobalTensor (a phantom in timing-only mode) of shape (⌈K/C0⌉, ⌈N/16⌉, 16, C0),
    C0 = 32 for int8 and 16 for bf16: Nz of W, zero-padded — byte-identical to Zn(Wᵀ), the L0B operand.
    (n, k) is the logical shape, which the padded array alone does not carry.
    """

    data: object
    n: int
    k: int

    @property
    def shape(self) -> tuple:
        return (self.n, self.k)

    @property
    def dtype(self) -> str:
        return dtype_name(self.data.dtype)

    @property
    def packed_shape(self) -> tuple:
        return packed_shape(self.n, self.k, self.dtype)

    def numpy(self) -> np.ndarray:
        """The [N, K] weight (unpacked on the host)."""
        return unpack_weight(self)


def packed_shape(n: int, k: int, dtype: str = "int8") -> tuple:
    """Shape of the Nz-packed weight [n, k]: (⌈k/C0⌉, ⌈n/16⌉, 16, C0), C0 = 32 (int8) or 16 (bfloat16)."""
    c0 = c0_of(dtype)
    return (_cdiv(k, c0), _cdiv(n, FRAC), FRAC, c0)


def _packable(dt, what: str, fn: str = "pack_weight") -> str:
    name = dtype_name(dt) if _known(dt) else str(dt)
    if name not in IN_DTYPES:
        raise TypeError(f"{fn}: {what} is {name}; it must be int8 (quantize_weight_per_channel gives it) or "
                        f"bfloat16")
    return name


def pack_weight(w_q, *, gm=None) -> PackedWeight:
    """Pack an int8 or bf16 weight [N, K] once into the kernel's Nz layout (host); `data` equals nd_to_nz(w).

    w_q: a numpy array → a PackedWeight holding a numpy array (staged into GM by each GEMM call), or a
    GlobalTensor [N, K] → a PackedWeight holding a GlobalTensor of the packed shape in the same GM (a phantom
    when w_q is a phantom: timing-only dies need no data). `gm`: optionally upload a numpy result to this
    GlobalMemory (e.g. `die.gm`) once, so repeated GEMMs do not stage it again.
    """
    if isinstance(w_q, GlobalTensor):
        if len(w_q.shape) != 2:
            raise ValueError(f"pack_weight: w_q must be 2-D [N, K], got shape {tuple(w_q.shape)}")
        dt = _packable(w_q.dtype, "w_q")
        n, k = w_q.shape
        if min(n, k) < 1:
            raise ValueError(f"pack_weight: N and K must be ≥ 1, got shape {(n, k)}")
        if w_q.is_phantom:
            return PackedWeight(w_q.gm.empty(packed_shape(n, k, dt), dt), n, k)
        return PackedWeight(w_q.gm.from_numpy(nd_to_nz(w_q.numpy())), n, k)
    if not isinstance(w_q, np.ndarray):
        raise TypeError(f"pack_weight: w_q must be a numpy array or a GlobalTensor, got {type(w_q).__name__}")
    if w_q.ndim != 2:
        raise ValueError(f"pack_weight: w_q must be 2-D [N, K], got shape {w_q.shape}")
    _packable(w_q.dtype, "w_q")
    if min(w_q.shape) < 1:
        raise ValueError(f"pack_weight: N and K must be ≥ 1, got shape {w_q.shape}")
    n, k = w_q.shape
    data = nd_to_nz(np.ascontiguousarray(w_q))
    return PackedWeight(gm.from_numpy(data) if gm is not None else data, n, k)


def pack_heads(w_heads, *, gm=None) -> tuple:
    """H per-head weights [H, N, K] (numpy, int8 or bf16; batched_bf16_gemm takes bf16) → a tuple of H PackedWeights,
    packed once as one stacked array (uploaded once to `gm` if given); each head's data is a view of it."""
    if not isinstance(w_heads, np.ndarray):
        raise TypeError(f"pack_heads: w_heads must be a numpy array [H, N, K], got {type(w_heads).__name__}")
    if w_heads.ndim != 3 or min(w_heads.shape) < 1:
        raise ValueError(f"pack_heads: w_heads must be 3-D [H, N, K] with every size ≥ 1, got shape "
                         f"{w_heads.shape}")
    _packable(w_heads.dtype, "w_heads", "pack_heads")
    _, n, k = w_heads.shape
    data = nd_to_nz(np.ascontiguousarray(w_heads))
    return packed_heads(gm.from_numpy(data) if gm is not None else data, n, k)


def packed_heads(nz, n: int, k: int) -> tuple:
    """An already packed stack [H, ⌈K/C0⌉, ⌈N/16⌉, 16, C0] (numpy or GlobalTensor; e.g. MLAWeights.w_uk_nz with
    n = kv_lora_rank, k = qk_nope_head_dim, or w_uv_nz with n = v_head_dim, k = kv_lora_rank) → H PackedWeights
    [n, k], views of it."""
    if not isinstance(nz, (np.ndarray, GlobalTensor)):
        raise TypeError(f"packed_heads: nz must be a numpy array or a GlobalTensor, got {type(nz).__name__}")
    dt = _packable(nz.dtype, "nz", "packed_heads")
    want = packed_shape(n, k, dt)
    if len(nz.shape) != 5 or tuple(nz.shape[1:]) != want:
        raise ValueError(f"packed_heads: nz has shape {tuple(nz.shape)}; a stack of packed [{n}, {k}] {dt} weights "
                         f"is [H, {', '.join(map(str, want))}]")
    return tuple(PackedWeight(nz[h], n, k) for h in range(nz.shape[0]))


def unpack_weight(w: PackedWeight) -> np.ndarray:
    """The [N, K] weight of a PackedWeight (host; not for phantoms)."""
    data = w.data.numpy() if isinstance(w.data, GlobalTensor) else w.data
    return nz_to_nd(np.asarray(data), (w.n, w.k))


# ------------------------------------------------------------------------------------------------ tiling


@dataclass(frozen=True)
class GemmTiles:
    """Block sizes in elements. m × n: one output tile (one L0C accumulator); k: one Mmad's K (L0A/L0B
    ping-pong); kc: K of one GM→L1 chunk (a multiple of k); stages: L1 ring depth; resident: keep an n-tile's
    whole B panel in L1 across consecutive m-tiles (None: when it fits). `esize` arguments: the input element
    size in bytes (1 int8, 2 bf16)."""

    m: int = 256
    n: int = 128
    k: int = 128
    kc: int = 512
    stages: int = 2
    resident: bool | None = None

    def l0c_slots(self, spec) -> int:
        return 2 if 2 * self.m * self.n * 4 <= spec.l0c_bytes else 1

    def l1_bytes(self, k: int, resident: bool, esize: int = 1) -> int:
        a = self.stages * self.m * self.kc
        return esize * (a + (_cdiv(k, self.kc) * self.n * self.kc if resident else self.stages * self.n * self.kc))

    def fits_resident(self, spec, k: int, esize: int = 1) -> bool:
        return _cdiv(k, self.kc) <= MAX_RESIDENT_CHUNKS and self.l1_bytes(k, True, esize) <= spec.l1_bytes

    def use_resident(self, spec, k: int, esize: int = 1) -> bool:
        return self.fits_resident(spec, k, esize) if self.resident is None else bool(self.resident)

    def can_implement(self, spec, k: int | None = None, esize: int = 1) -> str | None:
        """None if these tiles fit the core of `spec` (int8 or bf16 inputs, 32-bit accumulator), else the reason."""
        c0 = BLOCK // esize
        for name, mult in (("m", FRAC), ("n", FRAC), ("k", c0), ("kc", c0)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < mult or v % mult:
                return f"tiles.{name} = {v!r} must be a positive multiple of {mult}"
        if self.kc % self.k:
            return f"tiles.kc = {self.kc} must be a multiple of tiles.k = {self.k}"
        if not isinstance(self.stages, int) or not 1 <= self.stages <= 2:
            return f"tiles.stages = {self.stages!r} must be 1 or 2 (event ids 0..1; B chunks use {B_ID}..)"
        if self.m > 4095 or self.n > 4095:
            return f"tiles {self}: Mmad m and n are at most 4095"
        need = {"L0A": (2 * self.m * self.k * esize, spec.l0a_bytes),
                "L0B": (2 * self.k * self.n * esize, spec.l0b_bytes), "L0C": (self.m * self.n * 4, spec.l0c_bytes)}
        if k is not None:
            need["L1"] = (self.l1_bytes(k, self.use_resident(spec, k, esize), esize), spec.l1_bytes)
        for buf, (used, cap) in need.items():
            if used > cap:
                return f"tiles {self} need {used} B of {buf}, which holds {cap} B"
        if (self.k // c0) * (self.n // FRAC) > 255 or self.m // FRAC > 255:
            return f"tiles {self}: one Load2D moves at most 255 fractals"
        if esize == 1 and self.n // 8 > 255:
            return f"tiles.n = {self.n}: the AIV's row stride (n/8 blocks) must fit a u8 repeat stride"
        if self.resident and k is not None and _cdiv(k, self.kc) > MAX_RESIDENT_CHUNKS:
            return f"tiles {self}: a resident B panel of K = {k} needs more than {MAX_RESIDENT_CHUNKS} chunks"
        return None


@dataclass(frozen=True)
class GemmPlan:
    """The host tiling of one launch: tiles and each core group's work items (row0, rows, n0, cols, group).

    Element offsets: row r of group g of A starts at r·a_pitch + g·a_group_stride, of y at r·y_pitch +
    g·y_group_stride. `dequant`: the int8 GEMM's bf16 output (workspace + AIV); else the AIC writes y itself."""

    n: int
    k: int
    tiles: GemmTiles
    resident: bool
    in_dtype: str
    out_dtype: str
    items: tuple  # per core group: tuple of (row0, mm, n0, nn, g)
    aiv_rows: int  # rows per AIV chunk (dequant only)
    a_pitch: int
    a_group_stride: int
    y_pitch: int
    y_group_stride: int

    @property
    def cores_used(self) -> int:
        return sum(1 for it in self.items if it)

    @property
    def dequant(self) -> bool:
        return self.in_dtype == "int8" and self.out_dtype == "bfloat16"

    @property
    def int32_out(self) -> bool:
        return self.out_dtype == "int32"


def _auto_kc(spec, m: int, n: int, bk: int, k: int, esize: int, stages: int = 2) -> tuple[int, bool]:
    """(kc, resident): the largest chunk that keeps the B panel resident, else the largest streamed chunk."""
    kp = _up(k, BLOCK // esize)
    for kc in range(_up(min(kp, 1024), bk), bk - 1, -bk):
        t = GemmTiles(m, n, bk, kc, stages)
        if t.fits_resident(spec, k, esize):
            return kc, True
    for kc in range(max(bk, min(kp, 512) // bk * bk), bk - 1, -bk):  # streamed: ≤ 512 fills the pipeline sooner
        if GemmTiles(m, n, bk, kc, stages).l1_bytes(k, False, esize) <= spec.l1_bytes:
            return kc, False
    return bk, False


def _auto_bk(spec, m: int, n: int, esize: int) -> int:
    c0 = BLOCK // esize
    for bk in range(256, c0 - 1, -c0):
        if 2 * m * bk * esize <= spec.l0a_bytes and 2 * n * bk * esize <= spec.l0b_bytes and \
                (bk // c0) * (n // FRAC) <= 255:
            return bk
    return 0


def _auto_tiles(spec, m: int, n: int, k: int, esize: int) -> GemmTiles | None:
    bk = _auto_bk(spec, m, n, esize)
    if not bk:
        return None
    kc, resident = _auto_kc(spec, m, n, bk, k, esize)
    t = GemmTiles(m, n, bk, kc, 2, resident)
    return t if t.can_implement(spec, k, esize) is None else None


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


def _out_bytes(in_dtype: str, out_dtype: str) -> int:
    """HBM bytes per output element: the int8 GEMM's bf16 output goes through an int32 workspace (written, read
    back) before its bf16 write; every other output is written once by the Fixpipe."""
    if in_dtype == "int8" and out_dtype == "bfloat16":
        return 10
    return as_dtype(out_dtype).itemsize


def _estimate(spec, tiles: GemmTiles, items: np.ndarray, k: int, resident: bool, in_dtype: str, out_dtype: str,
              cores: int):
    """(estimated cycles, core of each item): the cost model the planner minimises (see the module docstring)."""
    if not len(items):
        return 0.0, np.zeros(0, np.int64)
    esize = as_dtype(in_dtype).itemsize
    kp = _up(k, BLOCK // esize)
    mm, nn = items[:, 1].astype(np.float64), items[:, 3].astype(np.float64)
    mp, np_ = np.ceil(mm / 16) * 16, np.ceil(nn / 16) * 16
    steps = _cdiv(kp, tiles.k)
    mmad = mp * np_ * kp / spec.cube_macs_per_cycle(in_dtype) + steps * spec.mmad_head_cycles
    out_b = mm * nn * _out_bytes(in_dtype, out_dtype)
    a_b, b_b = mm * kp * esize, np_ * kp * esize
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


def plan_gemm(spec, group_rows, n: int, k: int, *, in_dtype: str = "int8", out_dtype: str = "bfloat16",
              tiles: GemmTiles | None = None, cores: int | None = None, a_pitch: int | None = None,
              a_group_stride: int = 0, y_pitch: int | None = None, y_group_stride: int = 0,
              fn: str = "gemm") -> GemmPlan:
    """The host tiling: tiles (given or chosen) and each core group's work items.

    group_rows: the row count of each group (one entry for a plain GEMM). Rows of group g start at row
    Σ group_rows[:g] (experts) unless a_group_stride / y_group_stride place the groups side by side (heads: pass
    group_rows [M] · H with row offsets 0 — see batched_bf16_gemm).
    """
    cores = spec.aic_per_die if cores is None else cores
    esize = as_dtype(in_dtype).itemsize
    c0 = BLOCK // esize
    side_by_side = a_group_stride or y_group_stride
    offs = np.zeros(len(group_rows) + 1, np.int64) if side_by_side else \
        np.concatenate([[0], np.cumsum(group_rows)]).astype(np.int64)
    groups = [(int(offs[g]), int(r)) for g, r in enumerate(group_rows)]
    if tiles is not None:
        why = tiles.can_implement(spec, k, esize)
        if why:
            raise ValueError(f"{fn}: {why}")
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
                t = _auto_tiles(spec, bm, bn, k, esize)
                if t is not None:
                    cands.append((t, nitems))
        if not cands:
            chosen = GemmTiles(16, 16, c0, c0, 2, False)
        else:
            best_used = max(min(cores, ni) for _, ni in cands)
            scored = []
            for t, ni in cands:
                if min(cores, ni) < 0.9 * best_used:
                    continue
                est, _ = _estimate(spec, t, _items(groups, n, t), k, t.use_resident(spec, k, esize), in_dtype,
                                   out_dtype, cores)
                instr = ni * _cdiv(_up(k, c0), t.k) * (t.k // c0 + 4)  # ~ Load2Ds, Mmad and flags per k-step
                scored.append((est, instr, t.m, t.n, t))
            best = min(s[0] for s in scored)
            # within 3 % of the best estimate, the fewest instructions (bigger tiles: fewer heads, faster host)
            chosen = min((s for s in scored if s[0] <= 1.03 * best), key=lambda s: s[1:4])[-1]
    resident = chosen.use_resident(spec, k, esize)
    items = _items(groups, n, chosen)
    _, core = _estimate(spec, chosen, items, k, resident, in_dtype, out_dtype, cores)
    per = [[] for _ in range(cores)]
    for it, c in zip(items.tolist(), core.tolist()):
        per[c].append(tuple(it))
    aiv_rows = max(8, min(64, (32768 // (chosen.n * 4)) // 8 * 8))
    return GemmPlan(n=n, k=k, tiles=chosen, resident=resident, in_dtype=in_dtype, out_dtype=out_dtype,
                    items=tuple(tuple(p) for p in per), aiv_rows=aiv_rows,
                    a_pitch=k if a_pitch is None else a_pitch, a_group_stride=a_group_stride,
                    y_pitch=n if y_pitch is None else y_pitch, y_group_stride=y_group_stride)


# ------------------------------------------------------------------------------------------------ the AIC body


@ascendemu.kernel("aic")
def bf16_gemm_kernel(ctx, a, weights, y, plan):
    """y = a · Wᵀ on the AICs alone (BF16 GEMM): a bf16 GM [M, K] (or [M, H, K]); weights: packed bf16 GM
    tensors, one per group; y: bf16 or fp32 GM, written by Fixpipe."""
    aic_gemm_body(ctx, a, weights, y, None, plan)


def _free_events(stages: int, resident_chunks: int, c_slots: int) -> list:
    """The AIC's "buffer free" events, in the order they are set at the start and drained at the end: the L1 A
    stages, the resident B chunks, the L0A/L0B ping-pong and the L0C slots."""
    return ([(HardEvent.MTE1_MTE2, s) for s in range(stages)]
            + [(HardEvent.MTE1_MTE2, B_ID + j) for j in range(resident_chunks)]
            + [(HardEvent.M_MTE1, p) for p in range(2)]
            + [(HardEvent.FIX_M, q) for q in range(c_slots)])


def aic_gemm_body(ctx, a, weights, y, work, plan):
    """The AIC side of every GEMM here (see the module docstring); `work`: the int8 GEMM's int32 workspace ring
    (plan.dequant), whose tiles are handed to the AIVs with cross-core flags READY / FREE."""
    items = plan.items[ctx.block_idx]
    if not items:
        return
    t = plan.tiles
    n_total, k_total = plan.n, plan.k
    bm, bn, bk, kc, stages = t.m, t.n, t.k, t.kc, t.stages
    dt = plan.in_dtype
    c0 = c0_of(dt)
    frac = FRAC * c0  # elements of one 512 B fractal
    n1_total = _cdiv(n_total, FRAC)
    resident = plan.resident
    nk = _cdiv(k_total, kc)
    c_slots = t.l0c_slots(ctx.spec)
    a_gm, y_gm = a.flatten(), y.flatten()
    w_gm = [w.flatten() for w in weights]
    quant = QuantMode.F322BF16 if plan.out_dtype == "bfloat16" and dt == "bfloat16" else QuantMode.NoQuant

    l1_a = [ctx.l1.alloc((bm * kc,), dt) for _ in range(stages)]
    l1_b = [ctx.l1.alloc((bn * kc,), dt) for _ in range(nk if resident else stages)]
    l0a = [ctx.l0a.alloc((bm * bk,), dt) for _ in range(2)]
    l0a_col = [[t[c * frac:] for c in range(bk // c0)] for t in l0a]  # k-block c of a Zz tile
    l0b = [ctx.l0b.alloc((bk * bn,), dt) for _ in range(2)]
    l0c = [ctx.l0c.alloc((bm * bn,), ACC_DTYPE[dt]) for _ in range(c_slots)]
    # A's row pitch beyond Nd2NzParams.srcDValue (uint16): move 16-bit pairs as fp32 (same Nz bytes, C0 = 8)
    pair = 2 if plan.a_pitch > U16_MAX else 1
    a_src = a_gm.reinterpret_cast("float32") if pair == 2 else a_gm
    l1_a_dst = [x.reinterpret_cast("float32") for x in l1_a] if pair == 2 else l1_a

    # Every "buffer free" flag starts set; the end drains them (CATLASS style: every set has its wait).
    free_events = _free_events(stages, nk if resident else 0, c_slots)
    for event, eid in free_events:
        ctx.set_flag(event, eid)

    ia = il0 = 0
    for idx, (row0, mm, n0, nn, g) in enumerate(items):
        m1, n1 = _cdiv(mm, FRAC), _cdiv(nn, FRAC)
        key = (g, n0)
        load_b = not resident or idx == 0 or key != (items[idx - 1][4], items[idx - 1][2])
        free_b = resident and (idx == len(items) - 1 or key != (items[idx + 1][4], items[idx + 1][2]))
        q = idx % c_slots
        a_row = row0 * plan.a_pitch + g * plan.a_group_stride
        ctx.wait_flag(HardEvent.FIX_M, q)  # L0C tile q: its last Fixpipe is done
        for j in range(nk):
            k0c = j * kc
            kkc = min(kc, k_total - k0c)
            kb = _cdiv(kkc, c0)
            s = ia % stages
            ia += 1
            # CopyIn A: mm × kkc → L1 Nz (column blocks of m1 fractals), one Nd2Nz
            ctx.wait_flag(HardEvent.MTE1_MTE2, s)
            ctx.data_copy(l1_a_dst[s], a_src[(a_row + k0c) // pair:],
                          Nd2NzParams(nd_num=1, n_value=mm, d_value=kkc // pair, src_d_value=plan.a_pitch // pair,
                                      dst_nz_c0_stride=m1 * FRAC, dst_nz_n_stride=1))
            # CopyIn B: kb runs of n1 whole fractals of the packed weight (already Zn) → L1
            b_src = w_gm[g][((k0c // c0) * n1_total + n0 // FRAC) * frac:]
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
                k1 = _cdiv(kk, c0)
                p = il0 % 2
                il0 += 1
                # Split: L1 → L0A (Nz → Zz: one Load2D per k-block) and L1 → L0B (Zn as is)
                ctx.wait_flag(HardEvent.M_MTE1, p)
                for c in range(k1):
                    ctx.load_data(l0a_col[p][c], l1_a[s],
                                  LoadData2DParams(start_index=(s0 // c0 + c) * m1, repeat_times=m1, src_stride=1,
                                                   dst_gap=k1 - 1))
                ctx.load_data(l0b[p], sb, LoadData2DParams(start_index=(s0 // c0) * n1, repeat_times=k1 * n1))
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
        # CopyOut: L0C → GM (y, or the workspace slot the AIVs dequantise)
        ctx.set_flag(HardEvent.M_FIX, q)
        ctx.wait_flag(HardEvent.M_FIX, q)
        if not plan.dequant:
            ctx.fixpipe(y_gm[row0 * plan.y_pitch + g * plan.y_group_stride + n0:], l0c[q],
                        FixpipeParamsV220(n_size=nn, m_size=mm, src_stride=m1 * FRAC, dst_stride=plan.y_pitch,
                                          quant_pre=quant))
        else:
            if idx >= WS_SLOTS:
                ctx.cross_core_wait_flag(FREE)  # both AIVs have loaded what was in this slot
            slot = (ctx.block_idx * WS_SLOTS + idx % WS_SLOTS) * bm * bn
            ctx.fixpipe(work[slot:], l0c[q], FixpipeParamsV220(n_size=nn, m_size=mm, src_stride=m1 * FRAC,
                                                               dst_stride=_up(nn, FRAC), quant_pre=QuantMode.NoQuant))
            ctx.cross_core_set_flag(2, ascendemu.PIPE_FIX, READY)
        ctx.set_flag(HardEvent.FIX_M, q)

    for event, eid in free_events:
        ctx.wait_flag(event, eid)
    if plan.dequant:
        for _ in range(min(WS_SLOTS, len(items))):
            ctx.cross_core_wait_flag(FREE)  # the last tiles' slots: no cross-core counter is left over


# ------------------------------------------------------------------------------------------------ checks


def _known(dt) -> bool:
    try:
        dtype_name(as_dtype(dt))
        return True
    except TypeError:
        return False


def check_array(die, x, name: str, dtype: str, shape: tuple, fn: str):
    """A numpy array or GlobalTensor of `die` with this dtype and shape."""
    if isinstance(x, GlobalTensor):
        if x.gm is not die.gm:
            raise ValueError(f"{fn}: {name} is a GlobalTensor of another die's GM")
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy array or a GlobalTensor, got {type(x).__name__}")
    check_dtype(fn, name, x, (dtype,))
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}; expected {tuple(shape)}")
    return x


def check_weight(die, w, name: str, fn: str, dtype: str = "int8"):
    if not isinstance(w, PackedWeight):
        raise TypeError(f"{fn}: {name} must be a PackedWeight from pack_weight(), got {type(w).__name__}")
    d = w.data
    if isinstance(d, GlobalTensor):
        if d.gm is not die.gm:
            raise ValueError(f"{fn}: {name} lives in another die's GM")
    elif not isinstance(d, np.ndarray):
        raise TypeError(f"{fn}: {name}.data must be a numpy array or a GlobalTensor, got {type(d).__name__}")
    if not _known(d.dtype) or dtype_name(d.dtype) != dtype:
        raise TypeError(f"{fn}: {name}.data is {d.dtype}; it must be {dtype}")
    if tuple(d.shape) != packed_shape(w.n, w.k, dtype):
        raise ValueError(f"{fn}: {name}.data has shape {tuple(d.shape)}; a packed [{w.n}, {w.k}] weight is "
                         f"{packed_shape(w.n, w.k, dtype)}")


def check_die(die, fn: str) -> None:
    if not isinstance(die, ascendemu.Die):
        raise TypeError(f"{fn}: die must be an ascendemu.Die, got {type(die).__name__}")


def check_out_dtype(out_dtype, allowed: tuple, fn: str) -> str:
    if out_dtype in allowed:
        return out_dtype
    try:
        name = dtype_name(as_dtype(out_dtype))
    except TypeError:
        name = None
    if name not in allowed:
        raise TypeError(f"{fn}: out_dtype {out_dtype!r} is not one of {', '.join(allowed)}")
    return name


# ------------------------------------------------------------------------------------------------ BF16 GEMMs


def round_once(x64: np.ndarray, out_dtype: str = "bfloat16") -> np.ndarray:
    """float64 → bf16 or fp32, rounded once (half to even): via fp32 rounded to odd, which is exact for bf16."""
    x64 = np.asarray(x64, np.float64)
    if out_dtype == "float32":
        with np.errstate(over="ignore"):
            return x64.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        t = x64.astype(np.float32)
        t = np.where(np.abs(t.astype(np.float64)) > np.abs(x64), np.nextafter(t, np.float32(0)), t)
        inexact = (t.astype(np.float64) != x64) & np.isfinite(x64)
    odd = (t.view(np.uint32) | inexact.astype(np.uint32)).view(np.float32)
    return odd.astype(BF16)


def bf16_gemm_reference(a, w, out_dtype: str = "bfloat16", *, k_step: int | None = None) -> np.ndarray:
    """NumPy golden of bf16_gemm, y = a · wᵀ for a [M, K], w [N, K] (any float dtype; used as given).

    k_step None: the exact float64 product rounded once to out_dtype. k_step = s: the kernel's order — exact sums
    over K-steps of s, each added to an fp32 accumulator with one fp32 rounding, then rounded once to out_dtype
    (bit-exact to the kernel with s = plan.tiles.k)."""
    a64, w64 = np.asarray(a).astype(np.float64), np.asarray(w).astype(np.float64)
    if k_step is None:
        return round_once(a64 @ w64.T, out_dtype)
    k = a64.shape[-1]
    acc = np.zeros((a64.shape[0], w64.shape[0]), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for k0 in range(0, k, k_step):
            part = a64[:, k0:k0 + k_step] @ w64[:, k0:k0 + k_step].T
            acc = (acc.astype(np.float64) + part).astype(np.float32)
    return acc if out_dtype == "float32" else acc.astype(BF16)


def batched_bf16_gemm_reference(a, w_heads, out_dtype: str = "bfloat16", *, k_step: int | None = None) -> np.ndarray:
    """NumPy golden of batched_bf16_gemm: a [M, H, K], w_heads [H, N, K] → y [M, H, N], y[:, h] = a[:, h] · w[h]ᵀ
    (each head as bf16_gemm_reference)."""
    a = np.asarray(a)
    return np.stack([bf16_gemm_reference(a[:, h], w_heads[h], out_dtype, k_step=k_step)
                     for h in range(len(w_heads))], axis=1)


def _launch_bf16(die, a, weights, out_shape, plan, fn):
    """Launch bf16_gemm_kernel on every AIC with the host staging of ops/rowwise.Staging: y as a numpy array when
    a and every weight's data were numpy arrays on a functional die, else the GlobalTensor y."""
    with Staging(die, fn) as st:
        ga = st.put(a, "a")
        gw = st.put_stack([w.data for w in weights], "weights")  # host heads (one shape): one upload, a view each
        y = st.output(out_shape, plan.out_dtype)
        return st.launch(bf16_gemm_kernel, die.spec.aic_per_die, (ga, gw, y, plan))[0]


def _check_a(die, a, ndim: int, fn: str) -> tuple:
    if not isinstance(a, (np.ndarray, GlobalTensor)):
        raise TypeError(f"{fn}: a must be a numpy array or a GlobalTensor, got {type(a).__name__}")
    if len(a.shape) != ndim:
        want = "[M, K]" if ndim == 2 else "[M, H, K]"
        raise ValueError(f"{fn}: a must be {ndim}-D {want}, got shape {tuple(a.shape)}")
    shape = tuple(int(v) for v in a.shape)
    check_array(die, a, "a", "bfloat16", shape, fn)
    if min(shape) < 1:
        raise ValueError(f"{fn}: every dimension of a must be ≥ 1, got shape {shape}")
    return shape


def bf16_gemm(die, a, w_packed, out_dtype="bfloat16", *, tiles: GemmTiles | None = None):
    """y[M, N] = a · Wᵀ on all AICs of `die`, fp32 accumulation rounded once to out_dtype ("bfloat16", half to
    even, or "float32").

    a: bf16 [M, K], a numpy array or a GlobalTensor of `die` (a phantom on a timing-only die); w_packed: a
    PackedWeight of a bf16 [N, K] weight (pack_weight). Returns a numpy array when a and the weight's data are
    numpy arrays and the die is functional, else the GlobalTensor y. `die.last_report` holds the launch's report.
    `tiles` overrides the host tiling (k, kc multiples of 16).
    """
    fn = "bf16_gemm"
    check_die(die, fn)
    out_dtype = check_out_dtype(out_dtype, BF16_OUT, fn)
    if isinstance(w_packed, (list, tuple)):
        raise TypeError(f"{fn}: w_packed must be one PackedWeight; use batched_bf16_gemm for one per head")
    check_weight(die, w_packed, "w_packed", fn, "bfloat16")
    m, k = _check_a(die, a, 2, fn)
    n = w_packed.n
    if w_packed.k != k:
        raise ValueError(f"{fn}: w_packed is [{n}, {w_packed.k}] but a has K = {k}; the inner dimensions differ")
    if k > U16_MAX or n > U16_MAX:
        raise ValueError(f"{fn}: K = {k} and N = {n} must be ≤ {U16_MAX} (Nd2NzParams.srcDValue and "
                         f"DataCopyParams.srcStride are uint16)")
    plan = plan_gemm(die.spec, [m], n, k, in_dtype="bfloat16", out_dtype=out_dtype, tiles=tiles, fn=fn)
    return _launch_bf16(die, a, [w_packed], (m, n), plan, fn)


def batched_bf16_gemm(die, a, w_packed_heads, out_dtype="bfloat16", *, tiles: GemmTiles | None = None):
    """Per head h: y[:, h] = a[:, h] · W_hᵀ on all AICs of `die` (MLA's W_UK absorption and W_UV up-projection).

    a: bf16 [M, H, K] row-major (head h's rows are a[:, h, :], row pitch H·K; numpy or GlobalTensor of `die`);
    w_packed_heads: a sequence of H PackedWeights of bf16 [N, K] weights (pack_heads for an [H, N, K] array,
    packed_heads for an already packed stack such as MLAWeights.w_uk_nz). Returns y [M, H, N] (row-major), fp32
    accumulation rounded once to out_dtype; the return convention of bf16_gemm. (head, m-tile, n-tile) work
    items are spread over the 24 AICs by the planner.
    """
    fn = "batched_bf16_gemm"
    check_die(die, fn)
    out_dtype = check_out_dtype(out_dtype, BF16_OUT, fn)
    if isinstance(w_packed_heads, (PackedWeight, np.ndarray, GlobalTensor)) or \
            not hasattr(w_packed_heads, "__len__"):
        raise TypeError(f"{fn}: w_packed_heads must be a sequence of PackedWeights, one per head (pack_heads / "
                        f"packed_heads), got {type(w_packed_heads).__name__}")
    ws = list(w_packed_heads)
    for h, w in enumerate(ws):
        check_weight(die, w, f"w_packed_heads[{h}]", fn, "bfloat16")
    m, nh, k = _check_a(die, a, 3, fn)
    if len(ws) != nh:
        raise ValueError(f"{fn}: a has H = {nh} heads but {len(ws)} weights were given")
    n = ws[0].n
    for h, w in enumerate(ws):
        if w.k != k:
            raise ValueError(f"{fn}: w_packed_heads[{h}] is [{w.n}, {w.k}] but a has K = {k}; the inner "
                             f"dimensions differ")
        if w.n != n:
            raise ValueError(f"{fn}: w_packed_heads[{h}] is [{w.n}, {w.k}] but w_packed_heads[0] has N = {n}; "
                             f"all heads need one N")
    if k > U16_MAX or n > U16_MAX:
        raise ValueError(f"{fn}: K = {k} and N = {n} must be ≤ {U16_MAX} (DataCopyParams.srcStride is uint16)")
    pitch = nh * k
    if pitch > U16_MAX and (k % 2 or pitch // 2 > U16_MAX):
        raise ValueError(f"{fn}: a's row pitch H·K = {pitch} exceeds Nd2NzParams.srcDValue ({U16_MAX}); moving "
                         f"element pairs needs K even and H·K ≤ {2 * U16_MAX}")
    plan = plan_gemm(die.spec, [m] * nh, n, k, in_dtype="bfloat16", out_dtype=out_dtype, tiles=tiles,
                     a_pitch=pitch, a_group_stride=k, y_pitch=nh * n, y_group_stride=n, fn=fn)
    return _launch_bf16(die, a, ws, (m, nh, n), plan, fn)
