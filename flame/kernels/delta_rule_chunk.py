"""Per-chunk pieces shared by the delta rule's kernels (delta_rule.py, delta_rule_bwd.py,
delta_rule_segments.py): the head-dim tile, a chunk's gates, v' of a forward chunk from A and v,
and the two halves of one chunk of the reverse chunk-to-chunk pass."""

import triton
import triton.language as tl

from flame.kernels.utils import MIN_DOT_TILE, next_power_of_2


def _pow2(d: int) -> int:
    """Tile size for a head dimension in every delta-rule kernel: at least MIN_DOT_TILE (utils:
    narrower tiles built a wrong chunk-gradient kernel on Hopper)."""
    return max(MIN_DOT_TILE, next_power_of_2(d))


@triton.jit
def _value_tiles(w, u, a, v, beta, rows, rmask, hv, ck, cols, kmask, vmask,
                 HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, FROM_V: tl.constexpr):
    """The tiles of one chunk that `_corrected_values` takes: A [BT, BT] (from [T, HV, BT]),
    v [BT, len(cols)] and beta [BT] (fp32) with FROM_V, else w [BT, K] and u [BT, len(cols)]."""
    if FROM_V:
        r = tl.arange(0, BT)
        x = tl.load(a + rows[:, None] * (HV * BT) + hv * BT + r[None, :], mask=rmask[:, None], other=0.0)
        y = tl.load(v + rows[:, None] * (HV * V) + hv * V + cols[None, :], mask=vmask, other=0.0)
        z = tl.load(beta + rows * HV + hv, mask=rmask, other=0.0).to(tl.float32)
    else:
        x = tl.load(w + rows[:, None] * (HV * K) + hv * K + ck[None, :], mask=kmask, other=0.0)
        y = tl.load(u + rows[:, None] * (HV * V) + hv * V + cols[None, :], mask=vmask, other=0.0)
        z = y  # unused: u - w S takes two tiles
    return x, y, z


@triton.jit
def _corrected_values(x, y, z, b_k, S, b_gc, USE_G: tl.constexpr, FROM_V: tl.constexpr):
    """v' of one chunk, fp32, from its `_value_tiles` x, y, z, its k rows b_k, the state S
    entering it and its gate cumsum b_gc (USE_G): with FROM_V as A (beta (v - Gamma k S)), the
    difference taken before any rounding, else as u - w S."""
    dt = b_k.dtype
    if FROM_V:
        ks = tl.dot(b_k, S.to(dt))
        if USE_G:
            ks = ks * tl.exp(b_gc)[:, None]
        v_new = tl.dot(x, ((y.to(tl.float32) - ks) * z[:, None]).to(dt))
    else:
        v_new = y.to(tl.float32) - tl.dot(x, S.to(dt))
    return v_new


@triton.jit
def _chunk_gates(gcum, rows, rmask, bos, eos, i, hv, HV: tl.constexpr, BT: tl.constexpr, USE_G: tl.constexpr):
    """In-chunk gate cumsum (padded rows take the last value, so that no exponent grows) and its last value."""
    if USE_G:
        # a spare program of a packed batch (eos = bos) has no last row to read
        last = tl.load(gcum + (tl.minimum(bos + i * BT + BT, eos) - 1) * HV + hv, mask=eos > bos, other=0.0)
        gc = tl.load(gcum + rows * HV + hv, mask=rmask, other=0.0)
        gc = tl.where(rmask, gc, last)
    else:
        last = 0.0
        gc = tl.zeros([BT], dtype=tl.float32)
    return gc, last


@triton.jit
def state_grad_dv(b_q, b_k, b_do, dv2_tile, vmask, dS, gc, last, scale, causal_t,
                  USE_G: tl.constexpr, LOCAL_DV: tl.constexpr):
    """First half of one chunk of the reverse pass, from the state gradient dS leaving the chunk:
    (dv' [64, BV] fp32, the output gradient scaled for the state term, in q's dtype), with
        dv' = scale tril(q k^T e)^T do + k exp(gl - gc) dS.
    LOCAL_DV: the first term of dv' is read from dv2_tile (`_local_dv_kernel` wrote it) instead
    of formed here. The gates scale the [64, BV] side of each product (rows of do or of a
    result), not the [64, K] tiles of q and k: the serial chain's elementwise work is per V
    column."""
    dt = b_q.dtype
    k_dS = tl.dot(b_k, dS.to(dt))
    if USE_G:
        k_dS = k_dS * tl.exp(last - gc)[:, None]  # (k exp(gl - gc)) dS1
        b_dos = (b_do.to(tl.float32) * (scale * tl.exp(gc))[:, None]).to(dt)
    else:
        b_dos = (b_do.to(tl.float32) * scale).to(dt)
    if LOCAL_DV:
        b_dv = tl.load(dv2_tile, mask=vmask, other=0.0).to(tl.float32) + k_dS
    else:
        kq = tl.dot(b_k, tl.trans(b_q))
        if USE_G:
            kq = kq * tl.exp(tl.where(causal_t, gc[None, :] - gc[:, None], 0.0))
        kq = tl.where(causal_t, kq, 0.0) * scale
        b_dv = tl.dot(kq.to(dt), b_do) + k_dS
    return b_dv, b_dos


@triton.jit
def state_grad_update(dS, b_q, b_w, b_dos, b_dv, last, USE_G: tl.constexpr):
    """Second half: the state gradient entering the chunk,
        dS0 = exp(gl) dS + scale (exp(gc) q)^T do - w^T dv'.
    (Two halves, so that a caller stores dv' between them, as the reverse pass's chain was
    scheduled before they were shared.)"""
    if USE_G:
        dS = dS * tl.exp(last)
    return dS + tl.dot(tl.trans(b_q), b_dos) - tl.dot(tl.trans(b_w), b_dv.to(b_q.dtype))  # (scale gam q)^T do
