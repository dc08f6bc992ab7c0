"""MoEConfig: the MoE hyper-parameters of a DeepSeek-V3/R1 layer (deepseek-v3.md §1, §6, §7).

`MoEConfig.from_hf(config_dict)` reads a Hugging Face ``config.json``. The MoE keys are spelled the same in both
forms the project accepts (DeepSeek-V3's published file with ``rope_scaling``, and the newer transformers file with
``rope_parameters``; see ops/mla/config.py): ``hidden_size``, ``n_routed_experts``, ``num_experts_per_tok``,
``n_group``, ``topk_group``, ``routed_scaling_factor``, ``norm_topk_prob``, ``n_shared_experts``,
``moe_intermediate_size``, ``scoring_func`` and ``topk_method``. Keys of other parts of the model are ignored.

Only DeepSeek-V3's router is implemented: ``scoring_func = "sigmoid"`` and ``topk_method = "noaux_tc"`` (bias-corrected
group-limited selection). Others (DeepSeek-V2's softmax / ``group_limited_greedy``) raise NotImplementedError;
a missing or malformed key raises ValueError naming it. Absent ``scoring_func`` / ``topk_method`` (transformers'
DeepseekV3Config has neither: its router is always sigmoid + noaux_tc) mean sigmoid / noaux_tc; an absent
``norm_topk_prob`` takes DeepseekV3Config's default, true.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MoEConfig"]

_INT_KEYS = ("hidden_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
             "moe_intermediate_size")


def _bad_int(value, nonneg=False) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if nonneg else 1)


@dataclass(frozen=True)
class MoEConfig:
    """Hyper-parameters of one DeepSeek MoE layer; field names are HF's config keys.

    Validated on construction (ValueError naming the field): every size a positive integer (n_shared_experts ≥ 0),
    n_routed_experts divisible by n_group, topk_group ≤ n_group, and num_experts_per_tok ≤ topk_group ·
    n_routed_experts / n_group (the kept groups must hold k experts, so every selected expert has a finite
    selection score).
    """

    hidden_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    moe_intermediate_size: int
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True

    def __post_init__(self):
        for name in _INT_KEYS:
            if _bad_int(getattr(self, name)):
                raise ValueError(f"MoEConfig: {name} must be a positive integer, got {getattr(self, name)!r}")
        if _bad_int(self.n_shared_experts, nonneg=True):
            raise ValueError(f"MoEConfig: n_shared_experts must be a non-negative integer, got "
                             f"{self.n_shared_experts!r}")
        f = self.routed_scaling_factor
        if isinstance(f, bool) or not isinstance(f, (int, float, np.integer, np.floating)) or not math.isfinite(f) \
                or f <= 0:
            raise ValueError(f"MoEConfig: routed_scaling_factor must be a positive finite number, got {f!r}")
        if not isinstance(self.norm_topk_prob, (bool, np.bool_)):
            raise ValueError(f"MoEConfig: norm_topk_prob must be a bool, got {self.norm_topk_prob!r}")
        for name in _INT_KEYS + ("n_shared_experts",):  # plain Python values: equal configs compare and hash equal
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "routed_scaling_factor", float(f))
        object.__setattr__(self, "norm_topk_prob", bool(self.norm_topk_prob))
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"MoEConfig: n_routed_experts={self.n_routed_experts} is not divisible by "
                             f"n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig: topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * self.group_size:
            raise ValueError(f"MoEConfig: num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                             f"{self.topk_group * self.group_size} experts of the topk_group={self.topk_group} kept "
                             f"groups of {self.group_size}")

    @property
    def group_size(self) -> int:
        """Experts per group: n_routed_experts / n_group (32 for R1)."""
        return self.n_routed_experts // self.n_group

    @property
    def shared_intermediate_size(self) -> int:
        """The shared expert's intermediate size: n_shared_experts · moe_intermediate_size (2048 for R1)."""
        return self.n_shared_experts * self.moe_intermediate_size

    @classmethod
    def deepseek_v3(cls) -> MoEConfig:
        """DeepSeek-V3 / R1 (§1): 256 routed experts, top-8 of 4 of 8 groups, ×2.5, 1 shared, intermediate 2048."""
        return cls(hidden_size=7168, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                   moe_intermediate_size=2048, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)

    @classmethod
    def from_hf(cls, config: dict) -> MoEConfig:
        """Build from a Hugging Face DeepSeek-V3 config dict (either form; module docstring)."""
        if not isinstance(config, dict):
            raise ValueError(f"MoEConfig.from_hf: expected a dict, got {type(config).__name__}")
        scoring = config.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise NotImplementedError(f"config: scoring_func={scoring!r} is not supported; only DeepSeek-V3's "
                                      f"'sigmoid' router is implemented")
        method = config.get("topk_method", "noaux_tc")
        if method != "noaux_tc":
            raise NotImplementedError(f"config: topk_method={method!r} is not supported; only 'noaux_tc' "
                                      f"(bias-corrected group-limited top-k, deepseek-v3.md §6) is implemented")
        kw = {}
        for key in _INT_KEYS + ("n_shared_experts", "routed_scaling_factor"):
            if key not in config:
                raise ValueError(f"config: missing key {key!r}")
            kw[key] = config[key]
        if kw["n_shared_experts"] is None:  # HF allows null: no shared expert
            kw["n_shared_experts"] = 0
        kw["norm_topk_prob"] = config.get("norm_topk_prob", True)
        return cls(**kw)  # __post_init__ checks every value and names the one that is wrong
