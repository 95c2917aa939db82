"""chunk_simple_gla's Triton kernels at small head sizes, against float64, on one GPU.

On the H100 (Triton 3.6) the scalar-gate kernels gave a wrong output at K = 64, V = 32 and an
illegal memory access at K = V = 32, so heads below 64 run the torch reference on a GPU
(`linear_attention._triton_takes`). This forces the Triton path for a grid of head sizes and
launch variants, each case in its own process (an illegal access ends only that process), and
reports the relative error norms of o, the final state and every gradient:

    python benchmarks/simple_gla_small_heads.py [--out PATH]

Variants change one module constant of flame/kernels/linear_attention.py: CHUNK_STAGES (the
whole-chunk kernels' num_stages), STATE_STAGES_SMALL (the 32x32-tile state pass), CHUNK_BLOCK_K
(the reduction tile of the whole-chunk kernels), FUSED_SCALAR_BACKWARD; "tiles>=64" pads every
tile that follows a head size to at least 64 (masked loads and stores). The forward's errors are
printed before the backward runs, so a backward that fails still leaves them.
"""

import argparse
import json
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADS = [(32, 32), (32, 64), (64, 32), (64, 64), (128, 32), (48, 80)]
VARIANTS = {"default": {}, "chunk_stages=1": {"CHUNK_STAGES": 1}, "state_stages=1": {"STATE_STAGES_SMALL": 1},
            "chunk_block_k=32": {"CHUNK_BLOCK_K": 32}, "unfused_backward": {"FUSED_SCALAR_BACKWARD": False},
            "tiles>=64": {"next_power_of_2": "at_least_64"}, "state_tiles=64": {"STATE_PROGRAMS": 0}}

CASE = """
import json, sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from flame.kernels import chunk_simple_gla, linear_attention
from flame.kernels.linear_attention_ref import linear_attention_reference
linear_attention.SCALAR_GATE_MIN_CUDA_HEAD_DIM = 0  # the Triton path at every size
pow2 = linear_attention.next_power_of_2
for name, value in {variant!r}.items():
    setattr(linear_attention, name, (lambda n: max(64, pow2(n))) if value == "at_least_64" else value)
K, V, H, T = {K}, {V}, 4, 300
gen = torch.Generator().manual_seed(0)
q, k = (torch.randn(2, T, H, K, generator=gen) for _ in range(2))
v = torch.randn(2, T, H, V, generator=gen)
g = F.logsigmoid(torch.randn(2, T, H, generator=gen) + 2.0)
do, dht = torch.randn(2, T, H, V, generator=gen), torch.randn(2, H, K, V, generator=gen)
def leaves(dtype):
    return [x.detach().to("cuda", dtype if i < 3 else torch.float64 if dtype == torch.float64 else torch.float32)
            .requires_grad_() for i, x in enumerate((q, k, v, g))]
def backward(o, ht, xs):
    ((o * do.to(o)).sum() + (ht * dht.to(ht)).sum()).backward()
    return [x.grad for x in xs]
def errors(names, out, ref):
    return {{n: ((a.double() - b).norm() / b.norm()).item() for n, a, b in zip(names, out, ref)}}
ref_leaves = leaves(torch.float64)
ref = list(linear_attention_reference(*ref_leaves, K ** -0.5, None, True))
ref += backward(*ref, ref_leaves)
xs = leaves(torch.bfloat16)
o, ht = chunk_simple_gla(*xs, output_final_state=True)
torch.cuda.synchronize()
result = errors(["o", "final_state"], [o, ht], ref)
print(json.dumps(result), flush=True)
result.update(errors(["dq", "dk", "dv", "dg"], backward(o, ht, xs), ref[2:]))
torch.cuda.synchronize()
print(json.dumps(result), flush=True)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path,
                        default=ROOT / "benchmarks" / "results" / "simple_gla_small_heads.json")
    parser.add_argument("--jobs", type=int, default=4, help="cases run at once (each its own process)")
    args = parser.parse_args()

    def case(K, V, variant):
        code = CASE.format(root=str(ROOT), variant=VARIANTS[variant], K=K, V=V)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        lines = proc.stdout.strip().splitlines()
        row = {"K": K, "V": V, "variant": variant, "errors": json.loads(lines[-1]) if lines else {}}
        if proc.returncode != 0:  # the error's last line (e.g. an illegal memory access)
            row["failure"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
        shown = " ".join(f"{n} {e:.1e}" for n, e in row["errors"].items())
        print(f"K={K:3d} V={V:3d} {variant:18s} {shown} {row.get('failure', '')}", flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda c: case(*c), [(K, V, x) for K, V in HEADS for x in VARIANTS]))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from environment import environment

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
