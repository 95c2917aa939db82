"""Per-kernel CUDA times of flame's fused linear cross-entropy (forward + backward), one call,
with the gradients set to None before it (as in benchmarks/flce.py).

    python benchmarks/flce_profile.py [--tokens 16384] [--hidden 4096] [--vocab 128256]
                                      [--timeline] [--trace PATH] [--out PATH]

--timeline separates what benchmarks/flce.py's do_bench median holds beyond the kernels' sum:
for flame and torch.compile of the eager loss, the do_bench median, the CUDA-event time of one
call and of ten calls queued back to back, and from a traced call the kernels' sum, the span
from the first kernel's start to the last one's end, and the idle gaps inside it (the GPU
waiting for the host), with the SM clock read before and after. --trace writes the traced
call of flame as a chrome trace (for benchmarks/trace_summary.py).
"""

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from environment import environment, sm_clock_mhz  # noqa: E402
from flce import step as flce_step, torch_eager  # noqa: E402
from trace_summary import union_length  # noqa: E402
from flame.kernels import fused_linear_cross_entropy  # noqa: E402


def event_ms(fn, calls):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def traced(fn, trace_path=None):
    """Kernel sum, first-start-to-last-end span and idle time inside it (ms) of one call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    if trace_path:
        prof.export_chrome_trace(trace_path)
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()  # microseconds
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    busy = union_length(kernels)
    span = max(b for _, b in kernels) - min(a for a, _ in kernels)
    return {"kernel_busy_ms": busy / 1e3, "span_ms": span / 1e3, "idle_ms": (span - busy) / 1e3,
            "kernels": len(kernels)}


def timeline(x, w, target, trace_path):
    from triton.testing import do_bench

    rows = {}
    for name, loss in (("flame", fused_linear_cross_entropy), ("torch_compile", torch.compile(torch_eager))):
        def step(loss=loss):
            flce_step(loss, x, w, target)

        for _ in range(3):
            step()
        row = {"clock_before_mhz": sm_clock_mhz()}
        row["do_bench_median_ms"] = do_bench(step, return_mode="median")
        row["clock_after_do_bench_mhz"] = sm_clock_mhz()
        row["one_call_ms"] = event_ms(step, 1)
        row["ten_calls_ms_per_call"] = event_ms(step, 10)
        row.update(traced(step, trace_path if name == "flame" else None))
        rows[name] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        print(name, json.dumps(rows[name]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--timeline", action="store_true")
    parser.add_argument("--trace", default=None)
    parser.add_argument("--out", default=None, help="--timeline's JSON (with the environment)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(args.vocab, args.hidden, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens,), device="cuda")
    if args.timeline:
        rows = timeline(x, w, target, args.trace)
        if args.out:
            shape = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "dtype": "bfloat16"}
            pathlib.Path(args.out).write_text(json.dumps({"environment": environment(), "shape": shape,
                                                          "timeline": rows}, indent=2) + "\n")
        return

    def step():  # gradients set to None first, as in benchmarks/flce.py (no accumulation into old ones)
        flce_step(fused_linear_cross_entropy, x, w, target)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


if __name__ == "__main__":
    main()
