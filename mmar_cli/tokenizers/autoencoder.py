"""A small convolutional autoencoder, trained by `mmar tokenize` on the training images: the `ae` tokenizer.

Why: a `pca` token decodes to its own p x p pixel block alone, so tokens drawn a little inconsistently
show as a patchwork of blocks. As in MMAR and MAR (a VAE's latents), the decoder here is a stack of 3x3
convolutions over the whole latent grid: every output pixel sees its neighbouring tokens too, and a
token's edge is drawn from both sides of it.

    encoder   conv 3 -> w, then per level (one per halving): `depth` residual blocks, a 3x3 stride-2 conv
              (channels w, 2w, 4w, 4w, ...); `depth` blocks at the bottom; a 1x1 conv -> C (or 2C: mean
              and log-variance with ae_kl > 0)
    decoder   the mirror: 1x1 conv C -> bottom width, blocks, per level nearest x2 + 3x3 conv, conv -> 3
    loss      L1 (flat backgrounds) + ae_mse x squared error (no large error anywhere: shape corners,
              a cross's arms) + ae_kl x KL(posterior || N(0, 1)) per latent value; with ae_kl > 0 the
              decoder sees latents drawn from the posterior, so it learns to decode a neighbourhood of
              each code (what a diffusion head's samples land in)

Training is seeded (initial weights, batches and posterior draws) and runs on the CPU, in torch's threads:
`ae_steps` AdamW steps of the whole autoencoder with a cosine learning rate, then `ae_decoder_steps` of the
decoder alone (a new cosine from a quarter of the peak) with the encoder, and so every token, fixed: the
decoder then learns the very codes the model is trained on (decoded backgrounds gain most from these steps,
docs/RESULTS.md). `bf16`: the convolutions in bfloat16 under autocast, channels-last (weights, their
gradients and AdamW in fp32); encoding and decoding afterwards run in fp32. Encoding uses the posterior mean.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def widths(width: int, levels: int) -> list[int]:
    """Channels at each resolution, full size first: w, 2w, 4w, 4w, ..."""
    return [width * min(2 ** i, 4) for i in range(levels + 1)]


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Encoder(nn.Module):
    def __init__(self, out_channels: int, width: int, levels: int, depth: int):
        super().__init__()
        ch = widths(width, levels)
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        layers = []
        for i in range(levels):
            layers += [ResBlock(ch[i]) for _ in range(depth)]
            layers.append(nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1))
        layers += [ResBlock(ch[-1]) for _ in range(depth)]
        self.body = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch[-1], out_channels, 1)

    def forward(self, x):
        return self.conv_out(F.silu(self.body(self.conv_in(x))))


class Upsample(nn.Module):
    def __init__(self, ch_in: int, ch_out: int):
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, in_channels: int, width: int, levels: int, depth: int):
        super().__init__()
        ch = widths(width, levels)
        self.conv_in = nn.Conv2d(in_channels, ch[-1], 1)
        layers = [ResBlock(ch[-1]) for _ in range(depth)]
        for i in reversed(range(levels)):
            layers.append(Upsample(ch[i + 1], ch[i]))
            layers += [ResBlock(ch[i]) for _ in range(depth)]
        self.body = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch[0], 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.body(self.conv_in(z))))


class Autoencoder(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] <-> latents [B, C, H/2^levels, W/2^levels]."""

    def __init__(self, channels: int, width: int, levels: int, depth: int, kl: bool):
        super().__init__()
        self.channels, self.kl = channels, kl
        self.encoder = Encoder(2 * channels if kl else channels, width, levels, depth)
        self.decoder = Decoder(channels, width, levels, depth)

    def posterior(self, x):
        """(mean, log-variance or None) of the latents."""
        h = self.encoder(x)
        if not self.kl:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(z)


def _images_to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], as every image tokenizer reads pixels."""
    from mmar_cli.tokenizers.image import _as_unit_range

    return _as_unit_range(images).permute(0, 3, 1, 2)


def lr_schedule(peak: float, steps: int, warmup: int, floor: float):
    """Learning rate at each step: linear warm-up, then cosine down to `floor` x peak."""
    def lr_at(step):
        if step < warmup:
            return peak * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
    return lr_at


def train(model: Autoencoder, images: np.ndarray, steps: int, batch: int, lr: float, mse_weight: float,
          kl_weight: float, seed: int, decoder_steps: int = 0, bf16: bool = False, log=print) -> dict:
    """Fit `model` to uint8 images [M, H, W, 3] (loss: L1 + mse_weight x squared error + kl_weight x KL):
    `steps` of the whole autoencoder, then `decoder_steps` of the decoder alone, with a progress line
    (`log`) every tenth of each; returns {'loss_l1', 'loss_kl', 'seconds'} of the last tenth. Batches and
    posterior draws come from a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    layout = torch.channels_last if bf16 else torch.contiguous_format
    model.to(memory_format=layout).train()
    start = time.monotonic()
    phases = [("ae", model.parameters(), steps, lr_schedule(lr, steps, max(1, min(100, steps // 20)), 0.1)),
              ("ae decoder", model.decoder.parameters(), decoder_steps, lr_schedule(lr / 4, decoder_steps, 1, 0.0))]
    last = {}
    for name, params, n, lr_at in phases:
        if n == 0:
            continue
        model.encoder.requires_grad_(name == "ae")
        params = [p for p in params if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        log_every, sums, count, phase_start = max(1, n // 10), [0.0, 0.0], 0, time.monotonic()
        for step in range(n):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            idx = torch.randint(len(images), (batch,), generator=gen).numpy()
            x = _images_to_input(images[idx]).contiguous(memory_format=layout)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                with torch.set_grad_enabled(name == "ae"):
                    mean, logvar = model.posterior(x)
                mean = mean.float()
                if logvar is not None:
                    logvar = logvar.float()
                    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
                    kl = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).mean()
                else:
                    z, kl = mean, torch.zeros(())
                err = model.decode(z).float() - x
            l1, mse = err.abs().mean(), (err ** 2).mean()
            loss = l1 + mse_weight * mse + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sums[0] += l1.item()
            sums[1] += kl.item()
            count += 1
            if (step + 1) % log_every == 0 or step + 1 == n:
                seconds = time.monotonic() - phase_start
                log(f"{name}: step {step + 1}/{n}, l1 {sums[0] / count:.4f}, kl {sums[1] / count:.3f}, "
                    f"{(step + 1) * batch / seconds:.0f} images/s, elapsed {time.monotonic() - start:.0f} s")
                last = {"loss_l1": sums[0] / count, "loss_kl": sums[1] / count, "seconds": time.monotonic() - start}
                sums, count = [0.0, 0.0], 0
    model.requires_grad_(True)
    model.to(memory_format=torch.contiguous_format).eval()
    return last


@torch.no_grad()
def latent_means(model: Autoencoder, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means [M, C, h, w] of uint8 images [M, H, W, 3]."""
    return torch.cat([model.posterior(_images_to_input(images[i:i + batch]))[0]
                      for i in range(0, len(images), batch)])
