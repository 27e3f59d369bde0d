"""`make bench`: training, data-loading and sampling speed from one run, written to benchmarks/results.md.

    python benchmarks/run.py                     # the full run (~12 minutes on 2 CPU cores)
    python benchmarks/run.py --quick             # toy sizes: for the tests and for development
    python benchmarks/run.py --ckpt runs/demo/finetune/final --threads 1 --out /tmp/results.md

Every figure comes from this one process, measured side by side: the CPU's matmul peak next to the
training steps it bounds, the default sampling settings next to MAR's on the same checkpoint. The
sampling checkpoint is --ckpt, else the newest complete runs/*/final or runs/*/*/final, else a short
tiny run trained here (then the accuracies are those of an undertrained model, and the report says so).
--quick never looks in runs/: it trains its own toy checkpoint unless --ckpt is given.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sample  # noqa: E402
import bench_train  # noqa: E402
from report_tools import load_average, table  # noqa: E402
from mmar_cli.config import TaskMixConfig  # noqa: E402
from mmar_cli.machine import machine  # noqa: E402
from mmar_cli.model.mmar import compile_unavailable  # noqa: E402
from mmar_cli.results import record_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results.md"
SECTION = "make bench"
TOY_MODEL = dict(width=64, depth=2, heads=2, kv_heads=1, mlp_hidden=128, diffusion=dict(width=64, depth=1))

# Targets (see the report's "Targets" section).
MIN_PEAK_FRACTION = 0.40
MIN_SAMPLING_SPEEDUP = 10.0
MAX_ACCURACY_DROP = 2.0
MAX_DATA_WAIT = 0.05

LABEL = {"32": "fp32", "bf16-mixed": "bf16-mixed"}


@dataclass
class Sizes:
    """How much of everything one run measures."""

    peak_n: int = 2048  # side of the square matmul of the peak
    peak_rounds: int = 5  # training rows: rounds of (the peak, then the row's steps)
    train: dict = field(default_factory=lambda: {"tiny": (64, 5), "small": (32, 3)})  # preset: (batch, steps)
    scaling_batch: int = 16  # tiny preset, bf16-mixed: 1x, 2x, 4x of this batch and of the frame
    scaling_steps: int = 5
    num_train: int = 2000  # built-in samples tokenized for the data pipeline (and the fallback run)
    shard_size: int = 250
    data_batch: int = 64  # the tiny preset's training batch
    data_steps: int = 90  # about 3 epochs of num_train samples: the first from disk, the rest from the cache
    fallback_steps: int = 300  # optimizer steps of the checkpoint trained when there is none
    fallback_model: Optional[dict] = None  # None: the tiny preset
    choices: tuple = (None, 200, 40)  # training-step choices A/B: (batch, None: the demo's; untimed, timed steps)
    choice_repeats: int = 2  # runs of each choice, alternating
    loop_samples: int = 16000  # the demo's whole pretraining loop at its batch and at 64: samples per run
    autoencoder: tuple = (2000, 200, 2)  # the ae tokenizer's training, fp32 vs bf16: (images, steps per phase, runs)
    prompts: int = 128  # prompts for default vs reference sampling and for captions (one standard error ~4 points at 60 %)
    batch: int = 16  # rows per sampling forward pass
    min_sampling_s: float = 10.0  # default and reference sampling: fastest of runs filling this time
    min_variant_s: float = 3.0    # prompt cache and batched CFG: the same, per variant
    variant_prompts: int = 16  # prompts of the cache / batched-CFG comparisons


QUICK = Sizes(peak_n=256, peak_rounds=2, train={"tiny": (2, 1), "small": (2, 1)}, scaling_batch=1, scaling_steps=1,
              num_train=32, shard_size=8, data_batch=4, data_steps=12, fallback_steps=2, fallback_model=TOY_MODEL,
              prompts=2, batch=2, min_sampling_s=0.0, min_variant_s=0.0, variant_prompts=2, choices=(4, 1, 2),
              choice_repeats=1, loop_samples=512, autoencoder=(16, 2, 1))


_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f} s] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------------
def tokenize_shapes(root: Path, sizes: Sizes) -> Path:
    """Built-in training samples through the real tokenize stage; returns the shard directory."""
    from mmar_cli.config import TokenizeConfig, load_config
    from stages import tokenize

    cfg = load_config(TokenizeConfig, overrides=[
        f"out={root}", f"shapes.num_train={sizes.num_train}", "shapes.num_val=0", "shapes.num_test=0",
        f"shard_size={sizes.shard_size}"])
    tokenize.run(cfg)
    return root / "train"


def training_runs(preset: str) -> List[tuple]:
    """(precision, compiled) of each row of `preset`: both precisions eager, and for the small preset (the
    target's) bf16-mixed with its blocks compiled as `trainer.compile=true` does, where torch.compile can run."""
    runs = [(precision, False) for precision in bench_train.PRECISIONS]
    return runs + [("bf16-mixed", True)] if preset == "small" and compile_unavailable("cpu") is None else runs


def measure_training(tok, token_dim: int, sizes: Sizes) -> dict:
    rows = []
    for preset, (batch, steps) in sizes.train.items():
        cfg = bench_train.model_config(preset, tok.vocab_size, token_dim)
        for precision, compiled in training_runs(preset):
            r = bench_train.train_speed(cfg, tok, batch, precision, steps, compile=compiled, peak_n=sizes.peak_n,
                                        rounds=sizes.peak_rounds)
            r.update(preset=preset, precision=precision)
            rows.append(r)
            log(f"train {preset} {row_label(r)}: {r['samples_s']:.1f} samples/s, {r['tokens_s']:.0f} tokens/s, "
                f"{100 * r['peak_frac']:.0f} % of the peak beside it ({r['peak']:.0f} GFLOP/s)")
    peaks = {p: [x for r in rows if r["precision"] == p for x in r["peaks"]] for p in bench_train.PRECISIONS}
    return {"peaks": {p: statistics.median(v) for p, v in peaks.items()},
            "peak_range": {p: (min(v), max(v)) for p, v in peaks.items()}, "rows": rows}


def row_label(r: dict) -> str:
    return LABEL[r["precision"]] + (", compiled" if r["compiled"] else "")


def measure_scaling(tok, token_dim: int, sizes: Sizes) -> dict:
    """Step time of the tiny preset (bf16-mixed) at 1x/2x/4x the batch, and at 1x/2x/4x the frame."""
    tiny = bench_train.model_config("tiny", tok.vocab_size, token_dim)
    batch = [bench_train.train_speed(tiny, tok, sizes.scaling_batch * k, "bf16-mixed", sizes.scaling_steps)
             for k in (1, 2, 4)]
    frame = [batch[0]] + [bench_train.train_speed(bench_train.model_config("tiny", tok.vocab_size, token_dim, k),
                                                  tok, sizes.scaling_batch, "bf16-mixed", sizes.scaling_steps)
                          for k in (2, 4)]
    log("scaling: batch " + ", ".join(f"{r['step_s']:.3f}" for r in batch) +
        " s; frame " + ", ".join(f"{r['step_s']:.3f}" for r in frame) + " s")
    return {"batch": batch, "frame": frame}


# (what differs from the demo's settings, the environment it runs with, bench_train.py's flags); the first is
# the demo's own: its pretraining preset's model and batch, with mmar's defaults for the rest
STEP_CHOICES = [
    ("the demo's settings", {}, []),
    ("oneDNN's kernel cache at its own default, 1024 kernels", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}, []),
    ("a pass per task (`model.split_tasks=true`)", {}, ["--split-tasks"]),
    ("fused AdamW instead of foreach", {}, ["--adamw", "fused"]),
    ("the blocks compiled (`trainer.compile=true`)", {}, ["--compile"]),
    ("batch 64 (`trainer.batch_size`'s default)", {}, ["--batch", "64"]),
]


