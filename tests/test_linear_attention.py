"""Chunked gated linear attention (chunk_simple_gla, chunk_gla) against float64 references.

CPU: the Triton kernels run in the interpreter in fp32 on tiny shapes. GPU (`gpu` marker):
bf16 at larger shapes with the tolerances of the kernel goals; relative error norms are
printed and, when FLAME_TEST_RESULTS names a folder, written there as JSON.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from flame.kernels import chunk_gla, chunk_simple_gla
from flame.kernels.linear_attention_ref import linear_attention_recurrent, linear_attention_reference

KERNELS = {"simple_gla": (chunk_simple_gla, True), "gla": (chunk_gla, False)}


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(B, T, H, K, V, scalar_gate, num_states, dtype, device, decay_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g_shape = (B, T, H) if scalar_gate else (B, T, H, K)
    g = F.logsigmoid(torch.randn(g_shape, generator=gen) + 2.0) * decay_scale
    h0 = torch.randn(num_states, H, K, V, generator=gen) if num_states else None
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    g = g.to(device=device, dtype=torch.float32)
    h0 = None if h0 is None else h0.to(device)
    return q, k, v, g, h0


def forward_backward(fn, q, k, v, g, h0, cu_seqlens, do, dht, dtype=None):
    """Runs fn with fresh leaves (cast to dtype if given); returns outputs and all gradients."""
    leaves = [x.detach().clone().to(dtype or x.dtype).requires_grad_() for x in (q, k, v, g)]
    h0_leaf = None if h0 is None else h0.detach().clone().to(dtype or h0.dtype).requires_grad_()
    o, ht = fn(*leaves, initial_state=h0_leaf, output_final_state=True, cu_seqlens=cu_seqlens)
    loss = (o * do.to(o.dtype)).sum() + (ht * dht.to(ht.dtype)).sum()
    loss.backward()
    grads = [x.grad for x in leaves] + ([h0_leaf.grad] if h0 is not None else [])
    return o, ht, grads


def compare(name, fn, scalar_gate, B, T, H, K, V, cu_seqlens, with_h0, dtype, device, decay_scale=1.0):
    num_seqs = B if cu_seqlens is None else len(cu_seqlens) - 1
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, scalar_gate, num_seqs if with_h0 else 0, dtype, device, decay_scale)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen).to(device)
    dht = torch.randn(num_seqs, H, K, V, generator=gen).to(device)
    o, ht, grads = forward_backward(fn, q, k, v, g, h0, cu, do, dht)
    ro, rht, rgrads = forward_backward(linear_attention_reference, q, k, v, g, h0, cu, do, dht, torch.float64)
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dh0"]
    errors = dict(zip(names, [rel_err(o, ro), rel_err(ht, rht)] + [rel_err(a, b) for a, b in zip(grads, rgrads)]))
    assert torch.isfinite(o).all() and all(torch.isfinite(x).all() for x in grads)
    print(name, {key: f"{val:.2e}" for key, val in errors.items()})
    return errors


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "triton")


# ---------------------------------------------------------------------------------------------
# The reference itself.


@pytest.mark.parametrize("scalar_gate", [True, False])
def test_reference_matches_token_recurrence(scalar_gate):
    q, k, v, g, h0 = make_inputs(1, 45, 2, 16, 24, scalar_gate, 3, torch.float64, "cpu")
    cu = torch.tensor([0, 7, 30, 45])
    o, ht = linear_attention_reference(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    ro, rht = linear_attention_recurrent(q, k, v, g, initial_state=h0, cu_seqlens=cu)
    assert rel_err(o, ro) < 1e-12
    assert rel_err(ht, rht) < 1e-12


# ---------------------------------------------------------------------------------------------
# Triton kernels in the interpreter, fp32.

CPU_CASES = [
    # kernel, B, T, H, K, V, cu_seqlens, initial state
    ("simple_gla", 2, 70, 1, 16, 32, None, True),
    ("gla", 1, 70, 1, 32, 16, None, True),
    ("simple_gla", 1, 100, 1, 16, 24, [0, 5, 5, 75, 100], True),
    ("gla", 1, 100, 1, 16, 32, [0, 30, 35, 100], True),
    ("gla", 1, 64, 1, 16, 16, None, False),
]


def force_fused_forward(monkeypatch, on: bool) -> list:
    """Sets the scalar-gate forward's choice (one fused kernel or cumsum, state pass and output
    kernel); returns a list that records each use of the fused kernel."""
    from flame.kernels import linear_attention

    uses, fused = [], linear_attention._fused_forward
    monkeypatch.setattr(linear_attention, "fused_forward", lambda *args: on)
    monkeypatch.setattr(linear_attention, "_fused_forward", lambda *a: uses.append(1) or fused(*a))
    return uses


# The scalar gate's forward both ways (fused kernel or chunked passes); GLA has the chunked one.
CPU_FORWARD_CASES = [(case, fused) for case in CPU_CASES for fused in ((True, False) if case[0] == "simple_gla" else (False,))]


@pytest.mark.parametrize("case,fused_fwd", CPU_FORWARD_CASES,
                         ids=lambda c: f"{c[0]}-T{c[2]}-K{c[4]}-V{c[5]}-{'varlen' if c[6] else 'fixed'}"
                         if isinstance(c, tuple) else ("fused-fwd" if c else "chunked-fwd"))
def test_triton_matches_reference_cpu(case, fused_fwd, triton_backend, monkeypatch):
    kernel, B, T, H, K, V, cu, with_h0 = case
    fn, scalar_gate = KERNELS[kernel]
    uses = force_fused_forward(monkeypatch, fused_fwd)
    errors = compare(kernel, fn, scalar_gate, B, T, H, K, V, cu, with_h0, torch.float32, "cpu")
    assert bool(uses) == (fused_fwd and scalar_gate), uses
    for key, err in errors.items():
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


def test_fused_forward_rule():
    """One program per SM at least, counting the segments long sequences are cut into."""
    from flame.kernels.linear_attention import FUSED_SEGMENT_TOKENS, fused_forward

    assert FUSED_SEGMENT_TOKENS == 4096  # the cases below count segments of 4096 tokens
    assert fused_forward(8, 16, 128, 8 * 4096, 132)  # 8 x 16 x 2 V tiles = 256 programs
    assert fused_forward(1, 16, 128, 32768, 132)  # 8 segments: 256 programs
    assert not fused_forward(1, 16, 128, 8192, 132)  # 2 segments: 64 programs
    assert not fused_forward(2, 4, 128, 8192, 132)  # 16 programs
    assert fused_forward(8, 32, 64, 8 * 4096, 132)  # Mamba2's 32 value heads


# Sequences cut into segments of 64 or 128 tokens (the fused forward's first pass carries the
# state from segment to segment): lengths of 0, 1, one segment exactly, and several segments
# with a partial chunk at the end; with and without initial states, grouped value heads.
SEGMENT_CASES = [
    # B, T, HQ, H, K, V, cu_seqlens, initial state
    (1, 300, 1, 1, 16, 32, [0, 130, 131, 131, 195, 300], True),
    (2, 200, 1, 2, 32, 16, None, False),
    (1, 256, 1, 3, 16, 16, [0, 256], True),
]


@pytest.mark.parametrize("seg_len", [64, 128])
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=lambda c: f"T{c[1]}-HQ{c[2]}-H{c[3]}-{'varlen' if c[6] else 'fixed'}")
def test_fused_forward_segments_cpu(case, seg_len, triton_backend, monkeypatch):
    from flame.kernels import linear_attention

    B, T, HQ, H, K, V, cu, with_h0 = case
    monkeypatch.setattr(linear_attention, "FUSED_SEGMENT_TOKENS", seg_len)
    uses = force_fused_forward(monkeypatch, True)
    errors = compare_grouped(B, T, HQ, H, K, V, cu, with_h0, torch.float32, "cpu")
    assert uses
    for key, err in errors.items():
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("seg_len", [64, 128])
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=lambda c: f"T{c[1]}-HQ{c[2]}-H{c[3]}-{'varlen' if c[6] else 'fixed'}")
def test_fused_forward_kept_states_cpu(case, seg_len, triton_backend, monkeypatch):
    # FLAME_GLA_BACKWARD=saved: the fused forward writes the chunk states, segments carried
    # into later ones included, and the backward runs only the reverse state pass on them.
    from flame.kernels import linear_attention

    B, T, HQ, H, K, V, cu, with_h0 = case
    monkeypatch.setenv("FLAME_GLA_BACKWARD", "saved")
    monkeypatch.setattr(linear_attention, "FUSED_SEGMENT_TOKENS", seg_len)
    uses, passes, states = force_fused_forward(monkeypatch, True), [], linear_attention._states
    monkeypatch.setattr(linear_attention, "_states", lambda *a: passes.append(a[8:10]) or states(*a))
    errors = compare_grouped(B, T, HQ, H, K, V, cu, with_h0, torch.float32, "cpu")
    assert uses and passes == [(False, True)]
    for key, err in errors.items():
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


# Variants of the two GLA kernels on 16-row blocks (`gla_intra_config`), together covering each
# code path: partner rows unrolled, diagonal scores in their own tile, the dA diagonal from the
# scratch or from reductions, split diagonal gradient terms, several K tiles per program; every
# chunk by blocks (max_spread -1) or those of small gate spread as one product. Each names every switch,
# so that the set stays the same when the defaults change.
GLA_INTRA_VARIANTS = {
    "plain": dict(scores_unroll=1, scores_split=False, grad_unroll=1, grad_scratch=False, grad_split=False,
                  max_spread=-1),
    "split-scratch": dict(scores_unroll=4, scores_split=True, scores_bk=16,
                          grad_unroll=4, grad_scratch=True, grad_split=True, grad_bk=16, max_spread=-1),
    "scratch": dict(scores_unroll=2, scores_split=False, grad_unroll=2, grad_scratch=True, grad_split=False,
                    max_spread=-1),
    "split": dict(scores_unroll=1, scores_split=False, grad_unroll=8, grad_scratch=False, grad_split=True,
                  max_spread=-1),
    "factored": dict(scores_unroll=4, scores_split=True, scores_bk=16, scores_stages=1,
                     grad_unroll=2, grad_scratch=True, grad_split=True, grad_bk=16, grad_stages=1, max_spread=30,
                     output_forms_a=False, grad_dots_16bit=False),
}
GLA_VARIANT_CASES = [
    ("gla", 1, 80, 1, 16, 32, [0, 30, 35, 80], True),
    ("gla", 1, 70, 1, 32, 16, None, True),
]


def use_gla_variant(monkeypatch, name):
    from flame.kernels import linear_attention

    default = linear_attention.gla_intra_config()
    variant = {**default, **GLA_INTRA_VARIANTS[name]}
    assert variant.keys() == default.keys()
    monkeypatch.setattr(linear_attention, "gla_intra_config", lambda: dict(variant))


@pytest.mark.parametrize("variant", list(GLA_INTRA_VARIANTS))
@pytest.mark.parametrize("case", GLA_VARIANT_CASES, ids=lambda c: f"T{c[2]}-K{c[4]}-V{c[5]}-{'varlen' if c[6] else 'fixed'}")
def test_gla_intra_variants_cpu(case, variant, triton_backend, monkeypatch):
    use_gla_variant(monkeypatch, variant)
    _, B, T, H, K, V, cu, with_h0 = case
    errors = compare("gla", chunk_gla, False, B, T, H, K, V, cu, with_h0, torch.float32, "cpu")
    for key, err in errors.items():
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("max_spread", [30, -1], ids=["factored", "exact"])
def test_gla_mixed_decay_blocks_cpu(max_spread, triton_backend, monkeypatch):
    """Chunks of weak and of strong decay in one launch: with max_spread 30 the weak ones go as
    one product through reference rows and the strong ones (a spread of ~100 or more: their
    factors would overflow) by 16-row blocks with exact pairs; every output and gradient
    matches float64 either way."""
    from flame.kernels import linear_attention

    default = linear_attention.gla_intra_config()
    monkeypatch.setattr(linear_attention, "gla_intra_config", lambda: {**default, "max_spread": max_spread})
    q, k, v, g, h0 = make_inputs(1, 150, 2, 16, 32, False, 2, torch.float32, "cpu")
    g[:, 20:24] *= 60.0  # the first chunk of the first sequence
    g[:, 100:, 1] *= 60.0  # the second sequence's chunks from row 100, one head
    cu = torch.tensor([0, 70, 150], dtype=torch.int32)
    gen = torch.Generator().manual_seed(1)
    do, dht = torch.randn(1, 150, 2, 32, generator=gen), torch.randn(2, 2, 16, 32, generator=gen)
    o, ht, grads = forward_backward(chunk_gla, q, k, v, g, h0, cu, do, dht)
    ro, rht, rgrads = forward_backward(linear_attention_reference, q, k, v, g, h0, cu, do, dht, torch.float64)
    assert torch.isfinite(o).all() and all(torch.isfinite(x).all() for x in grads)
    assert rel_err(o, ro) < 1e-5 and rel_err(ht, rht) < 1e-5
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, rgrads):
        assert rel_err(a, b) < 1e-5, name


def test_simple_gla_unfused_backward_cpu(triton_backend, monkeypatch):
    # The separate dv / dqk kernels serve K above the fused kernel's tile and fp32 on a GPU.
    from flame.kernels import linear_attention

    monkeypatch.setattr(linear_attention, "FUSED_SCALAR_BACKWARD", False)
    errors = compare("simple_gla", chunk_simple_gla, True, 1, 80, 1, 16, 32, [0, 20, 80], True, torch.float32, "cpu")
    for key, err in errors.items():
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


def use_scalar_backward(monkeypatch, block_v, warps=4, stages=2):
    """The fused scalar-gate backward with V tiles of block_v; returns the list of its launches."""
    from flame.kernels import linear_attention

    monkeypatch.setattr(linear_attention, "scalar_backward_config",
                        lambda: dict(block_v=block_v, warps=warps, stages=stages, maxnreg=None))
    launched = []
    kernel = linear_attention.kern.chunk_backward_scalar_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(linear_attention.kern, "chunk_backward_scalar_kernel", Spy())
    return launched


# (B, T, H, K, V, cu_seqlens, initial states): V over several tiles (the last one partial), K != V,
# a partial last chunk, an empty sequence.
FUSED_BACKWARD_CASES = [(2, 80, 2, 16, 160, None, True), (1, 150, 1, 32, 128, [0, 20, 20, 150], False)]


@pytest.mark.parametrize("block_v", [64, 128])
@pytest.mark.parametrize("case", FUSED_BACKWARD_CASES, ids=lambda c: f"T{c[1]}-K{c[3]}-V{c[4]}")
def test_simple_gla_fused_backward_tiles_cpu(case, block_v, triton_backend, monkeypatch):
    launched = use_scalar_backward(monkeypatch, block_v)
    B, T, H, K, V, cu, with_h0 = case
    errors = compare("simple_gla", chunk_simple_gla, True, B, T, H, K, V, cu, with_h0, torch.float32, "cpu")
    assert len(launched) == 1
    for key, err in errors.items():
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("kernel", ["simple_gla", "gla"])
@pytest.mark.parametrize("order", ["heads-fast", "chunks-fast", "chunks-past-grid-limit"])
def test_grid_orders_cpu(order, kernel, triton_backend, monkeypatch):
    """The chunk-parallel kernels (simple GLA's fused backward; GLA's scores, output, dv, intra
    and inter gradients) take their (chunk, head) from either grid order
    (flame.kernels.utils.HEADS_FAST; past the grid's y limit the chunks stay on x): float64
    within 1e-5."""
    from flame.kernels import utils

    monkeypatch.setattr(utils, "HEADS_FAST", order != "chunks-fast")
    if order == "chunks-past-grid-limit":
        monkeypatch.setattr(utils, "GRID_YZ_LIMIT", 1)
    launched = use_scalar_backward(monkeypatch, 64) if kernel == "simple_gla" else None
    fn, scalar_gate = KERNELS[kernel]
    errors = compare(kernel, fn, scalar_gate, 2, 80, 2, 16, 96, None, True, torch.float32, "cpu")
    assert launched is None or len(launched) == 1
    for key, err in errors.items():
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("kernel", ["simple_gla", "gla"])
def test_strong_decay_stays_finite_and_exact(kernel, triton_backend):
    # Decays of e^-30 per step: any intra-chunk factorisation with a positive exponent overflows.
    fn, scalar_gate = KERNELS[kernel]
    errors = compare(kernel, fn, scalar_gate, 1, 40, 1, 16, 16, None, True, torch.float32, "cpu", decay_scale=30.0)
    for key, err in errors.items():
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("kernel", ["simple_gla", "gla"])
def test_backward_modes_cpu(kernel, triton_backend, monkeypatch):
    """FLAME_GLA_BACKWARD=saved: the forward keeps its chunk states and gate cumsums and the
    backward runs only the reverse state pass; recompute: the backward runs both passes again.
    Same gradients either way; a forward without grad keeps nothing."""
    from flame.kernels import linear_attention

    calls = []
    states, cumsum = linear_attention._states, linear_attention._cumsum

    def spy_states(*args):
        calls.append(("states", args[8], args[9]))  # (forward, backward) passes
        return states(*args)

    def spy_cumsum(*args):
        calls.append(("cumsum",))
        return cumsum(*args)

    monkeypatch.setattr(linear_attention, "_states", spy_states)
    monkeypatch.setattr(linear_attention, "_cumsum", spy_cumsum)
    force_fused_forward(monkeypatch, False)  # the recomputing forward's passes are counted below
    fn, scalar_gate = KERNELS[kernel]
    q, k, v, g, h0 = make_inputs(1, 100, 2, 16, 32, scalar_gate, 2, torch.float32, "cpu")
    cu = torch.tensor([0, 30, 100], dtype=torch.int32)
    gen = torch.Generator().manual_seed(1)
    do, dht = torch.randn(1, 100, 2, 32, generator=gen), torch.randn(2, 2, 16, 32, generator=gen)
    results, expected = {}, {"saved": [("cumsum",), ("states", True, False), ("states", False, True)],
                             "recompute": [("cumsum",), ("states", True, False), ("cumsum",), ("states", True, True)]}
    for mode in ("saved", "recompute"):
        monkeypatch.setenv("FLAME_GLA_BACKWARD", mode)
        calls.clear()
        results[mode] = forward_backward(fn, q, k, v, g, h0, cu, do, dht)
        assert calls == expected[mode], mode
    o, ht, grads = results["saved"]
    ro, rht, rgrads = results["recompute"]
    assert torch.equal(o, ro) and torch.equal(ht, rht)
    for a, b in zip(grads, rgrads):
        assert torch.equal(a, b)
    for mode, keeps_g in (("saved", False), ("recompute", True)):  # with the cumsums kept, g is not
        monkeypatch.setenv("FLAME_GLA_BACKWARD", mode)
        g_leaf, kept = g.clone().requires_grad_(), []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.untyped_storage().data_ptr()) or t,
                                                      lambda t: t):
            fn(q, k, v, g_leaf)
        assert (g_leaf.untyped_storage().data_ptr() in kept) == keeps_g, mode
    monkeypatch.setenv("FLAME_GLA_BACKWARD", "saved")
    fwd_op, saves = linear_attention._fwd_op, []

    def spy_fwd_op(*args):
        saves.append(args[-1])
        return fwd_op(*args)

    monkeypatch.setattr(linear_attention, "_fwd_op", spy_fwd_op)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    with torch.no_grad():
        fn(*leaves)
    fn(q, k, v, g)  # no input needs a gradient
    fn(*leaves)
    monkeypatch.setenv("FLAME_GLA_BACKWARD", "auto")  # the default: kept for GLA only
    fn(*leaves)
    assert saves == [False, False, True, not scalar_gate]
    monkeypatch.setenv("FLAME_GLA_BACKWARD", "keep")
    with pytest.raises(ValueError, match="FLAME_GLA_BACKWARD"):
        fn(*leaves)


def test_torch_backend_matches_reference(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "torch")
    errors = compare("gla", chunk_gla, False, 1, 50, 2, 16, 24, [0, 20, 50], True, torch.float32, "cpu")
    for key, err in errors.items():
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


def test_defaults_scale_and_no_gate(triton_backend):
    q, k, v, _, _ = make_inputs(1, 20, 1, 16, 16, True, 0, torch.float32, "cpu")
    o, ht = chunk_simple_gla(q, k, v)
    assert ht is None
    ro, _ = linear_attention_reference(q, k, v, torch.zeros(1, 20, 1), scale=16**-0.5)
    assert rel_err(o, ro) < 1e-5
    o2, _ = chunk_simple_gla(q, k, v, torch.zeros(1, 20, 1), scale=0.5)
    assert rel_err(o2, ro * (0.5 / 16**-0.5)) < 1e-5


def test_noncontiguous_inputs(triton_backend):
    q, k, v, g, _ = make_inputs(1, 30, 2, 16, 16, False, 0, torch.float32, "cpu")
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not qt.is_contiguous()
    o, _ = chunk_gla(qt, k, v, g)
    ro, _ = linear_attention_reference(q, k, v, g)
    assert rel_err(o, ro) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(monkeypatch, backend):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    q, k, v, g, h0 = make_inputs(1, 40, 1, 16, 16, False, 2, torch.float32, "cpu")
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)

    def step(q, k, v, g, h0):
        o, ht = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        return o.square().sum() + ht.sum()

    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    loss.backward()
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    ref_loss = step(*ref_leaves)
    ref_loss.backward()
    assert rel_err(loss.detach(), ref_loss.detach()) < 1e-6
    for a, b in zip(leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) < 1e-6


# ---------------------------------------------------------------------------------------------
# Grouped heads (simple GLA): q, k with H heads, each shared by HV / H value heads.


def compare_grouped(B, T, HQ, HV, K, V, cu_seqlens, with_h0, dtype, device):
    """chunk_simple_gla on q, k [B, T, HQ, K] and v, g with HV heads against the float64 reference
    on q, k repeated for each value head (gradients summed over each group by autograd)."""
    num_seqs = B if cu_seqlens is None else len(cu_seqlens) - 1
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(B, T, HQ, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, HV, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, HV, generator=gen) + 2.0)
    h0 = torch.randn(num_seqs, HV, K, V, generator=gen).to(device) if with_h0 else None
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    g = g.to(device)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    do = torch.randn(B, T, HV, V, generator=gen).to(device)
    dht = torch.randn(num_seqs, HV, K, V, generator=gen).to(device)

    def expanded_reference(q, k, v, g, **kwargs):
        groups = HV // HQ
        return linear_attention_reference(q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2),
                                          v, g, K ** -0.5, kwargs["initial_state"], True, kwargs["cu_seqlens"])

    o, ht, grads = forward_backward(chunk_simple_gla, q, k, v, g, h0, cu, do, dht)
    ro, rht, rgrads = forward_backward(expanded_reference, q, k, v, g, h0, cu, do, dht, torch.float64)
    assert grads[0].shape == q.shape and grads[1].shape == k.shape
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dh0"]
    errors = dict(zip(names, [rel_err(o, ro), rel_err(ht, rht)] + [rel_err(a, b) for a, b in zip(grads, rgrads)]))
    print("simple_gla grouped", {key: f"{val:.2e}" for key, val in errors.items()})
    return errors


GROUPED_BACKWARDS = {  # (GROUPED_BACKWARD, FUSED_SCALAR_BACKWARD, value heads per dv/dg program)
    "grouped": (True, True, 1), "grouped-3-heads": (True, True, 3), "grouped-2-heads": (True, True, 2),
    "fused": (False, True, 1), "unfused": (False, False, 1),
}


@pytest.mark.parametrize("backward", list(GROUPED_BACKWARDS))
def test_simple_gla_grouped_heads_cpu(backward, triton_backend, monkeypatch):
    from flame.kernels import linear_attention

    grouped, fused, heads = GROUPED_BACKWARDS[backward]
    monkeypatch.setattr(linear_attention, "GROUPED_BACKWARD", grouped)
    monkeypatch.setattr(linear_attention, "FUSED_SCALAR_BACKWARD", fused)
    config = dict(linear_attention.grouped_backward_config(), heads=heads)  # 2 does not divide 3: one head
    monkeypatch.setattr(linear_attention, "grouped_backward_config", lambda: dict(config))
    errors = compare_grouped(1, 90, 2, 6, 16, 32, [0, 7, 70, 90], True, torch.float32, "cpu")
    for key, err in errors.items():
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


def test_simple_gla_grouped_heads_torch_backend(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "torch")
    errors = compare_grouped(2, 40, 1, 3, 16, 16, None, False, torch.float32, "cpu")
    for key, err in errors.items():
        assert err < 1e-6, f"{key}: relative error {err:.2e}"


def test_simple_gla_grouped_matches_recurrent(triton_backend):
    from flame.kernels import fused_recurrent_simple_gla

    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 20, 1, 16, generator=gen) for _ in range(2))
    v = torch.randn(1, 20, 4, 16, generator=gen)
    g = F.logsigmoid(torch.randn(1, 20, 4, generator=gen))
    o, ht = chunk_simple_gla(q, k, v, g, output_final_state=True)
    ro, rht = fused_recurrent_simple_gla(q, k, v, g, output_final_state=True)
    assert rel_err(o, ro) < 1e-5 and rel_err(ht, rht) < 1e-5


# ---------------------------------------------------------------------------------------------
# Bad input.


def _bad_input_cases():
    q = torch.randn(1, 8, 2, 16)
    v = torch.randn(1, 8, 2, 16)
    gs = torch.randn(1, 8, 2)
    gk = torch.randn(1, 8, 2, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return [
        ("q", chunk_gla, dict(q=q[0], k=q, v=v, g=gk)),
        ("k", chunk_gla, dict(q=q, k=q[:, :4], v=v, g=gk)),
        ("v", chunk_gla, dict(q=q, k=q, v=torch.randn(1, 8, 3, 16), g=gk)),
        ("g", chunk_gla, dict(q=q, k=q, v=v, g=gs)),
        ("g", chunk_simple_gla, dict(q=q, k=q, v=v, g=gk)),
        ("or a multiple of H value heads", chunk_simple_gla, dict(q=q, k=q, v=torch.randn(1, 8, 3, 16), g=gs)),
        ("one decay per value head", chunk_simple_gla, dict(q=q, k=q, v=torch.randn(1, 8, 4, 16), g=gs)),
        ("head dim", chunk_gla, dict(q=torch.randn(1, 8, 2, 8), k=torch.randn(1, 8, 2, 8), v=v, g=torch.randn(1, 8, 2, 8))),
        ("head dim", chunk_simple_gla, dict(q=q, k=q, v=torch.randn(1, 8, 2, 512), g=gs)),
        ("cu_seqlens must start at 0", chunk_gla, dict(q=q, k=q, v=v, g=gk, cu_seqlens=torch.tensor([1, 3, 8]))),
        ("non-decreasing", chunk_gla, dict(q=q, k=q, v=v, g=gk, cu_seqlens=torch.tensor([0, 5, 3, 8]))),
        ("cu_seqlens must end", chunk_gla, dict(q=q, k=q, v=v, g=gk, cu_seqlens=torch.tensor([0, 3, 7]))),
        ("cu_seqlens must be int32 or int64", chunk_gla, dict(q=q, k=q, v=v, g=gk, cu_seqlens=cu.float())),
        ("batch size must be 1", chunk_simple_gla,
         dict(q=q.expand(2, -1, -1, -1), k=q.expand(2, -1, -1, -1), v=v.expand(2, -1, -1, -1), g=gs.expand(2, -1, -1), cu_seqlens=cu)),
        ("initial_state", chunk_gla, dict(q=q, k=q, v=v, g=gk, cu_seqlens=cu, initial_state=torch.randn(1, 2, 16, 16))),
        ("dtype", chunk_gla, dict(q=q, k=q.double(), v=v, g=gk)),
    ]


@pytest.mark.parametrize("case", _bad_input_cases(), ids=lambda c: f"{c[1].__name__}-{c[0]}")
def test_bad_input_raises_value_error(case, triton_backend):
    words, fn, kwargs = case
    with pytest.raises(ValueError, match=words):
        fn(**kwargs)


# ---------------------------------------------------------------------------------------------
# GPU, bf16.

GPU_CASES = [
    ("simple_gla", 2, 1000, 4, 128, 128, None, True),
    ("gla", 2, 1000, 4, 128, 128, None, True),
    ("simple_gla", 1, 1500, 4, 64, 256, [0, 37, 600, 1100, 1500], True),
    ("gla", 1, 1500, 4, 256, 64, [0, 37, 600, 1100, 1500], True),
    ("gla", 1, 700, 2, 48, 80, [0, 300, 301, 700], False),
]
# Mamba2-like grouping: one q/k head shared by every value head.
GPU_GROUPED_CASES = [(1, 1500, 1, 8, 128, 64, [0, 37, 600, 1100, 1500], True), (2, 700, 2, 8, 64, 128, None, False)]


def _record(name, errors):
    folder = os.environ.get("FLAME_TEST_RESULTS")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "linear_attention_errors.json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    data[name] = errors
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def assert_bf16_tolerances(errors):
    """The kernel goals' bf16 tolerances: outputs and final states within 5e-3, gradients 2e-2."""
    assert errors["o"] < 5e-3 and errors["final_state"] < 5e-3, errors
    for key in ("dq", "dk", "dv", "dg", "dh0"):
        if key in errors:
            assert errors[key] < 2e-2, f"{key}: relative error {errors[key]:.2e}"


def _check_gpu_bf16(case, suffix=""):
    kernel, B, T, H, K, V, cu, with_h0 = case
    fn, scalar_gate = KERNELS[kernel]
    name = f"{kernel}-B{B}-T{T}-H{H}-K{K}-V{V}-{'varlen' if cu else 'fixed'}{suffix}"
    errors = compare(name, fn, scalar_gate, B, T, H, K, V, cu, with_h0, torch.bfloat16, "cuda")
    _record(name, errors)
    assert_bf16_tolerances(errors)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-T{c[2]}-K{c[4]}-V{c[5]}-{'varlen' if c[6] else 'fixed'}")
def test_triton_matches_reference_gpu_bf16(case, monkeypatch):
    monkeypatch.delenv("FLAME_BACKEND", raising=False)
    _check_gpu_bf16(case)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(GLA_INTRA_VARIANTS))
