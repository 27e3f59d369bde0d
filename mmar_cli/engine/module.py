"""The LightningModule both training stages share: losses, AdamW groups, LR schedule, EMA.

Exact resume: the training randomness (mask ratios and orders, diffusion noise and timesteps) is drawn from
torch's global RNG, which is reseeded from (seed, global step, rank) at the start of every step; with the
data stream replayed to the saved position (`mmar_cli.data.datamodule`), a resumed run repeats the
uninterrupted one step for step.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Optional

import lightning as L
import torch
from torch import nn

from mmar_cli.data.sequence import TASK_NAMES
from mmar_cli.engine.ema import EMA
from mmar_cli.seeding import seed_torch, step_seed

MODEL_KEYS = ("text_ids", "valid", "text_targets", "image_tokens", "gen_rows", "task")
COUNTERS = ("skipped_long", "corrupt")


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, losses: dict):
        self.step = step
        super().__init__(f"the loss became non-finite at step {step} ({losses})")


def lr_factor(step: int, warmup: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR: linear warmup, then constant or cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _no_decay(name: str, p: nn.Parameter, embedding_params: set) -> bool:
    # norms and biases are 1-D; embeddings (text table, mask token, positions) are looked up, not mixed
    return p.ndim < 2 or id(p) in embedding_params or "embed" in name or name.endswith("token")


def param_groups(model: nn.Module, optim) -> list[dict]:
    """AdamW groups: (backbone or not) x (decay or not). The backbone is `model.backbone`; its LR is
    scaled by `optim.backbone_lr_mult`, or it is frozen with `optim.freeze_backbone`."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    groups: dict = {}
    for name, p in model.named_parameters():
        backbone = name.startswith("backbone.")
        if backbone and optim.freeze_backbone:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        no_wd = _no_decay(name, p, embedding_params)
        key = ("backbone" if backbone else "heads") + ("_no_decay" if no_wd else "")
        group = groups.setdefault(key, {
            "params": [], "name": key,
            "lr": optim.lr * (optim.backbone_lr_mult if backbone else 1.0),
            "weight_decay": 0.0 if no_wd else optim.weight_decay,
        })
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def fused_adamw(device_types: set, scaler) -> bool:
    """Whether the trainer's AdamW is fused (one kernel for the whole update): on CUDA, and only without fp16's
    gradient scaler, which must unscale before clipping. On a CPU it is foreach: the fused update alone is
    faster there (2.4 against 14 ms a step for the demo's model), but the demo's pretraining at batch 128 ran
    1.08x the samples/s with foreach (make bench's synthetic step: alike; docs/RESULTS.md, "Foreach AdamW on the
    CPU")."""
    return scaler is None and set(device_types) == {"cuda"}


def adamw(model: nn.Module, optim, fused: bool) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, optim)`: fused, or foreach (one kernel per group); `fused_adamw` decides
    which the trainer uses."""
    return torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                             **({"fused": True} if fused else {"foreach": True}))


class TrainModule(L.LightningModule):
    """`start_step`: the global step a resumed run starts at (the Lightning trainer counts from 0).
    `optimizer_state`: the optimizer and scheduler states of a resumed run, loaded once the trainer has
    built them (`checkpoint.restore` sets both). `keys_log`: a file per rank that lists the sample keys
    of every batch."""

    def __init__(self, cfg, model: nn.Module, keys_log: Optional[str] = None):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.ema = EMA(model, cfg.trainer.ema_decay) if cfg.trainer.ema_decay > 0 else None
        self.start_step = 0
        self.optimizer_state: Optional[dict] = None
        self.keys_log = keys_log
        self.counts = {k: 0 for k in COUNTERS}
        self._last_time: Optional[float] = None

    @property
    def step(self) -> int:
        return self.start_step + self.trainer.global_step

    # -- optimizer ----------------------------------------------------------------------------------
    def configure_optimizers(self):
        o, t = self.cfg.optim, self.cfg.trainer
        fused = fused_adamw({p.device.type for p in self.model.parameters()},
                            getattr(self.trainer.precision_plugin, "scaler", None))
        opt = adamw(self.model, o, fused)
        fn = functools.partial(lr_factor, warmup=o.warmup_steps, max_steps=t.max_steps,
                               schedule=o.schedule, min_ratio=o.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self):
        if self.ema is not None:
            self.ema.to(self.device)

    def on_train_start(self):
        if self.global_rank != 0:  # the saved counters are totals over ranks: rank 0 carries them on
            self.counts = {k: 0 for k in COUNTERS}
        if self.optimizer_state is not None:
            self.trainer.strategy.load_optimizer_state_dict({"optimizer_states": [self.optimizer_state["optimizer"]]})
            self.lr_schedulers().load_state_dict(self.optimizer_state["scheduler"])
            self.optimizer_state = None

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        seed_torch(step_seed(self.cfg.trainer.seed, self.step, self.global_rank))
        for k in COUNTERS:
            self.counts[k] += int(batch[k])
        if self.keys_log:
            with open(f"{self.keys_log}-rank{self.global_rank}.txt", "a") as f:
                f.write(" ".join(batch["keys"]) + "\n")
        out = self.model({k: batch[k] for k in MODEL_KEYS})
        loss = out["loss"]
        finite = bool(torch.isfinite(loss.detach()))
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLoss(self.step, {k: float(v.detach()) for k, v in out.items() if k.startswith("loss")})
        self._log_step(out, batch)
        return loss

    def _log_step(self, out: dict, batch: dict) -> None:
        now = time.perf_counter()
        if self._last_time is not None:
            dt = now - self._last_time
            rows, length = batch["text_ids"].shape
            world = self.trainer.world_size
            self.log("samples_per_s", rows * world / dt, prog_bar=True)
            self.log("tokens_per_s", rows * length * world / dt, prog_bar=True)
        self._last_time = now
        self.log("loss", out["loss"].detach(), prog_bar=True)
        for name in ["loss_img", "loss_txt", "loss_mean"] + [f"loss_{n}" for n in TASK_NAMES.values()]:
            if name in out:
                self.log(f"train/{name}", out[name].detach())
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("step", float(self.step))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # FSDP shards the gradients: only its root module knows their global norm (Lightning's own clipping
        # refuses FSDP)
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        elif gradient_clip_val and optimizer.defaults.get("fused"):
            # Lightning's mixed-precision plugin refuses any fused optimizer, for fear of a gradient scaler;
            # configure_optimizers uses one only where there is none, so the gradients are as they are
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs):
        # here rather than in on_train_batch_end, which runs after the callbacks (the checkpoint writer)
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model)

    # -- checkpoint pieces --------------------------------------------------------------------------
    def ema_state(self) -> Optional[dict]:
        return None if self.ema is None else self.ema.state_dict(self.model)

    def total_counts(self) -> dict:
        """Skip counters summed over ranks (a collective: call on every rank)."""
        summed = self.trainer.strategy.reduce(
            torch.tensor([self.counts[k] for k in COUNTERS], dtype=torch.float64, device=self.device),
            reduce_op="sum")
        return {k: int(v) for k, v in zip(COUNTERS, summed.tolist())}
