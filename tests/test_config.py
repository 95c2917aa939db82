"""flame.config: strict TOML reading, extends, command-line overrides, printing, dry run."""

import os
import tomllib

import pytest

from flame.config import dump_toml, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "train_configs", "debug.toml")


def write(path, text):
    path.write_text(text)
    return str(path)


def test_debug_config_reads_and_validates():
    cfg = load_config(DEBUG)
    assert cfg.model.mixer == "attention"
    assert cfg.training.steps == 100
    assert cfg.checkpoint.enable is True
    assert cfg.source == DEBUG


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path / "x.toml", "[optimizer]\nlrr = 0.1\n")
    with pytest.raises(ValueError) as e:
        load_config(path)
    msg = str(e.value)
    assert "'lrr'" in msg and "[optimizer]" in msg and path in msg and "did you mean 'lr'" in msg


def test_unknown_section_suggests(tmp_path):
    path = write(tmp_path / "x.toml", "[trainig]\nsteps = 3\n")
    with pytest.raises(ValueError, match=r"unknown section \[trainig\].*did you mean 'training'"):
        load_config(path)


def test_unknown_model_key_suggests(tmp_path):
    path = write(tmp_path / "x.toml", "[model]\nn_layer = 3\n")
    with pytest.raises(ValueError, match="did you mean 'n_layers'"):
        load_config(path)


@pytest.mark.parametrize("text,needle", [
    ('[training]\nsteps = "ten"\n', "training.steps"),
    ("[training]\nsteps = 1.5\n", "expected an integer"),
    ("[checkpoint]\nenable = 1\n", "expected true or false"),
    ('[activation_checkpoint]\nmode = "partial"\n', "must be one of"),
    ("[optimizer]\nlr = true\n", "expected a number"),
])
def test_wrong_type_is_a_value_error_naming_the_key_and_file(tmp_path, text, needle):
    path = write(tmp_path / "x.toml", text)
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert needle in str(e.value) and path in str(e.value)


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path / "x.toml", "[optimizer]\nlr = 1\n"))
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)


@pytest.mark.parametrize("text,needle", [
    ("[checkpoint]\nkeep_latest_k = 1\n", "checkpoint.keep_latest_k"),
    ("[training]\nsteps = 0\n", "training.steps"),
    ("[lr_scheduler]\ndecay_ratio = 1.5\n", "lr_scheduler.decay_ratio"),
    ("[model]\nn_layers = 2\nmixer = [\"attention\"]\n", "model.mixer"),
    ('[checkpoint]\nexclude_from_loading = ["dataloder"]\n', "did you mean 'dataloader'"),
])
def test_impossible_values_are_rejected(tmp_path, text, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        load_config(write(tmp_path / "x.toml", text))


def test_extends_chains_and_overrides_in_order(tmp_path):
    write(tmp_path / "base.toml", "[training]\nsteps = 7\nseq_len = 32\n[optimizer]\nlr = 0.5\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.toml", 'extends = "../base.toml"\n[training]\nseq_len = 64\n')
    top = write(tmp_path / "sub" / "top.toml", 'extends = "mid.toml"\n[optimizer]\nlr = 0.25\n')
    cfg = load_config(top)
    assert (cfg.training.steps, cfg.training.seq_len, cfg.optimizer.lr) == (7, 64, 0.25)


def test_extends_error_names_the_file_that_set_the_key(tmp_path):
    base = write(tmp_path / "base.toml", "[training]\nstepz = 7\n")
    top = write(tmp_path / "top.toml", 'extends = "base.toml"\n')
    with pytest.raises(ValueError) as e:
        load_config(top)
    assert base in str(e.value) and "did you mean 'steps'" in str(e.value)


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ValueError, match="cycle"):
        load_config(str(tmp_path / "a.toml"))


