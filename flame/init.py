"""Initial weights that do not depend on the parallel layout.

A parallelised model holds only this rank's shard of each parameter (FSDP2, tensor parallelism,
both). Drawing random numbers shard by shard would give other weights for every layout, so a
run on 1, 2 or 8 GPUs, or with TP=2, would start from a different model. Instead each unit of
the model (the embeddings, every block, the final norm, the output head) is initialised at full
size, one unit at a time, on an unsharded copy built on the meta device, with a random seed
derived from the run's seed and the unit's name; every rank then keeps its slice of each
parameter. The weights are therefore the same whatever the number of GPUs or the layout, and
only one unit is ever held at full size.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

# names that wrappers (activation checkpointing, compile) insert into parameter names
_WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod")


def canonical_name(name: str) -> str:
    """A parameter's name without the parts that wrappers insert."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def model_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children, with each element of a ModuleList (the blocks) a unit of its own."""
    units = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            units += [(f"{name}.{i}", block) for i, block in enumerate(child)]
        else:
            units.append((name, child))
    return units


def unit_seed(seed: int, unit: str) -> int:
    # crc32, not hash(): Python's string hash changes from process to process
    return zlib.crc32(f"{seed}:{unit}".encode())


@torch.no_grad()
def init_layout_independent(model: nn.Module, template: nn.Module, seed: int,
                            device: torch.device) -> None:
    """Initialise the (possibly sharded) parameters of `model` in place.

    `template` is the same architecture, unsharded and unwrapped, on the meta device, with an
    `init_weights()` that initialises every parameter (on meta tensors it does nothing, so each
    call only touches the one unit materialised at that moment).
    """
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    done = set()
    for unit_name, unit in model_units(template):
        unit.to_empty(device=device)
        torch.manual_seed(unit_seed(seed, unit_name))
        template.init_weights()
        for name, full in unit.named_parameters(prefix=unit_name):
            if name not in params:
                raise RuntimeError(f"parameter {name} of the unsharded model is missing from the parallelised one")
            _copy_local_slice(params[name], full)
            done.add(name)
        unit.to(device="meta")
    missing = sorted(set(params) - done)
    if missing:
        raise RuntimeError(f"parameters not initialised: {missing[:5]}")


def _copy_local_slice(param: torch.Tensor, full: torch.Tensor) -> None:
    if not isinstance(param, DTensor):
        param.copy_(full)
        return
    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if local.numel() == 0:
        return
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    local.copy_(full[index])
