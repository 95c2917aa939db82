"""flame's language models in plain PyTorch, for exported models loaded where flame is absent.

This file imports only torch and is written into every export as remote code. It builds the
same module tree as `flame.models.build_model` (same parameter names and shapes, so the same
weights load into either) and keeps each mixer's decoding state in the same format (a dict of
tensors per layer), so one cache class serves both. The linear mixers run their recurrences
token by token (exact, plain, slower than flame's chunked kernels); softmax attention runs
through `scaled_dot_product_attention`. tests/test_hf.py holds the logits of this model equal to
flame's for every mixer.

The configuration object passed in only needs FlameConfig's attributes (the keys of flame's
`[model]` section).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- sizes


def _linear_dims(cfg):
    k = cfg.head_dim if cfg.head_dim is not None else cfg.dim // cfg.n_heads
    return cfg.n_heads, k, int(k * cfg.expand_v)


def _attention_dims(cfg):
    heads = cfg.attn_n_heads if cfg.attn_n_heads is not None else cfg.n_heads
    kv = cfg.n_kv_heads if cfg.n_kv_heads is not None else heads
    d = cfg.attn_head_dim if cfg.attn_head_dim is not None else cfg.dim // heads
    return heads, kv, d


def _mlp_hidden(cfg):
    if cfg.mlp_hidden_dim is not None:
        return cfg.mlp_hidden_dim
    m = cfg.mlp_multiple_of
    return m * ((int(cfg.mlp_ratio * cfg.dim) + m - 1) // m)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(_compute_dtype(x.dtype))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        return y.to(x.dtype)


class GatedRMSNorm(RMSNorm):
    def forward(self, x, gate):
        xf = x.to(_compute_dtype(x.dtype))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        return (y * F.silu(gate.to(xf.dtype))).to(x.dtype)


def apply_rotary(x, position_ids, theta):
    """Rotate-half rotary embedding of x [B, T, H, D] at position_ids [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=x.device).float() / d))
    angle = position_ids.float()[..., None] * inv_freq
    ct = _compute_dtype(x.dtype)
    cos, sin = angle.cos().to(ct)[:, :, None, :], angle.sin().to(ct)[:, :, None, :]
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class ShortConvolution(nn.Module):
    """Causal depthwise convolution + SiLU over [B, T, C]; its decoding cache is the last
    kernel_size - 1 inputs, [B, C, kernel_size - 1], oldest first."""

    def __init__(self, channels, kernel_size, bias=False):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x, cache=None):
        B, T, C = x.shape
        ct = _compute_dtype(x.dtype)
        past = cache.to(ct) if cache is not None else x.new_zeros(B, C, self.kernel_size - 1, dtype=ct)
        seq = torch.cat([past, x.to(ct).transpose(1, 2)], dim=-1)  # [B, C, K - 1 + T]
        bias = self.bias.to(ct) if self.bias is not None else None
        y = F.conv1d(seq, self.weight.to(ct), bias, groups=C)  # [B, C, T]
        y = F.silu(y).transpose(1, 2).to(x.dtype)
        return y, seq[:, :, seq.shape[-1] - (self.kernel_size - 1):].to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def recurrence(q, k, v, *, g=None, gk=None, beta=None, scale, initial_state=None):
    """Token-by-token linear attention, fp32 state S [B, H, K, V] per sequence:

        S_t = exp(g_t) exp(gk_t)[:, None] S_{t-1}        (scalar / per-key-channel decay, log space)
        S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T        (delta rule, when beta is given)
           or S_t + k_t v_t^T
        o_t = scale S_t^T q_t

    q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; gk [B, T, H, K]. Returns
    (o [B, T, H, V] in v's dtype, final state)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    ct = torch.float64 if v.dtype == torch.float64 else torch.float32
    S = initial_state.to(ct) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=ct)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    out = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(ct).exp()[..., None, None]
        if gk is not None:
            S = S * gk[:, t].to(ct).exp()[..., None]
        kt, vt = k[:, t], v[:, t]
        if beta is not None:
            vt = beta[:, t].to(ct)[..., None] * (vt - torch.einsum("bhkv,bhk->bhv", S, kt))
        S = S + kt[..., None] * vt[..., None, :]
        out.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(out, dim=1) if out else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), S


def _positions(B, T, device, position_ids, state):
    if position_ids is not None:
        return position_ids
    pos = torch.arange(T, device=device).unsqueeze(0).expand(B, T)
    return pos + state["pos"].view(B, 1) if state is not None else pos


def _conv(conv, x, state, new_state, key):
    """Run a ShortConvolution, continuing from and updating its cache under state[key]."""
    y, cache = conv(x, None if state is None else state[key])
    if new_state is not None:
        new_state[key] = cache
    return y


# ----------------------------------------------------------------------------- mixers


class Attention(nn.Module):
    """Grouped-query softmax attention with rotary; state {"k", "v", "pos"} as flame's."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = _attention_dims(cfg)
        self.window, self.theta = cfg.sliding_window, cfg.rope_theta
        h, kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(cfg.dim, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.dim, kv * d, bias=False)
        self.v_proj = nn.Linear(cfg.dim, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.dim, bias=False)

    def forward(self, x, position_ids=None, state=None, use_cache=False):
        B, T, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_heads, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, d)
        pos = _positions(B, T, x.device, position_ids, state)
        q, k = apply_rotary(q, pos, self.theta), apply_rotary(k, pos, self.theta)
        if state is not None:
            k, v = torch.cat([state["k"], k], dim=1), torch.cat([state["v"], v], dim=1)
        S = k.shape[1] - T
        qi = torch.arange(T, device=x.device)[:, None] + S
        kj = torch.arange(S + T, device=x.device)[None, :]
        mask = kj <= qi
        if self.window is not None:
            mask = mask & (qi - kj < self.window)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        new_state = None
        if use_cache:
            if self.window is not None:
                keep = max(self.window - 1, 0)
                k, v = k[:, k.shape[1] - min(keep, k.shape[1]):], v[:, v.shape[1] - min(keep, v.shape[1]):]
            past = state["pos"] if state is not None else torch.zeros(B, dtype=torch.long, device=x.device)
            new_state = {"k": k, "v": v, "pos": past + T}
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * d)), new_state


