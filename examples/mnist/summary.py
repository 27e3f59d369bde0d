"""Print `make example-mnist`'s headline figures against its targets, and keep them in docs/RESULTS.md.

    python examples/mnist/summary.py runs/example-mnist/eval/metrics.json --seconds 812

The section "## make example-mnist" of docs/RESULTS.md is replaced by this run's (date, CPU, time,
figures), so the file always holds the last run's measurements and the README need not.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "RESULTS.md"
HEADING = "## make example-mnist"
# metric, what it says, target (minimum)
TARGETS = [
    ("gen.classifier.accuracy", "images generated from held-out captions that the judge reads as the digit asked", 0.90),
    ("ref.classifier.accuracy", "the judge on the real held-out digits (its ceiling)", 0.97),
    ("gen.spread", "within-class spread of generated digits, relative to real ones", 0.80),
    ("gen.recall", "recall of generated against real digits", 0.50),
    ("gen.precision", "precision of generated against real digits", None),
    ("und.caption.exact", "captions of held-out real digits naming the right digit (exact match)", 0.97),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, help="metrics.json written by mmar evaluate")
    parser.add_argument("--seconds", type=float, required=True, help="wall time of the whole example")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()
    result = json.loads(args.metrics.read_text())
    m = result["metrics"]
    rows = [f"| {what} | `{name}` | {m[name]:.3f} | {'' if t is None else f'>= {t}'} | "
            f"{'' if t is None else ('met' if m[name] >= t else 'MISSED')} |" for name, what, t in TARGETS if name in m]
    minutes = args.seconds / 60
    rows.append(f"| whole example: shards, tokenize, pretrain, finetune, evaluate | | {minutes:.1f} min | <= 15 min | "
                f"{'met' if minutes <= 15 else 'MISSED'} |")
    section = "\n".join([
        HEADING, "",
        f"Last run {time.strftime('%Y-%m-%d')} on {result['machine']['cpu']} ({result['machine']['cores']} cores), "
        f"`make example-mnist`; {result['reference']['num_samples']} held-out digits; judge "
        f"`{result['judges'].get('classifier', {}).get('hash', '?')[:16]}`; precision/recall: "
        f"{result['provenance'].get('gen.recall', {}).get('evaluator', '?')}.", "",
        "| figure | metric | value | target | |", "|---|---|---|---|---|", *rows, ""])
    print(section)
    if not args.no_record:
        text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Results\n\nMeasurements written by the runs that make them.\n\n"
        pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
        text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
        RESULTS.write_text(text, encoding="utf-8")
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
