"""One-process mixed precision (flame/precision.py): compute copies and fp32 gradient
accumulation in flat buffers give the gradients of the model cast to the compute dtype, summed in
fp32 over micro-batches; the optimizer and checkpoints see fp32 parameters."""

import copy
import os

import pytest
import torch

from flame.config import load_config
from flame.models import build_model
from flame.precision import ALIGN, ComputeCopies, build_compute_copies

DEBUG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_configs", "debug.toml")


def tiny_model(tie: bool):
    cfg = load_config(DEBUG, ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "2",
                              "--model.n_kv_heads", "1", "--model.vocab_size", "256",
                              "--model.tie_embeddings", "true" if tie else "false"])
    torch.manual_seed(0)
    return build_model(cfg.model)


def batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (2, 32), generator=gen), torch.randint(0, 256, (2, 32), generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gradients_are_the_compute_dtype_model_s_summed_in_fp32(tie):
    model = tiny_model(tie)
    reference = copy.deepcopy(model).to(torch.bfloat16)  # what every micro-batch computes with
    masters = {n: p.detach().clone() for n, p in model.named_parameters()}
    copies = ComputeCopies(model, torch.bfloat16)
    data = batches(3)

    expected = {}
    for x, y in data:
        reference.zero_grad(set_to_none=True)
        reference(x, labels=y).backward()
        for n, p in reference.named_parameters():
            g = p.grad.float()
            expected[n] = g if n not in expected else expected[n].add_(g)

    copies.begin_step()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for x, y in data:
        model(x, labels=y).backward()
        copies.accumulate()
    copies.end_step()

    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
        assert torch.equal(p, masters[n]), n  # the masters are untouched by the step
        assert torch.equal(p.grad, expected[n]), n
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    # every slice of the flat buffers starts aligned
    assert all(m.storage_offset() % ALIGN == 0 for m in copies.masters + copies.copies)


def test_parameters_used_late_or_never():
    """A parameter first used by the second micro-batch gets only that gradient; one no
    micro-batch uses keeps no gradient (the optimizer then leaves it alone)."""
    model = tiny_model(tie=False)
    model.register_parameter("spare", torch.nn.Parameter(torch.ones(3)))
    model.register_parameter("late", torch.nn.Parameter(torch.ones(3)))
    copies = ComputeCopies(model, torch.bfloat16)
    (x, y), (x2, y2) = batches(2)
    for _ in range(2):  # the second step's sums must not start from the first's
        copies.begin_step()
        model(x, labels=y).backward()
        copies.accumulate()
        (model(x2, labels=y2) + 2.0 * model.late.sum()).backward()
        copies.accumulate()
        copies.end_step()
        assert model.spare.grad is None
        assert torch.equal(model.late.grad, torch.full((3,), 2.0))
        assert model.lm_head.weight.grad is not None


def test_optimizer_updates_reach_the_next_step_s_copies():
    model = tiny_model(tie=True)
    copies = ComputeCopies(model, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    (x, y), = batches(1)
    losses = []
    for _ in range(3):
        copies.begin_step()
        loss = model(x, labels=y)
        loss.backward()
        copies.accumulate()
        copies.end_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        copies.begin_step()
        for p, m in zip(copies.params, copies.masters):
            assert torch.equal(p, m.to(torch.bfloat16))  # the compute copies follow the update
        copies.end_step()
    assert losses[2] < losses[0]
    assert all(p.dtype == torch.float32 for p in opt.param_groups[0]["params"])


def test_checkpoint_loads_reach_the_copies():
    """A state dict loaded in place (as a checkpoint is) is what the next step computes with."""
    model = tiny_model(tie=False)
    other = {k: torch.randn_like(v) for k, v in tiny_model(tie=False).state_dict().items()}
    copies = ComputeCopies(model, torch.bfloat16)
    model.load_state_dict(other)
    copies.begin_step()
    for name, p in model.named_parameters():
        assert torch.equal(p, other[name].to(torch.bfloat16)), name
    copies.end_step()


def test_misuse_is_refused():
    model = tiny_model(tie=True)
    copies = ComputeCopies(model, torch.bfloat16)
    copies.begin_step()
    with pytest.raises(RuntimeError, match="twice"):
        copies.begin_step()
    copies.end_step()
    next(model.parameters()).data = torch.zeros_like(next(model.parameters()))
    with pytest.raises(RuntimeError, match="no longer lives in the flat master buffer"):
        copies.begin_step()
    with pytest.raises(ValueError, match="fp32 master"):
        ComputeCopies(tiny_model(tie=True).to(torch.bfloat16), torch.bfloat16)


def test_only_one_cuda_process_in_16_bits_gets_copies():
    model = tiny_model(tie=True)
    cuda = torch.device("cuda")
    assert build_compute_copies(model, 1, torch.device("cpu"), "bfloat16") is None
    assert build_compute_copies(model, 2, cuda, "bfloat16") is None
    assert build_compute_copies(model, 1, cuda, "float32") is None
    assert isinstance(build_compute_copies(model, 1, cuda, "bfloat16"), ComputeCopies)
