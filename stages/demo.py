"""`make demo` and `make eval`: the whole pipeline on the built-in dataset, one stage per process.

    python -m stages.demo            tokenize -> pretrain -> finetune -> sample -> evaluate (runs/demo/)
    python -m stages.demo --eval     a shorter tokenize -> pretrain -> evaluate that fails below
                                     configs/eval/thresholds.yaml (runs/eval/)
    python -m stages.demo --seeds 3  the demo's training and evaluation with seeds 0, 1, 2 (runs/demo-seeds/):
                                     mean, min and max of each figure (`make demo-seeds`)

The demo evaluates its model once, each image the best of 4 (configs/evaluate/demo.yaml); the first of
each prompt's 4 candidates is the image one draw gives (gen.candidates=1), judged in the same pass
(`one_draw.gen.*` in runs/demo/metrics.json).

Each stage is run as the same `mmar` command a user would type, with the presets in configs/*/demo.yaml
(or eval.yaml), so the printed commands can be copied and re-run one by one. `make demo` ends by writing
its figures into its section of docs/RESULTS.md (the section of the run before is replaced); `--seeds`
writes its own section.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from mmar_cli.machine import usable_cores
from mmar_cli.results import TABLE_HEAD, record_section, target_rows, target_text

console = Console()
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"
SECTION = "make demo"
SEEDS_SECTION = "make demo-seeds"
ONE_DRAW = "one_draw.gen.checker.all"  # all-correct of each prompt's first candidate: what gen.candidates=1 gives
# metric, what it says, target: a minimum, ("<=", maximum) or None
TARGETS = [
    ("gen.checker.all", "text -> image: images the checker reads with every attribute asked (best of 4)", 0.95),
    (ONE_DRAW, "the same, one image drawn per prompt (gen.candidates=1)", 0.90),
    ("gen.checker.shape", "the same, shape alone", None),
    ("ref.checker.all", "the checker on the true held-out images (its ceiling)", None),
    ("gen.checker.background", "generated images whose background is one colour (tolerance 24/255)", 0.95),
    ("one_draw.gen.checker.background", "the same, one image drawn per prompt", None),
    ("ref.checker.background", "the same for the held-out images' tokens decoded (the tokenizer's own)", None),
    ("gen.seam_ratio", "pixel steps across token edges / inside tokens, generated / true renders (1: none)",
     ("<=", 1.2)),
    ("und.caption.exact", "image -> text: captions of held-out images, exact match", 0.98),
    ("und.qa.exact", "question -> answer, exact match", 0.98),
    ("gen.precision", "precision of generated against true images (in-project features)", None),
    ("gen.recall", "recall of generated against true images (diversity)", None),
    ("gen.spread", "spread of generated images of one prompt relative to true renders of it", None),
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


def _run_stage(title: str, cmd: list[str], timings: dict, log: Optional[Path] = None, threads: int = 0) -> None:
    """Run one stage. `log`: append its output there (a seed run among others) instead of the terminal;
    `threads` > 0: torch threads of the stage's process."""
    shown = " ".join(shlex.quote(c) for c in ["mmar", *cmd[3:]])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    start = time.perf_counter()
    if log is None:
        console.rule(f"[bold]{title}")
        console.print(f"$ {shown}", highlight=False, markup=False)
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        console.print(f"{log.parent.name}: {title} started", highlight=False, soft_wrap=True)
        with open(log, "a") as f:
            f.write(f"$ {shown}\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        console.print(f"{log.parent.name}: {title} {'done' if proc.returncode == 0 else 'failed'} in "
                      f"{time.perf_counter() - start:.0f} s (log: {log})", highlight=False, soft_wrap=True)
    timings[title] = time.perf_counter() - start
    if proc.returncode != 0:
        console.print(f"[bold red]{title} failed[/bold red] (exit {proc.returncode}): {shown}")
        raise typer.Exit(proc.returncode)


def _pipeline(name: str, data: str, run: Path, seed: int, timings: dict, sample: bool, logged: bool = False,
              threads: int = 0) -> dict:
    """pretrain (-> finetune -> sample) -> evaluate into `run` with training and sampling seed `seed`;
    the demo's evaluation judges the best of 4 and, in the same pass, one draw (ONE_DRAW). Returns the metrics.
    `logged`: the stages write into run/stages.log (runs side by side); `threads`: torch threads per stage."""
    preset = lambda stage: f"configs/{stage}/{name}.yaml"  # noqa: E731
    eval_mode = name == "eval"
    _run = functools.partial(_run_stage, log=ROOT / run / "stages.log" if logged else None, threads=threads)
    _run("pretrain", _mmar("pretrain", "--config", preset("pretrain"), f"data={data}/train",
                           f"val_data={data}/val", f"out={run}/pretrain", f"trainer.seed={seed}"), timings)
    ckpt = run / "pretrain" / "final"
    if not eval_mode:
        _run("finetune", _mmar("finetune", "--config", preset("finetune"), f"data={data}/train",
                               f"val_data={data}/val", f"init={ckpt}", f"out={run}/finetune",
                               f"trainer.seed={seed}"), timings)
        ckpt = run / "finetune" / "final"
    if sample:
        prompts = [a for p in DEMO_PROMPTS for a in ("--prompt", p)]
        _run("sample", _mmar("sample", "--config", preset("sample"), *prompts, f"ckpt={ckpt}",
                             f"out={run}/samples", f"seed={seed}"), timings)
    evaluate = ["evaluate", "--config", preset("evaluate"), f"ckpt={ckpt}", f"data={data}/test", f"seed={seed}"]
    if eval_mode:
        evaluate.append("thresholds=configs/eval/thresholds.yaml")
    _run("evaluate", _mmar(*evaluate, f"out={run}"), timings)
    return json.loads((ROOT / run / "metrics.json").read_text())


