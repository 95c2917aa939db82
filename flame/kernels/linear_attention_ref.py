"""Pure-torch chunked linear attention with a log-space decay gate: the CPU backend and the
test oracle of `linear_attention.py`.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t

with g [B, T, H] (one decay per head: RetNet, Mamba2-SSD, simple GLA) or [B, T, H, K]
(one per key dimension: GLA). Inside a chunk the decay between positions t >= s is
exp(b_t - b_s), b the chunk-local cumulative sum of g; it is formed exactly per pair, so
no exponent is ever positive and nothing overflows. Gradients come from autograd.
"""

import torch

REFERENCE_CHUNK_SIZE = 16


def _compute_dtype(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunked(q, k, v, g, scale, h0, chunk_size):
    """q, k, g [B, T, H, K], v [B, T, H, V], h0 [B, H, K, V] or None -> o [B, T, H, V], hT."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    pad = (-T) % chunk_size
    if pad:
        # Zero keys/values add nothing and a zero log-decay keeps the state as it is.
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    state = q.new_zeros(B, H, K, V) if h0 is None else h0
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    causal = causal[None, :, :, None, None]
    outputs = []
    for start in range(0, T + pad, chunk_size):
        sl = slice(start, start + chunk_size)
        qc, kc, vc = q[:, sl], k[:, sl], v[:, sl]
        b = torch.cumsum(g[:, sl], dim=1)
        b_last = b[:, -1]
        diff = b[:, :, None] - b[:, None, :]  # [B, t, s, H, K]
        decay = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()
        scores = torch.einsum("btshk,bthk,bshk->btsh", decay, qc, kc)
        o = torch.einsum("btsh,bshv->bthv", scores, vc)
        o = o + torch.einsum("bthk,bhkv->bthv", qc * b.exp(), state)
        outputs.append(o * scale)
        k_to_end = kc * (b_last[:, None] - b).exp()
        state = b_last.exp()[..., None] * state + torch.einsum("bshk,bshv->bhkv", k_to_end, vc)
    if not outputs:  # an empty sequence passes its state through
        return v.new_zeros(B, 0, H, V), state
    return torch.cat(outputs, dim=1)[:, :T], state


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = REFERENCE_CHUNK_SIZE,
):
    """Returns (o [B, T, H, V] in q's dtype, final state fp32 [N, H, K, V] or None).

    Computes in fp32, or in fp64 when any input is fp64. Inputs are assumed validated.
    """
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dtype = _compute_dtype(q, k, v, g, initial_state)
    out_dtype = torch.float64 if dtype == torch.float64 else q.dtype  # before q is converted
    if g.dim() == 3:
        g = g.unsqueeze(-1).expand(*g.shape, K)
    q, k, v, g = (x.to(dtype) for x in (q, k, v, g))
    h0 = None if initial_state is None else initial_state.to(dtype)
    if cu_seqlens is None:
        o, ht = _chunked(q, k, v, g, scale, h0, chunk_size)
    else:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            h0_i = None if h0 is None else h0[i : i + 1]
            o_i, ht_i = _chunked(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], g[:, bos:eos], scale, h0_i, chunk_size)
            outs.append(o_i)
            states.append(ht_i)
        o, ht = torch.cat(outs, dim=1), torch.cat(states, dim=0)
    final = ht.to(torch.float64 if dtype == torch.float64 else torch.float32) if output_final_state else None
    return o.to(out_dtype), final


def linear_attention_recurrent(q, k, v, g, scale=None, initial_state=None, cu_seqlens=None):
    """Token-by-token recurrence in fp64, a second oracle for tests (slow; tiny shapes only)."""
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if g.dim() == 3:
        g = g.unsqueeze(-1).expand(*g.shape, K)
    q, k, v, g = (x.double() for x in (q, k, v, g))
    B, T, H, _ = q.shape
    bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    finals = []
    for b in range(B):
        for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            n = b if cu_seqlens is None else i
            s = torch.zeros(H, K, v.shape[-1], dtype=torch.float64)
            if initial_state is not None:
                s = initial_state[n].double().clone()
            for t in range(bos, eos):
                s = g[b, t].exp()[..., None] * s + k[b, t][..., None] * v[b, t][:, None, :]
                o[b, t] = torch.einsum("hk,hkv->hv", q[b, t] * scale, s)
            finals.append(s)
    return o, torch.stack(finals)
