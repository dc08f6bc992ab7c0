"""`@kernel("aic" | "aiv")`: marks a function `f(ctx, *args)` as a kernel for one core kind."""
from __future__ import annotations

import functools

KINDS = ("aic", "aiv", "mix")


class Kernel:
    """A kernel function and the core kind it runs on (Ascend C `__cube__` / `__vector__` / `__mix__(1, 2)`)."""

    def __init__(self, fn, kind: str):
        self.fn, self.kind = fn, kind
        self.name = fn.__name__
        functools.update_wrapper(self, fn)

    def __call__(self, ctx, *args, **kwargs):
        return self.fn(ctx, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<kernel {self.name} ({self.kind})>"


def kernel(kind: str):
    """Decorate a kernel: `@kernel("aic")`, `@kernel("aiv")`, or `@kernel("mix")` (groups of 1 AIC + 2 AIV;
    the body branches on `ctx.is_aic` / `ctx.is_aiv`, like `if ASCEND_IS_AIC`)."""
    if kind not in KINDS:
        raise ValueError(f"kernel kind {kind!r}: use one of {', '.join(KINDS)}")

    def wrap(fn):
        return Kernel(fn, kind)
    return wrap
