"""End-to-end training throughput of every recipe beside the Transformer of the same size.

For each recipe in train_configs/ (filtered by --archs / --sizes) and each sequence length, runs
the real trainer for a few steps:

    python train.py --config <recipe + overrides> --training.steps N --training.seq_len S ...

on the embedded default corpus (no network needed) with a micro-batch that fits one H100, then
reads tokens/s and MFU from `<dump_folder>/metrics.jsonl` (median over the steps after the
first `--skip` ones, which include compilation and autotuning; the table also gives the overall
rate, the timed steps' tokens over their total time). MFU is the trainer's: the model's
own FLOPs per token (`LanguageModel.flops_per_token`) over the GPU's peak dense bf16 FLOP/s.

    python benchmarks/train_throughput.py                          # all recipes, seq 2048/4096/16384
    python benchmarks/train_throughput.py --sizes 340M --seqs 4096 16384 --steps 12
    python benchmarks/train_throughput.py --archs gated_deltanet --sizes 340M --seqs 4096 --micro-batches 16
    python benchmarks/train_throughput.py --mode loss --sizes 340M  # 200 steps each, loss must fall

--mode loss trains each selected recipe for --loss-steps steps (default 200) at seq 4096 with
--loss-batch sequences per step (default 4) and records every loss; a run passes when every loss is finite and the mean of the
last 20 is below the mean of the first 20.

Writes benchmarks/results/train_throughput.json (or train_loss.json) and prints a table.
"""

import argparse
import glob
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

from environment import environment

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ARCHS = ("transformer", "gated_deltanet", "gla", "deltanet", "retnet", "mamba2", "hybrid_gdn_attn")
# Sequences per micro-batch that fit one 80 GB H100 without activation checkpointing, by model
# size class and sequence length (tokens per micro-batch: 32K for ~340M, 16K for ~1.3B).
MICRO_BATCH = {
    "small": {2048: 16, 4096: 8, 16384: 2},
    "large": {2048: 8, 4096: 4, 16384: 1},
}


SIZE_CLASSES = {"340M": "small", "1.3B": "large"}


def recipes(archs, sizes):
    """Recipes named <arch>_<count>.toml; sizes are classes: "340M" (~0.37B) and "1.3B" (~1.36B)."""
    found = []
    for path in sorted(glob.glob(str(ROOT / "train_configs" / "*.toml"))):
        m = re.fullmatch(r"(.+)_([0-9.]+[MB])\.toml", os.path.basename(path))
        if not m or m.group(1) not in archs:
            continue
        size_class = "large" if m.group(2).endswith("B") else "small"
        if sizes and size_class not in {SIZE_CLASSES[s] for s in sizes}:
            continue
        found.append({"arch": m.group(1), "size": m.group(2), "path": path, "class": size_class})
    return found


