"""Applying parallelism to a LanguageModel, in torchtitan's order: TP -> AC -> compile -> FSDP2
(with TP and AC, compile comes before AC: apply_checkpointing_and_compile says why).

Each step works block by block (`model.layers`), so one block is the unit of sharding,
recomputation and compilation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from flame.precision import DTYPES
from flame.tensor_parallel import apply_tensor_parallel
from flame.titan import ParallelDims, fsdp_mesh, logger


def parallelize(model: nn.Module, cfg, dims: ParallelDims, device: torch.device) -> nn.Module:
    """Apply tensor parallelism, activation checkpointing, per-block compile and FSDP2 (several
    processes) in place."""
    if dims.tp_enabled:
        apply_tensor_parallel(model, dims.get_mesh("tp"))
    ac = cfg.activation_checkpoint
    compiled = cfg.compile.enable and "model" in cfg.compile.components
    apply_checkpointing_and_compile(model, checkpoint=ac.mode,
                                    every=int(ac.selective_ac_option) if ac.mode == "selective" else 1,
                                    compile_backend=cfg.compile.backend if compiled else None,
                                    tensor_parallel=dims.tp_enabled)
    apply_fsdp(model, dims, device, param_dtype=cfg.training.mixed_precision_param,
               reduce_dtype=cfg.training.mixed_precision_reduce,
               reshard_after_forward=cfg.parallelism.fsdp_reshard_after_forward,
               blocks_per_unit=cfg.parallelism.fsdp_blocks_per_unit)
    return model


# ------------------------------------------------------------------------------------------
# Tensor parallelism


# apply_tensor_parallel (flame/tensor_parallel.py): head-parallel plans for every mixer and the
# MLP, sequence-parallel norms, vocab-parallel embedding and loss.


# ------------------------------------------------------------------------------------------
# Activation checkpointing and compile


def apply_checkpointing_and_compile(model: nn.Module, *, checkpoint: str = "none", every: int = 1,
                                    compile_backend: str | None = None, tensor_parallel: bool = False) -> None:
    """Activation checkpointing (mode `checkpoint`, every `every`-th block when selective), then
    per-block compile with `compile_backend` (None: no compile), so that torch.compile sees the
    checkpointed region. With tensor parallelism the other way round, each compiled block inside
    its checkpoint wrapper: compiling a checkpointed attention block under tensor parallelism
    fails in AOT autograd (a DeviceMesh among the tensors saved for backward, torch 2.13), while
    a compiled block inside the wrapper gives the same gradients (tests/test_tensor_parallel.py)."""
    checkpointed = checkpoint != "none"
    compile_first = compile_backend is not None and (tensor_parallel or not checkpointed)
    if compile_first:
        apply_compile(model, compile_backend)
    if checkpointed:
        apply_activation_checkpointing(model, checkpoint, every)
    if compile_backend is not None and not compile_first:
        apply_compile(model, compile_backend)


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> None:
    """full: recompute every block's activations in backward; selective: every `every`-th
    block, trading a fraction of the recomputation for memory."""
    if mode not in ("full", "selective"):
        raise ValueError(f"activation_checkpoint.mode = {mode!r}: use 'none', 'full' or 'selective'")
    for i, block in enumerate(model.layers):
        if mode == "full" or i % every == 0:
            # preserve_rng_state keeps any dropout-like randomness identical in recomputation
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)


# ------------------------------------------------------------------------------------------
# Compile


# Graphs each kind of block may compile of the blocks' shared forward before torch.compile
# stops (fullgraph: with an error): the first compile and its dynamic-shape one, one per
# power-of-two bound on the longest document where a kernel specialises on it (varlen attention;
# 1024 .. 16384 and more, see LanguageModel), and the delta rule's long-document switch.
GRAPHS_PER_BLOCK_KIND = 12


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile each block on its own: identical blocks share one compiled graph, and compile
    time stays that of one block however deep the model.

    All blocks run one forward, so torch.compile counts the graphs of every kind of block (each
    mixer type, checkpointed or not, and the first block, which starts the residual stream)
    against one limit (8 by default): a hybrid of Gated DeltaNet and attention layers reached it
    at its second step on an H100. The limit is raised to GRAPHS_PER_BLOCK_KIND per kind."""
    kinds = len({(type(block), type(getattr(block, "mixer", None))) for block in model.layers}) + 1
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, GRAPHS_PER_BLOCK_KIND * kinds)
    for block in model.layers:
        block.compile(backend=backend, fullgraph=True)


