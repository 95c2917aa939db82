"""Pieces the linear-attention mixers share: FLOP counts of the chunked kernels, the q, k, v
projections with their short convolutions and decoding caches, positions for rotary, and
initialisation."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from flame import modules
from flame.kernels.conv import causal_conv1d_qkv, l2_normalize_heads
from flame.modules.concat_linear import column_shards, column_shards_fit, concat_linear

# Chunk length of the chunked kernels (the C in the FLOP counts below).
CHUNK_SIZE = 64
# Up to this many new tokens, a call that continues from a decoding state runs the
# token-by-token kernels; longer inputs (prefill, training) run the chunked ones.
RECURRENT_MAX_TOKENS = 64
# eps of the delta-rule mixers' L2 normalisation of q and k (F.normalize's, as the published models)
QK_NORM_EPS = 1e-6


def linear_attention_flops(K: int, V: int, C: int = CHUNK_SIZE) -> float:
    """Training FLOPs per token and head of chunked (gated) linear attention, as executed.

    Forward: intra-chunk scores q k^T (2CK), scores x v (2CV), inter-chunk q S (2KV), state
    update k^T v (2KV). Backward: recomputed scores (2CK) and states (2KV), dS (2KV), dq
    (2KV + 2CK), dk (2KV + 2CK), dv (2KV + 2CV), d(scores) (2CV).
    Total 14KV + 8CK + 6CV. Used for GLA, RetNet and Mamba2 (K = state size, V = head size).
    """
    return 14 * K * V + 8 * C * K + 6 * C * V


def delta_rule_flops(K: int, V: int, C: int = CHUNK_SIZE) -> float:
    """Training FLOPs per token and head of the chunked (gated) delta rule, as executed
    (WY representation; the count in shared/baselines/h100.md):
    forward 6KV + 5.25CK + 4CV, backward 16KV + 18CK + 10CV + 4C^2."""
    return 22 * K * V + 23.25 * C * K + 14 * C * V + 4 * C * C


def local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a per-head parameter: under tensor parallelism A_log, dt_bias, D are
    DTensors sharded by head, while the activations they meet are plain local tensors."""
    return param.to_local() if isinstance(param, DTensor) else param


def use_recurrent_kernel(state, T: int) -> bool:
    return state is not None and T <= RECURRENT_MAX_TOKENS


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every token inside its document, for a flattened packed batch: [1, total]."""
    idx = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)
    return (idx - cu_seqlens.long()[doc]).unsqueeze(0)


def token_positions(B: int, T: int, device, cu_seqlens=None, position_ids=None, state=None):
    """Positions for rotary embeddings: given, from document boundaries, or continuing from the
    number of tokens a decoding state has consumed (state["pos"], [B])."""
    if position_ids is not None:
        return position_ids
    if cu_seqlens is not None:
        return positions_from_cu_seqlens(cu_seqlens, B * T).view(B, T)
    pos = torch.arange(T, device=device).unsqueeze(0).expand(B, T)
    if state is not None:
        pos = pos + state["pos"].view(B, 1)
    return pos


def apply_conv(conv: nn.Module, x, cu_seqlens, state, new_state, key: str):
    """Run a ShortConvolution, continuing from and updating its cache under state[key]."""
    cache = None if state is None else state[key]
    y, cache = conv(x, cu_seqlens=cu_seqlens, cache=cache, output_final_state=new_state is not None)
    if new_state is not None:
        new_state[key] = cache
    return y


def add_qkv_layers(mixer: nn.Module, cfg, H: int, K: int, V: int) -> None:
    """The layers project_qkv runs: q, k, v projections of x (H heads of K, K and V channels)
    and, with cfg.use_short_conv, a SiLU short convolution after each."""
    mixer.q_proj = nn.Linear(cfg.dim, H * K, bias=False)
    mixer.k_proj = nn.Linear(cfg.dim, H * K, bias=False)
    mixer.v_proj = nn.Linear(cfg.dim, H * V, bias=False)
    mixer.use_short_conv = cfg.use_short_conv
    if cfg.use_short_conv:
        mixer.q_conv = modules.ShortConvolution(H * K, cfg.conv_size, activation="silu")
        mixer.k_conv = modules.ShortConvolution(H * K, cfg.conv_size, activation="silu")
        mixer.v_conv = modules.ShortConvolution(H * V, cfg.conv_size, activation="silu")


@torch.no_grad()
def init_qkv_layers(mixer: nn.Module, init_std: float, extra: tuple[nn.Linear, ...] = ()) -> None:
    """Normal(0, init_std) weights for the q, k, v projections and the projections in extra;
    the short convolutions' own initialisation."""
    for proj in (mixer.q_proj, mixer.k_proj, mixer.v_proj) + tuple(extra):
        nn.init.normal_(proj.weight, std=init_std)
    if mixer.use_short_conv:
        for conv in (mixer.q_conv, mixer.k_conv, mixer.v_conv):
            init_conv(conv)


