"""Judges: whether a generated image shows what its prompt asked for.

A judge reads images and says, per image, which of the sample's asks it got right. It is validated on the
true held-out images: its score there (`ref.<judge>.*`) is the ceiling of its score on generated ones
(`gen.<judge>.*`), so a judge that cannot read the real data says so before it grades a model.

    checker     the built-in shapes: shape, colour, size and position read back analytically
                (mmar_cli/data/checker.py); asks = the attributes of the caption, and beside them
                `background`: whether the background is one colour (not a score of the prompt, so not
                part of `all`)
    classifier  labelled data (a class per sample in its JSON, `label` or `label_key`): a small CNN
                trained on the real training images (the training shards' tokens decoded by the same
                tokenizer), as in the Classification Accuracy Score literature; asks = the class

Both have one interface: `expected(sample)` (what the sample asks for, None when this judge cannot tell),
`hits(images, expected)` (per image, {ask: right}) and `verdicts(images, expected)` (a phrase per image
for the report). The classifier is trained once per training set and cached beside its shards
(`judge-<hash>.safetensors` + `.json`, the hash covering the shards' manifest, the label key, the recipe
and the seed), so a second evaluation reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmar_cli import __version__, seeding
from mmar_cli.data.checker import ATTRIBUTES
from mmar_cli.errors import UserError

JUDGE_CACHE = "judge-*"  # the cached judge's files beside the training shards (tokenize --overwrite removes them)
MIN_PER_CLASS = 5  # fewer training images than this in any class: no judge is trained
MAX_TRAIN_IMAGES = 20000  # the judge sees 800 x 64 draws; more images would only cost memory
JUDGE_SIZE = 32  # the classifier reads images resized to this side
# Everything that changes the trained judge is in its cache hash. A fixed number of steps bounds the time
# (about half a minute on 2 CPU cores) whatever the training set's size: 800 x 64 = 13 passes over 4000
# digits. On MNIST's 4000 training digits (PCA tokens decoded) 400 steps read 95.9 % of the validation
# digits right, 800 steps 97.3 %, and with batch norm 97.9 %.
RECIPE = {"version": 2, "size": JUDGE_SIZE, "steps": 800, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4,
          "shift": 2}


# --------------------------------------------------------------------------------------------------
# The analytic checker of the built-in shapes
# --------------------------------------------------------------------------------------------------
class CheckerJudge:
    name = "checker"

    def __init__(self):
        self.evaluator = f"mmar checker (mmar_cli/data/checker.py) of mmar {__version__}"
        self.provenance = {"kind": "analytic", "reads": "shape, colour, size, position"}

    def expected(self, sample: dict) -> Optional[List[dict]]:
        """The attributes a built-in shapes caption asks for (None for any other caption)."""
        from mmar_cli.data.shapes import parse_caption

        if sample["meta"].get("attributes"):
            return sample["meta"]["attributes"]
        try:
            return parse_caption(sample["caption"] or "")
        except UserError:
            return None

    def hits(self, images: np.ndarray, expected: Sequence[List[dict]]) -> List[Dict[str, bool]]:
        from mmar_cli.data import checker

        return [{**checker.score(image, exp), "background": checker.background_coherent(image, len(exp))}
                for image, exp in zip(images, expected)]

    def verdicts(self, images: np.ndarray, expected: Sequence[List[dict]]) -> List[str]:
        """One phrase per image for the report: right, or which attributes are wrong."""
        def verdict(h):
            wrong = [k for k in ATTRIBUTES if not h[k]]
            return ("wrong " + ", ".join(wrong) if wrong else "right") + \
                ("" if h["background"] else "; background not one colour")
        return [verdict(h) for h in self.hits(images, expected)]


# --------------------------------------------------------------------------------------------------
# A classifier trained on the real training images
# --------------------------------------------------------------------------------------------------
def _conv(channels_in: int, channels_out: int) -> list:
    return [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out), nn.ReLU()]


class SmallCNN(nn.Module):
    """Two blocks of two 3x3 convolutions (batch norm, ReLU) and max pooling, then a two-layer head:
    enough to read digits or coarse classes at 32 px, small enough to train on a CPU in a minute."""

    def __init__(self, classes: int):
        super().__init__()
        self.net = nn.Sequential(*_conv(3, 16), *_conv(16, 16), nn.MaxPool2d(2), *_conv(16, 32), *_conv(32, 32),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3),
                                 nn.Linear(32 * (JUDGE_SIZE // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def to_judge_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, S, S] in [-1, 1] at the judge's size."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != JUDGE_SIZE or x.shape[-2] != JUDGE_SIZE:
        x = F.interpolate(x, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def _shifted(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to `shift` pixels each way (edge padding): the judge should not care."""
    if shift == 0:
        return x
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * shift + 1, (2, len(x)), generator=generator).tolist()
    size = x.shape[-1]
    return torch.stack([p[:, b:b + size, a:a + size] for p, a, b in zip(padded, dx, dy)])


