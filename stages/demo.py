"""`make demo` and `make eval`: the whole pipeline on the built-in dataset, one stage per process.

    python -m stages.demo            tokenize -> pretrain -> finetune -> sample -> evaluate (runs/demo/)
    python -m stages.demo --eval     a shorter tokenize -> pretrain -> evaluate that fails below
                                     configs/eval/thresholds.yaml (runs/eval/)

Each stage is run as the same `mmar` command a user would type, with the presets in configs/*/demo.yaml
(or eval.yaml), so the printed commands can be copied and re-run one by one. `make demo` ends by writing
its figures into its section of docs/RESULTS.md (the section of the run before is replaced).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mmar_cli.results import TABLE_HEAD, record_section, target_rows

console = Console()
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"
SECTION = "make demo"
# metric, what it says, target (minimum)
TARGETS = [
    ("gen.checker.all", "text -> image: images the checker reads with every attribute asked (best of 4)", 0.90),
    ("gen.checker.shape", "the same, shape alone", None),
    ("ref.checker.all", "the checker on the true held-out images (its ceiling)", None),
    ("gen.checker.background", "generated images whose background is one colour (tolerance 24/255)", None),
    ("ref.checker.background", "the same for the held-out images' tokens decoded (the tokenizer's own)", None),
    ("gen.seam_ratio", "pixel steps across token edges / inside tokens, generated / true renders (1: none)",
     None),
    ("und.caption.exact", "image -> text: captions of held-out images, exact match", 0.98),
    ("und.qa.exact", "question -> answer, exact match", 0.98),
    ("gen.fid_proxy", "FID of generated against true images, in-project features (lower is better)", None),
]

DEMO_PROMPTS = [
    "a large red circle at the top left",
    "a small blue square in the center",
    "a large green triangle at the bottom right",
    "a small yellow cross at the top",
]


def _mmar(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmar_cli.app", *args]


def _run(title: str, cmd: list[str], timings: dict) -> None:
    shown = " ".join(shlex.quote(c) for c in ["mmar", *cmd[3:]])
    console.rule(f"[bold]{title}")
    console.print(f"$ {shown}", highlight=False, markup=False)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    timings[title] = time.perf_counter() - start
    if proc.returncode != 0:
        console.print(f"[bold red]{title} failed[/bold red] (exit {proc.returncode}): {shown}")
        raise typer.Exit(proc.returncode)


def main(
    eval_mode: bool = typer.Option(False, "--eval", help="short run that fails below the thresholds"),
    keep_data: bool = typer.Option(False, "--keep-data", help="reuse token shards already written"),
    record: bool = typer.Option(True, "--record/--no-record", help="write the demo's figures into docs/RESULTS.md"),
) -> None:
    """Run the whole pipeline on the built-in dataset and print a summary."""
    name = "eval" if eval_mode else "demo"
    data, run = f"data/{name}", Path(f"runs/{name}")
    preset = lambda stage: f"configs/{stage}/{name}.yaml"  # noqa: E731
    if run.exists():
        console.print(f"removing the previous {run}/")
        shutil.rmtree(ROOT / run)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    if not (keep_data and (ROOT / data / "test" / "manifest.json").exists()):
        _run("tokenize", _mmar("tokenize", "--config", preset("tokenize"), f"out={data}", "overwrite=true"),
             timings)
    _run("pretrain", _mmar("pretrain", "--config", preset("pretrain"), f"data={data}/train",
                           f"val_data={data}/val", f"out={run}/pretrain"), timings)
    ckpt = run / "pretrain" / "final"
    if not eval_mode:
        _run("finetune", _mmar("finetune", "--config", preset("finetune"), f"data={data}/train",
                               f"val_data={data}/val", f"init={ckpt}", f"out={run}/finetune"), timings)
        ckpt = run / "finetune" / "final"
        prompts = [a for p in DEMO_PROMPTS for a in ("--prompt", p)]
        _run("sample", _mmar("sample", "--config", preset("sample"), *prompts, f"ckpt={ckpt}",
                             f"out={run}/samples"), timings)
    evaluate = ["evaluate", "--config", preset("evaluate"), f"ckpt={ckpt}", f"data={data}/test", f"out={run}"]
    if eval_mode:
        evaluate.append("thresholds=configs/eval/thresholds.yaml")
    _run("evaluate", _mmar(*evaluate), timings)
    total = time.perf_counter() - start

    metrics = json.loads((ROOT / run / "metrics.json").read_text())
    if record and not eval_mode:
        record_section(RESULTS, SECTION, results_section(metrics, timings, time.strftime("%Y-%m-%d")))
        console.print(f"figures recorded in {RESULTS.relative_to(ROOT)}")
    table = Table("metric", "value", title=f"mmar {name}: {total / 60:.1f} min")
    for key, value in _headline(metrics).items():
        table.add_row(key, value)
    for stage, seconds in timings.items():
        table.add_row(f"time: {stage}", f"{seconds:.0f} s")
    console.print(table)
    console.print(f"report: {run}/report.md   metrics: {run}/metrics.json   checkpoint: {ckpt}/")


def results_section(result: dict, timings: dict, date: str) -> str:
    """The demo's section of docs/RESULTS.md: its figures against their targets and each stage's time."""
    machine, total = result["machine"], sum(timings.values())
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items())
    return "\n".join([
        f"## {SECTION}", "",
        f"Last run {date} on {machine['cpu']} ({machine['cores']} cores), `make demo` (set-up not counted); "
        f"{result['reference']['num_samples']} held-out samples of the built-in dataset.", "",
        *TABLE_HEAD, *target_rows(result["metrics"], TARGETS),
        f"| whole demo: {stages} | | {total / 60:.1f} min | | |", ""])


def _headline(metrics: dict) -> dict[str, str]:
    """The figures worth a glance, from whatever metrics.json holds (nested dicts are flattened)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            flat[prefix] = f"{node:.4g}"

    walk("", metrics.get("metrics", metrics))
    return flat


if __name__ == "__main__":
    typer.run(main)
