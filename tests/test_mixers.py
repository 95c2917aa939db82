"""Every token mixer: chunked forward == token-by-token decoding, packed documents == documents
alone, gradients reach every parameter; plus checks of each architecture's gates."""

import pytest
import torch
import torch.nn.functional as F

import flame.kernels
from flame.models import MIXERS, ModelConfig, build_mixer
from flame.models.mixers.retnet import retention_log_decay
from test_model_fallbacks import install_missing


@pytest.fixture(autouse=True)
def stand_ins(monkeypatch):
    install_missing(monkeypatch)


def mixer_cfg(name: str, **kw) -> ModelConfig:
    base = dict(mixer=name, vocab_size=64, dim=32, n_layers=1, n_heads=2, head_dim=16, expand_v=1.0,
                attn_n_heads=4, n_kv_heads=2, attn_head_dim=8, conv_size=4, gate_low_rank_dim=8)
    base.update(kw)
    return ModelConfig(**base).validate()


def make(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = mixer_cfg(name, **kw)
    mixer = build_mixer(cfg, 0)
    mixer.init_weights(0.2, 0.2)  # larger than training init so that every path matters
    return mixer.double()


# Decoding states are fp32 in the kernels' contract, so a float64 layer that goes through a
# state agrees with the one-pass forward to about fp32 precision; a wrong state is off by O(1).
STATE_TOL = 1e-6


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


VARIANTS = [(m, {}) for m in MIXERS] + [
    ("attention", {"sliding_window": 3}),
    ("gated_deltanet", {"expand_v": 2.0}),
    ("gated_deltanet", {"use_short_conv": False}),
    ("gla", {"use_short_conv": False}),
    ("retnet", {"use_short_conv": False, "expand_v": 2.0}),
]
IDS = [m + "".join(f"-{k}={v}" for k, v in kw.items()) for m, kw in VARIANTS]


@pytest.mark.parametrize("name, kw", VARIANTS, ids=IDS)
def test_forward_equals_token_by_token_decoding(name, kw):
    mixer = make(name, **kw)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    full, _ = mixer(x)
    state, steps = None, []
    for t in range(x.shape[1]):
        y, state = mixer(x[:, t:t + 1], state=state, use_cache=True)
        steps.append(y)
    assert rel(torch.cat(steps, 1), full) < STATE_TOL


@pytest.mark.parametrize("name, kw", VARIANTS, ids=IDS)
def test_prefill_then_continue(name, kw):
    mixer = make(name, seed=1, **kw)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    full, _ = mixer(x)
    a, state = mixer(x[:, :6], use_cache=True)
    b, state = mixer(x[:, 6:10], state=state, use_cache=True)
    c, _ = mixer(x[:, 10:], state=state, use_cache=True)
    assert rel(torch.cat([a, b, c], 1), full) < STATE_TOL


@pytest.mark.parametrize("name, kw", VARIANTS, ids=IDS)
def test_packed_documents_equal_documents_alone(name, kw):
    mixer = make(name, seed=2, **kw)
    lengths = [5, 1, 9, 3]
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed, _ = mixer(x, cu_seqlens=cu)
    alone = torch.cat([mixer(x[:, s:e])[0] for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    assert rel(packed, alone) < 1e-10


@pytest.mark.parametrize("name, kw", VARIANTS, ids=IDS)
def test_gradients_reach_every_parameter(name, kw):
    mixer = make(name, seed=3, **kw)
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    y, _ = mixer(x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad.abs().sum() > 0
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", MIXERS)
def test_init_weights_sets_every_parameter(name):
    mixer = build_mixer(mixer_cfg(name), 0)
    with torch.no_grad():
        for p in mixer.parameters():
            p.fill_(float("nan"))
    mixer.init_weights(0.02, 0.01)
    for pname, p in mixer.named_parameters():
        if "norm" in pname:  # norms are reset by the model, like every norm
            continue
        assert torch.isfinite(p).all(), pname


def test_gated_deltanet_gates(monkeypatch):
    """q, k unit-norm; beta = sigmoid(W_b x); g = -exp(A_log) * softplus(W_a x + dt_bias)."""
    mixer = make("gated_deltanet", seed=4)
    seen = {}
    real = flame.kernels.chunk_gated_delta_rule

    def record(q, k, v, g, beta, **kw):
        seen.update(q=q, k=k, g=g, beta=beta, scale=kw["scale"])
        return real(q, k, v, g, beta, **kw)

    monkeypatch.setattr(flame.kernels, "chunk_gated_delta_rule", record)
    x = torch.randn(1, 7, 32, dtype=torch.float64)
    mixer(x)
    ones = torch.ones(1, 7, 2, dtype=torch.float64)
    assert rel(seen["q"].norm(dim=-1), ones) < 1e-12 and rel(seen["k"].norm(dim=-1), ones) < 1e-12
    assert rel(seen["beta"], torch.sigmoid(mixer.b_proj(x))) < 1e-12
    g = -mixer.A_log.exp() * F.softplus(mixer.a_proj(x) + mixer.dt_bias)
    assert rel(seen["g"].double(), g) < 1e-6 and (seen["g"] < 0).all()
    assert seen["scale"] == 16 ** -0.5
    # softplus(dt_bias) is the Mamba time step, in [1e-3, 0.1]
    dt = F.softplus(mixer.dt_bias)
    assert (dt > 0.9e-3).all() and (dt < 0.11).all()


def test_retnet_decay_is_fixed_per_head():
    gamma = retention_log_decay(4).exp()
    assert torch.allclose(gamma, torch.tensor([1 - 2 ** -5, 1 - 2 ** -6, 1 - 2 ** -7, 1 - 2 ** -8]))
    assert torch.allclose(retention_log_decay(2, first_head=2).exp(), gamma[2:])
    mixer = make("retnet")
    assert not any("decay" in n for n, _ in mixer.named_parameters())


def test_gla_gate_is_low_rank_and_normalised(monkeypatch):
    mixer = make("gla", seed=5)
    seen = {}
    real = flame.kernels.chunk_gla

    def record(q, k, v, g, **kw):
        seen["g"] = g
        return real(q, k, v, g, **kw)

    monkeypatch.setattr(flame.kernels, "chunk_gla", record)
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    mixer(x)
    g = F.logsigmoid(mixer.gk_up(mixer.gk_down(x))) / 16
    assert rel(seen["g"].reshape(1, 6, -1).double(), g) < 1e-6
    assert mixer.gk_down.weight.shape == (8, 32)


def test_mamba2_equals_the_ssm_recurrence():
    """y_t = C_t S_t + D x_t with S_t = exp(-exp(A_log) dt_t) S_{t-1} + dt_t B_t x_t^T, per head."""
    mixer = make("mamba2", seed=6)
    H, N, P = mixer.n_heads, mixer.state_size, mixer.head_v
    u = torch.randn(1, 8, 32, dtype=torch.float64)
    out, _ = mixer(u)
    z, xbc, dt = mixer.in_proj(u).split([H * P, H * P + 2 * N, H], dim=-1)
    xbc, _ = mixer.conv(xbc)
    x, b, c = xbc.split([H * P, N, N], dim=-1)
    dt = F.softplus(dt + mixer.dt_bias)
    A = -mixer.A_log.exp()
    S = torch.zeros(H, N, P, dtype=torch.float64)
    ys = []
    for t in range(8):
        xt = x[0, t].view(H, P)
        S = torch.exp(A * dt[0, t])[:, None, None] * S + dt[0, t][:, None, None] * b[0, t][None, :, None] * xt[:, None, :]
        ys.append(torch.einsum("n,hnp->hp", c[0, t], S) + mixer.D[:, None] * xt)
    y = torch.stack(ys).reshape(1, 8, H * P)
    ref = mixer.out_proj(F.rms_norm(y * F.silu(z), (H * P,), mixer.norm.weight, eps=mixer.norm.eps))
    assert rel(out, ref) < 1e-10


@pytest.mark.parametrize("name, kw, extra", [("gated_deltanet", {"expand_v": 2.0}, ("a_proj", "b_proj")),
                                             ("deltanet", {}, ("b_proj",)),
                                             ("gla", {"use_short_conv": False}, ("gk_down",)),
                                             ("retnet", {"use_short_conv": True}, ())],
                         ids=["gated_deltanet", "deltanet", "gla-no-conv", "retnet-conv"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_fused_qkv_projection_equals_three_calls(name, kw, extra, packed, monkeypatch):
    """Training computes q, k, v and the mixer's narrow projections of x with one matmul and
    one convolution over the q, k, v channels: same values and parameter gradients as separate
    projections and three convolutions."""
    from flame.models.mixers import common

    mixer = make(name, **kw)
    B, T = (1, 13) if packed else (2, 9)
    cu = torch.tensor([0, 5, 13], dtype=torch.int32) if packed else None
    x = torch.randn(B, T, 32, dtype=torch.float64)
    results = []
    for fusable in (True, False):
        monkeypatch.setattr(common, "_fusable", lambda m, x, extra, fusable=fusable: fusable)
        mixer.zero_grad()
        outs = common.project_qkv(mixer, x, cu, None, None, extra)
        assert len(outs) == 3 + len(extra)
        sum((o * torch.randn_like(o, generator=torch.Generator().manual_seed(i))).sum()
            for i, o in enumerate(outs)).backward()
        results.append(([o.detach().clone() for o in outs],
                        {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}))
    (fused, fused_grads), (three, three_grads) = results
    for a, b in zip(fused, three):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert fused_grads.keys() == three_grads.keys() and any("q_proj" in n for n in fused_grads)
    assert all(any(e in n for n in fused_grads) for e in extra)
    for n in fused_grads:
        assert torch.allclose(fused_grads[n], three_grads[n], rtol=1e-10, atol=1e-12), n


def test_fused_qkv_projection_is_the_training_path(monkeypatch):
    from flame.models.mixers import common

    calls = []
    fused = common._project_qkv_fused
    monkeypatch.setattr(common, "_project_qkv_fused",
                        lambda m, x, cu, extra, norm: calls.append((extra, norm)) or fused(m, x, cu, extra, norm))
    for name in ("gated_deltanet", "deltanet", "gla"):
        mixer = make(name)
        mixer(torch.randn(1, 5, 32, dtype=next(mixer.parameters()).dtype))
    # the delta-rule mixers' q and k normalised per head (of 16 here) in the fused path
    assert calls == [(("a_proj", "b_proj"), 16), (("b_proj",), 16), (("gk_down",), None)]
    mixer = make("gated_deltanet")
    x = torch.randn(1, 5, 32, dtype=next(mixer.parameters()).dtype)
    assert common._fusable(mixer, x, ()) and common._fusable(mixer, x, ("a_proj", "b_proj"))
    mixer.k_conv.activation = None  # convolutions that differ keep their own calls
    assert not common._fusable(mixer, x, ())
