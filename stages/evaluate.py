"""`mmar evaluate`: score a checkpoint on held-out token shards; write metrics.json, report.md, pictures.

    mmar evaluate --ckpt runs/finetune/final                 # data/shapes/test, 200 samples
    mmar evaluate --ckpt runs/finetune/final gen.cfg=3 num_samples=500 --fid-weights ~/inception-2015-12-05.pt
    mmar evaluate --thresholds configs/eval/thresholds.yaml  # exit 1 if a metric is below its minimum

What is measured, on the first `num_samples` held-out samples:
  generation     the held-out captions are the prompts. Judges (mmar_cli/metrics/judges.py) say whether each
                 image shows what was asked: the analytic checker for the built-in shapes (gen.checker.*:
                 shape, colour, size, position, all), and for samples with a class label (`label_key`) a
                 small CNN trained on the training split's real images (gen.classifier.accuracy). Each judge
                 also scores the true images (ref.*): its ceiling.
                 FID against the true images at equal N: clean-fid's Inception when its weights file is on
                 disk (gen.fid), else an in-project extractor (gen.fid_proxy, not comparable to published
                 FIDs). Diversity in the same feature space: improved precision/recall (gen.precision,
                 gen.recall) and the spread of generated images within a class (or prompt) relative to the
                 true ones (gen.spread, 1.0 = as varied as the data).
  understanding  a caption per true image: exact match, BLEU-4 and ROUGE-L (und.caption.exact/bleu4/rougeL)
                 and, for built-in captions, per attribute; the held-out question -> answer: exact match
                 (und.qa.exact).
  tokenizer      PSNR / SSIM of the image tokenizer's reconstruction of freshly rendered held-out images of
                 the built-in dataset (tok.psnr, tok.ssim; exact for 'patch': PSNR inf, SSIM 1).
The true images are the held-out tokens decoded (exact for the 'patch' tokenizer).

metrics.json holds `metrics` (name -> value) and `provenance` (per metric: evaluator and version,
reference set and its hash, number of samples, the generation settings, seed, weights and checkpoint
hash). From Python, `run(cfg)` returns the same dict, so a sweep over e.g. gen.cfg is a loop of runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import typer
import yaml

from mmar_cli import __version__
from mmar_cli.cli_common import (CONFIG_HELP, OVERRIDES_HELP, build_config, command_line, console, handle_errors,
                                 single_command_app)
from mmar_cli.config import EvaluateConfig, to_container
from mmar_cli.data.sequence import QA, T2I
from mmar_cli.errors import UserError
from mmar_cli.machine import machine
from mmar_cli.metrics import accuracy, diversity, fid, judges, recon, seams
from mmar_cli.pictures import image_grid, save_png
from mmar_cli.progress import progress

SCHEMA = EvaluateConfig
REPORT_ROWS = 16  # samples shown in report.md's tables
IMAGE_SETTINGS = ("cfg", "cfg_schedule", "temperature", "temperature_end", "iterations", "diffusion_steps", "sampler",
                  "candidates")
TEXT_SETTINGS = ("max_new_tokens", "top_k", "top_p", "text_temperature")


# --------------------------------------------------------------------------------------------------
# Held-out data and the metrics computed on their own (each callable with true images in place of
# generated ones)
# --------------------------------------------------------------------------------------------------
def read_heldout(data: Path, n: int) -> List[dict]:
    """The first `n` samples of a shard directory, in the manifest's order (decode_sample's dicts)."""
    from mmar_cli.data.shards import iterate_samples

    samples = list(itertools.islice(iterate_samples(data), n))
    if not samples:
        raise UserError(f"data: {data} holds no samples")
    return samples


def caption_accuracy(captions: List[str], samples: List[dict]) -> Dict[str, float]:
    metrics = {"und.caption.exact": accuracy.exact_match(captions, [s["caption"] for s in samples])}
    checker = judges.CheckerJudge()
    scored = [(c, checker.expected(s)) for c, s in zip(captions, samples)]
    scored = [accuracy.caption_hits(c, e) for c, e in scored if e is not None]
    if scored:
        metrics.update({f"und.caption.{k}": v for k, v in accuracy.mean_hits(scored).items()})
    return metrics


def builtin_renders(samples: List[dict], image_size: int) -> Optional[tuple[np.ndarray, dict]]:
    """The held-out built-in samples drawn again from their attributes, background and jitter (in each
    sample's JSON): images that never were tokens. None when a sample lacks them (other data, older shards)."""
    from mmar_cli.data.shapes import render
    from mmar_cli.data.sources import center_square
    from PIL import Image

    if not all({"attributes", "background", "jitter", "size"} <= set(s["meta"]) for s in samples):
        return None
    images = []
    for s in samples:
        m = s["meta"]
        image = render(m["attributes"], m["background"], m["size"][0], [tuple(j) for j in m["jitter"]])
        images.append(image if m["size"][0] == image_size else center_square(Image.fromarray(image), image_size))
    originals = np.stack(images)
    reference = {"set": f"the {len(samples)} held-out built-in samples rendered again from their JSON",
                 "sha256": hashlib.sha256(originals.tobytes()).hexdigest()}
    return originals, reference


def tokenizer_reconstruction(image_tok, originals: np.ndarray) -> Dict[str, float]:
    """PSNR/SSIM of encode -> decode on uint8 images."""
    decoded = np.concatenate([image_tok.decode(image_tok.encode(originals[i:i + 64]))
                              for i in range(0, len(originals), 64)])
    m = recon.reconstruction_metrics(originals, decoded)
    return {"tok.psnr": m["psnr"], "tok.ssim": m["ssim"]}


# --------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------
def check_thresholds(metrics: Dict[str, float], path: str | Path) -> List[str]:
    """Failures (one sentence each) of `metrics` against a YAML of `name: minimum` or `name: {min, max}`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"thresholds: {path} does not exist")
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(spec, dict):
        raise UserError(f"thresholds: {path} must map metric names to minimums (e.g. gen.checker.all: 0.5)")
    failures = []
    for name, bound in spec.items():
        if name not in metrics:
            raise UserError(f"thresholds: {path}: metric '{name}' was not computed in this run; computed: "
                            f"{', '.join(sorted(metrics))}")
        bounds = bound if isinstance(bound, dict) else {"min": bound}
        if set(bounds) - {"min", "max"} or not all(isinstance(v, (int, float)) for v in bounds.values()):
            raise UserError(f"thresholds: {path}: '{name}' must be a number (minimum) or {{min: x, max: y}}, "
                            f"got {bound!r}")
        value = metrics[name]
        if "min" in bounds and not value >= bounds["min"]:
            failures.append(f"{name} = {value:.4g} is below the minimum {bounds['min']}")
        if "max" in bounds and not value <= bounds["max"]:
            failures.append(f"{name} = {value:.4g} is above the maximum {bounds['max']}")
    return failures


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def _judges(cfg, samples: List[dict], data: Path, data_manifest: dict, image_tok, notes: List[str]) -> list:
    """The judges that apply to these held-out samples: the checker where captions are built-in shapes
    captions, a classifier where samples carry a label (trained on the training split's real images, which
    must share the held-out data's tokenizers). Built before anything is generated, so a setting that
    cannot work fails in seconds."""
    from mmar_cli.data.shards import check_compatible, read_manifest

    checker = judges.CheckerJudge()
    found = [checker] if any(checker.expected(s) is not None for s in samples) else []
    labels = [judges.read_label(s, cfg.label_key) for s in samples]
    if any(label is not None for label in labels):
        train_dir = Path(cfg.judge_data) if cfg.judge_data else data.parent / "train"
        if not (train_dir / "manifest.json").is_file():
            raise UserError(f"the held-out samples carry labels ('{cfg.label_key}') but {train_dir} holds no training "
                            "shards to train a judge on; set judge_data=DIR (the training split's shards)")
        try:
            check_compatible(data_manifest, read_manifest(train_dir))
        except UserError as e:
            raise UserError(f"judge_data {train_dir} vs data {data}: {e}") from None
        classifier = judges.classifier_judge(train_dir, image_tok, cfg.label_key, cfg.judge_seed,
                                             log=lambda m: console.print(m, highlight=False))
        missing = labels.count(None)
        unseen = sorted({lab for lab in labels if lab is not None and lab not in classifier.index})
        if missing:
            notes.append(f"{missing} held-out samples have no '{cfg.label_key}': not judged by the classifier")
        if unseen:
            notes.append(f"{sum(lab in unseen for lab in labels)} held-out samples carry labels never seen in "
                         f"training (e.g. {unseen[0]!r}): not judged by the classifier")
        found.append(classifier)
    elif not found:
        notes.append(f"no judge for these samples: the captions are not built-in shapes captions and no sample "
                     f"has a '{cfg.label_key}' (set label_key to the JSON field that holds the class)")
    return found


def run(cfg) -> dict:
    """Evaluate as `cfg` (a validated EvaluateConfig) says; writes and returns metrics.json's content
    (`metrics`: name -> value; `thresholds.failed`: the failures when cfg.thresholds is set)."""
    from mmar_cli.data.shards import file_sha256, read_manifest
    from mmar_cli.inference import check_data_compatible, load_checkpoint

    data, out = Path(cfg.data), Path(cfg.out)
    data_manifest = read_manifest(data)
    model = load_checkpoint(cfg.ckpt, cfg.ema)
    ckpt = Path(model.source["path"])
    check_data_compatible(model.source["manifest"], data_manifest, ckpt, data)
    if cfg.fid_weights is not None:
        fid.find_inception(cfg.fid_weights)  # a bad path fails now, not after generating

    samples = read_heldout(data, cfg.num_samples)
    notes = []
    if len(samples) < cfg.num_samples:
        notes.append(f"{data} holds {len(samples)} samples, fewer than num_samples={cfg.num_samples}")
    fitting = [s for s in samples if model.prompt_error(T2I, s["caption"]) is None
               and not (s["question"] and model.prompt_error(QA, s["question"]))]
    if len(fitting) < len(samples):
        notes.append(f"{len(samples) - len(fitting)} samples skipped: caption or question longer than the "
                     f"model's prefix ({model.layout.prefix_len} tokens)")
    if not fitting:
        raise UserError(f"data: no caption in {data} fits the model's prefix ({model.layout.prefix_len} tokens)")
    samples, n = fitting, len(fitting)
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.float32))
    truth = model.image_tok.decode(tokens)
    reference = {"data": str(data), "manifest_sha256": file_sha256(data / "manifest.json"), "num_samples": n,
                 "images": f"held-out tokens decoded by the {model.image_tok.spec()['kind']} tokenizer"}
    ckpt_info = {k: model.source[k] for k in ("path", "weights", "sha256")}
    gen_settings = {k: cfg.gen[k] for k in IMAGE_SETTINGS}
    text_settings = {k: cfg.gen[k] for k in TEXT_SETTINGS}
    metrics: Dict[str, float] = {}
    provenance: Dict[str, dict] = {}

    def record(values: Dict[str, float], evaluator: str, count: int, settings: Optional[dict],
               ref: Optional[dict] = None, note: str = "") -> None:
        for name, value in values.items():
            metrics[name] = value
            provenance[name] = {
                "evaluator": evaluator, "mmar_version": __version__, "num_samples": count,
                "reference": ref or {"data": reference["data"], "manifest_sha256": reference["manifest_sha256"]},
                "settings": {**(settings or {}), "seed": cfg.seed, "weights": ckpt_info["weights"]},
                "checkpoint_sha256": ckpt_info["sha256"], "note": note}

    judge_list = _judges(cfg, samples, data, data_manifest, model.image_tok, notes)
    timings = {}
    # text -> image
    start = time.perf_counter()
    prompts = [s["caption"] for s in samples]
    with progress("evaluate: text -> image", n) as advance:
        generated = model.text_to_image(prompts, cfg.gen, cfg.seed, cfg.batch_size, progress=advance)
    timings["text_to_image_images_per_s"] = n / (time.perf_counter() - start)

    # judges: each scores the generated images and, as its ceiling, the true ones
    verdicts: Dict[int, List[str]] = {}
    judge_info = {}
    for judge in judge_list:
        expected = [judge.expected(s) for s in samples]
        judged = [i for i, e in enumerate(expected) if e is not None]
        if not judged:
            continue
        exp = [expected[i] for i in judged]
        gen_hits, ref_hits = judge.hits(generated[judged], exp), judge.hits(truth[judged], exp)
        record(_prefixed(f"gen.{judge.name}", accuracy.mean_hits(gen_hits)), judge.evaluator, len(judged),
               gen_settings)
        record(_prefixed(f"ref.{judge.name}", accuracy.mean_hits(ref_hits)), judge.evaluator, len(judged), None,
               note=f"the {judge.name} on the true images: the ceiling of gen.{judge.name}")
        judge_info[judge.name] = {"evaluator": judge.evaluator, "judged": len(judged), **judge.provenance}
        shown = [i for i in judged if i < REPORT_ROWS]
        for i, verdict in zip(shown, judge.verdicts(generated[shown], [expected[i] for i in shown])):
            verdicts.setdefault(i, []).append(f"{judge.name}: {verdict}")

    # the distribution: FID and, beside accuracy, diversity (precision/recall, within-group spread)
    extractor = fid.feature_extractor(cfg.fid_weights, model.device)
    if not extractor.comparable:
        console.print(f"[yellow]note:[/yellow] {fid.missing_weights_message()}", highlight=False)
        notes.append(fid.missing_weights_message())
    feats_gen, feats_true = extractor.extract(generated), extractor.extract(truth)
    if cfg.fid and n >= 2:
        f = fid.fid(feats_gen, feats_true, extractor)
        record({f["name"]: f["value"]}, f["evaluator"], n, gen_settings, note=f["note"])
    groups, grouped_by = _groups(samples, cfg.label_key)
    space = f"features of {extractor.evaluator}"
    if n > diversity.K_NEAREST:
        record(_prefixed("gen", diversity.precision_recall(feats_true, feats_gen)),
               f"improved precision/recall (Kynkaanniemi et al. 2019), k={diversity.K_NEAREST}, in the {space}",
               n, gen_settings, note="generated vs the true held-out images, equal N")
    spread = diversity.group_spread(feats_true, feats_gen, groups)
    if spread["groups"]:
        record({"gen.spread": spread["spread"]},
               f"mean pairwise distance among generated / among true images of one {grouped_by}, averaged over "
               f"{spread['groups']} {'classes' if grouped_by == 'class' else 'prompts'}, in the {space}", n, gen_settings,
               note="1.0: as varied as the data; near-copies of one image score near 0")
    else:
        notes.append(f"no {grouped_by} has two held-out samples: no within-{grouped_by} spread (raise num_samples)")

    # one picture or a patchwork: seams between tokens, against images that never were tokens where there
    # are such (the built-in renders), else against the held-out tokens decoded
    renders = builtin_renders(samples, model.image_size)
    originals, originals_ref = renders or (None, None)
    cell = model.image_size // model.image_tok.grid[1]
    seam_evaluator = f"mmar_cli/metrics/seams.py of mmar {__version__}, {cell} px tokens"
    if renders is not None:
        record({"gen.seam_ratio": seams.seam_ratio(generated, originals, cell)}, seam_evaluator, n, gen_settings,
               originals_ref, note="generated / true renders; 1.0: no more visible seams than the data")
        record({"ref.seam_ratio": seams.seam_ratio(truth, originals, cell)}, seam_evaluator, n, None,
               originals_ref, note="the tokenizer's own seams: held-out tokens decoded / true renders")
    else:
        record({"gen.seam_ratio": seams.seam_ratio(generated, truth, cell)}, seam_evaluator, n, gen_settings,
               note="generated / held-out tokens decoded (the original images are not in the shards)")

    # image -> text
    start = time.perf_counter()
    with progress("evaluate: image -> text", n) as advance:
        captions = model.image_to_text(tokens, [None] * n, cfg.gen, cfg.seed, cfg.batch_size, progress=advance)
    timings["captions_per_s"] = n / (time.perf_counter() - start)
    truths = [s["caption"] for s in samples]
    record(caption_accuracy(captions, samples), f"exact match and shapes.parse_caption, mmar {__version__}", n,
           text_settings)
    record(_prefixed("und.caption", accuracy.text_similarity(captions, truths)),
           f"torchmetrics {version('torchmetrics')}: corpus BLEU-4 (bleu_score, n_gram 4, no smoothing) and mean "
           f"ROUGE-L F-measure (rouge_score), lower case, words of any script", n, text_settings)
    asked = [i for i, s in enumerate(samples) if s["question"] and s["answer"]]
    answers = []
    if asked:
        answers = model.image_to_text(tokens[asked], [samples[i]["question"] for i in asked], cfg.gen, cfg.seed,
                                      cfg.batch_size)
        record({"und.qa.exact": accuracy.exact_match(answers, [samples[i]["answer"] for i in asked])},
               f"exact match, mmar {__version__}", len(asked), text_settings)

    # the image tokenizer
    if renders is not None:
        values = tokenizer_reconstruction(model.image_tok, originals)
        record(values, f"torchmetrics {version('torchmetrics')} PSNR (data range 1) / SSIM", n, None, originals_ref,
               note="inf: lossless" if math.isinf(values["tok.psnr"]) else "")
    else:
        notes.append("tokenizer PSNR/SSIM need the original images: measured only on the built-in dataset")

    result = {
        "mmar_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line(),
        "checkpoint": ckpt_info, "reference": reference, "judges": judge_info, "machine": machine(),
        "settings": {"seed": cfg.seed, "ema": cfg.ema, "gen": to_container(cfg.gen)},
        "versions": {"mmar": __version__, "torch": torch.__version__, "torchmetrics": version("torchmetrics"),
                     "clean-fid": version("clean-fid")},
        "metrics": metrics, "provenance": provenance, "notes": notes, "timings": timings,
    }
    if cfg.thresholds is not None:
        result["thresholds"] = {"file": cfg.thresholds, "failed": check_thresholds(metrics, cfg.thresholds)}

    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    shown = min(n, REPORT_ROWS)
    for i in range(shown):
        save_png(truth[i], out / "images" / f"true-{i:03d}.png")
        save_png(generated[i], out / "images" / f"gen-{i:03d}.png")
    save_png(image_grid(np.concatenate([truth[:shown], generated[:shown]]), shown), out / "generated_grid.png")
    rows = {
        "generated": [{"prompt": prompts[i], "verdict": "; ".join(verdicts.get(i, [])) or None}
                      for i in range(shown)],
        "captions": [{"truth": truths[i], "text": captions[i]} for i in range(shown)],
        "answers": [{"question": samples[i]["question"], "truth": samples[i]["answer"], "text": a}
                    for i, a in zip(asked[:REPORT_ROWS], answers)],
    }
    (out / "metrics.json").write_text(json.dumps(json_safe(result), indent=2) + "\n", encoding="utf-8")
    write_report(out, result, rows)
    return result


def _prefixed(prefix: str, values: Dict[str, float]) -> Dict[str, float]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def _groups(samples: List[dict], label_key: str) -> tuple[list, str]:
    """What the within-group spread compares: the class when every sample has one, else the prompt."""
    labels = [judges.read_label(s, label_key) for s in samples]
    if all(label is not None for label in labels):
        return labels, "class"
    return [s["caption"] for s in samples], "prompt"


@handle_errors
def cli(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="checkpoint directory; default: the newest complete "
                                        "final/ under runs/ [ckpt]"),
    data: Optional[Path] = typer.Option(None, "--data", help="held-out token shards [data]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory [out]"),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="held-out samples [num_samples]"),
    fid_weights: Optional[Path] = typer.Option(None, "--fid-weights", help="clean-fid's inception-2015-12-05.pt "
                                               "(never downloaded) [fid_weights]"),
    thresholds: Optional[Path] = typer.Option(None, "--thresholds", help="YAML of metric: minimum; a metric "
                                              "below fails the run with exit 1 [thresholds]"),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg", help="classifier-free guidance scale [gen.cfg]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed [seed]"),
    ema: Optional[bool] = typer.Option(None, "--ema/--raw", help="EMA or raw weights [ema]"),
):
    """Score a checkpoint on held-out shards: judged accuracy, FID and diversity of generated images, caption
    and answer accuracy, tokenizer PSNR/SSIM. Writes metrics.json, report.md and pictures to --out.

    Options are shortcuts for the config keys in brackets; key=value arguments set any key (listed below).
    """
    shortcuts = {"ckpt": ckpt, "data": data, "out": out, "num_samples": num_samples, "fid_weights": fid_weights,
                 "thresholds": thresholds, "gen.cfg": cfg_scale, "seed": seed, "ema": ema}
    cfg = build_config(SCHEMA, config, overrides, **shortcuts)
    result = run(cfg)
    for name, value in result["metrics"].items():
        print(f"{name:24s} {value:.4g}")
    console.print(f"metrics.json, report.md -> {cfg.out}/")
    failed = result.get("thresholds", {}).get("failed", [])
    if failed:
        for failure in failed:
            console.print(f"[bold red]below threshold:[/bold red] {failure} ({cfg.thresholds})", highlight=False)
        raise typer.Exit(1)


def main() -> None:
    single_command_app(cli, SCHEMA)()
