"""Mixed precision in one process without FSDP: compute copies of the fp32 parameters, made
with one cast from a flat buffer of fp32 masters, and fp32 gradient accumulation.

FSDP2 over a one-process mesh does the same arithmetic, but per parameter in Python: a cast of
every parameter at a step's first forward, and after every micro-batch's backward an add of every
gradient into its fp32 accumulator (~300 parameters in a 24-layer Gated DeltaNet). Here:

    begin_step         compute copies <- fp32 masters (one cast over the flat buffer); each
                       parameter's data is its copy
    after a backward   fp32 accumulators <- (or +=) the micro-batch's gradients (foreach
                       calls); the gradients are dropped
    end_step           each parameter's data is its fp32 master again, its .grad its accumulator

so that the optimizer, gradient clipping and checkpoints see fp32 parameters and gradients, as
under FSDP2, whose one-process path accumulates in the same order (the first micro-batch's
gradient cast, each next one added): the losses of a run are the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # training.mixed_precision_param

# Each parameter's slice of a flat buffer starts at a multiple of this many elements (128 bytes
# in bf16): compiled kernels assume aligned inputs and copy any that are not.
ALIGN = 64


def _layout(params: list[nn.Parameter]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() // ALIGN) * ALIGN
    return offsets, total


def _views(flat: torch.Tensor, params: list[nn.Parameter], offsets: list[int]) -> list[torch.Tensor]:
    return [flat[o:o + p.numel()].view(p.shape) for p, o in zip(params, offsets)]


class ComputeCopies:
    """A model's parameters in `dtype` for the forward and backward of a step's micro-batches,
    with fp32 masters and fp32 accumulated gradients outside them (see the module docstring).

        copies.begin_step()
        for batch in micro_batches:
            model(batch).backward()
            copies.accumulate()
        copies.end_step()   # then clip, optimizer step, zero_grad as usual
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.params = list(model.parameters())
        bad = sorted({str(p.dtype) for p in self.params if p.dtype != torch.float32})
        if bad:
            raise ValueError(f"mixed precision keeps fp32 master parameters; the model has {', '.join(bad)} ones")
        if not self.params:
            raise ValueError("the model has no parameters")
        device = self.params[0].device
        offsets, total = _layout(self.params)
        # The masters move into one flat buffer (their values copied), so that one cast makes the
        # compute copies; checkpoints load into them in place.
        self.master_flat = torch.zeros(total, dtype=torch.float32, device=device)
        self.masters = _views(self.master_flat, self.params, offsets)
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                m.copy_(p)
                p.data = m
        self.copy_flat = torch.zeros(total, dtype=dtype, device=device)
        self.copies = _views(self.copy_flat, self.params, offsets)
        self.accums = [torch.zeros_like(p) if p.requires_grad else None for p in self.params]
        self.in_step = False

    @torch.no_grad()
    def begin_step(self) -> None:
        if self.in_step:
            raise RuntimeError("ComputeCopies.begin_step called twice without end_step")
        for p, m in zip(self.params, self.masters):
            if p.data_ptr() != m.data_ptr():
                raise RuntimeError(
                    "a parameter no longer lives in the flat master buffer (its data was replaced "
                    "after ComputeCopies was built); build ComputeCopies after every such change")
        self.copy_flat.copy_(self.master_flat)
        for p, c in zip(self.params, self.copies):
            p.grad = None
            p.data = c
        self.used = [False] * len(self.params)  # which parameters got a gradient in this step
        self.in_step = True

    @torch.no_grad()
    def accumulate(self) -> None:
        """After a micro-batch's backward: its gradients into the fp32 accumulators, each sum
        started by the first micro-batch of the step that used its parameter; the gradients are
        dropped."""
        started, added = ([], []), ([], [])
        for i, (p, a) in enumerate(zip(self.params, self.accums)):
            if p.grad is not None:
                pair = added if self.used[i] else started
                pair[0].append(a)
                pair[1].append(p.grad)
                self.used[i] = True
                p.grad = None
        if started[0]:
            torch._foreach_copy_(*started)
        if added[0]:
            torch._foreach_add_(*added)

    @torch.no_grad()
    def end_step(self) -> None:
        """Parameters back to their fp32 masters, with the accumulated fp32 gradients as .grad."""
        for p, m, a, used in zip(self.params, self.masters, self.accums, self.used):
            p.grad = None
            p.data = m
            if used:  # a parameter no micro-batch used keeps no gradient, as under FSDP2
                p.grad = a
        self.in_step = False


def build_compute_copies(model: nn.Module, world_size: int, device: torch.device,
                         param_dtype: str) -> ComputeCopies | None:
    """ComputeCopies for a one-process run on CUDA in a 16-bit compute dtype (`param_dtype`, a
    name of DTYPES); None otherwise (several processes: FSDP2 casts and reduces; CPU, or fp32
    compute: nothing to cast)."""
    dtype = DTYPES[param_dtype]
    if world_size != 1 or device.type != "cuda" or dtype == torch.float32:
        return None
    return ComputeCopies(model, dtype)
