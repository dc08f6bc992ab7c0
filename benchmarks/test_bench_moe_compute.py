"""The MoE compute on one 910C die at DeepSeek-R1 sizes, timing-only: the router (ops/moe/gate.py) and the expert
MLPs (ops/moe/experts.py: grouped INT8 GEMM gate_up → swiglu_quant → grouped INT8 GEMM down).

    python -m pytest benchmarks/test_bench_moe_compute.py -q -s -p no:cacheprovider       # decode experts, ~10–20 s
    MOE_BENCH_ALL=1 python -m pytest benchmarks/test_bench_moe_compute.py -q -s            # + the router, prefill

Row counts come from DeepEP's setting: 128 tokens per die, top-8 of 256 chosen uniformly at random (seed 0),
routed with the placement's replica rule (ops/moe/placement.py). Decode EP320: the most loaded routed-expert die
and a shared-expert die (10 home dies × 128 tokens). Prefill EP32: 2048 tokens per die; the most loaded die's 9
routed slots (8 routed + 1 redundant; the shared expert runs on the home die's own tokens, a dense MLP, not here).

extra_info: modelled µs; TOPS (expert: INT8 cube ops, % of the die's 727 TOPS; router: fp32 FLOPs as 2·T·E·H, % of
the AIV fp32 rate, 48 AIV × 64 lanes × 1850 MHz = 5.68 T lane-ops/s, a MAC being a Mul and an Add); HBM GB/s; host s.
Recorded on the development box (2 vCPU, shared; modelled figures are exact, host times vary with load):

  case                                          rows     µs (gate_up + swiglu + down)   TOPS   % INT8  HBM GB/s  host s
  experts, decode EP320, busiest routed die     1373     483.8 (339.5 + 10.0 + 134.4)   249.9  34.4    1577     19
  experts, decode EP320, shared-expert die      1280     444.3 (309.5 + 9.5 + 125.4)    253.7  34.9    1587     18
  experts, prefill EP32, busiest die (9 slots)  16616    5751.4 (4105.4 + 112.3 + 1533.8) 254.5 35.0   1593     291*
  moe_gate T = 128 (decode)                     —        132.8; 3.54 TFLOPS fp32 = 62 % of the AIV lane rate; HBM
                                                         1340 GB/s (84 %); host 33 s
  moe_gate T = 4096 (prefill)                   —        3811.5; 3.94 TFLOPS fp32 = 69 %; HBM 1356 GB/s (85 %);
                                                         host 1228 s*
  (* under a load average of 5–7)

Mean routed-die load at decode is 1138 rows (the 32 experts with a redundant replica — evenly spaced ids by
default — have their rows split over two dies).

The router (E·H = 1.8 M MACs per token in fp32 on the vector unit) takes ~35 s of host time at T = 128 and ~20 min at
T = 4096 (one Python instruction per 64 × 64 products), so it runs only with MOE_BENCH_ALL=1.
"""
import os
import time

import numpy as np
import pytest

import ascendemu
from ascendemu.ops.moe.config import MoEConfig
from ascendemu.ops.moe.dispatch import ReceivedTokens
from ascendemu.ops.int8_gemm import PackedWeight, packed_shape
from ascendemu.ops.moe.experts import ExpertWeights, PackedExpert, moe_experts
from ascendemu.ops.moe.gate import moe_gate
from ascendemu.ops.moe.placement import ExpertPlacement

ALL = bool(os.environ.get("MOE_BENCH_ALL"))
all_only = pytest.mark.skipif(not ALL, reason="35 s to 20 min of host time; set MOE_BENCH_ALL=1")
CFG = MoEConfig.deepseek_v3()


def _die():
    return ascendemu.Die("910c", functional=False, checks=ascendemu.Checks(trace=False))


def uniform_routing(dies, tokens, e=256, k=8, seed=0):
    rng = np.random.default_rng(seed)
    return [np.argsort(rng.random((tokens, e)), axis=1)[:, :k].astype(np.int32) for _ in range(dies)]


def slot_counts(placement, ids):
    """Rows each die receives per local slot: the routed copies (placement.route), plus the shared copies when the
    shared expert is remote (placement.shared_route)."""
    counts = [np.zeros(len(s), np.int64) for s in placement.slots]
    for h, a in enumerate(ids):
        dd, ss = placement.route(h, a)
        for d, s in zip(dd.ravel(), ss.ravel()):
            counts[d][s] += 1
        sr = placement.shared_route(h, a.shape[0])
        if sr is not None:
            for d, s in zip(*sr):
                counts[d][s] += 1
    return counts


