"""Everything flame takes from torchtitan, behind small functions of flame's own.

This is the only module that imports torchtitan (pinned at 0.2.2; see DESIGN.md), so that a
move to another torchtitan release is a change to this file alone. torchtitan's own Trainer
assumes CUDA; flame's loop (flame/train.py) reuses its parts and also runs on CPU with gloo.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

import torchtitan.distributed.parallel_dims as _titan_parallel_dims
from torchtitan.components import checkpoint as _titan_checkpoint
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.lr_scheduler import build_lr_schedulers as _titan_build_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import Checkpoint as _TitanCheckpointConfig
from torchtitan.config import LRScheduler as _TitanLRSchedulerConfig
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.utils import clip_grad_norm_ as _titan_clip_grad_norm_
from torchtitan.tools.logging import init_logger, logger
from torchtitan.tools.utils import GarbageCollection, get_peak_flops

from flame.optim import AdamW

__all__ = [
    "CheckpointManager", "GarbageCollection", "LRSchedulersContainer", "OptimizersContainer",
    "ParallelDims", "build_checkpointer", "build_lr_schedulers", "build_optimizers",
    "build_parallel_dims", "clip_grad_norm_", "data_parallel_mesh", "destroy_distributed", "free_port", "fsdp_mesh",
    "init_distributed", "init_logger", "latest_complete_step", "logger", "peak_flops",
    "data_parallel_rank_and_size", "will_save_checkpoint",
]

CheckpointManager = _titan_checkpoint.CheckpointManager


# ------------------------------------------------------------------------------------------
# Processes and device mesh


@dataclass
class Runtime:
    device: torch.device
    backend: str  # "nccl" or "gloo"
    rank: int
    local_rank: int
    world_size: int


def free_port() -> int:
    """A TCP port free on this machine now (for a group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int = 600) -> Runtime:
    """Start the process group: NCCL on CUDA, gloo on CPU, chosen by what the machine has.
    Also works without torchrun (`python train.py ...`) as a group of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    # torchtitan picks the mesh device once at import time, "cuda" when nothing is found; make
    # its mesh follow the device this run actually uses.
    _titan_parallel_dims.device_type = device.type
    return Runtime(device, backend, dist.get_rank(), local_rank, dist.get_world_size())


def destroy_distributed(barrier: bool = False) -> None:
    """Tear down the process group. barrier (after a run that ended normally on every rank):
    wait for all ranks first, so that no rank closes its connections while another still has a
    collective in flight (a gloo rank then aborts in its transport thread)."""
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def build_parallel_dims(replicate: int, shard: int, tp: int, world_size: int) -> ParallelDims:
    """torchtitan's ParallelDims for degrees already checked against the process count
    (flame.tensor_parallel.check_parallel_layout); its mesh is built here."""
    dims = ParallelDims(dp_replicate=replicate, dp_shard=shard, cp=1, tp=tp, pp=1, ep=1, etp=1,
                        world_size=world_size)
    dims.build_mesh()
    return dims


def data_parallel_mesh(dims: ParallelDims):
    """The mesh FSDP2 shards over: 1-D over dp_shard, 2-D (replicate, shard) for HSDP; the
    world mesh otherwise (one process runs without FSDP2: flame/parallel.py)."""
    if dims.dp_replicate > 1 and dims.dp_shard > 1:
        return dims.get_mesh(["dp_replicate", "fsdp"])
    if dims.dp_shard > 1:
        return dims.get_mesh("fsdp")
    if dims.dp_replicate > 1:
        # Pure replication: sharding over the replicas gives the same update with less memory.
        return dims.get_mesh("dp_replicate")
    return dims.world_mesh


def fsdp_mesh(dims: ParallelDims):
    """The mesh fully_shard wraps the model over: the data-parallel mesh, except with tensor
    parallelism and no data parallelism, where it is the size-1 "fsdp" dimension of the mesh the
    TP dimension belongs to. FSDP2 then gives the same mixed precision as every other layout and
    sums the partial gradients of the replicated parameters (sequence-parallel norms) over the TP
    group."""
    if dims.tp_enabled and dims.dp_replicate == 1 and dims.dp_shard == 1:
        # torchtitan builds this dimension (size 1) but get_mesh refuses size-1 dimensions
        return dims._meshes["fsdp"]
    return data_parallel_mesh(dims)


def data_parallel_rank_and_size(dims: ParallelDims) -> tuple[int, int]:
    mesh = dims.get_optional_mesh("batch")
    if mesh is None:
        return 0, 1
    return mesh.get_local_rank(), mesh.size()


# ------------------------------------------------------------------------------------------
# Optimizer and LR schedule


class _ParamGroupOptimizersContainer(OptimizersContainer):
    """torchtitan's container (state dicts by parameter name, which DCP reshards) built from the
    model's own parameter groups, so that norms, biases, embeddings and per-head constants are
    excluded from weight decay."""

    def __init__(self, model: nn.Module, optimizer_cls, optimizer_kwargs: dict, weight_decay: float):
        self.model_parts = [model]
        groups = model.param_groups(weight_decay)
        self.optimizers = [optimizer_cls(groups, **optimizer_kwargs)]
        all_params = [p for g in groups for p in g["params"]]
        self._post_init(all_params, optimizer_kwargs)


def build_optimizers(model: nn.Module, opt) -> OptimizersContainer:
    if opt.name != "AdamW":
        raise ValueError(f"optimizer.name = {opt.name!r}: only 'AdamW' is available")
    impl = opt.implementation
    kwargs = {"lr": opt.lr, "betas": (opt.beta1, opt.beta2), "eps": opt.eps,
              "weight_decay": opt.weight_decay, "fused": impl == "fused",
              "foreach": impl == "foreach"}
    return _ParamGroupOptimizersContainer(model, AdamW, kwargs, opt.weight_decay)


def build_lr_schedulers(optimizers: OptimizersContainer, sched, training_steps: int) -> LRSchedulersContainer:
    titan_cfg = _TitanLRSchedulerConfig(
        warmup_steps=sched.warmup_steps, total_steps=sched.total_steps,
        decay_ratio=sched.decay_ratio, decay_type=sched.decay_type,
        min_lr_factor=sched.min_lr_factor)
    return _titan_build_lr_schedulers(optimizers, titan_cfg, training_steps)


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Total gradient norm over all shards; clips only when max_norm > 0 (inf keeps the grads)."""
    return _titan_clip_grad_norm_(list(params), max_norm if max_norm > 0 else float("inf"),
                                  foreach=True)


