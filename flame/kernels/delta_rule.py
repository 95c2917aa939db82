"""Chunked delta rule, gated (Gated DeltaNet) or not (DeltaNet), in Triton.

Forward, following the WY / UT-transform algorithm (see delta_rule_ref.py for the maths):
  1. the prep kernel, parallel over (chunk, value head): the in-chunk gate cumsum, the
     triangular inverse A = (I + tril(beta k k^T Gamma_i / Gamma_j, -1))^-1, and, where needed,
     w = A beta Gamma k (for the backward) and u = A beta v (only without `values_in_pass`),
     written per token (`_prepare_kernel`: L from one [64, K] x [K, 64] product through an fp32
     scratch, doubling for the 16x16 diagonal blocks of the inverse, A through memory, [64, 64]
     tensor-core products).
  2. `_state_output_kernel`, parallel over (sequence, value head, V block), sequential over chunks:
     corrected values v' = u - w S = A (beta (v - Gamma k S)) (from A and v: `values_in_pass`),
     the output o, and the state update.
  With `split_output()` (the default, heads of K <= 128), the serial pass only stores the
  per-chunk states (and v'), which the backward keeps anyway, and `_output_kernel`, parallel
  over (chunk, V block, value head), computes o from them: the serial pass keeps two of its
  five products per chunk. With few long sequences (`delta_rule_segments.use_segments`) the
  serial pass runs over segments of 4096 tokens, entered with states combined from each
  segment's transition (delta_rule_segments.py), so that one sequence's chain is not the pass.
Backward (delta_rule_bwd.py) takes w, A and the per-chunk states from the forward (the default)
or recomputes them with these two kernels (FLAME_DELTA_BACKWARD=recompute; `backward_mode`),
then runs a reverse chunk-to-chunk pass for the state gradient and one chunk-parallel kernel
for every other gradient (q, k, v, g, beta, initial_state).

Both directions are `torch.library` custom ops, so `torch.compile(fullgraph=True)` traces a call.
"""

import os

import torch
import triton
import triton.language as tl

from flame.kernels.delta_rule_bwd import _chunk_program, backward_triton
from flame.kernels.delta_rule_chunk import _chunk_gates, _corrected_values, _pow2, _value_tiles
from flame.kernels.delta_rule_inputs import check_inputs, compute_dtype, l2norm
from flame.kernels.delta_rule_ref import chunk_delta_rule_ref
from flame.kernels.delta_rule_segments import (last_segment_states, long_documents, plan_segments,
                                               segment_entry_states, segment_slots)
from flame.kernels.dispatch import use_triton
from flame.kernels.utils import (cdiv, check_max_seqlen, chunk_grid, chunk_head_ids, compile_variants, heads_fast,
                                 max_num_chunks, needs_backward, next_power_of_2, num_sms, prepare_chunk_indices)

CHUNK = 64


@triton.jit
def _invert_unit_lower(L, BS: tl.constexpr):
    """(I + L)^-1 for a strictly lower-triangular [BS, BS] tile (BS = 16), in fp32.

    L is nilpotent (L^16 = 0), so (I + L)^-1 = sum_p (-L)^p = (I - L)(I + L^2)(I + L^4)(I + L^8):
    six small dots instead of fifteen serial row eliminations. With nearly parallel keys the
    powers of L grow large and cancel (rounding errors ~1e-5 in fp32); one Newton step,
    X += X (I - (I + L) X), brings the error back to that of row-by-row substitution (~1e-6)."""
    r = tl.arange(0, BS)
    eye = (r[:, None] == r[None, :]).to(tl.float32)
    P = -L
    X = eye + P
    P = tl.dot(P, P, input_precision="ieee")
    X = X + tl.dot(X, P, input_precision="ieee")
    P = tl.dot(P, P, input_precision="ieee")
    X = X + tl.dot(X, P, input_precision="ieee")
    P = tl.dot(P, P, input_precision="ieee")
    X = X + tl.dot(X, P, input_precision="ieee")
    R = eye - X - tl.dot(L, X, input_precision="ieee")
    return X + tl.dot(X, R, input_precision="ieee")


@triton.jit
def _load_l(lbuf, rows, rmask, hv, HV: tl.constexpr, COL: tl.constexpr):
    """One 16x16 block (column block COL) of L from the program's fp32 scratch [T, HV, 64]."""
    c = COL * 16 + tl.arange(0, 16)
    return tl.load(lbuf + rows[:, None] * (HV * 64) + hv * 64 + c[None, :], mask=rmask[:, None], other=0.0)


@triton.jit
def _store_a(a, blk, rows, rmask, hv, HV: tl.constexpr, COL: tl.constexpr):
    """One 16x16 block (column block COL) of the inverse A, stored [T, HV, 64]."""
    c = COL * 16 + tl.arange(0, 16)
    tl.store(a + rows[:, None] * (HV * 64) + hv * 64 + c[None, :], blk.to(a.dtype.element_ty),
             mask=rmask[:, None])


