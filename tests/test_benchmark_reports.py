"""The bookkeeping of benchmarks/train_throughput.py (the trainer itself stubbed)."""

import argparse
import importlib
import pathlib
import statistics
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def train_throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("train_throughput")
    yield module
    sys.modules.pop("train_throughput", None)


def test_overall_rate_weighs_every_step_by_its_time(train_throughput, monkeypatch, tmp_path):
    """Steps of equal tokens at different rates (a Transformer's documents differ per step): the
    overall rate is their tokens over their total time (harmonic mean), beside the median, and
    each recipe's ratio to the Transformer is given both ways."""
    rates = {"transformer": [50.0, 100.0, 100.0, 100.0, 25.0], "gated_deltanet": [1.0, 150.0, 160.0, 170.0, 150.0]}

    def fake_run(recipe, seq_len, steps, batch, workdir, timeout, compile_model, **kwargs):
        records = [{"step": i + 1, "tokens_per_second": r, "loss": 1.0} for i, r in enumerate(rates[recipe["arch"]])]
        return 0, records, 1.0, "", "train.py"

    monkeypatch.setattr(train_throughput, "run_trainer", fake_run)
    selected = [{"arch": arch, "size": "374M", "path": f"{arch}_374M.toml", "class": "small"} for arch in rates]
    args = argparse.Namespace(seqs=[4096], steps=5, skip=1, timeout=1, no_compile=True, micro_batches=1,
                              num_workers=None, pin_memory=None)
    rows = {row["arch"]: row for row in train_throughput.throughput(args, selected, str(tmp_path))}
    transformer, gdn = rows["transformer"], rows["gated_deltanet"]
    assert transformer["tokens_per_second"] == 100.0  # median of steps 2-5
    assert transformer["tokens_per_second_overall"] == pytest.approx(4 / (3 / 100 + 1 / 25))
    assert gdn["tokens_per_second_overall"] == pytest.approx(statistics.harmonic_mean([150, 160, 170, 150]))
    assert gdn["vs_transformer"] == pytest.approx(155 / 100)
    assert gdn["vs_transformer_overall"] == pytest.approx(
        gdn["tokens_per_second_overall"] / transformer["tokens_per_second_overall"])
    assert gdn["vs_transformer_overall"] > gdn["vs_transformer"]  # the slow Transformer step counts by its time
