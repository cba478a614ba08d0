"""Peak memory of the current run: allocated GPU memory on CUDA, resident set on the CPU."""

from __future__ import annotations

from pathlib import Path

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory_bytes`: one process may train several runs (the
    CLI's `train` without `--run`), and each run reports its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set (VmHWM) to its current size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak stays the process's since it started


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since `reset_peak_memory` (else since the process started): allocated GPU
    memory on CUDA, resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) * 1024 for line in status.splitlines()
                    if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
