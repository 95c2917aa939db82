"""Two GPUs against one: FSDP=2 and TP=2 runs of the ~340M recipes beside the one-GPU run.

For each recipe (gated_deltanet_374M and transformer_374M by default) three runs of the real
trainer read the same global batches (2 micro-batches of --batch sequences of --seq tokens per
step) from the embedded default corpus:

    1 GPU    one process, 2 micro-batches per step from 2 loader workers
    FSDP=2   launch/run.sh with 2 processes, one micro-batch each (one loader worker each:
             the loader gives them the documents the 2 workers of the one-GPU run read)
    TP=2     launch/run.sh with 2 processes, --parallelism.tensor_parallel_degree 2, the
             one-GPU run's 2 micro-batches on both GPUs of the group

Every GPU computes micro-batches of the same size, so tokens/s per GPU compare directly:
    FSDP=2 scaling efficiency = (tokens/s per GPU with FSDP=2) / (tokens/s per GPU on one GPU)
The losses of the 2-GPU runs are compared step by step with the one-GPU run (bf16 compute, so
they drift apart slowly; the initial weights are the same: see Trainer._build_model).

    python benchmarks/multi_gpu.py                       # both recipes, 50 steps, seq 2048
    python benchmarks/multi_gpu.py --recipes transformer_374M --steps 30

Short runs by design (about 6 minutes of GPU time for the defaults): --seq 2048 instead of the
recipes' 4096, no torch.compile (--compile to turn it on: it adds compile time to every run),
timing over the steps after the first --skip. Writes benchmarks/results/multi_gpu.json.
"""

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

from environment import environment as bench_environment

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LAYOUTS = {
    # name: (processes, extra trainer arguments, loader workers)
    "1gpu": (1, [], 2),
    "fsdp2": (2, ["--parallelism.data_parallel_shard_degree", "2"], 1),
    "tp2": (2, ["--parallelism.tensor_parallel_degree", "2"], 2),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    import torch

    return {**bench_environment(), "gpus": torch.cuda.device_count()}


def run(recipe: str, layout: str, args, workdir: pathlib.Path) -> dict:
    procs, extra, workers = LAYOUTS[layout]
    dump = workdir / f"{recipe}_{layout}"
    config = workdir / f"{recipe}_{layout}.toml"
    # the recipes stream their data from the hub; this benchmark reads the embedded corpus
    config.write_text(f'extends = "{ROOT / "train_configs" / (recipe + ".toml")}"\n\n'
                      '[data]\ntokenizer = "default"\n\n[[data.sources]]\nkind = "default"\n')
    trainer_args = ["--config", str(config), "--job.dump_folder", str(dump),
                    "--training.steps", str(args.steps), "--training.seq_len", str(args.seq),
                    "--training.local_batch_size", str(args.batch),
                    "--training.global_batch_size", str(2 * args.batch),
                    "--data.num_workers", str(workers),
                    "--lr_scheduler.warmup_steps", str(max(1, args.steps // 5)),
                    "--checkpoint.enable", "false", "--metrics.log_freq", "1",
                    "--compile.enable", "true" if args.compile else "false", *extra]
    if procs == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *trainer_args]
        env = dict(os.environ)
    else:
        cmd = ["bash", str(ROOT / "launch" / "run.sh"), *trainer_args]
        env = dict(os.environ, NPROC_PER_NODE=str(procs), PYTHON=sys.executable,
                   MASTER_PORT=str(_free_port()))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = "timeout", str(e.stdout or "")[-3000:]
    seconds = time.perf_counter() - start
    metrics = dump / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    row = {"recipe": recipe, "layout": layout, "gpus": procs, "rc": rc, "wall_seconds": round(seconds, 1),
           "command": " ".join(cmd), "losses": [r["loss"] for r in records]}
    timed = [r for r in records if r["step"] > args.skip]
    if rc == 0 and timed:
        # the trainer logs tokens/s per device (a TP group's devices share one batch)
        row["tokens_per_second_per_gpu"] = statistics.median(r["tokens_per_second"] for r in timed)
        mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
        row["mfu"] = statistics.median(mfu) if mfu else None
        row["memory_gib"] = max(r.get("memory_gib") or 0 for r in timed)
    else:
        row["error"] = log[-3000:]
    return row


def compare(rows: list[dict], loss_tolerance: float) -> list[dict]:
    summary = []
    for recipe in sorted({r["recipe"] for r in rows}):
        by = {r["layout"]: r for r in rows if r["recipe"] == recipe}
        base = by.get("1gpu", {})
        entry = {"recipe": recipe}
        for layout in ("fsdp2", "tp2"):
            r = by.get(layout, {})
            if not base.get("losses") or not r.get("losses") or len(r["losses"]) != len(base["losses"]):
                entry[layout] = {"error": "run failed or logged a different number of steps"}
                continue
            diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"])]
            e = {"loss_max_rel_diff": max(diffs), "loss_mean_rel_diff": statistics.mean(diffs),
                 "loss_step1_rel_diff": diffs[0], "loss_matches": max(diffs) <= loss_tolerance}
            if "tokens_per_second_per_gpu" in r and "tokens_per_second_per_gpu" in base:
                e["tokens_per_second_per_gpu"] = r["tokens_per_second_per_gpu"]
                e["vs_1gpu_per_gpu"] = r["tokens_per_second_per_gpu"] / base["tokens_per_second_per_gpu"]
            entry[layout] = e
        if "vs_1gpu_per_gpu" in entry.get("fsdp2", {}):
            entry["fsdp2_scaling_efficiency"] = entry["fsdp2"]["vs_1gpu_per_gpu"]
            entry["fsdp2_scaling_ok"] = entry["fsdp2_scaling_efficiency"] >= 0.9
        entry["tokens_per_second_1gpu"] = base.get("tokens_per_second_per_gpu")
        summary.append(entry)
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["gated_deltanet_374M", "transformer_374M"])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the timing")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (2 micro-batches a step)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--loss-tolerance", type=float, default=0.02,
                   help="largest relative loss difference to the one-GPU run counted as a match")
    p.add_argument("--timeout", type=int, default=240, help="seconds per run")
    p.add_argument("--workdir", default="/tmp/flame_multi_gpu")
    p.add_argument("--out", default=str(RESULTS / "multi_gpu.json"))
    args = p.parse_args()

    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for recipe in args.recipes:
        for layout in args.layouts:
            row = run(recipe, layout, args, workdir)
            rows.append(row)
            print(f"{recipe:24s} {layout:6s} rc {row['rc']}  "
                  f"{row.get('tokens_per_second_per_gpu', float('nan')):10.0f} tok/s/GPU  "
                  f"loss {row['losses'][-1] if row['losses'] else float('nan'):.4f}  ({row['wall_seconds']} s)",
                  flush=True)
    summary = compare(rows, args.loss_tolerance)
    for s in summary:
        print(json.dumps(s))
    result = {"benchmark": "multi_gpu", "environment": environment(),
              "settings": {"steps": args.steps, "timed_after_step": args.skip, "seq_len": args.seq,
                           "micro_batch": args.batch, "micro_batches_per_step": 2,
                           "tokens_per_step": 2 * args.batch * args.seq, "compile": args.compile,
                           "data": "embedded default corpus, default tokenizer",
                           "note": "short runs: seq_len and steps below the recipes' to fit ~6 GPU minutes",
                           "loss_tolerance": args.loss_tolerance},
              "summary": summary, "runs": rows}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
