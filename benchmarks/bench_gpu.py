"""The GPU's figures, run by `benchmarks/gpu.sh` (which checks for a GPU first): one process, at most
`--budget` seconds, writing benchmarks/results-gpu.md after every part so that a run cut short keeps what it
measured. A part that fails is reported with its error and the others still run; the exit code is 1 then.

    python benchmarks/bench_gpu.py --out benchmarks/results-gpu.md --budget 450

Parts, in order:
  tests      the tests marked `cuda` (pytest -m cuda)
  peak       the GPU's own bf16 matmul peak (bench_train.matmul_peak on the GPU)
  training   one optimizer step (bench_train.TrainStep: forward, backward, clip, AdamW, EMA) in bf16-mixed for the
             small, base and qwen2-0.5b presets on KL-16 frames (16x16 image tokens, 64 + 64 text): step time,
             samples/s, FLOPs (bench_train.train_flops) and MFU = FLOP/s / the peak above
  fsdp       `mmar pretrain` of configs/pretrain/qwen2-0.5b.yaml for a few steps with trainer.strategy=fsdp on one
             GPU, on 8 photos tokenized with configs/tokenize/qwen2-0.5b.yaml (stand-ins from scale_assets.py)
  sampling   images/s from that checkpoint at the default settings and at configs/sample/mar-reference.yaml's
Every row carries the peak GPU memory allocated while it ran.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sample  # noqa: E402
import bench_train  # noqa: E402
import scale_assets  # noqa: E402
from report_tools import table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results-gpu.md"
GiB = 2 ** 30
MIN_MFU = 0.45  # the target for base and qwen2-0.5b
# preset: batch per step. Frames of KL-16 tokens, the qwen2-0.5b presets' text lengths.
TRAIN = {"small": 128, "base": 64, "qwen2-0.5b": 32}
FRAME = dict(image_grid=[16, 16], max_prefix_len=64, max_suffix_len=64)
TOKEN_DIM = 16
TRAIN_STEPS = 10  # timed (median), after one untimed
PEAK_N = 8192
FSDP_STEPS = 3
PROMPTS = 32


class Report:
    """The results file, rewritten after every part."""

    def __init__(self, out: Path, head: List[str]):
        self.out, self.head, self.start = out, head, time.perf_counter()
        self.sections: List[List[str]] = []
        self.failed: List[str] = []

    def add(self, lines: List[str]) -> None:
        self.sections.append(lines)
        self.write()

    def write(self) -> None:
        minutes = (time.perf_counter() - self.start) / 60
        failed = ["", f"**Failed parts: {', '.join(self.failed)}** (their errors are in their sections)."] \
            if self.failed else []
        text = self.head + [f"Wall time: {minutes:.1f} min (rewritten after each part)."] + failed
        for lines in self.sections:
            text += [""] + lines
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text("\n".join(text) + "\n")


def peak_memory(fn: Callable[[], object]) -> tuple:
    """(fn's result, GiB of GPU memory allocated at most while it ran)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() / GiB


# --------------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------------
def cuda_tests(budget_s: float) -> List[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           f"--timeout={int(budget_s)}", "tests"], cwd=ROOT, capture_output=True, text=True,
                          timeout=budget_s + 30)
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else "(no output)"
    out = ["## Tests marked `cuda`", "", f"`pytest -m cuda tests`: {summary}"]
    if proc.returncode not in (0, 5):
        out += ["", "```", *lines[-40:], proc.stderr.strip()[-2000:], "```"]
        raise PartFailed(out)
    return out


def measure_peak() -> float:
    return bench_train.matmul_peak(PEAK_N, torch.bfloat16, device="cuda", inner=20)


def measure_training(peak_gflops: float, qwen2_tok) -> List[dict]:
    from mmar_cli.tokenizers.text import byte_tokenizer

    rows = []
    for preset, batch in TRAIN.items():
        tok = qwen2_tok if preset.startswith("qwen2") else byte_tokenizer()
        cfg = bench_train.model_config(preset, tok.vocab_size, TOKEN_DIM, **FRAME)
        r, gib = peak_memory(lambda: bench_train.train_speed(cfg, tok, batch, "bf16-mixed", TRAIN_STEPS, device="cuda"))
        r.update(preset=preset, mfu=r["gflops"] / peak_gflops, memory_gib=gib)
        rows.append(r)
        torch.cuda.empty_cache()
    return rows


