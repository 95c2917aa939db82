"""Where one traced training step spends its GPU time: a torch.profiler chrome trace, summarised.

The trainer writes one trace per rank with profiling enabled:

    python train.py --config X.toml --profiling.enable_profiling true --profiling.profile_freq 10
    python benchmarks/trace_summary.py <dump_folder>/profile_traces/iteration_10/rank0_trace.json [more ...]

For each trace: the traced step's host span, the GPU time covered by any kernel (the union of
kernel intervals over all streams), the time of the compute stream alone, the communication
kernels (NCCL) and how much of them overlaps compute, the kernels by total time, the compute
stream's idle gaps (by the host op that launched the kernel after each, and whether the GPU was
waiting for that launch), and the host's CUDA runtime calls by total time (where the host blocks
on the device). With two
traces (e.g. one GPU and FSDP=2), a last table puts each kernel's time side by side.
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of (union of a) intersected with (union of b)."""
    return union_length(a) + union_length(b) - union_length(a + b)


def _innermost_ops(events):
    """cpu_op events per host thread, sorted by start: where a launch was made from."""
    ops = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e:
            ops[e.get("tid")].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    for tid in ops:
        ops[tid].sort()
    return ops


def _op_at(ops, tid, ts):
    """The shortest host op on thread `tid` in flight at `ts` (its name), or "(none)"."""
    spans = ops.get(tid, [])
    i = bisect.bisect_right(spans, (ts, float("inf"), ""))
    best = None
    for start, end, name in reversed(spans[max(0, i - 400):i]):
        if end >= ts and (best is None or end - start < best[0]):
            best = (end - start, name)
    return best[1] if best else "(none)"


