"""DeltaNet (Schlag et al. 2021; parallelised by Yang et al. 2024): the ungated delta rule.

    q, k, v = SiLU(ShortConv(W x));  q, k L2-normalised per head
    beta_t  = sigmoid(W_b x)                                   [H]
    S_t     = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T
    o_t     = S_t^T q_t / sqrt(K)
    y       = W_o RMSNorm(o_t)                                 (norm per head)

Training runs `chunk_delta_rule`; decoding a few tokens from a state runs
`fused_recurrent_delta_rule`.

Decoding state (`use_cache=True`): {"recurrent": [N, H, K, V] float32, "conv_q": [N, H*K, W-1],
"conv_k": [N, H*K, W-1], "conv_v": [N, H*V, W-1]} (conv entries only with short convolutions).
"""

import torch
from torch import nn

from flame import kernels, modules
from flame.models.config import ModelConfig
from flame.models.mixers.common import (add_qkv_layers, delta_rule_flops, init_qkv_layers, project_qkv,
                                        use_recurrent_kernel)


class DeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        H, K, V = cfg.n_heads, cfg.linear_head_dim, cfg.linear_v_head_dim
        self.n_heads, self.head_k, self.head_v = H, K, V
        add_qkv_layers(self, cfg, H, K, V)
        self.b_proj = nn.Linear(cfg.dim, H, bias=False)
        self.o_proj = nn.Linear(H * V, cfg.dim, bias=False)
        self.o_norm = modules.RMSNorm(V, eps=cfg.norm_eps)

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        init_qkv_layers(self, init_std, extra=(self.b_proj,))
        nn.init.normal_(self.o_proj.weight, std=out_std)

    def flops_per_token(self, seq_len: int) -> float:
        return self.n_heads * delta_rule_flops(self.head_k, self.head_v)

    def forward(self, x, cu_seqlens=None, position_ids=None, state=None, use_cache=False,
                max_seqlen=None):
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_k, self.head_v
        new_state = {} if use_cache else None
        q, k, v, b = project_qkv(self, x, cu_seqlens, state, new_state, extra=("b_proj",),
                                 qk_norm_dim=K)
        q, k = q.view(B, T, H, K), k.view(B, T, H, K)
        v = v.view(B, T, H, V)
        beta = b.sigmoid()

        initial_state = None if state is None else state["recurrent"]
        if use_recurrent_kernel(state, T):
            o, final = kernels.fused_recurrent_delta_rule(q, k, v, beta, scale=K ** -0.5, initial_state=initial_state,
                                                          output_final_state=use_cache, cu_seqlens=cu_seqlens)
        else:
            o, final = kernels.chunk_delta_rule(q, k, v, beta, scale=K ** -0.5, initial_state=initial_state,
                                                output_final_state=use_cache, cu_seqlens=cu_seqlens,
                                                max_seqlen=max_seqlen)
        if use_cache:
            new_state["recurrent"] = final
        o = self.o_norm(o)
        return self.o_proj(o.reshape(B, T, H * V)), new_state
