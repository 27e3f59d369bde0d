"""A trained model at work: load a checkpoint, then text -> image and image -> text in batches.

Shared by `mmar sample`, `mmar evaluate` and the training previews. Prompts are built only through
`data.sequence.encode_prefix`, so a prompt sits at the positions it had in training.

Every image (and every sampled caption) draws from its own generator seeded by (seed, row index), so
a given image is the same whatever the batch size, and the same on CPU and GPU up to float round-off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mmar_cli.data.sequence import (CAPTION, IGNORE, QA, T2I, UNCOND, Layout, build_batch, encode_prefix, fits,
                                   prefix_ids, suffix_ids)
from mmar_cli.errors import UserError, warn
from mmar_cli.model.generate import generate_images, generate_text
from mmar_cli.seeding import derived_seed, generator

RUNS = Path("runs")


# --------------------------------------------------------------------------------------------------
# Finding a checkpoint
# --------------------------------------------------------------------------------------------------
def newest_checkpoint(root: Path = RUNS) -> Path:
    """The most recently completed `final/` under `root`."""
    from mmar_cli.engine.checkpoint import COMPLETE, newest_final

    found = newest_final(root)
    if found is None:
        raise UserError(f"no complete checkpoint under {root}/ (a final/ directory with a {COMPLETE} file); "
                        "pass ckpt=DIR or train one with `mmar pretrain`")
    return found


def check_data_compatible(ckpt_manifest: dict, data_manifest: dict, ckpt: Path, data: Path) -> None:
    """The held-out shards must be tokenized with the checkpoint's tokenizers."""
    from mmar_cli.data.shards import check_compatible

    try:
        check_compatible(ckpt_manifest, data_manifest)
    except UserError as e:
        raise UserError(f"checkpoint {ckpt} does not match data {data}: {e}") from None


