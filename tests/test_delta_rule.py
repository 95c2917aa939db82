"""Chunked delta rule (gated and not): the torch reference against the token-by-token loop, the
Triton kernels (interpreter on CPU, bf16 on GPU) against float64, custom-op tracing, bad input."""

import pytest
import torch
import torch.nn.functional as F

from flame.kernels import chunk_delta_rule, chunk_gated_delta_rule
from flame.kernels.delta_rule_ref import chunk_delta_rule_ref
from flame.kernels.recurrent_ref import recurrent_ref


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(B, T, H, HV, K, V, N, dtype=torch.float64, device="cpu", seed=0, gate_shift=3.0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = randn(B, T, H, K)
    k = F.normalize(randn(B, T, H, K), dim=-1)
    v = randn(B, T, HV, V)
    g = F.logsigmoid(randn(B, T, HV) + gate_shift)  # shift 3: decays mostly near 1, some far from it
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    h0 = randn(N, HV, K, V)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, g, beta, h0)]


def oracle(q, k, v, g, beta, h0, cu_seqlens, gated):
    """float64 token-by-token outputs, final state and gradients, with a random output cotangent."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, g, beta, h0)]
    qd, kd, vd, gd, bd, hd = leaves
    o, ht = recurrent_ref(qd, kd, vd, g=gd if gated else None, beta=bd, delta=True, initial_state=hd,
                          output_final_state=True, cu_seqlens=cu_seqlens)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad([o, ht], leaves, [do, dht], allow_unused=True)
    return o, ht, grads, do, dht


def case_inputs(shape, gated):
    """fp32 inputs of a (B, T, H, HV, K, V, cu_seqlens) case, its cu_seqlens tensor (or None)
    and the float64 oracle's (o, final state, gradients, do, dht)."""
    B, T, H, HV, K, V, cu = shape
    cu = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    inputs = make_inputs(B, T, H, HV, K, V, B if cu is None else len(cu) - 1, dtype=torch.float32)
    return inputs, cu, oracle(*inputs, cu, gated)