# ------------------------------------------------------------------------------------------
# Checkpointing


def build_checkpointer(ckpt, dump_folder: str, *, dataloader, model: nn.Module, optimizers,
                       lr_schedulers, train_state) -> CheckpointManager:
    """torchtitan's CheckpointManager (torch DCP), configured from the [checkpoint] section.

    A checkpoint folder step-N counts as complete only once DCP's `.metadata` file exists:
    DCP writes it last, under a temporary name renamed into place after every rank has
    written its shards, and torchtitan's resume only considers folders that have it. A save
    interrupted mid-write therefore leaves a folder that is never loaded."""
    titan_cfg = _TitanCheckpointConfig(
        enable=ckpt.enable, folder=ckpt.folder, interval=ckpt.interval,
        keep_latest_k=ckpt.keep_latest_k, async_mode=ckpt.async_mode, load_step=ckpt.load_step,
        initial_load_path=ckpt.initial_load_path, initial_load_model_only=True,
        last_save_model_only=ckpt.last_save_model_only, export_dtype=ckpt.export_dtype,
        exclude_from_loading=list(ckpt.exclude_from_loading),
        enable_ft_dataloader_checkpoints=False)
    return CheckpointManager(
        dataloader=dataloader, model_parts=[model], optimizers=optimizers,
        lr_schedulers=lr_schedulers, states={"train_state": train_state},
        checkpoint_config=titan_cfg, sd_adapter=None, base_folder=dump_folder)


def will_save_checkpoint(checkpointer: CheckpointManager, step: int, last_step: bool) -> bool:
    """Whether checkpointer.save(step, last_step) writes a checkpoint."""
    return checkpointer._should_save(step, last_step)


def save_checkpoint_now(checkpointer: CheckpointManager, step: int) -> None:
    """A full, synchronous checkpoint of `step` whatever the interval (before a stop on a signal):
    the last-step path, with the optimizer and data state even where last_save_model_only is set."""
    model_only = checkpointer.last_save_model_only
    checkpointer.last_save_model_only = False
    try:
        checkpointer.save(step, last_step=True)
    finally:
        checkpointer.last_save_model_only = model_only


def latest_complete_step(folder: str) -> int:
    """The newest step-N below `folder` whose save completed, or -1."""
    probe = CheckpointManager.__new__(CheckpointManager)
    probe.folder = folder
    return probe._find_load_step(folder)


# ------------------------------------------------------------------------------------------
# Metrics


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of the device (H100 SXM: 989e12), None on CPU."""
    if device.type != "cuda":
        return None
    return get_peak_flops(torch.cuda.get_device_name(device))


