"""The language-model loss: fused linear cross-entropy over the output projection."""

import torch
from torch import nn

from flame.kernels.cross_entropy import fused_linear_cross_entropy
from flame.kernels.cross_entropy_ref import REDUCTIONS

IGNORE_INDEX = -100  # label value that adds nothing to the loss (the torch and transformers convention)


class FusedLinearCrossEntropyLoss(nn.Module):
    """forward(hidden [N, D], weight [V, D], target [N], bias=None) -> loss, without the N x V
    logits. With process_group, weight is this rank's vocabulary slice (vocab-parallel)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, logit_softcap: float | None = None, process_group=None):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.logit_softcap = logit_softcap
        self.process_group = process_group

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, logit_softcap=self.logit_softcap,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction}, label_smoothing="
                f"{self.label_smoothing}, z_loss={self.z_loss}, logit_softcap={self.logit_softcap}")
