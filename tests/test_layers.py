"""Fused layers against plain PyTorch in float64: RMSNorm (+ residual), gated RMSNorm, rotary
embedding with packed position ids, short causal convolution with cu_seqlens and its decode
step, SwiGLU. The torch path runs in float64; the Triton kernels run in the interpreter in fp32."""

import pytest
import torch
import torch.nn.functional as F

from flame.kernels.conv import causal_conv1d, causal_conv1d_qkv
from flame.kernels.norm import gated_rms_norm, rms_norm
from flame.kernels.rotary import apply_rotary
from flame.kernels.skip_gated_norm import skip_gated_rms_norm
from flame.modules import GatedRMSNorm, RMSNorm, RotaryEmbedding, ShortConvolution, SkipGatedRMSNorm, SwiGLU
from flame.modules.swiglu import swiglu, swiglu_packed

BACKENDS = [("torch", torch.float64, 1e-12), ("triton", torch.float32, 1e-5)]
BACKEND_IDS = ["torch-fp64", "triton-interpreted-fp32"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randn(*shape, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()


def check(fn_ours, fn_ref, inputs, dtype, tol, device="cpu"):
    """Values and gradients of every output and input of fn_ours (inputs cast to dtype) against
    fn_ref on float64 copies."""
    mine = [i.detach().to(device, dtype).requires_grad_(i.requires_grad) for i in inputs]
    ref = [i.detach().double().cpu().requires_grad_(i.requires_grad) for i in inputs]
    out, want = fn_ours(*mine), fn_ref(*ref)
    out = out if isinstance(out, tuple) else (out,)
    want = want if isinstance(want, tuple) else (want,)
    g = torch.Generator().manual_seed(99)
    cot = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in want]
    for o, w in zip(out, want):
        assert rel(o.cpu(), w) < tol
    grads = torch.autograd.grad(out, [m for m in mine if m.requires_grad], [c.to(device, dtype) for c in cot])
    grads_ref = torch.autograd.grad(want, [r for r in ref if r.requires_grad], cot)
    for a, b in zip(grads, grads_ref):
        assert rel(a.cpu(), b) < tol


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_rms_norm(monkeypatch, backend, dtype, tol):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    x, w = randn(3, 5, 48, seed=0), randn(48, seed=1)
    check(lambda x, w: rms_norm(x, w, eps=1e-5)[0], lambda x, w: F.rms_norm(x, (48,), w, eps=1e-5), [x, w], dtype, tol)


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_rms_norm_with_residual(monkeypatch, backend, dtype, tol):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    x, r, w = randn(7, 40, seed=0), randn(7, 40, seed=1), randn(40, seed=2)

    def ref(x, r, w):
        return F.rms_norm(x + r, (40,), w, eps=1e-6), x + r

    check(lambda x, r, w: rms_norm(x, w, r), ref, [x, r, w], dtype, tol)


@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_gated_rms_norm(monkeypatch, backend, dtype, tol, activation):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    x, gate, w = randn(2, 6, 32, seed=0), randn(2, 6, 32, seed=1), randn(32, seed=2)
    act = F.silu if activation == "silu" else torch.sigmoid

    def ref(x, gate, w):
        return F.rms_norm(x, (32,), w, eps=1e-6) * act(gate)

    check(lambda x, g, w: gated_rms_norm(x, g, w, activation=activation), ref, [x, gate, w], dtype, tol)


@pytest.mark.parametrize("rows, dim", [(150, 48), (9, 2100)], ids=["tiles-of-32-rows", "wide-rows"])
@pytest.mark.parametrize("kind", ["plain", "residual", "gated"])
def test_norm_backward_walks_several_tiles_per_program(monkeypatch, kind, rows, dim):
    """The backward's persistent programs each take several tiles, the last one partial."""
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    x, other, w = randn(rows, dim, seed=0), randn(rows, dim, seed=1), randn(dim, seed=2)
    if kind == "plain":
        check(lambda x, w: rms_norm(x, w)[0], lambda x, w: F.rms_norm(x, (dim,), w, eps=1e-6), [x, w],
              torch.float32, 1e-5)
    elif kind == "residual":
        check(lambda x, r, w: rms_norm(x, w, r), lambda x, r, w: (F.rms_norm(x + r, (dim,), w, eps=1e-6), x + r),
              [x, other, w], torch.float32, 1e-5)
    else:
        check(gated_rms_norm, lambda x, g, w: F.rms_norm(x, (dim,), w, eps=1e-6) * F.silu(g), [x, other, w],
              torch.float32, 1e-5)


def skip_gated_plain(y, x, D, z, w, eps=1e-6):
    """Mamba2's output norm as separate float64 ops: rmsnorm((y + D[head] x) * silu(z)) * w."""
    heads = D.shape[0]
    xd = (x.reshape(*x.shape[:-1], heads, -1) * D[:, None]).reshape(x.shape)
    return F.rms_norm((y + xd) * F.silu(z), (y.shape[-1],), w, eps=eps)


@pytest.mark.parametrize("rows, heads, head", [(6, 4, 12), (150, 2, 24), (9, 3, 700)],
                         ids=["small", "tiles-of-32-rows", "wide-rows"])
@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_skip_gated_rms_norm(monkeypatch, backend, dtype, tol, rows, heads, head):
    """Values and the gradients of y, x, D, z and the weight; x and z are channel slices of wider
    tensors (as Mamba2 passes its conv output and input projection), read in place."""
    monkeypatch.setenv("FLAME_BACKEND", backend)
    dim = heads * head
    y, D, w = randn(2, rows, dim, seed=0), randn(heads, seed=1), randn(dim, seed=2)
    xw, zw = randn(2, rows, dim + 5, seed=3), randn(2, rows, 2 * dim + 3, seed=4)

    def ours(y, xw, D, zw, w):
        return skip_gated_rms_norm(y, xw[..., :dim], D, zw[..., dim:2 * dim], w, eps=1e-5)

    def ref(y, xw, D, zw, w):
        return skip_gated_plain(y, xw[..., :dim], D, zw[..., dim:2 * dim], w, eps=1e-5)

    check(ours, ref, [y, xw, D, zw, w], dtype, tol)


def test_skip_gated_rms_norm_bad_input():
    y, w = torch.randn(2, 3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="D has shape"):
        skip_gated_rms_norm(y, y, torch.ones(3), y, w)
    with pytest.raises(ValueError, match="z has shape"):
        skip_gated_rms_norm(y, y, torch.ones(2), y[..., :4], w)
    with pytest.raises(ValueError, match="weight has shape"):
        skip_gated_rms_norm(y, y, torch.ones(2), y, torch.ones(4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rms_norm_residual_sum_alone_gets_gradient(monkeypatch, backend):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    x, r, w = randn(3, 16, seed=0, dtype=torch.float32), randn(3, 16, seed=1, dtype=torch.float32), randn(16, seed=2)
    _, summed = rms_norm(x, w.float(), r)
    dx, dr = torch.autograd.grad(summed.sum(), (x, r))
    assert torch.equal(dx, torch.ones_like(x)) and torch.equal(dr, torch.ones_like(r))


def test_norm_modules_interface():
    x, r = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    norm = RMSNorm(16)
    assert norm(x).shape == x.shape
    y, summed = norm(x, r)
    assert torch.equal(summed, x + r) and rel(y, norm(x + r)) < 1e-6
    assert GatedRMSNorm(16, activation="sigmoid")(x, r).shape == x.shape
    with pytest.raises(ValueError, match="activation"):
        GatedRMSNorm(16, activation="relu")
    with pytest.raises(ValueError, match="weight"):
        norm(torch.randn(2, 3, 15))
    with pytest.raises(ValueError, match="residual"):
        norm(x, r[:, :2])
    snorm = SkipGatedRMSNorm(16, eps=1e-5)
    D = torch.randn(4)
    assert rel(snorm(x, r, D, x), skip_gated_plain(x, r, D, x, snorm.weight, eps=1e-5)) < 1e-6


# ----------------------------------------------------------------------------- rotary


def rotary_complex(x, position_ids, theta):
    """Independent formulation: pairs (x_j, x_{j+D/2}) as complex numbers times e^{i angle}."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = position_ids.double()[..., None, None] * inv_freq
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_rotary_with_packed_positions(monkeypatch, backend, dtype, tol):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    q, k = randn(2, 9, 3, 16, seed=0), randn(2, 9, 2, 16, seed=1)
    # two packed documents in row 0 (positions restart), one long offset row
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], list(range(100, 109))])
    rope = RotaryEmbedding(16, theta=500.0)
    # angles are formed in fp32 (as in Hugging Face models), so compare at fp32 accuracy
    check(lambda q, k: rope(q, k, position_ids), lambda q, k: (rotary_complex(q, position_ids, 500.0),
          rotary_complex(k, position_ids, 500.0)), [q, k], dtype, max(tol, 1e-5))


def test_rotary_bad_input():
    rope = RotaryEmbedding(8)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="position_ids"):
        rope(q, q, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="head"):
        rope(torch.randn(1, 4, 2, 6), q, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)


# ----------------------------------------------------------------------------- short convolution

C, K = 12, 4
CU = torch.tensor([0, 2, 9, 10, 25])  # documents of length 2, 7, 1, 15


def conv_per_document(x, w, b, initial_state, cu, activation="silu"):
    """Independent formulation: F.conv1d on each document, left-padded with its initial state."""
    c, k = w.shape
    ys, finals = [], []
    for n in range(len(cu) - 1):
        seg = x[0, cu[n] : cu[n + 1]].T  # [C, len]
        pad = initial_state[n] if initial_state is not None else torch.zeros(c, k - 1, dtype=x.dtype)
        full = torch.cat([pad, seg], dim=-1)
        finals.append(full[:, -(k - 1) :])
        if seg.shape[1] == 0:  # an empty document: no output, its state passes through
            continue
        y = F.conv1d(full[None], w[:, None, :], b, groups=c)[0].T
        ys.append(F.silu(y) if activation == "silu" else y)
    return torch.cat(ys)[None], torch.stack(finals)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_short_conv_packed_documents(monkeypatch, backend, dtype, tol, with_state):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    x, w, b = randn(1, 25, C, seed=0), randn(C, K, seed=1), randn(C, seed=2)
    inputs = [x, w, b] + ([randn(4, C, K - 1, seed=3)] if with_state else [])

    def ours(x, w, b, s=None):
        return causal_conv1d(x, w, b, "silu", CU, s, output_final_state=True)

    def ref(x, w, b, s=None):
        return conv_per_document(x, w, b, s, CU)

    check(ours, ref, inputs, dtype, tol)


@pytest.mark.parametrize("prefetch", [False, True], ids=["", "prefetch"])
@pytest.mark.parametrize("k, activation, with_state", [(4, "silu", True), (3, None, False)],
                         ids=["k4-silu-initial-state", "k3-linear"])
def test_short_conv_kernels_over_many_tiles(monkeypatch, k, activation, with_state, prefetch):
    """Documents that cross the edges of the programs' row runs (4 runs in the interpreter: 64,
    64, 64 and 8 rows, walked 4 rows a step), one-token documents, steps inside and across
    documents; the backward with and without loading the next step's rows ahead."""
    from flame.kernels import conv

    monkeypatch.setenv("FLAME_BACKEND", "triton")
    monkeypatch.setattr(conv, "_BWD_PREFETCH", prefetch)
    cu = torch.tensor([0, 2, 57, 59, 60, 130, 170, 200])
    n = len(cu) - 1
    x, w, b = randn(1, 200, 8, seed=0), randn(8, k, seed=1), randn(8, seed=2)
    inputs = [x, w, b] + ([randn(n, 8, k - 1, seed=3)] if with_state else [])

    def ours(x, w, b, s=None):
        return causal_conv1d(x, w, b, activation, cu, s, output_final_state=True)

    def ref(x, w, b, s=None):
        return conv_per_document(x, w, b, s, cu, activation)

    check(ours, ref, inputs, torch.float32, 1e-5)


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_short_conv_reads_a_channel_slice_in_place(monkeypatch, backend, dtype, tol):
    # x the middle channels of a wider projection output: rows C + 7 apart in memory
    monkeypatch.setenv("FLAME_BACKEND", backend)
    wide, w, b = randn(1, 25, C + 7, seed=0), randn(C, K, seed=1), randn(C, seed=2)

    def ours(wide, w, b):
        return causal_conv1d(wide[..., 3 : 3 + C], w, b, "silu", CU, None, output_final_state=True)

    def ref(wide, w, b):
        return conv_per_document(wide[..., 3 : 3 + C], w, b, None, CU)

    check(ours, ref, [wide, w, b], dtype, tol)


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_short_conv_batch_rows_are_documents(monkeypatch, backend, dtype, tol):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    x, w = randn(3, 11, C, seed=0), randn(C, K, seed=1)
    cu = torch.arange(0, 34, 11)

    def ours(x, w):
        return causal_conv1d(x, w, None, "silu", None, None, output_final_state=True)

    def ref(x, w):
        y, final = conv_per_document(x.reshape(1, 33, C), w, None, None, cu)
        return y.reshape(3, 11, C), final

    check(ours, ref, [x, w], dtype, tol)


def qkv_reference(x, w, b, cu, widths, norm_dim, activation="silu"):
    """The split convolution from conv_per_document, then F.normalize per head of q and k."""
    c = sum(widths)
    y, _ = conv_per_document(x[..., :c], w, b, None, cu, activation)
    q, k, v = y.split(widths, dim=-1)
    if norm_dim:
        q, k = (F.normalize(t.unflatten(-1, (-1, norm_dim)), dim=-1, eps=1e-6).flatten(-2) for t in (q, k))
    return q, k, v, x[..., c:]


@pytest.mark.parametrize("widths, norm_dim, activation, bias", [
    ((32, 32, 64), 8, "silu", True),     # four heads per channel block, v over two blocks
    ((16, 16, 48), 16, None, False),     # one head per block, no activation
    ((32, 32, 64), None, "silu", False),  # split only
    ((24, 24, 40), 12, "silu", True),    # heads of 12: the composed path
], ids=["heads8-silu-bias", "heads16-linear", "no-norm", "heads12-composed"])
@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_short_conv_qkv_split_and_normalised(monkeypatch, backend, dtype, tol, widths, norm_dim, activation, bias):
    """q, k, v of a fused projection (with 5 more channels after them) through one convolution:
    the three pieces, q and k L2-normalised per head, and the rest, with every gradient."""
    monkeypatch.setenv("FLAME_BACKEND", backend)
    c = sum(widths)
    x, w = randn(1, 25, c + 5, seed=0), randn(c, K, seed=1)
    inputs = [x, w] + ([randn(c, seed=2)] if bias else [])

    def ours(x, w, b=None):
        return causal_conv1d_qkv(x, w, b, activation, CU, widths, norm_dim)

    def ref(x, w, b=None):
        return qkv_reference(x, w, b, CU, widths, norm_dim, activation)

    check(ours, ref, inputs, dtype, tol)


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_short_conv_qkv_rows_and_unused_outputs(monkeypatch, backend, dtype, tol):
    """Batch rows as documents, several row runs per program grid, and a loss that reaches only
    q and v (k and the rest get no gradient: zeros in their place)."""
    monkeypatch.setenv("FLAME_BACKEND", backend)
    widths = (32, 32, 32)
    x, w = randn(2, 150, 100, seed=0), randn(96, K, seed=1)
    mine = [t.detach().to(dtype).requires_grad_() for t in (x, w)]
    q, k, v, rest = causal_conv1d_qkv(*mine, None, "silu", None, widths, 16)
    loss = (q * torch.linspace(-1, 1, 32, dtype=dtype)).sum() + v.square().sum()
    loss.backward()
    cu = torch.tensor([0, 150, 300])
    ref = [t.detach().double().requires_grad_() for t in (x, w)]
    qr, kr, vr, rr = qkv_reference(ref[0].reshape(1, 300, 100), ref[1], None, cu, widths, 16)
    ((qr * torch.linspace(-1, 1, 32, dtype=torch.float64)).sum() + vr.square().sum()).backward()
    assert rel(k.reshape(1, 300, 32), kr) < tol and rel(rest.reshape(1, 300, 4), rr) < tol
    assert rel(mine[0].grad, ref[0].grad) < tol and rel(mine[1].grad, ref[1].grad) < tol


def test_short_conv_qkv_bad_input():
    x, w = torch.randn(1, 5, 70), torch.randn(64, K)
    with pytest.raises(ValueError, match="three positive"):
        causal_conv1d_qkv(x, w, widths=(32, 32))
    with pytest.raises(ValueError, match="must be"):
        causal_conv1d_qkv(torch.randn(1, 5, 60), w, widths=(16, 16, 32))
    with pytest.raises(ValueError, match="qk_norm_dim"):
        causal_conv1d_qkv(x, w, widths=(16, 16, 32), qk_norm_dim=12)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_qkv(x, torch.randn(60, K), widths=(16, 16, 32))


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_short_conv_empty_sequence(monkeypatch, backend, packed):
    """T = 0: empty outputs, the final state is the initial state, and gradients flow (zero for
    the weights, the final state's cotangent for the initial state)."""
    monkeypatch.setenv("FLAME_BACKEND", backend)
    dtype = torch.float64 if backend == "torch" else torch.float32
    n = 3
    x = torch.randn(1 if packed else n, 0, C, dtype=dtype, requires_grad=True)
    w = torch.randn(C, K, dtype=dtype, requires_grad=True)
    b = torch.randn(C, dtype=dtype, requires_grad=True)
    s = torch.randn(n, C, K - 1, dtype=dtype, requires_grad=True)
    cu = torch.zeros(n + 1, dtype=torch.long) if packed else None
    y, final = causal_conv1d(x, w, b, "silu", cu, s, output_final_state=True)
    assert y.shape == x.shape and final.shape == s.shape
    assert rel(final, s) == 0.0
    cot = torch.randn_like(final)
    gx, gw, gb, gs = torch.autograd.grad(final, [x, w, b, s], cot, allow_unused=True, materialize_grads=True)
    assert gx.shape == x.shape and gw.abs().max() == 0 and gb.abs().max() == 0
    assert rel(gs, cot) < 1e-6
    # without a state: empty output, and the convolution's own backward on an empty input
    y, final = causal_conv1d(x, w, None, "silu", cu, None, output_final_state=True)
    assert y.shape == x.shape and final.shape == (n, C, K - 1) and final.abs().max() == 0
    (gw,) = torch.autograd.grad(y.sum() + w.sum(), [w])
    assert torch.equal(gw, torch.ones_like(w))


def test_short_conv_decode_steps_continue_the_prefill():
    conv = ShortConvolution(C, K, bias=True).double()
    x = torch.randn(2, 10, C, dtype=torch.float64)
    y_full, _ = conv(x)
    y_pre, cache = conv(x[:, :6], output_final_state=True)
    steps = []
    for t in range(6, 10):
        y_t, cache = conv.step(x[:, t], cache)
        steps.append(y_t)
    assert rel(torch.cat([y_pre, torch.stack(steps, 1)], 1), y_full) < 1e-12
    # decoding from an empty cache is the same as a full forward of the first tokens
    y0, _ = conv.step(x[:, 0], None)
    assert rel(y0, y_full[:, 0]) < 1e-12


def test_short_conv_bad_input():
    conv = ShortConvolution(C, K)
    with pytest.raises(ValueError, match="cu_seqlens"):
        conv(torch.randn(2, 5, C), cu_seqlens=torch.tensor([0, 5, 10]))
    with pytest.raises(ValueError, match="initial_state"):
        conv(torch.randn(1, 5, C), cache=torch.zeros(1, C, K))
    with pytest.raises(ValueError, match="weight"):
        conv(torch.randn(1, 5, C + 1))
    with pytest.raises(ValueError, match="activation"):
        ShortConvolution(C, activation="relu")


# ----------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_swiglu(monkeypatch, backend, dtype, tol):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    check(swiglu, lambda a, b: F.silu(a) * b, [randn(5, 33, seed=0), randn(5, 33, seed=1)], dtype, tol)


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=BACKEND_IDS)
def test_swiglu_packed_halves(monkeypatch, backend, dtype, tol):
    # rows past one program's 4 and a half width past one 512-column block, not a multiple of it
    monkeypatch.setenv("FLAME_BACKEND", backend)
    check(swiglu_packed, lambda ab: F.silu(ab[..., :600]) * ab[..., 600:], [randn(2, 5, 1200, seed=0)], dtype, tol)
    with pytest.raises(ValueError, match="even"):
        swiglu_packed(torch.randn(3, 7))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_swiglu_module(monkeypatch, backend):
    # one matmul for gate and up: same output and weight gradients as the three separate layers
    monkeypatch.setenv("FLAME_BACKEND", backend)
    dtype = torch.float64 if backend == "torch" else torch.float32
    mlp = SwiGLU(8, 24).to(dtype)
    x = torch.randn(3, 8, dtype=dtype)
    want = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    grads_want = torch.autograd.grad(want.square().sum(), [mlp.gate_proj.weight, mlp.up_proj.weight])
    got = mlp(x)
    grads = torch.autograd.grad(got.square().sum(), [mlp.gate_proj.weight, mlp.up_proj.weight])
    tol = 1e-12 if backend == "torch" else 1e-5
    assert rel(got, want) < tol and all(rel(a, b) < tol for a, b in zip(grads, grads_want))
    assert mlp.gate_proj.bias is None and mlp.down_proj.weight.shape == (8, 24)


# ----------------------------------------------------------------------------- torch.compile


def test_custom_ops_trace_whole_graph(monkeypatch):
    """The Triton paths are torch.library custom ops: dynamo traces them without graph breaks."""
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    norm, gnorm, rope, conv, mlp = RMSNorm(16), GatedRMSNorm(16), RotaryEmbedding(8), ShortConvolution(16), SwiGLU(16, 32)
    snorm, D = SkipGatedRMSNorm(16), torch.ones(4)

    def block(x, pos):
        h, res = norm(x, x)
        h = gnorm(h, res)
        h = snorm(h, x, D, res)
        h, _ = conv(h)
        q, k = rope(h.view(1, 6, 2, 8), h.view(1, 6, 2, 8), pos)
        return mlp(q.reshape(1, 6, 16) + k.reshape(1, 6, 16))

    x = torch.randn(1, 6, 16, requires_grad=True)
    pos = torch.arange(6)[None]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x, pos)
    out.sum().backward()
    assert rel(out, block(x, pos)) < 1e-6 and x.grad is not None


