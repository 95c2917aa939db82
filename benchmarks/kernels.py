"""The four chunked token-mixer kernels on one GPU, beside PyTorch SDPA (flash, causal) and fla 0.6.

    python benchmarks/kernels.py [--kernels simple_gla gla delta_rule gated_delta_rule]
                                 [--shapes 8x4096 1x32768] [--skip-fla] [--fla-time-limit 900]
                                 [--time-limit 600] [--profile]
                                 [--out benchmarks/results/kernels_<gpu>.json]

H=16, K=V=128, bf16. For each kernel and shape: the first call (compile + autotune) in
seconds, then the median of triton.testing.do_bench for the forward and for forward+backward
(gradients of q, k, v and every gate through torch.autograd.grad), achieved TFLOP/s with the
FLOP counts below, and the fraction of the physical floor of baselines/h100.md reached.
With --profile, torch.profiler adds each flame and fla kernel's per-launch CUDA time (ms per call) for
the forward and for forward+backward. fla runs where it is installed; its refusals and errors are recorded per kernel, and a time
limit (SIGALRM) bounds each kernel's measurement (fla's first call can autotune for minutes).
"""

import argparse
import json
import pathlib
import signal
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flame.kernels as flame_kernels  # noqa: E402
from environment import environment as bench_environment  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
KERNELS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule")
CHUNK = 64

# fwd+bwd floor in ms at 32,768 tokens x 16 heads x 128 x 128 on the H100 (baselines/h100.md);
# it scales with the number of tokens.
FLOOR_MS_FWDBWD = {"simple_gla": 0.45, "gla": 1.2, "delta_rule": 0.5, "gated_delta_rule": 0.5}
FLOOR_TOKENS = 32768


def flops_per_token_head(kernel: str, K: int, V: int, C: int = CHUNK) -> tuple[float, float]:
    """(forward, backward) FLOPs executed per token and head by the chunked algorithm."""
    if kernel in ("simple_gla", "gla"):
        # state update k^T v, inter-chunk q h, intra-chunk q k^T and A v; backward twice that
        fwd = 4 * K * V + 2 * C * K + 2 * C * V
        return fwd, 2 * fwd
    # delta rule, as counted in baselines/h100.md
    fwd = 6 * K * V + 4 * C * K + 4 * C * V + 1.25 * C * K
    bwd = 16 * K * V + 18 * C * K + 10 * C * V + 4 * C * C
    return fwd, bwd


def environment() -> dict:
    try:
        import fla

        fla_version = fla.__version__
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        fla_version = f"unavailable: {type(e).__name__}: {e}"
    return {**bench_environment(), "fla": fla_version}


def make_inputs(kernel: str, B: int, T: int, H: int, D: int):
    """Positional inputs of the kernel (fla 0.6 order) and which of them take gradients."""
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(B, T, H, D, device=dev, dtype=bf)
    k = torch.randn(B, T, H, D, device=dev, dtype=bf)
    v = torch.randn(B, T, H, D, device=dev, dtype=bf)
    if kernel == "simple_gla":
        return [q, k, v, F.logsigmoid(torch.randn(B, T, H, device=dev))]
    if kernel == "gla":
        return [q, k, v, F.logsigmoid(torch.randn(B, T, H, D, device=dev)) / 16]
    k = F.normalize(k.float(), dim=-1).to(bf)
    beta = torch.rand(B, T, H, device=dev, dtype=bf).sigmoid()
    if kernel == "delta_rule":
        return [q, k, v, beta]
    return [q, k, v, F.logsigmoid(torch.randn(B, T, H, device=dev)), beta]


def implementations(kernel: str, skip_fla: bool):
    impls = {"flame": getattr(flame_kernels, f"chunk_{kernel}")}
    if not skip_fla:
        try:
            if kernel == "simple_gla":
                from fla.ops.simple_gla import chunk_simple_gla as fn
            elif kernel == "gla":
                from fla.ops.gla import chunk_gla as fn
            elif kernel == "delta_rule":
                from fla.ops.delta_rule import chunk_delta_rule as fn
            else:
                from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fn
            impls["fla"] = fn
        except Exception as e:  # noqa: BLE001
            impls["fla"] = e
    return impls


