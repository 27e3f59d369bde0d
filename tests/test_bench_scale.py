"""`make bench-scale` (benchmarks/bench_scale.py): its section of benchmarks/results.md, the step times it reads
from the trainer's lines, the parameter counts of the qwen2 presets on the meta device, the FSDP memory rows,
and (slow) its --quick run through every `mmar` command with a narrow VAE and a 2-block backbone."""

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_scale  # noqa: E402

from mmar_cli.config import ModelConfig  # noqa: E402
from mmar_cli.model.presets import PRESETS, count_params, resolve  # noqa: E402
from mmar_cli.results import markers, record_section  # noqa: E402


def test_results_md_holds_each_benchmarks_section_once():
    import run as bench_run  # `make bench`: its report is a section too, so neither run removes the other's

    text = (ROOT / "benchmarks" / "results.md").read_text()
    for name in (bench_run.SECTION, bench_scale.SECTION):
        assert all(text.count(m) == 1 for m in markers(name)), name


def test_step_times_come_from_the_trainers_lines():
    lines = [(4.0, "Using bfloat16 Automatic Mixed Precision (AMP)"),
             (50.0, "step 1/3  loss 12.5  lr 2.00e-08  0.2 samples/s  elapsed 0:00:41  eta 0:01:22"),
             (93.5, "step 2/3  loss 0.50  lr 4.00e-08  0.2 samples/s  elapsed 0:01:24  eta 0:00:42"),
             (130.0, "step 3/3  loss 0.40  lr 6.00e-08  0.2 samples/s  elapsed 0:02:01  eta 0:00:00"),
             (140.0, "done: runs/x/final (step 3)")]
    assert bench_scale.step_seconds(lines) == [41.0, 43.5, 36.5]
    assert bench_scale.step_seconds([(1.0, "no training here")]) == []


def preset(name: str, **sizes):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(preset=name, token_dim=16, image_grid=[16, 16],
                                                                   max_prefix_len=64, max_suffix_len=64, **sizes))


def test_the_qwen2_presets_have_qwen2s_own_parameter_counts():
    big = bench_scale.model_params(preset("qwen2-7b", vocab_size=PRESETS["qwen2-7b"]["vocab_size"]))
    assert big["backbone"] == 7_615_616_512  # Qwen2-7B
    assert big["total"] == count_params(resolve(preset("qwen2-7b", vocab_size=152064)))["total"]
    small = bench_scale.model_params(preset("qwen2-0.5b", vocab_size=PRESETS["qwen2-0.5b"]["vocab_size"]))
    assert small["backbone"] == 494_032_768  # Qwen2-0.5B (its LM head is the embedding)
    # FSDP units: the 28 decoder blocks of Qwen2-7B are alike; the root holds what no block does
    layer = 3584 * (3584 + 2 * 512) + 3584 * 3584 + (3584 + 2 * 512) + 3 * 3584 * 18944 + 2 * 3584
    assert big["largest_block"] == layer
    assert big["root_unit"] == big["total"] - 28 * layer - 12 * (2 * 1536 * 1536 + 1536 * 3 * 1536 + 5 * 1536)


def test_fsdp_memory_is_sixteen_bytes_a_parameter_over_the_gpus():
    rows = bench_scale.fsdp_rows(8_000_000_000)
    assert [r[0] for r in rows] == [8, 16]
    assert rows[0][2].startswith("16.0 GB") and rows[1][2].startswith("8.0 GB")


@pytest.mark.slow
def test_quick_run_goes_through_every_command(tmp_path):
    from PIL import Image

    out = tmp_path / "results.md"
    record_section(out, "make bench", "# mmar benchmarks\n\nmake bench's report\n")
    before = out.read_text()
    res = bench_scale.main(["--quick", "--out", str(out), "--keep", str(tmp_path / "work")])
    text = out.read_text()
    assert text.startswith(before) and all(text.count(m) == 1 for m in markers(bench_scale.SECTION))
    assert "--quick: a narrow VAE" in text
    stages = res["stages"]
    for name in ("tokenize", "pretrain", "finetune", "sample", "caption"):
        assert stages[name]["seconds"] > 0 and stages[name]["rss_gib"] > 0.1, name
    assert len(stages["pretrain"]["steps"]) == 2 and len(stages["finetune"]["steps"]) == 1
    assert all(t >= 0 for t in stages["pretrain"]["steps"] + stages["finetune"]["steps"])
    assert res["manifest"]["samples"] == 4
    assert res["manifest"]["image_tokenizer"]["spec"]["grid"] == [16, 16]  # 256 px through 16x downsampling
    assert res["manifest"]["text_tokenizer"]["spec"]["vocab_size"] == 151654
    assert Image.open(res["sample"]["image"]).size == (256, 256)
    assert isinstance(res["caption"]["text"], str) and res["sample"]["seconds"] > 0
    assert res["params"]["mmar"]["backbone"] > 151654 * 64  # the Qwen2 vocabulary's embedding at width 64
    assert f"**{res['params']['qwen2-7b']['total']:,} parameters**" in text
    assert "| 8 | 16 × 7.77" in text and "| 16 | 16 × 7.77" in text
