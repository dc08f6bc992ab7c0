"""NumPy references for the MoE layer (deepseek-v3.md §6–7), written from the model description, not from the
kernels.

* `routing_reference(x, gate_weight, bias, config)`: DeepSeek-V3's noaux_tc routing in fp32 with the logits summed
  in the order ops/moe/gate.py documents (64-lane fold over the 64-column blocks, then a pairwise tree over the
  lanes), sigmoid as 1 / (1 + exp(−l)), the weights' Σ as a pairwise tree over the k values: equal to `moe_gate`
  bit for bit. Ties: lower index first (a stable descending sort).
* `routing_reference_f64(...)`: the same selection rules on float64 logits and scores (HF's formula without fp32
  rounding), for tolerance checks of the weights.
* `expert_mlp_f64(x, w_gate, w_up, w_down)`: W_down · (silu(W_gate x) ⊙ W_up x) in float64.
* `moe_reference(x_list, state_dict, layer, config, routing=None, int8=True)`: the MoE sublayer per die,
  y = Σ_k w_k · Expert_{id_k}(x) + SharedExpert(x), float64 expert math on the bf16 weights. With `int8=True` it
  models the deployment's INT8 scheme: per-output-channel weight quantisation, per-token activation quantisation of
  x and of the SwiGLU output (round half to even, ±127), each GEMM exact on the quantised values.
"""
from __future__ import annotations

import numpy as np

from .config import MoEConfig

F32 = np.float32
LANES = 64


def _tree(v: np.ndarray, width: int) -> np.ndarray:
    """Pairwise tree sum over the last axis, padded with zeros to `width`, rounding to fp32 at every level."""
    v = np.asarray(v, F32)
    pad = width - v.shape[-1]
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), F32)], axis=-1)
    while v.shape[-1] > 1:
        v = (v[..., 0::2] + v[..., 1::2]).astype(F32)
    return v[..., 0]


def gate_logits_reference(x, gate_weight) -> np.ndarray:
    """fp32 logits [T, E] in moe_gate's order: lane l of 64 accumulates x[64c + l]·W[e, 64c + l] over the
    64-column blocks c in order (from 0, rounding each add to fp32), then the 64 lanes are summed pairwise."""
    xf = np.asarray(x).astype(F32)
    wf = np.asarray(gate_weight).astype(F32)
    t, h = xf.shape
    e = wf.shape[0]
    acc = np.zeros((t, e, LANES), F32)
    for c0 in range(0, h, LANES):
        n = min(LANES, h - c0)
        p = (xf[:, None, c0:c0 + n] * wf[None, :, c0:c0 + n]).astype(F32)
        acc[:, :, :n] = (acc[:, :, :n] + p).astype(F32)
    return _tree(acc, LANES)


def _select(scores, sel_scores, config: MoEConfig):
    """Group-limited top-k by the rules of deepseek-v3.md §6 on any float dtype. Returns ids [T, k] int32."""
    t, e = sel_scores.shape
    ng, g, kg, k = config.n_group, config.group_size, config.topk_group, config.num_experts_per_tok
    grouped = sel_scores.reshape(t, ng, g)
    top2 = -np.sort(-grouped, axis=-1, kind="stable")[..., :2]
    gscore = (top2[..., 0] + top2[..., 1]).astype(sel_scores.dtype)
    kept = np.argsort(-gscore, axis=-1, kind="stable")[:, :kg]
    mask = np.zeros((t, ng), bool)
    np.put_along_axis(mask, kept, True, axis=-1)
    masked = np.where(np.repeat(mask, g, axis=-1), sel_scores, -np.inf)
    return np.argsort(-masked, axis=-1, kind="stable")[:, :k].astype(np.int32)


def routing_reference(x, gate_weight, correction_bias, config: MoEConfig):
    """(topk_ids int32 [T, k], topk_weights fp32 [T, k]) exactly as moe_gate computes them."""
    k = config.num_experts_per_tok
    x = np.asarray(x)
    if x.shape[0] == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), F32)
    logits = gate_logits_reference(x, gate_weight)
    with np.errstate(over="ignore"):
        t = (-logits).astype(F32)
        t = np.exp(t.astype(np.float64)).astype(F32)
    t = (t + F32(1.0)).astype(F32)
    s = (F32(1.0) / t).astype(F32)
    sp = (s + np.asarray(correction_bias, F32)[None, :]).astype(F32)
    ids = _select(s, sp, config)
    w = np.take_along_axis(s, ids.astype(np.int64), axis=-1).astype(F32)
    if config.norm_topk_prob:
        den = (_tree(w, LANES) + F32(1e-20)).astype(F32)
        w = (w / den[:, None]).astype(F32)
    w = (w * F32(config.routed_scaling_factor)).astype(F32)
    return ids, w


