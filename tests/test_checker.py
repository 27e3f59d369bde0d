import functools

import numpy as np
import pytest
from scipy import ndimage

from mmar_cli.data import checker, shapes

# Held-out true renders: the test split with a seed no other test uses.
SEED = 2024


@functools.lru_cache(maxsize=None)
def _renders(image_size, max_shapes, n):
    samples = list(shapes.iterate("test", n, seed=SEED, image_size=image_size, max_shapes=max_shapes))
    return [s["image"] for s in samples], [s["attributes"] for s in samples]


def _accuracy(images, expected):
    scores = [checker.score(image, attrs) for image, attrs in zip(images, expected)]
    return {key: float(np.mean([s[key] for s in scores])) for key in checker.ATTRIBUTES + ["all"]}


def _report(name, acc):
    print(f"\nchecker {name}: " + " ".join(f"{k}={v:.4f}" for k, v in acc.items()))


@pytest.mark.parametrize("image_size", [32, pytest.param(64, marks=pytest.mark.slow)])
def test_accuracy_on_true_renders_one_shape(image_size):
    images, expected = _renders(image_size, 1, 2000)
    acc = _accuracy(images, expected)
    _report(f"{image_size}px one shape", acc)
    assert acc["all"] >= 0.99
    assert min(acc.values()) >= 0.99


def test_accuracy_on_true_renders_two_shapes():
    images, expected = _renders(32, 2, 1000)
    assert sum(len(e) == 2 for e in expected) > 400
    acc = _accuracy(images, expected)
    _report("32px up to two shapes", acc)
    assert acc["all"] >= 0.99


def _noisy(images, std, seed=0):
    rng = np.random.default_rng(seed)
    return [np.clip(im + rng.normal(0, std, im.shape), 0, 255).astype(np.uint8) for im in images]


def test_accuracy_under_mild_noise():
    images, expected = _renders(32, 2, 1000)
    acc = _accuracy(_noisy(images, 8), expected)
    _report("32px up to two shapes, noise std 8/255", acc)
    assert acc["all"] >= 0.99


@pytest.mark.parametrize("degrade", ["noise std 32/255", "blur sigma 1px"])
def test_accuracy_on_degraded_renders(degrade):
    # What generated images look like when they are nearly right: grainy, or soft-edged.
    images, expected = _renders(32, 2, 1000)
    images, expected = images[:500], expected[:500]
    if degrade.startswith("noise"):
        images = _noisy(images, 32)
    else:
        images = [ndimage.gaussian_filter(im.astype(np.float32), (1, 1, 0)).round().astype(np.uint8)
                  for im in images]
    acc = _accuracy(images, expected)
    _report(f"32px up to two shapes, {degrade}", acc)
    assert acc["all"] >= 0.97


def test_read_returns_attributes_of_a_known_render():
    attrs = [{"shape": "triangle", "colour": "cyan", "size": "large", "position": "bottom left"},
             {"shape": "cross", "colour": "yellow", "size": "small", "position": "top right"}]
    image = shapes.render(attrs, "white", 64, [(3, -4), (-4, 4)])
    assert checker.read(image, max_shapes=2) == attrs  # largest first
    assert checker.read(image, max_shapes=1) == attrs[:1]


def test_score_is_order_independent_and_per_attribute():
    attrs = [{"shape": "circle", "colour": "red", "size": "large", "position": "top left"},
             {"shape": "square", "colour": "blue", "size": "small", "position": "bottom right"}]
    image = shapes.render(attrs, "black", 32)
    assert checker.score(image, attrs[::-1]) == {"shape": True, "colour": True, "size": True,
                                                 "position": True, "all": True}
    wrong_colour = [dict(attrs[0], colour="green"), attrs[1]]
    assert checker.score(image, wrong_colour) == {"shape": True, "colour": False, "size": True,
                                                  "position": True, "all": False}
    # Only one shape drawn where two are expected: the missing one is wrong on everything.
    single = shapes.render(attrs[:1], "black", 32)
    assert checker.score(single, attrs)["all"] is False
    assert checker.match([attrs[1]], attrs) == {"shape": False, "colour": False, "size": False,
                                                "position": False, "all": False}
    # Extra shapes beyond the expected ones are ignored.
    assert checker.match(attrs, attrs[:1])["all"] is True


