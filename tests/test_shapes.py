import hashlib
import itertools

import numpy as np
import pytest

from mmar_cli.data import shapes
from mmar_cli.errors import UserError


def _digest(image: np.ndarray) -> bytes:
    return hashlib.sha1(image.tobytes()).digest()


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("max_shapes", [1, 2])
def test_sample_fields_shapes_and_dtypes(image_size, max_shapes):
    counts = set()
    for sample in shapes.iterate("train", 50, seed=3, image_size=image_size, max_shapes=max_shapes):
        assert sample["image"].shape == (image_size, image_size, 3)
        assert sample["image"].dtype == np.uint8
        assert sample["background"] in shapes.BACKGROUNDS
        assert 1 <= len(sample["attributes"]) <= max_shapes
        counts.add(len(sample["attributes"]))
        for attr in sample["attributes"]:
            assert attr["shape"] in shapes.SHAPES and attr["colour"] in shapes.COLOURS
            assert attr["size"] in shapes.SIZES and attr["position"] in shapes.POSITIONS
        assert len(sample["question"].split()) <= 12
        assert all(len(phrase.split()) <= 8 for phrase in sample["caption"].split(" and "))
        # The image is exactly the reference render of its parameters.
        again = shapes.render(sample["attributes"], sample["background"], image_size, sample["jitter"])
        np.testing.assert_array_equal(again, sample["image"])
    assert counts == set(range(1, max_shapes + 1))
    assert sample["key"] == "train-000049"


def test_two_shapes_are_distinct_kinds_at_distinct_positions():
    for sample in shapes.iterate("val", 200, max_shapes=2):
        attrs = sample["attributes"]
        if len(attrs) == 2:
            assert attrs[0]["shape"] != attrs[1]["shape"]
            assert attrs[0]["position"] != attrs[1]["position"]


def test_same_seed_same_bytes_different_seed_different():
    def images(seed):
        return b"".join(s["image"].tobytes() for s in shapes.iterate("train", 20, seed=seed, max_shapes=2))

    assert images(0) == images(0)
    assert images(0) != images(1)
    first = shapes.make_sample("test", 7, seed=11)
    second = shapes.make_sample("test", 7, seed=11)
    assert first["caption"] == second["caption"] and first["question"] == second["question"]


def test_render_draws_the_colours_asked_for():
    image = shapes.render([{"shape": "square", "colour": "red", "size": "large", "position": "center"}],
                          "gray", 32)
    assert tuple(image[16, 16]) == shapes.COLOURS["red"]
    assert tuple(image[0, 0]) == shapes.BACKGROUNDS["gray"]
    assert (image == shapes.COLOURS["red"]).all(-1).sum() == 13 * 13


def test_caption_round_trip_over_all_attribute_combinations():
    singles = [{"shape": s, "colour": c, "size": z, "position": p} for s, c, z, p in
               itertools.product(shapes.SHAPES, shapes.COLOURS, shapes.SIZES, shapes.POSITIONS)]
    assert len(singles) == 4 * 6 * 2 * 9
    for attr in singles:
        assert shapes.parse_caption(shapes.caption_for([attr])) == [attr]
    for first, second in zip(singles, singles[::-1]):
        assert shapes.parse_caption(shapes.caption_for([first, second])) == [first, second]
    assert shapes.caption_for([singles[0]]) == "a small red circle at the top left"
    assert shapes.parse_caption("A large blue cross in the center.") == [
        {"shape": "cross", "colour": "blue", "size": "large", "position": "center"}]


@pytest.mark.parametrize("bad", ["a red circle", "a huge red circle in the center",
                                 "a large red circle somewhere", ""])
def test_parse_caption_rejects_other_text(bad):
    with pytest.raises(UserError, match="not a shapes caption"):
        shapes.parse_caption(bad)


def test_answers_follow_from_attributes():
    kinds = set()
    for sample in shapes.iterate("train", 400, seed=2, max_shapes=2):
        q, a, attrs = sample["question"], sample["answer"], sample["attributes"]
        if q.startswith("what colour is the "):
            shape = q[len("what colour is the "):-1]
            assert a == next(x["colour"] for x in attrs if x["shape"] == shape)
        elif q.startswith("what shape is "):
            where = q[len("what shape is "):-1]
            assert a == next(x["shape"] for x in attrs if shapes.POSITION_PHRASES[x["position"]] == where)
        elif q.startswith("where is the "):
            colour, shape = q[len("where is the "):-1].split()
            assert a == next(x["position"] for x in attrs if (x["colour"], x["shape"]) == (colour, shape))
        else:
            assert q.startswith("how big is the ")
            colour, shape = q[len("how big is the "):-1].split()
            assert a == next(x["size"] for x in attrs if (x["colour"], x["shape"]) == (colour, shape))
        kinds.add(q.split()[1])
    assert kinds == {"colour", "shape", "is", "big"}


@pytest.mark.parametrize("max_shapes", [1, 2])
def test_splits_never_share_an_image(max_shapes):
    # Different seeds too: a split is a property of the picture, not of the seed.
    seen = {}
    for split, seed in [("train", 0), ("val", 1), ("test", 2)]:
        seen[split] = {_digest(s["image"]) for s in shapes.iterate(split, 2000, seed, max_shapes=max_shapes)}
    assert len(seen["test"]) > 1200  # enough distinct test images that an overlap would show
    assert not seen["train"] & seen["val"]
    assert not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]
    # And every sample's parameters hash into its own split.
    for sample in shapes.iterate("val", 50, max_shapes=max_shapes):
        assert shapes.split_of(sample["attributes"], sample["background"], 32, sample["jitter"]) == "val"


def test_bad_split_or_shape_count_is_a_user_error():
    with pytest.raises(UserError, match="unknown split 'dev'"):
        shapes.make_sample("dev", 0)
    with pytest.raises(UserError, match="max_shapes must be 1 or 2"):
        shapes.make_sample("train", 0, max_shapes=3)