def run_public(q, k, v, g, beta, h0, cu_seqlens, gated, do, dht, max_seqlen=None):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    qx, kx, vx, gx, bx, hx = leaves
    if gated:
        o, ht = chunk_gated_delta_rule(qx, kx, vx, gx, bx, initial_state=hx, output_final_state=True,
                                       cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    else:
        o, ht = chunk_delta_rule(qx, kx, vx, bx, initial_state=hx, output_final_state=True,
                                 cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    assert ht.dtype == torch.float32, ht.dtype
    (o.float() * do.to(o.device).float()).sum().add((ht * dht.to(ht.device).float()).sum()).backward()
    return o, ht, [x.grad for x in leaves]


NAMES = ("q", "k", "v", "g", "beta", "initial_state")

# (B, T, H, HV, K, V, cu_seqlens): T not a multiple of the chunk, K != V, grouped value heads, and
# packed sequences of uneven length (one shorter than a chunk).
CASES = {
    "dense": (2, 77, 1, 2, 16, 32, None),
    "varlen": (1, 150, 2, 2, 32, 16, [0, 9, 80, 150]),
    "varlen_grouped": (1, 140, 1, 3, 16, 16, [0, 70, 75, 140]),
}


# The interpreter runs three of the six cases: together they cover every gradient, gated and
# plain, K != V, packed sequences and grouped value heads.
TRITON_CPU_COVERED = {("dense", False), ("varlen", True), ("varlen_grouped", False)}


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("case", ["dense", "varlen_grouped"])
def test_chunk_reference_matches_recurrence(case, gated):
    B, T, H, HV, K, V, cu = CASES[case]
    cu = torch.tensor(cu) if cu is not None else None
    N = B if cu is None else len(cu) - 1
    inputs = make_inputs(B, T, H, HV, K, V, N)
    o_ref, ht_ref, grads_ref, do, dht = oracle(*inputs, cu, gated)
    leaves = [x.clone().requires_grad_() for x in inputs]
    q, k, v, g, beta, h0 = leaves
    o, ht = chunk_delta_rule_ref(q, k, v, beta, g=g if gated else None, initial_state=h0,
                                 output_final_state=True, cu_seqlens=cu, chunk=16)
    torch.autograd.backward([o, ht], [do, dht])
    assert rel(o, o_ref) < 1e-12 and rel(ht, ht_ref) < 1e-12
    for name, x, ref in zip(NAMES, leaves, grads_ref):
        if ref is None:
            assert not gated and name == "g"
            continue
        assert rel(x.grad, ref) < 1e-10, name


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_cpu(case, gated, backend, monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", backend)
    if backend == "triton" and (case, gated) in TRITON_CPU_COVERED:
        pytest.skip("covered by the other cases of the interpreter; keeps its time down")
    B, T, H, HV, K, V, cu = CASES[case]
    cu = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    N = B if cu is None else len(cu) - 1
    inputs = make_inputs(B, T, H, HV, K, V, N, dtype=torch.float32)
    o_ref, ht_ref, grads_ref, do, dht = oracle(*inputs, cu, gated)
    o, ht, grads = run_public(*inputs, cu, gated, do, dht)
    assert rel(o, o_ref) < 1e-5
    assert rel(ht, ht_ref) < 1e-5
    for name, grad, ref in zip(NAMES, grads, grads_ref):
        if not gated and name == "g":
            assert grad is None
            continue
        assert rel(grad, ref) < 1e-5, name


def prepare_reference(k, v, g, beta, cu_seqlens, chunk=64):
    """float64 w, u, A [B, T, HV, chunk] and in-chunk gate cumsum, chunk by chunk of each sequence."""
    k, v, g, beta = (x.double() for x in (k, v, g, beta))
    B, T, H, K = k.shape
    HV = v.shape[2]
    k = k.repeat_interleave(HV // H, dim=2)
    w, u = torch.zeros_like(k), torch.zeros_like(v)
    A = torch.zeros(B, T, HV, chunk, dtype=torch.float64)
    gc = torch.zeros_like(g)
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, T]
    for b in range(B):
        for start, end in zip(bounds[:-1], bounds[1:]):
            for c0 in range(start, end, chunk):
                sl = slice(c0, min(c0 + chunk, end))
                n = sl.stop - sl.start
                kc, vc, bc = k[b, sl].transpose(0, 1), v[b, sl].transpose(0, 1), beta[b, sl].T  # [HV, n, .]
                gcc = g[b, sl].T.cumsum(-1)
                e = (gcc[:, :, None] - gcc[:, None, :]).tril().exp()
                L = (kc @ kc.transpose(1, 2) * e * bc[:, :, None]).tril(-1)
                Ac = torch.linalg.inv(torch.eye(n, dtype=torch.float64) + L)
                w[b, sl] = (Ac @ (kc * (bc * gcc.exp())[..., None])).transpose(0, 1)
                u[b, sl] = (Ac @ (vc * bc[..., None])).transpose(0, 1)
                A[b, sl, :, :n] = Ac.transpose(0, 1)
                gc[b, sl] = gcc.T
    return w, u, A, gc


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("case", list(CASES))
def test_prepare_kernel(case, gated):
    """The prep kernel against float64: w, u, A and the gate cumsum, on ill-conditioned keys."""
    from flame.kernels.delta_rule import _prepare

    B, T, H, HV, K, V, cu = CASES[case]
    cu = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    N = B if cu is None else len(cu) - 1
    _, k, v, g, beta, _ = make_inputs(B, T, H, HV, K, V, N, dtype=torch.float32)
    # Nearly parallel keys and beta near 1: the entries of L are near 1, so that every term of the
    # inverse's series (up to L^15 in a block of 16) counts.
    k = F.normalize(1.0 + 0.3 * k, dim=-1)
    beta = 0.5 + 0.5 * beta
    if not gated:
        g = torch.zeros_like(g)
    w, u, gc, A = _prepare(k, v, g if gated else None, beta, cu, store_a=True, store_u=True)
    w_ref, u_ref, A_ref, gc_ref = prepare_reference(k, v, g, beta, cu)
    errors = {"w": rel(w, w_ref), "u": rel(u, u_ref), "A": rel(A, A_ref)}
    # fp32 against float64 on an ill-conditioned L: row-by-row substitution reaches ~1e-6 here,
    # the doubling series without its Newton step ~5e-5, a missing term of the series >> 1.
    assert all(e < 1e-5 for e in errors.values()), errors
    if gated:
        assert rel(gc, gc_ref) < 1e-6
    else:
        assert gc is None


@pytest.mark.parametrize("case,gated", [("varlen", True), ("dense", False)], ids=["varlen-gated", "dense-plain"])
def test_saved_backward(case, gated, monkeypatch):
    """FLAME_DELTA_BACKWARD=saved: the forward keeps w, A, the chunk states and v' and the
    backward reruns neither the prep kernel nor the chunk-to-chunk pass; the gradients are those
    of the recomputing backward, bit for bit, and match float64."""
    from flame.kernels import delta_rule

    monkeypatch.setenv("FLAME_BACKEND", "triton")
    inputs, cu, (o_ref, ht_ref, grads_ref, do, dht) = case_inputs(CASES[case], gated)
    prepare, calls = delta_rule._prepare, []
    monkeypatch.setattr(delta_rule, "_prepare", lambda *a, **kw: calls.append(1) or prepare(*a, **kw))
    results = {}
    for mode in ("recompute", "saved"):
        monkeypatch.setenv("FLAME_DELTA_BACKWARD", mode)
        calls.clear()
        results[mode] = run_public(*inputs, cu, gated, do, dht)
        assert len(calls) == (2 if mode == "recompute" else 1), mode
    o, ht, grads = results["saved"]
    assert rel(o, o_ref) < 1e-5 and rel(ht, ht_ref) < 1e-5
    for name, grad, ref, again in zip(NAMES, grads, grads_ref, results["recompute"][2]):
        if not gated and name == "g":
            assert grad is None
            continue
        assert rel(grad, ref) < 1e-5, name
        assert torch.equal(grad, again), name


def force_splits(monkeypatch, output: bool, dv_local: bool):
    """Sets the switches of the chunk-parallel output kernel and of the in-chunk dv' kernel;
    returns a list that records each use of them."""
    from flame.kernels import delta_rule, delta_rule_bwd

    uses = []
    output_fn, config_fn = delta_rule._output, delta_rule_bwd.local_dv_config
    monkeypatch.setattr(delta_rule, "split_output", lambda: output)
    monkeypatch.setattr(delta_rule_bwd, "split_dv_local", lambda *args: dv_local)
    monkeypatch.setattr(delta_rule, "_output", lambda *a: uses.append("output") or output_fn(*a))
    monkeypatch.setattr(delta_rule_bwd, "local_dv_config", lambda *a: uses.append("dv_local") or config_fn(*a))
    return uses


@pytest.mark.parametrize("case,gated", [("varlen_grouped", True), ("dense", False)],
                         ids=["varlen-grouped-gated", "dense-plain"])
def test_split_passes(case, gated, monkeypatch):
    """split_output (o from the stored chunk states, after the serial pass) and split_dv_local
    (the in-chunk term of dv' before the reverse serial pass): float64 within the tolerances of
    the single passes, and the same results as those up to fp32 rounding."""
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    monkeypatch.setenv("FLAME_DELTA_BACKWARD", "saved")
    inputs, cu, (o_ref, ht_ref, grads_ref, do, dht) = case_inputs(CASES[case], gated)
    results = {}
    for split in (False, True):
        uses = force_splits(monkeypatch, split, split)
        results[split] = run_public(*inputs, cu, gated, do, dht)
        assert uses == (["output", "dv_local"] if split else []), uses
    (o, ht, grads), (o1, ht1, grads1) = results[True], results[False]
    assert rel(o, o_ref) < 1e-5 and rel(ht, ht_ref) < 1e-5
    assert rel(o, o1) < 1e-6 and torch.equal(ht, ht1)
    for name, grad, ref, single in zip(NAMES, grads, grads_ref, grads1):
        if not gated and name == "g":
            assert grad is None
            continue
        assert rel(grad, ref) < 1e-5, name
        assert rel(grad, single) < 1e-6, name


def test_split_dv_local_rule():
    """The in-chunk dv' kernel runs for gated heads whose reverse pass has at most one program per
    SM or runs over a packed batch's segments (where it measured faster), never for plain ones
    (slower at every measured shape)."""
    from flame.kernels.delta_rule_bwd import split_dv_local

    assert split_dv_local(True, 128, 132) and split_dv_local(True, 132, 132)
    assert not split_dv_local(True, 512, 132)
    assert not split_dv_local(False, 128, 132)
    assert split_dv_local(True, 4096, 132, packed_segments=True)  # a packed batch over segments
    assert not split_dv_local(False, 4096, 132, packed_segments=True)


def test_split_dv_local_recompute(monkeypatch):
    """The in-chunk dv' kernel with the recomputing backward, whose forward stores the chunk
    states only for its own output kernel."""
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    monkeypatch.setenv("FLAME_DELTA_BACKWARD", "recompute")
    B, T, H, HV, K, V, cu = CASES["varlen"]
    cu = torch.tensor(cu, dtype=torch.int32)
    inputs = make_inputs(B, T, H, HV, K, V, len(cu) - 1, dtype=torch.float32)
    o_ref, ht_ref, grads_ref, do, dht = oracle(*inputs, cu, True)
    uses = force_splits(monkeypatch, True, True)
    o, ht, grads = run_public(*inputs, cu, True, do, dht)
    assert uses == ["output", "dv_local"], uses
    assert rel(o, o_ref) < 1e-5 and rel(ht, ht_ref) < 1e-5
    for name, grad, ref in zip(NAMES, grads, grads_ref):
        assert rel(grad, ref) < 1e-5, name


def force_segments(monkeypatch, tokens: int | None):
    """Serial passes over segments of `tokens` tokens wherever a sequence can be longer (None:
    never); returns a list that records each use of the transition passes."""
    from flame.kernels import delta_rule, delta_rule_bwd, delta_rule_segments

    uses = []
    monkeypatch.setenv("FLAME_DELTA_SEGMENTS", "off" if tokens is None else "on")
    if tokens is not None:
        monkeypatch.setattr(delta_rule_segments, "SEGMENT_TOKENS", tokens)
        monkeypatch.setattr(delta_rule_segments, "PACKED_SEGMENT_TOKENS", tokens)
    entry, end = delta_rule.segment_entry_states, delta_rule_bwd.segment_end_grads
    monkeypatch.setattr(delta_rule, "segment_entry_states", lambda *a: uses.append("entry") or entry(*a))
    monkeypatch.setattr(delta_rule_bwd, "segment_end_grads", lambda *a: uses.append("end") or end(*a))
    return uses


# (B, T, H, HV, K, V, cu_seqlens, segment tokens): sequences of one to five segments, one of them
# shorter than a segment, an empty one, and one that ends on a segment's last token.
SEGMENT_CASES = {
    "dense-gated": (2, 200, 1, 2, 16, 32, None, 64, True),
    "varlen-plain": (1, 300, 2, 2, 32, 16, [0, 9, 200, 200, 300], 64, False),
    "varlen-grouped-gated": (1, 300, 1, 3, 16, 16, [0, 140, 141, 300], 128, True),
}


@pytest.mark.parametrize("backward", ["saved", "recompute"])
@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_segments(case, backward, monkeypatch):
    """The serial passes over segments (transition passes, combine, then the passes entered with
    the combined states): float64 within the tolerances of the whole-sequence passes, and their
    results up to fp32 rounding; the in-chunk dv' split on for the gated cases (read by the
    reverse transition pass)."""
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    monkeypatch.setenv("FLAME_DELTA_BACKWARD", backward)
    *shape, tokens, gated = SEGMENT_CASES[case]
    inputs, cu, (o_ref, ht_ref, grads_ref, do, dht) = case_inputs(shape, gated)
    force_splits(monkeypatch, True, gated)
    # the recomputing backward runs the forward's state pass again, over the same segments
    expected = ["entry", "end"] if backward == "saved" else ["entry", "entry", "end"]
    results = {}
    for segments in (tokens, None):
        uses = force_segments(monkeypatch, segments)
        results[segments] = run_public(*inputs, cu, gated, do, dht)
        assert uses == (expected if segments else []), uses
    (o, ht, grads), (o1, ht1, grads1) = results[tokens], results[None]
    assert rel(o, o_ref) < 1e-5 and rel(ht, ht_ref) < 1e-5
    assert rel(o, o1) < 1e-6 and rel(ht, ht1) < 1e-6
    for name, grad, ref, whole in zip(NAMES, grads, grads_ref, grads1):
        if not gated and name == "g":
            continue
        assert rel(grad, ref) < 1e-5, name
        assert rel(grad, whole) < 1e-6, name


@pytest.mark.parametrize("join", [1, 2, 3, 5])
def test_segments_joined_backward(join, monkeypatch):
    """The backward of equal-length sequences over runs of `join` of the forward's five segments
    (2 x 300 tokens, segments of 64), their transition the product of the parts' (a short last
    run for join 2 and 3): float64 within the tolerances of the whole-sequence passes, and their
    results up to fp32 rounding. With join 5 every sequence is one run: the reverse pass runs
    over whole sequences and the segments' reverse transition pass is not used."""
    from flame.kernels import delta_rule_bwd, delta_rule_segments

    monkeypatch.setenv("FLAME_BACKEND", "triton")
    monkeypatch.setattr(delta_rule_segments, "BACKWARD_JOIN", join)
    plans = []
    joined = delta_rule_segments.joined_segments

    def recording(*args):
        result = joined(*args)
        plans.append(result[0])
        return result

    monkeypatch.setattr(delta_rule_bwd, "joined_segments", recording)
    inputs = make_inputs(2, 300, 1, 2, 16, 32, 2, dtype=torch.float32)
    o_ref, ht_ref, grads_ref, do, dht = oracle(*inputs, None, True)
    results = {}
    for segments in (64, None):
        uses = force_segments(monkeypatch, segments)
        results[segments] = run_public(*inputs, None, True, do, dht)
        expected = ["entry"] + (["end"] if join < 5 else []) if segments else []
        assert uses == expected, uses
    assert len(plans) == 1
    if join == 1:
        assert plans[0].length == 64
    elif join < 5:  # two sequences of ceil(5 / join) runs each
        assert plans[0].length == 64 * join and int(plans[0].offsets[-1]) == 2 * -(-5 // join), plans[0]
    else:
        assert plans[0] is None
    (o, ht, grads), (_, _, grads1) = results[64], results[None]
    assert rel(o, o_ref) < 1e-5 and rel(ht, ht_ref) < 1e-5
    for name, grad, ref, whole in zip(NAMES, grads, grads_ref, grads1):
        assert rel(grad, ref) < 1e-5, name
        assert rel(grad, whole) < 1e-6, name


@pytest.mark.parametrize("order", ["heads-fast", "chunks-fast", "chunks-past-grid-limit"])
def test_chunk_grid_orders(order, monkeypatch):
    """The chunk-parallel kernels (prep, output, in-chunk dv', chunk gradient) take their
    (chunk, head) from either grid order (flame.kernels.utils.HEADS_FAST; past the grid's y limit
    the chunks stay on x): float64 within 1e-5, dense and packed, gated with both splits on."""
    from flame.kernels import utils

    monkeypatch.setenv("FLAME_BACKEND", "triton")
    monkeypatch.setattr(utils, "HEADS_FAST", order != "chunks-fast")
    if order == "chunks-past-grid-limit":
        monkeypatch.setattr(utils, "GRID_YZ_LIMIT", 1)
    uses = force_splits(monkeypatch, True, True)
    for case in ("dense", "varlen"):
        inputs, cu, (o_ref, ht_ref, grads_ref, do, dht) = case_inputs(CASES[case], True)
        o, ht, grads = run_public(*inputs, cu, True, do, dht)
        assert rel(o, o_ref) < 1e-5 and rel(ht, ht_ref) < 1e-5, case
        for name, grad, ref in zip(NAMES, grads, grads_ref):
            assert rel(grad, ref) < 1e-5, (case, name)
    assert uses.count("output") == 2 and uses.count("dv_local") == 2, uses


def nan_filled_empty(monkeypatch):
    """torch.empty gives NaN-filled floating-point tensors while the test runs, so that a kernel
    reading what nothing wrote shows in its results."""
    empty = torch.empty

    def filled(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", filled)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "equal-length"])
def test_segments_without_states(packed, gated, monkeypatch):
    """No initial state and no final state: the combine starts from zero in both directions
    (equal-length sequences also take the backward over runs of segments, gated heads), and no
    kernel reads what nothing wrote (the last segment's E, spare slots): buffers from
    torch.empty are NaN-filled here."""
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    # V = 32: the identity columns get column blocks of their own (32 wide in fp32)
    q, k, v, g, beta, _ = make_inputs(1 if packed else 2, 260 if packed else 300, 1, 2, 16, 32, 2,
                                      dtype=torch.float32)
    cu = torch.tensor([0, 200, 260], dtype=torch.int32) if packed else None
    nan_filled_empty(monkeypatch)
    grads = {}
    for segments in (64, None):
        uses = force_segments(monkeypatch, segments)
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
        if gated:
            o, ht = chunk_gated_delta_rule(*leaves, cu_seqlens=cu)
        else:
            o, ht = chunk_delta_rule(leaves[0], leaves[1], leaves[2], leaves[4], cu_seqlens=cu)
        assert ht is None
        (o * o).sum().backward()
        grads[segments] = [o] + [x.grad for x in leaves if x.grad is not None]
        assert uses == (["entry", "end"] if segments else []), uses
    ref = recurrent_ref(q.double(), k.double(), v.double(), g=g.double() if gated else None, beta=beta.double(),
                        delta=True, cu_seqlens=cu)[0]
    assert rel(grads[64][0], ref) < 1e-5
    assert len(grads[64]) == len(grads[None]) == (6 if gated else 5)
    for a, b in zip(grads[64], grads[None]):
        assert rel(a, b) < 1e-6


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("max_seqlen,threshold,expected", [(191, 128, True), (191, 256, False), (None, 128, False)],
                         ids=["long", "short", "unknown"])
def test_packed_segments_follow_max_seqlen(max_seqlen, threshold, expected, gated, monkeypatch):
    """By default a packed batch runs over segments exactly when max_seqlen says that a document
    is longer than LONG_DOCUMENT_TOKENS, gated heads then with the in-chunk dv' split; the
    results equal float64 either way."""
    from flame.kernels import delta_rule_bwd, delta_rule_segments

    monkeypatch.setenv("FLAME_BACKEND", "triton")
    cu = torch.tensor([0, 9, 200, 260], dtype=torch.int32)  # the longest document: 191 tokens
    inputs = make_inputs(1, 260, 1, 2, 16, 16, 3, dtype=torch.float32)
    o_ref, ht_ref, grads_ref, do, dht = oracle(*inputs, cu, gated)
    uses = force_segments(monkeypatch, None)
    monkeypatch.setenv("FLAME_DELTA_SEGMENTS", "auto")
    monkeypatch.setattr(delta_rule_segments, "PACKED_SEGMENT_TOKENS", 64)
    monkeypatch.setattr(delta_rule_segments, "LONG_DOCUMENT_TOKENS", threshold)
    splits, split = [], delta_rule_bwd.split_dv_local
    monkeypatch.setattr(delta_rule_bwd, "split_dv_local", lambda *a: splits.append(split(*a)) or splits[-1])
    o, ht, grads = run_public(*inputs, cu, gated, do, dht, max_seqlen=max_seqlen)
    assert uses == (["entry", "end"] if expected else []), uses
    assert splits == [expected and gated], splits
    assert rel(o, o_ref) < 1e-5 and rel(ht, ht_ref) < 1e-5
    for name, grad, ref in zip(NAMES, grads, grads_ref):
        if gated or name != "g":
            assert rel(grad, ref) < 1e-5, name


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "4096"])
def test_max_seqlen_rejected(bad):
    q, k, v, g, beta, _ = make_inputs(1, 20, 1, 1, 16, 16, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="max_seqlen"):
        chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 20], dtype=torch.int32),
                               max_seqlen=bad)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_segments_inference_forward(gated, monkeypatch):
    """A forward without a backward over segments: the plain rule's single pass that also forms o,
    the gated rule's split pass and output kernel, entered with the combined states."""
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    q, k, v, g, beta, h0 = make_inputs(2, 200, 1, 2, 16, 32, 2, dtype=torch.float32)
    results = {}
    for segments in (64, None):
        uses = force_segments(monkeypatch, segments)
        with torch.no_grad():
            if gated:
                results[segments] = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
            else:
                results[segments] = chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True)
        assert uses == (["entry"] if segments else []), uses
    ref = recurrent_ref(q.double(), k.double(), v.double(), g=g.double() if gated else None, beta=beta.double(),
                        delta=True, initial_state=h0.double(), output_final_state=True)
    for got, whole, want in zip(results[64], results[None], ref):
        assert rel(got, want) < 1e-5 and rel(got, whole) < 1e-6