def _run_experts(slots, counts):
    """moe_experts on one timing-only die holding `slots` (with these row counts) first, then every other routed
    expert with 0 rows (a one-die placement must hold them all; they share one phantom pack and get no work)."""
    die = _die()
    h, i, e = CFG.hidden_size, CFG.moe_intermediate_size, CFG.n_routed_experts
    rest = tuple(x for x in range(e) if x not in slots)
    pl = ExpertPlacement(e, 1, (tuple(slots) + rest,))
    packs = [PackedExpert(PackedWeight(die.gm.empty(packed_shape(2 * i, h), "int8"), 2 * i, h),
                          die.gm.empty((2 * i,), "float32"),
                          PackedWeight(die.gm.empty(packed_shape(h, i), "int8"), h, i), die.gm.empty((h,), "float32"))
             for _ in slots]
    ew = ExpertWeights(pl, CFG, [packs + [packs[0]] * len(rest)])
    r = int(sum(counts))
    rec = ReceivedTokens(0, die.gm.empty((r, h), "int8"), die.gm.empty((r,), "float32"),
                         np.concatenate([counts, np.zeros(len(rest), np.int64)]), pl.slots[0])
    t0 = time.perf_counter()
    with die.recording() as rec_:
        moe_experts(die, rec, ew)
    return rec_.reports, time.perf_counter() - t0, die.spec


def _info(reports, spec, ops, peak_ops):
    cycles = sum(r.cycles for r in reports)
    us = cycles / spec.clock_mhz
    hbm = sum(r.hbm_bytes for r in reports)
    tops = ops / (us * 1e-6) / 1e12
    return {"time_us": round(us, 1), "tops": round(tops, 2), "pct_peak": round(100 * ops / (us * 1e-6) / peak_ops, 1),
            "hbm_gbps": round(hbm / (us * 1e-6) / 1e9, 1),
            "launch_us": [round(r.cycles / spec.clock_mhz, 1) for r in reports]}


def _bench_experts(benchmark, name, slots, counts):
    out = {}

    def run():
        out["r"] = _run_experts(slots, counts)
    benchmark.pedantic(run, rounds=1, iterations=1)
    reports, host, spec = out["r"]
    r = int(sum(counts))
    h, i = CFG.hidden_size, CFG.moe_intermediate_size
    ops = 2 * r * h * 2 * i + 2 * r * i * h
    assert sum(rep.flops for rep in reports) == ops
    info = _info(reports, spec, ops, spec.peak_cube_ops_per_s("int8"))
    info.update(rows=r, counts=[int(c) for c in counts], host_s=round(host, 1))
    benchmark.extra_info.update(info)
    print(f"\n{name}: {info}")
    return info


def test_bench_experts_decode_ep320(benchmark):
    pl = ExpertPlacement.decode_ep320()
    counts = slot_counts(pl, uniform_routing(320, 128))
    routed = [(int(c[0]), d) for d, c in enumerate(counts) if pl.slots[d][0] != pl.shared_id]
    most, d = max(routed)
    mean = np.mean([c for c, _ in routed])
    info = _bench_experts(benchmark, f"decode EP320, busiest routed die {d} (mean {mean:.0f} rows)", [pl.slots[d][0]],
                          np.array([most]))
    benchmark.extra_info["mean_rows_routed_die"] = round(float(mean), 1)
    assert info["rows"] == most


@all_only
def test_bench_experts_decode_shared_die(benchmark):
    pl = ExpertPlacement.decode_ep320()
    counts = slot_counts(pl, uniform_routing(320, 128))
    assert int(counts[0][0]) == 10 * 128
    _bench_experts(benchmark, "decode EP320, shared-expert die", [pl.shared_id], counts[0])


@all_only
def test_bench_experts_prefill_ep32(benchmark):
    pl = ExpertPlacement.prefill_ep32()
    counts = slot_counts(pl, uniform_routing(32, 2048))
    d = int(np.argmax([c.sum() for c in counts]))
    _bench_experts(benchmark, f"prefill EP32, busiest die {d}", pl.slots[d][1:], counts[d][1:])


@all_only
@pytest.mark.parametrize("t", [128, 4096])
def test_bench_gate(benchmark, t):
    die = _die()
    h, e = CFG.hidden_size, CFG.n_routed_experts
    x, w, b = die.gm.empty((t, h), "bfloat16"), die.gm.empty((e, h), "bfloat16"), die.gm.empty((e,), "float32")
    t0 = time.perf_counter()
    benchmark.pedantic(moe_gate, args=(die, x, w, b, CFG), rounds=1, iterations=1)
    host = time.perf_counter() - t0
    rep = die.last_report
    flops = 2 * t * e * h
    aiv_rate = die.spec.aiv_per_die * die.spec.vec_simple_b32_elems_per_cycle * die.spec.clock_mhz * 1e6
    info = _info([rep], die.spec, flops, aiv_rate)
    info.update(tokens=t, host_s=round(host, 1))
    benchmark.extra_info.update(info)
    print(f"\nmoe_gate T={t}: {info}")
