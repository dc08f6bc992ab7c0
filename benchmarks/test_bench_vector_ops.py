"""The row-wise AIV ops (per-token quantisation, SwiGLU + quantisation, RMSNorm, add + RMSNorm) at DeepSeek-R1
shapes on one 910C die, timing-only (phantom tensors, `Checks(trace=False)`): modelled time, HBM bandwidth
and its share of the die's peak, and the host time of the run.

    python -m pytest benchmarks/test_bench_vector_ops.py -q -s --benchmark-enable -p no:cacheprovider

Under pyproject's default `--benchmark-disable` each body runs once and `extra_info` is filled either way.

Shapes: x [T, 7168] is the hidden state of T tokens (prefill microbatch 4096, decode 96 per die); swiglu_quant's
gate_up [T, 4096] is the expert's fused gate_up projection (2 × 2048) for a decode expert batch (1024 rows) and
a prefill one (16384). Every op reads its input once and writes its outputs once, so its floor is
(bytes in + bytes out) / HBM peak; the assertions hold each op near that floor.

Recorded on the development box (modelled figures are exact; host seconds vary with the machine):

    op            shape          µs     GB/s   % peak   bound      host s
    quantize      4096 × 7168   56.0    1573   98.3     HBM         4.4
    quantize        96 × 7168    1.7    1195   74.7     latency     0.1
    swiglu_quant  1024 × 4096    7.8    1344   84.0     V + start   0.5
    swiglu_quant 16384 × 4096  110.7    1516   94.8     V ≈ HBM    11.3
    rmsnorm       4096 × 7168   74.6    1583   98.9     HBM         5.8
    rmsnorm         96 × 7168    2.4    1421   88.8     latency     0.2
    add_rmsnorm   4096 × 7168  148.1    1590   99.4     HBM         8.6
    add_rmsnorm     96 × 7168    4.1    1494   93.3     latency     0.2
"""
import time

import pytest

import ascendemu
from ascendemu.ops.norm import add_rmsnorm, rmsnorm
from ascendemu.ops.quant import quantize_per_token
from ascendemu.ops.swiglu import swiglu_quant

CHECKS = ascendemu.Checks(trace=False)


def _quantize(die, m, n):
    return quantize_per_token(die, die.gm.empty((m, n), "bfloat16"))


def _swiglu(die, m, n):
    return swiglu_quant(die, die.gm.empty((m, n), "bfloat16"))


def _rmsnorm(die, m, n):
    return rmsnorm(die, die.gm.empty((m, n), "bfloat16"), die.gm.empty((n,), "bfloat16"))


def _add_rmsnorm(die, m, n):
    return add_rmsnorm(die, die.gm.empty((m, n), "bfloat16"), die.gm.empty((m, n), "bfloat16"),
                       die.gm.empty((n,), "bfloat16"))


# op, M, N (columns of the input), bytes moved per input element (in + out), lowest % of HBM peak accepted
CASES = [
    ("quantize_per_token", _quantize, 4096, 7168, 2 + 1, 95),
    ("quantize_per_token", _quantize, 96, 7168, 2 + 1, 60),
    ("swiglu_quant", _swiglu, 1024, 4096, 2 + 0.5, 75),
    ("swiglu_quant", _swiglu, 16384, 4096, 2 + 0.5, 90),
    ("rmsnorm", _rmsnorm, 4096, 7168, 2 + 2, 95),
    ("rmsnorm", _rmsnorm, 96, 7168, 2 + 2, 75),
    ("add_rmsnorm", _add_rmsnorm, 4096, 7168, 4 + 4, 95),
    ("add_rmsnorm", _add_rmsnorm, 96, 7168, 4 + 4, 80),
]


@pytest.mark.parametrize("name,fn,m,n,bytes_per_elem,min_pct", CASES,
                         ids=[f"{c[0]}-{c[2]}x{c[3]}" for c in CASES])
def test_bench_vector_op(benchmark, name, fn, m, n, bytes_per_elem, min_pct):
    hosts = []

    def run():
        die = ascendemu.Die("910c", functional=False, checks=CHECKS)
        t0 = time.perf_counter()
        fn(die, m, n)
        hosts.append(time.perf_counter() - t0)
        return die.last_report

    report = benchmark.pedantic(run, rounds=1, iterations=1)
    host = min(hosts)
    spec = ascendemu.spec.get("910c")
    floor_us = m * n * bytes_per_elem / spec.peak_hbm_bytes_per_s * 1e6
    busy = {p: c / report.cycles for p, c in report.cores[0].busy.items()}
    benchmark.extra_info.update({
        "op": name, "shape": f"{m}x{n} bf16", "cycles": report.cycles, "time_us": round(report.time_us, 2),
        "hbm_bytes": report.hbm_bytes, "hbm_gbps": round(report.hbm_gbps, 1),
        "hbm_pct_of_peak": round(report.hbm_pct_of_peak, 1), "hbm_floor_us": round(floor_us, 2),
        "aiv_cores": len(report.cores), "core0_pipe_busy": {p: round(b, 3) for p, b in busy.items()},
        "host_s": round(host, 3),
    })
    print(f"\n{name:<19} {m:>5} x {n:<5} {report.time_us:8.1f} µs  {report.hbm_gbps:6.0f} GB/s "
          f"{report.hbm_pct_of_peak:5.1f}% of HBM peak (floor {floor_us:.1f} µs)  "
          f"V {busy['V']:.2f} MTE2 {busy['MTE2']:.2f} MTE3 {busy['MTE3']:.2f}  host {host:.2f} s")

    assert len(report.cores) == min(48, m)
    assert report.hbm_bytes >= m * n * bytes_per_elem  # read once, written once (scales and weights on top)
    assert report.time_us >= floor_us * 0.999  # never faster than the die's HBM
    assert report.hbm_pct_of_peak >= min_pct, f"{name} {m}x{n}: {report.hbm_pct_of_peak:.1f}% of HBM peak"


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", "-s", "--benchmark-enable"]))
