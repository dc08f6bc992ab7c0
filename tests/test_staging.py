"""ops/rowwise.Staging, the host staging of every single-die op: die.gm is left exactly as it was on any failure
(GM full at any allocation, an error in the caller's block, a failed launch), and each op's return convention
(numpy arrays when every array operand was numpy on a functional die, else GlobalTensors) is kept."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ascendemu
from ascendemu import AllocationError, GlobalTensor
from ascendemu.ops.gemm import PackedWeight, batched_bf16_gemm, bf16_gemm, pack_heads, pack_weight
from ascendemu.ops.int8_gemm import grouped_int8_gemm, int8_gemm
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
}
MAX_OPERANDS = 8  # grouped_int8_gemm: a_q, a_scale, 3 weights, 3 weight scales


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


@pytest.mark.parametrize("name", sorted(OPS))
@given(functional=st.booleans(), gm=st.frozensets(st.integers(0, MAX_OPERANDS - 1)))
def test_failed_launch_frees_outputs_and_staged(name, functional, gm):
    die, _, op, args = _prepare(name, functional, gm)
    before = die.gm.in_use
    made = _record_allocations(die)

    def failing_launch(kern, block_dim=1, args=(), **_):
        raise ascendemu.ParamError(f"{kern.__name__}: the kernel failed")
    die.launch = failing_launch
    with pytest.raises(ascendemu.ParamError, match="the kernel failed"):
        op(*args)
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
