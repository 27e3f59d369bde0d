"""Gaussian diffusion for the per-token head: schedules, v/eps prediction, DDPM and DDIM samplers.

Notation: a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t), x_t = a·x0 + s·eps, v = a·eps - s·x0.
The head predicts v by default. With eps-prediction the x0 estimate is (x_t - s·eps)/a, which divides
the head's (bf16-rounded) error by a -> 0 at low SNR; with v it is a·x_t - s·v, whose error stays
bounded. That is MMAR's numerical-stability argument (benchmarks/eps_vs_v_bf16.py measures it).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch


# --------------------------------------------------------------------------------------------------
# Schedules and conversions
# --------------------------------------------------------------------------------------------------
def alpha_bar_schedule(kind: str, num_timesteps: int) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1 (float64)."""
    if kind == "cosine":  # Nichol & Dhariwal, with betas clipped at 0.999 as they do
        def f(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999) for i in range(num_timesteps)]
        betas = torch.tensor(betas, dtype=torch.float64)
    elif kind == "linear":  # DDPM's 1e-4..0.02 over 1000 steps, rescaled for other lengths
        scale = 1000 / num_timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown noise schedule '{kind}' (cosine or linear)")
    return torch.cumprod(1 - betas, dim=0)


def v_from_x0_eps(x0, eps, a, s):
    return a * eps - s * x0


def x0_eps_from_v(x_t, v, a, s):
    return a * x_t - s * v, s * x_t + a * v


def x0_from_eps(x_t, eps, a, s):
    return (x_t - s * eps) / a


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: scale 1 returns `cond`, 0 returns `uncond`."""
    return uncond + scale * (cond - uncond)


# --------------------------------------------------------------------------------------------------
# Training loss and sampling
# --------------------------------------------------------------------------------------------------
class GaussianDiffusion:
    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "cosine", prediction: str = "v"):
        if prediction not in ("v", "eps"):
            raise ValueError(f"unknown prediction '{prediction}' (v or eps)")
        self.T = num_train_timesteps
        self.prediction = prediction
        self.alpha_bar = alpha_bar_schedule(schedule, num_train_timesteps)

    def coefs(self, t: torch.Tensor, like: torch.Tensor):
        """a, s at integer timesteps t, shaped to broadcast against `like` ([..., D])."""
        ab = self.alpha_bar.to(like.device)[t.to(like.device)].to(like.dtype)
        return ab.sqrt()[..., None], (1 - ab).sqrt()[..., None]

    def to_x0_eps(self, pred, x_t, a, s):
        if self.prediction == "v":
            return x0_eps_from_v(x_t, pred, a, s)
        return x0_from_eps(x_t, pred, a, s), pred

    def loss(self, head: Callable, x0: torch.Tensor, cond: torch.Tensor, batch_mul: int = 1,
             generator=None) -> torch.Tensor:
        """Per-token MSE [n] of the head on x0 [n, D] given cond [n, C], averaged over `batch_mul`
        noise draws per token (cheap extra signal: the backbone runs once, the small head many times)."""
        n = x0.shape[0]
        x0 = x0.float().repeat(batch_mul, 1)
        cond = cond.repeat(batch_mul, 1)
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        a, s = self.coefs(t, x0)
        target = v_from_x0_eps(x0, eps, a, s) if self.prediction == "v" else eps
        pred = head(a * x0 + s * eps, t, cond)
        return ((pred.float() - target) ** 2).mean(-1).view(batch_mul, n).mean(0)

    def timesteps(self, steps: int) -> list[int]:
        """`steps` training timesteps, evenly spaced from T-1 down to 0 (respacing)."""
        steps = min(steps, self.T)
        return sorted({round(x) for x in torch.linspace(0, self.T - 1, steps).tolist()}, reverse=True)

    @torch.no_grad()
    def sample(self, denoise: Callable, noise: Callable, steps: int, sampler: str = "ddim",
               temperature: Union[float, torch.Tensor] = 1.0, bound: Optional[float] = None) -> torch.Tensor:
        """Draw x0 from x_T. denoise(x_t, t: int) -> the head's prediction at x_t; noise() -> a fresh
        standard normal tensor of the output's shape (the caller decides how noise is drawn per row).

        Both samplers are the same update x_p = a_p·x0 + sqrt(1 - a_p² - σ²)·eps + σ·z: DDIM has σ = 0,
        DDPM's ancestral step has σ² = the posterior variance. `temperature` scales the fresh noise: the
        ancestral noise for DDPM (as MAR does) and the starting noise for DDIM, which has no other: one value,
        or a tensor broadcast against the output (a temperature per token, as [B, m, 1]).
        `bound`: clip each x0 estimate to [-bound, bound] (DDPM's "clip denoised") when the data is
        known to lie there; an undertrained head's early estimates otherwise overshoot.
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler '{sampler}' (ddpm or ddim)")
        x = noise() * (temperature if sampler == "ddim" else 1.0)
        ts = self.timesteps(steps)
        for i, t in enumerate(ts):
            ab_t = float(self.alpha_bar[t])
            ab_p = float(self.alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            a, s = math.sqrt(ab_t), math.sqrt(1 - ab_t)
            x0, eps = self.to_x0_eps(denoise(x, t).float(), x, a, s)
            if bound is not None:
                x0 = x0.clamp(-bound, bound)
                eps = (x - a * x0) / s
            var = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p) if sampler == "ddpm" else 0.0
            x = math.sqrt(ab_p) * x0 + math.sqrt(max(1 - ab_p - var, 0.0)) * eps
            if var > 0:
                x = x + math.sqrt(var) * temperature * noise()
        return x
