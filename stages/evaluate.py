"""`mmar evaluate`: score a checkpoint on held-out token shards; write metrics.json, report.md, pictures.

    mmar evaluate --ckpt runs/finetune/final                 # data/shapes/test, 200 samples
    mmar evaluate --ckpt runs/finetune/final gen.cfg=3 num_samples=500 --fid-weights ~/inception-2015-12-05.pt
    mmar evaluate --thresholds configs/eval/thresholds.yaml  # exit 1 if a metric is below its minimum

What is measured, on the first `num_samples` held-out samples:
  generation     the held-out captions are the prompts. Judges (mmar_cli/metrics/judges.py) say whether each
                 image shows what was asked: the analytic checker for the built-in shapes (gen.checker.*:
                 shape, colour, size, position, all), and for samples with a class label (`label_key`) a
                 small CNN trained on the training split's real images (gen.classifier.accuracy). Each judge
                 also scores the true images (ref.*): its ceiling. With gen.candidates K > 1 the kept images
                 are the best of K, and the first candidate of each prompt, the image K = 1 draws, is judged
                 too (one_draw.gen.*; on the built-in data its seam ratio too): both from one pass.
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

import math
import time
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import typer

from mmar_cli import __version__
from mmar_cli.cli_common import CONFIG_HELP, OVERRIDES_HELP, command_line, handle_errors, single_command_app
from mmar_cli.config import EvaluateConfig, load_config, to_container
from mmar_cli.data.sequence import QA, T2I
from mmar_cli.errors import UserError, console
from mmar_cli.machine import machine
from mmar_cli.metrics import accuracy, diversity, fid, judges, recon, report, seams, thresholds
from mmar_cli.metrics.report import IMAGE_SETTINGS, REPORT_ROWS
from mmar_cli.progress import progress

SCHEMA = EvaluateConfig
TEXT_SETTINGS = ("max_new_tokens", "top_k", "top_p", "text_temperature")


def run(cfg) -> dict:
    """Evaluate as `cfg` (a validated EvaluateConfig) says; writes and returns metrics.json's content
    (`metrics`: name -> value; `thresholds.failed`: the failures when cfg.thresholds is set)."""
    from mmar_cli.data.shards import file_sha256, first_samples, read_manifest
    from mmar_cli.inference import check_data_compatible, load_checkpoint

    data, out = Path(cfg.data), Path(cfg.out)
    data_manifest = read_manifest(data)
    model = load_checkpoint(cfg.ckpt, cfg.ema)
    ckpt = Path(model.source["path"])
    check_data_compatible(model.source["manifest"], data_manifest, ckpt, data)
    if cfg.fid_weights is not None:
        fid.find_inception(cfg.fid_weights)  # a bad path fails now, not after generating

    samples = first_samples(data, cfg.num_samples)
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

    judge_list = judges.judges_for(cfg, samples, data, data_manifest, model.image_tok, notes,
                                   log=lambda m: console.print(m, highlight=False))
    timings = {}
    # text -> image
    start = time.perf_counter()
    prompts = [s["caption"] for s in samples]
    with progress("evaluate: text -> image", n) as advance:
        generated, first_draw = model.text_to_image(prompts, cfg.gen, cfg.seed, cfg.batch_size, progress=advance,
                                                    with_first=True)
    timings["text_to_image_images_per_s"] = n / (time.perf_counter() - start)
    # with gen.candidates > 1, the first candidate of each prompt is the image gen.candidates=1 draws: judged
    # too (one_draw.*), from the same pass
    one_draw = cfg.gen.candidates > 1
    one_draw_settings = {**gen_settings, "candidates": 1}

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
        if one_draw:
            record(_prefixed(f"one_draw.gen.{judge.name}", accuracy.mean_hits(judge.hits(first_draw[judged], exp))),
                   judge.evaluator, len(judged), one_draw_settings,
                   note="the first of the gen.candidates images of each prompt: what one draw gives")
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
    groups, grouped_by = diversity.spread_groups(samples, cfg.label_key)
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
    renders = recon.builtin_renders(samples, model.image_size)
    originals, originals_ref = renders or (None, None)
    cell = model.image_size // model.image_tok.grid[1]
    seam_evaluator = f"mmar_cli/metrics/seams.py of mmar {__version__}, {cell} px tokens"
    if renders is not None:
        record({"gen.seam_ratio": seams.seam_ratio(generated, originals, cell)}, seam_evaluator, n, gen_settings,
               originals_ref, note="generated / true renders; 1.0: no more visible seams than the data")
        if one_draw:
            record({"one_draw.gen.seam_ratio": seams.seam_ratio(first_draw, originals, cell)}, seam_evaluator, n,
                   one_draw_settings, originals_ref, note="the first candidate of each prompt / true renders")
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
    record(accuracy.caption_accuracy(captions, samples), f"exact match and shapes.parse_caption, mmar {__version__}", n,
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
        values = recon.tokenizer_reconstruction(model.image_tok, originals)
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
        result["thresholds"] = {"file": cfg.thresholds, "failed": thresholds.check_thresholds(metrics, cfg.thresholds)}

    shown = min(n, REPORT_ROWS)
    rows = {
        "generated": [{"prompt": prompts[i], "verdict": "; ".join(verdicts.get(i, [])) or None}
                      for i in range(shown)],
        "captions": [{"truth": truths[i], "text": captions[i]} for i in range(shown)],
        "answers": [{"question": samples[i]["question"], "truth": samples[i]["answer"], "text": a}
                    for i, a in zip(asked[:REPORT_ROWS], answers)],
    }
    report.write(out, result, rows, truth, generated)
    return result


def _prefixed(prefix: str, values: Dict[str, float]) -> Dict[str, float]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


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
    cfg = load_config(SCHEMA, config, overrides, shortcuts)
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
