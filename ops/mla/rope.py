"""Rotary position embedding of MLA: YaRN frequencies, DeepSeek's interleaved convention (deepseek-v3.md §5).

**Canonical order (KPE_ORDER = "interleaved").** Everywhere in this project — references, the latent cache, the
kernels' q_pe / k_pe — a rotary vector is kept in DeepSeek's *interleaved* order: element 2i and 2i+1 form pair i
and rotate by θ(p, i) = p · f'_i:

    out[2i]   = x[2i]·cos θ_i − x[2i+1]·sin θ_i
    out[2i+1] = x[2i]·sin θ_i + x[2i+1]·cos θ_i

This is the order in which kv_a_proj_with_mqa and q_b_proj emit the rope part, so caching it needs no permutation,
and it is DS's reference order. Hugging Face (``rope_interleave=True``) and CANN's MLAProlog instead hold q_pe / k_pe
in the *evens-then-odds* order [x0, x2, …, x1, x3, …] and apply rotate-half there; ``deinterleave`` converts to that
order, ``interleave`` back, and ``apply_rope_rotate_half`` is RoPE in that order:
``deinterleave(apply_rope_interleaved(x)) == apply_rope_rotate_half(deinterleave(x))``.
q_pe·k_pe, and so attention, is the same in either order as long as q and k share it; compare cached k_pe with
HF's after ``interleave``.

Angles are float64 (HF and DS compute p · f' in float32; at p ≈ 10^5 their angles differ from exact by ~10^-2 rad).
"""
from __future__ import annotations

import numpy as np

from .config import MLAConfig

__all__ = ["KPE_ORDER", "rope_cos_sin", "apply_rope_interleaved", "apply_rope_rotate_half", "deinterleave",
           "interleave", "check_positions"]

#: The element order of every rotary vector (q_pe, k_pe) held by the project. See the module docstring.
KPE_ORDER = "interleaved"


def check_positions(config: MLAConfig, positions, fn: str = "positions") -> np.ndarray:
    """Positions as an int64 array; ValueError if negative, non-integer or ≥ max_position_embeddings."""
    p = np.asarray(positions)
    if p.dtype.kind not in "iu":
        raise ValueError(f"{fn}: positions must be integers, got dtype {p.dtype}")
    p = p.astype(np.int64)
    if p.size and p.min() < 0:
        raise ValueError(f"{fn}: negative position {int(p.min())}")
    if p.size and p.max() >= config.max_position_embeddings:
        raise ValueError(f"{fn}: position {int(p.max())} is past max_position_embeddings="
                         f"{config.max_position_embeddings}")
    return p


def rope_cos_sin(config: MLAConfig, positions) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of θ(p, i) = p · f'_i, each float64 of shape positions.shape + (qk_rope_head_dim // 2,).

    Multiplied by ``config.rope_cos_sin_scale`` (HF's YaRN attention_factor; 1 for DeepSeek-V3/R1).
    """
    p = check_positions(config, positions, "rope_cos_sin")
    theta = p.astype(np.float64)[..., None] * config.rope_inv_freq()
    scale = config.rope_cos_sin_scale
    return np.cos(theta) * scale, np.sin(theta) * scale


def _check_pair(fn, x, cos, sin):
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[-1] % 2:
        raise ValueError(f"{fn}: the last dim of x must be even, got shape {x.shape}")
    cos, sin = np.asarray(cos, dtype=np.float64), np.asarray(sin, dtype=np.float64)
    if cos.shape != sin.shape or cos.shape[-1:] != (x.shape[-1] // 2,):
        raise ValueError(f"{fn}: cos {cos.shape} and sin {sin.shape} must both end in {x.shape[-1] // 2} "
                         f"(half of x's last dim {x.shape[-1]})")
    return x.astype(np.float64), cos, sin


def apply_rope_interleaved(x, cos, sin) -> np.ndarray:
    """DeepSeek's RoPE on pairs (x[2i], x[2i+1]) (§5); float64 result, x's shape.

    cos / sin ([..., d/2]) broadcast against ``x[..., 0::2]``: for q_pe [T, h, d] pass ``cos[:, None, :]``.
    """
    x, cos, sin = _check_pair("apply_rope_interleaved", x, cos, sin)
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty(np.broadcast_shapes(x.shape, cos.shape[:-1] + x.shape[-1:]), dtype=np.float64)
    out[..., 0::2] = xe * cos - xo * sin
    out[..., 1::2] = xe * sin + xo * cos
    return out


def apply_rope_rotate_half(x, cos, sin) -> np.ndarray:
    """RoPE on a vector in evens-then-odds order (HF rotate-half with cos/sin = cat(θ, θ); CANN MLAProlog)."""
    x, cos, sin = _check_pair("apply_rope_rotate_half", x, cos, sin)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def deinterleave(x) -> np.ndarray:
    """Interleaved → evens-then-odds (HF/CANN order): [x0, x1, x2, x3, …] → [x0, x2, …, x1, x3, …]."""
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[-1] % 2:
        raise ValueError(f"deinterleave: the last dim must be even, got shape {x.shape}")
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def interleave(x) -> np.ndarray:
    """Evens-then-odds → interleaved, the inverse of ``deinterleave``; keeps dtype."""
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[-1] % 2:
        raise ValueError(f"interleave: the last dim must be even, got shape {x.shape}")
    h = x.shape[-1] // 2
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x[..., :h], x[..., h:]
    return out
