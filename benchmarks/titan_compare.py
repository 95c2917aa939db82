"""flame's Transformer++ against torchtitan 0.2.2's llama3 at the same size, on one GPU.

Both models have the same shape (~134M parameters with untied 32k-vocab embeddings: dim 768,
12 layers, 12 heads, SwiGLU hidden 2048), the same batch (random tokens, B x 4096), bf16
compute, fp32 master weights, per-block torch.compile and fused AdamW; each is trained the way
its framework trains it on one GPU:

  flame       flame.parallel.parallelize (per-block compile; one GPU runs without FSDP2, with
              bf16 compute copies of fp32 master weights, flame/precision.py) and the model's
              fused linear cross-entropy (no logits tensor).
  torchtitan  torchtitan's llama3 Transformer with its own apply_compile on every block and
              its compiled cross-entropy on bf16 logits; on one GPU torchtitan's trainer uses
              autocast instead of FSDP, and so does this loop.

The loop (forward, sum loss / label tokens, backward, clip at 1.0, step, zero_grad) is the
same function for both. Tokens/s and MFU (from flame's FLOPs per token for the same
architecture, over the device's peak dense bf16 FLOP/s) go to benchmarks/results/.

Variants of the flame side (--variants), each changing one thing, to measure each suspect of a
gap alone in the same process:

  flame               the framework as it trains (the default)
  flame_flash         SDPA's default kernel order (flash attention first) instead of cuDNN first
  flame_plain_ce      logits + torchtitan's compiled cross-entropy (the very function the
                      torchtitan side compiles) instead of the fused linear cross-entropy
  flame_no_fsdp       the whole model in bf16 (no fp32 master weights), a bound on what the
                      compute copies and fp32 gradients cost
  flame_autocast      fp32 parameters and autocast to bf16, as torchtitan trains on one
                      GPU (the residual stream stays fp32)
  flame_torch_layers  the pure-torch RMSNorm / rotary / SwiGLU inside the compiled blocks, so
                      inductor fuses them with their neighbours, instead of flame's Triton ops

--profile traces one step after warm-up of each variant (torch.profiler) and prints its CUDA
time per kernel group (matmuls, attention, norms/rotary/SwiGLU, loss, optimizer, copies/casts,
...), the output-layer (vocab) matmuls apart, and a side-by-side table of the groups last.
--attention times SDPA's cuDNN, flash and memory-efficient kernels alone at the model's shape
and checks each against an fp32 reference.

Optionally (--trainer) also times flame's full Trainer (`train.py`, real packed data from the
default corpus with document boundaries) and reads its own metrics.jsonl.

    python benchmarks/titan_compare.py [--batch 8] [--seq 4096] [--steps 20] [--profile]
        [--attention] [--variants torchtitan,flame,flame_flash,...] [--time-budget S] [--trainer]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from environment import environment  # noqa: E402

SHAPE = dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000)
FLAME_OVERRIDES = [
    "--model.mixer", "attention", "--model.dim", "768", "--model.n_layers", "12",
    "--model.n_heads", "12", "--model.n_kv_heads", "12", "--model.vocab_size", "32000",
    "--model.mlp_multiple_of", "256", "--model.tie_embeddings", "false",
    "--compile.enable", "true", "--training.mixed_precision_param", "bfloat16",
]
FLAME_VARIANTS = ("flame", "flame_flash", "flame_plain_ce", "flame_no_fsdp", "flame_autocast",
                  "flame_torch_layers")
_NO_FSDP = ("flame_no_fsdp", "flame_autocast")
VARIANTS = ("torchtitan",) + FLAME_VARIANTS
DEFAULT_VARIANTS = ("torchtitan", "flame")


# ------------------------------------------------------------------------------------------
# The training loop both sides share


def make_step(loss_of, params, batch, copies=None):
    """One optimizer step over `batch`; `copies`: flame's one-process ComputeCopies around the
    forward and backward, as its trainer runs them."""
    from flame import titan

    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=batch[0].is_cuda)
    x, y = batch
    n_tokens = y.numel()

    def step():
        if copies is not None:
            copies.begin_step()
        loss = loss_of(x, y) / n_tokens
        loss.backward()
        if copies is not None:
            copies.accumulate()
            copies.end_step()
        titan.clip_grad_norm_(params, 1.0)  # handles FSDP's sharded gradients and plain ones
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def time_training(step, steps, warmup, cuda) -> float:
    """Seconds per optimizer step: the mean over `steps` steps after `warmup` steps."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
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


