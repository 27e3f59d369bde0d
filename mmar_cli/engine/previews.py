"""Training previews: every `trainer.sample_every` steps and at the end, a few held-out samples drawn by
the model in training, in both directions, with its loss on them."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import lightning as L
import numpy as np
import torch
import webdataset as wds
from omegaconf import OmegaConf

from mmar_cli.config import GenerationConfig
from mmar_cli.data.sequence import CAPTION, T2I, build_batch, encode_prefix, fits
from mmar_cli.data.shards import decode_sample
from mmar_cli.engine.checkpoint import step_name
from mmar_cli.engine.module import MODEL_KEYS
from mmar_cli.model.generate import generate_images, generate_text
from mmar_cli.pictures import save_png
from mmar_cli.seeding import generator, seed_torch

PREVIEW_ROWS = 4


class Previews(L.Callback):
    """Every `trainer.sample_every` steps and at the end, rank 0 writes `{out}/samples/step-XXXXXXXX.png`
    (images generated from the captions of a few held-out samples) and `.txt` (those captions, and the
    captions the model writes for the held-out images), and logs the loss on those samples."""

    def __init__(self, out: Path, cfg, tok, image_tok, shards: List[str]):
        self.dir = out / "samples"
        self.cfg, self.tok, self.image_tok = cfg, tok, image_tok
        self.shards = shards
        self.gen = OmegaConf.structured(GenerationConfig(iterations=4, diffusion_steps=10, max_new_tokens=16))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        every = self.cfg.trainer.sample_every
        if every and module.step % every == 0 and module.step < self.cfg.trainer.max_steps:
            val_loss = self.write(trainer, module, step_name(module.step))
            if val_loss is not None:
                module.log("val/loss", val_loss)

    def on_train_end(self, trainer, module):
        self.write(trainer, module, "final")

    def _samples(self, layout) -> list:
        decoded = []
        for raw in wds.tariterators.tarfile_samples([{"url": self.shards[0]}], handler=wds.warn_and_continue):
            s = decode_sample(raw)
            if fits(self.tok, layout, T2I, s["caption"]) and fits(self.tok, layout, CAPTION, answer=s["caption"]):
                decoded.append(s)
            if len(decoded) == PREVIEW_ROWS:
                break
        return decoded

    def write(self, trainer, module, name: str) -> Optional[float]:
        if not trainer.is_global_zero or self.cfg.trainer.strategy == "fsdp":  # FSDP: weights are sharded
            return None
        model, dev = module.model, module.device
        samples = self._samples(model.layout)
        if not samples:
            return None
        lay = model.layout
        captions = [x["caption"] for x in samples]
        images = torch.stack([torch.as_tensor(x["tokens"]).float() for x in samples]).to(dev)
        model.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            tasks = [T2I] * len(samples) + [CAPTION] * len(samples)
            batch = build_batch(self.tok, lay, tasks, captions * 2, [None] * len(samples) + captions,
                                torch.cat([images, images]))
            seed_torch(self.cfg.trainer.seed)
            val_loss = float(model({k: batch[k].to(dev) for k in MODEL_KEYS})["loss"])
            prompts = torch.stack([encode_prefix(self.tok, T2I, c, lay) for c in captions]).to(dev)
            made = generate_images(model, prompts, None, self.gen, generator(self.cfg.trainer.seed))
            cap_prefix = torch.stack([encode_prefix(self.tok, CAPTION, "", lay)] * len(samples)).to(dev)
            written = generate_text(model, images, cap_prefix, self.gen)
        model.train()
        self.dir.mkdir(parents=True, exist_ok=True)
        truth = self.image_tok.decode(images.float().cpu())
        fake = self.image_tok.decode(made.float().cpu())
        grid = np.concatenate([np.concatenate(list(truth), axis=1), np.concatenate(list(fake), axis=1)], axis=0)
        save_png(grid, self.dir / f"{name}.png")
        lines = [f"step {module.step}  val loss {val_loss:.4f}",
                 "top row: held-out images; bottom row: generated from their captions"]
        lines += [f"caption: {c!r}  ->  written: {self.tok.decode(w)!r}" for c, w in zip(captions, written)]
        (self.dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
        return val_loss
