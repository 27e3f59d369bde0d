"""Backbone (KV cache, gradient checkpointing) and presets (resolve, analytic parameter counts)."""

import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console

from mmar_cli.config import DiffusionHeadConfig, ModelConfig
from mmar_cli.errors import UserError
from mmar_cli.model.attention_mask import build_attention_mask
from mmar_cli.model.backbone import Backbone
from mmar_cli.model.mmar import MMAR
from mmar_cli.model.presets import PRESETS, count_params, preset_param_table, resolve


def small_cfg(**kw):
    base = dict(preset="tiny", width=64, depth=2, heads=4, kv_heads=2, mlp_hidden=96, vocab_size=50,
                token_dim=6, image_grid=[2, 3])
    return resolve(ModelConfig(**{**base, **kw}))


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------
def test_resolve_fills_every_size_from_the_preset_and_keeps_overrides():
    cfg = resolve(ModelConfig(preset="qwen2-7b", depth=3))
    assert (cfg.width, cfg.depth, cfg.heads, cfg.kv_heads, cfg.mlp_hidden) == (3584, 3, 28, 4, 18944)
    assert cfg.qkv_bias is True and cfg.tie_embeddings is False
    assert cfg.rope_theta == 1e6 and cfg.vocab_size == 152064
    assert (cfg.diffusion.width, cfg.diffusion.depth) == (1536, 12)
    default = resolve(ModelConfig())
    assert (default.preset, default.width, default.depth, default.tie_embeddings) == ("demo", 256, 2, False)
    assert default.rope_theta == 1e4 and default.vocab_size is None  # vocab comes from the data


def test_a_checkpoint_config_with_retired_keys_resolves_only_at_the_value_built_today():
    old = OmegaConf.create({"preset": "tiny", "image_embedder_depth": 0, "image_proj_hidden": 0})
    assert "image_proj_hidden" not in resolve(old) and resolve(old).width == 192
    with pytest.raises(UserError, match="model.image_embedder_depth=2: a model this version of mmar no longer"):
        resolve(OmegaConf.create({"preset": "tiny", "image_embedder_depth": 2}))


def test_resolve_rejects_heads_that_do_not_divide():
    with pytest.raises(UserError, match="model.kv_heads"):
        resolve(ModelConfig(preset="tiny", kv_heads=3))
    with pytest.raises(UserError, match="model.heads"):
        resolve(ModelConfig(preset="tiny", heads=5))


def test_qwen2_0_5b_backbone_count_is_494m():
    # Qwen2-0.5B (tied embeddings, vocab 151936) has 494,032,768 parameters
    assert count_params(resolve(ModelConfig(preset="qwen2-0.5b", token_dim=16, image_grid=[16, 16])))[
        "backbone"] == 494_032_768


def test_qwen2_7b_backbone_count_is_7_6b():
    # Qwen2-7B (untied, vocab 152064) has 7,615,616,512 parameters
    assert count_params(resolve(ModelConfig(preset="qwen2-7b", token_dim=16, image_grid=[16, 16])))[
        "backbone"] == 7_615_616_512


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, qkv_bias=True), dict(image_proj_kernel=1),
                                dict(diffusion=DiffusionHeadConfig(mean_loss=0.0))])
def test_count_params_matches_the_real_modules(kw):
    cfg = small_cfg(**kw)
    model = MMAR(cfg)
    n = count_params(cfg)
    assert n["backbone"] == sum(p.numel() for p in model.backbone.parameters())
    assert n["diffusion_head"] == sum(p.numel() for p in model.head.parameters())
    assert n["total"] == sum(p.numel() for p in model.parameters())


def test_preset_sizes_are_in_their_advertised_ranges():
    totals = {name: count_params(resolve(ModelConfig(preset=name, vocab_size=520, token_dim=192,
                                                     image_grid=[4, 4])))["total"] for name in PRESETS}
    assert 1e6 <= totals["tiny"] <= 5e6
    assert 20e6 <= totals["small"] <= 40e6
    assert totals["base"] >= 100e6


