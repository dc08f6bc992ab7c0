"""The whole MLA attention sublayer (ops/mla/layer.py) on one 910C die, timing-only, DeepSeek-R1 dimensions.

    python -m pytest benchmarks/test_bench_mla_layer.py -q -s                    # decode B96 × KV 4096, bf16
    MLA_BENCH_ALL=1 python -m pytest benchmarks/test_bench_mla_layer.py -q -s    # also INT8, MTP, a 4096-token prefill

R1 (MLAConfig.deepseek_v3): hidden 7168, 128 heads, q_lora 1536, kv_lora 512, head dims 128 + 64 / 128; block size
128; every sequence already holds KV − 1 tokens (`allocate`d, no data), so each decode step attends to KV 4096.
Weights: a zero R1 state dict (timing-only: the values do not matter, the shapes do). Hidden states are phantoms.
Figures: modelled µs per phase (prolog: projections, norms, RoPE, cache write, and for decode q_lat = q_nope·W_UK;
attention: mla_attention_decode + W_UV, or for prefill the cache gather, kv_b_proj, k/v assembly and
mla_attention_prefill; o_proj), the number of launches, and host seconds.

Recorded on the development box (modelled figures are exact and repeatable; host seconds vary, 2 shared vCPU,
other jobs running):

  shape                          µs       prolog   attention   o_proj   launches   host s
  decode B96 KV4096 s_q1 bf16    1567.7   157.0    1218.4      192.3    10          48
  decode B96 KV4096 s_q1 INT8    1441.1   119.2    1218.4      103.6    13          57
  decode B96 KV4096 s_q2 bf16    2997.3   251.1    2419.2      327.0    10         190
  prefill 1 × 4096 bf16         28438.9  2878.4   18466.3     7094.3     9         890

Decode bf16, per launch: prolog = q_kv_a GEMM 39.4 + norms/RoPE/cache write 1.7 + q_b GEMM 70.3 + q_nope slice 4.2
+ W_UK batched GEMM 22.7 + q RoPE and [q_lat | q_pe] 18.6; attention = mla_attention_decode 926.8 + merge 269.4 +
W_UV batched GEMM 22.1; o_proj 192.3. Attention is 78 % of the sublayer and HBM-bound on its GM workspaces (no L2
model: see test_bench_mla.py). INT8 halves the dense weights' bytes: o_proj 192 → 104 µs, prolog 157 → 119 µs.
"""
import os
import time

import ml_dtypes
import numpy as np
import pytest

import ascendemu
from ascendemu.ops.mla import MLACache, MLAConfig, MLAWeights
from ascendemu.ops.mla.layer import mla_decode, mla_prefill
from ascendemu.ops.mla.weights import expected_shapes, hf_names

BF16 = np.dtype(ml_dtypes.bfloat16)
BLOCK = 128
ALL = os.environ.get("MLA_BENCH_ALL") == "1"
CFG = MLAConfig.deepseek_v3()
_WEIGHTS = {}


def r1_weights(int8: bool) -> MLAWeights:
    """R1-shaped weights of zeros (bf16), built once per process (about 10 s with INT8)."""
    if int8 not in _WEIGHTS:
        shapes = expected_shapes(CFG)
        sd = {key: np.zeros(shapes[attr] if attr in shapes else (CFG.hidden_size,), BF16)
              for attr, key in hf_names(0, CFG).items()}
        _WEIGHTS[int8] = MLAWeights.from_hf(sd, 0, CFG, int8=int8)
    return _WEIGHTS[int8]


def _info(name, stats, host, tokens):
    return {
        "shape": name,
        "time_us": round(stats.total_us, 1),
        "prolog_us": round(stats.prolog_us, 1),
        "attention_us": round(stats.attention_us, 1),
        "o_proj_us": round(stats.o_proj_us, 1),
        "launches": stats.launches,
        "us_per_token": round(stats.total_us / tokens, 2),
        "host_s": round(host, 2),
        "host_s_attention": round(stats.host_s["attention"], 2),
    }


def run_decode(batch: int, kv: int, tps: int, int8: bool) -> dict:
    w = r1_weights(int8)
    die = ascendemu.Die("910c", functional=False, checks=ascendemu.Checks(trace=False))
    cache = MLACache(die, CFG, batch * -(-kv // BLOCK), BLOCK)
    ids = list(range(batch))
    cache.allocate(ids, [kv - tps] * batch)
    x = die.gm.empty((batch * tps, CFG.hidden_size), BF16)
    t0 = time.perf_counter()
    _, stats = mla_decode(die, x, w, cache, ids, tps, int8=int8, return_stats=True)
    return _info(f"decode B{batch} KV{kv} s_q{tps} {'INT8' if int8 else 'bf16'}", stats, time.perf_counter() - t0,
                 batch * tps)


def run_prefill(tokens: int, int8: bool) -> dict:
    w = r1_weights(int8)
    die = ascendemu.Die("910c", functional=False, checks=ascendemu.Checks(trace=False))
    cache = MLACache(die, CFG, -(-tokens // BLOCK), BLOCK)
    x = die.gm.empty((tokens, CFG.hidden_size), BF16)
    t0 = time.perf_counter()
    _, stats = mla_prefill(die, x, w, cache, [0], [tokens], int8=int8, return_stats=True)
    return _info(f"prefill 1 × {tokens} {'INT8' if int8 else 'bf16'}", stats, time.perf_counter() - t0, tokens)


def _bench(benchmark, fn, *args):  # the default shape takes ~30 s of host time, 20 of them mla_attention_decode
    info = benchmark.pedantic(fn, args=args, rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    print(f"\n{info['shape']}: {info['time_us']} µs = prolog {info['prolog_us']} + attention {info['attention_us']} "
          f"+ o_proj {info['o_proj_us']} ({info['launches']} launches, {info['us_per_token']} µs/token); "
          f"host {info['host_s']} s")
    assert info["prolog_us"] > 0 and info["attention_us"] > 0 and info["o_proj_us"] > 0
    return info


DECODE = [(96, 4096, 1, False)]
DECODE_MORE = [(96, 4096, 1, True), (96, 4096, 2, False), (96, 4096, 2, True)]


@pytest.mark.parametrize("shape", DECODE, ids=[f"B{b}-KV{n}-sq{s}-{'int8' if q else 'bf16'}"
                                               for b, n, s, q in DECODE])
def test_bench_mla_decode_layer(benchmark, shape):
    _bench(benchmark, run_decode, *shape)


@pytest.mark.skipif(not ALL, reason="set MLA_BENCH_ALL=1 (each shape takes 30–70 s of host time)")
@pytest.mark.parametrize("shape", DECODE_MORE, ids=[f"B{b}-KV{n}-sq{s}-{'int8' if q else 'bf16'}"
                                                    for b, n, s, q in DECODE_MORE])
def test_bench_mla_decode_layer_mtp(benchmark, shape):
    _bench(benchmark, run_decode, *shape)


@pytest.mark.skipif(not ALL, reason="set MLA_BENCH_ALL=1 (a 4096-token prefill takes minutes of host time)")
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_bench_mla_prefill_layer(benchmark, int8):
    _bench(benchmark, run_prefill, 4096, int8)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", "-s"]))
