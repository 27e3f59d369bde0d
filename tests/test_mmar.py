"""MMAR: losses, masked image modelling, and both generation directions."""

from types import SimpleNamespace

import pytest
import torch

from mmar_cli.config import DiffusionHeadConfig, GenerationConfig, ModelConfig
from mmar_cli.data.sequence import CAPTION, IGNORE, QA, T2I, UNCOND, build_batch, encode_prefix
from mmar_cli.model.generate import (cfg_scale, cosine_known, generate_images, generate_text, iteration_temperature,
                                     token_temperatures)
from mmar_cli.model.mmar import MMAR
from mmar_cli.model.presets import resolve

WORDS = "a red green blue circle square at the top left right what colour is".split()


def fake_tokenizer():
    """A word tokenizer with the text tokenizer's interface: base words then the 8 specials."""
    names = ["pad", "bos", "eos", "boi", "eoi", "gen", "cap", "ans"]
    specials = SimpleNamespace(**{n: len(WORDS) + i for i, n in enumerate(names)})
    return SimpleNamespace(specials=specials, vocab_size=len(WORDS) + len(names),
                           encode=lambda text: [WORDS.index(w) for w in text.split()])


TOK = fake_tokenizer()
S = TOK.specials



def make_model(**kw):
    """A small MMAR; each image token embedded alone and MAR's loss alone, GPT-2's init (the 3x3 embedding,
    the mean loss and the larger init have tests of their own)."""
    torch.manual_seed(0)
    cfg = dict(preset="tiny", width=64, depth=2, heads=4, kv_heads=2, mlp_hidden=96, vocab_size=TOK.vocab_size,
               token_dim=3, image_grid=[2, 3], max_prefix_len=8, max_suffix_len=7, tie_embeddings=False,
               image_proj_kernel=1, embed_init_std=0.02, diffusion=DiffusionHeadConfig(mean_loss=0.0))
    model = MMAR(resolve(ModelConfig(**{**cfg, **kw})), S).eval()
    with torch.no_grad():  # the head starts at exactly zero; give it an opinion so guidance matters
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def a_batch(model, tasks=(T2I, UNCOND, CAPTION, QA)):
    texts = {T2I: "a red circle", UNCOND: "", CAPTION: "", QA: "what colour is the circle"}
    answers = {T2I: None, UNCOND: None, CAPTION: "a blue square at the top", QA: "red"}
    g = torch.Generator().manual_seed(3)
    images = torch.randn(len(tasks), model.layout.num_image_tokens, 3, generator=g)
    return build_batch(TOK, model.layout, list(tasks), [texts[t] for t in tasks], [answers[t] for t in tasks], images)


def gen_config(**kw):
    return GenerationConfig(**{**dict(iterations=3, diffusion_steps=4), **kw})