def run_side(step, steps, warmup, device, profile) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time_training(step, steps, warmup, cuda)
    out = {"seconds_per_step": t, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}
    if profile:
        out["profile"] = profile_step(step, device)
    return out


# ------------------------------------------------------------------------------------------
# Profile of one step: CUDA time per kernel group


# First match wins; the attention patterns come before the matmul ones (cuDNN's attention
# kernels are wgmma kernels too) and the loss before inductor's generic fused kernels.
KERNEL_GROUPS = [
    ("attention", r"flash|fmha|sdpa|cudnn|attention"),
    ("matmul", r"nvjet|gemm|xmma|cutlass|cublas|wgmma|splitk|splitK"),
    ("loss (CE rows)", r"_logit_stats|_logit_grad|nll_loss|log_softmax|cross_entropy"),
    ("norm/rotary/swiglu (flame Triton)", r"^_rms_norm|^_rotary|^_swiglu|^_gated_rms"),
    ("inductor-fused elementwise", r"^triton_"),
    ("optimizer + grad clip", r"adam|Adam|multi_tensor_apply|lpnorm|LpNorm"),
    ("embedding", r"embedding|Embedding|indexSelect|index_select|radix|Radix|sort|Sort|cub::"),
    ("copies/casts/fills (compute copies, autocast, zeroing)",
     r"copy|Copy|chunk_cat|CatArray|cat_|fill|Fill|Memcpy|Memset|split_with_sizes"),
]


# Ranges the profiler also reports on the GPU timeline (a compiled graph's call, the optimizer
# step): they span kernels already counted, so they are left out of the sums.
_ANNOTATION = re.compile(r"^## |^ProfilerStep#|^Optimizer\.|#")


def is_annotation(evt) -> bool:
    return bool(getattr(evt, "is_user_annotation", False)) or bool(_ANNOTATION.search(evt.key))


def kernel_group(name: str) -> str:
    for group, pattern in KERNEL_GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def _device_us(evt, self_time=True) -> float:
    names = (("self_device_time_total", "self_cuda_time_total") if self_time
             else ("device_time_total", "cuda_time_total"))
    for n in names:
        if hasattr(evt, n):
            return float(getattr(evt, n))
    return 0.0


