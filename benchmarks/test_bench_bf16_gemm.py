"""The BF16 GEMMs (ops/gemm.py) on one 910C die at the DeepSeek-R1 MLA projection shapes, timing-only.

    python -m pytest benchmarks/test_bench_bf16_gemm.py -q -s -p no:cacheprovider            # decode set, ~5 s
    ASCENDEMU_BENCH_FULL=1 python -m pytest benchmarks/test_bench_bf16_gemm.py -q -s           # + prefill M = 4096

Shapes (y = x·Wᵀ, W [N, K]): q_a + kv_a fused (N = 1536 + 576 = 2112, K = 7168), q_b (N = 128·192 = 24576,
K = 1536), kv_b (prefill only: N = 128·256 = 32768, K = 512), o_proj (N = 7168, K = 16384), at decode M = 96 and
prefill M = 4096; and the absorbed per-head GEMMs at M = 96, H = 128: W_UK (K = 128 → N = 512) and W_UV
(K = 512 → N = 128). Each records modelled µs, TFLOPS, % of the die's BF16 cube peak (24 × 4096 MACs per cycle at
1850 MHz = 363.7 TFLOPS), HBM GB/s and % of peak, the binding resource (as in test_bench_int8_gemm.py: HBM ≥ 85 %
of 1.6 TB/s, compute = cube ≥ 85 % busy, …) and the host seconds in `extra_info`.

Recorded on the development box (2 vCPU, shared; modelled figures are exact, host times vary with load): see the
README's table. In short, decode is HBM-bound on the weights plus each core's re-read of the activation rows
(24 n-tiles × M × K; no L2 in the model), prefill is bound by HBM or the cube depending on K.
"""
import os
import time

import pytest

import ascendemu
from ascendemu.ops.gemm import batched_bf16_gemm, bf16_gemm, pack_weight, packed_heads, packed_shape, plan_gemm

FULL = bool(os.environ.get("ASCENDEMU_BENCH_FULL"))
full_only = pytest.mark.skipif(not FULL, reason="10–60 s of host time each; set ASCENDEMU_BENCH_FULL=1")
BOUND_AT = 0.85
R1 = {"q_a+kv_a": (7168, 2112), "q_b": (1536, 24576), "kv_b": (512, 32768), "o_proj": (16384, 7168)}


def _timing_die():
    return ascendemu.Die("910c", functional=False, checks=ascendemu.Checks(trace=False))


def _metrics(report, spec) -> dict:
    cycles = report.cycles
    us = cycles / spec.clock_mhz
    util = {}
    aics = [c for c in report.cores if c.kind == "aic"]
    for pipe in ("M", "MTE1", "MTE2", "FIX"):
        util[pipe] = sum(c.busy.get(pipe, 0) for c in aics) / (len(aics) * cycles)
    hbm_frac = report.hbm_bytes / (us * 1e-6) / spec.peak_hbm_bytes_per_s
    cands = {"HBM": hbm_frac, "compute": util["M"], "L1/L0 feed": util["MTE1"]}
    bound = next((k for k, v in cands.items() if v >= BOUND_AT), None) or \
        f"none ≥ {BOUND_AT:.0%} (largest: {max(cands, key=cands.get)})"
    tflops = report.flops / (us * 1e-6) / 1e12
    return {"cycles": cycles, "time_us": round(us, 2), "tflops": round(tflops, 1),
            "pct_bf16_peak": round(100 * tflops * 1e12 / spec.peak_cube_ops_per_s("bfloat16"), 1),
            "hbm_gbps": round(report.hbm_bytes / (us * 1e-6) / 1e9, 1), "hbm_pct_peak": round(100 * hbm_frac, 1),
            "bound": bound, "utilisation": {k: round(v, 3) for k, v in util.items()}}


def _record(benchmark, name, report, spec, plan, host_s):
    info = _metrics(report, spec)
    t = plan.tiles
    info["tiles"] = f"{t.m}x{t.n}x{t.k} kc={t.kc}{' resident B' if plan.resident else ''}, {plan.cores_used} AIC"
    info["host_s_timing_only"] = round(host_s, 2)
    benchmark.extra_info.update(info)
    print(f"\n{name} [{info['tiles']}]: {info['time_us']} µs, {info['tflops']} TFLOPS = {info['pct_bf16_peak']}% of "
          f"BF16 peak, HBM {info['hbm_gbps']} GB/s ({info['hbm_pct_peak']}%), bound: {info['bound']}; "
          f"util {info['utilisation']}; host {host_s:.1f} s")
    return info


def _gemm(die, m, k, n):
    a = die.gm.empty((m, k), "bfloat16")
    w = pack_weight(die.gm.empty((n, k), "bfloat16"))
    y = bf16_gemm(die, a, w)
    for t in (a, w.data, y):
        die.gm.free(t)
    return die.last_report


def _bench(benchmark, name, m):
    k, n = R1[name]
    die = _timing_die()
    t0 = time.perf_counter()
    report = benchmark.pedantic(_gemm, args=(die, m, k, n), rounds=1, iterations=1)
    host = time.perf_counter() - t0
    assert not report.functional and report.flops == 2 * m * k * n
    plan = plan_gemm(die.spec, [m], n, k, in_dtype="bfloat16", out_dtype="bfloat16")
    return _record(benchmark, f"bf16_gemm {name} M={m} K={k} N={n}", report, die.spec, plan, host)


@pytest.mark.parametrize("name", ["q_a+kv_a", "q_b", "o_proj"])
def test_bench_bf16_gemm_decode(benchmark, name):
    info = _bench(benchmark, name, 96)
    assert info["bound"] == "HBM"  # the weights, and the activation re-reads (module docstring)


@full_only
@pytest.mark.parametrize("name", ["q_a+kv_a", "q_b", "kv_b", "o_proj"])
def test_bench_bf16_gemm_prefill(benchmark, name):
    info = _bench(benchmark, name, 4096)
    assert info["pct_bf16_peak"] > 30


def _batched(die, m, h, k, n):
    a = die.gm.empty((m, h, k), "bfloat16")
    stack = die.gm.empty((h,) + packed_shape(n, k, "bfloat16"), "bfloat16")
    y = batched_bf16_gemm(die, a, packed_heads(stack, n, k))
    for t in (a, stack, y):
        die.gm.free(t)
    return die.last_report


@pytest.mark.parametrize("name, k, n", [("W_UK", 128, 512), ("W_UV", 512, 128)])
def test_bench_batched_bf16_gemm_decode(benchmark, name, k, n):
    m, h = 96, 128
    die = _timing_die()
    t0 = time.perf_counter()
    report = benchmark.pedantic(_batched, args=(die, m, h, k, n), rounds=1, iterations=1)
    host = time.perf_counter() - t0
    assert report.flops == 2 * m * h * k * n
    plan = plan_gemm(die.spec, [m] * h, n, k, in_dtype="bfloat16", out_dtype="bfloat16", a_pitch=h * k,
                     a_group_stride=k, y_pitch=h * n, y_group_stride=n)
    info = _record(benchmark, f"batched_bf16_gemm {name} M={m} H={h} K={k} N={n}", report, die.spec, plan, host)
    assert info["bound"] == "HBM"
