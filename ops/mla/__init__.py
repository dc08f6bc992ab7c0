"""Multi-head Latent Attention (MLA) for DeepSeek-V3/R1 (issue 5).

Host-side config, RoPE, weights and NumPy references live in config / rope / weights / reference; the paged NZ
cache in cache; the kernels in attention (FlashMLA-style decode), attention_prefill (causal flash prefill) and
prolog (MLAProlog: projections, RMSNorms, RoPE, the cache write); the whole sublayer in layer (mla_prefill,
mla_decode).
"""
from .config import MLAConfig  # noqa: E402,F401
from .rope import (KPE_ORDER, apply_rope_interleaved, apply_rope_rotate_half, deinterleave,  # noqa: E402,F401
                   interleave, rope_cos_sin)
from .weights import MLAWeights, random_state_dict  # noqa: E402,F401
from .reference import (mla_absorbed_decode_reference, mla_attention_absorbed_reference,  # noqa: E402,F401
                        mla_attention_naive_reference, mla_forward_reference, mla_prolog_reference, rms_norm)
from .cache import CacheFullError, MLACache  # noqa: E402,F401
from .attention import MLATiling, mla_attention_decode, mla_attention_decode_reference  # noqa: E402,F401
from .attention_prefill import PrefillTiling, mla_attention_prefill, mla_attention_prefill_reference  # noqa: E402,F401
from .prolog import PrologOutput, gather_context, mla_prolog  # noqa: E402,F401
from .layer import MLAStats, mla_decode, mla_prefill  # noqa: E402,F401
