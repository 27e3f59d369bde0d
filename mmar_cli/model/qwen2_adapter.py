"""Hugging Face Qwen2 checkpoints <-> our backbone.

Our backbone keeps Qwen2's module names under `backbone.` instead of `model.`, so the state-dict
adapter is a rename plus the tied LM head (HF omits `lm_head.weight` from tied checkpoints). Only local
directories are read (config.json + *.safetensors); nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file

from mmar_cli.errors import UserError

Tensors = Dict[str, torch.Tensor]


def hf_to_ours(hf: Tensors) -> Tensors:
    """HF Qwen2ForCausalLM state dict -> Backbone state dict (the LM head filled in when tied)."""
    ours = {}
    for key, value in hf.items():
        if key.endswith("rotary_emb.inv_freq"):  # persisted by old transformers versions
            continue
        ours[key[len("model."):] if key.startswith("model.") else key] = value
    ours.setdefault("lm_head.weight", ours["embed_tokens.weight"])
    return ours


def ours_to_hf(ours: Tensors) -> Tensors:
    """Backbone state dict -> HF Qwen2ForCausalLM state dict."""
    return {key if key == "lm_head.weight" else f"model.{key}": value for key, value in ours.items()}


def config_from_hf(hf_config: dict) -> dict:
    """ModelConfig fields of a Qwen2 config.json."""
    rope = hf_config.get("rope_parameters") or {}
    return dict(width=hf_config["hidden_size"], depth=hf_config["num_hidden_layers"],
                heads=hf_config["num_attention_heads"],
                kv_heads=hf_config.get("num_key_value_heads", hf_config["num_attention_heads"]),
                mlp_hidden=hf_config["intermediate_size"], qkv_bias=True,
                tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
                rope_theta=float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))),
                norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)), vocab_size=hf_config["vocab_size"])


def read_qwen2(path: str | Path) -> tuple[dict, Tensors]:
    """(config.json as a dict, HF state dict) of a local Qwen2 directory."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise UserError(f"model.init_from_qwen2: {root} has no config.json (expected a local Hugging Face "
                        "Qwen2 directory with config.json and *.safetensors)")
    hf_config = json.loads((root / "config.json").read_text())
    if hf_config.get("model_type") != "qwen2":
        raise UserError(f"model.init_from_qwen2: {root / 'config.json'} has model_type "
                        f"'{hf_config.get('model_type')}', expected 'qwen2'")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise UserError(f"model.init_from_qwen2: no *.safetensors in {root}")
    state: Tensors = {}
    for f in files:
        state.update(load_file(str(f)))
    return hf_config, state


def load_qwen2_into(backbone: torch.nn.Module, path: str | Path) -> None:
    """Copy a local Qwen2 checkpoint into `backbone` (its shapes must match, except the vocabulary:
    when our tokenizer's vocabulary differs, the rows both have are copied and the rest keep their
    initialisation)."""
    hf_config, hf_state = read_qwen2(path)
    ours = hf_to_ours(hf_state)
    target = backbone.state_dict()
    expected = {k: v.shape for k, v in target.items()}
    for key in ("embed_tokens.weight", "lm_head.weight"):
        rows = min(ours[key].shape[0], expected[key][0])
        merged = target[key].clone()
        merged[:rows] = ours[key][:rows]
        ours[key] = merged
    for key, shape in expected.items():
        if key not in ours:
            raise UserError(f"model.init_from_qwen2: {path} lacks '{key}' (is it a Qwen2 checkpoint?)")
        if ours[key].shape != shape:
            raise UserError(f"model.init_from_qwen2: '{key}' is {tuple(ours[key].shape)} in {path} but "
                            f"{tuple(shape)} in the model; set model.preset/sizes to the checkpoint's "
                            f"config ({config_from_hf(hf_config)})")
    backbone.load_state_dict({k: ours[k] for k in expected}, strict=True)
