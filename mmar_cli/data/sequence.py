"""The one sequence layout, shared by training and sampling.

Every sample, whatever its task, is laid out in the same fixed frame of length
P + 1 + N + 1 + S (P = model.max_prefix_len, N = image tokens, S = model.max_suffix_len):

    [ prefix text, left-padded (P) ][ BOI ][ image tokens (N) ][ EOI ][ suffix text, right-padded (S) ]

    text -> image     prefix = BOS caption GEN         suffix = (empty)        image: masked, diffusion loss
    unconditional     prefix = BOS GEN                 suffix = (empty)        (caption dropped / image only)
    caption           prefix = BOS CAP                 suffix = caption EOS    image: clean, text loss
    question->answer  prefix = BOS question ANS        suffix = answer EOS     image: clean, text loss

Positions are the frame's indices, so an image token sits at the same position in training and in
sampling, and a prompt's last token is always right before BOI, however long the prompt is: a model
sampled at positions it was not trained at draws noise. The suffix is all padding for generation rows,
and nothing before the suffix attends to it, so generation can drop it (`Layout.gen_len`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

# Task ids, also the keys of per-task losses.
T2I, UNCOND, CAPTION, QA = 0, 1, 2, 3
TASK_NAMES = {T2I: "t2i", UNCOND: "uncond", CAPTION: "caption", QA: "qa"}

IGNORE = -100


@dataclass(frozen=True)
class Layout:
    prefix_len: int  # P
    num_image_tokens: int  # N
    suffix_len: int  # S

    @property
    def boi(self) -> int:
        return self.prefix_len

    @property
    def image_start(self) -> int:
        return self.prefix_len + 1

    @property
    def image_end(self) -> int:  # exclusive
        return self.image_start + self.num_image_tokens

    @property
    def eoi(self) -> int:
        return self.image_end

    @property
    def suffix_start(self) -> int:
        return self.eoi + 1

    @property
    def gen_len(self) -> int:
        """Length needed for image generation: up to the last image token."""
        return self.image_end

    @property
    def length(self) -> int:
        return self.suffix_start + self.suffix_len

    def image_span(self) -> torch.Tensor:
        """[L] long: 0 on image positions, -1 elsewhere (the attention-mask builder's span ids)."""
        span = torch.full((self.length,), -1, dtype=torch.long)
        span[self.image_start:self.image_end] = 0
        return span


def _prefix(tok, task: int, text: str, layout: Layout, source: str) -> List[int]:
    s = tok.specials
    if task == T2I:
        ids = [s.bos] + tok.encode(text) + [s.gen]
    elif task == UNCOND:
        ids = [s.bos, s.gen]
    elif task == CAPTION:
        ids = [s.bos, s.cap]
    elif task == QA:
        ids = [s.bos] + tok.encode(text) + [s.ans]
    else:
        raise ValueError(f"unknown task {task}")
    if len(ids) > layout.prefix_len:
        from mmar_cli.errors import UserError

        raise UserError(f"{source} is {len(ids)} tokens with its markers but the model's prefix holds "
                        f"{layout.prefix_len} (model.max_prefix_len): '{text[:60]}'")
    return ids


def encode_prefix(tok, task: int, text: str, layout: Layout, source: str = "prompt") -> torch.Tensor:
    """[P] long: the prefix of one sample, left-padded with PAD."""
    ids = _prefix(tok, task, text, layout, source)
    out = torch.full((layout.prefix_len,), tok.specials.pad, dtype=torch.long)
    out[layout.prefix_len - len(ids):] = torch.tensor(ids, dtype=torch.long)
    return out


def encode_suffix(tok, text: str, layout: Layout) -> Optional[torch.Tensor]:
    """[S] long: answer/caption + EOS, right-padded; None when it does not fit (sample is skipped)."""
    ids = tok.encode(text) + [tok.specials.eos]
    if len(ids) > layout.suffix_len:
        return None
    out = torch.full((layout.suffix_len,), tok.specials.pad, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def build_batch(tok, layout: Layout, tasks: Sequence[int], texts: Sequence[str],
                answers: Sequence[Optional[str]], image_tokens: torch.Tensor) -> dict:
    """Collate one batch in the fixed frame.

    tasks[i]: T2I/UNCOND/CAPTION/QA; texts[i]: the caption (T2I) or question (QA), ignored otherwise;
    answers[i]: the caption (CAPTION) or answer (QA) supervised after the image; image_tokens: [B, N, D].

    Returns
      text_ids     [B, L] long   token ids (PAD on image positions and padding)
      valid        [B, L] bool   real positions (attention keys)
      text_targets [B, L] long   next-token targets, IGNORE where unsupervised
      image_tokens [B, N, D]     float
      gen_rows     [B] bool      the image is a generation target (masked, diffusion loss)
      task         [B] long      task id per row
    """
    s = tok.specials
    B, L = len(tasks), layout.length
    text_ids = torch.full((B, L), s.pad, dtype=torch.long)
    targets = torch.full((B, L), IGNORE, dtype=torch.long)
    for i, task in enumerate(tasks):
        text_ids[i, : layout.prefix_len] = encode_prefix(tok, task, texts[i] or "", layout, "caption/question")
        text_ids[i, layout.boi] = s.boi
        text_ids[i, layout.eoi] = s.eoi
        if task in (CAPTION, QA):
            suffix = encode_suffix(tok, answers[i] or "", layout)
            if suffix is None:
                raise ValueError("suffix too long; filter samples with data.datamodule.fits() before collating")
            text_ids[i, layout.suffix_start:] = suffix
            # position t predicts token t+1: EOI predicts the first suffix token, ..., the last real one EOS
            n = int((suffix != s.pad).sum())
            targets[i, layout.eoi: layout.eoi + n] = suffix[:n]
    valid = text_ids != s.pad
    valid[:, layout.image_start: layout.image_end] = True
    gen_rows = torch.tensor([t in (T2I, UNCOND) for t in tasks], dtype=torch.bool)
    return {
        "text_ids": text_ids,
        "valid": valid,
        "text_targets": targets,
        "image_tokens": image_tokens,
        "gen_rows": gen_rows,
        "task": torch.tensor(list(tasks), dtype=torch.long),
    }
