"""The `ae` image tokenizer: a small convolutional autoencoder trained by tokenize on the training images."""

import hashlib
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from mmar_cli.app import app
from mmar_cli.config import ImageTokenizerConfig, TokenizeConfig, load_config
from mmar_cli.data import shards
from mmar_cli.data.shapes import make_sample
from mmar_cli.errors import UserError
from mmar_cli.tokenizers.image import IMAGE_TOKENIZER_FILE, AETokenizer, build_image_tokenizer, load_image_tokenizer

TINY = dict(kind="ae", ae_channels=8, ae_width=8, ae_steps=40, ae_decoder_steps=0, ae_precision="32", ae_batch=16,
            ae_lr=3e-3)
TINY_ARGS = [f"image_tokenizer.{k}={v}" for k, v in TINY.items()]
SMALL = ["shapes.num_train=40", "shapes.num_val=6", "shapes.num_test=4", "shard_size=16"]


def image_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(ImageTokenizerConfig), {**TINY, **kw})


def shapes(split, n):
    return np.stack([make_sample(split, i)["image"] for i in range(n)])


@pytest.fixture(scope="module")
def train_images():
    return shapes("train", 300)


@pytest.fixture(scope="module")
def fitted(train_images):
    lines = []
    tok = build_image_tokenizer(image_cfg(), 32, train_images, log=lines.append)
    return tok, lines


def tokenize(*args):
    result = CliRunner().invoke(app, ["tokenize", *map(str, args)])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_encode_decode_shapes_dtypes_and_unit_std(fitted, train_images):
    tok, lines = fitted
    assert tok.grid == (4, 4) and tok.token_dim == 8 and tok.value_bound is None
    tokens = tok.encode(train_images)
    assert tokens.shape == (300, 16, 8) and tokens.dtype == torch.float32
    # normalised per channel on the training images themselves: mean 0, std 1
    flat = tokens.reshape(-1, 8)
    assert torch.allclose(flat.mean(0), torch.zeros(8), atol=1e-3)
    assert torch.allclose(flat.std(0), torch.ones(8), atol=1e-3)
    images = tok.decode(tokens[:5])
    assert images.dtype == np.uint8 and images.shape == (5, 32, 32, 3)
    assert np.array_equal(tok.decode(tokens[:5].half()), tok.decode(tokens[:5].half().float()))
    assert tok.encode(torch.from_numpy(train_images[:2])).shape == (2, 16, 8)
    # a progress line every tenth of the steps, the L1 falling
    steps = [line for line in lines if line.startswith("ae: step")]
    assert len(steps) == 10 and steps[-1].startswith("ae: step 40/40")
    l1 = [float(re.search(r"l1 ([\d.]+)", line).group(1)) for line in steps]
    assert l1[-1] < 0.7 * l1[0]


def test_training_beats_the_untrained_network(fitted, train_images):
    tok, _ = fitted
    untrained = AETokenizer(32, 8, tok.settings)
    held_out = shapes("val", 50).astype(np.float64)

    def mse(t):
        return np.mean((t.decode(t.encode(held_out.astype(np.uint8))) - held_out) ** 2)

    assert mse(tok) < 0.5 * mse(untrained)


def test_save_load_gives_identical_tokens_and_hash(fitted, train_images, tmp_path):
    tok, _ = fitted
    tok.save(tmp_path)
    file = tmp_path / IMAGE_TOKENIZER_FILE
    assert hashlib.sha256(file.read_bytes()).hexdigest() == tok.spec()["sha256"]
    loaded = load_image_tokenizer(tmp_path, tok.spec())
    assert loaded.spec() == tok.spec()
    assert torch.equal(loaded.encode(train_images[:20]), tok.encode(train_images[:20]))
    assert np.array_equal(loaded.decode(tok.encode(train_images[:20])), tok.decode(tok.encode(train_images[:20])))
    # a changed file is refused
    state = bytearray(file.read_bytes())
    state[-1] ^= 1
    file.write_bytes(bytes(state))
    with pytest.raises(UserError, match="sha256 differs"):
        load_image_tokenizer(tmp_path, tok.spec())


def test_same_seed_same_weights_other_seed_other_weights(fitted, train_images):
    tok, _ = fitted
    quiet = dict(log=lambda line: None)
    again = build_image_tokenizer(image_cfg(), 32, train_images, **quiet)
    assert again.spec()["sha256"] == tok.spec()["sha256"]
    other = build_image_tokenizer(image_cfg(ae_seed=1, ae_steps=2), 32, train_images, **quiet)
    short = build_image_tokenizer(image_cfg(ae_steps=2), 32, train_images, **quiet)
    assert other.spec()["sha256"] != short.spec()["sha256"]


def test_decoder_phase_keeps_the_tokens_and_sharpens_the_decoder(fitted, train_images):
    tok, _ = fitted
    lines = []
    more = build_image_tokenizer(image_cfg(ae_decoder_steps=30), 32, train_images, log=lines.append)
    # the same seed and joint steps: the same encoder, so the same tokens; the decoder trained further
    assert torch.equal(more.encode(train_images[:50]), tok.encode(train_images[:50]))
    enc, dec = tok.model.encoder.state_dict(), tok.model.decoder.state_dict()
    assert all(torch.equal(v, enc[k]) for k, v in more.model.encoder.state_dict().items())
    assert not all(torch.equal(v, dec[k]) for k, v in more.model.decoder.state_dict().items())
    assert more.spec()["sha256"] != tok.spec()["sha256"] and more.spec()["ae_decoder_steps"] == 30
    steps = [line for line in lines if line.startswith("ae decoder: step")]
    assert len(steps) == 10 and steps[-1].startswith("ae decoder: step 30/30")
    held_out = shapes("val", 50)

    def mse(t):
        return np.mean((t.decode(t.encode(held_out)).astype(np.float64) - held_out) ** 2)

    assert mse(more) < mse(tok)


