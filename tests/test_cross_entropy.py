"""Fused linear cross-entropy against plain PyTorch in float64 (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from flame.kernels.cross_entropy import fused_linear_cross_entropy
from flame.kernels.cross_entropy_ref import linear_cross_entropy_ref
from flame.modules import FusedLinearCrossEntropyLoss

N, D, V = 45, 16, 70
IGNORE = -100


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(dtype=torch.float64, device="cpu", bias=True, n=N, d=D, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5).to(device, dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.25] = IGNORE
    return x, w, b, t.to(device)


def grads_of(loss, inputs, seed=1):
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.to(loss.device, loss.dtype) if loss.dim() else torch.tensor(0.7, dtype=loss.dtype, device=loss.device)
    return torch.autograd.grad(loss, [i for i in inputs if i is not None], g)


# ----------------------------------------------------------------------------- the oracle itself


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_torch_cross_entropy(reduction):
    x, w, b, t = make_inputs()
    ours = linear_cross_entropy_ref(x, w, t, b, reduction=reduction, label_smoothing=0.1)
    torch_loss = F.cross_entropy(x @ w.T + b, t, ignore_index=IGNORE, reduction=reduction, label_smoothing=0.1)
    assert rel(ours, torch_loss) < 1e-12


def test_reference_z_loss_and_softcap_follow_their_definitions():
    x, w, b, t = make_inputs()
    cap, zl = 3.0, 1e-2
    z = cap * torch.tanh((x @ w.T + b) / cap)
    valid = t != IGNORE
    lse = torch.logsumexp(z, -1)
    want = (F.cross_entropy(z, t, ignore_index=IGNORE, reduction="none") + zl * lse**2 * valid).sum() / valid.sum()
    got = linear_cross_entropy_ref(x, w, t, b, z_loss=zl, logit_softcap=cap)
    assert rel(got, want) < 1e-12


# ----------------------------------------------------------------------------- chunked algorithm


OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(logit_softcap=4.0),
    dict(label_smoothing=0.2, z_loss=1e-3, logit_softcap=2.5),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_chunked_torch_backend_float64(monkeypatch, reduction, options):
    monkeypatch.setenv("FLAME_BACKEND", "torch")
    x, w, b, t = make_inputs()
    got = fused_linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=16, **options)
    want = linear_cross_entropy_ref(x, w, t, b, reduction=reduction, **options)
    assert rel(got, want) < 1e-12
    for g, r in zip(grads_of(got, (x, w, b)), grads_of(want, (x, w, b))):
        assert rel(g, r) < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[4]], ids=["plain", "all"])
def test_triton_kernels_interpreted_fp32(monkeypatch, reduction, options):
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    x, w, b, t = make_inputs()
    x32, w32, b32 = (i.detach().float().requires_grad_() for i in (x, w, b))
    got = fused_linear_cross_entropy(x32, w32, t, b32, reduction=reduction, chunk_size=32, **options)
    want = linear_cross_entropy_ref(x, w, t, b, reduction=reduction, **options)
    assert rel(got, want) < 1e-5
    for g, r in zip(grads_of(got, (x32, w32, b32)), grads_of(want, (x, w, b))):
        assert rel(g, r) < 1e-5


@pytest.mark.parametrize("options", [dict(), dict(z_loss=1e-3, label_smoothing=0.1, logit_softcap=2.0)],
                         ids=["plain", "all"])
def test_triton_kernels_over_several_vocab_blocks(monkeypatch, options):
    # a vocabulary wider than one kernel block exercises the per-lane running logsumexp, with a
    # last block partly masked (70 = 4 * 16 + 6)
    import flame.kernels.cross_entropy as ce

    monkeypatch.setenv("FLAME_BACKEND", "triton")
    monkeypatch.setattr(ce, "_BLOCK_V", 16)
    monkeypatch.setattr(ce, "_BLOCK_V_STATS", 16)
    x, w, b, t = make_inputs(n=9)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    got = fused_linear_cross_entropy(x32, w32, t, **options)
    want = linear_cross_entropy_ref(x, w, t, **options)
    assert rel(got, want) < 1e-5
    for g, r in zip(grads_of(got, (x32, w32)), grads_of(want, (x, w))):
        assert rel(g, r) < 1e-5


def test_triton_unit_output_gradient_leaves_gradients_unscaled(monkeypatch):
    # loss.backward() passes an output gradient of exactly 1: the scaling kernel skips its pass
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    x, w, b, t = make_inputs()
    x32, w32, b32 = (i.detach().float().requires_grad_() for i in (x, w, b))
    fused_linear_cross_entropy(x32, w32, t, b32, chunk_size=32).backward()
    linear_cross_entropy_ref(x, w, t, b).backward()
    for mine, ref in ((x32, x), (w32, w), (b32, b)):
        assert rel(mine.grad, ref.grad) < 1e-5


@pytest.mark.parametrize("n, v, element_size, cap_bytes, want", [
    (16384, 128256, 2, 512 * 2**20, 2048),   # the benchmark shape: 8 chunks of 2048
    (3000, 128256, 2, 512 * 2**20, 1536),    # two even chunks, not 2048 + 952
    (100, 128256, 2, 512 * 2**20, 128),      # one chunk, rounded up to the matmul tile
    (5000, 32000, 4, 512 * 2**20, 2560),     # cap 4096 rows of fp32: two chunks
    (45, 70, 8, 70 * 8 * 16, 15),            # cap below 128 rows: no rounding, 3 chunks of 15
    (0, 70, 8, 512 * 2**20, 1),
])
def test_default_chunk_size(monkeypatch, n, v, element_size, cap_bytes, want):
    import flame.kernels.cross_entropy as ce

    monkeypatch.setattr(ce, "CHUNK_BYTES", cap_bytes)
    rows = ce.default_chunk_size(n, v, element_size)
    assert rows == want
    assert rows * v * element_size <= cap_bytes  # the logits buffer stays within its budget


@pytest.mark.parametrize("fp32_weight_grad", [False, True])
def test_bf16_weight_gradient_accumulation(monkeypatch, fp32_weight_grad):
    monkeypatch.setenv("FLAME_BACKEND", "torch")
    x, w, b, t = make_inputs(n=200)
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    loss = fused_linear_cross_entropy(xb, wb, t, chunk_size=16, fp32_weight_grad=fp32_weight_grad)
    (dw,) = torch.autograd.grad(loss, wb)
    (dw_ref,) = torch.autograd.grad(linear_cross_entropy_ref(x, w, t), w)
    assert dw.dtype == torch.bfloat16 and rel(dw, dw_ref) < 2e-2


def test_ignored_rows_get_zero_loss_and_gradient(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "torch")
    x, w, b, t = make_inputs()
    loss = fused_linear_cross_entropy(x, w, t, b, reduction="none", chunk_size=8)
    ignored = t == IGNORE
    assert ignored.any() and (loss[ignored] == 0).all() and (loss[~ignored] > 0).all()
    (dx,) = torch.autograd.grad(fused_linear_cross_entropy(x, w, t, b), x)
    assert (dx[ignored] == 0).all() and (dx[~ignored].abs().sum(-1) > 0).all()


def test_all_ignored_batch_gives_zero_loss_not_nan(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "torch")
    x, w, b, t = make_inputs()
    loss = fused_linear_cross_entropy(x, w, torch.full_like(t, IGNORE), b)
    dx, dw = torch.autograd.grad(loss, (x, w))
    assert loss.item() == 0 and dx.abs().max() == 0 and dw.abs().max() == 0


def test_without_grad_and_frozen_weight(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "torch")
    x, w, b, t = make_inputs()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(x, w, t, b)
    assert rel(loss, linear_cross_entropy_ref(x, w, t, b)) < 1e-12
    w_frozen = w.detach()
    (dx,) = torch.autograd.grad(fused_linear_cross_entropy(x, w_frozen, t), x)
    (dx_ref,) = torch.autograd.grad(linear_cross_entropy_ref(x, w_frozen, t), x)
    assert rel(dx, dx_ref) < 1e-12


def test_module_matches_function(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "torch")
    x, w, b, t = make_inputs()
    module = FusedLinearCrossEntropyLoss(reduction="sum", label_smoothing=0.1, z_loss=1e-3, logit_softcap=3.0)
    want = linear_cross_entropy_ref(x, w, t, b, reduction="sum", label_smoothing=0.1, z_loss=1e-3, logit_softcap=3.0)
    assert rel(module(x, w, t, b), want) < 1e-12


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, w, b, t: (x, w, b, torch.where(t == IGNORE, t, V)), "target"),
        (lambda x, w, b, t: (x, w, b, torch.where(t == IGNORE, t, -3)), "target"),
        (lambda x, w, b, t: (x, w.float(), b, t), "dtype"),
        (lambda x, w, b, t: (x, w, b.float(), t), "dtype"),
        (lambda x, w, b, t: (x, w[:, :-1], b, t), "weight"),
        (lambda x, w, b, t: (x, w, b, t[:-1]), "target"),
        (lambda x, w, b, t: (x, w, b[:-1], t), "bias"),
        (lambda x, w, b, t: (x, w, b, t.double()), "target"),
        (lambda x, w, b, t: (x[None], w, b, t), "x"),
    ],
)
def test_bad_input_raises_value_error(change, match):
    x, w, b, t = change(*make_inputs())
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(x, w, t, b)


@pytest.mark.parametrize("kwargs", [dict(reduction="avg"), dict(label_smoothing=1.5), dict(z_loss=-1.0),
                                    dict(logit_softcap=0.0), dict(chunk_size=0)])
def test_bad_options_raise_value_error(kwargs):
    x, w, b, t = make_inputs()
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(x, w, t, b, **kwargs)


# ----------------------------------------------------------------------------- GPU, bf16


@pytest.mark.gpu
@pytest.mark.parametrize("fp32_weight_grad", [False, True], ids=["dw-bf16-sum", "dw-fp32-sum"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[4]], ids=["plain", "all"])
def test_gpu_bf16_against_float64(reduction, options, fp32_weight_grad):
    x, w, b, t = make_inputs(torch.bfloat16, "cuda", n=3000, d=256, v=5003)
    got = fused_linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=512,
                                     fp32_weight_grad=fp32_weight_grad, **options)
    x64, w64, b64 = (i.detach().double().requires_grad_() for i in (x, w, b))
    want = linear_cross_entropy_ref(x64, w64, t, b64, reduction=reduction, **options)
    assert rel(got, want) < 1e-2
    for g, r in zip(grads_of(got, (x, w, b)), grads_of(want, (x64, w64, b64))):
        assert rel(g, r) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("unit_grad", [True, False], ids=["backward-of-loss", "scaled-backward"])
def test_gpu_default_chunks_and_output_gradient(monkeypatch, unit_grad):
    # default (evened-out) chunks of 1024 + 1024 + 952 tokens through the one logits buffer
    import flame.kernels.cross_entropy as ce

    monkeypatch.setattr(ce, "CHUNK_BYTES", 1024 * 5003 * 2)
    x, w, b, t = make_inputs(torch.bfloat16, "cuda", n=3000, d=256, v=5003, seed=3)
    x64, w64, b64 = (i.detach().double().requires_grad_() for i in (x, w, b))
    got = fused_linear_cross_entropy(x, w, t, b, label_smoothing=0.1)
    want = linear_cross_entropy_ref(x64, w64, t, b64, label_smoothing=0.1)
    assert rel(got, want) < 1e-2
    g = 1.0 if unit_grad else 0.37
    got.backward(torch.tensor(g, device="cuda", dtype=got.dtype))
    want.backward(torch.tensor(g, device="cuda", dtype=want.dtype))
    for mine, ref in ((x, x64), (w, w64), (b, b64)):
        assert rel(mine.grad, ref.grad) < 3e-2


@pytest.mark.gpu
def test_gpu_extra_memory_is_one_logits_buffer():
    # besides the new gradients, a call allocates the logits buffer and per-token vectors only
    n, d, v = 4096, 256, 32000
    x, w, _, t = make_inputs(torch.bfloat16, "cuda", bias=False, n=n, d=d, v=v)
    fused_linear_cross_entropy(x, w, t).backward()  # cuBLAS workspaces and kernels exist from here
    x.grad = w.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_linear_cross_entropy(x, w, t).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    gradients = x.numel() * 2 + w.numel() * 2
    buffer = n * v * 2
    assert extra <= gradients + buffer + 2**20, (extra, gradients, buffer)


@pytest.mark.gpu
def test_gpu_out_of_range_target_asserts_on_device():
    # a device-side assertion leaves the CUDA context unusable, so it runs in its own process
    import pathlib
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from flame.kernels.cross_entropy import fused_linear_cross_entropy as f\n"
        "x = torch.randn(8, 16, device='cuda', dtype=torch.bfloat16)\n"
        "w = torch.randn(32, 16, device='cuda', dtype=torch.bfloat16)\n"
        "t = torch.tensor([0, 1, 2, 40, 3, -100, 4, 5], device='cuda')\n"
        "f(x, w, t)\n"
        "torch.cuda.synchronize()\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    # the message of a device-side assertion differs between CUDA versions; it must fail, loudly
    assert run.returncode != 0
    assert any(s in run.stderr for s in ("target outside", "device-side assert", "Assertion")), run.stderr[-2000:]