def training_section(peak: float, rows: List[dict]) -> List[str]:
    out = ["## Training throughput and MFU (bf16-mixed)", "",
           f"bf16 matmul peak of this GPU, measured here (best of 5 × 20 torch.mm of {PEAK_N}²): "
           f"**{peak / 1e3:,.0f} TFLOP/s**. One step = `bench_train.TrainStep` (forward under bf16 autocast, "
           "backward, grad clip, AdamW, EMA) on a batch in the default task mix; frames of 16×16 KL-16 tokens "
           f"with 64 + 64 text positions; the median of {TRAIN_STEPS} steps. MFU = FLOPs per step "
           "(`bench_train.FLOP_FORMULA`, recomputation not counted) / step time / the peak.", ""]
    out += table(["preset", "params", "batch", "frame", "step (s)", "samples/s", "tokens/s", "TFLOP/step", "MFU",
                  "peak memory (GiB)"],
                 [[r["preset"], f"{r['params_m']:.1f}M", r["batch"], r["length"], f"{r['step_s']:.3f}",
                   f"{r['samples_s']:.1f}", f"{r['tokens_s']:,.0f}", f"{r['gflop_step'] / 1e3:.2f}",
                   f"{100 * r['mfu']:.1f} %", f"{r['memory_gib']:.1f}"] for r in rows])
    out += [""] + [f"- {'✓' if r['mfu'] >= MIN_MFU else '✗'} {r['preset']}: MFU {100 * r['mfu']:.1f} % "
                   f"(target ≥ {100 * MIN_MFU:.0f} %)" for r in rows if r["preset"] != "small"]
    return out


def tokenized_photos(work: Path) -> Path:
    """8 photos through configs/tokenize/qwen2-0.5b.yaml (KL-16 stand-in on this GPU, Qwen2-layout tokenizer)."""
    from mmar_cli.config import TokenizeConfig, load_config
    from stages import tokenize

    cfg = load_config(TokenizeConfig, ROOT / "configs" / "tokenize" / "qwen2-0.5b.yaml", overrides=[
        f"input={scale_assets.photo_shards(work / 'photos', 8)}", f"out={work / 'tokens'}", "val_fraction=0",
        "workers=1", f"image_tokenizer.vae_path={scale_assets.kl16_vae(work / 'kl16')}",
        f"text_tokenizer.path={scale_assets.qwen2_tokenizer(work / 'qwen2-tokenizer')}"])
    tokenize.run(cfg)
    return work / "tokens"


def fsdp_run(shards: Path, out: Path, strategy: str) -> dict:
    """`mmar pretrain` of the qwen2-0.5b preset on one GPU (in this process, so its peak memory is read)."""
    from mmar_cli.config import TrainConfig, load_config
    from stages.train_common import run

    cfg = load_config(TrainConfig, ROOT / "configs" / "pretrain" / "qwen2-0.5b.yaml", overrides=[
        f"data={shards}", "val_data=null", f"out={out}", f"trainer.max_steps={FSDP_STEPS}", "trainer.batch_size=8",
        "trainer.devices=1", "trainer.num_nodes=1", f"trainer.strategy={strategy}", "trainer.ema_decay=0",
        "trainer.num_workers=2", f"trainer.ckpt_every={FSDP_STEPS}", "model.init_from_qwen2=null"])
    start = time.perf_counter()
    final, gib = peak_memory(lambda: run(cfg, "pretrain", overwrite=True))
    return {"final": final, "seconds": time.perf_counter() - start, "memory_gib": gib, "strategy": strategy}


def measure_sampling(ckpt: Path, shards: Path) -> List[dict]:
    from mmar_cli.data.shards import decode_sample, shard_paths
    from mmar_cli.inference import load_checkpoint
    import webdataset as wds

    inf = load_checkpoint(str(ckpt), ema=False, device="cuda")
    captions = [decode_sample(s)["caption"] for s in wds.tariterators.tarfile_samples(
        [{"url": u} for u in shard_paths(shards)])]
    prompts = (captions * PROMPTS)[:PROMPTS]
    default, reference = bench_sample.generation_config(), bench_sample.generation_config(bench_sample.REFERENCE_PRESET)
    inf.text_to_image(prompts, default, seed=0, batch_size=PROMPTS)  # warm-up: kernels, allocator
    rows = []
    for name, gen in [("default (GenerationConfig)", default),
                      ("MAR reference (configs/sample/mar-reference.yaml)", reference)]:
        (_, seconds, runs), gib = peak_memory(lambda: bench_sample.fastest(
            lambda: inf.text_to_image(prompts, gen, seed=0, batch_size=PROMPTS)))
        rows.append({"name": name, "settings": bench_sample.describe(gen, inf.layout.num_image_tokens),
                     "images_s": len(prompts) / seconds, "seconds": seconds, "memory_gib": gib})
    return rows


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def head() -> List[str]:
    from mmar_cli.machine import machine

    m = machine()
    memory = torch.cuda.get_device_properties(0).total_memory / GiB
    return ["# mmar on a GPU", "",
            f"Generated by `bash benchmarks/gpu.sh` on {datetime.datetime.now():%Y-%m-%d %H:%M}: {m['gpu']} "
            f"({memory:.0f} GiB), CUDA {torch.version.cuda}, torch {m['torch']}, {m['cpu']} ({m['cores']} cores)."]


