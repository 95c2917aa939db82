"""TOML -> typed dataclasses: the one place where a job's configuration is read and checked.

A job file has one table per section below. Keys follow torchtitan's names where torchtitan
has the same knob. Reading is strict: an unknown section or key, a value of the wrong type or
an impossible combination is a ValueError that names the key, the file it came from and, for a
misspelling, the closest valid name.

    extends = "base.toml"      # optional: inherit every key of base.toml (relative path; chains)
    [training]
    steps = 1000

Command-line overrides `--section.key value` (or `--section.key=value`) are applied last and
typed from the dataclass. `python train.py --config X.toml --print-config` prints the resolved
configuration; `--dry-run` builds the model on the meta device and prints its size, FLOPs and
an estimate of memory per GPU, then exits.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

# ------------------------------------------------------------------------------------------
# Sections


@dataclass
class JobConfig:
    # Everything a run writes (checkpoints, metrics.jsonl, TensorBoard, traces) goes below here.
    dump_folder: str = "./outputs"
    description: str = ""

    def validate(self) -> None:
        if not self.dump_folder:
            raise ValueError("job.dump_folder is empty: give the folder the run writes to")


@dataclass
class TrainingConfig:
    steps: int = 1000
    # Sequences per device per micro-batch. The global batch is
    # local_batch_size * data-parallel degree * gradient_accumulation_steps, or set
    # global_batch_size and the accumulation steps follow from it.
    local_batch_size: int = 8
    global_batch_size: int = -1
    seq_len: int = 2048
    max_norm: float = 1.0  # gradient clipping; 0 disables it
    # bf16 parameters for compute with fp32 master weights and fp32 gradient reduction. Only
    # used on CUDA; CPU runs stay in fp32.
    mixed_precision_param: Literal["bfloat16", "float32"] = "bfloat16"
    mixed_precision_reduce: Literal["float32"] = "float32"
    # A step whose loss or gradient norm is inf/nan is skipped (no update); the run stops after
    # this many consecutive skipped steps, because a model that keeps diverging will not recover.
    max_consecutive_skipped_steps: int = 10
    seed: int = 42
    deterministic: bool = False
    gc_freq: int = 50  # Python GC runs every gc_freq steps on all ranks at once

    def validate(self) -> None:
        _positive("training", self, "steps", "local_batch_size", "seq_len", "gc_freq",
                  "max_consecutive_skipped_steps")
        if self.global_batch_size != -1 and self.global_batch_size <= 0:
            raise ValueError(
                f"training.global_batch_size = {self.global_batch_size}: must be positive, or -1 "
                "for local_batch_size * data-parallel degree")
        if self.max_norm < 0:
            raise ValueError(f"training.max_norm = {self.max_norm}: must be >= 0 (0 disables clipping)")


@dataclass
class OptimizerConfig:
    name: Literal["AdamW"] = "AdamW"
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    implementation: Literal["for-loop", "foreach", "fused"] = "fused"

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr = {self.lr}: must be positive")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"optimizer.{key} = {getattr(self, key)}: must be in [0, 1)")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError("optimizer.eps must be positive and optimizer.weight_decay >= 0")


@dataclass
class LRSchedulerConfig:
    # Linear warmup, then constant, then decay over the last decay_ratio of the steps
    # (warmup-stable-decay). decay_ratio unset: decay over all steps after warmup, which with
    # decay_type = "cosine" is the usual warmup + cosine schedule.
    warmup_steps: int = 200
    decay_ratio: float | None = None
    decay_type: Literal["linear", "sqrt", "cosine"] = "cosine"
    min_lr_factor: float = 0.1  # the LR decays to lr * min_lr_factor
    total_steps: int | None = None  # schedule length; default training.steps

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"lr_scheduler.warmup_steps = {self.warmup_steps}: must be >= 0")
        if self.decay_ratio is not None and not 0 <= self.decay_ratio <= 1:
            raise ValueError(f"lr_scheduler.decay_ratio = {self.decay_ratio}: must be in [0, 1]")
        if not 0 <= self.min_lr_factor <= 1:
            raise ValueError(f"lr_scheduler.min_lr_factor = {self.min_lr_factor}: must be in [0, 1]")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ValueError(f"lr_scheduler.total_steps = {self.total_steps}: must be positive")


@dataclass
class ParallelismConfig:
    # HSDP: dp_replicate groups of dp_shard ranks; -1 = all remaining ranks.
    data_parallel_replicate_degree: int = 1
    data_parallel_shard_degree: int = -1
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    # Consecutive blocks gathered and reduced as one FSDP unit: fewer units, less host work per
    # step, more gathered parameters held at once.
    fsdp_blocks_per_unit: int = 1
    tensor_parallel_degree: int = 1

    def validate(self) -> None:
        if self.data_parallel_replicate_degree < 1:
            raise ValueError("parallelism.data_parallel_replicate_degree must be >= 1")
        if self.data_parallel_shard_degree == 0 or self.data_parallel_shard_degree < -1:
            raise ValueError("parallelism.data_parallel_shard_degree must be >= 1, or -1 for the rest")
        if self.tensor_parallel_degree < 1:
            raise ValueError(
                f"parallelism.tensor_parallel_degree = {self.tensor_parallel_degree}: must be >= 1")
        if self.fsdp_blocks_per_unit < 1:
            raise ValueError(
                f"parallelism.fsdp_blocks_per_unit = {self.fsdp_blocks_per_unit}: must be >= 1")


@dataclass
class CheckpointConfig:
    enable: bool = False
    folder: str = "checkpoint"  # below job.dump_folder
    interval: int = 500  # steps; a checkpoint is also written at the last step
    keep_latest_k: int = 3  # 0 keeps all; otherwise >= 2
    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = "disabled"
    load_step: int = -1  # -1 resumes from the latest complete checkpoint
    # Start a fresh run (no checkpoint in `folder` yet) from this checkpoint's model weights.
    initial_load_path: str | None = None
    # The checkpoint of the last step holds the model only (smaller; cannot be resumed).
    last_save_model_only: bool = False
    export_dtype: Literal["float16", "bfloat16", "float32"] = "float32"
    # After the last step, also write that checkpoint in Hugging Face format to <dump>/hf/step-N.
    export_hf: bool = False
    # States not restored on resume, e.g. ["dataloader"] to restart the data stream.
    exclude_from_loading: list[str] = field(default_factory=list)
    # On SIGTERM or SIGUSR1 (a scheduler's preemption or time limit), finish the current step,
    # write a full checkpoint of it and exit with 128 + the signal number.
    save_on_signal: bool = True

    def validate(self) -> None:
        if self.interval <= 0:
            raise ValueError(f"checkpoint.interval = {self.interval}: must be positive")
        if self.keep_latest_k == 1 or self.keep_latest_k < 0:
            raise ValueError(
                f"checkpoint.keep_latest_k = {self.keep_latest_k}: use 0 (keep all) or >= 2 (the "
                "newest one may still be being written)")
        if self.export_hf and not self.enable:
            raise ValueError("checkpoint.export_hf = true needs checkpoint.enable = true (the export "
                             "converts the last checkpoint)")
        valid = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")
        for name in self.exclude_from_loading:
            if name not in valid:
                raise ValueError(
                    f"checkpoint.exclude_from_loading: unknown state {name!r}{_did_you_mean(name, valid)}")


@dataclass
class ActivationCheckpointConfig:
    # none: keep all activations; full: recompute every block in backward; selective:
    # recompute every `selective_ac_option`-th block (an integer as a string, torchtitan style).
    mode: Literal["none", "full", "selective"] = "none"
    selective_ac_option: str = "2"

    def validate(self) -> None:
        if self.mode == "selective" and not (self.selective_ac_option.isdigit()
                                             and int(self.selective_ac_option) >= 1):
            raise ValueError(
                f"activation_checkpoint.selective_ac_option = {self.selective_ac_option!r}: give a "
                "positive integer N as a string, to recompute every N-th block")


@dataclass
class CompileConfig:
    # torch.compile each block separately (one graph per block, reused by identical blocks).
    enable: bool = False
    # "model": the blocks. "loss" is accepted, as torchtitan configs list it, and changes nothing:
    # the loss is the fused linear cross-entropy kernel, which has nothing for compile to fuse.
    components: list[str] = field(default_factory=lambda: ["model"])
    backend: str = "inductor"

    def validate(self) -> None:
        for c in self.components:
            if c not in ("model", "loss"):
                raise ValueError(f"compile.components: unknown component {c!r}{_did_you_mean(c, ['model', 'loss'])}")


@dataclass
class MetricsConfig:
    log_freq: int = 10
    enable_tensorboard: bool = False
    save_tb_folder: str = "tb"
    enable_wandb: bool = False
    wandb_project: str = "flame"
    # Without network W&B writes to <dump_folder>/wandb; `wandb sync` uploads it later.
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"

    def validate(self) -> None:
        if self.log_freq <= 0:
            raise ValueError(f"metrics.log_freq = {self.log_freq}: must be positive")


@dataclass
class ProfilingConfig:
    enable_profiling: bool = False
    save_traces_folder: str = "profile_traces"
    profile_freq: int = 10  # a trace of 1 active step every profile_freq steps
    enable_memory_snapshot: bool = False
    save_memory_snapshot_folder: str = "memory_snapshot"

    def validate(self) -> None:
        if self.profile_freq < 2:
            raise ValueError(f"profiling.profile_freq = {self.profile_freq}: must be >= 2")


def _positive(section: str, obj: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value <= 0:
            raise ValueError(f"{section}.{key} = {value}: must be positive")


def _section_types() -> dict[str, type]:
    # The model and data sections belong to their packages; their config modules are imported
    # directly so that reading a config does not pull in the kernels or the data libraries.
    from flame.data.config import DataConfig, ValidationConfig
    from flame.models.config import ModelConfig

    return {
        "job": JobConfig,
        "model": ModelConfig,
        "data": DataConfig,
        "training": TrainingConfig,
        "optimizer": OptimizerConfig,
        "lr_scheduler": LRSchedulerConfig,
        "parallelism": ParallelismConfig,
        "checkpoint": CheckpointConfig,
        "activation_checkpoint": ActivationCheckpointConfig,
        "compile": CompileConfig,
        "metrics": MetricsConfig,
        "profiling": ProfilingConfig,
        "validation": ValidationConfig,
    }


@dataclass
class Config:
    job: JobConfig
    model: Any  # flame.models.ModelConfig
    data: Any  # flame.data.DataConfig
    training: TrainingConfig
    optimizer: OptimizerConfig
    lr_scheduler: LRSchedulerConfig
    parallelism: ParallelismConfig
    checkpoint: CheckpointConfig
    activation_checkpoint: ActivationCheckpointConfig
    compile: CompileConfig
    metrics: MetricsConfig
    profiling: ProfilingConfig
    validation: Any  # flame.data.ValidationConfig
    # The file the config was read from (after `extends` was resolved); not a TOML key.
    source: str = ""

    def validate(self) -> None:
        for name in _section_types():
            section = getattr(self, name)
            if hasattr(section, "validate"):
                section.validate()
        if self.parallelism.tensor_parallel_degree > 1:
            # imported here: it pulls in torch.distributed, which reading a config does not need
            from flame.tensor_parallel import check_tensor_parallel

            check_tensor_parallel(self.model, self.parallelism.tensor_parallel_degree,
                                  self.training.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _section_types()}

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


# ------------------------------------------------------------------------------------------
# Reading


def _did_you_mean(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _read_toml(path: str, chain: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Read `path` with its `extends` chain merged in. Returns (data, origin) where origin maps
    (section, key) to the file that set it, for error messages."""
    path = os.path.abspath(path)
    if path in chain:
        cycle = " -> ".join(list(chain) + [path])
        raise ValueError(f"extends: cycle in config files: {cycle}")
    if not os.path.isfile(path):
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ValueError(f"config file not found: {path}{where}")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None

    data: dict[str, dict] = {}
    origin: dict[tuple[str, str], str] = {}
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ValueError(f"{path}: extends must be a file name string, got {parent!r}")
        parent_path = os.path.join(os.path.dirname(path), parent)
        data, origin = _read_toml(parent_path, chain + (path,))
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise ValueError(
                f"{path}: top-level key {section!r} must be a [section] table "
                f"(only 'extends' may stand alone){_did_you_mean(section, _section_names())}")
        merged = data.setdefault(section, {})
        for key, value in table.items():
            merged[key] = value
            origin[(section, key)] = path
        origin.setdefault((section, ""), path)
    return data, origin


