"""chunk_simple_gla with q/k heads shared by value heads (Mamba2: one B/C group for all heads)
on one GPU: forward+backward time and the backward's kernels for the per-value-head backward
(dq, dk per value head, summed afterwards) and for variants of the grouped kernels, all timed
in one process, each checked against the per-value-head gradients.

    python benchmarks/grouped_backward.py [--shapes 8x4096 1x32768] [--heads HQ,HV,K,V]
                                          [--variants SPEC ...] [--out PATH]

Shapes are BxT; heads HQ=1, HV=32, K=128, V=64 by default (flame's Mamba2 recipes), bf16;
1x32768 is passed as 8 packed documents of 4096 (cu_seqlens), as the trainer passes packed
batches. A SPEC is `per-head` or comma-separated key=value over `grouped_backward_config()`
and `min_group` (GROUPED_MIN_GROUP; 1 runs the grouped kernels on unshared heads too), all
integers, e.g. `heads=4,dvg_warps=8`; `default` is the default config. Writes JSON (GPU,
torch, Triton, commit) and prints a table last.
"""

import argparse
import contextlib
import json
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flame.kernels.linear_attention as la  # noqa: E402
from environment import environment, write_report  # noqa: E402
from flame.kernels import chunk_simple_gla  # noqa: E402
from kernels import kernel_times, timed  # noqa: E402

HEADS = (1, 32, 128, 64)  # HQ, HV, K, V


def parse_spec(spec: str) -> dict | None:
    """None for the per-value-head backward, else the grouped config the SPEC names."""
    if spec == "per-head":
        return None
    config = dict(la.grouped_backward_config(), min_group=la.GROUPED_MIN_GROUP)
    if spec == "default":
        return config
    for item in spec.split(","):
        key, value = item.split("=")
        if key not in config:
            raise ValueError(f"unknown key {key!r} in {spec!r}; keys: {sorted(config)}")
        config[key] = int(value)
    return config


@contextlib.contextmanager
def variant(config):
    saved = la.GROUPED_BACKWARD, la.GROUPED_MIN_GROUP, la.grouped_backward_config
    la.GROUPED_BACKWARD = config is not None
    if config is not None:
        launch = {key: value for key, value in config.items() if key != "min_group"}
        la.GROUPED_MIN_GROUP = config["min_group"]
        la.grouped_backward_config = lambda: dict(launch)
    try:
        yield
    finally:
        la.GROUPED_BACKWARD, la.GROUPED_MIN_GROUP, la.grouped_backward_config = saved


def inputs(B, T, HQ, HV, K, V):
    dev, bf = "cuda", torch.bfloat16
    cu = None
    if B == 1:
        cu = torch.arange(0, T + 1, 4096, device=dev, dtype=torch.int32)
    q = F.normalize(torch.randn(B, T, HQ, K, device=dev), dim=-1).to(bf)
    k = F.normalize(torch.randn(B, T, HQ, K, device=dev), dim=-1).to(bf)
    v = torch.randn(B, T, HV, V, device=dev, dtype=bf)
    g = F.logsigmoid(torch.randn(B, T, HV, device=dev) + 2.0)
    leaves = [x.requires_grad_() for x in (q, k, v, g)]
    do = torch.randn_like(v)

    def fwdbwd():
        o, _ = chunk_simple_gla(*leaves, scale=1.0, cu_seqlens=cu)
        return torch.autograd.grad(o, leaves, do)

    return fwdbwd


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["8x4096", "1x32768"])
    parser.add_argument("--heads", default=",".join(map(str, HEADS)), help="HQ,HV,K,V")
    parser.add_argument("--variants", nargs="+", default=["per-head", "default"])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    configs = {spec: parse_spec(spec) for spec in args.variants}  # fail on a typo before GPU work
    HQ, HV, K, V = (int(x) for x in args.heads.split(","))
    report = {"environment": environment(), "heads": dict(HQ=HQ, HV=HV, K=K, V=V), "rows": []}
    for shape in args.shapes:
        B, T = (int(x) for x in shape.split("x"))
        fwdbwd = inputs(B, T, HQ, HV, K, V)
        with variant(None):
            reference = [x.clone() for x in fwdbwd()]
        for spec, config in configs.items():
            with variant(config):
                grads = fwdbwd()
                torch.cuda.synchronize()
                row = {"shape": shape, "variant": spec, "config": config, "fwdbwd_ms": timed(fwdbwd),
                       "vs_per_head": {n: rel_err(a, r) for n, a, r in zip("qkvg", grads, reference)}}
                try:
                    row["kernels_fwdbwd_ms"] = {n: round(t, 4) for n, t in kernel_times(fwdbwd).items()}
                except Exception as e:  # noqa: BLE001 - recorded
                    row["kernels_fwdbwd_ms"] = {"error": f"{type(e).__name__}: {e}"[:200]}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
        del fwdbwd, reference
        torch.cuda.empty_cache()
    print(f"{'shape':8s} {'variant':48s} {'f+b ms':>8s}  max rel diff vs per-head; top kernels")
    for row in report["rows"]:
        t = row["fwdbwd_ms"]
        top = ", ".join(f"{n.strip('_')[:34]} {v:.3f}" for n, v in list(row["kernels_fwdbwd_ms"].items())[:4]
                        if isinstance(v, float))
        print(f"{row['shape']:8s} {row['variant']:48s} {t if isinstance(t, str) else f'{t:8.3f}'}  "
              f"{max(row['vs_per_head'].values()):.1e}; {top}")
    write_report(report, args.out, "grouped_backward")


if __name__ == "__main__":
    main()
