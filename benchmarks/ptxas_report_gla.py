"""Registers, spills and shared memory of the GLA kernels on BC-row blocks for sm_90, without a GPU.

The two kernels that walk the partner rows of a 16-row block (`chunk_gla_scores_kernel`,
`chunk_gla_intra_grad_kernel`) are compiled ahead of time for an H100 target, for the default
launch of `gla_intra_config()` and for each variant SPEC. The ptxas bundled with Triton reports
registers per thread and bytes spilled, Triton's metadata the shared memory, and the SASS of
the partner-row loop (the innermost loop with the most exps) its instruction count and its
barriers (cross-warp reductions, layout conversions through shared memory), shuffles, exps
and global loads per step. Programs per SM from registers at 4 warps: <= 128 registers 4,
<= 168 3, else 2.

    python benchmarks/ptxas_report_gla.py [--variants SPEC ...] [--ttgir DIR]

A SPEC is comma-separated key=value over the keys of `gla_intra_config()` (the same SPECs as
benchmarks/linear_attention_profile.py). bf16 inputs, K = V = 128, pointers 16-byte aligned as
in the real launches. --ttgir writes each kernel's TTGIR there (layouts, conversions).
Needs Triton with its NVIDIA backend (3.6 is what the GPU host runs); no GPU, no CUDA driver.
"""

import argparse
import os
import re
import subprocess
import tempfile

from ptxas_report import compile_sm90, import_flame_modules
# The variant SPECs timed by benchmarks/linear_attention_profile.py and compiled here (a
# combination of two kernels' variants compiles nothing new here).
VARIANTS = [
    "scores_unroll=4,scores_split=1",
    "scores_unroll=8,scores_split=1",
    "scores_unroll=4,scores_split=1,scores_bk=32",
    "scores_unroll=16,scores_split=1",
    "grad_scratch=1",
    "grad_unroll=4,grad_scratch=1",
    "grad_scratch=1,grad_split=1",
    "grad_unroll=2,grad_scratch=1,grad_split=1",
    "grad_unroll=4,grad_scratch=1,grad_split=1",
    "grad_unroll=4,grad_scratch=1,grad_split=1,grad_bk=32",
    "grad_unroll=4,grad_scratch=1,grad_split=1,grad_stages=1",
    "scores_unroll=4,scores_split=1,grad_unroll=2,grad_scratch=1,grad_split=1",
    "scores_unroll=4,scores_split=1,scores_bk=32,grad_unroll=4,grad_scratch=1,grad_split=1,grad_bk=32",
]


def import_modules():
    return import_flame_modules("linear_attention", "linear_attention_triton")


def parse_spec(spec: str, default: dict) -> dict:
    """Config of a variant SPEC: the default with the named keys replaced (`default` names the
    default itself)."""
    config = dict(default)
    for item in filter(None, spec.split(",")):
        if item == "default":
            continue
        key, value = item.split("=")
        if key not in config:
            raise ValueError(f"unknown key {key!r} in {spec!r}; keys: {', '.join(config)}")
        config[key] = None if value == "None" else int(value)
    return config


def compile_report(kernel, constexprs: dict, fp32_pointers: set, num_warps: int, num_stages, ttgir_path=None) -> str:
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    compiled, info = compile_sm90(kernel, constexprs, {"N": "i32", "scale": "fp32"},
                                  {"cu_ptr", "chunk_idx_ptr", "flag_ptr"},
                                  fp32_pointers, options, aligned=True)
    if ttgir_path:
        with open(ttgir_path, "w") as f:
            f.write(compiled.asm["ttgir"])
    nvdisasm = os.path.join(os.path.dirname(triton_file()), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    loop = row_loop(sass)
    return (f"{regs.group(1) if regs else '?'} regs, spill st/ld {spill.group(1)}/{spill.group(2)} B, "
            f"smem {compiled.metadata.shared} B; partner-row loop: {len(loop)} instructions, "
            f"{sum('BAR.SYNC' in x for x in loop)} BAR.SYNC, {sum('SHFL' in x for x in loop)} SHFL, "
            f"{sum('MUFU.EX2' in x for x in loop)} MUFU.EX2, {sum('LDG' in x for x in loop)} LDG")


def triton_file() -> str:
    import triton

    return triton.__file__


def row_loop(sass: str) -> list:
    """SASS instructions of the innermost loop with the most exps (the partner-row loop).

    A barrier there is paid once per row or group of rows: those of layout conversions
    through shared memory as well as the cross-warp reductions.
    """
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    inner = [(a, b) for a, b in loops if not any(a < c and d < b for c, d in loops)]
    bodies = [[x for x in lines[a:b + 1] if re.search(r"/\*[0-9a-f]{4,}\*/", x)] for a, b in inner]
    return max(bodies, key=lambda body: sum("MUFU.EX2" in x for x in body), default=[])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--ttgir", default=None, help="folder for the TTGIR of each compiled kernel")
    args = parser.parse_args()
    launch, kern = import_modules()
    K = V = 128
    BV = launch._gla_block(V)
    if args.ttgir:
        os.makedirs(args.ttgir, exist_ok=True)
    default = launch.gla_intra_config()
    seen = set()
    for spec in ["default"] + list(args.variants):
        cfg = parse_spec(spec, default)
        scores = dict(H=16, K=K, BK=launch._intra_block(K, cfg["scores_bk"]), UNROLL=cfg["scores_unroll"], SPLIT_DIAG=bool(cfg["scores_split"]),
                      HEADS_FAST=True)
        grad = dict(H=16, K=K, V=V, BK=launch._intra_block(K, cfg["grad_bk"]), BV=BV, UNROLL=cfg["grad_unroll"], SCRATCH=bool(cfg["grad_scratch"]),
                    SPLIT_DIAG=bool(cfg["grad_split"]), HEADS_FAST=True)
        rows = [("scores", kern.chunk_gla_scores_kernel, scores, {"b_ptr"}, cfg["scores_stages"]),
                ("intra_grad", kern.chunk_gla_intra_grad_kernel, grad,
                 {"b_ptr", "dqi_ptr", "dki_ptr", "scratch_ptr"}, cfg["grad_stages"])]
        for name, kernel, constexprs, fp32, stages in rows:
            key = (name, tuple(sorted(constexprs.items())), stages, cfg["warps"])
            if key in seen:  # a variant of the other kernel: this one is the default
                continue
            seen.add(key)
            path = None
            if args.ttgir:
                path = os.path.join(args.ttgir, f"{name}_{spec.replace(',', '_').replace('=', '')}.ttgir")
            result = compile_report(kernel, constexprs, fp32, cfg["warps"], stages, path)
            print(f"{name:10s} {spec:48s} {cfg['warps']} warps: {result}", flush=True)


if __name__ == "__main__":
    main()
