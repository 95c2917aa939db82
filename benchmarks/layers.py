"""Fused layers at [32768, 2048] bf16 on one GPU: RMSNorm (plain and with the residual add),
gated RMSNorm, Mamba2's skip-gated RMSNorm (32 heads; also with x and z as channel slices of
wider tensors, as Mamba2 passes them), short causal convolution (8 documents of 4096 tokens,
kernel 4; also as the fused q, k, v projection's, `causal_conv1d_qkv`: the GDN 374M layer's
widths, q and k normalised per head of 128) and SwiGLU.

    python benchmarks/layers.py
    python benchmarks/layers.py --only skip_gated_rms_norm skip_gated_rms_norm_slices

Each beside torch eager and torch.compile of the same computation, forward and forward+backward.
Achieved bandwidth = the bytes the operation must move at the least (each input read once, each
output written once) over the median do_bench time, next to the device-to-device copy bandwidth
measured in the same run (a 2 GiB tensor copy: read + write). Two times per row:
- `ms`: the median do_bench time of the whole call (host work included: when the host takes
  longer than the kernels to issue a call, the GPU waits and this shows it);
- `gpu_ms`: the sum of the kernels' device times per call, from torch.profiler (no host time).
The backward is taken with torch.autograd.grad (gradients returned, not accumulated into
leaves: a leaf's AccumulateGrad copies a gradient tensor that two leaves share, as the residual
norm's dx = dresidual does, which a model's non-leaf inputs never pay).

    python benchmarks/layers.py --sweep   # also: flame's kernels at other tile settings
"""

import json
import pathlib
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flame.kernels.conv as conv_kernels  # noqa: E402
import flame.kernels.norm as norm_kernels  # noqa: E402
from flame.kernels.conv import causal_conv1d, causal_conv1d_qkv, l2_normalize_heads  # noqa: E402
from flame.kernels.norm import gated_rms_norm, rms_norm  # noqa: E402
from flame.kernels.skip_gated_norm import skip_gated_rms_norm  # noqa: E402
from flame.modules.swiglu import swiglu  # noqa: E402

from environment import environment  # noqa: E402
from kernels import kernel_times  # noqa: E402

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


def skip_gated_norm_torch(y, x, D, z, w):
    heads = D.shape[0]
    s = y.float() + (x.float().view(ROWS, heads, -1) * D.float()[:, None]).view(ROWS, DIM)
    return rms_norm_torch((s * F.silu(z.float())).to(y.dtype), w)


def conv_torch(x, w):
    b, t, c = x.shape
    y = F.conv1d(F.pad(x.transpose(1, 2), (KERNEL - 1, 0)), w[:, None, :], groups=c)
    return F.silu(y).transpose(1, 2)


QKV_WIDTHS, QKV_HEAD = (512, 512, 1024), 128  # the GDN 374M layer's q, k, v channels (then 8 gate channels)


def conv_qkv_torch(x, w):
    """The fused projection's convolution composed as before causal_conv1d_qkv: the convolution
    over the first channels, the split, F.normalize of q and k per head, the gates' channels."""
    c = sum(QKV_WIDTHS)
    q, k, v = conv_torch(x[..., :c], w).split(QKV_WIDTHS, dim=-1)
    q, k = l2_normalize_heads(q, QKV_HEAD, 1e-6), l2_normalize_heads(k, QKV_HEAD, 1e-6)
    return q, k, v, x[..., c:]


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
    cu = torch.arange(0, ROWS + 1, ROWS // DOCS, device="cuda", dtype=torch.int32)
    e = x.numel() * x.element_size()  # bytes of one [32768, 2048] tensor
    D = torch.rand(32, device="cuda", dtype=torch.float32)
    # Mamba2 375M: x a slice of the conv output [.., 2048 + 2 x 128], z of the input projection
    # (4384 channels; torch.compile pads such rows to 4416)
    xs = torch.randn(ROWS, DIM + 256, device="cuda", dtype=torch.bfloat16)[:, :DIM]
    zs = torch.randn(ROWS, 4416, device="cuda", dtype=torch.bfloat16)[:, :DIM]
    xq = torch.randn(DOCS, ROWS // DOCS, DIM + 8, device="cuda", dtype=torch.bfloat16)
    # name: (inputs, flame fn, torch fn, forward bytes, forward+backward bytes)
    return {
        "rms_norm": ((x, w), lambda x, w: rms_norm(x, w)[0], rms_norm_torch, 2 * e, 5 * e),
        "rms_norm_residual": ((x, r, w), flame_rms_norm_residual, rms_norm_residual_torch, 4 * e, 8 * e),
        "gated_rms_norm": ((x, g, w), gated_rms_norm, gated_norm_torch, 3 * e, 8 * e),
        # forward: y, x, z read, the output written; backward: dout, y, x, z read, dy, dx, dz written
        "skip_gated_rms_norm": ((x, r, D, g, w), skip_gated_rms_norm, skip_gated_norm_torch, 4 * e, 11 * e),
        "skip_gated_rms_norm_slices": ((x, xs, D, zs, w), skip_gated_rms_norm, skip_gated_norm_torch, 4 * e, 11 * e),
        "short_conv": ((xc, wc), lambda x, w: causal_conv1d(x, w, None, "silu")[0], conv_torch, 2 * e, 5 * e),
        # the training path: the same 8 documents packed in one row, with cu_seqlens (torch: the batch)
        "short_conv_packed": ((xc, wc), lambda x, w: causal_conv1d(x.view(1, ROWS, DIM), w, None, "silu", cu)[0],
                              conv_torch, 2 * e, 5 * e),
        # the projection output [.., 2048 + 8] in, q, k, v and the 8 gate channels out (and back)
        "short_conv_qkv": ((xq, wc), lambda x, w: causal_conv1d_qkv(x.view(1, ROWS, -1), w, None, "silu", cu,
                                                                    QKV_WIDTHS, QKV_HEAD),
                           conv_qkv_torch, 2 * e, 5 * e),
        "swiglu": ((x, g), swiglu, swiglu_torch, 3 * e, 8 * e),
    }


def fwd_call(fn, inputs):
    def run():
        with torch.no_grad():
            fn(*inputs)

    return run


def fwd_bwd_call(fn, inputs):
    leaves = [i.detach().requires_grad_() for i in inputs]
    # output gradients made once, outside the timed region: filling them is not the layer's work
    with torch.no_grad():
        out = fn(*leaves)
    grads = [torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,))]

    def run():
        out = fn(*leaves)
        torch.autograd.grad(out if isinstance(out, tuple) else (out,), leaves, grads)

    return run


