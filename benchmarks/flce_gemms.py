"""The fused cross-entropy's three matmuls at one chunk, in other operand layouts and under
cuBLASLt, beside the forms flame runs; then the whole loss under each BLAS backend.

    python benchmarks/flce_gemms.py          # chunk 2048, hidden 4096, vocab 128256, bf16

Per chunk of 2048 tokens flame runs logits = x @ W^T (into its buffer), dx = G @ W and
dW += G^T @ x (G, the logits' gradient, in the same buffer). The alternatives: the logits
transposed (W @ x^T, a [V, 2048] buffer), G kept transposed for dx and dW, and
torch.backends.cuda.preferred_blas_library("cublaslt") for each. Each time is one of --rounds
rounds of 8 back-to-back calls (CUDA events), the pairs in an order rotated by one per round:
the GPU runs at its power limit, so a fixed order would give the later pairs a lower clock.
Writes benchmarks/results/flce_gemms.json (or --out).
"""

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flame.kernels.cross_entropy import fused_linear_cross_entropy  # noqa: E402

from environment import environment  # noqa: E402
from flce_profile import event_ms  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BACKENDS = ("cublas", "cublaslt")


def matmuls(chunk: int, hidden: int, vocab: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(chunk, hidden, device=dev, dtype=dt)
    w = torch.randn(vocab, hidden, device=dev, dtype=dt) * 0.02
    g = torch.randn(chunk, vocab, device=dev, dtype=dt) * 1e-3
    g_t = g.T.contiguous()
    logits, logits_t = torch.empty_like(g), torch.empty_like(g_t)
    dx = torch.empty_like(x)
    dw = torch.mm(g.T, x)
    return {
        "logits x@W^T (flame)": lambda: torch.mm(x, w.T, out=logits),
        "logits^T W@x^T": lambda: torch.mm(w, x.T, out=logits_t),
        "dx G@W (flame)": lambda: torch.mm(g, w, out=dx),
        "dx (G^T)^T@W": lambda: torch.mm(g_t.T, w, out=dx),
        "dW += G^T@x (flame)": lambda: dw.addmm_(g.T, x),
        "dW += G^T@x, G^T stored": lambda: dw.addmm_(g_t, x),
        "dW = G^T@x (first chunk, flame)": lambda: torch.mm(g.T, x, out=dw),
    }


def whole_loss(tokens: int, hidden: int, vocab: int):
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, hidden, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=dev, dtype=dt) * 0.02).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device=dev)

    def call():
        x.grad = w.grad = None
        fused_linear_cross_entropy(x, w, target).backward()
    return call


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="flce_gemms")
    a = p.parse_args()
    torch.manual_seed(0)
    flop = 2 * a.chunk * a.hidden * a.vocab
    times: dict[str, list[float]] = {}

    fns = matmuls(a.chunk, a.hidden, a.vocab)
    pairs = [(name, b) for name in fns for b in BACKENDS]
    for name, b in pairs:  # each backend's heuristics and handles once before timing
        torch.backends.cuda.preferred_blas_library(b)
        event_ms(fns[name], 2)
    for r in range(a.rounds):
        for name, b in pairs[r % len(pairs):] + pairs[:r % len(pairs)]:
            torch.backends.cuda.preferred_blas_library(b)
            times.setdefault(f"{name} [{b}]", []).append(event_ms(fns[name], 8))
    del fns

    loss = whole_loss(a.tokens, a.hidden, a.vocab)
    for b in BACKENDS:
        torch.backends.cuda.preferred_blas_library(b)
        event_ms(loss, 2)
    for r in range(a.rounds - 1):
        for b in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
            torch.backends.cuda.preferred_blas_library(b)
            times.setdefault(f"fused_linear_cross_entropy fwd+bwd, N={a.tokens} [{b}]", []).append(
                event_ms(loss, 6))
    torch.backends.cuda.preferred_blas_library("cublas")

    rows = []
    for name, ts in times.items():
        median = sorted(ts)[len(ts) // 2]
        tflops = None if name.startswith("fused") else flop / median / 1e9
        rows.append({"variant": name, "median_ms": median, "tflops": tflops, "rounds_ms": ts})
    out = {"environment": environment(),
           "shapes": {"chunk": a.chunk, "tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab, "dtype": "bf16"},
           "method": "rounds of 8 back-to-back calls (6 for the whole loss), order rotated per round",
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{a.out}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"{'variant':58s} {'median ms':>9s} {'TFLOP/s':>8s}  rounds")
    for row in rows:
        tf = "" if row["tflops"] is None else f"{row['tflops']:.0f}"
        print(f"{row['variant']:58s} {row['median_ms']:9.3f} {tf:>8s}  "
              + " ".join(f"{t:.3f}" for t in row["rounds_ms"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