def idle_gaps(main, events, first, last, min_us=5.0, bins=10):
    """The compute stream's idle time between consecutive kernels: its total, how much of it the
    host caused (the next kernel was launched after the previous one had ended: the GPU waited
    for the host), the gaps by the host op that launched the kernel ending them, by that kernel,
    and by where in the traced span they fell (`bins` equal parts)."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops = _innermost_ops(events)
    main = sorted(main, key=lambda e: e["ts"])
    total = host = 0.0
    count = 0
    by_op, by_kernel = defaultdict(lambda: [0.0, 0]), defaultdict(lambda: [0.0, 0])
    timeline = [0.0] * bins
    for prev, nxt in zip(main, main[1:]):
        end = prev["ts"] + prev["dur"]
        gap = nxt["ts"] - end
        if gap < min_us:
            continue
        total += gap
        count += 1
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        op = "(no launch found)"
        if launch is not None:
            if launch["ts"] > end:
                host += gap
            op = _op_at(ops, launch.get("tid"), launch["ts"])
        for table, key in ((by_op, op), (by_kernel, nxt["name"])):
            table[key][0] += gap
            table[key][1] += 1
        timeline[min(bins - 1, int((end - first) / max(last - first, 1e-9) * bins))] += gap
    ms = 1e-3
    top = lambda t: sorted(((k, v[0] * ms, v[1]) for k, v in t.items()), key=lambda r: -r[1])  # noqa: E731
    return {"min_gap_us": min_us, "idle_ms": total * ms, "count": count, "host_late_ms": host * ms,
            "by_launching_op": top(by_op)[:30], "by_next_kernel": top(by_kernel)[:30],
            "timeline_ms": [t * ms for t in timeline]}


def summarise(path: str) -> dict:
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    steps = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#") and "dur" in e]
    if not kernels:
        raise SystemExit(f"{path}: no GPU kernels in the trace")
    comm = [e for e in kernels if "nccl" in e["name"].lower()]
    compute = [e for e in kernels if "nccl" not in e["name"].lower()]
    by_stream = defaultdict(float)
    for e in compute:
        by_stream[e.get("args", {}).get("stream")] += e["dur"]
    main_stream = max(by_stream, key=by_stream.get)
    span = lambda es: [(e["ts"], e["ts"] + e["dur"]) for e in es]  # noqa: E731
    first = min(e["ts"] for e in kernels)
    last = max(e["ts"] + e["dur"] for e in kernels)
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        acc = per_kernel[e["name"]]
        acc[0] += e["dur"]
        acc[1] += 1
    # host-side CUDA runtime calls: a long cudaStreamSynchronize / cudaEventSynchronize /
    # cudaFree / cudaMalloc is the host blocked on the device
    runtime = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e:
            acc = runtime[e["name"]]
            acc[0] += e["dur"]
            acc[1] += 1
    ms = 1e-3
    main = [e for e in compute if e.get("args", {}).get("stream") == main_stream]
    return {
        "gaps": idle_gaps(main, events, first, last),
        "runtime_calls": sorted(((name, t * ms, n) for name, (t, n) in runtime.items()),
                                key=lambda r: -r[1]),
        "trace": path,
        "trace_gpu": (trace.get("deviceProperties") or [{}])[0].get("name"),
        "host_step_ms": max((e["dur"] for e in steps), default=0.0) * ms,
        "gpu_span_ms": (last - first) * ms,
        "gpu_busy_ms": union_length(span(kernels)) * ms,
        "compute_busy_ms": union_length(span(compute)) * ms,
        "compute_kernel_sum_ms": sum(e["dur"] for e in compute) * ms,
        "main_stream_kernel_ms": by_stream[main_stream] * ms,
        "comm_kernel_ms": sum(e["dur"] for e in comm) * ms,
        "comm_overlapping_compute_ms": _overlap(span(comm), span(compute)) * ms if comm else 0.0,
        "kernels": sorted(((name, t * ms, n) for name, (t, n) in per_kernel.items()),
                          key=lambda r: -r[1]),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None, help="also write the summaries here")
    a = p.parse_args()
    results = [summarise(t) for t in a.traces]
    for r in results:
        print(f"\n{r['trace']}")
        for k in ("host_step_ms", "gpu_span_ms", "gpu_busy_ms", "compute_busy_ms",
                  "compute_kernel_sum_ms", "main_stream_kernel_ms", "comm_kernel_ms",
                  "comm_overlapping_compute_ms"):
            print(f"  {k:30s} {r[k]:10.2f}")
        for name, t, n in r["kernels"][:a.top]:
            print(f"  {t:9.2f} ms {n:5d}x  {name[:100]}")
        gaps = r["gaps"]
        print(f"  compute stream idle (gaps >= {gaps['min_gap_us']:.0f} us): {gaps['idle_ms']:.2f} ms in "
              f"{gaps['count']} gaps, {gaps['host_late_ms']:.2f} ms of them waiting for a launch")
        print("    over the span:", " ".join(f"{t:.1f}" for t in gaps["timeline_ms"]))
        for title, key in (("by the host op that launched the next kernel", "by_launching_op"),
                           ("by the next kernel", "by_next_kernel")):
            print(f"    {title}:")
            for name, t, n in gaps[key][:a.top // 2]:
                print(f"    {t:9.2f} ms {n:5d}x  {name[:100]}")
        print("  host CUDA runtime calls:")
        for name, t, n in r["runtime_calls"][:8]:
            print(f"  {t:9.2f} ms {n:5d}x  {name[:100]}")
    if len(results) == 2:
        x, y = ({n: t for n, t, _ in r["kernels"]} for r in results)
        names = sorted(set(x) | set(y), key=lambda n: -abs(y.get(n, 0) - x.get(n, 0)))
        print("\nlargest differences (ms): first trace, second trace, second - first")
        for n in names[:a.top]:
            print(f"  {x.get(n, 0):9.2f} {y.get(n, 0):9.2f} {y.get(n, 0) - x.get(n, 0):+9.2f}  {n[:90]}")
    if a.json:
        # the environment of the summarising process: the trace's host when run beside the trainer
        from environment import environment

        with open(a.json, "w") as f:
            json.dump({"environment": environment(), "summaries": results}, f, indent=1)


if __name__ == "__main__":
    main()