# ----------------------------------------------------------------------------- GPU, bf16


@pytest.mark.gpu
def test_gpu_layers_bf16_against_float64():
    tol = 2e-2
    x, r, gate, w = randn(64, 2048, seed=0), randn(64, 2048, seed=1), randn(64, 2048, seed=2), randn(2048, seed=3)
    check(lambda x, r, w: rms_norm(x, w, r), lambda x, r, w: (F.rms_norm(x + r, (2048,), w, eps=1e-6), x + r),
          [x, r, w], torch.bfloat16, tol, "cuda")
    check(lambda x, g, w: gated_rms_norm(x, g, w), lambda x, g, w: F.rms_norm(x, (2048,), w, eps=1e-6) * F.silu(g),
          [x, gate, w], torch.bfloat16, tol, "cuda")
    q = randn(2, 64, 4, 128, seed=4)
    pos = torch.cat([torch.arange(40), torch.arange(24), torch.arange(1000, 1064)]).view(2, 64)
    check(lambda q: apply_rotary(q, pos.cuda()), lambda q: rotary_complex(q, pos, 10000.0), [q], torch.bfloat16, tol, "cuda")
    cu = torch.tensor([0, 3, 100, 101, 300])
    xc, wc, bc, sc = randn(1, 300, 256, seed=5), randn(256, 4, seed=6), randn(256, seed=7), randn(4, 256, 3, seed=8)
    check(lambda x, w, b, s: causal_conv1d(x, w, b, "silu", cu.cuda(), s, output_final_state=True),
          lambda x, w, b, s: conv_per_document(x, w, b, s, cu), [xc, wc, bc, sc], torch.bfloat16, tol, "cuda")
    wide = randn(2, 300, 256 + 96, seed=11)  # the convolution over a channel slice, read in place
    check(lambda x, w: causal_conv1d(x[..., 32:288], w, None, "silu")[0],
          lambda x, w: conv_per_document(x[..., 32:288].reshape(1, 600, 256), w, None, None,
                                         torch.tensor([0, 300, 600]))[0].reshape(2, 300, 256),
          [wide, wc], torch.bfloat16, tol, "cuda")
    # q, k, v of a GDN-shaped fused projection (heads of 128, two narrow gates after them)
    widths, proj = (512, 512, 1024), randn(1, 300, 2056, seed=12)
    check(lambda x, w: causal_conv1d_qkv(x, w, None, "silu", cu.cuda(), widths, 128),
          lambda x, w: qkv_reference(x, w, None, cu, widths, 128), [proj, randn(2048, 4, seed=17)],
          torch.bfloat16, tol, "cuda")
    check(swiglu, lambda a, b: F.silu(a) * b, [randn(64, 512, seed=9), randn(64, 512, seed=10)], torch.bfloat16, tol, "cuda")
    yw, xw, zw, D = randn(2, 300, 2048, seed=13), randn(2, 300, 2304, seed=14), randn(2, 300, 4384, seed=15), randn(32, seed=16)
    check(lambda y, x, D, z, w: skip_gated_rms_norm(y, x[..., :2048], D, z[..., :2048], w),
          lambda y, x, D, z, w: skip_gated_plain(y, x[..., :2048], D, z[..., :2048], w),
          [yw, xw, D, zw, randn(2048, seed=17)], torch.bfloat16, tol, "cuda")
    check(swiglu_packed, lambda ab: F.silu(ab[:, :2816]) * ab[:, 2816:], [randn(64, 5632, seed=12)], torch.bfloat16, tol,
          "cuda")


