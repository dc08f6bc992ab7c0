"""Expert MLPs on the dies that hold them (issue 6, item 4; deepseek-v3.md §7, cloudmatrix-design.md §6).

    ew = ExpertWeights.from_hf(state_dict, layer, placement, config)     # host, once per layer
    y_d = moe_experts(die_d, handle.for_die(d), ew)                      # bf16 [R_d, H], in the received order

Weights. Each logical expert (and the shared expert) is quantised per output channel
(`int8_gemm.quantize_weight_per_channel`) and packed (`pack_weight`) once: gate_up = [gate_proj; up_proj] stacked
by rows ([2·I, H]; swiglu_quant takes gate = columns [0, I), up = [I, 2·I) of the GEMM output), down = down_proj
([H, I]). Die d's list follows placement.slots[d]; replicas of an expert share the same packed arrays (no copies).
`ExpertWeights.phantom(cluster, placement, config)` gives timing-only weights (phantom GlobalTensors in each die's
GM, one set per slot) for sizes that cannot be materialised (R1 over 320 dies).

moe_experts on die d: the received INT8 rows and their per-token scales go straight into the expert GEMMs:

    gate_up = grouped_int8_gemm(tokens, scales, counts, [gate_up of each slot])    bf16 [R, 2·I]
    q, s    = swiglu_quant(gate_up)                                                 int8 [R, I], fp32 [R]
    y       = grouped_int8_gemm(q, s, counts, [down of each slot])                  bf16 [R, H]

groups = received.counts, one per local slot, in slot order (rows are grouped by slot). Slots whose weights have
another shape than the first slot with rows (a shared expert with n_shared_experts ≠ 1 beside routed ones) must have
0 rows (else NotImplementedError); they are left out of the grouped GEMM. A die without slots, or without rows,
launches nothing and gets an empty [0, H] array. Intermediates (gate_up, q, s) are freed, also on an error. The
three launches run one after another on the die's stream 0; `die.recording()` sums them. Each step is bit-exact
to its own NumPy reference, so y equals `experts_reference` bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import ascendemu
from ascendemu import GlobalTensor

from ..int8_gemm import (BF16, PackedWeight, grouped_int8_gemm, grouped_int8_gemm_reference, pack_weight,
                         packed_shape, quantize_weight_per_channel, unpack_weight)
from ..swiglu import swiglu_quant, swiglu_quant_reference
from .config import MoEConfig
from .placement import ExpertPlacement

__all__ = ["PackedExpert", "ExpertWeights", "moe_experts", "experts_reference", "pack_expert", "load_expert",
           "phantom_expert"]


@dataclass(frozen=True, eq=False)
class PackedExpert:
    """One expert's INT8 weights: gate_up [2·I, H] and down [H, I] packed, with fp32 per-channel scales."""

    gate_up: PackedWeight
    gate_up_scale: object  # float32 [2·I]: numpy array or GlobalTensor
    down: PackedWeight
    down_scale: object  # float32 [H]

    @property
    def hidden(self) -> int:
        return self.gate_up.k

    @property
    def intermediate(self) -> int:
        return self.down.k

    def dequantized(self) -> tuple:
        """(gate_up, down) float64 = int8 · scale per output channel (host; not for phantoms)."""
        gu = unpack_weight(self.gate_up).astype(np.float64) * np.asarray(self.gate_up_scale, np.float64)[:, None]
        dn = unpack_weight(self.down).astype(np.float64) * np.asarray(self.down_scale, np.float64)[:, None]
        return gu, dn


def _tensor(state_dict, key: str, shape: tuple):
    if key not in state_dict:
        raise KeyError(f"ExpertWeights.from_hf: missing tensor {key!r}")
    a = state_dict[key]
    if not isinstance(a, np.ndarray):
        raise TypeError(f"ExpertWeights.from_hf: {key} must be a numpy array, got {type(a).__name__}")
    if a.shape != shape:
        raise ValueError(f"ExpertWeights.from_hf: {key} has shape {a.shape}; expected {shape}")
    return a


def pack_expert(w_gate, w_up, w_down) -> PackedExpert:
    """Quantise and pack one expert from its HF weights gate_proj [I, H], up_proj [I, H], down_proj [H, I]."""
    q_gu, s_gu = quantize_weight_per_channel(np.concatenate([np.asarray(w_gate), np.asarray(w_up)], axis=0))
    q_dn, s_dn = quantize_weight_per_channel(np.asarray(w_down))
    return PackedExpert(pack_weight(q_gu), s_gu, pack_weight(q_dn), s_dn)


