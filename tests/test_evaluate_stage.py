"""`mmar evaluate`: the metrics on true images, metrics.json's provenance, thresholds, bad input."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmar_cli.app import app
from mmar_cli.config import EvaluateConfig, load_config
from mmar_cli.data.shards import first_samples, load_tokenizers
from mmar_cli.errors import UserError
from mmar_cli.metrics import accuracy, fid, judges
from mmar_cli.metrics.thresholds import check_thresholds
from stages import evaluate
from tiny_checkpoint import DAMAGES, assert_damage_reported, damage, make_checkpoint, make_data

FAST = ["gen.iterations=2", "gen.diffusion_steps=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = make_data(root / "data", num_test=12, overrides=["image_tokenizer.kind=patch"])  # lossless: PSNR inf
    return data, make_checkpoint(data, root / "run")


def mmar(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_true_images_score_full_marks_and_zero_fid(setup):
    data, _ = setup
    samples = first_samples(data / "test", 12)
    _, image_tok = load_tokenizers(data / "test")
    truth = image_tok.decode(torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.float32)))
    checker = judges.CheckerJudge()
    scores = accuracy.mean_hits(checker.hits(truth, [checker.expected(s) for s in samples]))
    assert scores == {k: 1.0 for k in ["shape", "colour", "size", "position", "all", "background"]}
    extractor = fid.feature_extractor(None, torch.device("cpu"))
    same = fid.fid(extractor.extract(truth), extractor.extract(truth), extractor)
    assert same["value"] < 1e-6
    captions = accuracy.caption_accuracy([s["caption"] for s in samples], samples)
    assert captions["und.caption.exact"] == 1.0 and captions["und.caption.all"] == 1.0


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_stops_evaluate_with_one_line(setup, tmp_path, how):
    import shutil

    data, ckpt = setup
    broken = shutil.copytree(ckpt, tmp_path / "broken")
    damage(broken / "ema.safetensors", how)
    code, out, err = mmar("evaluate", "--ckpt", broken, "--data", data / "test", "--out", tmp_path / "ev", *FAST)
    assert_damage_reported(code, out, err, "ckpt", broken / "ema.safetensors", how)
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_a_test_shard_changed_after_tokenize_stops_evaluate_with_one_line(setup, tmp_path):
    import shutil

    data, ckpt = setup
    test = shutil.copytree(data / "test", tmp_path / "test")
    shard = sorted(test.glob("*.tar"))[0]
    damage(shard, "altered")  # same size, other bytes
    code, out, err = mmar("evaluate", "--ckpt", ckpt, "--data", test, "--out", tmp_path / "ev", *FAST)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, out + err
    assert lines[0] == f"error: {shard}: sha256 does not match the manifest (the shard changed or is truncated " \
                       "after tokenize); tokenize again"
    assert not (tmp_path / "ev" / "metrics.json").exists()


@pytest.mark.slow
def test_metrics_json_records_how_every_figure_was_computed(setup, tmp_path):
    data, ckpt = setup
    out = tmp_path / "ev"
    code, stdout, err = mmar("evaluate", "--ckpt", ckpt, "--data", data / "test", "--out", out, "-n", "6",
                             "--seed", "5", "--cfg", "2", *FAST)
    assert code == 0, err
    assert "gen.fid_proxy" in stdout and "not comparable" in err
    result = json.loads((out / "metrics.json").read_text())
    expected = {f"{g}.{k}" for g in ("gen.checker", "ref.checker", "und.caption")
                for k in ("shape", "colour", "size", "position", "all")}
    expected |= {"gen.fid_proxy", "gen.precision", "gen.recall", "und.caption.exact", "und.caption.bleu4",
                 "und.caption.rougeL", "und.qa.exact", "tok.psnr", "tok.ssim", "gen.checker.background",
                 "ref.checker.background", "gen.seam_ratio", "ref.seam_ratio"}
    assert set(result["metrics"]) == expected
    assert set(result["judges"]) == {"checker"} and result["judges"]["checker"]["judged"] == 6
    assert "mmar-random-conv" in result["provenance"]["gen.recall"]["evaluator"]
    assert any("no prompt has two held-out samples" in note for note in result["notes"])
    assert result["metrics"]["tok.psnr"] == "inf" and result["metrics"]["tok.ssim"] == pytest.approx(1.0)
    assert result["metrics"]["ref.checker.all"] == 1.0 and result["metrics"]["ref.checker.background"] == 1.0
    # the held-out samples drawn again from their JSON are the very images tokenized (patch tokens: lossless)
    assert result["metrics"]["ref.seam_ratio"] == 1.0 and result["metrics"]["gen.seam_ratio"] > 0
    manifest_sha = result["reference"]["manifest_sha256"]
    for name, p in result["provenance"].items():
        assert p["evaluator"] and p["mmar_version"] and p["num_samples"] == 6, name
        assert p["checkpoint_sha256"] == result["checkpoint"]["sha256"], name
        assert p["settings"]["seed"] == 5 and p["settings"]["weights"] == "ema", name
        assert p["reference"].get("manifest_sha256", manifest_sha) == manifest_sha or name.startswith("tok."), name
    g = result["provenance"]["gen.checker.all"]["settings"]
    assert (g["cfg"], g["temperature"], g["temperature_end"], g["iterations"], g["diffusion_steps"], g["sampler"]) == \
        (2.0, 0.8, 0.2, 2, 2, "ddpm")
    assert "clean-fid" in result["versions"] and "torchmetrics" in result["provenance"]["tok.psnr"]["evaluator"]
    assert "biased" in result["provenance"]["gen.fid_proxy"]["note"]
    report = (out / "report.md").read_text()
    assert "![generated grid](generated_grid.png)" in report and "images/gen-005.png" in report
    assert (out / "generated_grid.png").is_file() and (out / "images" / "true-000.png").is_file()


@pytest.mark.slow
def test_best_of_k_also_judges_the_first_candidates_as_one_draw(setup, tmp_path):
    """gen.candidates=3: one_draw.gen.* are the figures of a gen.candidates=1 run (the same images), from
    the same pass, and their provenance records candidates 1."""
    data, ckpt = setup
    args = ["--ckpt", ckpt, "--data", data / "test", "-n", "12", "--seed", "3", *FAST]
    code, _, err = mmar("evaluate", *args, "--out", tmp_path / "k3", "gen.candidates=3")
    assert code == 0, err
    code, _, err = mmar("evaluate", *args, "--out", tmp_path / "k1")
    assert code == 0, err
    k3 = json.loads((tmp_path / "k3" / "metrics.json").read_text())
    k1 = json.loads((tmp_path / "k1" / "metrics.json").read_text())
    one = {k[len("one_draw."):]: v for k, v in k3["metrics"].items() if k.startswith("one_draw.")}
    assert set(one) == {f"gen.checker.{a}" for a in ("shape", "colour", "size", "position", "all", "background")} \
        | {"gen.seam_ratio"}
    assert one == {k: k1["metrics"][k] for k in one}
    assert not any(k.startswith("one_draw.") for k in k1["metrics"])  # one candidate: nothing twice
    assert k3["provenance"]["one_draw.gen.checker.all"]["settings"]["candidates"] == 1
    assert k3["provenance"]["gen.checker.all"]["settings"]["candidates"] == 3


@pytest.mark.slow
def test_thresholds_fail_the_run_naming_metric_value_and_minimum(setup, tmp_path):
    data, ckpt = setup
    thresholds = tmp_path / "t.yaml"
    thresholds.write_text("ref.checker.all: 0.5\ntok.ssim: 2.0\n")
    code, _, err = mmar("evaluate", "--ckpt", ckpt, "--data", data / "test", "--out", tmp_path / "ev", "-n", "2",
                        "--thresholds", thresholds, "fid=false", *FAST)
    assert code == 1
    assert "tok.ssim = 1 is below the minimum 2.0" in err and "ref.checker.all" not in err


def test_check_thresholds_min_max_and_unknown_names(tmp_path):
    t = tmp_path / "t.yaml"
    t.write_text("a: 0.5\nb: {max: 10}\n")
    assert check_thresholds({"a": 0.7, "b": 3.0}, t) == []
    assert check_thresholds({"a": 0.2, "b": 30.0}, t) == ["a = 0.2 is below the minimum 0.5",
                                                          "b = 30 is above the maximum 10"]
    assert check_thresholds({"a": math.inf, "b": 1.0}, t) == []
    with pytest.raises(UserError, match="'b' was not computed"):
        check_thresholds({"a": 1.0}, t)


@pytest.mark.slow
def test_data_from_other_tokenizers_is_refused(setup, tmp_path):
    _, ckpt = setup
    other = make_data(tmp_path / "other", num_test=2, overrides=["image_tokenizer.kind=patch",
                                                                     "text_tokenizer.vocab_size=128"])
    cfg = load_config(EvaluateConfig, overrides=[f"ckpt={ckpt}", f"data={other / 'test'}", f"out={tmp_path}"])
    with pytest.raises(UserError, match="does not match data.*text tokenizer mismatch"):
        evaluate.run(cfg)


def test_bad_fid_weights_fail_before_generating(setup, tmp_path):
    data, ckpt = setup
    code, _, err = mmar("evaluate", "--ckpt", ckpt, "--data", data / "test", "--out", tmp_path,
                        "--fid-weights", tmp_path / "nope.pt")
    assert code == 2 and "nope.pt does not exist" in err
    assert not (tmp_path / "metrics.json").exists()
