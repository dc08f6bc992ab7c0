"""The hardware spec: every number the machine uses, each with its source.

One frozen `Spec` per chip. Every field is built with `param(value, source)`; the
source is either a citation into ../shared/reference/ascend-910c.md (its key in
brackets: [INI], [cperf], [vperf], ...) or a line that begins "assumption:" and
says why the value was chosen. `spec.source(name)` returns it.

Presets: "910c" (one die of an Ascend 910C, CANN SoC Ascend910_9391) and
"910b1" … "910b4". `load(path)` applies what-if overrides from a TOML file:

    preset = "910c"                      # optional, default "910c"
    [overrides]
    clock_mhz = 1900
    hbm_bytes_per_cycle = { value = 800, source = "what-if: slower HBM" }
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from types import MappingProxyType

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def param(value, source: str):
    return field(default=value, metadata={"source": source})


@dataclass(frozen=True)
class Spec:
    # --- identity, clock, core counts -------------------------------------------------
    name: str = param("910c", "preset name")
    soc_version: str = param("Ascend910_9391", "[INI] CANN SoC name of one 910C die")
    clock_mhz: float = param(1850.0, "[INI] cube_freq; ⚠ third-party TFLOPS imply ~1.91 GHz, INI value chosen")
    aic_per_die: int = param(24, "[INI] cube_core_cnt")
    aiv_per_die: int = param(48, "[INI] vector_core_cnt")
    aiv_per_aic: int = param(2, "[basic] 1 AIC : 2 AIV per AI Core")

    # --- local buffers: capacity and minimum alignment --------------------------------
    l1_bytes: int = param(512 * KIB, "[INI] l1_size")
    l0a_bytes: int = param(64 * KIB, "[INI] l0_a_size")
    l0b_bytes: int = param(64 * KIB, "[INI] l0_b_size")
    l0c_bytes: int = param(128 * KIB, "[INI] l0_c_size")
    bias_table_bytes: int = param(1 * KIB, "[INI] bt_size")
    fixpipe_buffer_bytes: int = param(7 * KIB, "[INI] fb0..fb3 sizes (2K+1K+2K+2K)")
    ub_bytes: int = param(192 * KIB, "[INI] ub_size")
    l1_align_bytes: int = param(32, "[arch; hw] L1 minimum alignment")
    l0a_align_bytes: int = param(512, "[arch; Mmad.md] L0A operands are whole 512 B fractals")
    l0b_align_bytes: int = param(512, "[arch; Mmad.md] L0B operands are whole 512 B fractals")
    l0c_align_bytes: int = param(64, "[arch] L0C minimum alignment")
    mmad_l0c_align_bytes: int = param(1024, "[Mmad.md] Mmad destination in L0C is 1024 B aligned")
    bias_table_align_bytes: int = param(64, "[arch] BiasTable alignment")
    fixpipe_buffer_align_bytes: int = param(
        128, "[hw] Fixpipe buffer alignment; ⚠ arch says 64 B, the stricter 128 B is chosen")
    ub_align_bytes: int = param(32, "[arch; hw] UB alignment: moves into UB are whole 32 B blocks")
    gm_alloc_align_bytes: int = param(
        512, "assumption: the host allocator aligns GM allocations to 512 B (a whole fractal, 4 L2 half-lines)")

    # --- fixed geometry ---------------------------------------------------------------
    block_bytes: int = param(32, "[vec/SIMD计算说明] one DataBlock = 32 B")
    repeat_blocks: int = param(8, "[vec/SIMD计算说明] one repeat = 8 DataBlocks = 256 B")
    max_repeat_times: int = param(255, "[vec/SIMD计算说明] repeatTime ≤ 255")
    fractal_rows: int = param(16, "[cube/矩阵计算分形介绍] a fractal has 16 rows; C0 = 32 B / itemsize")
    cube_fractal_bytes: int = param(512, "[cube/矩阵计算分形介绍] one L1/L0A/L0B fractal = 16 × C0 = 512 B")
    max_flag_id: int = param(7, "[SetFlag_WaitFlag_ISASI.md] event ids 0–7 (0–5 users, 6 reserved, 7 TPipe)")
    queue_depth: int = param(32, "[basic; hw] MTE1 and M issue queues hold 32; assumption: the same for every pipe")

    # --- cube: MACs per cycle per AIC ---------------------------------------------------
    cube_int8_macs_per_cycle: int = param(8192, "[cperf] s8×s8→s32: 16×16×32 per cycle")
    cube_fp16_macs_per_cycle: int = param(4096, "[cperf] f16×f16→f32: 16×16×16 per cycle")
    cube_bf16_macs_per_cycle: int = param(4096, "[cperf] bf16×bf16→f32: 16×16×16 per cycle")
    cube_fp32_macs_per_cycle: int = param(1024, "[cperf] f32×f32→f32: 16×16×4 per cycle")

    # --- vector: elements per cycle per AIV, by op class ([vperf] table) --------------
    vec_simple_b16_elems_per_cycle: int = param(128, "[vperf] Add/Sub/Mul/Max/Min/Adds/…/Abs/Relu/Reciprocal/Rsqrt, Compare, Select, Duplicate: 16-bit")
    vec_simple_b32_elems_per_cycle: int = param(64, "[vperf] the same op class, 32-bit")
    vec_transcendental_elems_per_cycle: int = param(32, "[vperf] Exp, Ln, Sqrt, Div: 32/cycle for 16- and 32-bit")
    vec_cast_elems_per_cycle: int = param(64, "[vperf] Cast half↔float, float↔int32, bf16→float, …")
    vec_cast_b64_elems_per_cycle: int = param(32, "[vperf] Cast int32→int64, float→int64")
    vec_cast_b8_elems_per_cycle: int = param(128, "[vperf] Cast int8/uint8/int16 → half and half → int8/uint8/int16")
    vec_whole_reduce_cycles_per_repeat: int = param(7, "[vperf] ReduceRepeat (WholeReduceSum/Max/Min): 128/7 and 64/7 elements/cycle = 7 cycles per repeat")
    vec_block_reduce_b16_cycles_per_repeat: int = param(7, "[vperf] ReduceDataBlock 16-bit: 128/7 elements/cycle")
    vec_block_reduce_b32_cycles_per_repeat: int = param(1, "[vperf] ReduceDataBlock 32-bit: 64 elements/cycle")
    vec_brcb_in_elems_per_cycle: int = param(8, "[vperf] Brcb: 8 input elements/cycle")
    vec_gather_elems_per_cycle: int = param(5, "[vperf] Gather: 5 elements/cycle")

    # --- data paths: bytes per cycle per core ------------------------------------------
    l1_to_l0a_bytes_per_cycle: int = param(256, "[cperf] Load2D L1→L0A; ⚠ INI l1_to_l0_a_rate says 512, cperf chosen")
    l1_to_l0b_bytes_per_cycle: int = param(128, "[cperf] Load2D L1→L0B; ⚠ INI l1_to_l0_b_rate says 256, cperf chosen")
    l1_to_bt_bytes_per_cycle: int = param(32, "[cperf] L1→BiasTable")
    l1_to_fb_bytes_per_cycle: int = param(32, "[cperf] L1→Fixpipe buffer")
    fixpipe_elems_per_cycle: int = param(64, "[cperf] FixPipe L0C→L1: 64 output elements/cycle; assumption: the same to GM, then capped by the GM write rate")
    gm_read_bytes_per_cycle: int = param(110, "[INI] l2_rate read 110 (units undocumented ⚠); per-core MTE2 cap")
    aic_gm_write_bytes_per_cycle: int = param(86, "[INI] l2_rate write 86; per-core cap for AIC MTE3 and FixPipe")
    aiv_gm_write_bytes_per_cycle: int = param(64, "[INI] ub_to_ddr_rate 64; per-core cap for AIV MTE3")
    ub_to_ub_bytes_per_cycle: int = param(256, "[vperf; ubbank] the vector unit moves one 256 B repeat per beat")
    gm_burst_bytes: int = param(32, "assumption: GM transfers are charged in whole 32 B units; L2 line effects are not modelled")

    # --- fixed heads (ΔT) and latencies: unpublished [cperf §18] -----------------------
    scalar_issue_cycles: int = param(1, "assumption: the scalar unit issues one instruction per cycle (unpublished)")
    mte_gm_head_cycles: int = param(
        100, "assumption: DMA set-up and first-byte latency of a GM transfer, ~54 ns at 1.85 GHz (unpublished ΔT)")
    mte_local_head_cycles: int = param(16, "assumption: head of an on-core move (L1→L0A/L0B/BT/FB, UB→UB) (unpublished ΔT)")
    mmad_head_cycles: int = param(16, "assumption: Mmad head (ΔT in [cperf]'s formula, unpublished)")
    fixpipe_head_cycles: int = param(32, "assumption: FixPipe head (unpublished ΔT)")
    vector_head_cycles: int = param(8, "assumption: vector instruction head, covering pipeline fill (unpublished)")
    flag_latency_cycles: int = param(4, "assumption: SetFlag→WaitFlag latency (unpublished)")
    scalar_access_cycles: int = param(8, "assumption: a scalar GetValue/SetValue on a local buffer (unpublished)")

    # --- die memory ---------------------------------------------------------------------
    hbm_gib: int = param(64, "[INI] memory_size: 64 GiB HBM per die")
    hbm_bytes_per_cycle: int = param(
        865, "⚠ third-party ~1.6 TB/s per die (3.2 TB/s per package) ÷ 1.85 GHz; shared by all cores")
    l2_bytes: int = param(192 * MIB, "[INI] l2_size; L2 hits are not modelled (assumption)")

    # --- many cores at once (the whole die) ---------------------------------------------
    bandwidth_window_cycles: int = param(
        64, "assumption: granularity of shared-bandwidth accounting (bandwidth.py); a model choice, not hardware")
    cross_core_flag_latency_cycles: int = param(
        32, "assumption: CrossCoreSetFlag → CrossCoreWaitFlag latency between cores (unpublished, §18)")
    cross_core_counter_max: int = param(15, "[CrossCoreSetFlag_ISASI.md; CATLASS] a cross-core flag counter holds at most 15")
    max_cross_core_flag_id: int = param(15, "[CrossCoreSetFlag_ISASI.md] flag ids 0–15 ⚠ the arch page says 0–10; API page chosen")
    sync_all_latency_cycles: int = param(64, "assumption: SyncAll release latency after the last core arrives (unpublished)")

    # --- the cluster: packages, nodes, Unified Bus, RDMA, SDMA ([CMD] = cloudmatrix-design.md §1) --
    dies_per_package: int = param(2, "[CMD §1] one 910C package = 2 dies, each its own device")
    dies_per_node: int = param(16, "[CMD §1] a node has 8 NPUs = 16 dies")
    ub_port_bytes_per_cycle: int = param(
        106, "[CMD §1] > 392 GB/s unidirectional UB per NPU, split evenly over its 2 dies (D): 196 GB/s ÷ 1.85 GHz; "
             "per direction (injection and ejection each)")
    ub_latency_cycles: int = param(
        1480, "assumption: one-way UB message latency 0.8 µs; the secondary sources only say 'sub-microsecond' [CMD §1]")
    ub_inter_node_extra_latency_cycles: int = param(
        925, "assumption: 0.5 µs extra between nodes, inside the '< 1 µs extra' bound of [CMD §1]")
    ub_inter_node_bandwidth_factor: float = param(
        0.97, "[CMD §1] crossing nodes costs '< 3 % bandwidth': the worst case, 0.97, is applied")
    package_link_bytes_per_cycle: int = param(
        106, "assumption: the on-package die-to-die link (unpublished) is as fast as a die's UB port")
    package_link_latency_cycles: int = param(555, "assumption: on-package die-to-die latency 0.3 µs (unpublished)")
    rdma_port_bytes_per_cycle: int = param(
        14, "[CMD §1] RDMA up to 400 Gbps unidirectional per NPU = 25 GB/s per die (D) ÷ 1.85 GHz ≈ 13.5, rounded up")
    rdma_latency_cycles: int = param(5550, "assumption: RDMA (RoCE) one-way latency 3 µs (unpublished)")
    aiv_direct_head_cycles: int = param(
        64, "assumption: set-up of an AIV-Direct remote store on MTE3; no launch overhead [CMD §4] (unpublished)")
    sdma_launch_cycles: int = param(
        3700, "assumption: SDMA task launch overhead 2 µs, the cost AIV-Direct avoids [CMD §4] (unpublished)")
    sdma_bytes_per_cycle: int = param(
        106, "assumption: a die's SDMA engines together stream as fast as its UB port (unpublished)")

    # ------------------------------------------------------------------------------------
    def source(self, name: str) -> str:
        """Where the value of field `name` comes from (or why it is an assumption)."""
        if name in self._overrides():
            return self._overrides()[name]
        for f in fields(self):
            if f.name == name:
                return f.metadata.get("source", "")
        raise KeyError(f"Spec has no field {name!r}")

    def _overrides(self):
        return object.__getattribute__(self, "__dict__").get("_override_sources", {})

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_gib * GIB

    @property
    def clock_hz(self) -> float:
        return self.clock_mhz * 1e6

    def cycles_to_us(self, cycles: float) -> float:
        return cycles / self.clock_mhz

    def cube_macs_per_cycle(self, dtype_name: str) -> int:
        """MACs per cycle of one AIC for the input dtype of an Mmad."""
        table = {"int8": self.cube_int8_macs_per_cycle, "float16": self.cube_fp16_macs_per_cycle,
                 "bfloat16": self.cube_bf16_macs_per_cycle, "float32": self.cube_fp32_macs_per_cycle}
        return table[dtype_name]

    def peak_cube_ops_per_s(self, dtype_name: str) -> float:
        """Peak cube FLOP/s (or int8 OP/s) of the whole die: 2 × MACs × AICs × clock."""
        return 2 * self.cube_macs_per_cycle(dtype_name) * self.aic_per_die * self.clock_hz

    @property
    def peak_hbm_bytes_per_s(self) -> float:
        return self.hbm_bytes_per_cycle * self.clock_hz

    def describe(self) -> str:
        """Every field, its value and its source: print this beside any result."""
        rows = [f"{f.name} = {getattr(self, f.name)!r}  # {self.source(f.name)}" for f in fields(self)]
        return "\n".join(rows)


def _910b(name: str, aic: int, hbm_gib: int, clock: float, note: str) -> Spec:
    return _replace(Spec(), {
        "name": (name, "preset name"),
        "soc_version": (f"Ascend{name[:3]}{name[3:].upper()}", "⚠ CANN SoC name of the part, by CANN's naming"),
        "aic_per_die": (aic, note),
        "aiv_per_die": (2 * aic, note + "; 2 AIV per AIC [basic]"),
        "hbm_gib": (hbm_gib, note),
        "clock_mhz": (clock, note),
        "hbm_bytes_per_cycle": (round(1.6e12 / (clock * 1e6)), "⚠ assumption: the same ~1.6 TB/s as a 910C die "
                                "(third-party), ÷ this part's clock"),
        "dies_per_package": (1, "⚠ a 910B package is one die (not in the reference)"),
        "ub_port_bytes_per_cycle": (106, "⚠ 910C value, kept for what-ifs: 910B servers have no UB supernode"),
    })


def _replace(spec: Spec, changes: dict) -> Spec:
    """A copy of `spec` with {field: (value, source)} changes; unknown fields are an error."""
    names = {f.name: f for f in fields(Spec)}
    for k, (v, _) in changes.items():
        if k not in names:
            raise KeyError(f"Spec has no field {k!r}; fields are: {', '.join(sorted(names))}")
        expected = type(names[k].default)
        if expected is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, expected) or isinstance(v, bool) != (expected is bool):
            raise TypeError(f"Spec field {k!r} takes {expected.__name__}, got {v!r}")
        if expected in (int, float) and not isinstance(v, bool):
            positive = any(t in k for t in ("per_cycle", "_bytes", "_per_", "clock", "factor", "max_", "window"))
            if v < 0 or (positive and v <= 0):
                raise ValueError(f"Spec field {k!r} must be {'> 0' if positive else '≥ 0'}, got {v!r}")
        changes[k] = (v, changes[k][1])
    new = dataclasses.replace(spec, **{k: v for k, (v, _) in changes.items()})
    sources = dict(spec._overrides())
    sources.update({k: src for k, (_, src) in changes.items()})
    object.__setattr__(new, "_override_sources", MappingProxyType(sources))
    return new


# 910B parts share the die IP (dav-c220) with the 910C die; they differ in core count, HBM and clock.
# ⚠ Not in our reference: values recalled from CANN's platform_config Ascend910B{1..4}.ini.
_B_NOTE = "⚠ recalled from CANN platform_config Ascend910B{n}.ini, not checked against the reference"
PRESETS = {
    "910c": Spec(),
    "910b1": _910b("910b1", 24, 64, 1800.0, _B_NOTE.format(n=1)),
    "910b2": _910b("910b2", 24, 64, 1800.0, _B_NOTE.format(n=2)),
    "910b3": _910b("910b3", 20, 64, 1800.0, _B_NOTE.format(n=3)),
    "910b4": _910b("910b4", 20, 32, 1650.0, _B_NOTE.format(n=4)),
}


def get(name_or_spec) -> Spec:
    """A preset by name ("910c", "910b1" … "910b4"), or a Spec passed through."""
    if isinstance(name_or_spec, Spec):
        return name_or_spec
    key = str(name_or_spec).lower().replace("ascend", "")
    if key not in PRESETS:
        raise KeyError(f"unknown chip preset {name_or_spec!r}; presets are: {', '.join(PRESETS)}")
    return PRESETS[key]


def replace(spec: Spec, source: str = "what-if override", **values) -> Spec:
    """A copy of `spec` with some fields changed, each recorded with `source`."""
    return _replace(spec, {k: (v, source) for k, v in values.items()})


def load(path) -> Spec:
    """Apply the overrides of a TOML file to a preset (see the module docstring)."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    unknown = set(doc) - {"preset", "overrides"}
    if unknown:
        raise KeyError(f"{path}: unknown top-level keys {sorted(unknown)}; expected 'preset' and [overrides]")
    base = get(doc.get("preset", "910c"))
    changes = {}
    overrides = doc.get("overrides", {})
    if not isinstance(overrides, dict):
        raise TypeError(f"{path}: 'overrides' must be a table ([overrides]), got {overrides!r}")
    for k, v in overrides.items():
        if isinstance(v, dict):
            if set(v) - {"value", "source"} or "value" not in v:
                raise KeyError(f"{path}: override {k!r} must be a value or {{value = …, source = …}}")
            changes[k] = (v["value"], v.get("source", f"override from {path}"))
        else:
            changes[k] = (v, f"override from {path}")
    return _replace(base, changes)
