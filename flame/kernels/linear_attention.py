"""Chunked gated linear attention: `chunk_simple_gla` (one log decay per head, g [B, T, H]:
RetNet, Mamba2-SSD, lightning attention) and `chunk_gla` (one per key dim, g [B, T, H, K]).

Both run on one pair of `torch.library` custom ops (forward, backward) so that
`torch.compile(fullgraph=True)` traces them; inside, the Triton kernels of
`linear_attention_triton.py` or the torch reference of `linear_attention_ref.py` run,
as `dispatch.use_triton` decides. A layer's saved activations are its inputs, for GLA the
intra-chunk score matrix [B, T, H, 64] (half the size of q at K = 128; recomputing it costs
more than any other GLA kernel), and for GLA by default the chunk states and the gate's
cumulative sums that the forward computed anyway (`backward_mode`). A scalar gate's forward
that keeps nothing runs as one kernel serial over the chunks of each segment (at most 4096
tokens of a sequence; later segments enter with the state a first pass carries) where segments
and heads fill the GPU (`fused_forward`), else as cumsum, state pass and chunk-parallel output.
"""

import os

import torch

from flame.kernels import linear_attention_triton as kern
from flame.kernels.dispatch import use_triton
from flame.kernels.linear_attention_ref import linear_attention_reference
from flame.kernels.utils import (
    MIN_DOT_TILE,
    cdiv,
    check_cu_seqlens,
    check_head_dim,
    check_initial_state,
    chunk_grid,
    compile_variants,
    default_cu_seqlens,
    heads_fast,
    max_num_chunks,
    needs_backward,
    next_power_of_2,
    num_sms,
    prepare_chunk_indices,
    require_floating,
    require_rank,
    require_shape,
    sum_head_groups,
)

STATE_BLOCK = 64  # K and V tile of the state passes (halved when they would leave SMs idle)
STATE_PROGRAMS = 512  # state-pass programs below which the tile is halved
STATE_STAGES = 3  # chunk tiles in flight ahead of the serial state update, 64x64 tiles
STATE_STAGES_SMALL = 3  # the same for 32x32 tiles (few programs, latency-bound)
CHUNK_BLOCK = 128  # widest V (K) tile of the scalar-gate whole-chunk kernels
CHUNK_MIN_BLOCK = MIN_DOT_TILE  # narrowest tile of those kernels (why: utils.MIN_DOT_TILE)
CHUNK_BLOCK_K = 64  # reduction tile of the scalar-gate whole-chunk kernels
CHUNK_WARPS = 4
FUSED_SCALAR_BACKWARD = True  # scalar gate, 16-bit, K <= CHUNK_BLOCK: dq, dk, dv, dg in one kernel
GROUPED_BACKWARD = True  # scalar gate, q/k heads shared by value heads: the two grouped kernels
GROUPED_MIN_GROUP = 2  # value heads per q/k head from which they run (1: also unshared heads)
CHUNK_STAGES = 2
GLA_BLOCK = 64  # K and V tiles of the per-key-dim (GLA) kernels
GLA_INTRA_WARPS = 4  # the GLA kernels on BC-row blocks (scores, intra-chunk gradients)
NUM_WARPS = 4


def gla_intra_config() -> dict:
    """Launch choices of the two GLA kernels on BC-row blocks (scores, intra-chunk gradients).

    scores_unroll, grad_unroll: partner rows of the diagonal block per step of their serial
    loop (1, 2, 4, 8 or 16); several let the rows' loads issue ahead of their math.
    scores_split: the diagonal block's scores kept in their own [BC, BC] tile.
    grad_scratch: the diagonal block of dA read by row and column from a per-program scratch
    in global memory instead of being picked out of the dA tiles by cross-warp reductions.
    grad_split: the diagonal block's dq, dk terms summed in their own tiles, in the layout of
    the elementwise math, instead of being converted to the dot layout row by row, with one
    exp per element for both (half the exps).
    scores_stages, grad_stages: the launches' num_stages (None: Triton's default).
    scores_bk, grad_bk: the K tile (None: GLA_BLOCK, or K's next power of two if smaller).
    max_spread: chunks whose gate cumsum spreads over at most this many nats (in any key dim)
    take all their pairs through reference rows: A, and the intra-chunk dq and dk, as one product
    each (chunk_gla_scores_chunk_kernel, and inside chunk_gla_grad_kernel); chunks of stronger
    decay go by 16-row blocks with exact in-block pairs (-1: every chunk).
    chunk_scores_warps, chunk_grad_warps, chunk_grad_stages, output_warps: the launches of
    chunk_gla_scores_chunk_kernel, chunk_gla_grad_kernel and chunk_gla_output_kernel.
    output_forms_a: the forward's output kernel forms A of the chunks of small spread (no
    separate scores pass over them); else chunk_gla_scores_chunk_kernel does.
    grad_dots_16bit: the gradient kernel's two whole-chunk products (dA with the decayed k, and
    dA^T with the decayed q) take the inputs' dtype as operands rather than fp32 (tf32 on
    tensor cores), and the gate gradient's intra-chunk part is formed from those same rounded
    operands. H100, 8x4096: forward+backward 3.38-3.41 -> 3.22 ms; bf16 relative error norms against
    float64 in the gpu tests: dq, dk 2.5e-3 -> 3.3e-3, dg 2.1e-3 -> 3.1e-3 (the 16-row-block
    path: 3.3e-3; with dg from q, k and the finished dq, dk instead, 7.7e-3).
    Benchmarks replace this function to time alternatives in one process.

    The defaults were the fastest of 13 sets timed on an H100 (bf16, 8x4096, H=16, K=V=128;
    benchmarks/results/linear_attention_profile_h100.json): scores 1.28 -> 0.87 ms, intra-chunk
    gradients 4.74 -> 2.36 ms, chunk_gla forward+backward 9.37 -> 6.50 ms against all switches
    off. More unrolling (8, 16) or a K tile of 32 measured slower.
    """
    return dict(warps=GLA_INTRA_WARPS, scores_unroll=4, scores_split=True, scores_stages=None, scores_bk=None,
                grad_unroll=2, grad_scratch=True, grad_split=True, grad_stages=None, grad_bk=None,
                max_spread=30, chunk_scores_warps=CHUNK_WARPS, chunk_grad_warps=8,
                chunk_grad_stages=CHUNK_STAGES, output_warps=CHUNK_WARPS, output_forms_a=True,
                grad_dots_16bit=True)


