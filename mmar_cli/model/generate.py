"""Generation with a trained MMAR: text -> image (MAR's iterative masked decoding with the diffusion head)
and image -> text (greedy or top-k / top-p decoding with a KV cache).

Both run in the training frame (data.sequence), so every token sits at the position it had in training,
and write and stop at the special tokens the model was given (`MMAR.specials`). `generator`: None (torch's
global RNG), one generator, or one per row, which makes each row's output independent of its batch.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from mmar_cli.model.attention_mask import build_attention_mask
from mmar_cli.model.diffusion import cfg_combine
from mmar_cli.seeding import Generators, draw_device, per_row, randn_rows


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------
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


def token_temperatures(base: float, known: torch.Tensor, idx: torch.Tensor, grid, cooling: float) -> torch.Tensor:
    """[B, m, 1] the temperatures of the tokens `idx` [B, m] drawn now: the iteration's `base` times (1 -
    `cooling` x the share of each token's neighbours on the grid (h, w; up to 8) that `known` [B, N] marks
    as drawn), at least 0. A token drawn between known neighbours has less left to choose; the first
    draws of a region keep the iteration's spread."""
    h, w = grid
    ones = torch.ones(1, 1, 3, 3, device=known.device)
    k = known.float().view(-1, 1, h, w)
    around = torch.nn.functional.conv2d(k, ones, padding=1).view(-1, h * w) - known.float()
    total = torch.nn.functional.conv2d(torch.ones(1, 1, h, w, device=known.device), ones, padding=1).view(1, -1) - 1
    share = (around / total.clamp(min=1)).gather(1, idx)  # a one-token grid has no neighbours: share 0
    return (base * (1.0 - cooling * share)).clamp(min=0.0)[..., None]


def cfg_scale(gen, step: int, iterations: int) -> float:
    """The guidance scale of iteration `step` by gen.cfg_schedule: 'falling' from gen.cfg at the first
    iteration to 1 (none) at the last, 'linear' rising from 1 towards gen.cfg at the last (MAR's), or
    'constant'. Early draws fix what the image shows and need the prompt's push; late ones fill in
    between known neighbours, where guidance's overshoot leaves specks of colour by the shape."""
    if gen.cfg_schedule == "constant":
        return gen.cfg
    if gen.cfg_schedule == "linear":
        return 1.0 + (gen.cfg - 1.0) * (step + 1) / iterations
    return 1.0 + (gen.cfg - 1.0) * (1.0 - step / max(1, iterations - 1))


