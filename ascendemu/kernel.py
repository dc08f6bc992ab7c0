"""`@kernel("aic" | "aiv")`: marks a function `f(ctx, *args)` as a kernel for one core kind."""
from __future__ import annotations

import functools

KINDS = ("aic", "aiv")


class Kernel:
    """A kernel function and the core kind it runs on (Ascend C `__cube__` / `__vector__`)."""

    def __init__(self, fn, kind: str):
        self.fn, self.kind = fn, kind
        self.name = fn.__name__
        functools.update_wrapper(self, fn)

    def __call__(self, ctx, *args, **kwargs):
        return self.fn(ctx, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<kernel {self.name} ({self.kind})>"


def kernel(kind: str):
    """Decorate a kernel: `@kernel("aiv")`. Mix kernels ("mix": 1 AIC + 2 AIV) arrive with the die issue."""
    if kind == "mix":
        raise NotImplementedError("mix kernels (1 AIC + 2 AIV groups with cross-core flags) are not built yet: "
                                  "they arrive with the whole-die issue")
    if kind not in KINDS:
        raise ValueError(f"kernel kind {kind!r}: use one of {', '.join(KINDS)}")

    def wrap(fn):
        return Kernel(fn, kind)
    return wrap
