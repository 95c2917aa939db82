"""Delta-rule kernels on one GPU: per-kernel CUDA times (torch.profiler) of forward+backward and
the forward+backward time of a few launch configurations of the chunk-parallel gradient kernel.

    python benchmarks/delta_rule_profile.py [--shapes 8x4096 1x32768] [--out PATH]

H=16, K=V=128, bf16. Writes JSON (GPU, torch, Triton, commit) to benchmarks/results/.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flame.kernels.delta_rule_bwd as bwd  # noqa: E402
from flame.kernels import chunk_delta_rule, chunk_gated_delta_rule  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def inputs(gated, B, T, H=16, D=128):
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).to(torch.bfloat16)
    v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda"))
    leaves = [x.requires_grad_() for x in ((q, k, v, g, beta) if gated else (q, k, v, beta))]
    fn = chunk_gated_delta_rule if gated else chunk_delta_rule
    do = torch.randn_like(v)

    def fwdbwd():
        return torch.autograd.grad(fn(*leaves)[0], leaves, do)

    def fwd():
        with torch.no_grad():
            return fn(*leaves)[0]

    return fwd, fwdbwd


def per_kernel(step, iters=5):
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if total:
            out[evt.key[:50]] = round(total / 1000 / iters, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["8x4096", "1x32768"])
    parser.add_argument("--variants", nargs="*", default=["64x4", "64x8", "32x8", "128x8"],
                        help="chunk-gradient kernel configurations BVxWARPS, timed at the first shape")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=RESULTS.parent).stdout.strip()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": []}
    default = bwd.chunk_grad_config
    for shape in args.shapes:
        B, T = (int(x) for x in shape.split("x"))
        for gated in (False, True):
            name = "gated_delta_rule" if gated else "delta_rule"
            fwd, fwdbwd = inputs(gated, B, T)
            start = time.perf_counter()
            fwdbwd()
            torch.cuda.synchronize()
            row = {"kernel": name, "B": B, "T": T, "first_call_s": round(time.perf_counter() - start, 2),
                   "fwd_ms": do_bench(fwd, return_mode="median"),
                   "fwdbwd_ms": do_bench(fwdbwd, return_mode="median"),
                   "profile_fwdbwd_ms": per_kernel(fwdbwd)}
            if shape == args.shapes[0]:
                for variant in args.variants:
                    bv, warps = (int(x) for x in variant.split("x"))
                    bwd.chunk_grad_config = lambda *a, bv=bv, warps=warps: (bv, warps)
                    try:
                        row[f"fwdbwd_ms_chunk_grad_{variant}"] = do_bench(fwdbwd, return_mode="median")
                    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory; recorded
                        row[f"fwdbwd_ms_chunk_grad_{variant}"] = f"{type(e).__name__}: {e}"[:200]
                    bwd.chunk_grad_config = default
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    out = args.out or RESULTS / f"delta_rule_profile_{report['gpu'].replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
