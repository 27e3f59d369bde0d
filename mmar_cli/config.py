"""Structured configs for every stage: OmegaConf dataclasses, YAML presets, `key=value` overrides.

Every field carries a help text (shown by `--help` and `mmar config show`) and, where it matters, the
values it allows. `load_config` merges schema defaults <- YAML preset <- dotlist overrides and then
validates, so an unknown key or a bad value stops the run with a message naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mmar_cli.errors import UserError


def opt(default: Any = dataclasses.MISSING, help: str = "", choices: Optional[list] = None,
        min: Optional[float] = None, max: Optional[float] = None, factory=None):
    """A documented config field. `choices`/`min`/`max` are checked by `validate`."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------
@dataclass
class ImageTokenizerConfig:
    kind: str = opt("pca", "image tokenizer: 'patch' (lossless pixel patches), 'pca' (patches projected "
                    "on principal components fitted on the training images, whitened), 'vae' (diffusers "
                    "AutoencoderKL from a local directory), 'ae' (a small convolutional autoencoder that "
                    "tokenize trains on the training images: no seams between tokens)",
                    choices=["patch", "pca", "vae", "ae"])
    patch_size: int = opt(8, "pixels per side of one patch token ('patch'/'pca'; 'ae': its downsampling, a "
                          "power of two), or latent positions per side grouped into one token ('vae')", min=1)
    pca_dim: int = opt(24, "'pca': values per token kept (principal components)", min=1)
    ae_channels: int = opt(16, "'ae': latent channels, the values per token", min=1)
    ae_width: int = opt(24, "'ae': channels of the full-size convolutions (x2 at each halving, at most x4)",
                        min=4)
    ae_depth: int = opt(1, "'ae': residual blocks per resolution in the encoder and in the decoder", min=0)
    ae_steps: int = opt(2500, "'ae': training steps of the whole autoencoder (AdamW, cosine learning rate)", min=1)
    ae_decoder_steps: int = opt(2500, "'ae': steps that then train the decoder alone, the encoder and so the tokens "
                                "fixed (a new cosine from a quarter of ae_lr): sharper decoded images", min=0)
    ae_precision: str = opt("bf16", "'ae': arithmetic of its training: '32', or 'bf16' (autocast, channels-last; "
                            "weights and AdamW in fp32): faster on CPUs with native bfloat16 (AVX-512 BF16, "
                            "AMX), slower on those without", choices=["32", "bf16"])
    ae_batch: int = opt(8, "'ae': images per training step (on a CPU, small batches and more steps learn "
                        "faster for the same time)", min=1)
    ae_lr: float = opt(2e-3, "'ae': peak learning rate", min=0.0)
    ae_mse: float = opt(16.0, "'ae': weight of the squared error beside the L1 error (pixels in [-1, 1]): "
                        "it punishes the few large errors (a shape's corners) that L1 leaves", min=0.0)
    ae_kl: float = opt(0.0, "'ae': weight of the KL term per latent value (0: a plain autoencoder, encoding "
                       "without a posterior); above 0 the decoder learns from posterior draws", min=0.0)
    ae_images: int = opt(20000, "'ae': training images it learns from (the first of the training split)",
                         min=1)
    ae_seed: int = opt(0, "'ae': seed of the initial weights, the batches and the posterior draws; the same "
                       "seed, images and torch thread count give the same weights")
    vae_path: Optional[str] = opt(None, "'vae': local directory of a diffusers AutoencoderKL "
                                  "(config.json + weights); never downloaded")
    vae_scale: Optional[float] = opt(None, "'vae': latent scale factor; None = measured on the data so "
                                     "latents have unit std (LDM KL-16 uses 0.2325)")
    flip: bool = opt(False, "training split: also store the tokens of the horizontally mirrored image; training "
                            "reads the mirrored or the original tokens at random, per sample and epoch, for every "
                            "task. A caption's 'left' or 'right' then names the wrong side half the time (tokenize "
                            "warns when captions have them)")
    shifts: int = opt(0, "training split: also store the tokens of this many copies of each image moved by up "
                         "to `shift_px` pixels each way (edges repeated); image -> text training reads the image or "
                         "one of its copies at random, per sample and epoch: an augmentation for a small dataset",
                  min=0)
    shift_px: int = opt(2, "largest move of a shifted copy, in pixels", min=0)
    shift_deg: float = opt(0.0, "largest turn of a shifted copy, in degrees either way", min=0.0)
    shift_scale: float = opt(0.0, "largest change of size of a shifted copy: scaled by 1 - this to 1 + this",
                             min=0.0)
    shift_warp: float = opt(0.0, "elastic distortion of a shifted copy: std in pixels of a smooth random "
                                 "displacement field (Gaussian-blurred noise, blur std 1/8 of the side; 0: off)",
                            min=0.0)


