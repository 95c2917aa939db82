"""Host time of one AdamW step and one gradient clipping over DTensor parameters: torch's
implementations (DTensor dispatch per tensor) beside flame.optim's (local shards), same run.

    python benchmarks/optimizer_host.py [--tensors 435] [--device cpu|cuda] [--out PATH]

AdamW is timed in both of its multi-tensor implementations (fused, the trainer's default, and
foreach).

One process, a mesh of one rank (the per-tensor host work does not depend on the rank count),
435 small parameters sharded on dim 0 as FSDP2 leaves them (the gated_deltanet_374M recipe has
~18 per block over 24 blocks). The tensors are small, so the time is the host's; on CUDA each
timed call is followed by a synchronisation. Writes JSON to benchmarks/results/.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from environment import environment  # noqa: E402
from flame import optim  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def sharded_params(mesh, n: int, device: str):
    params = []
    for _ in range(n):
        p = torch.nn.Parameter(distribute_tensor(torch.randn(64, 16, device=device), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.randn(64, 16, device=device), mesh, [Shard(0)])
        params.append(p)
    return params


def ms_per_call(fn, device: str, calls: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tensors", type=int, default=435)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh(args.device, (1,))
        rows = {}
        for name, cls, clip in (("torch (DTensor dispatch)", torch.optim.AdamW, None),
                                ("flame.optim (local shards)", optim.AdamW, optim.clip_grad_norm_)):
            params = sharded_params(mesh, args.tensors, args.device)
            groups = [{"params": params[:300], "weight_decay": 0.1}, {"params": params[300:], "weight_decay": 0.0}]
            row = {f"adamw_{impl}_step_ms": ms_per_call(cls(groups, lr=1e-3, **{impl: True}).step, args.device)
                   for impl in ("fused", "foreach")}
            if clip is None:
                def clip(ps, max_norm):
                    return torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=True)
            row["clip_grad_norm_ms"] = ms_per_call(lambda: clip(params, 1.0), args.device)
            rows[name] = row
            print(f"{name:28s} " + "   ".join(f"{k} {v:8.3f}" for k, v in row.items()), flush=True)
    finally:
        dist.destroy_process_group()
    report = {"benchmark": "optimizer_host", "environment": environment(), "device": args.device,
              "tensors": args.tensors, "shape": [64, 16], "mesh": "1 rank, Shard(0)",
              "timing": "median wall ms of 30 calls after 5, host included (CUDA: synchronised)",
              "rows": rows}
    out = args.out or RESULTS / f"optimizer_host_{args.device}.json"
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
