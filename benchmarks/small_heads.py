"""The chunk kernels' Triton paths at small head sizes, against float64, on one GPU.

On the H100 (Triton 3.6) chunk_simple_gla's kernels gave a wrong output at K = 64, V = 32 and an
illegal memory access at K = V = 32 (exact in the interpreter). This forces the Triton path of
each chunk kernel over a grid of head sizes, dtypes and launch variants, each case in its own
process (an illegal access ends only that process), and reports the relative error norms of o,
the final state and every gradient:

    python benchmarks/small_heads.py [--kernels simple_gla,gla,...] [--jobs 8] [--out PATH]

Variants set module attributes of flame/kernels/linear_attention.py (CHUNK_STAGES: the
whole-chunk kernels' num_stages; CHUNK_BLOCK_K: their reduction tile; CHUNK_MIN_BLOCK: their
narrowest tile, 16 as before the fix; FUSED_SCALAR_BACKWARD; "tiles>=64" pads every tile that
follows a head size to at least 64) or of the delta-rule modules (tiles of at least 64; one
pipeline stage in the chunk-gradient kernel). The forward's errors are printed before the backward runs,
so a backward that fails still leaves them.
"""

import argparse
import json
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADS = [(16, 16), (32, 32), (32, 64), (64, 32), (64, 64), (128, 32), (16, 128), (48, 80)]
KERNELS = ["simple_gla", "gla", "delta_rule", "gated_delta_rule"]
DTYPES = {"simple_gla": ["bfloat16", "float32"], "gla": ["bfloat16"], "delta_rule": ["bfloat16"],
          "gated_delta_rule": ["bfloat16"]}
VARIANTS = {"default": {}, "tiles>=64": {"next_power_of_2": "at_least_64"},
            "chunk_stages=1": {"CHUNK_STAGES": 1}, "chunk_block_k=32": {"CHUNK_BLOCK_K": 32},
            "unfused_backward": {"FUSED_SCALAR_BACKWARD": False},
            "unfused_backward,tiles>=64": {"FUSED_SCALAR_BACKWARD": False, "next_power_of_2": "at_least_64"},
            "min_block=16": {"CHUNK_MIN_BLOCK": 16},
            "min_block=16,unfused_backward": {"CHUNK_MIN_BLOCK": 16, "FUSED_SCALAR_BACKWARD": False},
            "delta_tiles>=64": {"delta_rule._pow2": "at_least_64", "delta_rule_bwd._pow2": "at_least_64"},
            "delta_grad_stages=1": {"delta_rule_bwd.chunk_grad_stages": "returns_1"}}
KERNEL_VARIANTS = {"simple_gla": ["default", "unfused_backward", "min_block=16", "min_block=16,unfused_backward"],
                   "delta_rule": ["default", "delta_tiles>=64", "delta_grad_stages=1"],
                   "gated_delta_rule": ["default", "delta_tiles>=64", "delta_grad_stages=1"]}

