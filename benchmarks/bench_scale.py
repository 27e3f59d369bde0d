"""`make bench-scale`: the paper's configuration at its real size, end to end through the `mmar` commands,
on whatever machine runs it; writes the section "Real size" of benchmarks/results.md.

    python benchmarks/bench_scale.py                         # qwen2-0.5b + KL-16 (2 CPU cores: 25-35 min, 14.5 GiB)
    python benchmarks/bench_scale.py --quick --out /tmp/r.md # a narrow VAE and a 2-block backbone, same commands
    python benchmarks/bench_scale.py --keep runs/bench-scale # keep the files (two checkpoints of ~8 GB each)

What a real run downloads is built first by benchmarks/scale_assets.py, with random weights: an LDM KL-16
AutoencoderKL, a Qwen2-0.5B checkpoint in Hugging Face's layout (what `model.init_from_qwen2` reads), a
tokenizer.json in Qwen2's layout, and 8 photos at 256 px as img2dataset shards. Then each stage runs as
its own `mmar` process with the presets of configs/ (only paths, step counts and the batch overridden):

    mmar tokenize --config configs/tokenize/qwen2-0.5b.yaml      8 photos -> 16x16 tokens of 16 values
    mmar pretrain --config configs/pretrain/qwen2-0.5b.yaml      2 steps, bf16-mixed, gradient checkpointing
    mmar finetune --config configs/finetune/qwen2-0.5b.yaml      1 step
    mmar sample --prompt CAPTION                                 one image
    mmar sample --image PHOTO.png                                one caption

Each stage's wall time and peak RSS (the kernel's high-water mark for that process, from wait4), its step
times (read from the trainer's log lines as they arrive) and the parameters it runs. The parameter count of
configs/pretrain/qwen2-7b.yaml on the same shards comes from instantiating it on the meta device, and with it
the memory per GPU that FSDP full sharding needs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_tools import load_average, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results.md"
SECTION = "make bench-scale"
GiB = 2 ** 30
# FSDP full sharding, bf16-mixed, AdamW: fp32 weights (4) + fp32 gradients (4) + two fp32 moments (8)
BYTES_PER_PARAM = 16
FSDP_GPUS = (8, 16)
STEP_LINE = re.compile(r"^step (\d+)/(\d+) .*elapsed (\d+):(\d\d):(\d\d)")


@dataclass
class Sizes:
    """How big one run is."""

    photos: int = 8
    batch: int = 8  # the presets' 32 per GPU would make a CPU step 4x longer
    pretrain_steps: int = 2
    finetune_steps: int = 1
    vae: dict = field(default_factory=dict)  # scale_assets.kl16_vae's channels/groups (default: KL-16's)
    backbone: dict = field(default_factory=dict)  # sizes replacing the qwen2-0.5b preset's (default: none)
    head: dict = field(default_factory=dict)  # model.diffusion sizes (default: the preset's)
    startup: bool = True  # also time a command that only imports (`mmar config show`)


QUICK = Sizes(photos=4, batch=2, vae=dict(channels=(32,) * 5, groups=8),
              backbone=dict(width=64, depth=2, heads=2, kv_heads=1, mlp_hidden=128), head=dict(width=64, depth=1),
              startup=False)

_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f} s] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# Running one stage
# --------------------------------------------------------------------------------------------------
def mmar_command() -> List[str]:
    """The `mmar` executable beside this Python (the one `pip install` made), else the module."""
    script = Path(sys.executable).with_name("mmar")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mmar_cli.app"]


def run_stage(name: str, args: List[str], logs: Path) -> dict:
    """`mmar ARGS` as a process of its own: wall time, peak RSS, and the arrival time of each output line
    (so the trainer's step lines time the steps). Its output goes to logs/NAME.log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    log_file = logs / f"{name}.log"
    lines = []
    start = time.perf_counter()
    with open(log_file, "w") as sink:
        proc = subprocess.Popen(mmar_command() + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=env, text=True, bufsize=1)
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            sink.write(line)
            sink.flush()  # the log can be followed while the stage runs
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode:
        tail = "\n".join(text for _, text in lines[-20:])
        raise RuntimeError(f"mmar {args[0]} ({name}) exited {proc.returncode}; log: {log_file}\n{tail}")
    rss = usage.ru_maxrss * 1024 / GiB  # Linux reports kilobytes
    log(f"{name}: {seconds:.1f} s, peak RSS {rss:.2f} GiB")
    return {"seconds": seconds, "rss_gib": rss, "lines": lines, "command": "mmar " + shlex.join(args)}


def step_seconds(lines: List[tuple]) -> List[float]:
    """Seconds of each training step from the trainer's log lines (`trainer.log_every=1`): the first from
    its own 'elapsed' (whole seconds, counted from the start of training: it includes the first batch), the
    others between the arrivals of consecutive step lines."""
    steps = [(t, STEP_LINE.match(text)) for t, text in lines]
    steps = [(t, m) for t, m in steps if m]
    if not steps:
        return []
    h, m, s = (int(x) for x in steps[0][1].group(3, 4, 5))
    return [float(3600 * h + 60 * m + s)] + [b[0] - a[0] for a, b in zip(steps, steps[1:])]


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------
def model_params(model_cfg) -> Dict[str, int]:
    """Parameters of MMAR(model_cfg) by part and in total, counted on the meta device (nothing allocated),
    and its FSDP units as `trainer.strategy=fsdp` wraps them: the largest block, and the root (all the rest)."""
    import torch

    from mmar_cli.model.backbone import Block
    from mmar_cli.model.diffusion_head import ResBlock
    from mmar_cli.model.mmar import MMAR
    from mmar_cli.model.presets import resolve

    def size(module) -> int:
        return sum(p.numel() for p in module.parameters())  # a tied embedding once

    with torch.device("meta"):
        model = MMAR(resolve(model_cfg))
    counts = {name: size(child) for name, child in model.named_children()}
    blocks = [size(m) for m in model.modules() if isinstance(m, (Block, ResBlock))]
    counts.update(total=size(model), largest_block=max(blocks), root_unit=size(model) - sum(blocks))
    return counts


def checkpoint_params(ckpt: Path) -> Dict[str, int]:
    from omegaconf import OmegaConf

    return model_params(OmegaConf.load(ckpt / "config.yaml").model)


def vae_params(vae_dir: Path) -> Dict[str, int]:
    """Encoder (what tokenize runs) and decoder (what sampling runs) of an AutoencoderKL directory."""
    from safetensors import safe_open

    counts = {"encoder": 0, "decoder": 0}
    for file in vae_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                counts["encoder" if key.startswith(("encoder.", "quant_conv.")) else "decoder"] += n
    counts["total"] = counts["encoder"] + counts["decoder"]
    return counts


def preset_on_shards(config: Path, shards: Path) -> Dict[str, int]:
    """Parameters of a training preset's model with the sizes these shards give it (as `mmar pretrain` does)."""
    from mmar_cli.config import TrainConfig, load_config
    from mmar_cli.data.shards import load_tokenizers
    from stages.train_common import model_config

    cfg = load_config(TrainConfig, config)
    tok, image_tok = load_tokenizers(shards)
    return model_params(model_config(cfg, tok, image_tok))


def millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def build_assets(work: Path, sizes: Sizes) -> dict:
    import scale_assets

    start = time.perf_counter()
    assets = {"vae": scale_assets.kl16_vae(work / "kl16", **sizes.vae),
              "tokenizer": scale_assets.qwen2_tokenizer(work / "qwen2-tokenizer"),
              "qwen2": scale_assets.qwen2_checkpoint(work / "qwen2", **sizes.backbone),
              "photos": scale_assets.photo_shards(work / "photos", sizes.photos)}
    _, caption, picture = next(scale_assets.photos(1))
    picture.save(work / "photo.png")
    assets.update(photo=work / "photo.png", caption=caption, seconds=time.perf_counter() - start)
    log(f"assets in {assets['seconds']:.0f} s: {', '.join(str(v) for v in assets.values() if isinstance(v, Path))}")
    return assets


def training_overrides(sizes: Sizes, steps: int) -> List[str]:
    """One process on this machine, the batch of `sizes`, a log line per step, no validation set."""
    return [f"--max-steps={steps}", "val_data=null", f"trainer.batch_size={sizes.batch}", "trainer.devices=1",
            "trainer.num_nodes=1", "trainer.strategy=auto", "trainer.num_workers=0", "trainer.log_every=1"]


def run_stages(work: Path, assets: dict, sizes: Sizes) -> dict:
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tokens, pre, fine = work / "tokens", work / "pretrain", work / "finetune"
    model = [f"model.{k}={v}" for k, v in sizes.backbone.items()]
    model += [f"model.diffusion.{k}={v}" for k, v in sizes.head.items()]
    stages = {"start-up": run_stage("start-up", ["config", "show", "tokenize"], logs)} if sizes.startup else {}
    stages["tokenize"] = run_stage("tokenize", [
        "tokenize", "--config", "configs/tokenize/qwen2-0.5b.yaml", f"--input={assets['photos']}", f"--out={tokens}",
        "val_fraction=0", "workers=1", f"image_tokenizer.vae_path={assets['vae']}",
        f"text_tokenizer.path={assets['tokenizer']}"], logs)
    stages["pretrain"] = run_stage("pretrain", [
        "pretrain", "--config", "configs/pretrain/qwen2-0.5b.yaml", f"--data={tokens}", f"--out={pre}",
        *training_overrides(sizes, sizes.pretrain_steps), f"model.init_from_qwen2={assets['qwen2']}", *model], logs)
    stages["finetune"] = run_stage("finetune", [
        "finetune", "--config", "configs/finetune/qwen2-0.5b.yaml", f"--init={pre / 'final'}", f"--data={tokens}",
        f"--out={fine}", *training_overrides(sizes, sizes.finetune_steps)], logs)
    stages["sample"] = run_stage("sample", [
        "sample", f"--ckpt={fine / 'final'}", "--prompt", assets["caption"], "-n", "1", f"--out={work / 'samples'}"],
        logs)
    stages["caption"] = run_stage("caption", [
        "sample", f"--ckpt={fine / 'final'}", f"--image={assets['photo']}", f"--out={work / 'caption'}"], logs)
    return stages


def measure(work: Path, sizes: Sizes) -> dict:
    # The stand-ins are built in a child process so that this one stays small until the stages have run:
    # Linux keeps a process's RSS high-water mark across fork and exec, so a stage started from a process
    # that had built a 0.5B checkpoint would report at least that process's size as its own peak.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assets = pool.submit(build_assets, work, sizes).result()
    stages = run_stages(work, assets, sizes)
    tokens, final = work / "tokens", work / "finetune" / "final"
    manifest = json.loads((tokens / "manifest.json").read_text())
    for name in ("pretrain", "finetune"):
        stages[name]["steps"] = step_seconds(stages[name]["lines"])
        ckpt = work / name / "final"
        stages[name]["checkpoint_gib"] = sum(f.stat().st_size for f in ckpt.iterdir()) / GiB
    sampled = json.loads((work / "samples" / "samples.json").read_text())
    understood = json.loads((work / "caption" / "understanding.json").read_text())
    params = {"vae": vae_params(assets["vae"]), "mmar": checkpoint_params(final),
              "qwen2-7b": preset_on_shards(ROOT / "configs" / "pretrain" / "qwen2-7b.yaml", tokens)}
    log(f"parameters: MMAR {millions(params['mmar']['total'])}, VAE {millions(params['vae']['total'])}, "
        f"qwen2-7b {params['qwen2-7b']['total']:,}")
    return {"assets": assets, "stages": stages, "params": params, "manifest": manifest,
            "sample": {"seconds": sampled["seconds"], "settings": sampled["config"]["gen"],
                       "image": work / "samples" / sampled["images"][0]["file"]},
            "caption": {"seconds": understood["seconds"], "text": understood["results"][0]["text"]}}


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
def fsdp_rows(params: int) -> List[list]:
    return [[n, f"{BYTES_PER_PARAM} × {params / 1e9:.3f}e9 / {n}",
             f"{BYTES_PER_PARAM * params / n / 1e9:.1f} GB ({BYTES_PER_PARAM * params / n / GiB:.1f} GiB)"]
            for n in FSDP_GPUS]


def shorten(command: str, work: Path) -> str:
    return command.replace(str(work), "$WORK")


def load_note(info: dict) -> str:
    start, end = info["load"]
    cores = info["machine"]["cores"]
    busy = "unknown" not in start and float(start.split()[0]) > 0.5 * cores
    return (f"Load average (1, 5, 15 min) {start} at the start, {end} at the end, on {cores} cores"
            + (": **other processes shared the CPUs**, so every time here is longer than on an idle machine."
               if busy else "."))


def report(info: dict, r: dict, sizes: Sizes) -> str:
    s, p, m = r["stages"], r["params"], r["manifest"]
    mmar, vae, big = p["mmar"], p["vae"], p["qwen2-7b"]
    parts = (f"{millions(mmar['total'])} (backbone {millions(mmar['backbone'])}, image embedder + projector "
             f"{millions(mmar['image_embed'] + mmar['vis_proj'])}, diffusion head {millions(mmar['head'])})")
    image_spec, text_spec, images = m["image_tokenizer"]["spec"], m["text_tokenizer"]["spec"], m["samples"]
    grid = "×".join(str(x) for x in image_spec["grid"])
    train = f"batch {sizes.batch}, bf16-mixed, gradient checkpointing"

    def steps(name: str) -> str:
        return ", ".join(f"step {i + 1}: {t:.1f} s" for i, t in enumerate(s[name]["steps"])) + \
            f" ({train}; step 1 includes loading the first batch, in whole seconds)"

    rows = [["start-up", "`mmar config show tokenize`: imports only", "–", f"{s['start-up']['seconds']:.1f}", "–",
             f"{s['start-up']['rss_gib']:.2f}"]] if "start-up" in s else []
    rows += [
        ["tokenize", f"{images} photos (and their flips) → {grid} tokens of {image_spec['token_dim']} values",
         f"VAE encoder {millions(vae['encoder'])}", f"{s['tokenize']['seconds']:.1f}",
         f"{s['tokenize']['seconds'] / images:.1f} s per photo (wall / photos)", f"{s['tokenize']['rss_gib']:.2f}"],
        ["pretrain", f"{sizes.pretrain_steps} steps, from the Qwen2 checkpoint", parts,
         f"{s['pretrain']['seconds']:.1f}", steps("pretrain"), f"{s['pretrain']['rss_gib']:.2f}"],
        ["finetune", f"{sizes.finetune_steps} step, from pretrain's final/", "the same",
         f"{s['finetune']['seconds']:.1f}", steps("finetune"), f"{s['finetune']['rss_gib']:.2f}"],
        ["sample", "one image from a caption", f"MMAR + VAE decoder {millions(vae['decoder'])}",
         f"{s['sample']['seconds']:.1f}", f"{r['sample']['seconds']:.1f} s for the image (default settings)",
         f"{s['sample']['rss_gib']:.2f}"],
        ["caption", "one photo captioned", "MMAR + VAE encoder", f"{s['caption']['seconds']:.1f}",
         f"{r['caption']['seconds']:.1f} s for the caption", f"{s['caption']['rss_gib']:.2f}"],
    ]
    quick = " (**--quick: a narrow VAE and a 2-block backbone, not the real sizes**)" if info["quick"] else ""
    out = ["## Real size: qwen2-0.5b + KL-16, end to end (`make bench-scale`)", "",
           f"Generated by `{info['command']}` on {info['date']}{quick}: {info['machine']['cpu']}, "
           f"{info['machine']['cores']} cores, torch {info['machine']['torch']}; {info['seconds'] / 60:.1f} min in "
           f"all ({r['assets']['seconds']:.0f} s of it building the stand-ins). {load_note(info)}", "",
           "Nothing is downloaded: `benchmarks/scale_assets.py` builds, with random weights, an AutoencoderKL of "
           f"LDM KL-16's architecture ({millions(vae['total'])}), a Qwen2-0.5B checkpoint in Hugging Face's layout, "
           f"a tokenizer.json in Qwen2's layout ({text_spec['base_vocab_size']:,} ids, "
           f"{text_spec['vocab_size']:,} with mmar's 8 markers) and {images} photos at 256 px as "
           "img2dataset shards. Each stage is one `mmar` process with the presets of `configs/`; wall time "
           "includes its start-up (imports, loading the models, writing the checkpoint); peak RSS is the "
           "kernel's high-water mark of that process.", ""]
    out += table(["stage", "what", "parameters", "wall (s)", "time per step / item", "peak RSS (GiB)"], rows)
    caption = r["caption"]["text"]
    out += ["", f"- of the training peaks, the fp32 model state is 20 bytes per parameter (weights, gradients, "
            f"AdamW's two moments, the EMA): {20 * mmar['total'] / GiB:.1f} GiB; the rest is activations, the Qwen2 "
            "import or the copies made while writing the checkpoint",
            f"- checkpoint on disk: {s['pretrain']['checkpoint_gib']:.1f} GiB (weights, EMA, optimizer state)",
            f"- the caption written (random weights): {caption[:40]!r}{'…' if len(caption) > 40 else ''}", "",
            "Commands ($WORK: the run's temporary directory):", "", "```"]
    out += [shorten(s[name]["command"], r["work"]) for name in ("tokenize", "pretrain", "finetune", "sample",
                                                                 "caption")]
    out += ["```", "", "### qwen2-7b and FSDP", "",
            f"`configs/pretrain/qwen2-7b.yaml` on the same shards, instantiated on the meta device: "
            f"**{big['total']:,} parameters** (backbone {big['backbone']:,}; image embedder + projector "
            f"{big['image_embed'] + big['vis_proj']:,}; diffusion head {big['head']:,}).", "",
            "Model state per GPU with FSDP full sharding (`trainer.strategy=fsdp`), bf16-mixed, AdamW:", "", "```",
            f"per GPU = {BYTES_PER_PARAM} bytes × P / N      P = {big['total']:,} parameters, N = GPUs",
            "  16 bytes = 4 fp32 weights + 4 fp32 gradients + 8 AdamW moments (2 × fp32)",
            "  (the usual mixed-precision count 2 bf16 + 2 bf16 grads + 4 fp32 master + 8 moments is 16 too)", "```", ""]
    out += table(["GPUs", "16 × P / N", "per GPU"], fsdp_rows(big["total"]))
    root, block, dense = big["root_unit"], big["largest_block"], mmar["total"]
    out += ["", "Beside it, FSDP gathers in bf16 what it computes (`trainer.strategy=fsdp` makes each decoder block "
            f"and each block of the diffusion head a unit): a decoder block, {block / 1e6:,.0f}M parameters, while it "
            f"runs; the root unit (embeddings, LM head, image embedder and projector, the head's outer layers: "
            f"{root / 1e6:,.0f}M) for the whole step, {2 * root / 1e9:.1f} GB of weights and as much of gradients "
            f"in backward. Not counted at all: activations (batch × frame × width × depth; gradient checkpointing "
            "keeps one block's inputs per block) and the CUDA context and allocator cache.", "",
            f"For comparison, the 0.5B model with DDP holds all of it on every GPU: 16 × {dense / 1e9:.3f}e9 = "
            f"{BYTES_PER_PARAM * dense / 1e9:.1f} GB, plus the fp32 EMA ({4 * dense / 1e9:.1f} GB)."]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a narrow VAE and a 2-block backbone (the slow test)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results file whose section this run writes "
                   "(default: benchmarks/results.md)")
    p.add_argument("--keep", help="work in this directory and keep it (default: a temporary one, removed)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    start, load_start = datetime.datetime.now(), load_average()
    with tempfile.TemporaryDirectory(prefix="mmar-bench-scale-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = measure(work, sizes)
        result["work"] = work
        from mmar_cli.machine import machine  # torch: only once the stages have run (see measure)

        command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_scale.py",
                                                      *(sys.argv[1:] if argv is None else argv)])
        info = {"machine": machine(), "command": command, "date": start.strftime("%Y-%m-%d %H:%M"),
                "quick": args.quick, "seconds": (datetime.datetime.now() - start).total_seconds(),
                "load": (load_start, load_average())}
        text = report(info, result, sizes)
    from mmar_cli.results import record_section

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record_section(Path(args.out), SECTION, text)
    log(f"written: {args.out} (section {SECTION})")
    return {**result, "text": text, "out": Path(args.out)}


if __name__ == "__main__":
    main()