def project_qkv(mixer: nn.Module, x, cu_seqlens, state, new_state, extra: tuple[str, ...] = (),
                qk_norm_dim: int | None = None):
    """q, k, v projections of x, each through its short convolution when the mixer has them (the
    convolutions' decoding caches go to new_state under conv_q / conv_k / conv_v), followed by
    the projections of x named in extra (attributes of the mixer, e.g. "b_proj").

    qk_norm_dim (the delta-rule mixers): q and k come back L2-normalised over heads of that many
    channels, after the convolutions' SiLU or, for a mixer without short convolutions, after a
    SiLU of q, k and v."""
    if state is None and new_state is None and _fusable(mixer, x, extra):
        return _project_qkv_fused(mixer, x, cu_seqlens, extra, qk_norm_dim)
    q, k, v = mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x)
    if mixer.use_short_conv:
        q = apply_conv(mixer.q_conv, q, cu_seqlens, state, new_state, "conv_q")
        k = apply_conv(mixer.k_conv, k, cu_seqlens, state, new_state, "conv_k")
        v = apply_conv(mixer.v_conv, v, cu_seqlens, state, new_state, "conv_v")
    q, k, v = _normalise_qk(mixer, q, k, v, qk_norm_dim)
    return (q, k, v) + tuple(getattr(mixer, name)(x) for name in extra)


def _normalise_qk(mixer: nn.Module, q, k, v, qk_norm_dim: int | None):
    """project_qkv's qk_norm_dim, outside the convolution's kernel."""
    if qk_norm_dim is None:
        return q, k, v
    if not mixer.use_short_conv:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    q, k = l2_normalize_heads(q, qk_norm_dim, QK_NORM_EPS), l2_normalize_heads(k, qk_norm_dim, QK_NORM_EPS)
    return q, k, v


def _fusable(mixer: nn.Module, x, extra: tuple[str, ...]) -> bool:
    """Whether the projections can be computed as one matmul (and q, k, v as one convolution):
    weights without biases, plain or all column-wise tensor-parallel shards
    (`concat_linear.column_shards_fit`), and convolutions alike."""
    projs = [mixer.q_proj, mixer.k_proj, mixer.v_proj] + [getattr(mixer, name) for name in extra]
    if any(p.bias is not None for p in projs) or not column_shards_fit(x, [p.weight for p in projs]):
        return False
    if not mixer.use_short_conv:
        return True
    convs = (mixer.q_conv, mixer.k_conv, mixer.v_conv)
    # the convolutions' channels split like the projections' rows (both or neither)
    sharded = {isinstance(c.weight, DTensor) for c in convs} | {isinstance(projs[0].weight, DTensor)}
    return len({(c.kernel_size, c.activation, c.bias is None) for c in convs}) == 1 and len(sharded) == 1


def _project_qkv_fused(mixer: nn.Module, x, cu_seqlens, extra: tuple[str, ...], qk_norm_dim: int | None):
    """The training path of project_qkv: one matmul against all the weights side by side and one
    convolution over the q, k, v channels of its output (read in place). Same values as separate
    calls (the convolution is depthwise, so channels do not mix); fewer kernel launches and op
    calls per layer, which matters because a linear-attention layer's step is close to
    host-bound, and the narrow projections (a few outputs per head, e.g. beta's) join a wide
    matmul instead of running as small, inefficient ones, forward and backward, each with its
    own add into x's gradient. The convolution's kernel also writes q, k and v as tensors of
    their own, normalises q and k (qk_norm_dim), and in backward assembles the matmul output's
    whole gradient (`causal_conv1d_qkv`). Under tensor parallelism: this rank's rows of every
    weight and channel."""
    projs = (mixer.q_proj, mixer.k_proj, mixer.v_proj) + tuple(getattr(mixer, name) for name in extra)
    x, weights = column_shards(x, [p.weight for p in projs])
    out = concat_linear(x, weights)  # keeps the weights, not their concatenation
    widths = [w.shape[0] for w in weights]
    qkv_width = sum(widths[:3])
    if mixer.use_short_conv:
        convs = (mixer.q_conv, mixer.k_conv, mixer.v_conv)
        weight = torch.cat([local(c.weight) for c in convs]).squeeze(1)
        bias = None if convs[0].bias is None else torch.cat([local(c.bias) for c in convs])
        q, k, v, rest = causal_conv1d_qkv(out, weight, bias, convs[0].activation, cu_seqlens, widths[:3],
                                          qk_norm_dim, QK_NORM_EPS)
    else:
        q, k, v = _normalise_qk(mixer, *out[..., :qkv_width].split(widths[:3], dim=-1), qk_norm_dim)
        rest = out[..., qkv_width:]
    return (q, k, v) + tuple(rest.split(widths[3:], dim=-1))


@torch.no_grad()
def init_dt_bias(dt_bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4):
    """Mamba's time-step bias: softplus(dt_bias) is log-uniform in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand_like(dt_bias, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=floor)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


@torch.no_grad()
def init_conv(conv: nn.Module) -> None:
    if hasattr(conv, "reset_parameters"):
        conv.reset_parameters()
