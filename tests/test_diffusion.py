"""Diffusion: exact x0/eps/v identities, schedules, and a head that learns a conditional 2-D mixture."""

import pytest
import torch

from mmar_cli.model.diffusion import (GaussianDiffusion, alpha_bar_schedule, cfg_combine, v_from_x0_eps,
                                      x0_eps_from_v, x0_from_eps)
from mmar_cli.model.diffusion_head import DiffusionHead


def test_conversions_are_exact_identities_in_float64():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1000, 4, dtype=torch.float64, generator=g), torch.randn(1000, 4, dtype=torch.float64,
                                                                                   generator=g)
    ab = alpha_bar_schedule("cosine", 1000)[torch.randint(0, 1000, (1000,), generator=g)][:, None]
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x_t = a * x0 + s * eps
    v = v_from_x0_eps(x0, eps, a, s)
    x0_v, eps_v = x0_eps_from_v(x_t, v, a, s)
    assert (x0_v - x0).abs().max() <= 1e-10 and (eps_v - eps).abs().max() <= 1e-10
    assert (x0_from_eps(x_t, eps, a, s) - x0).abs().max() <= 1e-10 * (1 / a).max()


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedules_go_from_clean_to_noise(kind):
    ab = alpha_bar_schedule(kind, 1000)
    assert ab.shape == (1000,) and (ab[1:] < ab[:-1]).all()
    assert ab[0] > 0.999 and ab[-1] < 1e-4
    assert torch.equal(alpha_bar_schedule(kind, 1000), ab)


def test_respaced_timesteps_span_the_schedule():
    d = GaussianDiffusion(1000)
    assert d.timesteps(5) == [999, 749, 500, 250, 0]
    assert len(d.timesteps(25)) == 25 and d.timesteps(2000) == list(range(999, -1, -1))


def test_cfg_combine():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert cfg_combine(cond, uncond, 1.0).item() == 3.0
    assert cfg_combine(cond, uncond, 0.0).item() == 1.0
    assert cfg_combine(cond, uncond, 4.0).item() == 9.0


def test_untrained_head_predicts_zero_and_accepts_bf16():
    head = DiffusionHead(token_dim=3, cond_dim=5, width=16, depth=2)
    out = head(torch.randn(4, 3), torch.tensor([0, 10, 500, 999]), torch.randn(4, 5))
    assert out.shape == (4, 3) and torch.equal(out, torch.zeros(4, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(torch.randn(4, 3), torch.tensor(7), torch.randn(4, 5)).dtype == torch.bfloat16


def test_one_timestep_embedding_and_projected_conditions_give_the_same_prediction():
    # what the sampler does: embed the step's t once, project each condition once for all steps
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=3, cond_dim=5, width=16, depth=2)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, cond = torch.randn(4, 3), torch.randn(4, 5)
    c = head.time(torch.tensor(250)) + head.cond_proj(cond)
    assert head.time(torch.tensor(250)).shape == (1, 16)
    torch.testing.assert_close(head.denoise(x, c), head(x, torch.full((4,), 250), cond))



@pytest.mark.parametrize("prediction", ["v", "eps"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_with_the_exact_denoiser_reproduce_the_data(prediction, sampler):
    """For x0 ~ N(mu, sigma^2) the ideal prediction is known in closed form; both samplers, fed it,
    must return N(mu, sigma^2) with the full 1000 steps: this checks the sampler algebra without any
    training. (With fewer steps both are a little too narrow: 30 DDIM steps give 0.94-0.96 of sigma.)"""
    mu, sigma = torch.tensor([1.5, -0.5]), torch.tensor([0.4, 1.2])
    diffusion = GaussianDiffusion(1000, "cosine", prediction)
    g = torch.Generator().manual_seed(0)

    def ideal(x_t, t):
        a, s = diffusion.alpha_bar[t].sqrt().item(), (1 - diffusion.alpha_bar[t]).sqrt().item()
        var = a * a * sigma ** 2 + s * s
        x0 = mu + a * sigma ** 2 * (x_t - a * mu) / var
        eps = s * (x_t - a * mu) / var
        return v_from_x0_eps(x0, eps, a, s) if prediction == "v" else eps

    x = diffusion.sample(ideal, lambda: torch.randn(4000, 2, generator=g), steps=1000, sampler=sampler)
    assert (x.mean(0) - mu).abs().max() < 0.05
    assert (x.std(0) / sigma - 1).abs().max() < 0.04


MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]])
STDS = torch.tensor([0.3, 0.6, 0.15])


@pytest.fixture(scope="module")
def trained():
    """A v-prediction head trained 300 steps on a 3-class 2-D mixture (a class embedding stands in for
    the backbone's hidden state)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(1000, "cosine", "v")
    classes = torch.nn.Embedding(3, 32)
    head = DiffusionHead(token_dim=2, cond_dim=32, width=64, depth=2)
    opt = torch.optim.AdamW(list(head.parameters()) + list(classes.parameters()), lr=1e-2)
    steps = 300
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    for _ in range(steps):
        label = torch.randint(0, 3, (256,))
        x0 = MEANS[label] + STDS[label, None] * torch.randn(256, 2)
        loss = diffusion.loss(head, x0, classes(label), batch_mul=2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    torch.set_num_threads(before)
    return diffusion, classes, head


def _draw(trained, label, n, g, **kw):
    diffusion, classes, head = trained
    cond = classes(torch.full((n,), label))
    with torch.no_grad():
        return diffusion.sample(lambda x_t, t: head(x_t, torch.full((n,), t), cond),
                                lambda: torch.randn(n, 2, generator=g), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_head_reproduces_a_conditional_gaussian_mixture(trained, sampler):
    """Per class: sample mean within 0.15 of the true mean, per-axis std within 25 % of the true std
    (measured: mean error <= 0.07, std ratio 0.82-1.01)."""
    g = torch.Generator().manual_seed(1)
    for label in range(3):
        x = _draw(trained, label, 1000, g, steps=50, sampler=sampler)
        assert (x.mean(0) - MEANS[label]).abs().max() < 0.15, (label, x.mean(0))
        ratio = x.std(0) / STDS[label]
        assert ((ratio > 0.75) & (ratio < 1.25)).all(), (label, x.std(0))


def test_temperature_narrows_the_samples(trained):
    g = torch.Generator().manual_seed(2)
    assert _draw(trained, 1, 500, g, steps=20, sampler="ddim", temperature=0.0).std(0).max() < 1e-4
    cold = _draw(trained, 1, 500, g, steps=20, sampler="ddpm", temperature=0.5).std(0).mean()
    assert cold < 0.9 * _draw(trained, 1, 500, g, steps=20, sampler="ddpm", temperature=1.0).std(0).mean()


def test_bound_clips_every_x0_estimate():
    """A head that predicts far outside the data's range gives samples inside it once clipped."""
    diffusion = GaussianDiffusion(1000, "cosine", "v")
    wild = lambda x_t, t: torch.full_like(x_t, -50.0)  # noqa: E731
    noise = lambda: torch.randn(64, 3, generator=torch.Generator().manual_seed(0))  # noqa: E731
    free = diffusion.sample(wild, noise, 10, "ddim")
    clipped = diffusion.sample(wild, noise, 10, "ddim", bound=1.0)
    assert free.abs().max() > 5
    assert clipped.abs().max() <= 1.0 + 1e-5
