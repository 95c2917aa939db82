"""Tensor parallelism (Megatron-style, on DTensor) for flame's language models.

Inside a tensor-parallel (TP) group of N ranks every block is split by heads:

    residual stream      [B, T/N, D] on each rank: sequence parallel, so the block norms and the
                         residual adds work on a slice of the tokens
    mixer / MLP input    all-gathered to [B, T, D] (PrepareModuleInput), kept a DTensor so that
                         the partial input gradients of all projections are summed and
                         reduce-scattered once per mixer and once per MLP
    q/k/v/gate/beta/decay projections, MLP gate/up   column-wise: each rank computes its heads
    short convolutions, A_log, dt_bias, D            sharded by head, like the channels they act on
    output projections (o_proj, out_proj, down_proj) row-wise, reduce-scattered back to [B, T/N, D]
    embeddings           vocab-parallel lookup, reduce-scattered to [B, T/N, D]
    final norm           on the token slice, then all-gathered for the loss
    loss                 vocab-parallel fused linear cross-entropy: each rank holds V/N rows of
                         the output matrix and the logits never exist whole on any rank

Every mixer computes with its local heads. For that the plan sets the mixer's head counts
(`n_heads`, attention's `n_kv_heads`, Mamba2's `d_inner`) to this rank's share and RetNet's
`first_head` to the global index of this rank's first head (its decay depends on it);
per-head parameters are DTensors that the mixers read through
`flame.models.mixers.common.local`. A mixer's `flops_per_token` then counts its local heads:
count the model's FLOPs before applying tensor parallelism (the trainer does).

Norms whose weight is shared while the rows differ per rank (the sequence-parallel block norms,
the per-head output norms) keep a replicated weight whose gradient is a partial sum, summed
over the group by FSDP2 (or by `reduce_partial_grads` without it). Mamba2's norm spans all
heads of a token, so its sum of squares is all-reduced over the group.

Mamba2's in_proj and convolution interleave per-head rows (z, x, dt) with rows all heads share
(B, C): they stay replicated and each rank computes only the rows it needs.

Parameter names do not change, so checkpoints (torch DCP) saved at one TP degree load at
another.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor, wait_tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               parallelize_module)

from flame import modules
from flame.kernels.conv import causal_conv1d, causal_conv1d_step
from flame.kernels.norm import gated_rms_norm, rms_norm
from flame.kernels.skip_gated_norm import gated_skip_sum
from flame.models.config import LINEAR_MIXERS

# ------------------------------------------------------------------------------------------
# Checks


def check_tensor_parallel(model_cfg, tp: int, seq_len: int | None = None) -> None:
    """Raise ValueError, naming the keys, when the model cannot be split over `tp` ranks."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"parallelism.tensor_parallel_degree = {tp!r}: must be a positive integer")
    if tp == 1:
        return
    key = f"parallelism.tensor_parallel_degree = {tp}"
    used = model_cfg.layer_mixers()
    # (what the error calls it, the key(s) to change, its value, what it counts)
    counts = []
    linear = sorted(set(used) & set(LINEAR_MIXERS))
    if linear:
        counts.append(("model.n_heads", "model.n_heads", model_cfg.n_heads,
                       f"heads of the {', '.join(linear)} layers"))
    if "attention" in used:
        counts.append(("model.attn_n_heads (default model.n_heads)", "model.attn_n_heads",
                       model_cfg.attn_heads, "query heads of the attention layers"))
        counts.append(("model.n_kv_heads", "model.n_kv_heads", model_cfg.kv_heads,
                       "key/value heads of the attention layers"))
    counts.append(("the MLP hidden size", "model.mlp_hidden_dim (or mlp_ratio / mlp_multiple_of)",
                   model_cfg.mlp_hidden, "MLP channels"))
    counts.append(("model.vocab_size", "model.vocab_size", model_cfg.vocab_size,
                   "vocabulary rows of the embedding and output"))
    for name, change, value, what in counts:
        if value % tp:
            raise ValueError(
                f"{key} does not divide {name} = {value} ({what}); every rank needs an equal share. "
                f"Choose a tensor-parallel degree that divides {value}, or change {change}")
    if seq_len is not None and seq_len % tp:
        raise ValueError(
            f"{key} does not divide training.seq_len = {seq_len}: sequence parallelism gives every "
            f"rank seq_len / {tp} tokens; make seq_len a multiple of {tp}")