def test_bf16_training_learns_and_leaves_fp32_contiguous_weights(fitted, train_images):
    tok, _ = fitted
    lines = []
    half = build_image_tokenizer(image_cfg(ae_precision="bf16"), 32, train_images, log=lines.append)
    assert "(bf16)" in lines[0]
    params = list(half.model.parameters())
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in params)
    l1 = [float(re.search(r"l1 ([\d.]+)", line).group(1)) for line in lines if line.startswith("ae: step")]
    assert l1[-1] < 0.7 * l1[0]
    held_out = shapes("val", 50)
    err = [np.mean((t.decode(t.encode(held_out)).astype(np.float64) - held_out) ** 2) for t in (half, tok)]
    assert err[0] < 1.5 * err[1]  # bfloat16 convolutions learn about as well as fp32 ones


def test_a_spec_written_before_the_decoder_phase_still_loads(fitted, tmp_path):
    tok, _ = fitted
    tok.save(tmp_path)
    old = {k: v for k, v in tok.spec().items() if k not in ("ae_decoder_steps", "ae_precision")}
    loaded = load_image_tokenizer(tmp_path, old)
    assert loaded.settings["ae_decoder_steps"] == 0 and loaded.settings["ae_precision"] == "32"


def test_kl_autoencoder_encodes_the_posterior_mean(train_images):
    lines = []
    tok = build_image_tokenizer(image_cfg(ae_kl=1e-3, ae_steps=10), 32, train_images[:64], log=lines.append)
    assert tok.model.kl and tok.model.encoder.conv_out.out_channels == 16  # mean and log-variance
    assert float(re.search(r"kl ([\d.]+)", lines[-1]).group(1)) > 0
    # deterministic: the posterior mean, never a draw
    assert torch.equal(tok.encode(train_images[:3]), tok.encode(train_images[:3]))
    assert tok.encode(train_images[:3]).shape == (3, 16, 8)


def test_bad_settings_name_the_key():
    with pytest.raises(UserError, match=r"image_tokenizer.patch_size=6: the ae tokenizer's downsampling must be a power of two"):
        build_image_tokenizer(image_cfg(patch_size=6), 24, shapes("train", 4))
    with pytest.raises(UserError, match="image_tokenizer.ae_channels"):
        load_config(TokenizeConfig, None, ["image_tokenizer.ae_channels=0"], {})
    with pytest.raises(UserError, match="image_tokenizer.ae_kl"):
        load_config(TokenizeConfig, None, ["image_tokenizer.ae_kl=-1"], {})


def test_tokenize_trains_it_saves_it_and_tokenizer_from_reuses_it(tmp_path, monkeypatch):
    result, output = tokenize("--out", tmp_path / "d", *SMALL, *TINY_ARGS)
    assert result.exit_code == 0, output
    assert "ae: step 40/40" in output and "on 40 images" in output
    hashes = set()
    for split in ("train", "val", "test"):
        m = shards.read_manifest(tmp_path / "d" / split, verify=True)
        spec = m["image_tokenizer"]["spec"]
        assert m["tokens"]["shape"] == [16, 8] and spec["kind"] == "ae" and spec["ae_channels"] == 8
        assert spec["sha256"] == hashlib.sha256((tmp_path / "d" / split / IMAGE_TOKENIZER_FILE).read_bytes()).hexdigest()
        assert m["tokenizer_settings"]["image_tokenizer"]["ae_steps"] == 40
        hashes.add(m["image_tokenizer"]["hash"])
    assert len(hashes) == 1
    _, image_tok = shards.load_tokenizers(tmp_path / "d" / "test")
    s = shards.decode_sample(next(iter(__import__("webdataset").WebDataset(
        shards.shard_paths(tmp_path / "d" / "test"), shardshuffle=False))))
    assert torch.allclose(torch.from_numpy(s["tokens"]).float(),
                          image_tok.encode(make_sample("test", 0)["image"][None])[0], atol=1e-2)

    # --tokenizer-from: nothing trained, the same file and hashes
    monkeypatch.setattr(AETokenizer, "fit", classmethod(lambda *a, **k: pytest.fail("fitted again")))
    result, output = tokenize("--out", tmp_path / "e", "--tokenizer-from", tmp_path / "d" / "train",
                              "shapes.num_train=8", "shapes.num_val=0", "shapes.num_test=0", "image_tokenizer.ae_channels=8")
    assert result.exit_code == 0, output
    assert "ae: step" not in output
    e = shards.read_manifest(tmp_path / "e" / "train", verify=True)
    assert e["image_tokenizer"]["hash"] in hashes
    assert (tmp_path / "e" / "train" / IMAGE_TOKENIZER_FILE).read_bytes() == \
        (tmp_path / "d" / "train" / IMAGE_TOKENIZER_FILE).read_bytes()
    # a setting that contradicts it is refused, naming the key
    result, output = tokenize("--out", tmp_path / "f", "--tokenizer-from", tmp_path / "d" / "train",
                              "shapes.num_train=8", "image_tokenizer.ae_channels=16")
    assert result.exit_code == 2 and "image_tokenizer.ae_channels=16 disagrees" in " ".join(output.split())
