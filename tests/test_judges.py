"""Judges and diversity on data we did not draw with the built-in renderer: a tiny labelled image set in
img2dataset's layout, split by `mmar tokenize`, judged by a classifier `mmar evaluate` trains itself."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from mmar_cli.app import app
from mmar_cli.data.shards import iterate_samples, load_tokenizers
from mmar_cli.metrics import accuracy, diversity, judges
from tiny_checkpoint import make_checkpoint

CORNERS = ["top left", "top right", "bottom left", "bottom right"]
FAST = ["gen.iterations=2", "gen.diffusion_steps=2"]


def mmar(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def blob_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A bright disc of random colour and size in corner `label` of a dark field: 4 classes any small CNN
    tells apart, with enough variety inside a class that near-copies would show."""
    image = np.full((32, 32, 3), rng.integers(0, 50), dtype=np.uint8)
    cy, cx = (8 if label < 2 else 24) + rng.integers(-2, 3), (8 if label % 2 == 0 else 24) + rng.integers(-2, 3)
    yy, xx = np.mgrid[:32, :32]
    image[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(3, 7) ** 2] = rng.integers(150, 256, 3)
    return image


def write_labelled_tar(path, n: int, seed: int = 0, label_of=lambda i: i % 4) -> None:
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            label = label_of(i)
            corner = label % 4 if label is not None else 0  # an unknown label is drawn in some corner
            buf = io.BytesIO()
            Image.fromarray(blob_image(corner, rng)).save(buf, format="PNG")
            meta = {"key": f"{i:09d}"} if label is None else {"key": f"{i:09d}", "label": label}
            sink.write({"__key__": f"{i:09d}", "png": buf.getvalue(), "txt": f"disc {CORNERS[corner]}",
                        "json": json.dumps(meta)})


@pytest.fixture(scope="module", autouse=True)
def quick_judge():
    """The corners are learnt in far fewer steps than digits: a quarter of the recipe keeps the tests quick."""
    steps = judges.RECIPE["steps"]
    judges.RECIPE["steps"] = 200
    yield
    judges.RECIPE["steps"] = steps


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """200 labelled images -> data/{train,test} (test ~25 %) -> a random-weight checkpoint."""
    root = tmp_path_factory.mktemp("labelled")
    write_labelled_tar(root / "00000.tar", 200)
    code, _, err = mmar("tokenize", "--input", root / "00000.tar", "--out", root / "data", "--test-fraction", "0.25",
                        "image_tokenizer.kind=patch", "text_tokenizer.kind=byte")
    assert code == 0, err
    return root / "data", make_checkpoint(root / "data", root / "run")


# --------------------------------------------------------------------------------------------------
# Diversity and text similarity on their own
# --------------------------------------------------------------------------------------------------
def test_precision_recall_see_coverage_not_only_realism():
    rng = np.random.default_rng(0)
    real, other = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    assert diversity.precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    fair = diversity.precision_recall(real, other)
    assert fair["precision"] > 0.8 and fair["recall"] > 0.8
    # one realistic picture drawn over and over: precise, but it covers almost none of the data
    collapsed = diversity.precision_recall(real, np.repeat(real[:1], 200, axis=0) + 1e-3 * other)
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.1
    with pytest.raises(ValueError, match="more than k=3"):
        diversity.precision_recall(real[:3], other)


def test_group_spread_is_one_for_the_data_and_near_zero_for_copies():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(5), 40)
    real = rng.normal(size=(200, 16)) + 10 * groups[:, None]
    fresh = rng.normal(size=(200, 16)) + 10 * groups[:, None]
    assert diversity.group_spread(real, fresh, groups)["spread"] == pytest.approx(1.0, abs=0.05)
    copies = real[groups * 40] + 0.01 * fresh  # each group's first image, again and again
    result = diversity.group_spread(real, copies, groups)
    assert result["groups"] == 5 and result["spread"] < 0.02
    half = diversity.group_spread(real, 10 * groups[:, None] + 0.5 * (fresh - 10 * groups[:, None]), groups)
    assert half["spread"] == pytest.approx(0.5, abs=0.05)
    assert diversity.group_spread(real[:3], real[:3], [0, 1, 2])["groups"] == 0


def test_text_similarity_is_one_for_the_truth_and_falls_with_wrong_words():
    truth = ["a handwritten digit seven", "a handwritten digit one"]
    assert accuracy.text_similarity(truth, truth) == {"bleu4": pytest.approx(1.0), "rougeL": pytest.approx(1.0)}
    worse = accuracy.text_similarity(["a handwritten digit seven", "a handwritten digit two"], truth)
    assert 0.3 < worse["bleu4"] < 0.9 and worse["rougeL"] == pytest.approx(0.875)
    assert accuracy.text_similarity(["three", "two"], truth)["bleu4"] == 0.0


