"""Pure-torch pieces of the fused linear cross-entropy.

`linear_cross_entropy_ref` materialises the logits and lets autograd differentiate: it is the
test oracle. `logit_stats_ref` and `logit_grad_ref_` are the two per-row steps of the chunked
algorithm in `cross_entropy.py` (the torch backend; the Triton kernels there do the same work).

The loss of one token with target t over logits z (after the optional softcap
z = cap * tanh(logit / cap)), label smoothing eps and z-loss weight zl:
    loss = lse - (1 - eps) * z_t - eps / V * sum_j z_j + zl * lse^2,   lse = logsumexp_j z_j
and its gradient with respect to z_j:
    (1 + 2 zl lse) softmax_j - eps / V - (1 - eps) [j == t]
"""

import torch

REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softcap_ref(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else cap * torch.tanh(logits / cap)


def linear_cross_entropy_ref(x, weight, target, bias=None, ignore_index=-100, reduction="mean",
                             label_smoothing=0.0, z_loss=0.0, logit_softcap=None):
    ct = _compute_dtype(x.dtype)
    logits = x.to(ct) @ weight.to(ct).T
    if bias is not None:
        logits = logits + bias.to(ct)
    z = softcap_ref(logits, logit_softcap)
    lse = torch.logsumexp(z, dim=-1)
    valid = target != ignore_index
    z_t = z.gather(-1, torch.where(valid, target, 0)[:, None])[:, 0]
    loss = lse - (1 - label_smoothing) * z_t - label_smoothing * z.mean(-1) + z_loss * lse**2
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    if reduction == "sum":
        return loss.sum()
    return loss


def logit_stats_ref(logits, target_local, softcap):
    """Per row of a logits chunk [n, V_local]: (logsumexp, logit of the target or 0 when the
    target lies outside this vocabulary shard, sum of logits), all fp32, after the softcap."""
    z = softcap_ref(logits.to(_compute_dtype(logits.dtype)), softcap)
    v = z.shape[-1]
    inside = (target_local >= 0) & (target_local < v)
    z_t = z.gather(-1, target_local.clamp(0, v - 1)[:, None])[:, 0] * inside
    return torch.logsumexp(z, dim=-1), z_t, z.sum(-1)


def logit_grad_ref_(logits, target_local, lse, row_scale, label_smoothing, z_loss, softcap, vocab_size):
    """Overwrite logits [n, V_local] with d loss / d logits, each row times row_scale."""
    ct = _compute_dtype(logits.dtype)
    raw = logits.to(ct)
    z = softcap_ref(raw, softcap)
    lse = lse.to(ct)[:, None]
    grad = torch.exp(z - lse) * (1 + 2 * z_loss * lse) - label_smoothing / vocab_size
    v = z.shape[-1]
    inside = (target_local >= 0) & (target_local < v)
    onehot = torch.zeros_like(grad).scatter_(-1, target_local.clamp(0, v - 1)[:, None], 1.0) * inside[:, None]
    grad = grad - (1 - label_smoothing) * onehot
    if softcap is not None:
        grad = grad * (1 - (z / softcap) ** 2)
    logits.copy_(grad * row_scale.to(ct)[:, None])
    return logits
