"""Segments of long sequences for the delta rule's serial passes.

The chunk-to-chunk passes (delta_rule.py, delta_rule_bwd.py) walk a sequence from its first
chunk to its last; with few long sequences (B = 1, T = 32768, or a long packed document) that
chain is the whole pass's time while most SMs idle. The state entering a chunk is an affine
function of the state entering the one before,
    S1 = T S0 + (k exp(gl - gc))^T u,   T = exp(gl) I - (k exp(gl - gc))^T w   ([K, K]),
so over a segment of chunks S_end = M S_start + E, with M the product of the segment's T and E
the state it leaves when entered with zero. Three steps replace one long chain:
  1. `_segment_transition_kernel`, parallel over (segment, value head, column block): the
     state pass over each segment of a sequence of more than one, on V value columns entered
     with zero (E; not for a sequence's last segment) and K columns entered with the identity
     whose values u are zero (M), in fp32;
  2. `_segment_combine_kernel`, per (sequence, value head, V block), serial over the sequence's
     segments only: S <- M S + E, storing every segment's entry state;
  3. the state pass itself over the segments as sequences of their own, entered with those states.
The reverse pass is affine too: the state gradient entering a chunk is T^T dS1 plus terms of
do, so over a segment dS_start = M^T dS_end + F. The forward keeps M^T for the backward (stored
as such, so that both combines take their product's left operand by rows);
`_segment_transition_grad_kernel` forms F for each segment but a sequence's first (the reverse
pass from a zero end gradient, value columns only), the combine runs from the last segment to
the first, and the reverse pass runs over the segments from their end gradients. For
equal-length sequences of gated heads the backward's segments are runs of the forward's
(`backward_join`, `joined_segments`), their M the product of the parts'.
"""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flame.kernels.delta_rule_chunk import (_chunk_gates, _corrected_values, _pow2, _value_tiles, state_grad_dv,
                                            state_grad_update)
from flame.kernels.utils import (cdiv, chunk_span, default_cu_seqlens, max_num_chunks, next_power_of_2, num_sms,
                                 prepare_chunk_indices, prepare_segments)

CHUNK = 64
SEGMENT_TOKENS = 4096  # tokens of a segment of equal-length sequences: 64 chunks of the serial chain
PACKED_SEGMENT_TOKENS = 2048  # of a packed batch's documents (`use_segments`)
# A packed batch's passes run over segments when its longest document is longer than this.
LONG_DOCUMENT_TOKENS = 4 * PACKED_SEGMENT_TOKENS
# The backward of equal-length sequences joins this many of the forward's segments into one
# (`joined_segments`), for gated and for plain heads (`backward_join`).
BACKWARD_JOIN = 2
PLAIN_BACKWARD_JOIN = 1


@dataclass
class Segments:
    """A batch's sequences cut into segments of `length` tokens (see prepare_segments)."""

    length: int
    packed: bool  # the batch came with cu_seqlens (its document count varies from batch to batch)
    num_seqs: int
    slots: int  # segment slots: an upper bound on the number of segments
    cu_seqlens: torch.Tensor  # the sequences' offsets
    indices: torch.Tensor  # [slots, 2] (sequence, segment within it)
    offsets: torch.Tensor  # [N + 1] first segment slot of each sequence
    bounds: torch.Tensor  # [slots + 1] the segments' offsets, a cu_seqlens of segments
    first: torch.Tensor  # [N] each sequence's first segment slot
    last: torch.Tensor  # [N] and its last
    nonempty: torch.Tensor | None  # [N] whether it has any tokens (None: all have, no packing)
    # [slots + 1] each segment's first chunk slot: the sequences' own chunk slots, since segments
    # are whole chunks (the slots of the stored per-chunk states do not change)
    chunk_offsets: torch.Tensor
    # segments after a sequence's first (those the backward's transition pass walks): exact for
    # equal-length sequences, for packed ones a bound from the token count
    later: int


SEGMENT_MODES = ("auto", "on", "off")


