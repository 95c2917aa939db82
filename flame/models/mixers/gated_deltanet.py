"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024), as used in Qwen3-Next.

    q, k, v = SiLU(ShortConv(W x))           per head: q, k of size K, v of size V
    q, k    = q / ||q||, k / ||k||
    beta_t  = sigmoid(W_b x)                 [H]  write strength
    g_t     = -exp(A_log) * softplus(W_a x + dt_bias)   [H]  log decay (Mamba2-style)
    S_t     = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T
    o_t     = S_t^T q_t / sqrt(K)
    y       = W_o GatedRMSNorm(o_t, W_g x)   (norm per head, SiLU output gate)

Training runs `chunk_gated_delta_rule`; decoding a few tokens from a state runs
`fused_recurrent_gated_delta_rule`.

Decoding state (`use_cache=True`): {"recurrent": [N, H, K, V] float32, "conv_q": [N, H*K, W-1],
"conv_k": [N, H*K, W-1], "conv_v": [N, H*V, W-1]} (conv entries only with short convolutions;
N = number of sequences).
"""

import torch
import torch.nn.functional as F
from torch import nn

from flame import kernels, modules
from flame.models.config import ModelConfig
from flame.models.mixers.common import (add_qkv_layers, delta_rule_flops, init_dt_bias, init_qkv_layers,
                                        local, project_qkv, use_recurrent_kernel)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        H, K, V = cfg.n_heads, cfg.linear_head_dim, cfg.linear_v_head_dim
        self.n_heads, self.head_k, self.head_v = H, K, V
        add_qkv_layers(self, cfg, H, K, V)
        self.a_proj = nn.Linear(cfg.dim, H, bias=False)
        self.b_proj = nn.Linear(cfg.dim, H, bias=False)
        self.g_proj = nn.Linear(cfg.dim, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, cfg.dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.o_norm = modules.GatedRMSNorm(V, eps=cfg.norm_eps, activation="silu")

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        init_qkv_layers(self, init_std, extra=(self.a_proj, self.b_proj, self.g_proj))
        nn.init.normal_(self.o_proj.weight, std=out_std)
        # decay rates A in [0, 16] as in the reference implementation
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(0, 16).clamp(min=1e-4).log())
        init_dt_bias(self.dt_bias)

    def flops_per_token(self, seq_len: int) -> float:
        return self.n_heads * delta_rule_flops(self.head_k, self.head_v)

    def forward(self, x, cu_seqlens=None, position_ids=None, state=None, use_cache=False,
                max_seqlen=None):
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_k, self.head_v
        new_state = {} if use_cache else None
        q, k, v, a, b = project_qkv(self, x, cu_seqlens, state, new_state, extra=("a_proj", "b_proj"),
                                    qk_norm_dim=K)
        q, k = q.view(B, T, H, K), k.view(B, T, H, K)
        v = v.view(B, T, H, V)
        beta = b.sigmoid()
        gate_dtype = torch.promote_types(x.dtype, torch.float32)  # gates in at least fp32
        g = -local(self.A_log).to(gate_dtype).exp() * F.softplus(
            a.to(gate_dtype) + local(self.dt_bias).to(gate_dtype))

        initial_state = None if state is None else state["recurrent"]
        if use_recurrent_kernel(state, T):
            # by keyword: the recurrent kernel's fifth positional argument is gk, not beta
            o, final = kernels.fused_recurrent_gated_delta_rule(
                q, k, v, g=g, beta=beta, scale=K ** -0.5, initial_state=initial_state,
                output_final_state=use_cache, cu_seqlens=cu_seqlens)
        else:
            o, final = kernels.chunk_gated_delta_rule(
                q, k, v, g=g, beta=beta, scale=K ** -0.5, initial_state=initial_state,
                output_final_state=use_cache, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if use_cache:
            new_state["recurrent"] = final
        o = self.o_norm(o, self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V)), new_state
