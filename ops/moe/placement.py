"""Expert placement: which die holds which expert (issue 6, item 2).

A placement is pure host data, the same on every die: `slots[d]` lists the experts die d holds, in local order (the
local expert index is the position in that tuple). Routed experts are 0..E−1; the shared expert is `shared_id = E`
wherever it appears in a slot list.

Two ways the shared expert is placed:

- **local** (`shared_remote()` is False): every die holds it (or no die lists it). It runs on the token's home die over
  the die's own tokens; dispatch never sends a token to it, so its slot receives 0 rows, and its output enters combine
  as `shared_out`.
- **remote** (`shared_remote()` is True): only some dies hold it (decode EP320: 32 dedicated shared-expert dies). Each
  token is then also dispatched to one shared die, chosen by `shared_route`, and its row comes back through combine
  with weight 1.0.

Replica choice (`route`), stated once: expert e with replicas r_0 < r_1 < … < r_{n−1} (ascending die ids) serves the
j-th copy for e of home die h (j = 0, 1, … counting that die's copies for e in token order) by replica `(h + j) mod n`.
A die's successive copies for e rotate over the replicas and different dies start at different replicas, so n replicas
split any load of a home die to within one copy. (CANN leaves the choice to the caller's EPLB table; this is a
deterministic stand-in.)

Shared-die choice (`shared_route`), stated once: with S shared dies s_0 < … < s_{S−1}, every token of home die d goes
to shared die `s_{d·S // num_dies}` — at EP320 each shared die serves 10 consecutive dies, as CANN's
`BS · epWorldSize / sharedExpertRankNum` sizing implies (cloudmatrix-design.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ExpertPlacement"]


def _as_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_seq(values, whole: str) -> None:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{whole}, got {type(values).__name__}")


def _ints(values, what: str, whole: str) -> tuple[int, ...]:
    """`values` as a tuple of ints; TypeError `whole` if it is not a sequence, `what` … if an entry is no int."""
    _check_seq(values, whole)
    return tuple(_as_int(e, what) for e in values)


def _even_split(kind: str, num_experts, dies) -> tuple[int, int, int]:
    """(num_experts, dies, experts per die) of a placement that spreads the routed experts evenly."""
    num_experts, dies = _as_int(num_experts, "num_experts"), _as_int(dies, "dies")
    if num_experts < 1 or dies < 1:
        raise ValueError(f"{kind} placement needs num_experts >= 1 and dies >= 1, got {num_experts}, {dies}")
    if num_experts % dies:
        raise ValueError(f"{kind} placement needs num_experts % dies == 0, got {num_experts} experts over "
                         f"{dies} dies")
    return num_experts, dies, num_experts // dies


def _redundant_ids(redundant, count: int, num_experts: int, what: str) -> list[int]:
    """The redundant replicas' expert ids, checked: `count` of them, each a routed expert."""
    ids = list(_ints(redundant, "redundant expert id", "redundant must be a sequence of expert ids"))
    if len(ids) != count:
        raise ValueError(f"{what}, but redundant lists {len(ids)} experts")
    for e in ids:
        if not 0 <= e < num_experts:
            raise ValueError(f"redundant expert {e} outside the routed experts 0..{num_experts - 1}")
    return ids


