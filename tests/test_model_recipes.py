"""The model recipes in train_configs/: each loads, builds on meta, and is named by its size."""

import glob
import os
import re

import pytest
import torch

from flame.config import load_config
from flame.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "train_configs", "*.toml"))
                 if not p.endswith("debug.toml"))
ARCHS = ("transformer", "gated_deltanet", "gla", "deltanet", "retnet", "mamba2", "hybrid_gdn_attn")


def test_every_architecture_has_both_sizes():
    names = [os.path.basename(p) for p in RECIPES]
    for arch in ARCHS:
        sizes = [n for n in names if re.fullmatch(rf"{arch}_[0-9.]+[MB]\.toml", n)]
        assert len(sizes) == 2, (arch, sizes)


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_recipe_builds_and_its_name_states_its_parameter_count(path):
    cfg = load_config(path, [])
    with torch.device("meta"):
        model = build_model(cfg.model)
    n = model.num_params()
    stated = re.search(r"_([0-9.]+)([MB])\.toml$", path)
    value = float(stated.group(1)) * (1e6 if stated.group(2) == "M" else 1e9)
    assert abs(n - value) / n < 0.005, (n, stated.group(0))
    text = open(path).read()
    assert f"{n / 1e6:.1f}M parameters" in text
    assert f"{model.num_params(include_embeddings=False) / 1e6:.1f}M without embeddings" in text
    assert cfg.training.seq_len * cfg.training.global_batch_size == 524_288
    assert "Token budget" in text
    # the counts feeding MFU are positive and grow with the sequence for attention only
    f1, f2 = model.flops_per_token(2048), model.flops_per_token(16384)
    uses_attention = "attention" in cfg.model.layer_mixers()
    assert (f2 > f1) if uses_attention else (f2 == f1)
