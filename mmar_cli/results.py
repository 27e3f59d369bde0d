"""Sections of a Markdown file that a run rewrites with its own figures.

`make demo` and `make example-mnist` keep their last run in docs/RESULTS.md, `make bench` and `make bench-scale`
theirs in benchmarks/results.md, each between its own pair of markers, so a run replaces its section and leaves
the rest of the file (and the other sections) alone.
"""

from __future__ import annotations

import re
from pathlib import Path


# a table of figures against their targets: what it says, the metric's name, value, target, met or not
TABLE_HEAD = ["| figure | metric | value | target | |", "|---|---|---|---|---|"]


def target_text(value: float, target) -> tuple[str, str]:
    """('>= 0.9', 'met') for a target that is None (none), a minimum, or ('<=' or '>=', bound)."""
    if target is None:
        return "", ""
    op, bound = target if isinstance(target, tuple) else (">=", target)
    ok = value <= bound if op == "<=" else value >= bound
    return f"{op} {bound}", "met" if ok else "MISSED"


def target_rows(metrics: dict, targets: list) -> list[str]:
    """Rows of TABLE_HEAD's table for each (metric, what it says, target) that `metrics` holds; a target is
    None, a minimum or ('<=', maximum)."""
    rows = []
    for name, what, target in targets:
        if name in metrics:
            bound, met = target_text(metrics[name], target)
            rows.append(f"| {what} | `{name}` | {metrics[name]:.3f} | {bound} | {met} |")
    return rows


def markers(name: str) -> tuple[str, str]:
    return (f"<!-- {name}: written by the run, replaced by the next one -->", f"<!-- {name}: end -->")


def replace_section(text: str, name: str, section: str) -> str:
    """`text` with the section called `name` replaced by `section`, or `section` appended when it has none."""
    begin, end = markers(name)
    block = f"{begin}\n{section.strip()}\n{end}"
    pattern = re.compile(f"{re.escape(begin)}.*?{re.escape(end)}", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return f"{text.rstrip()}\n\n{block}\n"


def record_section(path: Path, name: str, section: str) -> None:
    """Write `section` into the file at `path` as the section called `name` (the file is made if missing)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Results\n"
    path.write_text(replace_section(text, name, section), encoding="utf-8")
