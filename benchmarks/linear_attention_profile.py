"""chunk_gla and chunk_simple_gla on one GPU: first call, forward and forward+backward times,
per-kernel CUDA times (torch.profiler) of forward+backward, and the same for variants of the
two GLA kernels on 16-row blocks, each timed beside the default in the same process.

    python benchmarks/linear_attention_profile.py [--shapes 8x4096 1x32768] [--kernels gla simple_gla]
                                                  [--variants SPEC ...] [--forwards auto fused chunked]
                                                  [--backwards SPEC ...]
                                                  [--out PATH]

A variant SPEC is comma-separated key=value over the keys of
`flame.kernels.linear_attention.gla_intra_config()` (integers; 0/1 for the switches, None for
a default), e.g. `grad_unroll=4,grad_scratch=1,grad_split=1`; `default` names the default
itself (a second timing of it, for the spread). The variants only change the GLA kernels, so
they are timed for gla alone. --forwards times simple_gla with each forward of a scalar gate
beside the default (`auto`: `fused_forward` decides; `fused`: one kernel serial over each
segment's chunks; `chunked`: cumsum, state pass and output kernel), with the forward's own
kernel times. --backwards times simple_gla's fused backward with other launches (SPECs over
the keys of `scalar_backward_config()`, e.g. `block_v=64,warps=8,stages=2`). --heads-fast 0 1
times both kernels with each order of the chunk-parallel grids (flame.kernels.utils.HEADS_FAST);
--backward-modes with each FLAME_GLA_BACKWARD (what the forward keeps for the backward). Shapes BxT have
H=16, K=V=128; BxTxHxKxV names them all. bf16. Writes JSON (GPU, torch, Triton, commit) to benchmarks/results/ and prints a table last.
"""

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flame.kernels.linear_attention as la  # noqa: E402
import flame.kernels.utils as kernel_utils  # noqa: E402
from environment import environment, write_report  # noqa: E402
from flame.kernels import chunk_gla, chunk_simple_gla  # noqa: E402
from kernels import autograd_calls, kernel_times, timed  # noqa: E402
from ptxas_report_gla import VARIANTS, parse_spec  # noqa: E402

INTRA_KERNELS = ("chunk_gla_scores_kernel", "chunk_gla_intra_grad_kernel")
DEFAULT_VARIANTS = ["default"] + VARIANTS  # the default twice: the spread of one setting


@contextlib.contextmanager
def config_spec(name: str, spec: str):
    """Runs the block with the config function `la.<name>` (gla_intra_config,
    scalar_backward_config) answering the SPEC's config."""
    saved = getattr(la, name)
    config = parse_spec(spec, saved())
    setattr(la, name, lambda: dict(config))
    try:
        yield
    finally:
        setattr(la, name, saved)


@contextlib.contextmanager
def heads_fast(on: bool):
    """Runs the block with the chunk-parallel grids' head axis fastest-varying (on) or not."""
    saved = kernel_utils.HEADS_FAST
    kernel_utils.HEADS_FAST = on
    try:
        yield
    finally:
        kernel_utils.HEADS_FAST = saved


def parse_shape(shape: str) -> tuple:
    """BxT (16 heads of K = V = 128) or BxTxHxKxV."""
    dims = [int(x) for x in shape.split("x")]
    if len(dims) == 2:
        dims += [16, 128, 128]
    if len(dims) != 5:
        raise ValueError(f"a shape is BxT or BxTxHxKxV, got {shape!r}")
    return tuple(dims)


def inputs(kernel, B, T, H=16, K=128, V=128):
    """Closures running the forward and the forward+backward (gradients of q, k, v, g)."""
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(B, T, H, K, device=dev, dtype=bf)
    k = torch.randn(B, T, H, K, device=dev, dtype=bf)
    v = torch.randn(B, T, H, V, device=dev, dtype=bf)
    if kernel == "gla":
        g = F.logsigmoid(torch.randn(B, T, H, K, device=dev)) / 16  # as benchmarks/kernels.py
        fn = chunk_gla
    else:
        g = F.logsigmoid(torch.randn(B, T, H, device=dev))
        fn = chunk_simple_gla
    leaves = [x.requires_grad_() for x in (q, k, v, g)]
    fwd, _, fwdbwd = autograd_calls(fn, leaves, torch.randn_like(v))
    return fwd, fwdbwd



@contextlib.contextmanager
def forced_forward(choice: str):
    """Runs the block with the forward forced (fused, chunked) or left to the rule."""
    saved = la.fused_forward
    if choice != "auto":
        la.fused_forward = lambda *args, on=choice == "fused": on
    try:
        yield
    finally:
        la.fused_forward = saved


def profiled(fn):
    try:
        return {k: round(v, 4) for k, v in kernel_times(fn).items()}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def intra_times(profile: dict) -> dict:
    """CUDA ms per fwd+bwd call of the two 16-row-block kernels (None where not launched)."""
    times = {}
    for name in INTRA_KERNELS:
        found = [v for k, v in profile.items() if k.startswith(name) and isinstance(v, float)]
        times[name] = round(sum(found), 4) if found else None
    return times


def fmt(x, width=7):
    if x is None:
        return f"{'-':>{width}s}"
    return f"{x:{width}.3f}" if isinstance(x, float) else f"{'err':>{width}s}"


