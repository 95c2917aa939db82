"""Registers and spills of the delta-rule chunk-gradient kernel for sm_90, without a GPU.

Triton compiles the kernel ahead of time for an H100 target and the ptxas bundled with Triton
reports what it allocated: registers per thread and the bytes spilled to local memory (spill
loads sit on the kernel's critical path). A kernel change that moves work around can be judged
here before it is timed on the GPU.

    python benchmarks/ptxas_report.py            # the GDN / DeltaNet recipe heads, bf16

Needs Triton with its NVIDIA backend (3.6 is what the GPU host runs); no GPU, no CUDA driver.
"""

import os
import subprocess
import sys
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_kernels():
    """flame.kernels.delta_rule_bwd without flame/__init__ (which needs the whole stack)."""
    for name, path in (("flame", "flame"), ("flame.kernels", "flame/kernels")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [os.path.join(ROOT, path)]
            sys.modules[name] = module
    import flame.kernels.delta_rule_bwd as bwd

    return bwd


def report(kernel, constexprs: dict, num_warps: int, num_stages: int = 2) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    scalars = {"T": "i32", "N": "i32", "scale": "fp32"}
    int_pointers = {"cu_seqlens", "chunk_indices", "chunk_offsets"}
    fp32_pointers = {"g", "gcum", "dg", "dbeta"}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in scalars:
            signature[name] = scalars[name]
        else:
            signature[name] = "*i32" if name in int_pointers else "*fp32" if name in fp32_pointers else "*bf16"
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 64),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True)
    return " | ".join(line.split("info    :")[-1].strip() for line in out.stderr.splitlines()
                      if "registers" in line or "spill" in line)


def main() -> None:
    bwd = import_kernels()
    for gated in (True, False):
        for K, V in ((128, 256), (128, 128)):
            BV, warps = bwd.chunk_grad_config(2, K, V)
            constexprs = dict(H=4, HV=4, K=K, V=V, BT=64, BK=K, BV=BV, USE_G=gated, IS_VARLEN=True)
            print(f"_chunk_grad_kernel gated={gated!s:5} K={K} V={V} BV={BV} warps={warps}: "
                  f"{report(bwd._chunk_grad_kernel, constexprs, warps)}")


if __name__ == "__main__":
    main()
