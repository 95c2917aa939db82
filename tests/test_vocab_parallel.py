"""Vocab-parallel fused linear cross-entropy: 2 gloo processes on CPU, each holding half of the
vocabulary, against the float64 reference over the whole vocabulary."""

import os

import pytest
import torch
import torch.distributed as dist

from flame.kernels.cross_entropy import fused_linear_cross_entropy
from flame.kernels.cross_entropy_ref import linear_cross_entropy_ref
from flame.titan import free_port
from tests.gloo_ranks import run_on_ranks

N, D, V, WORLD = 23, 8, 30, 2
CASES = [
    ("torch", "mean", dict()),
    ("torch", "sum", dict(label_smoothing=0.1, z_loss=1e-2, logit_softcap=3.0)),
    ("torch", "none", dict(label_smoothing=0.1, z_loss=1e-2, logit_softcap=3.0)),
    ("triton", "mean", dict(label_smoothing=0.1, z_loss=1e-2, logit_softcap=3.0)),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _worker(rank):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP thread pool
    g = torch.Generator().manual_seed(0)  # the same full problem on every rank
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -100
    grad_out = torch.randn(N, generator=g, dtype=torch.float64)
    shard = slice(rank * V // WORLD, (rank + 1) * V // WORLD)
    for backend, reduction, options in CASES:
        os.environ["FLAME_BACKEND"] = backend
        dtype = torch.float64 if backend == "torch" else torch.float32
        tol = 1e-12 if backend == "torch" else 1e-5
        x_ref, w_ref, b_ref = (i.clone().requires_grad_() for i in (x, w, b))
        x_mine = x.to(dtype, copy=True).requires_grad_()
        w_mine = w[shard].to(dtype, copy=True).requires_grad_()
        b_mine = b[shard].to(dtype, copy=True).requires_grad_()
        want = linear_cross_entropy_ref(x_ref, w_ref, t, b_ref, reduction=reduction, **options)
        got = fused_linear_cross_entropy(x_mine, w_mine, t, b_mine, reduction=reduction,
                                         process_group=dist.group.WORLD, chunk_size=8, **options)
        go = grad_out if reduction == "none" else grad_out[0]
        want.backward(go)
        got.backward(go.to(dtype))
        case = f"rank {rank} {backend} {reduction} {options}"
        assert rel(got, want) < tol, case
        assert rel(x_mine.grad, x_ref.grad) < tol, case
        assert rel(w_mine.grad, w_ref.grad[shard]) < tol, case
        assert rel(b_mine.grad, b_ref.grad[shard]) < tol, case


def test_vocab_parallel_two_gloo_processes():
    # fork: the children inherit the imported modules instead of importing torch again
    run_on_ranks(_worker, WORLD, start_method="fork")


def test_vocab_parallel_rejects_target_beyond_all_shards():
    # one process group of size 1 is enough to check the range uses the whole vocabulary
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        x, w = torch.randn(4, D), torch.randn(V, D)
        with pytest.raises(ValueError, match="target"):
            fused_linear_cross_entropy(x, w, torch.tensor([0, 1, V, 2]), process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