def check_parallel_layout(parallelism, world_size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp) for `world_size` processes, or ValueError when the degrees
    of the [parallelism] section do not multiply to the number of processes."""
    replicate = parallelism.data_parallel_replicate_degree
    shard = parallelism.data_parallel_shard_degree
    tp = parallelism.tensor_parallel_degree
    if shard == -1:
        if world_size % (replicate * tp):
            raise ValueError(
                f"parallelism: data_parallel_replicate_degree ({replicate}) x tensor_parallel_degree "
                f"({tp}) = {replicate * tp} does not divide the {world_size} processes started; "
                "change the degrees or the number of processes")
        shard = world_size // (replicate * tp)
    if replicate * shard * tp != world_size:
        raise ValueError(
            f"parallelism: data_parallel_replicate_degree ({replicate}) x data_parallel_shard_degree "
            f"({shard}) x tensor_parallel_degree ({tp}) = {replicate * shard * tp}, but {world_size} "
            "processes were started; make the product equal the process count (or set "
            "data_parallel_shard_degree = -1 to use the remaining processes)")
    return replicate, shard, tp


# ------------------------------------------------------------------------------------------
# Small differentiable pieces


def _local(t: torch.Tensor | None, grad: str = "same") -> torch.Tensor | None:
    """This rank's part of a DTensor parameter. grad="partial": the parameter is replicated but
    each rank uses it on different rows, so its local gradient is a partial sum."""
    if not isinstance(t, DTensor):
        return t
    if grad == "partial":
        return t.to_local(grad_placements=[Partial()])
    return t.to_local()


class _AllReduceSum(torch.autograd.Function):
    """y = sum over the group of x. Every rank uses y differently, so dy is summed as well."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, dy):
        dy = dy.clone()
        dist.all_reduce(dy, group=ctx.group)
        return dy, None


class _CopyToGroup(torch.autograd.Function):
    """Identity on an input every rank holds whole; its gradient (each rank's share) is summed."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        dy = dy.clone()
        dist.all_reduce(dy, group=ctx.group)
        return dy, None


def _gather_sequence(x: torch.Tensor, mesh) -> torch.Tensor:
    """[B, T/N, ...] on each rank -> [B, T, ...] on every rank (dim 1)."""
    return DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()]).to_local()


# ------------------------------------------------------------------------------------------
# Modules under tensor parallelism. Each is its flame.modules class with the same parameters
# (so state-dict names are unchanged) computing on local tensors; installed by swapping the
# instance's class, as FSDP2 does.


class ReplicatedRMSNorm(modules.RMSNorm):
    """RMSNorm with a replicated weight over rows that differ per rank (a slice of the tokens,
    or the heads of this rank): the weight's gradient is partial."""

    def forward(self, x, residual=None):
        y, summed = rms_norm(x, _local(self.weight, "partial"), residual, self.eps)
        return y if residual is None else (y, summed)


class GatheringRMSNorm(ReplicatedRMSNorm):
    """The final norm: normalises this rank's tokens, then gathers the whole sequence, which
    the vocab-parallel loss needs on every rank."""

    def forward(self, x, residual=None):
        """The normalised sequence, gathered (and this rank's slice of x + residual when given)."""
        if residual is None:
            return _gather_sequence(super().forward(x), self.weight.device_mesh)
        y, summed = super().forward(x, residual)
        return _gather_sequence(y, self.weight.device_mesh), summed


class ReplicatedGatedRMSNorm(modules.GatedRMSNorm):
    """Per-head gated output norm: one weight shared by all heads, each rank has its own heads."""

    def forward(self, x, gate):
        return gated_rms_norm(x, gate, _local(self.weight, "partial"), self.eps, self.activation)