def measure(run, nbytes: int, copy_gbs: float, profile: bool = True) -> dict:
    ms = do_bench(run, warmup=25, rep=200, return_mode="median")
    entry = {"ms": ms, "GB/s": nbytes / ms / 1e6, "fraction_of_copy": nbytes / ms / 1e6 / copy_gbs}
    if profile:
        try:
            per_kernel = kernel_times(run, iters=20)  # largest first
            gpu_ms, kernels = sum(per_kernel.values()), dict(list(per_kernel.items())[:4])
            entry.update({"gpu_ms": gpu_ms, "gpu_fraction_of_copy": nbytes / gpu_ms / 1e6 / copy_gbs,
                          "kernels_ms": kernels})
        except Exception as e:  # the profiler is a diagnostic: keep the timing without it
            entry["gpu_ms_error"] = f"{type(e).__name__}: {e}"
    return entry


def row(name: str, impl: str, entry: dict) -> str:
    def one(mode, v):
        if "ms" not in v:
            return f"{mode}: {v}"
        gpu = f", gpu {v['gpu_ms']:.3f} ms ({v['gpu_fraction_of_copy']:.0%})" if "gpu_ms" in v else ""
        return f"{mode}: {v['ms']:.3f} ms ({v['fraction_of_copy']:.0%}{gpu})"
    return f"{name:18s} {impl:14s} " + "  ".join(one(m, v) for m, v in entry.items())


def sweep(copy_gbs: float) -> dict:
    """flame's short convolution at other rows per step, and the norm backward at other tile
    sizes: each setting's fwd / fwd+bwd (module constants changed in place, then restored)."""
    all_cases = cases()
    out = {}
    settings = [("short_conv", conv_kernels, "_FWD_ROWS", v) for v in (8, 16)]
    settings += [("short_conv", conv_kernels, ("_BWD_PREFETCH", "_BWD_ROWS"), (p, r))
                 for p, r in ((False, 8), (False, 4), (True, 8))]

    settings += [(n, norm_kernels, "_BWD_TILE_ELEMENTS", v) for n in ("rms_norm", "gated_rms_norm") for v in (4096,)]
    for name, module, attr, value in settings:
        inputs, ours, _, fwd_bytes, fwd_bwd_bytes = all_cases[name]
        attrs, values = (attr, value) if isinstance(attr, tuple) else ((attr,), (value,))
        saved = [getattr(module, a) for a in attrs]
        for a, v in zip(attrs, values):
            setattr(module, a, v)
        try:
            entry = {"fwd": measure(fwd_call(ours, inputs), fwd_bytes, copy_gbs),
                     "fwd_bwd": measure(fwd_bwd_call(ours, inputs), fwd_bwd_bytes, copy_gbs)}
        except Exception as e:
            entry = {"error": f"{type(e).__name__}: {e}"}
        finally:
            for a, v in zip(attrs, saved):
                setattr(module, a, v)
        label = f"{name} " + ",".join(f"{a}={v}" for a, v in zip(attrs, values))
        out[label] = entry
        print(row(label, "flame", entry), flush=True)
    return out


def main():
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s")
    results = {}
    only = sys.argv[sys.argv.index("--only") + 1:] if "--only" in sys.argv else None
    for name, (inputs, ours, plain, fwd_bytes, fwd_bwd_bytes) in cases().items():
        if only and name not in only:
            continue
        impls = {"flame": ours, "torch_eager": plain, "torch_compile": torch.compile(plain)}
        results[name] = {}
        for impl, fn in impls.items():
            entry = {}
            try:
                # kernel times for flame only: the baselines' rows are their wall times
                entry["fwd"] = measure(fwd_call(fn, inputs), fwd_bytes, copy_gbs, profile=impl == "flame")
                entry["fwd_bwd"] = measure(fwd_bwd_call(fn, inputs), fwd_bwd_bytes, copy_gbs, profile=impl == "flame")
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {e}"
            results[name][impl] = entry
            print(row(name, impl, entry), flush=True)
    payload = {"shape": {"rows": ROWS, "dim": DIM, "dtype": "bfloat16", "conv_docs": DOCS, "conv_kernel": KERNEL},
               "copy_GB/s": copy_gbs, "goal": "flame >= 85% of copy bandwidth", "results": results}
    if "--sweep" in sys.argv:
        payload["sweep"] = sweep(copy_gbs)
    write("layers" if not only else "layers_" + "_".join(only)[:60], payload)


if __name__ == "__main__":
    main()