@dataclass
class TextTokenizerConfig:
    kind: str = opt("bpe", "'bpe': train a small BPE on the captions and keep it beside the shards; "
                    "'byte': UTF-8 bytes, no files; 'file': a tokenizer.json from `path` used as is",
                    choices=["bpe", "byte", "file"])
    path: Optional[str] = opt(None, "'file': a tokenizer.json or a directory holding one (e.g. Qwen2's)")
    vocab_size: int = opt(512, "'bpe': vocabulary size to train", min=64)


# --------------------------------------------------------------------------------------------------
# tokenize
# --------------------------------------------------------------------------------------------------
@dataclass
class ShapesConfig:
    image_size: int = opt(32, "side of the built-in dataset's images in pixels", choices=[32, 64])
    max_shapes: int = opt(1, "shapes per image (1 or 2)", min=1, max=2)
    num_train: int = opt(20000, "training images", min=0)
    num_val: int = opt(256, "validation images", min=0)
    num_test: int = opt(512, "test images (held out)", min=0)
    seed: int = opt(0, "seed of the procedural dataset; the same seed gives the same images")


@dataclass
class TokenizeConfig:
    input: str = opt("builtin", "'builtin' (procedural shapes), an image folder with sidecar .txt "
                     "captions, a .jsonl file, or a directory/brace pattern of img2dataset .tar shards")
    format: str = opt("auto", "input format; 'auto' guesses from `input`",
                      choices=["auto", "builtin", "folder", "jsonl", "wds"])
    out: str = opt("data/shapes", "output directory; the built-in dataset, or a user input with "
                   "val_fraction/test_fraction > 0, writes one sub-directory per split (train/, val/, test/)")
    image_size: int = opt(32, "images are resized (center crop + resize) to this side before tokenizing",
                          min=8)
    shard_size: int = opt(1000, "samples per shard", min=1)
    workers: int = opt(1, "tokenizer worker processes", min=1)
    strict: bool = opt(False, "stop at the first bad input instead of skipping and counting it")
    overwrite: bool = opt(False, "replace an existing output directory")
    val_fraction: float = opt(0.0, "share of a user input's samples put in the validation split "
                              "(out/val); with val_fraction or test_fraction > 0 the output is out/train, "
                              "out/val, out/test (a split of fraction 0 is not written). A sample's split "
                              "follows from its key and split_seed alone. The built-in dataset refuses it "
                              "(its splits are shapes.num_val / shapes.num_test)")
    test_fraction: float = opt(0.0, "share of a user input's samples put in the held-out test split "
                               "(out/test); see val_fraction")
    split_seed: int = opt(0, "seed of the split assignment: u = first 8 bytes (big-endian) of "
                          "sha256('{split_seed}:{key}') / 2^64; test if u < test_fraction, val if "
                          "u < test_fraction + val_fraction, else train. It also seeds the order a user "
                          "input's samples are written in (a hash of seed and key), split or not")
    tokenizer_from: Optional[str] = opt(None, "a token shard directory (e.g. data/photos/train) whose "
                                        "tokenizers are used as they are: nothing is fitted, image_size and "
                                        "the tokenizer settings come from it, and the manifest carries the "
                                        "same hashes")
    shapes: ShapesConfig = opt(factory=ShapesConfig, help="the built-in dataset")
    image_tokenizer: ImageTokenizerConfig = opt(factory=ImageTokenizerConfig, help="image tokenizer")
    text_tokenizer: TextTokenizerConfig = opt(factory=TextTokenizerConfig, help="text tokenizer")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
