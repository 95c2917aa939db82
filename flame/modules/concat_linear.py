"""x @ cat(weights).T without keeping the concatenated weight for the backward.

Several projections of one input run as one wide matmul (a mixer's q, k, v and narrow gates;
SwiGLU's gate and up). `F.linear(x, torch.cat(weights))` keeps the concatenated copy alive from
forward to backward for the input gradient: eagerly through autograd, and under torch.compile
because the partitioner saves the cat's output (checked with saved-tensor hooks on CPU). That is
one extra copy of the weights per layer (~1 GiB over a 1.37B model's MLPs). Here the backward
concatenates the weights again (a copy of a few MB, read once) and only x and the weights
themselves are kept. Under torch.compile the forward and backward are custom ops, so the
concatenation stays inside them; eagerly an autograd.Function does the same for less dispatch.
"""

import os

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard


def _forward(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, torch.cat(weights))


def _backward(dy: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """[dx, dw_1, ..., dw_n]: one matmul for the input gradient and one for every weight's (the
    narrow ones' would be inefficient alone); the dw_i are row blocks of its result."""
    dx = dy @ torch.cat(weights)
    dw = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return [dx] + list(dw.split([w.shape[0] for w in weights]))


@torch.library.custom_op("flame::concat_linear", mutates_args=())
def _forward_op(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return _forward(x, weights)


@_forward_op.register_fake
def _(x, weights):
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))


@torch.library.custom_op("flame::concat_linear_bwd", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    dx, *dws = _backward(dy, x, weights)
    # outputs of a custom op may not share a buffer: a copy of each weight's gradient (the size
    # of the weights, small beside the matmuls)
    return [dx] + [d.clone() for d in dws]


@_backward_op.register_fake
def _(dy, x, weights):
    return [x.new_empty(x.shape)] + [x.new_empty(w.shape[0], x.shape[-1]) for w in weights]  # contiguous, as the matmuls return


def _setup_context(ctx, inputs, output):
    x, weights = inputs
    ctx.save_for_backward(x, *weights)


def _op_backward(ctx, dy):
    x, *weights = ctx.saved_tensors
    grads = _backward_op(dy.contiguous(), x, weights)
    return grads[0], grads[1:]


_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


class _ConcatLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *weights):
        ctx.save_for_backward(x, *weights)
        return _forward(x, list(weights))

    @staticmethod
    def backward(ctx, dy):
        x, *weights = ctx.saved_tensors
        return tuple(_backward(dy, x, weights))


def concat_linear(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, torch.cat(weights)) (no biases), keeping x and the weights, not their
    concatenation, for the backward."""
    if torch.is_autocast_enabled(x.device.type):
        # autocast does not reach inside: the operands in its dtype, as it gives F.linear
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weights = x.to(dtype), [w.to(dtype) for w in weights]
    if torch.compiler.is_compiling():
        return _forward_op(x, list(weights))
    return _ConcatLinear.apply(x, *weights)


def tensor_parallel_fusion() -> bool:
    """FLAME_TP_FUSED_PROJECTIONS: 1 (default) fuses column-wise tensor-parallel projections
    (`column_shards`), 0 keeps one ColwiseParallel call each (for comparisons)."""
    value = os.environ.get("FLAME_TP_FUSED_PROJECTIONS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"FLAME_TP_FUSED_PROJECTIONS must be 0 or 1, got {value!r}")
    return value == "1"


def column_shards_fit(x: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Whether `column_shards` can hand (x, weights) to concat_linear: plain weights, or
    column-wise tensor-parallel shards (DTensors sharded by output row) with a replicated DTensor
    input, unless FLAME_TP_FUSED_PROJECTIONS=0 (`tensor_parallel_fusion`)."""
    if not any(isinstance(w, DTensor) for w in weights):
        return True
    if not tensor_parallel_fusion():
        return False
    colwise = all(isinstance(w, DTensor) and tuple(w.placements) == (Shard(0),) for w in weights)
    return colwise and isinstance(x, DTensor) and tuple(x.placements) == (Replicate(),)


def column_shards(x: torch.Tensor, weights: list[torch.Tensor]):
    """(x, weights) as plain tensors for concat_linear. Under tensor parallelism (column-wise
    weight shards, replicated DTensor input) they are this rank's rows and the local input,
    marked so that its gradient counts as a partial sum over the group (each rank's projections
    see only their own rows): the same values and gradients as torch's ColwiseParallel linears,
    in one matmul instead of one module call each. None where `column_shards_fit` says no (keep
    separate calls then)."""
    if not column_shards_fit(x, weights):
        return None
    if not any(isinstance(w, DTensor) for w in weights):
        return x, weights
    return x.to_local(grad_placements=[Partial()]), [w.to_local() for w in weights]
