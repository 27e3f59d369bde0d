"""MMAR: one transformer over discrete text tokens and continuous image tokens.

The backbone reads text embeddings and image-token embeddings in the fixed frame of
mmar_cli/data/sequence.py. Text is predicted by an LM head; each masked image token's value is drawn by
a small diffusion head conditioned on the backbone's hidden state at that token (MAR inside an LLM).
The backbone only ever sees clean or masked image tokens, never noisy ones, so understanding loses no
image information. This file holds the model and its training losses; mmar_cli/model/generate.py draws
images and text with it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmar_cli.data.sequence import IGNORE, TASK_NAMES, Layout
from mmar_cli.model.attention_mask import build_attention_mask
from mmar_cli.model.backbone import Backbone
from mmar_cli.model.diffusion import GaussianDiffusion
from mmar_cli.model.diffusion_head import DiffusionHead
from mmar_cli.model.embedders import EmbeddingViT, VisProjector


# --------------------------------------------------------------------------------------------------
# Masked image modelling: the mask ratio's distribution
# --------------------------------------------------------------------------------------------------
def truncated_normal(n: int, mean: float, std: float, low: float, high: float, device=None,
                     generator=None) -> torch.Tensor:
    """[n] draws of N(mean, std) truncated to [low, high] (inverse CDF)."""
    if std == 0:
        return torch.full((n,), min(max(mean, low), high), device=device)
    cdf = lambda x: 0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2))))  # noqa: E731
    u = torch.rand(n, device=device, generator=generator) * (cdf(high) - cdf(low)) + cdf(low)
    x = mean + std * math.sqrt(2) * torch.erfinv((2 * u - 1).clamp(-1 + 1e-7, 1 - 1e-7))
    return x.clamp(low, high)


def compile_unavailable(device_type: str) -> Optional[str]:
    """Why torch.compile cannot compile training on `device_type` here, or None when it can: on a CPU its
    inductor backend writes C++ and builds it with the compiler it finds (g++, clang++ or $CXX)."""
    if device_type != "cpu":
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - whatever stops the search is the reason
        return f"torch.compile on a CPU builds C++ and found no C++ compiler ({type(e).__name__}: {e})"
    return None


# --------------------------------------------------------------------------------------------------
# Core model
# --------------------------------------------------------------------------------------------------
class MMAR(nn.Module):
    """`cfg`: a resolved ModelConfig (presets.resolve) with vocab_size, token_dim and image_grid set.
    `specials`: the text tokenizer's special-token ids (`tokenizers.text.Specials`), which generation
    writes and stops at; a model built only to be trained or to receive weights may go without."""

    def __init__(self, cfg, specials=None):
        super().__init__()
        self.cfg = cfg
        self.specials = specials
        self.backbone = Backbone(cfg)
        self.image_embed = EmbeddingViT(cfg)
        self.vis_proj = VisProjector(cfg.width, cfg.diffusion.width)
        self.head = DiffusionHead(cfg.token_dim, cfg.diffusion.width, cfg.diffusion.width, cfg.diffusion.depth)
        # the conditional mean of a masked token, read linearly off its condition (auxiliary loss only)
        self.mean_head = nn.Linear(cfg.diffusion.width, cfg.token_dim) if cfg.diffusion.mean_loss else None
        self.diffusion = GaussianDiffusion(cfg.diffusion.num_train_timesteps, cfg.diffusion.schedule,
                                           cfg.diffusion.prediction)
        self.w_img, self.w_txt = 1.0, 1.0
        self._init_backbone()

    def _init_backbone(self):
        for m in self.backbone.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):  # the text the backbone reads (model.embed_init_std)
                nn.init.normal_(m.weight, std=self.cfg.embed_init_std)

    def compile_training(self) -> None:
        """Training passes run the backbone's decoder blocks and the diffusion head's blocks through
        torch.compile (inductor: on a CPU it fuses the norms, rotations, activations and casts around the
        matmuls into a few C++ kernels). Each block is compiled apart, as the masking and the rows each task
        reads change between steps outside them. Inference keeps the eager blocks: its cache and token
        counts change every iteration. The weights are the same modules' (state dicts are unchanged)."""
        self.backbone.compiled = [torch.compile(block) for block in self.backbone.layers]
        self.head.compiled = [torch.compile(block) for block in self.head.blocks]

    @property
    def layout(self) -> Layout:
        h, w = self.cfg.image_grid
        return Layout(self.cfg.max_prefix_len, h * w, self.cfg.max_suffix_len)

    def embed(self, text_ids: torch.Tensor, image_tokens: torch.Tensor,
              masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input embeddings [B, L', width] of a frame (or its first L' >= image_end positions)."""
        lay = self.layout
        text = self.backbone.embed_tokens(text_ids)
        image = self.image_embed(image_tokens, masked).to(text.dtype)
        return torch.cat((text[:, :lay.image_start], image, text[:, lay.image_end:]), dim=1)

    def random_mask(self, gen_rows: torch.Tensor, generator=None) -> torch.Tensor:
        """[B, N] bool: masked image tokens. Generation rows get a random order and a ratio from the
        truncated normal on [mask_min, 1] (at least one token); understanding rows see the whole image."""
        B, N = gen_rows.shape[0], self.layout.num_image_tokens
        dev = gen_rows.device
        ratio = truncated_normal(B, 1.0, self.cfg.mask_std, self.cfg.mask_min, 1.0, dev, generator)
        n_masked = (ratio * N).ceil().long().clamp(1, N)
        rank = torch.rand(B, N, device=dev, generator=generator).argsort(-1).argsort(-1)
        return (rank < n_masked[:, None]) & gen_rows[:, None]

    def hidden_states(self, text_ids: torch.Tensor, valid: torch.Tensor, image_tokens: torch.Tensor,
                      masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final hidden states [B, L, width] of full frames (no cache)."""
        lay = self.layout
        mask = build_attention_mask(lay.image_span(), valid)
        positions = torch.arange(lay.length, device=text_ids.device)
        return self.backbone(self.embed(text_ids, image_tokens, masked), positions, mask)

    def read_spans(self, task: torch.Tensor, valid: torch.Tensor, read: torch.Tensor) -> list:
        """What read_states runs: (rows, read columns, lo, hi) where [lo, hi) spans the first real token of
        any of the rows to their last read position, or to the end of the image when they read inside it
        (image tokens see the whole image). One entry for all rows, or with model.split_tasks one per task
        with a read position."""
        lay, spans = self.layout, []
        groups = task.unique().tolist() if self.cfg.split_tasks else [None]
        for t in groups:
            rows = torch.arange(task.shape[0], device=task.device) if t is None else (task == t).nonzero().squeeze(1)
            cols = read[rows].any(0).nonzero().squeeze(1)
            if cols.numel():
                lo = min(int(valid[rows].any(0).nonzero()[0]), int(cols[0]))
                hi = int(cols[-1]) + 1
                spans.append((rows, cols, lo, max(hi, lay.image_end) if hi > lay.image_start else hi))
        return spans

    def read_states(self, text_ids: torch.Tensor, valid: torch.Tensor, image_tokens: torch.Tensor,
                    masked: torch.Tensor, task: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, L, width] at the positions training reads (`read` [B, L] bool), equal to
        hidden_states' there (elsewhere zeros, or what the pass computed at a column another row reads),
        for less work: the rows run on the columns they use, from the first real token of any of them to
        the last read position (with model.split_tasks each task's rows on their own: a text -> image row
        stops at its image, a caption row skips the prompt's padding), and the last block asks only at the
        read positions. Cutting is exact: padding is never a key, and nothing attends to a later position
        except inside the image, which is kept whole."""
        x = self.embed(text_ids, image_tokens, masked)
        span, positions = self.layout.image_span(), torch.arange(self.layout.length, device=x.device)
        parts = []
        for rows, cols, lo, hi in self.read_spans(task, valid, read):
            mask = build_attention_mask(span[lo:hi], valid[rows, lo:hi])
            keep = (cols - lo).expand(rows.numel(), -1)
            parts.append((rows, cols, self.backbone(x[rows, lo:hi], positions[lo:hi], mask, keep=keep)))
        out = torch.zeros(*read.shape, x.shape[-1], device=x.device, dtype=parts[0][2].dtype if parts else x.dtype)
        for rows, cols, h in parts:
            out = out.index_put((rows[:, None], cols[None, :]), h)
        return out

    # ----------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------
    def forward(self, batch: dict, w_img: Optional[float] = None, w_txt: Optional[float] = None) -> dict:
        """Losses of one batch from data.sequence.build_batch: {loss, loss_img, loss_txt, loss_<task>}.
        Uses torch's global RNG (masks, timesteps, noise) so a seeded run resumes exactly."""
        w_img = self.w_img if w_img is None else w_img
        w_txt = self.w_txt if w_txt is None else w_txt
        lay = self.layout
        ids, valid = batch["text_ids"], batch["valid"]
        tokens = batch["image_tokens"].to(self.image_embed.mask_embed.dtype)
        B = ids.shape[0]
        masked = self.random_mask(batch["gen_rows"])
        seen = tokens
        if self.training and (self.cfg.known_noise or self.cfg.caption_noise):
            # the known tokens of generation rows, as imperfect as drawn ones; the image of an image -> text
            # row jittered so that a small training set is read, not memorised
            gen_rows = batch["gen_rows"][:, None]
            std = self.cfg.known_noise * (~masked & gen_rows) + self.cfg.caption_noise * ~gen_rows
            seen = tokens + torch.randn_like(tokens) * std[..., None].to(tokens.dtype)
        targets = batch["text_targets"]
        sup = targets != IGNORE
        read = sup.clone()  # what the losses read: masked image positions, supervised text positions
        read[:, lay.image_start:lay.image_end] |= masked
        h = self.read_states(ids, valid, seen, masked, batch["task"], read)

        # diffusion loss on masked tokens of generation rows
        rows = torch.arange(B, device=ids.device)[:, None].expand_as(masked)[masked]
        z = self.vis_proj(h[:, lay.image_start:lay.image_end][masked])
        target = tokens[masked]
        tok_loss = self.diffusion.loss(self.head, target, z, self.cfg.diffusion.batch_mul)
        # sum/count rather than mean: a batch without such tokens still gives every parameter a (zero)
        # gradient, which DDP requires
        loss_img = tok_loss.sum() / max(tok_loss.numel(), 1)
        if self.mean_head is not None:
            # MAR's head conditions through zero-initialised AdaLN, so the backbone's gradient starts at
            # 0 and grows slowly; regressing E[x0 | condition] gives it a direct one from step one.
            err = ((self.mean_head(z).float() - target.float()) ** 2).mean(-1)
            loss_mean = err.sum() / max(err.numel(), 1)
        else:
            loss_mean = None
        row_img = _per_row_mean(tok_loss, rows, B)

        # text loss on supervised positions (position t predicts token t+1)
        ce = F.cross_entropy(self.backbone.logits(h[sup]).float(), targets[sup], reduction="none")
        loss_txt = ce.sum() / max(ce.numel(), 1)
        row_txt = _per_row_mean(ce, torch.arange(B, device=ids.device)[:, None].expand_as(sup)[sup], B)

        out = {"loss": w_img * loss_img + w_txt * loss_txt, "loss_img": loss_img, "loss_txt": loss_txt}
        if loss_mean is not None:
            out["loss"] = out["loss"] + self.cfg.diffusion.mean_loss * loss_mean
            out["loss_mean"] = loss_mean
        row_loss = torch.where(batch["gen_rows"], row_img, row_txt)
        for task_id, name in TASK_NAMES.items():
            rows_of_task = batch["task"] == task_id
            if rows_of_task.any():
                out[f"loss_{name}"] = row_loss[rows_of_task].mean().detach()
        return out

def _per_row_mean(values: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """[B] mean of `values` grouped by their row index (0 for rows without values)."""
    total = torch.zeros(B, device=values.device).index_add(0, rows, values.detach().float())
    count = torch.zeros(B, device=values.device).index_add(0, rows, torch.ones_like(values, dtype=torch.float32))
    return total / count.clamp(min=1)