# --------------------------------------------------------------------------------------------------
# Text -> image
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_images(model, prefix_ids: torch.Tensor, uncond_ids: Optional[torch.Tensor], gen,
                    generator: Generators = None) -> torch.Tensor:
    """Images [B, N, D] from `model` (an MMAR) for left-padded prompts [B, P] (data.sequence.encode_prefix).

    uncond_ids: the unconditional prompts for classifier-free guidance (None or gen.cfg == 1: none).
    generator: one generator, or one per row: then each row's image is what it would be alone.
    The prompt runs once and its keys/values are cached; each of the gen.iterations steps (at most
    one per image token: more would have nothing to draw) re-runs
    BOI + image with the known tokens filled in and the rest masked, and draws the next tokens (in a
    random order per row) with the diffusion head. Only the positions drawn in a step are read out:
    the last block runs its queries and MLP on them alone, and each one's condition is projected
    once for all the diffusion steps.
    """
    lay, s = model.layout, _specials(model)
    B, N, D, dev = prefix_ids.shape[0], lay.num_image_tokens, model.cfg.token_dim, prefix_ids.device
    guided = uncond_ids is not None and gen.cfg != 1.0
    rows = torch.cat((prefix_ids, uncond_ids)) if guided else prefix_ids
    R, P = rows.shape[0], lay.prefix_len
    gens = per_row(generator, B)

    valid = torch.ones(R, lay.gen_len, dtype=torch.bool, device=dev)
    valid[:, :P] = rows != s.pad
    mask = build_attention_mask(lay.image_span()[:lay.gen_len], valid)
    positions = torch.arange(lay.gen_len, device=dev)
    cache = model.backbone.new_cache()
    model.backbone(model.backbone.embed_tokens(rows), positions[:P], mask[:, :, :P, :P], cache)
    boi = model.backbone.embed_tokens(torch.full((R, 1), s.boi, device=dev))

    # gen.noise_share: one noise path per row ([B, 1 + steps, D]: x_T, then each DDPM step), mixed into
    # every token's own noise, so tokens of one image that the model conditions alike are drawn alike
    share = gen.noise_share
    shared = randn_rows(gens, (1 + gen.diffusion_steps, D), dev) if share > 0 else None
    orders = torch.stack([torch.randperm(N, generator=g, device=draw_device(g, dev)).to(dev)
                          for g in gens])
    tokens = torch.zeros(B, N, D, device=dev)
    known = torch.zeros(B, N, dtype=torch.bool, device=dev)
    n_known = 0
    iterations = min(gen.iterations, N)
    for step in range(iterations):
        n_next = cosine_known(step, iterations, N)
        idx = orders[:, n_known:n_next]  # [B, m]: this step's new positions
        image = model.image_embed(tokens, ~known).to(boi.dtype)
        x = torch.cat((boi, image.repeat(R // B, 1, 1)), dim=1)
        # the hidden states of the positions drawn now, [R, m, width] (BOI is position 0)
        h = model.backbone(x, positions[P:], mask[:, :, P:], cache, update_cache=False,
                           keep=1 + idx.repeat(R // B, 1))
        cond = model.head.cond_proj(model.vis_proj(h).reshape(-1, model.head.cond_proj.in_features))
        scale = cfg_scale(gen, step, iterations)

        def denoise(x_t, t):
            m = x_t.shape[1]
            x_in = x_t.repeat(R // B, 1, 1).reshape(-1, D)
            c = model.head.time(torch.tensor(t, device=dev)) + cond
            pred = model.head.denoise(x_in, c).float().view(R, m, D)
            return cfg_combine(pred[:B], pred[B:], scale) if guided else pred

        shape = (idx.shape[1], D)  # each row's noise from its own generator
        draws = iter(range(1 + gen.diffusion_steps))

        def noise():
            own = randn_rows(gens, shape, dev)
            if shared is None:
                return own
            return math.sqrt(share) * shared[:, next(draws), None] + math.sqrt(1.0 - share) * own

        temperature = iteration_temperature(gen, step, iterations)
        if gen.neighbour_cooling > 0:
            temperature = token_temperatures(temperature, known, idx, model.cfg.image_grid, gen.neighbour_cooling)
        values = model.diffusion.sample(denoise, noise, gen.diffusion_steps, gen.sampler, temperature,
                                        model.cfg.token_bound)
        tokens = tokens.scatter(1, idx[..., None].expand(-1, -1, D), values.to(tokens.dtype))
        known = known.scatter(1, idx, True)
        n_known = n_next
    return tokens


# --------------------------------------------------------------------------------------------------
# Image -> text
# --------------------------------------------------------------------------------------------------
def next_tokens(logits: torch.Tensor, gen, gens: list) -> torch.Tensor:
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


@torch.no_grad()
def generate_text(model, image_tokens: torch.Tensor, prefix_ids: torch.Tensor, gen, generator: Generators = None,
                  use_cache: bool = True) -> List[List[int]]:
    """Text from `model` (an MMAR) after each clean image: [BOS CAP] -> caption or [BOS question ANS] ->
    answer.

    Greedy (gen.text_temperature 0) or top-k/top-p sampling, at most min(gen.max_new_tokens,
    max_suffix_len) tokens; a row stops at EOS (returned without it, nothing after it), the batch
    when every row has stopped. use_cache=False recomputes the whole sequence each token (a check).
    """
    lay, s = model.layout, _specials(model)
    B, dev = prefix_ids.shape[0], prefix_ids.device
    gens = per_row(generator, B)
    ids = torch.full((B, lay.length), s.pad, dtype=torch.long, device=dev)
    ids[:, :lay.prefix_len] = prefix_ids
    ids[:, lay.boi], ids[:, lay.eoi] = s.boi, s.eoi
    valid = torch.ones(B, lay.length, dtype=torch.bool, device=dev)
    valid[:, :lay.prefix_len] = prefix_ids != s.pad
    mask = build_attention_mask(lay.image_span(), valid)
    positions = torch.arange(lay.length, device=dev)
    x = model.embed(ids, image_tokens.to(model.image_embed.mask_embed.dtype))
    cache = model.backbone.new_cache() if use_cache else None

    end = lay.suffix_start  # positions [0, end) are known
    h = model.backbone(x[:, :end], positions[:end], mask[:, :, :end, :end], cache)
    out = torch.empty(B, 0, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(min(gen.max_new_tokens, lay.suffix_len)):
        nxt = next_tokens(model.backbone.logits(h[:, -1]), gen, gens)
        nxt = torch.where(done, torch.full_like(nxt, s.pad), nxt)
        out = torch.cat((out, nxt[:, None]), dim=1)
        done |= nxt == s.eos
        if done.all() or end == lay.length:
            break
        x_new = model.backbone.embed_tokens(nxt[:, None])
        if use_cache:
            h = model.backbone(x_new, positions[end:end + 1], mask[:, :, end:end + 1, :end + 1], cache)
        else:
            x = torch.cat((x[:, :end], x_new, x[:, end + 1:]), dim=1)
            h = model.backbone(x[:, :end + 1], positions[:end + 1], mask[:, :, :end + 1, :end + 1])
        end += 1
    return [_until_eos(row, s.eos) for row in out.tolist()]


def _specials(model):
    if model.specials is None:
        raise ValueError("the model has no special-token ids: build it with MMAR(cfg, specials=text_tok.specials)")
    return model.specials


def _until_eos(row: List[int], eos_id: int) -> List[int]:
    return row[:row.index(eos_id)] if eos_id in row else row
