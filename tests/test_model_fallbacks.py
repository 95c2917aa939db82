"""Small torch stand-ins for flame.modules / flame.kernels names that have not landed yet.

The model tests install them (see `install_missing`) only where the real name is absent or
still a placeholder that raises NotImplementedError, so the tests switch to the real modules
and kernels as soon as they exist. Nothing here is used outside the tests.
"""

import torch
import torch.nn.functional as F
from torch import nn

import flame.kernels
import flame.modules


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x, residual=None):
        if residual is not None:
            x = x + residual
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
        return y if residual is None else (y, x)


class GatedRMSNorm(RMSNorm):
    def __init__(self, dim, eps=1e-6, activation="silu"):
        super().__init__(dim, eps)

    def forward(self, x, gate):
        return super().forward(x) * F.silu(gate)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim, theta=10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, q, k, position_ids):
        d = self.head_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=q.device) / d))
        ang = position_ids.to(torch.float64)[..., None, None] * inv  # [B, T, 1, d/2]
        cos, sin = ang.cos(), ang.sin()

        def rot(x):
            x1, x2 = x.double().chunk(2, dim=-1)
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)

        return rot(q), rot(k)


class ShortConvolution(nn.Conv1d):
    def __init__(self, channels, kernel_size=4, activation="silu", bias=False):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias,
                         padding=kernel_size - 1)
        self.activation = activation

    def forward(self, x, cu_seqlens=None, cache=None, output_final_state=False):
        B, T, C = x.shape
        if cu_seqlens is not None:
            bounds = cu_seqlens.tolist()
            pieces = [self._one(x[:, s:e], None) for s, e in zip(bounds[:-1], bounds[1:])]
            y = torch.cat([p[0] for p in pieces], 1)
            caches = torch.cat([p[1] for p in pieces], 0)
        else:
            y, caches = self._one(x, cache)
        return y, (caches if output_final_state else None)

    def _one(self, x, cache):
        B, T, C = x.shape
        W = self.kernel_size[0]
        past = cache if cache is not None else x.new_zeros(B, C, W - 1)
        full = torch.cat([past, x.transpose(1, 2)], -1)  # [B, C, W-1+T]
        y = F.conv1d(full, self.weight, self.bias, groups=C)  # [B, C, T]
        if self.activation == "silu":
            y = F.silu(y)
        return y.transpose(1, 2), full[..., -(W - 1):]

    def step(self, x, cache):
        y, cache = self._one(x[:, None], cache)
        return y[:, 0], cache


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FusedLinearCrossEntropyLoss(nn.Module):
    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 logit_softcap=None):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, hidden, weight, target, bias=None):
        logits = (hidden @ weight.t()).float()
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction)


def _recurrence(q, k, v, g=None, gk=None, beta=None, scale=None, initial_state=None,
                output_final_state=False, cu_seqlens=None):
    """S_t = gates * S_{t-1} + k_t (v_t or its delta-rule correction)^T; o_t = scale q_t S_t."""
    B, T, H, K = q.shape
    if scale is None:
        scale = K ** -0.5
    if cu_seqlens is None:
        segs = [(b, 0, T) for b in range(B)]
    else:
        c = cu_seqlens.tolist()
        segs = [(0, s, e) for s, e in zip(c[:-1], c[1:])]
    dt = torch.promote_types(q.dtype, torch.float32)  # states are kept in at least fp32
    rows = [[None] * T for _ in range(B)]
    finals = []
    for n, (b, s, e) in enumerate(segs):
        S = initial_state[n].to(dt) if initial_state is not None else q.new_zeros(H, K, v.shape[-1], dtype=dt)
        for t in range(s, e):
            if g is not None:
                S = S * g[b, t].to(dt).exp()[:, None, None]
            if gk is not None:
                S = S * gk[b, t].to(dt).exp()[:, :, None]
            kt, vt = k[b, t].to(dt), v[b, t].to(dt)
            if beta is not None:
                vt = beta[b, t].to(dt)[:, None] * (vt - torch.einsum("hk,hkv->hv", kt, S))
            S = S + kt[:, :, None] * vt[:, None, :]
            rows[b][t] = torch.einsum("hk,hkv->hv", q[b, t].to(dt) * scale, S)
        finals.append(S)
    o = torch.stack([torch.stack(r) for r in rows]).to(v.dtype)
    return o, (torch.stack(finals) if output_final_state else None)


def _simple_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
    return _recurrence(q, k, v, g=g, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def _gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
    return _recurrence(q, k, v, gk=g, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def _delta(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
    return _recurrence(q, k, v, beta=beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def _gated_delta(q, k, v, g, beta=None, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None, **kw):
    return _recurrence(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens)


MODULES = {
    "RMSNorm": RMSNorm,
    "GatedRMSNorm": GatedRMSNorm,
    "RotaryEmbedding": RotaryEmbedding,
    "ShortConvolution": ShortConvolution,
    "SwiGLU": SwiGLU,
    "FusedLinearCrossEntropyLoss": FusedLinearCrossEntropyLoss,
}

KERNELS = {
    "chunk_simple_gla": _simple_gla,
    "fused_recurrent_simple_gla": _simple_gla,
    "chunk_gla": _gla,
    "fused_recurrent_gla": _gla,
    "chunk_delta_rule": _delta,
    "fused_recurrent_delta_rule": _delta,
    "chunk_gated_delta_rule": _gated_delta,
    "fused_recurrent_gated_delta_rule": _gated_delta,
}


def _kernel_landed(name: str) -> bool:
    fn = getattr(flame.kernels, name, None)
    if fn is None:
        return False
    q = torch.randn(1, 4, 1, 16)
    g = -torch.rand(1, 4, 1)
    args = {
        "chunk_simple_gla": (q, q, q, g), "fused_recurrent_simple_gla": (q, q, q, g),
        "chunk_gla": (q, q, q, -torch.rand(1, 4, 1, 16)), "fused_recurrent_gla": (q, q, q, -torch.rand(1, 4, 1, 16)),
        "chunk_delta_rule": (q, q, q, torch.rand(1, 4, 1)), "fused_recurrent_delta_rule": (q, q, q, torch.rand(1, 4, 1)),
        "chunk_gated_delta_rule": (q, q, q, g),
        "fused_recurrent_gated_delta_rule": (q, q, q, g),
    }[name]
    kwargs = {"beta": torch.rand(1, 4, 1)} if "gated_delta" in name else {}
    try:
        fn(*args, **kwargs)
    except NotImplementedError:
        return False
    return True


def install_missing(monkeypatch) -> list[str]:
    """Put a stand-in where a flame.modules / flame.kernels name is missing; returns their names."""
    installed = []
    for name, cls in MODULES.items():
        if not hasattr(flame.modules, name):
            monkeypatch.setattr(flame.modules, name, cls, raising=False)
            installed.append(name)
    for name, fn in KERNELS.items():
        if not _kernel_landed(name):
            monkeypatch.setattr(flame.kernels, name, fn, raising=False)
            installed.append(name)
    return installed
