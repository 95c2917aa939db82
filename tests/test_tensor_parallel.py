"""Tensor parallelism on 2 gloo processes (CPU, float64): every block (each token mixer with the
sequence-parallel norms and the MLP) and the whole language model (a hybrid of all mixers,
vocab-parallel embedding and loss; eager, and with blocks compiled alone or inside activation
checkpointing) give the outputs and gradients of the single-process module;
and the layouts tensor parallelism cannot split are refused with a clear message."""

import contextlib
import copy
import os

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from flame.config import ParallelismConfig
from flame.models import MIXERS, ModelConfig, build_model
from flame.parallel import apply_checkpointing_and_compile
from flame.tensor_parallel import (apply_tensor_parallel, check_parallel_layout, check_tensor_parallel,
                                   parallelize_block, reduce_partial_grads)
from tests.gloo_ranks import run_on_ranks

WORLD = 2
B, T = 2, 16


def tiny(**kw) -> ModelConfig:
    base = dict(mixer="gated_deltanet", vocab_size=96, dim=64, n_layers=1, n_heads=4, head_dim=16,
                attn_n_heads=4, n_kv_heads=2, mlp_hidden_dim=64, conv_size=4)
    base.update(kw)
    return ModelConfig(**base)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _with_mesh(rank, fn):
    os.environ["FLAME_BACKEND"] = "torch"
    fn(rank, init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",)))


def run_on_two_ranks(fn):
    run_on_ranks(_with_mesh, WORLD, fn)


# ---- workers (run on both ranks) --------------------------------------------------------

TOL = 1e-9  # float64 throughout: only summation order differs


def _check_grads(ref: torch.nn.Module, mine: torch.nn.Module, what: str) -> None:
    reduce_partial_grads(mine)
    ref_params = dict(ref.named_parameters())
    seen = 0
    for name, p in mine.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")  # the checkpoint wrapper's level
        want = ref_params[name].grad
        assert p.grad is not None, f"{what}: no gradient for {name}"
        got = full(p.grad)
        assert got.shape == want.shape, f"{what}: {name} gradient shape {got.shape} != {want.shape}"
        assert rel(got, want) < TOL, f"{what}: {name} gradient differs, rel {rel(got, want):.2e}"
        seen += 1
    assert seen == len(ref_params), f"{what}: {seen} parameters, the reference has {len(ref_params)}"


# packed documents (cu_seqlens) for every mixer; one batch of separate rows for the softmax
# and the delta-rule kernels' own code paths
BLOCK_CASES = [(m, True) for m in MIXERS] + [("attention", False), ("gated_deltanet", False)]


# Mixers whose projections (and SwiGLU's gate and up, in every block) run as one matmul on this
# rank's rows under tensor parallelism, as in one process (GLA's gate down-projection is
# replicated, so its projections keep separate calls).
FUSED_PROJECTIONS = {"gated_deltanet", "deltanet", "retnet"}


@contextlib.contextmanager
def _counted_concat_linear():
    """Counts the fused projections of the mixers and of SwiGLU inside the block (eager only:
    compiled code would guard on the counts)."""
    from flame.models.mixers import common
    from flame.modules import swiglu

    calls = {"mixer": 0, "mlp": 0}
    saved = {module: module.concat_linear for module in (common, swiglu)}
    for module, key in ((common, "mixer"), (swiglu, "mlp")):
        def counted(*args, _fn=saved[module], _key=key):
            calls[_key] += 1
            return _fn(*args)
        module.concat_linear = counted
    try:
        yield calls
    finally:
        for module, fn in saved.items():
            module.concat_linear = fn


def _blocks_worker(rank, mesh):
    with _counted_concat_linear() as calls:
        _blocks(rank, mesh, calls)
    os.environ["FLAME_TP_FUSED_PROJECTIONS"] = "0"  # one ColwiseParallel call per projection
    try:
        with _counted_concat_linear() as calls:
            _blocks(rank, mesh, calls, fused=False)
    finally:
        del os.environ["FLAME_TP_FUSED_PROJECTIONS"]


def _blocks(rank, mesh, calls, fused=True):
    torch.manual_seed(0)
    for mixer, packed in BLOCK_CASES:
        cfg = tiny(mixer=mixer, rope_theta=500.0)
        ref = build_model(cfg).double().layers[0]
        mine = copy.deepcopy(ref)
        parallelize_block(mine, mesh)
        shape = (1, B * T, cfg.dim) if packed else (B, T, cfg.dim)
        # documents that straddle the boundary between the two ranks' token slices
        cu = torch.tensor([0, 5, 19, 27, B * T], dtype=torch.int32) if packed else None
        x = torch.randn(shape, dtype=torch.float64)
        dy = torch.randn(shape, dtype=torch.float64)
        n = shape[1] // WORLD
        mine_slice = slice(rank * n, (rank + 1) * n)

        x_ref = x.clone().requires_grad_()
        y_ref = sum(ref(x_ref, cu_seqlens=cu)[:2])  # residual stream + the block's MLP output
        y_ref.backward(dy)

        x_mine = x[:, mine_slice].clone().requires_grad_()
        before = dict(calls)
        y_mine = sum(mine(x_mine, cu_seqlens=cu)[:2])
        y_mine.backward(dy[:, mine_slice])

        what = f"rank {rank}, {mixer} block, packed={packed}"
        what += "" if fused else ", FLAME_TP_FUSED_PROJECTIONS=0"
        assert calls["mlp"] - before["mlp"] == fused, f"{what}: SwiGLU's gate and up fused: {not fused}"
        n = calls["mixer"] - before["mixer"]
        assert n == (fused and mixer in FUSED_PROJECTIONS), f"{what}: {n} fused projection calls"
        assert not isinstance(y_mine, DTensor)
        assert rel(y_mine, y_ref[:, mine_slice]) < TOL, f"{what}: output differs"
        assert rel(x_mine.grad, x_ref.grad[:, mine_slice]) < TOL, f"{what}: input gradient differs"
        _check_grads(ref, mine, what)


def _model_worker(rank, mesh):
    torch.manual_seed(1)
    layers = list(MIXERS)  # a hybrid with one layer of every mixer
    # compiled: each block compiled on its own as the trainer does, alone or inside activation
    # checkpointing (aot_eager: the graphs and their autograd as inductor gets them, without
    # inductor's code generation)
    for tie, compiled in ((True, False), (False, False), (True, "none"), (False, "full")):
        cfg = tiny(mixer=layers, n_layers=len(layers), tie_embeddings=tie)
        ref = build_model(cfg).double()
        mine = apply_tensor_parallel(copy.deepcopy(ref), mesh)
        if compiled:
            apply_checkpointing_and_compile(mine, checkpoint=compiled, compile_backend="aot_eager",
                                            tensor_parallel=True)
        ids = torch.randint(0, cfg.vocab_size, (B, T))
        labels = torch.randint(0, cfg.vocab_size, (B, T))
        labels[:, :3] = -100
        cu = torch.tensor([0, 7, 16, 20, B * T], dtype=torch.int32)
        what = f"rank {rank}, hybrid model, tie_embeddings={tie}, compiled blocks (checkpointing)={compiled}"

        loss_ref = ref(ids, labels=labels, cu_seqlens=cu)
        loss_ref.backward()
        loss_mine = mine(ids, labels=labels, cu_seqlens=cu)
        loss_mine.backward()
        assert rel(loss_mine, loss_ref) < TOL, f"{what}: loss {loss_mine.item()} != {loss_ref.item()}"
        _check_grads(ref, mine, what)
        if compiled:  # below: the same code as without compile
            continue

        with torch.no_grad():
            logits_ref = ref(ids, cu_seqlens=cu)
            logits_mine = mine(ids, cu_seqlens=cu)
        assert logits_mine.shape == (B, T, cfg.vocab_size)
        assert rel(logits_mine, logits_ref) < TOL, f"{what}: logits differ"

        # the state dict keeps the single-process names and full shapes
        sd_ref = ref.state_dict()
        sd_mine = mine.state_dict()
        assert sorted(sd_mine) == sorted(sd_ref)
        for k, v in sd_mine.items():
            assert full(v).shape == sd_ref[k].shape, k


# ---- tests --------------------------------------------------------------------------------


def _blocks_and_model_worker(rank, mesh):
    _blocks_worker(rank, mesh)
    _model_worker(rank, mesh)


def test_blocks_and_hybrid_model_with_vocab_parallel_loss_match_single_process():
    """One pair of processes for both checks: starting them is most of the cost."""
    run_on_two_ranks(_blocks_and_model_worker)


@pytest.mark.parametrize("kw, tp, words", [
    (dict(mixer="gated_deltanet", n_heads=6, head_dim=16), 4, ["tensor_parallel_degree = 4", "model.n_heads = 6", "or change model.n_heads"]),
    (dict(mixer="mamba2", n_heads=2, head_dim=16), 4, ["model.n_heads = 2", "mamba2"]),
    (dict(mixer="attention", attn_n_heads=4, n_kv_heads=1), 2, ["model.n_kv_heads = 1"]),
    (dict(mixer="attention", attn_n_heads=6, n_kv_heads=6, attn_head_dim=16), 4, ["attn_n_heads", "= 6"]),
    (dict(mixer="gla", attn_layers=[0], n_heads=8, attn_n_heads=8, n_kv_heads=2), 4,
     ["model.n_kv_heads = 2", "attention"]),
    (dict(vocab_size=97), 2, ["model.vocab_size = 97"]),
    (dict(mlp_hidden_dim=66), 4, ["MLP hidden size = 66", "change model.mlp_hidden_dim"]),
])
def test_layouts_that_cannot_be_split_are_refused(kw, tp, words):
    with pytest.raises(ValueError) as e:
        check_tensor_parallel(tiny(**kw).validate(), tp)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_sequence_length_must_split_evenly():
    with pytest.raises(ValueError, match="training.seq_len = 30"):
        check_tensor_parallel(tiny(n_heads=4), 4, seq_len=30)
    check_tensor_parallel(tiny(n_heads=4), 4, seq_len=32)
    check_tensor_parallel(tiny(n_heads=3, head_dim=16, vocab_size=97), 1, seq_len=31)  # TP off: anything


@pytest.mark.parametrize("degrees, world, words", [
    (dict(tensor_parallel_degree=2, data_parallel_shard_degree=2), 2, ["= 4", "2 processes"]),
    (dict(tensor_parallel_degree=3), 4, ["tensor_parallel_degree (3)", "does not divide the 4"]),
    (dict(data_parallel_replicate_degree=2, data_parallel_shard_degree=3), 8, ["= 6", "8 processes"]),
])
def test_degrees_must_multiply_to_the_world_size(degrees, world, words):
    with pytest.raises(ValueError) as e:
        check_parallel_layout(ParallelismConfig(**degrees), world)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_world_size_is_split_into_degrees():
    assert check_parallel_layout(ParallelismConfig(tensor_parallel_degree=2), 8) == (1, 4, 2)
    assert check_parallel_layout(ParallelismConfig(data_parallel_replicate_degree=2,
                                                   tensor_parallel_degree=2), 8) == (2, 2, 2)




def test_fused_projections_switch_rejects_other_values(monkeypatch):
    from flame.modules.concat_linear import tensor_parallel_fusion

    for value, fused in (("1", True), ("0", False)):
        monkeypatch.setenv("FLAME_TP_FUSED_PROJECTIONS", value)
        assert tensor_parallel_fusion() is fused
    monkeypatch.setenv("FLAME_TP_FUSED_PROJECTIONS", "false")
    with pytest.raises(ValueError, match="FLAME_TP_FUSED_PROJECTIONS must be 0 or 1"):
        tensor_parallel_fusion()
