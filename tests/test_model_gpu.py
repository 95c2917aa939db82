"""Models on CUDA in bf16 (Triton kernels, flash attention), against the same weights in float64
on the CPU (torch references). Skipped where there is no CUDA device."""

import copy
import warnings

import pytest
import torch

from flame.models import MIXERS, ModelConfig, build_model

pytestmark = pytest.mark.gpu


def cfg_for(mixer, **kw):
    base = dict(mixer=mixer, vocab_size=512, dim=256, n_layers=2, n_heads=4, head_dim=64, expand_v=1.0,
                attn_n_heads=4, n_kv_heads=2, conv_size=4)
    if mixer == "mamba2":
        base.update(n_heads=8, head_dim=64, expand_v=0.5)
    base.update(kw)
    return ModelConfig(**base)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pair(cfg, seed=0):
    torch.manual_seed(seed)
    ref = build_model(cfg).double()
    gpu = copy.deepcopy(ref).to(device="cuda", dtype=torch.bfloat16)
    return ref, gpu


@pytest.mark.parametrize("mixer", MIXERS + ("hybrid",))
def test_bf16_cuda_loss_and_gradients_match_float64_cpu(mixer):
    cfg = cfg_for("gated_deltanet", attn_layers=[1]) if mixer == "hybrid" else cfg_for(mixer)
    check_packed_loss_and_gradients(*pair(cfg))


def check_packed_loss_and_gradients(ref, gpu, **kwargs):
    """Loss and every parameter's gradient of the bf16 CUDA model against the float64 CPU one
    over a packed batch of four documents (the longest 412 tokens); kwargs go to the GPU call."""
    ids = torch.randint(0, 512, (2, 512))
    cu = torch.tensor([0, 100, 512, 812, 1024], dtype=torch.int32)
    loss_ref = ref(ids, labels=ids.roll(-1, 1), cu_seqlens=cu)
    loss_gpu = gpu(ids.cuda(), labels=ids.roll(-1, 1).cuda(), cu_seqlens=cu.cuda(), **kwargs)
    assert abs(loss_gpu.item() - loss_ref.item()) / loss_ref.item() < 1e-2
    loss_ref.backward()
    loss_gpu.backward()
    grads = dict(gpu.named_parameters())
    for name, p in ref.named_parameters():
        assert rel(grads[name].grad.cpu(), p.grad) < 0.1, name


def test_max_seqlen_reaches_the_delta_rule(monkeypatch):
    """max_seqlen, the longest document as the trainer passes it, reaches the delta-rule kernels:
    over LONG_DOCUMENT_TOKENS (lowered here) a packed batch's serial passes run over segments, and
    the hybrid's loss and gradients still match float64 on the CPU."""
    from flame.kernels import delta_rule, delta_rule_segments

    monkeypatch.setenv("FLAME_DELTA_SEGMENTS", "auto")
    monkeypatch.setattr(delta_rule_segments, "PACKED_SEGMENT_TOKENS", 128)
    monkeypatch.setattr(delta_rule_segments, "LONG_DOCUMENT_TOKENS", 256)
    uses, entry = [], delta_rule.segment_entry_states
    monkeypatch.setattr(delta_rule, "segment_entry_states", lambda *a: uses.append("entry") or entry(*a))
    check_packed_loss_and_gradients(*pair(cfg_for("gated_deltanet", attn_layers=[1])), max_seqlen=412)
    assert uses == ["entry"], uses  # the one Gated DeltaNet layer's forward


def test_varlen_attention_keeps_documents_apart_on_cuda():
    torch.manual_seed(1)
    model = build_model(cfg_for("attention", sliding_window=128)).to(device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (1, 1000), device="cuda")
    cu = torch.tensor([0, 300, 301, 777, 1000], dtype=torch.int32, device="cuda")
    packed = model(ids, cu_seqlens=cu).float()
    alone = torch.cat([model(ids[:, s:e]).float() for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    assert rel(packed, alone) < 2e-2


@pytest.mark.parametrize("mixer", MIXERS)
def test_compiled_block_matches_eager(mixer):
    torch.manual_seed(2)
    model = build_model(cfg_for(mixer)).to(device="cuda", dtype=torch.bfloat16)
    block = model.layers[0]
    x = torch.randn(1, 1024, 256, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 400, 1024], dtype=torch.int32, device="cuda")
    update = torch.randn_like(x)  # the previous block's MLP output, added by the first norm
    dout = torch.randn_like(x)

    def run(fn):
        """Output and the gradients of x and every parameter. Compiled, the channel slices of
        padded buffers (Mamba2's input projection) reach the row-strided kernels in place."""
        xs = x.clone().requires_grad_()
        out = sum(fn(xs, update, cu_seqlens=cu)[:2])
        params = [p for p in block.parameters()]
        return [out] + list(torch.autograd.grad(out, [xs] + params, dout))

    eager = run(block)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = run(torch.compile(block, fullgraph=True))
    for a, b in zip(compiled, eager):
        assert rel(a.float(), b.float()) < 2e-2
    # what tracing flame's own code warns about reaches every compiled training run's log
    ours = [str(w.message) for w in caught if "flame" in str(w.message) or "flame" in str(w.filename)]
    assert not ours, ours
