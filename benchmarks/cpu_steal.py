"""How much CPU time the hypervisor took from this VM while something ran (Linux ``/proc/stat`` "steal").

A cloud VM shares its physical cores: when neighbours are busy, the hypervisor runs them instead and our
threads wait, so a training rate measured then is low for reasons that have nothing to do with the code.
Measured here, the steal share swung between 2% and 70% within minutes. The benchmarks print it beside
every rate so that a reader can tell a slow figure from a slowed one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
STAT = Path("/proc/stat")


def _cpu_times(stat: Path) -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs so far, or None where the file or its steal field is absent."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    # cpu user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already in user
    times = [int(v) for v in fields[1:9]]
    return times[7], sum(times)


def with_steal(measure: Callable[[], T], stat: Path = STAT) -> tuple[T, float | None]:
    """Run ``measure()`` and return its result with the share of CPU time stolen meanwhile (0-1, None if unknown).

    Example:
        >>> result, steal = with_steal(lambda: 42)
        >>> result
        42
    """
    before = _cpu_times(stat)
    result = measure()
    after = _cpu_times(stat)
    if before is None or after is None or after[1] == before[1]:
        return result, None
    return result, (after[0] - before[0]) / (after[1] - before[1])