def profile_step(step, device, vocab=SHAPE["vocab_size"]) -> dict:
    """One step under torch.profiler: kernel time per group, the top kernels, and the time of
    the matmuls whose operands involve the vocabulary (output layer / loss) apart."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - start
    groups: dict[str, list] = {}
    kernels = []
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA or is_annotation(evt):
            continue
        us = _device_us(evt)
        if us <= 0:
            continue
        g = kernel_group(evt.key)
        acc = groups.setdefault(g, [0.0, 0])
        acc[0] += us
        acc[1] += evt.count
        kernels.append((us, evt.count, g, evt.key))
    vocab_mm = 0.0
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.key in ("aten::mm", "aten::addmm", "aten::bmm") and any(
                vocab in (s or []) for s in (evt.input_shapes or [])):
            vocab_mm += _device_us(evt, self_time=False)
    total = max(sum(v[0] for v in groups.values()), 1e-9)
    kernels.sort(reverse=True)
    return {
        "step_wall_ms_profiled": 1e3 * wall,
        "kernel_ms": total / 1e3,
        "groups_ms": {g: round(v[0] / 1e3, 3) for g, v in sorted(groups.items(), key=lambda kv: -kv[1][0])},
        "groups_launches": {g: v[1] for g, v in groups.items()},
        "vocab_matmuls_ms": round(vocab_mm / 1e3, 3),
        "top_kernels": [{"ms": round(us / 1e3, 3), "calls": n, "group": g, "name": k[:140]}
                        for us, n, g, k in kernels[:25]],
    }


def print_profile(name: str, p: dict) -> None:
    print(f"\n== {name}: one step, CUDA kernel time {p['kernel_ms']:.1f} ms "
          f"(step wall {p['step_wall_ms_profiled']:.1f} ms under the profiler)")
    for g, ms in p["groups_ms"].items():
        print(f"  {g:<46} {ms:8.2f} ms  {100 * ms / p['kernel_ms']:5.1f}%  "
              f"{p['groups_launches'][g]:5d} launches")
    print(f"  {'  of which matmuls on the vocab (output layer)':<46} {p['vocab_matmuls_ms']:8.2f} ms")
    print("  top kernels:")
    for k in p["top_kernels"][:12]:
        print(f"    {k['ms']:7.2f} ms {k['calls']:4d}x  [{k['group'][:12]}] {k['name'][:90]}")


def print_comparison(results: dict) -> None:
    names = [n for n in results if "profile" in results[n]]
    if not names:
        return
    groups = []
    for n in names:
        groups += [g for g in results[n]["profile"]["groups_ms"] if g not in groups]
    width = max(12, *(len(n) for n in names))
    print("\nCUDA ms per step by kernel group (one profiled step)")
    print(f"{'group':<46}" + "".join(f"{n:>{width + 1}}" for n in names))
    for g in groups:
        print(f"{g[:46]:<46}" + "".join(
            f"{results[n]['profile']['groups_ms'].get(g, 0.0):>{width + 1}.2f}" for n in names))
    print(f"{'  vocab matmuls (included above)':<46}" + "".join(
        f"{results[n]['profile']['vocab_matmuls_ms']:>{width + 1}.2f}" for n in names))
    print(f"{'kernel total':<46}" + "".join(
        f"{results[n]['profile']['kernel_ms']:>{width + 1}.2f}" for n in names))


# ------------------------------------------------------------------------------------------
# The two sides


def _flame_config(batch, seq, shape_overrides=()):
    from flame.config import load_config

    cfg = load_config(os.path.join(ROOT, "train_configs", "debug.toml"),
                      FLAME_OVERRIDES + list(shape_overrides) + [
                          "--training.seq_len", str(seq), "--training.local_batch_size", str(batch)])
    if not torch.cuda.is_available():
        cfg.compile.enable = False
    return cfg


@contextlib.contextmanager
def flame_variant(variant: str):
    """Switch one thing of the framework for the duration of a variant."""
    from flame.kernels import norm as norm_kernels
    from flame.kernels import rotary as rotary_kernels
    from flame.models.mixers import attention
    from flame.modules import swiglu as swiglu_module
    from torch.nn.attention import SDPBackend

    saved_backends = attention.SDPA_BACKENDS
    patched = [norm_kernels, rotary_kernels, swiglu_module]
    saved_dispatch = [m.use_triton for m in patched]
    try:
        if variant == "flame_flash":  # the order SDPA uses when it is not told one
            attention.SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                       SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]
        if variant == "flame_torch_layers":
            for m in patched:
                m.use_triton = lambda *tensors: False
        yield
    finally:
        attention.SDPA_BACKENDS = saved_backends
        for m, f in zip(patched, saved_dispatch):
            m.use_triton = f


def bench_flame(batch, seq, steps, warmup, shape_overrides=(), variant="flame", profile=False):
    from flame import titan
    from flame.models import build_model
    from flame.parallel import apply_compile, parallelize
    from flame.precision import build_compute_copies
    from flame.tensor_parallel import check_parallel_layout

    cfg = _flame_config(batch, seq, shape_overrides)
    rt = titan.init_distributed()
    dims = titan.build_parallel_dims(*check_parallel_layout(cfg.parallelism, rt.world_size), rt.world_size)
    with flame_variant(variant):
        with torch.device("meta"):
            model = build_model(cfg.model)
        if variant in _NO_FSDP:
            if cfg.compile.enable:
                apply_compile(model, cfg.compile.backend)
        else:
            parallelize(model, cfg, dims, rt.device)
        model.to_empty(device=rt.device)
        with torch.no_grad():
            model.init_weights()
        if variant == "flame_no_fsdp" and rt.device.type == "cuda":
            model.to(torch.bfloat16)
        copies = None
        if variant not in _NO_FSDP:
            copies = build_compute_copies(model, rt.world_size, rt.device, cfg.training.mixed_precision_param)
        flops = model.flops_per_token(seq)
        n_params = model.num_params()

        if variant == "flame_plain_ce":
            ce = _compiled_cross_entropy(rt.device)

            def loss_of(x, y):
                return ce(model(x), y)  # model(x) without labels: logits [B, T, V]
        elif variant == "flame_autocast":
            def loss_of(x, y):
                with torch.autocast(rt.device.type, dtype=torch.bfloat16):
                    return model(x, labels=y, loss_reduction="sum")
        else:
            def loss_of(x, y):
                return model(x, labels=y, loss_reduction="sum")

        data = _random_batch(batch, seq, cfg.model.vocab_size, rt.device)
        step = make_step(loss_of, list(model.parameters()), data, copies)
        out = run_side(step, steps, warmup, rt.device, profile)
    del model, step
    _free(rt.device)
    return {**out, "params": n_params, "flops_per_token": flops}


_CE = {}


def _compiled_cross_entropy(device):
    """torchtitan's cross-entropy, compiled once and shared by every side that uses it."""
    from torchtitan.components.loss import cross_entropy_loss

    if device.type not in _CE:
        _CE[device.type] = torch.compile(cross_entropy_loss) if device.type == "cuda" else cross_entropy_loss
    return _CE[device.type]


