"""The in-project feature extractor used for FID when the Inception weights are not on disk.

What it is: a small convolutional network with fixed random weights (seed 0, drawn with
`torch.Generator`, never trained, never downloaded): images are resized to 32x32 and scaled to [-1, 1],
then conv 3->32 (3x3) -> ReLU -> conv 32->32 (3x3, stride 2) -> ReLU -> conv 32->16 (3x3, stride 2)
-> ReLU, and the 16 channels are average-pooled over a 2x2 grid: 64 features that keep colour, edges
and coarse position (which quadrant holds what). Random convolutional features separate image
distributions surprisingly well, but the numbers mean nothing outside this project: an FID from them is
labelled `fid_proxy` and is comparable only with other `fid_proxy` figures at the same sample count.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmar_cli.seeding import generator

NAME = "mmar-random-conv"
VERSION = "1"
SEED = 0
INPUT_SIZE = 32


class RandomConvFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        # Drawn from our own generator so the weights do not depend on the global RNG state.
        g = generator(SEED)
        for conv in self.net:
            if isinstance(conv, nn.Conv2d):
                fan_in = conv.weight[0].numel()
                conv.weight.data = torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
                conv.bias.data.zero_()
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float64 [B, 64]."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.net(x).double().numpy()
