"""Token-by-token torch reference for the recurrent family.

One loop covers every recurrence flame uses. With state S [K, V] per (sequence, value head):

    S_t = exp(g_t) * exp(gk_t)[:, None] * exp(gv_t)[None, :] * S_{t-1}   (gates, log space)
    S_t = S_t + beta_t * k_t (v_t - S_t^T k_t)^T                          (delta rule)
      or  S_t + k_t v_t^T                                                 (plain linear attention)
    o_t = scale * S_t^T q_t

It is the slowest and plainest statement of the semantics, so it is the oracle the chunked
references and the Triton kernels are tested against. It computes in the dtype of its inputs
(tests pass float64).
"""

import torch


def split_sequences(T: int, B: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) for each sequence; one per row unless cu_seqlens packs several."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    delta: bool = False,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; gk [B, T, HV, K]; gv [B, T, HV, V].

    Value heads are grouped: value head h reads query/key head h // (HV // H).
    Returns (o [B, T, HV, V], final state [N, HV, K, V] or None).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[-2:]
    if scale is None:
        scale = K**-0.5
    if HV != H:
        q = q.repeat_interleave(HV // H, dim=2)
        k = k.repeat_interleave(HV // H, dim=2)
    if delta and beta is None:
        beta = torch.ones(B, T, HV, dtype=q.dtype, device=q.device)
    outputs = []
    finals = []
    for n, (b, start, end) in enumerate(split_sequences(T, B, cu_seqlens)):
        if initial_state is not None:
            S = initial_state[n].to(q.dtype)
        else:
            S = q.new_zeros(HV, K, V)
        steps = range(end - 1, start - 1, -1) if reverse else range(start, end)
        o_seq = [None] * (end - start)
        for t in steps:
            if g is not None:
                S = S * g[b, t].exp()[:, None, None]
            if gk is not None:
                S = S * gk[b, t].exp()[:, :, None]
            if gv is not None:
                S = S * gv[b, t].exp()[:, None, :]
            kt, vt = k[b, t], v[b, t]
            if delta:
                pred = torch.einsum("hkv,hk->hv", S, kt)
                S = S + torch.einsum("hk,hv->hkv", kt, beta[b, t][:, None] * (vt - pred))
            else:
                S = S + torch.einsum("hk,hv->hkv", kt, vt)
            o_seq[t - start] = scale * torch.einsum("hkv,hk->hv", S, q[b, t])
        outputs.append((b, start, end, o_seq))
        finals.append(S)
    o = q.new_zeros(B, T, HV, V)
    rows = [[None] * T for _ in range(B)]
    for b, start, end, o_seq in outputs:
        rows[b][start:end] = o_seq
    # Rebuild by stacking so autograd flows through every step without in-place writes.
    o = torch.stack([torch.stack(r, 0) for r in rows], 0) if T > 0 else o
    final = torch.stack(finals, 0) if output_final_state else None
    return o, final
