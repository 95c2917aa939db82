"""How fast the GPUs of this machine exchange data: NCCL all-gather and all-reduce, bf16.

    torchrun --nproc_per_node=2 benchmarks/nccl_bandwidth.py [--mib 1 16 256]

Rank 0 prints, per size of each rank's tensor, the time per call (mean of 10 after 3 warm-ups)
and the bus bandwidth (NCCL's convention: data moved per link, so that all sizes and ranks
compare with the links' rate). Use it to tell a slow interconnect from ranks that wait for each
other: a traced training step whose collectives take far longer than these times is waiting for
another rank (benchmarks/notes_multi_gpu.md, round 6). NCCL_DEBUG=INFO also shows the transport
NCCL chose (P2P over NVLink, or SHM through host memory).
"""

import argparse
import time

import torch
import torch.distributed as dist


def time_call(fn, calls: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, nargs="+", default=[1, 16, 256], help="MiB of each rank's tensor")
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    for mib in args.mib:
        x = torch.randn(mib * 2**20 // 2, device="cuda", dtype=torch.bfloat16)
        gathered = torch.empty(x.numel() * world, device="cuda", dtype=x.dtype)
        ops = {
            # bus bandwidth factors: all-gather moves (world - 1) / world of the output per
            # link, all-reduce twice that of its tensor
            "all_gather": (lambda: dist.all_gather_into_tensor(gathered, x), gathered.nbytes * (world - 1) / world),
            "all_reduce": (lambda: dist.all_reduce(x), x.nbytes * 2 * (world - 1) / world),
        }
        for name, (fn, bus_bytes) in ops.items():
            seconds = time_call(fn)
            if rank == 0:
                print(f"{name:10s} {mib:5d} MiB per rank  {seconds * 1e3:8.3f} ms  "
                      f"bus {bus_bytes / seconds / 1e9:7.1f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