def segment_mode() -> str:
    """FLAME_DELTA_SEGMENTS: auto (default, `use_segments`), on (whenever a sequence can be
    longer than a segment, packed batches included), off."""
    mode = os.environ.get("FLAME_DELTA_SEGMENTS", "auto")
    if mode not in SEGMENT_MODES:
        raise ValueError(f"FLAME_DELTA_SEGMENTS must be one of {SEGMENT_MODES}, got {mode!r}")
    return mode


def segment_tokens(packed: bool) -> int:
    """Tokens per segment: PACKED_SEGMENT_TOKENS for packed batches, else SEGMENT_TOKENS."""
    tokens = PACKED_SEGMENT_TOKENS if packed else SEGMENT_TOKENS
    if tokens % CHUNK:
        raise ValueError(f"segment lengths must be multiples of the chunk size {CHUNK}, got {tokens}")
    return tokens


def long_documents(cu_seqlens: torch.Tensor | None, max_seqlen: int | None) -> bool:
    """Whether a packed batch has a document longer than LONG_DOCUMENT_TOKENS, from max_seqlen,
    the caller's bound on its longest document (the trainer knows it from the host's copy of
    cu_seqlens; the kernels cannot read it without a device sync)."""
    return cu_seqlens is not None and max_seqlen is not None and max_seqlen > LONG_DOCUMENT_TOKENS


def use_segments(num_seqs: int, seq_len: int, packed: bool, HV: int, V: int, sms: int,
                 long_docs: bool = False) -> bool:
    """Whether the serial passes run over segments (FLAME_DELTA_SEGMENTS=auto).

    Equal-length sequences longer than a segment: where the whole-sequence passes would have
    fewer programs of 64 columns of V than SMs, so that one sequence's chain is the pass's time.
    With more programs the passes are bound by their loads, which the transition passes only
    add to. H100, bf16, H = 16, K = V = 128, 1x32768 forward+backward ms, whole sequences /
    segments: plain 3.749 / 3.340, gated 4.715 / 4.463; 8x4096 unchanged (one segment per
    sequence) (results/delta_rule_segments_*_h100.json).

    Packed batches: when one of their documents is long (`long_documents`). Their passes last
    as long as the longest document's chain; over segments of 2048 tokens (with the in-chunk
    dv' term split off for gated heads, `delta_rule_bwd.split_dv_local`) they cost about the
    same whatever the documents (the transition passes walk one segment), which pays only past
    a length. Gated DeltaNet 374M layer (4 heads, K = 128, V = 256) at 2 x 16384 tokens, H100,
    kernel ms of forward+backward, whole documents / segments of 2048
    (results/delta_rule_packed_policy_h100.json, delta_rule_packed_segments_h100.json): longest
    document 16384: gated 2.208 / 1.738, plain 1.589 / 1.336; 11474: gated 1.978 / 1.761;
    7107: gated 1.558 / 1.734, plain 1.182 / 1.339; documents of 4096: gated 1.495 / 1.528;
    of 1024: 1.357 / 1.441; at 8 x 4096 tokens with 16 heads of 128, documents up to 4096:
    3.486 / 4.025. The crossing lies near 9000 tokens; LONG_DOCUMENT_TOKENS is 8192."""
    if seq_len <= segment_tokens(packed):
        return False
    if packed:
        return long_docs
    return num_seqs * HV * cdiv(V, 64) < sms


def segment_slots(q: torch.Tensor, cu_seqlens: torch.Tensor | None, HV: int, V: int,
                  long_docs: bool = False) -> int:
    """Segment slots (an upper bound on the segments) of the serial passes for this batch, or 0
    where they run per sequence; from shapes and `long_documents` only. Heads of K <= 128: the
    combine holds an fp32 [K, K] transition in registers."""
    B, T, _, K = q.shape
    mode = segment_mode()
    packed = cu_seqlens is not None
    tokens = segment_tokens(packed)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if mode == "off" or K > 128 or T <= tokens:
        return 0
    if mode == "auto" and not use_segments(N, T, packed, HV, V, num_sms(q.device), long_docs):
        return 0
    return max_num_chunks(B * T, N, tokens)


