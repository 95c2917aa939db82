"""Token-mixer kernels and the fused linear cross-entropy.

Public functions follow fla 0.6's `fla.ops` semantics (layout [B, T, H, D], log-space gates,
fp32 states [N, H, K, V], `cu_seqlens` with B = 1), so switching is a change of import.
Each family has a pure-torch reference beside it; see `dispatch.py` for which one runs.
"""

from flame.kernels.cross_entropy import fused_linear_cross_entropy
from flame.kernels.delta_rule import chunk_delta_rule, chunk_gated_delta_rule
from flame.kernels.linear_attention import chunk_gla, chunk_simple_gla
from flame.kernels.recurrent import (
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gla,
    fused_recurrent_simple_gla,
)

__all__ = [
    "chunk_simple_gla",
    "chunk_gla",
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "fused_recurrent_simple_gla",
    "fused_recurrent_gla",
    "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_linear_cross_entropy",
]
