"""RetNet multi-scale retention (Sun et al. 2023): linear attention with a fixed decay per head.

    q, k    = rotary(W_q x, W_k x);  v = W_v x   (optional SiLU short convolutions, off in the paper)
    gamma_h = 1 - 2^(-5 - h)                      head h = 0..H-1, fixed, not learned
    S_t     = gamma_h S_{t-1} + k_t v_t^T
    o_t     = S_t^T q_t / sqrt(K)
    y       = W_o GatedRMSNorm(o_t, W_g x)        (per-head norm, SiLU output gate)

Training runs `chunk_simple_gla` with g = log(gamma); decoding a few tokens from a state runs
`fused_recurrent_simple_gla`.

Decoding state (`use_cache=True`): {"recurrent": [N, H, K, V] float32, "pos": [B] tokens consumed
(rotary positions continue from it)} plus "conv_q", "conv_k", "conv_v" when short convolutions are on.
"""

import torch
from torch import nn

from flame import kernels, modules
from flame.models.config import ModelConfig
from flame.models.mixers.common import (add_qkv_layers, init_qkv_layers, linear_attention_flops, project_qkv,
                                        token_positions, use_recurrent_kernel)


def retention_log_decay(n_heads: int, device=None, first_head: int = 0) -> torch.Tensor:
    """log(1 - 2^(-5 - h)) for heads h = first_head .. first_head + n_heads - 1 (float32)."""
    h = torch.arange(first_head, first_head + n_heads, dtype=torch.float32, device=device)
    return torch.log1p(-torch.pow(2.0, -5.0 - h))


class MultiScaleRetention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        H, K, V = cfg.n_heads, cfg.linear_head_dim, cfg.linear_v_head_dim
        self.n_heads, self.head_k, self.head_v = H, K, V
        # global index of this module's first head: tensor parallelism gives each rank a slice
        # of the heads, and the decay depends on the head index
        self.first_head = 0
        add_qkv_layers(self, cfg, H, K, V)
        self.g_proj = nn.Linear(cfg.dim, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, cfg.dim, bias=False)
        self.rotary = modules.RotaryEmbedding(K, theta=cfg.rope_theta)
        self.o_norm = modules.GatedRMSNorm(V, eps=cfg.norm_eps, activation="silu")

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        init_qkv_layers(self, init_std, extra=(self.g_proj,))
        nn.init.normal_(self.o_proj.weight, std=out_std)

    def flops_per_token(self, seq_len: int) -> float:
        return self.n_heads * linear_attention_flops(self.head_k, self.head_v)

    def forward(self, x, cu_seqlens=None, position_ids=None, state=None, use_cache=False,
                max_seqlen=None):
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_k, self.head_v
        new_state = {} if use_cache else None
        q, k, v = project_qkv(self, x, cu_seqlens, state, new_state)
        positions = token_positions(B, T, x.device, cu_seqlens, position_ids, state)
        q, k = self.rotary(q.view(B, T, H, K), k.view(B, T, H, K), positions)
        g = retention_log_decay(H, x.device, self.first_head).to(torch.promote_types(x.dtype, torch.float32)).expand(B, T, H)

        rule = kernels.fused_recurrent_simple_gla if use_recurrent_kernel(state, T) else kernels.chunk_simple_gla
        o, final = rule(q, k, v.view(B, T, H, V), g, scale=K ** -0.5,
                        initial_state=None if state is None else state["recurrent"],
                        output_final_state=use_cache, cu_seqlens=cu_seqlens)
        if use_cache:
            new_state["recurrent"] = final
            new_state["pos"] = (state["pos"] if state is not None else
                                torch.zeros(B, dtype=torch.long, device=x.device)) + T
        o = self.o_norm(o, self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V)), new_state
