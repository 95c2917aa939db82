"""Backward of the chunked delta rule (gated or not) in Triton.

Notation of delta_rule_ref.py, per chunk of C = 64 tokens, gc the in-chunk gate cumsum, gl its
value at the chunk's last token, e_ij = exp(gc_i - gc_j) for i >= j:
    v' = u - w S0,  o = scale (exp(gc) q S0 + tril(q k^T e) v'),
    S1 = exp(gl) S0 + (k exp(gl - gc))^T v',  w = A (beta exp(gc) k),  u = A (beta v).

w, A, the gate cumsum, the state entering each chunk and v' come from the forward (the default,
`backward_mode` "saved") or are recomputed first (delta_rule.py: the prep kernel, also storing A,
and the state pass, storing the states and v'). Then:
  1. `_state_grad_kernel`, parallel over (sequence, value head, V block), serial over chunks in
     reverse: dv' = scale tril(q k^T e)^T do + k exp(gl - gc) dS1 (stored), the state gradient
     dS0 = exp(gl) dS1 + scale (exp(gc) q)^T do - w^T dv', and the gradient of the state leaving
     each chunk (stored); dS0 of the first chunk is the initial-state gradient.
     When `split_dv_local` says so (gated, few serial programs), the first term of dv', which
     needs no state gradient, comes from `_local_dv_kernel` (chunk-parallel, written into the
     dv' buffer) before the serial pass, which then only adds the state term: two of its five
     products per chunk leave the chain. Where the forward ran over segments, so does this pass,
     from the end gradients that the segments' transitions give (delta_rule_segments.py; for
     equal-length sequences of gated heads over runs of the forward's segments, `joined_segments`).
  2. `_chunk_grad_kernel`, parallel over (chunk, value head): dq, dk, dv, dbeta and dg from the
     stored states, v', dv' and A, through the WY representation (dA -> dk, dbeta, dgc) and a
     reverse cumsum of the gate gradient within the chunk.
q/k gradients are produced per value head and summed over the group of value heads sharing them.
"""

import torch
import triton
import triton.language as tl

from flame.kernels.delta_rule_chunk import _chunk_gates, _pow2, state_grad_dv, state_grad_update
from flame.kernels.delta_rule_segments import (backward_join, first_segment_grads, joined_segments, plan_segments,
                                               segment_end_grads)
from flame.kernels.utils import (cdiv, chunk_grid, chunk_head_ids, chunk_span, compile_variants, heads_fast,
                                max_num_chunks, num_sms, prepare_chunk_indices, sum_head_groups)

CHUNK = 64


