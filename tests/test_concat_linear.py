"""concat_linear: F.linear(x, torch.cat(weights)) that keeps the weights, not their concatenation."""

import pytest
import torch
import torch.nn.functional as F

from flame.modules.concat_linear import concat_linear


def _run(fn, x, weights, compiled):
    """Output, gradients of x and every weight, and the tensors autograd saved (as (shape, is one
    of the weights))."""
    x = x.clone().requires_grad_()
    weights = [w.clone().requires_grad_() for w in weights]
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), any(t.data_ptr() == w.data_ptr() for w in weights)))
        return t

    f = torch.compile(fn, backend="aot_eager", fullgraph=True) if compiled else fn
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = f(x, weights)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    grads = torch.autograd.grad(y, [x] + weights, dy)
    return y, grads, saved


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_matches_linear_of_cat_and_keeps_no_copy(compiled):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 16, generator=gen, dtype=torch.float64)
    weights = [torch.randn(n, 16, generator=gen, dtype=torch.float64) for n in (24, 3, 8)]

    def plain(x, ws):
        return F.linear(x, torch.cat(ws)) * 2.0

    def mine(x, ws):
        return concat_linear(x, ws) * 2.0

    y_ref, grads_ref, _ = _run(plain, x, weights, False)
    y, grads, saved = _run(mine, x, weights, compiled)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12)
    # the weights are kept by reference and no [35, 16] concatenation is kept
    assert sum(is_weight for _, is_weight in saved) == len(weights), saved
    assert (35, 16) not in [shape for shape, _ in saved], saved


def test_autocast_casts_like_linear():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=gen, requires_grad=True)
    weights = [torch.randn(n, 16, generator=gen, requires_grad=True) for n in (8, 4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = concat_linear(x, weights)
        y_ref = F.linear(x, torch.cat(weights))
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.allclose(y.float(), y_ref.float())
    y.float().sum().backward()  # backward outside autocast: operands of one dtype
    assert x.grad.dtype == torch.float32 and all(w.grad.shape == w.shape for w in weights)


def test_opcheck():
    from flame.modules import concat_linear as module

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen).transpose(0, 1)  # not contiguous
    weights = [torch.randn(n, 16, generator=gen) for n in (8, 4)]
    torch.library.opcheck(module._forward_op, (x, weights))
    dy = torch.randn(5, 3, 12, generator=gen)
    torch.library.opcheck(module._backward_op, (dy, x, weights))


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_bf16_autocast_matches_linear_of_cat(compiled):
    """On the GPU as the models run it: fp32 weights under bf16 autocast, compiled by inductor."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, 512, generator=gen).cuda()
    weights = [torch.randn(n, 512, generator=gen).cuda() / 512**0.5 for n in (1024, 16, 256)]

    def plain(x, ws):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.linear(x, torch.cat(ws)).float()

    def mine(x, ws):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return concat_linear(x, ws).float()

    def run(fn):
        xs, ws = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in weights]
        y = fn(xs, ws)
        y.backward(torch.ones_like(y))
        return [y, xs.grad] + [w.grad for w in ws]

    ref = run(plain)
    out = run(torch.compile(mine, fullgraph=True) if compiled else mine)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).norm() <= 1e-2 * b.norm(), (a - b).norm() / b.norm()
