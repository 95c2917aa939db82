"""The real trainer (flame.train.main, as train.py runs it) on CPU with gloo: a few steps with
tensor parallelism (TP=2), with FSDP over 2 ranks and with both (FSDP=2 x TP=2, 4 ranks) give
the losses and gradient norms of one process, and a checkpoint saved at TP=2 resumes at TP=1
and vice versa, one saved at FSDP=2 x TP=2 on FSDP=2. The FSDP=2 run is started by
launch/slurm.sbatch (with srun and scontrol standing in for SLURM), so the sbatch script's
c10d rendezvous and launch/run.sh's torchrun line are exercised too.

All runs read the same global batches: one process reads them as 2 micro-batches from its 2
loader workers, the 2 FSDP ranks each read one from their one worker (the loader splits the
documents into the same 2 shares either way), and a TP group shares one batch."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch.multiprocessing as mp

from flame.titan import free_port
from tests.gloo_ranks import leave_passed
from tests.test_validation import held_out_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4

CONFIG = f"""
extends = "{ROOT}/train_configs/debug.toml"

[model]
mixer = "gated_deltanet"
attn_layers = [1]
n_layers = 2
dim = 64
n_heads = 4
head_dim = 16
attn_n_heads = 4
n_kv_heads = 2
mlp_hidden_dim = 128

[data]
num_workers = 2

[training]
steps = {STEPS}
local_batch_size = 2
global_batch_size = 4
seq_len = 32

[lr_scheduler]
warmup_steps = 2

[checkpoint]
enable = true
interval = 2
keep_latest_k = 0

[metrics]
log_freq = 1
"""


def _metrics(dump: str) -> dict[int, tuple[float, float]]:
    """(loss, gradient norm before clipping) of every step of a run."""
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, f)}


def _validation_losses(dump: str) -> dict[int, float]:
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        return {r["step"]: r["validation_loss"] for r in map(json.loads, f) if "validation_loss" in r}


def _train_runs(rank, world, ports, runs):
    """Run flame.train.main once per entry of `runs`, one after the other, as rank `rank`."""
    from flame.train import main

    for port, argv in zip(ports, runs):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FLAME_BACKEND="torch")
        assert main(argv) == 0, f"rank {rank}: train.py {' '.join(argv)} failed"
    leave_passed()  # main tore its process group down; skip the interpreter's shutdown


def train(world: int, *runs: list[str]) -> None:
    mp.spawn(_train_runs, args=(world, [free_port() for _ in runs], list(runs)), nprocs=world, join=True)


def resume_from(source_dump: str, step: int, dump: str) -> None:
    """A new run folder holding only `source_dump`'s checkpoint of `step`."""
    shutil.copytree(os.path.join(source_dump, "checkpoint", f"step-{step}"),
                    os.path.join(dump, "checkpoint", f"step-{step}"))


def _stub(folder, name, body):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def slurm_job(tmp_path, args: list[str]) -> subprocess.CompletedProcess:
    """launch/slurm.sbatch on this machine as a one-node job with 2 processes: scontrol names
    this host, srun runs its command once, as node 0."""
    bin_dir = tmp_path / "slurm_bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", 'echo localhost\n')
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable,
               SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_JOB_ID="4242",
               SLURM_SUBMIT_DIR=ROOT, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()),
               FLAME_BACKEND="torch", OMP_NUM_THREADS="1")
    return subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), *args], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


def assert_same_steps(got: dict, want: dict, what: str) -> None:
    """Losses within 1e-4 and gradient norms (which decide the clipping) within 5e-4 of the
    one-process run's: only the order of float32 sums differs."""
    assert sorted(got) == sorted(want), f"{what}: steps {sorted(got)} != {sorted(want)}"
    for step in got:
        (loss, norm), (want_loss, want_norm) = got[step], want[step]
        assert abs(loss - want_loss) <= 1e-4 * abs(want_loss), (
            f"{what}: step {step} loss {loss} != {want_loss} (one process)")
        assert abs(norm - want_norm) <= 5e-4 * abs(want_norm), (
            f"{what}: step {step} gradient norm {norm} != {want_norm} (one process)")