@pytest.mark.parametrize("image", [
    np.zeros((32, 32, 3), np.uint8),
    np.full((32, 32, 3), 200, np.uint8),
    np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8),
    np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8),
], ids=["black", "flat gray", "noise 32", "noise 64"])
def test_images_without_a_shape_get_a_best_guess(image):
    for max_shapes in (1, 2):
        found = checker.read(image, max_shapes=max_shapes)
        assert 1 <= len(found) <= max_shapes
        for attr in found:
            assert attr["shape"] in shapes.SHAPES and attr["colour"] in shapes.COLOURS
            assert attr["size"] in shapes.SIZES and attr["position"] in shapes.POSITIONS
    expected = [{"shape": "circle", "colour": "red", "size": "large", "position": "center"}]
    assert set(checker.score(image, expected)) == {"shape", "colour", "size", "position", "all"}


def test_read_rejects_non_images():
    with pytest.raises(ValueError, match="square uint8"):
        checker.read(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="square uint8"):
        checker.read(np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="at least one expected shape"):
        checker.score(np.zeros((32, 32, 3), np.uint8), [])


@pytest.mark.parametrize("max_shapes", [1, 2])
def test_true_renders_have_a_coherent_background(max_shapes):
    images, expected = _renders(32, max_shapes, 1000)
    coherent = [checker.background_coherent(im, len(e)) for im, e in zip(images, expected)]
    assert np.mean(coherent) == 1.0
    # grain well inside the tolerance (std 4/255: 6 sigma = 24) still reads as one background colour
    assert np.mean([checker.background_coherent(im, len(e)) for im, e in zip(_noisy(images, 4), expected)]) >= 0.99


def test_a_tile_of_another_grey_breaks_the_background():
    images, expected = _renders(32, 1, 300)
    tiled = []
    for image in images:
        background = checker._background(image)
        drawn = np.abs(image.astype(np.float32) - background).max(-1) > 0
        # the 8x8 corner tile farthest from the shape, 40 levels nearer mid-grey: a patchwork a person sees
        corner = max([(0, 0), (0, 24), (24, 0), (24, 24)],
                     key=lambda c: -drawn[max(c[0] - 2, 0):c[0] + 10, max(c[1] - 2, 0):c[1] + 10].sum())
        out = image.copy()
        y, x = corner
        out[y:y + 8, x:x + 8] = np.where(background > 127, background - 40, background + 40)
        tiled.append(out)
    assert np.mean([checker.background_coherent(im) for im in tiled]) <= 0.02
    # the attributes are still read right: the checker alone would pass these images
    assert _accuracy(tiled, expected)["all"] >= 0.95


def _drawn(image: np.ndarray) -> np.ndarray:
    return np.abs(image.astype(np.float32) - checker._background(image)).max(-1) > 0


def test_a_shape_drawn_off_its_template_keeps_its_outline_out_of_the_background():
    # the shape grown by 2 px in its own colour: not the template, but nothing beside the shape is off
    images, _ = _renders(32, 1, 300)
    grown = []
    for image in images:
        drawn = _drawn(image)
        colour = np.median(image[drawn], axis=0).astype(np.uint8)
        out = image.copy()
        out[ndimage.binary_dilation(drawn, iterations=2) & ~drawn] = colour
        grown.append(out)
    assert np.mean([checker.background_coherent(im) for im in grown]) >= 0.98


def test_a_rim_of_another_colour_on_the_shape_breaks_the_background():
    # the same 2 px growth, on the upper-left side only and in the palette colour farthest from the shape's:
    # it touches the shape, but a person sees a second colour beside it
    images, _ = _renders(32, 1, 300)
    rimmed = []
    for image in images:
        drawn = _drawn(image)
        ys, xs = np.nonzero(drawn)
        colour = np.median(image[drawn], axis=0)
        other = max(shapes.COLOURS.values(), key=lambda c: np.abs(np.array(c) - colour).sum())
        rim = ndimage.binary_dilation(drawn, iterations=2) & ~drawn
        rim &= (np.arange(32)[:, None] < ys.mean()) & (np.arange(32)[None, :] < xs.mean())
        out = image.copy()
        out[rim] = other
        rimmed.append(out)
    assert np.mean([checker.background_coherent(im) for im in rimmed]) <= 0.02
