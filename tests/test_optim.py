"""flame.optim: AdamW and gradient clipping on local shards give torch's results on DTensors."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

from flame import optim


@pytest.fixture
def mesh(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def sharded_params(mesh, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=g), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.randn(shape, generator=g), mesh, [Shard(0)])
        params.append(p)
    return params


def full(x):
    return x.full_tensor() if isinstance(x, DTensor) else x


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_adamw_on_local_shards_equals_torch_on_dtensors(mesh, implementation):
    shapes = [(8, 4), (6,), (5, 3)]
    ours, theirs = sharded_params(mesh, shapes), sharded_params(mesh, shapes)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **{implementation: True})
    a = optim.AdamW([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}], **kwargs)
    b = torch.optim.AdamW([{"params": theirs[:2]}, {"params": theirs[2:], "weight_decay": 0.0}], **kwargs)
    for step in range(3):
        for p, q in zip(ours, theirs):
            p.grad = distribute_tensor(torch.full(p.shape, 0.1 * (step + 1)), mesh, [Shard(0)])
            q.grad = copy.deepcopy(p.grad)
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(full(p), full(q))
        # the states stay DTensors (checkpoints reshard them)
        assert isinstance(a.state[p]["exp_avg"], DTensor)
        assert torch.equal(full(a.state[p]["exp_avg_sq"]), full(b.state[q]["exp_avg_sq"]))
    assert not torch.equal(full(ours[0]), sharded_params(mesh, shapes)[0].full_tensor())  # it moved
    # and the kernels got the local shards, not DTensors
    lists = [[] for _ in range(6)]
    a._init_group(a.param_groups[0], *lists)
    assert lists[0] and all(not isinstance(t, DTensor) for t in lists[0] + lists[1] + lists[2] + lists[3])


def test_adamw_keeps_dtensor_path_for_partial_gradients(mesh):
    (p,), (q,) = sharded_params(mesh, [(4, 4)]), sharded_params(mesh, [(4, 4)])
    grad = torch.randn(4, 4)
    p.grad = DTensor.from_local(grad.clone(), mesh, [Partial()])
    q.grad = DTensor.from_local(grad.clone(), mesh, [Partial()])
    assert not optim._shards_alike(p, p.grad)
    optim.AdamW([p], lr=1e-2, foreach=True).step()
    torch.optim.AdamW([q], lr=1e-2, foreach=True).step()
    assert torch.equal(full(p), full(q))


@pytest.mark.parametrize("max_norm", [0.5, 1e9, 0.0, float("inf")])
def test_clip_grad_norm_matches_torch(mesh, max_norm):
    shapes = [(8, 4), (6,), (5, 3)]
    ours, theirs = sharded_params(mesh, shapes), sharded_params(mesh, shapes)
    plain = [torch.nn.Parameter(full(p).clone()) for p in theirs]
    for p, q in zip(plain, theirs):
        p.grad = full(q.grad).clone()
    total = optim.clip_grad_norm_(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(plain, max_norm if max_norm > 0 else float("inf"))
    assert total.dtype == torch.float32 and total.dim() == 0
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    for p, q in zip(ours, plain):
        torch.testing.assert_close(full(p.grad), q.grad, rtol=1e-6, atol=0)
    if 0 < max_norm < 1.0:
        assert optim.clip_grad_norm_(ours, float("inf")).item() == pytest.approx(max_norm, rel=1e-5)


def test_clip_grad_norm_with_partial_gradients_and_plain_tensors(mesh):
    (p,) = sharded_params(mesh, [(4, 4)])
    grad = torch.randn(4, 4)
    p.grad = DTensor.from_local(grad.clone(), mesh, [Partial()])
    plain = torch.nn.Parameter(torch.zeros(3))
    plain.grad = torch.tensor([3.0, 0.0, 4.0])
    assert optim.clip_grad_norm_([p], 0.5).item() == pytest.approx(grad.norm().item(), rel=1e-6)
    assert optim.clip_grad_norm_([plain], 1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(plain.grad, torch.tensor([0.6, 0.0, 0.8]), rtol=1e-5, atol=0)
    assert optim.clip_grad_norm_([torch.nn.Parameter(torch.zeros(2))], 1.0).item() == 0.0


def _optimizer_and_schedule(lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, total=20):
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    opt = optim.AdamW([{"params": [w], "weight_decay": weight_decay}, {"params": [b], "weight_decay": 0.0}],
                      lr=lr, betas=betas, eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)
    return [w, b], opt, sched


def _train(params, opt, sched, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()


def test_resume_settings_come_from_the_config():
    params, opt, sched = _optimizer_and_schedule(1e-3)
    _train(params, opt, sched, 5)
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())

    # Same config: nothing reported, every value as loaded (bit for bit).
    params2, opt2, sched2 = _optimizer_and_schedule(1e-3)
    settings = optim.config_settings([opt2])
    opt2.load_state_dict(copy.deepcopy(saved_opt))
    sched2.load_state_dict(copy.deepcopy(saved_sched))
    assert optim.restore_config_settings([opt2], [sched2], settings, next_step=6) == []
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]

    # Another lr, betas, weight decay and schedule length: the config's apply from the next step.
    params3, opt3, sched3 = _optimizer_and_schedule(2e-4, betas=(0.9, 0.99), weight_decay=0.01, total=40)
    settings = optim.config_settings([opt3])
    opt3.load_state_dict(copy.deepcopy(saved_opt))
    sched3.load_state_dict(copy.deepcopy(saved_sched))
    assert opt3.param_groups[0]["lr"] == opt.param_groups[0]["lr"]  # what a checkpoint alone restores
    lines = optim.restore_config_settings([opt3], [sched3], settings, next_step=6)
    text = "\n".join(lines)
    for needle in ("optimizer.lr: 0.0002 in this run's config, 0.001 in the checkpoint",
                   "optimizer.beta1 / optimizer.beta2: (0.9, 0.99)", "optimizer.weight_decay: 0.01",
                   "learning rate of step 6: 1.750e-04"):
        assert needle in text, text
    assert "optimizer.eps" not in text
    assert [g["lr"] for g in opt3.param_groups] == [2e-4 * (1 - 5 / 40)] * 2
    assert opt3.param_groups[0]["betas"] == (0.9, 0.99) and opt3.param_groups[1]["weight_decay"] == 0.0
    assert opt3.state[params3[0]]["step"] == 5  # the moments and step count stay the checkpoint's
    sched3.step()
    assert opt3.param_groups[0]["lr"] == pytest.approx(2e-4 * (1 - 6 / 40))