class _LinearMixer(nn.Module):
    """q, k, v projections with optional short convolutions, shared by the linear mixers."""

    def __init__(self, cfg, silu_without_conv):
        super().__init__()
        H, K, V = _linear_dims(cfg)
        self.n_heads, self.head_k, self.head_v = H, K, V
        self.silu_without_conv = silu_without_conv
        self.q_proj = nn.Linear(cfg.dim, H * K, bias=False)
        self.k_proj = nn.Linear(cfg.dim, H * K, bias=False)
        self.v_proj = nn.Linear(cfg.dim, H * V, bias=False)
        self.use_short_conv = cfg.use_short_conv
        if cfg.use_short_conv:
            self.q_conv = ShortConvolution(H * K, cfg.conv_size)
            self.k_conv = ShortConvolution(H * K, cfg.conv_size)
            self.v_conv = ShortConvolution(H * V, cfg.conv_size)

    def qkv(self, x, state, new_state):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q = _conv(self.q_conv, q, state, new_state, "conv_q")
            k = _conv(self.k_conv, k, state, new_state, "conv_k")
            v = _conv(self.v_conv, v, state, new_state, "conv_v")
        elif self.silu_without_conv:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        H, K, V = self.n_heads, self.head_k, self.head_v
        return q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)


class GatedDeltaNet(_LinearMixer):
    def __init__(self, cfg):
        super().__init__(cfg, silu_without_conv=True)
        H, V = self.n_heads, self.head_v
        self.a_proj = nn.Linear(cfg.dim, H, bias=False)
        self.b_proj = nn.Linear(cfg.dim, H, bias=False)
        self.g_proj = nn.Linear(cfg.dim, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, cfg.dim, bias=False)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.o_norm = GatedRMSNorm(V, eps=cfg.norm_eps)

    def forward(self, x, position_ids=None, state=None, use_cache=False):
        B, T, _ = x.shape
        new_state = {} if use_cache else None
        q, k, v = self.qkv(x, state, new_state)
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        beta = self.b_proj(x).sigmoid()
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        o, final = recurrence(q, k, v, g=g, beta=beta, scale=self.head_k ** -0.5,
                              initial_state=None if state is None else state["recurrent"])
        if use_cache:
            new_state["recurrent"] = final
        o = self.o_norm(o, self.g_proj(x).view(B, T, self.n_heads, self.head_v))
        return self.o_proj(o.reshape(B, T, -1)), new_state


