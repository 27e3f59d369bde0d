"""MMAR: one transformer over discrete text tokens and continuous image tokens.

The backbone reads text embeddings and image-token embeddings in the fixed frame of
mmar_cli/data/sequence.py. Text is predicted by an LM head; each masked image token's value is drawn by
a small diffusion head conditioned on the backbone's hidden state at that token (MAR inside an LLM).
The backbone only ever sees clean or masked image tokens, never noisy ones, so understanding loses no
image information.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmar_cli.data.sequence import IGNORE, TASK_NAMES, Layout
from mmar_cli.model.attention_mask import build_attention_mask
from mmar_cli.model.backbone import Backbone
from mmar_cli.model.diffusion import GaussianDiffusion, cfg_combine
from mmar_cli.model.diffusion_head import DiffusionHead
from mmar_cli.seeding import Generators, draw_device, per_row, randn_rows

# --------------------------------------------------------------------------------------------------
# Image embedding layers
# --------------------------------------------------------------------------------------------------
class EmbeddingViT(nn.Module):
    """Image tokens [B, N, D] -> backbone width: values + learned row/column position, masked tokens
    replaced by a learned mask embedding.

    The values go through a linear map of each token, or with `image_proj_kernel` k > 1 through a k x k
    convolution over the token grid, so a position also sees its neighbours: a shape split over patches is
    then visible at one position, and a masked position reads the known tokens around it (their values are
    zeroed where masked, and a channel says which are known).
    """

    def __init__(self, cfg):
        super().__init__()
        self.grid = tuple(cfg.image_grid)
        self.kernel = cfg.image_proj_kernel
        if self.kernel > 1:  # each position also reads its known neighbours' values (and which are known)
            self.proj = nn.Conv2d(cfg.token_dim + 1, cfg.width, self.kernel, padding=self.kernel // 2)
        else:
            self.proj = nn.Linear(cfg.token_dim, cfg.width)
        # what the backbone reads at masked positions: at GPT-2's 0.02 these are far smaller than the
        # projected values of known tokens (model.embed_init_std)
        std = cfg.embed_init_std
        self.row_embed = nn.Parameter(torch.randn(self.grid[0], cfg.width) * std)
        self.col_embed = nn.Parameter(torch.randn(self.grid[1], cfg.width) * std)
        self.mask_embed = nn.Parameter(torch.randn(cfg.width) * std)

    def forward(self, tokens: torch.Tensor, masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.kernel > 1:  # masked values are zeroed first: nothing of them leaks to a neighbour
            known = torch.ones_like(tokens[..., :1]) if masked is None else (~masked)[..., None].to(tokens.dtype)
            grid = torch.cat([tokens * known, known], -1).transpose(1, 2).unflatten(2, self.grid)
            x = self.proj(grid).flatten(2).transpose(1, 2)
            if masked is not None:
                x = x + masked[..., None] * self.mask_embed.to(x.dtype)
        else:
            x = self.proj(tokens)
            if masked is not None:
                x = torch.where(masked[..., None], self.mask_embed.to(x.dtype), x)
        pos = (self.row_embed[:, None] + self.col_embed[None, :]).reshape(-1, x.shape[-1])
        return x + pos.to(x.dtype)


class VisProjector(nn.Module):
    """Backbone hidden state -> condition of the diffusion head."""

    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, h):
        return self.net(h)


# --------------------------------------------------------------------------------------------------
# Random draws and schedules
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


def cosine_known(step: int, iterations: int, n: int) -> int:
    """Image tokens known after iteration `step` (0-based): 1 - cos(pi/2 (step+1)/K) of them, at least
    one more than before and all of them at the end."""
    if iterations > n:
        raise ValueError(f"{iterations} iterations for {n} tokens: at most one iteration per token")
    if step + 1 >= iterations:
        return n
    before = 0 if step == 0 else cosine_known(step - 1, iterations, n)
    target = math.floor(n * (1 - math.cos(math.pi / 2 * (step + 1) / iterations)))
    # leave at least one token for each remaining iteration
    return min(max(target, before + 1), n - (iterations - step - 1))


def iteration_temperature(gen, step: int, iterations: int) -> float:
    """The diffusion temperature of iteration `step`: gen.temperature, moving linearly to
    gen.temperature_end (when set) at the last iteration. Late draws read many known neighbours, and
    a low temperature keeps them to what those say; early ones need the spread."""
    if gen.temperature_end is None or iterations == 1:
        return gen.temperature
    return gen.temperature + (gen.temperature_end - gen.temperature) * step / (iterations - 1)


def _sample_text(logits: torch.Tensor, gen, gens: list) -> torch.Tensor:
    """Next token per row from logits [B, V]: greedy at text_temperature 0, else top-k / top-p sampling."""
    if gen.text_temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / gen.text_temperature
    if gen.top_k > 0:
        kth = logits.topk(min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > gen.top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(probs[i].to(draw_device(g, probs.device)), 1, generator=g).to(probs.device)
                      for i, g in enumerate(gens)])


# --------------------------------------------------------------------------------------------------
# Core model
# --------------------------------------------------------------------------------------------------
class MMAR(nn.Module):
    """`cfg`: a resolved ModelConfig (presets.resolve) with vocab_size, token_dim and image_grid set."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
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
        """What read_states runs: per task with a read position, (rows, read columns, lo, hi) where
        [lo, hi) spans the first real token of any of its rows to its last read position, or to the end of
        the image when it reads inside it (image tokens see the whole image)."""
        lay, spans = self.layout, []
        for t in task.unique().tolist():
            rows = (task == t).nonzero().squeeze(1)
            cols = read[rows].any(0).nonzero().squeeze(1)
            if cols.numel():
                lo = min(int(valid[rows].any(0).nonzero()[0]), int(cols[0]))
                hi = int(cols[-1]) + 1
                spans.append((rows, cols, lo, max(hi, lay.image_end) if hi > lay.image_start else hi))
        return spans

    def read_states(self, text_ids: torch.Tensor, valid: torch.Tensor, image_tokens: torch.Tensor,
                    masked: torch.Tensor, task: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, L, width] at the positions training reads (`read` [B, L] bool), equal to
        hidden_states' there, zeros elsewhere, for less work: the rows of one task run together on the
        columns they use, from the first real token of any of them to the last read position (a
        text -> image row stops at its image, a caption row skips the prompt's padding), and the last
        block asks only at the read positions. Cutting is exact: padding is never a key, and nothing
        attends to a later position except inside the image, which is kept whole."""
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

    # ----------------------------------------------------------------------------------------------
    # Text -> image
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_images(self, prefix_ids: torch.Tensor, uncond_ids: Optional[torch.Tensor], gen, boi_id: int,
                        generator: Generators = None, *, pad_id: int) -> torch.Tensor:
        """Images [B, N, D] for left-padded prompts [B, P] (data.sequence.encode_prefix).

        uncond_ids: the unconditional prompts for classifier-free guidance (None or gen.cfg == 1: none).
        generator: one generator, or one per row: then each row's image is what it would be alone.
        The prompt runs once and its keys/values are cached; each of the gen.iterations steps (at most
        one per image token: more would have nothing to draw) re-runs
        BOI + image with the known tokens filled in and the rest masked, and draws the next tokens (in a
        random order per row) with the diffusion head. Only the positions drawn in a step are read out:
        the last block runs its queries and MLP on them alone, and each one's condition is projected
        once for all the diffusion steps.
        """
        lay = self.layout
        B, N, D, dev = prefix_ids.shape[0], lay.num_image_tokens, self.cfg.token_dim, prefix_ids.device
        guided = uncond_ids is not None and gen.cfg != 1.0
        rows = torch.cat((prefix_ids, uncond_ids)) if guided else prefix_ids
        R, P = rows.shape[0], lay.prefix_len
        gens = per_row(generator, B)

        valid = torch.ones(R, lay.gen_len, dtype=torch.bool, device=dev)
        valid[:, :P] = rows != pad_id
        mask = build_attention_mask(lay.image_span()[:lay.gen_len], valid)
        positions = torch.arange(lay.gen_len, device=dev)
        cache = self.backbone.new_cache()
        self.backbone(self.backbone.embed_tokens(rows), positions[:P], mask[:, :, :P, :P], cache)
        boi = self.backbone.embed_tokens(torch.full((R, 1), boi_id, device=dev))

        orders = torch.stack([torch.randperm(N, generator=g, device=draw_device(g, dev)).to(dev)
                              for g in gens])
        tokens = torch.zeros(B, N, D, device=dev)
        known = torch.zeros(B, N, dtype=torch.bool, device=dev)
        n_known = 0
        iterations = min(gen.iterations, N)
        for step in range(iterations):
            n_next = cosine_known(step, iterations, N)
            idx = orders[:, n_known:n_next]  # [B, m]: this step's new positions
            image = self.image_embed(tokens, ~known).to(boi.dtype)
            x = torch.cat((boi, image.repeat(R // B, 1, 1)), dim=1)
            # the hidden states of the positions drawn now, [R, m, width] (BOI is position 0)
            h = self.backbone(x, positions[P:], mask[:, :, P:], cache, update_cache=False,
                              keep=1 + idx.repeat(R // B, 1))
            cond = self.head.cond_proj(self.vis_proj(h).reshape(-1, self.head.cond_proj.in_features))
            scale = 1.0 + (gen.cfg - 1.0) * ((step + 1) / iterations if gen.cfg_schedule == "linear" else 1.0)

            def denoise(x_t, t):
                m = x_t.shape[1]
                x_in = x_t.repeat(R // B, 1, 1).reshape(-1, D)
                c = self.head.time(torch.tensor(t, device=dev)) + cond
                pred = self.head.denoise(x_in, c).float().view(R, m, D)
                return cfg_combine(pred[:B], pred[B:], scale) if guided else pred

            shape = (idx.shape[1], D)  # each row's noise from its own generator
            values = self.diffusion.sample(denoise, lambda: randn_rows(gens, shape, dev), gen.diffusion_steps,
                                           gen.sampler, iteration_temperature(gen, step, iterations),
                                           self.cfg.token_bound)
            tokens = tokens.scatter(1, idx[..., None].expand(-1, -1, D), values.to(tokens.dtype))
            known = known.scatter(1, idx, True)
            n_known = n_next
        return tokens

    # ----------------------------------------------------------------------------------------------
    # Image -> text
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_text(self, image_tokens: torch.Tensor, prefix_ids: torch.Tensor, gen, boi_id: int, eoi_id: int,
                      eos_id: int, use_cache: bool = True, generator: Generators = None, *,
                      pad_id: int) -> List[List[int]]:
        """Text after each clean image: [BOS CAP] -> caption or [BOS question ANS] -> answer.

        Greedy (gen.text_temperature 0) or top-k/top-p sampling, at most min(gen.max_new_tokens,
        max_suffix_len) tokens; a row stops at EOS (returned without it, nothing after it), the batch
        when every row has stopped. use_cache=False recomputes the whole sequence each token (a check).
        """
        lay = self.layout
        B, dev = prefix_ids.shape[0], prefix_ids.device
        gens = per_row(generator, B)
        ids = torch.full((B, lay.length), pad_id, dtype=torch.long, device=dev)
        ids[:, :lay.prefix_len] = prefix_ids
        ids[:, lay.boi], ids[:, lay.eoi] = boi_id, eoi_id
        valid = torch.ones(B, lay.length, dtype=torch.bool, device=dev)
        valid[:, :lay.prefix_len] = prefix_ids != pad_id
        mask = build_attention_mask(lay.image_span(), valid)
        positions = torch.arange(lay.length, device=dev)
        x = self.embed(ids, image_tokens.to(self.image_embed.mask_embed.dtype))
        cache = self.backbone.new_cache() if use_cache else None

        end = lay.suffix_start  # positions [0, end) are known
        h = self.backbone(x[:, :end], positions[:end], mask[:, :, :end, :end], cache)
        out = torch.empty(B, 0, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for _ in range(min(gen.max_new_tokens, lay.suffix_len)):
            nxt = _sample_text(self.backbone.logits(h[:, -1]), gen, gens)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out = torch.cat((out, nxt[:, None]), dim=1)
            done |= nxt == eos_id
            if done.all() or end == lay.length:
                break
            x_new = self.backbone.embed_tokens(nxt[:, None])
            if use_cache:
                h = self.backbone(x_new, positions[end:end + 1], mask[:, :, end:end + 1, :end + 1], cache)
            else:
                x = torch.cat((x[:, :end], x_new, x[:, end + 1:]), dim=1)
                h = self.backbone(x[:, :end + 1], positions[:end + 1], mask[:, :, :end + 1, :end + 1])
            end += 1
        return [_until_eos(row, eos_id) for row in out.tolist()]


def _until_eos(row: List[int], eos_id: int) -> List[int]:
    return row[:row.index(eos_id)] if eos_id in row else row


def _per_row_mean(values: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """[B] mean of `values` grouped by their row index (0 for rows without values)."""
    total = torch.zeros(B, device=values.device).index_add(0, rows, values.detach().float())
    count = torch.zeros(B, device=values.device).index_add(0, rows, torch.ones_like(values, dtype=torch.float32))
    return total / count.clamp(min=1)
