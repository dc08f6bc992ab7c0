"""FusedDispatch / FusedCombine in DeepEP's low-latency setting (issue 6), timing-only.

    python -m pytest benchmarks/test_bench_moe_dispatch.py -q -s                      # EP8, EP16 (+ SDMA at EP8)
    MOE_BENCH_ALL=1 python -m pytest benchmarks/test_bench_moe_dispatch.py -q -s      # also EP32 … EP256, EP320

Setting (DeepEP README, low-latency kernels): 128 tokens per rank, hidden 7168, top-8 of 256 experts drawn uniformly
at random (seed 0, distinct per token); INT8 dispatch (7168 B + the scale, 7680 B messages), BF16 combine
(14336 B per copy). EP = 8 … 256 dies with the uniform placement (256/EP experts per die, shared expert local) and
320 dies with the decode placement (32 shared-expert dies, 256 routed, 32 redundant; every token also sends one
copy to its shared die). Activations are phantoms; the routing is real.

Per-rank bandwidth as DeepEP computes it: the bytes of the token copies a rank receives over the op's time —
dispatch 7168 + 4 B (INT8 payload + fp32 scale) per received copy, combine 14336 B per copy returned to the home
rank — averaged over ranks; latency = the op's modelled time (the slowest die). DeepEP's published H800 numbers
(cloudmatrix-design.md §9, README of 2025-03-27: pure RDMA, FP8 dispatch) sit beside them in `extra_info`.
Race checks and trace events are off (they change no cycle, only host time). Host wall time and process CPU time are
per op (CPU time is the fair figure on a shared machine); `instructions_per_die` (dispatch, combine) says what that
host time was spent on.
"""
import os
import time

import numpy as np
import pytest

import ascendemu
from ascendemu.checks import Checks
from ascendemu.ops.moe.dispatch import fused_combine, fused_dispatch
from ascendemu.ops.moe.placement import ExpertPlacement

ALL = os.environ.get("MOE_BENCH_ALL") == "1"
TOKENS, HIDDEN, TOPK, EXPERTS = 128, 7168, 8, 256
DISPATCH_COPY_BYTES = HIDDEN + 4
COMBINE_COPY_BYTES = 2 * HIDDEN
# DeepEP low-latency, H800 + CX7 400 Gb/s RDMA: EP → (dispatch µs, GB/s, combine µs, GB/s)
DEEPEP = {8: (163, 46, 318, 46), 16: (173, 43, 329, 44), 32: (182, 41, 350, 41), 64: (186, 40, 353, 41),
          128: (192, 39, 369, 39), 256: (194, 39, 360, 40)}


def routing(ep: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [np.argsort(rng.random((TOKENS, EXPERTS)), axis=1)[:, :TOPK].astype(np.int32) for _ in range(ep)]
    w = [rng.random((TOKENS, TOPK)).astype(np.float32) for _ in range(ep)]
    return ids, w


def run(ep: int, transport: str = "aiv") -> dict:
    placement = ExpertPlacement.decode_ep320() if ep == 320 else ExpertPlacement.uniform(EXPERTS, ep)
    ids, w = routing(ep)
    cl = ascendemu.Cluster("910c", dies=ep, functional=False, checks=Checks(race=False, trace=False))
    x = [d.gm.empty((TOKENS, HIDDEN), "bfloat16") for d in cl.dies]
    t0, c0 = time.perf_counter(), time.process_time()
    h = fused_dispatch(cl, x, ids, w, placement, TOKENS, transport=transport)
    t1, c1 = time.perf_counter(), time.process_time()
    eo = [cl.dies[d].gm.empty((h.num_received(d), HIDDEN), "bfloat16") for d in range(ep)]
    out = fused_combine(cl, eo, h)
    t2, c2 = time.perf_counter(), time.process_time()
    assert [tuple(o.shape) for o in out] == [(TOKENS, HIDDEN)] * ep
    recv = np.array([h.num_received(d) for d in range(ep)])
    kk = TOPK + int(placement.shared_remote())
    assert recv.sum() == ep * TOKENS * kk  # every copy delivered
    dt = np.array(h.report.per_die_time_us())
    ct = np.array(h.combine_report.per_die_time_us())
    info = {
        "ep": ep, "transport": transport,
        "dispatch_us": round(h.report.time_us, 1), "combine_us": round(h.combine_report.time_us, 1),
        "dispatch_GBps_per_rank": round(float(np.mean(recv * DISPATCH_COPY_BYTES / (dt * 1e3))), 1),
        "combine_GBps_per_rank": round(float(np.mean(TOKENS * kk * COMBINE_COPY_BYTES / (ct * 1e3))), 1),
        "received_rows_max_mean": (int(recv.max()), round(float(recv.mean()), 1)),
        "host_dispatch_s": round(t1 - t0, 1), "host_combine_s": round(t2 - t1, 1),
        "cpu_dispatch_s": round(c1 - c0, 1), "cpu_combine_s": round(c2 - c1, 1),
        "instructions_per_die": tuple(round(sum(c.instructions for r in rep.reports for c in r.cores) / ep)
                                      for rep in (h.report, h.combine_report)),
    }
    if ep in DEEPEP:
        info["deepep_h800"] = dict(zip(("dispatch_us", "dispatch_GBps", "combine_us", "combine_GBps"), DEEPEP[ep]))
    print(info)
    return info


def _bench(benchmark, ep, transport="aiv"):
    info = benchmark.pedantic(run, args=(ep, transport), rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    assert info["dispatch_us"] > 0 and info["combine_us"] > 0


@pytest.mark.parametrize("ep", [8, 16])
def test_bench_moe_dispatch_combine(benchmark, ep):
    _bench(benchmark, ep)


def test_bench_moe_sdma_ep8(benchmark):
    _bench(benchmark, 8, "sdma")


@pytest.mark.skipif(not ALL, reason="set MOE_BENCH_ALL=1 (EP32: ~1 min, EP320: several minutes of host time)")
@pytest.mark.parametrize("ep", [32, 64, 128, 256, 320])
def test_bench_moe_dispatch_combine_large(benchmark, ep):
    _bench(benchmark, ep)


@pytest.mark.skipif(not ALL, reason="set MOE_BENCH_ALL=1")
def test_bench_moe_sdma_ep256(benchmark):
    _bench(benchmark, 256, "sdma")
