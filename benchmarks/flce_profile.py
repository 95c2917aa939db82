"""Per-kernel CUDA times of flame's fused linear cross-entropy (forward + backward), one call,
with the gradients set to None before it (as in benchmarks/flce.py).

    python benchmarks/flce_profile.py [--tokens 16384] [--hidden 4096] [--vocab 128256]
"""

import argparse

import torch

from flame.kernels import fused_linear_cross_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(args.vocab, args.hidden, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens,), device="cuda")

    def step():
        # gradients set to None first, as in benchmarks/flce.py (no accumulation into old ones)
        x.grad = w.grad = None
        fused_linear_cross_entropy(x, w, target).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


if __name__ == "__main__":
    main()