def plan_segments(q: torch.Tensor, cu_seqlens: torch.Tensor | None, HV: int, V: int,
                  long_docs: bool = False) -> Segments | None:
    """The segments of this batch for the serial passes, or None where they run per sequence."""
    slots = segment_slots(q, cu_seqlens, HV, V, long_docs)
    if not slots:
        return None
    B, T = q.shape[:2]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    cu = cu_seqlens if cu_seqlens is not None else default_cu_seqlens(B, T, q.device)
    packed = cu_seqlens is not None
    return _plan(cu, B * T, N, segment_tokens(packed), packed, slots)


def _plan(cu, total, N, tokens, packed, slots=None) -> Segments:
    slots = slots or max_num_chunks(total, N, tokens)
    indices, offsets, bounds, first, last, nonempty = prepare_segments(cu, tokens, slots)
    _, chunk_offsets = prepare_chunk_indices(bounds, CHUNK, max_num_chunks(total, slots, CHUNK))
    later = total // tokens if packed else N * (cdiv(total // N, tokens) - 1)
    return Segments(tokens, packed, N, slots, cu, indices, offsets, bounds, first, last,
                    nonempty if packed else None, chunk_offsets, later)


def backward_join(gated: bool) -> int:
    """Forward segments per segment of the backward's serial passes (equal-length sequences).

    H100, 1x32768, H = 16, K = V = 128, forward+backward ms, join 2 / 1 (the backward's
    transition pass at one pipeline stage, two programs per SM, where its programs outnumber
    the SMs: `transition_grad_config`) (results/delta_rule_join_stages_h100.json): plain
    2.903-2.916 / 2.857-2.887 (its reverse pass 0.404 either way, the transition pass 0.300 ->
    0.262, the reverse combine over twice the steps +0.03); gated 3.726-3.730 / 3.744-3.758 (its
    reverse pass 0.51 -> 0.62)."""
    return BACKWARD_JOIN if gated else PLAIN_BACKWARD_JOIN


def joined_segments(seg: Segments, mt: torch.Tensor, q: torch.Tensor, join: int):
    """The segments of the backward's serial passes and their transposed transitions M^T: for
    equal-length sequences, runs of `join` (`backward_join`) consecutive segments of the forward
    as one, with M the product of the parts' transitions (the later on the left, so that M^T is
    the product of the parts' M^T with the earlier on the left); (None, None) where each
    sequence is then one segment (the reverse pass runs over whole sequences). Packed batches
    keep the forward's segments.

    Why: the backward's transition pass walks every segment but a sequence's first, the reverse
    pass every segment, so fewer, longer segments shorten the one and lengthen the other's
    chain; the forward has no such trade (its transition pass walks all but a sequence's last
    segment whatever their length), and its segments of 4096 measured best. H100, 1x32768,
    H = 16, K = V = 128, forward+backward ms with the backward over runs of 1 / 2 / 4 segments
    of 4096 (results/delta_rule_backward_join_4bf7994_h100.json): plain 2.958 / 2.933 / 3.420,
    gated 3.940 / 3.844 / 4.717; 8x4096 (one segment per sequence) unchanged."""
    if seg.packed or join <= 1:
        return seg, mt
    B, T = q.shape[:2]
    per_seq = cdiv(T, seg.length)
    joined = cdiv(per_seq, join)
    if joined == 1:
        return None, None
    big = _plan(seg.cu_seqlens, B * T, seg.num_seqs, join * seg.length, packed=False)
    N, HV, K = seg.num_seqs, mt.shape[1], mt.shape[2]
    parts = mt[: N * per_seq].view(N, per_seq, HV, K, K)
    if joined * join > per_seq:  # the last run is short: identities stand for its missing parts
        eye = torch.eye(K, dtype=mt.dtype, device=mt.device).expand(N, joined * join - per_seq, HV, K, K)
        parts = torch.cat([parts, eye], dim=1)
    parts = parts.view(N, joined, join, HV, K, K)
    mt_big = mt.new_empty(big.slots, HV, K, K)
    product = parts[:, :, 0]
    for p in range(1, join):  # the last product straight into mt_big (no copy kernel)
        out = mt_big[: N * joined].view(N, joined, HV, K, K) if p == join - 1 else None
        product = torch.matmul(product, parts[:, :, p], out=out)
    return big, mt_big