@pytest.mark.parametrize("case", [c for c in GPU_CASES if c[0] == "gla"],
                         ids=lambda c: f"T{c[2]}-K{c[4]}-V{c[5]}-{'varlen' if c[6] else 'fixed'}")
def test_gla_intra_variants_gpu_bf16(case, variant, monkeypatch):
    monkeypatch.delenv("FLAME_BACKEND", raising=False)
    use_gla_variant(monkeypatch, variant)
    _check_gpu_bf16(case, f"-{variant}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_GROUPED_CASES, ids=lambda c: f"HQ{c[2]}-HV{c[3]}-K{c[4]}-V{c[5]}")
def test_simple_gla_grouped_heads_gpu_bf16(case, monkeypatch):
    monkeypatch.delenv("FLAME_BACKEND", raising=False)
    errors = compare_grouped(*case, torch.bfloat16, "cuda")
    _record(f"simple_gla-grouped-HQ{case[2]}-HV{case[3]}", errors)
    assert_bf16_tolerances(errors)


@pytest.mark.gpu
@pytest.mark.parametrize("block_v,warps,stages", [(64, 8, 3), (128, 8, 2)])
@pytest.mark.parametrize("case", [c for c in GPU_CASES if c[0] == "simple_gla"],
                         ids=lambda c: f"T{c[2]}-K{c[4]}-V{c[5]}-{'varlen' if c[6] else 'fixed'}")
def test_simple_gla_fused_backward_tiles_gpu_bf16(case, block_v, warps, stages, monkeypatch):
    # V = 256 walks four or two tiles; V = 128 two or one.
    monkeypatch.delenv("FLAME_BACKEND", raising=False)
    launched = use_scalar_backward(monkeypatch, block_v, warps, stages)
    _check_gpu_bf16(case, f"-tiles{block_v}x{warps}x{stages}")
    assert len(launched) == 1


# The scalar gate's two forwards (the defaults pick by shape: the small test shapes take the
# chunked one), with Mamba2-like grouping and small heads among them.
GPU_FORWARD_CASES = [c for c in GPU_CASES if c[0] == "simple_gla"] + [("simple_gla", 1, 600, 4, 16, 16, [0, 100, 101, 600], True)]


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False], ids=["fused-fwd", "chunked-fwd"])
@pytest.mark.parametrize("case", GPU_FORWARD_CASES, ids=lambda c: f"T{c[2]}-K{c[4]}-V{c[5]}-{'varlen' if c[6] else 'fixed'}")
def test_simple_gla_forwards_gpu_bf16(case, fused, monkeypatch):
    monkeypatch.delenv("FLAME_BACKEND", raising=False)
    uses = force_fused_forward(monkeypatch, fused)
    _check_gpu_bf16(case, "-fused-fwd" if fused else "-chunked-fwd")
    assert bool(uses) == fused


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_GROUPED_CASES, ids=lambda c: f"HQ{c[2]}-HV{c[3]}-K{c[4]}-V{c[5]}")
def test_simple_gla_grouped_fused_forward_gpu_bf16(case, monkeypatch):
    monkeypatch.delenv("FLAME_BACKEND", raising=False)
    uses = force_fused_forward(monkeypatch, True)
    errors = compare_grouped(*case, torch.bfloat16, "cuda")
    assert uses
    assert_bf16_tolerances(errors)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["auto", "saved"])
