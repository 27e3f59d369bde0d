"""The one attention mask of mixed text/image sequences.

Text is causal. The tokens of one image see each other (MAR-style masked modelling needs every position
of the image to see every known token of it), an image sees everything before it, and text after an
image sees all of it, which plain causality already gives. Padding is never a key. Every query may
attend to itself so no row is fully masked (SDPA would return NaN for it).
"""

from __future__ import annotations

import torch


def build_attention_mask(image_span: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """image_span: [L] or [B, L] long, -1 on text and k >= 0 on the tokens of image span k;
    valid: [B, L] bool, False on padding. Returns [B, 1, L, L] bool, True where query may attend key."""
    B, L = valid.shape
    span = image_span.to(valid.device).expand(B, L)
    idx = torch.arange(L, device=valid.device)
    causal = idx[:, None] >= idx[None, :]
    same_image = (span[:, :, None] == span[:, None, :]) & (span[:, :, None] >= 0)
    allowed = (causal | same_image) & valid[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool, device=valid.device)
    return allowed.unsqueeze(1)
