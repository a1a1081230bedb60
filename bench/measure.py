"""Memory measurement shared by the benchmarks: a peak-RSS counter that can be reset, and a fresh
subprocess per case so one case's allocations never count against another's."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def rss_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak since the last reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where the counter cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return rss_kib("VmHWM") is not None


def peak_bytes_of(step, device) -> tuple[int, str]:
    """Run step() once and return the memory it peaked at above what was allocated before, and how."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated"
    if reset_peak_rss():
        base = rss_kib("VmRSS")
        step()
        return (rss_kib("VmHWM") - base) * 1024, "peak RSS (VmHWM reset) above RSS before"
    import resource

    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss (whole process)"


def run_child(script: str, job: dict, fixed_mmap: bool = True) -> dict:
    """`python <script> --child <job json>` in a fresh process; its last stdout line is the JSON result.
    fixed_mmap: a fixed mmap threshold turns off glibc's adaptive one: every large tensor is its own mapping,
    returned to the system when freed, so resident memory follows live tensors. It also makes every large
    allocation fault its pages in again (kernel time, counted as the process's): time a pass in a child
    without it (fixed_mmap=False), as training runs."""
    env = dict(os.environ)
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(job)], capture_output=True, text=True,
                          check=False, env=env)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--device, --threads and the hidden --child every subprocess benchmark takes."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
