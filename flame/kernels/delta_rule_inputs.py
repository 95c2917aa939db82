"""Input checks shared by the delta-rule and recurrent families.

Every check raises a ValueError that names the argument and says what to change. Value checks on
cu_seqlens read its contents, so they run only where that costs no host synchronisation (CPU
tensors, eager mode); on the GPU a device-side assert guards the same conditions.
"""

import torch

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256


def _check_rank(name: str, x: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, B: int, T: int) -> int:
    """Returns N, the number of sequences."""
    if cu_seqlens is None:
        return B
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1] of sequence boundaries")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (flatten to [1, B*T, ...]), got B={B}")
    if torch.compiler.is_compiling():
        return cu_seqlens.shape[0] - 1
    if cu_seqlens.device.type == "cpu":
        if cu_seqlens[0].item() != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {cu_seqlens[0].item()}")
        if cu_seqlens[-1].item() != T:
            raise ValueError(f"cu_seqlens must end at the sequence length T={T}, got {cu_seqlens[-1].item()}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
    else:
        torch._assert_async(cu_seqlens[0] == 0, "cu_seqlens must start at 0")
        torch._assert_async(cu_seqlens[-1] == T, "cu_seqlens must end at T")
        torch._assert_async((cu_seqlens[1:] >= cu_seqlens[:-1]).all(), "cu_seqlens must be non-decreasing")
    return cu_seqlens.shape[0] - 1


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
    _check_rank("q", q, 4, "[B, T, H, K]")
    _check_rank("k", k, 4, "[B, T, H, K]")
    _check_rank("v", v, 4, "[B, T, HV, V]")
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (B, T):
        raise ValueError(f"v must have batch and time dims {(B, T)} like q, got {tuple(v.shape[:2])}")
    if grouped_heads:
        if HV % H != 0:
            raise ValueError(f"v's heads ({HV}) must be a multiple of q/k's heads ({H})")
    elif HV != H:
        raise ValueError(f"v must have the same number of heads as q ({H}), got {HV}")
    for name, dim in (("q/k head dim K", K), ("v head dim V", V)):
        if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name}={dim} is unsupported; use {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    for group, tail, layout in ((per_head, (), "[B, T, HV]"), (per_key, (K,), "[B, T, HV, K]"),
                                (per_value, (V,), "[B, T, HV, V]")):
        for name, x in group.items():
            if x is None:
                continue
            _check_rank(name, x, 3 + len(tail), layout)
            if tuple(x.shape) != (B, T, HV, *tail):
                raise ValueError(f"{name} must have shape {layout} = {(B, T, HV, *tail)}, got {tuple(x.shape)}")
    N = check_cu_seqlens(cu_seqlens, B, T)
    if initial_state is not None:
        _check_rank("initial_state", initial_state, 4, "[N, HV, K, V]")
        if not torch.compiler.is_compiling() and tuple(initial_state.shape[1:]) != (HV, K, V):
            raise ValueError(f"initial_state must have shape [N, {HV}, {K}, {V}], got {tuple(initial_state.shape)}")
        if initial_state.shape[0] != N:
            raise ValueError(f"initial_state must have one row per sequence ({N}), got {initial_state.shape[0]}")
    return N


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ||x|| over the last dim, in fp32, returned in x's dtype."""
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The torch references compute in fp32, or in float64 when given float64 (the test oracle)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
