"""`mmar sample`: determinism, CFG 1 = conditional path, KV cache = no cache, outputs, bad input."""

import hashlib
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from typer.testing import CliRunner

from mmar_cli.app import app
from mmar_cli.config import GenerationConfig
from mmar_cli.data.sequence import CAPTION, T2I, UNCOND, build_batch
from mmar_cli.engine import checkpoint
from mmar_cli.errors import UserError
from mmar_cli.inference import load_checkpoint, newest_checkpoint, row_generators
from mmar_cli.model.generate import generate_images, generate_text
from tiny_checkpoint import DAMAGES, assert_damage_reported, damage, make_checkpoint, make_data

PROMPTS = ["a large red circle at the top left", "a small blue cross in the center"]
FAST = ["gen.iterations=2", "gen.diffusion_steps=2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    data = make_data(root / "data", num_test=4)
    return make_checkpoint(data, root / "run")


@pytest.fixture(scope="module")
def model(ckpt):
    return load_checkpoint(str(ckpt), device="cpu")


def gen(**kw):
    return OmegaConf.merge(OmegaConf.structured(GenerationConfig), {"iterations": 2, "diffusion_steps": 3, **kw})


def mmar(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.slow
def test_fixed_seed_gives_the_same_images_whatever_the_batch_size(model):
    a = model.text_to_image(PROMPTS * 2, gen(), seed=3, batch_size=4)
    b = model.text_to_image(PROMPTS * 2, gen(), seed=3, batch_size=1)
    c = model.text_to_image(PROMPTS * 2, gen(), seed=4, batch_size=4)
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[2])  # same prompt, another row: another image


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_sets_the_arithmetic_of_both_directions(model, precision, dtype):
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
             for m in (model.model.head.out, model.model.backbone.lm_head)]
    try:
        images = model.text_to_image(PROMPTS[:1], gen(precision=precision), seed=0, batch_size=1)
        caption = model.image_to_text(model.image_tok.encode(images), [None], gen(precision=precision), 0, 1)
    finally:
        for h in hooks:
            h.remove()
    assert images.shape == (1, 32, 32, 3) and len(caption) == 1
    assert seen and set(seen) == {dtype}


@pytest.mark.slow
def test_cfg_scale_one_is_the_conditional_path(model):
    prefix, uncond = model.encode(T2I, PROMPTS), model.encode(UNCOND, ["", ""])
    m = model.model
    seeded = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    guided = generate_images(m, prefix, uncond, gen(cfg=1.0), seeded())
    plain = generate_images(m, prefix, None, gen(cfg=1.0), seeded())
    strong = generate_images(m, prefix, uncond, gen(cfg=4.0), seeded())
    assert torch.equal(guided, plain)
    assert not torch.allclose(strong, plain)


@pytest.fixture(scope="module")
def ae_model(tmp_path_factory):
    """A checkpoint on `ae` tokens (a briefly trained autoencoder, whose round trip changes a picture)."""
    root = tmp_path_factory.mktemp("sample-ae")
    ae = ["image_tokenizer.kind=ae", "image_tokenizer.ae_channels=8", "image_tokenizer.ae_width=8",
          "image_tokenizer.ae_steps=40", "image_tokenizer.ae_decoder_steps=0", "image_tokenizer.ae_precision=32"]
    data = make_data(root / "data", num_test=4, overrides=ae)
    return load_checkpoint(str(make_checkpoint(data, root / "run")), device="cpu")


def test_redraw_gives_the_picture_the_tokenizer_draws(ae_model):
    model, m = ae_model, ae_model.model
    prefix, uncond = model.encode(T2I, PROMPTS), model.encode(UNCOND, [""]).expand(2, -1)
    with model.autocast(gen()):
        t = generate_images(m, prefix, uncond, gen(), row_generators(5, 0, 2)).float()
    drawn = model.image_tok.decode(t)
    tokens, redrawn = model.redraw(drawn)
    assert torch.equal(tokens, model.image_tok.encode(drawn))
    assert np.array_equal(redrawn, model.image_tok.decode(tokens))
    assert np.abs(redrawn.astype(int) - drawn.astype(int)).mean() > 1  # this tokenizer's round trip is not exact
    assert np.array_equal(model.text_to_image(PROMPTS, gen(redraw=False), seed=5, batch_size=2), drawn)
    assert np.array_equal(model.text_to_image(PROMPTS, gen(), seed=5, batch_size=2), redrawn)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1e4])
