"""The model of a training run: its config sized from the data (`model_config`) and the MMAR built from it
(`build_model`). Sampling and evaluation rebuild it from a checkpoint's own config (`inference.load_checkpoint`).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from mmar_cli.errors import UserError
from mmar_cli.model.mmar import MMAR
from mmar_cli.model.presets import resolve

# Model keys a finetune may change; every other model key (the architecture) comes from `init`.
TRAINING_MODEL_KEYS = ("mask_min", "mask_std", "known_noise", "caption_noise", "grad_checkpointing", "split_tasks")


def model_config(cfg, tok, image_tok, init_cfg=None):
    """The model's config: sizes from the shards' tokenizers; architecture from `init_cfg` if given."""
    model = cfg.model
    if init_cfg is not None:
        model = OmegaConf.merge(init_cfg.model, {k: cfg.model[k] for k in TRAINING_MODEL_KEYS})
        model.init_from_qwen2 = None
    data_sizes = {"vocab_size": tok.vocab_size, "token_dim": image_tok.token_dim,
                  "image_grid": list(image_tok.grid), "token_bound": image_tok.value_bound}
    for key, value in data_sizes.items():
        if model[key] is not None and (list(model[key]) if key == "image_grid" else model[key]) != value:
            raise UserError(f"config key 'model.{key}': {model[key]} but the shards' tokenizer gives {value} "
                            "(leave it unset: it is read from the shards)")
        model[key] = value
    return resolve(model)


def build_model(cfg, specials, init=None) -> MMAR:
    """MMAR from the run's config (its model resolved by `model_config`), speaking the text tokenizer's
    `specials`, with Qwen2 backbone weights or the weights of `init` (an engine.checkpoint.Checkpoint)."""
    model = MMAR(cfg.model, specials)
    model.w_img, model.w_txt = cfg.tasks.w_img, cfg.tasks.w_txt
    if init is not None:
        model.load_state_dict(init.weights())
    elif cfg.model.init_from_qwen2:
        from mmar_cli.model.qwen2_adapter import load_qwen2_into

        load_qwen2_into(model.backbone, cfg.model.init_from_qwen2)
    return model
