"""Hand-written kernels on the emulator, each with its NumPy reference beside it.

- matmul: a tiled fp16/bf16 matmul on one AIC.
- gemm: BF16 GEMM and per-head batched BF16 GEMM on the 24 AICs (the MLA projections), and the packing,
  planning and AIC body they share with the INT8 GEMM.
- int8_gemm: per-channel weight quantisation and packing, INT8 GEMM and grouped (expert) INT8 GEMM on
  24 AIC + 48 AIV with dequantisation on the AIV.
- quant, swiglu, norm (on rowwise): per-token quantisation, SwiGLU fused with re-quantisation, RMSNorm and
  add-RMSNorm on the AIV.
- alltoall: an AIV-Direct token exchange across a cluster.
- mla: Multi-head Latent Attention: config, RoPE, weights, references, the paged NZ cache, MLAProlog, the
  FlashMLA-style decode and flash prefill attention, and the whole sublayer (mla_prefill, mla_decode).
- moe: DeepSeek MoE over expert parallelism: routing, placements, FusedDispatch / FusedCombine (AIV-Direct or
  SDMA), the expert MLPs and the MoE sublayer.
The microbatch pipeline is not built yet.
"""
from .gemm import batched_bf16_gemm, bf16_gemm, pack_heads, packed_heads  # noqa: E402,F401
from .int8_gemm import (GemmTiles, PackedWeight, grouped_int8_gemm, int8_gemm, pack_weight,  # noqa: E402,F401
                        quantize_weight_per_channel)
from .norm import add_rmsnorm, rmsnorm  # noqa: E402,F401
from .quant import quantize_per_token  # noqa: E402,F401
from .rowwise import RowTiling  # noqa: E402,F401
from .swiglu import swiglu_quant  # noqa: E402,F401
