"""The `ascendemu` console script.

    ascendemu demo [--size 512] [--timing-only] [--trace PATH]
    ascendemu spec [--chip 910c]

It sits in the top layer (ascendemu.ops) because it drives kernels.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import ascendemu
from ascendemu import HardEvent

from .alltoall import all_to_all, route
from .matmul import matmul, matmul_reference


@ascendemu.kernel("aiv")
def add_one(ctx, x, y, n):
    """The issue's example: y = x + 1 on one tile of UB, with the two flag pairs it needs."""
    ub = ctx.ub.alloc((n,), "float16")
    ctx.data_copy(ub, x)
    ctx.set_flag(HardEvent.MTE2_V, 0)
    ctx.wait_flag(HardEvent.MTE2_V, 0)
    ctx.adds(ub, ub, 1.0, n)
    ctx.set_flag(HardEvent.V_MTE3, 0)
    ctx.wait_flag(HardEvent.V_MTE3, 0)
    ctx.data_copy(y, ub)


def demo(size: int, timing_only: bool, trace: str) -> int:
    """The add_one kernel on an AIV, a tiled fp16 matmul on an AIC, and an all-to-all across 16 dies."""
    die = ascendemu.Die("910c", functional=not timing_only)
    spec = die.spec
    print(f"ascendemu demo on one {spec.name} die ({spec.soc_version}, {spec.clock_mhz:.0f} MHz, "
          f"{spec.aic_per_die} AIC + {spec.aiv_per_die} AIV)\n")

    n = 4096
    x_host = np.arange(n, dtype=np.float16) / 8
    x = die.gm.from_numpy(x_host)
    y = die.gm.empty(n, "float16")
    die.launch(add_one, block_dim=1, args=(x, y, n))
    print(die.last_report.summary())
    if not timing_only:
        ok = np.array_equal(y.numpy(), x_host + np.float16(1))
        print(f"  y == x + 1: {ok}\n")
        if not ok:
            return 1

    rng = np.random.default_rng(0)
    if timing_only:
        a = die.gm.empty((size, size), "float16")
        b = die.gm.empty((size, size), "float16")
    else:
        a = rng.standard_normal((size, size)).astype(np.float16)
        b = rng.standard_normal((size, size)).astype(np.float16)
    t0 = time.perf_counter()
    c = matmul(die, a, b)
    host = time.perf_counter() - t0
    r = die.last_report
    print(r.summary())
    util = r.cores[0].busy.get("M", 0) / r.cycles
    peak = 2 * spec.cube_fp16_macs_per_cycle * spec.clock_hz
    print(f"  fp16 matmul {size}³ on one AIC: {r.time_us:.1f} µs modelled, cube {100 * util:.1f}% busy, "
          f"{r.flops / (r.time_us * 1e-6) / 1e12:.2f} TFLOPS = {100 * r.flops / (r.time_us * 1e-6) / peak:.1f}% of "
          f"one AIC's peak; host {host:.2f} s")
    if not timing_only:
        ref = matmul_reference(a, b)
        err = np.abs(np.asarray(c, np.float32) - ref.astype(np.float32)).max()
        print(f"  max |c - numpy| = {err:.3g}")
    r.write_trace(trace)
    print(f"\ntrace written to {trace} (open it in https://ui.perfetto.dev)")

    dies = 16
    cluster = ascendemu.Cluster("910c", dies=dies, functional=False, checks=ascendemu.Checks(trace=False))
    t0 = time.perf_counter()
    rep, _ = all_to_all(cluster, route(dies, 128, 8, seed=0), 7680)
    print(f"\nAIV-Direct all-to-all on {dies} dies (one node), 128 tokens × 8 destinations × 7,680 B per die, "
          f"timing-only:\n{rep.summary()}\n  host {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ascendemu", description="Ascend 910C AI-core emulator")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run example kernels on a 910C die, print their cycle reports, write a trace")
    d.add_argument("--size", type=int, default=1024, help="M = N = K of the fp16 matmul (default 1024)")
    d.add_argument("--timing-only", action="store_true", help="skip the data work (phantom tensors)")
    d.add_argument("--trace", default="ascendemu-demo-trace.json", help="Chrome trace output path")
    s = sub.add_parser("spec", help="print every hardware number of a chip preset with its source")
    s.add_argument("--chip", default="910c")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        return demo(args.size, args.timing_only, args.trace)
    print(ascendemu.spec.get(args.chip).describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
