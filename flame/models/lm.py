"""LanguageModel: embeddings -> blocks -> final norm -> fused linear cross-entropy.

Every block is the same pre-norm residual block; only its token mixer differs:

    x = x + mixer(mixer_norm(x))
    x = x + mlp(mlp_norm(x))

Each residual add runs inside the norm after it (one kernel reads both terms and writes the sum
and its normalisation), so a block takes the residual stream and the previous block's MLP output
separately, and the final norm adds the last one.

The loss is computed from the final hidden states by FusedLinearCrossEntropyLoss, so training
never materialises the [tokens, vocab] logits.
"""

import math

import torch
from torch import nn

from flame import modules
from flame.kernels.utils import check_max_seqlen
from flame.models.config import ModelConfig
from flame.models.mlp import build_mlp


# Smallest bound bucketed_max_seqlen hands the blocks: shorter longest documents share it.
MIN_SEQLEN_BUCKET = 1024


def bucketed_max_seqlen(max_seqlen: int | None, row: int) -> int:
    """The bound on the longest document that the blocks see: max_seqlen (or the row length)
    rounded up to a power of two of at least MIN_SEQLEN_BUCKET, and at most the row length.

    Every kernel takes it as an upper bound only, but a compiled block specialises on the ints
    that some ops take (varlen attention's max_q / max_k on CUDA) and recompiles for each new
    value, against a cap on the graphs per code object (`parallel.apply_compile`): a batch's
    longest document varies from step to step, its power of two only over a few values. The
    delta rule's long-document decision (max_seqlen > 8192, a power of two) is the same for the
    bucket as for the bound."""
    bound = row if max_seqlen is None else min(max_seqlen, row)
    if not isinstance(bound, int):  # symbolic: the whole model is being compiled, which guards as it must
        return bound
    return min(row, max(MIN_SEQLEN_BUCKET, 1 << (bound - 1).bit_length()))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: nn.Module):
        super().__init__()
        self.mixer_norm = modules.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mixer = mixer
        self.mlp_norm = modules.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = build_mlp(cfg)

    def forward(self, x, update=None, cu_seqlens=None, position_ids=None, state=None, use_cache=False,
                max_seqlen=None):
        """x: the residual stream, to which `update` (the previous block's MLP output) is still to
        be added. Returns (residual stream, this block's MLP output, decoding state): the block's
        output is their sum, which the next block's first norm (or the final norm) forms."""
        if update is None:
            normed = self.mixer_norm(x)
        else:
            normed, x = self.mixer_norm(update, residual=x)
        h, new_state = self.mixer(normed, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                  state=state, use_cache=use_cache, max_seqlen=max_seqlen)
        normed, x = self.mlp_norm(h, residual=x)
        return x, self.mlp(normed), new_state


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, mixers: list[nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, m) for m in mixers)
        self.norm = modules.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        """The [vocab, dim] matrix that maps final hidden states to logits."""
        return self.embeddings.weight if self.cfg.tie_embeddings else self.lm_head.weight

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, input_ids, labels=None, cu_seqlens=None, position_ids=None,
                loss_reduction: str = "mean", max_seqlen: int | None = None):
        """The loss (labels given; "mean" over labels != -100, or "sum") or logits [B, T, V].

        cu_seqlens (int32 [N + 1]) delimits the documents of the flattened B * T tokens; every
        row start must be one of its boundaries (as flame's data loader makes them), so that no
        document is longer than a row. max_seqlen: with cu_seqlens, the longest document's
        tokens where the caller knows it without reading the device (the trainer takes it from
        the host's copy of cu_seqlens); the row length otherwise. It must not be smaller than
        any document: attention sizes its kernel grid with it and the delta-rule kernels pick
        how their serial passes run by it."""
        hidden, _ = self.hidden_states(input_ids, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                       max_seqlen=max_seqlen)
        if labels is None:
            return self.logits(hidden)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction = {loss_reduction!r}: use 'mean' or 'sum'")
        weight = self.output_weight
        if torch.is_autocast_enabled(hidden.device.type):
            # autocast does not reach the fused loss (a custom autograd function): give it the
            # output matmul's operands in the autocast dtype, as autocast gives every other matmul
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        loss_fn = modules.FusedLinearCrossEntropyLoss(reduction=loss_reduction)
        return loss_fn(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1))

    def hidden_states(self, input_ids, cu_seqlens=None, position_ids=None, states=None,
                      use_cache: bool = False, max_seqlen: int | None = None):
        """Final normalised hidden states [B, T, D] and, with use_cache, the per-layer decoding
        states (a list, one entry per layer, in each mixer's documented format). max_seqlen as
        in forward."""
        check_max_seqlen(max_seqlen)
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            # the mixers see one flattened sequence whose documents cu_seqlens delimits
            B, T = input_ids.shape
            x = self.embeddings(input_ids.reshape(1, B * T))
            if position_ids is not None:
                position_ids = position_ids.reshape(1, B * T)
        else:
            B = None
            x = self.embeddings(input_ids)
        # every row start is a document boundary, so no document is longer than a row
        row = input_ids.shape[1]
        max_seqlen = bucketed_max_seqlen(max_seqlen, row) if cu_seqlens is not None else None
        new_states = [] if use_cache else None
        update = None
        for i, layer in enumerate(self.layers):
            x, update, s = layer(x, update, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                 state=None if states is None else states[i], use_cache=use_cache,
                                 max_seqlen=max_seqlen)
            if use_cache:
                new_states.append(s)
        x = self.norm(x) if update is None else self.norm(update, residual=x)[0]
        if B is not None:
            x = x.reshape(input_ids.shape[0], input_ids.shape[1], -1)
        return x, new_states

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.output_weight.t()

    # ---- initialisation, parameters, FLOPs -----------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer, e.g. after `to_empty()` from meta."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embeddings.weight, std=std)
        for norm in self._norms():
            _reset_norm(norm)
        for layer in self.layers:
            layer.mixer.init_weights(std, out_std)
            nn.init.normal_(layer.mlp.gate_proj.weight, std=std)
            nn.init.normal_(layer.mlp.up_proj.weight, std=std)
            nn.init.normal_(layer.mlp.down_proj.weight, std=out_std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    def _norms(self):
        norm_types = tuple(getattr(modules, n) for n in ("RMSNorm", "GatedRMSNorm") if hasattr(modules, n))
        return [m for m in self.modules() if isinstance(m, norm_types)]

    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.embeddings.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on weight matrices (projections, MLPs, conv filters); none on
        embeddings, norms, biases and per-head constants (A_log, dt_bias, decays, D)."""
        no_decay_ids = {id(self.embeddings.weight)}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in no_decay_ids or p.ndim < 2 or getattr(p, "_no_weight_decay", False):
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length seq_len.

        = 6 x (weights used in matmuls: every projection, MLP and short-conv weight, plus the
          output head, counted also when tied to the embeddings; not the embedding lookup)
        + the sequence-mixing FLOPs of each layer's mixer (`mixer.flops_per_token`): for softmax
          attention 3 x 4 x heads x head_dim x (mean causal keys per query); for the chunked
          linear mixers the matmuls their chunked kernels execute (see each mixer).
        Norms, activations and gates are elementwise and not counted.
        """
        matmul = 0
        for name, p in self.named_parameters():
            if p.ndim >= 2 and p is not self.embeddings.weight:
                matmul += p.numel()
        if self.cfg.tie_embeddings:
            matmul += self.embeddings.weight.numel()
        mixing = sum(layer.mixer.flops_per_token(seq_len) for layer in self.layers)
        return 6 * matmul + mixing


@torch.no_grad()
def _reset_norm(norm: nn.Module) -> None:
    if hasattr(norm, "reset_parameters"):
        norm.reset_parameters()
    else:
        nn.init.ones_(norm.weight)