@dataclass
class DiffusionHeadConfig:
    width: Optional[int] = opt(None, "MLP width of the per-token diffusion head (None: from preset)")
    depth: Optional[int] = opt(None, "residual AdaLN blocks (None: from preset)")
    prediction: str = opt("v", "what the head predicts: 'v' (v-prediction, stable in bf16) or 'eps'",
                          choices=["v", "eps"])
    num_train_timesteps: int = opt(1000, "diffusion steps of the training schedule", min=2)
    schedule: str = opt("cosine", "noise schedule", choices=["cosine", "linear"])
    batch_mul: int = opt(1, "noise draws per token per training step (MAR's diffusion_batch_mul, 4 there)", min=1)
    mean_loss: float = opt(1.0, "weight of the auxiliary loss that regresses each masked token's value from "
                                "its condition (a direct signal to the backbone; 0: off, MAR's loss only)", min=0.0)


@dataclass
class ModelConfig:
    preset: str = opt("demo", "size preset ('demo': 2 blocks x 256, what `make demo` trains on a CPU); "
                      "explicit fields below override it",
                      choices=["demo", "tiny", "small", "base", "qwen2-0.5b", "qwen2-7b"])
    width: Optional[int] = opt(None, "hidden size (None: from preset)")
    depth: Optional[int] = opt(None, "transformer blocks (None: from preset)")
    heads: Optional[int] = opt(None, "attention heads (None: from preset)")
    kv_heads: Optional[int] = opt(None, "key/value heads for grouped-query attention (None: from preset)")
    mlp_hidden: Optional[int] = opt(None, "SwiGLU hidden size (None: from preset)")
    qkv_bias: Optional[bool] = opt(None, "bias on q/k/v projections as in Qwen2 (None: from preset)")
    tie_embeddings: Optional[bool] = opt(None, "share the text embedding with the LM head (None: preset)")
    rope_theta: Optional[float] = opt(None, "RoPE base (None: from preset; Qwen2 uses 1e6)", min=1.0)
    norm_eps: float = opt(1e-6, "RMSNorm epsilon", min=0.0)
    embed_init_std: float = opt(0.3, "init std of the text embedding and the image mask/position embeddings "
                                     "(GPT-2 uses 0.02; 0.3 makes them about as large as the projected values "
                                     "of known image tokens)", min=0.0)
    image_proj_kernel: int = opt(3, "size k of the k x k window of the token grid the image embedding reads "
                                    "(1: each token alone, as MAR; 3: its neighbours too)", choices=[1, 3])
    diffusion: DiffusionHeadConfig = opt(factory=DiffusionHeadConfig, help="diffusion head")
    mask_min: float = opt(0.0, "lowest mask ratio of masked image modelling (the MMAR paper pretrains with 0.7 "
                               "and finetunes with 0.0)", min=0.0, max=1.0)
    mask_std: float = opt(0.25, "std of the truncated normal (mean 1) the mask ratio is drawn from", min=0.0)
    known_noise: float = opt(0.2, "std of Gaussian noise added to the known image tokens of generation rows "
                                  "in training (sampling conditions on the model's own draws; 0: off)", min=0.0)
    caption_noise: float = opt(0.0, "std of Gaussian noise added to the image tokens of image -> text rows in "
                                    "training: an augmentation against memorising a small real dataset (0: off)",
                               min=0.0)
    max_prefix_len: int = opt(24, "text tokens before the image (prompt / question), left-padded", min=2)
    max_suffix_len: int = opt(24, "text tokens after the image (caption / answer), right-padded", min=2)
    grad_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    split_tasks: bool = opt(False, "training runs the rows of each task (text -> image, caption, ...) on their own "
                                   "columns: fewer FLOPs in more, smaller passes (False: all rows in one pass on "
                                   "the columns any of them reads)")
    init_from_qwen2: Optional[str] = opt(None, "local Hugging Face Qwen2 directory to import backbone "
                                         "weights from (config.json + *.safetensors)")
    # Filled from the token shards' manifest by the training stage; not set by hand.
    vocab_size: Optional[int] = opt(None, "text vocabulary size (from the shards' tokenizer)")
    token_dim: Optional[int] = opt(None, "values per image token (from the shards' tokenizer)")
    image_grid: Optional[List[int]] = opt(None, "image tokens per side [h, w] (from the shards' tokenizer)")
    token_bound: Optional[float] = opt(None, "bound of image token values: sampling clips its x0 estimates "
                                       "to [-bound, bound] (from the shards' tokenizer: 1 for 'patch')")


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
@dataclass
class TaskMixConfig:
    t2i: float = opt(0.5, "share of text->image samples in a batch", min=0.0)
    i2t: float = opt(0.45, "share of image->text samples (captions, or question->answer when present)",
                     min=0.0)
    image_only: float = opt(0.05, "share of image-only samples (unconditional generation)", min=0.0)
    qa_share: float = opt(0.5, "within image->text, share of question->answer when a sample has one",
                          min=0.0, max=1.0)
    p_uncond: float = opt(0.1, "probability of dropping the caption of a text->image sample (for CFG)",
                          min=0.0, max=1.0)
    w_img: float = opt(1.0, "weight of the diffusion loss", min=0.0)
    w_txt: float = opt(1.0, "weight of the text cross-entropy", min=0.0)


