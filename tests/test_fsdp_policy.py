import types

import torch
import torch.nn as nn

from flame import parallel


def test_default_keeps_gathered_blocks_only_when_they_are_small(monkeypatch):
    blocks = [nn.Linear(100, 100, bias=False) for _ in range(4)]  # 40,000 parameters
    gib = 1024 ** 3
    memory = {"total": 80 * gib}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=memory["total"]))
    cuda = torch.device("cuda", 0)
    # 80,000 bytes in bf16 against 5 GiB
    assert parallel.gathered_blocks_fit(blocks, torch.bfloat16, cuda)
    # the same blocks on a card where 1/16 of the memory is below 80,000 bytes
    memory["total"] = 16 * 79_999
    assert not parallel.gathered_blocks_fit(blocks, torch.bfloat16, cuda)
    memory["total"] = 16 * 80_000
    assert parallel.gathered_blocks_fit(blocks, torch.bfloat16, cuda)
    assert not parallel.gathered_blocks_fit(blocks, torch.float32, cuda)  # twice the bytes
    # CPU runs keep the resharding default
    assert not parallel.gathered_blocks_fit(blocks, torch.bfloat16, torch.device("cpu"))


class _RecordingModel:
    """Stands in for an FSDP-wrapped model: records the per-micro-batch settings it receives."""

    def __init__(self, keeps_gathered_blocks):
        if keeps_gathered_blocks is not None:
            self.keeps_gathered_blocks = keeps_gathered_blocks
        self.calls = []

    def set_requires_gradient_sync(self, enabled):
        self.calls.append(("sync", enabled))

    def set_reshard_after_backward(self, enabled):
        self.calls.append(("reshard_after_backward", enabled))


def test_gathered_blocks_stay_gathered_between_micro_batches_only_where_kept_after_forward():
    kept = _RecordingModel(True)
    for last in (False, False, True):
        parallel.set_gradient_sync(kept, last)
    assert kept.calls == [("sync", False), ("reshard_after_backward", False),
                          ("sync", False), ("reshard_after_backward", False),
                          ("sync", True), ("reshard_after_backward", True)]
    for keeps in (False, None):  # blocks freed after forward, or a model built elsewhere
        freed = _RecordingModel(keeps)
        parallel.set_gradient_sync(freed, False)
        parallel.set_gradient_sync(freed, True)
        assert freed.calls == [("sync", False), ("sync", True)]


def test_gradient_sync_is_left_alone_without_fsdp():
    """One process runs without FSDP (flame/precision.py): the setting has nothing to act on."""
    model = nn.Linear(4, 4)
    for last in (False, True):
        parallel.set_gradient_sync(model, last)
    assert not hasattr(model, "set_requires_gradient_sync")


def test_compile_limit_covers_every_kind_of_block():
    """The blocks share one forward, whose graph limit torch.compile counts over all of them: it
    is raised to GRAPHS_PER_BLOCK_KIND for each mixer type (checkpointed blocks apart) and the
    first block, never lowered."""
    from flame.models import ModelConfig, build_model

    cfg = ModelConfig(mixer=["gated_deltanet", "gated_deltanet", "gated_deltanet", "attention"], vocab_size=96,
                      dim=64, n_layers=4, n_heads=4, head_dim=16, attn_n_heads=4, n_kv_heads=2, mlp_hidden_dim=64)
    # config.patch puts the process-wide setting back afterwards
    with torch._dynamo.config.patch(recompile_limit=8):
        parallel.apply_compile(build_model(cfg), backend="eager")
        assert torch._dynamo.config.recompile_limit == 3 * parallel.GRAPHS_PER_BLOCK_KIND
    with torch._dynamo.config.patch(recompile_limit=8):
        parallel.apply_checkpointing_and_compile(build_model(cfg), checkpoint="selective", every=2,
                                                 compile_backend="eager")
        # layers 0 and 2 checkpointed: Gated DeltaNet blocks in and out of the wrapper, attention, the first
        assert torch._dynamo.config.recompile_limit == 4 * parallel.GRAPHS_PER_BLOCK_KIND
    with torch._dynamo.config.patch(recompile_limit=1000):
        parallel.apply_compile(build_model(cfg), backend="eager")
        assert torch._dynamo.config.recompile_limit == 1000