class TimeLimit:
    """Raises TimeoutError in the main thread after `seconds` (0: no limit)."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def _raise(self, signum, frame):
        raise TimeoutError(f"time limit of {self.seconds} s reached")

    def __enter__(self):
        if self.seconds:
            self.previous = signal.signal(signal.SIGALRM, self._raise)
            signal.alarm(self.seconds)

    def __exit__(self, *exc):
        if self.seconds:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, self.previous)


def bench_kernel(fn, inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    do = torch.randn_like(inputs[2])  # o has v's shape; not fn's output, so the first call is timed

    def forward():
        return fn(*inputs)[0]

    def forward_backward():
        o = fn(*leaves)[0]
        return torch.autograd.grad(o, leaves, do)

    torch.cuda.synchronize()
    start = time.perf_counter()
    forward_backward()
    torch.cuda.synchronize()
    first_call = time.perf_counter() - start
    fwd = do_bench(forward, warmup=25, rep=100, return_mode="median")
    fwdbwd = do_bench(forward_backward, warmup=25, rep=100, return_mode="median")
    return first_call, fwd, fwdbwd


def profile_kernel(fn, inputs, iters: int = 5) -> dict:
    """CUDA time per call of each GPU kernel, ms, for the forward and for forward+backward."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    do = torch.randn_like(inputs[2])
    steps = {"fwd": lambda: fn(*inputs)[0],
             "fwdbwd": lambda: torch.autograd.grad(fn(*leaves)[0], leaves, do)}
    return {name: kernel_times(step, iters) for name, step in steps.items()}