@triton.jit
def _chunk_program(j, bh, chunk_indices, cu_seqlens, T, N, H: tl.constexpr, HV: tl.constexpr,
                   BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """A chunk-parallel program's (batch row, value head, its q/k head) from grid index bh, and
    its chunk (`chunk_span`): (b, hv, h, i, bos, eos). Grids are sized for the most chunks any
    packing can have; spare programs get an empty range and write nothing."""
    b = bh // HV
    hv = bh % HV
    h = hv // (HV // H)
    i, bos, eos = chunk_span(j, b, chunk_indices, cu_seqlens, T, N, BT, IS_VARLEN)
    return b, hv, h, i, bos, eos


@triton.jit(do_not_specialize=["N"])
def _local_dv_kernel(
    q, k, gcum, do, dv2, cu_seqlens, chunk_indices, scale,
    T, N, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, HEADS_FAST: tl.constexpr,
):
    # The in-chunk term of dv' = scale tril(q k^T e)^T do, for one chunk and V block; the serial
    # pass (LOCAL_DV) reads it back from dv2 and adds the state term.
    j, bh = chunk_head_ids(HEADS_FAST, True)
    iv = tl.program_id(1)
    b, hv, h, i, bos, eos = _chunk_program(j, bh, chunk_indices, cu_seqlens, T, N, H, HV, BT, IS_VARLEN)
    r = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)
    rows = bos + i * BT + r
    rmask = rows < eos
    kmask = rmask[:, None] & (ck[None, :] < K)
    vmask = rmask[:, None] & (cv[None, :] < V)
    b_q = tl.load(q + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
    b_k = tl.load(k + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
    tok = rows[:, None] * (HV * V) + hv * V + cv[None, :]
    b_do = tl.load(do + tok, mask=vmask, other=0.0)
    # [j, i]: token j's value reaches token i's output for i >= j.
    causal_t = r[:, None] <= r[None, :]
    kq = tl.dot(b_k, tl.trans(b_q))
    if USE_G:
        gc, _ = _chunk_gates(gcum, rows, rmask, bos, eos, i, hv, HV, BT, USE_G)
        kq = kq * tl.exp(tl.where(causal_t, gc[None, :] - gc[:, None], 0.0))
    kq = tl.where(causal_t, kq, 0.0) * scale
    b_dv = tl.dot(kq.to(b_q.dtype), b_do)
    tl.store(dv2 + tok, b_dv.to(dv2.dtype.element_ty), mask=vmask)


@triton.jit
def _state_grad_kernel(
    q, k, w, gcum, do, dht, dh0, dhs, dv2, cu_seqlens, chunk_offsets, scale,
    T, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_DHT: tl.constexpr, USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    LOCAL_DV: tl.constexpr,
):
    # LOCAL_DV: dv2 already holds the in-chunk term of dv' (`_local_dv_kernel`); each chunk reads
    # it and overwrites it with the whole dv' (same program, same tile: the read comes first).
    iv = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // HV
    hv = nh % HV
    h = hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + n).to(tl.int32)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int32)
        slot0 = tl.load(chunk_offsets + n).to(tl.int64)
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
    if USE_DHT:
        dS = tl.load(dht + state_off, mask=smask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    # [j, i]: token j's value reaches token i's output for i >= j.
    causal_t = r[:, None] <= r[None, :]
    for i in range(tl.cdiv(eos - bos, BT) - 1, -1, -1):
        rows = bos + i * BT + r
        rmask = rows < eos
        kmask = rmask[:, None] & (ck[None, :] < K)
        vmask = rmask[:, None] & (cv[None, :] < V)
        tl.store(dhs + (slot0 + i) * (HV * K * V) + slot_off, dS.to(dhs.dtype.element_ty), mask=smask)
        b_q = tl.load(q + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
        b_k = tl.load(k + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
        b_w = tl.load(w + rows[:, None] * (HV * K) + hv * K + ck[None, :], mask=kmask, other=0.0)
        b_do = tl.load(do + rows[:, None] * (HV * V) + hv * V + cv[None, :], mask=vmask, other=0.0)
        gc, last = _chunk_gates(gcum, rows, rmask, bos, eos, i, hv, HV, BT, USE_G)
        dv2_tile = dv2 + rows[:, None] * (HV * V) + hv * V + cv[None, :]
        b_dv, b_dos = state_grad_dv(b_q, b_k, b_do, dv2_tile, vmask, dS, gc, last, scale, causal_t, USE_G, LOCAL_DV)
        tl.store(dv2_tile, b_dv.to(dv2.dtype.element_ty), mask=vmask)
        dS = state_grad_update(dS, b_q, b_w, b_dos, b_dv, last, USE_G)
    if USE_H0:
        tl.store(dh0 + state_off, dS, mask=smask)


@triton.jit(do_not_specialize=["N"])
def _chunk_grad_kernel(
    q, k, v, beta, gcum, a, hs, vn, do, dhs, dv2, dq, dk, dv, dbeta, dg,
    cu_seqlens, chunk_indices, chunk_offsets, scale,
    T, N, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, HEADS_FAST: tl.constexpr,
):
    j, bh = chunk_head_ids(HEADS_FAST, False)
    b, hv, h, i, bos, eos = _chunk_program(j, bh, chunk_indices, cu_seqlens, T, N, H, HV, BT, IS_VARLEN)
    # this chunk's slot among the stored chunk states
    slot = j.to(tl.int64) if IS_VARLEN else (b * tl.cdiv(T, BT) + j).to(tl.int64)
    r = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    rows = bos + i * BT + r
    rmask = rows < eos
    kmask = rmask[:, None] & (ck[None, :] < K)
    b_q = tl.load(q + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
    b_k = tl.load(k + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
    b_a = tl.load(a + rows[:, None] * (HV * BT) + hv * BT + r[None, :], mask=rmask[:, None], other=0.0)
    b_beta = tl.load(beta + rows * HV + hv, mask=rmask, other=0.0).to(tl.float32)
    gc, last = _chunk_gates(gcum, rows, rmask, bos, eos, i, hv, HV, BT, USE_G)
    dt = b_q.dtype
    b_at = tl.trans(b_a)

    dP = tl.zeros([BT, BT], dtype=tl.float32)      # do v'^T
    dA = tl.zeros([BT, BT], dtype=tl.float32)      # gradient of A through u = A beta v
    dq_inter = tl.zeros([BT, BK], dtype=tl.float32)  # do S0^T
    dk_state = tl.zeros([BT, BK], dtype=tl.float32)  # v' dS1^T
    dw = tl.zeros([BT, BK], dtype=tl.float32)        # dv' S0^T (w enters v' with a minus sign)
    dbeta_v = tl.zeros([BT], dtype=tl.float32)
    dgl = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)  # sum(S0 * dS1), for the decay of the state
    first_row = bos + i * BT
    for iv in range(0, tl.cdiv(V, BV)):
        cv = iv * BV + tl.arange(0, BV)
        vmask = rmask[:, None] & (cv[None, :] < V)
        tok_off = rows[:, None] * (HV * V) + hv * V + cv[None, :]
        st_off = slot * (HV * K * V) + hv * K * V + ck[:, None] * V + cv[None, :]
        # Spare programs of a packed batch (no rows) would read state slots nobody wrote.
        smask = (ck[:, None] < K) & (cv[None, :] < V) & (ck[:, None] * 0 + first_row < eos)
        b_do = tl.load(do + tok_off, mask=vmask, other=0.0)
        b_vn = tl.load(vn + tok_off, mask=vmask, other=0.0)
        b_dv2 = tl.load(dv2 + tok_off, mask=vmask, other=0.0)
        b_v = tl.load(v + tok_off, mask=vmask, other=0.0)
        b_h = tl.load(hs + st_off, mask=smask, other=0.0)
        b_dh = tl.load(dhs + st_off, mask=smask, other=0.0)
        dP += tl.dot(b_do, tl.trans(b_vn))
        dq_inter += tl.dot(b_do, tl.trans(b_h))
        dk_state += tl.dot(b_vn, tl.trans(b_dh))
        dw += tl.dot(b_dv2, tl.trans(b_h))
        if USE_G:
            dgl += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32))
        b_vb = (b_v.to(tl.float32) * b_beta[:, None]).to(dt)
        dA += tl.dot(b_dv2, tl.trans(b_vb))
        # u = A (beta v): dv = beta A^T dv', dbeta from the same product.
        b_dvb = tl.dot(b_at.to(dt), b_dv2)
        tl.store(dv + tok_off, (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=vmask)
        dbeta_v += tl.sum(b_dvb * b_v.to(tl.float32), 1)

    causal = r[:, None] >= r[None, :]
    strict = r[:, None] > r[None, :]
    kf = b_k.to(tl.float32)
    if USE_G:
        e = tl.where(causal, tl.exp(tl.where(causal, gc[:, None] - gc[None, :], 0.0)), 0.0)
        gam = tl.exp(gc)
        kdec = tl.exp(last - gc)
    else:
        e = tl.where(causal, 1.0, 0.0)
        gam = tl.full([BT], 1.0, tl.float32)
        kdec = tl.full([BT], 1.0, tl.float32)
    # The gate gradient dgc (gradient of the in-chunk cumsum gc) is a sum of row reductions of
    # tiles that the other gradients need too; each term is added as soon as its tile is final,
    # so no [64, K] or [64, 64] tile stays alive to the end for it (fewer register spills).
    dgc = tl.zeros([BT], dtype=tl.float32)
    # Output: o = scale (gam q S0 + tril(q k^T e) v').
    dPe = dP * e * scale
    dq_inter = dq_inter * (scale * gam)[:, None]
    if USE_G:
        Z = dPe * tl.dot(b_q, tl.trans(b_k))
        dgc += tl.sum(dq_inter * b_q.to(tl.float32), 1) + tl.sum(Z, 1) - tl.sum(Z, 0)
    b_dq = dq_inter + tl.dot(dPe.to(dt), b_k)
    tok_k = rows[:, None] * (HV * K) + hv * K + ck[None, :]
    tl.store(dq + tok_k, b_dq.to(dq.dtype.element_ty), mask=kmask)
    b_dk = tl.dot(tl.trans(dPe).to(dt), b_q)
    # State update: S1 = exp(gl) S0 + (k exp(gl - gc))^T v'.
    dk_state = dk_state * kdec[:, None]
    if USE_G:
        ys = tl.sum(dk_state * kf, 1)
        dgc -= ys
        dgl_total = dgl * tl.exp(last) + tl.sum(ys, 0)
    b_dk += dk_state
    # WY: w = A (beta gam k), u = A (beta v).
    kb = kf * (b_beta * gam)[:, None]
    dw = -dw
    dA += tl.dot(dw.to(dt), tl.trans(kb.to(dt)))
    dkb = tl.dot(b_at.to(dt), dw.to(dt))
    b_dk += dkb * (b_beta * gam)[:, None]
    dbeta_acc = dbeta_v + tl.sum(dkb * kf, 1) * gam
    if USE_G:
        dgc += tl.sum(dkb * kb, 1)
    # A = (I + L)^-1: dL = -A^T dA A^T below the diagonal; L = beta_i k_i.k_j e_ij.
    dL = -tl.dot(tl.dot(b_at.to(dt), dA.to(dt)).to(dt), b_at.to(dt))
    dL = tl.where(strict, dL, 0.0)
    kk = tl.dot(b_k, tl.trans(b_k))
    dLe = dL * e
    dkk = dLe * b_beta[:, None]
    b_dk += tl.dot(dkk.to(dt), b_k) + tl.dot(tl.trans(dkk).to(dt), b_k)
    dbeta_acc += tl.sum(dLe * kk, 1)
    tl.store(dbeta + rows * HV + hv, dbeta_acc.to(dbeta.dtype.element_ty), mask=rmask)
    tl.store(dk + tok_k, b_dk.to(dk.dtype.element_ty), mask=kmask)
    if USE_G:
        G = dLe * kk * b_beta[:, None]
        dgc += tl.sum(G, 1) - tl.sum(G, 0)
        # then of g, by a reverse cumsum; the chunk's last row also carries the state decay's
        last_row = tl.minimum(i * BT + BT, eos - bos) - 1 - i * BT
        dgc = tl.where(r == last_row, dgc + dgl_total, dgc)
        dgc = tl.where(rmask, dgc, 0.0)
        b_dg = tl.cumsum(dgc, 0, reverse=True)
        tl.store(dg + rows * HV + hv, b_dg.to(dg.dtype.element_ty), mask=rmask)


def chunk_grad_config(element_size: int, BK: int, BVF: int) -> tuple[int, int]:
    """(V block, warps) of the chunk-parallel gradient kernel: five fp32 [64, K] and [64, 64]
    accumulators live across its V loop, so wide K takes 8 warps; fp32 inputs narrower V blocks
    (shared memory)."""
    BV = min(BVF, 32 if element_size > 2 or BK > 128 else 64)
    return BV, 8 if BK >= 128 else 4


def chunk_grad_stages(element_size: int, gated: bool, BK: int) -> int:
    """Software-pipeline stages of the chunk gradient kernel's V loop: at 2 the next V block's
    tiles load while the current one computes. H100, K = V = 128, 8x4096: 1.79 -> 1.51 ms per
    call gated, 1.06 -> 0.89 plain (results/delta_rule_prep_full_h100.json, grad_stages=2);
    139-172 KB of shared memory in bf16. Gated heads of K <= 128 take 3 (one H100 call,
    results/delta_rule_grad_stages_9ae2bd7_h100.json, kernel ms 2 -> 3 stages: H = 16, K = V =
    128, 8x4096 1.483 -> 1.349, 1x32768 1.509 -> 1.423; the GDN 1.37B layer, 8 heads of K = 128,
    V = 256, 4x4096 0.585 -> 0.497; the 374M one, 4 heads, 8x4096 0.576 -> 0.490); the plain
    rule's kernel does not fit the shared memory at 3. fp32 inputs keep one stage (twice the
    bytes)."""
    if element_size > 2:
        return 1
    return 3 if gated and BK <= 128 else 2


def split_dv_local(gated: bool, serial_programs: int, sms: int, packed_segments: bool = False) -> bool:
    """Whether the in-chunk term of dv' is computed by `_local_dv_kernel` before the reverse
    serial pass (True) rather than inside it (False). The split takes the [64, 64] q k^T tile and
    its product with do off the serial chain, for one more launch and a write and read of dv2.
    It pays only where the chain is the long pole, for gated heads: where the reverse pass has
    at most one program per SM (few long sequences), and where a packed batch's passes run over
    segments (`delta_rule_segments.use_segments`), whose segments' reverse transition pass reads
    the term too. One H100 call, forward+backward ms, single / split
    (results/delta_rule_split_dv_93002f8_h100.json; serial programs at the V block chosen):
    gated H=16, K=V=128: 8x4096 (512 programs) 3.442 / 3.757, 1x32768 (128) 4.859 / 4.704;
    gated 4 heads, K=128, V=256 (the Gated DeltaNet 374M layer): 2x16384 (128) 2.129 / 1.976,
    8x4096 (512) 1.713 / 1.694; plain: slower everywhere (2.616 / 3.158, 3.718 / 4.084,
    1.648 / 1.795). Packed over segments of 4096, the 374M layer at 2 x 16384 tokens (kernel ms,
    results/delta_rule_packed_variants_h100.json): 1.923 / 1.812.

    The term goes through dv2 itself, in q's dtype, rather than an fp32 buffer: dv' is stored
    and multiplied in that dtype anyway, so the one extra rounding of its in-chunk part is of the
    size of the rounding already there, and the round trip moves half the bytes."""
    return gated and (packed_segments or serial_programs <= sms)


def local_dv_config(element_size: int, BK: int, BVF: int) -> tuple[int, int]:
    """(V block, warps) of `_local_dv_kernel`: wide V blocks, since each recomputes the q k^T
    tile; ptxas (sm_90, bf16, K = 128): no spills at 128 x 8 warps (128-190 registers)."""
    wide = element_size > 2 or BK > 128
    return min(BVF, 64 if wide else 128), 8


def state_grad_warps(element_size: int) -> int:
    """Warps of the reverse chunk-to-chunk pass (the H100 sweep in benchmarks/delta_rule_profile.py)."""
    return 4


def backward_triton(do, dht, q, k, v, g, beta, initial_state, cu_seqlens, scale, state_block,
                    state_block_choices, prepare, state_pass, saved=None, long_docs=False):
    """All gradients (dq, dk, dv, dg or None, dbeta, dh0 or None); `prepare` and `state_pass`
    recompute the forward (delta_rule.py) unless `saved` brings (w, gate cumsum or None, A,
    per-chunk states, v', segment transitions or None) from it; `state_block` picks the V block
    of the serial passes (one of `state_block_choices`, all compiled at the first packed call)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    BK = _pow2(K)
    if saved is None:
        w, u, gcum, a = prepare(k, v, g, beta, cu_seqlens, store_a=True)
        _, _, hs, vn, chunk_offsets, transitions = state_pass(q, k, w, u, gcum, initial_state, cu_seqlens,
                                                              scale, compute_o=False, store_states=True,
                                                              a=a, v=v, beta=beta, long_docs=long_docs)
        del u
    else:
        w, gcum, a, hs, vn, transitions = saved
        chunk_offsets = None
        if cu_seqlens is not None:
            _, chunk_offsets = prepare_chunk_indices(cu_seqlens, CHUNK, max_num_chunks(T, N, CHUNK))
    # Cotangents may be expanded views (the gradient of a sum has stride 0): the kernels assume dense.
    do = do.contiguous()
    dht = dht.contiguous() if dht is not None else None
    dhs = torch.empty_like(hs)
    dv2 = torch.empty_like(vn)
    if cu_seqlens is not None:
        chunk_indices, _ = prepare_chunk_indices(cu_seqlens, CHUNK, max_num_chunks(T, N, CHUNK))
        chunks, heads = chunk_indices.shape[0], HV
    else:
        chunk_indices = None
        chunks, heads = cdiv(T, CHUNK), B * HV
    fast = heads_fast(chunks)
    seg = plan_segments(q, cu_seqlens, HV, V, long_docs)
    if seg is not None:  # over longer segments than the forward's, for equal-length sequences
        seg, transitions = joined_segments(seg, transitions, q, backward_join(g is not None))
    programs = seg.slots if seg is not None else N  # of the reverse pass: per segment or per sequence
    BV = state_block(q, programs, HV, V)
    local_dv = split_dv_local(g is not None, cdiv(V, BV) * programs * HV, num_sms(q.device),
                              seg is not None and seg.packed)
    # BV, and with it the split of dv', follow the document count, which varies by batch: every
    # kernel a batch may pick is compiled at the first packed call (those of the passes over
    # segments, which follow max_seqlen, when a batch first takes them: once per process)
    compile_all = cu_seqlens is not None and q.is_cuda
    if local_dv or (compile_all and g is not None):
        BVL, warps = local_dv_config(q.element_size(), BK, _pow2(V))
        local_args = (q, k, gcum, do, dv2, cu_seqlens, chunk_indices, scale, T, N, H, HV, K, V)
        local_options = dict(BT=CHUNK, BK=BK, BV=BVL, USE_G=g is not None, IS_VARLEN=cu_seqlens is not None,
                             HEADS_FAST=fast, num_warps=warps)
        if compile_all:
            compile_variants(_local_dv_kernel, local_args, {}, [local_options])
        if local_dv:
            _local_dv_kernel[chunk_grid(chunks, heads, cdiv(V, BVL))](*local_args, **local_options)
    # With segments the reverse pass runs over them as sequences of their own, from the state
    # gradients leaving them that the transition pass and the combine give (delta_rule_segments.py).
    dS_end, offsets, first_slots = dht, cu_seqlens, chunk_offsets
    if seg is not None:
        dS_end = segment_end_grads(q, k, w, gcum, do, dv2, dht, transitions, seg, scale, local_dv)
        offsets, first_slots = seg.bounds, seg.chunk_offsets
    # the gradient entering each sequence (or, with segments, each segment)
    dh0 = torch.empty(programs, HV, K, V, dtype=torch.float32, device=q.device) if initial_state is not None else None
    args = (q, k, w, gcum, do, dS_end, dh0, dhs, dv2, offsets, first_slots, scale, T, H, HV, K, V)
    options = dict(BT=CHUNK, BK=BK, USE_G=g is not None, USE_DHT=dS_end is not None,
                   USE_H0=initial_state is not None, IS_VARLEN=offsets is not None,
                   num_warps=state_grad_warps(q.element_size()), num_stages=1 if q.element_size() > 2 else 2)
    if compile_all:
        # over a packed batch's segments the split is fixed (`split_dv_local`); otherwise it
        # follows the document count
        splits = (local_dv,) if seg is not None else (False, True) if g is not None else (False,)
        compile_variants(_state_grad_kernel, args, options,
                         [{"BV": b, "LOCAL_DV": s} for b in state_block_choices(q, V) for s in splits])
    _state_grad_kernel[(cdiv(V, BV), programs * HV)](*args, **options, BV=BV, LOCAL_DV=local_dv)
    if seg is not None and initial_state is not None:
        dh0 = first_segment_grads(dh0, seg, dht)
    grad_dtype = torch.float32 if HV != H else q.dtype
    dq = torch.empty(B, T, HV, K, dtype=grad_dtype, device=q.device)
    dk = torch.empty(B, T, HV, K, dtype=grad_dtype, device=q.device)
    dv = torch.empty_like(v)
    dbeta = torch.empty(B, T, HV, dtype=torch.float32, device=q.device)
    dg = torch.empty(B, T, HV, dtype=torch.float32, device=q.device) if g is not None else None
    BVC, warps = chunk_grad_config(q.element_size(), BK, _pow2(V))
    _chunk_grad_kernel[chunk_grid(chunks, heads)](
        q, k, v, beta, gcum, a, hs, vn, do, dhs, dv2, dq, dk, dv, dbeta, dg,
        cu_seqlens, chunk_indices, chunk_offsets, scale,
        T, N, H, HV, K, V, BT=CHUNK, BK=BK, BV=BVC,
        USE_G=g is not None, IS_VARLEN=cu_seqlens is not None, HEADS_FAST=fast,
        num_warps=warps, num_stages=chunk_grad_stages(q.element_size(), g is not None, BK),
    )
    if HV != H:
        dq = sum_head_groups(dq, H).to(q.dtype)
        dk = sum_head_groups(dk, H).to(k.dtype)
    dg = dg.to(g.dtype) if g is not None else None
    dh0 = dh0.to(initial_state.dtype) if initial_state is not None else None
    return dq, dk, dv, dg, dbeta.to(beta.dtype), dh0
