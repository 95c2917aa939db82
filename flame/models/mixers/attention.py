"""Softmax attention: grouped-query, rotary, global or sliding-window, document-aware.

    q, k, v = Wq x, Wk x, Wv x            (n_kv_heads <= n_heads: grouped-query attention)
    q, k = rotary(q, k, position_ids)
    y = Wo softmax(q k^T / sqrt(d) + causal [+ window] [+ same-document] mask) v

Which kernel runs:
- no document boundaries, no window: SDPA with is_causal; on CUDA cuDNN's fused attention
  first (SDPA_BACKENDS), then flash, memory-efficient and math where cuDNN declines. On the
  H100 at 8 x 4096 tokens, 12 heads of 64, cuDNN's forward+backward takes 1.9 ms against 3.0
  ms for the flash kernel SDPA picks by default (benchmarks/results/titan_compare.json);
- with `cu_seqlens` or a window, on CUDA: variable-length flash attention
  (torch.nn.attention.varlen), where this torch has it;
- otherwise: SDPA with an explicit boolean mask (block-diagonal x causal x window). It builds a
  [T, T] mask, so it is the CPU / reference path, not the long-sequence path.

Decoding state (`use_cache=True`): a dict {"k": [B, S, n_kv_heads, d], "v": [B, S, n_kv_heads, d],
"pos": [B] int64 positions already consumed}. With a sliding window only the last W - 1 keys are
kept. Rotary positions of new tokens continue from "pos" unless `position_ids` are given.
"""

import inspect
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flame import modules
from flame.models.config import ModelConfig
from flame.models.mixers.common import token_positions

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # pragma: no cover - older torch
    _varlen_attn, _VARLEN_PARAMS = None, set()


# The order in which SDPA tries its CUDA kernels for the causal, unmasked case. cuDNN's fused
# attention comes first (as in torchtitan); each later one is used only where those before it
# refuse the inputs (dtype, head dim, deterministic mode, ...).
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def document_mask(cu_seqlens: torch.Tensor | None, total: int, window: int | None, device) -> torch.Tensor:
    """[total, total] boolean mask: causal, inside one document, within the window."""
    idx = torch.arange(total, device=device)
    mask = idx[:, None] >= idx[None, :]
    if window is not None:
        mask &= idx[:, None] - idx[None, :] < window
    if cu_seqlens is not None:
        doc = torch.searchsorted(cu_seqlens[1:].long().to(device), idx, right=True)
        mask &= doc[:, None] == doc[None, :]
    return mask


def causal_flops_per_token(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends to in a causal (optionally windowed) sequence."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # the first W tokens see 1..W keys, the rest see W
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.attn_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.attn_dim_per_head
        self.window = cfg.sliding_window
        d = self.head_dim
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, cfg.dim, bias=False)
        self.rotary = modules.RotaryEmbedding(d, theta=cfg.rope_theta)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=init_std)
        nn.init.normal_(self.o_proj.weight, std=out_std)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs of QK^T and PV per token: 3 x forward (2 matmuls x 2 FLOPs per MAC),
        counting only the causal (and in-window) pairs that the kernel needs."""
        keys = causal_flops_per_token(seq_len, self.window)
        return 3 * 2 * 2 * self.n_heads * self.head_dim * keys

    def forward(self, x, cu_seqlens=None, position_ids=None, state=None, use_cache=False,
                max_seqlen=None):
        B, T, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_heads, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, d)

        position_ids = token_positions(B, T, x.device, cu_seqlens, position_ids, state)
        q, k = self.rotary(q, k, position_ids)

        if cu_seqlens is not None and (state is not None or use_cache):
            # a K/V cache is per batch row; packed documents would share one
            raise ValueError("attention: cu_seqlens cannot be combined with use_cache or a decoding "
                             "state; give each sequence its own batch row when decoding")
        if state is not None:
            k = torch.cat([state["k"], k], dim=1)
            v = torch.cat([state["v"], v], dim=1)
            y = self._attend_with_cache(q, k, v)
        else:
            y = self._attend(q, k, v, cu_seqlens, max_seqlen)

        new_state = None
        if use_cache:
            if self.window is not None:  # later queries never see keys older than W - 1 steps
                keep = k.shape[1] - min(k.shape[1], self.window - 1)
                k, v = k[:, keep:], v[:, keep:]
            pos = state["pos"] + T if state is not None else torch.full((B,), T, dtype=torch.long, device=x.device)
            new_state = {"k": k, "v": v, "pos": pos}
        return self.o_proj(y.reshape(B, T, self.n_heads * d)), new_state

    def _attend(self, q, k, v, cu_seqlens, max_seqlen=None):
        B, T = q.shape[:2]
        if cu_seqlens is None and self.window is None:
            priority = sdpa_kernel(SDPA_BACKENDS, set_priority=True) if q.is_cuda else nullcontext()
            with priority:
                y = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                    enable_gqa=self.n_kv_heads != self.n_heads)
            return y.transpose(1, 2)
        if q.is_cuda and _varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16):
            return self._attend_varlen(q, k, v, cu_seqlens, max_seqlen)
        if cu_seqlens is not None:
            q, k, v = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v))
        mask = document_mask(cu_seqlens, q.shape[1], self.window, q.device)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            enable_gqa=self.n_kv_heads != self.n_heads)
        return y.transpose(1, 2).reshape(B, T, self.n_heads, -1)

    def _attend_varlen(self, q, k, v, cu_seqlens, max_seqlen=None):
        B, T = q.shape[:2]
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
            max_seqlen = T
        cu = cu_seqlens.to(torch.int32)
        q, k, v = (t.reshape(B * T, *t.shape[2:]) for t in (q, k, v))
        kwargs = {}
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = self.n_kv_heads != self.n_heads
        elif self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        if "window_size" in _VARLEN_PARAMS:
            kwargs["window_size"] = (-1 if self.window is None else self.window - 1, 0)
        else:
            if self.window is not None:
                mask = document_mask(cu, B * T, self.window, q.device)
                y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                   v.transpose(0, 1)[None], attn_mask=mask)
                return y[0].transpose(0, 1).reshape(B, T, self.n_heads, -1)
            kwargs["is_causal"] = True
        # max_q/max_k size the kernel grid and only need to bound the longest document; a tight
        # bound (the row length, from the model) saves launching blocks that exit at once
        bound = max_seqlen if max_seqlen is not None else B * T
        y = _varlen_attn(q, k, v, cu, cu, bound, bound, **kwargs)
        return y.reshape(B, T, self.n_heads, -1)

    def _attend_with_cache(self, q, k, v):
        """New queries q [B, T] against cached + new keys k, v [B, S + T]."""
        T = q.shape[1]
        S = k.shape[1] - T
        # query i (at S + i) sees keys j <= S + i, within the window
        qi = torch.arange(T, device=q.device)[:, None] + S
        kj = torch.arange(S + T, device=q.device)[None, :]
        mask = kj <= qi
        if self.window is not None:
            mask &= qi - kj < self.window
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            enable_gqa=self.n_kv_heads != self.n_heads)
        return y.transpose(1, 2)