def micro_batch(recipe, seq_len):
    table = MICRO_BATCH[recipe["class"]]
    if seq_len in table:
        return table[seq_len]
    return max(1, table[4096] * 4096 // seq_len)


def run_trainer(recipe, seq_len, steps, batch, workdir, timeout, compile_model, log_freq=1, micro_batches=1,
                num_workers=None, pin_memory=None):
    """One training run of `micro_batches` micro-batches of `batch` sequences per optimizer step;
    returns (rc, metric records, seconds, log tail)."""
    dump = pathlib.Path(workdir) / f"{recipe['arch']}_{recipe['size']}_{seq_len}"
    # The recipe's data section streams from the hub; benchmarks use the embedded corpus.
    override = pathlib.Path(workdir) / f"{dump.name}.toml"
    workers = "" if num_workers is None else f"num_workers = {num_workers}\n"
    override.write_text(
        f'extends = "{recipe["path"]}"\n\n'
        "[data]\n"
        'tokenizer = "default"\n'
        f"{workers}\n"
        "[[data.sources]]\n"
        'kind = "default"\n')
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(override),
           "--training.steps", str(steps), "--training.seq_len", str(seq_len),
           "--training.local_batch_size", str(batch), "--training.global_batch_size", str(batch * micro_batches),
           "--lr_scheduler.warmup_steps", str(min(20, steps // 4)),
           "--checkpoint.enable", "false", "--metrics.log_freq", str(log_freq),
           "--compile.enable", "true" if compile_model else "false",
           "--job.dump_folder", str(dump)]
    if pin_memory is not None:
        cmd += ["--data.pin_memory", pin_memory]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    seconds = time.perf_counter() - start
    records = []
    metrics = dump / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return rc, records, seconds, log[-3000:], " ".join(cmd)


def throughput(args, selected, workdir):
    rows = []
    for seq_len in args.seqs:
        for recipe in selected:
            batch = micro_batch(recipe, seq_len)
            rc, records, seconds, log, cmd = run_trainer(recipe, seq_len, args.steps, batch, workdir,
                                                         args.timeout, not args.no_compile,
                                                         micro_batches=args.micro_batches,
                                                         num_workers=args.num_workers,
                                                         pin_memory=args.pin_memory)
            timed = [r for r in records if r["step"] > args.skip]
            row = {"recipe": os.path.basename(recipe["path"]), "arch": recipe["arch"], "size": recipe["size"],
                   "class": recipe["class"], "seq_len": seq_len, "local_batch_size": batch,
                   "micro_batches_per_step": args.micro_batches,
                   "tokens_per_step": batch * seq_len * args.micro_batches,
                   "steps": args.steps, "rc": rc, "wall_seconds": round(seconds, 1), "command": cmd}
            if rc == 0 and timed:
                row["tokens_per_second"] = statistics.median(r["tokens_per_second"] for r in timed)
                # every timed step holds the same tokens: their total over the steps' total time (a
                # Transformer's steps differ by their documents' lengths, which a median weighs unevenly)
                row["tokens_per_second_overall"] = statistics.harmonic_mean(r["tokens_per_second"] for r in timed)
                mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
                row["mfu"] = statistics.median(mfus) if mfus else None
                row["memory_gib"] = max(r.get("memory_gib") or 0 for r in timed)
                row["final_loss"] = records[-1]["loss"]
                # every step's rate, so stalls (a compile, a slow batch) show beside the median
                row["tokens_per_second_by_step"] = {r["step"]: round(r["tokens_per_second"]) for r in records}
                # the host's share of each step spent waiting for the data loader
                row["data_wait_by_step"] = {r["step"]: round(r.get("data_wait_fraction") or 0.0, 4) for r in records}
                # the longest packed document of each step (the serial chain of the linear-attention passes)
                row["longest_document_by_step"] = {r["step"]: r.get("longest_document_tokens") for r in records}
            else:
                row["error"] = log
            rows.append(row)
            print(f"  {row['recipe']:28s} seq {seq_len:6d}  rc {rc}  "
                  f"{row.get('tokens_per_second', float('nan')):10.0f} tok/s  ({seconds:.0f} s)", flush=True)
    # beside the Transformer of the same size class and sequence length
    for row in rows:
        base = [r for r in rows if r["arch"] == "transformer" and r["seq_len"] == row["seq_len"]
                and r["class"] == row["class"] and "tokens_per_second" in r]
        if base and "tokens_per_second" in row:
            row["vs_transformer"] = row["tokens_per_second"] / base[0]["tokens_per_second"]
            row["vs_transformer_overall"] = row["tokens_per_second_overall"] / base[0]["tokens_per_second_overall"]
    print(f"\n{'recipe':28s} {'seq':>6s} {'batch':>5s} {'tokens/s':>10s} {'MFU':>6s} {'x Transf.':>9s} {'GiB':>6s}"
          f" {'overall tokens/s':>16s} {'x Transf.':>9s}")
    for r in rows:
        if "tokens_per_second" not in r:
            print(f"{r['recipe']:28s} {r['seq_len']:6d} {r['local_batch_size']:5d}   failed (rc {r['rc']})")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "   n/a"
        ratio = f"{r['vs_transformer']:8.2f}x" if "vs_transformer" in r else "      n/a"
        overall = f"{r['vs_transformer_overall']:8.2f}x" if "vs_transformer_overall" in r else "      n/a"
        print(f"{r['recipe']:28s} {r['seq_len']:6d} {r['local_batch_size']:5d} {r['tokens_per_second']:10.0f} "
              f"{mfu} {ratio} {r.get('memory_gib', 0):6.1f} {r['tokens_per_second_overall']:16.0f} {overall}")
    return rows


def loss_runs(args, selected, workdir):
    rows = []
    for recipe in selected:
        batch = args.loss_batch
        rc, records, seconds, log, cmd = run_trainer(recipe, 4096, args.loss_steps, batch, workdir,
                                                     args.timeout, not args.no_compile, log_freq=1)
        losses = [r["loss"] for r in records]
        finite = bool(losses) and all(isinstance(x, (int, float)) and x == x and abs(x) != float("inf")
                                      for x in losses)
        k = min(20, len(losses) // 4) or 1
        falling = finite and len(losses) >= 2 * k and (sum(losses[-k:]) / k < sum(losses[:k]) / k)
        row = {"recipe": os.path.basename(recipe["path"]), "seq_len": 4096, "local_batch_size": batch,
               "steps_logged": len(losses), "rc": rc, "wall_seconds": round(seconds, 1),
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "finite": finite, "falling": falling, "passed": rc == 0 and finite and falling,
               "losses": losses, "command": cmd}
        if rc != 0:
            row["error"] = log
        rows.append(row)
        print(f"  {row['recipe']:28s} rc {rc}  loss {row['first_loss']} -> {row['last_loss']}  "
              f"{'PASS' if row['passed'] else 'FAIL'}  ({seconds:.0f} s)", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("throughput", "loss"), default="throughput")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--sizes", nargs="+", default=None, choices=tuple(SIZE_CLASSES),
                   help="size classes to run (default: both)")
    p.add_argument("--seqs", nargs="+", type=int, default=[2048, 4096, 16384])
    p.add_argument("--steps", type=int, default=12, help="training steps per throughput run")
    p.add_argument("--skip", type=int, default=4, help="first steps left out of the timing")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation; the recipes' global batch of "
                        "128 sequences of 4096 is 16 micro-batches of the 340M micro-batch on one GPU)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data-loader workers per run (default: the recipe's; at 2 the 340M runs waited on "
                        "the loader for 3-14%% of each step on an H100 host)")
    p.add_argument("--pin-memory", choices=("true", "false"), default=None,
                   help="the loader's data.pin_memory (default: the recipe's)")
    p.add_argument("--loss-steps", type=int, default=200)
    p.add_argument("--loss-batch", type=int, default=4, help="sequences of 4096 per step in --mode loss")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run before it is stopped")
    p.add_argument("--no-compile", action="store_true", help="run eagerly (faster start, slower steps)")
    p.add_argument("--no-transformer", action="store_true",
                   help="leave out the Transformer baseline (A/B runs of one recipe)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_<mode>.json)")
    args = p.parse_args()
    if args.mode == "throughput" and "transformer" not in args.archs and not args.no_transformer:
        args.archs.append("transformer")

    selected = recipes(args.archs, args.sizes)
    if not selected:
        raise SystemExit(f"no recipe in train_configs/ matches --archs {args.archs} --sizes {args.sizes}")
    with tempfile.TemporaryDirectory(prefix="flame_tp_") as workdir:
        rows = throughput(args, selected, workdir) if args.mode == "throughput" else loss_runs(args, selected, workdir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = pathlib.Path(args.out) if args.out else RESULTS / f"train_{args.mode}.json"
    out.write_text(json.dumps({"environment": environment(), "benchmark": f"train_{args.mode}",
                               "settings": vars(args), "runs": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
