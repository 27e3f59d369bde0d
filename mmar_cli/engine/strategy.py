"""trainer.strategy as Lightning takes it."""

from __future__ import annotations


def lightning_strategy(name: str):
    """trainer.strategy as Lightning takes it. 'fsdp' makes each transformer block and each block of the
    diffusion head a unit of its own, so a GPU gathers one block's weights at a time: wrapped whole (what
    the bare name does), the model is one unit and every GPU gathers all of it for every forward pass."""
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from mmar_cli.model.backbone import Block
        from mmar_cli.model.diffusion_head import ResBlock

        return FSDPStrategy(auto_wrap_policy={Block, ResBlock}, sharding_strategy="FULL_SHARD")
    return "ddp_find_unused_parameters_true" if name == "ddp" else name
