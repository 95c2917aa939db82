"""chunk_simple_gla's Triton kernels at small head sizes, against float64, on one GPU.

On the H100 (Triton 3.6) the scalar-gate kernels gave a wrong output at K = 64, V = 32 and an
illegal memory access at K = V = 32, so heads below 64 run the torch reference on a GPU
(`linear_attention._triton_takes`). This forces the Triton path for a grid of head sizes and
launch variants, each case in its own process (an illegal access ends only that process), and
reports the relative error norms of o, the final state and every gradient:

    python benchmarks/simple_gla_small_heads.py [--out PATH]

Variants change one module constant of flame/kernels/linear_attention.py: CHUNK_STAGES (the
whole-chunk kernels' num_stages), STATE_STAGES_SMALL (the 32x32-tile state pass), CHUNK_BLOCK_K
(the reduction tile of the whole-chunk kernels), FUSED_SCALAR_BACKWARD.
"""

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADS = [(32, 32), (32, 64), (64, 32), (64, 64), (128, 32), (48, 80)]
VARIANTS = {"default": {}, "chunk_stages=1": {"CHUNK_STAGES": 1}, "state_stages=1": {"STATE_STAGES_SMALL": 1},
            "chunk_block_k=32": {"CHUNK_BLOCK_K": 32}, "unfused_backward": {"FUSED_SCALAR_BACKWARD": False}}

CASE = """
import json, sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from flame.kernels import chunk_simple_gla, linear_attention
from flame.kernels.linear_attention_ref import linear_attention_reference
linear_attention.SCALAR_GATE_MIN_CUDA_HEAD_DIM = 0  # the Triton path at every size
for name, value in {variant!r}.items():
    setattr(linear_attention, name, value)
K, V, H, T = {K}, {V}, 4, 300
gen = torch.Generator().manual_seed(0)
q, k = (torch.randn(2, T, H, K, generator=gen) for _ in range(2))
v = torch.randn(2, T, H, V, generator=gen)
g = F.logsigmoid(torch.randn(2, T, H, generator=gen) + 2.0)
do, dht = torch.randn(2, T, H, V, generator=gen), torch.randn(2, H, K, V, generator=gen)
def run(fn, dtype):
    leaves = [x.detach().to("cuda", dtype if i < 3 else torch.float64 if dtype == torch.float64 else torch.float32)
              .requires_grad_() for i, x in enumerate((q, k, v, g))]
    o, ht = fn(*leaves, output_final_state=True)
    ((o * do.to(o)).sum() + (ht * dht.to(ht)).sum()).backward()
    return [o, ht] + [x.grad for x in leaves]
out = run(chunk_simple_gla, torch.bfloat16)
ref = run(lambda *a, **kw: linear_attention_reference(*a, K ** -0.5, None, True), torch.float64)
names = ["o", "final_state", "dq", "dk", "dv", "dg"]
print(json.dumps({{n: ((a.double() - b).norm() / b.norm()).item() for n, a, b in zip(names, out, ref)}}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path,
                        default=ROOT / "benchmarks" / "results" / "simple_gla_small_heads.json")
    args = parser.parse_args()
    rows = []
    for K, V in HEADS:
        for variant, settings in VARIANTS.items():
            code = CASE.format(root=str(ROOT), variant=settings, K=K, V=V)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and lines:
                result = json.loads(lines[-1])
            else:  # the error's last line (e.g. an illegal memory access)
                result = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
            rows.append({"K": K, "V": V, "variant": variant, "errors": result})
            shown = (" ".join(f"{n} {e:.1e}" for n, e in result.items()) if isinstance(result, dict) else result)
            print(f"K={K:3d} V={V:3d} {variant:18s} {shown}", flush=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from environment import environment

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