class DeltaNet(_LinearMixer):
    def __init__(self, cfg):
        super().__init__(cfg, silu_without_conv=True)
        H, V = self.n_heads, self.head_v
        self.b_proj = nn.Linear(cfg.dim, H, bias=False)
        self.o_proj = nn.Linear(H * V, cfg.dim, bias=False)
        self.o_norm = RMSNorm(V, eps=cfg.norm_eps)

    def forward(self, x, position_ids=None, state=None, use_cache=False):
        B, T, _ = x.shape
        new_state = {} if use_cache else None
        q, k, v = self.qkv(x, state, new_state)
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        o, final = recurrence(q, k, v, beta=self.b_proj(x).sigmoid(), scale=self.head_k ** -0.5,
                              initial_state=None if state is None else state["recurrent"])
        if use_cache:
            new_state["recurrent"] = final
        return self.o_proj(self.o_norm(o).reshape(B, T, -1)), new_state


class GatedLinearAttention(_LinearMixer):
    def __init__(self, cfg):
        super().__init__(cfg, silu_without_conv=False)
        H, K, V = self.n_heads, self.head_k, self.head_v
        self.gate_logit_normalizer = cfg.gate_logit_normalizer
        self.gk_down = nn.Linear(cfg.dim, cfg.gate_low_rank_dim, bias=False)
        self.gk_up = nn.Linear(cfg.gate_low_rank_dim, H * K, bias=True)
        self.g_proj = nn.Linear(cfg.dim, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, cfg.dim, bias=False)
        self.o_norm = GatedRMSNorm(V, eps=cfg.norm_eps)

    def forward(self, x, position_ids=None, state=None, use_cache=False):
        B, T, _ = x.shape
        new_state = {} if use_cache else None
        q, k, v = self.qkv(x, state, new_state)
        gk = F.logsigmoid(self.gk_up(self.gk_down(x)).float()) / self.gate_logit_normalizer
        o, final = recurrence(q, k, v, gk=gk.view(B, T, self.n_heads, self.head_k), scale=self.head_k ** -0.5,
                              initial_state=None if state is None else state["recurrent"])
        if use_cache:
            new_state["recurrent"] = final
        o = self.o_norm(o, self.g_proj(x).view(B, T, self.n_heads, self.head_v))
        return self.o_proj(o.reshape(B, T, -1)), new_state


class MultiScaleRetention(_LinearMixer):
    def __init__(self, cfg):
        super().__init__(cfg, silu_without_conv=False)
        H, V = self.n_heads, self.head_v
        self.theta = cfg.rope_theta
        self.g_proj = nn.Linear(cfg.dim, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, cfg.dim, bias=False)
        self.o_norm = GatedRMSNorm(V, eps=cfg.norm_eps)

    def forward(self, x, position_ids=None, state=None, use_cache=False):
        B, T, _ = x.shape
        H = self.n_heads
        new_state = {} if use_cache else None
        q, k, v = self.qkv(x, state, new_state)
        pos = _positions(B, T, x.device, position_ids, state)
        q, k = apply_rotary(q, pos, self.theta), apply_rotary(k, pos, self.theta)
        g = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(H, dtype=torch.float32, device=x.device)))
        o, final = recurrence(q, k, v, g=g.expand(B, T, H), scale=self.head_k ** -0.5,
                              initial_state=None if state is None else state["recurrent"])
        if use_cache:
            new_state["recurrent"] = final
            past = state["pos"] if state is not None else torch.zeros(B, dtype=torch.long, device=x.device)
            new_state["pos"] = past + T
        o = self.o_norm(o, self.g_proj(x).view(B, T, H, self.head_v))
        return self.o_proj(o.reshape(B, T, -1)), new_state


