"""Progress of a long loop that both a terminal and a log file can read.

    with progress("tokenize train", total=len(records)) as advance:
        for chunk in chunks:
            ...
            advance(len(chunk))

On a terminal: a Rich bar. Elsewhere (a batch job's log, `make demo > log`) a bar redrawn in place shows
nothing until the end, so instead plain lines, flushed, at each further 10 % of the total or after 30 s
without a line, and one at the end:

    tokenize train: 3000/20000 (15%), 1234/s, elapsed 0:00:12, eta 0:01:05
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mmar_cli import errors

LINE_FRACTION = 0.1  # a plain line at each further 10 % of the total ...
LINE_SECONDS = 30.0  # ... or after this long without one, so a slow loop still shows it is alive


def hms(seconds: float) -> str:
    """0:01:05; hours are not wrapped into days."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def rate_text(rate: float) -> str:
    """Whole numbers once they are large; slow loops (images/s on a CPU) need the decimals."""
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.2f}"


def plain_line(label: str, done: int, total: int, seconds: float) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    eta = hms((total - done) / rate) if rate > 0 else "?"
    percent = 100 * done // total if total else 100
    return f"{label}: {done}/{total} ({percent}%), {rate_text(rate)}/s, elapsed {hms(seconds)}, eta {eta}"


@contextmanager
def progress(label: str, total: int, console: Optional[Console] = None) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n=1)`. `console`: where to show it (default: the project's, on stderr)."""
    console = console or errors.console
    if console.is_terminal:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(escape(label), total=total)
            yield lambda n=1: bar.advance(task, n)
        return

    start = time.monotonic()
    state = {"done": 0, "printed": 0, "last": start}  # count so far, count and time of the last line
    step = max(1, int(total * LINE_FRACTION))

    def line(now: float) -> None:
        # console.file, not console.print: Rich would wrap a long line at 80 columns in a file
        print(plain_line(label, state["done"], total, now - start), file=console.file, flush=True)
        state["printed"], state["last"] = state["done"], now

    def advance(n: int = 1) -> None:
        state["done"] += n
        now = time.monotonic()
        if state["done"] // step > state["printed"] // step or now - state["last"] >= LINE_SECONDS:
            line(now)

    yield advance
    if state["done"] != state["printed"] or state["done"] == 0:
        line(time.monotonic())
