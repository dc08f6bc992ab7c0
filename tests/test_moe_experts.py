"""Expert weights and the expert MLPs (ops/moe/experts.py).

moe_experts must equal `experts_reference` bit for bit (the grouped INT8 GEMM, SwiGLU+quant and grouped INT8 GEMM
references, each bit-exact to its kernel). Against float64 math on the dequantised INT8 weights (with the INT8 input
rows, and h quantised per token in float64) it must agree within 4 % of max|ref| per row: the kernel rounds gate_up to
bf16 (2⁻⁹ relative) before SwiGLU and its h quantisation may then round a value to the neighbouring INT8 step
(1/127 of the row's max), and the output is bf16.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ascendemu
from ascendemu.ops.int8_gemm import unpack_weight
from ascendemu.ops.moe.config import MoEConfig
from ascendemu.ops.moe.dispatch import ReceivedTokens
from ascendemu.ops.moe.experts import ExpertWeights, experts_reference, moe_experts
from ascendemu.ops.moe.placement import ExpertPlacement
from ascendemu.ops.moe.reference import quantize_rows_f64

BF16 = np.dtype(ml_dtypes.bfloat16)
LAYER = 5


def make_state(rng, cfg, shared=True):
    sd = {}
    e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for x in list(range(e)) + (["s"] if shared else []):
        pre = f"model.layers.{LAYER}.mlp." + ("shared_experts." if x == "s" else f"experts.{x}.")
        ii = cfg.shared_intermediate_size if x == "s" else i
        sd[pre + "gate_proj.weight"] = (rng.standard_normal((ii, h)) * 0.1).astype(BF16)
        sd[pre + "up_proj.weight"] = (rng.standard_normal((ii, h)) * 0.1).astype(BF16)
        sd[pre + "down_proj.weight"] = (rng.standard_normal((h, ii)) * 0.1).astype(BF16)
    return sd


def cfg_of(e, h, i):
    return MoEConfig(hidden_size=h, n_routed_experts=e, num_experts_per_tok=2, n_group=1, topk_group=1,
                     moe_intermediate_size=i, routed_scaling_factor=2.5)


def received(die, d, slots, counts, h, rng):
    r = int(sum(counts))
    tok = rng.integers(-127, 128, (r, h)).astype(np.int8)
    sc = (rng.uniform(0.5, 2.0, r) / 127).astype(np.float32)
    return ReceivedTokens(d, die.gm.from_numpy(tok), die.gm.from_numpy(sc), np.asarray(counts, np.int64),
                          tuple(slots)), tok, sc


@given(st.sampled_from([32, 64, 96]), st.sampled_from([32, 64]), st.sampled_from([8, 16]), st.integers(0, 2 ** 31),
       st.sampled_from(["random", "zeros", "one"]))
def test_experts_exact_and_close_to_float64(h, i, e, seed, load):
    rng = np.random.default_rng(seed)
    cfg = cfg_of(e, h, i)
    pl = ExpertPlacement.uniform(e, 2)
    ew = ExpertWeights.from_hf(make_state(rng, cfg), LAYER, pl, cfg)
    cl = ascendemu.Cluster("910c", dies=2)
    d = int(rng.integers(0, 2))
    slots = pl.slots[d]
    counts = [0] * len(slots)
    if load == "random":
        counts = [0] + rng.integers(0, 12, len(slots) - 1).tolist()  # the local shared slot receives nothing
    elif load == "one":  # every row to one expert
        counts[1 + int(rng.integers(0, len(slots) - 1))] = int(rng.integers(1, 40))
    rec, tok, sc = received(cl.die(d), d, slots, counts, h, rng)
    y = moe_experts(cl.die(d), rec, ew)
    y = y.numpy() if hasattr(y, "numpy") and not isinstance(y, np.ndarray) else y
    assert y.shape == (sum(counts), h) and y.dtype == BF16
    packs = ew.for_die(d)
    ref = experts_reference(tok, sc, counts, packs)
    np.testing.assert_array_equal(y.view(np.uint16), ref.view(np.uint16))
    # float64 on the dequantised INT8 weights
    r0 = 0
    x = tok.astype(np.float64) * sc.astype(np.float64)[:, None]
    for p, c in zip(packs, counts):
        if c:
            gu, dn = p.dequantized()
            a = x[r0:r0 + c] @ gu.T
            g, u = a[:, :i], a[:, i:]
            hq, hs = quantize_rows_f64(g / (1 + np.exp(-g)) * u)
            want = (hq * hs[:, None]) @ dn.T
            got = y[r0:r0 + c].astype(np.float64)
            assert np.all(np.abs(got - want) <= 0.04 * np.abs(want).max(axis=1, keepdims=True) + 1e-30)
        r0 += c


def test_weights_pack_once_replicas_share():
    rng = np.random.default_rng(0)
    cfg = cfg_of(8, 32, 32)
    sd = make_state(rng, cfg)
    pl = ExpertPlacement.prefill_ep32(8, 4)  # die d: shared, 2 routed, 1 redundant (the next die's first)
    ew = ExpertWeights.from_hf(sd, LAYER, pl, cfg)
    assert set(ew.logical) == set(range(9))
    for d, slots in enumerate(pl.slots):
        for j, e in enumerate(slots):
            assert ew.for_die(d)[j] is ew.logical[e]
    assert ew.for_die(0)[3] is ew.for_die(1)[1]  # expert 2's replica on die 0 is die 1's expert 2
    p = ew.logical[3]
    q = unpack_weight(p.gate_up)
    assert q.shape == (64, 32) and p.gate_up_scale.shape == (64,)
    w = np.concatenate([sd[f"model.layers.{LAYER}.mlp.experts.3.gate_proj.weight"],
                        sd[f"model.layers.{LAYER}.mlp.experts.3.up_proj.weight"]]).astype(np.float64)
    np.testing.assert_allclose(q * p.gate_up_scale[:, None].astype(np.float64), w,
                               atol=np.abs(w).max(axis=1, keepdims=True).max() / 254 + 1e-12)
    assert ew.logical[8].intermediate == 32  # the shared expert


def test_zero_rows_and_timing_only():
    rng = np.random.default_rng(1)
    cfg = cfg_of(8, 64, 64)
    pl = ExpertPlacement.uniform(8, 2)
    ew = ExpertWeights.from_hf(make_state(rng, cfg), LAYER, pl, cfg)
    cl = ascendemu.Cluster("910c", dies=2)
    rec, _, _ = received(cl.die(1), 1, pl.slots[1], [0] * 5, 64, rng)
    y = moe_experts(cl.die(1), rec, ew)
    assert y.shape == (0, 64) and y.dtype == BF16
    # a die that holds no expert at all
    bare = ExpertPlacement(8, 3, [(8, 0, 1, 2, 3), (8, 4, 5, 6, 7), ()])
    ewb = ExpertWeights.from_hf(make_state(rng, cfg), LAYER, bare, cfg)
    assert ewb.for_die(2) == ()
    rec, _, _ = received(cl.die(0), 2, (), [], 64, rng)
    y = moe_experts(cl.die(0), rec, ewb)
    assert y.shape == (0, 64) and y.dtype == BF16
    # the same load functional and timing-only: the same cycles
    counts = [0, 7, 0, 30, 2]
    rec, _, _ = received(cl.die(1), 1, pl.slots[1], counts, 64, rng)
    with cl.die(1).recording() as rf:
        moe_experts(cl.die(1), rec, ew)
    ph = ascendemu.Cluster("910c", dies=2, functional=False)
    ewp = ExpertWeights.phantom(ph, pl, cfg)
    g = ph.die(1).gm
    rp = ReceivedTokens(1, g.empty((39, 64), "int8"), g.empty((39,), "float32"), np.array(counts), pl.slots[1])
    with ph.die(1).recording() as rt:
        out = moe_experts(ph.die(1), rp, ewp)
    assert out.is_phantom and len(rt.reports) == len(rf.reports) == 3
    assert rt.cycles == rf.cycles


def test_expert_errors():
    rng = np.random.default_rng(2)
    cfg = cfg_of(8, 32, 32)
    sd = make_state(rng, cfg)
    pl = ExpertPlacement.uniform(8, 2)
    with pytest.raises(KeyError, match="experts.3.up_proj.weight"):
        ExpertWeights.from_hf({k: v for k, v in sd.items() if "experts.3.up_proj" not in k}, LAYER, pl, cfg)
    with pytest.raises(KeyError, match="shared_experts.down_proj"):
        ExpertWeights.from_hf({k: v for k, v in sd.items() if "shared_experts.down" not in k}, LAYER, pl, cfg)
    bad = dict(sd)
    bad[f"model.layers.{LAYER}.mlp.experts.0.down_proj.weight"] = np.zeros((32, 16), BF16)
    with pytest.raises(ValueError, match=r"experts.0.down_proj.weight has shape \(32, 16\); expected \(32, 32\)"):
        ExpertWeights.from_hf(bad, LAYER, pl, cfg)
    bad[f"model.layers.{LAYER}.mlp.experts.0.down_proj.weight"] = [[0.0]]
    with pytest.raises(TypeError, match="numpy array"):
        ExpertWeights.from_hf(bad, LAYER, pl, cfg)
    with pytest.raises(ValueError, match="16 experts but the config 8"):
        ExpertWeights.from_hf(sd, LAYER, ExpertPlacement.uniform(16, 2), cfg)
    with pytest.raises(TypeError, match="placement"):
        ExpertWeights.from_hf(sd, LAYER, "uniform", cfg)
    with pytest.raises(TypeError, match="config"):
        ExpertWeights.from_hf(sd, LAYER, pl, None)
    no_shared = MoEConfig(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                          moe_intermediate_size=32, n_shared_experts=0)
    with pytest.raises(ValueError, match="n_shared_experts = 0"):
        ExpertWeights.from_hf(sd, LAYER, pl, no_shared)
    cl = ascendemu.Cluster("910c", dies=2)
    with pytest.raises(ValueError, match="functional"):
        ExpertWeights.phantom(cl, pl, cfg)
    with pytest.raises(ValueError, match="3 dies"):
        ExpertWeights.phantom(ascendemu.Cluster("910c", dies=3, functional=False), pl, cfg)
    ew = ExpertWeights.from_hf(sd, LAYER, pl, cfg)
    with pytest.raises(ValueError, match="die 2 outside"):
        ew.for_die(2)
    rec, _, _ = received(cl.die(0), 0, pl.slots[0], [0, 1, 1, 1, 1], 32, rng)
    with pytest.raises(TypeError, match="die"):
        moe_experts(None, rec, ew)
    with pytest.raises(TypeError, match="ExpertWeights"):
        moe_experts(cl.die(0), rec, {})
    with pytest.raises(TypeError, match="ReceivedTokens"):
        moe_experts(cl.die(0), (1, 2), ew)
    with pytest.raises(ValueError, match="counts has 4 entries"):
        moe_experts(cl.die(0), ReceivedTokens(0, rec.tokens, rec.scales, np.ones(4, np.int64), rec.slots), ew)
    with pytest.raises(ValueError, match="negative count"):
        moe_experts(cl.die(0), ReceivedTokens(0, rec.tokens, rec.scales, np.array([0, -1, 2, 1, 2]), rec.slots), ew)
    with pytest.raises(ValueError, match="do not match the counts"):
        moe_experts(cl.die(0), ReceivedTokens(0, rec.tokens, rec.scales, np.array([0, 1, 1, 1, 2]), rec.slots), ew)
    with pytest.raises(ValueError, match="differ from the placement"):
        moe_experts(cl.die(0), ReceivedTokens(0, rec.tokens, rec.scales, rec.counts, pl.slots[1]), ew)
    # a shared expert of another intermediate size beside routed slots that receive rows
    two = MoEConfig(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                    moe_intermediate_size=32, n_shared_experts=2)
    ew2 = ExpertWeights.from_hf(make_state(rng, two), LAYER, pl, two)
    y = moe_experts(cl.die(0), rec, ew2)  # the shared slot has 0 rows: left out of the grouped GEMM
    assert y.shape == (4, 32)
    rec2, _, _ = received(cl.die(0), 0, pl.slots[0], [1, 1, 0, 0, 0], 32, rng)
    with pytest.raises(NotImplementedError, match="intermediate size 32 ≠ 64"):
        moe_experts(cl.die(0), rec2, ew2)
