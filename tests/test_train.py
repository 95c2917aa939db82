"""End-to-end training runs on CPU (gloo), each in its own process as a user would launch them:
exact resume, incomplete checkpoints, bad input, the debug config's loss, FSDP2 over 2
processes and gradient accumulation against a single process."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from flame.titan import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "train_configs", "debug.toml")


def tiny_config(tmp_path, name="tiny.toml", **sections) -> str:
    """A 2-layer, dim-64 Transformer++ on the default corpus, extending the debug config."""
    base = {
        "job": {"dump_folder": str(tmp_path / "run")},
        "model": {"dim": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "mlp_multiple_of": 16},
        "data": {"num_workers": 0},
        "training": {"steps": 20, "local_batch_size": 4, "seq_len": 64},
        "lr_scheduler": {"warmup_steps": 2, "total_steps": 20},
        "checkpoint": {"enable": True, "interval": 5, "keep_latest_k": 0},
        "metrics": {"log_freq": 1},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    from flame.config import dump_toml

    path = tmp_path / name
    path.write_text(f'extends = "{DEBUG}"\n' + dump_toml(base))
    return str(path)


def run(args, nproc=1, script="train.py", check=True, cpu=False):
    """Run the trainer as `python train.py ...` or `torchrun --nproc_per_node=N train.py ...`;
    cpu=True hides any GPU (the comparisons across process counts hold in float32 on CPU)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1" if nproc > 1 else "2")
    env.pop("RANK", None)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", script, *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\nstdout:\n{out.stdout[-2000:]}\n"
                             f"stderr:\n{out.stderr[-4000:]}")
    return out