class HeadShardedSkipGatedRMSNorm(modules.SkipGatedRMSNorm):
    """Mamba2's output norm over all heads of a token whose channels (and D, the weight) are split
    over the group: the skip term and the gate on this rank's channels, the sum of squares
    all-reduced, in plain torch ops (the fused kernel sees only a row's local part)."""

    def forward(self, y, x, D, z):
        u = gated_skip_sum(y, x, _local(D), z)
        group = self.weight.device_mesh.get_group()
        sumsq = _AllReduceSum.apply(u.pow(2).sum(-1, keepdim=True), group)
        out = u * torch.rsqrt(sumsq / self.dim + self.eps) * _local(self.weight).to(u.dtype)
        return out.to(y.dtype)


class ChannelShardedConvolution(modules.ShortConvolution):
    """Depthwise short convolution whose channels (and weight rows) are split over the group."""

    def forward(self, x, cu_seqlens=None, cache=None, output_final_state=False):
        return causal_conv1d(x, _local(self.weight).squeeze(1), _local(self.bias), self.activation,
                             cu_seqlens, cache, output_final_state)

    def step(self, x, cache):
        weight = _local(self.weight).squeeze(1)
        if cache is None:
            cache = x.new_zeros(x.shape[0], weight.shape[0], self.kernel_size - 1)
        return causal_conv1d_step(x, cache, weight, _local(self.bias), self.activation)


class ReplicatedLinear(nn.Linear):
    """A linear layer computed whole on every rank from the same input (GLA's low-rank gate
    down-projection): identical inputs and output gradients give identical weight and input
    gradients."""

    def forward(self, x):
        return F.linear(_local(x), _local(self.weight), _local(self.bias))


class RowSelectingLinear(nn.Linear):
    """A replicated linear layer of which each rank computes only some output rows (Mamba2's
    in_proj: this rank's z, x and dt rows, and the B, C rows every head uses). The input's and
    the weight's gradients are partial and summed over the group."""

    rows: list[tuple[int, int]]

    def forward(self, x):
        weight = _local(self.weight, "partial")
        weight = torch.cat([weight[a:b] for a, b in self.rows])
        if isinstance(x, DTensor):  # replicated; its gradient is summed where it was gathered
            x = _local(x, "partial")
        else:
            x = _CopyToGroup.apply(x, self.weight.device_mesh.get_group())
        return F.linear(x, weight)


class ChannelSelectingConvolution(modules.ShortConvolution):
    """A replicated short convolution of which each rank runs some channels (Mamba2's: this
    rank's x channels and the shared B, C channels)."""

    rows: list[tuple[int, int]]

    def _select(self, t):
        t = _local(t, "partial")
        return None if t is None else torch.cat([t[a:b] for a, b in self.rows])

    def forward(self, x, cu_seqlens=None, cache=None, output_final_state=False):
        return causal_conv1d(x, self._select(self.weight).squeeze(1), self._select(self.bias),
                             self.activation, cu_seqlens, cache, output_final_state)

    def step(self, x, cache):
        weight = self._select(self.weight).squeeze(1)
        if cache is None:
            cache = x.new_zeros(x.shape[0], weight.shape[0], self.kernel_size - 1)
        return causal_conv1d_step(x, cache, weight, self._select(self.bias), self.activation)


def _swap_class(module: nn.Module, cls: type) -> None:
    base = next(c for c in cls.__mro__[1:] if c.__module__.startswith("flame.modules") or c is nn.Linear)
    if type(module) is not base:
        raise TypeError(f"tensor parallelism: {type(module).__name__} cannot become {cls.__name__}")
    module.__class__ = cls


def _distribute_params(module: nn.Module, mesh, placement, names=None) -> None:
    """Make module's own parameters (or those named) DTensors with `placement` on `mesh`."""
    for name, param in list(module.named_parameters(recurse=False)):
        if names is not None and name not in names:
            continue
        if isinstance(param, DTensor):
            continue
        dt = distribute_tensor(param.data, mesh, [placement])
        module.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))
        for attr in ("_no_weight_decay",):
            if hasattr(param, attr):
                setattr(module._parameters[name], attr, getattr(param, attr))


# ------------------------------------------------------------------------------------------
# The language model: vocab-parallel loss and logits


