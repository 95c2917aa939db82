"""Several GPUs against one: FSDP, TP and FSDP x TP runs of the real trainer beside one GPU.

Every layout reads the same global batches (M micro-batches of --batch sequences of --seq tokens
per step, M = the largest data-parallel degree asked for) from the embedded default corpus. A
layout with data-parallel degree D runs M / D micro-batches per step on each rank with M / D
loader workers, so the D x (M / D) loader shares are the same M shares of the documents for
every layout (a TP group shares one batch). The initial weights do not depend on the layout
(flame/init.py), so step 1 has the same loss everywhere and later steps differ only by bf16
rounding and reduction order.

    layout      GPUs  data-parallel x tensor-parallel
    1gpu          1   1 x 1
    fsdp2         2   2 x 1
    tp2           2   1 x 2
    fsdp4         4   4 x 1
    fsdp2_tp2     4   2 x 2
    fsdp8         8   8 x 1
    fsdp4_tp2     8   4 x 2

Runs are packed onto the machine's GPUs (CUDA_VISIBLE_DEVICES), several at a time when they
fit, to save machine time; each JSON row says which GPUs it had and with how many other runs
it shared the machine. Tokens/s per GPU compare directly since every GPU computes micro-batches
of the same size: scaling efficiency = tokens/s per GPU at N GPUs / tokens/s on one GPU.

--weak: every rank runs --micro-batches micro-batches per step whatever the layout (the global
batch grows with the data-parallel degree), so each GPU does the same work per optimizer step and
tokens/s per GPU measure scaling alone; the runs see different batches, so losses are not
compared, and each rank keeps the recipe's data.num_workers. Without it, a layout with fewer ranks accumulates more micro-batches per optimizer
step, which spreads the per-step cost (optimizer, clipping) over more tokens.

--resume SRC DST: the first recipe's SRC run also writes a checkpoint at step steps/2; then a
DST run in the same dump folder resumes it (model and optimizer re-sharded by DCP) and trains to
the end. With another data-parallel degree, a first DST run shows that loading the data state is
refused with a clear error (the data stream of one rank cannot be split), and the resumed run
sets checkpoint.exclude_from_loading = ["dataloader"] (new batches: losses compared as means);
with the same degree (e.g. fsdp2_tp2 -> fsdp2) the data state loads too and the losses after
the resume are compared with SRC's step by step.

    python benchmarks/multi_gpu.py --recipes gated_deltanet_374M transformer_374M --layouts 1gpu fsdp2 tp2
    python benchmarks/multi_gpu.py --recipes gated_deltanet_1.37B --layouts 1gpu fsdp2 fsdp4 fsdp2_tp2 \\
        --steps 100 --seq 4096 --batch 1 --compile --resume fsdp4 fsdp2

On a machine without GPUs the runs use CPU processes with gloo (for checking the script with
train_configs/debug.toml).
"""

import argparse
import json
import os
import pathlib
import shutil
import shlex
import statistics
import subprocess
import sys
import time

from environment import environment as bench_environment

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from flame.titan import free_port  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LAYOUTS = {  # name: (data-parallel degree, tensor-parallel degree)
    "1gpu": (1, 1), "fsdp2": (2, 1), "tp2": (1, 2), "fsdp4": (4, 1), "fsdp2_tp2": (2, 2),
    "fsdp8": (8, 1), "fsdp4_tp2": (4, 2),
}
STEP1_TOLERANCE = 2e-3  # same weights and data: only bf16 rounding of one forward differs
MEAN_TOLERANCE = 0.02  # mean relative loss difference over all steps
GRAD_NORM_TOLERANCE = 0.02  # step 1's gradient norm: bf16 rounding and reduction order only


def checkpoint_args(interval: int) -> list[str]:
    # full checkpoints every `interval` steps; the last one holds only the model (smaller)
    return ["--checkpoint.enable", "true", "--checkpoint.interval", str(interval),
            "--checkpoint.keep_latest_k", "0", "--checkpoint.last_save_model_only", "true"]


def recipe_name(recipe: str) -> str:
    name = pathlib.Path(recipe).name  # not .stem: "gated_deltanet_1.37B" has a dot of its own
    return name[:-len(".toml")] if name.endswith(".toml") else name


def gpu_topology() -> str | None:
    """`nvidia-smi topo -m`: how the GPUs are connected (NVLink or PCIe paths), which bounds the
    collectives; None without nvidia-smi."""
    try:
        return subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


