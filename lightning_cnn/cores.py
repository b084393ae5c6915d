"""The cores this process may run on: what every thread and worker count here starts from (image decoding, an
image folder's loader workers, serve's workers, a search's threads per trial)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The process's CPU affinity (taskset, a SLURM job's or a container's cpuset), which ``os.cpu_count()``
    ignores (it counts the machine's: 64 decode threads on a 64-core node where the job was given 4)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
