"""Host-side MLA (ascendemu.ops.mla: config, rope, weights, reference) against deepseek-v3.md §1, §3–§5.

Independent checks written here: R1's numbers typed from the reference, RoPE through complex numbers
(np.exp(1j·θ)), and a per-token forward in Hugging Face's convention (evens-then-odds + rotate-half).
"""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ascendemu.layouts import nz_to_nd
from ascendemu.ops.mla import (KPE_ORDER, MLAConfig, MLAWeights, apply_rope_interleaved, apply_rope_rotate_half,
                               deinterleave, interleave, mla_absorbed_decode_reference,
                               mla_attention_absorbed_reference, mla_attention_naive_reference,
                               mla_forward_reference, mla_prolog_reference, random_state_dict, rope_cos_sin)
from ascendemu.ops.mla.weights import NZ_OF

BF16 = np.dtype(ml_dtypes.bfloat16)

# DeepSeek-R1's published config.json (the MLA-relevant keys plus some others, which must be ignored).
R1_LEGACY = {
    "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "max_position_embeddings": 163840, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "torch_dtype": "bfloat16", "vocab_size": 129280,
}


def to_new_form(cfg: dict) -> dict:
    """Legacy rope_theta + rope_scaling → newer HF rope_parameters (written here, as transformers converts)."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    params = {"rope_theta": cfg["rope_theta"]}
    scaling = cfg.get("rope_scaling")
    if scaling:
        params.update({k: v for k, v in scaling.items() if k != "type"}, rope_type=scaling["type"])
    else:
        params["rope_type"] = "default"
    out["rope_parameters"] = params
    return out


@st.composite
def hf_configs(draw):
    """Small HF config dicts (legacy form): heads 1..4, ranks 16..64, head dims multiples of 8."""
    cfg = {
        "hidden_size": draw(st.sampled_from([16, 32, 64])),
        "num_attention_heads": draw(st.integers(1, 4)),
        "q_lora_rank": draw(st.sampled_from([None, 16, 32, 48, 64])),
        "kv_lora_rank": draw(st.sampled_from([16, 32, 48, 64])),
        "qk_nope_head_dim": draw(st.sampled_from([8, 16, 32])),
        "qk_rope_head_dim": draw(st.sampled_from([8, 16, 32])),
        "v_head_dim": draw(st.sampled_from([8, 16, 32])),
        "rms_norm_eps": draw(st.sampled_from([1e-6, 1e-5])),
        "rope_theta": draw(st.sampled_from([10000, 500.0])),
        "max_position_embeddings": 4096,
        "rope_scaling": None,
    }
    if draw(st.booleans()):
        factor = draw(st.sampled_from([2, 4.0, 40]))
        ms = draw(st.sampled_from([0.707, 1.0]))
        cfg["rope_scaling"] = {"type": "yarn", "factor": factor, "original_max_position_embeddings": 1024,
                               "beta_fast": 32, "beta_slow": 1, "mscale": ms,
                               "mscale_all_dim": draw(st.sampled_from([0.0, ms, 1.0]))}
    return cfg


configs = hf_configs().map(MLAConfig.from_hf)


def setup(config: MLAConfig, seed: int):
    weights = MLAWeights.from_hf(random_state_dict(config, layer=3, seed=seed), 3, config)
    return weights, np.random.default_rng(seed + 1)


# ------------------------------------------------------------------------------------------------ config


def test_r1_numbers():
    c = MLAConfig.from_hf(R1_LEGACY)
    assert c == MLAConfig.deepseek_v3() == MLAConfig.from_hf(to_new_form(R1_LEGACY))
    assert c.qk_head_dim == 192 and c.kv_cache_dim == 576
    assert c.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-15)
    assert round(c.softmax_scale, 7) == 0.1352338
    assert c.rope_correction_range() == (10, 23)
    assert c.rope_cos_sin_scale == 1.0
    f = 10000.0 ** (-np.arange(32) * 2 / 64)
    fp = c.rope_inv_freq()
    assert fp.dtype == np.float64 and fp.shape == (32,)
    np.testing.assert_allclose(fp[:11], f[:11], rtol=1e-15)
    np.testing.assert_allclose(fp[23:], f[23:] / 40, rtol=1e-15)
    ramp = (np.arange(11, 23) - 10) / 13
    np.testing.assert_allclose(fp[11:23], f[11:23] / 40 * ramp + f[11:23] * (1 - ramp), rtol=1e-15)


@given(hf_configs())
def test_from_hf_both_forms_equal(cfg):
    c = MLAConfig.from_hf(cfg)
    assert MLAConfig.from_hf(to_new_form(cfg)) == c
    both = dict(to_new_form(cfg), rope_theta=cfg["rope_theta"], rope_scaling=cfg["rope_scaling"])
    assert MLAConfig.from_hf(both) == c
    assert c.num_heads == cfg["num_attention_heads"] and c.q_lora_rank == cfg["q_lora_rank"]
    if cfg["rope_scaling"] is None:
        assert c.rope_type == "default" and c.softmax_scale == c.qk_head_dim ** -0.5
        np.testing.assert_allclose(c.rope_inv_freq(), cfg["rope_theta"] ** (-np.arange(0, c.qk_rope_head_dim, 2)
                                                                            / c.qk_rope_head_dim), rtol=1e-15)


def test_rope_type_key_spellings():
    cfg = dict(R1_LEGACY, rope_scaling=dict(R1_LEGACY["rope_scaling"]))
    cfg["rope_scaling"]["rope_type"] = cfg["rope_scaling"].pop("type")
    assert MLAConfig.from_hf(cfg) == MLAConfig.deepseek_v3()


def _with(cfg, path, value):
    """Copy of cfg with cfg[path...] set to value (a _DEL value deletes the key)."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    d = cfg
    for k in path[:-1]:
        d = d[k]
    if value is _DEL:
        del d[path[-1]]
    else:
        d[path[-1]] = value
    return cfg


