"""What every benchmark result records about where it ran.

The commit comes from FLAME_COMMIT when set (a copy of the tree without git history, as on a
remote GPU host), else from git; None when neither knows it.
"""

import json
import os
import pathlib
import platform
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("FLAME_COMMIT") or _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    return {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        # kernel choices made through the environment (FLAME_BACKEND,
        # FLAME_DELTA_BACKWARD): a result is only comparable with one run under the same ones
        "flame_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FLAME_") and k != "FLAME_COMMIT"},
    }


def sm_clock_mhz() -> int | None:
    """The GPU's current SM clock (nvidia-smi), or None where it cannot be read. Long runs of
    matmuls hit the power limit and the clock falls (an H100 at 700 W: 1980 -> ~1200-1350 MHz),
    so a time taken after another implementation's run is not taken at the same clock."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def write_report(report: dict, out, name: str) -> pathlib.Path:
    """Writes a benchmark's report (with its "environment") as JSON to `out`, or by default to
    benchmarks/results/<name>_<gpu>.json; prints and returns the path."""
    gpu = (report["environment"]["gpu"] or "cpu").replace(" ", "_")
    path = pathlib.Path(out) if out else pathlib.Path(ROOT) / "benchmarks" / "results" / f"{name}_{gpu}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print("wrote", path)
    return path
