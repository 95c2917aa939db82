"""Recurrent (one token at a time) kernels: simple GLA, GLA, delta rule, gated delta rule.

One parameterised Triton kernel covers all four. Each program owns the fp32 state block
[K, BV] of one (sequence, value head) and walks the tokens in order, so it is the decoding
kernel (T = 1 with a cached state) and a second implementation of the chunked kernels.

Backward is provided by recomputing through the token-by-token torch reference (recurrent_ref.py):
correct, meant for tests and small cases, not for training speed.
"""

import torch
import triton
import triton.language as tl

from flame.kernels.delta_rule_inputs import check_inputs, compute_dtype, l2norm
from flame.kernels.dispatch import use_triton
from flame.kernels.recurrent_ref import recurrent_ref
from flame.kernels.utils import cdiv, next_power_of_2


@triton.jit
def _recurrent_kernel(
    q, k, v, g, gk, gv, beta, o, h0, ht, cu_seqlens, scale,
    T, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_GK: tl.constexpr, USE_GV: tl.constexpr, DELTA: tl.constexpr,
    USE_H0: tl.constexpr, REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    iv = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // HV
    hv = nh % HV
    h = hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + n).to(tl.int32)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int32)
    else:
        bos = n * T
        eos = bos + T
    ck = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)
    kmask = ck < K
    vmask = cv < V
    smask = kmask[:, None] & vmask[None, :]
    state_off = nh * K * V + ck[:, None] * V + cv[None, :]
    if USE_H0:
        S = tl.load(h0 + state_off, mask=smask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for step in range(0, eos - bos):
        if REVERSE:
            t = eos - 1 - step
        else:
            t = bos + step
        b_q = tl.load(q + t * (H * K) + h * K + ck, mask=kmask, other=0.0).to(tl.float32)
        b_k = tl.load(k + t * (H * K) + h * K + ck, mask=kmask, other=0.0).to(tl.float32)
        b_v = tl.load(v + t * (HV * V) + hv * V + cv, mask=vmask, other=0.0).to(tl.float32)
        if USE_G:
            S = S * tl.exp(tl.load(g + t * HV + hv).to(tl.float32))
        if USE_GK:
            b_gk = tl.load(gk + t * (HV * K) + hv * K + ck, mask=kmask, other=0.0).to(tl.float32)
            S = S * tl.exp(b_gk)[:, None]
        if USE_GV:
            b_gv = tl.load(gv + t * (HV * V) + hv * V + cv, mask=vmask, other=0.0).to(tl.float32)
            S = S * tl.exp(b_gv)[None, :]
        if DELTA:
            b_beta = tl.load(beta + t * HV + hv).to(tl.float32)
            b_v = b_beta * (b_v - tl.sum(S * b_k[:, None], 0))
        S = S + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(S * b_q[:, None], 0) * scale
        tl.store(o + t * (HV * V) + hv * V + cv, b_o.to(o.dtype.element_ty), mask=vmask)
    tl.store(ht + state_off, S, mask=smask)


def _forward_triton(q, k, v, g, gk, gv, beta, initial_state, cu_seqlens, scale, delta, reverse):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    BK = max(16, next_power_of_2(K))
    BV = min(32, max(16, next_power_of_2(V)))
    o = torch.empty(B, T, HV, V, dtype=v.dtype, device=v.device)
    ht = torch.empty(N, HV, K, V, dtype=torch.float32, device=v.device)
    _recurrent_kernel[(cdiv(V, BV), N * HV)](
        q, k, v, g, gk, gv, beta, o, initial_state, ht, cu_seqlens, scale,
        T, H, HV, K, V, BK=BK, BV=BV,
        USE_G=g is not None, USE_GK=gk is not None, USE_GV=gv is not None, DELTA=delta,
        USE_H0=initial_state is not None, REVERSE=reverse, IS_VARLEN=cu_seqlens is not None,
        num_warps=4 if BK >= 128 else 2,
    )
    return o, ht


def _state_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _reference(q, k, v, g, gk, gv, beta, initial_state, cu_seqlens, scale, delta, reverse):
    dtype = compute_dtype(q)
    cast = lambda x: x.to(dtype) if x is not None else None  # noqa: E731
    return recurrent_ref(
        cast(q), cast(k), cast(v), g=cast(g), gk=cast(gk), gv=cast(gv), beta=cast(beta), delta=delta,
        scale=scale, initial_state=cast(initial_state), output_final_state=True, reverse=reverse,
        cu_seqlens=cu_seqlens,
    )


@torch.library.custom_op("flame::recurrent_fwd", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, gk: torch.Tensor | None,
    gv: torch.Tensor | None, beta: torch.Tensor | None, initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, scale: float, delta: bool, reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q, k, v, g, gk, gv, beta, initial_state):
        return _forward_triton(q, k, v, g, gk, gv, beta, initial_state, cu_seqlens, scale, delta, reverse)
    o, ht = _reference(q, k, v, g, gk, gv, beta, initial_state, cu_seqlens, scale, delta, reverse)
    return o.to(v.dtype), ht.to(_state_dtype(q))


@_forward_op.register_fake
def _(q, k, v, g, gk, gv, beta, initial_state, cu_seqlens, scale, delta, reverse):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return v.new_empty(B, T, HV, V), q.new_empty(N, HV, K, V, dtype=_state_dtype(q))


_GRAD_SLOTS = ("q", "k", "v", "g", "gk", "gv", "beta", "initial_state")


@torch.library.custom_op("flame::recurrent_bwd", mutates_args=())
def _backward_op(
    do: torch.Tensor, dht: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, gk: torch.Tensor | None,
    gv: torch.Tensor | None, beta: torch.Tensor | None, initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, scale: float, delta: bool, reverse: bool,
) -> list[torch.Tensor]:
    dtype = compute_dtype(q)
    given = [x for x in (q, k, v, g, gk, gv, beta, initial_state)]
    present = [i for i, x in enumerate(given) if x is not None]

    def forward(*args):
        full = [None] * len(given)
        for i, x in zip(present, args):
            full[i] = x
        return recurrent_ref(full[0], full[1], full[2], g=full[3], gk=full[4], gv=full[5], beta=full[6],
                             delta=delta, scale=scale, initial_state=full[7], output_final_state=True,
                             reverse=reverse, cu_seqlens=cu_seqlens)

    # Custom-op bodies run below the autograd dispatch key: differentiate with torch.func.
    (o, ht), vjp = torch.func.vjp(forward, *[given[i].to(dtype) for i in present])
    grads = vjp((do.to(dtype), dht.to(dtype) if dht is not None else torch.zeros_like(ht)))
    out = [q.new_empty(0) for _ in given]
    for i, d in zip(present, grads):
        out[i] = d.to(given[i].dtype)
    return out


@_backward_op.register_fake
def _(do, dht, q, k, v, g, gk, gv, beta, initial_state, cu_seqlens, scale, delta, reverse):
    return [torch.empty_like(x) if x is not None else q.new_empty(0)
            for x in (q, k, v, g, gk, gv, beta, initial_state)]


def _setup_context(ctx, inputs, output):
    *tensors, scale, delta, reverse = inputs
    ctx.save_for_backward(*tensors)
    ctx.flags = (scale, delta, reverse)


def _backward(ctx, do, dht):
    tensors = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(tensors[2])
    grads = _backward_op(do, dht, *tensors, *ctx.flags)
    grads = [d if x is not None else None for d, x in zip(grads, tensors[:8])]
    return (*grads, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _run(q, k, v, *, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
         output_final_state=False, reverse=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None,
         delta=False, grouped_heads=True):
    check_inputs(q, k, v, {"g": g, "beta": beta}, {"gk": gk}, {"gv": gv}, initial_state, cu_seqlens,
                 grouped_heads=grouped_heads)
    if use_triton(q, k, v) and q.dtype == torch.float64:
        raise ValueError("the Triton kernels take bf16, fp16 or fp32 inputs, got float64 q")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if delta and beta is None:
        beta = torch.ones(v.shape[:3], dtype=q.dtype, device=q.device)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v, g, gk, gv, beta, initial_state = (
        x.contiguous() if x is not None else None for x in (q, k, v, g, gk, gv, beta, initial_state))
    o, ht = _forward_op(q, k, v, g, gk, gv, beta, initial_state, cu_seqlens, float(scale), delta, reverse)
    return o, (ht if output_final_state else None)


def fused_recurrent_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t. q, k [B, T, H, K]; v [B, T, HV, V];
    g [B, T, HV]; HV a multiple of H (each q/k head shared by HV / H value heads)."""
    return _run(q, k, v, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                reverse=reverse, cu_seqlens=cu_seqlens)


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T, o_t = scale S_t^T q_t.

    gk [B, T, H, K] and gv [B, T, H, V] are log decays, each optional.
    """
    return _run(q, k, v, gk=gk, gv=gv, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu_seqlens,
                grouped_heads=False)


def fused_recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = scale S_t^T q_t (beta defaults to 1).

    q, k [B, T, H, K]; v [B, T, HV, V]; beta [B, T, HV]; HV a multiple of H.
    """
    return _run(q, k, v, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                cu_seqlens=cu_seqlens, delta=True)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, one token at a time: S_t = exp(g_t) S_{t-1} (and the optional per-key /
    per-value decays gk [B, T, HV, K], gv [B, T, HV, V]); S_t += beta_t k_t (v_t - S_t^T k_t)^T;
    o_t = scale S_t^T q_t. q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV].
    """
    return _run(q, k, v, g=g, gk=gk, gv=gv, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                cu_seqlens=cu_seqlens, delta=True)