def kernel_times(step, iters: int = 5) -> dict:
    """CUDA time per call of `step` for each GPU kernel it launches, ms, largest first."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    times = {}
    for evt in prof.key_averages():
        if "CUDA" not in str(getattr(evt, "device_type", "")):
            continue
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        key = evt.key[:60]  # kernels whose names share this prefix are summed
        times[key] = times.get(key, 0.0) + total / 1000 / iters
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def autograd_calls(fn, leaves, do):
    """(fwd, fwd_save, fwdbwd) closures over fn(*leaves)[0]: the inference forward (no graph
    kept), the training forward (what the backward needs kept), and the forward with the
    gradients of every leaf for the output gradient do."""

    def fwd():
        with torch.no_grad():
            return fn(*leaves)[0]

    def fwd_save():
        return fn(*leaves)[0]

    def fwdbwd():
        return torch.autograd.grad(fn(*leaves)[0], leaves, do)

    return fwd, fwd_save, fwdbwd


def timed(fn):
    """Median do_bench time of fn in ms, or the error's text (e.g. out of registers or shared
    memory) so that one failing variant does not stop a sweep."""
    try:
        return round(do_bench(fn, return_mode="median"), 4)
    except Exception as e:  # noqa: BLE001 - recorded in the results
        return f"{type(e).__name__}: {e}"[:200]


def bench_sdpa(B, T, H, D):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def forward():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward_backward():
        return torch.autograd.grad(forward(), (q, k, v), do)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        forward_backward()
        fwd = do_bench(forward, warmup=25, rep=100, return_mode="median")
        fwdbwd = do_bench(forward_backward, warmup=25, rep=100, return_mode="median")
    flops_fwd = 4 * B * H * T * T * D / 2  # causal: half of QK^T and PV
    return fwd, fwdbwd, flops_fwd / fwd / 1e9, 3.5 * flops_fwd / fwdbwd / 1e9


def parse_shape(text: str) -> tuple[int, int]:
    b, t = text.lower().split("x")
    return int(b), int(t)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--shapes", nargs="+", default=["8x4096", "1x32768"], help="BxT, e.g. 8x4096")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--skip-fla", action="store_true", help="do not run fla 0.6")
    parser.add_argument("--fla-time-limit", type=int, default=900, help="seconds per fla kernel and shape (0: none)")
    parser.add_argument("--time-limit", type=int, default=600, help="seconds per flame kernel and shape (0: none)")
    parser.add_argument("--profile", action="store_true", help="per-kernel CUDA times of flame's kernels and of fla's")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default results/kernels_<gpu>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA device")

    H, D = args.heads, args.head_dim
    rows = []
    for shape in args.shapes:
        B, T = parse_shape(shape)
        fwd, fwdbwd, tf_fwd, tf_fwdbwd = bench_sdpa(B, T, H, D)
        rows.append({"kernel": "sdpa_flash_causal", "impl": "torch", "B": B, "T": T, "H": H, "D": D,
                     "fwd_ms": fwd, "fwdbwd_ms": fwdbwd, "tflops_fwd": tf_fwd, "tflops_fwdbwd": tf_fwdbwd})
        print(rows[-1], flush=True)
        for kernel in args.kernels:
            inputs = make_inputs(kernel, B, T, H, D)
            f_fwd, f_bwd = flops_per_token_head(kernel, D, D)
            tokens_heads = B * T * H
            floor = FLOOR_MS_FWDBWD[kernel] * B * T / FLOOR_TOKENS * H / 16 * D * D / (128 * 128)
            for impl, fn in implementations(kernel, args.skip_fla).items():
                row = {"kernel": kernel, "impl": impl, "B": B, "T": T, "H": H, "D": D,
                       "floor_fwdbwd_ms": floor}
                if isinstance(fn, Exception):
                    row["error"] = f"{type(fn).__name__}: {fn}"[:500]
                else:
                    try:
                        with TimeLimit(args.fla_time_limit if impl == "fla" else args.time_limit):
                            first, fwd, fwdbwd = bench_kernel(fn, inputs)
                        row.update(first_call_s=first, fwd_ms=fwd, fwdbwd_ms=fwdbwd,
                                   tflops_fwd=tokens_heads * f_fwd / fwd / 1e9,
                                   tflops_fwdbwd=tokens_heads * (f_fwd + f_bwd) / fwdbwd / 1e9,
                                   floor_fraction=floor / fwdbwd)
                        if args.profile:  # fla's too: where its kernels are faster than ours
                            row["profile_ms"] = profile_kernel(fn, inputs)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        row["error"] = f"{type(e).__name__}: {e}"[:500]
                rows.append(row)
                print(row, flush=True)
            del inputs
            torch.cuda.empty_cache()

    gpu_slug = torch.cuda.get_device_name().lower().replace("nvidia", "").strip().split()[0]
    out = args.out or RESULTS / f"kernels_{gpu_slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), "heads": H, "head_dim": D, "dtype": "bfloat16",
               "timing": "triton.testing.do_bench median, ms; first_call_s includes compile + autotune",
               "floor_source": "baselines/h100.md, scaled by tokens", "results": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")

    print(f"\n{'kernel':<18}{'impl':<7}{'shape':>9}{'fwd ms':>9}{'f+b ms':>9}{'TF/s f+b':>10}{'floor':>7}{'1st s':>8}")
    for r in rows:
        shape = f"{r['B']}x{r['T']}"
        if "error" in r:
            print(f"{r['kernel']:<18}{r['impl']:<7}{shape:>9}  error: {r['error'][:70]}")
            continue
        floor = f"{r['floor_fraction']:.2f}" if "floor_fraction" in r else "-"
        first = f"{r['first_call_s']:.1f}" if "first_call_s" in r else "-"
        print(f"{r['kernel']:<18}{r['impl']:<7}{shape:>9}{r['fwd_ms']:>9.3f}{r['fwdbwd_ms']:>9.3f}"
              f"{r['tflops_fwdbwd']:>10.1f}{floor:>7}{first:>8}")
    for r in rows:
        for step, times in r.get("profile_ms", {}).items():
            top = ", ".join(f"{name.split('_kernel')[0][-28:]} {ms:.3f}" for name, ms in list(times.items())[:6])
            print(f"  {r['kernel']} {r['impl']} {r['B']}x{r['T']} {step}: {top}")


if __name__ == "__main__":
    main()
