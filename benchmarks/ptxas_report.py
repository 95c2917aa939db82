"""Registers and spills of the delta-rule kernels for sm_90, without a GPU.

Triton compiles the kernel ahead of time for an H100 target and the ptxas bundled with Triton
reports what it allocated: registers per thread and the bytes spilled to local memory (spill
loads sit on the kernel's critical path). A kernel change that moves work around can be judged
here before it is timed on the GPU.

    python benchmarks/ptxas_report.py   # the Gated DeltaNet / DeltaNet recipe heads, bf16

Needs Triton with its NVIDIA backend (3.6 is what the GPU host runs); no GPU, no CUDA driver.
"""

import os
import subprocess
import sys
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_kernels():
    """flame.kernels.delta_rule(_bwd) without flame/__init__ (which needs the whole stack)."""
    for name, path in (("flame", "flame"), ("flame.kernels", "flame/kernels")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [os.path.join(ROOT, path)]
            sys.modules[name] = module
    import flame.kernels.delta_rule as fwd
    import flame.kernels.delta_rule_bwd as bwd

    return fwd, bwd


def report(kernel, constexprs: dict, num_warps: int, num_stages: int = 2) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    scalars = {"T": "i32", "N": "i32", "scale": "fp32"}  # the rest are pointers
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
    fwd, bwd = import_kernels()
    K, V, HV = 128, 256, 4  # the Gated DeltaNet recipes' heads
    heads = dict(H=HV, HV=HV, K=K, V=V, BT=64, BK=K, IS_VARLEN=True)
    for gated in (True, False):
        BV, warps = bwd.chunk_grad_config(2, K, V)
        rows = [("_chunk_grad_kernel", bwd._chunk_grad_kernel, dict(heads, BV=BV, USE_G=gated), warps)]
        for V2 in (128,):  # also square heads
            BV2, warps2 = bwd.chunk_grad_config(2, K, V2)
            rows.append((f"_chunk_grad_kernel V={V2}", bwd._chunk_grad_kernel,
                         dict(heads, V=V2, BV=BV2, USE_G=gated), warps2))
        state = dict(heads, BV=64, USE_G=gated, USE_H0=False)
        rows.append(("_state_output_kernel (o and saved states)", fwd._state_output_kernel,
                     dict(state, COMPUTE_O=True, STORE_STATES=True), fwd.state_warps(2)))
        rows.append(("_state_grad_kernel", bwd._state_grad_kernel, dict(state, USE_DHT=False),
                     bwd.state_grad_warps(2)))
        BC, prep_warps = fwd.prepare_config(2, K, V)
        rows.append(("_prepare_kernel", fwd._prepare_kernel, dict(heads, BC=BC, USE_G=gated), prep_warps))
        for name, kernel, constexprs, warps in rows:
            print(f"gated={gated!s:5} {name}, {warps} warps: {report(kernel, constexprs, warps)}")


if __name__ == "__main__":
    main()
