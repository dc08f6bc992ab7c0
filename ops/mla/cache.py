"""`MLACache`: the paged latent KV cache of MLA in a die's GM, in the NZ block layout (ascend-910c.md §17).

MLA caches two things per token: the compressed latent c_kv (kv_lora_rank = 512 values) and the shared rotary key
k_pe (qk_rope_head_dim = 64 values), both bf16, in two caches of the same paging (CANN MLAProlog's `PA_NZ` mode):

    c_kv  [num_blocks, 512 // 16, block_size, 16]      one block = one Nz matrix: rows = its tokens, cols = dims
    k_pe  [num_blocks,  64 // 16, block_size, 16]

Token t of block b, dim d sits at element b·(block_size·D) + (d // 16)·(block_size·16) + t·16 + d % 16
(`ascendemu.layouts.kv_nz_offset`): a block is (D / 16) column strips of block_size × 16, each strip a run of
block_size / 16 fractals of 16 tokens × 16 dims (512 B). A token's 32 B chunks are 32 B·block_size apart.

    block b of c_kv (block_size = 128):   strip 0 (dims 0..15)   tokens 0..15 | 16..31 | … | 112..127   8 fractals
                                          strip 1 (dims 16..31)  tokens 0..15 | …                         8 fractals
                                          …                                                               …
                                          strip 31 (dims 496..511)                                        8 fractals

Sequences are integer ids the caller chooses. Each has a block table (block ids handed out from a free list, lowest
first) and a length. `allocate` reserves blocks and sets lengths without writing data (timing studies; tests);
`append` writes new tokens from the host (tests, and seeding a cache); on the device, MLAProlog's
`mla_kv_cache_kernel` (prolog.py) writes them into the slots `slot_mapping` gives, after `allocate` has grown the
sequence (mla_prefill / mla_decode do both); `gather` reads a sequence back as ND (on the device:
`prolog.gather_context`). On a timing-only die the caches are phantoms: blocks and lengths are still tracked,
data is not.
"""
from __future__ import annotations

import numpy as np

from ascendemu.layouts import kv_nz_block_shape, kv_nz_gather, kv_nz_scatter
from ascendemu.numerics import as_dtype

__all__ = ["MLACache", "CacheFullError"]

BF16 = as_dtype("bfloat16")
FRAC = 16  # rows of a fractal; C0 of a 16-bit type


class CacheFullError(ValueError):
    """The cache has fewer free blocks than an allocation needs."""


def _dims(config_or_dims, kv_dim, pe_dim, max_position) -> tuple[int, int, int]:
    """(kv_dim, pe_dim, max_position) from an MLAConfig-like object, a dict or the keywords (512/64/163840)."""
    got = {"kv_dim": None, "pe_dim": None, "max_position": None}
    src = config_or_dims
    names = {"kv_dim": ("kv_dim", "kv_lora_rank"), "pe_dim": ("pe_dim", "qk_rope_head_dim"),
             "max_position": ("max_position", "max_position_embeddings")}
    if src is not None:
        for key, aliases in names.items():
            for a in aliases:
                if isinstance(src, dict) and a in src:
                    got[key] = src[a]
                elif not isinstance(src, dict) and hasattr(src, a):
                    got[key] = getattr(src, a)
        if isinstance(src, dict):
            unknown = set(src) - {a for al in names.values() for a in al}
            if unknown:
                raise ValueError(f"MLACache: unknown dims {sorted(unknown)}; use kv_dim, pe_dim, max_position")
        elif all(v is None for v in got.values()):
            raise TypeError(f"MLACache: {type(src).__name__} has none of kv_lora_rank, qk_rope_head_dim, "
                            f"max_position_embeddings")
    for key, val in (("kv_dim", kv_dim), ("pe_dim", pe_dim), ("max_position", max_position)):
        if val is not None:
            got[key] = val
    out = []
    for key, default in (("kv_dim", 512), ("pe_dim", 64), ("max_position", 163840)):
        v = default if got[key] is None else got[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"MLACache: {key} must be a positive int, got {v!r}")
        if key != "max_position" and v % FRAC:
            raise ValueError(f"MLACache: {key} = {v} must be a multiple of {FRAC} (C0 of bf16)")
        out.append(int(v))
    return tuple(out)