def test_preset_param_table_lists_every_preset():
    console = Console(width=200, record=True)
    console.print(preset_param_table(ModelConfig(preset="small", depth=2)))
    text = console.export_text()
    for name in PRESETS:
        assert name in text
    assert "494.0M" in text  # qwen2-0.5b backbone with its own vocabulary
    assert "small *" in text


# --------------------------------------------------------------------------------------------------
# backbone
# --------------------------------------------------------------------------------------------------
def test_kv_cache_incremental_equals_full_pass():
    torch.manual_seed(0)
    cfg = small_cfg(qkv_bias=True)
    bb = Backbone(cfg).eval()
    L = 9
    x = torch.randn(2, L, cfg.width)
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, :2] = False  # left padding in row 1
    span = torch.tensor([-1, -1, -1, 0, 0, 0, -1, -1, -1])
    mask = build_attention_mask(span, valid)
    pos = torch.arange(L)
    with torch.no_grad():
        full = bb(x, pos, mask)
        cache = bb.new_cache()
        parts = [bb(x[:, :3], pos[:3], mask[:, :, :3, :3], cache)]
        # a block that is not appended leaves the cache as it was
        bb(x[:, 3:6], pos[3:6], mask[:, :, 3:6, :6], cache, update_cache=False)
        assert cache.length == 3
        parts.append(bb(x[:, 3:6], pos[3:6], mask[:, :, 3:6, :6], cache))
        for t in range(6, L):
            parts.append(bb(x[:, t:t + 1], pos[t:t + 1], mask[:, :, t:t + 1, :t + 1], cache))
    assert cache.length == L
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kept_positions_equal_the_full_pass_at_those_positions():
    # generation reads out only the positions it draws next: the last block runs on them alone
    torch.manual_seed(0)
    cfg = small_cfg(depth=3)
    bb = Backbone(cfg).eval()
    L = 9
    x = torch.randn(2, L, cfg.width)
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, :2] = False
    mask = build_attention_mask(torch.tensor([-1, -1, -1, 0, 0, 0, 0, 0, 0]), valid)
    pos = torch.arange(L)
    keep = torch.tensor([[2, 0], [5, 1]])  # [B, m]: other positions, another order per row
    with torch.no_grad():
        full = bb(x, pos, mask)
        cache = bb.new_cache()
        bb(x[:, :3], pos[:3], mask[:, :, :3, :3], cache)
        kept = bb(x[:, 3:], pos[3:], mask[:, :, 3:], cache, update_cache=False, keep=keep)
    assert kept.shape == (2, 2, cfg.width)
    torch.testing.assert_close(kept, full[:, 3:].gather(1, keep[..., None].expand(-1, -1, cfg.width)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep", [None, torch.tensor([[1, 4], [0, 2]])])
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(keep):
    outs, grads = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        bb = Backbone(small_cfg(grad_checkpointing=ckpt)).train()
        x = torch.randn(2, 5, 64)
        mask = build_attention_mask(torch.full((5,), -1), torch.ones(2, 5, dtype=torch.bool))
        h = bb(x, torch.arange(5), mask, keep=keep)
        bb.logits(h).square().mean().backward()
        outs.append(h.detach())
        grads.append(bb.layers[0].mlp.up_proj.weight.grad.clone())
    assert outs[0].shape == (2, 5 if keep is None else 2, 64)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_forward_runs_under_bf16_autocast():
    bb = Backbone(small_cfg())
    mask = build_attention_mask(torch.full((4,), -1), torch.ones(1, 4, dtype=torch.bool))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = bb(bb.embed_tokens(torch.tensor([[1, 2, 3, 4]])), torch.arange(4), mask)
        logits = bb.logits(h)
    assert logits.dtype == torch.bfloat16 and logits.shape == (1, 4, 50)
    assert torch.isfinite(logits.float()).all()
