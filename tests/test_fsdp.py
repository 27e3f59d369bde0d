"""trainer.strategy=fsdp as the trainer builds it: a unit per block, and gradient clipping through FSDP's root
module (Lightning's own clipping refuses FSDP). Lightning runs FSDP only on GPUs: tests/test_cuda.py trains with
it, and benchmarks/gpu.sh runs those tests."""

from types import SimpleNamespace

from lightning.pytorch.strategies import FSDPStrategy

from mmar_cli.model.backbone import Block
from mmar_cli.model.diffusion_head import ResBlock
from mmar_cli.engine.strategy import lightning_strategy


def test_fsdp_shards_each_block_as_its_own_unit():
    strategy = lightning_strategy("fsdp")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block, ResBlock}
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert lightning_strategy("ddp") == "ddp_find_unused_parameters_true" and lightning_strategy("auto") == "auto"


def test_fsdp_clips_the_gradient_norm_through_its_root_module():
    from test_engine import tiny_train_module

    clipped = []
    strategy = lightning_strategy("fsdp")
    strategy.model = SimpleNamespace(clip_grad_norm_=clipped.append)
    module = tiny_train_module(strategy=strategy)
    module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert clipped == [0.5]