# --------------------------------------------------------------------------------------------------
# The classifier judge
# --------------------------------------------------------------------------------------------------
def test_the_judge_reads_true_held_out_images_and_is_cached_by_hash(labelled):
    data, _ = labelled
    _, image_tok = load_tokenizers(data / "train")
    judge = judges.classifier_judge(data / "train", image_tok, "label", seed=0, log=lambda m: None)
    assert judge.classes == ["0", "1", "2", "3"] and judge.provenance["train_images"] > 120
    test = list(iterate_samples(data / "test"))
    truth = image_tok.decode(np.stack([s["tokens"] for s in test]).astype(np.float32))
    hits = judge.hits(truth, [judge.expected(s) for s in test])
    assert len(hits) == len(test) > 30 and accuracy.mean_hits(hits)["accuracy"] >= 0.95
    cached = list(data.joinpath("train").glob("judge-*.safetensors"))
    assert len(cached) == 1 and cached[0].with_suffix(".json").is_file()
    said = []
    again = judges.classifier_judge(data / "train", image_tok, "label", seed=0, log=said.append)
    assert "cached" in said[0] and again.predict(truth) == judge.predict(truth)
    judges.classifier_judge(data / "train", image_tok, "label", seed=1, log=lambda m: None)
    assert len(list(data.joinpath("train").glob("judge-*.safetensors"))) == 2  # another seed, another hash
    assert not list(data.joinpath("train").glob("*.tmp"))
    # a damaged cache is trained again (and rewritten), never an error
    cached[0].with_suffix(".json").write_text('{"classes": [')
    said.clear()
    healed = judges.classifier_judge(data / "train", image_tok, "label", seed=0, log=said.append)
    assert "unreadable" in said[0] and healed.predict(truth) == judge.predict(truth)
    assert json.loads(cached[0].with_suffix(".json").read_text())["classes"] == ["0", "1", "2", "3"]


def test_labels_are_one_class_however_written():
    labels = [judges.read_label({"meta": m}, "label") for m in
              ({"label": 7}, {"label": 7.0}, {"label": "7"}, {"label": 2.5}, {"label": ""}, {"label": None},
               {"label": [1]}, {}, {"digit": 3})]
    assert labels == ["7", "7", "7", "2.5", None, None, None, None, None]
    assert judges.read_label({"meta": {"digit": 3}}, "digit") == "3"


@pytest.mark.slow
def test_evaluate_judges_an_untrained_model_near_chance_against_its_ceiling(labelled, tmp_path):
    data, ckpt = labelled
    code, stdout, err = mmar("evaluate", "--ckpt", ckpt, "--data", data / "test", "--out", tmp_path, "-n", "64",
                             *FAST)
    assert code == 0, err
    result = json.loads((tmp_path / "metrics.json").read_text())
    m = result["metrics"]
    assert m["ref.classifier.accuracy"] >= 0.95
    assert m["gen.classifier.accuracy"] <= 0.5  # noise from random weights: about one class in four
    assert "gen.checker.all" not in m and "ref.seam_ratio" not in m  # not shapes: no renders to compare with
    assert m["gen.seam_ratio"] > 0 and "decoded" in result["provenance"]["gen.seam_ratio"]["note"]
    assert set(result["judges"]) == {"classifier"}
    info = result["judges"]["classifier"]
    assert info["classes"] == ["0", "1", "2", "3"] and info["label_key"] == "label" and len(info["hash"]) == 64
    assert "trained on" in result["provenance"]["gen.classifier.accuracy"]["evaluator"]
    assert 0.0 <= m["gen.recall"] <= 1.0 and m["gen.spread"] >= 0.0
    assert "class" in result["provenance"]["gen.spread"]["evaluator"]
    assert "classifier: " in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_unlabelled_and_unseen_labels_are_counted_not_judged(labelled, tmp_path):
    data, ckpt = labelled
    # a held-out input whose labels are missing on some samples and unknown (7) on others
    write_labelled_tar(tmp_path / "odd.tar", 12, seed=3, label_of=lambda i: [0, None, 7][i % 3])
    code, _, err = mmar("tokenize", "--input", tmp_path / "odd.tar", "--out", tmp_path / "odd",
                        "--tokenizer-from", data / "train")
    assert code == 0, err
    code, _, err = mmar("evaluate", "--ckpt", ckpt, "--data", tmp_path / "odd", "--out", tmp_path / "ev",
                        f"judge_data={data / 'train'}", "fid=false", *FAST)
    assert code == 0, err
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert result["judges"]["classifier"]["judged"] == 4
    assert result["provenance"]["ref.classifier.accuracy"]["num_samples"] == 4
    assert any("4 held-out samples have no 'label'" in n for n in result["notes"])
    assert any("4 held-out samples carry labels never seen in training (e.g. '7')" in n for n in result["notes"])


def test_too_few_images_per_class_are_refused_with_the_counts(tmp_path):
    write_labelled_tar(tmp_path / "few.tar", 22, label_of=lambda i: 0 if i < 20 else 1)
    code, _, err = mmar("tokenize", "--input", tmp_path / "few.tar", "--out", tmp_path / "few",
                        "image_tokenizer.kind=patch", "text_tokenizer.kind=byte")
    assert code == 0, err
    _, image_tok = load_tokenizers(tmp_path / "few")
    with pytest.raises(judges.UserError, match=r"too few labelled training images.*'1': 2, '0': 20"):
        judges.classifier_judge(tmp_path / "few", image_tok, "label", seed=0, log=lambda m: None)


def test_labels_without_training_shards_are_refused_in_one_line(labelled, tmp_path):
    data, ckpt = labelled
    code, _, err = mmar("evaluate", "--ckpt", ckpt, "--data", data / "test", "--out", tmp_path, "-n", "4",
                        f"judge_data={tmp_path / 'nowhere'}", *FAST)
    assert code == 2 and "judge_data" in err and "Traceback" not in err