@dataclass
class OptimConfig:
    lr: float = opt(2e-3, "peak learning rate", min=0.0)
    weight_decay: float = opt(0.02, "AdamW weight decay (not applied to norms, biases, embeddings)", min=0.0)
    beta1: float = opt(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = opt(0.95, "AdamW beta2", min=0.0, max=1.0)
    warmup_steps: int = opt(100, "linear warmup steps", min=0)
    schedule: str = opt("cosine", "LR schedule after warmup", choices=["cosine", "constant"])
    min_lr_ratio: float = opt(0.1, "cosine floor as a fraction of lr", min=0.0, max=1.0)
    grad_clip: float = opt(1.0, "gradient norm clipping (0: off)", min=0.0)
    backbone_lr_mult: float = opt(1.0, "LR multiplier of the transformer backbone (finetune)", min=0.0)
    freeze_backbone: bool = opt(False, "train only the image/text heads and embedders")


@dataclass
class TrainerConfig:
    max_steps: int = opt(3000, "optimizer steps", min=1)
    batch_size: int = opt(64, "samples per device per step", min=1)
    precision: str = opt("bf16-mixed", "numeric precision", choices=["32", "bf16-mixed", "16-mixed"])
    accelerator: str = opt("auto", "Lightning accelerator", choices=["auto", "cpu", "gpu", "cuda"])
    strategy: str = opt("auto", "Lightning strategy", choices=["auto", "ddp", "fsdp"])
    devices: int = opt(1, "devices (processes) per node", min=1)
    num_nodes: int = opt(1, "nodes", min=1)
    num_workers: int = opt(1, "data loader workers per device", min=0)
    seed: int = opt(0, "global seed (model init, data order, masks, noise)")
    ema_decay: float = opt(0.995, "EMA decay of the weights (0: no EMA)", min=0.0, max=1.0)
    compile: bool = opt(False, "run the transformer's and the diffusion head's blocks through torch.compile in "
                        "training (needs a C++ compiler on a CPU; the first steps wait ~1 min for it)")
    log_every: int = opt(50, "steps between log lines", min=1)
    ckpt_every: int = opt(500, "steps between checkpoints", min=1)
    sample_every: int = opt(0, "steps between preview grids/captions written beside the checkpoints "
                            "(0: only at the end)", min=0)
    keep_last: int = opt(2, "step checkpoints kept (final/ is always kept)", min=1)
    log_keys: bool = opt(False, "debug: append the sample keys of every batch to {out}/keys-rank{R}.txt")


@dataclass
class TrainConfig:
    """`mmar pretrain`: every mask ratio and every task from the first step."""
    data: str = opt("data/shapes/train", "token shard directory (written by `mmar tokenize`)")
    val_data: Optional[str] = opt("data/shapes/val", "validation shard directory (None: no validation)")
    out: str = opt("runs/pretrain", "run directory: step-XXXXXXXX/ and final/ are written here")
    resume: Optional[str] = opt(None, "'auto' (newest complete step in `out`) or a step directory")
    init: Optional[str] = opt(None, "checkpoint directory whose weights start this run (finetune)")
    model: ModelConfig = opt(factory=ModelConfig, help="model")
    tasks: TaskMixConfig = opt(factory=TaskMixConfig, help="task mixture and loss weights")
    optim: OptimConfig = opt(factory=OptimConfig, help="optimizer and LR schedule")
    trainer: TrainerConfig = opt(factory=TrainerConfig, help="Lightning trainer")


@dataclass
class FinetuneConfig(TrainConfig):
    """`mmar finetune`: from a pretrained checkpoint, with more text -> image and a lower learning rate (the
    images are drawn best when understanding is learnt early and generation last). The architecture comes
    from `init`."""
    out: str = opt("runs/finetune", "run directory: step-XXXXXXXX/ and final/ are written here")
    init: Optional[str] = opt("runs/pretrain/final", "checkpoint directory whose weights and architecture start "
                              "this run; of `model`, only the training keys (mask_min, mask_std, known_noise, "
                              "caption_noise, grad_checkpointing) are read from this config")
    tasks: TaskMixConfig = opt(factory=lambda: TaskMixConfig(t2i=0.6, i2t=0.4, image_only=0.0),
                               help="task mixture and loss weights")
    optim: OptimConfig = opt(factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50, min_lr_ratio=0.05),
                             help="optimizer and LR schedule")
    trainer: TrainerConfig = opt(factory=lambda: TrainerConfig(max_steps=1120, ckpt_every=400),
                                 help="Lightning trainer")


