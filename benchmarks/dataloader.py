"""Loader-alone throughput: tokens/s out of build_dataloader with online tokenization.

    python benchmarks/dataloader.py                       # default corpus + default tokenizer
    python benchmarks/dataloader.py --workers 1 2 4 8 --tokenizer <hub id or dir> \
        --source-kind files --source-path 'data/*.jsonl'

For each worker count, the loader runs in this process (as in training: one loader per GPU
process) and batches are consumed as fast as they come, after a warm-up that covers the workers'
start. The baseline timed in the same run is the tokenizer alone on one core (encode_batch of
the same documents in this process): the ceiling one worker can reach (none for a pre-tokenized
source, read with --source-kind disk --source-path <python -m flame.data.tokenize output>). Writes
benchmarks/results/dataloader-<host>.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


def tokenizer_alone(tok, cfg, seconds: float) -> float:
    """Tokens/s of the fast tokenizer on one thread over the source's first documents."""
    from flame.data.sources import open_source

    os.environ["RAYON_NUM_THREADS"] = "1"
    src = open_source(cfg.sources[0], "data.sources[0]")
    if src.pretokenized:
        return None, None
    if src.streaming:
        texts = [r[src.column] for r in src.dataset.take(512)]
    else:
        texts = src.dataset[:512][src.column]
    backend = tok.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(texts), 32):
            n += sum(len(e.ids) for e in encode(texts[i:i + 32], add_special_tokens=False))
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def _cpu_seconds(pids) -> float:
    """User + system CPU time of the given processes, from /proc (Linux)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError):
            pass
    return total


def loader_throughput(cfg, tok, workers: int, seq_len: int, batch: int, seconds: float) -> dict:
    from flame.data import build_dataloader

    cfg.num_workers = workers
    loader = build_dataloader(cfg, tok, seq_len=seq_len, local_batch_size=batch, dp_rank=0, dp_world_size=1, seed=0)
    it = iter(loader)
    t_start = time.perf_counter()
    for _ in range(max(4, 2 * workers)):  # warm-up: worker start and first reads
        next(it)
    startup = time.perf_counter() - t_start
    pids = [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])]
    cpu0, wcpu0 = _cpu_seconds(pids), _cpu_seconds(pids[1:])
    n, steps, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += b["input_ids"].numel()
        steps += 1
    dt = time.perf_counter() - t0
    cpu, wcpu = _cpu_seconds(pids) - cpu0, _cpu_seconds(pids[1:]) - wcpu0
    del it, loader
    # Tokens per CPU-second (this process + its workers): the rate per core, even on a shared host.
    return {"workers": workers, "tokens_per_s": n / dt, "tokens_per_cpu_s": n / cpu if cpu > 0 else None,
            "tokens_per_worker_cpu_s": n / wcpu if wcpu > 0 else None,
            "cpu_s": cpu, "workers_cpu_s": wcpu, "main_cpu_s": cpu - wcpu, "batches": steps, "seconds": dt,
            "startup_s": startup}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=None)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--tokenizer", default="default")
    p.add_argument("--source-kind", default="default")
    p.add_argument("--source-path", default="")
    p.add_argument("--source-name", default="")
    p.add_argument("--streaming", action="store_true")
    p.add_argument("--text-column", default="text")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    import datasets
    import tokenizers
    import torch
    import torchdata

    from flame.data import DataConfig, SourceConfig, build_tokenizer

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = a.workers or sorted({0, 1, 2, max(1, cpus - 1)})
    cfg = DataConfig(sources=[SourceConfig(kind=a.source_kind, path=a.source_path, name=a.source_name,
                                           streaming=a.streaming, text_column=a.text_column)],
                     tokenizer=a.tokenizer)
    tok = build_tokenizer(cfg)
    results = []
    for w in workers:
        r = loader_throughput(cfg, tok, w, a.seq_len, a.batch, a.seconds)
        per_cpu = f"{r['tokens_per_cpu_s']:,.0f}" if r["tokens_per_cpu_s"] else "?"
        print(f"workers={w}: {r['tokens_per_s']:,.0f} tokens/s, {per_cpu} tokens per CPU-second, "
              f"{r['tokens_per_worker_cpu_s'] or 0:,.0f} per worker CPU-second "
              f"({r['batches']} batches, startup {r['startup_s']:.1f} s)", flush=True)
        results.append(r)
    base, base_cpu = tokenizer_alone(tok, cfg, min(a.seconds, 5.0))
    if base is not None:
        print(f"baseline, tokenizer alone on one thread: {base:,.0f} tokens/s, {base_cpu:,.0f} tokens per CPU-second")
    out = {
        "benchmark": "dataloader",
        "host": platform.node(), "cpu": _cpu_name(), "cpus_available": cpus,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "tokenizers": tokenizers.__version__, "datasets": datasets.__version__,
        "torchdata": getattr(torchdata, "__version__", "?"), "python": platform.python_version(),
        "commit": _git_commit(),
        "source": cfg.sources[0].__dict__, "tokenizer": a.tokenizer, "vocab_size": len(tok),
        "seq_len": a.seq_len, "local_batch_size": a.batch,
        "results": results,
        "baseline_tokenizer_one_thread_tokens_per_s": base,
        "baseline_tokenizer_one_thread_tokens_per_cpu_s": base_cpu,
        "load_average_1min": os.getloadavg()[0],
        "goal_tokens_per_s_per_gpu_process": 200_000,
    }
    path = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"dataloader-{platform.node() or 'host'}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
