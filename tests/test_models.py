"""ModelConfig validation, LanguageModel construction, loss, init, parameter groups, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F

from flame.models import MIXERS, ModelConfig, build_model
from test_model_fallbacks import install_missing


@pytest.fixture(autouse=True)
def stand_ins(monkeypatch):
    install_missing(monkeypatch)


def tiny(**kw) -> ModelConfig:
    base = dict(mixer="attention", vocab_size=97, dim=64, n_layers=2, n_heads=4, head_dim=16,
                n_kv_heads=2, mlp_hidden_dim=96, conv_size=4)
    base.update(kw)
    return ModelConfig(**base)


# ---- config errors ----------------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    (dict(dim=100, n_heads=3, head_dim=None), ["n_heads", "divide", "dim"]),
    (dict(mixer="attention", n_heads=3, head_dim=None, dim=64), ["attn_n_heads", "divide"]),
    (dict(mixer="mamba"), ["unknown mixer 'mamba'", "gated_deltanet", "retnet"]),
    (dict(mixer=["attention", "lstm"]), ["unknown mixer 'lstm'"]),
    (dict(mixer=["attention"]), ["mixer lists 1", "n_layers"]),
    (dict(mixer="gla", head_dim=24), ["head_dim", "multiples of 16"]),
    (dict(mixer="gla", head_dim=512), ["head_dim", "256"]),
    (dict(mixer="gated_deltanet", expand_v=1.5, head_dim=16), ["value head size", "24"]),
    (dict(mixer="attention", attn_head_dim=300), ["attn_head_dim", "256"]),
    (dict(n_kv_heads=3), ["n_kv_heads", "divide"]),
    (dict(attn_layers=[5]), ["attn_layers", "0..1"]),
    (dict(dim=0), ["model.dim"]),
])
def test_bad_config_is_a_clear_value_error(kw, words):
    with pytest.raises(ValueError) as e:
        tiny(**kw).validate()
    for w in words:
        assert w in str(e.value), str(e.value)


def test_unknown_key_names_valid_keys():
    with pytest.raises(ValueError, match="unknown key.*n_head"):
        ModelConfig.from_dict({"n_head": 4})


def test_layer_mixers_of_a_hybrid():
    cfg = tiny(mixer="gated_deltanet", n_layers=8, attn_layers=[3, 7])
    assert cfg.layer_mixers() == ["gated_deltanet"] * 3 + ["attention"] + ["gated_deltanet"] * 3 + ["attention"]
    assert set(MIXERS) >= set(cfg.layer_mixers())


# ---- the model --------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet"])
def test_fused_residual_adds_match_plain_blocks(mixer):
    """The blocks add the residual stream inside their norms (and the final norm adds the last
    MLP output): same hidden states and gradients as plain pre-norm residual blocks."""
    torch.manual_seed(0)
    model = build_model(tiny(mixer=mixer, n_layers=3)).double()
    ids = torch.randint(0, 97, (2, 24))
    hidden, _ = model.hidden_states(ids)

    def plain(ids):
        x = model.embeddings(ids)
        for layer in model.layers:
            x = x + layer.mixer(layer.mixer_norm(x))[0]
            x = x + layer.mlp(layer.mlp_norm(x))
        return model.norm(x)

    expected = plain(ids)
    assert (hidden - expected).abs().max().item() < 1e-12
    dy = torch.randn_like(hidden)
    params = [p for name, p in model.named_parameters() if not name.startswith("lm_head")]
    grads = torch.autograd.grad(hidden, params, dy)
    expected_grads = torch.autograd.grad(plain(ids), params, dy)
    for a, b in zip(grads, expected_grads):
        assert (a - b).abs().max().item() < 1e-10

def test_meta_build_then_init_weights():
    cfg = tiny(n_layers=4)
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    std = model.layers[0].mixer.q_proj.weight.std().item()
    out_std = model.layers[0].mlp.down_proj.weight.std().item()
    assert abs(std - cfg.init_std) < 0.1 * cfg.init_std
    assert abs(out_std - cfg.init_std / math.sqrt(2 * cfg.n_layers)) < 0.15 * out_std
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_loss_equals_cross_entropy_of_logits_and_reaches_every_parameter():
    torch.manual_seed(0)
    model = build_model(tiny()).double()
    ids = torch.randint(0, 97, (2, 12))
    labels = torch.randint(0, 97, (2, 12))
    labels[0, :3] = -100
    logits = model(ids)
    assert logits.shape == (2, 12, 97)
    ref = F.cross_entropy(logits.reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    loss = model(ids, labels=labels)
    # the fused loss may accumulate in fp32
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    total = model(ids, labels=labels, loss_reduction="sum")
    n = (labels != -100).sum().item()
    assert abs(total.item() - ref.item() * n) < 1e-5 * ref.item() * n
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tied_embeddings_share_the_output_matrix():
    model = build_model(tiny(tie_embeddings=True))
    assert not hasattr(model, "lm_head")
    assert model.output_weight is model.embeddings.weight
    untied = build_model(tiny())
    assert untied.num_params() - model.num_params() == 97 * 64
    assert model.num_params(include_embeddings=False) == untied.num_params(include_embeddings=False)


def test_packed_documents_equal_separate_documents():
    torch.manual_seed(1)
    model = build_model(tiny(sliding_window=5)).double()
    lengths = [7, 3, 10, 4]
    ids = torch.randint(0, 97, (1, sum(lengths)))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = model(ids, cu_seqlens=cu)
    alone = torch.cat([model(ids[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    assert (packed - alone).norm() / alone.norm() < 1e-12


@pytest.mark.parametrize("mixer", ["gated_deltanet", "deltanet"])
def test_max_seqlen_hint_leaves_results_unchanged(mixer):
    """max_seqlen (the longest document, which the trainer passes) picks how kernels run, not what
    they compute; it is clamped to the row length, and a value that is no length is refused."""
    torch.manual_seed(3)
    model = build_model(tiny(mixer=mixer, attn_layers=[1])).double()
    ids = torch.randint(0, 97, (2, 8))
    cu = torch.tensor([0, 5, 8, 11, 16], dtype=torch.int32)
    out = model(ids, cu_seqlens=cu)
    for hint in (5, 8, 100):
        assert (model(ids, cu_seqlens=cu, max_seqlen=hint) - out).norm() / out.norm() < 1e-12
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_seqlen"):
            model(ids, cu_seqlens=cu, max_seqlen=bad)


def test_blocks_see_few_max_seqlen_values(monkeypatch):
    """The bound the blocks get is a power of two (at least 1024) capped at the row: over every
    longest-document length of a 16384-token row, 5 values, each a bound on the document, and
    the delta rule's long-document decision unchanged."""
    from flame.kernels.delta_rule_segments import LONG_DOCUMENT_TOKENS
    from flame.models import lm

    bounds = {n: lm.bucketed_max_seqlen(n, 16384) for n in range(1, 16385)}
    assert sorted(set(bounds.values())) == [1024, 2048, 4096, 8192, 16384]
    assert all(n <= b for n, b in bounds.items())
    assert all((n > LONG_DOCUMENT_TOKENS) == (b > LONG_DOCUMENT_TOKENS) for n, b in bounds.items())
    assert lm.bucketed_max_seqlen(None, 3000) == 3000 and lm.bucketed_max_seqlen(1500, 3000) == 2048
    # what the blocks receive from the model
    model = build_model(tiny(mixer="gated_deltanet"))
    seen = []
    block_forward = type(model.layers[0]).forward
    monkeypatch.setattr(type(model.layers[0]), "forward",
                        lambda self, *a, **kw: seen.append(kw["max_seqlen"]) or block_forward(self, *a, **kw))
    ids = torch.randint(0, 97, (1, 2000))
    model(ids, cu_seqlens=torch.tensor([0, 700, 2000], dtype=torch.int32), max_seqlen=1300)
    assert set(seen) == {2000}  # 2048, capped at the row
    seen.clear()
    model(ids, cu_seqlens=torch.tensor([0, 700, 2000], dtype=torch.int32), max_seqlen=900)
    assert set(seen) == {1024}


