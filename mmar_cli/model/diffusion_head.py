"""The per-token diffusion head: an MLP of residual AdaLN blocks (after MAR's SimpleMLPAdaLN).

Each image token is denoised on its own, conditioned on a timestep embedding plus the projected hidden
state of the backbone at that token's position. Modulations and the output layer start at zero, so the
untrained head predicts 0 and every block starts as the identity (as in DiT/MAR).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [n, dim] of (integer or float) timesteps [n]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs
    return torch.cat((args.cos(), args.sin()), dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, c):
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """head(x_t [n, D], t [n], cond [n, cond_dim]) -> prediction [n, D] (v or eps)."""

    FREQ_DIM = 256

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(self.FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_proj = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        self.compiled: Optional[list] = None  # compiled twins of the blocks, for training (MMAR.compile_training)
        self._init()

    def _init(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        for layer in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, self.time(t) + self.cond_proj(cond))

    def time(self, t: torch.Tensor) -> torch.Tensor:
        """Timestep embedding [n, width] of t [n], or [1, width] of one timestep (0-dim t): a sampler
        whose tokens share the step embeds it once, not once per token."""
        return self.time_embed(timestep_features(t.reshape(-1), self.FREQ_DIM))

    def denoise(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The prediction at x [n, D] given c = time(t) + cond_proj(cond) ([n, width] or [1, width] + ...).
        A sampler projects each token's condition once, not at every diffusion step."""
        h = self.input_proj(x)
        for block in self.compiled if self.compiled and self.training and torch.is_grad_enabled() else self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h), shift, scale))
