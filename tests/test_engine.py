"""The LightningModule's pieces: LR schedule, AdamW groups, EMA, per-step seeding."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from mmar_cli.config import ModelConfig, OptimConfig
from mmar_cli.engine.ema import EMA
from mmar_cli.engine.module import adamw, fused_adamw, lr_factor, param_groups
from mmar_cli.seeding import step_seed
from mmar_cli.model.mmar import MMAR
from mmar_cli.model.presets import resolve

TINY = dict(width=64, depth=2, heads=2, kv_heads=1, mlp_hidden=128, diffusion={"width": 64, "depth": 1},
            vocab_size=264, token_dim=48, image_grid=[2, 2])


def tiny_model():
    torch.manual_seed(0)
    return MMAR(resolve(OmegaConf.merge(OmegaConf.structured(ModelConfig), TINY)))


def tiny_train_module(scaler=None, strategy=None):
    """A TrainModule of tiny_model() without EMA, its trainer a stand-in with this precision plugin's gradient
    scaler and this strategy."""
    from types import SimpleNamespace

    from mmar_cli.config import TrainConfig
    from mmar_cli.engine.module import TrainModule

    cfg = OmegaConf.structured(TrainConfig)
    cfg.trainer.ema_decay = 0.0
    module = TrainModule(cfg, tiny_model())
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), strategy=strategy)
    return module


def optim(**kw):
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), kw)


def test_lr_warmup_then_cosine_to_floor():
    f = lambda s: lr_factor(s, warmup=10, max_steps=110, schedule="cosine", min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert lr_factor(50, 10, 110, "constant", 0.1) == 1.0
    assert lr_factor(3, 0, 10, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_param_groups_no_decay_on_norms_biases_embeddings():
    model = tiny_model()
    groups = {g["name"]: g for g in param_groups(model, optim(lr=1e-3, weight_decay=0.1, backbone_lr_mult=0.5))}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups.values():
        for p in g["params"]:
            name = names[id(p)]
            if p.ndim < 2 or "embed_tokens" in name:
                assert g["weight_decay"] == 0.0, name
            assert g["lr"] == (5e-4 if name.startswith("backbone.") else 1e-3), name
    assert groups["backbone"]["weight_decay"] == 0.1
    n_grouped = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_grouped == sum(p.numel() for p in model.parameters())


def test_freeze_backbone():
    model = tiny_model()
    groups = param_groups(model, optim(freeze_backbone=True))
    assert all(not g["name"].startswith("backbone") for g in groups)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_ema_average_and_state_dict_keys():
    model = tiny_model()
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    state = ema.state_dict(model)
    assert state.keys() == model.state_dict().keys()
    key = next(k for k, _ in model.named_parameters())
    assert torch.allclose(state[key], before[key] + 0.1, atol=1e-6)
    fresh = tiny_model()
    fresh.load_state_dict(state)  # EMA weights load into the model as they are
    ema2 = EMA(fresh, 0.9)
    ema2.load_state_dict(state)
    assert torch.equal(ema2.state_dict(fresh)[key], state[key])


def test_step_seed_depends_on_seed_step_rank_and_nothing_else():
    seeds = {step_seed(a, b, c) for a in range(2) for b in range(3) for c in range(2)}
    assert len(seeds) == 12
    # the same in every process and version: a resumed run draws the masks and noise it would have drawn
    assert (step_seed(0, 5, 1), step_seed(1, 0, 0)) == (1565899405, 1835504127)


@pytest.mark.parametrize("given, kept", [(None, "16384"), ("77", "77")])
def test_importing_mmar_sets_the_kernel_cache_unless_the_user_did(given, kept):
    """oneDNN keeps 1024 compiled matmul kernels by default, too few for training's changing shapes; mmar asks
    for 16384 before torch runs anything, and leaves a value the user set alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if given is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = given
    code = "import os, mmar_cli; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == kept


@pytest.mark.parametrize("devices, scaler, fused", [
    ({"cuda"}, None, True), ({"cuda"}, torch.amp.GradScaler("cpu"), False),
    ({"cpu"}, None, False), ({"cpu", "cuda"}, None, False)])
def test_adamw_is_fused_on_cuda_unless_a_gradient_scaler_must_unscale_first(devices, scaler, fused):
    assert fused_adamw(devices, scaler) is fused


@pytest.mark.parametrize("scaler", [None, torch.amp.GradScaler("cpu")])
def test_the_trainer_on_a_cpu_steps_a_foreach_adamw(scaler):
    opt = tiny_train_module(scaler).configure_optimizers()["optimizer"]
    assert not opt.defaults["fused"] and opt.defaults["foreach"]


def test_gradient_clipping_with_a_fused_adamw_clips_the_global_norm():
    """Lightning's mixed-precision plugin refuses fused optimizers; the module clips them itself."""
    module = tiny_train_module()
    opt = adamw(module.model, module.cfg.optim, fused=True)
    assert opt.defaults["fused"]
    for p in module.model.parameters():
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.model.parameters()]))
    assert norm == pytest.approx(0.5, rel=1e-4)
