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


def prefix_ids(tok, task: int, text: str = "") -> List[int]:
    """The prefix of one sample before padding: BOS caption GEN, BOS GEN, BOS CAP or BOS question ANS."""
    s = tok.specials
    if task == T2I:
        return [s.bos] + tok.encode(text) + [s.gen]
    if task == UNCOND:
        return [s.bos, s.gen]
    if task == CAPTION:
        return [s.bos, s.cap]
    if task == QA:
        return [s.bos] + tok.encode(text) + [s.ans]
    raise ValueError(f"unknown task {task}")


def suffix_ids(tok, text: str) -> List[int]:
    """The suffix of a caption or answer row before padding: the text, then EOS."""
    return tok.encode(text) + [tok.specials.eos]


def fits(tok, layout: Layout, task: int, text: str = "", answer: Optional[str] = None) -> bool:
    """Does a sample's text fit the frame: its prefix (`text`: the caption or question) in P positions
    and, for a caption or answer row, its suffix (`answer`) in S? The one place that decides it: training
    skips a sample that does not fit, sampling refuses the prompt, evaluation and the previews pass it over.
    """
    if len(prefix_ids(tok, task, text)) > layout.prefix_len:
        return False
    return task not in (CAPTION, QA) or len(suffix_ids(tok, answer or "")) <= layout.suffix_len


def _padded(ids: List[int], length: int, pad: int, left: bool) -> torch.Tensor:
    if len(ids) > length:
        raise ValueError(f"{len(ids)} tokens for {length} positions: check the text with fits() first")
    out = torch.full((length,), pad, dtype=torch.long)
    start = length - len(ids) if left else 0
    out[start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def encode_prefix(tok, task: int, text: str, layout: Layout) -> torch.Tensor:
    """[P] long: the prefix of one sample (which `fits`), left-padded with PAD."""
    return _padded(prefix_ids(tok, task, text), layout.prefix_len, tok.specials.pad, left=True)


def encode_suffix(tok, text: str, layout: Layout) -> torch.Tensor:
    """[S] long: caption/answer + EOS (which `fits`), right-padded with PAD."""
    return _padded(suffix_ids(tok, text), layout.suffix_len, tok.specials.pad, left=False)


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
        text_ids[i, : layout.prefix_len] = encode_prefix(tok, task, texts[i] or "", layout)
        text_ids[i, layout.boi] = s.boi
        text_ids[i, layout.eoi] = s.eoi
        if task in (CAPTION, QA):
            suffix = encode_suffix(tok, answers[i] or "", layout)
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
