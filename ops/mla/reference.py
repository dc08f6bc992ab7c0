"""NumPy references of MLA, written straight from deepseek-v3.md §4 (math) and §5 (RoPE); goldens of the kernels.

Numerics: float64 throughout, except RMSNorm, which normalises in fp32 as HF's ``DeepseekV3RMSNorm`` does (§9).
``act_dtype`` (default None = float64) optionally rounds to an activation dtype (e.g. ``ml_dtypes.bfloat16``) at the
tensor boundaries where HF casts to it: every projection output, every RMSNorm output (after the fp32 normalise and
again after the weight), q_pe / k_pe after RoPE, W_UK / W_UV products, and the attention output per head. Inside
an op (matmul accumulation, RoPE, scores, softmax, P·V) it stays float64.

Shapes (T tokens, h heads, C = kv_lora_rank, R = qk_rope_head_dim, D = qk_nope_head_dim, V = v_head_dim):
q_nope [T, h, D], q_pe [T, h, R], c_kv [T, C], k_pe [T, R] — rotary vectors in the interleaved order (rope.KPE_ORDER).

Causality with a context: queries are the *last* s tokens of a context of L cached tokens, so query j (position
L − s + j) sees tokens t ≤ L − s + j. For decode, L includes the new token(s).
"""
from __future__ import annotations

import numpy as np

from .config import MLAConfig
from .rope import apply_rope_interleaved, check_positions, rope_cos_sin
from .weights import MLAWeights

__all__ = ["rms_norm", "mla_prolog_reference", "mla_attention_naive_reference", "mla_attention_absorbed_reference",
           "mla_absorbed_decode_reference", "mla_forward_reference"]


def _rnd(x: np.ndarray, act_dtype) -> np.ndarray:
    return x if act_dtype is None else x.astype(act_dtype).astype(np.float64)


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _shape(fn, name, x, shape):
    """Check x.shape against ``shape`` (None = any size)."""
    if x.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, x.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {list(x.shape)}")


def rms_norm(x, weight, eps: float, act_dtype=None) -> np.ndarray:
    """HF DeepseekV3RMSNorm (§2, §9): x / sqrt(mean(x²) + eps) in fp32, cast to the activation dtype, × weight."""
    x32 = np.asarray(x).astype(np.float32)
    var = np.mean(x32 * x32, axis=-1, keepdims=True, dtype=np.float32)
    y = (x32 * (np.float32(1.0) / np.sqrt(var + np.float32(eps)))).astype(np.float64)
    return _rnd(_rnd(y, act_dtype) * _f64(weight), act_dtype)


def mla_prolog_reference(hidden, weights: MLAWeights, positions, *, act_dtype=None):
    """MLAProlog (§4): hidden [T, hidden_size] (after input_layernorm), positions [T] → (q_nope, q_pe, c_kv, k_pe).

    q_nope [T, h, D], q_pe [T, h, R], c_kv [T, C], k_pe [T, R]; q_pe and k_pe are rotated, interleaved order.
    """
    fn = "mla_prolog_reference"
    c = weights.config
    x = _rnd(_f64(hidden), act_dtype)
    _shape(fn, "hidden", x, (None, c.hidden_size))
    t = x.shape[0]
    pos = check_positions(c, positions, fn)
    _shape(fn, "positions", pos, (t,))
    if c.q_lora_rank is None:
        q = _rnd(x @ _f64(weights.q_proj).T, act_dtype)
    else:
        c_q = rms_norm(_rnd(x @ _f64(weights.q_a_proj).T, act_dtype), weights.q_a_layernorm, c.rms_norm_eps,
                       act_dtype)
        q = _rnd(c_q @ _f64(weights.q_b_proj).T, act_dtype)
    q = q.reshape(t, c.num_heads, c.qk_head_dim)
    a = _rnd(x @ _f64(weights.kv_a_proj_with_mqa).T, act_dtype)
    c_kv = rms_norm(a[:, : c.kv_lora_rank], weights.kv_a_layernorm, c.rms_norm_eps, act_dtype)
    cos, sin = rope_cos_sin(c, pos)
    q_pe = _rnd(apply_rope_interleaved(q[..., c.qk_nope_head_dim:], cos[:, None], sin[:, None]), act_dtype)
    k_pe = _rnd(apply_rope_interleaved(a[:, c.kv_lora_rank:], cos, sin), act_dtype)
    return q[..., : c.qk_nope_head_dim].copy(), q_pe, c_kv, k_pe


def _softmax_causal(scores: np.ndarray, causal: bool, return_lse: bool = False):
    """Softmax over the last axis of scores [..., s, h, L]; causal masks t > L − s + j for query j."""
    s, length = scores.shape[-3], scores.shape[-1]
    if causal:
        if length < s:
            raise ValueError(f"causal attention needs at least as many keys as queries, got {length} < {s}")
        visible = np.arange(length)[None, :] <= (length - s + np.arange(s))[:, None]  # [s, L]
        scores = np.where(visible[:, None, :], scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)
    e = np.exp(scores - m)
    z = e.sum(axis=-1, keepdims=True)
    p = e / z
    return (p, (m + np.log(z))[..., 0]) if return_lse else p