def main(
    eval_mode: bool = typer.Option(False, "--eval", help="short run that fails below the thresholds"),
    keep_data: bool = typer.Option(False, "--keep-data", help="reuse token shards already written"),
    record: bool = typer.Option(True, "--record/--no-record", help="write the demo's figures into docs/RESULTS.md"),
    seeds: int = typer.Option(1, "--seeds", min=1, help="train and evaluate the demo with seeds 0..N-1 "
                              "(training and sampling; the data stays) into runs/demo-seeds/seed-K/, and record "
                              "the mean, min and max of each figure as docs/RESULTS.md's 'make demo-seeds'"),
    jobs: int = typer.Option(1, "--jobs", min=1, help="with --seeds: seeds trained side by side, each stage with "
                             "an equal share of the CPU threads and its output in runs/demo-seeds/seed-K/stages.log"),
) -> None:
    """Run the whole pipeline on the built-in dataset and print a summary."""
    name = "eval" if eval_mode else "demo"
    data = f"data/{name}"
    run = Path(f"runs/{name}" if seeds == 1 else f"runs/{name}-seeds")
    if eval_mode and seeds > 1:
        raise typer.BadParameter("--seeds is for the demo, not --eval")
    if jobs > 1 and seeds == 1:
        raise typer.BadParameter(f"--jobs {jobs} runs seeds side by side: give --seeds N (N > 1) with it")
    if run.exists():
        console.print(f"removing the previous {run}/")
        shutil.rmtree(ROOT / run)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if not (keep_data and (ROOT / data / "test" / "manifest.json").exists()):
        _run_stage("tokenize", _mmar("tokenize", "--config", f"configs/tokenize/{name}.yaml", f"out={data}",
                                     "overwrite=true"), timings)
    if seeds > 1:
        jobs = min(jobs, seeds)
        # side by side, each seed's stages get an equal share of the cores (the demo's model trains about
        # as fast on one thread as on two: docs/RESULTS.md)
        threads = max(1, usable_cores() // jobs) if jobs > 1 else 0

        def one(seed: int) -> dict:
            result = _pipeline(name, data, run / f"seed-{seed}", seed, {}, sample=False, logged=jobs > 1,
                               threads=threads)
            figures = [f"{k} {result['metrics'][k]:.3f}" for k, _, t in TARGETS
                       if t is not None and k in result["metrics"]]
            console.print(f"seed {seed}: " + ", ".join(figures), highlight=False, soft_wrap=True)
            return result

        with ThreadPoolExecutor(jobs) as pool:
            runs = list(pool.map(one, range(seeds)))
        total = time.perf_counter() - start
        if record:
            record_section(RESULTS, SEEDS_SECTION, seeds_section(runs, total, time.strftime("%Y-%m-%d")))
            console.print(f"figures recorded in {RESULTS.relative_to(ROOT)}")
        console.print(f"mmar demo over {seeds} seeds: {total / 60:.1f} min; runs in {run}/")
        return
    metrics = _pipeline(name, data, run, 0, timings, sample=not eval_mode)
    total = time.perf_counter() - start
    ckpt = run / ("pretrain" if eval_mode else "finetune") / "final"

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


def seeds_section(results: list, seconds: float, date: str) -> str:
    """The 'make demo-seeds' section: each figure's mean, min and max over the seeds, and every seed's value.
    A target holds for the mean; the worst seed should be within 2 points of it."""
    machine = results[0]["machine"]
    rows = []
    for name, what, target in TARGETS:
        values = [r["metrics"][name] for r in results if name in r["metrics"]]
        if len(values) < len(results):
            continue
        mean = float(np.mean(values))
        bound, met = target_text(mean, target)
        worst = max(values) if isinstance(target, tuple) and target[0] == "<=" else min(values)
        rows.append(f"| {what} | `{name}` | {mean:.3f} | {min(values):.3f} | {max(values):.3f} | "
                    f"{abs(worst - mean) * 100:.1f} | {' / '.join(f'{v:.3f}' for v in values)} | {bound} | {met} |")
    return "\n".join([
        f"## {SEEDS_SECTION}", "",
        f"Last run {date} on {machine['cpu']} ({machine['cores']} cores), `make demo-seeds`: the demo trained and "
        f"evaluated with seeds 0..{len(results) - 1} (training and sampling; the same data), "
        f"{results[0]['reference']['num_samples']} held-out samples each, {seconds / 60:.1f} min in all. "
        "A target holds for the mean; \"worst\" is the worst seed's distance from the mean, in points.", "",
        "| figure | metric | mean | min | max | worst (points) | per seed | target | |",
        "|---|---|---|---|---|---|---|---|---|", *rows, ""])


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
