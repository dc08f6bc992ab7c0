"""The INT8 GEMM family (ops/int8_gemm.py) on one 910C die at DeepSeek-R1 shapes, timing-only.

    python -m pytest benchmarks/test_bench_int8_gemm.py -q -s -p no:cacheprovider            # default set, < 1 min
    ASCENDEMU_BENCH_FULL=1 python -m pytest benchmarks/test_bench_int8_gemm.py -q -s           # every shape, ~5 min

Each benchmark records modelled µs, TOPS, % of the die's INT8 cube peak (727 TOPS), HBM GB/s and the binding
resource in `extra_info`, judged from the launch's utilisations: HBM (≥ 85 % of the die's 1.6 TB/s), compute (AIC
cube ≥ 85 % busy), L1/L0 feed (MTE1 ≥ 85 %), else the largest of them. The big shapes take 6–100 s of host time
each in timing-only mode, so they run only with ASCENDEMU_BENCH_FULL=1.

Recorded on the development box (2 vCPU, shared; modelled figures are exact, host times vary with load):

  shape (M, K, N)                tiles m×n×k (B)       µs      TOPS   % peak  HBM GB/s  bound  host s (timing-only)
  4096 × 7168 × 4096             128×256×128            990.3  242.9  33.4    1594      HBM     8–13
  16384 × 7168 × 2048            128×256×128           1973.9  243.7  33.5    1599      HBM    23
  16384 × 2048 × 7168            64×224×128, resident  1431.2  336.1  46.2    1598      HBM    47
  8192 × 7168 × 1536             128×256×128            740.4  243.6  33.5    1599      HBM     6
  8192 × 1536 × 24576            64×304×96, resident   1970.0  313.9  43.2    1578      HBM   104
  96 × 7168 × 2048               96×96×256 (22 AIC)      20.4  138.1  19.0    1559      HBM     0.6
  96 × 2048 × 7168               96×336×96 (22 AIC)      16.9  166.5  22.9    1533      HBM     0.2
  decode EP320: 1 expert, 1024 rows, gate_up 7168→4096 (250.6 µs) + down 2048→7168 (104.4 µs)
                                                        354.9  254.1  34.9    1573      HBM     4.7
  prefill EP32: 10 experts, 16384 rows [777, 1188, 26, 1, 650, 1876, 770, 886, 3284, 6926],
                gate_up (4204.3 µs) + down (1522.3 µs)  5726.6  252.0  34.6    1561      HBM    82

  host, functional int8_gemm 2048³ (race checker on): 3.7–3.9 s against int8_gemm_reference's 0.2–0.4 s
  (float64 BLAS on 2 threads), 9–19×. Per instruction the machine's Python costs (issue, race checker, bounds
  and offset arithmetic on tiny arrays) dominate; the BLAS products are ~10 % of the emulation.

Every shape is HBM-bound in this model: the emulator does not model L2, so every GM read (each core's re-read of
the A rows and B columns of its tiles, and the int32 workspace the AIVs dequantise) goes to HBM at 865 B/cycle
shared by the die. An L0C accumulator of at most 128 KiB caps a tile's reuse at m·n/(m+n) ≈ 85 MACs per byte (B
resident in L1: n MACs per byte), against the ~227 MACs per HBM byte the cube's peak needs.
"""
import os
import time

import numpy as np
import pytest

import ascendemu
from ascendemu.ops.int8_gemm import (grouped_int8_gemm, int8_gemm, int8_gemm_reference, pack_weight,
                                     plan_int8_gemm, quantize_weight_per_channel)

FULL = bool(os.environ.get("ASCENDEMU_BENCH_FULL"))
full_only = pytest.mark.skipif(not FULL, reason="8–50 s of host time each; set ASCENDEMU_BENCH_FULL=1")
BOUND_AT = 0.85


def _timing_die():
    return ascendemu.Die("910c", functional=False, checks=ascendemu.Checks(trace=False))


