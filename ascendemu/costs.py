"""The cycle cost of every instruction class: a fixed head plus work over throughput.

All numbers come from the spec; this module only says how they combine ([cperf]: "cycles
= ΔT + work / throughput"). It is the one home of the cost rules that ARCHITECTURE.md
describes.
"""
from __future__ import annotations

from .spec import Spec


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def gm_charged_bytes(spec: Spec, block_bytes: int, block_count: int) -> int:
    """GM traffic is charged in whole bursts per contiguous block."""
    return block_count * ceil_div(block_bytes, spec.gm_burst_bytes) * spec.gm_burst_bytes


def gm_move(spec: Spec, charged_bytes: int, bytes_per_cycle: int) -> int:
    """A transfer with GM at one end (MTE2 read, MTE3 write), alone on the die's HBM."""
    return spec.mte_gm_head_cycles + ceil_div(charged_bytes, bytes_per_cycle)


def gm_transfer(spec: Spec, charged_bytes: int, bytes_per_cycle: int, head: int | None = None) -> tuple:
    """`Core.issue(gm=…)` arguments of a GM transfer: its head, then its bytes through the die's shared
    HBM at no more than the per-core rate. Alone on the HBM it costs exactly `gm_move`."""
    return (spec.mte_gm_head_cycles if head is None else head, charged_bytes, bytes_per_cycle)


def local_move(spec: Spec, nbytes: int, bytes_per_cycle: int) -> int:
    """A transfer between on-core buffers (L1→L0A/L0B/BT/FB, UB→UB)."""
    return spec.mte_local_head_cycles + ceil_div(nbytes, bytes_per_cycle)


def mmad(spec: Spec, m: int, n: int, k: int, in_dtype: str, itemsize: int) -> int:
    """[cperf]: ΔT + ceil16(m)·ceil16(n)·ceil_k0(k) / MACs-per-cycle."""
    k0 = spec.block_bytes // itemsize
    padded = ceil_div(m, 16) * 16 * ceil_div(n, 16) * 16 * ceil_div(k, k0) * k0
    return spec.mmad_head_cycles + ceil_div(padded, spec.cube_macs_per_cycle(in_dtype))


def vector(spec: Spec, op_class: str, itemsize: int, repeats: int) -> int:
    """A vector instruction processing `repeats` full 256 B repeats of `itemsize`-byte lanes.

    The cost counts whole repeats whatever the mask (masked lanes still occupy the unit).
    """
    lanes = spec.block_bytes * spec.repeat_blocks // itemsize
    if op_class == "whole_reduce":
        return spec.vector_head_cycles + repeats * spec.vec_whole_reduce_cycles_per_repeat
    if op_class == "block_reduce":
        per = spec.vec_block_reduce_b16_cycles_per_repeat if itemsize <= 2 else spec.vec_block_reduce_b32_cycles_per_repeat
        return spec.vector_head_cycles + repeats * per
    if op_class == "brcb":  # Brcb consumes 8 input elements per repeat
        return spec.vector_head_cycles + ceil_div(repeats * 8, spec.vec_brcb_in_elems_per_cycle)
    if op_class == "simple":  # (an if-chain, not a dict built per call: this runs for every vector instruction)
        rate = spec.vec_simple_b16_elems_per_cycle if itemsize <= 2 else spec.vec_simple_b32_elems_per_cycle
    elif op_class == "transcendental":
        rate = spec.vec_transcendental_elems_per_cycle
    elif op_class == "cast":
        rate = spec.vec_cast_elems_per_cycle
    elif op_class == "cast_b8":
        rate = spec.vec_cast_b8_elems_per_cycle
    elif op_class == "cast_b64":
        rate = spec.vec_cast_b64_elems_per_cycle
    elif op_class == "gather":
        rate = spec.vec_gather_elems_per_cycle
    else:
        raise KeyError(op_class)
    return spec.vector_head_cycles + ceil_div(repeats * lanes, rate)


def fixpipe_gm_transfer(spec: Spec, elements: int, out_bytes: int) -> tuple:
    """`Core.issue(gm=…)` arguments of FixPipe → GM: 64 elements/cycle, capped by the AIC's GM write rate."""
    rate = min(spec.fixpipe_elems_per_cycle * out_bytes / max(elements, 1), spec.aic_gm_write_bytes_per_cycle)
    return (spec.fixpipe_head_cycles, out_bytes, rate)


def fixpipe(spec: Spec, elements: int, out_bytes: int, to_gm: bool) -> int:
    """FixPipe L0C→GM/L1: 64 elements/cycle, and to GM no faster than the AIC's GM write rate."""
    cycles = ceil_div(elements, spec.fixpipe_elems_per_cycle)
    if to_gm:
        cycles = max(cycles, ceil_div(out_bytes, spec.aic_gm_write_bytes_per_cycle))
    return spec.fixpipe_head_cycles + cycles
