"""Print `make example-mnist`'s headline figures against its targets, and keep them in docs/RESULTS.md.

    python examples/mnist/summary.py runs/example-mnist/eval/metrics.json --seconds 812

Its section of docs/RESULTS.md is replaced by this run's (date, CPU, time, figures), so the file always
holds the last run's measurements.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmar_cli.results import TABLE_HEAD, record_section, target_rows

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "RESULTS.md"
SECTION = "make example-mnist"
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
    rows = target_rows(result["metrics"], TARGETS)
    minutes = args.seconds / 60
    rows.append(f"| whole example: shards, tokenize, pretrain, finetune, evaluate | | {minutes:.1f} min | <= 15 min | "
                f"{'met' if minutes <= 15 else 'MISSED'} |")
    section = "\n".join([
        f"## {SECTION}", "",
        f"Last run {time.strftime('%Y-%m-%d')} on {result['machine']['cpu']} ({result['machine']['cores']} cores), "
        f"`make example-mnist`; {result['reference']['num_samples']} held-out digits; judge "
        f"`{result['judges'].get('classifier', {}).get('hash', '?')[:16]}`; precision/recall: "
        f"{result['provenance'].get('gen.recall', {}).get('evaluator', '?')}.", "",
        *TABLE_HEAD, *rows, ""])
    print(section)
    if not args.no_record:
        record_section(RESULTS, SECTION, section)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
