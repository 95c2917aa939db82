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