def train_classifier(inputs: torch.Tensor, targets: np.ndarray, classes: int, seed: int) -> SmallCNN:
    """AdamW with a one-cycle LR on shifted copies of `inputs` (`to_judge_input`'s), a fixed number of
    steps, seeded: the same data and seed give the same judge."""
    r = RECIPE
    generator = seeding.generator(seed)
    with seeding.forked(seed):  # init and dropout
        model = SmallCNN(classes)
    x, y = inputs, torch.from_numpy(targets).long()
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["steps"], pct_start=0.15)
    model.train()
    with seeding.forked(seed):
        order, at = torch.randperm(len(x), generator=generator), 0
        for _ in range(r["steps"]):
            if at + r["batch_size"] > len(x):  # a new pass over the data, in a new order
                order, at = torch.randperm(len(x), generator=generator), 0
            idx = order[at:at + r["batch_size"]]
            at += r["batch_size"]
            loss = F.cross_entropy(model(_shifted(x[idx], r["shift"], generator)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def read_label(sample: dict, label_key: str) -> Optional[str]:
    """A sample's class as a string, None where it has none (no field, null, an empty string, a list or
    an object). Numbers that are whole are one class however written: 7, 7.0 and "7" are "7"."""
    value = sample["meta"].get(label_key)
    if value is None or value == "" or isinstance(value, (dict, list)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


class ClassifierJudge:
    name = "classifier"

    def __init__(self, model: SmallCNN, classes: List[str], label_key: str, provenance: dict):
        self.model, self.classes, self.label_key = model, classes, label_key
        self.index = {c: i for i, c in enumerate(classes)}
        self.provenance = provenance
        self.evaluator = (f"mmar small CNN judge (mmar_cli/metrics/judges.py, recipe v{RECIPE['version']}) trained "
                          f"on {provenance['train_images']} real training images, {len(classes)} classes, "
                          f"hash {provenance['hash'][:16]}")

    def expected(self, sample: dict) -> Optional[str]:
        """The sample's class, if it has one the judge was trained on (else None: not judged)."""
        label = read_label(sample, self.label_key)
        return label if label in self.index else None

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> List[str]:
        out = [self.model(to_judge_input(images[i:i + 256])).argmax(-1) for i in range(0, len(images), 256)]
        return [self.classes[int(k)] for k in torch.cat(out)] if out else []

    def hits(self, images: np.ndarray, expected: Sequence[str]) -> List[Dict[str, bool]]:
        return [{"accuracy": p == e} for p, e in zip(self.predict(images), expected)]

    def verdicts(self, images: np.ndarray, expected: Sequence[str]) -> List[str]:
        return [f"right ({e})" if p == e else f"read as {p}, asked {e}" for p, e in zip(self.predict(images), expected)]


def _cache_hash(manifest_sha256: str, label_key: str, seed: int) -> str:
    """The training directory's manifest (its shards' checksums and its tokenizers' hashes), the label key,
    the recipe and the seed: anything else trains another judge."""
    spec = {"manifest_sha256": manifest_sha256, "label_key": label_key, "seed": seed, "recipe": RECIPE}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _load_cached(weights: Path, info_path: Path, label_key: str, log) -> Optional[ClassifierJudge]:
    from safetensors.torch import load_file

    if not (weights.is_file() and info_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        model = SmallCNN(len(info["classes"]))
        model.load_state_dict(load_file(weights))
    except Exception as e:  # a damaged cache costs a retraining, never the evaluation
        log(f"judge: the cache {weights} is unreadable ({type(e).__name__}: {e}); training the judge again")
        return None
    log(f"judge: the classifier cached in {weights} ({len(info['classes'])} classes)")
    return ClassifierJudge(model.eval(), info["classes"], label_key, info)


def _save_cache(model: SmallCNN, info: dict, weights: Path, info_path: Path, log) -> None:
    """Weights, then the info file, each under a name of this process's and renamed when whole: two
    evaluations training the same judge at once cannot mix their files, and the info file (read second)
    is there only when the weights are."""
    from safetensors.torch import save_file

    tag = f".{os.getpid()}.tmp"
    tmp_weights, tmp_info = weights.with_name(weights.name + tag), info_path.with_name(info_path.name + tag)
    try:
        save_file(model.state_dict(), str(tmp_weights))
        os.replace(tmp_weights, weights)
        tmp_info.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_info, info_path)
    except OSError as e:
        tmp_weights.unlink(missing_ok=True)
        tmp_info.unlink(missing_ok=True)
        log(f"judge: could not cache the judge in {weights.parent} ({e}); it will be trained again next time")


def _training_inputs(train_dir: Path, image_tok, label_key: str) -> tuple[torch.Tensor, List[str], int]:
    """The judge's inputs (at most MAX_TRAIN_IMAGES labelled images, decoded and shrunk a batch at a time,
    so a large training split never sits in memory at full size), their labels, and the unlabelled count."""
    from mmar_cli.data.shards import iterate_samples

    inputs, labels, unlabelled, batch = [], [], 0, []

    def flush():
        if batch:
            inputs.append(to_judge_input(image_tok.decode(torch.from_numpy(np.stack(batch).astype(np.float32)))))
            batch.clear()

    for s in iterate_samples(train_dir):
        label = read_label(s, label_key)
        if label is None:
            unlabelled += 1
            continue
        if len(labels) == MAX_TRAIN_IMAGES:
            continue  # the rest is counted, not used: shards are written in a hash order, so this is a sample
        labels.append(label)
        batch.append(s["tokens"])
        if len(batch) == 256:
            flush()
    flush()
    return (torch.cat(inputs) if inputs else torch.zeros(0)), labels, unlabelled


def classifier_judge(train_dir: str | Path, image_tok, label_key: str, seed: int, log=print) -> ClassifierJudge:
    """The judge of `train_dir`'s classes: loaded from its cache when the hash matches, else trained on the
    directory's images (its tokens decoded by `image_tok`, which must be the directory's tokenizer) and
    cached there. Refused when any class has fewer than MIN_PER_CLASS images."""
    from mmar_cli.data.shards import MANIFEST, file_sha256

    train_dir = Path(train_dir)
    digest = _cache_hash(file_sha256(train_dir / MANIFEST), label_key, seed)
    weights, info_path = train_dir / f"judge-{digest[:16]}.safetensors", train_dir / f"judge-{digest[:16]}.json"
    cached = _load_cached(weights, info_path, label_key, log)
    if cached is not None:
        return cached

    inputs, labels, unlabelled = _training_inputs(train_dir, image_tok, label_key)
    counts = {c: labels.count(c) for c in sorted(set(labels))}
    if len(counts) < 2 or min(counts.values()) < MIN_PER_CLASS:
        shown = ", ".join(f"{c!r}: {n}" for c, n in sorted(counts.items(), key=lambda kv: kv[1])[:5])
        raise UserError(f"judge: {train_dir} has too few labelled training images to train a classifier judge "
                        f"(need at least 2 classes with {MIN_PER_CLASS} images each; '{label_key}' counts: "
                        f"{shown or 'none'}{', ...' if len(counts) > 5 else ''}; {unlabelled} unlabelled)")
    classes = sorted(counts)
    index = {c: i for i, c in enumerate(classes)}
    targets = np.array([index[c] for c in labels])
    log(f"judge: training a classifier on {len(labels)} real images of {len(classes)} classes from {train_dir}")
    model = train_classifier(inputs, targets, len(classes), seed)
    with torch.no_grad():
        predicted = torch.cat([model(inputs[i:i + 256]).argmax(-1) for i in range(0, len(inputs), 256)])
    train_accuracy = float((predicted.numpy() == targets).mean())
    info = {"classes": classes, "label_key": label_key, "hash": digest, "seed": seed, "recipe": RECIPE,
            "train_dir": str(train_dir), "train_images": len(labels), "unlabelled": unlabelled,
            "per_class": counts, "train_accuracy": train_accuracy,
            "images": "training tokens decoded by the checkpoint's image tokenizer", "mmar_version": __version__}
    _save_cache(model, info, weights, info_path, log)
    return ClassifierJudge(model, classes, label_key, info)


# --------------------------------------------------------------------------------------------------
# The judges of a held-out set
# --------------------------------------------------------------------------------------------------
def judges_for(cfg, samples: List[dict], data: Path, data_manifest: dict, image_tok, notes: List[str],
               log=print) -> list:
    """The judges that apply to these held-out samples: the checker where captions are built-in shapes
    captions, a classifier where samples carry a label (trained on the training split's real images, which
    must share the held-out data's tokenizers). `cfg`: the EvaluateConfig (label_key, judge_data,
    judge_seed); what a judge cannot score is added to `notes`. Built before anything is generated, so a
    setting that cannot work fails in seconds."""
    from mmar_cli.data.shards import check_compatible, read_manifest

    checker = CheckerJudge()
    found = [checker] if any(checker.expected(s) is not None for s in samples) else []
    labels = [read_label(s, cfg.label_key) for s in samples]
    if any(label is not None for label in labels):
        train_dir = Path(cfg.judge_data) if cfg.judge_data else data.parent / "train"
        if not (train_dir / "manifest.json").is_file():
            raise UserError(f"the held-out samples carry labels ('{cfg.label_key}') but {train_dir} holds no training "
                            "shards to train a judge on; set judge_data=DIR (the training split's shards)")
        try:
            check_compatible(data_manifest, read_manifest(train_dir))
        except UserError as e:
            raise UserError(f"judge_data {train_dir} vs data {data}: {e}") from None
        classifier = classifier_judge(train_dir, image_tok, cfg.label_key, cfg.judge_seed, log=log)
        missing = labels.count(None)
        unseen = sorted({lab for lab in labels if lab is not None and lab not in classifier.index})
        if missing:
            notes.append(f"{missing} held-out samples have no '{cfg.label_key}': not judged by the classifier")
        if unseen:
            notes.append(f"{sum(lab in unseen for lab in labels)} held-out samples carry labels never seen in "
                         f"training (e.g. {unseen[0]!r}): not judged by the classifier")
        found.append(classifier)
    elif not found:
        notes.append(f"no judge for these samples: the captions are not built-in shapes captions and no sample "
                     f"has a '{cfg.label_key}' (set label_key to the JSON field that holds the class)")
    return found