def print_table(rows):
    print(f"{'kernel':11s} {'shape':16s} {'variant':84s} {'fwd':>7s} {'f+b':>7s} {'scores':>7s} {'intra':>7s}")
    for row in rows:
        shape = "x".join(str(row[d]) for d in "BTHKV")
        entries = [("default", row)] + list(row["variants"].items())
        for spec, entry in entries:
            intra = entry.get("intra_kernels_fwdbwd_ms", {})
            print(f"{row['kernel']:11s} {shape:16s} {spec:84s} {fmt(entry.get('fwd_ms'))} {fmt(entry['fwdbwd_ms'])} "
                  f"{fmt(intra.get(INTRA_KERNELS[0]))} {fmt(intra.get(INTRA_KERNELS[1]))}")
            if spec.startswith("backward:"):
                print("    f+b:", ", ".join(f"{k.strip('_').replace('_kernel', '')} {v:.3f}"
                                         for k, v in list(entry["profile_fwdbwd_ms"].items())[:3] if isinstance(v, float)))
        profile = list(row["profile_fwdbwd_ms"].items())[:6]
        print("    default f+b:", ", ".join(f"{k.strip('_').replace('_kernel', '')} {v:.3f}" for k, v in profile
                                         if isinstance(v, float)))
    print("scores: the forward's chunk_gla_scores_kernel per call (the backward reuses A); "
          "intra: chunk_gla_intra_grad_kernel; both ms from the fwd+bwd profile.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["8x4096", "1x32768"])
    parser.add_argument("--kernels", nargs="+", default=["gla", "simple_gla"], choices=["gla", "simple_gla"])
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS,
                        help="variant SPECs timed beside the default for gla at every shape")
    parser.add_argument("--forwards", "--scalar-forwards", nargs="*", default=[], choices=["auto", "fused", "chunked"])
    parser.add_argument("--backwards", nargs="*", default=[],
                        help="SPECs over the keys of scalar_backward_config() timed for simple_gla, e.g. "
                             "block_v=64,warps=8,stages=2")
    parser.add_argument("--backward-modes", nargs="*", default=[], choices=list(la.BACKWARD_MODES),
                        help="time each kernel with FLAME_GLA_BACKWARD set to each mode (what the forward keeps "
                             "for the backward)")
    parser.add_argument("--heads-fast", nargs="*", type=int, default=[], choices=[0, 1],
                        help="time each kernel with utils.HEADS_FAST set to each value (the chunk-parallel "
                             "grids' head axis fastest-varying or not)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    for shape in args.shapes:  # fail on a typo before any GPU work
        parse_shape(shape)
    for spec in args.variants:
        parse_spec(spec, la.gla_intra_config())
    for spec in args.backwards:
        parse_spec(spec, la.scalar_backward_config())
    report = {"environment": environment(), "default_config": la.gla_intra_config(), "rows": []}
    for shape in args.shapes:
        B, T, H, K, V = parse_shape(shape)
        for kernel in args.kernels:
            fwd, fwdbwd = inputs(kernel, B, T, H, K, V)
            start = time.perf_counter()
            fwdbwd()
            torch.cuda.synchronize()
            row = {"kernel": kernel, "B": B, "T": T, "H": H, "K": K, "V": V, "first_call_s": round(time.perf_counter() - start, 2),
                   "fwd_ms": timed(fwd), "fwdbwd_ms": timed(fwdbwd)}
            row["profile_fwdbwd_ms"] = profiled(fwdbwd)
            row["intra_kernels_fwdbwd_ms"] = intra_times(row["profile_fwdbwd_ms"])
            row["variants"] = {}
            for choice in args.forwards if kernel == "simple_gla" else []:
                with forced_forward(choice):
                    fwdbwd()  # the first call of this forward compiles it
                    fwd()
                    entry = {"fwd_ms": timed(fwd), "fwdbwd_ms": timed(fwdbwd), "profile_fwd_ms": profiled(fwd),
                             "profile_fwdbwd_ms": profiled(fwdbwd)}
                row["variants"][f"forward={choice}"] = entry
            for mode in args.backward_modes:
                with mock.patch.dict(os.environ, {"FLAME_GLA_BACKWARD": mode}):
                    fwdbwd()  # the first call of this mode compiles its kernels
                    entry = {"fwdbwd_ms": timed(fwdbwd), "profile_fwdbwd_ms": profiled(fwdbwd)}
                row["variants"][f"backward:mode={mode}"] = entry
            for value in args.heads_fast:
                with heads_fast(bool(value)):
                    fwdbwd()  # the first call of this grid order compiles it
                    entry = {"fwd_ms": timed(fwd), "fwdbwd_ms": timed(fwdbwd), "profile_fwdbwd_ms": profiled(fwdbwd)}
                row["variants"][f"heads_fast={value}"] = entry
            for spec in args.backwards if kernel == "simple_gla" else []:
                with config_spec("scalar_backward_config", spec):
                    fwdbwd()  # the first call of this launch compiles it
                    entry = {"config": la.scalar_backward_config(), "fwdbwd_ms": timed(fwdbwd),
                             "profile_fwdbwd_ms": profiled(fwdbwd)}
                row["variants"][f"backward:{spec}"] = entry
            for spec in args.variants if kernel == "gla" else []:
                with config_spec("gla_intra_config", spec):
                    entry = {"config": la.gla_intra_config(), "fwd_ms": timed(fwd), "fwdbwd_ms": timed(fwdbwd)}
                    entry["intra_kernels_fwdbwd_ms"] = intra_times(profiled(fwdbwd))
                row["variants"][spec] = entry
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            del fwd, fwdbwd
            torch.cuda.empty_cache()
    print_table(report["rows"])
    write_report(report, args.out, "linear_attention_profile")


if __name__ == "__main__":
    main()
