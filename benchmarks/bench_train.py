"""Training speed: a real MMAR step, the CPU's matmul peak, the FLOPs of a step, and data-loading waits.

A step is what the trainer does per batch (mmar_cli/engine/module.py): forward (under bf16 autocast for
bf16-mixed), backward, gradient clipping, AdamW over the same parameter groups, and the EMA update.

The FLOPs of a step are counted from the model's shapes (FLOP_FORMULA) and set against the peak of a
large torch.mm measured on the same machine.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from mmar_cli.config import ModelConfig, OptimConfig, TaskMixConfig, TrainConfig
from mmar_cli.data import shapes
from mmar_cli.data.datamodule import ShardDataModule, assign_task
from mmar_cli.data.sequence import IGNORE, build_batch
from mmar_cli.engine.ema import EMA
from mmar_cli.engine.module import MODEL_KEYS, adamw, fused_adamw
from mmar_cli.model.mmar import MMAR
from mmar_cli.model.presets import resolve

PRECISIONS = ("32", "bf16-mixed")

FLOP_FORMULA = """\
A multiply-add is 2 FLOPs and backward costs twice the forward: a weight used on n tokens costs 6·n FLOPs.

FLOPs per step = 6·(Σ_g n_g·(P_blocks·T_g − P_ask·(T_g − Q_g)) + P_embed·B·N + P_proj·M + P_head·M·k
                    + W·V·S)
                 + 12·W·Σ_g n_g·T_g·((depth − 1)·T_g + Q_g)

  training runs its rows in groups g (MMAR.read_spans: all rows, or each task's with model.split_tasks): n_g
  rows on T_g frame columns, from the first real token of any of them to the last position a loss reads;
  the last block asks (queries, output projection, SwiGLU) only at those Q_g read positions, its keys and
  values run on all T_g
  B rows, N image tokens per row; W width, V vocabulary
  P_blocks  matmul weights of the decoder blocks (q, k, v, o, SwiGLU); P_ask: the last block's q, o, SwiGLU
  P_embed   matmul weights of the image embedder (linear map + any ViT blocks), on the B·N image tokens
  P_proj    the VisProjector's weights, on the M masked image tokens of generation rows
  P_head    the diffusion head's matmul weights, on M·k noisy tokens (k = diffusion batch_mul)
  W·V·S     the LM head, run only on the S supervised text positions
  attention QKᵀ and AV over the columns run (the explicit mask does not skip work): 4·T·W per query and
            row forward, times 3 for training
"""


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` after `warmup` untimed calls (the median shrugs off a busy neighbour)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronize(device: torch.device | str) -> None:
    """Wait for the GPU's queued work, so a wall clock measures it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(n: int, dtype: torch.dtype, repeats: int = 5, warmup_s: float = 1.0, device: str = "cpu",
                inner: int = 1) -> float:
    """GFLOP/s of the best of `repeats` runs of `inner` n×n torch.mm in `dtype`: the ceiling a training step is
    held to. The CPU first multiplies for `warmup_s`: timed cold, the fp32 peak of this machine read 153 GFLOP/s
    in two runs, under the 190 it reaches warm and under what the small preset's training then reached. On a
    GPU one product takes microseconds: `inner` of them are timed together."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        torch.mm(a, b)
        synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n ** 3 / best / 1e9


# --------------------------------------------------------------------------------------------------
# Models and batches
# --------------------------------------------------------------------------------------------------
def model_config(preset: str, vocab_size: int, token_dim: int, scale: int = 1, **overrides):
    """A resolved ModelConfig of `preset`; `scale` multiplies the frame: prefix, suffix and image columns."""
    base = ModelConfig()
    sizes = dict(preset=preset, vocab_size=vocab_size, token_dim=token_dim, image_grid=[4, 4 * scale],
                 max_prefix_len=base.max_prefix_len * scale, max_suffix_len=base.max_suffix_len * scale)
    return resolve(OmegaConf.merge(OmegaConf.structured(ModelConfig), sizes, overrides))


def synthetic_batch(tok, layout, token_dim: int, batch_size: int, seed: int = 0) -> dict:
    """A training batch in the default task mix: real shapes captions/questions, random image tokens."""
    rng, mix = random.Random(seed), TaskMixConfig()
    tasks, texts, answers = [], [], []
    for sample in shapes.iterate("train", batch_size, seed=seed):
        task, text, answer = assign_task(rng, sample, mix)
        tasks.append(task)
        texts.append(text)
        answers.append(answer)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch_size, layout.num_image_tokens, token_dim, generator=g).clamp(-1, 1)
    return build_batch(tok, layout, tasks, texts, answers, tokens)


class TrainStep:
    """One optimizer step of the trainer on a batch: forward, backward, clip, AdamW, EMA."""

    def __init__(self, cfg, precision: str, seed: int = 0, device: str = "cpu", fused: Optional[bool] = None,
                 compile: bool = False):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = MMAR(cfg).train().to(self.device)
        if compile:  # as trainer.compile=true does
            self.model.compile_training()
        if fused is None:  # the trainer's AdamW (no gradient scaler: bf16-mixed or fp32)
            fused = fused_adamw({self.device.type}, None)
        self.optim = adamw(self.model, OmegaConf.structured(OptimConfig), fused)
        self.ema = EMA(self.model, 0.999)
        self.bf16 = precision == "bf16-mixed"

    def __call__(self, batch: dict) -> float:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model({k: batch[k].to(self.device) for k in MODEL_KEYS})["loss"]
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        return float(loss.detach())  # on a GPU: waits for the step


def _matmul_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def train_flops(model: MMAR, batch: dict, draws: int = 32) -> float:
    """FLOPs of one training step on `batch` (FLOP_FORMULA), averaged over `draws` masks drawn as the
    forward pass draws them (the masked count M, and the image columns generation rows read)."""
    cfg, lay = model.cfg, model.layout
    B, N = batch["text_ids"].shape[0], lay.num_image_tokens
    last = model.backbone.layers[-1]
    p_blocks = _matmul_weights(model.backbone.layers)
    p_ask = _matmul_weights(last.mlp) + last.self_attn.q_proj.weight.numel() + last.self_attn.o_proj.weight.numel()
    sup = batch["text_targets"] != IGNORE
    total = 0.0
    for _ in range(draws):
        masked = model.random_mask(batch["gen_rows"])
        read = sup.clone()
        read[:, lay.image_start:lay.image_end] |= masked
        M = int(masked.sum())
        weighted = (_matmul_weights(model.image_embed) * B * N + _matmul_weights(model.vis_proj) * M
                    + _matmul_weights(model.head) * M * cfg.diffusion.batch_mul
                    + cfg.width * cfg.vocab_size * int(sup.sum()))
        attention = 0
        for rows, cols, lo, hi in model.read_spans(batch["task"], batch["valid"], read):
            n, T, Q = rows.numel(), hi - lo, cols.numel()
            weighted += n * (p_blocks * T - p_ask * (T - Q))
            attention += n * T * ((cfg.depth - 1) * T + Q)
        total += 6 * weighted + 12 * cfg.width * attention
    return total / draws


def train_speed(cfg, tok, batch_size: int, precision: str, steps: int, device: str = "cpu", compile: bool = False,
                peak_n: Optional[int] = None, rounds: int = 1) -> dict:
    """Median step time of `cfg` at `batch_size` over `rounds` rounds of `steps` steps (each round's median),
    with samples/s, tokens/s and FLOP/s. With `peak_n`, the matmul peak of the precision (`matmul_peak` of
    `peak_n`²) is measured just before each round, and `peak_frac` is the median over the rounds of the round's
    FLOP/s over the peak before it: on a shared virtual machine, whose speed drifts by 2x and more within
    minutes, a peak measured apart from the steps is not their ceiling. Two untimed steps come first (oneDNN's
    kernels; with `compile`, the compiler)."""
    step = TrainStep(cfg, precision, device=device, compile=compile)
    batch = synthetic_batch(tok, step.model.layout, cfg.token_dim, batch_size)
    step(batch)
    step(batch)
    flops = train_flops(step.model, batch)
    times, peaks = [], []
    for _ in range(rounds):
        if peak_n:
            peaks.append(matmul_peak(peak_n, torch.float32 if precision == "32" else torch.bfloat16,
                                     warmup_s=0.3, device=device))
        times.append(median_seconds(lambda: step(batch), steps, warmup=0))
    seconds = statistics.median(times)
    length = step.model.layout.length
    out = {"batch": batch_size, "length": length, "step_s": seconds, "samples_s": batch_size / seconds,
           "tokens_s": batch_size * length / seconds, "gflop_step": flops / 1e9,
           "gflops": flops / seconds / 1e9, "params_m": sum(p.numel() for p in step.model.parameters()) / 1e6,
           "compiled": compile}
    if peaks:
        out.update(peak=statistics.median(peaks), peaks=peaks,
                   peak_frac=statistics.median(flops / t / 1e9 / p for t, p in zip(times, peaks)))
    return out


def varied_batches_speed(cfg, tok, batch_size: int, precision: str, steps: int, warmup: int,
                         fused: Optional[bool] = None, compile: bool = False) -> dict:
    """Mean step time over `steps` batches after `warmup`, each batch a new draw of the task mix: as in
    training, the rows of each task, the columns they read and the masked count change every step, and with
    them the shapes of the matmuls (what oneDNN's kernel cache holds, `mmar_cli/__init__.py`)."""
    step = TrainStep(cfg, precision, fused=fused, compile=compile)
    batches = [synthetic_batch(tok, step.model.layout, cfg.token_dim, batch_size, seed=i)
               for i in range(warmup + steps)]
    for batch in batches[:warmup]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    seconds = (time.perf_counter() - start) / steps
    return {"batch": batch_size, "step_s": seconds, "samples_s": batch_size / seconds,
            "fused": bool(step.optim.defaults.get("fused")), "compiled": compile}


DEMO_PRESET = "configs/pretrain/demo.yaml"


def step_choices_main(argv=None) -> None:
    """`python benchmarks/bench_train.py SHARDS [--batch N] [--split-tasks] [--adamw fused|foreach] [--compile]`:
    varied_batches_speed of the model `make demo` pretrains (DEMO_PRESET: its width, frame and batch), bf16-mixed,
    on the tokenizers of the shard directory SHARDS, printed as JSON with the choices it ran: oneDNN's kernel
    cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY, read once per process), one pass per task or all rows in one
    (model.split_tasks), fused or foreach AdamW (default: the trainer's), the blocks compiled (trainer.compile), the
    batch. `make bench` runs it once per choice, against the demo's own settings."""
    import argparse
    import json
    import os
    from pathlib import Path

    from mmar_cli.config import load_config
    from mmar_cli.data.shards import load_tokenizers

    p = argparse.ArgumentParser(description=step_choices_main.__doc__)
    p.add_argument("shards", help="token shard directory (its text and image tokenizers)")
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before them")
    p.add_argument("--batch", type=int, default=None, help="rows per batch (default: the demo's trainer.batch_size)")
    p.add_argument("--split-tasks", action="store_true", help="model.split_tasks=true: a pass per task")
    p.add_argument("--adamw", choices=["fused", "foreach"], default=None,
                   help="AdamW's kernels (default: the trainer's for this device, foreach on a CPU)")
    p.add_argument("--compile", action="store_true", help="trainer.compile=true: the blocks through torch.compile")
    args = p.parse_args(argv)
    demo = load_config(TrainConfig, Path(__file__).resolve().parent.parent / DEMO_PRESET)
    tok, image_tok = load_tokenizers(args.shards)
    cfg = model_config(demo.model.preset, tok.vocab_size, image_tok.token_dim, width=demo.model.width,
                       mlp_hidden=demo.model.mlp_hidden, max_prefix_len=demo.model.max_prefix_len,
                       max_suffix_len=demo.model.max_suffix_len, split_tasks=args.split_tasks)
    batch = args.batch or demo.trainer.batch_size
    fused = None if args.adamw is None else args.adamw == "fused"
    r = varied_batches_speed(cfg, tok, batch, "bf16-mixed", args.steps, args.warmup, fused=fused,
                             compile=args.compile)
    print(json.dumps({**r, "capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
                      "split_tasks": args.split_tasks, "width": cfg.width}))


# --------------------------------------------------------------------------------------------------
# Waiting for data
# --------------------------------------------------------------------------------------------------
def data_wait(shard_dir, num_workers: int, batch_size: int, steps: int, epoch_steps: int, preset: str = "tiny",
              precision: str = "bf16-mixed", model_overrides: Optional[dict] = None) -> dict:
    """Share of a training loop's time spent blocked in next(iterator) of the trainer's own DataLoader
    (ShardDataModule over real shards), over all `steps`, and apart over the rest of the first epoch
    (`epoch_steps` batches: read from disk) and the later ones (replayed from the loader's cache). The first
    batch (worker start, shuffle buffer) is timed apart."""
    from mmar_cli.data.shards import load_tokenizers, shard_checksums

    tok, image_tok = load_tokenizers(shard_dir)
    train_cfg = OmegaConf.structured(TrainConfig)
    train_cfg.trainer.batch_size, train_cfg.trainer.num_workers = batch_size, num_workers
    cfg = resolve(OmegaConf.merge(train_cfg.model, dict(
        preset=preset, vocab_size=tok.vocab_size, token_dim=image_tok.token_dim,
        image_grid=list(image_tok.grid), **(model_overrides or {}))))
    step = TrainStep(cfg, precision)
    loader = ShardDataModule(shard_checksums(shard_dir), tok, step.model.layout, train_cfg).train_dataloader()
    start = time.perf_counter()
    batches = iter(loader)
    step(next(batches))
    first = time.perf_counter() - start
    waits, totals = [], []
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(batches)
        got = time.perf_counter()
        step(batch)
        waits.append(got - start)
        totals.append(time.perf_counter() - start)
    del batches  # stops the worker
    # the first epoch reads the shards from disk; later ones replay them from the loader's cache
    epoch = min(max(epoch_steps - 1, 0), steps)
    return {"workers": num_workers, "wait_frac": sum(waits) / sum(totals), "wait_ms": 1e3 * sum(waits) / steps,
            "step_s": sum(totals) / steps, "first_batch_s": first, "steps": steps, "epoch_steps": epoch_steps,
            "wait_frac_first_epoch": sum(waits[:epoch]) / max(sum(totals[:epoch]), 1e-9),
            "wait_frac_later": sum(waits[epoch:]) / max(sum(totals[epoch:]), 1e-9)}


if __name__ == "__main__":
    step_choices_main()
