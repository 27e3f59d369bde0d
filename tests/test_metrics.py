"""Metrics: caption/QA accuracy, tokenizer reconstruction, FID (clean-fid path and in-project path)."""

import math
import urllib.request

import numpy as np
import pytest
import torch

from mmar_cli.data import shapes
from mmar_cli.errors import UserError
from mmar_cli.metrics import accuracy, fid, recon

RED_CIRCLE = {"shape": "circle", "colour": "red", "size": "large", "position": "top left"}
BLUE_SQUARE = {"shape": "square", "colour": "blue", "size": "small", "position": "bottom"}


def _renders(split, n):
    return np.stack([s["image"] for s in shapes.iterate(split, n)])


def test_exact_match_ignores_case_spacing_and_full_stop():
    assert accuracy.exact_match(["A red  circle.", "blue"], ["a red circle", "green"]) == 0.5


def test_caption_hits_score_each_attribute():
    hits = accuracy.caption_hits("a large green circle at the bottom", [RED_CIRCLE])
    assert hits == {"shape": True, "colour": False, "size": True, "position": False, "all": False}
    assert accuracy.caption_hits("a large red circle at the top left", [RED_CIRCLE])["all"]


def test_unparsable_caption_is_wrong_everywhere():
    assert not any(accuracy.caption_hits("red red red", [RED_CIRCLE]).values())


def test_two_shapes_are_matched_in_the_best_order():
    caption = shapes.caption_for([BLUE_SQUARE, RED_CIRCLE])
    assert accuracy.caption_hits(caption, [RED_CIRCLE, BLUE_SQUARE])["all"]
    # one of two shapes missing: nothing is right for every expected shape
    assert accuracy.caption_hits(shapes.caption_for([RED_CIRCLE]), [RED_CIRCLE, BLUE_SQUARE])["all"] is False


def test_mean_hits_averages_rows():
    rows = [accuracy.caption_hits(c, [RED_CIRCLE]) for c in
            ["a large red circle at the top left", "a small red circle at the top left"]]
    assert accuracy.mean_hits(rows) == {"shape": 1.0, "colour": 1.0, "size": 0.5, "position": 1.0, "all": 0.5}


def test_reconstruction_exact_is_inf_and_one():
    images = _renders("test", 4)
    m = recon.reconstruction_metrics(images, images.copy())
    assert math.isinf(m["psnr"]) and m["ssim"] == pytest.approx(1.0)
    noisy = np.clip(images.astype(int) + 8, 0, 255).astype(np.uint8)
    m = recon.reconstruction_metrics(images, noisy)
    assert 25 < m["psnr"] < 40 and m["ssim"] < 1.0


def test_proxy_fid_is_zero_on_itself_and_grows_with_damage():
    ex = fid.feature_extractor(None, torch.device("cpu")) if fid.find_inception(None) is None else None
    if ex is None:
        pytest.skip("Inception weights present in clean-fid's cache; proxy path not taken")
    real = _renders("test", 64)
    other = _renders("val", 64)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    f_real, f_other, f_noise = ex.extract(real), ex.extract(other), ex.extract(noise)
    same = fid.fid(f_real, f_real, ex)
    assert same["name"] == "gen.fid_proxy" and same["value"] < 1e-6 and not same["comparable"]
    assert "not comparable" in same["note"] and "64 samples" in same["note"]
    assert fid.fid(f_real, f_other, ex)["value"] < fid.fid(f_real, f_noise, ex)["value"]


def test_missing_weights_file_is_named():
    with pytest.raises(UserError, match="does not exist.*inception-2015-12-05.pt"):
        fid.find_inception("/nonexistent/inception.pt")


class _FakeInception(torch.nn.Module):
    """Stands in for clean-fid's torchscript file: same `layers` entry point and 2048 features."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                          torch.nn.Linear(48, 2048))

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def test_clean_fid_path_loads_a_local_file_and_never_downloads(tmp_path, monkeypatch):
    torch.jit.script(_FakeInception()).save(str(tmp_path / fid.INCEPTION_FILE))

    def no_network(*args, **kwargs):
        raise AssertionError("clean-fid tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    ex = fid.feature_extractor(str(tmp_path), torch.device("cpu"))
    assert ex.metric == "gen.fid" and ex.comparable and "clean-fid" in ex.evaluator
    real = _renders("test", 8)
    feats = ex.extract(real)
    assert feats.shape == (8, 2048)
    assert np.allclose(feats, ex.extract(real.copy()))


def test_seam_ratio_sees_tiles_and_not_smooth_images():
    from mmar_cli.data import shapes
    from mmar_cli.metrics.seams import boundary_step_ratio, seam_ratio

    ramp = np.broadcast_to(np.arange(32, dtype=np.uint8)[None, None, :, None] * 4, (2, 32, 32, 3))
    assert boundary_step_ratio(ramp, 8) == pytest.approx(1.0)  # every step equal: no seam to see
    true = np.stack([s["image"] for s in shapes.iterate("test", 64, seed=3)])
    assert seam_ratio(true, true, 8) == 1.0
    rng = np.random.default_rng(0)
    offsets = rng.integers(-20, 21, (64, 4, 4, 1)).repeat(8, 1).repeat(8, 2)  # one grey step per 8x8 tile
    tiled = np.clip(true.astype(int) + offsets, 0, 255).astype(np.uint8)
    assert seam_ratio(tiled, true, 8) > 2.0
    assert seam_ratio(tiled, true, 4) < seam_ratio(tiled, true, 8)  # measured on the wrong grid, it sees less
    with pytest.raises(ValueError, match="8-pixel tokens"):
        boundary_step_ratio(true[:, :30], 8)