def run_child(command: List[str], env: dict):
    """A measuring child process, run to its end (its stdout and stderr captured); if it fails, an error that
    shows the end of its output rather than only its exit status."""
    import subprocess

    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{shlex.join(command)} exited with {done.returncode}:\n{tail}")
    return done


def measure_step_choices(shard_dir: Path, sizes: Sizes, threads: int) -> List[dict]:
    """The demo's model on batches that change every step, with the demo's settings and with each of them undone
    (STEP_CHOICES): a process each, as oneDNN reads its kernel-cache setting once; the runs alternate
    `sizes.choice_repeats` times and each choice keeps its fastest (this machine's speed drifts)."""
    import json

    batch, warmup, steps = sizes.choices
    sized = ["--warmup", str(warmup), "--steps", str(steps)] + ([] if batch is None else ["--batch", str(batch)])
    # torch.compile's choice only where it can run (a C++ compiler on a CPU)
    choices = [c for c in STEP_CHOICES if "--compile" not in c[2] or compile_unavailable("cpu") is None]
    runs: List[List[dict]] = [[] for _ in choices]
    for _ in range(sizes.choice_repeats):
        for (name, env, flags), results in zip(choices, runs):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), **env}
            out = run_child([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), str(shard_dir),
                             *sized, *flags], env).stdout
            results.append({"choice": name, **json.loads(out.strip().splitlines()[-1])})
            log(f"training step, {name}: {results[-1]['samples_s']:.1f} samples/s")
    return [min(results, key=lambda r: r["step_s"]) for results in runs]