def load_expert(state_dict, layer, expert, config: MoEConfig, shared_id: int) -> PackedExpert:
    """Quantise and pack `model.layers.{layer}.mlp.experts.{expert}.*` (or `mlp.shared_experts.*` when expert ==
    shared_id) after checking that each tensor is there, is a numpy array and has the config's shape."""
    h = config.hidden_size
    if expert == shared_id:
        pre, i = f"model.layers.{layer}.mlp.shared_experts.", config.shared_intermediate_size
    else:
        pre, i = f"model.layers.{layer}.mlp.experts.{expert}.", config.moe_intermediate_size
    return pack_expert(_tensor(state_dict, pre + "gate_proj.weight", (i, h)),
                       _tensor(state_dict, pre + "up_proj.weight", (i, h)),
                       _tensor(state_dict, pre + "down_proj.weight", (h, i)))


def phantom_expert(gm, hidden: int, intermediate: int) -> PackedExpert:
    """Timing-only weights of one expert in `gm`: phantom packed gate_up [2·I, H], down [H, I] and their scales."""
    return PackedExpert(PackedWeight(gm.empty(packed_shape(2 * intermediate, hidden), "int8"), 2 * intermediate,
                                     hidden),
                        gm.empty((2 * intermediate,), "float32"),
                        PackedWeight(gm.empty(packed_shape(hidden, intermediate), "int8"), hidden, intermediate),
                        gm.empty((hidden,), "float32"))


class ExpertWeights:
    """The packed experts of one MoE layer, and which die holds which (`for_die(d)`: one per slot of d)."""

    def __init__(self, placement: ExpertPlacement, config: MoEConfig, per_die: list, logical: dict | None = None):
        self.placement, self.config = placement, config
        self._per_die = [tuple(p) for p in per_die]
        self.logical = logical  # expert id (shared = E) → PackedExpert, or None for phantoms

    @classmethod
    def from_hf(cls, state_dict, layer, placement: ExpertPlacement, config: MoEConfig) -> "ExpertWeights":
        """Quantise + pack `model.layers.{layer}.mlp.experts.{e}.*` for every routed expert some die holds and
        `mlp.shared_experts.*` if a die holds the shared expert, once each; die lists follow placement.slots."""
        if not isinstance(placement, ExpertPlacement):
            raise TypeError(f"ExpertWeights.from_hf: placement must be an ExpertPlacement, got "
                            f"{type(placement).__name__}")
        if not isinstance(config, MoEConfig):
            raise TypeError(f"ExpertWeights.from_hf: config must be a MoEConfig, got {type(config).__name__}")
        if not hasattr(state_dict, "__getitem__") or not hasattr(state_dict, "__contains__"):
            raise TypeError(f"ExpertWeights.from_hf: state_dict must be a mapping, got {type(state_dict).__name__}")
        if placement.num_experts != config.n_routed_experts:
            raise ValueError(f"ExpertWeights.from_hf: the placement has {placement.num_experts} experts but the "
                             f"config {config.n_routed_experts}")
        shared = placement.shared_id
        held = sorted({e for s in placement.slots for e in s})
        if shared in held and not config.n_shared_experts:
            raise ValueError("ExpertWeights.from_hf: the placement holds a shared expert but the config has "
                             "n_shared_experts = 0")
        logical = {e: load_expert(state_dict, layer, e, config, shared) for e in held}
        return cls(placement, config, [[logical[e] for e in s] for s in placement.slots], logical)

    @classmethod
    def phantom(cls, cluster, placement: ExpertPlacement, config: MoEConfig) -> "ExpertWeights":
        """Timing-only weights: phantom packed weights and scales in each die's GM, one set per slot."""
        if cluster.functional:
            raise ValueError("ExpertWeights.phantom: the cluster is functional; phantom weights need "
                             "Cluster(..., functional=False) (use from_hf for real weights)")
        if len(cluster) != placement.num_dies:
            raise ValueError(f"ExpertWeights.phantom: the cluster has {len(cluster)} dies but the placement "
                             f"{placement.num_dies}")
        h = config.hidden_size
        per_die = []
        for d, slots in enumerate(placement.slots):
            gm = cluster.die(d).gm
            per_die.append([phantom_expert(gm, h, config.shared_intermediate_size if e == placement.shared_id
                                           else config.moe_intermediate_size) for e in slots])
        return cls(placement, config, per_die)

    def for_die(self, d) -> tuple:
        """The PackedExperts of die d, one per slot of placement.slots[d]."""
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 <= d < len(self._per_die):
            raise ValueError(f"ExpertWeights.for_die: die {d!r} outside 0..{len(self._per_die) - 1}")
        return self._per_die[int(d)]


