"""What MMAR puts between its parts: image tokens -> backbone width (`EmbeddingViT`) and a backbone hidden
state -> the diffusion head's condition (`VisProjector`)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


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
