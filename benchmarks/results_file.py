"""What the benchmarks' results files share: markdown tables, the machine's load, and the sections of
benchmarks/results.md. That file holds more than one benchmark: `make bench` writes the report, and other
benchmarks (`make bench-scale`) keep a section of their own between marker comments, so each run rewrites only
its part."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

SECTION = re.compile(r"<!-- (?P<name>[\w-]+): begin -->\n.*?<!-- (?P=name): end -->\n?", re.S)


def write(path: str | Path, text: str, section: Optional[str] = None) -> None:
    """Write `text` as the marked section `section` (replacing its earlier version, else appended), or, with
    `section` None, as everything outside the marked sections; the other sections are kept, in their order."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    sections = {m["name"]: m[0] for m in SECTION.finditer(old)}
    rest = text if section is None else SECTION.sub("", old)
    if section is not None:
        sections[section] = f"<!-- {section}: begin -->\n{text.rstrip()}\n<!-- {section}: end -->\n"
    parts = [part.strip("\n") + "\n" for part in [rest, *sections.values()] if part.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def table(header: List[str], rows: List[list]) -> List[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def load_average() -> str:
    """The 1, 5 and 15-minute load averages: other processes' share of the CPUs during a run."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"