@dataclass(frozen=True)
class ExpertPlacement:
    """Logical experts → dies. Validated on construction; a bad placement raises ValueError naming the problem."""

    num_experts: int
    num_dies: int
    slots: tuple[tuple[int, ...], ...]
    _replicas: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _slot_index: tuple[dict, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        num_experts = _as_int(self.num_experts, "num_experts")
        num_dies = _as_int(self.num_dies, "num_dies")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if num_dies < 1:
            raise ValueError(f"num_dies must be >= 1, got {num_dies}")
        whole = "slots must be a sequence (one per die) of sequences of expert ids"
        _check_seq(self.slots, whole)
        slots = tuple(_ints(die_slots, f"slots[{d}] entry", f"{whole}; slots[{d}] is not one")
                      for d, die_slots in enumerate(self.slots))
        if len(slots) != num_dies:
            raise ValueError(f"slots has {len(slots)} entries but num_dies is {num_dies}: give one slot list per die")
        replicas: list[list[int]] = [[] for _ in range(num_experts + 1)]
        slot_index = []
        for d, die_slots in enumerate(slots):
            index = {}
            for pos, e in enumerate(die_slots):
                if not 0 <= e <= num_experts:
                    raise ValueError(f"die {d} slot {pos} holds expert {e}, outside 0..{num_experts} "
                                     f"(routed experts 0..{num_experts - 1}, shared expert {num_experts})")
                if e in index:
                    raise ValueError(f"die {d} holds expert {e} twice (slots {index[e]} and {pos})")
                index[e] = pos
                replicas[e].append(d)
            slot_index.append(index)
        missing = [e for e in range(num_experts) if not replicas[e]]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", …" if len(missing) > 8 else "")
            raise ValueError(f"routed experts {shown} ({len(missing)} of {num_experts}) are held by no die")
        object.__setattr__(self, "num_experts", num_experts)
        object.__setattr__(self, "num_dies", num_dies)
        object.__setattr__(self, "slots", slots)
        object.__setattr__(self, "_replicas", tuple(tuple(r) for r in replicas))
        object.__setattr__(self, "_slot_index", tuple(slot_index))
        # route tables: replica dies / local slots per routed expert, padded to the largest replica count
        width = max(len(r) for r in replicas[:num_experts])
        rep_die = np.zeros((num_experts, width), np.int64)
        rep_slot = np.zeros((num_experts, width), np.int64)
        for e in range(num_experts):
            for i, d in enumerate(replicas[e]):
                rep_die[e, i] = d
                rep_slot[e, i] = slot_index[d][e]
        object.__setattr__(self, "_rep_die", rep_die)
        object.__setattr__(self, "_rep_slot", rep_slot)
        object.__setattr__(self, "_rep_count", np.array([len(r) for r in replicas[:num_experts]], np.int64))

    # ------------------------------------------------------------------ queries

    @property
    def shared_id(self) -> int:
        """The shared expert's id in slot lists: `num_experts`."""
        return self.num_experts

    def replicas(self, expert) -> tuple[int, ...]:
        """Dies holding `expert` (0..E−1, or `shared_id`), ascending."""
        e = _as_int(expert, "expert")
        if not 0 <= e <= self.num_experts:
            raise ValueError(f"expert {e} outside 0..{self.num_experts} (shared expert is {self.num_experts})")
        return self._replicas[e]

    def slot_of(self, die, expert) -> int:
        """Local slot index of `expert` on `die` (ValueError if the die does not hold it)."""
        d = self._check_die(die)
        e = _as_int(expert, "expert")
        if e not in self._slot_index[d]:
            raise ValueError(f"die {d} does not hold expert {e} (its slots: {self.slots[d]})")
        return self._slot_index[d][e]

    def shared_remote(self) -> bool:
        """True if the shared expert lives on some dies only, which receive tokens by dispatch (decode EP320)."""
        held = len(self._replicas[self.num_experts])
        return 0 < held < self.num_dies

    def route(self, home_die, topk_ids):
        """(dest_die int64 [T, k], dest_slot int64 [T, k]) for the routed experts of home die's tokens.

        Replica `(home_die + j) mod n` of expert e's n replicas (ascending die ids) serves the home die's j-th copy
        for e, counted in (token, k) order (module doc)."""
        h = self._check_die(home_die)
        ids = self._check_topk_ids(topk_ids, h)
        flat = ids.reshape(-1)
        order = np.argsort(flat, kind="stable")  # copies grouped by expert, each group in (token, k) order
        ranked = flat[order]
        j = np.empty_like(flat)
        j[order] = np.arange(flat.size) - np.searchsorted(ranked, ranked, side="left")
        pick = (h + j.reshape(ids.shape)) % self._rep_count[ids]
        return self._rep_die[ids, pick], self._rep_slot[ids, pick]

    def shared_route(self, home_die, num_tokens):
        """(dest_die int64 [T], dest_slot int64 [T]) of the shared-expert copy of each token, or None when the
        shared expert is local (`shared_remote()` False). Home die d → shared die index d·S // num_dies."""
        h = self._check_die(home_die)
        n = _as_int(num_tokens, "num_tokens")
        if n < 0:
            raise ValueError(f"num_tokens must be >= 0, got {n}")
        if not self.shared_remote():
            return None
        shared = self._replicas[self.num_experts]
        die = shared[h * len(shared) // self.num_dies]
        slot = self._slot_index[die][self.num_experts]
        return np.full(n, die, np.int64), np.full(n, slot, np.int64)

    def _check_die(self, die) -> int:
        d = _as_int(die, "die")
        if not 0 <= d < self.num_dies:
            raise ValueError(f"die {d} outside 0..{self.num_dies - 1}")
        return d

    def _check_topk_ids(self, topk_ids, home_die) -> np.ndarray:
        ids = np.asarray(topk_ids)
        if ids.ndim != 2:
            raise ValueError(f"topk_ids of die {home_die} must be 2-D [T, k], got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"topk_ids of die {home_die} must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            bad = ids[(ids < 0) | (ids >= self.num_experts)][0]
            raise ValueError(f"topk_ids of die {home_die} names expert {bad}, outside the routed experts "
                             f"0..{self.num_experts - 1}")
        return ids

    # ------------------------------------------------------------------ deployments

    @classmethod
    def uniform(cls, num_experts, dies) -> "ExpertPlacement":
        """E/dies routed experts per die, contiguous (die d: d·E/dies …), after a local shared-expert slot on
        every die (slot 0, shared first as in CANN)."""
        num_experts, dies, per = _even_split("uniform", num_experts, dies)
        slots = tuple((num_experts,) + tuple(range(d * per, (d + 1) * per)) for d in range(dies))
        return cls(num_experts, dies, slots)

    @classmethod
    def decode_ep320(cls, num_experts=256, dies=320, shared_dies=32, redundant=None) -> "ExpertPlacement":
        """The decode deployment (cloudmatrix-design.md §3): dies 0..S−1 each hold a shared-expert replica (shared
        ranks first, as CANN's `expertShardType=0`), dies S..S+E−1 one routed expert each (die S+e holds e), and the
        remaining R = dies − S − E dies one redundant replica each of `redundant[i]` (EPLB's hot experts).
        Default `redundant`: evenly spaced experts `i·E // R` (i = 0..R−1), a stand-in for EPLB statistics."""
        num_experts = _as_int(num_experts, "num_experts")
        dies = _as_int(dies, "dies")
        shared_dies = _as_int(shared_dies, "shared_dies")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if shared_dies < 1:
            raise ValueError(f"decode placement needs shared_dies >= 1, got {shared_dies}")
        spare = dies - shared_dies - num_experts
        if spare < 0:
            raise ValueError(f"decode placement needs dies >= shared_dies + num_experts: {dies} dies < "
                             f"{shared_dies} shared + {num_experts} routed")
        if redundant is None:
            redundant = [i * num_experts // spare for i in range(spare)]
        redundant = _redundant_ids(redundant, spare, num_experts,
                                   f"decode placement with {dies} dies, {shared_dies} shared and {num_experts} "
                                   f"routed has {spare} redundant dies")
        slots = ([(num_experts,)] * shared_dies + [(e,) for e in range(num_experts)]
                 + [(e,) for e in redundant])
        return cls(num_experts, dies, tuple(slots))

    @classmethod
    def prefill_ep32(cls, num_experts=256, dies=32, redundant=None) -> "ExpertPlacement":
        """The prefill deployment (cloudmatrix-design.md §3): per die the shared expert (slot 0), E/dies routed
        experts (die d: d·E/dies …) and one redundant replica `redundant[d]`. Default `redundant[d]`: the first
        routed expert of die d+1 (mod dies)."""
        num_experts, dies, per = _even_split("prefill", num_experts, dies)
        if redundant is None:
            if dies == 1:
                raise ValueError("prefill placement with 1 die: the default redundant replica (the next die's first "
                                 "expert) is the die's own expert 0; pass redundant=[an expert id] explicitly")
            redundant = [((d + 1) % dies) * per for d in range(dies)]
        redundant = _redundant_ids(redundant, dies, num_experts,
                                   f"prefill placement needs one redundant expert per die ({dies})")
        slots = tuple((num_experts,) + tuple(range(d * per, (d + 1) * per)) + (redundant[d],)
                      for d in range(dies))
        return cls(num_experts, dies, slots)
