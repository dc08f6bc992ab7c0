"""MLAConfig: the attention hyper-parameters of a DeepSeek-V3/R1 layer (deepseek-v3.md §1, §4, §5).

`MLAConfig.from_hf(config_dict)` reads a Hugging Face ``config.json`` in either spelling:

* DeepSeek-V3's published form: top-level ``rope_theta`` and ``rope_scaling = {"type": "yarn", "factor": 40,
  "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}``
  (``"rope_type"`` is accepted in place of ``"type"``);
* the newer transformers form: ``rope_parameters = {"rope_type": "yarn", "rope_theta": 10000, "factor": 40, ...}``.

Both give equal configs. A missing or malformed key raises ValueError naming it.

YaRN follows transformers' ``_compute_yarn_parameters`` (HF), which agrees with DeepSeek's
``precompute_freqs_cis`` (DS) for every published config, with two stated choices:

* frequencies are computed in float64 (HF and DS use float32);
* the interpolation factor is ``rope_scaling.factor`` (DS, and §5). HF instead uses
  ``max_position_embeddings / original_max_position_embeddings`` when the latter key is present; the two are equal
  (163840 / 4096 = 40) for DeepSeek-V3/R1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["MLAConfig", "ROPE_TYPES"]

#: Supported ``rope_type`` values: ``"default"`` (plain RoPE, no scaling) and ``"yarn"``.
ROPE_TYPES = ("default", "yarn")

_INT_FIELDS = ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
               "max_position_embeddings", "rope_original_max_position_embeddings")
_POS_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "rope_factor", "rope_beta_fast", "rope_beta_slow")
_NONNEG_FLOAT_FIELDS = ("rope_mscale", "rope_mscale_all_dim")


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """HF ``yarn_get_mscale``: 0.1 · mscale · ln(scale) + 1 for scale > 1, else 1."""
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class MLAConfig:
    """Hyper-parameters of one MLA layer. Field names follow HF's config keys, except:

    * ``num_heads`` = ``num_attention_heads``;
    * the RoPE / YaRN parameters carry a ``rope_`` prefix: ``rope_type`` ("default" or "yarn"), ``rope_factor``,
      ``rope_original_max_position_embeddings``, ``rope_beta_fast``, ``rope_beta_slow``, ``rope_mscale``,
      ``rope_mscale_all_dim`` (0 means absent: HF treats None and 0 alike), ``rope_attention_factor`` (HF's optional
      ``attention_factor`` override of the cos/sin magnitude; None = derived), ``rope_truncate`` (HF's ``truncate``).

    ``q_lora_rank=None`` is DeepSeek-V2-Lite's form: queries come from one ``q_proj`` (no q_a/q_b, no q_a_layernorm).
    With ``rope_type="default"`` the YaRN fields must keep their defaults.
    """

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 0.0
    rope_mscale_all_dim: float = 0.0
    rope_attention_factor: float | None = None
    rope_truncate: bool = True

    def __post_init__(self):
        for name in _INT_FIELDS:
            _check_int(name, getattr(self, name))
        if self.q_lora_rank is not None:
            _check_int("q_lora_rank", self.q_lora_rank)
        for name in _POS_FLOAT_FIELDS:
            _check_float(name, getattr(self, name), positive=True)
        for name in _NONNEG_FLOAT_FIELDS:
            _check_float(name, getattr(self, name), positive=False)
        if self.rope_attention_factor is not None:
            _check_float("rope_attention_factor", self.rope_attention_factor, positive=True)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig: qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if not isinstance(self.rope_truncate, bool):
            raise ValueError(f"MLAConfig: rope_truncate must be a bool, got {self.rope_truncate!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"MLAConfig: rope_type={self.rope_type!r} is not supported; supported: {ROPE_TYPES}")
        if self.rope_type == "default":
            defaults = {f.name: f.default for f in fields(self) if f.name.startswith("rope_")
                        and f.name not in ("rope_type", "rope_theta")}
            changed = [k for k, v in defaults.items() if getattr(self, k) != v]
            if changed:
                raise ValueError(f"MLAConfig: {changed} only apply to rope_type='yarn' (rope_type is 'default')")

    # ------------------------------------------------------------------ derived

    @property
    def qk_head_dim(self) -> int:
        """Query/key head dim: qk_nope_head_dim + qk_rope_head_dim (192 for R1)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token: kv_lora_rank + qk_rope_head_dim (576 for R1)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def mscale(self) -> float:
        """The softmax-side YaRN factor 0.1 · mscale_all_dim · ln(factor) + 1 (1 without YaRN or mscale_all_dim)."""
        if self.rope_type != "yarn" or not self.rope_mscale_all_dim:
            return 1.0
        return _yarn_get_mscale(self.rope_factor, self.rope_mscale_all_dim)

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5 · mscale² (§4; HF ``DeepseekV3Attention.scaling``): 0.1352338 for R1."""
        return self.qk_head_dim ** -0.5 * self.mscale ** 2

    @property
    def rope_cos_sin_scale(self) -> float:
        """Magnitude factor on cos/sin (HF's YaRN ``attention_factor``): 1 for R1 (mscale == mscale_all_dim)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return float(self.rope_attention_factor)
        if self.rope_mscale and self.rope_mscale_all_dim:
            return (_yarn_get_mscale(self.rope_factor, self.rope_mscale)
                    / _yarn_get_mscale(self.rope_factor, self.rope_mscale_all_dim))
        return _yarn_get_mscale(self.rope_factor)

    def rope_correction_range(self) -> tuple[float, float]:
        """YaRN's (low, high) dims (§5): floor / ceil of corr(beta_fast), corr(beta_slow), clipped to [0, d-1].

        corr(r) = d · ln(L_orig / (2π r)) / (2 ln θ). R1: (10, 23). Without truncation the values are not rounded.
        """
        d, base, length = self.qk_rope_head_dim, self.rope_theta, self.rope_original_max_position_embeddings

        def corr(r):
            return d * math.log(length / (r * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr(self.rope_beta_fast), corr(self.rope_beta_slow)
        if self.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, d - 1)

    def rope_inv_freq(self) -> np.ndarray:
        """The rotary frequencies f'_i, i < qk_rope_head_dim / 2, float64 (§5; YaRN-corrected when rope_type="yarn").

        f_i = θ^(-2i/d); f'_i = f_i / factor · ramp_i + f_i · (1 - ramp_i),
        ramp_i = clip((i - low) / (high - low), 0, 1).
        """
        d = self.qk_rope_head_dim
        f = 1.0 / self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        if self.rope_type != "yarn":
            return f
        low, high = self.rope_correction_range()
        if low == high:
            high += 0.001  # HF linear_ramp_factor: avoid a division by zero
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        return f / self.rope_factor * ramp + f * (1.0 - ramp)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def deepseek_v3(cls) -> MLAConfig:
        """DeepSeek-V3 / R1 (§1): 7168 hidden, 128 heads, ranks 1536 / 512, head dims 128 + 64 / 128, YaRN ×40."""
        return cls(hidden_size=7168, num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                   max_position_embeddings=163840, rope_type="yarn", rope_factor=40.0,
                   rope_original_max_position_embeddings=4096, rope_beta_fast=32.0, rope_beta_slow=1.0,
                   rope_mscale=1.0, rope_mscale_all_dim=1.0)

    @classmethod
    def from_hf(cls, config: dict) -> MLAConfig:
        """Build from a Hugging Face DeepSeek-V3 config dict (legacy ``rope_scaling`` or newer ``rope_parameters``).

        Required keys: hidden_size, num_attention_heads, q_lora_rank (may be null), kv_lora_rank, qk_nope_head_dim,
        qk_rope_head_dim, v_head_dim, rms_norm_eps, max_position_embeddings, and rope_theta (top level or inside
        rope_parameters). ``rope_interleave`` (HF, default true) must not be false. Keys of other parts of the model
        are ignored.
        """
        if not isinstance(config, dict):
            raise ValueError(f"MLAConfig.from_hf: expected a dict, got {type(config).__name__}")
        kw = {
            "hidden_size": _get(config, "hidden_size"),
            "num_heads": _get(config, "num_attention_heads"),
            "q_lora_rank": _get(config, "q_lora_rank"),
            "kv_lora_rank": _get(config, "kv_lora_rank"),
            "qk_nope_head_dim": _get(config, "qk_nope_head_dim"),
            "qk_rope_head_dim": _get(config, "qk_rope_head_dim"),
            "v_head_dim": _get(config, "v_head_dim"),
            "rms_norm_eps": _get(config, "rms_norm_eps"),
            "max_position_embeddings": _get(config, "max_position_embeddings"),
        }
        for key in ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "max_position_embeddings"):
            _check_int(key, config[key], where="config")
        if config["q_lora_rank"] is not None:
            _check_int("q_lora_rank", config["q_lora_rank"], where="config")
        _check_float("rms_norm_eps", config["rms_norm_eps"], positive=True, where="config")
        if config.get("rope_interleave", True) is not True:
            raise ValueError(f"config: rope_interleave={config['rope_interleave']!r} is not supported: "
                             "DeepSeek-V3 rotates interleaved pairs (x[2i], x[2i+1]) (deepseek-v3.md §5)")
        kw.update(_rope_from_hf(config, kw["max_position_embeddings"]))
        return cls(**kw)


# ---------------------------------------------------------------------- parsing helpers


def _get(d: dict, key: str, where: str = "config"):
    if key not in d:
        raise ValueError(f"{where}: missing key {key!r}")
    return d[key]


def _check_int(name, value, where="MLAConfig"):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")


def _check_float(name, value, *, positive, where="MLAConfig"):
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) \
        and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{where}: {name} must be {kind} finite number, got {value!r}")


_YARN_KEYS = {  # HF key -> (MLAConfig field, default when absent or null)
    "factor": ("rope_factor", None),
    "original_max_position_embeddings": ("rope_original_max_position_embeddings", "max_position_embeddings"),
    "beta_fast": ("rope_beta_fast", 32.0),
    "beta_slow": ("rope_beta_slow", 1.0),
    "mscale": ("rope_mscale", 0.0),
    "mscale_all_dim": ("rope_mscale_all_dim", 0.0),
    "attention_factor": ("rope_attention_factor", None),
    "truncate": ("rope_truncate", True),
}


def _parse_rope_dict(d, where: str, max_pos: int, theta_inside: bool) -> dict:
    """One rope dict (legacy rope_scaling or rope_parameters) -> MLAConfig keyword arguments."""
    if not isinstance(d, dict):
        raise ValueError(f"config: {where} must be a dict or null, got {type(d).__name__}")
    kinds = {k: d[k] for k in ("type", "rope_type") if k in d}
    if not kinds:
        raise ValueError(f"config: missing key {where}['rope_type'] (or {where}['type'])")
    if len(set(kinds.values())) > 1:
        raise ValueError(f"config: {where}['type']={d['type']!r} and {where}['rope_type']={d['rope_type']!r} differ")
    kind = next(iter(kinds.values()))
    key = f"{where}[{next(iter(kinds))!r}]"
    out = {}
    if theta_inside:
        theta = _get(d, "rope_theta", where)
        _check_float(f"{where}['rope_theta']", theta, positive=True, where="config")
        out["rope_theta"] = float(theta)
    if kind == "default":
        return out
    if kind != "yarn":
        raise ValueError(f"config: {key}={kind!r} is not supported; supported: {ROPE_TYPES}")
    out["rope_type"] = "yarn"
    for hf_key, (field, default) in _YARN_KEYS.items():
        name = f"{where}[{hf_key!r}]"
        value = d.get(hf_key)
        if value is None:  # HF: absent or null -> default ("or" semantics for beta_*, mscale*)
            if hf_key == "factor":
                raise ValueError(f"config: missing key {name}")
            value = max_pos if default == "max_position_embeddings" else default
        if hf_key == "original_max_position_embeddings":
            _check_int(name, value, where="config")
        elif hf_key == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"config: {name} must be a bool, got {value!r}")
        elif value is not None:
            _check_float(name, value, positive=hf_key not in ("mscale", "mscale_all_dim"), where="config")
            value = float(value)
        out[field] = value
    return out


