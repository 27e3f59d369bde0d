"""What `mmar evaluate` writes: metrics.json (every figure with its provenance), report.md (the metrics
table, the generated images under their prompts, the text tables) and the pictures it shows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from mmar_cli.pictures import image_grid, save_png

REPORT_ROWS = 16  # samples shown in report.md's tables
# the generation settings named in the report's header (and recorded with every generated-image metric)
IMAGE_SETTINGS = ("cfg", "cfg_schedule", "temperature", "temperature_end", "neighbour_cooling", "noise_share",
                  "iterations", "diffusion_steps", "sampler", "candidates", "redraw", "redraw_weight")


def write(out: Path, result: dict, rows: dict, truth: np.ndarray, generated: np.ndarray) -> None:
    """metrics.json (`result`), report.md (`rows`: the report's tables, at most REPORT_ROWS each) and the
    first REPORT_ROWS true and generated images, alone and as a grid."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    shown = min(len(truth), REPORT_ROWS)
    for i in range(shown):
        save_png(truth[i], out / "images" / f"true-{i:03d}.png")
        save_png(generated[i], out / "images" / f"gen-{i:03d}.png")
    save_png(image_grid(np.concatenate([truth[:shown], generated[:shown]]), shown), out / "generated_grid.png")
    (out / "metrics.json").write_text(json.dumps(json_safe(result), indent=2) + "\n", encoding="utf-8")
    write_report(out, result, rows)


def json_safe(value):
    """JSON has no infinity or NaN: they are written as the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _cell(text: Optional[str]) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ") or "∅"


def write_report(out: Path, result: dict, rows: dict) -> None:
    """report.md with the metrics table, the generated images under their prompts and the text tables."""
    r = result
    lines = ["# mmar evaluation\n",
             f"- checkpoint: `{r['checkpoint']['path']}` ({r['checkpoint']['weights']} weights, sha256 "
             f"`{r['checkpoint']['sha256'][:16]}`)",
             f"- held-out data: `{r['reference']['data']}` (manifest sha256 `{r['reference']['manifest_sha256'][:16]}`), "
             f"{r['reference']['num_samples']} samples",
             f"- seed {r['settings']['seed']}; image generation: " +
             ", ".join(f"{k} {r['settings']['gen'][k]}" for k in IMAGE_SETTINGS),
             f"- command: `{r['command']}`\n", "## Metrics\n", "| metric | value | evaluator | samples | note |",
             "|---|---|---|---|---|"]
    for name, value in r["metrics"].items():
        p = r["provenance"][name]
        lines.append(f"| {name} | {value:.4g} | {_cell(p['evaluator'])} | {p['num_samples']} | {_cell(p.get('note'))} |")
    for note in r["notes"]:
        lines.append(f"\n> {note}")
    if rows.get("generated"):
        lines += ["\n## Text -> image\n", "Top: true images; bottom: generated from their captions.\n",
                  "![generated grid](generated_grid.png)\n", "| # | prompt | true | generated | judges |",
                  "|---|---|---|---|---|"]
        for i, row in enumerate(rows["generated"]):
            lines.append(f"| {i} | {_cell(row['prompt'])} | <img src=\"images/true-{i:03d}.png\" width=\"64\"> | "
                         f"<img src=\"images/gen-{i:03d}.png\" width=\"64\"> | {_cell(row['verdict'])} |")
    if rows.get("captions"):
        lines += ["\n## Image -> text\n", "| # | image | true caption | generated caption |", "|---|---|---|---|"]
        for i, row in enumerate(rows["captions"]):
            lines.append(f"| {i} | <img src=\"images/true-{i:03d}.png\" width=\"64\"> | {_cell(row['truth'])} | "
                         f"{_cell(row['text'])} |")
    if rows.get("answers"):
        lines += ["\n| # | question | true answer | generated answer |", "|---|---|---|---|"]
        for i, row in enumerate(rows["answers"]):
            lines.append(f"| {i} | {_cell(row['question'])} | {_cell(row['truth'])} | {_cell(row['text'])} |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