# --------------------------------------------------------------------------------------------------
# Sampling and evaluation
# --------------------------------------------------------------------------------------------------
@dataclass
class GenerationConfig:
    cfg: float = opt(2.0, "classifier-free guidance scale at its strongest iteration (1: off)", min=0.0)
    cfg_schedule: str = opt("falling", "how the CFG scale moves over the iterations: 'falling' from cfg at the "
                                       "first to 1 at the last, 'linear' from 1 up to cfg at the last (MAR's), "
                                       "'constant'", choices=["falling", "linear", "constant"])
    temperature: float = opt(0.8, "diffusion sampling temperature (scales the noise of each sampling step) at the "
                                  "first iteration", min=0.0)
    temperature_end: Optional[float] = opt(0.2, "temperature at the last iteration, reached linearly (None: "
                                                "`temperature` throughout, as MAR)", min=0.0)
    neighbour_cooling: float = opt(1.0, "each token's temperature is its iteration's times (1 - neighbour_cooling x "
                                        "the share of its grid neighbours already drawn), at least 0: a token "
                                        "drawn between known ones keeps to what they show (0: off, one "
                                        "temperature per iteration)", min=0.0)
    noise_share: float = opt(0.0, "share of each diffusion draw's noise that all tokens of one image have in "
                                  "common (0: every token its own noise, as MAR; 1: one noise path per image): "
                                  "tokens whose conditions agree, such as a flat background's, then come out alike",
                             min=0.0, max=1.0)
    iterations: int = opt(8, "autoregressive iterations (cosine schedule; at most one per image token)", min=1)
    candidates: int = opt(1, "images drawn per prompt, keeping the one the model itself reads back best: the "
                             "likeliest to be captioned with the prompt, read from its tokens and from its "
                             "picture encoded again, less `redraw_weight` per grey level its picture changes "
                             "when the image tokenizer redraws it (costs `candidates` times the sampling)",
                          min=1)
    redraw: bool = opt(True, "pass each drawn picture once through the image tokenizer (encode, then decode) and "
                             "give what it redraws: specks, halos and off-colour blocks that the decoder made of "
                             "drawn tokens and that the tokenizer cannot represent are redrawn as it would draw "
                             "them (pca and patch tokenizers give back a picture they decoded as it was, to rounding)")
    redraw_weight: float = opt(0.05, "best of `candidates`: nats of caption log-likelihood a candidate loses per "
                                     "grey level (0-255) of the mean absolute change of its picture when the image "
                                     "tokenizer redraws it (0: the likelihood alone)", min=0.0)
    diffusion_steps: int = opt(10, "diffusion head sampling steps", min=1)
    sampler: str = opt("ddpm", "diffusion sampler", choices=["ddpm", "ddim"])
    precision: str = opt("bf16", "arithmetic of sampling: 'bf16' (autocast: matmuls in bfloat16, what training "
                                 "runs in) or 'fp32'", choices=["bf16", "fp32"])
    max_new_tokens: int = opt(24, "text tokens to generate at most", min=1)
    top_k: int = opt(0, "top-k text sampling (0: off; with top_p 1 and temperature 0: greedy)", min=0)
    top_p: float = opt(1.0, "nucleus text sampling", min=0.0, max=1.0)
    text_temperature: float = opt(0.0, "text sampling temperature (0: greedy)", min=0.0)


