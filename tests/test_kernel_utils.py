"""Kernel helpers: the varlen chunk indices (values, reuse across calls on the same
cu_seqlens), host integer helpers, and the up-front compile of document-count-dependent variants."""

import gc

import pytest
import torch

from flame.kernels.utils import _chunk_indices, default_cu_seqlens, prepare_chunk_indices, prepare_segments


def expected(cu: list[int], chunk: int, slots: int):
    pairs = [(n, i) for n in range(len(cu) - 1) for i in range(-(-(cu[n + 1] - cu[n]) // chunk))]
    pairs += [(len(cu) - 1, 0)] * (slots - len(pairs))
    offsets = [0]
    for n in range(len(cu) - 1):
        offsets.append(offsets[-1] + -(-(cu[n + 1] - cu[n]) // chunk))
    return pairs, offsets


def test_chunk_indices_values():
    cu = [0, 5, 70, 200, 200, 264]
    indices, offsets = prepare_chunk_indices(torch.tensor(cu, dtype=torch.int32), 64, 12)
    pairs, offs = expected(cu, 64, 12)
    assert [tuple(p) for p in indices.tolist()] == pairs
    assert offsets.tolist() == offs


def test_segments_values():
    """Segments of 128 tokens: their bounds as a cu_seqlens of their own (spare slots empty at the
    end), and each sequence's first and last segment slot; the empty sequence has none."""
    cu = [0, 5, 300, 300, 556]
    indices, offsets, bounds, first, last, nonempty = prepare_segments(torch.tensor(cu, dtype=torch.int32), 128, 10)
    pairs, offs = expected(cu, 128, 10)
    assert [tuple(p) for p in indices.tolist()] == pairs and offsets.tolist() == offs
    assert bounds.tolist() == [0, 5, 133, 261, 300, 428, 556, 556, 556, 556, 556]
    assert first.tolist() == [0, 1, 4, 4] and last.tolist() == [0, 3, 3, 5]
    assert nonempty.tolist() == [True, True, False, True]


def test_chunk_indices_reused_only_for_the_same_unmodified_tensor():
    cu = torch.tensor([0, 5, 70, 200], dtype=torch.int32)
    first = prepare_chunk_indices(cu, 64, 8)
    assert prepare_chunk_indices(cu, 64, 8)[0] is first[0]  # every layer reuses them
    assert prepare_chunk_indices(cu, 32, 12)[0] is not first[0]  # another chunk size

    cu[1] = 64  # modified in place: rebuilt
    again = prepare_chunk_indices(cu, 64, 8)
    assert again[0] is not first[0]
    assert torch.equal(again[0], _chunk_indices(cu, 64, 8)[0])

    # a tensor freed and a new one (possibly at the same address): never the old indices
    for _ in range(20):
        del cu
        gc.collect()
        cu = torch.tensor([0, 130, 200], dtype=torch.int32)
        got = prepare_chunk_indices(cu, 64, 8)
        assert torch.equal(got[0], _chunk_indices(cu, 64, 8)[0])
        assert torch.equal(got[1], _chunk_indices(cu, 64, 8)[1])


def test_chunk_indices_in_inference_mode():
    with torch.inference_mode():
        cu = torch.tensor([0, 3, 9], dtype=torch.int32)
        assert prepare_chunk_indices(cu, 64, 3)[0].tolist() == [[0, 0], [1, 0], [2, 0]]


def test_default_cu_seqlens_kept_per_shape():
    """Fixed-length calls find their chunk indices cached: one offsets tensor per shape."""
    with torch.inference_mode():
        first = default_cu_seqlens(3, 100, torch.device("cpu"))
    assert not first.is_inference()  # keeps a version counter, so the index cache can use it
    assert first.tolist() == [0, 100, 200, 300] and first.dtype == torch.int32
    assert default_cu_seqlens(3, 100, torch.device("cpu")) is first
    assert default_cu_seqlens(3, 64, torch.device("cpu")).tolist() == [0, 64, 128, 192]
    assert prepare_chunk_indices(first, 64, 8)[0] is prepare_chunk_indices(first, 64, 8)[0]


def test_host_integer_helpers_match_triton():
    import triton

    from flame.kernels.utils import cdiv, next_power_of_2

    for a in range(0, 600):
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 3, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


class _OnGpu(torch.Tensor):
    """A CPU tensor that says it is on the GPU, for the host logic of GPU-only helpers."""

    is_cuda = True


def test_compile_variants_compiles_each_option_once_per_argument_kind(monkeypatch):
    from flame.kernels import utils

    monkeypatch.setattr(utils, "_COMPILED_VARIANTS", set())
    compiled = []

    class Kernel:
        def warmup(self, *args, grid, **options):
            assert grid == (1,)
            compiled.append((args[0].dtype, options))

    kernel = Kernel()
    x = torch.Tensor._make_subclass(_OnGpu, torch.zeros(4))
    options = {"USE_G": True, "num_stages": 2}
    variants = [{"BV": 64}, {"BV": 32}, {"BV": 16}]
    utils.compile_variants(kernel, (x, 7), options, variants)
    assert compiled == [(torch.float32, dict(options, **v)) for v in variants]
    utils.compile_variants(kernel, (x, 9), options, variants)  # another document count: nothing to compile
    assert len(compiled) == 3
    half = torch.Tensor._make_subclass(_OnGpu, torch.zeros(4, dtype=torch.float16))
    utils.compile_variants(kernel, (half, 7), options, variants)  # another dtype: its own kernels
    assert len(compiled) == 6
    utils.compile_variants(kernel, (x, 7), dict(options, USE_G=False), variants)  # other constexprs
    assert len(compiled) == 9
    utils.compile_variants(kernel, (torch.zeros(4), 7), options, variants)  # CPU (interpreter): none
    assert len(compiled) == 9
    # one option is compiled ahead too: a kernel that only a later batch may launch
    utils.compile_variants(kernel, (x, 7), dict(options, USE_G=None), variants[:1])
    assert len(compiled) == 10
    utils.compile_variants(kernel, (x, 7), options, [])
    assert len(compiled) == 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("K,V", [(128, 128), (128, 256), (256, 256), (64, 64), (32, 16)])
def test_state_block_choices_cover_every_document_count(dtype, K, V, monkeypatch):
    """The delta rule's serial pass narrows its V block when few sequences must fill the GPU:
    every block it can pick is among the ones compiled up front."""
    from flame.kernels import delta_rule

    monkeypatch.setattr(delta_rule, "num_sms", lambda device: 132)
    q = torch.empty(1, 1, 1, K, dtype=dtype)
    choices = delta_rule.state_block_choices(q, V)
    picked = {delta_rule._state_block(q, n, hv, V) for n in range(1, 300) for hv in (1, 2, 4, 8, 16)}
    assert picked == set(choices)  # all covered, none compiled in vain
    assert choices == sorted(choices, reverse=True) and choices[-1] == min(16, choices[0])
    if dtype == torch.bfloat16 and (K, V) == (128, 256):  # the Gated DeltaNet recipes' heads
        assert choices == [64, 32, 16]