def _metrics(reports, spec) -> dict:
    """Figures of one or more launches run back to back (their times add)."""
    cycles = sum(r.cycles for r in reports)
    us = cycles / spec.clock_mhz
    ops = sum(r.flops for r in reports)
    hbm = sum(r.hbm_bytes for r in reports)
    util = {}
    for pipe, kind in (("M", "aic"), ("MTE1", "aic"), ("MTE2", "aic"), ("FIX", "aic"), ("V", "aiv")):
        busy = sum(sum(c.busy.get(pipe, 0) for c in r.cores if c.kind == kind) for r in reports)
        n = sum(1 for c in reports[0].cores if c.kind == kind)
        util[pipe] = busy / (n * cycles)
    hbm_frac = hbm / (us * 1e-6) / spec.peak_hbm_bytes_per_s
    cands = {"HBM": hbm_frac, "compute": util["M"], "L1/L0 feed": util["MTE1"]}
    bound = next((k for k, v in cands.items() if v >= BOUND_AT), None) or \
        f"none ≥ {BOUND_AT:.0%} (largest: {max(cands, key=cands.get)})"
    tops = ops / (us * 1e-6) / 1e12
    return {"cycles": cycles, "time_us": round(us, 2), "tops": round(tops, 1),
            "pct_int8_peak": round(100 * tops * 1e12 / spec.peak_cube_ops_per_s("int8"), 1),
            "hbm_gbps": round(hbm / (us * 1e-6) / 1e9, 1), "hbm_pct_peak": round(100 * hbm_frac, 1),
            "bound": bound, "utilisation": {k: round(v, 3) for k, v in util.items()}}


def _record(benchmark, name, info, host_s, extra=""):
    info = dict(info, host_s_timing_only=round(host_s, 2))
    benchmark.extra_info.update(info)
    print(f"\n{name}: {info['time_us']} µs, {info['tops']} TOPS = {info['pct_int8_peak']}% of INT8 peak, "
          f"HBM {info['hbm_gbps']} GB/s ({info['hbm_pct_peak']}%), bound: {info['bound']}; "
          f"util {info['utilisation']}{extra}; host {host_s:.1f} s")
    return info


def _gemm(die, m, k, n):
    a = die.gm.empty((m, k), "int8")
    s = die.gm.empty(m, "float32")
    w = pack_weight(die.gm.empty((n, k), "int8"))
    ws = die.gm.empty(n, "float32")
    y = int8_gemm(die, a, s, w, ws)
    for t in (a, s, w.data, ws, y):
        die.gm.free(t)
    return die.last_report


def _bench_shape(benchmark, m, k, n):
    die = _timing_die()
    t0 = time.perf_counter()
    report = benchmark.pedantic(_gemm, args=(die, m, k, n), rounds=1, iterations=1)
    host = time.perf_counter() - t0
    assert not report.functional and report.flops == 2 * m * k * n
    plan = plan_int8_gemm(die.spec, [m], n, k)
    t = plan.tiles
    info = _metrics([report], die.spec)
    info["tiles"] = f"{t.m}x{t.n}x{t.k} kc={t.kc}{' resident B' if plan.resident else ''}, {plan.cores_used} AIC"
    return _record(benchmark, f"int8_gemm M={m} K={k} N={n} [{info['tiles']}]", info, host)


SHAPES_FAST = [(96, 7168, 2048), (96, 2048, 7168), (8192, 7168, 1536), (4096, 7168, 4096)]
SHAPES_FULL = [(16384, 7168, 2048), (16384, 2048, 7168), (8192, 1536, 24576)]


@pytest.mark.parametrize("m, k, n", SHAPES_FAST)
def test_bench_int8_gemm(benchmark, m, k, n):
    info = _bench_shape(benchmark, m, k, n)
    assert info["bound"] == "HBM"  # see the module docstring: no L2 in the model


@full_only
@pytest.mark.parametrize("m, k, n", SHAPES_FULL)
def test_bench_int8_gemm_large(benchmark, m, k, n):
    info = _bench_shape(benchmark, m, k, n)
    assert info["bound"] == "HBM"