def routing_reference_f64(x, gate_weight, correction_bias, config: MoEConfig):
    """(ids, weights float64): the routing rules on float64 logits/scores (for tolerance checks)."""
    x64 = np.asarray(x).astype(np.float64)
    logits = x64 @ np.asarray(gate_weight).astype(np.float64).T
    s = 1.0 / (1.0 + np.exp(-logits))
    sp = s + np.asarray(correction_bias, np.float64)[None, :]
    ids = _select(s, sp, config)
    w = np.take_along_axis(s, ids.astype(np.int64), axis=-1)
    if config.norm_topk_prob:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return ids, w * config.routed_scaling_factor


def weights_for_ids_f64(x, gate_weight, ids, config: MoEConfig) -> np.ndarray:
    """float64 routing weights of given expert ids (HF's formula), for comparing weights when the ids agree."""
    logits = np.asarray(x).astype(np.float64) @ np.asarray(gate_weight).astype(np.float64).T
    s = 1.0 / (1.0 + np.exp(-logits))
    w = np.take_along_axis(s, np.asarray(ids, np.int64), axis=-1)
    if config.norm_topk_prob:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return w * config.routed_scaling_factor


# ------------------------------------------------------------------------------------------------ experts


def quantize_rows_f64(x) -> tuple:
    """Symmetric per-row INT8 quantisation in float64: (q as float64 in [−127, 127], scale [rows])."""
    x = np.asarray(x, np.float64)
    amax = np.abs(x).max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1])
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.rint(x / scale[..., None]), -127, 127), scale


def _fake_quant_rows(x) -> np.ndarray:
    q, s = quantize_rows_f64(x)
    return q * s[..., None]


def expert_mlp_f64(x, w_gate, w_up, w_down, int8: bool = False) -> np.ndarray:
    """W_down · (silu(W_gate x) ⊙ W_up x) for rows x [R, H] in float64 (weights [I, H], [I, H], [H, I]).
    int8: the activations x and h are quantised per row and the weights per output channel first."""
    x = np.asarray(x, np.float64)
    wg, wu, wd = (np.asarray(w, np.float64) for w in (w_gate, w_up, w_down))
    if int8:
        x = _fake_quant_rows(x)
        wg, wu, wd = _fake_quant_rows(wg), _fake_quant_rows(wu), _fake_quant_rows(wd)
    g = x @ wg.T
    u = x @ wu.T
    h = g / (1.0 + np.exp(-g)) * u
    if int8:
        h = _fake_quant_rows(h)
    return h @ wd.T


def _expert_tensors(state_dict, layer: int, expert):
    pre = f"model.layers.{layer}.mlp." + ("shared_experts." if expert == "shared" else f"experts.{expert}.")
    return tuple(np.asarray(state_dict[pre + f"{n}.weight"]) for n in ("gate_proj", "up_proj", "down_proj"))


def moe_reference(x_list, state_dict, layer: int, config: MoEConfig, routing=None, int8: bool = True):
    """The MoE sublayer per die in float64: a list of [T_d, H] float64 arrays.

    routing: optional list of (ids, weights) per die (default: routing_reference of each die's x)."""
    out = []
    for d, x in enumerate(x_list):
        x = np.asarray(x)
        if routing is None:
            ids, w = routing_reference(x, state_dict[f"model.layers.{layer}.mlp.gate.weight"],
                                       state_dict[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"], config)
        else:
            ids, w = routing[d]
        y = np.zeros((x.shape[0], x.shape[1]), np.float64)
        for e in np.unique(ids):
            rows, slot = np.nonzero(ids == e)
            y[rows] += np.asarray(w, np.float64)[rows, slot][:, None] * \
                expert_mlp_f64(x[rows], *_expert_tensors(state_dict, layer, int(e)), int8=int8)
        if config.n_shared_experts and x.shape[0]:
            y += expert_mlp_f64(x, *_expert_tensors(state_dict, layer, "shared"), int8=int8)
        out.append(y)
    return out
