"""ops/rowwise.Staging, the host staging of every single-die op: die.gm is left exactly as it was on any failure
(GM full at any allocation, an error in the caller's block, a failed launch — any of them, for the ops of several
launches), and each op's return convention (numpy arrays when every array operand was numpy on a functional die,
else GlobalTensors) is kept. The MLA sublayer (mla_prefill / mla_decode: mla_prolog, gather_context, linear and
mla_attention_decode inside) also gives back its cache reservation."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ascendemu
from ascendemu import AllocationError, GlobalTensor
from ascendemu.ops.gemm import PackedWeight, batched_bf16_gemm, bf16_gemm, pack_heads, pack_weight
from ascendemu.ops.int8_gemm import grouped_int8_gemm, int8_gemm
from ascendemu.ops.matmul import matmul
from ascendemu.ops.mla.attention import mla_attention_decode
from ascendemu.ops.mla.cache import MLACache
from ascendemu.ops.mla.config import MLAConfig
from ascendemu.ops.mla.layer import mla_decode, mla_prefill
from ascendemu.ops.mla.weights import MLAWeights, random_state_dict
from ascendemu.ops.moe.config import MoEConfig
from ascendemu.ops.moe.gate import moe_gate
from ascendemu.ops.norm import add_rmsnorm, rmsnorm
from ascendemu.ops.quant import quantize_per_token
from ascendemu.ops.rowwise import Staging
from ascendemu.ops.swiglu import swiglu_quant

BF16 = ml_dtypes.bfloat16
RNG = np.random.default_rng(7)
X = RNG.standard_normal((5, 192)).astype(BF16)
R = RNG.standard_normal((5, 192)).astype(BF16)
W = RNG.standard_normal(192).astype(BF16)
GU = RNG.standard_normal((5, 128)).astype(BF16)
GATE_CFG = MoEConfig(hidden_size=64, n_routed_experts=16, num_experts_per_tok=3, n_group=2, topk_group=2,
                     moe_intermediate_size=32)
GX = RNG.standard_normal((4, 64)).astype(BF16)
GW = RNG.standard_normal((16, 64)).astype(BF16)
GB = RNG.standard_normal(16).astype(np.float32)
A = RNG.standard_normal((20, 64)).astype(BF16)
WB = pack_weight(RNG.standard_normal((48, 64)).astype(BF16))
AH = RNG.standard_normal((6, 3, 32)).astype(BF16)
WH = pack_heads(RNG.standard_normal((3, 16, 32)).astype(BF16))
AQ = RNG.integers(-127, 128, (12, 64), dtype=np.int8)
SA = RNG.random(12).astype(np.float32)
WQ = pack_weight(RNG.integers(-127, 128, (32, 64), dtype=np.int8))
SW = RNG.random(32).astype(np.float32)
MA = RNG.standard_normal((20, 32)).astype(BF16)
MB = RNG.standard_normal((32, 48)).astype(BF16)
DQ = RNG.standard_normal((2, 2, 3, 96)).astype(BF16)  # B 2, s_q 2 (MTP), h_q 3, kv 64 + pe 32
DECODE_LENS = {3: 20, 5: 9}  # seq id → tokens in the cache (blocks of 16: two sequences, two blocks + one)
DECODE_KV = {s: (RNG.standard_normal((n, 64)).astype(BF16), RNG.standard_normal((n, 32)).astype(BF16))
             for s, n in DECODE_LENS.items()}


class Put:
    """Hands each array operand to the op in turn: operand i goes as a GlobalTensor of the die (a phantom on a
    timing-only die) when i is in `gm`, else as the numpy array."""

    def __init__(self, die, gm=frozenset()):
        self.die, self.gm, self.i, self.moved = die, gm, 0, 0

    def __call__(self, x):
        i, self.i = self.i, self.i + 1
        if i not in self.gm:
            return x
        self.moved += 1
        return self.die.gm.from_numpy(x) if self.die.functional else self.die.gm.empty(x.shape, x.dtype)

    def weight(self, w: PackedWeight) -> PackedWeight:
        return PackedWeight(self(w.data), w.n, w.k)


# name → (die, put) → (op, args): the array operands pass through `put`
OPS = {
    "quantize_per_token": lambda d, p: (quantize_per_token, (d, p(X))),
    "rmsnorm": lambda d, p: (rmsnorm, (d, p(X), p(W))),
    "add_rmsnorm": lambda d, p: (add_rmsnorm, (d, p(X), p(R), p(W))),
    "swiglu_quant": lambda d, p: (swiglu_quant, (d, p(GU))),
    "moe_gate": lambda d, p: (moe_gate, (d, p(GX), p(GW), p(GB), GATE_CFG)),
    "bf16_gemm": lambda d, p: (bf16_gemm, (d, p(A), p.weight(WB))),
    "batched_bf16_gemm": lambda d, p: (batched_bf16_gemm, (d, p(AH), [p.weight(w) for w in WH])),
    "int8_gemm": lambda d, p: (int8_gemm, (d, p(AQ), p(SA), p.weight(WQ), p(SW))),
    "int8_gemm_int32": lambda d, p: (int8_gemm, (d, p(AQ), p(SA), p.weight(WQ), p(SW), "int32")),
    "grouped_int8_gemm": lambda d, p: (grouped_int8_gemm, (d, p(AQ), p(SA), [5, 0, 7], [p.weight(WQ) for _ in range(3)],
                                                           [p(SW) for _ in range(3)])),
    "matmul": lambda d, p: (matmul, (d, p(MA), p(MB))),
    "mla_attention_decode": lambda d, p: (mla_attention_decode, (d, p(DQ), _decode_cache(d), list(DECODE_LENS))),
}
MAX_OPERANDS = 8  # grouped_int8_gemm: a_q, a_scale, 3 weights, 3 weight scales


def _decode_cache(die) -> MLACache:
    """The cache mla_attention_decode reads, made before the op's allocations are counted (it is not the op's)."""
    cache = MLACache(die, None, 4, 16, kv_dim=64, pe_dim=32)
    for s, (c_kv, k_pe) in DECODE_KV.items():
        if die.functional:
            cache.append(s, c_kv, k_pe)
        else:
            cache.allocate([s], [len(c_kv)])
    return cache


def _as_tuple(res):
    return res if isinstance(res, tuple) else (res,)


def _record_allocations(die) -> list:
    """Every GM tensor allocated from now on (from_numpy allocates through empty)."""
    made, empty = [], die.gm.empty

    def recording(*args, **kwargs):
        t = empty(*args, **kwargs)
        made.append(t)
        return t
    die.gm.empty = recording
    return made


def _prepare(name, functional, gm):
    die = ascendemu.Die("910c", functional=functional)
    put = Put(die, gm)
    op, args = OPS[name](die, put)
    return die, put, op, args


@pytest.mark.parametrize("name", sorted(OPS))
@given(functional=st.booleans(), gm=st.frozensets(st.integers(0, MAX_OPERANDS - 1)))
def test_return_convention_and_nothing_left_behind(name, functional, gm):
    die, put, op, args = _prepare(name, functional, gm)
    before = die.gm.in_use
    outs = _as_tuple(op(*args))
    if functional and put.moved == 0:
        assert all(isinstance(o, np.ndarray) for o in outs)
        assert die.gm.in_use == before  # staged operands, workspaces and outputs all freed
    else:
        assert all(isinstance(o, GlobalTensor) and o.gm is die.gm and o.is_phantom == (not functional) for o in outs)
        assert die.gm.in_use == before + sum(o.nbytes for o in outs)  # only the outputs stay, for the caller


@pytest.mark.parametrize("name", sorted(OPS))
@given(functional=st.booleans(), gm=st.frozensets(st.integers(0, MAX_OPERANDS - 1)))
def test_gm_full_at_any_allocation_leaves_gm_as_it_was(name, functional, gm):
    die, _, op, args = _prepare(name, functional, gm)
    made = _record_allocations(die)
    op(*args)
    sizes = [t.nbytes for t in made]  # what one call allocates, in order: staged operands, outputs, workspaces
    for j in range(len(sizes)):  # GM is full at allocation j
        die, _, op, args = _prepare(name, functional, gm)
        before = die.gm.in_use
        die.gm.capacity = before + sum(sizes[:j]) + sizes[j] - 1  # one byte short
        made = _record_allocations(die)
        with pytest.raises(AllocationError, match="exceeds GM"):
            op(*args)
        assert len(made) == j and all(not t.allocation.live for t in made)
        assert die.gm.in_use == before


def _fail_launch(die, i: int) -> list:
    """Launch i (0-based) of `die` from now on raises; returns the kernels launched (the failing one last)."""
    real, launched = die.launch, []

    def launch(kern, block_dim=1, args=(), **kwargs):
        launched.append(kern)
        if len(launched) == i + 1:
            raise ascendemu.ParamError(f"{kern.__name__}: the kernel failed")
        return real(kern, block_dim=block_dim, args=args, **kwargs)
    die.launch = launch
    return launched


@pytest.mark.parametrize("name", sorted(OPS))
@given(functional=st.booleans(), gm=st.frozensets(st.integers(0, MAX_OPERANDS - 1)))
def test_failed_launch_frees_outputs_and_staged(name, functional, gm):
    die, _, op, args = _prepare(name, functional, gm)
    launched = _fail_launch(die, -1)  # (none fails: count them)
    op(*args)
    assert launched
    for i in range(len(launched)):  # launch i fails
        die, _, op, args = _prepare(name, functional, gm)
        before = die.gm.in_use
        made = _record_allocations(die)
        failed = _fail_launch(die, i)
        with pytest.raises(ascendemu.ParamError, match="the kernel failed"):
            op(*args)
        assert len(failed) == i + 1 and failed[i] is launched[i]
        assert made and all(not t.allocation.live for t in made)
        assert die.gm.in_use == before


def test_error_in_the_block_frees_what_was_staged():
    die = ascendemu.Die("910c")
    kept = die.gm.from_numpy(X)
    with pytest.raises(ValueError, match="checked after staging"):
        with Staging(die, "op") as s:
            s.put(X, "x")
            s.put(kept, "kept")
            s.output((4, 4), "float32")
            s.workspace((64,), "int32")
            raise ValueError("checked after staging")
    assert die.gm.in_use == kept.nbytes and kept.allocation.live


def test_put_stack_stages_equal_host_arrays_once():
    die = ascendemu.Die("910c")
    xs = [RNG.standard_normal((3, 4)).astype(np.float32) for _ in range(3)]
    with Staging(die, "op") as s:
        views = s.put_stack(xs, "xs")
        assert len({v.allocation.address for v in views}) == 1 and die.gm.in_use == 3 * xs[0].nbytes
        for v, x in zip(views, xs):
            np.testing.assert_array_equal(v.numpy(), x)
        assert s.all_host
    assert die.gm.in_use == 0
    with Staging(die, "op") as s:  # shapes or dtypes differ, or one is in GM: each staged on its own
        g = die.gm.from_numpy(xs[2])
        apart = s.put_stack([xs[0], xs[1].astype(np.float16), g], "xs")
        assert len({v.allocation.address for v in apart}) == 3 and apart[2] is g
        np.testing.assert_array_equal(apart[1].numpy(), xs[1].astype(np.float16))
        assert not s.all_host
    assert die.gm.in_use == g.nbytes


def test_staging_errors():
    die, other = ascendemu.Die("910c"), ascendemu.Die("910c")
    with pytest.raises(RuntimeError, match=r"op: use Staging as `with Staging\(die, op\) as st:`"):
        Staging(die, "op").put(X, "x")
    with pytest.raises(ValueError, match="op: w is a GlobalTensor of another die's GM"):
        with Staging(die, "op") as s:
            s.put(X, "x")
            s.put(other.gm.from_numpy(W), "w")
    assert die.gm.in_use == 0


def test_own_and_result():
    """own: another op's GlobalTensor freed with the scratch, or handed back as an output; result: the outputs as
    launch returns them (numpy when all host, the rest freed)."""
    die = ascendemu.Die("910c")
    with Staging(die, "op") as s:
        s.put(X, "x")
        kept = s.own(die.gm.from_numpy(W), output=True)
        gone = s.own(die.gm.from_numpy(R))
        (host,) = s.result()
    np.testing.assert_array_equal(host, W)
    assert die.gm.in_use == 0 and not kept.allocation.live and not gone.allocation.live
    with Staging(die, "op") as s:
        g = s.put(die.gm.from_numpy(X), "x")
        (out,) = (s.own(die.gm.from_numpy(W), output=True),)
        assert s.result() == (out,)
    assert die.gm.in_use == g.nbytes + out.nbytes and out.allocation.live
    other = ascendemu.Die("910c")
    for bad, what in ((other.gm.from_numpy(W), "GlobalTensor"), (W, "ndarray")):
        with pytest.raises(ValueError, match=f"op: own takes a GlobalTensor of this die's GM, got {what}"):
            with Staging(die, "op") as s:
                s.own(bad)
    with pytest.raises(RuntimeError, match="op: use Staging as"):
        Staging(die, "op").result()


# ------------------------------------------------------------------ the MLA sublayer (a few dozen launches each)

MLA_CFG = MLAConfig(hidden_size=64, num_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                    qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=512)
MLA_W = MLAWeights.from_hf(random_state_dict(MLA_CFG, seed=3), 0, MLA_CFG, int8=True)  # int8: linear's Staging too
MLA_STEPS = {  # name → (op, hidden rows, its other arguments)
    "mla_prefill": (mla_prefill, 3, ([2, 1], [2, 1])),  # a new sequence and a chunk of sequence 1
    "mla_decode": (mla_decode, 4, ([1, 2], 2)),  # MTP: both sequences, two tokens each (2 is made by setup)
}


def _mla_prepare(name):
    """Timing-only (the sweeps run the sublayer some 60 times), phantom hidden: sequence 1 holds 5 tokens (and
    for decode sequence 2 holds 3)."""
    die = ascendemu.Die("910c", functional=False)
    cache = MLACache(die, MLA_CFG, 6, 16)
    cache.allocate([1, 2] if name == "mla_decode" else [1], [5, 3] if name == "mla_decode" else [5])
    op, rows, rest = MLA_STEPS[name]
    hidden = die.gm.empty((rows, MLA_CFG.hidden_size), BF16)
    return die, cache, op, (die, hidden, MLA_W, cache) + rest


def _cache_state(cache):
    return [(s, cache.length(s)) for s in cache.seq_ids]


def _full_at(die, j: int) -> None:
    """GM is exactly full when allocation j (0-based) comes: nested ops free their staging part-way, so the
    capacity cannot be fixed beforehand."""
    empty, n = die.gm.empty, [0]

    def filling(*args, **kwargs):
        if n[0] == j:
            die.gm.capacity = die.gm.in_use
        n[0] += 1
        return empty(*args, **kwargs)
    die.gm.empty = filling


@pytest.mark.parametrize("name", sorted(MLA_STEPS))
def test_mla_sublayer_gm_full_at_any_allocation(name):
    die, cache, op, args = _mla_prepare(name)
    made = _record_allocations(die)
    op(*args)
    assert len(made) > 20 and all(t.nbytes > 0 for t in made)
    for j in range(len(made)):
        die, cache, op, args = _mla_prepare(name)
        before, state = die.gm.in_use, _cache_state(cache)
        _full_at(die, j)
        made = _record_allocations(die)
        with pytest.raises(AllocationError, match="exceeds GM"):
            op(*args)
        assert len(made) == j and all(not t.allocation.live for t in made)
        assert die.gm.in_use == before and _cache_state(cache) == state


@pytest.mark.parametrize("name", sorted(MLA_STEPS))
def test_mla_sublayer_failed_launch(name):
    die, cache, op, args = _mla_prepare(name)
    launched = _fail_launch(die, -1)
    op(*args)
    assert len(launched) > 10
    for i in range(len(launched)):
        die, cache, op, args = _mla_prepare(name)
        before, state = die.gm.in_use, _cache_state(cache)
        made = _record_allocations(die)
        _fail_launch(die, i)
        with pytest.raises(ascendemu.ParamError, match="the kernel failed"):
            op(*args)
        assert made and all(not t.allocation.live for t in made)
        assert die.gm.in_use == before and _cache_state(cache) == state
