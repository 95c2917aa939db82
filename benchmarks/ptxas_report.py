"""Registers and spills of the delta-rule kernels for sm_90, without a GPU.

Triton compiles the kernel ahead of time for an H100 target and the ptxas bundled with Triton
reports what it allocated: registers per thread and the bytes spilled to local memory (spill
loads sit on the kernel's critical path). A kernel change that moves work around can be judged
here before it is timed on the GPU.

    python benchmarks/ptxas_report.py   # the recipe heads (K=128, V=256) and K=V=128, bf16

Pointers are compiled as 16-byte aligned, as Triton specialises them at a launch with torch's
allocations: without that hint the loads stay scalar and ptxas reports several times the
spills of the launched kernels (e.g. 2520 instead of 364 bytes per thread for the gated chunk
gradient kernel at K = V = 128).

Needs Triton with its NVIDIA backend (3.6 is what the GPU host runs); no GPU, no CUDA driver.
"""

import os
import subprocess
import sys
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_flame_modules(*names: str) -> list:
    """flame.kernels.<name> modules without flame/__init__ (which needs the whole stack)."""
    import importlib

    for name, path in (("flame", "flame"), ("flame.kernels", "flame/kernels")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [os.path.join(ROOT, path)]
            sys.modules[name] = module
    return [importlib.import_module(f"flame.kernels.{name}") for name in names]


def import_kernels():
    return import_flame_modules("delta_rule", "delta_rule_bwd")


def compile_sm90(kernel, constexprs: dict, scalars: dict, int_pointers: set, fp32_pointers: set,
                 options: dict, aligned: bool = False):
    """(compiled kernel, ptxas -v output, cubin bytes) for an H100 target; pointers not named
    are bf16; aligned: every pointer 16-byte aligned, as torch allocations are."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in scalars:
            signature[name] = scalars[name]
        else:
            signature[name] = "*i32" if name in int_pointers else "*fp32" if name in fp32_pointers else "*bf16"
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 64), options=options)
    # Triton bundles more than one ptxas (3.9: ptxas and ptxas-blackwell); the PTX it emits may
    # need the newer one, so the first that assembles it reports.
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        for name in ("ptxas", "ptxas-blackwell"):
            ptxas = os.path.join(bin_dir, name)
            if not os.path.exists(ptxas):
                continue
            out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", ptx + ".o"],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                return compiled, out.stderr
            errors.append(f"{name}: {out.stderr.strip()[:300]}")
    raise RuntimeError("no bundled ptxas assembled the kernel: " + "; ".join(errors))


def report(kernel, constexprs: dict, num_warps: int, num_stages: int = 2) -> str:
    # u (v' = u - w S cancels), L (the prep kernel's scratch), the states and their gradients are fp32
    _, info = compile_sm90(kernel, constexprs, {"T": "i32", "N": "i32", "scale": "fp32"},
                           {"cu_seqlens", "chunk_indices", "chunk_offsets"},
                           {"g", "gcum", "dg", "dbeta", "u", "lbuf", "h0", "ht", "dht", "dh0"},
                           {"num_warps": num_warps, "num_stages": num_stages}, aligned=True)
    return " | ".join(line.split("info    :")[-1].strip() for line in info.splitlines()
                      if "registers" in line or "spill" in line)


def rows_for(fwd, bwd, gated: bool, K: int, V: int, HV: int, state_blocks: tuple[int, ...]) -> list:
    """(name, kernel, constexprs, warps) of every delta-rule kernel at one head shape; the serial
    passes at each V block in state_blocks (64 with many sequences, 16 or 32 with few)."""
    heads = dict(H=HV, HV=HV, K=K, V=V, BT=64, BK=K, IS_VARLEN=True)
    chunked = dict(heads, HEADS_FAST=True)  # the chunk-parallel kernels
    BV, warps = bwd.chunk_grad_config(2, K, V)
    rows = [("_chunk_grad_kernel", bwd._chunk_grad_kernel, dict(chunked, BV=BV, USE_G=gated), warps)]
    BC, prep_warps = fwd.prepare_config(2, K, V)
    rows.append(("_prepare_kernel", fwd._prepare_kernel, dict(chunked, BC=BC, USE_G=gated, STORE_W=True, STORE_U=True), prep_warps))
    BVO, out_warps = fwd.output_config(2, K, V)
    rows.append((f"_output_kernel BV={BVO}", fwd._output_kernel,
                 dict(chunked, BK=min(fwd.OUTPUT_K_BLOCK, K), BV=BVO, USE_G=gated), out_warps))
    BVL, local_warps = bwd.local_dv_config(2, K, V)
    rows.append((f"_local_dv_kernel BV={BVL}", bwd._local_dv_kernel, dict(chunked, BV=BVL, USE_G=gated), local_warps))
    for BVS in state_blocks:
        state = dict(heads, BV=BVS, USE_G=gated, USE_H0=False)
        rows.append((f"_state_output_kernel BV={BVS} (o and saved states)", fwd._state_output_kernel,
                     dict(state, COMPUTE_O=True, STORE_STATES=True, FROM_V=False), fwd.state_warps(2)))
        rows.append((f"_state_output_kernel BV={BVS} (saved states only: split_output)", fwd._state_output_kernel,
                     dict(state, COMPUTE_O=False, STORE_STATES=True, FROM_V=False), fwd.state_warps(2)))
        rows.append((f"_state_output_kernel BV={BVS} (inference, v' from A and v)", fwd._state_output_kernel,
                     dict(state, COMPUTE_O=not gated, STORE_STATES=gated, FROM_V=True), fwd.state_warps(2)))
        for local_dv in (False, True):
            label = " (LOCAL_DV: split_dv_local)" if local_dv else ""
            rows.append((f"_state_grad_kernel BV={BVS}{label}", bwd._state_grad_kernel,
                         dict(state, USE_DHT=False, LOCAL_DV=local_dv), bwd.state_grad_warps(2)))
    return rows


def main() -> None:
    fwd, bwd = import_kernels()
    # The Gated DeltaNet recipes' heads (K = 128, V = 256, 4 value heads), then square heads.
    for K, V, HV in ((128, 256, 4), (128, 128, 16)):
        for gated in (True, False):
            for name, kernel, constexprs, warps in rows_for(fwd, bwd, gated, K, V, HV, (64, 16)):
                print(f"K={K} V={V} gated={gated!s:5} {name}, {warps} warps: {report(kernel, constexprs, warps)}",
                      flush=True)


if __name__ == "__main__":
    main()
