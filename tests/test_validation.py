"""Validation during training ([validation]): the logged loss is the mean over the held-out
batches of the weights after that step, on one process and on two FSDP ranks, and evaluating
leaves the training run as it was."""

import dataclasses
import json
import random

import pytest

from test_train import metrics, run, tiny_config

WORDS = "the model reads held out text and predicts every next token of each document in turn".split()


def held_out_file(tmp_path, documents=40, seed=0) -> str:
    rng = random.Random(seed)
    path = tmp_path / "held_out.jsonl"
    with open(path, "w") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))}) + "\n")
    return str(path)


def validation_config(tmp_path, source, **validation):
    return tiny_config(
        tmp_path, training={"steps": 8}, lr_scheduler={"total_steps": 8},
        checkpoint={"enable": True, "interval": 4, "keep_latest_k": 0},
        validation={"enable": True, "freq": 4, "steps": 2, "local_batch_size": 2, "seq_len": 32,
                    "sources": [{"kind": "files", "path": source}], **validation})


def loss_from_checkpoint(cfg_path, checkpoint, dp_size, steps):
    """The mean loss per label token over the validation batches of every rank, computed here
    from the checkpoint's weights with the plain model (no trainer, no Validator)."""
    import torch

    from flame.config import load_config
    from flame.data import build_dataloader, build_tokenizer
    from flame.hf.convert import load_dcp_model_state
    from flame.models import build_model

    cfg = load_config(cfg_path)
    model = build_model(cfg.model)
    model.load_state_dict(load_dcp_model_state(str(checkpoint), cfg.model))
    tokenizer = build_tokenizer(cfg.data)
    data = dataclasses.replace(cfg.data, sources=cfg.validation.sources, shuffle=False, num_workers=0)
    per_rank = []
    for rank in range(dp_size):
        loader = build_dataloader(data, tokenizer, seq_len=cfg.validation.seq_len,
                                  local_batch_size=cfg.validation.local_batch_size, dp_rank=rank,
                                  dp_world_size=dp_size, seed=cfg.training.seed, infinite=False)
        per_rank.append(list(loader))
    count = min(len(b) for b in per_rank)  # the ranks stop together
    if steps > 0:
        count = min(count, steps)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batches in per_rank:
            for b in batches[:count]:
                loss_sum += float(model(b["input_ids"], labels=b["labels"], cu_seqlens=b["cu_seqlens"],
                                        position_ids=b["position_ids"], loss_reduction="sum"))
                tokens += int((b["labels"] != -100).sum())
    return loss_sum / tokens, tokens


def test_validation_loss_is_the_held_out_mean_after_the_step(tmp_path):
    cfg = validation_config(tmp_path, held_out_file(tmp_path))
    with_val, without = tmp_path / "with", tmp_path / "without"
    run(["--config", cfg, "--job.dump_folder", str(with_val)])
    run(["--config", cfg, "--job.dump_folder", str(without), "--validation.enable", "false"])
    a, b = metrics(with_val), metrics(without)
    # evaluating changes nothing in training (bitwise on CPU)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert (a[step]["loss"], a[step]["grad_norm"]) == (b[step]["loss"], b[step]["grad_norm"]), step
        assert ("validation_loss" in a[step]) == (step in (4, 8)), step
        assert "validation_loss" not in b[step]
    for step in (4, 8):
        expected, tokens = loss_from_checkpoint(cfg, with_val / "checkpoint" / f"step-{step}", 1, steps=2)
        assert tokens == 2 * 2 * 32
        assert a[step]["validation_tokens"] == tokens
        assert a[step]["validation_loss"] == pytest.approx(expected, rel=1e-5), step
        assert a[step]["validation_perplexity"] == pytest.approx(2.718281828 ** expected, rel=1e-5)
    assert a[8]["validation_loss"] < a[4]["validation_loss"]  # it learns, so the values mean something


def test_validation_on_two_ranks_reads_every_rank_and_stops_them_together(tmp_path):
    # steps = -1: one pass over the sources, whose two shares give the ranks different numbers
    # of batches; blocks kept gathered from forward to backward, as a training step leaves them
    cfg = validation_config(tmp_path, held_out_file(tmp_path, documents=23, seed=1), steps=-1)
    with_val, without = tmp_path / "with", tmp_path / "without"
    args = ["--config", cfg, "--training.local_batch_size", "2",
            "--parallelism.fsdp_reshard_after_forward", "never"]
    run([*args, "--job.dump_folder", str(with_val)], nproc=2, cpu=True)
    run([*args, "--job.dump_folder", str(without), "--validation.enable", "false"], nproc=2, cpu=True)
    a, b = metrics(with_val), metrics(without)
    for step in b:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-5), step
    expected, tokens = loss_from_checkpoint(cfg, with_val / "checkpoint" / "step-8", 2, steps=-1)
    assert a[8]["validation_tokens"] == tokens
    assert a[8]["validation_loss"] == pytest.approx(expected, rel=1e-5)


def test_validation_bad_input(tmp_path):
    from flame.config import dump_toml, load_config

    source = held_out_file(tmp_path, documents=3)
    cfg = validation_config(tmp_path, source)
    for args, message in [
        (["--validation.freq", "0"], "validation.freq = 0"),
        (["--validation.steps", "-2"], "validation.steps = -2"),
        (["--validation.seq_len", "-1"], "validation.seq_len = -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(cfg, args)
    no_sources = tmp_path / "no_sources.toml"
    no_sources.write_text(f'extends = "{cfg}"\n')
    with pytest.raises(ValueError, match=r"needs held-out documents: add a \[\[validation.sources\]\]"):
        load_config(str(no_sources), ["--validation.sources", "[]"])
    typo = tmp_path / "typo.toml"
    typo.write_text(f'extends = "{cfg}"\n[validation]\nsources = [{{ kind = "files", pth = "x" }}]\n')
    with pytest.raises(ValueError, match="did you mean 'path'"):
        load_config(str(typo))
    # the resolved config (written beside every checkpoint) reads back to the same sources
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(dump_toml(load_config(cfg).to_dict()))
    assert load_config(str(resolved)).validation == load_config(cfg).validation
    # three short documents hold no row of 4096 tokens: refused before training starts
    out = run(["--config", cfg, "--validation.seq_len", "4096"], check=False)
    assert out.returncode == 2
    assert "error: validation.sources hold too few tokens for one row of validation.seq_len = 4096" in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
