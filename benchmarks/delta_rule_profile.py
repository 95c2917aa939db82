"""Delta-rule kernels on one GPU: per-kernel CUDA times (torch.profiler) of forward+backward, and
forward / forward+backward times of variants (prep kernel, launch configurations, split passes),
each timed beside the default in the same process. The forward is timed twice: for inference
(fwd_ms, nothing kept for a backward) and for training (fwd_save_ms, what the backward needs kept).

    python benchmarks/delta_rule_profile.py [--shapes 8x4096 1x32768 8x4096x4x128x256]
                                            [--kernels delta_rule gated_delta_rule]
                                            [--variants SPEC ...] [--profile-variants] [--out PATH]

A shape is BxT (H = 16, K = V = 128) or BxTxHxKxV (e.g. 8x4096x4x128x256: the Gated DeltaNet
374M recipe's micro-batch of one layer); a trailing p (2x16384x4x128x256p) packs the B x T tokens
into one row of documents as the trainer's data loader does (cu_seqlens of its first batch over
the embedded default corpus; pN takes its batch N, pmax the first batch among its first 64
with the longest document); a trailing dN (2x16384x4x128x256d1024) packs them as documents of
N tokens.

A variant SPEC is comma-separated key=value: prep_warps=N, state_warps=N, state_grad_warps=N,
chunk_grad=BVxWARPS, split_output=0|1 (o by the chunk-parallel output kernel after the serial
pass), output=BVxWARPS (that kernel's launch), split_dv=0|1 (the in-chunk dv' term before the
reverse serial pass), local_dv=BVxWARPS (that kernel's launch), state_block=N (the V block of
both serial passes, whatever the number of sequences), grad_stages=N (pipeline stages
of the chunk gradient kernel's V loop), segments=auto|on|off (the serial passes over segments,
FLAME_DELTA_SEGMENTS), segment_tokens=N (their length), backward_join=N (forward segments per
segment of the backward, equal-length sequences, both rules), heads_fast=0|1 (the chunk-parallel
grids' head axis fastest-varying, flame.kernels.utils.HEADS_FAST), segment_block=N (columns per
program of their transition passes), transition=BCxWARPSxSTAGES[xREGISTERS] and
transition_grad=BCxWARPSxSTAGES (the launches of the forward's and the backward's transition
passes; REGISTERS caps the forward's registers per thread), u=fp32|bf16 (the dtype of u = A beta v),
states_pass_programs=N (programs per SM below which the forward's states-only pass narrows its
V block), values_in_pass=0|1 (the inference forward's v' from A and v in the serial pass). Every variant is timed at every shape;
the per-kernel profiles (forward, forward+backward) are taken for the default, and with
--profile-variants for each variant too. --check also records each variant's relative error
norms against float64 (outputs, final state, every gradient; B=2, T=1000, H=4, K=V=128).

bf16. Writes JSON (GPU, torch, Triton, commit) to benchmarks/results/.
"""

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flame.kernels.delta_rule as fwd_mod  # noqa: E402
import flame.kernels.delta_rule_bwd as bwd  # noqa: E402
import flame.kernels.delta_rule_segments as segments  # noqa: E402
import flame.kernels.utils as kernel_utils  # noqa: E402
from environment import environment, write_report  # noqa: E402
from flame.kernels import chunk_delta_rule, chunk_gated_delta_rule  # noqa: E402
from flame.kernels.delta_rule_ref import chunk_delta_rule_ref  # noqa: E402
from kernels import autograd_calls, kernel_times, timed  # noqa: E402



def packed_documents(B: int, T: int, batch: str = "0", seed: int = 0) -> tuple[int, torch.Tensor]:
    """(index, cu_seqlens) of one micro-batch of B rows of T tokens as the trainer packs them:
    batch `batch` of flame's data loader over the embedded default corpus, or with "max" the
    first of its first 64 batches whose longest document is the longest among them. The corpus
    is the running Python's standard library, so the documents differ between Python versions
    (the JSON records them)."""
    from flame.config import load_config
    from flame.data import build_dataloader, build_tokenizer

    if batch != "max" and not batch.isdigit():
        raise ValueError(f"a packed shape ends in p, pN (batch N) or pmax, not p{batch}")
    cfg = load_config(str(pathlib.Path(__file__).resolve().parents[1] / "train_configs" / "debug.toml"),
                      ["--data.num_workers", "0"])
    loader = build_dataloader(cfg.data, build_tokenizer(cfg.data), seq_len=T, local_batch_size=B,
                              dp_rank=0, dp_world_size=1, seed=seed)
    best = None
    for index, item in enumerate(loader):
        cu = item["cu_seqlens"].to(torch.int32)
        if batch != "max" and index == int(batch):
            return index, cu
        longest = int((cu[1:] - cu[:-1]).max())
        if batch == "max" and (best is None or longest > best[0]):
            best = (longest, index, cu)
        if batch == "max" and index == 63:
            break
    if best is None:
        raise ValueError(f"the data loader gave only {index + 1} batches of {B} x {T} tokens, not {int(batch) + 1}")
    return best[1], best[2]