@pytest.mark.parametrize("segments", [None, 64], ids=["whole", "segments"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("case", list(CASES))
def test_inference_forward(case, gated, segments, monkeypatch):
    """The forward without a backward: v' formed in the serial passes from A and v (the prep
    kernel writes no w or u) against the recurrence and against the passes that read w and u,
    per sequence and over segments of 64 tokens."""
    from flame.kernels import delta_rule

    monkeypatch.setenv("FLAME_BACKEND", "triton")
    force_segments(monkeypatch, segments)
    B, T, H, HV, K, V, cu = CASES[case]
    cu = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    N = B if cu is None else len(cu) - 1
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, N, dtype=torch.float32)
    results = {}
    for in_pass in (True, False):
        monkeypatch.setattr(delta_rule, "values_in_pass", lambda on=in_pass: on)
        with torch.no_grad():
            if gated:
                results[in_pass] = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                                          output_final_state=True, cu_seqlens=cu)
            else:
                results[in_pass] = chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True,
                                                    cu_seqlens=cu)
    ref = recurrent_ref(q.double(), k.double(), v.double(), g=g.double() if gated else None, beta=beta.double(),
                        delta=True, initial_state=h0.double(), output_final_state=True, cu_seqlens=cu)
    for got, other, want in zip(results[True], results[False], ref):
        assert rel(got, want) < 1e-5 and rel(got, other) < 1e-5


