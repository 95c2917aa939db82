"""Initial weights do not depend on the parallel layout (flame/init.py): one process, FSDP2 over
2 gloo ranks, and tensor parallelism over 2 ranks start from the same full weights."""


import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from flame.init import canonical_name, init_layout_independent
from flame.models import ModelConfig, build_model
from flame.tensor_parallel import apply_tensor_parallel
from tests.gloo_ranks import run_on_ranks

SEED = 7


def tiny(**kw) -> ModelConfig:
    base = dict(mixer="gated_deltanet", attn_layers=[1], vocab_size=96, dim=64, n_layers=3,
                n_heads=4, head_dim=16, attn_n_heads=4, n_kv_heads=2, mlp_hidden_dim=64)
    base.update(kw)
    return ModelConfig(**base)


def initialised(cfg, parallelize=None, seed=SEED) -> torch.nn.Module:
    with torch.device("meta"):
        model, template = build_model(cfg), build_model(cfg)
    if parallelize is not None:
        parallelize(model)
    model.to_empty(device="cpu")
    init_layout_independent(model, template, seed, torch.device("cpu"))
    return model


def full_state(model) -> dict[str, torch.Tensor]:
    return {canonical_name(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def _worker(rank, layout, out):
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=(layout,))

    def fsdp(model):
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def tp(model):
        apply_tensor_parallel(model, mesh)

    model = initialised(tiny(), fsdp if layout == "fsdp" else tp)
    assert any(isinstance(p, DTensor) for p in model.parameters())
    state = full_state(model)
    if rank == 0:
        torch.save(state, out)


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_two_rank_layouts_start_from_the_one_process_weights(tmp_path, layout):
    out = str(tmp_path / "state.pt")
    run_on_ranks(_worker, 2, layout, out)
    sharded = torch.load(out)
    single = full_state(initialised(tiny()))
    assert sharded.keys() == single.keys()
    for name, value in single.items():
        assert torch.equal(sharded[name], value), name


def test_init_follows_each_module_and_the_seed():
    cfg = tiny()
    state = full_state(initialised(cfg))
    # every block draws its own numbers, and a different seed gives other weights
    assert not torch.equal(state["layers.0.mixer.q_proj.weight"], state["layers.2.mixer.q_proj.weight"])
    other = full_state(initialised(cfg, seed=SEED + 1))
    assert not torch.equal(state["embeddings.weight"], other["embeddings.weight"])
    # the model's own init_weights decides the distributions: std of the embeddings, ones for norms
    assert abs(state["embeddings.weight"].std().item() - cfg.init_std) < 0.2 * cfg.init_std
    assert torch.equal(state["norm.weight"], torch.ones_like(state["norm.weight"]))
    # nothing left uninitialised (to_empty leaves arbitrary memory): all finite
    assert all(torch.isfinite(v).all() for v in state.values())