def equal_documents(tokens: int, length: int) -> torch.Tensor:
    """cu_seqlens of `tokens` tokens packed as documents of `length` tokens (the last shorter)."""
    return torch.tensor(list(range(0, tokens, length)) + [tokens], dtype=torch.int32)


def inputs(gated, B, T, H=16, K=128, V=128, cu_seqlens=None):
    """Random bf16 inputs and the three timed closures; with cu_seqlens, the B x T tokens as one
    packed row of documents, with their longest document as max_seqlen (as the trainer passes it)."""
    max_seqlen = None
    if cu_seqlens is not None:
        B, T = 1, B * T
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu_seqlens = cu_seqlens.cuda()
    q = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
    k = F.normalize(torch.randn(B, T, H, K, device="cuda"), dim=-1).to(torch.bfloat16)
    v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda"))
    leaves = [x.requires_grad_() for x in ((q, k, v, g, beta) if gated else (q, k, v, beta))]
    rule = chunk_gated_delta_rule if gated else chunk_delta_rule

    def fn(*xs):
        return rule(*xs, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    # fwd_save, the training forward, also keeps what the backward needs (where split_output acts)
    return autograd_calls(fn, leaves, torch.randn_like(v))


@contextlib.contextmanager
def variant(spec: str):
    """Applies a variant SPEC (see the module docstring) for the duration of the block."""
    modules = {"prepare_config": fwd_mod, "state_warps": fwd_mod, "split_output": fwd_mod, "_state_block": fwd_mod,
               "output_config": fwd_mod, "state_grad_warps": bwd, "chunk_grad_config": bwd,
               "chunk_grad_stages": bwd,
               "split_dv_local": bwd, "local_dv_config": bwd, "u_dtype": fwd_mod, "values_in_pass": fwd_mod}
    saved = {name: getattr(module, name) for name, module in modules.items()}
    saved_mode = os.environ.get("FLAME_DELTA_SEGMENTS")
    saved_tokens = segments.SEGMENT_TOKENS, segments.PACKED_SEGMENT_TOKENS
    saved_programs = fwd_mod.STATES_PASS_PROGRAMS_PER_SM
    saved_segment_block = segments.segment_column_block
    saved_transition = segments.transition_config, segments.transition_grad_config
    saved_join = segments.BACKWARD_JOIN, segments.PLAIN_BACKWARD_JOIN
    saved_heads_fast = kernel_utils.HEADS_FAST
    try:
        for item in filter(None, spec.split(",")):
            key, value = item.split("=")
            if key == "prep_warps":
                default = saved["prepare_config"]
                fwd_mod.prepare_config = lambda *a, n=int(value), d=default: (d(*a)[0], n)
            elif key == "state_warps":
                fwd_mod.state_warps = lambda *a, n=int(value): n
            elif key == "state_grad_warps":
                bwd.state_grad_warps = lambda *a, n=int(value): n
            elif key == "chunk_grad":
                bv, warps = (int(x) for x in value.split("x"))
                bwd.chunk_grad_config = lambda *a, bv=bv, warps=warps: (bv, warps)
            elif key == "split_output":
                fwd_mod.split_output = lambda on=bool(int(value)): on
            elif key == "output":
                bv, warps = (int(x) for x in value.split("x"))
                fwd_mod.output_config = lambda *a, bv=bv, warps=warps: (bv, warps)
            elif key == "grad_stages":
                bwd.chunk_grad_stages = lambda *a, n=int(value): n
            elif key == "split_dv":
                bwd.split_dv_local = lambda *args, on=bool(int(value)): on
            elif key == "local_dv":
                bv, warps = (int(x) for x in value.split("x"))
                bwd.local_dv_config = lambda *a, bv=bv, warps=warps: (bv, warps)
            elif key == "state_block":
                fwd_mod._state_block = lambda *a, n=int(value): n
            elif key == "segments":
                os.environ["FLAME_DELTA_SEGMENTS"] = value
            elif key == "states_pass_programs":
                fwd_mod.STATES_PASS_PROGRAMS_PER_SM = int(value)
            elif key == "values_in_pass":
                fwd_mod.values_in_pass = lambda on=bool(int(value)): on
            elif key == "u":
                fwd_mod.u_dtype = lambda dtype, d={"fp32": torch.float32, "bf16": torch.bfloat16}[value]: d
            elif key == "segment_block":
                segments.segment_column_block = lambda *a, n=int(value): n
            elif key == "transition":  # BCxWARPSxSTAGES[xREGISTERS]
                launch = [int(x) for x in value.split("x")]
                setattr(segments, "transition_config", lambda *a, c=(*launch, None)[:4]: c)
            elif key == "transition_grad":
                launch = tuple(int(x) for x in value.split("x"))
                setattr(segments, "transition_grad_config", lambda *a, c=launch: c)
            elif key == "segment_tokens":
                segments.SEGMENT_TOKENS = segments.PACKED_SEGMENT_TOKENS = int(value)
            elif key == "backward_join":
                segments.BACKWARD_JOIN = segments.PLAIN_BACKWARD_JOIN = int(value)
            elif key == "heads_fast":
                kernel_utils.HEADS_FAST = bool(int(value))
            else:
                raise ValueError(f"unknown variant key {key!r} in {spec!r}")
        yield
    finally:
        for name, module in modules.items():
            setattr(module, name, saved[name])
        segments.SEGMENT_TOKENS, segments.PACKED_SEGMENT_TOKENS = saved_tokens
        fwd_mod.STATES_PASS_PROGRAMS_PER_SM = saved_programs
        segments.segment_column_block = saved_segment_block
        segments.transition_config, segments.transition_grad_config = saved_transition
        segments.BACKWARD_JOIN, segments.PLAIN_BACKWARD_JOIN = saved_join
        kernel_utils.HEADS_FAST = saved_heads_fast
        if saved_mode is None:
            os.environ.pop("FLAME_DELTA_SEGMENTS", None)
        else:
            os.environ["FLAME_DELTA_SEGMENTS"] = saved_mode



def errors(gated: bool) -> dict:
    """Relative error norms of the bf16 kernels against float64 on the same bf16 inputs."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, K, V = 2, 1000, 4, 128, 128

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    q, v = randn(B, T, H, K).bfloat16(), randn(B, T, H, V).bfloat16()
    k = F.normalize(randn(B, T, H, K), dim=-1).bfloat16()
    beta = torch.rand(B, T, H, device="cuda", generator=gen).bfloat16()
    g = F.logsigmoid(randn(B, T, H)).bfloat16()
    h0 = randn(B, H, K, V)
    tensors = [q, k, v, g, beta, h0] if gated else [q, k, v, beta, h0]
    do, dht = randn(B, T, H, V), randn(B, H, K, V)

    def run(*xs):
        xs = list(xs)
        gate = xs.pop(3) if gated else None
        qx, kx, vx, bx, hx = xs
        if qx.dtype == torch.float64:
            return chunk_delta_rule_ref(qx, kx, vx, bx, g=gate, initial_state=hx, output_final_state=True)
        if gated:
            return chunk_gated_delta_rule(qx, kx, vx, gate, bx, initial_state=hx, output_final_state=True)
        return chunk_delta_rule(qx, kx, vx, bx, initial_state=hx, output_final_state=True)

    result = {}
    outs = {}
    for name, cast in (("ref", torch.float64), ("bf16", None)):
        leaves = [(x.to(cast) if cast else x).clone().requires_grad_() for x in tensors]
        o, ht = run(*leaves)
        grads = torch.autograd.grad([o, ht], leaves, [do.to(o.dtype), dht.to(ht.dtype)])
        outs[name] = [o, ht, *grads]
    names = ["o", "final_state"] + ["d" + n for n in (["q", "k", "v", "g", "beta", "h0"] if gated
                                                      else ["q", "k", "v", "beta", "h0"])]
    for name, x, ref in zip(names, outs["bf16"], outs["ref"]):
        result[name] = float((x.double() - ref).norm() / ref.norm())
    return result


def kernels_text(profile: dict, n: int) -> str:
    """The first n kernels of a per-kernel profile, short names and ms."""
    total = f"sum {sum(profile.values()):.3f}: "
    return total + ", ".join(f"{k.strip('_').replace('_kernel', '')} {v:.3f}" for k, v in list(profile.items())[:n])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["8x4096", "1x32768"])
    parser.add_argument("--variants", nargs="*",
                        default=["prep_warps=8", "state_warps=8", "state_grad_warps=8",
                                 "split_output=0,split_dv=0", "split_output=1", "split_dv=1",
                                 "split_output=1,split_dv=1"],
                        help="variant SPECs timed beside the default at every shape")
    parser.add_argument("--kernels", nargs="+", default=["delta_rule", "gated_delta_rule"],
                        choices=["delta_rule", "gated_delta_rule"])
    parser.add_argument("--profile-variants", action="store_true",
                        help="also take the per-kernel profile of every variant")
    parser.add_argument("--check", action="store_true",
                        help="record each variant's relative errors against float64")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    report = {"environment": environment(), "rows": []}
    for shape in args.shapes:
        dims_text, packed, batch_text = shape.partition("p")
        dims_text, equal, doc_text = dims_text.partition("d")
        dims = [int(x) for x in dims_text.split("x")]
        B, T, H, K, V = dims + [16, 128, 128][len(dims) - 2:] if len(dims) in (2, 5) else (None,) * 5
        if B is None:
            raise ValueError(f"--shapes: {shape!r} is neither BxT nor BxTxHxKxV")
        for name in args.kernels:
            gated = name == "gated_delta_rule"
            batch, cu = packed_documents(B, T, batch_text or "0") if packed else (None, None)
            if equal:
                cu = equal_documents(B * T, int(doc_text))
            fwd, fwd_save, fwdbwd = inputs(gated, B, T, H, K, V, cu)
            start = time.perf_counter()
            fwdbwd()
            torch.cuda.synchronize()
            row = {"kernel": name, "B": B, "T": T, "H": H, "K": K, "V": V,
                   "loader_batch": batch,
                   "documents": None if cu is None else (cu[1:] - cu[:-1]).tolist(),
                   "first_call_s": round(time.perf_counter() - start, 2),
                   "fwd_ms": timed(fwd), "fwd_save_ms": timed(fwd_save), "fwdbwd_ms": timed(fwdbwd),
                   "profile_fwd_ms": kernel_times(fwd), "profile_fwdbwd_ms": kernel_times(fwdbwd),
                   "variants": {}}
            if args.check:
                row["errors"] = errors(gated)
            for spec in args.variants:
                with variant(spec):
                    entry = row["variants"][spec] = {"fwd_ms": timed(fwd), "fwd_save_ms": timed(fwd_save),
                                                     "fwdbwd_ms": timed(fwdbwd)}
                    # a launch that does not fit the GPU was recorded by timed() as its error
                    runs = all(isinstance(entry[k], float) for k in entry)
                    if args.profile_variants and runs:
                        entry["profile_fwd_ms"] = kernel_times(fwd)
                        entry["profile_fwdbwd_ms"] = kernel_times(fwdbwd)
                    if args.check and runs:
                        try:  # the check's heads (K = V = 128) may not fit a variant that this shape does
                            entry["errors"] = errors(gated)
                        except Exception as e:  # noqa: BLE001 - recorded in the results
                            entry["errors"] = f"{type(e).__name__}: {e}"[:200]
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    print(f"{'kernel':18s} {'shape':17s} {'variant':50s} {'fwd':>7s} {'fwd(sv)':>7s} {'f+b':>7s}")

    def ms(x):
        return f"{x:7.3f}" if isinstance(x, float) else "    err"

    for row in report["rows"]:
        shape = f"{row['B']}x{row['T']}" + ("" if (row["H"], row["K"], row["V"]) == (16, 128, 128)
                                              else f"x{row['H']}x{row['K']}x{row['V']}")
        if row["documents"]:
            shape += f"p{row['loader_batch']}" if row["loader_batch"] is not None else f"d{row['documents'][0]}"
        print(f"{row['kernel']:18s} {shape:17s} {'default':50s} {ms(row['fwd_ms'])} {ms(row['fwd_save_ms'])} "
              f"{ms(row['fwdbwd_ms'])}")
        for spec, entry in row["variants"].items():
            print(f"{row['kernel']:18s} {shape:17s} {spec:50s} {ms(entry['fwd_ms'])} {ms(entry['fwd_save_ms'])} "
                  f"{ms(entry['fwdbwd_ms'])}")
            if "profile_fwd_ms" in entry:
                print("    fwd:", kernels_text(entry["profile_fwd_ms"], 5))
            if "profile_fwdbwd_ms" in entry:
                print("       ", kernels_text(entry["profile_fwdbwd_ms"], 7))
            if "errors" in entry:
                print("    errors:", ", ".join(f"{k} {v:.1e}" for k, v in entry["errors"].items()))
        for key in ("profile_fwd_ms", "profile_fwdbwd_ms"):
            print(f"    default {key[8:-3]}:", kernels_text(row[key], 5))
        if "errors" in row:
            print("    default errors:", ", ".join(f"{k} {v:.1e}" for k, v in row["errors"].items()))
    write_report(report, args.out, "delta_rule_profile")


if __name__ == "__main__":
    main()