@pytest.mark.parametrize("cu", [None, [0, 200, 260], [0, 64, 64, 300], [0, 300]],
                         ids=["equal", "packed", "empty", "one"])
def test_later_segments(cu, monkeypatch):
    """Segments.later, which picks the backward transition pass's stages: the segments after each
    sequence's first, exact for equal-length sequences (two rows of 300 tokens, segments of 64:
    5 each), a bound for packed ones."""
    from flame.kernels.delta_rule_segments import plan_segments

    force_segments(monkeypatch, 64)
    B, T = (2, 300) if cu is None else (1, cu[-1])
    q = torch.zeros(B, T, 1, 16)
    cu = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    seg = plan_segments(q, cu, 1, 16)
    counts = (seg.offsets[1:] - seg.offsets[:-1]).tolist()
    later = sum(max(c - 1, 0) for c in counts)
    if cu is None:
        assert counts == [5, 5] and seg.later == later == 8
    else:
        assert later <= seg.later <= later + 1, (counts, seg.later)


def test_segment_rule():
    """Segments by default for equal-length sequences longer than one whose whole-sequence
    passes would leave SMs idle, and for packed rows with a long document; never for batches no
    longer than a segment."""
    from flame.kernels.delta_rule_segments import PACKED_SEGMENT_TOKENS, SEGMENT_TOKENS, use_segments

    long = 8 * SEGMENT_TOKENS
    assert use_segments(1, long, False, 16, 128, 132)  # B = 1, 16 heads: 32 programs
    assert not use_segments(8, long, False, 16, 128, 132)  # 256 programs: load-bound already
    assert not use_segments(1, SEGMENT_TOKENS, False, 16, 128, 132)
    # packed: when a document is long (`long_documents`), whatever the document count
    assert use_segments(1, long, True, 4, 256, 132, True) and use_segments(40, long, True, 16, 128, 132, True)
    assert not use_segments(1, long, True, 4, 256, 132, False)
    assert not use_segments(3, PACKED_SEGMENT_TOKENS, True, 4, 256, 132, True)