class VocabParallelLoss:
    """Mixed into the LanguageModel class under tensor parallelism: the output matrix is split
    by vocabulary rows over the group, the loss is flame's fused linear cross-entropy with the
    group as process_group, and full logits are gathered only when asked for."""

    def forward(self, input_ids, labels=None, cu_seqlens=None, position_ids=None,
                loss_reduction: str = "mean", max_seqlen: int | None = None):
        if labels is None:
            return super().forward(input_ids, None, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                   loss_reduction=loss_reduction, max_seqlen=max_seqlen)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction = {loss_reduction!r}: use 'mean' or 'sum'")
        hidden, _ = self.hidden_states(input_ids, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                       max_seqlen=max_seqlen)
        weight = self.output_weight
        loss_fn = modules.FusedLinearCrossEntropyLoss(reduction=loss_reduction,
                                                      process_group=weight.device_mesh.get_group())
        return loss_fn(hidden.reshape(-1, hidden.shape[-1]), _local(weight), labels.reshape(-1))

    def logits(self, hidden):
        weight = self.output_weight
        local = hidden @ _local(weight).t()
        return DTensor.from_local(local, weight.device_mesh, [Shard(local.dim() - 1)],
                                  run_check=False).full_tensor()


def _make_vocab_parallel(model: nn.Module) -> None:
    cls = type(model)
    if issubclass(cls, VocabParallelLoss):
        return
    model.__class__ = type(f"TensorParallel{cls.__name__}", (VocabParallelLoss, cls), {})


# ------------------------------------------------------------------------------------------
# Plans per mixer


def _heads_of(mixer, name: str, tp: int) -> int:
    value = getattr(mixer, name)
    if value % tp:
        raise ValueError(f"layer {mixer.layer_idx}: {name} = {value} is not divisible by the "
                         f"tensor-parallel degree {tp}")
    return value // tp


def _shard_convs(mixer, mesh, names=("q_conv", "k_conv", "v_conv")) -> None:
    for name in names:
        conv = getattr(mixer, name, None)
        if conv is not None:
            _distribute_params(conv, mesh, Shard(0))
            _swap_class(conv, ChannelShardedConvolution)


def _shard_output_norm(norm, mesh) -> None:
    _distribute_params(norm, mesh, Replicate())
    _swap_class(norm, ReplicatedGatedRMSNorm if isinstance(norm, modules.GatedRMSNorm) else ReplicatedRMSNorm)


def _plan_attention(mixer, mesh, tp):
    heads, kv = _heads_of(mixer, "n_heads", tp), _heads_of(mixer, "n_kv_heads", tp)
    parallelize_module(mixer, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                     "v_proj": ColwiseParallel(),
                                     "o_proj": RowwiseParallel(output_layouts=Shard(1))})
    mixer.n_heads, mixer.n_kv_heads = heads, kv


def _plan_linear(mixer, mesh, tp, columns):
    heads = _heads_of(mixer, "n_heads", tp)
    plan = {name: ColwiseParallel() for name in columns}
    plan["o_proj"] = RowwiseParallel(output_layouts=Shard(1))
    parallelize_module(mixer, mesh, plan)
    _shard_convs(mixer, mesh)
    _shard_output_norm(mixer.o_norm, mesh)
    _distribute_params(mixer, mesh, Shard(0), names=("A_log", "dt_bias"))
    mixer.n_heads = heads
    return heads


