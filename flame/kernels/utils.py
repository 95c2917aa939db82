"""Input validation and variable-length helpers shared by the chunked kernel families.

Every bad input is a ValueError naming the argument. The varlen helpers turn `cu_seqlens`
into per-chunk indices with tensor ops on the same device, so no host synchronisation is
needed: grids are sized by an upper bound on the number of chunks, and programs past the
real count see a sequence index equal to the number of sequences and return early.

Kernel arguments that count documents (N, n_docs, slots) are marked `do_not_specialize`:
Triton would otherwise compile a new variant the first time such a count is 1 or a multiple
of 16, a stall of seconds at a random step of training. For the same reason, a block size
chosen from the number of documents (the serial state passes narrow their tiles when few
sequences must fill the GPU) has all its candidates compiled at the first packed call
(`compile_variants`).
"""

import functools
import weakref

import torch
import triton
import triton.language as tl


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers (triton.cdiv goes through Triton's constexpr-function
    wrapper, several microseconds per call on the host; grids are sized on every launch)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n for host integers (0 for 0, as triton.next_power_of_2; see cdiv)."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


_COMPILED_VARIANTS: set = set()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def compile_variants(kernel, args: tuple, options: dict, variants: list[dict]) -> None:
    """Compile `kernel` for each option set in `variants` (on top of the fixed `options`:
    constexprs and launch options) with the arguments of the launch that follows, so that a
    launch with any of them finds a compiled kernel. Used where the choice (a block size and
    its num_stages) depends on the number of packed documents, which changes from batch to
    batch: otherwise the first batch that picks another option stalls training (and, with
    several ranks, every rank) for a compile of a few seconds. Once per process for each
    kernel, argument dtypes and options; on every later call only a set lookup (this sits on
    the launch path). GPU only: the interpreter compiles nothing."""
    first = args[0]
    if not first.is_cuda or not variants:
        return
    key = (kernel, first.device.index, tuple(getattr(a, "dtype", None) for a in args),
           tuple(options.items()), tuple(tuple(v.items()) for v in variants))
    if key in _COMPILED_VARIANTS:
        return
    for variant in variants:
        kernel.warmup(*args, **options, **variant, grid=(1,))
    _COMPILED_VARIANTS.add(key)


# Tags of the custom ops that read their inputs' rows at any row stride (a channel slice of a wider
# tensor, read in place). torch.compile otherwise passes custom ops inputs with exactly the
# strides they had eagerly, and on GPUs it pads the rows of some buffers (a matmul output of
# 4384 channels gets rows of 4416): every slice of such a buffer was copied before the op.
# With a fixed stride order it passes the padded slice as it is.
ROW_STRIDED_OP_TAGS = (torch.Tag.needs_fixed_stride_order,)

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
CU_SEQLENS_DTYPES = (torch.int32, torch.int64)


def require_rank(x: torch.Tensor, name: str, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(x.shape)}")


def require_shape(x: torch.Tensor, name: str, shape: tuple, layout: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(x.shape)}")


def require_floating(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_head_dim(dim: int, name: str) -> None:
    if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"{name} has head dim {dim}; supported head dims are {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
        )


def check_heads(num_heads: int, name: str, base_heads: int) -> None:
    """Grouped heads: `name` may have a multiple of the query/key heads."""
    if num_heads % base_heads != 0:
        raise ValueError(
            f"{name} has {num_heads} heads, which is not a multiple of the {base_heads} heads of q/k"
        )


def check_cu_seqlens(
    cu_seqlens: torch.Tensor | None,
    batch_size: int,
    total_len: int,
    check_values: bool | None = None,
) -> None:
    """Checks `cu_seqlens` (offsets of packed sequences in the flattened batch).

    Shape and dtype are always checked. Values (starts at 0, non-decreasing, ends at the
    packed length) need a read of the tensor, so by default they are checked only for CPU
    tensors, where that read costs no device synchronisation, and not while torch.compile
    traces (the values are not known then).
    """
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries [0, ..., total_len], got shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype not in CU_SEQLENS_DTYPES:
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if batch_size != 1:
        raise ValueError(
            f"with cu_seqlens the batch size must be 1 (flatten [B, T] to [1, B*T]), got B={batch_size}"
        )
    if check_values is None:
        check_values = (
            cu_seqlens.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not _is_fake(cu_seqlens)
        )
    if not check_values:
        return
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values[:-1], values[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {values}")
    if values[-1] != total_len:
        raise ValueError(f"cu_seqlens must end at the packed length {total_len}, got {values[-1]}")


def check_max_seqlen(max_seqlen) -> None:
    """max_seqlen, a bound on the longest packed sequence: a positive int (symbolic under
    torch.compile) or None."""
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt))
                                   or max_seqlen < 1):
        raise ValueError(f"max_seqlen must be a positive int (a bound on the longest sequence) or None, "
                         f"got {max_seqlen!r}")


def _is_fake(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor) or x.device.type == "meta"


