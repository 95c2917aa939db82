"""Validation during training: the mean loss per label token over held-out batches
(`[validation]`), with no gradients, every `validation.freq` steps and after the last step.

Each evaluation reads the same batches (the sources from their beginning, in order), so the
values are comparable along a run and across resumed runs. Every rank must run the same number
of forward passes (FSDP and tensor parallelism gather inside them), so with several processes
the ranks agree batch by batch on whether all of them still have one.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.distributed as dist

from flame.data.packing import longest_document
from flame.modules.loss import IGNORE_INDEX
from flame.parallel import reshard
from flame.titan import logger


class Validator:
    def __init__(self, cfg, tokenizer, *, dp_rank: int, dp_size: int, tp: int, device: torch.device):
        from flame.data import build_dataloader

        v = cfg.validation
        self.freq, self.steps = v.freq, v.steps
        self.device, self.tp = device, tp
        self.local_batch_size = v.local_batch_size or cfg.training.local_batch_size
        self.seq_len = v.seq_len or cfg.training.seq_len
        # [data]'s tokenizer, separator and document splitting; read in this process, in order
        data_cfg = dataclasses.replace(cfg.data, sources=v.sources, shuffle=False, num_workers=0)
        self.loader = build_dataloader(data_cfg, tokenizer, seq_len=self.seq_len,
                                       local_batch_size=self.local_batch_size, dp_rank=dp_rank,
                                       dp_world_size=dp_size, seed=cfg.training.seed, infinite=False)
        # sources too small for one batch on some rank are an error now (on every rank, so that
        # rank 0 reports it), not at the first evaluation
        if self._next(iter(self.loader)) is None:
            raise ValueError(
                f"validation.sources hold too few tokens for one row of validation.seq_len = {self.seq_len} "
                f"(+ 1) on each of the {dp_size} data-parallel rank(s): add held-out documents, or lower "
                "validation.seq_len")
        self.short_warned = False
        if dp_rank == 0:
            for i, src in enumerate(v.sources):
                if src in cfg.data.sources:
                    logger.warning(f"validation.sources[{i}] is also a training source ([[data.sources]]): "
                                   "its loss is not a held-out loss")

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.freq == 0

    def _next(self, batches) -> dict | None:
        batch = next(batches, None)
        if dist.is_initialized() and dist.get_world_size() > 1:
            have = torch.tensor([batch is not None], dtype=torch.int32, device=self.device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if not have.item():
                return None
        return batch

    @torch.no_grad()
    def run(self, model: torch.nn.Module, compute_copies=None) -> dict[str, float]:
        """The validation values of the model's current weights: loss, perplexity, label tokens
        (over all ranks) and the seconds the evaluation took."""
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        count = 0
        # the loader's iterator draws from the global generators: keep training's streams as they were
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if compute_copies is not None:
                compute_copies.begin_step()  # the 16-bit copies of this step's updated weights
            try:
                batches = iter(self.loader)
                while self.steps < 0 or count < self.steps:
                    batch = self._next(batches)
                    if batch is None:
                        break
                    longest = longest_document(batch.get("cu_seqlens"))
                    b = {k: t.to(self.device, non_blocking=True) for k, t in batch.items()}
                    loss = model(b["input_ids"], labels=b["labels"], cu_seqlens=b.get("cu_seqlens"),
                                 position_ids=b.get("position_ids"), loss_reduction="sum", max_seqlen=longest)
                    loss_sum += loss.float()
                    tokens += (b["labels"] != IGNORE_INDEX).sum()
                    count += 1
            finally:
                reshard(model)
                if compute_copies is not None:
                    compute_copies.end_step()
        if self.steps > 0 and count < self.steps and not self.short_warned:
            self.short_warned = True
            logger.warning(f"validation.sources ran out after {count} of validation.steps = {self.steps} "
                           "batches per rank; every evaluation uses those")
        if dist.is_initialized() and dist.get_world_size() > 1:
            # the ranks of a tensor-parallel group add the same batch's loss and tokens tp times
            totals = torch.stack([loss_sum.double(), tokens.double()])
            dist.all_reduce(totals)
            loss_sum, tokens = totals[0], totals[1]
        label_tokens = float(tokens) / self.tp
        loss = float(loss_sum) / self.tp / max(label_tokens, 1.0)
        return {"validation_loss": loss,
                "validation_perplexity": math.exp(loss) if loss < 700 else math.inf,
                "validation_tokens": int(label_tokens),
                "validation_seconds": time.perf_counter() - started}