class MLACache:
    """The paged NZ latent cache of one MLA layer in `die`'s GM.

    `MLACache(die, config, num_blocks, block_size=128)`: `config` is an MLAConfig (or anything with
    `kv_lora_rank`, `qk_rope_head_dim`, `max_position_embeddings`), a dict of `kv_dim`/`pe_dim`/`max_position`,
    or None; the keywords `kv_dim=512, pe_dim=64, max_position=163840` override it. `block_size` is a positive
    multiple of 16 (ATB recommends 128 for MLA; FlashMLA uses 64).

    Attributes: `c_kv`, `k_pe` (GlobalTensors of the shapes above, phantoms on a timing-only die), `kv_dim`,
    `pe_dim`, `max_position`, `num_blocks`, `block_size`, `die`.
    """

    def __init__(self, die, config_or_dims=None, num_blocks: int = 0, block_size: int = 128, *,
                 kv_dim: int | None = None, pe_dim: int | None = None, max_position: int | None = None):
        self.kv_dim, self.pe_dim, self.max_position = _dims(config_or_dims, kv_dim, pe_dim, max_position)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
            raise ValueError(f"MLACache: num_blocks must be a positive int, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < FRAC \
                or block_size % FRAC:
            raise ValueError(f"MLACache: block_size = {block_size!r} must be a positive multiple of {FRAC}")
        self.die = die
        self.num_blocks, self.block_size = int(num_blocks), int(block_size)
        self.c_kv = die.gm.empty(kv_nz_block_shape(self.num_blocks, self.kv_dim, self.block_size, BF16), BF16)
        self.k_pe = die.gm.empty(kv_nz_block_shape(self.num_blocks, self.pe_dim, self.block_size, BF16), BF16)
        self._free = list(range(self.num_blocks))  # ascending; allocation pops the lowest ids first
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}

    def __repr__(self) -> str:
        return (f"MLACache(kv_dim={self.kv_dim}, pe_dim={self.pe_dim}, {self.num_blocks} blocks × {self.block_size}, "
                f"{len(self._tables)} sequences, {len(self._free)} blocks free)")

    # --- bookkeeping -----------------------------------------------------------------------------
    @property
    def seq_ids(self) -> list[int]:
        """The live sequence ids, in the order they were created."""
        return list(self._tables)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def __contains__(self, seq_id) -> bool:
        return self._key(seq_id, check=False) in self._tables

    def _key(self, seq_id, check: bool = True) -> int:
        if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)):
            raise TypeError(f"MLACache: sequence ids are ints, got {seq_id!r}")
        k = int(seq_id)
        if check and k not in self._tables:
            known = ", ".join(map(str, list(self._tables)[:8])) + (", …" if len(self._tables) > 8 else "")
            raise KeyError(f"MLACache: unknown sequence id {k} (live: {known or 'none'})")
        return k

    def _check_length(self, seq_id: int, length: int) -> None:
        if length > self.max_position:
            raise ValueError(f"MLACache: sequence {seq_id} would reach position {length - 1}, past "
                             f"max_position_embeddings = {self.max_position} (positions 0..{self.max_position - 1})")

    def _reserve(self, wants: dict[int, int]) -> None:
        """Grow (or shrink) block tables to hold `wants[seq]` tokens; all or nothing."""
        need = 0
        for s, n in wants.items():
            have = len(self._tables.get(s, ()))
            need += max(0, -(-n // self.block_size) - have)
        if need > len(self._free):
            raise CacheFullError(f"MLACache is full: the request needs {need} more blocks of {self.block_size} tokens, "
                                 f"{len(self._free)} of {self.num_blocks} are free")
        for s, n in wants.items():
            table = self._tables.setdefault(s, [])
            blocks = -(-n // self.block_size)
            while len(table) < blocks:
                table.append(self._free.pop(0))
            while len(table) > blocks:
                self._free.append(table.pop())
            self._lengths[s] = n
        self._free.sort()

    def allocate(self, seq_ids, lengths) -> None:
        """Set each sequence's length (creating new ones), reserving blocks for it; no data is written.

        All or nothing: if the cache cannot hold every request, nothing changes and CacheFullError says how many
        blocks were needed and how many are free."""
        ids = [self._key(s, check=False) for s in np.atleast_1d(np.asarray(seq_ids, dtype=object))]
        lens = np.atleast_1d(np.asarray(lengths))
        if lens.dtype.kind not in "iu" or lens.ndim != 1 or len(lens) != len(ids):
            raise ValueError(f"MLACache.allocate: lengths must be {len(ids)} ints, got {lengths!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"MLACache.allocate: repeated sequence ids in {ids}")
        wants = {}
        for s, n in zip(ids, lens.tolist()):
            if n < 0:
                raise ValueError(f"MLACache.allocate: sequence {s} length {n} is negative")
            self._check_length(s, n)
            wants[s] = int(n)
        self._reserve(wants)

    def append(self, seq_id, c_kv_rows, k_pe_rows) -> np.ndarray:
        """Write n new tokens of one sequence (`c_kv_rows` [n, kv_dim], `k_pe_rows` [n, pe_dim], cast to bf16) after
        its current end; an unknown id starts a new sequence at position 0. Returns the n slots written
        (block·block_size + offset, np.int32). On a timing-only die only the bookkeeping happens."""
        s = self._key(seq_id, check=False)
        ckv = self._rows("c_kv_rows", c_kv_rows, self.kv_dim)
        kpe = self._rows("k_pe_rows", k_pe_rows, self.pe_dim)
        if len(ckv) != len(kpe):
            raise ValueError(f"MLACache.append: {len(ckv)} c_kv rows but {len(kpe)} k_pe rows")
        start = self._lengths.get(s, 0)
        self._check_length(s, start + len(ckv))
        self._reserve({s: start + len(ckv)})
        slots = self.slot_mapping(s, np.arange(start, start + len(ckv)))
        if self.die.functional and len(ckv):
            kv_nz_scatter(self.c_kv.array, ckv, slots)
            kv_nz_scatter(self.k_pe.array, kpe, slots)
        return slots

    def _rows(self, name, x, dim) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"MLACache.append: {name} must be [n, {dim}], got shape {x.shape}")
        if x.dtype != BF16 and x.dtype.kind != "f":
            raise TypeError(f"MLACache.append: {name} must be a float array (bf16 preferred), got {x.dtype}")
        return np.ascontiguousarray(x.astype(BF16))

    def slot_mapping(self, seq_id, positions) -> np.ndarray:
        """Slots (block·block_size + offset, np.int32) of the given positions of a sequence (positions < length)."""
        s = self._key(seq_id)
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self._lengths[s]):
            raise IndexError(f"MLACache: positions {pos.min()}..{pos.max()} outside sequence {s} of length "
                             f"{self._lengths[s]}")
        table = np.asarray(self._tables[s], dtype=np.int64)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).astype(np.int32)

    def gather(self, seq_id) -> tuple[np.ndarray, np.ndarray]:
        """The sequence back as ND bf16: (c_kv [length, kv_dim], k_pe [length, pe_dim]) (PagedCacheLoad)."""
        s = self._key(seq_id)
        if not self.die.functional:
            raise ValueError("MLACache.gather: the die is timing-only, so the cache holds no data")
        table, n = self.block_table(s), self._lengths[s]
        return kv_nz_gather(self.c_kv.array, table, n), kv_nz_gather(self.k_pe.array, table, n)

    def length(self, seq_id) -> int:
        return self._lengths[self._key(seq_id)]

    def block_table(self, seq_id) -> np.ndarray:
        """The sequence's block ids in order (np.int32, a copy)."""
        return np.asarray(self._tables[self._key(seq_id)], dtype=np.int32)

    def free(self, seq_id) -> None:
        """Forget a sequence and return its blocks to the free list."""
        s = self._key(seq_id)
        self._free.extend(self._tables.pop(s))
        self._free.sort()
        del self._lengths[s]