def _rope_from_hf(config: dict, max_pos: int) -> dict:
    """RoPE keyword arguments from ``rope_parameters`` (newer HF) or ``rope_theta`` + ``rope_scaling`` (legacy).

    Both forms may be present (transformers writes both while converting); they must then agree.
    """
    legacy = {}
    if config.get("rope_scaling") is not None:
        legacy = _parse_rope_dict(config["rope_scaling"], "rope_scaling", max_pos, theta_inside=False)
    if "rope_theta" in config:
        _check_float("rope_theta", config["rope_theta"], positive=True, where="config")
        legacy["rope_theta"] = float(config["rope_theta"])
    if config.get("rope_parameters") is None:
        if "rope_theta" not in legacy:
            raise ValueError("config: missing key 'rope_theta' (top level, or inside 'rope_parameters')")
        return legacy
    params = config["rope_parameters"]
    inside = isinstance(params, dict) and "rope_theta" in params
    if not inside and "rope_theta" not in legacy:
        raise ValueError("config: missing key rope_parameters['rope_theta']")
    new = _parse_rope_dict(params, "rope_parameters", max_pos, theta_inside=inside)
    if config.get("rope_scaling") is not None:  # both forms spell the rope type: compare it too
        legacy.setdefault("rope_type", "default")
        new.setdefault("rope_type", "default")
    for k in sorted(set(new) & set(legacy)):
        if new[k] != legacy[k]:
            raise ValueError(f"config: rope_parameters and the legacy keys (rope_theta / rope_scaling) disagree "
                             f"on {k}: {new[k]!r} vs {legacy[k]!r}")
    return {**legacy, **new}