class PartFailed(Exception):
    """A part's own report of its failure (its lines go in the results)."""

    def __init__(self, lines: List[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def part(report: Report, name: str, deadline: float, need_s: float, fn: Callable[[], List[str]]) -> bool:
    """Run one part if `need_s` seconds are left before `deadline`; add its lines (or its error) to the report."""
    left = deadline - time.perf_counter()
    if left < need_s:
        report.add([f"## {name}", "", f"Skipped: {left:.0f} s of the budget left, the part needs about {need_s:.0f} s."])
        return False
    print(f"[bench_gpu] {name} ({left:.0f} s left)", flush=True)
    try:
        report.add(fn())
        return True
    except PartFailed as e:
        report.failed.append(name)
        report.add(e.lines)
    except Exception:  # noqa: BLE001 -- every part is tried; the report says what broke
        report.failed.append(name)
        report.add([f"## {name}", "", "**Failed:**", "", "```", traceback.format_exc()[-4000:].rstrip(), "```"])
    torch.cuda.empty_cache()
    return False


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the report (default: benchmarks/results-gpu.md)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all parts (default 450)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the tests marked cuda")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU visible to torch; nothing measured")
        return 0
    deadline = time.perf_counter() + args.budget
    report = Report(Path(args.out), head())
    figures: dict = {}

    if not args.skip_tests:
        part(report, "Tests marked cuda", deadline, 60, lambda: cuda_tests(min(150.0, deadline - time.perf_counter())))

    def training() -> List[str]:
        from mmar_cli.tokenizers.text import tokenizer_from_file

        figures["peak"] = measure_peak()
        qwen2 = tokenizer_from_file(scale_assets.qwen2_tokenizer(Path(tmp) / "qwen2-tokenizer"))
        return training_section(figures["peak"], measure_training(figures["peak"], qwen2))

    def fsdp() -> List[str]:
        figures["shards"] = tokenized_photos(Path(tmp))
        r = fsdp_run(figures["shards"], Path(tmp) / "fsdp", "fsdp")
        figures["ckpt"] = r["final"]
        return ["## FSDP on one GPU", "",
                f"`mmar pretrain --config configs/pretrain/qwen2-0.5b.yaml trainer.strategy=fsdp trainer.devices=1 "
                f"trainer.ema_decay=0` for {FSDP_STEPS} steps at batch 8 (bf16-mixed, gradient checkpointing, random "
                f"init) on 8 photos tokenized with configs/tokenize/qwen2-0.5b.yaml: {r['seconds']:.1f} s in all "
                f"(model build, steps, gathering and writing the checkpoint), peak memory **{r['memory_gib']:.1f} "
                f"GiB**; its final/ is what the sampling below loads."]

    def sampling() -> List[str]:
        if "ckpt" not in figures:  # FSDP failed: an ordinary single-GPU run gives the checkpoint
            if "shards" not in figures:
                figures["shards"] = tokenized_photos(Path(tmp))
            figures["ckpt"] = fsdp_run(figures["shards"], Path(tmp) / "auto", "auto")["final"]
        rows = measure_sampling(figures["ckpt"], figures["shards"])
        ratio = rows[0]["images_s"] / rows[1]["images_s"]
        return ["## Sampling (qwen2-0.5b, 256 px: 16×16 KL-16 tokens)", "",
                f"{PROMPTS} prompts in one batch of {PROMPTS} rows (guided and unguided in one pass), seed 0, "
                "including decoding with the VAE; after one warm-up run at the default settings.", ""] + table(
            ["settings", "", "images/s", "time (s)", "peak memory (GiB)"],
            [[r["name"], r["settings"], f"{r['images_s']:.2f}", f"{r['seconds']:.1f}", f"{r['memory_gib']:.1f}"]
             for r in rows]) + ["", f"- default vs reference: **{ratio:.1f}×** the images per second"]

    with tempfile.TemporaryDirectory(prefix="mmar-gpu-") as tmp:
        part(report, "Training throughput", deadline, 90, training)
        part(report, "FSDP on one GPU", deadline, 120, fsdp)
        part(report, "Sampling", deadline, 60, sampling)
    report.write()
    print(f"[bench_gpu] written: {args.out}", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