def test_candidates_keep_the_image_read_best_and_changed_least(ae_model, weight):
    """Each candidate is drawn, redrawn by the tokenizer, and scored on the tokens of what was redrawn, on
    that picture encoded again, and on how much a further redraw changes it."""
    model, m, prompts = ae_model, ae_model.model, PROMPTS * 2
    g4 = gen(candidates=4, redraw_weight=weight)
    read, score = [], model.caption_log_likelihood
    model.caption_log_likelihood = lambda tokens, captions: read.append(tokens) or score(tokens, captions)
    try:
        kept = model.text_to_image(prompts, g4, seed=2, batch_size=4)
    finally:
        del model.caption_log_likelihood
    prefix, uncond = model.encode(T2I, prompts), model.encode(UNCOND, [""]).expand(4, -1)
    pictures, likelihoods, changes = [], [], []
    for k in range(4):  # each candidate drawn alone, from its own generators
        with model.autocast(g4):
            t = generate_images(m, prefix, uncond, g4, row_generators(2, 0, 4, candidate=k)).float()
        tokens = model.image_tok.encode(model.image_tok.decode(t))
        pictures.append(model.image_tok.decode(tokens))
        again = model.image_tok.encode(pictures[-1])
        likelihoods.append(model.caption_log_likelihood(tokens, prompts) + model.caption_log_likelihood(again, prompts))
        once_more = model.image_tok.decode(again).astype(np.float64)
        changes.append(torch.from_numpy(np.abs(once_more - pictures[-1]).mean((1, 2, 3))).float())
        assert torch.equal(read[2 * k], tokens) and torch.equal(read[2 * k + 1], again)
    likelihoods, changes = torch.stack(likelihoods), torch.stack(changes)  # [K, rows]
    assert (likelihoods < 0).all() and (changes > 0).all() and len(set(changes.flatten().tolist())) == 16
    best = (likelihoods - weight * changes).argmax(0)
    assert np.array_equal(kept, np.stack([pictures[int(k)][i] for i, k in enumerate(best)]))
    if weight == 1e4:  # the weight decides: the least changed, which is not the likeliest everywhere
        assert torch.equal(best, changes.argmin(0)) and not torch.equal(best, likelihoods.argmax(0))
    # candidate 0 is the image one candidate gives, and with_first returns it beside the kept one
    assert np.array_equal(pictures[0], model.text_to_image(prompts, gen(), seed=2, batch_size=4))
    kept_again, firsts = model.text_to_image(prompts, g4, seed=2, batch_size=1, with_first=True)
    assert np.array_equal(kept_again, kept) and np.array_equal(firsts, pictures[0])


def test_caption_log_likelihood_is_minus_the_training_caption_loss(model):
    images = torch.randn(2, *model.image_tok.encode(np.zeros((1, 32, 32, 3), np.uint8)).shape[1:])
    ll = model.caption_log_likelihood(images, PROMPTS)
    for i, caption in enumerate(PROMPTS):
        batch = build_batch(model.text_tok, model.layout, [CAPTION], [""], [caption], images[i:i + 1])
        n = len(model.text_tok.encode(caption)) + 1  # with EOS
        with torch.no_grad():
            loss = model.model(batch)["loss_txt"]
        torch.testing.assert_close(ll[i], -loss * n, atol=1e-4, rtol=1e-4)


def test_candidates_refuse_a_prompt_longer_than_a_caption(model):
    long = PROMPTS[0]
    while len(model.text_tok.encode(long)) + 1 <= model.layout.suffix_len:
        long += " left"
    model._check_captions([PROMPTS[0]])  # fits: no error
    with pytest.raises(UserError, match=r"caption holds \d+ \(model.max_suffix_len\); use gen.candidates=1"):
        model._check_captions([long])


@pytest.mark.parametrize("text_temperature", [0.0, 1.0])
def test_kv_cached_and_uncached_decoding_agree(model, text_temperature):
    images = torch.randn(3, *model.image_tok.encode(np.zeros((1, 32, 32, 3), np.uint8)).shape[1:])
    prefix = model.encode(CAPTION, ["", "", ""])
    g = gen(text_temperature=text_temperature, top_k=20)
    out = [generate_text(model.model, images, prefix, g, [torch.Generator().manual_seed(i) for i in range(3)],
                         use_cache)
           for use_cache in (True, False)]
    assert out[0] == out[1]
    assert max(len(row) for row in out[0]) > 0