def grouped_backward_config() -> dict:
    """Launch choices of the grouped scalar-gate backward (q/k heads shared by value heads).

    heads: value heads per program of the dv/dg kernel (they share q k^T; a divisor of the
    group, else 1); dvg_warps, dvg_stages: its launch. dqk_bk: the K tile of the group-summed
    dq/dk kernel; dqk_warps, dqk_stages: its launch (stages pipeline the loop over heads).
    Benchmarks replace this function to time alternatives in one process.

    The defaults were the fastest measured on an H100 (bf16, 8x4096, one q/k head for 32 value
    heads, K = 128, V = 64; benchmarks/grouped_backward.py, results/grouped_backward_*_h100.json):
    dv/dg 0.63 ms (1 head per program: 0.75; 8 warps: 1.11; 3 stages: 1.12), dq/dk 0.30 ms (K tile
    64 at 4 warps: 0.40), against 1.55 ms for the per-value-head kernel and the sum afterwards.
    """
    return dict(heads=8, dvg_warps=4, dvg_stages=2, dqk_bk=128, dqk_warps=8, dqk_stages=3)


def scalar_backward_config() -> dict:
    """Launch choices of the fused scalar-gate backward (`chunk_backward_scalar_kernel`: one
    program per chunk and value head, walking V in tiles; q/k heads not shared).

    block_v: the V tile (at least CHUNK_MIN_BLOCK); warps, stages: the launch (stages pipeline
    the V loop); maxnreg: a cap on registers per thread (None: the compiler's choice).
    Benchmarks replace this function to time alternatives in one process.

    H100, bf16, H = 16, K = V = 128, backward kernel ms at 8x4096 / 1x32768 (one call,
    results/simple_gla_backward_looped_9e03399_h100.json): 64 x 8 warps x 3 stages 0.882 /
    0.877; 2 stages 0.951 / 0.956; with 128 registers (two programs per SM, spilling) 1.87-1.91;
    4 warps 1.99; all of V in one program (the kernel before, 4 warps) 1.193 / 1.196. At
    8 heads of K = 128, V = 256 (RetNet 371M's layer, 4x4096): 0.310 against 0.417 for the
    separate dv and dqk kernels that served V > 128 before. q and k held through the loop
    rather than read again after it: 0.874 against 0.887 (8x4096), 0.295 against 0.313 (V =
    256) (simple_gla_backward_tiles_21a4537_h100.json).
    """
    return dict(block_v=64, warps=8, stages=3, maxnreg=None)


def _stages(num_stages):
    return {} if num_stages is None else {"num_stages": num_stages}


# ---------------------------------------------------------------------------------------------
# Triton launches. Tensors are flattened to [T_total, H, D] (contiguous), cu_seqlens given.


class _Chunks:
    """Chunk bookkeeping for one call, built on the device without reading it back."""

    def __init__(self, cu_seqlens: torch.Tensor, total_len: int, packed: bool = True):
        self.cu_seqlens = cu_seqlens
        self.packed = packed  # the caller's cu_seqlens: the number of sequences varies by batch
        self.num_seqs = cu_seqlens.numel() - 1
        self.slots = max_num_chunks(total_len, self.num_seqs, kern.CHUNK_SIZE)
        self.indices, self.offsets = prepare_chunk_indices(cu_seqlens, kern.CHUNK_SIZE, self.slots)


def _cumsum(g, scalar_gate, H, K, chunks, flags=None):
    """The gate's chunk-local cumulative sums b, fp32 ([T, H, 1] for a scalar gate). flags
    ([slots * H] int32, per-key-dim gate): also whether each chunk's spread of b is at most
    gla_intra_config's max_spread."""
    b = torch.empty(g.shape[0], H, 1 if scalar_gate else K, dtype=torch.float32, device=g.device)
    grid = (chunks.slots, H, 1 if scalar_gate or flags is not None else cdiv(K, STATE_BLOCK))
    kern.chunk_cumsum_kernel[grid](
        g, b, b if flags is None else flags, chunks.cu_seqlens, chunks.indices, chunks.num_seqs,
        H=H, K=K, SCALAR_GATE=scalar_gate, BK=STATE_BLOCK, FLAGS=flags is not None,
        MAX_SPREAD=float(gla_intra_config()["max_spread"]), num_warps=NUM_WARPS,
    )
    return b


