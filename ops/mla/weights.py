"""MLAWeights: one layer's attention weights, by their Hugging Face names, prepared once (deepseek-v3.md §3, §4).

Every linear weight keeps HF's ``[out_features, in_features]`` orientation (``y = x · Wᵀ``) and is stored bf16.
Prepared once, read-only:

* **ND** copies of every tensor (``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``,
  the norms, or ``q_proj`` when ``q_lora_rank`` is None);
* **W_UK / W_UV** split out of kv_b_proj (§4): ``w_uk[h] = kv_b_proj.view(h, nope + v, C)[h, :nope]``
  ([h, qk_nope_head_dim, kv_lora_rank]) and ``w_uv[h] = …[h, nope:]`` ([h, v_head_dim, kv_lora_rank]). The absorbed
  decode computes ``q_lat[h] = q_nope[h] · w_uk[h]`` and ``o[h] = w_uv[h] · o_lat[h]``.
* **NZ** copies for the cube (``*_nz``, ``ascendemu.layouts.nd_to_nz``). Rule: the NZ copy is Nz of the GEMM's
  **[N, K] = [out, in]** matrix, which is byte-identical to Zn of B = Wᵀ (ascend-910c.md §16), so it reaches L0B
  with a plain Load2D, also for int8. Per head for the absorbed weights: ``w_uk_nz = Nz(w_uk[h]ᵀ)`` (B of
  q_nope · W_UK is w_uk[h], [nope, C]; its [N, K] is [C, nope]) and ``w_uv_nz = Nz(w_uv[h])`` ([v, C]).

Weights may come in any float dtype (float16/32/64, bfloat16) and are rounded to bf16 (RNE, ml_dtypes). FP8
checkpoint tensors (``float8_e4m3fn`` with ``…weight_scale_inv``, 128 × 128 blocks, §3 notes) are dequantised first.

**INT8** (``int8=True``, cloudmatrix-design.md §6): the four dense projections (q_a_proj, q_b_proj or q_proj,
kv_a_proj_with_mqa, o_proj) are also quantised per output channel from their bf16 values and packed for the INT8
GEMM (``ascendemu.ops.int8_gemm.quantize_weight_per_channel`` / ``pack_weight``), in ``weights.int8[name]``.
W_UK / W_UV stay bf16, as in CANN's MLAProlog (small per-head batched GEMMs).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import ml_dtypes
import numpy as np

from ascendemu.layouts import nd_to_nz

from .config import MLAConfig

__all__ = ["MLAWeights", "Int8Weight", "random_state_dict", "hf_names", "expected_shapes", "NZ_OF",
           "INT8_PROJECTIONS"]

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_BLOCK = 128  # DeepSeek-V3 FP8 checkpoint: one weight_scale_inv per 128 x 128 block (§3)
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), BF16)

#: NZ field -> the ND field it packs (for the per-head absorbed weights: see the module docstring).
NZ_OF = {
    "q_a_proj_nz": "q_a_proj",
    "q_b_proj_nz": "q_b_proj",
    "q_proj_nz": "q_proj",
    "kv_a_proj_with_mqa_nz": "kv_a_proj_with_mqa",
    "kv_b_proj_nz": "kv_b_proj",
    "o_proj_nz": "o_proj",
    "w_uk_nz": "w_uk",
    "w_uv_nz": "w_uv",
}


#: The projections quantised by ``int8=True`` (those present for the config).
INT8_PROJECTIONS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "o_proj")


@dataclass(frozen=True, eq=False)
class Int8Weight:
    """A projection W [N, K] quantised per output channel: W ≈ q · scale[:, None]."""

    q: np.ndarray          # int8 [N, K]
    scale: np.ndarray      # float32 [N]
    packed: object         # ascendemu.ops.int8_gemm.PackedWeight: Nz of q, C0 = 32 (what int8_gemm reads)


def expected_shapes(c: MLAConfig) -> dict[str, tuple[int, ...]]:
    """Attribute name -> expected shape (§3, generalised to the config)."""
    h, qk = c.num_heads, c.qk_head_dim
    shapes = {
        "kv_a_proj_with_mqa": (c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size),
        "kv_a_layernorm": (c.kv_lora_rank,),
        "kv_b_proj": (h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        "o_proj": (c.hidden_size, h * c.v_head_dim),
    }
    if c.q_lora_rank is None:
        shapes["q_proj"] = (h * qk, c.hidden_size)
    else:
        shapes.update(q_a_proj=(c.q_lora_rank, c.hidden_size), q_a_layernorm=(c.q_lora_rank,),
                      q_b_proj=(h * qk, c.q_lora_rank))
    return shapes


def hf_names(layer: int, config: MLAConfig) -> dict[str, str]:
    """Attribute name -> HF state-dict key for the tensors this config needs (input_layernorm is optional)."""
    pre = f"model.layers.{layer}."
    names = {k: f"{pre}self_attn.{k}.weight" for k in expected_shapes(config)}
    names["input_layernorm"] = f"{pre}input_layernorm.weight"
    return names


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def _load(state_dict, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor as bf16: dtype and shape checked, FP8 blocks dequantised."""
    a = np.asarray(state_dict[key])
    scale_key = key + "_scale_inv"
    if a.dtype == FP8:
        if len(shape) != 2:
            raise ValueError(f"{key}: float8_e4m3fn is only supported for linear weights")
        if scale_key not in state_dict:
            raise KeyError(f"{key} is float8_e4m3fn but {scale_key!r} is missing")
        if a.shape != shape:
            raise ValueError(f"{key}: expected shape {shape}, got {a.shape}")
        s = np.asarray(state_dict[scale_key], dtype=np.float32)
        s_shape = tuple(-(-n // FP8_BLOCK) for n in shape)
        if s.shape != s_shape:
            raise ValueError(f"{scale_key}: expected shape {s_shape}, got {s.shape}")
        full = np.repeat(np.repeat(s, FP8_BLOCK, axis=0), FP8_BLOCK, axis=1)[: shape[0], : shape[1]]
        return _frozen((a.astype(np.float32) * full).astype(BF16))
    if scale_key in state_dict:
        raise ValueError(f"{key}: has {scale_key!r} but dtype {a.dtype} (expected float8_e4m3fn)")
    if a.dtype not in _FLOATS:
        raise ValueError(f"{key}: dtype {a.dtype} is not a float dtype (float16/32/64, bfloat16, or "
                         f"float8_e4m3fn with weight_scale_inv)")
    if a.shape != shape:
        raise ValueError(f"{key}: expected shape {shape}, got {a.shape}")
    return _frozen(a.astype(BF16))


@dataclass(frozen=True, eq=False)
class MLAWeights:
    """One layer's MLA weights, bf16, read-only. Build with ``MLAWeights.from_hf``; see the module docstring.

    ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` (and their NZ copies) are None when ``config.q_lora_rank`` is
    None, ``q_proj`` is None otherwise. ``input_layernorm`` is None when the state dict lacks it.
    """

    config: MLAConfig
    layer: int
    q_a_proj: np.ndarray | None            # [q_lora_rank, hidden]              W_DQ
    q_a_layernorm: np.ndarray | None       # [q_lora_rank]
    q_b_proj: np.ndarray | None            # [h·qk_head_dim, q_lora_rank]       W_UQ / W_QR, row h·qk + j
    q_proj: np.ndarray | None              # [h·qk_head_dim, hidden]            (q_lora_rank None only)
    kv_a_proj_with_mqa: np.ndarray         # [kv_lora_rank + rope, hidden]      W_DKV rows, then W_KR rows
    kv_a_layernorm: np.ndarray             # [kv_lora_rank]
    kv_b_proj: np.ndarray                  # [h·(nope + v), kv_lora_rank]       per head: W_UK rows, then W_UV rows
    o_proj: np.ndarray                     # [hidden, h·v_head_dim]             W_O
    input_layernorm: np.ndarray | None     # [hidden]
    w_uk: np.ndarray                       # [h, qk_nope_head_dim, kv_lora_rank]
    w_uv: np.ndarray                       # [h, v_head_dim, kv_lora_rank]
    q_a_proj_nz: np.ndarray | None
    q_b_proj_nz: np.ndarray | None
    q_proj_nz: np.ndarray | None
    kv_a_proj_with_mqa_nz: np.ndarray
    kv_b_proj_nz: np.ndarray
    o_proj_nz: np.ndarray
    w_uk_nz: np.ndarray                    # Nz of w_uk[h]ᵀ ([kv_lora_rank, nope]) per head
    w_uv_nz: np.ndarray                    # Nz of w_uv[h]
    int8: Mapping[str, Int8Weight] | None = None  # int8=True only: name in INT8_PROJECTIONS -> Int8Weight
    # the fused down-projection [W_DQ; W_DKV; W_KR] = [q_a_proj; kv_a_proj_with_mqa] ([q_lora + C + R, hidden]), one
    # GEMM for MLAProlog (cloudmatrix-design.md §5); None when q_lora_rank is None. Its INT8 variant (int8=True) is
    # the two projections' INT8 rows stacked (per-channel scales are per row, so this equals quantising the stack).
    q_kv_a_proj: np.ndarray | None = None
    q_kv_a_proj_nz: np.ndarray | None = None
    q_kv_a_proj_int8: Int8Weight | None = None

    @classmethod
    def from_hf(cls, state_dict, layer: int, config: MLAConfig, *, int8: bool = False) -> MLAWeights:
        """Take layer ``layer``'s tensors by HF name (``model.layers.{layer}.self_attn.q_a_proj.weight``, …).

        Missing key → KeyError naming it; wrong shape → ValueError naming the tensor, expected and actual shape;
        a non-float dtype → ValueError. Keys of other layers and modules are ignored. ``int8=True`` also fills
        ``weights.int8`` (see the module docstring).
        """
        if not isinstance(config, MLAConfig):
            raise TypeError(f"MLAWeights.from_hf: config must be an MLAConfig, got {type(config).__name__}")
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"MLAWeights.from_hf: layer must be a non-negative integer, got {layer!r}")
        names = hf_names(layer, config)
        shapes = expected_shapes(config)
        pre = f"model.layers.{layer}.self_attn."
        other_q = ("q_a_proj", "q_b_proj") if config.q_lora_rank is None else ("q_proj",)
        for k in other_q:
            if f"{pre}{k}.weight" in state_dict:
                raise ValueError(f"{pre}{k}.weight is present but config.q_lora_rank={config.q_lora_rank}: "
                                 f"expected {'q_proj' if config.q_lora_rank is None else 'q_a_proj/q_b_proj'}")
        for attr, key in names.items():
            if attr != "input_layernorm" and key not in state_dict:
                raise KeyError(f"missing tensor {key!r}")
        t = {attr: _load(state_dict, names[attr], shape) for attr, shape in shapes.items()}
        ln_key = names["input_layernorm"]
        t["input_layernorm"] = _load(state_dict, ln_key, (config.hidden_size,)) if ln_key in state_dict else None
        for k in ("q_a_proj", "q_a_layernorm", "q_b_proj", "q_proj"):
            t.setdefault(k, None)

        h, nope, v = config.num_heads, config.qk_nope_head_dim, config.v_head_dim
        kvb = t["kv_b_proj"].reshape(h, nope + v, config.kv_lora_rank)
        t["w_uk"], t["w_uv"] = _frozen(kvb[:, :nope]), _frozen(kvb[:, nope:])
        for nz, nd in NZ_OF.items():
            src = t[nd]
            if nz == "w_uk_nz":
                src = src.transpose(0, 2, 1)
            t[nz] = None if src is None else _frozen(nd_to_nz(np.ascontiguousarray(src)))
        if int8:
            t["int8"] = _quantize(t)
        if config.q_lora_rank is not None:
            t["q_kv_a_proj"] = _frozen(np.concatenate([t["q_a_proj"], t["kv_a_proj_with_mqa"]]))
            t["q_kv_a_proj_nz"] = _frozen(nd_to_nz(t["q_kv_a_proj"]))
            if int8:
                from ascendemu.ops.int8_gemm import pack_weight
                qa, kva = t["int8"]["q_a_proj"], t["int8"]["kv_a_proj_with_mqa"]
                q = _frozen(np.concatenate([qa.q, kva.q]))
                t["q_kv_a_proj_int8"] = Int8Weight(q, _frozen(np.concatenate([qa.scale, kva.scale])), pack_weight(q))
        return cls(config=config, layer=int(layer), **t)


def _quantize(t: dict) -> Mapping[str, Int8Weight]:
    from ascendemu.ops.int8_gemm import pack_weight, quantize_weight_per_channel  # ops → ops, imported when used
    out = {}
    for name in INT8_PROJECTIONS:
        if t[name] is not None:
            q, scale = quantize_weight_per_channel(t[name])
            out[name] = Int8Weight(_frozen(q), _frozen(scale), pack_weight(q))
    return MappingProxyType(out)


def random_state_dict(config: MLAConfig, layer: int = 0, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """A random HF-named state dict for one layer (with input_layernorm), for tests.

    Linear weights are N(0, 1/in_features), so every projection keeps O(1) activations O(1); norm weights are
    1 + N(0, 0.1²).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for attr, key in hf_names(layer, config).items():
        shape = (config.hidden_size,) if attr == "input_layernorm" else expected_shapes(config)[attr]
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[key] = w.astype(dtype)
    return out
