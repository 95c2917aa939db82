"""chunk_simple_gla with one q/k head shared by many value heads (the Mamba2 layer), by backward.

    python benchmarks/grouped_heads.py [--shape 8x4096] [--heads 32] [--k 128] [--v 64]
        [--variants per-head:GROUPED_BACKWARD=0 G32:GROUP_HEADS=32 ...] [--out results/x.json]

Each variant sets attributes of flame.kernels.linear_attention (the launch knobs) before it
runs. For each: the relative error of o and of every gradient against the float64 reference
(q, k repeated per value head) on the same inputs, then the median do_bench time of the
forward and of forward+backward (gradients of q, k, v, g). bf16, no initial state.
"""

import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from environment import environment  # noqa: E402

from flame.kernels import chunk_simple_gla, linear_attention  # noqa: E402
from flame.kernels.linear_attention_ref import linear_attention_reference  # noqa: E402

DEFAULT_VARIANTS = ["per-head:GROUPED_BACKWARD=0", "auto:", "G32:GROUP_HEADS=32", "G16:GROUP_HEADS=16",
                    "G8:GROUP_HEADS=8", "G32-w4:GROUP_HEADS=32,GROUP_WARPS=4", "G16-w4:GROUP_HEADS=16,GROUP_WARPS=4"]


def parse_variant(text):
    name, _, settings = text.partition(":")
    knobs = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if not hasattr(linear_attention, key):
            raise SystemExit(f"variant {name}: linear_attention has no {key}")
        knobs[key] = None if value == "None" else int(value)
    return name, knobs


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8x4096")
    p.add_argument("--heads", type=int, default=32, help="value heads (q and k have one)")
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--v", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    B, T = map(int, a.shape.split("x"))
    H, K, V = a.heads, a.k, a.v
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(B, T, 1, K, device="cuda", generator=gen).bfloat16() / K ** 0.5 for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", generator=gen).bfloat16()
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen) + 3.0)
    do = torch.randn(B, T, H, V, device="cuda", generator=gen).bfloat16()
    leaves = [x.requires_grad_() for x in (q, k, v, g)]

    ref = [x.detach().double().requires_grad_() for x in leaves]
    ro, _ = linear_attention_reference(ref[0].expand(-1, -1, H, -1), ref[1].expand(-1, -1, H, -1), ref[2], ref[3],
                                       1.0, None, False, None)
    ref_grads = torch.autograd.grad(ro, ref, do.double())
    del ref

    defaults = {name: getattr(linear_attention, name) for name in
                ("GROUPED_BACKWARD", "GROUP_HEADS", "GROUP_PROGRAMS", "GROUP_WARPS")}
    rows = []
    for text in a.variants:
        name, knobs = parse_variant(text)
        for key, value in {**defaults, **knobs}.items():
            setattr(linear_attention, key, value)
        row = {"variant": name, "knobs": knobs}
        try:
            o, _ = chunk_simple_gla(*leaves, scale=1.0)
            grads = torch.autograd.grad(o, leaves, do)
            row["errors"] = {"o": rel(o, ro), **{f"d{n}": rel(x, y) for n, x, y in zip("qkvg", grads, ref_grads)}}

            def fwd():
                return chunk_simple_gla(*leaves, scale=1.0)[0]

            def fwd_bwd():
                torch.autograd.grad(fwd(), leaves, do)

            with torch.no_grad():
                row["fwd_ms"] = do_bench(lambda: chunk_simple_gla(*leaves, scale=1.0), warmup=25, rep=200)
            row["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=25, rep=300)
        except Exception as e:  # noqa: BLE001 - record the failure of this variant, go on
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
        err = max(row["errors"].values()) if "errors" in row else float("nan")
        print(f"{name:12s} fwd {row.get('fwd_ms', float('nan')):7.3f} ms  fwd+bwd {row.get('fwd_bwd_ms', float('nan')):7.3f} ms"
              f"  max rel err {err:.2e}  {row.get('error', '')}", flush=True)
    for key, value in defaults.items():
        setattr(linear_attention, key, value)
    out = {"environment": environment(), "benchmark": "grouped_heads",
           "shape": {"B": B, "T": T, "HQ": 1, "H": H, "K": K, "V": V, "dtype": "bfloat16"}, "runs": rows}
    path = pathlib.Path(a.out) if a.out else pathlib.Path(__file__).resolve().parent / "results" / "grouped_heads.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
