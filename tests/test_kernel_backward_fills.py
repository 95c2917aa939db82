"""The chunked kernels' backward fills no zero gradients for the outputs the loss does not use:
the tensors kept for the backward (chunk states, v', A, gate cumsums) and an unused final state.
Autograd would otherwise materialise a zero tensor of each one's full size on every backward."""

import pytest
import torch
import torch.nn.functional as F

from flame import kernels

B, T, H, K, V = 1, 100, 2, 16, 32


def inputs(name):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.rand(B, T, H, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    if name == "gla":
        return q, k, v, -torch.rand(B, T, H, K, generator=gen)
    if name == "simple_gla":
        return q, k, v, g
    if name == "delta_rule":
        return q, k, v, beta
    return q, k, v, g, beta


@pytest.mark.parametrize("name", ["simple_gla", "gla", "delta_rule", "gated_delta_rule"])
def test_backward_fills_no_zero_gradients(name, monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    leaves = [x.requires_grad_() for x in inputs(name)]
    o, final_state = getattr(kernels, f"chunk_{name}")(*leaves, output_final_state=True)
    assert final_state is not None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grads = torch.autograd.grad(o, leaves, torch.randn_like(o))
    fills = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::fill_")]
    assert fills == [], fills
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)


@pytest.mark.parametrize("name", ["simple_gla", "gla", "delta_rule", "gated_delta_rule"])
def test_backward_from_the_final_state_alone(name, monkeypatch):
    """With only the final state in the loss the output gradient is None (nothing materialised):
    the backward takes it as zero, and agrees with the torch reference."""
    grads = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("FLAME_BACKEND", backend)
        leaves = [x.requires_grad_() for x in inputs(name)]
        _, final_state = getattr(kernels, f"chunk_{name}")(*leaves, output_final_state=True)
        dht = torch.randn(final_state.shape, generator=torch.Generator().manual_seed(1))
        grads[backend] = torch.autograd.grad(final_state, leaves, dht)
    for got, want in zip(grads["triton"], grads["torch"]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
