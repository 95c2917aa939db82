"""flame's Transformer++ against torchtitan 0.2.2's llama3 at the same size, on one GPU.

Both models have the same shape (~134M parameters with untied 32k-vocab embeddings: dim 768,
12 layers, 12 heads, SwiGLU hidden 2048), the same batch (random tokens, B x 4096), bf16
compute, fp32 master weights, per-block torch.compile and fused AdamW; each is trained the way
its framework trains it on one GPU:

  flame       flame.parallel.parallelize (FSDP2 over the one-GPU mesh with bf16 parameters,
              per-block compile) and the model's fused linear cross-entropy (no logits tensor).
  torchtitan  torchtitan's llama3 Transformer with its own apply_compile on every block and
              its compiled cross-entropy on bf16 logits; on one GPU torchtitan's trainer uses
              autocast instead of FSDP, and so does this loop.

The loop (forward, sum loss / label tokens, backward, clip at 1.0, step, zero_grad) is the
same function for both. Tokens/s and MFU (from flame's FLOPs per token for the same
architecture, over the device's peak dense bf16 FLOP/s) go to benchmarks/results/.

Optionally (--trainer) also times flame's full Trainer (`train.py`, real packed data from the
default corpus with document boundaries) and reads its own metrics.jsonl.

    python benchmarks/titan_compare.py [--batch 8] [--seq 4096] [--steps 30] [--trainer]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE = dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000)
FLAME_OVERRIDES = [
    "--model.mixer", "attention", "--model.dim", "768", "--model.n_layers", "12",
    "--model.n_heads", "12", "--model.n_kv_heads", "12", "--model.vocab_size", "32000",
    "--model.mlp_multiple_of", "256", "--model.tie_embeddings", "false",
    "--compile.enable", "true", "--training.mixed_precision_param", "bfloat16",
]


def time_training(model, loss_of, params, batch, steps, warmup) -> float:
    """Seconds per optimizer step: the mean over `steps` steps after `warmup` steps."""
    from flame import titan

    cuda = batch[0].is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    x, y = batch
    n_tokens = y.numel()

    def step():
        loss = loss_of(x, y) / n_tokens
        loss.backward()
        titan.clip_grad_norm_(params, 1.0)  # handles FSDP's sharded gradients and plain ones
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = (time.perf_counter() - start) / steps
    assert torch.isfinite(loss.detach()), "loss is not finite"
    return elapsed


def _peak_memory_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None


def bench_flame(batch, seq, steps, warmup, shape_overrides=()):
    from flame import titan
    from flame.config import load_config
    from flame.models import build_model
    from flame.parallel import parallelize

    cfg = load_config(os.path.join(ROOT, "train_configs", "debug.toml"),
                      FLAME_OVERRIDES + list(shape_overrides) + [
                          "--training.seq_len", str(seq), "--training.local_batch_size", str(batch)])
    if not torch.cuda.is_available():
        cfg.compile.enable = False
    rt = titan.init_distributed()
    dims = titan.build_parallel_dims(cfg.parallelism, rt.world_size)
    with torch.device("meta"):
        model = build_model(cfg.model)
    parallelize(model, cfg, dims, rt.device)
    model.to_empty(device=rt.device)
    with torch.no_grad():
        model.init_weights()
    flops = model.flops_per_token(seq)
    n_params = model.num_params()

    def loss_of(x, y):
        return model(x, labels=y, loss_reduction="sum")

    data = _random_batch(batch, seq, cfg.model.vocab_size, rt.device)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time_training(model, loss_of, list(model.parameters()), data, steps, warmup)
    mem = _peak_memory_gib(rt.device)
    del model
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds_per_step": t, "params": n_params, "flops_per_token": flops, "peak_mem_gib": mem}


def bench_torchtitan(batch, seq, steps, warmup, shape=SHAPE):
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.config.job_config import Compile
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs
    from torchtitan.models.llama3.infra.parallelize import apply_compile

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = TransformerModelArgs(**shape, n_kv_heads=shape["n_heads"], multiple_of=256,
                                rope_theta=10000, max_seq_len=seq)
    with torch.device("meta"):
        model = Transformer(args)
    if device.type == "cuda":
        apply_compile(model, Compile(enable=True, components=["model", "loss"]))
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    model.train()
    loss_fn = torch.compile(cross_entropy_loss) if device.type == "cuda" else cross_entropy_loss
    n_params, titan_flops = args.get_nparams_and_flops(model, seq)

    def loss_of(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return loss_fn(model(x), y)

    data = _random_batch(batch, seq, shape["vocab_size"], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time_training(model, loss_of, list(model.parameters()), data, steps, warmup)
    mem = _peak_memory_gib(device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds_per_step": t, "params": n_params, "torchtitan_flops_per_token": titan_flops,
            "peak_mem_gib": mem}


def bench_flame_trainer(batch, seq, steps):
    """flame's real Trainer: packed default-corpus data with document boundaries."""
    with tempfile.TemporaryDirectory() as dump:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
               os.path.join(ROOT, "train_configs", "debug.toml"), *FLAME_OVERRIDES,
               "--training.seq_len", str(seq), "--training.local_batch_size", str(batch),
               "--training.steps", str(steps), "--lr_scheduler.warmup_steps", "2",
               "--metrics.log_freq", "10", "--checkpoint.enable", "false", "--job.dump_folder", dump]
        # a fresh process group of its own: drop the variables this process's group set
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if out.returncode != 0:
            return {"error": out.stderr[-3000:]}
        rows = [json.loads(line) for line in open(os.path.join(dump, "metrics.jsonl"))]
    last = rows[-1]  # the window of the last log_freq steps, after compilation
    return {"tokens_per_second": last["tokens_per_second"], "mfu": last["mfu"],
            "loss_first": rows[0]["loss"], "loss_last": last["loss"], "memory_gib": last["memory_gib"]}


