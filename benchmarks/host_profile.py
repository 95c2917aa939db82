"""Where the host's time goes while it queues training steps: cProfile around Trainer.train_step.

The trainer queues each step on the GPU without waiting for it; when the GPU finishes before the
host has queued the next step (metrics.jsonl's device_wait_fraction near 0), the host is the
limit, and this shows which Python functions take its time. Same arguments as train.py:

    torchrun --nproc_per_node=2 benchmarks/host_profile.py --config X.toml [--section.key value ...]
        [--profile-steps 8:12] [--top 30] [--sync-debug] [--dump STATS_FILE] [--stub-kernels]

Rank 0 profiles the steps in [start, end) (after compilation) and prints the functions by own
time and by cumulative time, and the host seconds per profiled step. --sync-debug also turns on
torch.cuda.set_sync_debug_mode("warn") for those steps and prints the stack of every operation
that makes the host wait for the GPU (a queued step should have none). --dump writes the pstats
file, so two layouts can be compared function by function (`pstats.Stats(path)`).

--stub-kernels (CPU, no GPU needed): flame's Triton kernels are launched through the
interpreter's entry point but not run, so a small model of the same structure (same blocks and
parameters per block, small widths) shows the host's Python work per step of a GPU run
without the kernels' CPU time: compare call counts per step, layouts and code versions.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time
import traceback
import warnings

if "--stub-kernels" in sys.argv:
    # before anything imports triton: the interpreter's launch becomes a counted no-op
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FLAME_BACKEND"] = "triton"
    import triton.runtime.interpreter as _interpreter

    STUBBED_LAUNCHES = [0]

    def _count_launch(self, *args, **kwargs):
        STUBBED_LAUNCHES[0] += 1

    _interpreter.InterpretedFunction.run = _count_launch

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pop_option(argv: list[str], name: str, default: str) -> str:
    if name in argv:
        i = argv.index(name)
        value = argv[i + 1]
        del argv[i:i + 2]
        return value
    return default


def main() -> int:
    argv = sys.argv[1:]
    start, end = (int(x) for x in pop_option(argv, "--profile-steps", "8:12").split(":"))
    top = int(pop_option(argv, "--top", "30"))
    dump = pop_option(argv, "--dump", "")
    sync_debug = "--sync-debug" in argv and torch.cuda.is_available()
    if "--sync-debug" in argv:
        argv.remove("--sync-debug")
    if "--stub-kernels" in argv:
        argv.remove("--stub-kernels")

    from flame import titan
    from flame.config import parse_args
    from flame.train import Trainer

    cfg, _, _ = parse_args(argv)
    titan.init_logger()
    trainer = Trainer(cfg)
    profiler, seconds = cProfile.Profile(), []
    rank0 = trainer.rt.rank == 0
    queue_step = trainer.train_step

    def profiled_step():
        step = trainer.state.step + 1
        if not (rank0 and start <= step < end):
            return queue_step()
        t0 = time.perf_counter()
        if sync_debug:
            # every operation that makes the host wait for the GPU warns, with its stack
            torch.cuda.set_sync_debug_mode("warn")
        profiler.enable()
        try:
            return queue_step()
        finally:
            profiler.disable()
            if sync_debug:
                torch.cuda.set_sync_debug_mode("default")
            seconds.append(time.perf_counter() - t0)

    trainer.train_step = profiled_step
    if sync_debug:
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            shown(message, category, filename, lineno, file, line)
            if "synchroniz" in str(message):
                print("".join(traceback.format_stack(limit=12)[:-1]), file=sys.stderr)

        warnings.showwarning = show
    try:
        trainer.train()
    finally:
        trainer.close()
        titan.destroy_distributed()
    if rank0 and seconds:
        if dump:
            profiler.dump_stats(dump)
        print(f"\nhost seconds to queue each profiled step: {[round(s, 4) for s in seconds]}")
        calls = pstats.Stats(profiler).total_calls
        print(f"Python calls per profiled step: {calls / len(seconds):.0f}")
        if "STUBBED_LAUNCHES" in globals():
            print(f"stubbed Triton launches in the run: {STUBBED_LAUNCHES[0]}")
        for key in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(top)
            print(f"\n--- by {key} ---")
            print(out.getvalue()[-12000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
