"""Pure-torch chunked (WY / UT-transform) reference for the delta rule, gated or not.

Within a chunk of C tokens starting from state S0 (Gamma_t = exp of the in-chunk cumulative gate):

    A  = (I + tril(beta_i k_i.k_j Gamma_i / Gamma_j, -1))^-1
    w  = A (beta Gamma k),  u = A (beta v)          # independent of S0: parallel over chunks
    v' = u - w S0                                   # the corrected values
    o  = scale (Gamma q S0 + tril(q k^T Gamma_i / Gamma_j) v')
    S1 = Gamma_C S0 + (k Gamma_C / Gamma)^T v'

This is the algorithm the Triton kernels follow, written with batched torch ops and autograd. It
is the CPU backend and the oracle for the kernels; the token-by-token loop in recurrent_ref.py
is the oracle for this file. It computes in the dtype of its inputs.
"""

import torch
import torch.nn.functional as F

from flame.kernels.recurrent_ref import split_sequences

CHUNK = 64


def _chunk_sequences(q, k, v, g, beta, scale, S, chunk):
    """One batch of equal-length sequences. q, k, v [B, T, HV, D]; g, beta [B, T, HV]; S [B, HV, K, V]."""
    B, T, HV, K = q.shape
    V = v.shape[-1]
    pad = (-T) % chunk
    if pad:
        # Padded tokens have k = v = beta = 0 and g = 0, so they neither write nor decay.
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    NT = (T + pad) // chunk
    # [B, HV, NT, C, D]
    q, k, v = (x.reshape(B, NT, chunk, HV, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    g, beta = (x.reshape(B, NT, chunk, HV).permute(0, 3, 1, 2) for x in (g, beta))
    gc = g.cumsum(-1)
    decay = (gc[..., :, None] - gc[..., None, :])
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    strict = lower.tril(-1)
    # exp only where i >= j: above the diagonal the exponent is positive and may overflow.
    decay = torch.where(lower, decay, torch.zeros_like(decay)).exp()
    kk = (k @ k.transpose(-1, -2)) * decay * beta[..., :, None]
    M = torch.eye(chunk, dtype=q.dtype, device=q.device) + torch.where(strict, kk, torch.zeros_like(kk))
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device).expand_as(M)
    A = torch.linalg.solve_triangular(M, eye, upper=False, unitriangular=True)
    w = A @ (k * (beta * gc.exp())[..., None])
    u = A @ (v * beta[..., None])
    qk = torch.where(lower, (q @ k.transpose(-1, -2)) * decay, torch.zeros_like(kk))
    outs = []
    for i in range(NT):
        v_new = u[:, :, i] - w[:, :, i] @ S
        gci = gc[:, :, i]
        o = (q[:, :, i] * gci.exp()[..., None]) @ S + qk[:, :, i] @ v_new
        outs.append(o * scale)
        last = gci[..., -1:]
        S = S * last.exp()[..., None] + (k[:, :, i] * (last - gci).exp()[..., None]).transpose(-1, -2) @ v_new
    o = torch.stack(outs, 2)  # [B, HV, NT, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NT * chunk, HV, V)[:, :T]
    return o, S


def chunk_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k [B, T, H, K]; v [B, T, HV, V]; beta, g (log decay, optional) [B, T, HV].

    Returns (o [B, T, HV, V], final state [N, HV, K, V] or None), in the inputs' dtype.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[-2:]
    if scale is None:
        scale = K**-0.5
    if HV != H:
        q = q.repeat_interleave(HV // H, dim=2)
        k = k.repeat_interleave(HV // H, dim=2)
    if g is None:
        g = torch.zeros_like(beta)
    if cu_seqlens is None:
        S = initial_state.to(q.dtype) if initial_state is not None else q.new_zeros(B, HV, K, V)
        o, S = _chunk_sequences(q, k, v, g, beta, scale, S, chunk)
        return o, (S if output_final_state else None)
    outs, finals = [], []
    for n, (_, start, end) in enumerate(split_sequences(T, B, cu_seqlens)):
        S = initial_state[n : n + 1].to(q.dtype) if initial_state is not None else q.new_zeros(1, HV, K, V)
        sl = slice(start, end)
        o, S = _chunk_sequences(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], scale, S, chunk)
        outs.append(o)
        finals.append(S)
    o = torch.cat(outs, 1)
    return o, (torch.cat(finals, 0) if output_final_state else None)