def _random_batch(batch, seq, vocab, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--trainer", action="store_true", help="also time flame's full Trainer")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU, no compile: checks that the script runs")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "titan_compare.json"))
    a = p.parse_args()
    if not torch.cuda.is_available() and not a.smoke:
        sys.exit("titan_compare.py needs a CUDA device (or --smoke to check it on the CPU)")

    from flame import titan

    titan.init_logger()
    if a.smoke:
        small = dict(dim=64, n_layers=2, n_heads=2, vocab_size=512)
        flame = bench_flame(a.batch, a.seq, a.steps, a.warmup, [
            "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "2",
            "--model.n_kv_heads", "2", "--model.vocab_size", "512"])
        tt = bench_torchtitan(a.batch, a.seq, a.steps, a.warmup, small)
        print(json.dumps({"flame": flame, "torchtitan": tt}, indent=2))
        return
    flame = bench_flame(a.batch, a.seq, a.steps, a.warmup)
    tt = bench_torchtitan(a.batch, a.seq, a.steps, a.warmup)
    peak = titan.peak_flops(torch.device("cuda"))
    tokens = a.batch * a.seq
    for r in (flame, tt):
        r["tokens_per_second"] = tokens / r["seconds_per_step"]
        # Same architecture, same FLOPs: flame's count (causal attention counted at half) for both.
        r["mfu"] = r["tokens_per_second"] * flame["flops_per_token"] / peak
    result = {
        "benchmark": "flame Transformer++ vs torchtitan 0.2.2 llama3, one GPU",
        "gpu": torch.cuda.get_device_name(), "peak_bf16_flops": peak,
        "torch": torch.__version__, "triton": _version("triton"), "torchtitan": _version("torchtitan"),
        "python": platform.python_version(), "commit": _commit(),
        "shape": {**SHAPE, "ffn_hidden": 2048, "batch": a.batch, "seq_len": a.seq,
                  "steps": a.steps, "warmup": a.warmup},
        "flame": flame, "torchtitan": tt,
        "flame_over_torchtitan_tokens_per_second": flame["tokens_per_second"] / tt["tokens_per_second"],
        "goal": "flame within 5% of torchtitan (ratio >= 0.95)",
    }
    if a.trainer:
        result["flame_trainer"] = bench_flame_trainer(a.batch, a.seq, max(30, a.steps))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    titan.destroy_distributed()


def _version(name):
    with contextlib.suppress(Exception):
        return __import__(name).__version__
    return None


def _commit():
    with contextlib.suppress(Exception):
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    return None


if __name__ == "__main__":
    main()
