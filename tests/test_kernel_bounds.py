"""The chunked kernels read no token past the end of their inputs: q, k, v and the gates sit at
the front of NaN-filled buffers, so a load past the last token (a chunk or block that ends inside
a tile, a packed batch's last document) turns the output or a gradient non-finite. Interpreter,
fp32."""

import pytest
import torch
import torch.nn.functional as F

from flame.kernels import chunk_delta_rule, chunk_gated_delta_rule, chunk_gla, chunk_simple_gla


def at_front_of_nan(x: torch.Tensor) -> torch.Tensor:
    """x [1, T, ...] as the front of a buffer with 64 more tokens of NaN."""
    buffer = torch.full((x.numel() + 64 * x.numel() // x.shape[1],), float("nan"))
    buffer[: x.numel()] = x.flatten()
    return buffer[: x.numel()].view(x.shape).requires_grad_()


def inputs(kernel: str, T: int, H: int = 2, K: int = 32, V: int = 16):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, H, K, generator=gen)
    k = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    v = torch.randn(1, T, H, V, generator=gen)
    if kernel == "simple_gla":
        return chunk_simple_gla, (q, k, v, F.logsigmoid(torch.randn(1, T, H, generator=gen) + 2))
    if kernel == "gla":
        return chunk_gla, (q, k, v, F.logsigmoid(torch.randn(1, T, H, K, generator=gen) + 2))
    beta = torch.rand(1, T, H, generator=gen)
    if kernel == "delta_rule":
        return chunk_delta_rule, (q, k, v, beta)
    return chunk_gated_delta_rule, (q, k, v, F.logsigmoid(torch.randn(1, T, H, generator=gen) + 3), beta)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("kernel", ["simple_gla", "gla", "delta_rule", "gated_delta_rule"])
def test_no_reads_past_the_last_token(kernel, packed, monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    fn, args = inputs(kernel, 70)
    leaves = [at_front_of_nan(x) for x in args]
    cu = torch.tensor([0, 37, 70], dtype=torch.int32) if packed else None
    o, _ = fn(*leaves, cu_seqlens=cu)
    o.sum().backward()
    assert torch.isfinite(o).all()
    for i, x in enumerate(leaves):
        assert torch.isfinite(x.grad).all(), f"gradient of input {i}"