class Run:
    def __init__(self, recipe: str, layout: str, args, workdir: pathlib.Path, *, name=None,
                 extra=(), steps=None, dump=None):
        dp, tp = LAYOUTS[layout]
        self.recipe, self.layout, self.gpus = recipe, layout, dp * tp
        self.name = name or f"{recipe_name(recipe)}_{layout}"
        self.dump = dump or workdir / self.name
        self.steps = steps or args.steps
        self.args = args
        micro = args.micro_batches if args.weak else args.micro_batches // dp
        recipe_path = pathlib.Path(recipe) if recipe.endswith(".toml") else ROOT / "train_configs" / f"{recipe}.toml"
        config = workdir / f"{self.name}.toml"
        # the recipes stream their data from the hub; this benchmark reads the embedded corpus
        config.write_text(f'extends = "{recipe_path.resolve()}"\n\n'
                          '[data]\ntokenizer = "default"\n\n[[data.sources]]\nkind = "default"\n')
        self.trainer_args = [
            "--config", str(config), "--job.dump_folder", str(self.dump),
            "--training.steps", str(args.steps), "--training.seq_len", str(args.seq),
            "--training.local_batch_size", str(args.batch),
            "--training.global_batch_size", str(micro * dp * args.batch),
            # equal loader shares on every layout (the same batches); --weak keeps the recipe's
            *([] if args.weak else ["--data.num_workers", str(micro)]),
            "--lr_scheduler.warmup_steps", str(max(1, args.steps // 5)),
            "--metrics.log_freq", "1",
            "--parallelism.data_parallel_shard_degree", str(dp),
            "--parallelism.tensor_parallel_degree", str(tp),
            "--compile.enable", "true" if args.compile else "false",
            "--checkpoint.enable", "false", *extra]
        self.log_path = workdir / f"{self.name}.log"
        self.proc = self.devices = self.log = None
        self.shared_with = 0

    def start(self, devices: list[int], running: int) -> None:
        self.devices, self.shared_with = devices, running
        self.log = open(self.log_path, "w")
        env = dict(os.environ, NPROC_PER_NODE=str(self.gpus), PYTHON=sys.executable,
                   MASTER_PORT=str(free_port()))
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        self.command = ["bash", str(ROOT / "launch" / "run.sh"), *self.trainer_args]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def poll(self):
        rc = self.proc.poll()
        if rc is None and time.perf_counter() - self.started > self.args.timeout:
            os.killpg(self.proc.pid, 9)
            rc = self.proc.wait()
            self.timed_out = True
        return rc

    def row(self, rc) -> dict:
        self.log.close()
        seconds = time.perf_counter() - self.started
        metrics = self.dump / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        row = {"name": self.name, "recipe": self.recipe, "layout": self.layout, "gpus": self.gpus,
               "devices": self.devices, "runs_beside": self.shared_with, "rc": rc,
               "timed_out": getattr(self, "timed_out", False), "wall_seconds": round(seconds, 1),
               "command": " ".join(self.command), "steps": [r["step"] for r in records],
               "losses": [r["loss"] for r in records],
               "grad_norms": [r.get("grad_norm") for r in records],
               # per step, so that stalls (compiles, a slow rank) show beside the median
               "tokens_per_second_by_step": [round(r["tokens_per_second"]) for r in records]}
        timed = [r for r in records if r["step"] > self.args.skip]
        if rc == 0 and timed:
            # the trainer logs tokens/s per device (a TP group's devices share one batch)
            row["tokens_per_second_per_gpu"] = statistics.median(r["tokens_per_second"] for r in timed)
            mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
            row["mfu"] = statistics.median(mfu) if mfu else None
            row["memory_gib"] = max(r.get("memory_gib") or 0 for r in timed)
            for key in ("device_wait_fraction", "data_wait_fraction"):  # what bounds the steps
                if all(key in r for r in timed):
                    row[key] = statistics.median(r[key] for r in timed)
        if rc != 0:
            row["log_tail"] = self.log_path.read_text()[-3000:]
        return row


def run_packed(runs: list[Run], total_gpus: int, on_row=None) -> list[dict]:
    """Start each run as soon as enough GPUs are free (in order, smaller later runs may fill a
    gap); on CPU (total_gpus 0) one run at a time."""
    pending, running, rows = list(runs), [], []
    free = list(range(total_gpus))
    while pending or running:
        for r in list(pending):
            if total_gpus == 0 and running:
                break
            if total_gpus and r.gpus > len(free):
                continue
            # with total_gpus 0 (CPU, or --sequential) each run sees every GPU of the machine
            devices = [free.pop(0) for _ in range(r.gpus)] if total_gpus else []
            r.start(devices, len(running))
            running.append(r)
            pending.remove(r)
        time.sleep(1)
        for r in list(running):
            rc = r.poll()
            if rc is None:
                continue
            running.remove(r)
            free = sorted(free + (r.devices or []))
            row = r.row(rc)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            print(f"{r.name:36s} rc {rc}  {row.get('tokens_per_second_per_gpu', float('nan')):10.0f} tok/s/GPU"
                  f"  mfu {row.get('mfu') or float('nan'):.3f}  last loss "
                  f"{row['losses'][-1] if row['losses'] else float('nan'):.4f}  ({row['wall_seconds']} s)",
                  flush=True)
    return rows


def loss_match(run: dict, base: dict) -> dict:
    by_step = dict(zip(base["steps"], base["losses"]))
    pairs = [(loss, by_step[s]) for s, loss in zip(run["steps"], run["losses"]) if s in by_step]
    if not pairs or len(run["losses"]) != len(base["losses"]):
        return {"error": "a run failed or logged a different number of steps"}
    diffs = [abs(a - b) / abs(b) for a, b in pairs]
    tail = min(10, len(pairs))
    tail_diff = abs(statistics.mean(a for a, _ in pairs[-tail:]) / statistics.mean(b for _, b in pairs[-tail:]) - 1)
    result = {"step1_rel_diff": diffs[0], "mean_rel_diff": statistics.mean(diffs), "max_rel_diff": max(diffs),
              "last10_mean_rel_diff": tail_diff,
              "matches": diffs[0] <= STEP1_TOLERANCE and statistics.mean(diffs) <= MEAN_TOLERANCE}
    # step 1's gradient norm (same weights and batch): it decides the clipping, and a layout that
    # reduces it wrongly can still match the losses (AdamW barely sees a gradient's scale)
    norms = [run.get("grad_norms") or [None], base.get("grad_norms") or [None]]
    if norms[0][0] is not None and norms[1][0] is not None:
        result["step1_grad_norm_rel_diff"] = abs(norms[0][0] - norms[1][0]) / abs(norms[1][0])
        result["matches"] = result["matches"] and result["step1_grad_norm_rel_diff"] <= GRAD_NORM_TOLERANCE
    return result


def summarise(rows: list[dict], weak: bool = False) -> list[dict]:
    summary = []
    for recipe in sorted({r["recipe"] for r in rows}):
        by = {r["layout"]: r for r in rows if r["recipe"] == recipe and r["name"] == f"{recipe_name(recipe)}_{r['layout']}"}
        order = sorted(by, key=lambda k: (by[k]["gpus"], k))
        entry = {"recipe": recipe, "layouts": {}}
        base_tps = by.get("1gpu", {}).get("tokens_per_second_per_gpu")
        for i, layout in enumerate(order):
            r = by[layout]
            e = {k: r.get(k) for k in ("gpus", "tokens_per_second_per_gpu", "mfu", "memory_gib",
                                       "device_wait_fraction", "data_wait_fraction")}
            if base_tps and r.get("tokens_per_second_per_gpu"):
                e["per_gpu_vs_1gpu"] = r["tokens_per_second_per_gpu"] / base_tps
            # losses against the one-GPU run, and against the next smaller layout
            if weak:  # different global batches: no loss comparison
                entry["layouts"][layout] = e
                continue
            if layout != "1gpu" and "1gpu" in by:
                e["loss_vs_1gpu"] = loss_match(r, by["1gpu"])
            smaller = [k for k in order[:i] if by[k]["gpus"] < r["gpus"]]
            if smaller and smaller[-1] != "1gpu":
                e[f"loss_vs_{smaller[-1]}"] = loss_match(r, by[smaller[-1]])
            entry["layouts"][layout] = e
        summary.append(entry)
    return summary


def resume_check(recipe, src: str, dst: str, args, workdir, src_row: dict) -> tuple[list[dict], dict]:
    """The SRC run (already finished, checkpoint at steps/2) resumed on the DST layout. With
    another data-parallel degree the data state cannot follow: loading it is refused, and the
    run resumes without it (new batches, losses compared as means). With the same degree the
    whole state loads and the run reads SRC's batches: losses compared step by step."""
    dump = workdir / f"{recipe_name(recipe)}_{src}"
    half = args.steps // 2
    # the resumed run continues in SRC's folder: SRC's last checkpoint and metrics move aside
    shutil.rmtree(dump / "checkpoint" / f"step-{args.steps}", ignore_errors=True)
    (dump / "metrics.jsonl").rename(dump / "metrics_before_resume.jsonl")
    common = [*checkpoint_args(half), "--checkpoint.load_step", str(half)]
    same_dp = LAYOUTS[src][0] == LAYOUTS[dst][0]
    resumed = Run(recipe, dst, args, workdir, name=f"{recipe_name(recipe)}_{src}_resumed_on_{dst}", dump=dump,
                  extra=common if same_dp else [*common, "--checkpoint.exclude_from_loading", "dataloader"])
    result = {"recipe": recipe, "saved_on": src, "resumed_on": dst, "checkpoint_step": half,
              "data_state": "loaded (same data-parallel degree)" if same_dp else "restarted"}
    rows = []
    if not same_dp:
        refused = Run(recipe, dst, args, workdir, name=f"{recipe_name(recipe)}_{src}_to_{dst}_refused",
                      dump=dump, extra=common)
        rows += run_packed([refused], gpu_count())
        ref = rows[-1]
        result.update({
            "refused_without_exclude": ref["rc"] != 0 and "data-parallel" in ref.get("log_tail", ""),
            "refusal_message": next((line for line in ref.get("log_tail", "").splitlines()
                                     if "cannot resume" in line), None)})
    rows += run_packed([resumed], gpu_count())
    res = rows[-1]
    after = [(s, loss) for s, loss in zip(res["steps"], res["losses"]) if s > half]
    if res["rc"] == 0 and after and after[0][0] == half + 1:
        src_by_step = dict(zip(src_row["steps"], src_row["losses"]))
        before = [src_by_step[s] for s in range(half - 4, half + 1) if s in src_by_step]
        src_after = [src_by_step[s] for s, _ in after if s in src_by_step]
        result.update({
            "first_step_after_resume": after[0][0],
            "src_loss_last5_before_checkpoint": statistics.mean(before),
            "resumed_loss_first5": statistics.mean(loss for _, loss in after[:5]),
            "resumed_loss_mean": statistics.mean(loss for _, loss in after),
            "src_loss_mean_same_steps": statistics.mean(src_after) if src_after else None})
        if same_dp:
            diffs = [abs(loss / src_by_step[s] - 1) for s, loss in after if s in src_by_step]
            result.update({"step_rel_diff_first": diffs[0], "step_rel_diff_mean": statistics.mean(diffs),
                           "continues_with_expected_loss": diffs[0] <= STEP1_TOLERANCE
                           and statistics.mean(diffs) <= MEAN_TOLERANCE})
        else:
            result["note"] = ("the resumed run restarts the data stream (different batches than SRC after "
                              "the checkpoint), so its losses are compared as means, not step by step")
            result["continues_with_expected_loss"] = (
                result["src_loss_mean_same_steps"] is not None
                and abs(result["resumed_loss_mean"] / result["src_loss_mean_same_steps"] - 1) <= 0.05)
    else:
        result["error"] = "the resumed run failed or did not start at the step after the checkpoint"
    return rows, result


def earlier_rows(paths: list[str], args) -> list[dict]:
    """Rows of earlier result files, refused unless their settings equal this call's (the
    losses and tokens/s would not be comparable otherwise)."""
    rows = []
    for path in paths:
        data = json.loads(pathlib.Path(path).read_text())
        settings = data.get("settings")
        if settings is None:
            raise SystemExit(f"--with-rows {path}: no settings (a partial file of an unfinished call?)")
        ours = {"steps": args.steps, "seq_len": args.seq, "micro_batch": args.batch,
                "weak_scaling": args.weak, "micro_batches_per_step": args.micro_batches}
        differ = {k: (settings.get(k), v) for k, v in ours.items() if settings.get(k) != v}
        if differ:
            raise SystemExit(f"--with-rows {path}: settings differ from this call's (theirs, ours): {differ}")
        rows += [dict(r, **{"from": path}) for r in data["runs"]]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["gated_deltanet_374M", "transformer_374M"],
                   help="names in train_configs/ or paths to .toml files")
    p.add_argument("--layouts", nargs="+", default=["1gpu", "fsdp2", "tp2"], choices=list(LAYOUTS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the timing")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches per step in all (default: the largest data-parallel degree); "
                        "with --weak, per rank (default 1)")
    p.add_argument("--weak", action="store_true",
                   help="the same micro-batches per rank on every layout (scaling only, no loss match)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--resume", nargs=2, metavar=("SRC", "DST"), default=None,
                   help="resume SRC's mid-run checkpoint on the DST layout (first recipe only)")
    p.add_argument("--sequential", action="store_true",
                   help="one run at a time (timings free of other runs' compile and loader load)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--with-rows", nargs="+", default=[], metavar="JSON",
                   help="runs of earlier calls of this script (same steps, shapes and micro-batches) "
                        "to summarise beside this call's, e.g. the 1-GPU runs of a separate machine call")
    p.add_argument("--trainer-args", default="",
                   help="more train.py overrides for every run, one string, e.g. "
                        "'--parallelism.fsdp_blocks_per_unit 2' (recorded in each run's command)")
    p.add_argument("--workdir", default="/tmp/flame_multi_gpu")
    p.add_argument("--out", default=str(RESULTS / "multi_gpu.json"))
    args = p.parse_args()
    dps = [LAYOUTS[name][0] for name in args.layouts]
    if args.weak and args.resume:
        p.error("--resume compares losses with the source run: leave out --weak")
    args.micro_batches = args.micro_batches or (1 if args.weak else max(dps))
    for name, dp in zip(args.layouts, dps):
        if not args.weak and args.micro_batches % dp:
            p.error(f"--micro-batches {args.micro_batches} is not a multiple of {name}'s data-parallel degree {dp}")
    total = gpu_count()
    if total and max(LAYOUTS[n][0] * LAYOUTS[n][1] for n in args.layouts) > total:
        p.error(f"a layout needs more than the {total} GPUs of this machine")

    earlier = earlier_rows(args.with_rows, args)
    workdir = pathlib.Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    runs = []
    for recipe in args.recipes:
        for layout in args.layouts:
            extra = shlex.split(args.trainer_args)
            if args.resume and layout == args.resume[0] and recipe == args.recipes[0]:
                extra += checkpoint_args(args.steps // 2)
            runs.append(Run(recipe, layout, args, workdir, extra=extra))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = []

    def save_partial(row):
        # each finished run is kept at once, so a machine time limit loses only the runs in flight
        done.append(row)
        out.write_text(json.dumps({"benchmark": "multi_gpu", "partial": True, "runs": done}, indent=1))

    rows = run_packed(runs, 0 if args.sequential else total, on_row=save_partial)
    resumes = []
    if args.resume:
        src_name = f"{recipe_name(args.recipes[0])}_{args.resume[0]}"
        src_row = next(r for r in rows if r["name"] == src_name)
        resume_rows, result = resume_check(args.recipes[0], *args.resume, args, workdir, src_row)
        rows += resume_rows
        resumes.append(result)
    summary = summarise(earlier + rows, args.weak)
    for s in summary + resumes:
        print(json.dumps(s))
    result = {"benchmark": "multi_gpu", "environment": {**bench_environment(), "gpus": total,
                                                        "gpu_topology": gpu_topology()},
              "settings": {"steps": args.steps, "timed_after_step": args.skip, "seq_len": args.seq,
                           "micro_batch": args.batch, "weak_scaling": args.weak,
                           "micro_batches_per_step": args.micro_batches,
                           "micro_batches_per_step_counts": "per rank" if args.weak else "over all ranks",
                           "tokens_per_step": None if args.weak else args.micro_batches * args.batch * args.seq,
                           "compile": args.compile, "trainer_args": args.trainer_args, "sequential": args.sequential, "data": "embedded default corpus, default tokenizer",
                           "loss_match": f"step-1 relative difference <= {STEP1_TOLERANCE} (same weights "
                                         f"and data), mean relative difference over all steps <= "
                                         f"{MEAN_TOLERANCE} (bf16 runs drift apart slowly) and step-1 "
                                         f"gradient norm within {GRAD_NORM_TOLERANCE}"},
              "summary": summary, "resume": resumes, "runs": rows,
              "earlier_runs_summarised": {path: [r["name"] for r in earlier if r["from"] == path]
                                          for path in args.with_rows}}
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