# ------------------------------------------------------------------------------------------
# FSDP2


def apply_fsdp(model: nn.Module, dims: ParallelDims, device: torch.device, *, param_dtype: str,
               reduce_dtype: str, reshard_after_forward: str = "default", blocks_per_unit: int = 1) -> None:
    """fully_shard every block (or every run of `blocks_per_unit` consecutive blocks, gathered
    and reduced together), then the root (embeddings, final norm, output head); with one
    process, the root alone.

    Each unit costs the host a fixed amount of work per step (hooks, collective launches, copies
    in and out of the communication buffers, per-parameter bookkeeping in forward and backward).
    Blocks with many small parameters (the linear-attention mixers have 15-20 each) can leave the
    GPU waiting for the host; fewer, larger units trade that for a larger gathered working set.

    Mixed precision on CUDA: bf16 parameters for compute (fp32 master copies stay sharded)
    and fp32 gradient reduction. On CPU everything stays fp32.

    One process: no FSDP. There is nothing to shard or reduce, and FSDP2's per-parameter work in
    Python (casts, gradient accumulation) costs host time at every micro-batch; the trainer's
    ComputeCopies (flame/precision.py) gives the same mixed precision with one cast per step and
    one foreach call per micro-batch, in less memory."""
    if dims.world_size == 1:
        return
    mesh = fsdp_mesh(dims)
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    else:
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    blocks = list(model.layers)
    units = [blocks[i:i + blocks_per_unit] for i in range(0, len(blocks), blocks_per_unit)]
    keep_gathered = reshard_after_forward == "never" or (
        reshard_after_forward == "default" and gathered_blocks_fit(blocks, mp.param_dtype, device))
    for i, unit in enumerate(units):
        # Resharding frees a unit's gathered parameters after its forward and gathers them again
        # in backward: less memory, but a second all-gather and its host work per unit and step.
        # The last unit's backward comes right after its forward, so it is never resharded
        # unless asked ("always").
        reshard = reshard_after_forward == "always" or (not keep_gathered and i < len(units) - 1)
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    logger.info(f"FSDP2: {len(units)} units of up to {blocks_per_unit} block(s) over {len(blocks)} blocks, "
                f"plus the root; gathered blocks {'kept' if keep_gathered else 'freed'} after forward")
    # The root's parameters are used last in forward and first in backward: keep them.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward == "always")
    model.keeps_gathered_blocks = keep_gathered and reshard_after_forward != "always"


# Share of a GPU's memory the blocks' gathered compute copies may take for "default" to keep them.
GATHERED_MEMORY_SHARE = 1 / 16


def gathered_blocks_fit(blocks: list[nn.Module], param_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether "default" keeps every block gathered from forward to backward: when the blocks'
    parameters in the compute dtype take at most GATHERED_MEMORY_SHARE of the GPU's memory (up to
    ~2.5B parameters in bf16 on an 80 GB card). The second all-gather per block and step then
    goes away; on 2 H200s this raised gated_deltanet_374M from 110k to 135k tokens/s per GPU,
    whose steps wait on the host (benchmarks/notes_multi_gpu.md). On CPU: never."""
    if device.type != "cuda":
        return False
    numel = sum(p.numel() for block in blocks for p in block.parameters())
    total = torch.cuda.get_device_properties(device).total_memory
    return numel * param_dtype.itemsize <= GATHERED_MEMORY_SHARE * total


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Gradient accumulation: skip the reduce-scatter on all but the last micro-batch. Where the
    gathered blocks are kept from forward to backward anyway (apply_fsdp), they are also kept
    from one micro-batch's backward to the next one's forward: the parameters do not change
    within a step, so every micro-batch after the first needs no all-gather, no copy into the
    compute dtype and no resharding, at no cost to peak memory (which is reached in backward
    with every block gathered)."""
    if not hasattr(model, "set_requires_gradient_sync"):  # no FSDP (one process): nothing to reduce
        return
    model.set_requires_gradient_sync(enabled)
    if getattr(model, "keeps_gathered_blocks", False):
        model.set_reshard_after_backward(enabled)


def reshard(model: nn.Module) -> None:
    """Frees every gathered FSDP unit. A forward with no backward (validation) leaves the units
    kept gathered from forward to backward gathered, holding their memory, and a checkpoint's
    optimizer state would then not find its sharded parameters in the model."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
