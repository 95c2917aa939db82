"""Run a test body on several gloo processes of this machine (CPU), one per rank.

Every rank that finishes its body waits at a barrier, tears the process group down and leaves
with os._exit(0): the interpreter's own shutdown is skipped because gloo's worker threads can
still hold finished work objects whose tensors need the interpreter while it is being torn
down, which aborts the process (SIGABRT, "terminate called without an active exception") after
every assertion passed. A rank whose body raises exits through the exception as usual, so
mp.spawn reports its traceback."""

import os
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

from flame.titan import free_port


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
        dist.barrier()  # no rank leaves while another's collectives may still read from it
    finally:
        dist.destroy_process_group()
    leave_passed()


def leave_passed() -> None:
    """End a rank whose work passed, without the interpreter's shutdown (see above)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn, world: int, *args, start_method: str = "spawn") -> None:
    """fn(rank, *args) on `world` gloo ranks; raises if any rank fails. fn must be importable
    (a module-level function) for the spawn start method."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method=start_method)