@dataclass
class SampleConfig:
    ckpt: Optional[str] = opt(None, "checkpoint directory (None: newest final/ under runs/)")
    out: str = opt("runs/samples", "output directory")
    num_images: int = opt(4, "images per prompt", min=1)
    batch_size: int = opt(16, "prompts (rows) per forward pass", min=1)
    seed: int = opt(0, "sampling seed")
    ema: bool = opt(True, "use the EMA weights when the checkpoint has them")
    prompts: List[str] = opt(factory=list, help="text prompts (text -> image), or the questions about `image`")
    prompts_file: Optional[str] = opt(None, "a text file of prompts, one per line (added to `prompts`)")
    image: Optional[str] = opt(None, "an image to caption (no prompt) or to ask the prompts about; another "
                               "size than the model's is center-cropped and resized, with a warning")
    out_shards: Optional[str] = opt(None, "write prompts x num_images as WebDataset shards (png + txt + "
                                    "json) in this directory instead of single PNGs")
    gen: GenerationConfig = opt(factory=GenerationConfig, help="generation settings")


@dataclass
class EvaluateConfig:
    ckpt: Optional[str] = opt(None, "checkpoint directory (None: newest final/ under runs/)")
    data: str = opt("data/shapes/test", "held-out token shard directory")
    out: str = opt("runs/eval", "where metrics.json, report.md and pictures go")
    num_samples: int = opt(200, "held-out samples for each metric", min=1)
    batch_size: int = opt(32, "rows per forward pass", min=1)
    seed: int = opt(0, "sampling seed")
    ema: bool = opt(True, "use the EMA weights when the checkpoint has them")
    fid: bool = opt(True, "compute FID")
    fid_weights: Optional[str] = opt(None, "clean-fid Inception weights file; None: clean-fid's own "
                                     "location, else an in-project feature extractor (not comparable)")
    thresholds: Optional[str] = opt(None, "YAML of minimum metrics; any metric below fails the run")
    label_key: str = opt("label", "field of a sample's JSON that holds its class: samples with one are judged "
                                  "by a classifier trained on the training split's images")
    judge_data: Optional[str] = opt(None, "training shards the classifier judge learns from (None: the 'train' "
                                          "directory beside `data`); it is cached there, keyed by a hash")
    judge_seed: int = opt(0, "seed of the classifier judge's training")
    gen: GenerationConfig = opt(factory=GenerationConfig, help="generation settings")