@pytest.mark.gpu
def test_gpu_persistent_backwards_walk_many_tiles():
    """Shapes where each persistent backward program takes several tiles: RMSNorm rows of 2048
    and of 128 (tiles of 16 rows), and the convolution without an initial state (the variant
    compiled with a 128-register cap)."""
    tol = 2e-2
    x, r, w = randn(4096, 2048, seed=0), randn(4096, 2048, seed=1), randn(2048, seed=2)
    check(lambda x, r, w: rms_norm(x, w, r), lambda x, r, w: (F.rms_norm(x + r, (2048,), w, eps=1e-6), x + r),
          [x, r, w], torch.bfloat16, tol, "cuda")
    xh, gh, wh = randn(8192, 128, seed=3), randn(8192, 128, seed=4), randn(128, seed=5)
    check(lambda x, g, w: gated_rms_norm(x, g, w), lambda x, g, w: F.rms_norm(x, (128,), w, eps=1e-6) * F.silu(g),
          [xh, gh, wh], torch.bfloat16, tol, "cuda")
    cu = torch.tensor([0, 1, 1000, 4100, 8192])
    xc, wc = randn(1, 8192, 256, seed=6), randn(256, 4, seed=7)
    check(lambda x, w: causal_conv1d(x, w, None, "silu", cu.cuda())[0],
          lambda x, w: conv_per_document(x, w, None, None, cu)[0], [xc, wc], torch.bfloat16, tol, "cuda")
    check(lambda x, w: causal_conv1d(x, w, None, None)[0],
          lambda x, w: conv_per_document(x, w, None, None, torch.tensor([0, 8192]), None)[0], [xc, wc],
          torch.bfloat16, tol, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)], ids=["bf16", "fp32"])
def test_gpu_short_conv_wide_channels_and_odd_documents(dtype, tol):
    """Several channel blocks (1536 channels, not a power of two), many row runs, empty and
    one-token documents, bias, initial state and final state; and an empty sequence."""
    cu = torch.tensor([0, 0, 1, 5, 5, 2000, 2003, 4099])
    x, w, b, s = randn(1, 4099, 1536, seed=0), randn(1536, 4, seed=1), randn(1536, seed=2), randn(7, 1536, 3, seed=3)
    check(lambda x, w, b, s: causal_conv1d(x, w, b, "silu", cu.cuda(), s, output_final_state=True),
          lambda x, w, b, s: conv_per_document(x, w, b, s, cu), [x, w, b, s], dtype, tol, "cuda")
    xe = torch.randn(2, 0, 1536, device="cuda", dtype=dtype, requires_grad=True)
    we = torch.randn(1536, 4, device="cuda", dtype=dtype, requires_grad=True)
    y, _ = causal_conv1d(xe, we)
    (gw,) = torch.autograd.grad(y.sum() + we.sum(), [we])
    assert y.shape == xe.shape and torch.equal(gw, torch.ones_like(we))
