"""Stand-ins, built here, for what a user of the paper's configuration downloads: nothing is fetched.

    kl16_vae(dir)          a diffusers AutoencoderKL of LDM KL-16's architecture (as MAR uses it: 128 base
                           channels, multipliers 1 1 2 2 4, 2 residual blocks per level, attention at 16 px in
                           the encoder and the decoder, 16 latent channels; 256 px -> 16 x 16 x 16), random
                           weights, 69.6M parameters (28.3M of them encode)
    qwen2_tokenizer(dir)   a tokenizer.json in Qwen2's layout: byte-level BPE after Qwen2's split regex,
                           151,643 regular tokens, then <|endoftext|> <|im_start|> <|im_end|> (151643-151645).
                           The merges are synthetic (every byte pair, then pair + byte) but the sizes, ids,
                           pre-tokenizer and decoder are Qwen2's
    qwen2_checkpoint(dir)  a Hugging Face Qwen2ForCausalLM directory (config.json + safetensors, bf16) of a
                           preset's shape with random weights: what `model.init_from_qwen2` reads
    photo_shards(dir, n)   n built-in shapes images drawn at 64 px and enlarged to 256 px, written as
                           img2dataset writes photos: <key>.jpg + .txt + .json in one .tar

Used by `benchmarks/bench_scale.py` (`make bench-scale`) and by the tests of the Qwen2 tokenizer.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Iterator, Sequence

import torch

KL16_CHANNELS = (128, 128, 256, 256, 512)  # five levels: four halvings, 256 px -> 16 px
QWEN2_REGULAR_TOKENS = 151643
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer: contractions, letters, single digits, punctuation runs, newlines, spaces
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def kl16_vae(directory: str | Path, channels: Sequence[int] = KL16_CHANNELS, groups: int = 32,
             seed: int = 0) -> Path:
    """Saved with save_pretrained, so `AutoencoderKL.from_pretrained(directory)` reads it as it reads a
    converted KL-16. `channels`/`groups`: narrower levels for a fast test (the downsampling stays 16)."""
    from diffusers import AutoencoderKL

    levels = len(channels)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=tuple(channels),
                        down_block_types=("DownEncoderBlock2D",) * (levels - 1) + ("AttnDownEncoderBlock2D",),
                        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (levels - 1),
                        layers_per_block=2, latent_channels=16, norm_num_groups=groups, sample_size=256,
                        scaling_factor=0.2325)
    vae.save_pretrained(directory)
    return Path(directory)


def qwen2_tokenizer(directory: str | Path) -> Path:
    """`directory/tokenizer.json`; returns the directory (what text_tokenizer.path takes)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    pairs = [(a, b) for a in alphabet for b in alphabet]
    triples = ((a + b, c) for a, b in pairs for c in alphabet)
    merges = [m for m, _ in zip(itertools.chain(pairs, triples), range(QWEN2_REGULAR_TOKENS - len(alphabet)))]
    vocab.update({a + b: len(alphabet) + i for i, (a, b) in enumerate(merges)})
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN2_SPECIALS])
    Path(directory).mkdir(parents=True, exist_ok=True)
    hf.save(str(Path(directory, "tokenizer.json")))
    return Path(directory)


def qwen2_checkpoint(directory: str | Path, preset: str = "qwen2-0.5b", seed: int = 0, **sizes) -> Path:
    """A random Qwen2ForCausalLM of `preset`'s shape (mmar_cli.model.presets), saved in bf16 as Qwen2 is;
    `sizes` (width, depth, heads, kv_heads, mlp_hidden) replace the preset's."""
    import transformers

    from mmar_cli.model.presets import PRESETS

    p = {**PRESETS[preset], **sizes}
    config = transformers.Qwen2Config(hidden_size=p["width"], num_hidden_layers=p["depth"],
                                      num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                                      intermediate_size=p["mlp_hidden"], vocab_size=p["vocab_size"],
                                      tie_word_embeddings=p["tie_embeddings"], rms_norm_eps=1e-6,
                                      rope_parameters={"rope_type": "default", "rope_theta": p["rope_theta"]})
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def photos(n: int, size: int = 256) -> Iterator[tuple]:
    """(key, caption, RGB PIL image) of n built-in training images drawn at 64 px and enlarged to `size`."""
    from PIL import Image

    from mmar_cli.data import shapes

    for i, sample in enumerate(shapes.iterate("train", n, image_size=64)):
        yield f"{i:09d}", sample["caption"], Image.fromarray(sample["image"]).resize((size, size), Image.BICUBIC)


def photo_shards(directory: str | Path, n: int, size: int = 256) -> Path:
    """`directory/00000.tar` with n samples in img2dataset's layout (jpg + txt + json)."""
    import webdataset as wds

    Path(directory).mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(Path(directory, "00000.tar"))) as sink:
        for key, caption, picture in photos(n, size):
            buf = io.BytesIO()
            picture.save(buf, format="JPEG", quality=95)
            sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": caption,
                        "json": json.dumps({"key": key, "caption": caption, "width": size, "height": size})})
    return Path(directory)
