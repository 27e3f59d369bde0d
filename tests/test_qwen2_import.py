"""Importing a Hugging Face Qwen2 checkpoint into our backbone gives the same logits."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmar_cli.config import ModelConfig  # noqa: E402
from mmar_cli.errors import UserError  # noqa: E402
from mmar_cli.model.attention_mask import build_attention_mask  # noqa: E402
from mmar_cli.model.backbone import Backbone  # noqa: E402
from mmar_cli.model.presets import resolve  # noqa: E402
from mmar_cli.model.qwen2_adapter import config_from_hf, hf_to_ours, load_qwen2_into, ours_to_hf  # noqa: E402


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def hf_dir(request, tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=97,
                                      rms_norm_eps=1e-6, tie_word_embeddings=request.param,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises biases to zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path, model


def _ours_from(path):
    fields = config_from_hf(json.loads((path / "config.json").read_text()))
    cfg = resolve(ModelConfig(preset="tiny", **fields))
    backbone = Backbone(cfg).eval()
    load_qwen2_into(backbone, path)
    return cfg, backbone


def test_imported_backbone_matches_transformers_logits(hf_dir):
    path, hf = hf_dir
    cfg, ours = _ours_from(path)
    assert cfg.rope_theta == 1e6 and cfg.qkv_bias
    ids = torch.randint(0, 97, (2, 11))
    L = ids.shape[1]
    causal = build_attention_mask(torch.full((L,), -1), torch.ones(2, L, dtype=torch.bool))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.logits(ours(ours.embed_tokens(ids), torch.arange(L), causal))
    assert (got - expected).abs().max().item() < 1e-4


def test_state_dict_round_trip(hf_dir):
    path, hf = hf_dir
    _, ours = _ours_from(path)
    back = ours_to_hf(ours.state_dict())
    original = hf.state_dict()
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    assert set(hf_to_ours(back)) == set(ours.state_dict())


def test_shape_mismatch_names_the_key(hf_dir):
    path, _ = hf_dir
    cfg = resolve(ModelConfig(preset="tiny", width=64, depth=2, heads=4, kv_heads=2, mlp_hidden=96,
                              qkv_bias=True, vocab_size=97))
    with pytest.raises(UserError, match=r"mlp\.gate_proj\.weight.*set model\.preset"):
        load_qwen2_into(Backbone(cfg), path)


def test_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_qwen2_into(torch.nn.Module(), tmp_path)
