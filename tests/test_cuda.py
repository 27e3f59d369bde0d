"""Checks that need a CUDA GPU, skipped without one; `bash benchmarks/gpu.sh` runs them (`pytest -m cuda`)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_sample  # noqa: E402
import bench_train  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = ["a large red circle at the top left", "a small blue square in the center"]


def test_a_bf16_step_on_the_gpu_learns_a_fixed_batch():
    from mmar_cli.tokenizers.text import byte_tokenizer

    tok = byte_tokenizer()
    # byte-level captions and questions run to ~40 tokens: a frame of 64 + 64 text positions holds them
    cfg = bench_train.model_config("tiny", tok.vocab_size, token_dim=12, max_prefix_len=64, max_suffix_len=64)
    step = bench_train.TrainStep(cfg, "bf16-mixed", device="cuda")
    for group in step.optim.param_groups:
        group["lr"] = 1e-3
    batch = bench_train.synthetic_batch(tok, step.model.layout, 12, batch_size=16)
    losses = [step(batch) for _ in range(40)]
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
    assert next(step.model.parameters()).device.type == "cuda"


def test_sampling_on_the_gpu_draws_the_images_the_cpu_draws(tmp_path):
    from tiny_checkpoint import make_checkpoint, make_data

    from mmar_cli.inference import load_checkpoint

    ckpt = str(make_checkpoint(make_data(tmp_path / "data", num_test=2), tmp_path / "ckpt"))
    gen = bench_sample.generation_config(precision="fp32", iterations=4, diffusion_steps=5)
    # every draw comes from per-row CPU generators, so only the arithmetic differs
    cpu = load_checkpoint(ckpt, device="cpu").text_to_image(PROMPTS, gen, seed=0, batch_size=2)
    gpu = load_checkpoint(ckpt, device="cuda").text_to_image(PROMPTS, gen, seed=0, batch_size=2)
    assert cpu.shape == gpu.shape == (2, 32, 32, 3)
    assert np.abs(cpu.astype(int) - gpu.astype(int)).mean() < 2.0


@pytest.mark.parametrize("strategy", ["auto", "fsdp"])
def test_pretrain_on_one_gpu_writes_checkpoints_that_sample(tmp_path, strategy):
    from tiny_checkpoint import TINY_MODEL, make_data

    from mmar_cli.config import TrainConfig, load_config
    from mmar_cli.engine.checkpoint import is_complete
    from mmar_cli.inference import load_checkpoint
    from stages.train_common import run

    data = make_data(tmp_path / "data", num_test=2)
    cfg = load_config(TrainConfig, overrides=[
        f"data={data / 'train'}", "val_data=null", f"out={tmp_path / 'run'}", "trainer.max_steps=3",
        "trainer.batch_size=8", "trainer.accelerator=gpu", "trainer.devices=1", f"trainer.strategy={strategy}",
        # FSDP shards the weights and refuses an EMA; the single-GPU run keeps one, on the GPU
        f"trainer.ema_decay={0.0 if strategy == 'fsdp' else 0.9}", "trainer.num_workers=0", "trainer.ckpt_every=2",
        "model.grad_checkpointing=true", *TINY_MODEL])  # optim.grad_clip=1: FSDP clips through its root module
    final = run(cfg, "pretrain")
    assert is_complete(final) and is_complete(tmp_path / "run" / "step-00000002")
    images = load_checkpoint(str(final), device="cuda").text_to_image(
        PROMPTS[:1], bench_sample.generation_config(iterations=2, diffusion_steps=3), seed=0, batch_size=1)
    assert images.shape == (1, 32, 32, 3)