def _section_names() -> list[str]:
    return list(_section_types())


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp, where: str) -> Any:
    """Return `value` as type `tp` or raise ValueError naming `where`. TOML values only: ints
    are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ValueError(f"{where} = {value!r}: must be one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where)
            except ValueError as e:
                errors.append(e)
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise ValueError(f"{where} = {value!r}: expected {names}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} = {value!r}: expected a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} = {value!r}: expected a table")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} = {value!r}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} = {value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} = {value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} = {value!r}: expected a string")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table")
        return _build_dataclass(tp, value, where, lambda key: where)
    return value


def _build_dataclass(cls, table: dict, name: str, origin_of) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls) if f.init]
    kwargs = {}
    for key, value in table.items():
        if key not in valid:
            raise ValueError(
                f"unknown key {key!r} in [{name}] of {origin_of(key)}{_did_you_mean(key, valid)}")
        kwargs[key] = _check_value(value, hints[key], f"{name}.{key} (in {origin_of(key)})")
    return cls(**kwargs)


def _parse_cli_value(text: str, tp, where: str) -> Any:
    """Turn a command-line string into a value of type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null") and len(args) < len(typing.get_args(tp)):
            return None
        for arg in args:
            try:
                return _parse_cli_value(text, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where} = {text!r}: expected {' or '.join(_type_name(a) for a in args)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (str,)
        if text.startswith("["):
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                raise ValueError(f"{where} = {text!r}: not a valid list") from None
            return _check_value(value, tp, where)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return [_parse_cli_value(p, item_tp, f"{where}[{i}]") for i, p in enumerate(parts)]
    if origin is Literal:
        return _check_value(text, tp, where)
    if tp is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{where} = {text!r}: expected true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where} = {text!r}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where} = {text!r}: expected a number") from None
    return text


