"""ascendemu: an exact, cycle-modelled emulator of Huawei Ascend 910C AI cores.

    import ascendemu
    from ascendemu import HardEvent

    @ascendemu.kernel("aiv")
    def add_one(ctx, x, y, n):
        ub = ctx.ub.alloc((n,), "float16")
        ctx.data_copy(ub, x)
        ctx.set_flag(HardEvent.MTE2_V, 0); ctx.wait_flag(HardEvent.MTE2_V, 0)
        ctx.adds(ub, ub, 1.0, n)
        ctx.set_flag(HardEvent.V_MTE3, 0); ctx.wait_flag(HardEvent.V_MTE3, 0)
        ctx.data_copy(y, ub)

    die = ascendemu.Die("910c")
    x = die.gm.from_numpy(np.ones(256, np.float16)); y = die.gm.empty(256, "float16")
    die.launch(add_one, block_dim=1, args=(x, y, 256))
    print(die.last_report.summary())

Layers: ascendemu.ops (kernels) → ascendemu (this machine) → ascendemu.layouts (formats).
"""
from . import spec
from .buffers import LocalBuffer, LocalTensor, TPosition
from .checks import Checks
from .cluster import Cluster, ClusterReport
from .die import CoreSet, Die, Event, Recording, Stream
from .errors import (AlignmentError, AllocationError, BoundsError, DeadlockError, DTypeError, EmulatorError,
                     ParamError, PhantomError, RaceError, SyncError)
from .gm import GlobalMemory, GlobalTensor
from .kernel import Kernel, kernel
from .numerics import QuantMode, RoundMode, make_quant_word, quant_words
from .params import (BinaryRepeatParams, BrcbRepeatParams, DataCopyExtParams, DataCopyPadExtParams, DataCopyParams,
                     FixpipeParamsV220, LoadData2DParams, MmadParams, Nd2NzParams, UnaryRepeatParams)
from .pipes import (PIPE_ALL, PIPE_FIX, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3, PIPE_S, PIPE_V, HardEvent, Pipe)
from .report import Report
from .spec import Spec
from .tpipe import TBuf, TPipe, TQue
from .vector import CMPMODE, MASK_PLACEHOLDER, SELMODE, ReduceOrder

__all__ = [
    "spec", "Spec", "Die", "Recording", "Cluster", "ClusterReport", "CoreSet", "Stream", "Event", "Report", "Checks", "kernel", "Kernel",
    "LocalBuffer", "LocalTensor", "GlobalMemory", "GlobalTensor", "TPosition", "TPipe", "TQue", "TBuf",
    "HardEvent", "Pipe", "PIPE_S", "PIPE_V", "PIPE_M", "PIPE_MTE1", "PIPE_MTE2", "PIPE_MTE3", "PIPE_FIX", "PIPE_ALL",
    "DataCopyParams", "DataCopyExtParams", "DataCopyPadExtParams", "Nd2NzParams", "LoadData2DParams", "MmadParams",
    "FixpipeParamsV220", "BinaryRepeatParams", "UnaryRepeatParams", "BrcbRepeatParams",
    "RoundMode", "QuantMode", "make_quant_word", "quant_words", "CMPMODE", "SELMODE", "ReduceOrder",
    "MASK_PLACEHOLDER",
    "EmulatorError", "AllocationError", "AlignmentError", "BoundsError", "DTypeError", "ParamError", "SyncError",
    "RaceError", "PhantomError", "DeadlockError",
]
