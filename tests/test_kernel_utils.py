"""The varlen chunk indices: values, and their reuse across calls on the same cu_seqlens."""

import gc

import torch

from flame.kernels.utils import _chunk_indices, prepare_chunk_indices


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


def test_host_integer_helpers_match_triton():
    import triton

    from flame.kernels.utils import cdiv, next_power_of_2

    for a in range(0, 600):
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 3, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