def loop_samples_per_second(log_text: str, batch: int) -> float:
    """Samples/s of `mmar pretrain`'s progress lines (each the rate since the line before), over the intervals
    after the first two (oneDNN compiles its kernels in those) when there are more than two."""
    import re

    lines = [(int(step), float(rate)) for step, rate in
             re.findall(r"^step (\d+)/\d+ .*?([0-9.]+) samples/s", log_text, re.M)]
    intervals = [(step - prev, rate) for (prev, _), (step, rate) in zip([(0, 0.0)] + lines, lines)]
    if not intervals:
        raise RuntimeError("no progress lines ('step N/M ... samples/s') in the pretraining's output: "
                           f"{log_text[-500:]!r}")
    kept = intervals[2:] if len(intervals) > 2 else intervals
    samples = sum(steps * batch for steps, _ in kept)
    return samples / sum(steps * batch / rate for steps, rate in kept)


def measure_pretrain_loop(shard_dir: Path, sizes: Sizes, threads: int, tmp: Path) -> List[dict]:
    """`mmar pretrain --config configs/pretrain/demo.yaml` itself (reading the shards, Lightning's loop, logging
    and the step) on `sizes.loop_samples` samples at the demo's batch and at 64, alternating
    `sizes.choice_repeats` times; each batch keeps its fastest run. What a step at either batch costs outside the
    model is in these figures and not in the synthetic steps of STEP_CHOICES."""
    from mmar_cli.config import TrainConfig, load_config

    preset = ROOT / bench_train.DEMO_PRESET
    runs: dict = {load_config(TrainConfig, preset).trainer.batch_size: [], 64: []}
    for rep in range(sizes.choice_repeats):
        for batch, results in runs.items():
            steps = max(1, sizes.loop_samples // batch)
            done = run_child([sys.executable, "-m", "mmar_cli.app", "pretrain", "--config", str(preset),
                              f"data={shard_dir}", "val_data=null", f"out={tmp / f'loop-{batch}-{rep}'}",
                              f"trainer.batch_size={batch}", f"trainer.max_steps={steps}",
                              f"trainer.log_every={max(1, steps // 10)}", f"trainer.ckpt_every={steps}",
                              "trainer.accelerator=cpu"], {**os.environ, "OMP_NUM_THREADS": str(threads)})
            results.append({"batch": batch, "steps": steps,
                            "samples_s": loop_samples_per_second(done.stdout + done.stderr, batch)})
            log(f"pretraining loop, batch {batch}: {results[-1]['samples_s']:.1f} samples/s")
    return [max(results, key=lambda r: r["samples_s"]) for results in runs.values()]


def measure_autoencoder(sizes: Sizes) -> List[dict]:
    """The `ae` tokenizer's training at its default settings, fp32 and bf16 (`image_tokenizer.ae_precision`):
    `steps` of the whole autoencoder then `steps` of the decoder alone, on built-in training images; the runs
    alternate and each precision keeps its fastest per phase. Images/s as its progress lines count them."""
    import re

    import numpy as np
    from omegaconf import OmegaConf

    from mmar_cli.config import ImageTokenizerConfig
    from mmar_cli.data import shapes
    from mmar_cli.tokenizers.image import build_image_tokenizer

    n_images, steps, repeats = sizes.autoencoder
    cfg = OmegaConf.structured(ImageTokenizerConfig)
    images = np.stack([s["image"] for s in shapes.iterate("train", n_images)])
    best = {}
    for _ in range(repeats):
        for precision in ("32", "bf16"):
            lines = []
            run_cfg = OmegaConf.merge(cfg, {"kind": "ae", "ae_steps": steps, "ae_decoder_steps": steps,
                                            "ae_precision": precision})
            build_image_tokenizer(run_cfg, images.shape[1], images, log=lines.append)
            for phase, prefix in (("whole autoencoder", "ae: step"), ("decoder alone", "ae decoder: step")):
                last = [line for line in lines if line.startswith(prefix)][-1]
                images_s = float(re.search(r"([\d.]+) images/s", last).group(1))
                key = (precision, phase)
                best[key] = max(best.get(key, 0.0), images_s)
            log(f"autoencoder, {precision}: " + ", ".join(f"{phase} {best[(precision, phase)]:.0f} images/s"
                                                          for phase in ("whole autoencoder", "decoder alone")))
    return [{"precision": p, "phase": phase, "images_s": v, "step_ms": 1000 * cfg.ae_batch / v,
             "vs_fp32": v / best[("32", phase)]} for (p, phase), v in best.items()]


def measure_data(shard_dir: Path, sizes: Sizes) -> List[dict]:
    rows = []
    for workers in (0, 1):
        r = bench_train.data_wait(shard_dir, workers, sizes.data_batch, sizes.data_steps,
                                  sizes.num_train // sizes.data_batch, model_overrides=sizes.fallback_model)
        log(f"data, {workers} workers: waiting {100 * r['wait_frac']:.1f} % of {r['step_s']:.3f} s/step "
            f"(first epoch {100 * r['wait_frac_first_epoch']:.1f} %, later {100 * r['wait_frac_later']:.1f} %)")
        rows.append(r)
    return rows


def measure_sha256(megabytes: int = 256) -> float:
    """GB/s of sha256 on one core (best of 3): what checking a shard or a checkpoint file costs per byte."""
    block = os.urandom(2**20)
    best = float("inf")
    for _ in range(3):
        digest, start = hashlib.sha256(), time.perf_counter()
        for _ in range(megabytes):
            digest.update(block)
        best = min(best, time.perf_counter() - start)
    return megabytes * 2**20 / 1e9 / best


def train_fallback(shard_dir: Path, out: Path, sizes: Sizes) -> Path:
    """A short tiny pretraining run with the real training stage (no EMA: it would lag the few steps)."""
    from mmar_cli.config import TrainConfig, load_config
    from stages.train_common import run

    model = [f"model.{k}={v}" for k, v in (sizes.fallback_model or {}).items() if k != "diffusion"]
    model += [f"model.diffusion.{k}={v}" for k, v in (sizes.fallback_model or {}).get("diffusion", {}).items()]
    cfg = load_config(TrainConfig, str(ROOT / "configs" / "pretrain" / "tiny.yaml"), overrides=[
        f"data={shard_dir}", "val_data=null", f"out={out}", f"trainer.max_steps={sizes.fallback_steps}",
        "trainer.batch_size=32", "trainer.ema_decay=0", "trainer.sample_every=0", "trainer.accelerator=cpu",
        f"trainer.ckpt_every={sizes.fallback_steps}", f"optim.warmup_steps={max(1, sizes.fallback_steps // 10)}",
        *model])
    return run(cfg, "pretrain")


def measure_sampling(ckpt: Path, trained_here: bool, sizes: Sizes) -> dict:
    from mmar_cli.inference import load_checkpoint

    inf = load_checkpoint(str(ckpt), ema=not trained_here, device="cpu")
    samples = bench_sample.shapes_samples(sizes.prompts, inf.image_size)
    prompts = [x["caption"] for x in samples]
    default = bench_sample.generation_config()
    reference = bench_sample.generation_config(bench_sample.REFERENCE_PRESET)
    result = {"ckpt": str(ckpt), "trained_here": trained_here, "prompts": len(prompts), "batch": sizes.batch,
              "min_sampling_s": sizes.min_sampling_s, "min_variant_s": sizes.min_variant_s}
    result["default"] = bench_sample.images_per_second(inf, prompts, default, sizes.batch, sizes.min_sampling_s)
    log(f"sampling default: {result['default']['images_s']:.2f} images/s, {result['default']['accuracy']:.1f} %")
    result["reference"] = bench_sample.images_per_second(inf, prompts, reference, sizes.batch, sizes.min_sampling_s)
    log(f"sampling reference: {result['reference']['images_s']:.3f} images/s, "
        f"{result['reference']['accuracy']:.1f} %")
    demo = bench_sample.generation_config(bench_sample.DEMO_PRESET)
    result["demo"] = bench_sample.images_per_second(inf, prompts, demo, sizes.batch, sizes.min_sampling_s)
    log(f"sampling demo preset: {result['demo']['images_s']:.2f} images/s, {result['demo']['accuracy']:.1f} %")
    few = prompts[:sizes.variant_prompts]
    result["cache"] = bench_sample.prompt_cache_speedup(inf, few, default, sizes.min_variant_s)
    result["cache"]["prompts"] = len(few)
    guided = bench_sample.generation_config(cfg=reference.cfg, cfg_schedule=reference.cfg_schedule)
    result["cfg"] = bench_sample.batched_cfg_speedup(inf, few, guided, sizes.min_variant_s)
    result["cfg"]["settings"] = bench_sample.describe(guided)
    result["text"] = bench_sample.captions_per_second(inf, samples, default, sizes.batch)
    log(f"prompt cache {result['cache']['speedup']:.2f}x, batched CFG {result['cfg']['speedup']:.2f}x, "
        f"text KV cache {result['text']['speedup']:.2f}x")
    return result


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def targets(training: dict, sampling: dict, data: List[dict]) -> List[str]:
    lines = []
    for r in training["rows"]:
        if r["preset"] == "small":
            how = " (`trainer.compile=true`)" if r["compiled"] else ""
            lines.append(f"{mark(r['peak_frac'] >= MIN_PEAK_FRACTION)} small preset, {row_label(r)}{how}: "
                         f"{100 * r['peak_frac']:.1f} % of the {LABEL[r['precision']]} matmul peak "
                         f"(target ≥ {100 * MIN_PEAK_FRACTION:.0f} %)")
    d, ref = sampling["default"], sampling["reference"]
    speedup = d["images_s"] / ref["images_s"]
    lines.append(f"{mark(speedup >= MIN_SAMPLING_SPEEDUP)} default sampling {speedup:.1f}× faster than the "
                 f"reference (target ≥ {MIN_SAMPLING_SPEEDUP:.0f}×)")
    drop = ref["accuracy"] - d["accuracy"]
    # both at 0 %: the model draws nothing readable under either setting, so the target is not tested
    verdict = mark(drop <= MAX_ACCURACY_DROP) if max(d["accuracy"], ref["accuracy"]) > 0 else "– (no signal)"
    lines.append(f"{verdict} checker accuracy {d['accuracy']:.1f} % (default) vs "
                 f"{ref['accuracy']:.1f} % (reference): {drop:+.1f} points lost (target ≤ {MAX_ACCURACY_DROP:g}; "
                 f"one image of {sampling['prompts']} is {100 / sampling['prompts']:.1f} points)")
    for r in data:
        lines.append(f"{mark(r['wait_frac'] < MAX_DATA_WAIT)} data wait with num_workers={r['workers']}: "
                     f"{100 * r['wait_frac']:.1f} % of step time over {r['steps'] / r['epoch_steps']:.1f} epochs: "
                     f"{100 * r['wait_frac_first_epoch']:.1f} % in the first, read from disk, "
                     f"{100 * r['wait_frac_later']:.1f} % in later ones, from the loader's cache "
                     f"(target < {100 * MAX_DATA_WAIT:.0f} %)")
    return lines


def report(info: dict, training: dict, choices: List[dict], loop: List[dict], ae: List[dict], scaling: dict,
           data: List[dict], sampling: dict, lines: List[str]) -> str:
    quick = " (**--quick: toy sizes**)" if info["quick"] else ""
    out = ["# mmar benchmarks", "", f"Generated by `{info['command']}` on {info['date']}{quick}."]
    out += machine_section(info) + ["", "## Targets", ""] + [f"- {line}" for line in lines]
    out += training_section(info, training) + choices_section(info, choices, loop)
    out += autoencoder_section(info, ae)
    out += scaling_section(info, scaling)
    out += data_section(info, data)
    out += sampling_section(sampling) + method_section()
    return "\n".join(out) + "\n"


def machine_section(info: dict) -> List[str]:
    m, loads = info["machine"], (info["load_start"], info["load_end"])
    # only the load before the run tells of other processes: the end figure counts this run's own threads
    before = None if "unknown" in loads[0] else float(loads[0].split()[0])
    busy = (f"**the machine was loaded** (1-minute load {before:.1f} on {m['cores']} cores before the run): other "
            "processes shared the CPU, so every figure here is lower than on an idle machine"
            if before is not None and before > 0.5 * m["cores"] else
            "the machine was otherwise idle when the run started (the end figure includes this run's own threads)")
    threads = "--threads" if info["threads_set"] else "torch default"
    return ["", "## Machine", "",
            f"- CPU: {m['cpu']}, {m['cores']} cores available; torch {m['torch']}, {m['threads']} thread(s) "
            f"({threads}); Python {m['python']}",
            f"- load average (1, 5, 15 min): {loads[0]} at the start, {loads[1]} at the end: {busy}",
            f"- wall time of the whole run: {info['seconds'] / 60:.1f} min"]


def training_section(info: dict, training: dict) -> List[str]:
    peaks, spans, sizes, mix = training["peaks"], training["peak_range"], info["sizes"], TaskMixConfig()
    fp32, bf16 = spans["32"], spans["bf16-mixed"]
    out = ["", "## Training", "",
           f"Matmul peak of this CPU in this run (best {info['machine']['threads']}-thread torch.mm of "
           f"{sizes.peak_n}², measured before each of the {sizes.peak_rounds} rounds of steps of every row; median "
           f"and range): fp32 **{peaks['32']:.1f} GFLOP/s** ({fp32[0]:.0f}-{fp32[1]:.0f}), bf16 "
           f"**{peaks['bf16-mixed']:.1f} GFLOP/s** ({bf16[0]:.0f}-{bf16[1]:.0f}).",
           "", "One step = forward + backward + grad clip + AdamW + EMA on a batch in the default task mix "
           f"(text→image {mix.t2i}, image→text {mix.i2t}, image only {mix.image_only}) from "
           "`sequence.build_batch`; step time = the median over the rounds of each round's median. \"of peak\" = "
           "the median over the rounds of the round's FLOP/s over the peak measured just before it. \"compiled\": "
           "the decoder's and the diffusion head's blocks through torch.compile (`trainer.compile=true`), its "
           "compile time not counted.", ""]
    rows = [[r["preset"], f"{r['params_m']:.1f}M", row_label(r), r["batch"], r["length"],
             f"{r['step_s']:.3f}", f"{r['samples_s']:.1f}", f"{r['tokens_s']:,.0f}", f"{r['gflop_step']:.1f}",
             f"{r['gflops']:.1f}", f"{r['peak']:.0f}", f"{100 * r['peak_frac']:.1f} %"] for r in training["rows"]]
    out += table(["preset", "params", "precision", "batch", "frame", "step (s)", "samples/s", "tokens/s",
                  "GFLOP/step", "GFLOP/s", "peak beside it", "of peak"], rows)
    by = {(r["preset"], r["precision"], r["compiled"]): r for r in training["rows"]}
    plain = {p: by[(p, "bf16-mixed", False)] for p in sizes.train}
    out += [""] + [f"- {p}: bf16-mixed is **{by[(p, '32', False)]['step_s'] / plain[p]['step_s']:.2f}×** the speed "
                   "of fp32" for p in sizes.train]
    # against the peak beside each: the machine's speed may drift between the two rows
    return out + [f"- {p}: compiled, bf16-mixed reaches **{r['peak_frac'] / plain[p]['peak_frac']:.2f}×** the eager "
                  f"steps' share of the peak beside them ({r['samples_s']:.1f} against {plain[p]['samples_s']:.1f} "
                  "samples/s as measured)" for (p, _, compiled), r in by.items() if compiled]


def choices_section(info: dict, choices: List[dict], loop: List[dict]) -> List[str]:
    _, warmup, steps = info["sizes"].choices
    ours = choices[0]
    out = ["", "## Training step choices", "",
           f"The model `make demo` pretrains ({bench_train.DEMO_PRESET}: {ours['width']} wide, 12-token prefix and "
           f"suffix), bf16-mixed, batch {ours['batch']}, a new batch of the task mix each step (the rows of each "
           "task, the columns they read and the masked count change every step, and with them the matmul shapes "
           f"oneDNN compiles a kernel for); mean of {steps} steps after {warmup}, one process per run "
           "(`ONEDNN_PRIMITIVE_CACHE_CAPACITY` is read once), the demo's settings and each of them undone "
           f"alternating {info['sizes'].choice_repeats} times; the fastest run of each. The last column is the "
           "ratio of samples/s.", ""]
    out += table(["run", "kernels kept", "batch", "step (s)", "samples/s", "the demo's settings vs this"],
                 [[r["choice"], r["capacity"], r["batch"], f"{r['step_s']:.3f}", f"{r['samples_s']:.1f}",
                   "" if r is ours else f"**{ours['samples_s'] / r['samples_s']:.2f}×**"] for r in choices])
    demo = loop[0]
    out += ["", f"The whole pretraining loop: `mmar pretrain --config {bench_train.DEMO_PRESET}` on "
            f"{info['sizes'].loop_samples} samples at the demo's batch and at 64 (reading the shards, Lightning's "
            "loop, logging and the step: what a step costs outside the model is here and not in the synthetic steps "
            "above), samples/s of its progress lines after the first two, alternating "
            f"{info['sizes'].choice_repeats} times; the fastest run of each.", ""]
    out += table(["batch", "steps", "samples/s", "the demo's batch vs this"],
                 [[r["batch"], r["steps"], f"{r['samples_s']:.1f}",
                   "" if r is demo else f"**{demo['samples_s'] / r['samples_s']:.2f}×**"] for r in loop])
    return out


def autoencoder_section(info: dict, ae: List[dict]) -> List[str]:
    n_images, steps, repeats = info["sizes"].autoencoder
    out = ["", "## Autoencoder training", "",
           "The `ae` image tokenizer's training at its defaults (`mmar tokenize`, `image_tokenizer.kind=ae`): "
           f"{steps} steps of the whole autoencoder, then {steps} of its decoder alone, on {n_images} built-in "
           f"training images, in fp32 and in bf16 (`image_tokenizer.ae_precision`: autocast, channels-last), "
           f"alternating {repeats} times; the fastest run of each, images/s over the whole phase.", ""]
    return out + table(["precision", "phase", "step (ms)", "images/s", "speed vs fp32"],
                       [[LABEL.get(r["precision"], r["precision"]), r["phase"], f"{r['step_ms']:.1f}",
                         f"{r['images_s']:.0f}", f"**{r['vs_fp32']:.2f}×**"] for r in ae])


def scaling_section(info: dict, scaling: dict) -> List[str]:
    b = info["sizes"].scaling_batch
    out = ["", "## Scaling", "",
           f"Tiny preset, bf16-mixed. Batch: {b} × 1, 2, 4 at the default frame. Frame: prefix "
           "(`model.max_prefix_len`), suffix (`model.max_suffix_len`) and image grid columns (4×4 → 4×8 → 4×16 "
           f"tokens) all × 1, 2, 4, at batch {b}.", ""]
    rows = []
    for what in ("batch", "frame"):
        rs = scaling[what]
        rows += [[f"{what} ×{k}", r["batch"], r["length"], f"{r['step_s']:.3f}",
                  f"{r['step_s'] / rs[0]['step_s']:.2f}×", f"{r['samples_s']:.1f}", f"{r['tokens_s']:,.0f}"]
                 for k, r in zip((1, 2, 4), rs)]
    return out + table(["", "batch", "frame", "step (s)", "step time vs ×1", "samples/s", "tokens/s"], rows)


def data_section(info: dict, data: List[dict]) -> List[str]:
    sizes = info["sizes"]
    out = ["", "## Data pipeline", "",
           f"The trainer's DataLoader (`ShardDataModule`) over {sizes.num_train} built-in samples written by "
           f"`stages.tokenize.run` ({sizes.shard_size} per shard), feeding tiny-preset bf16-mixed steps at batch "
           f"{sizes.data_batch}; wait = time blocked in `next(iterator)`, over {sizes.data_steps} steps after the "
           f"first batch (about {sizes.data_steps * sizes.data_batch / sizes.num_train:.1f} epochs): the rest of the "
           "first epoch reads the shards from disk, later epochs replay them from the loader's memory (datasets of "
           "at most 256 MB).", ""]
    rows = [[r["workers"], f"{100 * r['wait_frac']:.1f} %", f"{100 * r['wait_frac_first_epoch']:.1f} %",
             f"{100 * r['wait_frac_later']:.1f} %", f"{r['wait_ms']:.1f}", f"{r['step_s']:.3f}",
             f"{r['first_batch_s']:.2f}"] for r in data]
    out += table(["num_workers", "wait", "first epoch", "later epochs", "wait per step (ms)", "step incl. wait (s)",
                  "first batch (s)"], rows)
    return out + ["", "Each shard is checked against its manifest's sha256 when a loader worker first opens it "
                  "(inside the first batch and first epoch figures above): sha256 runs at "
                  f"**{info['sha256_gbs']:.2f} GB/s** on one core of this CPU, **{1 / info['sha256_gbs']:.2f} s per "
                  "GB** read (a checkpoint's files pay the same when written and when read)."]


def sampling_section(s: dict) -> List[str]:
    note = ("a short run trained by this benchmark: **its accuracies are those of an undertrained model**"
            if s["trained_here"] else "the EMA weights")
    d, ref, m, c, g, t = s["default"], s["reference"], s["demo"], s["cache"], s["cfg"], s["text"]
    out = ["", "## Sampling", "",
           f"Checkpoint `{s['ckpt']}` ({note}); {s['prompts']} held-out built-in captions as prompts, {s['batch']} "
           "rows per pass, seed 0; accuracy = images the checker reads with every attribute the prompt asks for; "
           f"time = the fastest of as many runs as fill {s['min_sampling_s']:g} s (`runs`); the prompt-cache and "
           f"batched-CFG variants: the fastest of runs filling {s.get('min_variant_s', 0):g} s each.", ""]
    out += table(["settings", "", "images/s", "time (s)", "runs", "checker accuracy"],
                 [["default (GenerationConfig)", d["settings"], f"{d['images_s']:.2f}", f"{d['seconds']:.1f}",
                   str(d["runs"]), f"{d['accuracy']:.1f} %"],
                  ["MAR reference (configs/sample/mar-reference.yaml)", ref["settings"], f"{ref['images_s']:.3f}",
                   f"{ref['seconds']:.1f}", str(ref["runs"]), f"{ref['accuracy']:.1f} %"],
                  ["the demo's (configs/sample/demo.yaml)", m["settings"], f"{m['images_s']:.2f}",
                   f"{m['seconds']:.1f}", str(m["runs"]), f"{m['accuracy']:.1f} %"]])
    return out + [
        "", f"- default vs reference: **{d['images_s'] / ref['images_s']:.1f}×** the images per second",
        f"- the demo's settings (each image the best of {m['candidates']} drawn) vs reference: "
        f"**{m['images_s'] / ref['images_s']:.1f}×** the images per second",
        f"- prompt KV cache ({c['prompts']} prompts, default settings): {c['with_s']:.2f} s with vs "
        f"{c['without_s']:.2f} s re-running the prompt every iteration: **{c['speedup']:.2f}×** (same images: "
        f"max token difference {c['max_diff']:.1e})",
        f"- batched CFG ({g['settings']}): cond + uncond in one batch {g['one_batch_s']:.2f} s vs two separate "
        f"batches {g['two_passes_s']:.2f} s: **{g['speedup']:.2f}×**",
        f"- captions (greedy, ≤ {t['max_new_tokens']} tokens): {t['cached']['captions_s']:.1f} captions/s with the "
        f"KV cache vs {t['uncached']['captions_s']:.1f} without: **{t['speedup']:.2f}×** (same captions: "
        f"{'yes' if t['same'] else 'NO'}; exact match with the truth {t['exact']:.1f} %)"]


def method_section() -> List[str]:
    return ["", "## How the figures are computed", "", "Training FLOPs per step (`benchmarks/bench_train.py`):",
            "", "```", bench_train.FLOP_FORMULA.rstrip(), "```", "",
            "Fraction of peak = FLOPs per step / step time / the matmul peak of the same precision measured "
            "just before those steps, the median over rounds. Sampling figures include decoding tokens to pixels. "
            "\"Two separate batches\" runs generate_images() on the conditional rows and on the unconditional rows "
            "one after the other (the work of guidance done in two passes); \"re-running the prompt\" swaps the "
            "backbone for `bench_sample.RecomputePrefix` inside the same generate_images()."]


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes (tests, development)")
    p.add_argument("--ckpt", help="checkpoint for the sampling figures (default: newest runs/*/final, "
                   "runs/*/*/final, else a short run trained here)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the report (default: benchmarks/results.md)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    """Run every measurement, write the report; returns the figures (and the report's path as `out`)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, " ".join(shlex.quote(a) for a in ["python", "benchmarks/run.py",
                                                            *(sys.argv[1:] if argv is None else argv)]))
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, command: str) -> dict:
    from mmar_cli.data.shards import load_tokenizers

    from mmar_cli.engine import checkpoint

    sizes = QUICK if args.quick else Sizes()
    # a mistyped --ckpt is refused now, not after the training measurements
    if args.ckpt:
        ckpt = checkpoint.load(args.ckpt).path
    else:
        ckpt = None if args.quick else checkpoint.newest_final(ROOT / "runs")
    start, load_start = datetime.datetime.now(), load_average()
    with tempfile.TemporaryDirectory(prefix="mmar-bench-") as tmp:
        log(f"tokenizing {sizes.num_train} built-in samples into {tmp}")
        shard_dir = tokenize_shapes(Path(tmp) / "shapes", sizes)
        tok, image_tok = load_tokenizers(shard_dir)
        training = measure_training(tok, image_tok.token_dim, sizes)
        scaling = measure_scaling(tok, image_tok.token_dim, sizes)
        choices = measure_step_choices(shard_dir, sizes, torch.get_num_threads())
        loop = measure_pretrain_loop(shard_dir, sizes, torch.get_num_threads(), Path(tmp))
        ae = measure_autoencoder(sizes)
        data = measure_data(shard_dir, sizes)
        sha256_gbs = measure_sha256()
        trained_here = ckpt is None
        if trained_here:
            kind = "toy model" if sizes.fallback_model else "tiny preset"
            log(f"no checkpoint given{'' if args.quick else ' or under runs/'}: training {sizes.fallback_steps} "
                f"steps of the {kind}")
            ckpt = train_fallback(shard_dir, Path(tmp) / "run", sizes)
        sampling = measure_sampling(ckpt, trained_here, sizes)
        if trained_here:
            sampling["ckpt"] = f"(temporary) {kind}, {sizes.fallback_steps} steps at batch 32"

    info = {"machine": machine(), "command": command, "date": start.strftime("%Y-%m-%d %H:%M"),
            "load_start": load_start, "load_end": load_average(), "quick": args.quick, "sizes": sizes,
            "threads_set": bool(args.threads), "seconds": (datetime.datetime.now() - start).total_seconds(),
            "sha256_gbs": sha256_gbs}
    lines = targets(training, sampling, data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a section of its own: `make bench-scale` keeps another in the same file
    record_section(out, SECTION, report(info, training, choices, loop, ae, scaling, data, sampling, lines))
    log("\n".join(["", *lines, "", f"written: {out}"]))
    return {"out": out, "training": training, "choices": choices, "loop": loop, "autoencoder": ae,
            "scaling": scaling, "data": data, "sampling": sampling, "sha256_gbs": sha256_gbs}


if __name__ == "__main__":
    from mmar_cli.errors import UserError

    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