def segment_column_block(element_size: int) -> int:
    """Columns (of V + K) per program of the transition passes: the V block of the serial
    passes for 16-bit heads of K <= 128, half of it for fp32 tiles (shared memory)."""
    return 32 if element_size > 2 else 64


# Registers per thread that let three 4-warp programs of the forward transition pass share an SM
# (65536 / 384, to a multiple of 8); 16-bit heads of K <= 128 take 166-178 without a cap (ptxas,
# sm_90) and 74 KB of shared memory, so two or three fit.
THREE_PER_SM_REGISTERS = 168


def transition_config(element_size: int, V: int, K: int, segment_heads: int,
                      sms: int) -> tuple[int, int, int, int | None]:
    """(columns per program, warps, pipeline stages, register cap or None) of the forward's
    transition pass over segment_heads (segment after a sequence's first, value head) pairs:
    about segment_heads x cdiv(V + K, columns) working programs (a sequence's last segment
    forms M only), and the M columns of each sequence's first segment, which the count leaves
    out. Its registers are capped where three programs per SM then run them in fewer waves
    than two. H100, ms of the pass, uncapped / capped: 2 x 16384 packed tokens, 4 heads,
    K = 128, V = 256 (336 programs) plain 0.146 / 0.089, gated 0.150 / 0.098; 1x32768, H = 16,
    K = V = 128 (480 programs: two waves either way) plain 0.283 / 0.295, gated 0.294 / 0.324
    (results/delta_rule_transition_registers_h100.json; the packed shape again at b0487b8:
    0.147 / 0.089 and 0.149 / 0.097, kernel sums of forward+backward 1.286 / 1.231 and
    1.624 / 1.569)."""
    BC = segment_column_block(element_size)
    if element_size > 2:
        return BC, 4, 1, None
    programs = segment_heads * cdiv(V + K, BC)
    fewer_waves = cdiv(programs, 3 * sms) < cdiv(programs, 2 * sms)
    return BC, 4, 2, THREE_PER_SM_REGISTERS if fewer_waves else None


def transition_grad_config(element_size: int, V: int, segment_heads: int, sms: int) -> tuple[int, int, int]:
    """(value columns per program, warps, pipeline stages) of the backward's transition pass over
    segment_heads (segment after a sequence's first, value head) pairs. Where its working
    programs outnumber the SMs, one stage: its shared memory then lets two programs share an SM
    (16-bit heads of K = 128: 82 KB against 131 KB at two stages). H100, ms of the pass at two /
    one stage: 1x32768, H = 16, K = V = 128, segments of 4096, 224 programs (the backward over
    the forward's segments) plain 0.301 / 0.262, gated 0.420 / 0.345-0.350, and 96 programs
    (runs of two) plain 0.300 / 0.489 (results/delta_rule_transition_launches_0bda27f_h100.json,
    ..._stages_0654676_h100.json, delta_rule_join_stages_h100.json); 2 x 16384 packed tokens,
    4 heads, K = 128, V = 256, ~208 programs: plain 0.144 / 0.127, gated 0.152 / 0.131
    (delta_rule_later_segments_53255f9_h100.json)."""
    BC = segment_column_block(element_size)
    return BC, 4, 1 if element_size > 2 or cdiv(V, BC) * segment_heads > sms else 2


COMBINE_BLOCK = 64  # V columns per program of the combine
COMBINE_WARPS = 8  # its fp32 [K, K] transition: 64 registers per thread at K = 128
# One stage: a pipelined loop would hold several fp32 [K, K] transitions in shared memory
# (256 KB at K = 128 with the default stages, past the H100's 227 KB).