def test_tp2_fsdp2_and_both_match_one_process_and_checkpoints_reshard(tmp_path):
    config = tmp_path / "tp_test.toml"
    config.write_text(CONFIG)
    base = ["--config", str(config)]
    d = {name: str(tmp_path / name) for name in ("one", "tp2", "tp2_from_one", "one_from_tp2", "fsdp2",
                                                 "fsdp2_tp2", "fsdp2_from_fsdp2_tp2")}

    # one process, checkpoints at steps 2 and 4; a held-out loss at both (a TP group reads the
    # batches of one process: the same values)
    source = held_out_file(tmp_path)
    val = ["--validation.enable", "true", "--validation.freq", "2", "--validation.steps", "2",
           "--validation.local_batch_size", "2", "--validation.seq_len", "32",
           "--validation.sources", f'[{{kind = "files", path = "{source}"}}]']
    train(1, base + val + ["--job.dump_folder", d["one"]])
    one = _metrics(d["one"])
    assert sorted(one) == list(range(1, STEPS + 1))
    one_val = _validation_losses(d["one"])
    assert sorted(one_val) == [2, 4]

    # TP=2 from scratch; then TP=2 resumed from the one-process checkpoint of step 2
    resume_from(d["one"], 2, d["tp2_from_one"])
    tp = ["--parallelism.tensor_parallel_degree", "2"]
    train(2, base + val + tp + ["--job.dump_folder", d["tp2"]],
          base + val + tp + ["--job.dump_folder", d["tp2_from_one"]])
    assert_same_steps(_metrics(d["tp2"]), one, "TP=2")
    assert_same_steps(_metrics(d["tp2_from_one"]), {s: one[s] for s in (3, 4)}, "TP=2 resumed from TP=1")
    for dump, steps in ((d["tp2"], [2, 4]), (d["tp2_from_one"], [4])):
        got = _validation_losses(dump)
        assert sorted(got) == steps, dump
        for step in steps:
            assert got[step] == pytest.approx(one_val[step], rel=1e-5), (dump, step)

    # one process resumed from the TP=2 checkpoint of step 2
    resume_from(d["tp2"], 2, d["one_from_tp2"])
    train(1, base + ["--job.dump_folder", d["one_from_tp2"]])
    assert_same_steps(_metrics(d["one_from_tp2"]), {s: one[s] for s in (3, 4)}, "TP=1 resumed from TP=2")

    # FSDP over 2 ranks (one loader worker each: the same documents), started by the SLURM script;
    # two micro-batches of one sequence per rank, with the gathered blocks kept from one
    # micro-batch to the next
    job = slurm_job(tmp_path, base + ["--job.dump_folder", d["fsdp2"], "--data.num_workers", "1",
                                      "--checkpoint.enable", "false", "--training.local_batch_size", "1",
                                      "--parallelism.fsdp_reshard_after_forward", "never"])
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert_same_steps(_metrics(d["fsdp2"]), one, "FSDP=2 (launched by slurm.sbatch)")
    record = os.path.join(d["fsdp2"], "launch", "4242")
    with open(os.path.join(record, "code_version.txt")) as f:
        version = f.read()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert f"commit {commit}" in version and "nodes localhost" in version
    with open(os.path.join(record, "config.toml")) as f:
        saved = f.read()
    assert "[parallelism]" in saved and f'dump_folder = "{d["fsdp2"]}"' in saved

    # FSDP over 2 ranks x TP over 2 (4 processes, the layout of a multi-GPU node): the gradient
    # norm sums the squares over both dimensions of the 2-D shards. Its checkpoint of step 2
    # resumes on FSDP=2 alone (the data-parallel degree, which the data state needs, stays 2).
    one_rank_per_share = base + ["--data.num_workers", "1", "--training.local_batch_size", "1"]
    train(4, one_rank_per_share + tp + ["--job.dump_folder", d["fsdp2_tp2"]])
    assert_same_steps(_metrics(d["fsdp2_tp2"]), one, "FSDP=2 x TP=2")
    resume_from(d["fsdp2_tp2"], 2, d["fsdp2_from_fsdp2_tp2"])
    train(2, one_rank_per_share + ["--job.dump_folder", d["fsdp2_from_fsdp2_tp2"]])
    assert_same_steps(_metrics(d["fsdp2_from_fsdp2_tp2"]), {s: one[s] for s in (3, 4)},
                      "FSDP=2 resumed from FSDP=2 x TP=2")


def test_launch_scripts_parse():
    scripts = [os.path.join(ROOT, "launch", n) for n in ("run.sh", "slurm.sbatch")]
    for s in scripts:
        r = subprocess.run(["bash", "-n", s], capture_output=True, text=True)
        assert r.returncode == 0, f"{s}: {r.stderr}"


def test_run_sh_builds_the_torchrun_line():
    env = dict(os.environ, DRY_RUN="1", NNODES="4", NODE_RANK="2", NPROC_PER_NODE="8",
               MASTER_ADDR="node0", MASTER_PORT="1234")
    line = subprocess.run(["bash", os.path.join(ROOT, "launch", "run.sh"), "--config", "x.toml"], env=env,
                          capture_output=True, text=True, check=True).stdout
    for part in ("--nnodes 4", "--nproc_per_node 8", "--node_rank 2", "--master_addr node0",
                 "--master_port 1234", "train.py --config x.toml"):
        assert part in line, line
    env.update(RDZV_BACKEND="c10d", RDZV_ID="77")
    line = subprocess.run(["bash", os.path.join(ROOT, "launch", "run.sh"), "--config", "x.toml"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert "--rdzv_backend c10d --rdzv_endpoint node0:1234 --rdzv_id 77" in line, line
    env.update(RDZV_BACKEND="etcd")
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "run.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "RDZV_BACKEND=etcd" in r.stderr


def test_config_refuses_a_tensor_parallel_degree_the_model_cannot_take():
    import flame.config

    debug = os.path.join(ROOT, "train_configs", "debug.toml")
    with pytest.raises(ValueError, match=r"tensor_parallel_degree = 3 does not divide model.attn_n_heads"):
        flame.config.load_config(debug, ["--parallelism.tensor_parallel_degree", "3"])
    with pytest.raises(ValueError, match=r"tensor_parallel_degree = 0: must be >= 1"):
        flame.config.load_config(debug, ["--parallelism.tensor_parallel_degree", "0"])
    cfg = flame.config.load_config(debug, ["--parallelism.tensor_parallel_degree", "2"])
    assert cfg.parallelism.tensor_parallel_degree == 2
