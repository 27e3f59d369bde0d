"""Size presets, `resolve()` (fill every None of a ModelConfig from its preset) and parameter counts.

Counts are analytic (formulas over the config), so the 7B preset is counted without allocating it;
tests check the formulas against real modules and the qwen2-0.5b backbone against Qwen2-0.5B's 494M.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from mmar_cli.config import ModelConfig
from mmar_cli.errors import UserError

# head_width / head_depth: the diffusion head (MAR uses width 1024, 3 blocks for MAR-B; 1536, 12 for H).
PRESETS = {
    # shallow and wide: on a CPU's budget of steps, two blocks learn to use the prompt sooner than more
    "demo": dict(width=256, depth=2, heads=8, kv_heads=4, mlp_hidden=704, qkv_bias=False,
                 tie_embeddings=False, rope_theta=1e4, head_width=256, head_depth=3),
    "tiny": dict(width=192, depth=4, heads=4, kv_heads=2, mlp_hidden=512, qkv_bias=False,
                 tie_embeddings=True, rope_theta=1e4, head_width=192, head_depth=2),
    "small": dict(width=512, depth=8, heads=8, kv_heads=2, mlp_hidden=1408, qkv_bias=False,
                  tie_embeddings=True, rope_theta=1e4, head_width=512, head_depth=3),
    "base": dict(width=768, depth=12, heads=12, kv_heads=4, mlp_hidden=2560, qkv_bias=False,
                 tie_embeddings=True, rope_theta=1e4, head_width=768, head_depth=6),
    "qwen2-0.5b": dict(width=896, depth=24, heads=14, kv_heads=2, mlp_hidden=4864, qkv_bias=True,
                       tie_embeddings=True, rope_theta=1e6, vocab_size=151936, head_width=1024,
                       head_depth=3),
    "qwen2-7b": dict(width=3584, depth=28, heads=28, kv_heads=4, mlp_hidden=18944, qkv_bias=True,
                     tie_embeddings=False, rope_theta=1e6, vocab_size=152064, head_width=1536,
                     head_depth=12),
}

# Sizes the parameter table assumes when the data has not filled them yet: the default BPE vocabulary
# (512 + 8 specials) and the default tokens of a 32x32 image (8x8 patches, 24 principal components).
NOMINAL = dict(vocab_size=520, token_dim=24, image_grid=[4, 4])


# Model keys of earlier versions, and the value that builds the model of today (checkpoints hold them).
RETIRED = {"image_embedder_depth": 0, "image_proj_hidden": 0}


def resolve(model_cfg) -> DictConfig:
    """A copy of `model_cfg` (DictConfig or ModelConfig) with every None size taken from its preset."""
    if isinstance(model_cfg, DictConfig) and any(key in model_cfg for key in RETIRED):
        model_cfg = model_cfg.copy()
        for key, value in RETIRED.items():
            if model_cfg.get(key, value) != value:
                raise UserError(f"model.{key}={model_cfg[key]}: a model this version of mmar no longer builds "
                                f"(only {key}={value} is supported)")
            model_cfg.pop(key, None)
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_cfg)
    if cfg.preset not in PRESETS:
        raise UserError(f"config key 'model.preset': unknown preset '{cfg.preset}'; "
                        f"choose one of {', '.join(PRESETS)}")
    preset = PRESETS[cfg.preset]
    for key, value in preset.items():
        if key in cfg and cfg[key] is None:
            cfg[key] = value
    if cfg.diffusion.width is None:
        cfg.diffusion.width = preset["head_width"]
    if cfg.diffusion.depth is None:
        cfg.diffusion.depth = preset["head_depth"]
    if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 2:
        raise UserError(f"config key 'model.heads': width {cfg.width} must split into {cfg.heads} heads of "
                        "an even size")
    if cfg.heads % cfg.kv_heads:
        raise UserError(f"config key 'model.kv_heads': {cfg.kv_heads} must divide model.heads={cfg.heads}")
    return cfg


# --------------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------------
def block_params(cfg) -> int:
    """One decoder block: q/k/v/o, SwiGLU, two RMSNorms."""
    head_dim = cfg.width // cfg.heads
    q, kv = cfg.heads * head_dim, cfg.kv_heads * head_dim
    attn = cfg.width * (q + 2 * kv) + q * cfg.width + (q + 2 * kv) * int(cfg.qkv_bias)
    return attn + 3 * cfg.width * cfg.mlp_hidden + 2 * cfg.width


def count_params(cfg) -> dict:
    """Parameters of MMAR(cfg) by part, from the formulas of its modules (cfg resolved, sizes filled)."""
    W, V, D = cfg.width, cfg.vocab_size, cfg.token_dim
    h, w = cfg.image_grid
    hw, hd = cfg.diffusion.width, cfg.diffusion.depth
    backbone = V * W * (1 if cfg.tie_embeddings else 2) + cfg.depth * block_params(cfg) + W
    # EmbeddingViT (linear map or k x k convolution, row + column positions, mask embedding) + VisProjector
    k = cfg.image_proj_kernel
    d_in = D if k == 1 else (D + 1) * k * k  # a k x k convolution also reads a 'known' channel
    image = (d_in * W + W) + (h + w) * W + W
    image += (W * hw + hw) + (hw * hw + hw)
    if cfg.diffusion.mean_loss:
        image += hw * D + D  # the auxiliary mean read-out of the condition
    head = ((D * hw + hw) + (256 * hw + hw) + (hw * hw + hw) + (hw * hw + hw)  # in, time MLP, cond
            + hd * (2 * (hw * hw + hw) + (hw * 3 * hw + 3 * hw))  # residual AdaLN blocks
            + (hw * 2 * hw + 2 * hw) + (hw * D + D))  # final AdaLN + output
    return {"backbone": backbone, "image": image, "diffusion_head": head,
            "total": backbone + image + head}


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def preset_param_table(model_cfg) -> Table:
    """Parameters of every preset with the overrides of `model_cfg` that are not preset sizes."""
    base = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_cfg)
    table = Table("preset", "width", "depth", "heads/kv", "vocab", "backbone", "image", "diff. head", "total",
                  title="parameters per preset",
                  caption="vocab/token size from the data when known, else the preset's or "
                          f"{NOMINAL['vocab_size']} words, {NOMINAL['token_dim']}-value tokens, "
                          f"{NOMINAL['image_grid'][0]}x{NOMINAL['image_grid'][1]} grid")
    for name in PRESETS:
        cfg = base.copy()
        cfg.preset = name
        if name != base.preset:  # explicit sizes belong to the selected preset only
            for key in ("width", "depth", "heads", "kv_heads", "mlp_hidden", "qkv_bias", "tie_embeddings",
                        "rope_theta"):
                cfg[key] = None
            cfg.diffusion.width = cfg.diffusion.depth = None
        for key, value in NOMINAL.items():
            if cfg[key] is None:
                cfg[key] = PRESETS[name].get(key, value)
        cfg = resolve(cfg)
        n = count_params(cfg)
        marker = " *" if name == base.preset else ""
        table.add_row(name + marker, str(cfg.width), str(cfg.depth), f"{cfg.heads}/{cfg.kv_heads}",
                      f"{cfg.vocab_size:,}", _millions(n["backbone"]), _millions(n["image"]),
                      _millions(n["diffusion_head"]), _millions(n["total"]))
    return table
