"""AdamW and gradient clipping that work on each rank's local shards of DTensor parameters.

Under FSDP2 (and tensor parallelism) every parameter, gradient and optimizer state is a DTensor.
The AdamW update and the scaling by the clip coefficient are elementwise, and the squared norm is
a sum, so both can run on the local shards whenever a gradient is laid out like its parameter.
Handing DTensors to the fused / foreach kernels instead makes DTensor propagate placements for
the hundreds of tensors of every call. On this repository's CPU test machine, over 435 tensors
(GDN recipes have ~18 parameters per block): a fused AdamW step takes ~13 ms of host time with
DTensors against ~6 ms on the local shards, the clipping ~6 ms against 3-6 ms
(benchmarks/optimizer_host.py, results/optimizer_host_cpu.json). The trainer's step waits on the
host (benchmarks/notes_multi_gpu.md), so this time is the GPU's.

Anything else (a Partial gradient, placements that differ from the parameter's) takes the DTensor
path unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def local_shard(x):
    """The local tensor of a DTensor (no autograd wrapper: optimizer code runs without grad);
    anything else as is."""
    return x._local_tensor if isinstance(x, DTensor) else x


def _layout(x: torch.Tensor):
    """(mesh, placements) of a DTensor, None for a plain tensor."""
    return (x.device_mesh, tuple(x.placements)) if isinstance(x, DTensor) else None


def _shards_alike(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the elementwise update of `param` by `grad` can run on local shards: same layout,
    and no pending reduction (Partial) in it. Runs for every parameter at every step: cheap
    checks first."""
    if not isinstance(param, DTensor):
        return not isinstance(grad, DTensor)
    if not isinstance(grad, DTensor):
        return False
    placements = param.placements
    if grad.placements != placements or not (grad.device_mesh is param.device_mesh
                                             or grad.device_mesh == param.device_mesh):
        return False
    return not any(p.is_partial() for p in placements)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose update runs on local shards (states stay DTensors, so checkpoints
    and resharding are unchanged)."""

    def _init_group(self, group, params_with_grad, grads, *state_lists):
        has_complex = super()._init_group(group, params_with_grad, grads, *state_lists)
        # The states were created with zeros_like(param): laid out like it by construction.
        if any(isinstance(p, DTensor) for p in params_with_grad) and all(
                _shards_alike(p, g) for p, g in zip(params_with_grad, grads)):
            for tensors in (params_with_grad, grads, *state_lists):
                tensors[:] = [local_shard(t) for t in tensors]
        return has_complex


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Scales the gradients in place so that their total 2-norm is at most max_norm (max_norm <= 0
    or inf: no scaling) and returns that total norm (fp32, on the gradients' device), computed over
    all shards: each shard's sum of squares, summed over the mesh dimensions the tensor is sharded
    on (not over those it is replicated on)."""
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    if not grads:
        return torch.zeros(())
    if any(_layout(g) is not None and any(p.is_partial() for p in _layout(g)[1]) for g in grads):
        return _clip_dtensors(parameters, max_norm)
    by_layout: dict = {}
    for g in grads:
        by_layout.setdefault(_layout(g), []).append(local_shard(g))
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for layout, tensors in by_layout.items():
        squares = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().sum()
        if layout is not None:
            mesh, placements = layout
            for dim, placement in enumerate(placements):
                # not is_shard(): FSDP over a tensor-parallel dimension shards with _StridedShard,
                # which is no Shard; Partial took the DTensor path above
                if not placement.is_replicate() and mesh.size(dim) > 1:
                    dist.all_reduce(squares, group=mesh.get_group(dim))
        total += squares
    total = total.sqrt()
    if 0 < max_norm < float("inf"):
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for tensors in by_layout.values():
            torch._foreach_mul_(tensors, scale)
    return total


def _clip_dtensors(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The general path: DTensor computes the norm (and reduces any pending Partial)."""
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters], 2.0, False, True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if 0 < max_norm < float("inf"):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, True)
    return total.float()


# ------------------------------------------------------------------------------------------
# Resuming: the checkpoint holds the optimizer's state, the config its settings.

# AdamW settings of a param group and the config keys that set them ("initial_lr" is the base
# learning rate the LR schedule scales, set from optimizer.lr when the schedule is built).
_CONFIG_KEYS = {"initial_lr": "optimizer.lr", "betas": "optimizer.beta1 / optimizer.beta2",
                "eps": "optimizer.eps", "weight_decay": "optimizer.weight_decay"}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # betas come back as lists
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def config_settings(optimizers: list[torch.optim.Optimizer]) -> list[list[dict]]:
    """The param groups' settings (everything but the parameters, base learning rates included)
    as this run's config and schedule made them; taken before a checkpoint is loaded over them."""
    return [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in optimizers]


def restore_config_settings(optimizers: list[torch.optim.Optimizer], schedulers: list,
                            settings: list[list[dict]], next_step: int) -> list[str]:
    """After a checkpoint load: the optimizer settings and base learning rates go back to this
    run's config (a checkpoint restores them with the moments, which would silently undo a
    changed optimizer.lr, betas, eps or weight_decay), and the learning rate of the next step is
    the config's schedule at the loaded step (the loaded value came from the saved run's
    schedule, so another training.steps or [lr_scheduler] would apply only one step later).

    An unchanged config gives back the loaded values bit for bit (the same product the schedule
    formed when it saved). Returns one line per setting that differed from the checkpoint's."""
    changed = {}  # key: (checkpoint's, config's)
    lr_was = lr_now = None
    for opt, sched, groups in zip(optimizers, schedulers, settings):
        for group, fresh in zip(opt.param_groups, groups):
            for key, value in fresh.items():
                if key in _CONFIG_KEYS and not _same(group.get(key), value):
                    changed.setdefault(key, (group.get(key), value))
                if key != "lr":
                    group[key] = value
        sched.base_lrs = [group["initial_lr"] for group in opt.param_groups]
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        lr_was, lr_now = opt.param_groups[0]["lr"], lrs[0]
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = list(lrs)  # what get_last_lr() reports until the next step()
    lines = [f"{_CONFIG_KEYS[key]}: {new} in this run's config, {old} in the checkpoint; the config's applies"
             for key, (old, new) in changed.items()]
    if lr_now is not None and not _same(lr_was, lr_now):
        lines.append(f"learning rate of step {next_step}: {lr_now:.3e} from this run's optimizer.lr, "
                     f"[lr_scheduler] and training.steps; the checkpoint's run had {lr_was:.3e}")
    return lines
