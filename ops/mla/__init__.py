"""Multi-head Latent Attention (MLA) for DeepSeek-V3/R1 (issue 5).

Host-side config, RoPE, weights and NumPy references live in config / rope / weights /
reference; the cache and the kernels in cache / attention.
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