_DEL = object()
NEW = to_new_form(R1_LEGACY)


@pytest.mark.parametrize("cfg, message", [
    (_with(R1_LEGACY, ["hidden_size"], _DEL), "config: missing key 'hidden_size'"),
    (_with(R1_LEGACY, ["q_lora_rank"], _DEL), "config: missing key 'q_lora_rank'"),
    (_with(R1_LEGACY, ["rope_theta"], _DEL), "missing key 'rope_theta'"),
    (_with(NEW, ["rope_parameters", "rope_theta"], _DEL), "missing key rope_parameters['rope_theta']"),
    (_with(R1_LEGACY, ["num_attention_heads"], "128"), "num_attention_heads must be a positive integer, got '128'"),
    (_with(R1_LEGACY, ["kv_lora_rank"], 0), "kv_lora_rank must be a positive integer, got 0"),
    (_with(R1_LEGACY, ["v_head_dim"], True), "v_head_dim must be a positive integer, got True"),
    (_with(R1_LEGACY, ["rms_norm_eps"], -1.0), "rms_norm_eps must be a positive finite number"),
    (_with(R1_LEGACY, ["rope_theta"], "big"), "rope_theta must be a positive finite number"),
    (_with(R1_LEGACY, ["qk_rope_head_dim"], 63), "qk_rope_head_dim=63 must be even"),
    (_with(R1_LEGACY, ["rope_scaling", "factor"], _DEL), "missing key rope_scaling['factor']"),
    (_with(R1_LEGACY, ["rope_scaling", "factor"], "40"), "rope_scaling['factor'] must be a positive finite number"),
    (_with(R1_LEGACY, ["rope_scaling", "type"], _DEL), "missing key rope_scaling['rope_type']"),
    (_with(R1_LEGACY, ["rope_scaling", "type"], "linear"), "rope_scaling['type']='linear' is not supported"),
    (_with(R1_LEGACY, ["rope_scaling", "original_max_position_embeddings"], 4096.5),
     "rope_scaling['original_max_position_embeddings'] must be a positive integer"),
    (_with(R1_LEGACY, ["rope_scaling", "mscale"], -1), "rope_scaling['mscale'] must be a non-negative"),
    (_with(R1_LEGACY, ["rope_scaling"], [1]), "rope_scaling must be a dict or null, got list"),
    (_with(NEW, ["rope_parameters", "rope_type"], "dynamic"), "rope_parameters['rope_type']='dynamic' is not"),
    (_with(R1_LEGACY, ["rope_interleave"], False), "rope_interleave=False is not supported"),
    (dict(NEW, rope_theta=500), "disagree on rope_theta: 10000.0 vs 500.0"),
    (dict(NEW, rope_scaling=dict(R1_LEGACY["rope_scaling"], factor=8)), "disagree on rope_factor: 40.0 vs 8.0"),
    (dict(NEW, rope_scaling={"type": "default"}), "disagree on rope_type: 'yarn' vs 'default'"),
    ([1, 2], "expected a dict, got list"),
])
def test_config_errors(cfg, message):
    with pytest.raises(ValueError) as e:
        MLAConfig.from_hf(cfg)
    assert message in str(e.value)


