"""DeepSeek MoE over expert parallelism (issue 6): routing, placement, FusedDispatch / FusedCombine over
AIV-Direct (and SDMA), the expert MLPs and the whole MoE sublayer."""
from .config import MoEConfig  # noqa: E402,F401
from .placement import ExpertPlacement  # noqa: E402,F401
from .gate import moe_gate  # noqa: E402,F401
from .dispatch import (SCALE_TAIL_BYTES, DispatchHandle, ReceivedTokens, fused_combine, fused_dispatch,  # noqa: E402,F401
                       sdma_combine, sdma_dispatch)
from .experts import ExpertWeights, PackedExpert, moe_experts  # noqa: E402,F401
from .layer import MoELayerWeights, moe_layer, shared_expert  # noqa: E402,F401
from .reference import moe_reference, routing_reference  # noqa: E402,F401