STAGES = {
    "tokenize": TokenizeConfig,
    "pretrain": TrainConfig,
    "finetune": FinetuneConfig,
    "sample": SampleConfig,
    "evaluate": EvaluateConfig,
}


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------
def _friendly(err: OmegaConfBaseException, cfg: DictConfig) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError) and key:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig):
            allowed = ", ".join(str(k) for k in node.keys())
            where = f"under '{parent}'" if parent else "at the top level"
            return f"unknown config key '{key}'; keys allowed {where}: {allowed}"
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


def load_preset(path: str | Path, _seen: tuple = ()) -> DictConfig:
    """The keys a YAML preset sets. A preset may start from another: `base: demo.yaml` (a path relative to
    the preset's directory) is loaded first and the preset's own keys override it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    if p.resolve() in _seen:
        raise UserError(f"{p}: `base` leads back to itself")
    preset = OmegaConf.load(p)
    if not isinstance(preset, DictConfig):
        raise UserError(f"{p}: a preset is a mapping of config keys")
    base = preset.pop("base", None)
    if base is None:
        return preset
    return OmegaConf.merge(load_preset(p.parent / str(base), (*_seen, p.resolve())), preset)


def load_config(schema: type, path: Optional[str | Path] = None, overrides: Optional[List[str]] = None,
                options: Optional[Dict[str, Any]] = None) -> DictConfig:
    """schema defaults <- YAML preset at `path` (and its `base`) <- `overrides` (key=value) <- `options`.

    `options`: the values of a command's typed options by dotted config key (`{"gen.cfg": 3.0}`), merged
    as they are (None: not given); their types were checked by the command line, and their values are
    checked here like any other."""
    cfg = OmegaConf.structured(schema)
    try:
        if path is not None:
            cfg = OmegaConf.merge(cfg, load_preset(path))
        for item in overrides or []:
            if "=" not in item:
                raise UserError(f"override '{item}' is not key=value (e.g. trainer.max_steps=100)")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        given = {key: value for key, value in (options or {}).items() if value is not None}
        if given:
            cfg = OmegaConf.merge(cfg, _nested(given))
    except OmegaConfBaseException as e:
        raise UserError(_friendly(e, OmegaConf.structured(schema))) from None
    validate(cfg, schema)
    return cfg


def _nested(dotted: Dict[str, Any]) -> dict:
    """{"gen.cfg": 3.0, "seed": 1} -> {"gen": {"cfg": 3.0}, "seed": 1}."""
    out: dict = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def validate(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """Check `choices`, `min` and `max` of every field, recursively."""
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        value = cfg[f.name]
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None) or isinstance(value, DictConfig):
            sub = _field_class(schema, f.name)
            if sub is not None:
                validate(value, sub, key + ".")
            continue
        meta = f.metadata
        if value is None:
            continue
        if meta.get("choices") is not None and value not in meta["choices"]:
            allowed = ", ".join(repr(c) for c in meta["choices"])
            raise UserError(f"config key '{key}': {value!r} is not allowed; choose one of {allowed}")
        if meta.get("min") is not None and value < meta["min"]:
            raise UserError(f"config key '{key}': {value!r} is below the minimum {meta['min']}")
        if meta.get("max") is not None and value > meta["max"]:
            raise UserError(f"config key '{key}': {value!r} is above the maximum {meta['max']}")


def _field_class(schema: type, name: str) -> Optional[type]:
    for f in dataclasses.fields(schema):
        if f.name == name and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            made = f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(made):
                return type(made)
    return None


def describe_fields(schema: type, prefix: str = "", defaults: Any = None) -> List[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field: used by --help and `mmar config show`. The
    defaults are those of an instance, so a stage's own sub-config defaults (FinetuneConfig.tasks) show."""
    defaults = schema() if defaults is None else defaults
    rows = []
    for f in dataclasses.fields(schema):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_fields(type(value), f"{prefix}{f.name}.", value)
            continue
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" [{' | '.join(str(c) for c in f.metadata['choices'])}]"
        rows.append((f"{prefix}{f.name}", repr(value), help_text))
    return rows


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
