"""What the benchmarks' reports share: markdown tables and the machine's load. Nothing here imports torch, so
`bench_scale.py` stays a small process until its stages have run."""

from __future__ import annotations

from pathlib import Path
from typing import List


def table(header: List[str], rows: List[list]) -> List[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def load_average() -> str:
    """The 1, 5 and 15-minute load averages: other processes' share of the CPUs during a run."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"