def _plan_gated_deltanet(mixer, mesh, tp):
    _plan_linear(mixer, mesh, tp, ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj"))


def _plan_deltanet(mixer, mesh, tp):
    _plan_linear(mixer, mesh, tp, ("q_proj", "k_proj", "v_proj", "b_proj"))


def _plan_gla(mixer, mesh, tp):
    _plan_linear(mixer, mesh, tp, ("q_proj", "k_proj", "v_proj", "g_proj", "gk_up"))
    _distribute_params(mixer.gk_down, mesh, Replicate())
    _swap_class(mixer.gk_down, ReplicatedLinear)


def _plan_retnet(mixer, mesh, tp):
    heads = _plan_linear(mixer, mesh, tp, ("q_proj", "k_proj", "v_proj", "g_proj"))
    mixer.first_head = mesh.get_local_rank() * heads


def _plan_mamba2(mixer, mesh, tp):
    heads = _heads_of(mixer, "n_heads", tp)
    rank = mesh.get_local_rank()
    P, N = mixer.head_v, mixer.state_size
    d = mixer.d_inner
    z = (rank * heads * P, (rank + 1) * heads * P)
    # in_proj rows: [z (d) | x (d) | B (N) | C (N) | dt (H)]; conv channels: [x (d) | B | C]
    in_rows = [z, (d + z[0], d + z[1]), (2 * d, 2 * d + 2 * N),
               (2 * d + 2 * N + rank * heads, 2 * d + 2 * N + (rank + 1) * heads)]
    _distribute_params(mixer.in_proj, mesh, Replicate())
    _swap_class(mixer.in_proj, RowSelectingLinear)
    mixer.in_proj.rows = in_rows
    if mixer.use_short_conv:
        _distribute_params(mixer.conv, mesh, Replicate())
        _swap_class(mixer.conv, ChannelSelectingConvolution)
        mixer.conv.rows = [z, (d, d + 2 * N)]
    _distribute_params(mixer, mesh, Shard(0), names=("A_log", "dt_bias", "D"))
    _distribute_params(mixer.norm, mesh, Shard(0))
    _swap_class(mixer.norm, HeadShardedSkipGatedRMSNorm)
    parallelize_module(mixer, mesh, {"out_proj": RowwiseParallel(output_layouts=Shard(1))})
    mixer.n_heads, mixer.d_inner = heads, heads * P


MIXER_PLANS = {
    "Attention": _plan_attention,
    "GatedDeltaNet": _plan_gated_deltanet,
    "DeltaNet": _plan_deltanet,
    "GatedLinearAttention": _plan_gla,
    "MultiScaleRetention": _plan_retnet,
    "Mamba2": _plan_mamba2,
}


# ------------------------------------------------------------------------------------------
# Applying


def parallelize_block(block: nn.Module, mesh) -> None:
    """Sequence-parallel norms, head-parallel mixer, column/row-parallel MLP, in place."""
    tp = mesh.size()
    plan = MIXER_PLANS.get(type(block.mixer).__name__)
    if plan is None:
        raise ValueError(f"no tensor-parallel plan for the mixer {type(block.mixer).__name__}")
    for norm in (block.mixer_norm, block.mlp_norm):
        _distribute_params(norm, mesh, Replicate())
        _swap_class(norm, ReplicatedRMSNorm)
    # The input stays a DTensor: the column-wise projections then add their partial input
    # gradients as DTensors, and the sum is reduce-scattered once, where the input was gathered.
    parallelize_module(block, mesh, {
        "mixer": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    })
    plan(block.mixer, mesh, tp)


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Split `model` (a flame LanguageModel, on any device, meta included) over the 1-D mesh
    `tp_mesh`, in place. Inputs (input_ids, labels, cu_seqlens, position_ids) are the same
    whole batch on every rank of the group; the loss comes out equal on every rank."""
    tp = tp_mesh.size()
    check_tensor_parallel(model.cfg, tp)
    parallelize_module(model, tp_mesh, {
        "embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
    })
    model.embeddings.register_forward_hook(_finish_collective)
    if not model.cfg.tie_embeddings:
        _distribute_params(model.lm_head, tp_mesh, Shard(0))
    _distribute_params(model.norm, tp_mesh, Replicate())
    _swap_class(model.norm, GatheringRMSNorm)
    for block in model.layers:
        parallelize_block(block, tp_mesh)
    _make_vocab_parallel(model)
    return model


def _finish_collective(module, inputs, output):
    """The embeddings' reduce-scatter returns an AsyncCollectiveTensor (the collective may still
    be in flight). Handed to a compiled block as it is, its gradient is lost: torch.compile
    waits on it outside autograd, and the embeddings receive a zero gradient from the residual
    stream. Waiting here, through the differentiable wait_tensor, hands the block a plain tensor
    whose gradient flows back."""
    if isinstance(output, AsyncCollectiveTensor):
        return wait_tensor(output)
    return output


def reduce_partial_grads(model: nn.Module) -> None:
    """Sum the partial gradients of replicated parameters over their group. FSDP2 does this
    itself; call it after backward only when the model is not wrapped by FSDP2."""
    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)