def _expert_mlp(die, sizes, k1=7168, n1=4096, k2=2048, n2=7168):
    """gate_up (K1 → N1) then down (K2 → N2) for experts of the given row counts, as grouped GEMMs."""
    m = int(sum(sizes))
    reports = []
    for k, n in ((k1, n1), (k2, n2)):
        a = die.gm.empty((m, k), "int8")
        s = die.gm.empty(m, "float32")
        ws = [pack_weight(die.gm.empty((n, k), "int8")) for _ in sizes]
        ss = [die.gm.empty(n, "float32") for _ in sizes]
        y = grouped_int8_gemm(die, a, s, sizes, ws, ss)
        reports.append(die.last_report)
        for t in [a, s, y] + [w.data for w in ws] + ss:
            die.gm.free(t)
    return reports


def test_bench_grouped_decode_ep320(benchmark):
    """One die's share of decode at EP320: ~1,024 routed token rows for its one local expert."""
    die = _timing_die()
    t0 = time.perf_counter()
    reports = benchmark.pedantic(_expert_mlp, args=(die, [1024]), rounds=1, iterations=1)
    host = time.perf_counter() - t0
    parts = ", ".join(f"{nm} {r.time_us:.1f} µs" for nm, r in zip(("gate_up", "down"), reports))
    info = _record(benchmark, "grouped decode EP320 (1 expert, 1024 rows)", _metrics(reports, die.spec), host,
                   f" [{parts}]")
    assert info["bound"] == "HBM"


def prefill_sizes(seed=0, experts=10, rows=16384):
    """Uneven routed-row counts of the local experts (a Dirichlet(1) share of the rows, fixed seed)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(rows, rng.dirichlet(np.ones(experts))).tolist()


@full_only
def test_bench_grouped_prefill_ep32(benchmark):
    """One die's share of prefill at EP32: 10 local experts, 16,384 routed rows, uneven."""
    sizes = prefill_sizes()
    die = _timing_die()
    t0 = time.perf_counter()
    reports = benchmark.pedantic(_expert_mlp, args=(die, sizes), rounds=1, iterations=1)
    host = time.perf_counter() - t0
    parts = ", ".join(f"{nm} {r.time_us:.1f} µs" for nm, r in zip(("gate_up", "down"), reports))
    info = _record(benchmark, f"grouped prefill EP32 (10 experts, rows {sizes})", _metrics(reports, die.spec), host,
                   f" [{parts}]")
    assert info["bound"] == "HBM"


def test_bench_host_functional_2048(benchmark):
    """Host seconds of the functional emulation against the NumPy reference, in the same run."""
    size = 2048
    rng = np.random.default_rng(0)
    a = rng.integers(-127, 128, (size, size)).astype(np.int8)
    q, s = quantize_weight_per_channel(rng.standard_normal((size, size)).astype(np.float32))
    a_scale = (rng.random(size) * 0.01 + 1e-3).astype(np.float32)
    w = pack_weight(q)
    die = ascendemu.Die("910c", checks=ascendemu.Checks(trace=False))
    t0 = time.perf_counter()
    y = benchmark.pedantic(int8_gemm, args=(die, a, a_scale, w, s), rounds=1, iterations=1)
    emu = time.perf_counter() - t0
    ref_s = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        ref = int8_gemm_reference(a, a_scale, q, s)
        ref_s = min(ref_s, time.perf_counter() - t0)
    np.testing.assert_array_equal(y.view(np.uint16), ref.view(np.uint16))
    info = {"host_s_emulation": round(emu, 3), "host_s_reference": round(ref_s, 3),
            "host_ratio": round(emu / ref_s, 2), "modelled_us": round(die.last_report.time_us, 2)}
    benchmark.extra_info.update(info)
    print(f"\nhost, functional int8_gemm {size}³: {emu:.2f} s vs reference {ref_s:.3f} s = {emu / ref_s:.1f}× "
          f"(modelled {info['modelled_us']} µs)")


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", "-s", "--benchmark-enable"]))
