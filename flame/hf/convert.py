"""DCP checkpoints <-> Hugging Face folders.

to_hf: a trainer checkpoint (`<dump>/checkpoint/step-N`, torch DCP, sharded by any number of
ranks) -> a folder `AutoModelForCausalLM.from_pretrained` loads: config.json (FlameConfig with
an `auto_map` to the remote code), model.safetensors, the run's tokenizer, and the remote code
(configuration_flame.py, modeling_flame.py, reference_model.py). The model config comes from
the run's saved config.toml (in the checkpoint folder, else in the dump folder). The weights
are read on the CPU straight from the DCP files into full tensors: no GPU and no process group.

from_hf: a flame model in Hugging Face format (local folder or hub id) -> a DCP checkpoint
holding only the model, which the trainer loads like any checkpoint: as `step-0` in a run's
checkpoint folder (torchtitan loads step 0 as model-only, then training starts at step 0 with
a fresh optimizer), or through `checkpoint.initial_load_path`.

Both write into a temporary folder beside the destination and rename it into place at the end,
so an interrupted conversion never leaves a folder that looks complete.
"""

import glob
import json
import math
import os
import re
import shutil
import tempfile
import tomllib
import warnings

import torch

from flame.hf.configuration_flame import FlameConfig

CONFIG_FILE = "config.toml"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# The checkpoint entries that are not model weights (torchtitan's state names).
TRAINING_STATES = ("optimizer", "lr_scheduler", "dataloader", "train_state")
# Files written as remote code, from this package.
REMOTE_CODE = ("configuration_flame.py", "modeling_flame.py", "reference_model.py")
AUTO_MAP = {
    "AutoConfig": "configuration_flame.FlameConfig",
    "AutoModelForCausalLM": "modeling_flame.FlameForCausalLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_PREFIX = "model."
MAX_SHARD_BYTES = 5 * 2**30  # safetensors files of at most 5 GiB, as transformers writes


# ----------------------------------------------------------------------------- shared checks


def parse_dtype(name: str | None, arg: str = "--dtype") -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"{arg} {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def expected_model_state(model_cfg) -> dict[str, torch.Tensor]:
    """Parameter names and shapes of the model `model_cfg` describes (meta tensors)."""
    from flame.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    return model.state_dict()


def check_weights_match(expected: dict, found: dict[str, tuple], what: str, config_what: str) -> None:
    """found: name -> shape. ValueError listing missing, unexpected and mis-shaped weights."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k]))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} weight(s), e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) the config has no place for, e.g. {unexpected[:3]}")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} weight(s) of another shape, e.g. {k}: {tuple(found[k])} in {what}, "
                     f"{tuple(expected[k].shape)} from the config")
    raise ValueError(f"{what} does not match {config_what}: " + "; ".join(parts)
                     + ". Use the config the weights were trained with.")


def _fresh_output(out: str, flag: str) -> str:
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"{flag} {out} already exists; give a new folder (or remove it first)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return out


def _publish(tmp: str, out: str) -> None:
    """Move the finished temporary folder into place (one rename), with the permissions of a
    folder made normally (mkdtemp's are private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    if os.path.isdir(out):
        os.rmdir(out)  # empty, checked by _fresh_output
    os.rename(tmp, out)


# ----------------------------------------------------------------------------- DCP -> HF


def check_checkpoint_folder(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata")):
        return path
    parent = os.path.dirname(path)
    steps = sorted(int(m.group(1)) for d in (os.listdir(parent) if os.path.isdir(parent) else [])
                   if (m := re.fullmatch(r"step-(\d+)", d)) and os.path.isfile(os.path.join(parent, d, ".metadata")))
    if not os.path.isdir(path):
        if re.fullmatch(r"step-\d+", os.path.basename(path)) and os.path.isdir(parent):
            have = f"complete checkpoints there: {', '.join(f'step-{s}' for s in steps)}" if steps else \
                "that folder holds no complete checkpoint"
            raise ValueError(f"--checkpoint {path}: this step does not exist; {have}")
        raise ValueError(f"--checkpoint {path}: no such folder; give a checkpoint folder "
                         "<dump_folder>/checkpoint/step-N")
    subdirs = sorted(d for d in os.listdir(path) if re.fullmatch(r"step-\d+", d))
    hint = (f"; it holds {', '.join(subdirs)}: point at one of them" if subdirs
            else "; give a checkpoint folder <dump_folder>/checkpoint/step-N")
    raise ValueError(f"--checkpoint {path} holds no complete DCP checkpoint (no .metadata file: not a "
                     f"checkpoint, or its save did not finish){hint}")


def find_run_config(checkpoint: str) -> str:
    """The run's saved config: beside the checkpoint, else in the dump folder above it."""
    candidates = [os.path.join(checkpoint, CONFIG_FILE),
                  os.path.join(os.path.dirname(os.path.dirname(checkpoint)), CONFIG_FILE)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise ValueError(f"--checkpoint {checkpoint}: no {CONFIG_FILE} found at {' or '.join(candidates)}; "
                     f"pass the run's config file with --config")


def read_run_config(path: str):
    """(ModelConfig, the [data] table) from a flame TOML file (its `extends` chain followed)."""
    from flame.models import ModelConfig

    with open(path, "rb") as f:
        data = tomllib.load(f)
    if "extends" in data:
        from flame.config import load_config

        cfg = load_config(path)
        return cfg.model, {"tokenizer": cfg.data.tokenizer, "default_vocab_size": cfg.data.default_vocab_size}
    if "model" not in data:
        raise ValueError(f"{path} has no [model] section")
    try:
        model_cfg = ModelConfig.from_dict(data["model"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model_cfg, data.get("data", {})


def dcp_model_weights(checkpoint: str, model_cfg) -> dict:
    """name -> stored tensor metadata (size, dtype) of each model weight in a DCP checkpoint,
    checked against the model the config describes."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    stored = {k: md for k, md in metadata.items() if not k.startswith(TRAINING_STATES)}
    shapes = {k: tuple(md.size) for k, md in stored.items() if hasattr(md, "size")}
    expected = expected_model_state(model_cfg)
    check_weights_match(expected, shapes, f"checkpoint {checkpoint}", "the run's [model] config")
    return {k: stored[k] for k in expected}


def load_dcp_model_state(checkpoint: str, model_cfg, keys=None) -> dict[str, torch.Tensor]:
    """The model weights (all, or `keys`) of a DCP checkpoint as full CPU tensors in their saved
    dtype. DCP reads each tensor's pieces from every rank's file: any sharding loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    stored = dcp_model_weights(checkpoint, model_cfg)
    keys = list(stored) if keys is None else keys
    state = {k: torch.empty(stored[k].size, dtype=stored[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=FileSystemReader(checkpoint))
    return state


def group_by_size(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive names in groups of at most max_bytes (a larger tensor is a group alone)."""
    groups, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return groups + ([current] if current else [])


def _tokenizer(data_table: dict):
    from flame.data.tokenizer import load_tokenizer

    return load_tokenizer(data_table.get("tokenizer", "default"), data_table.get("default_vocab_size", 4096))


def write_hf_folder(out: str, model_cfg, shards, n_shards: int, dtype: torch.dtype, tokenizer=None) -> None:
    """config.json, the weights, tokenizer and remote code into `out` (which must be new).
    `shards` yields n_shards state dicts: one model.safetensors, or numbered files + index."""
    import dataclasses

    from safetensors.torch import save_file

    extra = {}
    if tokenizer is not None:
        extra = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = FlameConfig(**dataclasses.asdict(model_cfg), auto_map=dict(AUTO_MAP), **extra)
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = ["FlameForCausalLM"]
    config.save_pretrained(out)

    weight_map, total = {}, 0
    for i, state in enumerate(shards):
        name = WEIGHTS_FILE if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {HF_PREFIX + k: v.contiguous() for k, v in state.items()}
        save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if n_shards > 1:
        with open(os.path.join(out, WEIGHTS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id).save_pretrained(out)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in REMOTE_CODE:
        shutil.copyfile(os.path.join(here, name), os.path.join(out, name))


def to_hf(checkpoint: str, out: str, dtype: str | None = None, config: str | None = None,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Convert a trainer checkpoint folder to a Hugging Face folder; returns the folder.
    Weights are read and written one shard (at most max_shard_bytes) at a time, so the
    memory needed is one shard, not the model."""
    torch_dtype = parse_dtype(dtype)
    checkpoint = check_checkpoint_folder(checkpoint)
    out = _fresh_output(out, "--out")
    config_path = config or find_run_config(checkpoint)
    model_cfg, data_table = read_run_config(config_path)
    stored = dcp_model_weights(checkpoint, model_cfg)
    out_dtypes = {k: torch_dtype or md.properties.dtype for k, md in stored.items()}
    if len(set(out_dtypes.values())) != 1:
        raise ValueError(f"checkpoint {checkpoint} holds weights of several dtypes "
                         f"{sorted(map(str, set(out_dtypes.values())))}; pass --dtype")
    sizes = {k: math.prod(md.size) * out_dtypes[k].itemsize for k, md in stored.items()}
    groups = group_by_size(sizes, max_shard_bytes)

    def shards():
        for keys in groups:
            state = load_dcp_model_state(checkpoint, model_cfg, keys)
            yield {k: v.to(out_dtypes[k]) for k, v in state.items()}

    tokenizer = _tokenizer(data_table)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.tmp-")
    try:
        write_hf_folder(tmp, model_cfg, shards(), len(groups), next(iter(out_dtypes.values())), tokenizer)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- HF -> DCP


def resolve_hf_folder(model: str) -> str:
    """A local folder, or a hub id downloaded (config, weights, tokenizer) into the HF cache."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    if os.path.exists(model) or model.startswith((".", "/")):
        raise ValueError(f"--model {model}: not a folder; give a Hugging Face model folder or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:
        raise ValueError(f"--model {model}: could not download it from the Hugging Face hub "
                         f"({type(e).__name__}: {e}); download it beforehand and pass the folder") from None


def read_hf_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = os.path.join(folder, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    else:
        found = [os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.bin"))]
        extra = f" (it has {found}: save it again with safe_serialization)" if found else ""
        raise ValueError(f"--model {folder}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}{extra}")
    state = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def read_hf_model(model: str):
    """(folder, ModelConfig, weights under flame's names) of a flame model in HF format."""
    from flame.models import ModelConfig

    folder = resolve_hf_folder(model)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"--model {model}: no config.json in {folder}")
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type != FlameConfig.model_type:
        raise ValueError(f"--model {model}: model_type {model_type!r} is not a flame model "
                         f"({FlameConfig.model_type!r}); only flame exports can be converted")
    config = FlameConfig.from_pretrained(folder)
    try:
        model_cfg = ModelConfig.from_dict(config.model_config_dict())
    except ValueError as e:
        raise ValueError(f"--model {model}: config.json: {e}") from None
    hf_state = read_hf_weights(folder)
    state = {(k[len(HF_PREFIX):] if k.startswith(HF_PREFIX) else k): v for k, v in hf_state.items()}
    check_weights_match(expected_model_state(model_cfg), {k: tuple(v.shape) for k, v in state.items()},
                        f"the weights in {folder}", "its config.json")
    return folder, model_cfg, state


def from_hf(model: str, out: str, dtype: str | None = "float32") -> str:
    """Convert a flame model in HF format into a model-only DCP checkpoint folder."""
    import dataclasses

    import torch.distributed.checkpoint as dcp

    from flame.config import dump_toml

    torch_dtype = parse_dtype(dtype)
    out = _fresh_output(out, "--out")
    folder, model_cfg, state = read_hf_model(model)
    if torch_dtype is not None:
        state = {k: v.to(torch_dtype) for k, v in state.items()}
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.tmp-")
    try:
        with warnings.catch_warnings():  # a single process writes it, on purpose
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp))
        tables = {"model": dataclasses.asdict(model_cfg)}
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            tables["data"] = {"tokenizer": folder}
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(f"# [model] of {model}; train with these keys (e.g. `extends` this file)\n")
            f.write(dump_toml(tables))
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- end of training


def export_run_checkpoint(dump_folder: str, step: int, checkpoint_folder: str = "checkpoint",
                          out: str | None = None, dtype: str | None = None) -> str:
    """The export a trainer runs after its last checkpoint (`checkpoint.export_hf = true`): on
    rank 0, once that save has completed, <dump_folder>/<checkpoint_folder>/step-N ->
    <dump_folder>/hf/step-N (or `out`)."""
    checkpoint = os.path.join(dump_folder, checkpoint_folder, f"step-{step}")
    return to_hf(checkpoint, out or os.path.join(dump_folder, "hf", f"step-{step}"), dtype=dtype)