def test_long_documents():
    from flame.kernels.delta_rule_segments import LONG_DOCUMENT_TOKENS, long_documents

    cu = torch.tensor([0, 5], dtype=torch.int32)
    assert long_documents(cu, LONG_DOCUMENT_TOKENS + 1)
    assert not long_documents(cu, LONG_DOCUMENT_TOKENS) and not long_documents(cu, None)
    assert not long_documents(None, 10 * LONG_DOCUMENT_TOKENS)  # equal-length batches: use_segments' other rule


def test_segment_mode_rejected(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    monkeypatch.setenv("FLAME_DELTA_SEGMENTS", "sometimes")
    q, k, v, g, beta, _ = make_inputs(1, 20, 1, 1, 16, 16, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="FLAME_DELTA_SEGMENTS"):
        chunk_gated_delta_rule(q, k, v, g, beta)


def test_backward_mode_default_is_saved(monkeypatch):
    from flame.kernels import delta_rule

    monkeypatch.delenv("FLAME_DELTA_BACKWARD", raising=False)
    assert delta_rule.backward_mode() == "saved"
    monkeypatch.setenv("FLAME_DELTA_BACKWARD", "recompute")
    assert delta_rule.backward_mode() == "recompute"


def test_backward_mode_rejected(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    monkeypatch.setenv("FLAME_DELTA_BACKWARD", "keep")
    q, k, v, g, beta, _ = make_inputs(1, 20, 1, 1, 16, 16, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="FLAME_DELTA_BACKWARD"):
        chunk_gated_delta_rule(q.requires_grad_(), k, v, g, beta)


def test_qk_l2norm_in_kernel_and_non_contiguous(monkeypatch):
    monkeypatch.setenv("FLAME_BACKEND", "triton")
    q, k, v, g, beta, h0 = make_inputs(1, 40, 2, 2, 16, 16, 1, dtype=torch.float32)
    q_raw, k_raw = q * 3.0, k * 0.5 + 0.1
    o_ref, _ = recurrent_ref(F.normalize(q_raw.double(), dim=-1, eps=0), F.normalize(k_raw.double(), dim=-1, eps=0),
                             v.double(), g=g.double(), beta=beta.double(), delta=True)
    # v laid out [B, T, V, HV] and transposed: not contiguous.
    v_nc = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not v_nc.is_contiguous()
    o, ht = chunk_gated_delta_rule(q_raw, k_raw, v_nc, g, beta, use_qk_l2norm_in_kernel=True)
    assert ht is None
    assert rel(o, o_ref) < 1e-5


def test_expanded_cotangents(monkeypatch):
    """The gradient of a sum reaches the backward as a stride-0 view; the kernels must see it dense."""
    inputs = make_inputs(1, 20, 1, 2, 16, 16, 1, dtype=torch.float32)
    grads = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("FLAME_BACKEND", backend)
        leaves = [x.clone().requires_grad_() for x in inputs]
        q, k, v, g, beta, h0 = leaves
        o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        (o.sum() + ht.sum()).backward()
        grads[backend] = [x.grad for x in leaves]
    for name, a, b in zip(NAMES, grads["triton"], grads["torch"]):
        assert rel(a, b) < 1e-5, name


@pytest.mark.parametrize("backend,backward,segments", [("torch", "recompute", None), ("triton", "saved", None),
                                                       ("triton", "saved", 64)])
def test_torch_compile_fullgraph(backend, backward, segments, monkeypatch):
    # triton + saved: the forward op's fake outputs have the shapes its kernels produce (with
    # segments, the saved segment transitions too)
    monkeypatch.setenv("FLAME_BACKEND", backend)
    monkeypatch.setenv("FLAME_DELTA_BACKWARD", backward)
    uses = force_segments(monkeypatch, segments)
    q, k, v, g, beta, h0 = make_inputs(1, 140, 1, 2, 16, 16, 3, dtype=torch.float32)
    cu = torch.tensor([0, 10, 75, 140], dtype=torch.int32)  # two documents of two segments of 64

    def layer(q, k, v, g, beta, h0):
        o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                       cu_seqlens=cu)
        return (o * o).sum() + ht.sum()

    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves)
    loss.backward()
    eager = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    loss_ref = layer(*eager)
    loss_ref.backward()
    assert rel(loss, loss_ref) < 1e-6
    for a, b in zip(leaves, eager):
        assert rel(a.grad, b.grad) < 1e-6
    assert len(uses) == (4 if segments else 0), uses  # compiled and eager: entry states, end gradients
    if backend == "triton":  # the fake outputs' shapes and dtypes are those of a real call
        from flame.kernels import delta_rule_segments
        from flame.kernels.delta_rule import _forward_op

        result = torch.library.opcheck(_forward_op, (q, k, v, g, beta, h0, cu, 0.25, True, False),
                                       test_utils="test_faketensor")
        assert result == {"test_faketensor": "SUCCESS"}, result
        # by default, a packed batch with a long document (long_docs) runs over segments
        monkeypatch.setenv("FLAME_DELTA_SEGMENTS", "auto")
        monkeypatch.setattr(delta_rule_segments, "PACKED_SEGMENT_TOKENS", 64)
        monkeypatch.setattr(delta_rule_segments, "LONG_DOCUMENT_TOKENS", 64)
        uses.clear()
        result = torch.library.opcheck(_forward_op, (q, k, v, g, beta, h0, cu, 0.25, True, True),
                                       test_utils="test_faketensor")
        assert result == {"test_faketensor": "SUCCESS"} and uses == ["entry"], (result, uses)