def test_config_direct_errors():
    kw = dict(hidden_size=16, num_heads=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=8, v_head_dim=8)
    with pytest.raises(ValueError, match=r"\['rope_factor'\] only apply to rope_type='yarn'"):
        MLAConfig(**kw, rope_factor=4.0)
    with pytest.raises(ValueError, match="rope_type='ntk' is not supported"):
        MLAConfig(**kw, rope_type="ntk")
    with pytest.raises(ValueError, match="q_lora_rank must be a positive integer, got 0"):
        MLAConfig(**dict(kw, q_lora_rank=0))


# ------------------------------------------------------------------------------------------------ RoPE


def rope_complex(x, positions, inv_freq):
    """RoPE as DeepSeek's view_as_complex: pair i = x[2i] + 1j·x[2i+1], times exp(1j·θ)."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * np.outer(positions, inv_freq))
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


@given(configs, st.integers(0, 2**31))
def test_rope_interleaved_matches_complex(config, seed):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, config.max_position_embeddings, size=7)
    x = rng.standard_normal((7, config.qk_rope_head_dim))
    cos, sin = rope_cos_sin(config, pos)
    assert cos.shape == (7, config.qk_rope_head_dim // 2)
    ref = rope_complex(x, pos, config.rope_inv_freq()) * config.rope_cos_sin_scale
    np.testing.assert_allclose(apply_rope_interleaved(x, cos, sin), ref, rtol=1e-12, atol=1e-12)
    # multi-head broadcast, and HF's convention: rotate-half on the evens-then-odds order
    xh = rng.standard_normal((7, 3, config.qk_rope_head_dim))
    out = apply_rope_interleaved(xh, cos[:, None], sin[:, None])
    np.testing.assert_allclose(out[:, 1], apply_rope_interleaved(xh[:, 1], cos, sin), rtol=1e-15)
    np.testing.assert_allclose(deinterleave(out), apply_rope_rotate_half(deinterleave(xh), cos[:, None], sin[:, None]),
                               rtol=1e-13, atol=1e-13)


def test_interleave_helpers():
    x = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(deinterleave(x), [[0, 2, 4, 1, 3, 5], [6, 8, 10, 7, 9, 11]])
    np.testing.assert_array_equal(interleave(deinterleave(x)), x)
    assert interleave(x.astype(BF16)).dtype == BF16
    assert KPE_ORDER == "interleaved"
    with pytest.raises(ValueError, match="last dim must be even"):
        deinterleave(np.zeros(5))


def test_rope_errors():
    c = MLAConfig.deepseek_v3()
    with pytest.raises(ValueError, match="position 163840 is past max_position_embeddings=163840"):
        rope_cos_sin(c, [0, 163840])
    with pytest.raises(ValueError, match="negative position -1"):
        rope_cos_sin(c, [-1])
    with pytest.raises(ValueError, match="positions must be integers"):
        rope_cos_sin(c, [1.5])
    with pytest.raises(ValueError, match="must both end in 32"):
        apply_rope_interleaved(np.zeros((2, 64)), np.zeros((2, 16)), np.zeros((2, 16)))


# ------------------------------------------------------------------------------------------------ weights


def test_weights_r1_shapes_small_and_split():
    c = MLAConfig.from_hf(dict(R1_LEGACY, hidden_size=64, num_attention_heads=3, q_lora_rank=32, kv_lora_rank=48))
    sd = random_state_dict(c, layer=5, seed=1)
    w = MLAWeights.from_hf(sd, 5, c)
    kvb = sd["model.layers.5.self_attn.kv_b_proj.weight"].astype(BF16)
    assert w.w_uk.shape == (3, 128, 48) and w.w_uv.shape == (3, 128, 48)
    for h in range(3):  # §3: per head, rows h·256 + [0, 128) = W_UK, h·256 + [128, 256) = W_UV
        np.testing.assert_array_equal(w.w_uk[h], kvb[h * 256: h * 256 + 128])
        np.testing.assert_array_equal(w.w_uv[h], kvb[h * 256 + 128: h * 256 + 256])
    assert w.q_proj is None and w.q_proj_nz is None and w.int8 is None
    assert w.input_layernorm.shape == (64,)
    for nz, nd in NZ_OF.items():
        if getattr(w, nd) is None:
            continue
        src = getattr(w, nd)
        src = src.transpose(0, 2, 1) if nz == "w_uk_nz" else src
        packed = getattr(w, nz)
        assert packed.dtype == BF16
        np.testing.assert_array_equal(nz_to_nd(packed, src.shape), src)
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "w_uk", "o_proj_nz"):
        arr = getattr(w, name)
        assert arr.dtype == BF16 and not arr.flags.writeable
    np.testing.assert_array_equal(w.o_proj, sd["model.layers.5.self_attn.o_proj.weight"].astype(BF16))


def test_weights_q_lora_none_and_missing_input_norm():
    c = MLAConfig(hidden_size=32, num_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=8, v_head_dim=8)
    sd = random_state_dict(c, layer=0)
    assert "model.layers.0.self_attn.q_proj.weight" in sd and "model.layers.0.self_attn.q_a_proj.weight" not in sd
    del sd["model.layers.0.input_layernorm.weight"]
    w = MLAWeights.from_hf(sd, 0, c)
    assert w.q_a_proj is None and w.q_b_proj is None and w.q_proj.shape == (32, 32) and w.input_layernorm is None
    with pytest.raises(ValueError, match="input_norm=True but the weights have no input_layernorm"):
        mla_forward_reference(np.zeros((1, 32)), w, c, input_norm=True)


SMALL = MLAConfig(hidden_size=32, num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=8, v_head_dim=16)


def test_weights_errors():
    sd = random_state_dict(SMALL, layer=1)
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    with pytest.raises(KeyError, match=r"missing tensor 'model.layers.1.self_attn.kv_b_proj.weight'"):
        MLAWeights.from_hf({k: v for k, v in sd.items() if k != key}, 1, SMALL)
    with pytest.raises(KeyError, match="model.layers.0.self_attn"):
        MLAWeights.from_hf(sd, 0, SMALL)
    with pytest.raises(ValueError, match=r"kv_b_proj.weight: expected shape \(48, 16\), got \(48, 17\)"):
        MLAWeights.from_hf(dict(sd, **{key: np.zeros((48, 17), np.float32)}), 1, SMALL)
    with pytest.raises(ValueError, match=r"o_proj.weight: expected shape \(32, 32\), got \(32,\)"):
        MLAWeights.from_hf(dict(sd, **{"model.layers.1.self_attn.o_proj.weight": np.zeros(32)}), 1, SMALL)
    with pytest.raises(ValueError, match="kv_b_proj.weight: dtype int32 is not a float dtype"):
        MLAWeights.from_hf(dict(sd, **{key: np.zeros((48, 16), np.int32)}), 1, SMALL)
    with pytest.raises(ValueError, match="q_proj.weight is present but config.q_lora_rank=16"):
        MLAWeights.from_hf(dict(sd, **{"model.layers.1.self_attn.q_proj.weight": np.zeros((32, 32))}), 1, SMALL)
    with pytest.raises(ValueError, match="layer must be a non-negative integer"):
        MLAWeights.from_hf(sd, -1, SMALL)


def test_weights_fp8_dequant():
    sd = random_state_dict(SMALL, layer=0)
    key = "model.layers.0.self_attn.o_proj.weight"
    w8 = (sd[key] * 8).astype(ml_dtypes.float8_e4m3fn)
    scale = np.array([[0.125]], np.float32)  # one 128 x 128 block covers [32, 32]
    w = MLAWeights.from_hf(dict(sd, **{key: w8, key + "_scale_inv": scale}), 0, SMALL)
    np.testing.assert_array_equal(w.o_proj, (w8.astype(np.float32) * 0.125).astype(BF16))
    with pytest.raises(KeyError, match="o_proj.weight_scale_inv"):
        MLAWeights.from_hf(dict(sd, **{key: w8}), 0, SMALL)
    with pytest.raises(ValueError, match=r"o_proj.weight_scale_inv: expected shape \(1, 1\), got \(2, 1\)"):
        MLAWeights.from_hf(dict(sd, **{key: w8, key + "_scale_inv": np.ones((2, 1), np.float32)}), 0, SMALL)


def test_weights_int8():
    w = MLAWeights.from_hf(random_state_dict(SMALL), 0, SMALL, int8=True)
    assert set(w.int8) == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"}
    for name, q in w.int8.items():
        ref = getattr(w, name).astype(np.float64)
        assert q.q.dtype == np.int8 and q.scale.shape == (ref.shape[0],) and q.packed.shape == ref.shape
        np.testing.assert_allclose(q.q * q.scale[:, None].astype(np.float64), ref, atol=np.abs(ref).max() / 127)


# ------------------------------------------------------------------------------------------------ references


@given(configs, st.integers(1, 40), st.integers(0, 8), st.integers(1, 3), st.integers(0, 2**31))
def test_naive_equals_absorbed(config, length, past_len, s, seed):
    w, rng = setup(config, seed)
    s = min(s, length)
    q_nope = rng.standard_normal((s, config.num_heads, config.qk_nope_head_dim))
    q_pe = rng.standard_normal((s, config.num_heads, config.qk_rope_head_dim))
    c_kv = rng.standard_normal((length + past_len, config.kv_lora_rank))
    k_pe = rng.standard_normal((length + past_len, config.qk_rope_head_dim))
    naive = mla_attention_naive_reference(q_nope, q_pe, c_kv, k_pe, w)
    absorbed = mla_attention_absorbed_reference(q_nope, q_pe, c_kv, k_pe, w)
    assert naive.shape == (s, config.num_heads, config.v_head_dim)
    np.testing.assert_allclose(absorbed, naive, rtol=1e-10, atol=1e-12)


@given(configs, st.lists(st.integers(0, 12), min_size=1, max_size=3), st.integers(0, 2**31))
def test_forward_forms_agree_and_pack(config, lens, seed):
    w, rng = setup(config, seed)
    x = rng.standard_normal((sum(lens), config.hidden_size))
    out = mla_forward_reference(x, w, config, lens)
    assert out.shape == x.shape
    np.testing.assert_allclose(mla_forward_reference(x, w, None, lens, form="absorbed"), out, rtol=1e-10, atol=1e-12)
    start = 0
    for n in lens:  # packed sequences are independent
        np.testing.assert_allclose(mla_forward_reference(x[start:start + n], w, config, [n]), out[start:start + n],
                                   rtol=1e-12, atol=1e-13)
        start += n


@given(configs, st.integers(2, 30), st.data())
def test_chunked_prefill_and_decode_equal_whole(config, n, data):
    seed = data.draw(st.integers(0, 2**31))
    w, rng = setup(config, seed)
    x = rng.standard_normal((n, config.hidden_size))
    whole, [(c_kv, k_pe)] = mla_forward_reference(x, w, config, [n], return_cache=True)
    cuts = sorted(data.draw(st.lists(st.integers(1, n - 1), max_size=3, unique=True)))
    form = data.draw(st.sampled_from(["naive", "absorbed"]))
    past, start = None, 0
    for stop in cuts + [n]:  # chunked prefill; a 1- or 2-token chunk is a decode (MTP) step
        out, [cache] = mla_forward_reference(x[start:stop], w, config, [stop - start],
                                             past=None if past is None else [past], form=form, return_cache=True)
        np.testing.assert_allclose(out, whole[start:stop], rtol=1e-10, atol=1e-12)
        past, start = cache, stop
    np.testing.assert_allclose(past[0], c_kv, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(past[1], k_pe, rtol=1e-12, atol=1e-13)
    # batched decode: every sequence one token, each with its own cache
    past2 = [(c_kv[:n - 1], k_pe[:n - 1]), (c_kv[:1], k_pe[:1])]
    dec = mla_forward_reference(np.stack([x[n - 1], x[1]]), w, config, [1, 1], past=past2, form="absorbed")
    np.testing.assert_allclose(dec, whole[[n - 1, 1]], rtol=1e-10, atol=1e-12)


def hf_style_forward(x, w, config):
    """One sequence through HF's DeepseekV3Attention as written there (eager, rope_interleave=True), per head.

    Norms in float64 here (the reference normalises in fp32, hence the test's tolerance).
    """
    def norm(v, g):
        return g * v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + config.rms_norm_eps)

    f = {k: None if v is None else v.astype(np.float64) for k, v in vars(w).items() if isinstance(v, np.ndarray)}
    t, h = x.shape[0], config.num_heads
    nope, r, v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    if config.q_lora_rank is None:
        q = x @ f["q_proj"].T
    else:
        q = norm(x @ f["q_a_proj"].T, f["q_a_layernorm"]) @ f["q_b_proj"].T
    q = q.reshape(t, h, nope + r).transpose(1, 0, 2)  # [h, t, 192]
    ckv = x @ f["kv_a_proj_with_mqa"].T
    k_pass, k_rot = ckv[:, :config.kv_lora_rank], ckv[:, config.kv_lora_rank:]
    kv = (norm(k_pass, f["kv_a_layernorm"]) @ f["kv_b_proj"].T).reshape(t, h, nope + v_dim).transpose(1, 0, 2)
    k_nope, value = kv[..., :nope], kv[..., nope:]
    theta = np.arange(t)[:, None] * config.rope_inv_freq()[None, :]
    emb = np.concatenate([theta, theta], axis=-1)
    cos, sin = np.cos(emb) * config.rope_cos_sin_scale, np.sin(emb) * config.rope_cos_sin_scale

    def rot(v):  # HF: permute to evens-then-odds, then rotate_half
        v = v.reshape(*v.shape[:-1], r // 2, 2).swapaxes(-1, -2).reshape(v.shape)
        half = np.concatenate([-v[..., r // 2:], v[..., : r // 2]], axis=-1)
        return v * cos + half * sin

    q_states = np.concatenate([q[..., :nope], rot(q[..., nope:])], axis=-1)
    k_states = np.concatenate([k_nope, np.broadcast_to(rot(k_rot), (h, t, r))], axis=-1)
    scores = q_states @ k_states.transpose(0, 2, 1) * config.softmax_scale
    scores = np.where(np.tri(t, dtype=bool), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ value).transpose(1, 0, 2).reshape(t, h * v_dim)
    return o @ f["o_proj"].T


@given(configs, st.integers(1, 24), st.integers(0, 2**31))
def test_forward_matches_hf_convention(config, n, seed):
    w, rng = setup(config, seed)
    x = rng.standard_normal((n, config.hidden_size))
    np.testing.assert_allclose(mla_forward_reference(x, w, config, [n]), hf_style_forward(x, w, config),
                               rtol=1e-4, atol=1e-5)


def test_prolog_shapes_rope_and_bf16_mode():
    w, rng = setup(SMALL, 0)
    x = rng.standard_normal((5, 32))
    pos = np.array([0, 1, 2, 7, 9])
    q_nope, q_pe, c_kv, k_pe = mla_prolog_reference(x, w, pos)
    assert (q_nope.shape, q_pe.shape, c_kv.shape, k_pe.shape) == ((5, 2, 8), (5, 2, 8), (5, 16), (5, 8))
    raw_k = (x @ w.kv_a_proj_with_mqa.astype(np.float64).T)[:, 16:]
    np.testing.assert_allclose(k_pe, rope_complex(raw_k, pos, SMALL.rope_inv_freq()), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.sqrt(np.mean((c_kv / w.kv_a_layernorm.astype(np.float64)) ** 2, -1)), 1, rtol=1e-5)
    outs = mla_prolog_reference(x, w, pos, act_dtype=BF16)
    for a, b in zip(outs, (q_nope, q_pe, c_kv, k_pe)):
        assert np.all(a.astype(BF16).astype(np.float64) == a)  # bf16-representable
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05)


@given(st.integers(1, 3), st.integers(1, 2), st.integers(2, 20), st.integers(0, 2**31))
def test_absorbed_decode_reference_batch_causal_lse(batch, s_q, length, seed):
    rng = np.random.default_rng(seed)
    h, big_c, r = 3, 16, 8
    q_lat, q_pe = rng.standard_normal((batch, s_q, h, big_c)), rng.standard_normal((batch, s_q, h, r))
    c_kv, k_pe = rng.standard_normal((batch, length, big_c)), rng.standard_normal((batch, length, r))
    o, lse = mla_absorbed_decode_reference(q_lat, q_pe, c_kv, k_pe, 0.3, return_lse=True)
    assert o.shape == (batch, s_q, h, big_c) and lse.shape == (batch, s_q, h)
    for b in range(batch):
        for j in range(s_q):  # query j sees tokens 0 .. length - s_q + j
            n = length - s_q + j + 1
            sc = 0.3 * (c_kv[b, :n] @ q_lat[b, j].T + k_pe[b, :n] @ q_pe[b, j].T)  # [n, h]
            p = np.exp(sc - sc.max(0))
            np.testing.assert_allclose(o[b, j], (p / p.sum(0)).T @ c_kv[b, :n], rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(lse[b, j], sc.max(0) + np.log(p.sum(0)), rtol=1e-12)


def test_reference_errors():
    w, _ = setup(SMALL, 0)
    with pytest.raises(ValueError, match=r"hidden must have shape \[\*, 32\], got \[3, 31\]"):
        mla_forward_reference(np.zeros((3, 31)), w, SMALL)
    with pytest.raises(ValueError, match=r"seq_lens \[1, 1\] must be non-negative and sum to T=3"):
        mla_forward_reference(np.zeros((3, 32)), w, SMALL, [1, 1])
    with pytest.raises(ValueError, match="config differs from weights.config"):
        mla_forward_reference(np.zeros((3, 32)), w, MLAConfig.deepseek_v3())
    with pytest.raises(ValueError, match=r"past\[0\] k_pe must have shape \[4, 8\], got \[3, 8\]"):
        mla_forward_reference(np.zeros((1, 32)), w, SMALL, [1], past=[(np.zeros((4, 16)), np.zeros((3, 8)))])
    with pytest.raises(ValueError, match="position 4096 is past max_position_embeddings=4096"):
        mla_forward_reference(np.zeros((1, 32)), w, SMALL, [1], past=[(np.zeros((4096, 16)), np.zeros((4096, 8)))])
    with pytest.raises(ValueError, match="form must be one of"):
        mla_forward_reference(np.zeros((1, 32)), w, SMALL, form="flash")
    with pytest.raises(ValueError, match="causal attention needs at least as many keys as queries, got 1 < 2"):
        mla_absorbed_decode_reference(np.zeros((2, 1, 4)), np.zeros((2, 1, 2)), np.zeros((1, 4)), np.zeros((1, 2)),
                                      1.0)