class Mamba2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, N, P = _linear_dims(cfg)
        self.n_heads, self.state_size, self.head_v = H, N, P
        self.d_inner = H * P
        self.in_proj = nn.Linear(cfg.dim, 2 * self.d_inner + 2 * N + H, bias=False)
        self.use_short_conv = cfg.use_short_conv
        if cfg.use_short_conv:
            self.conv = ShortConvolution(self.d_inner + 2 * N, cfg.conv_size, bias=True)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = RMSNorm(self.d_inner, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.dim, bias=False)

    def forward(self, u, position_ids=None, state=None, use_cache=False):
        Bsz, T, _ = u.shape
        H, N, P = self.n_heads, self.state_size, self.head_v
        new_state = {} if use_cache else None
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * N, H], dim=-1)
        xbc = _conv(self.conv, xbc, state, new_state, "conv") if self.use_short_conv else F.silu(xbc)
        x, b, c = xbc.split([self.d_inner, N, N], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        q = c.unsqueeze(2).expand(Bsz, T, H, N)
        k = (b.unsqueeze(2).float() * dt.unsqueeze(-1)).to(x.dtype)
        v = x.reshape(Bsz, T, H, P)
        y, final = recurrence(q, k, v, g=-self.A_log.float().exp() * dt, scale=1.0,
                              initial_state=None if state is None else state["recurrent"])
        if use_cache:
            new_state["recurrent"] = final
        y = y + v * self.D.view(H, 1).to(v.dtype)
        y = self.norm(y.reshape(Bsz, T, self.d_inner) * F.silu(z))
        return self.out_proj(y), new_state


MIXER_CLASSES = {
    "attention": Attention,
    "gated_deltanet": GatedDeltaNet,
    "gla": GatedLinearAttention,
    "deltanet": DeltaNet,
    "retnet": MultiScaleRetention,
    "mamba2": Mamba2,
}


# ----------------------------------------------------------------------------- the model


class Block(nn.Module):
    def __init__(self, cfg, mixer):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, _mlp_hidden(cfg))

    def forward(self, x, position_ids=None, state=None, use_cache=False):
        h, new_state = self.mixer(self.mixer_norm(x), position_ids=position_ids, state=state, use_cache=use_cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), new_state


class LanguageModel(nn.Module):
    """embeddings -> blocks -> norm; the same interface as flame's LanguageModel for inference:
    `hidden_states(input_ids, states=None, use_cache=False)` and `logits(hidden)`."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        names = cfg.layer_mixers()
        unknown = sorted(set(names) - set(MIXER_CLASSES))
        if unknown:
            raise ValueError(f"model.mixer: unknown mixer(s) {unknown}; valid mixers are {sorted(MIXER_CLASSES)}")
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, MIXER_CLASSES[n](cfg)) for n in names)
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @property
    def output_weight(self):
        return self.embeddings.weight if self.cfg.tie_embeddings else self.lm_head.weight

    def hidden_states(self, input_ids, cu_seqlens=None, position_ids=None, states=None, use_cache=False):
        if cu_seqlens is not None:
            raise ValueError("the plain-PyTorch model takes no cu_seqlens; pass one sequence per row")
        x = self.embeddings(input_ids)
        new_states = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            x, s = layer(x, position_ids=position_ids, state=None if states is None else states[i],
                         use_cache=use_cache)
            if use_cache:
                new_states.append(s)
        return self.norm(x), new_states

    def logits(self, hidden):
        return hidden @ self.output_weight.t()

    @torch.no_grad()
    def init_weights(self):
        """Weights of the right scale for a model that is not loaded from a checkpoint."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=out_std)
            elif p.ndim >= 2 and "conv" not in name:
                nn.init.normal_(p, std=std)