@triton.jit
def _segment_span(s, indices, cu_seqlens, N, SEG):
    """(segment index within its sequence, first token, end token, end of sequence) of slot s;
    spare slots get an empty sequence."""
    i, bos, eos = chunk_span(s, 0, indices, cu_seqlens, 0, N, 1, True)
    start = bos + i * SEG
    return i, start, tl.minimum(start + SEG, eos), eos


@triton.jit(do_not_specialize=["N", "SEG"])
def _segment_transition_kernel(
    k, w, u, a, v, beta, gcum, e, m, mt, cu_seqlens, indices, N, SEG,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, USE_G: tl.constexpr, FROM_V: tl.constexpr,
):
    # Columns c < V: the value columns, entered with zero; V <= c < V + K: column c - V of the
    # identity, whose values are zero (u, or v, is read for c < V only); those of M are stored
    # in m and as rows of M^T in mt. FROM_V: v' from A, v
    # and beta as in the main serial pass (delta_rule.values_in_pass), not from w and u.
    ic = tl.program_id(0)
    s = tl.program_id(1)
    hv = tl.program_id(2)
    h = hv // (HV // H)
    i, start, end, eos = _segment_span(s, indices, cu_seqlens, N, SEG)
    # E is needed for every segment but a sequence's last, M (the forward's combine, and the
    # backward's, which runs the other way) for every segment of a sequence of more than one:
    # spare slots, one-segment sequences and the value columns of a last segment return at once.
    if (end <= start) | ((end >= eos) & ((i == 0) | ((ic + 1) * BC <= V))):
        return
    r = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cc = ic * BC + tl.arange(0, BC)
    S = (ck[:, None] == cc[None, :] - V).to(tl.float32)
    for t0 in range(start, end, BT):
        rows = t0 + r
        rmask = rows < end
        kmask = rmask[:, None] & (ck[None, :] < K)
        vmask = rmask[:, None] & (cc[None, :] < V)
        b_k = tl.load(k + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
        dt = b_k.dtype
        if USE_G:
            b_gc = tl.load(gcum + rows * HV + hv, mask=rmask, other=0.0)
        else:
            b_gc = None
        x, y, z = _value_tiles(w, u, a, v, beta, rows, rmask, hv, ck, cc, kmask, vmask, HV, K, V, BT, FROM_V)
        v_new = _corrected_values(x, y, z, b_k, S, b_gc, USE_G, FROM_V)
        if USE_G:
            last = tl.load(gcum + (tl.minimum(t0 + BT, end) - 1) * HV + hv)
            b_vd = (v_new * tl.exp(last - b_gc)[:, None]).to(dt)
            S = S * tl.exp(last)
        else:
            b_vd = v_new.to(dt)
        S = S + tl.dot(tl.trans(b_k), b_vd)
    rows = (s.to(tl.int64) * HV + hv) * K + ck[:, None]
    tl.store(e + rows * V + cc[None, :], S, mask=(ck[:, None] < K) & (cc[None, :] < V))
    mmask = (ck[:, None] < K) & (cc[None, :] >= V) & (cc[None, :] < V + K)
    tl.store(m + rows * K + cc[None, :] - V, S, mask=mmask)
    tl.store(mt + ((s.to(tl.int64) * HV + hv) * K + cc[:, None] - V) * K + ck[None, :], tl.trans(S),
             mask=tl.trans(mmask))


@triton.jit(do_not_specialize=["N", "SEG"])
def _segment_transition_grad_kernel(
    q, k, w, gcum, do, dv2, f, cu_seqlens, indices, N, SEG, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, USE_G: tl.constexpr, LOCAL_DV: tl.constexpr,
):
    # The reverse pass over one segment from a zero end gradient: F, the state gradient entering
    # the segment from its own output gradients. (Its M^T comes from the forward.)
    # LOCAL_DV: dv2 holds the in-chunk term of dv' (`_local_dv_kernel`), read here and left
    # for the reverse pass.
    ic = tl.program_id(0)
    s = tl.program_id(1)
    hv = tl.program_id(2)
    h = hv // (HV // H)
    i, start, end, _ = _segment_span(s, indices, cu_seqlens, N, SEG)
    if (i == 0) | (end <= start):  # a sequence's first segment (or a spare slot) passes nothing on
        return
    r = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cc = ic * BC + tl.arange(0, BC)
    dS = tl.zeros([BK, BC], dtype=tl.float32)
    causal_t = r[:, None] <= r[None, :]
    for c in range(tl.cdiv(end - start, BT) - 1, -1, -1):
        t0 = start + c * BT
        rows = t0 + r
        rmask = rows < end
        kmask = rmask[:, None] & (ck[None, :] < K)
        vmask = rmask[:, None] & (cc[None, :] < V)
        b_q = tl.load(q + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
        b_k = tl.load(k + rows[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
        b_w = tl.load(w + rows[:, None] * (HV * K) + hv * K + ck[None, :], mask=kmask, other=0.0)
        b_do = tl.load(do + rows[:, None] * (HV * V) + hv * V + cc[None, :], mask=vmask, other=0.0)
        gc, last = _chunk_gates(gcum, rows, rmask, start, end, c, hv, HV, BT, USE_G)
        dv2_tile = dv2 + rows[:, None] * (HV * V) + hv * V + cc[None, :]
        b_dv, b_dos = state_grad_dv(b_q, b_k, b_do, dv2_tile, vmask, dS, gc, last, scale, causal_t, USE_G, LOCAL_DV)
        dS = state_grad_update(dS, b_q, b_w, b_dos, b_dv, last, USE_G)
    tl.store(f + ((s.to(tl.int64) * HV + hv) * K + ck[:, None]) * V + cc[None, :], dS,
             mask=(ck[:, None] < K) & (cc[None, :] < V))


@triton.jit(do_not_specialize=["N"])
def _segment_combine_kernel(
    e, m, h_in, h_seg, offsets, N,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_IN: tl.constexpr, REVERSE: tl.constexpr,
):
    # Forward: S enters a sequence's first segment (h_in or zero) and each next one as
    # M S + E of the segment before. REVERSE: the state gradient leaves the last segment (h_in,
    # the final state's gradient, or zero) and each earlier one as M^T dS + F of the segment
    # after (e holds F, m holds M^T then: a product's left operand read by rows, whose fp32
    # tiles the tensor cores take without a transpose).
    iv = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // HV
    hv = nh % HV
    first = tl.load(offsets + n)
    count = tl.load(offsets + n + 1) - first
    ck = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)
    smask = (ck[:, None] < K) & (cv[None, :] < V)
    if USE_IN:
        S = tl.load(h_in + (nh * K + ck[:, None]) * V + cv[None, :], mask=smask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    mmask = (ck[:, None] < K) & (ck[None, :] < K)
    for t in range(0, count - 1):
        if REVERSE:
            s = first + count - 1 - t
        else:
            s = first + t
        seg = (s.to(tl.int64) * HV + hv) * K
        tl.store(h_seg + (seg + ck[:, None]) * V + cv[None, :], S, mask=smask)
        M = tl.load(m + (seg + ck[:, None]) * K + ck[None, :], mask=mmask, other=0.0)
        E = tl.load(e + (seg + ck[:, None]) * V + cv[None, :], mask=smask, other=0.0)
        S = tl.dot(M, S) + E
    if REVERSE:
        s = first
    else:
        s = first + count - 1
    tl.store(h_seg + ((s.to(tl.int64) * HV + hv) * K + ck[:, None]) * V + cv[None, :], S,
             mask=smask & (ck[:, None] * 0 + count > 0))


def _combine(e, m, h_in, seg: Segments, reverse):
    slots, HV, K, V = e.shape
    h_seg = torch.empty(slots, HV, K, V, dtype=torch.float32, device=e.device)
    BV = min(COMBINE_BLOCK, max(16, next_power_of_2(V)))
    _segment_combine_kernel[(cdiv(V, BV), seg.num_seqs * HV)](
        e, m, h_in, h_seg, seg.offsets, seg.num_seqs, HV, K, V, BK=_pow2(K), BV=BV,
        USE_IN=h_in is not None, REVERSE=reverse, num_warps=COMBINE_WARPS, num_stages=1,
    )
    return h_seg


def segment_entry_states(k, w, u, a, v, beta, gcum, initial_state, seg: Segments):
    """(the state entering every segment, each segment's transition transposed, M^T): fp32
    [slots, HV, K, V] and [slots, HV, K, K] (M^T unwritten for spare slots and one-segment
    sequences). v' from w and u, or without u from A, v and beta."""
    H, K = k.shape[2], k.shape[3]
    HV, V = v.shape[2], v.shape[3]
    e = torch.empty(seg.slots, HV, K, V, dtype=torch.float32, device=k.device)
    m = torch.empty(seg.slots, HV, K, K, dtype=torch.float32, device=k.device)
    mt = torch.empty_like(m)
    BC, warps, stages, max_registers = transition_config(k.element_size(), V, K, seg.later * HV, num_sms(k.device))
    _segment_transition_kernel[(cdiv(V + K, BC), seg.slots, HV)](
        k, w, u, a, v, beta, gcum, e, m, mt, seg.cu_seqlens, seg.indices, seg.num_seqs, seg.length,
        H, HV, K, V, BT=CHUNK, BK=_pow2(K), BC=BC, USE_G=gcum is not None, FROM_V=u is None,
        num_warps=warps, num_stages=stages, maxnreg=max_registers,
    )
    return _combine(e, m, initial_state, seg, reverse=False), mt


def segment_end_grads(q, k, w, gcum, do, dv2, dht, mt, seg: Segments, scale, local_dv) -> torch.Tensor:
    """The state gradient leaving every segment, fp32 [slots, HV, K, V] (spare slots
    unwritten), from the segments' transposed transitions mt of the forward."""
    H, K = q.shape[2], q.shape[3]
    HV, V = do.shape[2], do.shape[3]
    f = torch.empty(seg.slots, HV, K, V, dtype=torch.float32, device=q.device)
    BC, warps, stages = transition_grad_config(q.element_size(), V, seg.later * HV, num_sms(q.device))
    args = (q, k, w, gcum, do, dv2, f, seg.cu_seqlens, seg.indices, seg.num_seqs, seg.length, scale, H, HV, K, V)
    options = dict(BT=CHUNK, BK=_pow2(K), BC=BC, USE_G=gcum is not None,
                   num_warps=warps, num_stages=stages)
    _segment_transition_grad_kernel[(cdiv(V, BC), seg.slots, HV)](*args, **options, LOCAL_DV=local_dv)
    return _combine(f, mt, dht, seg, reverse=True)


def last_segment_states(ht_seg: torch.Tensor, seg: Segments, initial_state) -> torch.Tensor:
    """Each sequence's final state: the state its last segment leaves, or for an empty
    sequence its initial state (zero without one). [N, HV, K, V] fp32."""
    return _per_sequence(ht_seg, seg, seg.last, initial_state)


def first_segment_grads(dh0_seg: torch.Tensor, seg: Segments, dht) -> torch.Tensor:
    """Each sequence's initial-state gradient: the gradient entering its first segment, or for
    an empty sequence that of its final state."""
    return _per_sequence(dh0_seg, seg, seg.first, dht)


def _per_sequence(per_segment, seg: Segments, slot, empty_value):
    # Few small ops: each costs host time on every layer's call.
    picked = per_segment.index_select(0, slot)
    if seg.nonempty is None:
        return picked
    other = empty_value.float() if empty_value is not None else torch.zeros_like(picked)
    return torch.where(seg.nonempty[:, None, None, None], picked, other)
