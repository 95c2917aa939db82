"""Gated Linear Attention (Yang et al. 2024): a data-dependent forget gate per key channel.

    q, k, v = W x                   (optional SiLU short convolutions, off in the paper)
    a_t     = logsigmoid(W_up W_down x + b) / gate_logit_normalizer   [H, K]  log forget gate,
              low-rank (rank gate_low_rank_dim); the normaliser keeps the decay slow
    S_t     = diag(exp(a_t)) S_{t-1} + k_t v_t^T
    o_t     = S_t^T q_t / sqrt(K)
    y       = W_o GatedRMSNorm(o_t, W_g x)   (norm per head, SiLU output gate)

Training runs `chunk_gla`; decoding a few tokens from a state runs `fused_recurrent_gla`.

Decoding state (`use_cache=True`): {"recurrent": [N, H, K, V] float32} plus "conv_q", "conv_k",
"conv_v" ([N, channels, W-1]) when short convolutions are on.
"""

import torch
import torch.nn.functional as F
from torch import nn

from flame import kernels, modules
from flame.models.config import ModelConfig
from flame.models.mixers.common import (add_qkv_layers, init_qkv_layers, linear_attention_flops, project_qkv,
                                        use_recurrent_kernel)


class GatedLinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        H, K, V = cfg.n_heads, cfg.linear_head_dim, cfg.linear_v_head_dim
        self.n_heads, self.head_k, self.head_v = H, K, V
        self.gate_logit_normalizer = cfg.gate_logit_normalizer
        add_qkv_layers(self, cfg, H, K, V)
        self.gk_down = nn.Linear(cfg.dim, cfg.gate_low_rank_dim, bias=False)
        self.gk_up = nn.Linear(cfg.gate_low_rank_dim, H * K, bias=True)
        self.g_proj = nn.Linear(cfg.dim, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, cfg.dim, bias=False)
        self.o_norm = modules.GatedRMSNorm(V, eps=cfg.norm_eps, activation="silu")

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        init_qkv_layers(self, init_std, extra=(self.gk_down, self.gk_up, self.g_proj))
        nn.init.zeros_(self.gk_up.bias)
        nn.init.normal_(self.o_proj.weight, std=out_std)

    def flops_per_token(self, seq_len: int) -> float:
        return self.n_heads * linear_attention_flops(self.head_k, self.head_v)

    def forward(self, x, cu_seqlens=None, position_ids=None, state=None, use_cache=False,
                max_seqlen=None):
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_k, self.head_v
        new_state = {} if use_cache else None
        q, k, v, gk_low = project_qkv(self, x, cu_seqlens, state, new_state, extra=("gk_down",))
        gk = F.logsigmoid(self.gk_up(gk_low).to(torch.promote_types(x.dtype, torch.float32))) / self.gate_logit_normalizer

        rule = kernels.fused_recurrent_gla if use_recurrent_kernel(state, T) else kernels.chunk_gla
        o, final = rule(q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V), gk.view(B, T, H, K),
                        scale=K ** -0.5, initial_state=None if state is None else state["recurrent"],
                        output_final_state=use_cache, cu_seqlens=cu_seqlens)
        if use_cache:
            new_state["recurrent"] = final
        o = self.o_norm(o, self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V)), new_state