# --------------------------------------------------------------------------------------------------
# The model with its tokenizers
# --------------------------------------------------------------------------------------------------
@dataclass
class InferenceModel:
    """A model and the tokenizers it speaks; `source` records where the weights came from (a checkpoint's
    path, which weights and their sha256), empty for a model still in training (previews)."""

    model: torch.nn.Module
    text_tok: object
    image_tok: object
    source: Optional[dict] = None

    @property
    def layout(self) -> Layout:
        return self.model.layout

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return self.image_tok.image_size

    def autocast(self, gen):
        """The arithmetic of gen.precision: bf16 autocast, or plain fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=gen.precision == "bf16")

    # ---------------------------------------------------------------------------------------------
    def prompt_error(self, task: int, text: Optional[str], what: str = "prompt") -> Optional[str]:
        """Why `text` cannot be the prefix of `task` (empty, or longer than the model's prefix), or None."""
        if task in (T2I, QA) and (not text or not text.strip()):
            return f"empty {what}: give some text (e.g. 'a large red circle at the top left')"
        if not fits(self.text_tok, self.layout, task, text):
            n = len(prefix_ids(self.text_tok, task, text))
            return (f"{what} is {n} tokens with its markers but the model's prefix holds {self.layout.prefix_len} "
                    f"(model.max_prefix_len): '{text[:60]}'")
        return None

    def encode(self, task: int, texts: Sequence[str], what: str = "prompt") -> torch.Tensor:
        """[B, P] left-padded prefixes; an empty prompt or one longer than the model's prefix is refused."""
        for text in texts:
            error = self.prompt_error(task, text, what)
            if error is not None:
                raise UserError(error)
        return torch.stack([encode_prefix(self.text_tok, task, text, self.layout) for text in texts])

    @torch.no_grad()
    def text_to_image(self, prompts: Sequence[str], gen, seed: int, batch_size: int,
                      first_row: int = 0, progress: Optional[Callable[[int], None]] = None,
                      with_first: bool = False) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """uint8 [len(prompts), H, W, 3]; row i draws from generator (seed, first_row + i).
        `progress(n)` is called after each batch with its number of rows.

        gen.redraw: each picture drawn is passed once through the image tokenizer (`redraw`), and what it
        redraws is the image (and its tokens those the tokenizer gave it).
        gen.candidates K > 1: row i also draws K - 1 more images, candidate k from generator (seed,
        first_row + i, k), and keeps the one `candidate_score` rates highest: the model's own reading of it
        as the prompt, less what the tokenizer would change in it. Candidate 0 is the image K = 1 gives.
        `with_first`: return (kept images, candidate 0 of each row), so one pass yields both what K
        candidates give and what a single draw gives."""
        prefix = self.encode(T2I, prompts)
        if gen.candidates > 1:
            self._check_captions(prompts)
        uncond = self.encode(UNCOND, [""]) if gen.cfg != 1.0 else None
        images, firsts = [], []
        for start in range(0, len(prompts), batch_size):
            rows = prefix[start:start + batch_size].to(self.device)
            un = None if uncond is None else uncond.expand(len(rows), -1).to(self.device)
            best = best_score = None
            for k in range(gen.candidates):
                gens = row_generators(seed, first_row + start, len(rows), candidate=k)
                with self.autocast(gen):
                    tokens = generate_images(self.model, rows, un, gen, gens).float().cpu()
                pictures = self.image_tok.decode(tokens)
                if gen.redraw:
                    tokens, pictures = self.redraw(pictures)
                if gen.candidates == 1:
                    best = pictures
                    break
                score = self.candidate_score(tokens, pictures, prompts[start:start + batch_size],
                                             gen.redraw_weight)
                if best is None:
                    best, best_score = pictures, score
                    if with_first:
                        firsts.append(pictures)
                else:  # ties keep the earlier candidate
                    better = score > best_score
                    best = np.where(better.cpu().numpy()[:, None, None, None], pictures, best)
                    best_score = torch.where(better, score, best_score)
            images.append(best)
            if progress is not None:
                progress(len(rows))
        kept = np.concatenate(images)
        if not with_first:
            return kept
        return kept, (np.concatenate(firsts) if firsts else kept)

    def redraw(self, pictures: np.ndarray) -> Tuple[torch.Tensor, np.ndarray]:
        """(tokens, pictures): `pictures` (uint8 [B, H, W, 3]) encoded by the image tokenizer, and those
        tokens decoded: the pictures as the tokenizer draws them."""
        tokens = self.image_tok.encode(pictures)
        return tokens, self.image_tok.decode(tokens)

    def candidate_score(self, tokens: torch.Tensor, pictures: np.ndarray, captions: Sequence[str],
                        redraw_weight: float) -> torch.Tensor:
        """[B] how well picture i (decoded from tokens[i]) shows captions[i], as the best of gen.candidates
        ranks it: the caption's log-likelihood read from the tokens, plus read from the picture encoded
        again (what the user gets, as a held-out image would be read), less `redraw_weight` times the mean
        absolute change of the picture's pixels (grey levels) when the tokenizer redraws it: the
        understanding half judges what the generating half meant and what it drew, and the tokenizer
        judges whether it is a picture it could have drawn."""
        again, redrawn = self.redraw(pictures)
        change = np.abs(redrawn.astype(np.float32) - pictures.astype(np.float32)).reshape(len(pictures), -1)
        score = self.caption_log_likelihood(tokens, captions) + self.caption_log_likelihood(again, captions)
        return score - redraw_weight * torch.from_numpy(change.mean(1)).to(score.device)

    def _check_captions(self, captions: Sequence[str]) -> None:
        for text in captions:
            if not fits(self.text_tok, self.layout, CAPTION, answer=text):
                n = len(suffix_ids(self.text_tok, text))
                raise UserError(f"gen.candidates ranks images by how likely the model captions them with the prompt, "
                                f"but '{text[:60]}' is {n} tokens with EOS and the model's caption holds "
                                f"{self.layout.suffix_len} (model.max_suffix_len); use gen.candidates=1")

    @torch.no_grad()
    def caption_log_likelihood(self, image_tokens: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """[B] log p(caption + EOS | image) under the model's captioning (task CAPTION, in the frame of
        training), summed over the caption's tokens, in fp32."""
        self._check_captions(captions)
        lay, n = self.layout, len(captions)
        batch = build_batch(self.text_tok, lay, [CAPTION] * n, [""] * n, list(captions),
                            torch.as_tensor(image_tokens).float().cpu())
        batch = {k: v.to(self.device) for k, v in batch.items()}
        h = self.model.hidden_states(batch["text_ids"], batch["valid"], batch["image_tokens"])
        targets = batch["text_targets"]
        logp = self.model.backbone.logits(h).float().log_softmax(-1)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (picked * (targets != IGNORE)).sum(1)

    @torch.no_grad()
    def image_to_text(self, image_tokens: torch.Tensor, questions: Sequence[Optional[str]], gen, seed: int,
                      batch_size: int, use_cache: bool = True,
                      progress: Optional[Callable[[int], None]] = None) -> List[str]:
        """A caption for each image whose question is None, else the answer to its question.
        `progress(n)` is called after each batch with its number of rows."""
        prefix = torch.stack([encode_prefix(self.text_tok, CAPTION, "", self.layout) if q is None
                              else self.encode(QA, [q], "question")[0] for q in questions])
        texts: List[str] = []
        for start in range(0, len(questions), batch_size):
            rows = prefix[start:start + batch_size].to(self.device)
            tokens = torch.as_tensor(image_tokens[start:start + batch_size]).float().to(self.device)
            gens = row_generators(seed, start, len(rows))
            with self.autocast(gen):
                out = generate_text(self.model, tokens, rows, gen, gens, use_cache)
            texts += [self.text_tok.decode(ids).strip() for ids in out]
            if progress is not None:
                progress(len(rows))
        return texts


def row_generators(seed: int, first_row: int, count: int, candidate: int = 0) -> List[torch.Generator]:
    """CPU generators, one per row, seeded from (seed, row) so rows never share a stream; candidate k > 0
    of a row (gen.candidates) from (seed, row, k)."""
    def entropy(row):
        return (seed, row) + ((candidate,) if candidate else ())

    return [generator(derived_seed(*entropy(row))) for row in range(first_row, first_row + count)]


def load_checkpoint(ckpt: Optional[str], ema: bool = True, device: Optional[str] = None) -> InferenceModel:
    """A checkpoint directory (None: newest final/ under runs/) -> model in eval mode + its tokenizers.

    Every file read is checked against the checkpoint's checksums first (`engine.checkpoint.load`), and
    weights are read with safetensors (nothing is unpickled). `ema`: the EMA weights when the checkpoint
    has them (a warning otherwise, then the raw weights)."""
    from mmar_cli.data.shards import load_tokenizers
    from mmar_cli.engine import checkpoint
    from mmar_cli.model.mmar import MMAR
    from mmar_cli.model.presets import resolve

    opened = checkpoint.load(newest_checkpoint() if ckpt is None else ckpt, "ckpt")
    path = opened.path
    if ema and not opened.has(checkpoint.EMA):
        warn(f"{path} has no {checkpoint.EMA} (trained with ema_decay=0): using the raw weights")
        ema = False
    name = checkpoint.EMA if ema else checkpoint.MODEL

    text_tok, image_tok = load_tokenizers(path)
    cfg = resolve(opened.config.model)
    model = MMAR(cfg, text_tok.specials)
    try:
        model.load_state_dict(opened.weights(ema))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ckpt: {path / name} does not fit the model in {path / 'config.yaml'}: {first}") from None
    if cfg.vocab_size != text_tok.vocab_size or cfg.token_dim != image_tok.token_dim:
        raise UserError(f"ckpt: {path}: the model expects vocabulary {cfg.vocab_size} and token dim "
                        f"{cfg.token_dim} but its tokenizers give {text_tok.vocab_size} and {image_tok.token_dim}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    source = {"path": str(path), "weights": "ema" if ema else "model", "sha256": opened.sha256(name),
              "manifest": opened.manifest}
    return InferenceModel(model, text_tok, image_tok, source)


# --------------------------------------------------------------------------------------------------
# Images from disk
# --------------------------------------------------------------------------------------------------
def load_image(path: str | Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3]; an image of another size is center-cropped to a square and resized, with a
    warning, because the model only knows images of its training size."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"image: {p} does not exist")
    try:
        image = Image.open(p).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"image: {p} is not a readable image ({e})") from None
    if image.size != (size, size):
        w, h = image.size
        warn(f"{p} is {w}x{h}; the model reads {size}x{size} images: center-cropped and resized")
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.array(image, dtype=np.uint8)