def bench_torchtitan(batch, seq, steps, warmup, shape=SHAPE, profile=False):
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
    loss_fn = _compiled_cross_entropy(device)
    n_params, titan_flops = args.get_nparams_and_flops(model, seq)

    def loss_of(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return loss_fn(model(x), y)

    data = _random_batch(batch, seq, shape["vocab_size"], device)
    step = make_step(loss_of, list(model.parameters()), data)
    out = run_side(step, steps, warmup, device, profile)
    del model, step
    _free(device)
    return {**out, "params": n_params, "torchtitan_flops_per_token": titan_flops}


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_flame_trainer(batch, seq, steps, timeout=None):
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
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return {"error": f"no result within {timeout} s", "stderr": str(e.stderr or "")[-2000:]}
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


# ------------------------------------------------------------------------------------------
# SDPA kernels alone at the model's attention shape


def bench_attention(batch, seq, heads, head_dim) -> dict:
    """Causal SDPA forward and forward+backward per backend (median ms), each checked against
    an fp32 math reference on the first sequence by relative error norm."""
    import triton.testing
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=g, requires_grad=True) for _ in range(3))
    dy = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    ref_in = [t[:1].detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(*ref_in, is_causal=True)
    ref.backward(dy[:1].float())
    ref_grads = [t.grad for t in ref_in]

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    out = {"shape": {"batch": batch, "seq": seq, "heads": heads, "head_dim": head_dim}}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                def fwd():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

                def fwd_bwd():
                    fwd().backward(dy)

                y = fwd()
                for t in (q, k, v):
                    t.grad = None
                small = [t[:1].detach().requires_grad_() for t in (q, k, v)]
                y1 = F.scaled_dot_product_attention(*small, is_causal=True)
                y1.backward(dy[:1])
                errs = {"out": rel(y1, ref), **{f"d{n}": rel(t.grad, r) for n, t, r in
                                                zip("qkv", small, ref_grads)}}
                f_ms = triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
                fb_ms = triton.testing.do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median",
                                                grad_to_none=[q, k, v])
                del y
            out[name] = {"fwd_ms": f_ms, "fwd_bwd_ms": fb_ms, "rel_err": errs}
        except Exception as e:  # a backend that refuses these inputs
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