def parse_overrides(argv: list[str]) -> list[tuple[str, str, str | None]]:
    """Split `--section.key value` / `--section.key=value` / `--section.key` (a true flag) into
    (section, key, text) triples."""
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(
                f"command line: cannot read {arg!r}; overrides look like --section.key value")
        name, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                text = argv[i + 1]
                i += 1
            else:
                text = None
        section, _, key = name.partition(".")
        out.append((section, key, text))
        i += 1
    return out


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Read a job file (with its `extends` chain), apply command-line overrides and validate."""
    sections = _section_types()
    data, origin = _read_toml(path)
    path = os.path.abspath(path)

    for section in data:
        if section not in sections:
            where = origin.get((section, ""), path)
            raise ValueError(f"unknown section [{section}] in {where}{_did_you_mean(section, sections)}")

    built = {}
    for name, cls in sections.items():
        table = data.get(name, {})
        built[name] = _build_dataclass(cls, table, name, lambda key, n=name: origin.get((n, key), path))

    for section, key, text in parse_overrides(overrides or []):
        if section not in sections:
            raise ValueError(f"command line: unknown section in --{section}.{key}{_did_you_mean(section, sections)}")
        cls = sections[section]
        valid = [f.name for f in fields(cls) if f.init]
        if key not in valid:
            raise ValueError(
                f"command line: unknown key --{section}.{key}{_did_you_mean(key, valid)}")
        tp = typing.get_type_hints(cls)[key]
        where = f"--{section}.{key} (command line)"
        if text is None:
            if tp is not bool:
                raise ValueError(f"{where}: needs a value")
            value = True
        else:
            value = _parse_cli_value(text, tp, where)
        setattr(built[section], key, value)

    cfg = Config(**built, source=path)
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------------
# Writing (the resolved config is saved beside the metrics and inside every checkpoint)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "nan"
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"cannot write {value!r} to TOML")


def dump_toml(data: dict[str, dict]) -> str:
    """Write {section: {key: value}} as TOML. Keys whose value is None are left out: every
    None-able key defaults to None, so reading the file back gives the same config."""
    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Command line


USAGE = """usage: train.py --config FILE.toml [--print-config] [--dry-run] [--section.key value ...]"""


def parse_args(argv: list[str]) -> tuple[Config, bool, bool]:
    """Returns (config, print_config, dry_run)."""
    config_path = None
    print_config = dry_run = False
    rest = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                config_path = argv[i + 1]
                i += 1
            else:
                raise ValueError("--config needs a file name")
        elif arg == "--print-config":
            print_config = True
        elif arg == "--dry-run":
            dry_run = True
        else:
            rest.append(arg)
        i += 1
    if config_path is None:
        raise ValueError(f"--config is required\n{USAGE}")
    return load_config(config_path, rest), print_config, dry_run


# ------------------------------------------------------------------------------------------
# Dry run: sizes and an estimate of memory per GPU, without allocating the model


def dry_run_report(cfg: Config, world_size: int | None = None) -> str:
    import torch

    from flame.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    replicate = cfg.parallelism.data_parallel_replicate_degree
    shard = cfg.parallelism.data_parallel_shard_degree
    tp = cfg.parallelism.tensor_parallel_degree
    if shard == -1:
        shard = max(1, world_size // (replicate * tp))

    n_total = model.num_params(include_embeddings=True)
    n_body = model.num_params(include_embeddings=False)
    flops = model.flops_per_token(cfg.training.seq_len)
    tokens = cfg.training.local_batch_size * cfg.training.seq_len
    # global_batch_size (sequences) fixes the step; otherwise one micro-batch per data-parallel rank
    step_sequences = (cfg.training.global_batch_size if cfg.training.global_batch_size != -1
                      else cfg.training.local_batch_size * shard * replicate)
    bf16 = cfg.training.mixed_precision_param == "bfloat16"
    m = cfg.model

    # Per GPU, with parameters, gradients and AdamW's two moments sharded over the FSDP degree
    # and split over the tensor-parallel degree (fp32 master weights; bf16 copies of the
    # gathered block exist only transiently).
    params_b = 4 * n_total / (shard * tp)
    grads_b = 4 * n_total / (shard * tp)
    optim_b = 8 * n_total / (shard * tp)
    # Activations, roughly: per token and layer ~34 * dim bytes in bf16 without recomputation
    # (Korthikanti et al.'s count for a transformer block, softmax scores excluded as SDPA/
    # chunked kernels do not store them), only the block input with full recomputation.
    act_bytes = 2 if bf16 else 4
    per_layer = {"none": 17 * m.dim, "full": m.dim}.get(cfg.activation_checkpoint.mode)
    if per_layer is None:
        every = int(cfg.activation_checkpoint.selective_ac_option)
        per_layer = (17 * m.dim * (every - 1) + m.dim) / every
    act_b = tokens * m.n_layers * per_layer * act_bytes / tp  # TP splits heads and the sequence
    # The compute copies of the blocks gathered by FSDP: all of them from forward to backward when
    # kept (reshard_after_forward "never", or "default" for blocks within 1/16 of the GPU's
    # memory), else about one block's at a time.
    gathered_b = act_bytes * n_body / tp * (1 - 1 / shard) if shard > 1 else 0.0
    # One process runs without FSDP: compute copies of all parameters for the whole step
    # (flame/precision.py); a micro-batch's bf16 gradients exist only during its backward.
    one_process_b = 2 * n_total if world_size == 1 and bf16 else 0.0
    # Logits are never materialised in full: the fused linear cross-entropy works in chunks.
    gib = 1024 ** 3
    lines = [
        f"model: {n_total / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M without embeddings, "
        f"{(n_total - n_body) / 1e6:.2f}M in embeddings/output)",
        f"layers: {', '.join(m.layer_mixers()) if hasattr(m, 'layer_mixers') else m.n_layers}",
        f"training FLOPs per token at seq_len {cfg.training.seq_len}: {flops / 1e9:.3f} GFLOP",
        f"tokens per step: {step_sequences * cfg.training.seq_len} "
        f"({cfg.training.local_batch_size} x {cfg.training.seq_len} per device per micro-batch)",
        (f"memory per GPU (estimate, {world_size} GPU(s), FSDP degree {shard}, replicate {replicate}, "
         f"tensor parallel {tp}):" if world_size > 1 else "memory per GPU (estimate, 1 GPU, no FSDP):"),
        f"  parameters (fp32)        {params_b / gib:8.2f} GiB",
        f"  gradients (fp32)         {grads_b / gib:8.2f} GiB",
        f"  optimizer states (fp32)  {optim_b / gib:8.2f} GiB",
        f"  activations (rough, AC={cfg.activation_checkpoint.mode}) {act_b / gib:8.2f} GiB",
        f"  total                    {(params_b + grads_b + optim_b + act_b + one_process_b) / gib:8.2f} GiB",
    ]
    if one_process_b:
        lines.insert(-1, f"  compute copies (bf16)    {one_process_b / gib:8.2f} GiB")
    else:
        lines.append(f"  + gathered blocks ({'bf16' if bf16 else 'fp32'})  {gathered_b / gib:8.2f} GiB while kept "
                     "from forward to backward (parallelism.fsdp_reshard_after_forward)")
    return "\n".join(lines)
