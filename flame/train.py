"""The training loop: class Trainer, device-agnostic (CUDA + NCCL or CPU + gloo).

    TOML -> Config -> Trainer: processes and device mesh -> tokenizer -> data loader ->
    model (meta on CUDA) -> parallelize (TP -> AC -> compile -> FSDP2, flame/parallel.py) ->
    init weights -> (one process: compute copies, flame/precision.py) ->
    optimizer, LR schedule -> resume from the latest checkpoint -> loop { micro-batches:
    forward + fused linear CE + backward -> clip -> skip a non-finite step -> step -> log ->
    checkpoint }.

Everything that can reject the run (config, batch arithmetic, vocabulary, checkpoint
compatibility) is checked before anything is written, so a bad launch never touches the
files of an earlier run.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from flame import optim, titan
from flame.config import Config, load_config
from flame.data.packing import longest_document
from flame.modules.loss import IGNORE_INDEX
from flame.parallel import parallelize, set_gradient_sync
from flame.precision import build_compute_copies
from flame.tensor_parallel import check_parallel_layout, check_tensor_parallel
from flame.titan import logger
from flame.validate import Validator

CONFIG_FILE = "config.toml"


def model_differences(checkpoint_path: str | None, model_cfg) -> list[tuple[str, Any, Any]]:
    """(key, saved value, this run's value) of each [model] key whose value in the config saved
    beside a checkpoint differs from this run's; [] without a readable saved config."""
    saved_file = os.path.join(checkpoint_path or "", CONFIG_FILE)
    if not checkpoint_path or not os.path.isfile(saved_file):
        return []
    try:
        saved = load_config(saved_file).model
    except ValueError:  # written under another schema: nothing to compare
        return []
    return [(f.name, getattr(saved, f.name), getattr(model_cfg, f.name))
            for f in fields(saved) if getattr(saved, f.name) != getattr(model_cfg, f.name)]


class StopSignals:
    """SIGTERM and SIGUSR1 (a scheduler's preemption or time limit) noted by a handler and acted on
    between steps. Every rank must stop after the same step, so the ranks agree on the largest
    signal received with an all-reduce on the CPU (gloo), one step late: each step starts the
    all-reduce of its flag and reads the previous step's, which every rank started a step ago, so
    no host waits for another's within a step and the device's queue is left alone."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, world_size: int):
        self.received = 0
        self.previous = {}
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None
        self.in_flight = None  # (work, flag) of the last step's all-reduce

    def install(self) -> None:
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._note)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _note(self, signum, frame) -> None:
        self.received = signum

    def finish(self) -> int:
        """Waits for the last all-reduce (every rank started it) and returns its signal number."""
        if self.in_flight is None:
            return 0
        work, flag = self.in_flight
        self.in_flight = None
        work.wait()
        return int(flag.item())

    def agreed(self) -> int:
        """The signal number any rank had received by the previous call (the largest), 0 for
        none; with one process, the signal received so far."""
        if self.group is None:
            return self.received
        signum = self.finish()
        flag = torch.tensor([self.received], dtype=torch.int64)
        self.in_flight = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return signum


# ------------------------------------------------------------------------------------------
# Checkpointed state besides model, optimizer and LR schedule


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.tokens_seen = int(sd["tokens_seen"])
        self.skipped_steps = int(sd["skipped_steps"])


@dataclass
class StepResult:
    """What one queued step leaves for the host: its number, learning rate, tokens on this rank,
    and [loss, grad norm, 1 if the update was applied] on their way to host memory."""
    step: int
    lr: float
    tokens: int
    scalars: torch.Tensor
    tokens_seen: int = 0  # over all ranks, after this step
    longest_document: int = 0  # tokens of the longest packed document of its batches on this rank

    def __post_init__(self):
        self.queued_at = time.perf_counter()
        if self.scalars.is_cuda:
            # a pinned copy and an event: values() waits for this step only, not for the
            # steps queued after it
            host = torch.empty(self.scalars.shape, dtype=self.scalars.dtype, pin_memory=True)
            host.copy_(self.scalars, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            self.scalars = host
        else:
            self.event = None

    def values(self) -> tuple[float, float, bool]:
        """Waits for the step if the device is still on it. Sets done_at: when it finished, or
        (already finished) when it was queued, the earliest it can have finished; and waited:
        the seconds spent waiting."""
        self.done_at, self.waited = self.queued_at, 0.0
        if self.event is not None and not self.event.query():
            started = time.perf_counter()
            self.event.synchronize()
            self.done_at = time.perf_counter()
            self.waited = self.done_at - started
        loss, grad_norm, applied = self.scalars.tolist()
        return loss, grad_norm, applied == 1.0


@dataclass
class _Window:
    """What happened since the last logged step: its end (start of this window), tokens on this
    rank, the host's time blocked on the device and on the data loader, and the longest
    document of the steps' batches on this rank (the serial chain of a linear-attention layer)."""
    start: float
    tokens: int = 0
    device_wait: float = 0.0
    data_wait: float = 0.0
    longest_document: int = 0


def saved_dp_world_size(checkpoint_dir: str) -> int | None:
    """The data-parallel degree a checkpoint's data-loader state was saved with (None if the
    checkpoint holds no data-loader state)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata
    ranks = [k for k in keys if k.startswith("dataloader.dp_rank_")]
    return len(ranks) or None


# ------------------------------------------------------------------------------------------
# Metrics: console line, metrics.jsonl, TensorBoard, W&B


def check_metric_backends(cfg: Config) -> None:
    """TensorBoard and W&B are optional packages: say which one is missing before the run starts."""
    import importlib.util

    m = cfg.metrics
    if m.enable_tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("metrics.enable_tensorboard = true needs the tensorboard package: "
                         "pip install 'flame[tensorboard]', or set it to false")
    if m.enable_wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("metrics.enable_wandb = true needs the wandb package: "
                         "pip install 'flame[wandb]', or set it to false")


class MetricsWriter:
    def __init__(self, cfg: Config, rank: int):
        self.enabled = rank == 0
        self.path = os.path.join(cfg.job.dump_folder, "metrics.jsonl")
        self.tb = self.wandb = None
        if not self.enabled:
            return
        m = cfg.metrics
        if m.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.job.dump_folder, m.save_tb_folder))
        if m.enable_wandb:
            import wandb

            self.wandb = wandb.init(project=m.wandb_project, dir=cfg.job.dump_folder,
                                    mode=m.wandb_mode, config=cfg.to_dict(),
                                    name=cfg.job.description or None)

    def log(self, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(values) + "\n")
        step = values["step"]
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 1024 ** 3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


# Share of a logged window spent waiting for the data loader from which the log line says so.
DATA_WAIT_WARNING = 0.05


def data_wait_note(fraction: float, num_workers: int) -> str:
    """The log line's note when the loader is behind (a step whose batches come late runs slow:
    at 2 workers a 340M recipe on an H100 waited 3-14% of each step), else ""."""
    if fraction < DATA_WAIT_WARNING:
        return ""
    return (f"  data-bound: {100 * fraction:.0f}% of the time waiting for the loader "
            f"(data.num_workers = {num_workers}: raise it)")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------
# Profiling


class Profiler:
    """One traced step every profiling.profile_freq steps (torch.profiler), and a CUDA memory
    snapshot after step profile_freq when enabled."""

    def __init__(self, cfg: Config, rank: int, device: torch.device):
        p = cfg.profiling
        self.prof = None
        self.snapshot_step = None
        folder = os.path.join(cfg.job.dump_folder, p.save_traces_folder)
        if p.enable_profiling:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)

            def save(prof):
                out = os.path.join(folder, f"iteration_{self.step}")
                os.makedirs(out, exist_ok=True)
                prof.export_chrome_trace(os.path.join(out, f"rank{rank}_trace.json"))

            self.prof = torch.profiler.profile(
                activities=activities, on_trace_ready=save,
                schedule=torch.profiler.schedule(wait=p.profile_freq - 2, warmup=1, active=1))
            self.prof.start()
        if p.enable_memory_snapshot and device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100000)
            self.snapshot_step = p.profile_freq
            self.snapshot_path = os.path.join(cfg.job.dump_folder, p.save_memory_snapshot_folder,
                                              f"rank{rank}_memory_snapshot.pickle")
        self.step = 0

    def after_step(self, step: int) -> None:
        self.step = step
        if self.prof is not None:
            self.prof.step()
        if self.snapshot_step is not None and step == self.snapshot_step:
            os.makedirs(os.path.dirname(self.snapshot_path), exist_ok=True)
            torch.cuda.memory._dump_snapshot(self.snapshot_path)
            torch.cuda.memory._record_memory_history(enabled=None)
            self.snapshot_step = None

    def close(self) -> None:
        if self.prof is not None:
            self.prof.stop()


# ------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.training

        # Processes, devices, mesh
        check_metric_backends(cfg)
        self.rt = titan.init_distributed()
        self.device = self.rt.device
        degrees = check_parallel_layout(cfg.parallelism, self.rt.world_size)
        check_tensor_parallel(cfg.model, cfg.parallelism.tensor_parallel_degree, t.seq_len)
        self.dims = titan.build_parallel_dims(*degrees, self.rt.world_size)
        # the ranks of a tensor-parallel group share one batch
        self.tp = cfg.parallelism.tensor_parallel_degree
        self.dp_rank, self.dp_size = titan.data_parallel_rank_and_size(self.dims)
        self.grad_accum = self._gradient_accumulation_steps()
        self._seed_and_determinism()

        # Data: tokenizer first, so the model's vocabulary can be checked against it
        from flame.data import build_dataloader, build_tokenizer

        self.tokenizer = build_tokenizer(cfg.data)
        if len(self.tokenizer) > cfg.model.vocab_size:
            raise ValueError(
                f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's "
                f"{len(self.tokenizer)} tokens (data.tokenizer = {cfg.data.tokenizer!r}); set "
                f"model.vocab_size >= {len(self.tokenizer)}")
        self.dataloader = build_dataloader(
            cfg.data, self.tokenizer, seq_len=t.seq_len, local_batch_size=t.local_batch_size,
            dp_rank=self.dp_rank, dp_world_size=self.dp_size, seed=t.seed)
        self.validator = None
        if cfg.validation.enable:
            self.validator = Validator(cfg, self.tokenizer, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                       tp=self.tp, device=self.device)

        # Model -> parallelize -> weights
        self.model = self._build_model()
        self.n_params = self.model.num_params(include_embeddings=True)

        # Optimizer, LR schedule, state, checkpoints
        self.optimizers = titan.build_optimizers(self.model, cfg.optimizer)
        self.lr_schedulers = titan.build_lr_schedulers(self.optimizers, cfg.lr_scheduler, t.steps)
        self.state = TrainState()
        self.checkpointer = titan.build_checkpointer(
            cfg.checkpoint, cfg.job.dump_folder, dataloader=self.dataloader,
            model=self.model, optimizers=self.optimizers, lr_schedulers=self.lr_schedulers,
            train_state=self.state)
        self._check_resume_compatible()

        # Only now, with every check passed, is anything written.
        settings = optim.config_settings(self.optimizers.optimizers)
        try:
            self.checkpointer.load(step=cfg.checkpoint.load_step)
        except CheckpointException as e:
            raise ValueError(self._load_failure(e)) from None
        if self.state.step > 0:
            self._take_config_settings(settings)
        if self.rt.rank == 0:
            os.makedirs(cfg.job.dump_folder, exist_ok=True)
            with open(os.path.join(cfg.job.dump_folder, CONFIG_FILE), "w") as f:
                f.write(cfg.to_toml())
        self.metrics = MetricsWriter(cfg, self.rt.rank)
        self.stop_signals = StopSignals(self.rt.world_size) if cfg.checkpoint.save_on_signal else None
        self.stopped_by = 0  # the signal that ended the run early
        self.peak_flops = titan.peak_flops(self.device)
        self.gc = titan.GarbageCollection(gc_freq=t.gc_freq)

    # ---- setup helpers ----------------------------------------------------------------------

    def _gradient_accumulation_steps(self) -> int:
        t = self.cfg.training
        per_step = t.local_batch_size * self.dp_size
        if t.global_batch_size == -1:
            return 1
        if t.global_batch_size % per_step:
            raise ValueError(
                f"training.global_batch_size = {t.global_batch_size} is not divisible by "
                f"training.local_batch_size ({t.local_batch_size}) x data-parallel degree "
                f"({self.dp_size}) = {per_step}; make it a multiple of {per_step}")
        return t.global_batch_size // per_step

    def _seed_and_determinism(self) -> None:
        if self.cfg.training.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        # The same seed on every rank: the weights are initialised identically everywhere.
        torch.manual_seed(self.cfg.training.seed)

    def _build_model(self) -> torch.nn.Module:
        from flame.init import init_layout_independent
        from flame.models import build_model

        cfg = self.cfg
        # Build on meta, parallelise, then materialise only this rank's shards. The weights are
        # drawn unit by unit at full size on an unsharded twin (flame/init.py), so they are the
        # same for every number of GPUs and every layout.
        with torch.device("meta"):
            model = build_model(cfg.model)
            template = build_model(cfg.model)
        # counted on the whole model: tensor parallelism leaves each mixer its local heads
        self.flops_per_token = model.flops_per_token(cfg.training.seq_len)
        parallelize(model, cfg, self.dims, self.device)
        model.to_empty(device=self.device)
        init_layout_independent(model, template, cfg.training.seed, self.device)
        model.train()
        # one process: bf16 compute copies and fp32 gradient sums in place of FSDP2's
        self.compute_copies = build_compute_copies(model, self.rt.world_size, self.device,
                                                   cfg.training.mixed_precision_param)
        return model

    def _check_resume_compatible(self) -> None:
        """Refuse, before anything is loaded or written, a resume that cannot go on: a checkpoint
        past training.steps, or a data state the data-parallel degree cannot follow."""
        ck = self.cfg.checkpoint
        self.resume_path = None
        if not ck.enable:
            return
        folder = os.path.join(self.cfg.job.dump_folder, ck.folder)
        step = ck.load_step if ck.load_step != -1 else titan.latest_complete_step(folder)
        if step < 0:
            return
        path = self.resume_path = os.path.join(folder, f"step-{step}")
        if step == 0:  # weights only (e.g. written by `flame.convert from-hf`): nothing else to check
            return
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise ValueError(f"checkpoint.load_step = {step}: no complete checkpoint at {path}")
        steps = self.cfg.training.steps
        if step > steps:
            raise ValueError(
                f"cannot resume {path}: its step {step} is past training.steps = {steps}, so nothing "
                f"would be trained; set training.steps above {step} to train on, or "
                f"checkpoint.load_step to an earlier step")
        if "dataloader" in ck.exclude_from_loading:
            return
        saved = saved_dp_world_size(path)
        if saved is not None and saved != self.dp_size:
            raise ValueError(
                f"cannot resume {path}: its data-loader state was saved by {saved} data-parallel "
                f"ranks and this run has {self.dp_size}; the data stream of one rank cannot be "
                "split or merged. Resume with the same data-parallel degree, or set "
                "checkpoint.exclude_from_loading = [\"dataloader\"] to keep the weights and "
                "optimizer and restart the data stream")

    def _take_config_settings(self, settings: list[list[dict]]) -> None:
        """After a resume: the checkpoint gave the state, the config gives the settings (optimizer,
        schedule); every setting that differs from the checkpoint's run is reported."""
        lines = [f"model.{key}: {now!r} in this run's config, {saved!r} in the checkpoint's; the weights "
                 "load unchanged" for key, saved, now in model_differences(self.resume_path, self.cfg.model)]
        lines += optim.restore_config_settings(self.optimizers.optimizers, self.lr_schedulers.schedulers,
                                               settings, next_step=self.state.step + 1)
        if self.rt.rank == 0:
            for line in lines:
                logger.warning(f"resuming step {self.state.step}: {line}")

    def _load_failure(self, error: CheckpointException) -> str:
        """What to change when a checkpoint does not load into this run's model: DCP's first
        failure (a size mismatch or a missing key) and the [model] keys saved beside it that
        differ from this run's."""
        ck = self.cfg.checkpoint
        path = self.resume_path or ck.initial_load_path
        cause = next(iter(error.failures.values()))[0]
        saved_with = ", ".join(f"model.{key} = {saved!r} (this run: {now!r})"
                               for key, saved, now in model_differences(path, self.cfg.model))
        return (f"cannot load the checkpoint {path}: {type(cause).__name__}: {str(cause).rstrip('.')}. "
                + (f"It was saved with {saved_with}: resume with those settings" if saved_with
                   else "Resume with the [model] it was saved with")
                + ", or train this model in another job.dump_folder")

    # ---- one step -----------------------------------------------------------------------------

    def _next_batches(self) -> tuple[list[dict[str, torch.Tensor]], list[int | None]]:
        """The micro-batches of one step, on their way to the device, and the tokens of each
        one's longest packed document (None without document boundaries)."""
        batches, longest = [], []
        for _ in range(self.grad_accum):
            started = time.perf_counter()
            try:
                batch = next(self.data_iter)
            except StopIteration:
                raise RuntimeError("the data loader ran out of batches") from None
            self.window.data_wait += time.perf_counter() - started
            longest.append(longest_document(batch.get("cu_seqlens")))  # still on the host: no device sync
            batches.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        return batches, longest

    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches, queued on the device without
        waiting for it: the loss, gradient norm and skip decision stay on the device until
        StepResult.values() reads them, so the host can prepare the next step meanwhile.
        The loss is the mean over every label token of the global batch, whatever the split
        into ranks and micro-batches."""
        batches, longest = self._next_batches()
        longest_in_step = max((n for n in longest if n is not None), default=0)
        label_tokens = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches).float()
        if dist.get_world_size() > 1:
            dist.all_reduce(label_tokens)
        global_tokens = (label_tokens / self.tp).clamp(min=1.0)  # each TP group counted its batch tp times
        # FSDP averages gradients over the dp ranks; scale by dp_size so that the result is the
        # gradient of (sum of token losses) / (global label tokens).
        scale = self.dp_size / global_tokens

        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        copies = self.compute_copies
        if copies is not None:
            copies.begin_step()
        for i, b in enumerate(batches):
            set_gradient_sync(self.model, i == len(batches) - 1)
            loss = self.model(b["input_ids"], labels=b["labels"], cu_seqlens=b.get("cu_seqlens"),
                              position_ids=b.get("position_ids"), loss_reduction="sum", max_seqlen=longest[i])
            (loss * scale).backward()
            if copies is not None:
                copies.accumulate()
            loss_sum += loss.detach().float()
        if copies is not None:
            copies.end_step()

        grad_norm = optim.clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm)
        if dist.get_world_size() > 1:
            dist.all_reduce(loss_sum)
        loss = loss_sum / self.tp / global_tokens
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        optimizer = self.optimizers.optimizers[0]
        lr = optimizer.param_groups[0]["lr"]
        if optimizer.defaults.get("fused"):
            # The fused AdamW kernel reads found_inf on the device and leaves parameters,
            # moments and step counts untouched when it is 1: no host round trip.
            optimizer.found_inf = (~finite).float()
            self.optimizers.step()
            del optimizer.found_inf
        elif finite:  # other implementations: the host decides, waiting for the device
            self.optimizers.step()
        self.lr_schedulers.step()
        self.optimizers.zero_grad()
        tokens = sum(b["input_ids"].numel() for b in batches)
        return StepResult(self.state.step + 1, lr, tokens,
                          torch.stack([loss, grad_norm.float(), finite.float()]),
                          longest_document=longest_in_step)

    def _account(self, result: StepResult, validate: bool = False) -> None:
        """A finished step's skip accounting and, on log steps, its metrics line; with validate,
        also the validation values of the weights after this step, in the same line."""
        loss, grad_norm, finite = result.values()
        self.window.device_wait += result.waited
        if finite:
            self.consecutive_skips = 0
        else:
            self.state.skipped_steps += 1
            self.consecutive_skips += 1
            logger.warning(f"step {result.step}: loss {loss} / grad norm {grad_norm} is not finite: "
                           f"update skipped ({self.state.skipped_steps} skipped so far)")
            if self.consecutive_skips >= self.cfg.training.max_consecutive_skipped_steps:
                raise RuntimeError(
                    f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                    "norm; stopping (lower optimizer.lr, or raise "
                    "training.max_consecutive_skipped_steps)")
        self.window.tokens += result.tokens
        self.window.longest_document = max(self.window.longest_document, result.longest_document)
        step, t = result.step, self.cfg.training
        # the step has finished (values() waited for it), so the evaluation times only itself
        validation = self.validator.run(self.model, self.compute_copies) if validate else None
        if not (step % self.cfg.metrics.log_freq == 0 or step == t.steps
                or step == self.run_start_step + 1 or validation):
            return
        # the window runs from the end of the last logged step to the end of this one
        w = self.window
        now, seconds = time.perf_counter(), max(result.done_at - w.start, 1e-9)
        tps = w.tokens / seconds / self.tp  # per device
        mfu = (tps * self.flops_per_token / self.peak_flops) if self.peak_flops else None
        eta = (now - self.run_start) / (step - self.run_start_step) * (t.steps - step)
        values = {
            "step": step, "loss": loss, "grad_norm": grad_norm, "lr": result.lr,
            "tokens_per_second": tps, "mfu": mfu,
            "memory_gib": _memory_gib(self.device),
            "tokens_seen": result.tokens_seen,
            "skipped_steps": self.state.skipped_steps, "eta_seconds": eta,
            # shares of the window the host spent waiting for the device's results (near 0:
            # the device waited for the host instead) and for the data loader (well above 0:
            # data-bound, give it more workers)
            "device_wait_fraction": min(w.device_wait / seconds, 1.0),
            "data_wait_fraction": min(w.data_wait / seconds, 1.0),
            # tokens of the longest packed document this rank trained on in the window
            "longest_document_tokens": w.longest_document,
            **(validation or {}),
        }
        self.metrics.log(values)
        if self.rt.rank == 0:
            mfu_text = f"{100 * mfu:5.1f}%" if mfu is not None else "n/a"
            logger.info(
                f"step {step:>{len(str(t.steps))}}/{t.steps}  loss {loss:.4f}  "
                f"grad_norm {grad_norm:.3f}  lr {result.lr:.2e}  "
                f"tok/s/dev {tps:,.0f}  mfu {mfu_text}  mem {values['memory_gib']:.2f}GiB  "
                f"eta {_duration(eta)}"
                + (f"  skipped {self.state.skipped_steps}" if self.state.skipped_steps else "")
                + (f"  validation loss {validation['validation_loss']:.4f}" if validation else "")
                + data_wait_note(values["data_wait_fraction"], self.cfg.data.num_workers))
        # after an evaluation the next window starts when it ended (the device waited for it)
        self.window = _Window(time.perf_counter() if validation else result.done_at)

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        self.data_iter = iter(self.dataloader)
        self.consecutive_skips = 0
        profiler = Profiler(cfg, self.rt.rank, self.device)
        if self.rt.rank == 0:
            logger.info(
                f"training {self.n_params / 1e6:.2f}M parameters on {self.rt.world_size} x "
                f"{self.device.type}; global batch {t.local_batch_size * self.dp_size * self.grad_accum}"
                f" x {t.seq_len} tokens ({self.grad_accum} micro-batches); from step {self.state.step}")
            if self.state.step >= t.steps:
                logger.info(f"the checkpoint is at training.steps = {t.steps}: nothing left to train "
                            "(raise training.steps to train on)")
        self.window = _Window(time.perf_counter())
        self.run_start, self.run_start_step = self.window.start, self.state.step
        if self.stop_signals is not None:
            self.stop_signals.install()
        try:
            self._train_loop(t, profiler)
            if self.stop_signals is not None:
                self.stop_signals.finish()
        finally:
            if self.stop_signals is not None:
                self.stop_signals.restore()
        if cfg.checkpoint.export_hf and self.state.step == t.steps:
            self._export_hf(self.state.step)

    def _train_loop(self, t, profiler) -> None:
        # A step is accounted (skips, metrics) once the next one is queued: the host reads a
        # step's results while the device works on the next, so the device never waits for it.
        pending = None
        while self.state.step < t.steps:
            self.gc.run(self.state.step + 1)
            result = self.train_step()
            self.state.step += 1
            self.state.tokens_seen += result.tokens * self.dp_size
            result.tokens_seen = self.state.tokens_seen
            profiler.after_step(self.state.step)
            if pending is not None:
                self._account(pending)
            pending = result

            step = self.state.step
            last = step == t.steps
            if self.validator is not None and self.validator.due(step, last):
                self._account(pending, validate=True)
                pending = None
            # a stop signal: this step's checkpoint is written whatever the interval
            signum = self.stop_signals.agreed() if self.stop_signals is not None and not last else 0
            saves = titan.will_save_checkpoint(self.checkpointer, step, last_step=last or bool(signum))
            if saves and pending is not None:
                self._account(pending)  # the checkpoint holds this step's skip count
                pending = None
            if signum:
                titan.save_checkpoint_now(self.checkpointer, step)
            else:
                self.checkpointer.save(step, last_step=last)
            if saves:
                self._save_config_beside_checkpoint(step)
            if signum:
                self._log_stop(signum, step, saved=saves)
                break
        if pending is not None:
            self._account(pending)
        profiler.close()

    def _log_stop(self, signum: int, step: int, saved: bool) -> None:
        self.stopped_by = signum
        if self.rt.rank != 0:
            return
        name = signal.Signals(signum).name
        if saved:
            logger.warning(f"{name}: stopped after step {step} with its checkpoint saved; launch the same "
                           "command again to resume")
        else:
            logger.warning(f"{name}: stopping after step {step}; checkpoint.enable is false, so nothing is saved")

    def _save_config_beside_checkpoint(self, step: int) -> None:
        """The resolved config goes into each checkpoint folder, so a checkpoint is readable
        (e.g. converted to Hugging Face format) without the file that launched the run."""
        if self.rt.rank != 0:
            return
        path = os.path.join(self.cfg.job.dump_folder, self.cfg.checkpoint.folder, f"step-{step}")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            f.write(self.cfg.to_toml())

    def _export_hf(self, step: int) -> None:
        """checkpoint.export_hf: the last checkpoint (saved synchronously by the manager) in Hugging
        Face format. Rank 0 converts it in a child process once every rank has written its shards:
        reading a checkpoint inside this process would make the conversion's reads collectives of
        the training process group."""
        import subprocess
        import sys

        if self.rt.world_size > 1:
            dist.barrier()
        if self.rt.rank == 0:
            ckpt = self.cfg.checkpoint
            folder = os.path.join(self.cfg.job.dump_folder, ckpt.folder, f"step-{step}")
            out = os.path.join(self.cfg.job.dump_folder, "hf", f"step-{step}")
            subprocess.run([sys.executable, "-m", "flame.convert", "to-hf", "--checkpoint", folder,
                            "--out", out, "--dtype", ckpt.export_dtype], check=True)
            logger.info(f"exported step {step} in Hugging Face format to {out}")
        if self.rt.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()


def main(argv: list[str]) -> int:
    """Entry point of train.py: returns the process exit code."""
    import sys

    from flame.config import dry_run_report, parse_args

    is_rank0 = os.environ.get("RANK", "0") == "0"
    try:
        cfg, print_config, dry_run = parse_args(argv)
        if print_config:
            if is_rank0:
                print(cfg.to_toml())
            return 0
        if dry_run:
            if is_rank0:
                print(dry_run_report(cfg))
            return 0
        titan.init_logger()
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
        titan.destroy_distributed(barrier=True)
        if trainer.stopped_by:  # stopped early on a signal, checkpoint saved: the shell's convention
            return 128 + trainer.stopped_by
    except ValueError as e:
        if is_rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        titan.destroy_distributed()  # after an error: no barrier, the other ranks may be gone
    return 0
