"""Mamba2 (Dao & Gu 2024): the SSD layer, a scalar decay per head, run as simple gated
linear attention.

    z, x, B, C, dt = W_in u            x: H heads of P channels; B, C: one group of N (shared)
    x, B, C        = SiLU(ShortConv([x, B, C]))
    dt_t           = softplus(dt + dt_bias)                          [H]
    S_t            = exp(-exp(A_log) dt_t) S_{t-1} + (dt_t B_t) x_t^T   [H, N, P]
    y_t            = S_t^T C_t + D * x_t
    out            = W_out RMSNorm(y * SiLU(z))                      (Mamba2's gated norm, norm after gate)

The skip term, the gate and the norm run as one kernel (`modules.SkipGatedRMSNorm`).

That is `chunk_simple_gla(q=C, k=B, v=dt*x, g=-exp(A_log)*dt, scale=1)` with one q/k head
shared by all H value heads; decoding a few tokens from a state runs `fused_recurrent_simple_gla`.
In ModelConfig terms N = head_dim and P = head_dim * expand_v.

Decoding state (`use_cache=True`): {"recurrent": [N_seq, H, N, P] float32,
"conv": [N_seq, H*P + 2N, W-1]}.
"""


import torch
import torch.nn.functional as F
from torch import nn

from flame import kernels, modules
from flame.models.config import ModelConfig
from flame.models.mixers.common import (apply_conv, init_conv, init_dt_bias, linear_attention_flops, local,
                                        use_recurrent_kernel)


class Mamba2(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        H, N, P = cfg.n_heads, cfg.linear_head_dim, cfg.linear_v_head_dim
        self.n_heads, self.state_size, self.head_v = H, N, P
        self.d_inner = H * P
        self.in_proj = nn.Linear(cfg.dim, 2 * self.d_inner + 2 * N + H, bias=False)
        self.use_short_conv = cfg.use_short_conv
        if cfg.use_short_conv:
            self.conv = modules.ShortConvolution(self.d_inner + 2 * N, cfg.conv_size, activation="silu", bias=True)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = modules.SkipGatedRMSNorm(self.d_inner, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.dim, bias=False)

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.in_proj.weight, std=init_std)
        nn.init.normal_(self.out_proj.weight, std=out_std)
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(1, 16).log())
        init_dt_bias(self.dt_bias)
        nn.init.ones_(self.D)
        if self.use_short_conv:
            init_conv(self.conv)

    def flops_per_token(self, seq_len: int) -> float:
        return self.n_heads * linear_attention_flops(self.state_size, self.head_v)

    def forward(self, u, cu_seqlens=None, position_ids=None, state=None, use_cache=False,
                max_seqlen=None):
        Bsz, T, _ = u.shape
        H, N, P = self.n_heads, self.state_size, self.head_v
        new_state = {} if use_cache else None
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * N, H], dim=-1)
        if self.use_short_conv:
            xbc = apply_conv(self.conv, xbc, cu_seqlens, state, new_state, "conv")
        else:
            xbc = F.silu(xbc)
        x, b, c = xbc.split([self.d_inner, N, N], dim=-1)
        gate_dtype = torch.promote_types(u.dtype, torch.float32)  # gates in at least fp32
        dt = F.softplus(dt.to(gate_dtype) + local(self.dt_bias).to(gate_dtype))     # [B, T, H]
        g = -local(self.A_log).to(gate_dtype).exp() * dt
        # B and C are shared by every head: one q/k head for H value heads, and dt moves onto
        # the values, (dt B) x^T = B (dt x)^T, so that nothing is repeated per head.
        q, k = c.unsqueeze(2), b.unsqueeze(2)                                      # [B, T, 1, N]
        x = x.view(Bsz, T, H, P)
        v = (x.to(gate_dtype) * dt.unsqueeze(-1)).to(x.dtype)                      # [B, T, H, P]

        rule = kernels.fused_recurrent_simple_gla if use_recurrent_kernel(state, T) else kernels.chunk_simple_gla
        y, final = rule(q, k, v, g, scale=1.0, initial_state=None if state is None else state["recurrent"],
                        output_final_state=use_cache, cu_seqlens=cu_seqlens)
        if use_cache:
            new_state["recurrent"] = final
        y = self.norm(y.reshape(Bsz, T, self.d_inner), x.reshape(Bsz, T, self.d_inner), local(self.D), z)
        return self.out_proj(y), new_state
