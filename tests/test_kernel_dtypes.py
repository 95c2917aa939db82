"""Every public token-mixer function returns its output in the dtype of q (bf16 in, bf16 out, with
fp32 gates, as models pass them) and its final state in fp32, on the torch reference path too."""

import pytest
import torch

from flame import kernels

B, T, H, K, V = 1, 70, 2, 16, 32


def inputs(name):
    torch.manual_seed(0)
    bf = dict(dtype=torch.bfloat16)
    q, k = torch.randn(B, T, H, K, **bf), torch.randn(B, T, H, K, **bf)
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(torch.bfloat16)
    v = torch.randn(B, T, H, V, **bf)
    args = {"q": q, "k": k, "v": v}
    if "simple_gla" in name:
        args["g"] = -torch.rand(B, T, H)  # fp32
    elif "gated_delta" in name:
        args["g"] = -torch.rand(B, T, H)
        args["beta"] = torch.rand(B, T, H, **bf)
    elif "delta" in name:
        args["beta"] = torch.rand(B, T, H, **bf)
    else:  # gla: the recurrent form names the per-key decay gk, as fla does
        args["gk" if name.startswith("fused_recurrent") else "g"] = -torch.rand(B, T, H, K)
    return args


NAMES = [f"{kind}_{family}" for kind in ("chunk", "fused_recurrent")
         for family in ("simple_gla", "gla", "delta_rule", "gated_delta_rule")]


@pytest.mark.parametrize("name", NAMES)
def test_output_dtype_follows_q(name, monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "torch")
    o, final = getattr(kernels, name)(**inputs(name), output_final_state=True)
    assert o.dtype == torch.bfloat16 and o.shape == (B, T, H, V)
    assert final.dtype == torch.float32 and final.shape == (B, H, K, V)
    assert torch.isfinite(o.float()).all()