def metrics(dump_folder) -> dict[int, dict]:
    """The last logged values of every step in <dump_folder>/metrics.jsonl."""
    rows = {}
    with open(os.path.join(dump_folder, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row
    return rows


def tree_digest(folder) -> dict[str, str]:
    digest = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digest


# ------------------------------------------------------------------------------------------


def test_resume_is_exact_and_skips_incomplete_checkpoints(tmp_path):
    straight = tmp_path / "straight"
    cfg = tiny_config(tmp_path)
    run(["--config", cfg, "--job.dump_folder", str(straight), "--checkpoint.async_mode", "async"])
    for step in (5, 10, 15, 20):  # async saves completed too
        assert (straight / "checkpoint" / f"step-{step}" / ".metadata").is_file()

    resumed = tmp_path / "resumed"
    run(["--config", cfg, "--job.dump_folder", str(resumed), "--training.steps", "10"])
    ckpt = resumed / "checkpoint"
    assert sorted(os.listdir(ckpt)) == ["step-10", "step-5"]
    assert (ckpt / "step-10" / ".metadata").is_file()
    assert (ckpt / "step-10" / "config.toml").is_file()
    # A save of step 15 that died mid-write: shards present, DCP's .metadata not yet renamed
    # into place. It must not be taken for the latest checkpoint.
    shutil.copytree(ckpt / "step-10", ckpt / "step-15")
    os.remove(ckpt / "step-15" / ".metadata")

    out = run(["--config", cfg, "--job.dump_folder", str(resumed)])
    assert "step-10" in out.stdout + out.stderr
    assert "resuming step" not in out.stdout + out.stderr  # same settings: nothing to report

    a, b = metrics(straight), metrics(resumed)
    assert sorted(a) == list(range(1, 21))
    for step in range(11, 21):
        assert b[step]["loss"] == a[step]["loss"], step  # bitwise on CPU
        assert b[step]["grad_norm"] == a[step]["grad_norm"], step
        assert b[step]["lr"] == a[step]["lr"], step
        assert b[step]["tokens_seen"] == a[step]["tokens_seen"], step
    assert a[20]["loss"] < a[1]["loss"] - 0.5
    assert (ckpt / "step-20" / ".metadata").is_file()


def test_resume_takes_settings_from_the_config(tmp_path):
    """A resumed run keeps the checkpoint's moments and step but this run's optimizer settings and
    schedule: a lower optimizer.lr or another schedule length applies from the first resumed step
    (a checkpoint would otherwise restore the old ones), and each difference is reported, as is a
    changed model setting that the weights load under."""
    cfg = tiny_config(tmp_path, training={"steps": 10})
    resumed = tmp_path / "resumed"
    run(["--config", cfg, "--job.dump_folder", str(resumed)])
    changed = ["--training.steps", "14", "--optimizer.lr", "3e-4", "--optimizer.weight_decay", "0.05",
               "--lr_scheduler.total_steps", "40", "--model.norm_eps", "1e-5"]
    out = run(["--config", cfg, "--job.dump_folder", str(resumed), *changed])

    # The same settings from the start: the schedule (not the weights) sets each step's lr.
    fresh = tmp_path / "fresh"
    run(["--config", cfg, "--job.dump_folder", str(fresh), *changed, "--checkpoint.enable", "false"])
    a, b = metrics(fresh), metrics(resumed)
    for step in range(11, 15):
        assert b[step]["lr"] == a[step]["lr"], (step, b[step]["lr"], a[step]["lr"])
    log = out.stdout + out.stderr
    assert "resuming step 10: optimizer.lr: 0.0003 in this run's config" in log, log[-3000:]
    assert "resuming step 10: optimizer.weight_decay: 0.05 in this run's config" in log
    assert "resuming step 10: learning rate of step 11" in log
    # a model setting that leaves the weights' shapes alone loads, and is reported
    assert "resuming step 10: model.norm_eps: 1e-05 in this run's config, 1e-06 in the checkpoint's" in log


def test_sigterm_saves_the_step_and_the_run_resumes_exactly(tmp_path):
    """SIGTERM (a scheduler's preemption) between checkpoint intervals: the run finishes its step,
    writes a full checkpoint of it, exits with 128 + 15, and the relaunched run continues as if
    never stopped."""
    cfg = tiny_config(tmp_path, training={"steps": 60}, checkpoint={"interval": 1000})
    straight = tmp_path / "straight"
    run(["--config", cfg, "--job.dump_folder", str(straight), "--checkpoint.enable", "false"])

    stopped = tmp_path / "stopped"
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "train.py", "--config", cfg, "--job.dump_folder", str(stopped)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_file = stopped / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (log_file.is_file() and len(log_file.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was signalled"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    saved = [int(name.split("-")[1]) for name in os.listdir(stopped / "checkpoint")]
    assert len(saved) == 1 and 3 <= saved[0] < 60, saved
    assert (stopped / "checkpoint" / f"step-{saved[0]}" / ".metadata").is_file()
    assert f"SIGTERM: stopped after step {saved[0]} with its checkpoint saved" in output

    run(["--config", cfg, "--job.dump_folder", str(stopped)])
    a, b = metrics(straight), metrics(stopped)
    for step in range(saved[0] + 1, 61):
        assert b[step]["loss"] == a[step]["loss"], step  # bitwise on CPU
        assert b[step]["lr"] == a[step]["lr"], step


def _worker_pids(root_pid: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the trainer processes below a torchrun process (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (ValueError, OSError, IndexError):
            continue
    ranks, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"LOCAL_RANK" in env and b"TORCHELASTIC_RUN_ID" in env and pid != root_pid:
            ranks.setdefault(int(env[b"LOCAL_RANK"]), pid)
    return ranks


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Only rank 1 is signalled: both ranks agree on the stop (a CPU all-reduce per step), write
    one checkpoint of the same step together, and two processes resume it as if never stopped."""
    cfg = tiny_config(tmp_path, training={"steps": 60, "local_batch_size": 2}, checkpoint={"interval": 1000})
    straight = tmp_path / "straight"
    run(["--config", cfg, "--job.dump_folder", str(straight), "--checkpoint.enable", "false"], nproc=2, cpu=True)

    stopped = tmp_path / "stopped"
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", "train.py", "--config", cfg,
                             "--job.dump_folder", str(stopped)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_file = stopped / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (log_file.is_file() and len(log_file.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was signalled"
        time.sleep(0.05)
    os.kill(_worker_pids(proc.pid)[1], signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    saved = [int(name.split("-")[1]) for name in os.listdir(stopped / "checkpoint")]
    assert len(saved) == 1 and saved[0] < 60, (saved, output[-3000:])
    assert (stopped / "checkpoint" / f"step-{saved[0]}" / ".metadata").is_file()
    assert f"SIGTERM: stopped after step {saved[0]} with its checkpoint saved" in output  # logged by rank 0

    run(["--config", cfg, "--job.dump_folder", str(stopped)], nproc=2, cpu=True)
    a, b = metrics(straight), metrics(stopped)
    for step in range(saved[0] + 1, 61):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6), step


def test_bad_input_exits_with_one_message_and_leaves_checkpoints_alone(tmp_path):
    cfg = tiny_config(tmp_path, training={"steps": 2}, checkpoint={"interval": 2})
    dump = tmp_path / "run"
    run(["--config", cfg])
    before = tree_digest(dump)
    assert "checkpoint/step-2/.metadata" in before

    # (errors in the file itself are covered in-process by test_config.py)
    (tmp_path / "typo.toml").write_text(f'extends = "{cfg}"\n[training]\nstepz = 4\n')
    cases = [
        (["--config", str(tmp_path / "typo.toml")], "did you mean 'steps'"),
        (["--config", cfg, "--training.steps", "4", "--model.vocab_size", "1000"],
         "model.vocab_size = 1000 is smaller than the tokenizer's 4096"),
        (["--config", cfg, "--training.steps", "4", "--training.global_batch_size", "6"],
         "training.global_batch_size = 6 is not divisible"),
        (["--config", cfg, "--training.steps", "1"], "its step 2 is past training.steps = 1"),
        (["--config", cfg, "--training.steps", "4", "--model.dim", "32"],
         "It was saved with model.dim = 64 (this run: 32): resume with those settings"),
    ]
    for args, needle in cases:
        out = run(args, check=False)
        assert out.returncode != 0, args
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], out.stderr[-2000:]
        assert "Traceback" not in out.stderr
        assert tree_digest(dump) == before, args


def test_debug_config_loss_falls(tmp_path):
    # The debug model, data and optimizer; a shorter run with smaller batches to stay quick.
    dump = tmp_path / "debug"
    run(["--config", DEBUG, "--job.dump_folder", str(dump), "--training.steps", "12",
         "--training.local_batch_size", "4", "--lr_scheduler.total_steps", "100",
         "--metrics.log_freq", "1", "--checkpoint.enable", "false"])
    m = metrics(dump)
    first = m[1]["loss"]
    last = sum(m[s]["loss"] for s in range(10, 13)) / 3
    assert first > 7.5  # ~ln(4096) at initialisation
    assert last < first - 0.8, (first, last)
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_second", "mfu"):
        assert key in m[12]
    assert m[12]["mfu"] is None  # no peak FLOP/s on a CPU
    assert all(0 <= m[s]["data_wait_fraction"] <= 1 and m[s]["device_wait_fraction"] == 0
               for s in m)  # a CPU step is done when it is queued: no device wait
    assert sum(m[s]["tokens_per_second"] for s in m) > 0
    # packed documents: the longest is cut at the row length
    seq_len = int(re.search(r"^seq_len = (\d+)", open(DEBUG).read(), re.M).group(1))
    assert all(0 < m[s]["longest_document_tokens"] <= seq_len for s in m)
    assert os.path.isfile(dump / "config.toml")


# ------------------------------------------------------------------------------------------
# Two processes


SYNTHETIC_LAUNCHER = textwrap.dedent('''
    """train.py with a synthetic, rank-exact data source: the global batch of every step is the
    same rows whatever the number of processes and micro-batches, so runs can be compared."""
    import sys

    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    import flame.data

    VOCAB, ROWS = 256, 2048


    class VocabOnly:
        def __len__(self):
            return VOCAB


    def build_dataloader(cfg, tok, *, seq_len, local_batch_size, dp_rank, dp_world_size, seed):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (ROWS, 1), generator=g)
        stride = torch.randint(1, 5, (ROWS, 1), generator=g)
        rows = (start + stride * torch.arange(seq_len + 1)) % VOCAB  # learnable progressions
        per_step = local_batch_size * dp_world_size
        index = [s * per_step + dp_rank * local_batch_size + j
                 for s in range(ROWS // per_step) for j in range(local_batch_size)]

        def collate(items):
            x = torch.stack(items)
            B, T = x.shape[0], seq_len
            return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
                    "position_ids": torch.arange(T).repeat(B, 1),
                    "cu_seqlens": torch.arange(0, B * T + 1, T, dtype=torch.int32)}

        return StatefulDataLoader(torch.utils.data.Subset(rows, index),
                                  batch_size=local_batch_size, collate_fn=collate)


    flame.data.build_dataloader = build_dataloader
    flame.data.build_tokenizer = lambda cfg: VocabOnly()

    if len(sys.argv) > 2 and sys.argv[1] == "--nan-at-forward":
        # Poison the loss of one forward pass to exercise the skip of non-finite steps.
        nan_at = {int(n) for n in sys.argv[2].split(",")}
        del sys.argv[1:3]
        import flame.models

        build_model = flame.models.build_model

        def build_poisoned(cfg):
            model = build_model(cfg)
            forward, calls = model.forward, [0]

            def poisoned(*args, **kwargs):
                calls[0] += 1
                loss = forward(*args, **kwargs)
                return loss * float("nan") if calls[0] in nan_at else loss

            model.forward = poisoned
            return model

        flame.models.build_model = build_poisoned

    from flame.train import main

    sys.exit(main(sys.argv[1:]))
''')


def test_fsdp_two_processes_and_accumulation_match_one_process(tmp_path):
    launcher = tmp_path / "synthetic_train.py"
    launcher.write_text(SYNTHETIC_LAUNCHER)
    cfg = tiny_config(tmp_path, model={"vocab_size": 256}, training={"steps": 8},
                      lr_scheduler={"total_steps": 8}, checkpoint={"enable": False})
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    run(["--config", cfg, "--job.dump_folder", str(one)], script=str(launcher), cpu=True)
    run(["--config", cfg, "--job.dump_folder", str(two), "--training.local_batch_size", "2"],
        nproc=2, script=str(launcher), cpu=True)
    run(["--config", cfg, "--job.dump_folder", str(accum), "--training.local_batch_size", "2",
         "--training.global_batch_size", "4"], script=str(launcher), cpu=True)
    # Three blocks in FSDP units of two (the last unit holds one), kept gathered from forward to
    # backward: the same training.
    grouped = tmp_path / "grouped"
    out = run(["--config", cfg, "--job.dump_folder", str(grouped), "--training.local_batch_size", "2",
               "--model.n_layers", "3", "--parallelism.fsdp_blocks_per_unit", "2",
               "--parallelism.fsdp_reshard_after_forward", "never"],
              nproc=2, script=str(launcher), cpu=True)
    assert "FSDP2: 2 units of up to 2 block(s) over 3 blocks, plus the root; gathered blocks kept" in out.stdout + out.stderr
    three = tmp_path / "three"
    run(["--config", cfg, "--job.dump_folder", str(three), "--model.n_layers", "3"], script=str(launcher), cpu=True)
    a, b, c = metrics(one), metrics(two), metrics(accum)
    d, e = metrics(three), metrics(grouped)
    assert sorted(a) == sorted(b) == sorted(c) == sorted(d) == sorted(e) == list(range(1, 9))
    for step in d:
        assert e[step]["loss"] == pytest.approx(d[step]["loss"], rel=1e-5), step
        assert e[step]["grad_norm"] == pytest.approx(d[step]["grad_norm"], rel=1e-4), step
    for step in a:
        for other in (b, c):
            assert other[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
            assert other[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
    assert a[8]["loss"] < a[1]["loss"] - 0.3  # it learns, so the comparison means something


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_non_finite_step_is_skipped_counted_and_logged(tmp_path, implementation):
    # fused: the optimizer skips the update on the device; foreach: the host decides.
    launcher = tmp_path / "synthetic_train.py"
    launcher.write_text(SYNTHETIC_LAUNCHER)
    cfg = tiny_config(tmp_path, model={"vocab_size": 256}, training={"steps": 6},
                      lr_scheduler={"total_steps": 6}, checkpoint={"enable": False},
                      optimizer={"implementation": implementation})
    out = run(["--nan-at-forward", "3", "--config", cfg], script=str(launcher))
    m = metrics(tmp_path / "run")
    assert [m[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert m[3]["loss"] != m[3]["loss"]  # NaN, logged as it was
    assert all(m[s]["loss"] == m[s]["loss"] and m[s]["grad_norm"] == m[s]["grad_norm"]
               for s in (4, 5, 6))  # the poisoned gradients did not reach the weights
    log = out.stdout + out.stderr
    assert "step 3: loss nan" in log and "update skipped" in log

    # The same run without the poisoned step: steps 1-2 agree exactly, and the skipped step
    # left the weights and optimizer as they were, so step 4 starts from step 2's update.
    clean = tmp_path / "clean"
    run(["--config", cfg, "--job.dump_folder", str(clean)], script=str(launcher))
    c = metrics(clean)
    assert [c[s]["loss"] for s in (1, 2)] == [m[s]["loss"] for s in (1, 2)]
    assert m[4]["loss"] != c[4]["loss"]  # a different batch order from there on
    assert c[6]["skipped_steps"] == 0


def test_consecutive_non_finite_steps_stop_the_run(tmp_path):
    launcher = tmp_path / "synthetic_train.py"
    launcher.write_text(SYNTHETIC_LAUNCHER)
    cfg = tiny_config(tmp_path, model={"vocab_size": 256}, training={"steps": 10,
                      "max_consecutive_skipped_steps": 3}, lr_scheduler={"total_steps": 10},
                      checkpoint={"enable": False}, metrics={"log_freq": 5})
    out = run(["--nan-at-forward", "2,3,4,5,6,7", "--config", cfg], script=str(launcher), check=False)
    assert out.returncode != 0
    log = out.stdout + out.stderr
    assert "3 consecutive steps had a non-finite loss" in log
    assert "step 4: loss nan" in log and "step 5:" not in log  # stopped at the third


def test_resume_with_another_process_count(tmp_path):
    cfg = tiny_config(tmp_path, training={"steps": 8}, checkpoint={"interval": 8})
    dump = tmp_path / "run"
    run(["--config", cfg], nproc=2, cpu=True)
    saved = tree_digest(dump / "checkpoint")

    # The packed data stream of each rank depends on the number of ranks: a clear refusal.
    out = run(["--config", cfg, "--training.steps", "10"], check=False, cpu=True)
    assert out.returncode != 0
    assert "saved by 2 data-parallel ranks and this run has 1" in out.stderr
    assert tree_digest(dump / "checkpoint") == saved

    # Weights, optimizer and schedule reshard from 2 processes to 1; the data restarts.
    run(["--config", cfg, "--training.steps", "10", "--checkpoint.exclude_from_loading", "dataloader"], cpu=True)
    m = metrics(dump)
    assert m[8]["tokens_seen"] == 8 * (2 * 4 * 64)  # 8 steps of 2 ranks x 4 rows x 64 tokens
    assert m[9]["tokens_seen"] == m[8]["tokens_seen"] + 4 * 64
    assert m[9]["lr"] < m[8]["lr"] < m[1]["lr"] * 2  # the schedule went on, not restarted
    # The optimizer state saved by 2 ranks was loaded by 1: AdamW's step count went on from 8.
    saved = read_checkpoint(dump / "checkpoint" / "step-10", tmp_path / "step-10.pt")
    counts = [v for k, v in saved["optimizer"].items() if k.endswith(".step")]
    assert counts and all(int(c) == 10 for c in counts)
    assert saved["train_state"]["step"] == 10


def test_one_process_checkpoint_resumes_on_two(tmp_path):
    """One process trains without FSDP (plain tensors in its checkpoint); two processes load them
    into FSDP2's shards and go on: the optimizer's step counts and the schedule continue."""
    cfg = tiny_config(tmp_path, training={"steps": 4}, checkpoint={"interval": 4})
    dump = tmp_path / "run"
    run(["--config", cfg], cpu=True)
    run(["--config", cfg, "--training.steps", "5", "--checkpoint.exclude_from_loading", "dataloader"],
        nproc=2, cpu=True)
    m = metrics(dump)
    assert m[5]["tokens_seen"] == m[4]["tokens_seen"] + 2 * 4 * 64
    assert m[1]["lr"] < m[5]["lr"] < m[4]["lr"]  # past the warmup, decaying: not restarted
    saved = read_checkpoint(dump / "checkpoint" / "step-5", tmp_path / "step-5.pt")
    counts = [v for k, v in saved["optimizer"].items() if k.endswith(".step")]
    assert counts and all(int(c) == 5 for c in counts)


def read_checkpoint(folder, scratch) -> dict:
    """A DCP checkpoint as one nested dict, read without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(scratch))
    return torch.load(scratch, weights_only=False)


# ------------------------------------------------------------------------------------------
# In-process pieces


@pytest.mark.parametrize("mode,every", [("full", 1), ("selective", 2)])
def test_activation_checkpointing_gives_the_same_gradients(mode, every):
    import torch

    from flame.config import load_config
    from flame.models import build_model
    from flame.parallel import apply_activation_checkpointing

    cfg = load_config(DEBUG, ["--model.dim", "64", "--model.n_layers", "3", "--model.n_heads", "2",
                              "--model.n_kv_heads", "1", "--model.vocab_size", "256"])
    torch.manual_seed(0)
    plain = build_model(cfg.model).double()
    recomputed = build_model(cfg.model).double()
    recomputed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(recomputed, mode, every)
    wrapped = sum(type(b).__name__ == "CheckpointWrapper" for b in recomputed.layers)
    assert wrapped == (3 if mode == "full" else 2)

    x = torch.randint(0, 256, (2, 32))
    y = torch.randint(0, 256, (2, 32))
    for model in (plain, recomputed):
        model(x, labels=y).backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        err = ((a.grad - b.grad).norm() / a.grad.norm()).item()
        assert err < 1e-10, name


def test_missing_wandb_is_a_clear_error():
    import importlib.util

    from flame.config import load_config
    from flame.train import check_metric_backends

    cfg = load_config(DEBUG, ["--metrics.enable_wandb", "true"])
    if importlib.util.find_spec("wandb") is not None:
        check_metric_backends(cfg)  # installed: accepted
        return
    with pytest.raises(ValueError, match=r"metrics\.enable_wandb = true needs the wandb package"):
        check_metric_backends(cfg)


def test_data_wait_note():
    from flame.train import DATA_WAIT_WARNING, data_wait_note

    assert data_wait_note(0.0, 2) == ""
    assert data_wait_note(DATA_WAIT_WARNING / 2, 2) == ""
    note = data_wait_note(0.14, 2)
    assert "14%" in note and "data.num_workers = 2" in note


def test_each_micro_batch_reports_its_longest_document():
    """The trainer reads each micro-batch's longest packed document from the host's cu_seqlens
    (no device sync) and passes it to the model as max_seqlen; None without boundaries."""
    from types import SimpleNamespace

    import torch

    from flame.train import Trainer

    micro_batches = [
        {"input_ids": torch.zeros(2, 8, dtype=torch.long), "cu_seqlens": torch.tensor([0, 3, 8, 16], dtype=torch.int32)},
        {"input_ids": torch.zeros(2, 8, dtype=torch.long)},
        {"input_ids": torch.zeros(1, 8, dtype=torch.long), "cu_seqlens": torch.tensor([0, 8], dtype=torch.int32)},
    ]
    trainer = SimpleNamespace(grad_accum=3, data_iter=iter(micro_batches), window=SimpleNamespace(data_wait=0.0),
                              device=torch.device("cpu"))
    batches, longest = Trainer._next_batches(trainer)
    assert longest == [8, None, 8] and len(batches) == 3
    assert torch.equal(batches[0]["cu_seqlens"], micro_batches[0]["cu_seqlens"])
    trainer.data_iter = iter([{"input_ids": torch.zeros(1, 8, dtype=torch.long),
                               "cu_seqlens": torch.tensor([0, 2, 7, 8], dtype=torch.int32)}])
    trainer.grad_accum = 1
    assert Trainer._next_batches(trainer)[1] == [5]
