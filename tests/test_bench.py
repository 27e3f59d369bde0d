"""The benchmark (`make bench`): its FLOP count, its no-cache sampling variant, and a --quick run that
writes every section of the report with finite, positive figures."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_sample  # noqa: E402
import bench_train  # noqa: E402
import run as bench_run  # noqa: E402

from mmar_cli.config import TrainConfig, load_config  # noqa: E402
from mmar_cli.data.sequence import CAPTION, IGNORE, T2I, Layout, build_batch  # noqa: E402
from mmar_cli.model.mmar import MMAR, compile_unavailable  # noqa: E402
from mmar_cli.tokenizers.text import byte_tokenizer  # noqa: E402

# linear image embedding and MAR's loss alone: the parts the FLOP formula below counts
TOY = dict(width=32, depth=2, heads=2, kv_heads=1, mlp_hidden=48, image_proj_kernel=1, mask_min=0.7,
           diffusion=dict(width=16, depth=1, batch_mul=4, mean_loss=0.0))


def test_matmul_peak_is_a_positive_rate():
    peak = bench_train.matmul_peak(64, torch.float32, repeats=2)
    assert math.isfinite(peak) and peak > 0


def test_train_flops_follow_the_formula_on_an_understanding_batch():
    tok = byte_tokenizer()
    cfg = bench_train.model_config("tiny", tok.vocab_size, token_dim=12, max_prefix_len=4, max_suffix_len=8, **TOY)
    model = MMAR(cfg)
    lay = model.layout
    assert lay == Layout(4, 16, 8)
    batch = build_batch(tok, lay, [CAPTION, CAPTION, CAPTION], ["", "", ""], ["ab", "abcd", ""],
                        torch.zeros(3, 16, 12))
    # no generation rows: nothing masked, the head and projector never run
    B, N, W = 3, 16, 32
    supervised = 3 + 5 + 1  # each caption's bytes + EOS
    assert int((batch["text_targets"] != IGNORE).sum()) == supervised
    # one task: the rows run from the prompt "BOS CAP" (the frame's columns 2, 3) to the longest caption's
    # last target (EOI + 4); the last block asks at the Q = 5 supervised columns only
    T, Q = lay.eoi + 5 - 2, 5
    ask = W * 32 + 32 * W + 3 * W * 48  # q, o, SwiGLU
    blocks = 2 * (ask + W * 2 * 16)  # and k, v (1 kv head of 16)
    expected = (6 * (B * (blocks * T - ask * (T - Q)) + 12 * W * B * N + W * tok.vocab_size * supervised)
                + 12 * W * B * T * (T + Q))
    assert bench_train.train_flops(model, batch) == expected


def test_train_flops_count_the_head_on_generation_rows():
    tok = byte_tokenizer()
    cfg = bench_train.model_config("tiny", tok.vocab_size, token_dim=12, max_prefix_len=6, max_suffix_len=4, **TOY)
    model = MMAR(cfg)
    gen = build_batch(tok, model.layout, [T2I] * 2, ["abc", "de"], [None, None], torch.zeros(2, 16, 12))
    und = build_batch(tok, model.layout, [CAPTION] * 2, ["", ""], ["", ""], torch.zeros(2, 16, 12))
    # every generation row has at least mask_min of its tokens masked, each run k times through the head
    head = sum(m.weight.numel() for m in model.head.modules() if isinstance(m, torch.nn.Linear))
    least = 6 * head * 2 * math.ceil(cfg.mask_min * 16) * cfg.diffusion.batch_mul
    lm_head = 6 * 32 * tok.vocab_size * 2  # the understanding batch supervises 2 EOS tokens
    assert bench_train.train_flops(model, gen) - (bench_train.train_flops(model, und) - lm_head) >= least


@pytest.mark.slow
def test_recomputing_the_prompt_gives_the_cached_images(tmp_path):
    from tiny_checkpoint import make_checkpoint, make_data

    from mmar_cli.inference import load_checkpoint

    data = make_data(tmp_path / "data", num_test=2)
    inf = load_checkpoint(str(make_checkpoint(data, tmp_path / "ckpt")), device="cpu")
    gen = bench_sample.generation_config(iterations=3, diffusion_steps=4)
    result = bench_sample.prompt_cache_speedup(inf, ["a large red circle at the top left",
                                                     "a small blue square in the center"], gen)
    assert result["max_diff"] < 1e-4
    assert result["with_s"] > 0 and result["without_s"] > 0
    assert type(inf.model.backbone).__name__ == "Backbone"  # put back after the comparison


def test_the_loop_rate_leaves_out_the_first_two_progress_lines():
    log = "\n".join(f"step {step}/100  loss 1.0  lr 1e-3  {rate} samples/s  elapsed 0:00:01  eta 0:00:01"
                    for step, rate in ((25, 100.0), (50, 200.0), (75, 400.0), (100, 100.0)))
    # the last two intervals: 2 x 25 steps x 64 samples in 25*64/400 + 25*64/100 seconds
    assert bench_run.loop_samples_per_second("noise\n" + log, 64) == pytest.approx(160.0)
    short = "step 2/4  500.0 samples/s\nstep 4/4  250.0 samples/s"  # two lines or fewer: all of them
    assert bench_run.loop_samples_per_second(short, 8) == pytest.approx(4 * 8 / (2 * 8 / 500 + 2 * 8 / 250))


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path):
    out = tmp_path / "results.md"
    res = bench_run.main(["--quick", "--threads", "1", "--out", str(out)])
    text = out.read_text()
    for section in ("## Machine", "## Targets", "## Training", "## Training step choices", "## Autoencoder training",
                    "## Scaling", "## Data pipeline",
                    "## Sampling", "## How the figures are computed"):
        assert section in text
    # the small preset's peak fractions (fp32, bf16-mixed, and compiled where torch.compile can run), speed,
    # accuracy, 2 data waits; each ✓, ✗ or – (no signal)
    compiles = compile_unavailable("cpu") is None
    targets = [line for line in text.split("## Targets")[1].split("## ")[0].splitlines() if line.startswith("- ")]
    assert len(targets) == 6 + compiles and all(line[2] in "✓✗–" for line in targets), targets
    small = [r for r in res["training"]["rows"] if r["preset"] == "small"]
    assert [(r["precision"], r["compiled"]) for r in small] == [("32", False), ("bf16-mixed", False)] + \
        [("bf16-mixed", True)] * compiles
    assert [line[2] for line in targets[:len(small)]] == ["✓" if r["peak_frac"] >= 0.4 else "✗" for r in small]
    # each row's fraction is over the peaks measured beside its own steps
    assert all(len(r["peaks"]) == 2 and min(r["peaks"]) <= r["peak"] <= max(r["peaks"]) for r in small)

    positive = [r[k] for r in res["training"]["rows"] for k in ("step_s", "samples_s", "tokens_s", "gflops",
                                                                 "peak_frac")]
    positive += [r["step_s"] for r in res["scaling"]["batch"] + res["scaling"]["frame"]]
    positive += list(res["training"]["peaks"].values())
    s = res["sampling"]
    positive += [s["default"]["images_s"], s["reference"]["images_s"], s["demo"]["images_s"], s["cache"]["speedup"],
                 s["cfg"]["speedup"],
                 s["text"]["cached"]["captions_s"], s["text"]["uncached"]["captions_s"]]
    assert all(math.isfinite(x) and x > 0 for x in positive), positive
    assert {r["preset"] for r in res["training"]["rows"]} == {"tiny", "small"}
    assert [r["length"] for r in res["scaling"]["frame"]] == [66, 130, 258]
    assert [r["workers"] for r in res["data"]] == [0, 1] and all(0 <= r["wait_frac"] < 1 for r in res["data"])
    assert all(0 < r[k] < 1 for r in res["data"] for k in ("wait_frac_first_epoch", "wait_frac_later"))
    assert res["sha256_gbs"] > 0
    # the demo's settings, then each undone, each run by its own process (oneDNN reads its cache size once)
    ours = os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    assert [(r["capacity"], r["split_tasks"], r["fused"], r["compiled"], r["batch"]) for r in res["choices"]] == [
        (ours, False, False, False, 4), ("1024", False, False, False, 4), (ours, True, False, False, 4),
        (ours, False, True, False, 4)] + [(ours, False, False, True, 4)] * compiles + [(ours, False, False, False, 64)]
    demo = load_config(TrainConfig, ROOT / "configs/pretrain/demo.yaml")
    assert all(r["width"] == demo.model.width and r["samples_s"] > 0 for r in res["choices"])
    assert [(r["batch"], r["steps"]) for r in res["loop"]] == [(demo.trainer.batch_size, 4), (64, 8)]
    assert all(r["samples_s"] > 0 for r in res["loop"]) and "The whole pretraining loop" in text
    assert text.count("×**") >= 5  # each choice's ratio to the demo's settings, the loop's to batch 64
    assert [(r["precision"], r["phase"]) for r in res["autoencoder"]] == [
        ("32", "whole autoencoder"), ("32", "decoder alone"), ("bf16", "whole autoencoder"), ("bf16", "decoder alone")]
    assert all(r["images_s"] > 0 and r["step_ms"] > 0 for r in res["autoencoder"])
    assert [r["vs_fp32"] for r in res["autoencoder"][:2]] == [1.0, 1.0]
    assert s["trained_here"]  # no --ckpt: a checkpoint trained on the spot
    assert 0 <= s["default"]["accuracy"] <= 100 and s["cache"]["max_diff"] < 1e-4 and s["text"]["same"]
    assert (s["default"]["candidates"], s["demo"]["candidates"]) == (1, 4)


def test_a_missing_checkpoint_is_refused_before_anything_is_measured(tmp_path, monkeypatch):
    from mmar_cli.errors import UserError

    monkeypatch.setattr(bench_run, "tokenize_shapes", lambda *a: pytest.fail("measured before checking --ckpt"))
    out = tmp_path / "results.md"
    with pytest.raises(UserError, match="nope is not a directory"):
        bench_run.main(["--quick", "--ckpt", str(tmp_path / "nope"), "--out", str(out)])
    assert not out.exists()
