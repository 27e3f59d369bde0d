"""Image tokenizers (patch, pca, vae) and text tokenizers (bpe, byte, file)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mmar_cli.config import ImageTokenizerConfig, TextTokenizerConfig
from mmar_cli.data.shapes import make_sample
from mmar_cli.errors import UserError
from mmar_cli.tokenizers.image import build_image_tokenizer, load_image_tokenizer
from mmar_cli.tokenizers.text import (SPECIAL_NAMES, build_text_tokenizer, load_text_tokenizer,
                                      train_bpe)


def image_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(ImageTokenizerConfig), kw)


def shapes(split, n, start=0):
    return np.stack([make_sample(split, i)["image"] for i in range(start, start + n)])


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


# --------------------------------------------------------------------------------------------------
# Image
# --------------------------------------------------------------------------------------------------
def test_patch_round_trip_is_exact_even_through_float16():
    tok = build_image_tokenizer(image_cfg(kind="patch", patch_size=8), 32)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    tokens = tok.encode(images)
    assert tokens.shape == (3, 16, 192) and tok.grid == (4, 4) and tok.token_dim == 192
    assert tokens.dtype == torch.float32 and tokens.min() >= -1 and tokens.max() <= 1
    assert np.array_equal(tok.decode(tokens), images)
    assert np.array_equal(tok.decode(tokens.half()), images)
    # token k holds the pixels of patch (row k // 4, col k % 4), row-major inside the patch
    assert torch.allclose(tokens[1, 5].reshape(8, 8, 3), torch.tensor(images[1, 8:16, 8:16]) / 127.5 - 1)
    assert np.array_equal(tok.decode(tok.encode(torch.from_numpy(images))), images)


def test_patch_size_must_divide_the_image():
    with pytest.raises(UserError, match="patch_size=5"):
        build_image_tokenizer(image_cfg(kind="patch", patch_size=5), 32)


def test_pca_reconstructs_builtin_images_and_is_whitened(tmp_path):
    tok = build_image_tokenizer(image_cfg(kind="pca", patch_size=8, pca_dim=32), 32, shapes("train", 400))
    assert tok.grid == (4, 4) and tok.token_dim == 32
    fit_tokens = tok.encode(shapes("train", 400))
    assert fit_tokens.shape == (400, 16, 32)
    assert torch.allclose(fit_tokens.reshape(-1, 32).std(0), torch.ones(32), atol=0.05)
    held_out = shapes("val", 100)
    recon = tok.decode(tok.encode(held_out))
    assert recon.dtype == np.uint8 and recon.shape == held_out.shape
    # measured on 200 val images (fit on 512): 27.2 dB with 32 of 192 components, 30.7 dB with 64;
    # 4x4 patches with 32 of 48 components: 36.9 dB
    assert psnr(recon, held_out) > 26.0
    # fewer components lose more
    tok8 = build_image_tokenizer(image_cfg(kind="pca", patch_size=8, pca_dim=8), 32, shapes("train", 400))
    assert psnr(tok8.decode(tok8.encode(held_out)), held_out) < psnr(recon, held_out)

    tok.save(tmp_path)
    again = load_image_tokenizer(tmp_path, tok.spec())
    assert torch.equal(again.encode(held_out), tok.encode(held_out))
    state = (tmp_path / "image_tokenizer.safetensors").read_bytes()
    (tmp_path / "image_tokenizer.safetensors").write_bytes(state[:-4] + b"\0\0\0\0")
    with pytest.raises(UserError, match="does not match"):
        load_image_tokenizer(tmp_path, tok.spec())


def test_pca_dim_cannot_exceed_patch_values():
    with pytest.raises(UserError, match="pca_dim=300"):
        build_image_tokenizer(image_cfg(kind="pca", patch_size=8, pca_dim=300), 32, shapes("train", 4))


def save_tiny_vae(path) -> str:
    """A random-weight AutoencoderKL with one 2x downsampling and 4 latent channels, saved as diffusers does."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1)
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("tiny-vae"))