def _state_block(num_seqs, H, K, V, passes):
    # 64x64 tiles when the sequences and heads fill the GPU; else 32x32 tiles, four times
    # the programs, so few long sequences still run on most SMs.
    tiles = cdiv(K, STATE_BLOCK) * cdiv(V, STATE_BLOCK)
    return STATE_BLOCK if num_seqs * H * tiles * passes >= STATE_PROGRAMS else STATE_BLOCK // 2


def _states(q, k, v, do, b, scale, h0, dht, forward, backward, output_final_state, chunks):
    """Chunk-entry states h and/or chunk-exit state gradients dh, [slots, H, K, V] in q's dtype,
    H the value heads (q and k may have fewer, each shared by a group of value heads).

    Returns (h, dh, ht, dh0); ht fp32 if output_final_state, dh0 fp32 if h0 is given.
    """
    HQ, K = q.shape[1:]
    H, V = v.shape[1:]
    N = chunks.num_seqs
    shape = (chunks.slots, H, K, V)
    h = torch.empty(shape, dtype=q.dtype, device=q.device) if forward else None
    dh = torch.empty(shape, dtype=q.dtype, device=q.device) if backward else None
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if forward and output_final_state else None
    dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if backward and h0 is not None else None
    passes = int(forward) + int(backward)
    blk = _state_block(N, H, K, V, passes)
    grid = (cdiv(K, blk) * cdiv(V, blk), H, N * passes)
    dummy = h if h is not None else dh
    args = (k, v, q, do if do is not None else v, b,
            h0 if h0 is not None else dummy, dht if dht is not None else dummy,
            dummy if h is None else h, dummy if dh is None else dh,
            ht if ht is not None else dummy, dh0 if dh0 is not None else dummy,
            chunks.cu_seqlens, chunks.offsets, N, scale)
    options = dict(SCALAR_GATE=b.shape[-1] == 1, H=H, HQ=HQ, K=K, V=V, FORWARD=forward, BACKWARD=backward,
                   HAS_H0=forward and h0 is not None, HAS_DHT=backward and dht is not None,
                   STORE_HT=ht is not None, STORE_DH0=dh0 is not None, num_warps=NUM_WARPS)

    def tiles(blk):
        return dict(BK=blk, BV=blk, num_stages=STATE_STAGES if blk == STATE_BLOCK else STATE_STAGES_SMALL)

    if chunks.packed:  # blk follows the number of documents, which varies by batch
        choices = (STATE_BLOCK, STATE_BLOCK // 2)
        compile_variants(kern.chunk_state_kernel, args, options, [tiles(x) for x in choices])
    kern.chunk_state_kernel[grid](*args, **options, **tiles(blk))
    return h, dh, ht, dh0


FUSED_SEGMENT_TOKENS = 4096  # longest stretch of a sequence one program of the fused scalar-gate forward walks
FUSED_FORWARD_BLOCK = 64  # its V tile: the fp32 state [K, BV] lives in registers
FUSED_FORWARD_WARPS = 4


def fused_forward(num_seqs: int, H: int, V: int, tokens: int, sms: int) -> bool:
    """Whether the scalar-gate forward runs fused (`chunk_fused_forward_scalar_kernel`: one
    program per segment of at most FUSED_SEGMENT_TOKENS tokens of a sequence, value head and
    V tile, serial over the segment's chunks) rather than as cumsum, state pass and
    chunk-parallel output. It reads q, k, v once and writes only o; segments after a
    sequence's first take their entry state from a first pass over k and v. It needs at least
    one program per SM. H100, bf16, H = 16, K = V = 128, forward kernels fused against chunked:
    8x4096 (256 programs) 0.28 ms against 0.55; 1x32768 (8 segments, 256 programs) 0.41 against
    ~0.67 (results/simple_gla_segmented_forward_fe3ef0d_h100.json)."""
    segments = max(num_seqs, cdiv(tokens, FUSED_SEGMENT_TOKENS))
    return segments * H * cdiv(V, _fused_forward_block(V)) >= sms


def _fused_forward_block(V):
    return min(_scalar_block(V), FUSED_FORWARD_BLOCK)


_WARMED_FORWARDS = set()


def _fused_forward(q, k, v, g, scale, h0, output_final_state, chunks, keep_states=False):
    """Returns (o, ht, None, h, b); with keep_states h (the chunk-entry states, written by the
    forward kernel) and b (the gate's chunk-local cumsums) for the backward, else None."""
    T, HQ, K = q.shape
    H, V = v.shape[1:]
    N = chunks.num_seqs
    seg_len = FUSED_SEGMENT_TOKENS
    slots = max_num_chunks(T, N, seg_len)
    seg_idx, seg_offsets = prepare_chunk_indices(chunks.cu_seqlens, seg_len, slots)
    o = torch.empty(T, H, V, dtype=q.dtype, device=q.device)
    ht = None
    if output_final_state:  # an empty sequence has no segment and passes its initial state on
        ht = h0.float().clone() if h0 is not None else q.new_zeros(N, H, K, V, dtype=torch.float32)
    bv = _fused_forward_block(V)
    grid = (cdiv(V, bv), H, slots)
    tiles = dict(H=H, HQ=HQ, K=K, V=V, BK=_scalar_block(K), BV=bv)
    carry = T > seg_len  # some sequence may span several segments
    states = decay = o
    if carry:
        states, decay = _segment_exit_states(k, v, g, chunks, seg_idx, slots, seg_len, bv)
    h = torch.empty(chunks.slots, H, K, V, dtype=q.dtype, device=q.device) if keep_states else None
    kern.chunk_fused_forward_scalar_kernel[grid](
        q, k, v, g, h0 if h0 is not None else o, states, decay, o, ht if ht is not None else o,
        h if keep_states else o, chunks.cu_seqlens, seg_idx, seg_offsets, chunks.offsets, N, seg_len, scale,
        **tiles, HAS_H0=h0 is not None, STORE_HT=ht is not None, CARRY=carry, STORE_H=keep_states,
        num_warps=FUSED_FORWARD_WARPS, num_stages=CHUNK_STAGES,
    )
    b = _cumsum(g, True, H, K, chunks) if keep_states else None
    return o, ht, None, h, b


def _segment_exit_states(k, v, g, chunks, seg_idx, slots, seg_len, bv):
    """Scalar gate, sequences cut into segments of seg_len tokens (slots of seg_idx): each
    non-final segment's exit state from a zero entry, [slots, H, K, V], and its summed log
    decay, [slots, H] (fp32), which carry a sequence's state into its later segments."""
    HQ, K = k.shape[1:]
    H, V = v.shape[1:]
    states = torch.empty(slots, H, K, V, dtype=torch.float32, device=k.device)
    decay = torch.empty(slots, H, dtype=torch.float32, device=k.device)
    kern.chunk_segment_state_scalar_kernel[(cdiv(V, bv), H, slots)](
        k, v, g, states, decay, chunks.cu_seqlens, seg_idx, chunks.num_seqs, seg_len,
        H=H, HQ=HQ, K=K, V=V, BK=_scalar_block(K), BV=bv, num_warps=FUSED_FORWARD_WARPS, num_stages=CHUNK_STAGES,
    )
    return states, decay


def _triton_forward(q, k, v, g, scale, h0, output_final_state, chunks, keep_states=True):
    """Returns (o, ht, A, h, b): A the GLA score matrix, kept for the backward (None for a scalar
    gate); h the chunk-entry states [slots, H, K, V] and b the gate's chunk-local cumulative sums,
    which the backward takes instead of recomputing them when they are kept (else None). A
    scalar gate may take the fused forward, which writes h only when they are kept."""
    T, HQ, K = q.shape
    H, V = v.shape[1:]
    scalar_gate = g.dim() == 2
    # 16-bit on GPUs: fp32 tiles, pipelined, would pass the shared memory of one SM
    if scalar_gate and K <= CHUNK_BLOCK and (q.element_size() == 2 or not q.is_cuda):
        fused = fused_forward(chunks.num_seqs, H, V, T, num_sms(q.device))
        key = (q.device, q.dtype, HQ, K, H, V, h0 is not None, output_final_state, keep_states)
        if chunks.packed and q.is_cuda and key not in _WARMED_FORWARDS:
            # The choice follows the number of packed documents, which varies by batch: the
            # first packed call runs the other forward too (result unused), so that a later
            # batch finds its kernels compiled rather than stalling on a compile.
            _WARMED_FORWARDS.add(key)
            other = _triton_forward if fused else _fused_forward
            other(q, k, v, g, scale, h0, output_final_state, chunks, keep_states)
        if fused:
            return _fused_forward(q, k, v, g, scale, h0, output_final_state, chunks, keep_states)
    # GLA: chunks of small gate spread (flag 1) get A from the output kernel, the others from
    # the 16-row-block kernel
    cfg = gla_intra_config()
    form_a = not scalar_gate and cfg["output_forms_a"]
    flags = torch.empty(chunks.slots * H, dtype=torch.int32, device=q.device) if form_a else None
    b = _cumsum(g, scalar_gate, H, K, chunks, flags)
    h, _, ht, _ = _states(q, k, v, None, b, scale, h0, None, True, False, output_final_state, chunks)
    o = torch.empty(T, H, V, dtype=q.dtype, device=q.device)
    if scalar_gate:
        bv = _scalar_block(V)
        grid = (chunks.slots * cdiv(V, bv), H)
        kern.chunk_output_scalar_kernel[grid](
            q, k, v, b, h, o, chunks.cu_seqlens, chunks.indices, chunks.num_seqs, scale,
            H=H, HQ=HQ, K=K, V=V, BK=CHUNK_BLOCK_K, BV=bv, num_warps=CHUNK_WARPS, num_stages=CHUNK_STAGES,
        )
        return o, ht, None, h, b
    if form_a:
        a = torch.empty(T, H, kern.CHUNK_SIZE, dtype=q.dtype, device=q.device)
        _gla_block_scores(q, k, b, a, flags, scale, chunks)
    else:
        a = _gla_scores(q, k, b, scale, chunks)
    bv = min(next_power_of_2(V), CHUNK_BLOCK)
    programs = chunks.slots * cdiv(V, bv)
    kern.chunk_gla_output_kernel[chunk_grid(programs, H)](
        q, k, v, b, a, h, o, b if flags is None else flags, chunks.cu_seqlens, chunks.indices, chunks.num_seqs,
        scale, H=H, K=K, V=V, BK=_gla_block(K), BV=bv, FORM_A=form_a, HEADS_FAST=heads_fast(programs),
        num_warps=cfg["output_warps"], num_stages=CHUNK_STAGES,
    )
    return o, ht, a, h, b


def _dots_16bit(q):
    """Whether the whole-chunk intra-chunk products of the GLA gradient kernel take q's dtype as
    operands (gla_intra_config grad_dots_16bit). fp32 inputs take the same path with fp32
    operands, so that the interpreter tests cover it; fp16 never does, as its decayed keys
    (up to e^{max_spread} times k) would overflow its range."""
    return bool(gla_intra_config()["grad_dots_16bit"]) and q.dtype != torch.float16


def _scalar_block(dim):
    """Tile of a head dim in the scalar-gate whole-chunk kernels."""
    return min(max(next_power_of_2(dim), CHUNK_MIN_BLOCK), CHUNK_BLOCK)


def _gla_block(dim):
    return min(next_power_of_2(dim), GLA_BLOCK)


def _intra_block(K, block):
    return _gla_block(K) if block is None else min(next_power_of_2(K), block)


def _unroll(rows):
    if rows < 1 or kern.SUB_CHUNK_SIZE % rows:
        raise ValueError(f"partner rows per step must divide {kern.SUB_CHUNK_SIZE}, got {rows}")
    return rows


def _gla_scores(q, k, b, scale, chunks):
    """Intra-chunk scores A [T, H, 64] of the per-key-dim gate, scale included, in q's dtype:
    chunks of small gate spread as one product each, the others by 16-row blocks."""
    T, H, K = q.shape
    a = torch.empty(T, H, kern.CHUNK_SIZE, dtype=q.dtype, device=q.device)
    cfg = gla_intra_config()
    flags = torch.empty(chunks.slots * H, dtype=torch.int32, device=q.device)
    kern.chunk_gla_scores_chunk_kernel[chunk_grid(chunks.slots, H)](
        q, k, b, a, flags, chunks.cu_seqlens, chunks.indices, chunks.num_seqs, scale,
        H=H, K=K, BK=_gla_block(K), MAX_SPREAD=float(cfg["max_spread"]), HEADS_FAST=heads_fast(chunks.slots),
        num_warps=cfg["chunk_scores_warps"], num_stages=1,
    )
    _gla_block_scores(q, k, b, a, flags, scale, chunks)
    return a


def _gla_block_scores(q, k, b, a, flags, scale, chunks):
    """A of the chunks whose flag is 0, by 16-row blocks with exact in-block pairs."""
    H, K = q.shape[1:]
    cfg = gla_intra_config()
    kern.chunk_gla_scores_kernel[chunk_grid(chunks.slots, H)](
        q, k, b, a, flags, chunks.cu_seqlens, chunks.indices, chunks.num_seqs, scale,
        H=H, K=K, BK=_intra_block(K, cfg["scores_bk"]), UNROLL=_unroll(cfg["scores_unroll"]),
        SPLIT_DIAG=bool(cfg["scores_split"]), HEADS_FAST=heads_fast(chunks.slots),
        num_warps=cfg["warps"], **_stages(cfg["scores_stages"]),
    )


def _triton_backward(q, k, v, g, scale, h0, do, dht, a, chunks, h=None, b=None):
    """a: the forward's GLA score matrix, [T, H, 64] (unused for a scalar gate); h, b: the
    forward's chunk states and gate cumsums if it kept them (else recomputed here). With q and k
    shared by groups of value heads (scalar gate), dq and dk are summed over each group inside
    the grouped kernels, or else formed per value head and summed afterwards."""
    T, HQ, K = q.shape
    H, V = v.shape[1:]
    scalar_gate = g.dim() == 2
    if b is None:
        b = _cumsum(g, scalar_gate, H, K, chunks)
    if h is None:
        h, dh, _, dh0 = _states(q, k, v, do, b, scale, h0, dht, True, True, False, chunks)
    else:
        _, dh, _, dh0 = _states(q, k, v, do, b, scale, h0, dht, False, True, False, chunks)
    dv = torch.empty_like(v)
    dg = torch.empty_like(g)
    # fp32 tiles of the fused kernels would pass the shared memory of one SM.
    whole_chunk = scalar_gate and K <= CHUNK_BLOCK and (q.element_size() == 2 or not q.is_cuda)
    if whole_chunk and V <= CHUNK_BLOCK and GROUPED_BACKWARD and H // HQ >= GROUPED_MIN_GROUP:
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        _grouped_scalar_backward(q, k, v, b, do, h, dh, dq, dk, dv, dg, scale, chunks)
        return dq, dk, dv, dg, dh0
    dq, dk = (torch.empty(T, H, K, dtype=q.dtype, device=q.device) for _ in range(2))  # per value head
    if whole_chunk and FUSED_SCALAR_BACKWARD:
        cfg = scalar_backward_config()
        bv = max(min(next_power_of_2(V), cfg["block_v"]), CHUNK_MIN_BLOCK)
        kern.chunk_backward_scalar_kernel[chunk_grid(chunks.slots, H)](
            q, k, v, b, do, h, dh, dq, dk, dv, dg, chunks.cu_seqlens, chunks.indices, chunks.num_seqs, scale,
            H=H, HQ=HQ, K=K, V=V, BK=_scalar_block(K), BV=bv, HEADS_FAST=heads_fast(chunks.slots),
            num_warps=cfg["warps"], num_stages=cfg["stages"],
            **({} if cfg["maxnreg"] is None else {"maxnreg": cfg["maxnreg"]}),
        )
        return sum_head_groups(dq, HQ), sum_head_groups(dk, HQ), dv, dg, dh0
    if scalar_gate:
        bv = _scalar_block(V)
        kern.chunk_backward_dv_scalar_kernel[(chunks.slots * cdiv(V, bv), H)](
            q, k, b, do, dh, dv, chunks.cu_seqlens, chunks.indices, chunks.num_seqs, scale,
            H=H, HQ=HQ, K=K, V=V, BK=CHUNK_BLOCK_K, BV=bv, num_warps=CHUNK_WARPS, num_stages=CHUNK_STAGES,
        )
        bk = _scalar_block(K)
        nk = cdiv(K, bk)
        db = torch.empty(nk, T, H, dtype=torch.float32, device=q.device)
        dbl = torch.empty(nk, chunks.slots, H, dtype=torch.float32, device=q.device)
        kern.chunk_backward_dqk_scalar_kernel[(chunks.slots * nk, H)](
            q, k, v, b, do, h, dh, dq, dk, db, dbl,
            chunks.cu_seqlens, chunks.indices, chunks.num_seqs, T, scale,
            H=H, HQ=HQ, K=K, V=V, BK=bk, BV=CHUNK_BLOCK_K, num_warps=CHUNK_WARPS, num_stages=CHUNK_STAGES,
        )
        kern.chunk_scalar_gate_grad_kernel[(chunks.slots, H)](
            db, dbl, dg, chunks.cu_seqlens, chunks.indices, chunks.num_seqs, T, chunks.slots,
            H=H, NK=nk, num_warps=NUM_WARPS,
        )
        return sum_head_groups(dq, HQ), sum_head_groups(dk, HQ), dv, dg, dh0
    if a is None:
        a = _gla_scores(q, k, b, scale, chunks)
    bv = min(next_power_of_2(V), CHUNK_BLOCK)
    programs = chunks.slots * cdiv(V, bv)
    cfg = gla_intra_config()
    flags = torch.empty(chunks.slots * H, dtype=torch.int32, device=q.device)  # written by the dv kernel
    kern.chunk_gla_dv_kernel[chunk_grid(programs, H)](
        k, b, a, do, dh, dv, flags, chunks.cu_seqlens, chunks.indices, chunks.num_seqs,
        H=H, K=K, V=V, BK=_gla_block(K), BV=bv, MAX_SPREAD=float(cfg["max_spread"]), HEADS_FAST=heads_fast(programs),
        num_warps=CHUNK_WARPS, num_stages=CHUNK_STAGES,
    )
    dq_intra = torch.empty(T, H, K, dtype=torch.float32, device=q.device)
    dk_intra = torch.empty(T, H, K, dtype=torch.float32, device=q.device)
    programs = chunks.slots  # a program walks its chunk's 16-row blocks
    # One [BC, BC] fp32 slot per program (~8 MB at 8 x 4096 tokens x 16 heads).
    bc = kern.SUB_CHUNK_SIZE
    scratch = (torch.empty(programs * H * bc * bc, dtype=torch.float32, device=q.device)
               if cfg["grad_scratch"] else dq_intra)
    kern.chunk_gla_intra_grad_kernel[chunk_grid(programs, H)](
        q, k, v, b, do, dq_intra, dk_intra, scratch, flags, chunks.cu_seqlens, chunks.indices, chunks.num_seqs,
        scale, H=H, K=K, V=V, BK=_intra_block(K, cfg["grad_bk"]), BV=_gla_block(V),
        UNROLL=_unroll(cfg["grad_unroll"]), SCRATCH=bool(cfg["grad_scratch"]), SPLIT_DIAG=bool(cfg["grad_split"]),
        HEADS_FAST=heads_fast(programs), num_warps=cfg["warps"], **_stages(cfg["grad_stages"]),
    )
    bk = _gla_block(K)
    programs = chunks.slots * cdiv(K, bk)
    kern.chunk_gla_grad_kernel[chunk_grid(programs, H)](
        q, k, v, b, do, h, dh, dq_intra, dk_intra, dq, dk, dg, flags,
        chunks.cu_seqlens, chunks.indices, chunks.num_seqs, scale,
        H=H, K=K, V=V, BK=bk, BV=_gla_block(V), DOTS_16BIT=_dots_16bit(q),
        HEADS_FAST=heads_fast(programs), num_warps=cfg["chunk_grad_warps"], num_stages=cfg["chunk_grad_stages"],
    )
    return dq, dk, dv, dg, dh0


def _grouped_scalar_backward(q, k, v, b, do, h, dh, dq, dk, dv, dg, scale, chunks):
    """Scalar gate, q/k with HQ heads shared by groups of H value heads, K, V <= CHUNK_BLOCK:
    dv, dg per value head, dq, dk summed over each group inside the kernel."""
    HQ, K = q.shape[1:]
    H, V = v.shape[1:]
    cfg = grouped_backward_config()
    heads = cfg["heads"] if (H // HQ) % cfg["heads"] == 0 else 1
    kern.chunk_backward_dv_dg_grouped_kernel[(chunks.slots, H // heads)](
        q, k, v, b, do, h, dh, dv, dg, chunks.cu_seqlens, chunks.indices, chunks.num_seqs, scale,
        H=H, HQ=HQ, K=K, V=V, BK=_scalar_block(K), BV=_scalar_block(V), HEADS=heads,
        num_warps=cfg["dvg_warps"], **_stages(cfg["dvg_stages"]),
    )
    bk = min(_scalar_block(K), cfg["dqk_bk"])
    kern.chunk_backward_dqk_grouped_kernel[(chunks.slots * cdiv(K, bk), HQ)](
        q, k, v, b, do, h, dh, dq, dk, chunks.cu_seqlens, chunks.indices, chunks.num_seqs, scale,
        H=H, HQ=HQ, K=K, V=V, BK=bk, BV=_scalar_block(V),
        num_warps=cfg["dqk_warps"], **_stages(cfg["dqk_stages"]),
    )


# ---------------------------------------------------------------------------------------------
# Custom ops. Shapes here are the public ones ([B, T, H, D]); inputs are validated and
# contiguous. Absent optional outputs are returned as empty tensors.


def _flat(x):
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _chunks_for(q, cu_seqlens):
    B, T = q.shape[:2]
    cu = cu_seqlens if cu_seqlens is not None else default_cu_seqlens(B, T, q.device)
    return _Chunks(cu, B * T, packed=cu_seqlens is not None)


@torch.library.custom_op("flame::gated_linear_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    output_final_state: bool,
    triton_backend: bool,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (o, final state or empty, GLA score matrix [B, T, H, 64] for the backward or empty,
    chunk states [slots, H, K, V] and gate cumsums [B * T, H, 1 or K] if save, else empty)."""
    def empty(dtype=q.dtype):  # a new one per output: outputs must not alias each other
        return q.new_empty(0, dtype=dtype)

    if not triton_backend:
        q, k = _expand_heads(q, k, v.shape[2])
        o, ht = linear_attention_reference(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
        # contiguous, as the fake outputs are
        return (o.contiguous(), ht.contiguous() if ht is not None else empty(torch.float32), empty(), empty(),
                empty(torch.float32))
    B, T = q.shape[:2]
    chunks = _chunks_for(q, cu_seqlens)
    o, ht, a, h, b = _triton_forward(_flat(q), _flat(k), _flat(v), _flat(g), scale, initial_state,
                                     output_final_state, chunks, keep_states=save)
    a = empty() if a is None else a.view(B, T, *a.shape[1:])
    if not save:
        h, b = empty(), empty(torch.float32)
    return o.view(B, T, *o.shape[1:]), ht if ht is not None else empty(torch.float32), a, h, b


@_fwd_op.register_fake
def _(q, k, v, g, scale, initial_state, cu_seqlens, output_final_state, triton_backend, save):
    B, T, _, K = q.shape
    H, V = v.shape[2:]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty(B, T, H, V)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else q.new_empty(0, dtype=torch.float32)
    a = q.new_empty(B, T, H, kern.CHUNK_SIZE) if triton_backend and g.dim() == 4 else q.new_empty(0)
    if not (triton_backend and save):
        return o, ht, a, q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    h = q.new_empty(max_num_chunks(B * T, N, kern.CHUNK_SIZE), H, K, V)
    b = q.new_empty(B * T, H, 1 if g.dim() == 3 else K, dtype=torch.float32)
    return o, ht, a, h, b


@torch.library.custom_op("flame::gated_linear_attention_bwd", mutates_args=())
def _bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    a: torch.Tensor,
    h: torch.Tensor,
    b: torch.Tensor,
    triton_backend: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not triton_backend:
        return _reference_backward(q, k, v, g, scale, initial_state, cu_seqlens, do, dht)
    B, T = q.shape[:2]
    chunks = _chunks_for(q, cu_seqlens)
    dq, dk, dv, dg, dh0 = _triton_backward(
        _flat(q), _flat(k), _flat(v), _flat(g), scale, initial_state, _flat(do), dht,
        _flat(a) if a.numel() else None, chunks,
        h if h.numel() else None, b if b.numel() else None,
    )
    if dh0 is None:
        dh0 = q.new_empty(0, dtype=torch.float32)
    else:
        dh0 = dh0.to(initial_state.dtype)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dg.view(g.shape), dh0


def _expand_heads(q, k, heads):
    """q, k with each of their heads repeated for the group of value heads that shares it."""
    if q.shape[2] == heads:
        return q, k
    groups = heads // q.shape[2]
    return q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)


def _reference_backward(q, k, v, g, scale, initial_state, cu_seqlens, do, dht):
    # Inside a custom op autograd is off below the dispatcher; torch.func does not need it.
    def forward(q, k, v, g, *h0):
        q, k = _expand_heads(q, k, v.shape[2])  # the expansion's vjp sums each group's gradients
        return linear_attention_reference(q, k, v, g, scale, h0[0] if h0 else None, True, cu_seqlens)

    primals = (q, k, v, g) + ((initial_state,) if initial_state is not None else ())
    (_, ht), vjp = torch.func.vjp(forward, *primals)
    grads = vjp((do, torch.zeros_like(ht) if dht is None else dht.to(ht.dtype)))
    dh0 = grads[4] if initial_state is not None else q.new_empty(0, dtype=torch.float32)
    # laid out like the inputs (contiguous), as the fake outputs are
    return tuple(x.contiguous() for x in (*grads[:4], dh0))


@_bwd_op.register_fake
def _(q, k, v, g, scale, initial_state, cu_seqlens, do, dht, a, h, b, triton_backend):
    dh0 = torch.empty_like(initial_state) if initial_state is not None else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), dh0


def _shape_only(t: torch.Tensor) -> torch.Tensor:
    """A stand-in with t's shape, dtype and device and one element of storage."""
    return t.new_zeros(()).expand(t.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, g, scale, initial_state, cu_seqlens, output_final_state, triton_backend, _save = inputs
    if output[4].numel():
        # The forward kept the gate's cumulative sums: the Triton backward needs only g's shape
        # and dtype, and not keeping g itself frees an fp32 [B, T, H, K] tensor per GLA layer.
        g = _shape_only(g)
    ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens, *output[2:])
    # No zero-filled gradients for the kept tensors (A, the chunk states, the gate cumsums) or an
    # unused final state: fills of their whole size on every backward otherwise.
    ctx.set_materialize_grads(False)
    ctx.scale = scale
    ctx.triton_backend = triton_backend
    ctx.output_final_state = output_final_state


def _backward(ctx, do, dht, _da, _dh, _db):
    q, k, v, g, initial_state, cu_seqlens, a, h, b = ctx.saved_tensors
    if not ctx.output_final_state:
        dht = None
    if do is None:  # only the final state reaches the loss
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dh0 = _bwd_op(
        q, k, v, g, ctx.scale, initial_state, cu_seqlens, do.contiguous(),
        None if dht is None else dht.contiguous(), a, h, b, ctx.triton_backend,
    )
    return dq, dk, dv, dg, None, dh0 if initial_state is not None else None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions.


BACKWARD_MODES = ("auto", "recompute", "saved")


def backward_mode() -> str:
    """What the backward gets from the forward: FLAME_GLA_BACKWARD=auto (default), saved or
    recompute.

    saved: the forward keeps the chunk-entry states and the gate's cumulative sums it computed
    for its own output, so the backward runs only the reverse state pass and no cumsum. They
    cost per layer and chunk of 64 tokens H * K * V * 2 bytes (bf16; twice v's bytes at K = 128)
    plus 4 bytes per token, head and gate column (one column for a scalar gate).
    recompute: the backward reruns the gate cumsum and the forward state pass.
    auto: saved for chunk_gla, recompute for chunk_simple_gla. H100, bf16, 340M recipes at
    4096 x 8 x 16 micro-batches, one call: GLA 159,709 -> 163,700 tokens/s with the states kept
    (+5.4 GiB); Mamba2 and RetNet trained no faster with them. A scalar gate's fused forward
    writes h when saved: chunk_simple_gla's kernels at 8 x 4096, 16 heads of 128, 1.55 -> 1.48 ms
    per forward+backward, at 1 x 32768 1.91 -> 1.75 (benchmarks/notes_linear_attention.md)."""
    mode = os.environ.get("FLAME_GLA_BACKWARD", "auto")
    if mode not in BACKWARD_MODES:
        raise ValueError(f"FLAME_GLA_BACKWARD must be one of {BACKWARD_MODES}, got {mode!r}")
    return mode


def _validate(name, q, k, v, g, scale, initial_state, cu_seqlens, scalar_gate):
    require_rank(q, "q", 4, "[B, T, H, K]")
    B, T, H, K = q.shape
    require_rank(k, "k", 4, "[B, T, H, K]")
    require_shape(k, "k", (B, T, H, K), "[B, T, H, K] like q")
    require_rank(v, "v", 4, "[B, T, H, V]")
    if scalar_gate and tuple(v.shape[:2]) == (B, T) and v.shape[2] % H == 0:
        H = v.shape[2]  # grouped: each q/k head shared by v.shape[2] // q.shape[2] value heads
    elif tuple(v.shape[:3]) != (B, T, H):
        grouped = " or a multiple of H value heads" if scalar_gate else ""
        raise ValueError(f"v must have shape [B, T, H, V] with B, T, H = {(B, T, H)} like q{grouped}, "
                         f"got {tuple(v.shape)}")
    if scalar_gate:
        require_rank(g, "g", 3, "[B, T, HV]")
        require_shape(g, "g", (B, T, H), "[B, T, HV] (one decay per value head)")
    else:
        require_rank(g, "g", 4, "[B, T, H, K]")
        require_shape(g, "g", (B, T, H, K), "[B, T, H, K]")
    for arg, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        require_floating(x, arg)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_head_dim(K, "q/k")
    check_head_dim(v.shape[-1], "v")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {type(scale).__name__}")
    check_cu_seqlens(cu_seqlens, B, B * T)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check_initial_state(initial_state, N, H, K, v.shape[-1])
    if initial_state is not None:
        require_floating(initial_state, "initial_state")


def _chunk_linear_attention(name, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, scalar_gate):
    _validate(name, q, k, v, g, scale, initial_state, cu_seqlens, scalar_gate)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    triton_backend = use_triton(q, k, v, g, initial_state, cu_seqlens)
    # keep the states for the backward only when there will be one
    mode = backward_mode()
    save = ((mode == "saved" or (mode == "auto" and not scalar_gate))
            and needs_backward(q, k, v, g, initial_state))
    o, ht = _fwd_op(q, k, v, g, scale, initial_state, cu_seqlens, bool(output_final_state), triton_backend, save)[:2]
    return o, (ht if output_final_state else None)


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Linear attention with one log decay per head and token, g [B, T, HV] (None: no decay).

    q, k [B, T, H, K], v [B, T, HV, V] with HV a multiple of H (each q/k head shared by HV / H
    value heads, as Mamba2's B and C are by all its heads); returns (o [B, T, HV, V], final
    state fp32 [N, HV, K, V] or None). With cu_seqlens (B = 1) each packed sequence starts from
    its own state.
    """
    if g is None and isinstance(v, torch.Tensor) and v.dim() == 4:
        g = torch.zeros(v.shape[:3], dtype=torch.float32, device=v.device)
    return _chunk_linear_attention(
        "chunk_simple_gla", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, True
    )


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Gated linear attention with one log decay per key dimension, g [B, T, H, K].

    Same arguments and returns as `chunk_simple_gla`.
    """
    return _chunk_linear_attention(
        "chunk_gla", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, False
    )