def test_text_to_image_writes_pngs_grid_and_settings(ckpt, tmp_path):
    out = tmp_path / "s"
    code, _, err = mmar("sample", "--ckpt", ckpt, "-p", PROMPTS[0], "-p", PROMPTS[1], "-n", "2", "--cfg", "1.5",
                        "--seed", "7", "--sampler", "ddpm", "--raw", "--out", out, *FAST)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["000-00.png", "000-01.png", "001-00.png", "001-01.png",
                                                        "grid.png"]
    assert np.asarray(Image.open(out / "000-00.png")).shape == (32, 32, 3)
    meta = json.loads((out / "samples.json").read_text())
    weights = Path(ckpt, "model.safetensors").read_bytes()
    assert meta["checkpoint"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert meta["checkpoint"]["weights"] == "model"
    c = meta["config"]
    assert (c["seed"], c["ema"], c["num_images"], c["prompts"]) == (7, False, 2, PROMPTS)
    assert (c["gen"]["cfg"], c["gen"]["sampler"], c["gen"]["iterations"], c["gen"]["diffusion_steps"]) == \
        (1.5, "ddpm", 2, 2)
    assert [f["file"] for f in meta["images"]] == ["000-00.png", "000-01.png", "001-00.png", "001-01.png"]
    assert meta["images_per_s"] > 0


def test_help_lists_every_option():
    code, out, _ = mmar("sample", "--help")
    assert code == 0
    for option in ["--prompt", "--prompts-file", "--image", "--ckpt", "--out-shards", "--num-images", "--cfg",
                   "--temperature", "--iterations", "--steps", "--sampler", "--candidates", "--seed", "--ema", "--raw",
                   "--batch-size", "--config", "center-cropped"]:
        assert option in out, option


def test_image_to_text_resizes_with_a_warning(ckpt, tmp_path):
    picture = tmp_path / "big.png"
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(picture)
    code, out, err = mmar("sample", "--ckpt", ckpt, "--image", picture, "-p", "what colour is the circle?",
                          "--out", tmp_path / "u")
    assert code == 0, err
    assert "64x48" in err and "center-cropped and resized" in err
    result = json.loads((tmp_path / "u" / "understanding.json").read_text())
    assert [r["task"] for r in result["results"]] == ["qa"]
    assert out.startswith("what colour is the circle? ->")


def test_out_shards_hold_png_txt_json(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    code, _, err = mmar("sample", "--ckpt", ckpt, "--prompts-file", prompts, "-n", "3", "--out-shards",
                        tmp_path / "sh", *FAST)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "sh").iterdir()) == ["samples-000000.tar", "samples.json"]
    names = tarfile.open(tmp_path / "sh" / "samples-000000.tar").getnames()
    assert len(names) == 2 * 3 * 3 and "000001-002.png" in names and "000001-002.txt" in names
    meta = json.load(tarfile.open(tmp_path / "sh" / "samples-000000.tar").extractfile("000001-002.json"))
    assert meta["prompt"] == PROMPTS[1] and meta["iterations"] == 2


def test_bad_inputs_are_one_line_errors(ckpt, tmp_path):
    code, _, err = mmar("sample", "--ckpt", ckpt, "-p", "  ")
    assert code == 2 and "empty prompt" in err
    code, _, err = mmar("sample", "--ckpt", ckpt, "-p", "a red circle " * 20)
    assert code == 2 and "model.max_prefix_len" in err
    code, _, err = mmar("sample", "--ckpt", ckpt.parent, "-p", PROMPTS[0])
    assert code == 2 and "no COMPLETE file" in err
    code, _, err = mmar("sample", "--ckpt", ckpt, "--image", tmp_path / "missing.png")
    assert code == 2 and "missing.png does not exist" in err
    code, _, err = mmar("sample", "--ckpt", ckpt)
    assert code == 2 and "nothing to sample" in err
    assert "Traceback" not in err


def test_missing_weights_and_foreign_weights_are_refused(ckpt, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has no model.safetensors"):
        load_checkpoint(str(broken))
    other = make_checkpoint(Path(ckpt).parents[1] / "data", tmp_path / "wide", model_overrides=["model.width=96"])
    mixed = Path(shutil.copytree(ckpt, tmp_path / "mixed"))
    shutil.copy(other / "ema.safetensors", mixed / "ema.safetensors")
    with pytest.raises(UserError, match=r"ema.safetensors is \d+ bytes, \d+ when written"):
        load_checkpoint(str(mixed))  # another file than the one written there
    checkpoint._write_checksums(mixed)  # as if it had been written so
    with pytest.raises(UserError, match="does not fit the model"):
        load_checkpoint(str(mixed))


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_stops_sample_with_one_line(ckpt, tmp_path, how):
    import shutil

    broken = Path(shutil.copytree(ckpt, tmp_path / "broken"))
    damage(broken / "ema.safetensors", how)
    code, out, err = mmar("sample", "--ckpt", broken, "-p", PROMPTS[0], "--out", tmp_path / "s", *FAST)
    assert_damage_reported(code, out, err, "ckpt", broken / "ema.safetensors", how)
    assert not (tmp_path / "s").exists()


def test_default_checkpoint_is_the_newest_complete_final(ckpt, tmp_path):
    import shutil

    for name in ("old", "new", "broken"):
        shutil.copytree(ckpt, tmp_path / "runs" / name / "final")
    (tmp_path / "runs" / "broken" / "final" / "COMPLETE").unlink()
    now = time.time()
    os.utime(tmp_path / "runs" / "old" / "final" / "COMPLETE", (now - 100, now - 100))
    assert newest_checkpoint(tmp_path / "runs") == tmp_path / "runs" / "new" / "final"
    with pytest.raises(UserError, match="no complete checkpoint"):
        newest_checkpoint(tmp_path / "nothing")