def test_missing_file_and_missing_parent(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        load_config(str(tmp_path / "nope.toml"))
    top = write(tmp_path / "top.toml", 'extends = "gone.toml"\n')
    with pytest.raises(ValueError, match=r"gone\.toml.*extended by"):
        load_config(top)


def test_cli_overrides_are_typed(tmp_path):
    cfg = load_config(DEBUG, ["--training.steps", "5", "--optimizer.lr=0.01", "--checkpoint.enable",
                              "false", "--metrics.enable_tensorboard",
                              "--checkpoint.exclude_from_loading", "dataloader,lr_scheduler",
                              "--lr_scheduler.decay_ratio", "none", "--model.attn_layers", "[0, 1]"])
    assert cfg.training.steps == 5 and cfg.optimizer.lr == 0.01
    assert cfg.checkpoint.enable is False and cfg.metrics.enable_tensorboard is True
    assert cfg.checkpoint.exclude_from_loading == ["dataloader", "lr_scheduler"]
    assert cfg.lr_scheduler.decay_ratio is None and cfg.model.attn_layers == [0, 1]


@pytest.mark.parametrize("args,needle", [
    (["--training.stepz", "5"], "did you mean --training.steps|did you mean 'steps'"),
    (["--training.steps", "five"], "expected an integer"),
    (["--traning.steps", "5"], "did you mean 'training'"),
    (["steps=5"], "overrides look like"),
    (["--training.seq_len", "0"], r"training\.seq_len"),
    (["--parallelism.fsdp_blocks_per_unit", "0"], r"parallelism\.fsdp_blocks_per_unit = 0: must be >= 1"),
])
def test_bad_cli_overrides(args, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(DEBUG, args)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(DEBUG, ["--training.steps", "3", "--model.attn_layers", "[1]"])
    text = cfg.to_toml()
    tomllib.loads(text)  # valid TOML
    again = load_config(write(tmp_path / "resolved.toml", text))
    assert again.to_dict() == cfg.to_dict()


def test_dump_toml_escapes_strings():
    text = dump_toml({"job": {"description": 'a "quoted"\\ line\nnext', "x": None}})
    assert tomllib.loads(text)["job"] == {"description": 'a "quoted"\\ line\nnext'}


def test_print_config_and_dry_run_exit_zero(capsys):
    from flame.train import main

    assert main(["--config", DEBUG, "--print-config", "--training.steps", "9"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["training"]["steps"] == 9

    assert main(["--config", DEBUG, "--dry-run"]) == 0
    out = capsys.readouterr().out
    for needle in ("parameters", "without embeddings", "FLOPs per token", "optimizer states",
                   "activations", "memory per GPU", "1 GPU, no FSDP", "compute copies (bf16)"):
        assert needle in out


@pytest.mark.parametrize("args,needle", [
    (["--config", "/nonexistent/job.toml"], "config file not found: /nonexistent/job.toml"),
    (["--config", DEBUG, "--optimizer.lrr", "1"], "did you mean 'lr'"),
    ([], "--config is required"),
])
def test_entry_point_reports_config_errors_in_one_line(capsys, args, needle):
    from flame.train import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_dry_run_numbers_match_the_model():
    import torch

    from flame.config import dry_run_report
    from flame.models import build_model

    cfg = load_config(DEBUG, ["--parallelism.data_parallel_shard_degree", "4"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    report = dry_run_report(cfg, world_size=4)
    total = model.num_params(include_embeddings=True)
    assert f"{total / 1e6:.2f}M parameters" in report
    assert "FSDP degree 4" in report
    # fp32 AdamW moments sharded four ways
    assert f"{8 * total / 4 / 1024 ** 3:8.2f} GiB" in report
    # the other three quarters of the blocks' bf16 compute copies, while kept gathered
    body = model.num_params(include_embeddings=False)
    assert cfg.training.mixed_precision_param == "bfloat16"
    assert f"gathered blocks (bf16)  {2 * body * 3 / 4 / 1024 ** 3:8.2f} GiB" in report
