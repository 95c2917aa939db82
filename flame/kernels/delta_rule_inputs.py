"""Input checks shared by the delta-rule and recurrent families, built on flame.kernels.utils.

Every check raises a ValueError that names the argument and says what to change.
"""

import torch

from flame.kernels.utils import (
    check_cu_seqlens,
    check_head_dim,
    check_heads,
    check_initial_state,
    require_floating,
    require_rank,
    require_shape,
)


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    per_head: dict[str, torch.Tensor | None],
    per_key: dict[str, torch.Tensor | None],
    per_value: dict[str, torch.Tensor | None],
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    grouped_heads: bool,
) -> int:
    """Checks shapes; per_head tensors are [B, T, HV], per_key [B, T, HV, K], per_value [B, T, HV, V].

    Returns N, the number of sequences (rows of the state).
    """
    for name, x, layout in (("q", q, "[B, T, H, K]"), ("k", k, "[B, T, H, K]"), ("v", v, "[B, T, HV, V]")):
        require_rank(x, name, 4, layout)
        require_floating(x, name)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    require_shape(k, "k", q.shape, "[B, T, H, K] like q")
    if tuple(v.shape[:2]) != (B, T):
        raise ValueError(f"v must have batch and time dims {(B, T)} like q, got {tuple(v.shape[:2])}")
    if grouped_heads:
        check_heads(HV, "v", H)
    elif HV != H:
        raise ValueError(f"v must have the same number of heads as q ({H}), got {HV}")
    check_head_dim(K, "q/k")
    check_head_dim(V, "v")
    for group, tail, layout in ((per_head, (), "[B, T, HV]"), (per_key, (K,), "[B, T, HV, K]"),
                                (per_value, (V,), "[B, T, HV, V]")):
        for name, x in group.items():
            if x is None:
                continue
            require_rank(x, name, 3 + len(tail), layout)
            require_floating(x, name)
            require_shape(x, name, (B, T, HV, *tail), layout)
    check_cu_seqlens(cu_seqlens, B, T)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None:
        require_floating(initial_state, "initial_state")
    check_initial_state(initial_state, N, HV, K, V)
    return N


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ||x|| over the last dim, in fp32, returned in x's dtype."""
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The torch references compute in fp32, or in float64 when given float64 (the test oracle)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