@pytest.mark.slow  # importing diffusers takes ~8 s
def test_vae_encodes_and_decodes_with_the_right_shapes(tiny_vae, tmp_path):
    images = shapes("train", 8)
    tok = build_image_tokenizer(image_cfg(kind="vae", vae_path=tiny_vae, patch_size=2), 32, images)
    # 32 px / 2 (one downsampling) = 16 latent positions per side, grouped 2x2 -> 8x8 tokens of 2*2*4
    assert tok.grid == (8, 8) and tok.token_dim == 16
    tokens = tok.encode(images)
    assert tokens.shape == (8, 64, 16) and tokens.dtype == torch.float32
    assert abs(float(tokens.std()) - 1.0) < 0.02  # scale measured on the data -> unit std
    out = tok.decode(tokens)
    assert out.shape == (8, 32, 32, 3) and out.dtype == np.uint8

    spec = tok.spec()
    assert spec["vae_scale"] == tok.scale and spec["vae_path"] == tiny_vae and len(spec["sha256"]) == 64
    again = load_image_tokenizer(tmp_path, spec)
    assert torch.allclose(again.encode(images), tokens, atol=1e-5)

    fixed = build_image_tokenizer(image_cfg(kind="vae", vae_path=tiny_vae, patch_size=1, vae_scale=0.5), 32)
    assert fixed.grid == (16, 16) and fixed.token_dim == 4 and fixed.scale == 0.5


def test_vae_errors_name_the_key(tmp_path):
    with pytest.raises(UserError, match="vae_path"):
        build_image_tokenizer(image_cfg(kind="vae"), 32)
    with pytest.raises(UserError, match="not a local AutoencoderKL directory"):
        build_image_tokenizer(image_cfg(kind="vae", vae_path=str(tmp_path)), 32)


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------
CAPTIONS = [make_sample("train", i)["caption"] for i in range(300)]
QUESTIONS = [make_sample("train", i)["question"] for i in range(300)]


def test_bpe_words_are_single_tokens_and_decode_is_exact(tmp_path):
    tok = train_bpe(CAPTIONS + QUESTIONS, vocab_size=256)
    for text in CAPTIONS[:20] + QUESTIONS[:20] + ["A Zebra, unseen!"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("a large red circle")) == 4
    s = tok.specials
    assert [s.pad, s.bos, s.eos, s.boi, s.eoi, s.gen, s.cap, s.ans] == list(range(tok.base_vocab_size,
                                                                                  tok.vocab_size))
    assert tok.vocab_size == tok.base_vocab_size + 8 <= 256 + 8
    assert tok.decode([s.bos] + tok.encode("red") + [s.eos, s.pad]) == "red"

    spec = tok.spec()
    assert spec["kind"] == "bpe" and spec["specials"] == list(SPECIAL_NAMES) and len(spec["sha256"]) == 64
    tok.save(tmp_path)
    again = load_text_tokenizer(tmp_path, spec)
    assert again.spec() == spec and again.encode(CAPTIONS[0]) == tok.encode(CAPTIONS[0])


def test_byte_tokenizer_needs_no_files():
    cfg = OmegaConf.structured(TextTokenizerConfig(kind="byte"))
    tok = build_text_tokenizer(cfg, [])
    assert tok.encode("né") == [110, 195, 169] and tok.decode(tok.encode("né")) == "né"
    assert tok.vocab_size == 264 and tok.specials.pad == 256 and tok.specials.ans == 263
    assert tok.spec()["file"] is None and tok.spec()["sha256"] is None


def test_file_tokenizer_is_used_as_is_and_checked_on_load(tmp_path):
    base = train_bpe(CAPTIONS, vocab_size=200)
    (tmp_path / "hf").mkdir()
    base.hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    tok = build_text_tokenizer(OmegaConf.structured(TextTokenizerConfig(kind="file", path=str(tmp_path / "hf"))), [])
    assert tok.kind == "file" and tok.base_vocab_size == base.base_vocab_size
    assert tok.encode(CAPTIONS[1]) == base.encode(CAPTIONS[1])
    assert tok.specials.bos == base.base_vocab_size + 1

    (tmp_path / "shards").mkdir()
    tok.save(tmp_path / "shards")
    assert load_text_tokenizer(tmp_path / "shards", tok.spec()).kind == "file"
    other = train_bpe(QUESTIONS, vocab_size=200)
    other.save(tmp_path / "shards")
    with pytest.raises(UserError, match="does not match"):
        load_text_tokenizer(tmp_path / "shards", tok.spec())
    with pytest.raises(UserError, match="no tokenizer.json"):
        build_text_tokenizer(OmegaConf.structured(TextTokenizerConfig(kind="file", path=str(tmp_path))), [])