def _check_attention_inputs(fn, c: MLAConfig, q_nope, q_pe, c_kv, k_pe):
    q_nope, q_pe, c_kv, k_pe = (_f64(a) for a in (q_nope, q_pe, c_kv, k_pe))
    _shape(fn, "q_nope", q_nope, (None, c.num_heads, c.qk_nope_head_dim))
    _shape(fn, "q_pe", q_pe, (q_nope.shape[0], c.num_heads, c.qk_rope_head_dim))
    _shape(fn, "c_kv", c_kv, (None, c.kv_lora_rank))
    _shape(fn, "k_pe", k_pe, (c_kv.shape[0], c.qk_rope_head_dim))
    return q_nope, q_pe, c_kv, k_pe


def mla_attention_naive_reference(q_nope, q_pe, c_kv, k_pe, weights: MLAWeights, *, scale: float | None = None,
                                  causal: bool = True, act_dtype=None) -> np.ndarray:
    """The naive (prefill) form of §4 for one sequence → o [s, h, V], before o_proj.

    Queries [s, …] are the last s tokens of the context c_kv [L, C], k_pe [L, R]. k[h] = [c_kv · W_UKᵀ ; k_pe],
    v[h] = c_kv · W_UVᵀ (both from kv_b_proj), S = scale · q·k, P = softmax (causal), o = P · v.
    ``scale`` defaults to ``config.softmax_scale``.
    """
    c = weights.config
    q_nope, q_pe, c_kv, k_pe = _check_attention_inputs("mla_attention_naive_reference", c, q_nope, q_pe, c_kv, k_pe)
    scale = c.softmax_scale if scale is None else scale
    kv = _rnd(c_kv @ _f64(weights.kv_b_proj).T, act_dtype).reshape(-1, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
    k_nope, v = kv[..., : c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
    scores = scale * (np.einsum("shd,thd->sht", q_nope, k_nope) + np.einsum("shr,tr->sht", q_pe, k_pe))
    p = _softmax_causal(scores, causal)
    return _rnd(np.einsum("sht,thd->shd", p, v), act_dtype)


def mla_absorbed_decode_reference(q_lat, q_pe, c_kv, k_pe, scale: float, *, causal: bool = True,
                                  return_lse: bool = False):
    """The absorbed attention core (§4), golden of the FlashMLA-style kernel → o_lat [..., s, h, C].

    q_lat [..., s, h, C], q_pe [..., s, h, R], c_kv [..., L, C], k_pe [..., L, R] (leading batch dims broadcast):
    S = scale · (q_lat·c_kv + q_pe·k_pe), P = softmax_t(S) (causal: query j sees t ≤ L − s + j),
    o_lat = P · c_kv.
    An MQA with key dim C + R and value dim C, shared by all heads. ``return_lse`` also returns the natural-log
    log-sum-exp of S over t, [..., s, h] (the merge key of split-KV partial results).
    """
    fn = "mla_absorbed_decode_reference"
    q_lat, q_pe, c_kv, k_pe = (_f64(a) for a in (q_lat, q_pe, c_kv, k_pe))
    if q_lat.ndim < 3 or c_kv.ndim < 2:
        raise ValueError(f"{fn}: q_lat must be [..., s, h, C] and c_kv [..., L, C], got {list(q_lat.shape)} and "
                         f"{list(c_kv.shape)}")
    big_c, r = q_lat.shape[-1], q_pe.shape[-1]
    _shape(fn, "q_pe", q_pe, q_lat.shape[:-1] + (r,))
    if c_kv.shape[-1] != big_c:
        raise ValueError(f"{fn}: c_kv's last dim {c_kv.shape[-1]} must equal q_lat's {big_c}")
    _shape(fn, "k_pe", k_pe, c_kv.shape[:-1] + (r,))
    scores = scale * (np.einsum("...shc,...tc->...sht", q_lat, c_kv) + np.einsum("...shr,...tr->...sht", q_pe, k_pe))
    p, lse = _softmax_causal(scores, causal, return_lse=True)
    o_lat = np.einsum("...sht,...tc->...shc", p, c_kv)
    return (o_lat, lse) if return_lse else o_lat


def mla_attention_absorbed_reference(q_nope, q_pe, c_kv, k_pe, weights: MLAWeights, *, scale: float | None = None,
                                     causal: bool = True, act_dtype=None) -> np.ndarray:
    """The weight-absorbed (decode) form of §4 for one sequence → o [s, h, V], equal to the naive form.

    q_lat[h] = q_nope[h] · W_UK[h]; o_lat = ``mla_absorbed_decode_reference``; o[h] = W_UV[h] · o_lat[h].
    """
    c = weights.config
    q_nope, q_pe, c_kv, k_pe = _check_attention_inputs("mla_attention_absorbed_reference", c, q_nope, q_pe, c_kv,
                                                       k_pe)
    scale = c.softmax_scale if scale is None else scale
    q_lat = _rnd(np.einsum("shd,hdc->shc", q_nope, _f64(weights.w_uk)), act_dtype)
    o_lat = _rnd(mla_absorbed_decode_reference(q_lat, q_pe, c_kv, k_pe, scale, causal=causal), act_dtype)
    return _rnd(np.einsum("shc,hdc->shd", o_lat, _f64(weights.w_uv)), act_dtype)


_FORMS = {"naive": mla_attention_naive_reference, "absorbed": mla_attention_absorbed_reference}


def mla_forward_reference(hidden, weights: MLAWeights, config: MLAConfig | None = None, seq_lens=None, past=None, *,
                          form: str = "naive", input_norm: bool = False, return_cache: bool = False, act_dtype=None):
    """The attention sublayer (HF ``DeepseekV3Attention``) on packed sequences → out [T, hidden_size], after o_proj.

    * ``hidden`` [T, hidden_size] holds the sequences back to back (``seq_lens``, default one sequence of T). It is
      the *normalised* hidden state, as HF's attention module receives it; ``input_norm=True`` applies
      ``weights.input_layernorm`` first.
    * ``past`` (optional): one entry per sequence, None or ``(c_kv [L, C], k_pe [L, R])``, that sequence's latent
      cache; its new tokens take positions L, L+1, … and attend to the cache (chunked prefill; decode when its
      seq_len is 1, or 2 with MTP). None everywhere = fresh sequences from position 0.
    * ``form``: "naive" (§4 prefill form, the default) or "absorbed" (§4 decode form); they agree.
    * ``return_cache=True`` returns ``(out, cache)``, cache[i] = (c_kv, k_pe) of sequence i, past + new tokens.
    * ``config`` may be None; if given it must equal ``weights.config``.
    """
    fn = "mla_forward_reference"
    c = weights.config
    if config is not None and config != c:
        raise ValueError(f"{fn}: config differs from weights.config")
    if form not in _FORMS:
        raise ValueError(f"{fn}: form must be one of {tuple(_FORMS)}, got {form!r}")
    x = _f64(hidden)
    _shape(fn, "hidden", x, (None, c.hidden_size))
    if seq_lens is None:
        seq_lens = [x.shape[0]]
    seq_lens = [int(n) for n in seq_lens]
    if any(n < 0 for n in seq_lens) or sum(seq_lens) != x.shape[0]:
        raise ValueError(f"{fn}: seq_lens {seq_lens} must be non-negative and sum to T={x.shape[0]}")
    if past is None:
        past = [None] * len(seq_lens)
    if len(past) != len(seq_lens):
        raise ValueError(f"{fn}: past has {len(past)} entries for {len(seq_lens)} sequences")
    past = [_check_past(fn, i, c, p) for i, p in enumerate(past)]
    if input_norm:
        if weights.input_layernorm is None:
            raise ValueError(f"{fn}: input_norm=True but the weights have no input_layernorm")
        x = rms_norm(_rnd(x, act_dtype), weights.input_layernorm, c.rms_norm_eps, act_dtype)
    positions = np.concatenate([np.arange(p[0].shape[0], p[0].shape[0] + n, dtype=np.int64)
                                for p, n in zip(past, seq_lens)] or [np.zeros(0, np.int64)])
    q_nope, q_pe, c_kv, k_pe = mla_prolog_reference(x, weights, positions, act_dtype=act_dtype)
    o = np.zeros((x.shape[0], c.num_heads, c.v_head_dim))
    cache = []
    start = 0
    for (pc, pk), n in zip(past, seq_lens):
        sl = slice(start, start + n)
        ctx_c, ctx_k = np.concatenate([pc, c_kv[sl]]), np.concatenate([pk, k_pe[sl]])
        if n:
            o[sl] = _FORMS[form](q_nope[sl], q_pe[sl], ctx_c, ctx_k, weights, act_dtype=act_dtype)
        cache.append((ctx_c, ctx_k))
        start += n
    out = _rnd(o.reshape(x.shape[0], c.num_heads * c.v_head_dim) @ _f64(weights.o_proj).T, act_dtype)
    return (out, cache) if return_cache else out


def _check_past(fn, i, c: MLAConfig, p):
    if p is None:
        return np.zeros((0, c.kv_lora_rank)), np.zeros((0, c.qk_rope_head_dim))
    if not isinstance(p, (tuple, list)) or len(p) != 2:
        raise ValueError(f"{fn}: past[{i}] must be None or a (c_kv, k_pe) pair")
    pc, pk = _f64(p[0]), _f64(p[1])
    _shape(fn, f"past[{i}] c_kv", pc, (None, c.kv_lora_rank))
    _shape(fn, f"past[{i}] k_pe", pk, (pc.shape[0], c.qk_rope_head_dim))
    return pc, pk