@pytest.mark.parametrize("case", GPU_FORWARD_CASES, ids=lambda c: f"T{c[2]}-K{c[4]}-V{c[5]}-{'varlen' if c[6] else 'fixed'}")
def test_simple_gla_segmented_forward_gpu_bf16(case, mode, monkeypatch):
    """The fused forward with sequences cut into segments of 256 tokens (4096 by default);
    saved: it also writes the chunk states for the backward."""
    from flame.kernels import linear_attention

    monkeypatch.delenv("FLAME_BACKEND", raising=False)
    monkeypatch.setenv("FLAME_GLA_BACKWARD", mode)
    monkeypatch.setattr(linear_attention, "FUSED_SEGMENT_TOKENS", 256)
    uses = force_fused_forward(monkeypatch, True)
    _check_gpu_bf16(case, f"-segmented-fwd-{mode}")
    assert uses


SMALL_HEADS = [(16, 16), (32, 32), (64, 32), (32, 64), (128, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("K,V", SMALL_HEADS)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_small_heads_gpu_bf16(kernel, K, V, monkeypatch):
    # Tiles of 16 or 32 gave wrong scalar-gate kernels on Hopper (utils.MIN_DOT_TILE).
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    _check_gpu_bf16((kernel, 1, 600, 4, K, V, [0, 100, 101, 600], True), "-small")


@pytest.mark.gpu
@pytest.mark.parametrize("K,V", SMALL_HEADS)
def test_simple_gla_small_heads_gpu_fp32(K, V, monkeypatch):
    # fp32 takes the unfused scalar-gate backward (three kernels).
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    errors = compare(f"simple_gla-fp32-K{K}-V{V}", chunk_simple_gla, True, 1, 600, 4, K, V, [0, 100, 101, 600],
                     True, torch.float32, "cuda")
    assert max(errors.values()) < 5e-3, errors


def test_gla_fp16_keeps_fp32_whole_chunk_products():
    """The gradient kernel's whole-chunk products scale k by up to e^{max_spread}: past fp16's
    range, so fp16 inputs keep fp32 operands there (bf16 and fp32 take the inputs' dtype)."""
    from flame.kernels import linear_attention

    assert not linear_attention._dots_16bit(torch.zeros(1, dtype=torch.float16))
    assert linear_attention._dots_16bit(torch.zeros(1, dtype=torch.bfloat16))
    assert linear_attention._dots_16bit(torch.zeros(1, dtype=torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gla_strong_decay_gpu(dtype, monkeypatch):
    """Gates that spread over ~10-40 nats per chunk: chunks on both paths, the whole-chunk one
    with decayed keys up to e^{30} |k|; finite, and within the bf16 tolerances, in fp16 too."""
    monkeypatch.delenv("FLAME_BACKEND", raising=False)
    name = f"gla-{'fp16' if dtype == torch.float16 else 'bf16'}-strong-decay"
    errors = compare(name, chunk_gla, False, 1, 700, 2, 64, 64, [0, 300, 700], True, dtype, "cuda",
                     decay_scale=2.5)
    _record(name, errors)
    assert_bf16_tolerances(errors)


@pytest.mark.gpu
def test_torch_compile_fullgraph_gpu(monkeypatch):
    monkeypatch.delenv("FLAME_BACKEND", raising=False)
    q, k, v, g, h0 = make_inputs(1, 300, 2, 64, 64, True, 2, torch.bfloat16, "cuda")
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")

    def step(q, k, v, g, h0):
        o, ht = chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        return o.float().square().sum() + ht.sum()

    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    torch.compile(step, fullgraph=True)(*leaves).backward()
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    step(*ref_leaves).backward()
    for a, b in zip(leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) < 1e-3