def _bad(**overrides):
    q, k, v, g, beta, h0 = make_inputs(1, 20, 2, 4, 16, 16, 1, dtype=torch.float32)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0, cu_seqlens=None)
    args.update(overrides)
    return args


BAD = {
    "rank": (dict(q=torch.randn(20, 2, 16)), "q"),
    "k_shape": (dict(k=torch.randn(1, 20, 2, 32)), "k"),
    "heads_not_multiple": (dict(v=torch.randn(1, 20, 3, 16), g=torch.randn(1, 20, 3), beta=torch.rand(1, 20, 3)), "heads"),
    "g_shape": (dict(g=torch.randn(1, 20, 2)), "g"),
    "beta_shape": (dict(beta=torch.rand(1, 21, 4)), "beta"),
    "head_dim": (dict(q=torch.randn(1, 20, 2, 512), k=torch.randn(1, 20, 2, 512)), "head dim"),
    "state_shape": (dict(initial_state=torch.randn(1, 4, 16, 8)), "initial_state"),
    "cu_start": (dict(cu_seqlens=torch.tensor([1, 10, 20]), initial_state=None), "cu_seqlens"),
    "cu_decreasing": (dict(cu_seqlens=torch.tensor([0, 12, 10, 20]), initial_state=None), "cu_seqlens"),
    "cu_end": (dict(cu_seqlens=torch.tensor([0, 10, 19]), initial_state=None), "cu_seqlens"),
    "cu_float": (dict(cu_seqlens=torch.tensor([0.0, 20.0]), initial_state=None), "cu_seqlens"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    overrides, word = BAD[case]
    args = _bad(**overrides)
    with pytest.raises(ValueError, match=word):
        chunk_gated_delta_rule(args["q"], args["k"], args["v"], args["g"], args["beta"],
                               initial_state=args["initial_state"], cu_seqlens=args["cu_seqlens"])


def test_cu_seqlens_with_batch_rejected():
    q, k, v, g, beta, _ = make_inputs(2, 20, 2, 2, 16, 16, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_delta_rule(q, k, v, beta, cu_seqlens=torch.tensor([0, 10, 20]))


GPU_CASES = {
    "dense": (2, 1000, 2, 4, 128, 64, None),
    "varlen": (1, 2000, 2, 4, 64, 128, [0, 17, 700, 701, 1500, 2000]),
    "k256": (1, 300, 1, 2, 256, 32, None),
    "small": (2, 300, 2, 2, 32, 64, None),
    "small-varlen": (1, 600, 2, 2, 32, 64, [0, 100, 101, 600]),
    "tiny": (2, 300, 2, 2, 16, 16, None),
}


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True], ids=["single", "split"])
@pytest.mark.parametrize("backward", ["recompute", "saved"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_bf16_gpu(case, gated, backward, split, monkeypatch):
    # split: o by the chunk-parallel output kernel (saved backward, K <= 128) and the in-chunk
    # dv' term before the reverse serial pass, whatever the defaults of those switches are
    monkeypatch.setenv("FLAME_DELTA_BACKWARD", backward)
    force_splits(monkeypatch, split, split)
    check_bf16_gpu(GPU_CASES[case], gated, f"{case} {backward} {'split' if split else 'single'}")


@pytest.mark.gpu
@pytest.mark.parametrize("gate_shift", [0.0, -2.0], ids=["strong", "stronger"])
@pytest.mark.parametrize("case", ["dense", "varlen"])
def test_strong_decay_bf16_gpu(case, gate_shift):
    """Gated, with decays of about 0.7 (strong) and 2.1 (stronger) nats per token on average
    (test_bf16_gpu's are ~0.05): the gate gradient's terms stay accurate in bf16. (Formed
    instead from q . dq - v . dv per row, an identity of the recurrence, dg reached 2.8e-2 and
    8.8e-2 here: benchmarks/notes_delta_rule.md.)"""
    check_bf16_gpu(GPU_CASES[case], True, f"{case} gate shift {gate_shift}", gate_shift=gate_shift)


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_inference_bf16_gpu(case, gated):
    """The forward without a backward (v' formed from A and v in the serial pass), bf16 against
    float64 on the same bf16 inputs: outputs and final states within 5e-3."""
    B, T, H, HV, K, V, cu = GPU_CASES[case]
    cu = torch.tensor(cu, dtype=torch.int32, device="cuda") if cu is not None else None
    N = B if cu is None else len(cu) - 1
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, N, dtype=torch.bfloat16, device="cuda")
    h0 = h0.float()
    with torch.no_grad():
        if gated:
            o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                           cu_seqlens=cu)
        else:
            o, ht = chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_ref, ht_ref = chunk_delta_rule_ref(q.double(), k.double(), v.double(), beta.double(),
                                         g=g.double() if gated else None, initial_state=h0.double(),
                                         output_final_state=True, cu_seqlens=cu)
    errors = {"o": rel(o, o_ref), "final_state": rel(ht, ht_ref)}
    print("inference", case, "gated" if gated else "plain", {n: f"{e:.2e}" for n, e in errors.items()})
    assert errors["o"] < 5e-3 and errors["final_state"] < 5e-3, errors


def check_bf16_gpu(shape, gated, label, max_seqlen=None, gate_shift=3.0):
    """bf16 outputs, final states and every gradient on the GPU against float64 on the same
    bf16-rounded inputs: within 5e-3 (outputs, states) and 2e-2 (gradients) relative error norm."""
    B, T, H, HV, K, V, cu = shape
    cu = torch.tensor(cu, dtype=torch.int32, device="cuda") if cu is not None else None
    N = B if cu is None else len(cu) - 1
    inputs = make_inputs(B, T, H, HV, K, V, N, dtype=torch.bfloat16, device="cuda", gate_shift=gate_shift)
    inputs[-1] = inputs[-1].float()  # the state is fp32
    # The oracle sees the same bf16-rounded inputs, in float64 (chunked, checked against the loop above).
    leaves64 = [x.detach().double().requires_grad_() for x in inputs]
    q, k, v, g, beta, h0 = leaves64
    o_ref, ht_ref = chunk_delta_rule_ref(q, k, v, beta, g=g if gated else None, initial_state=h0,
                                         output_final_state=True, cu_seqlens=cu)
    do = torch.randn_like(o_ref)
    dht = torch.randn_like(ht_ref)
    grads_ref = torch.autograd.grad([o_ref, ht_ref], leaves64, [do, dht], allow_unused=True)
    o, ht, grads = run_public(*inputs, cu, gated, do, dht, max_seqlen)
    errors = {"o": rel(o, o_ref), "final_state": rel(ht, ht_ref)}
    for name, grad, ref in zip(NAMES, grads, grads_ref):
        if gated or name != "g":
            errors["d" + name] = rel(grad, ref)
    print(label, "gated" if gated else "plain", {n: f"{e:.2e}" for n, e in errors.items()})
    assert errors["o"] < 5e-3 and errors["final_state"] < 5e-3, errors
    assert all(e < 2e-2 for n, e in errors.items() if n.startswith("d")), errors


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("case", ["dense", "varlen", "small-varlen", "long", "packed-long"])
def test_segments_bf16_gpu(case, gated, monkeypatch):
    """bf16 serial passes over segments against float64: the cases of test_bf16_gpu cut into
    segments of 128 tokens; `long` (one sequence of three default segments) and `packed-long`
    (a packed batch whose longest document, 9200 tokens, max_seqlen reports), both taken by the
    default rule."""
    cases = {**GPU_CASES, "long": (1, 12288, 2, 4, 128, 128, None),
             "packed-long": (1, 12000, 2, 4, 128, 128, [0, 300, 9500, 9501, 12000])}
    default_rule = case in ("long", "packed-long")
    uses = force_segments(monkeypatch, None if default_rule else 128)
    if default_rule:
        monkeypatch.setenv("FLAME_DELTA_SEGMENTS", "auto")
    check_bf16_gpu(cases[case], gated, f"{case} segments", max_seqlen=9200 if case == "packed-long" else None)
    assert uses == ["entry", "end"], uses


@pytest.mark.gpu
@pytest.mark.parametrize("few_sms", [False, True], ids=["", "few-sms"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_segments_without_states_bf16_gpu(gated, few_sms, monkeypatch):
    """Training over the default segments without initial or final states (as the trainer
    runs), one sequence of three segments, the gated backward over
    runs of two. few_sms: the transition passes launched as where their programs outnumber the
    SMs (the forward's with capped registers, the backward's at one pipeline stage). bf16
    against float64: outputs within 5e-3, every gradient within 2e-2."""
    from flame.kernels import delta_rule_segments

    launches = []
    configs = delta_rule_segments.transition_config, delta_rule_segments.transition_grad_config
    for name, config in zip(("transition_config", "transition_grad_config"), configs):
        def recording(*args, config=config):  # (..., SM count)
            launches.append(config(*args[:-1], 1 if few_sms else args[-1]))
            return launches[-1]

        monkeypatch.setattr(delta_rule_segments, name, recording)
    uses = force_segments(monkeypatch, None)
    monkeypatch.setenv("FLAME_DELTA_SEGMENTS", "auto")
    inputs = make_inputs(1, 12288, 2, 4, 128, 128, 1, dtype=torch.bfloat16, device="cuda")[:5]
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, g, beta = leaves
    o = chunk_gated_delta_rule(q, k, v, g, beta)[0] if gated else chunk_delta_rule(q, k, v, beta)[0]
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves if gated else [q, k, v, beta], do)
    leaves64 = [x.detach().double().requires_grad_() for x in inputs]
    q, k, v, g, beta = leaves64
    o_ref = chunk_delta_rule_ref(q, k, v, beta, g=g if gated else None)[0]
    grads_ref = torch.autograd.grad(o_ref, leaves64 if gated else [q, k, v, beta], do.double())
    assert uses == ["entry", "end"], uses
    errors = {"o": rel(o, o_ref)}
    names = ("q", "k", "v", "g", "beta") if gated else ("q", "k", "v", "beta")
    errors.update({"d" + n: rel(x, ref) for n, x, ref in zip(names, grads, grads_ref)})
    print("segments without states", "gated" if gated else "plain", launches,
          {n: f"{e:.2e}" for n, e in errors.items()})
    cap = delta_rule_segments.THREE_PER_SM_REGISTERS if few_sms else None
    assert launches == [(64, 4, 2, cap), (64, 4, 1 if few_sms else 2)], launches
    assert errors["o"] < 5e-3, errors
    assert all(e < 2e-2 for n, e in errors.items() if n.startswith("d")), errors


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_segments_inference_bf16_gpu(gated, monkeypatch):
    """The forward without a backward over the default segments (one sequence of three, the
    default rule), bf16 against float64: outputs and final states within 5e-3."""
    uses = force_segments(monkeypatch, None)
    monkeypatch.setenv("FLAME_DELTA_SEGMENTS", "auto")
    q, k, v, g, beta, h0 = make_inputs(1, 12288, 2, 4, 128, 128, 1, dtype=torch.bfloat16, device="cuda")
    h0 = h0.float()
    with torch.no_grad():
        if gated:
            o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        else:
            o, ht = chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True)
    o_ref, ht_ref = chunk_delta_rule_ref(q.double(), k.double(), v.double(), beta.double(),
                                         g=g.double() if gated else None, initial_state=h0.double(),
                                         output_final_state=True)
    assert uses == ["entry"], uses
    errors = {"o": rel(o, o_ref), "final_state": rel(ht, ht_ref)}
    print("inference segments", "gated" if gated else "plain", {n: f"{e:.2e}" for n, e in errors.items()})
    assert errors["o"] < 5e-3 and errors["final_state"] < 5e-3, errors
