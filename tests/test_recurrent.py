"""Recurrent kernels (simple GLA, GLA, delta rule, gated delta rule) against the float64
token-by-token reference; decoding step by step equals one pass; the recurrent and chunked
delta-rule kernels agree."""

import pytest
import torch
import torch.nn.functional as F

from flame.kernels import (
    chunk_gated_delta_rule,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gla,
    fused_recurrent_simple_gla,
)
from flame.kernels.recurrent_ref import recurrent_ref


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(B, T, H, HV, K, V, N, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = dict(
        q=randn(B, T, H, K),
        k=F.normalize(randn(B, T, H, K), dim=-1),
        v=randn(B, T, HV, V),
        g=F.logsigmoid(randn(B, T, HV) + 3.0),
        gk=F.logsigmoid(randn(B, T, HV, K) + 3.0),
        gv=F.logsigmoid(randn(B, T, HV, V) + 3.0),
        beta=torch.rand(B, T, HV, generator=gen, dtype=torch.float64),
        initial_state=randn(N, HV, K, V),
    )
    return {name: t.to(device=device, dtype=dtype) for name, t in x.items()}


# name -> (public function, the inputs it takes, reference keyword arguments)
KERNELS = {
    "simple_gla": (fused_recurrent_simple_gla, ("g",), dict(delta=False)),
    "gla": (fused_recurrent_gla, ("gk", "gv"), dict(delta=False)),
    "delta_rule": (fused_recurrent_delta_rule, ("beta",), dict(delta=True)),
    "gated_delta_rule": (fused_recurrent_gated_delta_rule, ("g", "beta"), dict(delta=True)),
}
GROUPED = {"simple_gla", "delta_rule", "gated_delta_rule"}  # value heads sharing q/k heads


def call(name, x, cu_seqlens=None, **kwargs):
    fn, extra, _ = KERNELS[name]
    return fn(x["q"], x["k"], x["v"], **{e: x[e] for e in extra}, initial_state=x["initial_state"],
              output_final_state=True, cu_seqlens=cu_seqlens, **kwargs)


def reference(name, x, cu_seqlens=None, reverse=False):
    _, extra, ref_kwargs = KERNELS[name]
    d = {n: t.double() for n, t in x.items()}
    return recurrent_ref(d["q"], d["k"], d["v"], **{e: d[e] for e in extra}, **ref_kwargs,
                         initial_state=d["initial_state"], output_final_state=True,
                         cu_seqlens=cu_seqlens, reverse=reverse)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_forward_cpu(name, varlen, backend, monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    HV = 4 if name in GROUPED else 2
    if varlen:
        cu = torch.tensor([0, 3, 20, 21, 37], dtype=torch.int32)
        x = make_inputs(1, 37, 2, HV, 16, 32, 4)
    else:
        cu = None
        x = make_inputs(2, 19, 2, HV, 32, 16, 2)
    o_ref, ht_ref = reference(name, x, cu)
    o, ht = call(name, x, cu)
    assert o.dtype == x["v"].dtype and ht.dtype == torch.float32
    assert rel(o, o_ref) < 1e-5 and rel(ht, ht_ref) < 1e-5


@pytest.mark.parametrize("name", ["simple_gla", "gla"])
def test_reverse(name, monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    x = make_inputs(1, 23, 2, 2, 16, 16, 1)
    o_ref, ht_ref = reference(name, x, reverse=True)
    o, ht = call(name, x, reverse=True)
    assert rel(o, o_ref) < 1e-5 and rel(ht, ht_ref) < 1e-5


def test_decoding_step_by_step_equals_one_pass(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    x = make_inputs(2, 6, 1, 2, 16, 16, 2)
    o_all, ht_all = call("gated_delta_rule", x)
    state = x["initial_state"]
    outs = []
    for t in range(6):
        step = {n: (v[:, t : t + 1] if n != "initial_state" else state) for n, v in x.items()}
        o, state = call("gated_delta_rule", step)
        outs.append(o)
    assert rel(torch.cat(outs, 1), o_all) < 1e-6 and rel(state, ht_all) < 1e-6


def test_recurrent_matches_chunked(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "torch")
    x = make_inputs(1, 90, 1, 2, 16, 16, 1)
    o_r, ht_r = call("gated_delta_rule", x)
    o_c, ht_c = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                       initial_state=x["initial_state"], output_final_state=True)
    assert rel(o_r, o_c) < 1e-5 and rel(ht_r, ht_c) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradients(backend, monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    x = make_inputs(1, 9, 1, 2, 16, 16, 1)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, ht = call("gated_delta_rule", {**leaves, "gk": None, "gv": None})
    (o.sum() + ht.sum()).backward()
    ref_leaves = {n: t.double().requires_grad_() for n, t in x.items() if n not in ("gk", "gv")}
    o_ref, ht_ref = recurrent_ref(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], g=ref_leaves["g"],
                                  beta=ref_leaves["beta"], delta=True, initial_state=ref_leaves["initial_state"],
                                  output_final_state=True)
    (o_ref.sum() + ht_ref.sum()).backward()
    for n, ref in ref_leaves.items():
        assert rel(leaves[n].grad, ref.grad) < 1e-5, n


def test_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "torch")
    x = make_inputs(1, 5, 1, 2, 16, 16, 1)
    fn = lambda q, k, v, g, b, h: fused_recurrent_gated_delta_rule(  # noqa: E731
        q, k, v, g=g, beta=b, initial_state=h, output_final_state=True)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"])
    o, ht = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    o_e, ht_e = fn(*args)
    assert rel(o, o_e) < 1e-6 and rel(ht, ht_e) < 1e-6


def test_bad_input():
    x = make_inputs(1, 5, 2, 3, 16, 16, 1)
    with pytest.raises(ValueError, match="heads"):
        fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"])
    x = make_inputs(1, 5, 2, 4, 16, 16, 1)
    with pytest.raises(ValueError, match="same number of heads"):
        fused_recurrent_gla(x["q"], x["k"], x["v"], gk=x["gk"])
    with pytest.raises(ValueError, match="gk"):
        fused_recurrent_gla(x["q"], x["k"], x["v"][:, :, :2], gk=x["gk"][..., :8])
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_recurrent_delta_rule(x["q"], x["k"], x["v"], x["beta"], cu_seqlens=torch.tensor([0, 6]))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(KERNELS))
def test_bf16_gpu(name):
    HV = 8 if name in GROUPED else 4
    cu = torch.tensor([0, 1, 300, 301, 700], dtype=torch.int32, device="cuda")
    x = make_inputs(1, 700, 4, HV, 128, 64, 4, dtype=torch.bfloat16, device="cuda")
    x["initial_state"] = x["initial_state"].float()
    o_ref, ht_ref = reference(name, x, cu.cpu())
    o, ht = call(name, x, cu)
    errors = (rel(o, o_ref), rel(ht, ht_ref))
    print(name, [f"{e:.2e}" for e in errors])
    assert max(errors) < 5e-3, errors
