"""The DeepSeek MoE sublayer over expert parallelism (issue 6, item 6; deepseek-v3.md §6–7).

    lw = MoELayerWeights.from_hf(state_dict, layer, config, placement)
    y = moe_layer(cluster, x, lw, placement)            # x, y: one [T_d, H] bf16 per die

Steps (each die's launches run on its own stream 0, so dies overlap in virtual time):

    1. moe_gate on every die (AIV, fp32)                         → topk_ids, topk_weights per die
    2. fused_dispatch (ops/moe/dispatch.py)                       → INT8 rows on the dies that hold the experts
    3. moe_experts on every die (grouped INT8 GEMM, SwiGLU+quant, grouped INT8 GEMM)
    4. shared expert: when the placement keeps it local (`not placement.shared_remote()`), a dense INT8 MLP on each
       home die over its own tokens (quantize_per_token → int8_gemm gate_up → swiglu_quant → int8_gemm down);
       otherwise its rows were dispatched to the shared dies in step 2 and ran in step 3
    5. fused_combine: y = bf16(Σ_k w_k · row_k + shared) on the home die

Timing-only clusters: the gate still runs (for its cycles), but its outputs are phantoms while dispatch needs real
routing, so `routing=[(topk_ids, topk_weights), …]` (one per die, e.g. uniform random) must be given; on a functional
cluster routing comes from the gate and `routing` must be None. `layer_weights` for timing-only runs:
`MoELayerWeights.phantom(cluster, config, placement)`.

`moe_reference` (ops/moe/reference.py) is the float64 golden.

GM: every buffer the layer allocates on the way (gate outputs, the dispatch handle's received rows, the expert and
shared-expert outputs) is freed before it returns, also when a step raises; only the outputs stay (GlobalTensors on
a timing-only cluster, the caller's to free).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import ascendemu
from ascendemu import GlobalTensor

from ..int8_gemm import BF16, int8_gemm
from ..quant import quantize_per_token
from ..swiglu import swiglu_quant
from .config import MoEConfig
from .dispatch import fused_combine, fused_dispatch
from .experts import ExpertWeights, PackedExpert, free_temps, load_expert, moe_experts, phantom_expert
from .gate import moe_gate
from .placement import ExpertPlacement

__all__ = ["MoELayerWeights", "moe_layer", "shared_expert"]


@dataclass(frozen=True, eq=False)
class MoELayerWeights:
    """Router weight [E, H] bf16, correction bias [E] fp32 (numpy, or one GlobalTensor per die for phantoms), the
    packed experts, and the shared expert (PackedExpert, or one per die for phantoms; None without one)."""

    config: MoEConfig
    gate_weight: object
    correction_bias: object
    experts: ExpertWeights
    shared: object

    @classmethod
    def from_hf(cls, state_dict, layer, config: MoEConfig, placement: ExpertPlacement) -> "MoELayerWeights":
        """`model.layers.{layer}.mlp.gate.weight` [E, H] (bf16), `mlp.gate.e_score_correction_bias` [E] (fp32),
        the routed experts the placement holds and the shared expert (packed once; replicas share it)."""
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayerWeights.from_hf: config must be a MoEConfig, got {type(config).__name__}")
        e, h = config.n_routed_experts, config.hidden_size
        pre = f"model.layers.{layer}.mlp."
        for key, shape, dt in ((pre + "gate.weight", (e, h), BF16),
                               (pre + "gate.e_score_correction_bias", (e,), np.dtype(np.float32))):
            if key not in state_dict:
                raise KeyError(f"MoELayerWeights.from_hf: missing tensor {key!r}")
            a = state_dict[key]
            if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dt:
                raise ValueError(f"MoELayerWeights.from_hf: {key} must be a {dt} numpy array of shape {shape}, got "
                                 f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
        experts = ExpertWeights.from_hf(state_dict, layer, placement, config)
        shared = None
        if config.n_shared_experts:
            shared = experts.logical.get(placement.shared_id)
            if shared is None:  # no die lists it: it still runs on the home dies
                shared = load_expert(state_dict, layer, placement.shared_id, config, placement.shared_id)
        return cls(config, state_dict[pre + "gate.weight"], state_dict[pre + "gate.e_score_correction_bias"],
                   experts, shared)

    @classmethod
    def phantom(cls, cluster, config: MoEConfig, placement: ExpertPlacement) -> "MoELayerWeights":
        """Timing-only weights: phantom router weight and bias in every die's GM, phantom experts."""
        experts = ExpertWeights.phantom(cluster, placement, config)
        e, h = config.n_routed_experts, config.hidden_size
        gw = [cluster.die(d).gm.empty((e, h), "bfloat16") for d in range(len(cluster))]
        gb = [cluster.die(d).gm.empty((e,), "float32") for d in range(len(cluster))]
        shared = None
        if config.n_shared_experts:
            # the shared expert on each die: its slot's weights where it holds one, else a phantom of its own
            shared = []
            for d in range(len(cluster)):
                slots = placement.slots[d]
                if placement.shared_id in slots:
                    shared.append(experts.for_die(d)[slots.index(placement.shared_id)])
                else:
                    shared.append(phantom_expert(cluster.die(d).gm, h, config.shared_intermediate_size))
        return cls(config, gw, gb, experts, shared)

    def _per_die(self, value, d):
        return value[d] if isinstance(value, (list, tuple)) else value


