"""Fused layers at [32768, 2048] bf16 on one GPU: RMSNorm (plain and with the residual add),
gated RMSNorm, short causal convolution (8 documents of 4096 tokens, kernel 4) and SwiGLU.

    python benchmarks/layers.py

Each beside torch eager and torch.compile of the same computation, forward and forward+backward.
Achieved bandwidth = the bytes the operation must move at the least (each input read once, each
output written once) over the median do_bench time, next to the device-to-device copy bandwidth
measured in the same run (a 2 GiB tensor copy: read + write).
"""

import json
import pathlib
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flame.kernels.conv import causal_conv1d  # noqa: E402
from flame.kernels.norm import gated_rms_norm, rms_norm  # noqa: E402
from flame.modules.swiglu import swiglu  # noqa: E402

from environment import environment  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def write(name: str, payload: dict) -> pathlib.Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
    return path



ROWS, DIM, EPS = 32768, 2048, 1e-6
DOCS, KERNEL = 8, 4


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


# plain-torch versions of each computation (eager, and compiled by torch.compile)
def rms_norm_torch(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).to(x.dtype)


def rms_norm_residual_torch(x, r, w):
    s = x + r
    return rms_norm_torch(s, w), s


def gated_norm_torch(x, g, w):
    return (rms_norm_torch(x, w).float() * F.silu(g.float())).to(x.dtype)


def conv_torch(x, w):
    b, t, c = x.shape
    y = F.conv1d(F.pad(x.transpose(1, 2), (KERNEL - 1, 0)), w[:, None, :], groups=c)
    return F.silu(y).transpose(1, 2)


def swiglu_torch(a, b):
    return F.silu(a) * b


def flame_rms_norm_residual(x, r, w):
    return rms_norm(x, w, r)


def cases():
    x = torch.randn(ROWS, DIM, device="cuda", dtype=torch.bfloat16)
    r, g = torch.randn_like(x), torch.randn_like(x)
    w = torch.randn(DIM, device="cuda", dtype=torch.bfloat16)
    xc = x.view(DOCS, ROWS // DOCS, DIM)
    wc = torch.randn(DIM, KERNEL, device="cuda", dtype=torch.bfloat16) / 2
    e = x.numel() * x.element_size()  # bytes of one [32768, 2048] tensor
    # name: (inputs, flame fn, torch fn, forward bytes, forward+backward bytes)
    return {
        "rms_norm": ((x, w), lambda x, w: rms_norm(x, w)[0], rms_norm_torch, 2 * e, 5 * e),
        "rms_norm_residual": ((x, r, w), flame_rms_norm_residual, rms_norm_residual_torch, 4 * e, 8 * e),
        "gated_rms_norm": ((x, g, w), gated_rms_norm, gated_norm_torch, 3 * e, 8 * e),
        "short_conv": ((xc, wc), lambda x, w: causal_conv1d(x, w, None, "silu")[0], conv_torch, 2 * e, 5 * e),
        "swiglu": ((x, g), swiglu, swiglu_torch, 3 * e, 8 * e),
    }


def time_fwd(fn, inputs):
    with torch.no_grad():
        return do_bench(lambda: fn(*inputs), warmup=25, rep=200, return_mode="median")


def time_fwd_bwd(fn, inputs):
    leaves = [i.detach().requires_grad_() for i in inputs]
    # output gradients made once, outside the timed region: filling them is not the layer's work
    with torch.no_grad():
        out = fn(*leaves)
    grads = [torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,))]

    def run():
        out = fn(*leaves)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

    return do_bench(run, warmup=25, rep=200, grad_to_none=leaves, return_mode="median")


def main():
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s")
    results = {}
    for name, (inputs, ours, plain, fwd_bytes, fwd_bwd_bytes) in cases().items():
        impls = {"flame": ours, "torch_eager": plain, "torch_compile": torch.compile(plain)}
        results[name] = {}
        for impl, fn in impls.items():
            entry = {}
            try:
                for mode, timer, nbytes in (("fwd", time_fwd, fwd_bytes), ("fwd_bwd", time_fwd_bwd, fwd_bwd_bytes)):
                    ms = timer(fn, inputs)
                    gbs = nbytes / ms / 1e6
                    entry[mode] = {"ms": ms, "GB/s": gbs, "fraction_of_copy": gbs / copy_gbs}
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {e}"
            results[name][impl] = entry
            print(f"{name:18s} {impl:14s} " + "  ".join(
                f"{m}: {v['ms']:.3f} ms {v['GB/s']:.0f} GB/s ({v['fraction_of_copy']:.0%})" if "ms" in v else f"{m}: {v}"
                for m, v in entry.items()), flush=True)
    write("layers", {"shape": {"rows": ROWS, "dim": DIM, "dtype": "bfloat16", "conv_docs": DOCS, "conv_kernel": KERNEL},
                     "copy_GB/s": copy_gbs, "goal": "flame >= 85% of copy bandwidth", "results": results})


if __name__ == "__main__":
    main()
