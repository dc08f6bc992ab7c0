"""Paged KV cache in NZ block layout (reference section 17).

Cache shape ``(num_blocks, D // C0, block_size, C0)``: each block is one Nz
matrix whose rows are the block's tokens and whose columns are the hidden
dims.  Token t of block b, dim d sits at
``b·(block_size·D) + (d//C0)·(block_size·C0) + t·C0 + d%C0``.
Slot s = b·block_size + t; a negative slot means "skip" (ATB ReshapeAndCache).
"""

from __future__ import annotations

import numpy as np

from .shapes import FRACTAL_ROWS, _index, _nonneg_int, _pos_int, _resolve_c0, _result, as_dtype

__all__ = [
    "kv_nz_block_shape",
    "kv_nz_offset",
    "kv_nz_scatter",
    "kv_nz_gather",
]


def _check_geometry(fn, dim, block_size, dtype, c0):
    dim = _pos_int(fn, "dim", dim)
    block_size = _pos_int(fn, "block_size", block_size)
    c0 = _resolve_c0(fn, dtype, c0)
    if block_size % FRACTAL_ROWS:
        raise ValueError(f"{fn}: block_size={block_size} must be a multiple of {FRACTAL_ROWS}")
    if dim % c0:
        raise ValueError(f"{fn}: dim={dim} must be a multiple of C0={c0} ({as_dtype(dtype).name})")
    return dim, block_size, c0


def kv_nz_block_shape(num_blocks: int, dim: int, block_size: int, dtype, *, c0: int | None = None) -> tuple:
    """Cache shape (num_blocks, dim // C0, block_size, C0) (section 17).

    ``c0`` overrides C0 = 32 B / itemsize (ATB's value cache uses 16).
    """
    fn = "kv_nz_block_shape"
    num_blocks = _nonneg_int(fn, "num_blocks", num_blocks)
    dim, block_size, c0 = _check_geometry(fn, dim, block_size, dtype, c0)
    return (num_blocks, dim // c0, block_size, c0)


def kv_nz_offset(block, t, d, dim: int, block_size: int, dtype, *, c0: int | None = None, num_blocks: int | None = None):
    """Element offset of token t of block ``block``, dim d (section 17):
    ``b·(block_size·D) + (d//C0)·(block_size·C0) + t·C0 + d%C0``.

    Scalars give an int; integer arrays broadcast.  ``num_blocks`` (optional)
    bounds ``block``.
    """
    fn = "kv_nz_offset"
    dim, block_size, c0 = _check_geometry(fn, dim, block_size, dtype, c0)
    if num_blocks is None:
        bi = _index(fn, "block", block, np.iinfo(np.int64).max)
    else:
        bi = _index(fn, "block", block, _nonneg_int(fn, "num_blocks", num_blocks))
    ti = _index(fn, "t", t, block_size)
    di = _index(fn, "d", d, dim)
    off = bi * (block_size * dim) + (di // c0) * (block_size * c0) + ti * c0 + di % c0
    return _result(off, block, t, d)


def _check_cache(fn, cache):
    if not isinstance(cache, np.ndarray):
        raise ValueError(f"{fn}: cache must be a numpy array, got {type(cache).__name__}")
    try:
        as_dtype(cache.dtype)
    except ValueError as exc:
        raise ValueError(f"{fn}: cache {exc}") from None
    if cache.ndim != 4:
        raise ValueError(
            f"{fn}: cache must have shape (num_blocks, D // C0, block_size, C0), got {cache.shape}"
        )
    nb, d1, bs, c0 = cache.shape
    if c0 == 0 or d1 == 0 or bs == 0 or bs % FRACTAL_ROWS:
        raise ValueError(
            f"{fn}: cache shape {cache.shape}: block_size={bs} must be a positive multiple of "
            f"{FRACTAL_ROWS} and D // C0, C0 must be > 0"
        )
    return nb, d1, bs, c0


def _int_vector(fn, name, v):
    a = np.asarray(v)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"{fn}: {name} must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def kv_nz_scatter(cache: np.ndarray, x: np.ndarray, slot_mapping) -> np.ndarray:
    """Write token rows ``x[T, D]`` (or ``[T, heads, head_dim]``) into ``cache``
    in place at ``slot_mapping[T]`` (slot = block·block_size + t; negative =
    skip), as ATB ReshapeAndCache in NZ mode (section 17).  Returns ``cache``.

    Duplicate slots: the last token wins.
    """
    fn = "kv_nz_scatter"
    nb, d1, bs, c0 = _check_cache(fn, cache)
    dim = d1 * c0
    x = np.asarray(x)
    if x.dtype != cache.dtype:
        raise ValueError(f"{fn}: x dtype {x.dtype.name} differs from cache dtype {cache.dtype.name}")
    if x.ndim < 2 or int(np.prod(x.shape[1:])) != dim:
        raise ValueError(f"{fn}: x shape {x.shape} must be (T, D) or (T, heads, head_dim) with D={dim}")
    slots = _int_vector(fn, "slot_mapping", slot_mapping)
    if slots.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: slot_mapping has {slots.shape[0]} entries for {x.shape[0]} tokens")
    capacity = nb * bs
    over = slots >= capacity
    if np.any(over):
        raise IndexError(f"{fn}: slot {int(slots[over][0])} out of range for cache capacity {capacity} slots")
    keep = slots >= 0
    slots = slots[keep]
    rows = x.reshape(x.shape[0], d1, c0)[keep]
    b, t = slots // bs, slots % bs
    cache[b[:, None], np.arange(d1)[None, :], t[:, None]] = rows
    return cache


def kv_nz_gather(cache: np.ndarray, block_table, length: int) -> np.ndarray:
    """Read a sequence of ``length`` tokens back as ND ``[length, D]`` from the
    blocks listed in ``block_table`` (PagedCacheLoad, section 17).  Only the
    first ceil(length / block_size) entries are used.
    """
    fn = "kv_nz_gather"
    nb, d1, bs, c0 = _check_cache(fn, cache)
    length = _nonneg_int(fn, "length", length)
    table = _int_vector(fn, "block_table", block_table)
    need = -(-length // bs)
    if need > table.shape[0]:
        raise ValueError(
            f"{fn}: length={length} needs {need} blocks of {bs} tokens, block_table has {table.shape[0]}"
        )
    used = table[:need]
    bad = (used < 0) | (used >= nb)
    if np.any(bad):
        raise IndexError(f"{fn}: block {int(used[bad][0])} out of range for cache with {nb} blocks")
    blocks = cache[used]  # (need, d1, bs, c0)
    nd = blocks.transpose(0, 2, 1, 3).reshape(need * bs, d1 * c0)
    return np.ascontiguousarray(nd[:length])
