"""DeepSeek-V3 routing (ops/moe/gate.py) and MoEConfig (ops/moe/config.py).

Routing (ids and weights) must equal `routing_reference` bit for bit: the reference sums the logits in the
kernel's documented fp32 order and applies the same fp32 operations, so there is no tolerance. The weights are also
compared with the float64 formula (HF's, no fp32 rounding) for the same ids, within rtol 1e-4 (fp32 logits over
H ≤ 128 products and an fp32 sigmoid/normalisation: a few ulps, amplified by at most ~10 through the normalisation).
Ties are made on purpose (duplicated expert rows and groups): the lower index must win.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ascendemu
from ascendemu.ops.moe.config import MoEConfig
from ascendemu.ops.moe.gate import moe_gate
from ascendemu.ops.moe.reference import routing_reference, routing_reference_f64, weights_for_ids_f64

BF16 = np.dtype(ml_dtypes.bfloat16)
DIE = ascendemu.Die("910c")


@st.composite
def gate_case(draw):
    # E = 96 and 192: a last W chunk of 32 experts and score buffers with −inf padding lanes past E
    e, ng = draw(st.sampled_from([(16, 2), (32, 2), (32, 4), (64, 2), (64, 4), (96, 4), (128, 2), (192, 8),
                                  (256, 4)]))
    g = e // ng
    kg = draw(st.integers(1, ng))
    k = draw(st.integers(1, min(4, kg * g)))
    h = draw(st.sampled_from([32, 48, 64, 96, 128, 208]))  # 208: two column chunks, the last one partial
    t = draw(st.integers(0, 40))
    ties = draw(st.sampled_from(["none", "rows", "groups"]))
    cfg = MoEConfig(hidden_size=h, n_routed_experts=e, num_experts_per_tok=k, n_group=ng, topk_group=kg,
                    moe_intermediate_size=32, routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
                    norm_topk_prob=draw(st.booleans()))
    return cfg, t, ties, draw(st.integers(0, 2 ** 31))


def make_inputs(cfg, t, ties, seed):
    rng = np.random.default_rng(seed)
    e, h, g = cfg.n_routed_experts, cfg.hidden_size, cfg.group_size
    x = rng.standard_normal((t, h)).astype(BF16)
    w = (rng.standard_normal((e, h)) * rng.uniform(0.02, 0.5)).astype(BF16)
    b = (rng.standard_normal(e) * 0.01).astype(np.float32)
    if ties == "rows":  # pairs of identical experts: equal scores
        w[1::2] = w[0::2]
        b[1::2] = b[0::2]
    elif ties == "groups":  # every group a copy of group 0: equal group scores
        w[:] = np.tile(w[:g], (cfg.n_group, 1))
        b[:] = np.tile(b[:g], cfg.n_group)
    return x, w, b


@given(gate_case())
def test_routing_equals_reference_exactly(case):
    cfg, t, ties, seed = case
    x, w, b = make_inputs(cfg, t, ties, seed)
    ids, wts = moe_gate(DIE, x, w, b, cfg)
    rid, rw = routing_reference(x, w, b, cfg)
    assert ids.dtype == np.int32 and wts.dtype == np.float32
    assert ids.shape == (t, cfg.num_experts_per_tok) == wts.shape
    np.testing.assert_array_equal(ids, rid)
    np.testing.assert_array_equal(wts.view(np.uint32), rw.view(np.uint32))
    if t:
        # the weights against float64 for the same ids
        np.testing.assert_allclose(wts, weights_for_ids_f64(x, w, ids, cfg), rtol=1e-4, atol=1e-7)
        # ids are distinct per token, descending by s' (ties: lower id first), and within the kept groups
        assert all(len(set(r)) == len(r) for r in ids.tolist())
        assert all(len(set((r // cfg.group_size).tolist())) <= cfg.topk_group for r in ids)


def test_tie_rule_lower_index_wins():
    cfg = MoEConfig(hidden_size=64, n_routed_experts=16, num_experts_per_tok=3, n_group=2, topk_group=2,
                    moe_intermediate_size=32)
    x = np.ones((2, 64), BF16)
    w = np.zeros((16, 64), BF16)
    w[[3, 5, 11, 12]] = BF16.type(0.25)  # four equal top scores
    ids, _ = moe_gate(DIE, x, w, np.zeros(16, np.float32), cfg)
    np.testing.assert_array_equal(ids, [[3, 5, 11]] * 2)
    # equal group scores: group 0 kept before group 1
    cfg1 = MoEConfig(hidden_size=64, n_routed_experts=16, num_experts_per_tok=2, n_group=2, topk_group=1,
                     moe_intermediate_size=32)
    w = np.zeros((16, 64), BF16)
    w[[2, 4, 9, 13]] = BF16.type(0.25)
    ids, _ = moe_gate(DIE, x, w, np.zeros(16, np.float32), cfg1)
    np.testing.assert_array_equal(ids, [[2, 4]] * 2)


def _route_one(logits, bias, cfg):
    """moe_gate of one token whose logits are `logits` exactly: x = e_0, W[:, 0] = logits (bf16-exact values)."""
    x = np.zeros((1, cfg.hidden_size), BF16)
    x[0, 0] = 1
    w = np.zeros((cfg.n_routed_experts, cfg.hidden_size), BF16)
    w[:, 0] = np.asarray(logits, np.float64).astype(BF16)
    assert np.array_equal(w[:, 0].astype(np.float64), logits)
    ids, wts = moe_gate(DIE, x, w, np.asarray(bias, np.float32), cfg)
    return ids[0].tolist(), wts[0].astype(np.float64)


def test_routing_hand_worked_cases():
    """deepseek-v3.md §6 step by step on hand-made logits, expectations worked out here (not by the reference):
    group score = the top-2 sum (not the max, not the whole group), bias for selection only, −inf exclusion,
    normalisation, the scaling factor."""
    def sig(v):
        return 1 / (1 + np.exp(-np.asarray(v, np.float64)))

    cfg = MoEConfig(hidden_size=64, n_routed_experts=16, num_experts_per_tok=2, n_group=2, topk_group=1,
                    moe_intermediate_size=32, routed_scaling_factor=2.5)
    # group 0: one strong expert (3.0) and seven at 0.0; group 1: 1.75, 1.25, then six at −3.0.
    # By max or by the sum of the whole group, group 0 wins; by the top-2 sum (0.953 + 0.5 < 0.852 + 0.777) group 1.
    logits = np.array([3.0] + [0.0] * 7 + [1.75, 1.25] + [-3.0] * 6)
    ids, w = _route_one(logits, np.zeros(16), cfg)
    assert ids == [8, 9]
    np.testing.assert_allclose(w, 2.5 * sig([1.75, 1.25]) / sig([1.75, 1.25]).sum(), rtol=1e-6)
    # a bias of +0.5 on expert 0 lifts group 0 (1.953 > 1.629) and picks experts 0 and 1 (1 = the lowest of seven
    # equal s' = 0.5); the weights use the uncorrected scores s, not s' = s + bias
    bias = np.zeros(16)
    bias[0] = 0.5
    ids, w = _route_one(logits, bias, cfg)
    assert ids == [0, 1]
    np.testing.assert_allclose(w, 2.5 * sig([3.0, 0.0]) / sig([3.0, 0.0]).sum(), rtol=1e-6)
    # every s' negative (bias −2): excluded experts are −inf, so all three picks stay in the kept group 1 (an
    # exclusion by 0.0 would pick group 0's experts, whose masked 0.0 beats s' < 0)
    cfg3 = MoEConfig(hidden_size=64, n_routed_experts=16, num_experts_per_tok=3, n_group=2, topk_group=1,
                     moe_intermediate_size=32, routed_scaling_factor=2.5)
    ids, w = _route_one(logits, np.full(16, -2.0), cfg3)
    assert ids == [8, 9, 10]
    np.testing.assert_allclose(w, 2.5 * sig([1.75, 1.25, -3.0]) / sig([1.75, 1.25, -3.0]).sum(), rtol=1e-6)
    # norm_topk_prob false: w = s · routed_scaling_factor
    raw = MoEConfig(hidden_size=64, n_routed_experts=16, num_experts_per_tok=2, n_group=2, topk_group=2,
                    moe_intermediate_size=32, routed_scaling_factor=2.5, norm_topk_prob=False)
    ids, w = _route_one(logits, np.zeros(16), raw)
    assert ids == [0, 8]
    np.testing.assert_allclose(w, 2.5 * sig([3.0, 1.75]), rtol=1e-6)


def test_float64_routing_agrees_on_clear_margins():
    """Without near-ties the fp32 routing selects what float64 selects (the reference is not a copy of itself)."""
    cfg = MoEConfig(hidden_size=128, n_routed_experts=64, num_experts_per_tok=4, n_group=4, topk_group=2,
                    moe_intermediate_size=32, routed_scaling_factor=2.5)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((24, 128)).astype(BF16)
    w = (rng.standard_normal((64, 128)) * 0.3).astype(BF16)
    b = (rng.standard_normal(64) * 0.05).astype(np.float32)
    ids, wts = moe_gate(DIE, x, w, b, cfg)
    i64, w64 = routing_reference_f64(x, w, b, cfg)
    np.testing.assert_array_equal(ids, i64)
    np.testing.assert_allclose(wts, w64, rtol=1e-4)


def test_decode_size_timing_equals_functional():
    """R1 routing shape (E 256, 8 groups, top-4 groups, k 8) on a small hidden size: same cycles without data."""
    cfg = MoEConfig(hidden_size=256, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                    moe_intermediate_size=64, routed_scaling_factor=2.5)
    x, w, b = make_inputs(cfg, 50, "none", 3)
    die = ascendemu.Die("910c")
    ids, wts = moe_gate(die, x, w, b, cfg)
    rid, rw = routing_reference(x, w, b, cfg)
    np.testing.assert_array_equal(ids, rid)
    np.testing.assert_array_equal(wts, rw)
    cycles = die.last_report.cycles
    ph = ascendemu.Die("910c", functional=False)
    out = moe_gate(ph, ph.gm.empty((50, 256), "bfloat16"), ph.gm.empty((256, 256), "bfloat16"),
                   ph.gm.empty((256,), "float32"), cfg)
    assert all(o.is_phantom for o in out)
    assert ph.last_report.cycles == cycles


def test_zero_tokens():
    cfg = MoEConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=2, n_group=2, topk_group=1,
                    moe_intermediate_size=32)
    ids, wts = moe_gate(DIE, np.zeros((0, 32), BF16), np.zeros((16, 32), BF16), np.zeros(16, np.float32), cfg)
    assert ids.shape == (0, 2) and ids.dtype == np.int32 and wts.shape == (0, 2) and wts.dtype == np.float32


def test_gate_errors():
    cfg = MoEConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=2, n_group=2, topk_group=1,
                    moe_intermediate_size=32)
    x, w, b = np.zeros((3, 32), BF16), np.zeros((16, 32), BF16), np.zeros(16, np.float32)
    with pytest.raises(TypeError, match="die"):
        moe_gate("die", x, w, b, cfg)
    with pytest.raises(TypeError, match="MoEConfig"):
        moe_gate(DIE, x, w, b, {"hidden_size": 32})
    with pytest.raises(TypeError, match="x is float32"):
        moe_gate(DIE, x.astype(np.float32), w, b, cfg)
    with pytest.raises(TypeError, match="x must be"):
        moe_gate(DIE, [[1.0]], w, b, cfg)
    with pytest.raises(ValueError, match="2-D"):
        moe_gate(DIE, np.zeros(32, BF16), w, b, cfg)
    with pytest.raises(ValueError, match="hidden size 64"):
        moe_gate(DIE, np.zeros((3, 64), BF16), w, b, cfg)
    with pytest.raises(ValueError, match="gate_weight has shape"):
        moe_gate(DIE, x, np.zeros((8, 32), BF16), b, cfg)
    with pytest.raises(TypeError, match="gate_weight is float32"):
        moe_gate(DIE, x, w.astype(np.float32), b, cfg)
    with pytest.raises(TypeError, match="correction_bias is bfloat16"):
        moe_gate(DIE, x, w, b.astype(BF16), cfg)
    with pytest.raises(ValueError, match="correction_bias has shape"):
        moe_gate(DIE, x, w, np.zeros(8, np.float32), cfg)
    other = ascendemu.Die("910c")
    with pytest.raises(ValueError, match="another die"):
        moe_gate(DIE, other.gm.from_numpy(x), w, b, cfg)
    odd = MoEConfig(hidden_size=40, n_routed_experts=16, num_experts_per_tok=2, n_group=2, topk_group=1,
                    moe_intermediate_size=32)
    with pytest.raises(ValueError, match="multiple of 16"):
        moe_gate(DIE, np.zeros((3, 40), BF16), np.zeros((16, 40), BF16), b, odd)
    g12 = MoEConfig(hidden_size=32, n_routed_experts=24, num_experts_per_tok=2, n_group=2, topk_group=1,
                    moe_intermediate_size=32)
    with pytest.raises(ValueError, match="group size 12"):
        moe_gate(DIE, x, np.zeros((24, 32), BF16), np.zeros(24, np.float32), g12)
    e12 = MoEConfig(hidden_size=32, n_routed_experts=12, num_experts_per_tok=2, n_group=1, topk_group=1,
                    moe_intermediate_size=32)
    with pytest.raises(ValueError, match="multiple of 8"):
        moe_gate(DIE, x, np.zeros((12, 32), BF16), np.zeros(12, np.float32), e12)
    for e, ng, match in ((520, 65, "n_group = 65"), (4160, 65, "4160 routed experts")):
        c = MoEConfig(hidden_size=32, n_routed_experts=e, num_experts_per_tok=2, n_group=ng, topk_group=1,
                      moe_intermediate_size=32)
        with pytest.raises(ValueError, match=match):
            moe_gate(DIE, x, np.zeros((e, 32), BF16), np.zeros(e, np.float32), c)
    wide = MoEConfig(hidden_size=98304, n_routed_experts=16, num_experts_per_tok=2, n_group=2, topk_group=1,
                     moe_intermediate_size=32)
    with pytest.raises(ValueError, match="needs .* B of UB"):
        moe_gate(DIE, np.zeros((1, 98304), BF16), np.zeros((16, 98304), BF16), b, wide)


# ------------------------------------------------------------------------------------------------ MoEConfig

HF_LEGACY = {"hidden_size": 7168, "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
             "routed_scaling_factor": 2.5, "norm_topk_prob": True, "n_shared_experts": 1,
             "moe_intermediate_size": 2048, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
             "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40}, "num_attention_heads": 128}
HF_NEW = {k: v for k, v in HF_LEGACY.items() if k not in ("rope_theta", "rope_scaling", "scoring_func",
                                                            "topk_method")}
HF_NEW["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000, "factor": 40}


def test_config_from_hf_both_forms():
    a, b = MoEConfig.from_hf(HF_LEGACY), MoEConfig.from_hf(HF_NEW)
    assert a == b == MoEConfig.deepseek_v3()
    assert a.group_size == 32 and a.shared_intermediate_size == 2048
    assert MoEConfig.from_hf({**HF_LEGACY, "n_shared_experts": None}).n_shared_experts == 0


@pytest.mark.parametrize("key", ["hidden_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                                 "moe_intermediate_size", "n_shared_experts", "routed_scaling_factor"])
def test_config_missing_key(key):
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        MoEConfig.from_hf({k: v for k, v in HF_LEGACY.items() if k != key})


@pytest.mark.parametrize("change, match", [
    ({"n_group": 0}, "n_group must be a positive integer"),
    ({"hidden_size": 7168.0}, "hidden_size must be a positive integer"),
    ({"num_experts_per_tok": True}, "num_experts_per_tok must be a positive integer"),
    ({"routed_scaling_factor": -1}, "routed_scaling_factor"),
    ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor"),
    ({"norm_topk_prob": 1}, "norm_topk_prob"),
    ({"n_group": 7}, "not divisible"),
    ({"topk_group": 9}, "exceeds n_group"),
    ({"topk_group": 1, "num_experts_per_tok": 33}, "exceeds the 32 experts"),
    ({"n_shared_experts": -1}, "n_shared_experts"),
])
def test_config_invalid(change, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig.from_hf({**HF_LEGACY, **change})


def test_config_unsupported_router_and_type():
    with pytest.raises(NotImplementedError, match="scoring_func='softmax'"):
        MoEConfig.from_hf({**HF_LEGACY, "scoring_func": "softmax"})
    with pytest.raises(NotImplementedError, match="topk_method='group_limited_greedy'"):
        MoEConfig.from_hf({**HF_LEGACY, "topk_method": "group_limited_greedy"})
    with pytest.raises(ValueError, match="expected a dict"):
        MoEConfig.from_hf([("hidden_size", 1)])
    with pytest.raises(ValueError, match="norm_topk_prob must be a bool"):
        MoEConfig(hidden_size=8, n_routed_experts=8, num_experts_per_tok=1, n_group=1, topk_group=1,
                  moe_intermediate_size=8, norm_topk_prob="yes")
