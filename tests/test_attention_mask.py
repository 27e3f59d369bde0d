"""The attention mask, checked by what it does to the real model: perturb one input, see which outputs move."""

import pytest
import torch

from mmar_cli.config import ModelConfig
from mmar_cli.model.attention_mask import build_attention_mask
from mmar_cli.model.mmar import MMAR
from mmar_cli.model.presets import resolve

PAD = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = resolve(ModelConfig(preset="tiny", width=64, depth=2, heads=4, kv_heads=2, mlp_hidden=96, vocab_size=30,
                              token_dim=5, image_grid=[2, 3], max_prefix_len=5, max_suffix_len=4))
    return MMAR(cfg).eval()


def _inputs(model):
    lay = model.layout
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (2, lay.length), generator=g)
    ids[0, :2] = PAD  # row 0: left-padded prompt
    ids[1, lay.length - 1] = PAD  # row 1: right-padded suffix
    ids[:, lay.image_start:lay.image_end] = PAD
    valid = ids != PAD
    valid[:, lay.image_start:lay.image_end] = True
    tokens = torch.randn(2, lay.num_image_tokens, 5, generator=g)
    return ids, valid, tokens


def _changed(model, a, b):
    """[B, L] bool: positions whose output differs between inputs a and b (text_ids, valid, tokens)."""
    with torch.no_grad():
        ha, hb = model.hidden_states(*a), model.hidden_states(*b)
    assert torch.isfinite(ha).all()
    return (ha - hb).abs().amax(-1) > 1e-6


def test_later_text_does_not_change_earlier_outputs(model):
    ids, valid, tokens = _inputs(model)
    for t in (1 + model.layout.suffix_start, 3):  # a suffix token, a prompt token
        ids2 = ids.clone()
        ids2[:, t] = (ids[:, t] % 29) + 1
        moved = _changed(model, (ids, valid, tokens), (ids2, valid, tokens))
        assert not moved[:, :t].any()
        assert moved[:, t:][valid[:, t:]].all()  # and the token itself and everything after it do move


def test_any_image_token_changes_the_whole_image_and_what_follows(model):
    ids, valid, tokens = _inputs(model)
    lay = model.layout
    for j in (0, lay.num_image_tokens - 1):
        tokens2 = tokens.clone()
        tokens2[:, j] += 1.0
        moved = _changed(model, (ids, valid, tokens), (ids, valid, tokens2))
        assert moved[:, lay.image_start:lay.image_end].all(), f"image token {j} is not seen by all of its image"
        assert not moved[:, :lay.image_start].any()  # prompt and BOI come before the image
        assert moved[:, lay.eoi:][valid[:, lay.eoi:]].all()


def test_image_outputs_do_not_depend_on_the_suffix(model):
    ids, valid, tokens = _inputs(model)
    lay = model.layout
    ids2 = ids.clone()
    ids2[:, lay.eoi:] = torch.randint(1, 30, ids2[:, lay.eoi:].shape)
    valid2 = valid.clone()
    valid2[:, lay.eoi:] = True
    moved = _changed(model, (ids, valid, tokens), (ids2, valid2, tokens))
    assert not moved[:, :lay.eoi].any()


def test_padding_does_not_change_valid_outputs(model):
    ids, valid, tokens = _inputs(model)
    ids2 = ids.clone()
    ids2[~valid] = 7  # whatever sits on padding positions
    moved = _changed(model, (ids, valid, tokens), (ids2, valid, tokens))
    assert not moved[valid].any()
    assert moved[~valid].all()  # the padding positions themselves did read their new ids


def test_two_images_each_bidirectional_and_causal_between_them():
    # frame: text, image 0 (3 tokens), text, image 1 (2 tokens), text: through a bare backbone
    torch.manual_seed(0)
    model = MMAR(resolve(ModelConfig(preset="tiny", width=32, depth=1, heads=2, kv_heads=1, mlp_hidden=32,
                                     vocab_size=10, token_dim=2, image_grid=[1, 1]))).eval()
    span = torch.tensor([-1, 0, 0, 0, -1, 1, 1, -1])
    mask = build_attention_mask(span, torch.ones(1, 8, dtype=torch.bool))
    x = torch.randn(1, 8, 32)

    def moved_by(pos):
        x2 = x.clone()
        x2[0, pos] += 1.0
        with torch.no_grad():
            d = model.backbone(x2, torch.arange(8), mask) - model.backbone(x, torch.arange(8), mask)
        return (d.abs().amax(-1) > 1e-6)[0].tolist()

    assert moved_by(3) == [False, True, True, True, True, True, True, True]  # last token of image 0
    assert moved_by(5) == [False, False, False, False, False, True, True, True]  # first token of image 1