def _groups(received, packs):
    """(counts, packs) of the slots that take part in the grouped GEMM (module docstring)."""
    counts = np.asarray(received.counts, np.int64)
    if counts.shape != (len(packs),):
        raise ValueError(f"moe_experts: received.counts has {counts.size} entries but die {received.die} holds "
                         f"{len(packs)} slots")
    if counts.size and counts.min() < 0:
        raise ValueError(f"moe_experts: received.counts {counts.tolist()} of die {received.die} has a negative count")
    if not packs:  # a die that holds no expert receives nothing
        return [], []
    first = next((p for p, c in zip(packs, counts) if c), packs[0])
    shape = (first.gate_up.n, first.down.n, first.down.k)
    keep = []
    for j, (p, c) in enumerate(zip(packs, counts)):
        if (p.gate_up.n, p.down.n, p.down.k) == shape:
            keep.append(j)
        elif c:
            raise NotImplementedError(f"moe_experts: die {received.die} slot {j} (expert {received.slots[j]}) has "
                                      f"{int(c)} rows but intermediate size {p.intermediate} ≠ {first.intermediate} "
                                      f"of the other slots; one grouped GEMM needs one shape")
    return [int(counts[j]) for j in keep], [packs[j] for j in keep]


def moe_experts(die, received, expert_weights: ExpertWeights):
    """The expert MLPs of die `die` over its received rows (module docstring) → bf16 [R, H] in the received order:
    a numpy array when every operand is a numpy array and the die is functional (or R = 0), else a
    GlobalTensor of `die`."""
    if not isinstance(die, ascendemu.Die):
        raise TypeError(f"moe_experts: die must be an ascendemu.Die, got {type(die).__name__}")
    if not isinstance(expert_weights, ExpertWeights):
        raise TypeError(f"moe_experts: expert_weights must be an ExpertWeights, got {type(expert_weights).__name__}")
    for name in ("die", "tokens", "scales", "counts", "slots"):
        if not hasattr(received, name):
            raise TypeError(f"moe_experts: received must be a ReceivedTokens (handle.for_die(d)); it has no "
                            f"{name!r}")
    packs = expert_weights.for_die(received.die)
    if tuple(received.slots) != tuple(expert_weights.placement.slots[received.die]):
        raise ValueError(f"moe_experts: received.slots {tuple(received.slots)} differ from the placement's slots "
                         f"of die {received.die}")
    h = expert_weights.config.hidden_size
    counts, packs = _groups(received, packs)
    r = int(sum(counts))
    if tuple(received.tokens.shape) != (r, h) or tuple(received.scales.shape) != (r,):
        raise ValueError(f"moe_experts: received tokens {tuple(received.tokens.shape)} and scales "
                         f"{tuple(received.scales.shape)} do not match the counts (R = {r}) and H = {h}")
    if r == 0:
        return np.zeros((0, h), BF16)
    temps = []  # intermediate GlobalTensors, freed also when a step raises
    try:
        gu = grouped_int8_gemm(die, received.tokens, received.scales, counts, [p.gate_up for p in packs],
                               [p.gate_up_scale for p in packs])
        temps.append(gu)
        q, s = swiglu_quant(die, gu)
        temps += [q, s]
        return grouped_int8_gemm(die, q, s, counts, [p.down for p in packs], [p.down_scale for p in packs])
    finally:
        free_temps(die, temps)


def free_temps(die, arrays) -> None:
    """Free the GlobalTensors among `arrays` in die's GM (numpy arrays need nothing)."""
    for a in arrays:
        if isinstance(a, GlobalTensor):
            die.gm.free(a)


def experts_reference(tokens, scales, counts, packs) -> np.ndarray:
    """NumPy golden of moe_experts from the int8 rows: the grouped GEMM, SwiGLU+quant and grouped GEMM references
    (each bit-exact to its kernel) over the slots' packed weights."""
    tokens, scales = np.asarray(tokens), np.asarray(scales)
    if tokens.shape[0] == 0:
        return np.zeros((0, tokens.shape[1]), BF16)
    gu = grouped_int8_gemm_reference(tokens, scales, counts, [unpack_weight(p.gate_up) for p in packs],
                                     [p.gate_up_scale for p in packs])
    q, s = swiglu_quant_reference(gu)
    return grouped_int8_gemm_reference(q, s, counts, [unpack_weight(p.down) for p in packs],
                                       [p.down_scale for p in packs])