# --------------------------------------------------------------------------------------------------
# training losses
# --------------------------------------------------------------------------------------------------
def test_forward_returns_weighted_losses_per_task_and_trains_every_part(model):
    batch = a_batch(model)
    model.train()
    out = model(batch, w_img=0.5, w_txt=2.0)
    model.eval()
    assert set(out) == {"loss", "loss_img", "loss_txt", "loss_t2i", "loss_uncond", "loss_caption", "loss_qa"}
    torch.testing.assert_close(out["loss"], 0.5 * out["loss_img"] + 2.0 * out["loss_txt"])
    assert all(torch.isfinite(v) and v > 0 for v in out.values())
    model.zero_grad()
    out["loss"].backward()
    for name in ("backbone.lm_head.weight", "backbone.layers.0.mlp.up_proj.weight", "head.out.weight",
                 "image_embed.mask_embed", "image_embed.proj.weight", "vis_proj.net.0.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.zero_grad()


def test_mean_loss_regresses_each_masked_token_from_its_condition():
    model = make_model(diffusion=DiffusionHeadConfig(mean_loss=0.5)).train()
    assert make_model().mean_head is None  # weight 0: MAR's loss only, no read-out
    batch = a_batch(model)
    seen = {}
    real_head = model.mean_head.forward
    model.mean_head.forward = lambda z: seen.setdefault("pred", real_head(z))
    torch.manual_seed(0)
    out = model(batch, w_img=1.0, w_txt=1.0)
    # the read-out saw one condition per masked token of the generation rows (T2I and UNCOND)
    torch.manual_seed(0)
    masked = model.random_mask(batch["gen_rows"])
    assert seen["pred"].shape == (int(masked.sum()), 3) and masked[2:].sum() == 0
    expected = ((seen["pred"] - batch["image_tokens"][masked]) ** 2).mean()
    torch.testing.assert_close(out["loss_mean"], expected)
    torch.testing.assert_close(out["loss"], out["loss_img"] + out["loss_txt"] + 0.5 * out["loss_mean"])
    out["loss_mean"].backward()
    for name in ("mean_head.weight", "vis_proj.net.0.weight", "backbone.layers.0.mlp.up_proj.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_embed_init_std_sets_what_the_backbone_reads_first():
    big, small = make_model(embed_init_std=0.3, width=128), make_model(width=128)
    for model, std in ((big, 0.3), (small, 0.02)):
        for p in (model.backbone.embed_tokens.weight, model.image_embed.mask_embed, model.image_embed.row_embed):
            assert abs(float(p.std()) - std) < 0.25 * std
    # the rest of the backbone keeps its init
    assert abs(float(big.backbone.layers[0].mlp.up_proj.weight.std()) - 0.02) < 0.002


def test_text_loss_is_the_cross_entropy_of_the_supervised_suffix(model):
    batch = a_batch(model, (CAPTION,))
    out = model(batch)
    assert out["loss_img"] == 0 and set(out) == {"loss", "loss_img", "loss_txt", "loss_caption"}
    with torch.no_grad():
        h = model.hidden_states(batch["text_ids"], batch["valid"], batch["image_tokens"])
        logits = model.backbone.logits(h)[0]
    lay = model.layout
    suffix = TOK.encode("a blue square at the top") + [S.eos]
    # position t predicts token t+1: EOI predicts the first suffix word
    expected = torch.nn.functional.cross_entropy(logits[lay.eoi:lay.eoi + len(suffix)], torch.tensor(suffix))
    torch.testing.assert_close(out["loss_txt"], expected)


@pytest.mark.parametrize("split_tasks, passes", [(False, 1), (True, 4)])
def test_training_reads_the_full_frames_states_at_the_positions_its_losses_use(split_tasks, passes):
    model = make_model(max_prefix_len=10, split_tasks=split_tasks)  # room for padding left of every prompt
    batch = a_batch(model, (T2I, CAPTION, QA, UNCOND, T2I, CAPTION))
    lay = model.layout
    torch.manual_seed(2)
    random = model.random_mask(batch["gen_rows"])
    first_only = torch.zeros_like(random)  # a masked token that attends to known ones after it
    first_only[batch["gen_rows"], 0] = True
    for masked in (random, first_only):
        read = batch["text_targets"] != IGNORE
        read[:, lay.image_start:lay.image_end] |= masked
        args = (batch["text_ids"], batch["valid"], batch["image_tokens"], masked)
        with torch.no_grad():
            full = model.hidden_states(*args)
            cut = model.read_states(*args, batch["task"], read)
        assert cut.shape == full.shape and read.sum() > 10
        torch.testing.assert_close(cut[read], full[read], atol=1e-5, rtol=1e-5)
        if split_tasks:  # each row computed only where its own losses read
            assert not cut[~read].any()
        assert cut.isfinite().all()
        assert len(model.read_spans(batch["task"], batch["valid"], read)) == passes  # one per task, or one


def test_diffusion_loss_reads_only_masked_tokens_of_generation_rows(model):
    batch = a_batch(model, (T2I, CAPTION))
    torch.manual_seed(5)
    before = model(batch)
    torch.manual_seed(5)
    masked = model.random_mask(batch["gen_rows"])
    other = dict(batch, image_tokens=batch["image_tokens"].clone())
    other["image_tokens"][1] += 1.0  # the understanding row's image: not a diffusion target
    torch.manual_seed(5)
    after = model(other)
    assert after["loss_img"] == before["loss_img"]
    other["image_tokens"][0][masked[0]] += 1.0  # masked tokens of the generation row: the targets
    torch.manual_seed(5)
    assert model(other)["loss_img"] != before["loss_img"]


@pytest.mark.parametrize("option, perturbed, untouched", [("known_noise", (T2I, T2I), (CAPTION, QA)),
                                                         ("caption_noise", (CAPTION, QA), (T2I, T2I))])
def test_training_noise_changes_what_its_rows_see_and_never_the_others_nor_outside_training(option, perturbed,
                                                                                            untouched):
    noisy = make_model(**{option: 0.5})
    clean = make_model(**{option: 1e-12})  # the same weights (seed 0) and random draws
    for tasks, train, same in ((untouched, True, True), (perturbed, True, False), (perturbed, False, True)):
        batch = a_batch(clean, tasks)
        torch.manual_seed(5)
        a = clean.train(train)(batch)
        torch.manual_seed(5)
        b = noisy.train(train)(batch)
        assert torch.equal(a["loss"], b["loss"]) is same, (tasks, train)


def test_masked_positions_carry_the_mask_embedding_not_their_values(model):
    batch = a_batch(model, (T2I, T2I))
    masked = model.random_mask(batch["gen_rows"])
    tokens = batch["image_tokens"]
    changed = tokens + 5.0 * masked[..., None]
    with torch.no_grad():
        a = model.hidden_states(batch["text_ids"], batch["valid"], tokens, masked)
        b = model.hidden_states(batch["text_ids"], batch["valid"], changed, masked)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kw", [dict(image_proj_kernel=3), dict(image_proj_kernel=1)])
def test_image_embedding_reads_known_neighbours_and_never_masked_values(kw):
    model = make_model(image_grid=[4, 4], **kw)
    tokens = torch.randn(1, 16, 3)
    masked = torch.zeros(1, 16, dtype=torch.bool)
    masked[0, [5, 15]] = True
    with torch.no_grad():
        base = model.image_embed(tokens, masked)
        hidden_value = model.image_embed(tokens + 7.0 * masked[..., None], masked)
        torch.testing.assert_close(base, hidden_value)  # a masked value reaches no position
        moved = tokens.clone()
        moved[0, 0] += 1.0  # known token at (row 0, col 0)
        delta = (model.image_embed(moved, masked) - base).abs().amax(-1)[0]
    changed = set(torch.nonzero(delta > 1e-6).flatten().tolist())
    # a 3x3 window: (0,0) reaches (0,1), (1,0), (1,1) = positions 1, 4, 5 (5 is masked and still reads it)
    assert changed == ({0, 1, 4, 5} if kw.get("image_proj_kernel") == 3 else {0})


def test_mask_ratios_follow_the_truncated_normal():
    model = make_model(mask_min=0.5, mask_std=0.25, image_grid=[8, 8])
    gen_rows = torch.tensor([True] * 2000 + [False] * 10)
    torch.manual_seed(0)
    masked = model.random_mask(gen_rows)
    counts = masked.sum(1)
    assert (counts[2000:] == 0).all()  # understanding rows see the clean image
    ratio = counts[:2000].float() / 64
    assert ratio.min() >= 0.5 and ratio.max() == 1.0
    # mean of N(1, 0.25) truncated to [0.5, 1]: 1 - 0.25 * (phi(0) - phi(-2)) / (Phi(0) - Phi(-2)) = 0.825
    assert abs(ratio.mean().item() - 0.825) < 0.02
    torch.manual_seed(0)
    assert torch.equal(model.random_mask(gen_rows), masked)  # global RNG: a seeded run is reproducible
    assert (make_model(mask_min=0.0, mask_std=1.0).random_mask(torch.ones(500, dtype=torch.bool)).sum(1) >= 1).all()


def test_forward_under_bf16_autocast(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(a_batch(model))
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# image -> text
# --------------------------------------------------------------------------------------------------
def caption_prompts(model, n):
    prefix = [encode_prefix(TOK, CAPTION, "", model.layout), encode_prefix(TOK, QA, "what colour is the circle",
                                                                           model.layout),
              encode_prefix(TOK, QA, "what is", model.layout)]
    return torch.stack(prefix[:n])


def test_kv_cache_decoding_equals_full_recomputation(model):
    images = torch.randn(3, model.layout.num_image_tokens, 3)
    prompts = caption_prompts(model, 3)
    args = (model, images, prompts, gen_config(max_new_tokens=6))
    cached = generate_text(*args, use_cache=True)
    full = generate_text(*args, use_cache=False)
    assert cached == full and all(len(row) > 0 for row in cached)


def test_text_batch_of_different_prompts_equals_each_alone(model):
    images = torch.randn(3, model.layout.num_image_tokens, 3)
    prompts = caption_prompts(model, 3)
    gen = gen_config(max_new_tokens=6)
    batched = generate_text(model, images, prompts, gen)
    alone = [generate_text(model, images[i:i + 1], prompts[i:i + 1], gen)[0]
             for i in range(3)]
    assert batched == alone


def test_text_sampling_with_row_generators_is_batch_independent(model):
    images = torch.randn(2, model.layout.num_image_tokens, 3)
    prompts = caption_prompts(model, 2)
    gen = gen_config(max_new_tokens=6, text_temperature=1.0, top_k=5, top_p=0.9)

    def seeded(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batched = generate_text(model, images, prompts, gen, generator=seeded(1, 2))
    second = generate_text(model, images[1:], prompts[1:], gen, generator=seeded(2))
    assert batched[1] == second[0]


def test_each_row_stops_at_its_eos(model, monkeypatch):
    """Row 0 emits EOS as its third token, row 1 never: row 0 keeps two tokens, row 1 runs to the end."""
    real = model.backbone.logits
    calls = []

    def scripted(h):
        logits = real(h)
        logits[..., S.eos] = -1e9
        if len(calls) == 2:
            logits[0, ..., S.eos] = 1e9
        calls.append(1)
        return logits

    monkeypatch.setattr(model.backbone, "logits", scripted)
    out = generate_text(model, torch.randn(2, model.layout.num_image_tokens, 3), caption_prompts(model, 2),
                        gen_config(max_new_tokens=5))
    assert len(out[0]) == 2 and len(out[1]) == 5 and S.eos not in out[0] + out[1]


# --------------------------------------------------------------------------------------------------
# text -> image
# --------------------------------------------------------------------------------------------------
def test_cosine_schedule_of_known_tokens():
    for n, k in [(16, 4), (64, 8), (5, 5), (256, 64), (4, 1)]:
        known = [cosine_known(step, k, n) for step in range(k)]
        assert known[-1] == n and known[0] >= 1
        assert all(b > a for a, b in zip(known, known[1:]))  # at least one new token every step
    # 1 - cos(pi/2 * (k+1)/K) of 256 tokens after each of 8 steps
    assert [cosine_known(s, 8, 256) for s in range(8)] == [4, 19, 43, 74, 113, 158, 206, 256]


def t2i_prompts(model):
    lay = model.layout
    cond = torch.stack([encode_prefix(TOK, T2I, "a red circle at the top", lay),
                        encode_prefix(TOK, T2I, "blue square", lay)])
    uncond = torch.stack([encode_prefix(TOK, UNCOND, "", lay)] * 2)
    return cond, uncond


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_image_and_batch_equals_alone(model, sampler):
    cond, uncond = t2i_prompts(model)
    gen = gen_config(cfg=3.0, sampler=sampler)
    a = generate_images(model, cond, uncond, gen, seeded(10, 11))
    b = generate_images(model, cond, uncond, gen, seeded(10, 11))
    assert a.shape == (2, model.layout.num_image_tokens, 3) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    alone = generate_images(model, cond[1:], uncond[1:], gen, seeded(11))
    torch.testing.assert_close(a[1:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, generate_images(model, cond, uncond, gen, seeded(12, 13)))


def test_more_iterations_than_tokens_draws_one_token_per_iteration(model):
    """MAR's 64 iterations on a 6-token image: capped at 6, each token drawn once (it used to draw
    most of them in the first iteration)."""
    cond, _ = t2i_prompts(model)
    n = model.layout.num_image_tokens
    many = generate_images(model, cond, None, gen_config(iterations=64), seeded(1, 2))
    capped = generate_images(model, cond, None, gen_config(iterations=n), seeded(1, 2))
    assert torch.equal(many, capped)
    with pytest.raises(ValueError, match="at most one iteration per token"):
        cosine_known(0, n + 1, n)


def test_the_temperature_falls_linearly_from_first_to_last_iteration(model, monkeypatch):
    gen = gen_config(iterations=4, temperature=0.8, temperature_end=0.2, neighbour_cooling=0.0)
    assert [round(iteration_temperature(gen, s, 4), 6) for s in range(4)] == [0.8, 0.6, 0.4, 0.2]
    assert iteration_temperature(gen_config(temperature=0.7, temperature_end=None), 2, 3) == 0.7
    assert iteration_temperature(gen, 0, 1) == 0.8  # one iteration: the first temperature
    seen = []
    sample = model.diffusion.sample
    monkeypatch.setattr(model.diffusion, "sample", lambda *a: seen.append(a[4]) or sample(*a))
    cond, _ = t2i_prompts(model)
    falling = generate_images(model, cond, None, gen, seeded(1, 2))
    assert [round(t, 6) for t in seen] == [0.8, 0.6, 0.4, 0.2]
    flat = generate_images(model, cond, None, gen_config(iterations=4, temperature=0.8, temperature_end=0.8,
                                                        neighbour_cooling=0.0), seeded(1, 2))
    constant = generate_images(model, cond, None, gen_config(iterations=4, temperature=0.8, temperature_end=None,
                                                            neighbour_cooling=0.0), seeded(1, 2))
    assert torch.equal(flat, constant) and not torch.allclose(falling, constant)


def test_a_token_between_known_neighbours_is_drawn_cooler():
    """gen.neighbour_cooling: the iteration's temperature times (1 - cooling x the share of the token's grid
    neighbours already drawn)."""
    known = torch.zeros(2, 16, dtype=torch.bool)
    known[0, [1, 4, 5]] = True          # row 0: every neighbour of corner token 0 is known
    known[1] = True
    known[1, [0, 5, 15]] = False        # row 1: token 5 has 7 of 8 neighbours known, corner 15 all 3
    idx = torch.tensor([[0, 10], [5, 15]])
    t = token_temperatures(0.8, known, idx, (4, 4), 1.0)
    assert t.shape == (2, 2, 1)
    # row 0: token 0 (3 neighbours, all known) -> 0; token 10 (8 neighbours, token 5 known) -> 0.8 * 7/8
    # row 1: token 5 (8 neighbours, all but token 0 known) -> 0.8 * (1 - 7/8); token 15 (3, all known) -> 0
    assert torch.allclose(t[..., 0], torch.tensor([[0.0, 0.7], [0.1, 0.0]]))
    assert torch.allclose(token_temperatures(0.8, known, idx, (4, 4), 0.5)[0, 1, 0], torch.tensor(0.75))
    assert token_temperatures(0.8, known, idx, (4, 4), 2.0).min() == 0.0  # never below 0


def test_neighbour_cooling_draws_a_token_between_known_ones_at_temperature_0(model, monkeypatch):
    """With cooling 1 and one token per iteration, the last token drawn (every neighbour known) gets temperature
    0 and the first (none known) the iteration's own; the images differ from those of one temperature."""
    seen = []
    sample = model.diffusion.sample
    monkeypatch.setattr(model.diffusion, "sample", lambda *a: seen.append(a[4]) or sample(*a))
    cond, _ = t2i_prompts(model)
    n = model.layout.num_image_tokens
    gen = gen_config(iterations=n, temperature=0.8, temperature_end=0.8)
    cooled = generate_images(model, cond, None, gen, seeded(1, 2))
    assert GenerationConfig().neighbour_cooling == 1.0
    assert torch.allclose(seen[0], torch.full_like(seen[0], 0.8))  # nothing known yet
    assert torch.allclose(seen[-1], torch.zeros_like(seen[-1]))    # every neighbour known
    plain = generate_images(model, cond, None, gen_config(iterations=n, temperature=0.8, temperature_end=0.8,
                                                         neighbour_cooling=0.0), seeded(1, 2))
    assert not torch.allclose(cooled, plain)


def test_cfg_schedules_over_the_iterations():
    scales = {schedule: [cfg_scale(gen_config(cfg=3.0, cfg_schedule=schedule), k, 5) for k in range(5)]
              for schedule in ("falling", "linear", "constant")}
    assert scales["falling"] == [3.0, 2.5, 2.0, 1.5, 1.0]  # the default: guided first draws, unguided last
    assert scales["linear"] == [1.4, 1.8, 2.2, 2.6, 3.0]
    assert scales["constant"] == [3.0] * 5
    assert GenerationConfig().cfg_schedule == "falling"
    assert cfg_scale(gen_config(cfg=3.0, cfg_schedule="falling"), 0, 1) == 3.0  # one iteration: guided


def test_noise_share_gives_an_images_tokens_one_noise_path(model, monkeypatch):
    """gen.noise_share 1: every token of a row gets the same noise at each draw of each iteration, rows
    differ; 0 is the default (each token its own); rows stay what they would be alone."""
    cond, _ = t2i_prompts(model)
    noises = []
    sample = model.diffusion.sample

    def spy(denoise, noise, *rest):
        def logged():
            n = noise()
            noises.append(n)
            return n
        return sample(denoise, logged, *rest)

    monkeypatch.setattr(model.diffusion, "sample", spy)
    gen = gen_config(iterations=4, diffusion_steps=3, sampler="ddpm", noise_share=1.0)
    shared = generate_images(model, cond, None, gen, seeded(1, 2))
    per_draw = len(noises) // 4  # x_T and the ancestral draws of one iteration
    assert per_draw == 3  # x_T + 2 ancestral steps (the last step adds none)
    for k, n in enumerate(noises):
        assert torch.equal(n, n[:, :1].expand_as(n))  # one value per row for all its tokens
        assert torch.equal(n[:, 0], noises[k % per_draw][:, 0])  # the same path in every iteration
        assert not torch.allclose(n[0], n[1])
    noises.clear()
    alone = generate_images(model, cond[1:], None, gen, seeded(2))
    assert torch.allclose(alone[0], shared[1], atol=1e-5)
    noises.clear()
    half = generate_images(model, cond, None, gen_config(iterations=4, diffusion_steps=3, noise_share=0.5),
                           seeded(1, 2))
    assert not torch.equal(noises[-1], noises[-1][:, :1].expand_as(noises[-1]))
    default = generate_images(model, cond, None, gen_config(iterations=4, diffusion_steps=3), seeded(1, 2))
    zero = generate_images(model, cond, None, gen_config(iterations=4, diffusion_steps=3, noise_share=0.0),
                           seeded(1, 2))
    assert torch.equal(default, zero) and not torch.allclose(default, shared) and not torch.allclose(half, shared)


def test_cfg_one_is_exactly_the_conditional_path(model):
    cond, uncond = t2i_prompts(model)
    plain = generate_images(model, cond, None, gen_config(cfg=1.0), seeded(1, 2))
    with_uncond = generate_images(model, cond, uncond, gen_config(cfg=1.0), seeded(1, 2))
    guided = generate_images(model, cond, uncond, gen_config(cfg=4.0), seeded(1, 2))
    assert torch.equal(plain, with_uncond)
    assert not torch.allclose(plain, guided)


def test_generated_tokens_depend_on_the_prompt(model):
    cond, _ = t2i_prompts(model)
    swapped = generate_images(model, cond.flip(0), None, gen_config(), seeded(1, 1))
    same = generate_images(model, cond, None, gen_config(), seeded(1, 1))
    assert not torch.allclose(swapped[0], same[0])
    torch.testing.assert_close(swapped[0], same[1], atol=1e-5, rtol=1e-5)


def test_every_token_drawn_starts_from_its_own_noise(model, monkeypatch):
    cond, _ = t2i_prompts(model)
    starts = []
    real_sample = model.diffusion.sample

    def spy(denoise, noise, *args, **kw):  # record the first draw (the start), then sample as usual
        draws = [noise()]
        starts.append(draws[0])
        return real_sample(denoise, lambda: draws.pop() if draws else noise(), *args, **kw)

    monkeypatch.setattr(model.diffusion, "sample", spy)
    generate_images(model, cond, None, gen_config(), seeded(1, 2))
    assert len(starts) == 3  # one draw per iteration (3 iterations)
    assert sum(x.shape[1] for x in starts) == model.layout.num_image_tokens  # [rows, new tokens, D]
    wide = max(starts, key=lambda x: x.shape[1])
    assert wide.shape[1] > 1 and not torch.allclose(wide[:, 0], wide[:, 1])  # independent per token
    assert not torch.allclose(wide[0], wide[1])  # and per image


def test_a_batch_without_a_task_still_reaches_every_head(model):
    """DDP needs a gradient (zero) for every parameter even when a batch has no generation rows."""
    model.zero_grad()
    model(a_batch(model, (CAPTION,)))["loss"].backward()
    assert torch.equal(model.head.out.weight.grad, torch.zeros_like(model.head.out.weight))
    model.zero_grad()
    model(a_batch(model, (T2I,)))["loss"].backward()
    assert model.backbone.lm_head.weight.grad is not None
    model.zero_grad()


class Refuse(torch.nn.Module):
    """Stands in for a compiled block: any call fails, naming where it came from."""

    def __init__(self, where):
        super().__init__()
        self.where = where

    def forward(self, *a, **kw):
        raise AssertionError(f"compiled {self.where} block called")


def test_compile_training_routes_only_training_passes_through_the_compiled_blocks():
    model = make_model()
    keys = list(model.state_dict())
    model.compile_training()
    assert list(model.state_dict()) == keys  # the same modules: checkpoints do not change
    assert len(model.backbone.compiled) == model.cfg.depth and len(model.head.compiled) == model.cfg.diffusion.depth
    model.backbone.compiled = [Refuse("decoder")] * model.cfg.depth
    model.head.compiled = [Refuse("head")] * model.cfg.diffusion.depth
    batch = a_batch(model)
    with torch.no_grad():
        model(batch)  # eval mode: eager
    model.train()
    with torch.no_grad():
        model(batch)  # training mode without gradients (a validation pass): eager
    with pytest.raises(AssertionError, match="compiled decoder block called"):
        model(batch)
    model.backbone.compiled = None
    with pytest.raises(AssertionError, match="compiled head block called"):
        model(batch)
    model.eval()
    cond, uncond = t2i_prompts(model)
    assert generate_images(model, cond, uncond, gen_config(), seeded(0, 1)).shape[0] == 2  # sampling: eager
