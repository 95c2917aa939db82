"""Choice between the Triton kernels and the pure-torch references.

Triton runs on CUDA tensors; the torch reference runs everywhere else. The environment variable
FLAME_BACKEND=triton|torch forces one (with TRITON_INTERPRET=1, the Triton path runs on a CPU).
It is read on every call so that tests can switch it.
"""

import os

import torch

BACKENDS = ("triton", "torch")


def use_triton(*tensors: torch.Tensor | None) -> bool:
    backend = os.environ.get("FLAME_BACKEND", "")
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    if backend:
        raise ValueError(f"FLAME_BACKEND={backend!r} is not one of {BACKENDS}; unset it or pick one")
    return all(t.is_cuda for t in tensors if t is not None)