def test_batch_with_cu_seqlens_is_flattened():
    """A [B, T] batch with cu_seqlens over its flattened tokens (rows are boundaries too)."""
    torch.manual_seed(2)
    model = build_model(tiny()).double()
    ids = torch.randint(0, 97, (2, 8))
    cu = torch.tensor([0, 5, 8, 11, 16], dtype=torch.int32)
    out = model(ids, cu_seqlens=cu)
    flat = ids.reshape(1, 16)
    ref = torch.cat([model(flat[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    assert out.shape == (2, 8, 97)
    assert (out.reshape(1, 16, 97) - ref).norm() / ref.norm() < 1e-12


@pytest.mark.parametrize("mixer", MIXERS)
def test_param_groups_exclude_norms_embeddings_and_head_constants(mixer):
    model = build_model(tiny(mixer=mixer, attn_layers=[1]))
    groups = model.param_groups(0.1)
    decay = {id(p) for p in groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for pid, n in names.items():
        no_decay = ("norm" in n or "embeddings" in n or n.endswith(("A_log", "dt_bias", ".D", ".bias")))
        assert (pid not in decay) == no_decay, n


def test_flops_per_token_counts_matmuls_and_causal_attention():
    cfg = tiny(n_layers=2)
    model = build_model(cfg)
    d, hd, h, kv, ffn, V = 64, 16, 4, 2, 96, 97
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * ffn
    matmul = cfg.n_layers * per_layer + V * d
    T = 128
    attn = cfg.n_layers * 12 * h * hd * (T + 1) / 2
    assert model.flops_per_token(T) == pytest.approx(6 * matmul + attn)


def test_chunked_linear_attention_flop_counts():
    from flame.models.mixers.common import delta_rule_flops, linear_attention_flops

    # shared/baselines/h100.md: ~0.68 MFLOP per token-head for K = V = 128, C = 64
    assert delta_rule_flops(128, 128) == 681984
    assert linear_attention_flops(128, 128) == 14 * 128 * 128 + 8 * 64 * 128 + 6 * 64 * 128
    model = build_model(tiny(mixer="gated_deltanet", n_layers=3, attn_layers=[2]))
    mixing = model.flops_per_token(256) - model.flops_per_token(128)
    assert mixing == pytest.approx(12 * 4 * 16 * (257 - 129) / 2)  # only attention grows with T


def test_attention_refuses_a_cache_for_packed_documents():
    model = build_model(tiny())
    x = torch.randn(1, 6, 64)
    with pytest.raises(ValueError, match="cu_seqlens cannot be combined with use_cache"):
        model.layers[0].mixer(x, cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32), use_cache=True)