CASE = """
import json, sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from flame.kernels import linear_attention
from flame.kernels import chunk_simple_gla, chunk_gla, chunk_delta_rule, chunk_gated_delta_rule
from flame.kernels.linear_attention_ref import linear_attention_reference
from flame.kernels.delta_rule_ref import chunk_delta_rule_ref
from flame.kernels import delta_rule, delta_rule_bwd
modules = dict(linear_attention=linear_attention, delta_rule=delta_rule, delta_rule_bwd=delta_rule_bwd)
def patched(old, value):
    if value == "at_least_64":
        return lambda n: max(64, old(n))
    if value == "returns_1":
        return lambda *args: 1
    return value
for name, value in {variant!r}.items():
    module, attr = name.split(".") if "." in name else ("linear_attention", name)
    setattr(modules[module], attr, patched(getattr(modules[module], attr), value))
kernel, K, V, H, T, dtype = {kernel!r}, {K}, {V}, 4, 300, torch.{dtype}
gen = torch.Generator().manual_seed(0)
q, k = (torch.randn(2, T, H, K, generator=gen) for _ in range(2))
v = torch.randn(2, T, H, V, generator=gen)
g = F.logsigmoid(torch.randn((2, T, H, K) if kernel == "gla" else (2, T, H), generator=gen) + 2.0)
beta = torch.rand(2, T, H, generator=gen)
if "delta" in kernel:
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
do, dht = torch.randn(2, T, H, V, generator=gen), torch.randn(2, H, K, V, generator=gen)
names = ["q", "k", "v", "g", "beta"]

def leaves(dtype):
    fp = torch.float64 if dtype == torch.float64 else torch.float32
    return [x.detach().to("cuda", dtype if i < 3 else fp).requires_grad_() for i, x in enumerate((q, k, v, g, beta))]

def call(xs, reference):
    q, k, v, g, beta = xs
    if kernel == "simple_gla" or kernel == "gla":
        if reference:
            return linear_attention_reference(q, k, v, g, K ** -0.5, None, True)
        return (chunk_simple_gla if kernel == "simple_gla" else chunk_gla)(q, k, v, g, output_final_state=True)
    if reference:
        return chunk_delta_rule_ref(q, k, v, beta, g=g if kernel == "gated_delta_rule" else None,
                                    output_final_state=True)
    if kernel == "gated_delta_rule":
        return chunk_gated_delta_rule(q, k, v, g, beta.to(q.dtype), output_final_state=True)
    return chunk_delta_rule(q, k, v, beta.to(q.dtype), output_final_state=True)

def grads(o, ht, xs):
    ((o * do.to(o)).sum() + (ht * dht.to(ht)).sum()).backward()
    return {{"d" + n: x.grad for n, x in zip(names, xs) if x.grad is not None}}

def errors(out, ref):
    return {{n: ((out[n].double() - ref[n]).norm() / ref[n].norm()).item() for n in ref if n in out}}

ref_xs = leaves(torch.float64)
ro, rht = call(ref_xs, True)
ref = {{"o": ro, "final_state": rht}}
ref.update(grads(ro, rht, ref_xs))
xs = leaves(dtype)
o, ht = call(xs, False)
torch.cuda.synchronize()
result = errors({{"o": o, "final_state": ht}}, ref)
print(json.dumps(result), flush=True)
result.update(errors(grads(o, ht, xs), ref))
torch.cuda.synchronize()
print(json.dumps(result), flush=True)
"""


def cases(kernels, variants=None):
    for kernel in kernels:
        for dtype in DTYPES[kernel]:
            for K, V in HEADS:
                for variant in KERNEL_VARIANTS.get(kernel, ["default"]) if dtype == "bfloat16" else ["default"]:
                    if variants is None or variant in variants:
                        yield kernel, dtype, K, V, variant


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--jobs", type=int, default=4, help="cases run at once (each its own process)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "small_heads.json")
    args = parser.parse_args()

    def case(kernel, dtype, K, V, variant):
        code = CASE.format(root=str(ROOT), kernel=kernel, dtype=dtype, variant=VARIANTS[variant], K=K, V=V)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        lines = proc.stdout.strip().splitlines()
        row = {"kernel": kernel, "dtype": dtype, "K": K, "V": V, "variant": variant,
               "errors": json.loads(lines[-1]) if lines else {}}
        if proc.returncode != 0:  # the error's last line (e.g. an illegal memory access)
            row["failure"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
        worst = max(row["errors"].values(), default=float("nan"))
        shown = " ".join(f"{n} {e:.1e}" for n, e in row["errors"].items())
        print(f"{kernel:16s} {dtype:8s} K={K:3d} V={V:3d} {variant:26s} worst {worst:.1e} | {shown} "
              f"{row.get('failure', '')}", flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda c: case(*c), list(cases(args.kernels.split(","), args.variants and args.variants.split(",")))))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from environment import environment

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
