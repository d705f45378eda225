"""Peak memory of every Python process a rehearsal stage starts (benchmarks/rehearsal.py puts this
folder on the stage's PYTHONPATH and names a log in REHEARSAL_MEMORY_LOG).

At exit each process appends one JSON line: its pid, its command, its peak resident set size (VmHWM:
of this program alone, unlike getrusage's, which counts the memory of the parent it was forked from),
and, where it used CUDA, torch.cuda.max_memory_allocated(). Nothing else of the process is changed.
"""
import atexit
import json
import os
import sys


def _peak_rss_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return None


def _record_peak_memory():
    torch = sys.modules.get("torch")
    cuda_bytes = None
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_bytes = torch.cuda.max_memory_allocated()
    line = {"pid": os.getpid(), "argv": sys.argv[:2],
            "peak_rss_bytes": _peak_rss_bytes(),
            "cuda_max_allocated_bytes": cuda_bytes}
    with open(os.environ["REHEARSAL_MEMORY_LOG"], "a") as log:
        log.write(json.dumps(line) + "\n")


if os.environ.get("REHEARSAL_MEMORY_LOG"):
    atexit.register(_record_peak_memory)