@triton.jit
def _store_a_product(b_a, x, out, row_scale, rows, rmask, hx, HX: tl.constexpr, hout, HOUT: tl.constexpr,
                     D: tl.constexpr, BC: tl.constexpr):
    """out = A (row_scale x) for one chunk, over column blocks of BC: x [T, HX, D] (head hx),
    out [T, HOUT, D] (head hout); w = A (beta Gamma k) and u = A (beta v)."""
    cc = tl.arange(0, BC)
    for c0 in range(0, D, BC):
        cols = c0 + cc
        mask = rmask[:, None] & (cols[None, :] < D)
        b_x = tl.load(x + rows[:, None] * (HX * D) + hx * D + cols[None, :], mask=mask, other=0.0)
        b_xs = (b_x.to(tl.float32) * row_scale[:, None]).to(b_a.dtype)
        tl.store(out + rows[:, None] * (HOUT * D) + hout * D + cols[None, :],
                 tl.dot(b_a, b_xs).to(out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N"])
def _prepare_kernel(
    k, v, g, beta, w, u, gcum, a, lbuf, cu_seqlens, chunk_indices,
    T, N, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_W: tl.constexpr, STORE_U: tl.constexpr,
    HEADS_FAST: tl.constexpr,
):
    # Two phases per (chunk, value head). 1: the gate cumsum, L, and the inverse A = (I + L)^-1
    # of the chunk of 64 by blocks of 16 (diagonal blocks by doubling, the rest by block forward
    # substitution, all small fp32 dots), written to `a`. 2: after a barrier, A is read back as
    # one [64, 64] tile (the program's own writes) for two tensor-core products
    # w = A (beta Gamma k), u = A (beta v), over column blocks of BC so that no [64, K]
    # accumulator has to live in registers whole. STORE_W, STORE_U: which of the two phase 2
    # writes (a serial pass that forms v' from A and v itself, `_state_output_kernel`'s FROM_V,
    # reads no u, and the inference forward needs no w either).
    tl.static_assert(BT == 64)
    j, bh = chunk_head_ids(HEADS_FAST, False)
    b, hv, h, i, bos, eos = _chunk_program(j, bh, chunk_indices, cu_seqlens, T, N, H, HV, BT, IS_VARLEN)
    rr = tl.arange(0, BT)
    rows = bos + i * BT + rr
    rmask = rows < eos
    b_beta = tl.load(beta + rows * HV + hv, mask=rmask, other=0.0).to(tl.float32)
    strict = rr[:, None] > rr[None, :]
    # L = beta k k^T Gamma_i / Gamma_j (strictly lower) for the whole chunk in one
    # [64, K] x [K, 64] product, written to an fp32 scratch from which the 16x16 blocks are read
    # back (the program's own writes, from cache).
    ck = tl.arange(0, BK)
    b_kf = tl.load(k + rows[:, None] * (H * K) + h * K + ck[None, :],
                   mask=rmask[:, None] & (ck[None, :] < K), other=0.0)
    L = tl.dot(b_kf, tl.trans(b_kf)) * b_beta[:, None]
    if USE_G:
        b_gc = tl.cumsum(tl.load(g + rows * HV + hv, mask=rmask, other=0.0).to(tl.float32), 0)
        tl.store(gcum + rows * HV + hv, b_gc, mask=rmask)
        L = L * tl.exp(tl.where(strict, b_gc[:, None] - b_gc[None, :], 0.0))
    L = tl.where(strict, L, 0.0)
    tl.store(lbuf + rows[:, None] * (HV * 64) + hv * 64 + rr[None, :], L, mask=rmask[:, None])
    r = tl.arange(0, 16)
    rows0 = bos + i * BT + r
    rows1 = rows0 + 16
    rows2 = rows0 + 32
    rows3 = rows0 + 48
    m0 = rows0 < eos
    m1 = rows1 < eos
    m2 = rows2 < eos
    m3 = rows3 < eos
    tl.debug_barrier()
    D0 = _invert_unit_lower(_load_l(lbuf, rows0, m0, hv, HV, 0), 16)
    D1 = _invert_unit_lower(_load_l(lbuf, rows1, m1, hv, HV, 1), 16)
    D2 = _invert_unit_lower(_load_l(lbuf, rows2, m2, hv, HV, 2), 16)
    D3 = _invert_unit_lower(_load_l(lbuf, rows3, m3, hv, HV, 3), 16)
    A10 = _load_l(lbuf, rows1, m1, hv, HV, 0)
    A20 = _load_l(lbuf, rows2, m2, hv, HV, 0)
    A21 = _load_l(lbuf, rows2, m2, hv, HV, 1)
    A30 = _load_l(lbuf, rows3, m3, hv, HV, 0)
    A31 = _load_l(lbuf, rows3, m3, hv, HV, 1)
    A32 = _load_l(lbuf, rows3, m3, hv, HV, 2)
    # X_ij = -D_i sum_{j <= m < i} A_im X_mj, X_jj = D_j; fp32 throughout (small dots).
    X10 = -tl.dot(D1, tl.dot(A10, D0, input_precision="ieee"), input_precision="ieee")
    X21 = -tl.dot(D2, tl.dot(A21, D1, input_precision="ieee"), input_precision="ieee")
    X32 = -tl.dot(D3, tl.dot(A32, D2, input_precision="ieee"), input_precision="ieee")
    X20 = -tl.dot(D2, tl.dot(A20, D0, input_precision="ieee") + tl.dot(A21, X10, input_precision="ieee"),
                  input_precision="ieee")
    X31 = -tl.dot(D3, tl.dot(A31, D1, input_precision="ieee") + tl.dot(A32, X21, input_precision="ieee"),
                  input_precision="ieee")
    X30 = -tl.dot(D3, tl.dot(A30, D0, input_precision="ieee") + tl.dot(A31, X10, input_precision="ieee")
                  + tl.dot(A32, X20, input_precision="ieee"), input_precision="ieee")
    zero = tl.zeros([16, 16], dtype=tl.float32)
    _store_a(a, D0, rows0, m0, hv, HV, 0)
    _store_a(a, zero, rows0, m0, hv, HV, 1)
    _store_a(a, zero, rows0, m0, hv, HV, 2)
    _store_a(a, zero, rows0, m0, hv, HV, 3)
    _store_a(a, X10, rows1, m1, hv, HV, 0)
    _store_a(a, D1, rows1, m1, hv, HV, 1)
    _store_a(a, zero, rows1, m1, hv, HV, 2)
    _store_a(a, zero, rows1, m1, hv, HV, 3)
    _store_a(a, X20, rows2, m2, hv, HV, 0)
    _store_a(a, X21, rows2, m2, hv, HV, 1)
    _store_a(a, D2, rows2, m2, hv, HV, 2)
    _store_a(a, zero, rows2, m2, hv, HV, 3)
    _store_a(a, X30, rows3, m3, hv, HV, 0)
    _store_a(a, X31, rows3, m3, hv, HV, 1)
    _store_a(a, X32, rows3, m3, hv, HV, 2)
    _store_a(a, D3, rows3, m3, hv, HV, 3)
    if STORE_W or STORE_U:
        # Every thread's part of A is written before any thread reads the whole tile back.
        tl.debug_barrier()
        b_a = tl.load(a + rows[:, None] * (HV * 64) + hv * 64 + rr[None, :], mask=rmask[:, None], other=0.0)
        if USE_G:
            kscale = b_beta * tl.exp(b_gc)
        else:
            kscale = b_beta
        if STORE_W:
            _store_a_product(b_a, k, w, kscale, rows, rmask, h, H, hv, HV, K, BC)
        if STORE_U:
            _store_a_product(b_a, v, u, b_beta, rows, rmask, hv, HV, hv, HV, V, BC)


@triton.jit
def _state_output_kernel(
    q, k, w, u, a, v, beta, gcum, o, h0, ht, hs, vn, cu_seqlens, chunk_offsets, scale,
    T, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    COMPUTE_O: tl.constexpr, STORE_STATES: tl.constexpr, FROM_V: tl.constexpr,
):
    # STORE_STATES (for the backward): the state entering each chunk goes to hs
    # [chunk slots, HV, K, V] and the corrected values v' to vn [B, T, HV, V]. Without COMPUTE_O
    # (the backward's recomputation, or split_output()) no q is read and no o written.
    # FROM_V: v' = u - w S is formed as A (beta (v - Gamma k S)) from A, v and beta (w and u
    # are not read): the prep kernel then skips its products, and the difference is taken in
    # fp32 before any rounding.
    iv = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // HV
    hv = nh % HV
    h = hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + n).to(tl.int32)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int32)
        if STORE_STATES:
            slot0 = tl.load(chunk_offsets + n).to(tl.int64)
        else:
            slot0 = 0
    else:
        bos = n * T
        eos = bos + T
        slot0 = (n * tl.cdiv(T, BT)).to(tl.int64)
    r = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)
    smask = (ck[:, None] < K) & (cv[None, :] < V)
    state_off = nh * K * V + ck[:, None] * V + cv[None, :]
    slot_off = hv * K * V + ck[:, None] * V + cv[None, :]
    if USE_H0:
        S = tl.load(h0 + state_off, mask=smask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    causal = r[:, None] >= r[None, :]
    for i in range(0, tl.cdiv(eos - bos, BT)):
        rows = bos + i * BT + r
        rmask = rows < eos
        kmask = rmask[:, None] & (ck[None, :] < K)
        vmask = rmask[:, None] & (cv[None, :] < V)
        b_k = tl.load(k + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
        dt = b_k.dtype
        if USE_G:
            b_gc = tl.load(gcum + rows * HV + hv, mask=rmask, other=0.0)
        else:
            b_gc = None
        x, y, z = _value_tiles(w, u, a, v, beta, rows, rmask, hv, ck, cv, kmask, vmask, HV, K, V, BT, FROM_V)
        if STORE_STATES:
            tl.store(hs + (slot0 + i) * (HV * K * V) + slot_off, S.to(hs.dtype.element_ty), mask=smask)
        v_new = _corrected_values(x, y, z, b_k, S, b_gc, USE_G, FROM_V)
        b_vn = v_new.to(dt)
        if STORE_STATES:
            tl.store(vn + rows[:, None] * (HV * V) + hv * V + cv[None, :], b_vn, mask=vmask)
        # The gates scale the [64, BV] side of each product (rows of v' or of a result), not the
        # [64, K] tiles of q and k: the serial chain's elementwise work is per V column.
        if USE_G:
            last = tl.load(gcum + (tl.minimum(bos + i * BT + BT, eos) - 1) * HV + hv)
            b_vd = (v_new * tl.exp(last - b_gc)[:, None]).to(dt)  # (k exp(gl - gc))^T v' = k^T (exp(gl - gc) v')
        else:
            b_vd = b_vn
        if COMPUTE_O:
            b_q = tl.load(q + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
            qk = tl.dot(b_q, tl.trans(b_k))
            o_inter = tl.dot(b_q, S.to(dt))
            if USE_G:
                qk = qk * tl.exp(tl.where(causal, b_gc[:, None] - b_gc[None, :], 0.0))
                o_inter = o_inter * tl.exp(b_gc)[:, None]
            qk = tl.where(causal, qk, 0.0)
            b_o = (o_inter + tl.dot(qk.to(dt), b_vn)) * scale
            tl.store(o + rows[:, None] * (HV * V) + hv * V + cv[None, :], b_o.to(o.dtype.element_ty), mask=vmask)
        if USE_G:
            S = S * tl.exp(last)
        S = S + tl.dot(tl.trans(b_k), b_vd)
    tl.store(ht + state_off, S, mask=smask)


@triton.jit(do_not_specialize=["N"])
def _output_kernel(
    q, k, gcum, hs, vn, o, cu_seqlens, chunk_indices, scale,
    T, N, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, HEADS_FAST: tl.constexpr,
):
    # o = scale (exp(gc) q S0 + tril(q k^T e) v') for one chunk and V block, from the state S0
    # entering the chunk and v' as the serial pass stored them (in q's dtype). The K dimension is
    # walked in BK blocks (q S0 and q k^T accumulate in fp32), so that one K block's loads overlap
    # the previous one's products; the gate scales the [BT, BV] and [BT, BT] results, not q.
    j, bh = chunk_head_ids(HEADS_FAST, True)
    iv = tl.program_id(1)
    b, hv, h, i, bos, eos = _chunk_program(j, bh, chunk_indices, cu_seqlens, T, N, H, HV, BT, IS_VARLEN)
    # this chunk's slot among the stored chunk states
    slot = j.to(tl.int64) if IS_VARLEN else (b * tl.cdiv(T, BT) + j).to(tl.int64)
    r = tl.arange(0, BT)
    cv = iv * BV + tl.arange(0, BV)
    rows = bos + i * BT + r
    rmask = rows < eos
    vmask = rmask[:, None] & (cv[None, :] < V)
    # Spare programs of a packed batch (no rows) would read state slots nobody wrote.
    live = (cv[None, :] * 0 + bos + i * BT) < eos
    qs = tl.zeros([BT, BV], dtype=tl.float32)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        kmask = rmask[:, None] & (ck[None, :] < K)
        b_q = tl.load(q + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
        b_k = tl.load(k + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
        smask = (ck[:, None] < K) & (cv[None, :] < V) & live
        b_h = tl.load(hs + slot * (HV * K * V) + hv * K * V + ck[:, None] * V + cv[None, :], mask=smask, other=0.0)
        qs += tl.dot(b_q, b_h)
        qk += tl.dot(b_q, tl.trans(b_k))
    causal = r[:, None] >= r[None, :]
    if USE_G:
        gc, _ = _chunk_gates(gcum, rows, rmask, bos, eos, i, hv, HV, BT, USE_G)
        qs = qs * tl.exp(gc)[:, None]
        qk = qk * tl.exp(tl.where(causal, gc[:, None] - gc[None, :], 0.0))
    qk = tl.where(causal, qk, 0.0)
    tok = rows[:, None] * (HV * V) + hv * V + cv[None, :]
    b_vn = tl.load(vn + tok, mask=vmask, other=0.0)
    b_o = (qs + tl.dot(qk.to(vn.dtype.element_ty), b_vn)) * scale
    tl.store(o + tok, b_o.to(o.dtype.element_ty), mask=vmask)


def _prepare(k, v, g, beta, cu_seqlens, store_a=False, store_w=True, store_u=None):
    """w (or None without store_w), u (or None without store_u; store_u None: where the serial
    passes read it, without `values_in_pass`), the in-chunk gate cumsum (or None) and the inverse A
    [B, T, HV, 64], zero above the diagonal: returned with store_a (the backward differentiates
    through it) or without u (a serial pass that forms v' from A and v), else None."""
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    if store_u is None:
        store_u = not values_in_pass()
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    w = torch.empty(B, T, HV, K, dtype=k.dtype, device=k.device) if store_w else None
    u = torch.empty(B, T, HV, V, dtype=u_dtype(k.dtype), device=k.device) if store_u else None
    gcum = torch.empty(B, T, HV, dtype=torch.float32, device=k.device) if g is not None else None
    if cu_seqlens is not None:
        chunk_indices, _ = prepare_chunk_indices(cu_seqlens, CHUNK, max_num_chunks(T, N, CHUNK))
        chunks, heads = chunk_indices.shape[0], HV
    else:
        chunk_indices = None
        chunks, heads = cdiv(T, CHUNK), B * HV
    # A passes through memory (every entry written, zeros included) even when not returned.
    a = torch.empty(B, T, HV, CHUNK, dtype=k.dtype, device=k.device)
    BC, warps = prepare_config(k.element_size(), _pow2(K), _pow2(V))
    # L = beta k k^T Gamma, fp32, read back by the program that wrote it (16x16 blocks)
    lbuf = torch.empty(B, T, HV, CHUNK, dtype=torch.float32, device=k.device)
    _prepare_kernel[chunk_grid(chunks, heads)](
        k, v, g, beta, w, u, gcum, a, lbuf, cu_seqlens, chunk_indices,
        T, N, H, HV, K, V, BT=CHUNK, BK=_pow2(K), BC=BC,
        USE_G=g is not None, IS_VARLEN=cu_seqlens is not None, STORE_W=store_w, STORE_U=store_u,
        HEADS_FAST=heads_fast(chunks), num_warps=warps,
    )
    return w, u, gcum, (a if store_a or not store_u else None)


def u_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of u = A beta v: fp32, since it feeds v' = u - w S, where the two terms cancel as
    the state learns the values. In bf16 it would halve the prep kernel's largest write and the
    serial pass's largest read (H100, 8x4096, 16 heads of 128: inference forward 1.07 -> 0.80 ms
    plain, 1.20 -> 1.14 gated), but the bf16 GPU tests' 16-wide heads then miss the 5e-3 output
    bound (benchmarks/notes_delta_rule.md)."""
    return torch.float32


def prepare_config(element_size: int, BK: int, BV: int) -> tuple[int, int]:
    """(column block, warps) of _prepare_kernel's w and u products. For K = 128 (bf16) ptxas
    reports ~170 bytes of spills per thread at 4 warps and none at 8, yet 4 warps are faster on
    the H100 (8x4096, K = V = 128: 0.55 against 0.93 ms per call, delta_rule_profile_v2_h100.json):
    twice the programs per SM hide the serial doubling steps."""
    return min(64, BK, BV), 4


def values_in_pass() -> bool:
    """Whether the forward's serial pass and the segments' transition pass form
    v' = A (beta (v - Gamma k S)) from A and v (True), rather than u - w S from the w and u the
    prep kernel wrote (False). The prep kernel then writes no u (fp32, the largest of its writes,
    and the pass's largest read) and, without a backward, no w; the pass gets one more [64, 64]
    product per chunk, and the difference v - Gamma k S is rounded, not u. H100, 8x4096, H = 16,
    K = V = 128:
    inference forward gated 1.209 -> 0.951 ms, plain 1.071 -> 0.732
    (results/delta_rule_values_in_pass_inference_h100.json); training forward+backward gated
    3.420 -> 3.215, plain 2.616 -> 2.438 (results/delta_rule_values_in_pass_training_h100.json)."""
    return True


def split_output() -> bool:
    """Whether the forward computes o in `_output_kernel` after the serial pass (True) rather
    than inside it (False). The split shortens the serial chain (two products per chunk instead
    of five) for one more launch that reads the stored states and v' back; a forward that keeps
    nothing for a backward stores them for that launch only (benchmarks/delta_rule_profile.py,
    variant split_output=0|1). H100, bf16, gated, training forward / forward+backward in ms:
    H=16, K=V=128 at 8x4096 1.43 / 4.02 -> 1.34 / 3.93, at 1x32768 2.59 / 6.35 -> 1.93 / 5.69;
    the Gated DeltaNet recipe's layer (8x4096, 4 heads, K=128, V=256) 0.74 / 2.04 -> 0.65 / 1.97
    (results/delta_rule_split_v2_h100.json). The forward without a backward ran the single pass
    at 1.26 ms (8x4096) and 2.41 (1x32768) against 1.24 and 1.81 split
    (results/kernels_delta_rule_h100.json, delta_rule_prep_full_h100.json)."""
    return True


OUTPUT_K_BLOCK = 64  # columns of q and k per step of `_output_kernel`'s walk over K


def output_config(element_size: int, BK: int, BVF: int) -> tuple[int, int]:
    """(V block, warps) of `_output_kernel` (K <= 128, see `_splits_output`). H100, bf16,
    gated, ms per call at 8x4096 with H=16, K=V=128 / 4 heads of K=128, V=256: 0.29 / 0.13 at
    128 x 8 warps (q and k read once per 128 columns of v), 0.31 / 0.15 at 64 x 8, 0.30 / 0.14 at
    64 x 4. ptxas (sm_90, Triton 3.6): 113 registers at 128 x 8 (two programs per SM), 79 at
    64 x 8. Each V block recomputes q k^T: cheap beside the bytes of the state it reads. fp32
    inputs keep 64 columns (twice the bytes per tile)."""
    return min(BVF, 64 if element_size > 2 else 128), 8


def _splits_output(q: torch.Tensor) -> bool:
    """split_output(), for heads of K <= 128 only: at K = 256 (bf16, H100/H200, Triton 3.6) the
    output kernel gave wrong values or an illegal memory access at both 32 x 4 and 32 x 8, while
    the interpreter's results were exact; the single pass serves those heads."""
    return split_output() and q.shape[-1] <= 128


def state_warps(element_size: int) -> int:
    """Warps of the chunk-to-chunk pass (the H100 sweep in benchmarks/delta_rule_profile.py)."""
    return 4


def _state_block(q: torch.Tensor, num_seqs: int, HV: int, V: int, programs_per_sm: int = 2) -> int:
    # Keep the per-program tiles (q, k, w [64, K], the state [K, BV]) within shared memory. The
    # V block follows V itself (down to 16), not the 64-wide minimum of the other tiles: a
    # block wider than V would only add masked columns to the serial pass.
    BK, BVF = _pow2(q.shape[-1]), max(16, next_power_of_2(V))
    wide = q.element_size() > 2
    BV = min(BVF, (16 if BK > 128 else 32) if wide else (32 if BK > 128 else 64))
    # The chunk-to-chunk pass is the serial part: with few sequences (B=1, long T) narrower V
    # blocks give more programs so that every SM has `programs_per_sm`.
    while BV > 16 and num_seqs * HV * cdiv(V, BV) < programs_per_sm * num_sms(q.device):
        BV //= 2
    return BV


# Programs per SM below which the forward's states-only pass (split_output) narrows its V block.
# Its chain is two products per chunk, short enough that one program per SM keeps the H100 as
# busy as two, and a wider block reads k and w once for more columns (8x4096, 16 heads of 128,
# bf16: 0.355 -> 0.301 ms at V blocks of 64 against 32; the reverse pass keeps 2: 0.54 -> 0.82
# ms gated; results/delta_rule_forward_block_*_h100.json).
STATES_PASS_PROGRAMS_PER_SM = 1


def state_block_choices(q: torch.Tensor, V: int) -> list[int]:
    """Every V block `_state_block` can pick for q's head size and dtype, whatever the number of
    sequences: the widest and its halvings down to 16."""
    choices = [_state_block(q, 1 << 30, 1, V)]
    while choices[-1] > 16:
        choices.append(choices[-1] // 2)
    return choices


def _state_pass(q, k, w, u, gcum, initial_state, cu_seqlens, scale, compute_o=True, store_states=False,
                a=None, v=None, beta=None, long_docs=False):
    """The chunk-to-chunk pass. Returns (o or None, final state, states entering each chunk
    [chunk slots, HV, K, V] or None, v' [B, T, HV, V] or None, chunk offsets or None, segment
    transitions, transposed, [segment slots, HV, K, K] or None); the states, v' (store_states) and the
    transitions (when the pass ran over segments) are what the backward needs. Without u
    (`_prepare` wrote none: `values_in_pass`), v' is formed from A, v and beta. long_docs: the
    packed batch has a long document (`delta_rule_segments.long_documents`)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = torch.empty(N, HV, K, V, dtype=torch.float32, device=q.device)
    o = hs = vn = chunk_offsets = None
    if store_states:
        if cu_seqlens is not None:
            _, chunk_offsets = prepare_chunk_indices(cu_seqlens, CHUNK, max_num_chunks(T, N, CHUNK))
        hs = torch.empty(_state_slots(B, T, N, cu_seqlens), HV, K, V, dtype=q.dtype, device=q.device)
        vn = torch.empty(B, T, HV, V, dtype=q.dtype, device=q.device)
    if compute_o:
        o = torch.empty(B, T, HV, V, dtype=q.dtype, device=q.device)
    seg = plan_segments(q, cu_seqlens, HV, V, long_docs)
    # With segments the pass runs over them as sequences of their own, entered with the states
    # that the transition pass and the combine give (delta_rule_segments.py).
    h0, offsets, first_slots, programs, transitions = initial_state, cu_seqlens, chunk_offsets, N, None
    if seg is not None:
        h0, transitions = segment_entry_states(k, w, u, a, v, beta, gcum, initial_state, seg)
        offsets, programs, first_slots = seg.bounds, seg.slots, seg.chunk_offsets
        ht = torch.empty(seg.slots, HV, K, V, dtype=torch.float32, device=q.device)
    BV = _state_block(q, programs, HV, V, 2 if compute_o else STATES_PASS_PROGRAMS_PER_SM)
    args = (q, k, w, u, a, v, beta, gcum, o, h0, ht, hs, vn, offsets, first_slots, scale, T, H, HV, K, V)
    options = dict(BT=CHUNK, BK=_pow2(K), USE_G=gcum is not None, USE_H0=h0 is not None,
                   IS_VARLEN=offsets is not None, COMPUTE_O=compute_o, STORE_STATES=store_states,
                   FROM_V=u is None,
                   num_warps=state_warps(q.element_size()), num_stages=1 if q.element_size() > 2 else 2)
    if offsets is not None and q.is_cuda:  # BV follows the document count, which varies by batch
        compile_variants(_state_output_kernel, args, options, [{"BV": b} for b in state_block_choices(q, V)])
    _state_output_kernel[(cdiv(V, BV), programs * HV)](*args, **options, BV=BV)
    if seg is not None:
        ht = last_segment_states(ht, seg, initial_state)
    return o, ht, hs, vn, chunk_offsets, transitions


def _output(q, k, gcum, hs, vn, cu_seqlens, scale):
    """o [B, T, HV, V] (q's dtype) from the states entering each chunk and v' (`_state_pass`
    with store_states), chunk-parallel."""
    B, T, H, K = q.shape
    HV, V = vn.shape[2], vn.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = torch.empty(B, T, HV, V, dtype=q.dtype, device=q.device)
    if cu_seqlens is not None:
        chunk_indices, _ = prepare_chunk_indices(cu_seqlens, CHUNK, max_num_chunks(T, N, CHUNK))
        chunks, heads = chunk_indices.shape[0], HV
    else:
        chunk_indices = None
        chunks, heads = cdiv(T, CHUNK), B * HV
    BV, warps = output_config(q.element_size(), _pow2(K), _pow2(V))
    _output_kernel[chunk_grid(chunks, heads, cdiv(V, BV))](
        q, k, gcum, hs, vn, o, cu_seqlens, chunk_indices, scale,
        T, N, H, HV, K, V, BT=CHUNK, BK=min(OUTPUT_K_BLOCK, _pow2(K)), BV=BV,
        USE_G=gcum is not None, IS_VARLEN=cu_seqlens is not None, HEADS_FAST=heads_fast(chunks),
        num_warps=warps,
    )
    return o


def _state_slots(B: int, T: int, N: int, cu_seqlens) -> int:
    """Chunk slots of the per-chunk states: every chunk of every sequence, or (packed) an upper
    bound on their number."""
    return max_num_chunks(T, N, CHUNK) if cu_seqlens is not None else B * cdiv(T, CHUNK)


BACKWARD_MODES = ("recompute", "saved")


def backward_mode() -> str:
    """What the backward gets from the forward: FLAME_DELTA_BACKWARD=saved (default) or recompute.

    saved: the forward also writes A, the per-chunk states and v' (the pass computes o and
    stores them at once; with split_output() o follows from what it stored) and keeps them
    with w and the gate cumsum, so the backward runs only
    its two gradient kernels (H100, 8 x 4096 tokens, 16 heads of 128: gated fwd+bwd 6.10 ->
    4.97 ms; benchmarks/notes_delta_rule.md).
    recompute: the backward reruns the prep kernel and the chunk-to-chunk pass from the inputs,
    for runs short of activation memory. The saved tensors cost per layer and token
    2 * HV * (K + 64 + V) bytes plus the states (HV * K * V * 2 bytes per chunk of 64 tokens),
    ~250 MB per layer at 8 x 4096 tokens, HV = 4, K = 128, V = 256."""
    mode = os.environ.get("FLAME_DELTA_BACKWARD", "saved")
    if mode not in BACKWARD_MODES:
        raise ValueError(f"FLAME_DELTA_BACKWARD must be one of {BACKWARD_MODES}, got {mode!r}")
    return mode


def _forward_triton(q, k, v, g, beta, initial_state, cu_seqlens, scale, save, long_docs=False):
    """(o, final state, saved): saved is (w, gate cumsum or None, A, chunk states, v', segment
    transitions or None) for the backward, or None."""
    # The serial passes form v' from A and v, so that u is never written (`values_in_pass`), nor
    # w without a backward.
    reads_u = not values_in_pass()
    w, u, gcum, a = _prepare(k, v, g, beta, cu_seqlens, store_a=save, store_w=save or reads_u, store_u=reads_u)
    # Without a backward the split pays for gated heads only (the states are then stored for the
    # output kernel alone): H100, 8x4096, K = V = 128, plain 1.08 ms single pass against 1.15.
    split = _splits_output(q) and (save or g is not None)
    o, ht, hs, vn, _, transitions = _state_pass(q, k, w, u, gcum, initial_state, cu_seqlens, scale,
                                   compute_o=not split, store_states=save or split, a=a, v=v, beta=beta,
                                   long_docs=long_docs)
    if split:
        del u
        o = _output(q, k, gcum, hs, vn, cu_seqlens, scale)
    return o.to(v.dtype), ht, ((w, gcum, a, hs, vn, transitions) if save else None)


def _reference(q, k, v, g, beta, initial_state, cu_seqlens, scale):
    dtype = compute_dtype(q)
    o, ht = chunk_delta_rule_ref(
        q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype),
        g=g.to(dtype) if g is not None else None, scale=scale,
        initial_state=initial_state.to(dtype) if initial_state is not None else None,
        output_final_state=True, cu_seqlens=cu_seqlens,
    )
    return o, ht


_SAVED = 6  # w, gate cumsum, A, chunk states, v', segment transitions: empty tensors when nothing is saved


def _nothing_saved(q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(q.new_empty(0) for _ in range(_SAVED))


def _takes_kernels(q, k, v, g, beta, initial_state) -> bool:
    """The Triton path, except for fp32 tiles of K > 128 on a GPU, which exceed the H100's shared
    memory in the state kernel: the reference handles that rare case (bf16/fp16 inputs, the
    training path, always take the kernels)."""
    fits = q.element_size() <= 2 or q.shape[-1] <= 128
    return use_triton(q, k, v, g, beta, initial_state) and (fits or not q.is_cuda)


@torch.library.custom_op("flame::chunk_delta_rule_fwd", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, scale: float, save: bool,
    long_docs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    if _takes_kernels(q, k, v, g, beta, initial_state):
        o, ht, saved = _forward_triton(q, k, v, g, beta, initial_state, cu_seqlens, scale, save, long_docs)
        if saved is not None:
            w, gcum, a, hs, vn, transitions = saved
            return (o, ht, w, gcum if gcum is not None else q.new_empty(0), a, hs, vn,
                    transitions if transitions is not None else q.new_empty(0))
        return (o, ht) + _nothing_saved(q)
    # the reference path saves nothing: its backward differentiates a recomputation
    o, ht = _reference(q, k, v, g, beta, initial_state, cu_seqlens, scale)
    # contiguous, as the fake outputs are (the reference's o is a view into a chunk-padded buffer)
    return (o.to(v.dtype).contiguous(), ht.to(_state_dtype(q)).contiguous()) + _nothing_saved(q)


def _state_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@_forward_op.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, scale, save, long_docs):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o, ht = v.new_empty(B, T, HV, V), q.new_empty(N, HV, K, V, dtype=_state_dtype(q))
    if not (save and _takes_kernels(q, k, v, g, beta, initial_state)):
        return (o, ht) + _nothing_saved(q)
    gcum = q.new_empty(B, T, HV, dtype=torch.float32) if g is not None else q.new_empty(0)
    slots = segment_slots(q, cu_seqlens, HV, V, long_docs)
    transitions = q.new_empty(slots, HV, K, K, dtype=torch.float32) if slots else q.new_empty(0)
    return (o, ht, q.new_empty(B, T, HV, K), gcum, k.new_empty(B, T, HV, CHUNK),
            q.new_empty(_state_slots(B, T, N, cu_seqlens), HV, K, V), q.new_empty(B, T, HV, V), transitions)


@torch.library.custom_op("flame::chunk_delta_rule_bwd", mutates_args=())
def _backward_op(
    do: torch.Tensor, dht: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, scale: float, long_docs: bool,
    w: torch.Tensor, gcum: torch.Tensor, a: torch.Tensor, hs: torch.Tensor, vn: torch.Tensor,
    transitions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _takes_kernels(q, k, v, g, beta, initial_state):
        saved = None
        if hs.numel():  # the forward kept what the backward would otherwise recompute
            saved = (w, gcum if g is not None else None, a, hs, vn,
                     transitions if transitions.numel() else None)
        dq, dk, dv, dg, dbeta, dh0 = backward_triton(
            do, dht, q, k, v, g, beta, initial_state, cu_seqlens, scale,
            state_block=_state_block, state_block_choices=state_block_choices, prepare=_prepare,
            state_pass=_state_pass, saved=saved, long_docs=long_docs)
        return (dq, dk, dv, dg if dg is not None else q.new_empty(0), dbeta,
                dh0 if dh0 is not None else q.new_empty(0))
    dtype = compute_dtype(q)
    inputs = [x.to(dtype) for x in (q, k, v, beta)]
    if g is not None:
        inputs.append(g.to(dtype))
    if initial_state is not None:
        inputs.append(initial_state.to(dtype))

    def forward(*args):
        qf, kf, vf, bf = args[:4]
        gf = args[4] if g is not None else None
        h0f = args[-1] if initial_state is not None else None
        return chunk_delta_rule_ref(qf, kf, vf, bf, g=gf, scale=scale, initial_state=h0f,
                                    output_final_state=True, cu_seqlens=cu_seqlens)

    # Custom-op bodies run below the autograd dispatch key, so the recomputation is differentiated
    # with torch.func rather than with tensor autograd.
    (o, ht), vjp = torch.func.vjp(forward, *inputs)
    result = vjp((do.to(dtype), dht.to(dtype) if dht is not None else torch.zeros_like(ht)))
    dq, dk, dv, dbeta = result[:4]
    dg = result[4].to(g.dtype) if g is not None else q.new_empty(0)
    dh0 = result[-1].to(initial_state.dtype) if initial_state is not None else q.new_empty(0)
    # laid out like the inputs (contiguous), as the fake outputs are
    return tuple(x.contiguous() for x in (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg,
                                          dbeta.to(beta.dtype), dh0))


@_backward_op.register_fake
def _(do, dht, q, k, v, g, beta, initial_state, cu_seqlens, scale, long_docs, w, gcum, a, hs, vn, transitions):
    dg = torch.empty_like(g) if g is not None else q.new_empty(0)
    dh0 = torch.empty_like(initial_state) if initial_state is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, torch.empty_like(beta), dh0


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, initial_state, cu_seqlens, scale, save, long_docs = inputs
    saved = output[2:]
    # No zero-filled gradients for the outputs the loss does not use (the kept tensors, and the
    # final state unless it is used): at 8x4096, H = 16, they were 0.19 ms of fills per backward.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, *saved)
    ctx.scale, ctx.long_docs = scale, long_docs


def _backward(ctx, do, dht, *unused):
    q, k, v, g, beta, initial_state, cu_seqlens, *saved = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dbeta, dh0 = _backward_op(do, dht, q, k, v, g, beta, initial_state, cu_seqlens,
                                              ctx.scale, ctx.long_docs, *saved)
    return (dq, dk, dv, dg if g is not None else None, dbeta,
            dh0 if initial_state is not None else None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _run(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
         max_seqlen):
    check_inputs(q, k, v, {"g": g, "beta": beta}, {}, {}, initial_state, cu_seqlens, grouped_heads=True)
    check_max_seqlen(max_seqlen)
    if use_triton(q, k, v) and q.dtype == torch.float64:
        raise ValueError("the Triton kernels take bf16, fp16 or fp32 inputs, got float64 q")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    g = g.contiguous() if g is not None else None
    initial_state = initial_state.contiguous() if initial_state is not None else None
    # keep the backward's inputs only when there will be a backward
    save = backward_mode() == "saved" and needs_backward(q, k, v, g, beta, initial_state)
    o, ht = _forward_op(q, k, v, g, beta, initial_state, cu_seqlens, float(scale), save,
                        long_documents(cu_seqlens, max_seqlen))[:2]
    return o, (ht if output_final_state else None)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet: S_t = exp(g_t) S_{t-1}; S_t += beta_t k_t (v_t - S_t^T k_t)^T; o_t = scale S_t^T q_t.

    q, k [B, T, H, K]; v [B, T, HV, V]; g (log decay), beta [B, T, HV]; HV a multiple of H
    (value head h reads q/k head h // (HV // H)). initial_state [N, HV, K, V] fp32, N = B or the
    number of sequences in cu_seqlens (int [N + 1], B = 1). max_seqlen (optional, with
    cu_seqlens): at least the longest sequence's length, a host-side hint that picks how the
    serial passes run (any bound gives the same result). Returns (o [B, T, HV, V], final state
    [N, HV, K, V] fp32 if output_final_state else None).
    """
    if g is None:
        raise ValueError("g must be a tensor [B, T, HV] of log decays; use chunk_delta_rule for no gate")
    return _run(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
                max_seqlen)


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaNet: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T; o_t = scale S_t^T q_t.

    Shapes, max_seqlen and returns as chunk_gated_delta_rule, without g.
    """
    return _run(q, k, v, None, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
                max_seqlen)