def check_initial_state(
    initial_state: torch.Tensor | None, num_seqs: int, num_heads: int, k_dim: int, v_dim: int
) -> None:
    if initial_state is None:
        return
    require_rank(initial_state, "initial_state", 4, "[N, H, K, V]")
    require_shape(initial_state, "initial_state", (num_seqs, num_heads, k_dim, v_dim), "[N, H, K, V]")


_DEFAULT_CU_SEQLENS: dict[tuple, torch.Tensor] = {}


def default_cu_seqlens(batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Offsets that treat a [B, T] batch as B packed sequences of length T. One tensor per
    shape and device, kept (callers only read it), so that the chunk indices built from it are
    found in `prepare_chunk_indices`' cache: building them costs a dozen small ops of host
    time per call, as much as a whole forward's kernels at 8 x 4096 tokens."""
    key = (batch_size, seq_len, torch.device(device))
    cu = _DEFAULT_CU_SEQLENS.get(key)
    if cu is None:
        with torch.inference_mode(False):  # a version counter even when first made for inference
            cu = torch.arange(0, (batch_size + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
        if len(_DEFAULT_CU_SEQLENS) >= _CHUNK_INDEX_CACHE_SIZE:
            _DEFAULT_CU_SEQLENS.pop(next(iter(_DEFAULT_CU_SEQLENS)))
        _DEFAULT_CU_SEQLENS[key] = cu
    return cu


def max_num_chunks(total_len: int, num_seqs: int, chunk_size: int) -> int:
    """Upper bound on sum_i ceil(len_i / chunk_size) that needs no look at the lengths."""
    return (total_len + chunk_size - 1) // chunk_size + num_seqs


# The layers of a model all receive the same cu_seqlens tensor, in forward and in backward:
# its chunk indices are built once and reused while that tensor lives and is not modified.
# Keys hold a weak reference, so a freed tensor never matches a new one at the same address.
_CHUNK_INDEX_CACHE: dict[tuple, tuple] = {}
_CHUNK_INDEX_CACHE_SIZE = 8


def prepare_chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int, num_chunk_slots: int):
    """Per-chunk (sequence, chunk-in-sequence) pairs and per-sequence first chunk slots.

    Returns `chunk_indices` int32 [num_chunk_slots, 2] and `chunk_offsets` int32 [N + 1]
    (chunk_offsets[n] is the slot of sequence n's first chunk). Slots past the real number
    of chunks get sequence index N. All on cu_seqlens' device; nothing is read back.
    """
    return _cached(cu_seqlens, ("chunks", chunk_size, num_chunk_slots), _chunk_indices)


def prepare_segments(cu_seqlens: torch.Tensor, segment_size: int, num_segment_slots: int):
    """Segments of at most `segment_size` tokens of each sequence (every one but a sequence's
    last a multiple of the chunk size when segment_size is): `(indices, offsets)` as
    `prepare_chunk_indices` gives for spans of segment_size; `bounds` int32
    [num_segment_slots + 1], the segments' token offsets in the flattened batch as a cu_seqlens
    of its own (spare slots empty, at the end); `first`, `last` int64 [N], each sequence's first
    and last segment slot (clamped into range for an empty sequence) and `nonempty` bool [N].
    On the device, cached like the chunk indices."""
    return _cached(cu_seqlens, ("segments", segment_size, num_segment_slots), _segments)


def _segments(cu_seqlens: torch.Tensor, segment_size: int, num_segment_slots: int):
    indices, offsets = _chunk_indices(cu_seqlens, segment_size, num_segment_slots)
    cu = cu_seqlens.to(torch.int64)
    seq, part = indices[:, 0].to(torch.int64), indices[:, 1].to(torch.int64)
    num_seqs = cu.numel() - 1
    start = cu[torch.clamp(seq, max=num_seqs - 1)] + part * segment_size
    start = torch.where(seq < num_seqs, start, cu[-1])
    bounds = torch.cat([start, cu[-1:]]).to(torch.int32).contiguous()
    first = offsets[:-1].to(torch.int64).clamp(0, num_segment_slots - 1)
    last = (offsets[1:].to(torch.int64) - 1).clamp(0, num_segment_slots - 1)
    return indices, offsets, bounds, first, last, offsets[1:] > offsets[:-1]


def _cached(cu_seqlens: torch.Tensor, what: tuple, build):
    """build(cu_seqlens, *what[1:]), reused while that cu_seqlens tensor lives unmodified."""
    try:
        key = (id(cu_seqlens), cu_seqlens._version) + what
    except RuntimeError:  # inference tensors keep no version counter: no reuse
        return build(cu_seqlens, *what[1:])
    hit = _CHUNK_INDEX_CACHE.get(key)
    if hit is not None and hit[0]() is cu_seqlens:
        return hit[1]
    result = build(cu_seqlens, *what[1:])
    if not _is_fake(cu_seqlens):
        if len(_CHUNK_INDEX_CACHE) >= _CHUNK_INDEX_CACHE_SIZE:
            _CHUNK_INDEX_CACHE.pop(next(iter(_CHUNK_INDEX_CACHE)))
        _CHUNK_INDEX_CACHE[key] = (weakref.ref(cu_seqlens), result)
    return result


def _chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int, num_chunk_slots: int):
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    chunks = (lengths + chunk_size - 1) // chunk_size
    chunk_offsets = torch.cat([chunks.new_zeros(1), torch.cumsum(chunks, 0)])
    slots = torch.arange(num_chunk_slots, device=cu.device, dtype=torch.int64)
    seq = torch.searchsorted(chunk_offsets[1:], slots, right=True)
    num_seqs = lengths.numel()
    first = chunk_offsets[torch.clamp(seq, max=num_seqs - 1)]
    chunk = torch.where(seq < num_seqs, slots - first, torch.zeros_like(slots))
    chunk_indices = torch.stack([seq, chunk], dim=1).to(torch.int32).contiguous()
    return chunk_indices, chunk_offsets.to(torch.int32).contiguous()


@triton.jit
def chunk_span(j, b, chunk_indices, cu_seqlens, T, N, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Inside a chunk-parallel kernel: program j's chunk (index i within its sequence) and the
    token range [bos, eos) of that sequence in the flattened batch. Packed (varlen): from
    `prepare_chunk_indices`; spare programs past the real chunks get an empty range (eos = bos)
    so that they load and write nothing. Otherwise sequence b, chunk j, T tokens."""
    if IS_VARLEN:
        n = tl.load(chunk_indices + 2 * j)
        i = tl.load(chunk_indices + 2 * j + 1)
        valid = n < N
        n = tl.minimum(n, N - 1)
        bos = tl.load(cu_seqlens + n).to(tl.int32)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int32)
        eos = tl.where(valid, eos, bos)
    else:
        i = j
        bos = b * T
        eos = bos + T
    return i, bos, eos


# Chunk-parallel kernels read their (chunk, head) from the outer axes of their grid. With HEADS_FAST the head (and
# batch row) is the fastest-varying axis, so that programs launched together read the same
# tokens' rows: a token's heads are adjacent in [B, T, H, D], a chunk of one head is 64 rows of
# 2 * D bytes, H * D * 2 apart. Grid axes y and z take at most GRID_YZ_LIMIT programs.
# H100, bf16, 16 heads of 128, forward+backward ms, chunks fastest -> heads fastest (same call):
# simple GLA 8x4096 1.585 -> 1.553 (its backward kernel 0.878 -> 0.842); GLA 5.772 -> 5.655;
# gated delta rule 1x32768 3.858 -> 3.744, plain 3.001 -> 2.970; at 8x4096 the delta rules
# 2.899 -> 2.930 gated, 2.239 -> 2.229 plain (benchmarks/results/*_grid_order_*_h100.json).
HEADS_FAST = True
GRID_YZ_LIMIT = 65535


def heads_fast(chunks: int) -> bool:
    """Whether a chunk-parallel grid of `chunks` chunks puts the heads first (HEADS_FAST, and the
    chunks fit a y axis)."""
    return HEADS_FAST and chunks <= GRID_YZ_LIMIT


def chunk_grid(chunks: int, heads: int, middle: int | None = None) -> tuple:
    """The grid of a chunk-parallel kernel over `chunks` x `heads` (x `middle`, an inner axis
    such as V blocks, kept in the middle), in the order `chunk_head_ids` reads."""
    outer = (heads, chunks) if heads_fast(chunks) else (chunks, heads)
    return outer if middle is None else (outer[0], middle, outer[1])


@triton.jit
def chunk_head_ids(HEADS_FAST: tl.constexpr, MIDDLE: tl.constexpr):
    """(chunk, head) grid indices of a program of a `chunk_grid` grid; MIDDLE: the grid has a
    middle axis (tl.program_id(1))."""
    if MIDDLE:
        last = tl.program_id(2)
    else:
        last = tl.program_id(1)
    if HEADS_FAST:
        chunk, head = last, tl.program_id(0)
    else:
        chunk, head = tl.program_id(0), last
    return chunk, head


# Narrowest head-dim tile of the chunk kernels' products. With 16- or 32-wide tiles in a tl.dot,
# Triton 3.6 built wrong kernels on Hopper (H100, H200) that are exact in the interpreter:
# chunk_simple_gla's output at K = 64, V = 32 and an illegal memory access at K = V = 32; the
# plain delta rule's dk and dbeta at K = 32, V = 64. Smaller heads run in tiles of this width
# with masked loads and stores (benchmarks/small_heads.py, results/small_heads*.json).
MIN_DOT_TILE = 64


def needs_backward(*tensors) -> bool:
    """Whether autograd will run a backward through an op on these inputs (None entries
    ignored): kernels keep tensors for their backward only then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def sum_head_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., H, D] -> [..., groups, D]: the gradients of value heads that share a q/k head (each
    group H / groups consecutive heads) summed in fp32, returned in x's dtype."""
    if x.shape[-2] == groups:
        return x
    return x.unflatten(-2, (groups, -1)).sum(-2, dtype=torch.float32).to(x.dtype)


def contiguous(*tensors):
    return tuple(t.contiguous() if t is not None else None for t in tensors)