def shared_expert(die, x, packed: PackedExpert):
    """The shared expert as a dense INT8 MLP over x [T, H] bf16 on one die: quantize_per_token → int8_gemm (gate_up)
    → swiglu_quant → int8_gemm (down) → bf16 [T, H]. T = 0 gives an empty array."""
    if x.shape[0] == 0:
        return np.zeros((0, packed.hidden), BF16)
    temps = []  # intermediate GlobalTensors, freed also when a step raises
    try:
        q, s = quantize_per_token(die, x)
        temps += [q, s]
        gu = int8_gemm(die, q, s, packed.gate_up, packed.gate_up_scale)
        temps.append(gu)
        q2, s2 = swiglu_quant(die, gu)
        temps += [q2, s2]
        return int8_gemm(die, q2, s2, packed.down, packed.down_scale)
    finally:
        free_temps(die, temps)


def moe_layer(cluster, x, layer_weights: MoELayerWeights, placement: ExpertPlacement, *, max_tokens_per_rank=None,
              routing=None, transport: str = "aiv", return_routing: bool = False):
    """The MoE sublayer (module docstring). x: list of [T_d, H] bf16 (numpy arrays, or GlobalTensors of each die;
    phantoms on a timing-only cluster). max_tokens_per_rank: the dispatch's static buffer size (default max T_d).
    Returns a list of [T_d, H] bf16 per die (numpy arrays on a functional cluster, else GlobalTensors); with
    return_routing, (outputs, [(topk_ids, topk_weights) per die])."""
    if not isinstance(cluster, ascendemu.Cluster):
        raise TypeError(f"moe_layer: cluster must be an ascendemu.Cluster, got {type(cluster).__name__}")
    if not isinstance(layer_weights, MoELayerWeights):
        raise TypeError(f"moe_layer: layer_weights must be a MoELayerWeights, got {type(layer_weights).__name__}")
    if not isinstance(placement, ExpertPlacement):
        raise TypeError(f"moe_layer: placement must be an ExpertPlacement, got {type(placement).__name__}")
    if layer_weights.experts.placement != placement:
        raise ValueError("moe_layer: layer_weights were built for another placement")
    n = len(cluster)
    if placement.num_dies != n:
        raise ValueError(f"moe_layer: the placement has {placement.num_dies} dies but the cluster {n}")
    if not isinstance(x, (list, tuple)) or len(x) != n:
        raise ValueError(f"moe_layer: x must be a list with one [T_d, H] array per die ({n})")
    for d, a in enumerate(x):
        if not isinstance(a, (np.ndarray, GlobalTensor)) or len(a.shape) != 2:
            raise TypeError(f"moe_layer: x[{d}] must be a 2-D [T_d, H] numpy array or GlobalTensor, got "
                            f"{type(a).__name__} {getattr(a, 'shape', '')}")
    cfg = layer_weights.config
    tokens = [int(a.shape[0]) for a in x]
    if max_tokens_per_rank is None:
        max_tokens_per_rank = max(max(tokens), 1)
    if cluster.functional and routing is not None:
        raise ValueError("moe_layer: routing is computed by the gate on a functional cluster; pass routing=None")
    if not cluster.functional:
        if not isinstance(routing, (list, tuple)) or len(routing) != n:
            raise ValueError("moe_layer: a timing-only cluster needs routing=[(topk_ids, topk_weights)] per die: "
                             "the gate's outputs are phantoms there and dispatch needs real routing")
        for d, r in enumerate(routing):
            k = cfg.num_experts_per_tok
            if not isinstance(r, (list, tuple)) or len(r) != 2 or np.shape(r[0]) != (tokens[d], k):
                raise ValueError(f"moe_layer: routing[{d}] must be (topk_ids, topk_weights) of shape "
                                 f"({tokens[d]}, {k}) (x[{d}] rows, config.num_experts_per_tok)")
    shared_local = cfg.n_shared_experts and not placement.shared_remote()
    if shared_local and layer_weights.shared is None:
        raise ValueError("moe_layer: the config has a shared expert but layer_weights.shared is None")

    # 1. gate on every die
    ids, wts = [], []
    for d in range(n):
        die = cluster.die(d)
        r = moe_gate(die, x[d], layer_weights._per_die(layer_weights.gate_weight, d),
                     layer_weights._per_die(layer_weights.correction_bias, d), cfg)
        host = [a.numpy().copy() if isinstance(a, GlobalTensor) and not a.is_phantom else a for a in r]
        free_temps(die, r)
        if routing is None:
            ids.append(np.asarray(host[0]))
            wts.append(np.asarray(host[1]))
        else:  # as given: dispatch checks the types (topk_weights must be float32, not silently rounded to it)
            ids.append(np.asarray(routing[d][0]))
            wts.append(np.asarray(routing[d][1]))
    # 2. dispatch
    handle = fused_dispatch(cluster, list(x), ids, wts, placement, max_tokens_per_rank, transport=transport)
    temps = [[*handle.received(d)[:2]] for d in range(n)]  # per die: GlobalTensors to free before returning
    try:
        # 3. routed (and remote shared) experts; 4. local shared expert
        expert_out, shared_out = [], None
        for d in range(n):
            expert_out.append(moe_experts(cluster.die(d), handle.for_die(d), layer_weights.experts))
            temps[d].append(expert_out[d])
        if shared_local:
            shared_out = []
            for d in range(n):
                shared_out.append(shared_expert(cluster.die(d), x[d], layer_weights._per_die(layer_weights.shared, d)))
                temps[d].append(shared_out[d])
        # 5. combine
        out = fused_combine(cluster, expert_out, handle, shared_out=shared_out)
    finally:
        for d in range(n):
            free_temps(cluster.die(d), temps[d])
    return (out, list(zip(ids, wts))) if return_routing else out