# ------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, run in this order; from {', '.join(VARIANTS)}")
    p.add_argument("--profile", action="store_true", help="per-kernel-group CUDA time of one step")
    p.add_argument("--attention", action="store_true", help="time SDPA's kernels alone first")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: start no further variant once this much time has passed")
    p.add_argument("--trainer", action="store_true", help="also time flame's full Trainer")
    p.add_argument("--trainer-timeout", type=float, default=None, help="seconds allowed to the Trainer run")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU, no compile: checks that the script runs")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "titan_compare.json"))
    a = p.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if not torch.cuda.is_available() and not a.smoke:
        sys.exit("titan_compare.py needs a CUDA device (or --smoke to check it on the CPU)")

    from flame import titan

    titan.init_logger()
    # every variant recompiles the blocks once; keep dynamo from giving up on them
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if a.smoke:
        small = dict(dim=64, n_layers=2, n_heads=2, vocab_size=512)
        over = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "2",
                "--model.n_kv_heads", "2", "--model.vocab_size", "512"]
        results = {}
        for v in variants:
            if v == "torchtitan":
                results[v] = bench_torchtitan(a.batch, a.seq, a.steps, a.warmup, small, profile=a.profile)
            else:
                results[v] = bench_flame(a.batch, a.seq, a.steps, a.warmup, over, variant=v,
                                         profile=a.profile)
        print(json.dumps(results, indent=2))
        titan.destroy_distributed()
        return

    started = time.perf_counter()
    result = {
        "benchmark": "flame Transformer++ vs torchtitan 0.2.2 llama3, one GPU",
        "gpu": torch.cuda.get_device_name(), "peak_bf16_flops": titan.peak_flops(torch.device("cuda")),
        "torch": torch.__version__, "triton": _version("triton"), "torchtitan": _version("torchtitan"),
        "cudnn": torch.backends.cudnn.version(), "environment": environment(),
        "shape": {**SHAPE, "ffn_hidden": 2048, "batch": a.batch, "seq_len": a.seq,
                  "steps": a.steps, "warmup": a.warmup},
        "goal": "flame within 5% of torchtitan (ratio >= 0.95)",
    }
    if a.attention:
        result["attention_kernels"] = bench_attention(a.batch, a.seq, SHAPE["n_heads"],
                                                      SHAPE["dim"] // SHAPE["n_heads"])
        _print_attention(result["attention_kernels"])
    results, skipped = {}, []
    for v in variants:
        if a.time_budget is not None and results and time.perf_counter() - started > a.time_budget:
            skipped.append(v)
            continue
        t0 = time.perf_counter()
        try:
            if v == "torchtitan":
                results[v] = bench_torchtitan(a.batch, a.seq, a.steps, a.warmup, profile=a.profile)
            else:
                results[v] = bench_flame(a.batch, a.seq, a.steps, a.warmup, variant=v, profile=a.profile)
        except Exception as e:  # report and go on with the other variants
            results[v] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
            _free(torch.device("cuda"))
        results[v]["wall_seconds_with_compile"] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - started:6.1f}s] {v}: "
              + (f"{1e3 * results[v]['seconds_per_step']:.2f} ms/step" if "seconds_per_step" in results[v]
                 else results[v]["error"][:500]), flush=True)
        if a.profile and "profile" in results[v]:
            print_profile(v, results[v]["profile"])
    flops = next((r["flops_per_token"] for r in results.values() if "flops_per_token" in r), None)
    tokens = a.batch * a.seq
    for r in results.values():
        if "seconds_per_step" in r:
            r["tokens_per_second"] = tokens / r["seconds_per_step"]
            # Same architecture, same FLOPs: flame's count (causal attention counted at half) for all.
            if flops is not None:
                r["mfu"] = r["tokens_per_second"] * flops / result["peak_bf16_flops"]
    result.update(results)
    tt = results.get("torchtitan", {}).get("tokens_per_second")
    if tt:
        result["over_torchtitan_tokens_per_second"] = {
            v: r["tokens_per_second"] / tt for v, r in results.items() if "tokens_per_second" in r}
        if "tokens_per_second" in results.get("flame", {}):
            result["flame_over_torchtitan_tokens_per_second"] = results["flame"]["tokens_per_second"] / tt
    if skipped:
        result["skipped_for_time"] = skipped
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    if a.trainer:  # after the file is written once, so that a slow trainer run loses nothing
        result["flame_trainer"] = bench_flame_trainer(a.batch, a.seq, max(30, a.steps), a.trainer_timeout)
        print(f"flame Trainer (packed documents): {json.dumps(result['flame_trainer'])[:600]}")
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    if a.profile:
        print_comparison(results)
    print(f"\n{'variant':<20}{'ms/step':>9}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>9}{'vs titan':>9}")
    for v, r in results.items():
        if "seconds_per_step" not in r:
            print(f"{v:<20} failed: {r['error'][:200]}")
            continue
        ratio = r["tokens_per_second"] / tt if tt else float("nan")
        print(f"{v:<20}{1e3 * r['seconds_per_step']:>9.2f}{r['tokens_per_second']:>11,.0f}"
              f"{100 * r.get('mfu', float('nan')):>6.1f}%{r['peak_mem_gib']:>9.2f}{ratio:>9.3f}")
    if skipped:
        print(f"skipped (time budget): {', '.join(skipped)}")
    titan.destroy_distributed()


def _print_attention(att: dict) -> None:
    s = att["shape"]
    print(f"SDPA causal, B={s['batch']} T={s['seq']} H={s['heads']} D={s['head_dim']} bf16 (median ms; "
          "rel. error vs fp32 math on one sequence)")
    for name in ("cudnn", "flash", "efficient"):
        r = att.get(name, {})
        if "error" in r:
            print(f"  {name:<10} refused: {r['error'][:150]}")
        else:
            e = r["rel_err"]
            print(f"  {name:<10} fwd {r['fwd_ms']:6.3f}  fwd+bwd {r['fwd_bwd_ms']:6.3f}   err out "
                  f"{e['out']:.1e} dq {e['dq']:.1e} dk {e['dk']:.1e} dv {e['dv']:.1e}")


def _version(name):
    with contextlib.suppress(Exception):
        return __import__(name).__version__
    return None


if __name__ == "__main__":
    main()
