"""The MoE sublayer (ops/moe/layer.py): gate → fused_dispatch → experts (+ shared) → fused_combine.

Routing is compared bit for bit with `routing_reference`. Values are compared with `moe_reference` (float64 expert
math on the bf16 weights, modelling the INT8 quantisation of weights per channel and of x and h per token): per die,
max|y − ref| ≤ 3 % of max|ref|. What is left is bf16 rounding (gate_up and each expert's output before combine,
the final output: 2⁻⁹ each), the h quantisation rounding to a neighbouring INT8 step where the bf16 gate_up moved
it, and fp32 accumulation; measured worst cases are 1.1 %.
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu
from ascendemu.ops.moe.config import MoEConfig
from ascendemu.ops.moe.gate import moe_gate
from ascendemu.ops.moe.layer import MoELayerWeights, moe_layer
from ascendemu.ops.moe.placement import ExpertPlacement
from ascendemu.ops.moe.reference import moe_reference, routing_reference

BF16 = np.dtype(ml_dtypes.bfloat16)
LAYER = 3
TOL = 0.03


def make_state(rng, cfg, bias=None):
    e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    sd = {f"model.layers.{LAYER}.mlp.gate.weight": (rng.standard_normal((e, h)) * 0.2).astype(BF16),
          f"model.layers.{LAYER}.mlp.gate.e_score_correction_bias":
              (rng.standard_normal(e) * 0.01 if bias is None else bias).astype(np.float32)}
    for x in list(range(e)) + ["s"]:
        pre = f"model.layers.{LAYER}.mlp." + ("shared_experts." if x == "s" else f"experts.{x}.")
        sd[pre + "gate_proj.weight"] = (rng.standard_normal((i, h)) * 0.1).astype(BF16)
        sd[pre + "up_proj.weight"] = (rng.standard_normal((i, h)) * 0.1).astype(BF16)
        sd[pre + "down_proj.weight"] = (rng.standard_normal((h, i)) * 0.1).astype(BF16)
    return sd


def check_against_reference(x, y, routing, sd, cfg):
    for d, xd in enumerate(x):
        rid, rw = routing_reference(xd, sd[f"model.layers.{LAYER}.mlp.gate.weight"],
                                    sd[f"model.layers.{LAYER}.mlp.gate.e_score_correction_bias"], cfg)
        np.testing.assert_array_equal(routing[d][0], rid)
        np.testing.assert_array_equal(routing[d][1], rw)
    ref = moe_reference(x, sd, LAYER, cfg)
    for d in range(len(x)):
        assert y[d].shape == x[d].shape and y[d].dtype == BF16
        if x[d].shape[0]:
            err = np.abs(y[d].astype(np.float64) - ref[d]).max()
            assert err <= TOL * np.abs(ref[d]).max(), (d, err, np.abs(ref[d]).max())


@settings(max_examples=3)
@given(st.sampled_from([(2, 16, 2, 1), (4, 32, 4, 2), (4, 32, 2, 1)]), st.sampled_from([32, 64]),
       st.sampled_from([32, 64]), st.integers(0, 2 ** 31))
def test_layer_uniform_placement(shape, h, i, seed):
    dies, e, ng, kg = shape
    rng = np.random.default_rng(seed)
    cfg = MoEConfig(hidden_size=h, n_routed_experts=e, num_experts_per_tok=int(rng.integers(1, 5)), n_group=ng,
                    topk_group=kg, moe_intermediate_size=i, routed_scaling_factor=2.5)
    sd = make_state(rng, cfg)
    pl = ExpertPlacement.uniform(e, dies)
    cl = ascendemu.Cluster("910c", dies=dies)
    x = [rng.standard_normal((int(rng.integers(0, 9)), h)).astype(BF16) for _ in range(dies)]
    x[int(rng.integers(0, dies))] = np.zeros((0, h), BF16)  # a die without tokens
    lw = MoELayerWeights.from_hf(sd, LAYER, cfg, pl)
    y, routing = moe_layer(cl, x, lw, pl, return_routing=True)
    check_against_reference(x, y, routing, sd, cfg)


def test_layer_decode_placement_shared_remote():
    """16 dies: 2 shared-expert dies, 8 routed, 6 redundant replicas; the shared expert runs by dispatch."""
    rng = np.random.default_rng(11)
    cfg = MoEConfig(hidden_size=64, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                    moe_intermediate_size=32, routed_scaling_factor=2.5)
    sd = make_state(rng, cfg)
    pl = ExpertPlacement.decode_ep320(8, 16, 2)
    assert pl.shared_remote()
    cl = ascendemu.Cluster("910c", dies=16)
    x = [rng.standard_normal((int(rng.integers(0, 4)), 64)).astype(BF16) for _ in range(16)]
    y, routing = moe_layer(cl, x, MoELayerWeights.from_hf(sd, LAYER, cfg, pl), pl, return_routing=True)
    check_against_reference(x, y, routing, sd, cfg)


def test_layer_uneven_load_and_die_order():
    """Every token to one expert (its bias dominates, k = 1); then the dies' inputs permuted: every token's output
    is bit-identical (per-row math does not depend on where or with whom a row runs)."""
    rng = np.random.default_rng(5)
    cfg = MoEConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=1, n_group=2, topk_group=1,
                    moe_intermediate_size=32, routed_scaling_factor=2.5)
    bias = np.zeros(16)
    bias[13] = 50.0
    sd = make_state(rng, cfg, bias)
    pl = ExpertPlacement.uniform(16, 4)
    lw = MoELayerWeights.from_hf(sd, LAYER, cfg, pl)
    x = [rng.standard_normal((n, 32)).astype(BF16) for n in (7, 0, 5, 8)]
    y, routing = moe_layer(ascendemu.Cluster("910c", dies=4), x, lw, pl, return_routing=True)
    assert all((r[0] == 13).all() for r in routing)
    check_against_reference(x, y, routing, sd, cfg)
    perm = [2, 0, 3, 1]
    xp = [x[p] for p in perm]
    yp = moe_layer(ascendemu.Cluster("910c", dies=4), xp, lw, pl, max_tokens_per_rank=8)
    for j, p in enumerate(perm):
        np.testing.assert_array_equal(yp[j].view(np.uint16), y[p].view(np.uint16))
    # the same inputs on a cluster whose dies start at different times (dies 0 and 2 busy first): the dies' kernels
    # interleave in another order, the outputs are bit-identical
    skew = ascendemu.Cluster("910c", dies=4)
    for d, n in ((0, 150), (2, 12)):
        moe_gate(skew.die(d), rng.standard_normal((n, 32)).astype(BF16), sd[f"model.layers.{LAYER}.mlp.gate.weight"],
                 sd[f"model.layers.{LAYER}.mlp.gate.e_score_correction_bias"], cfg)
    clocks = [d.synchronize() for d in skew.dies]
    assert clocks[0] > clocks[2] > clocks[1] == clocks[3] == 0
    ys = moe_layer(skew, x, lw, pl)
    for a, b in zip(ys, y):
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


def test_layer_die_without_experts_and_gm_freed():
    """A die that holds no expert still sends its tokens (and gets them back); every GM buffer the layer allocates
    is freed, also when dispatch refuses an overflowing receive window."""
    rng = np.random.default_rng(6)
    cfg = MoEConfig(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                    moe_intermediate_size=32, routed_scaling_factor=2.5)
    sd = make_state(rng, cfg)
    pl = ExpertPlacement(8, 3, [(8, 0, 1, 2, 3), (8, 4, 5, 6, 7), ()])  # shared on 2 of 3 dies: remote
    assert pl.shared_remote()
    lw = MoELayerWeights.from_hf(sd, LAYER, cfg, pl)
    cl = ascendemu.Cluster("910c", dies=3)
    x = [rng.standard_normal((n, 32)).astype(BF16) for n in (4, 0, 6)]
    before = [d.gm.in_use for d in cl.dies]
    y, routing = moe_layer(cl, x, lw, pl, return_routing=True)
    check_against_reference(x, y, routing, sd, cfg)
    assert [d.gm.in_use for d in cl.dies] == before
    with pytest.raises(ValueError, match="max_tokens_per_rank = 5"):
        moe_layer(cl, x, lw, pl, max_tokens_per_rank=5)
    assert [d.gm.in_use for d in cl.dies] == before
    # no shared expert at all (n_shared_experts = 0, a placement without a shared slot)
    cfg0 = MoEConfig(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                     moe_intermediate_size=32, routed_scaling_factor=2.5, n_shared_experts=0)
    pl0 = ExpertPlacement(8, 3, [(0, 1, 2), (3, 4, 5), (6, 7)])
    lw0 = MoELayerWeights.from_hf(sd, LAYER, cfg0, pl0)
    assert lw0.shared is None
    y, routing = moe_layer(cl, x, lw0, pl0, return_routing=True)
    check_against_reference(x, y, routing, sd, cfg0)


def test_layer_timing_only_equals_functional_cycles():
    rng = np.random.default_rng(9)
    cfg = MoEConfig(hidden_size=64, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                    moe_intermediate_size=64, routed_scaling_factor=2.5)
    sd = make_state(rng, cfg)
    pl = ExpertPlacement.uniform(8, 2)
    x = [rng.standard_normal((n, 64)).astype(BF16) for n in (6, 3)]
    cl = ascendemu.Cluster("910c", dies=2)
    y, routing = moe_layer(cl, x, MoELayerWeights.from_hf(sd, LAYER, cfg, pl), pl, return_routing=True)
    ph = ascendemu.Cluster("910c", dies=2, functional=False)
    xp = [ph.die(d).gm.empty((n, 64), "bfloat16") for d, n in enumerate((6, 3))]
    yp = moe_layer(ph, xp, MoELayerWeights.phantom(ph, cfg, pl), pl, routing=routing)
    assert [tuple(a.shape) for a in yp] == [(6, 64), (3, 64)] and all(a.is_phantom for a in yp)
    assert [d.synchronize() for d in ph.dies] == [d.synchronize() for d in cl.dies]


def test_layer_errors():
    rng = np.random.default_rng(4)
    cfg = MoEConfig(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                    moe_intermediate_size=32)
    sd = make_state(rng, cfg)
    pl = ExpertPlacement.uniform(8, 2)
    lw = MoELayerWeights.from_hf(sd, LAYER, cfg, pl)
    cl = ascendemu.Cluster("910c", dies=2)
    x = [np.zeros((2, 32), BF16)] * 2
    with pytest.raises(TypeError, match="Cluster"):
        moe_layer(cl.die(0), x, lw, pl)
    with pytest.raises(TypeError, match="MoELayerWeights"):
        moe_layer(cl, x, sd, pl)
    with pytest.raises(TypeError, match="ExpertPlacement"):
        moe_layer(cl, x, lw, "uniform")
    with pytest.raises(ValueError, match="another placement"):
        moe_layer(cl, x, lw, ExpertPlacement.prefill_ep32(8, 2))
    with pytest.raises(ValueError, match="one \\[T_d, H\\] array per die"):
        moe_layer(cl, x[:1], lw, pl)
    with pytest.raises(ValueError, match="the placement has 2 dies but the cluster 4"):
        moe_layer(ascendemu.Cluster("910c", dies=4), x * 2, lw, pl)
    with pytest.raises(ValueError, match="routing=None"):
        moe_layer(cl, x, lw, pl, routing=[(np.zeros((2, 2), np.int32), np.zeros((2, 2), np.float32))] * 2)
    ph = ascendemu.Cluster("910c", dies=2, functional=False)
    with pytest.raises(ValueError, match="timing-only cluster needs routing"):
        moe_layer(ph, [ph.die(d).gm.empty((2, 32), "bfloat16") for d in range(2)],
                  MoELayerWeights.phantom(ph, cfg, pl), pl)
    for key in ("gate.weight", "gate.e_score_correction_bias"):
        with pytest.raises(KeyError, match=key):
            MoELayerWeights.from_hf({k: v for k, v in sd.items() if not k.endswith(key)}, LAYER, cfg, pl)
    bad = {**sd, f"model.layers.{LAYER}.mlp.gate.e_score_correction_bias": np.zeros(8, BF16)}
    with pytest.raises(ValueError, match="e_score_correction_bias must be a float32"):
        MoELayerWeights.from_hf(bad, LAYER, cfg, pl)
    with pytest.raises(TypeError, match="MoEConfig"):
        MoELayerWeights.from_hf(sd, LAYER, None, pl)
    with pytest.raises(TypeError, match=r"x\[1\] must be a 2-D"):
        moe_layer(cl, [x[0], [[0.0] * 32]], lw, pl)
    with pytest.raises(ValueError, match="layer_weights.shared is None"):
        moe_layer(cl, x, MoELayerWeights(cfg, lw.gate_weight, lw.correction_bias, lw.experts, None), pl)
    ids = [np.zeros((2, 2), np.int32)] * 2
    xp = [ph.die(d).gm.empty((2, 32), "bfloat16") for d in range(2)]
    lwp = MoELayerWeights.phantom(ph, cfg, pl)
    with pytest.raises(ValueError, match=r"routing\[0\] must be \(topk_ids, topk_weights\) of shape \(2, 2\)"):
        moe_layer(ph, xp, lwp, pl, routing=[(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.float32))] * 2)
    with pytest.raises(TypeError, match="topk_weights.* must be float32"):  # not silently rounded to float32
        moe_layer(ph, xp, lwp, pl, routing=[(i, np.full((2, 2), 0.5)) for i in ids])
    # a placement that lists no shared expert: the shared expert is still packed for the home dies
    bare = ExpertPlacement(8, 2, ((0, 1, 2, 3), (4, 5, 6, 7)))
    lwb = MoELayerWeights.from_hf(sd, LAYER, cfg, bare)
    assert lwb.shared is not None and not bare.shared_remote()
    with pytest.raises(KeyError, match="shared_experts.up_proj"):
        MoELayerWeights.from_hf({k: v for k, v in sd.items() if "shared_experts.up" not in k}, LAYER, cfg, bare)


def test_layer_global_tensor_inputs():
    """x as GlobalTensors of each die gives the same output as numpy x."""
    rng = np.random.default_rng(8)
    cfg = MoEConfig(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                    moe_intermediate_size=32)
    sd = make_state(rng, cfg)
    pl = ExpertPlacement.uniform(8, 2)
    lw = MoELayerWeights.from_hf(sd, LAYER, cfg, pl)
    x = [rng.standard_normal((n, 32)).astype(BF16) for n in (3, 4)]
    y = moe_layer(ascendemu.Cluster("910c", dies=2), x, lw, pl)
    cl = ascendemu.Cluster("910c", dies=2)
    yg = moe_layer(cl, [cl.die(d).gm.from_numpy(x[d]) for d in range(2)], lw, pl)
    for a, b in zip(y, yg):
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
