"""Every flame custom op returns what its fake (meta) kernel promises: the same shapes, dtypes and
strides. torch.compile plans memory from the fake outputs; a real output laid out otherwise is
read with the wrong strides, which gives wrong numbers without an error, or fails a stride
assertion of inductor.

The calls checked are those a hybrid model of every mixer makes in forward and backward (packed
documents and separate rows, lengths not a multiple of the chunk), in decoding, and of the
one-token-at-a-time kernels and SwiGLU with their backward, recorded on both backends: the torch
references (CPU) and the Triton kernels (interpreter, float32), the latter also at the call
sites that take a custom op only under torch.compile."""

import importlib
import pkgutil

import pytest
import torch
from torch._library.custom_ops import CustomOpDef
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from flame import kernels, modules
from flame.models import MIXERS, ModelConfig, build_model
from flame.modules.swiglu import swiglu


@pytest.fixture
def recorded_calls(monkeypatch):
    """{op name: [(op, args, kwargs), ...]}: each flame custom op called through a module's
    global name (as every call site does) is recorded, then run as usual. calls["*"] lists the
    names of all of them."""
    calls: dict[str, list] = {"*": []}

    def recorder(op):
        def call(*args, **kwargs):
            calls.setdefault(op._qualname, []).append((op, args, kwargs))
            return op(*args, **kwargs)
        return call

    for package in (kernels, modules):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for name, obj in list(vars(module).items()):
                if isinstance(obj, CustomOpDef):
                    monkeypatch.setattr(module, name, recorder(obj))
                    calls["*"].append(obj._qualname)
    return calls


def tiny_hybrid() -> torch.nn.Module:
    cfg = ModelConfig(mixer=list(MIXERS), vocab_size=96, dim=64, n_layers=len(MIXERS), n_heads=4, head_dim=16,
                      attn_n_heads=4, n_kv_heads=2, mlp_hidden_dim=64, conv_size=4, tie_embeddings=False)
    torch.manual_seed(0)
    return build_model(cfg)


def recurrent_inputs(rule, B, T, gen, H=2, K=16, V=32) -> dict:
    def rand(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    args = dict(q=rand(B, T, H, K), k=rand(B, T, H, K), v=rand(B, T, H, V))
    decay = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=gen))
    if rule is kernels.fused_recurrent_gla:
        args["gk"] = decay.requires_grad_()
    elif rule is not kernels.fused_recurrent_delta_rule:
        args["g"] = decay[..., 0].contiguous().requires_grad_()
    if rule in (kernels.fused_recurrent_delta_rule, kernels.fused_recurrent_gated_delta_rule):
        args["beta"] = torch.rand(B, T, H, generator=gen).requires_grad_()
        args["k"] = torch.nn.functional.normalize(args["k"].detach(), dim=-1).requires_grad_()
    return args


def outputs(x) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def check_fake_matches_real(op, args, kwargs) -> None:
    real = outputs(op(*args, **kwargs))
    with FakeTensorMode() as mode:
        fake_args, fake_kwargs = pytree.tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
        fake = outputs(op(*fake_args, **fake_kwargs))
    assert len(real) == len(fake), f"{op._qualname}: {len(real)} outputs, the fake gives {len(fake)}"
    for i, (r, f) in enumerate(zip(real, fake)):
        what = f"{op._qualname} output {i}"
        assert r.shape == f.shape, f"{what}: shape {tuple(r.shape)}, the fake says {tuple(f.shape)}"
        assert r.dtype == f.dtype, f"{what}: dtype {r.dtype}, the fake says {f.dtype}"
        if r.numel() > 1:
            assert r.stride() == f.stride(), f"{what}: strides {r.stride()}, the fake says {f.stride()}"


@pytest.mark.parametrize("backend,as_compiled", [("torch", False), ("triton", True)])
def test_custom_op_outputs_match_their_fakes(backend, as_compiled, recorded_calls, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FLAME_BACKEND", backend)
    if as_compiled:
        # the call sites that take their custom op only under torch.compile (eager calls the
        # kernels through an autograd.Function) take it here in eager mode
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model = tiny_hybrid()
    gen = torch.Generator().manual_seed(1)
    for shape, cu in [((1, 40), torch.tensor([0, 7, 23, 40], dtype=torch.int32)), ((2, 40), None)]:
        ids = torch.randint(0, 96, shape, generator=gen)
        labels = torch.randint(0, 96, shape, generator=gen)
        model(ids, labels=labels, cu_seqlens=cu).backward()
    # decoding: a prompt, then one token at a time from the mixers' states
    with torch.no_grad():
        _, states = model.hidden_states(torch.randint(0, 96, (2, 5), generator=gen), use_cache=True)
        for _ in range(2):
            _, states = model.hidden_states(torch.randint(0, 96, (2, 1), generator=gen), states=states,
                                            use_cache=True)
    # the one-token-at-a-time kernels with their backward, and the unpacked SwiGLU
    for rule in (kernels.fused_recurrent_simple_gla, kernels.fused_recurrent_gla,
                 kernels.fused_recurrent_delta_rule, kernels.fused_recurrent_gated_delta_rule):
        for B, T, cu in [(1, 21, torch.tensor([0, 6, 21], dtype=torch.int32)), (2, 11, None)]:
            args = recurrent_inputs(rule, B, T, gen)
            o, ht = rule(**args, output_final_state=True, cu_seqlens=cu)
            (o.square().sum() + ht.sum()).backward()
    a, b = (torch.randn(6, 10, generator=gen, requires_grad=True) for _ in range(2))
    swiglu(a, b).square().sum().backward()
    every_op = set(recorded_calls.pop("*"))
    if as_compiled:
        assert set(recorded_calls) == every_op, f"not called: {sorted(every_op - set(recorded_calls))}"
    assert recorded_calls, "no custom op was called"
    for name, calls in sorted(recorded_calls.items()):
        for op, args, kwargs in calls:
            check_fake_matches_real(op, args, kwargs)
