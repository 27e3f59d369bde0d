"""A tokenizer.json in Qwen2's layout (byte-level BPE, 151,643 regular tokens, <|endoftext|> <|im_start|>
<|im_end|>), built here with Hugging Face `tokenizers` and read from a local directory as a Qwen2 checkpoint
holds it: Qwen2's ids kept, mmar's markers after them, a row of the qwen2-0.5b backbone for every id, and a
caption through the shards, the training frame and back."""

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale_assets  # noqa: E402

from mmar_cli.config import TextTokenizerConfig, TokenizeConfig, TrainConfig, load_config  # noqa: E402
from mmar_cli.data.sequence import CAPTION, build_batch  # noqa: E402
from mmar_cli.data.shards import decode_sample, load_tokenizers, shard_paths  # noqa: E402
from mmar_cli.model.mmar import MMAR  # noqa: E402
from mmar_cli.model.presets import PRESETS  # noqa: E402
from mmar_cli.tokenizers.text import Specials, build_text_tokenizer  # noqa: E402

QWEN2_IDS = 151646  # 151,643 regular tokens + Qwen2's 3 specials


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return scale_assets.qwen2_tokenizer(tmp_path_factory.mktemp("qwen2"))


def file_tokenizer(path):
    return build_text_tokenizer(OmegaConf.structured(TextTokenizerConfig(kind="file", path=str(path))), [])


def test_qwen2_ids_are_kept_and_mmar_markers_follow_them(qwen2_dir):
    tok = file_tokenizer(qwen2_dir)
    assert tok.base_vocab_size == QWEN2_IDS
    # each of Qwen2's specials is one token under its own id, as in Qwen2's tokenizer.json
    assert [tok.encode(s) for s in scale_assets.QWEN2_SPECIALS] == [[151643], [151644], [151645]]
    # mmar reuses none of them: its 8 markers (begin/end of image among them) come after Qwen2's ids
    assert tok.specials == Specials(pad=151646, bos=151647, eos=151648, boi=151649, eoi=151650, gen=151651,
                                    cap=151652, ans=151653)
    assert tok.vocab_size == 151654

    caption = "a large red circle at the top left, isn't it? 3 shapes\n"
    ids = tok.encode(caption)
    assert max(ids) < 151643 and tok.decode(ids) == caption
    assert tok.decode(tok.encode("Größe 😀 naïve")) == "Größe 😀 naïve"  # byte-level: no unknown token
    # markers and Qwen2's own specials are not text
    s = tok.specials
    assert tok.decode([s.bos, s.cap, s.boi, s.eoi, *ids, s.eos, 151643, s.pad]) == caption


def test_the_qwen2_backbone_has_a_row_for_every_id_and_a_caption_round_trips(qwen2_dir, tmp_path):
    from stages import tokenize
    from mmar_cli.model.factory import model_config

    tokenize.run(load_config(TokenizeConfig, overrides=[
        f"out={tmp_path / 'shapes'}", "shapes.num_train=4", "shapes.num_val=0", "shapes.num_test=0",
        "image_tokenizer.kind=patch", "text_tokenizer.kind=file", f"text_tokenizer.path={qwen2_dir}"]))
    shards = tmp_path / "shapes" / "train"
    tok, image_tok = load_tokenizers(shards)  # from the copy beside the shards, checked against the manifest
    assert tok.spec()["base_vocab_size"] == QWEN2_IDS and tok.specials.boi == 151649

    # the trainer sizes the qwen2-0.5b model from the shards: every id the tokenizer emits has a row and a logit
    cfg = model_config(load_config(TrainConfig, ROOT / "configs" / "pretrain" / "qwen2-0.5b.yaml"), tok, image_tok)
    with torch.device("meta"):
        model = MMAR(cfg)
    assert model.backbone.embed_tokens.num_embeddings == model.backbone.lm_head.out_features == tok.vocab_size
    # and Qwen2-0.5B's own embedding (151,936 rows) covers them all, so init_from_qwen2 copies a row for each
    assert PRESETS["qwen2-0.5b"]["vocab_size"] >= tok.vocab_size

    sample = decode_sample(next(iter(__import__("webdataset").tariterators.tarfile_samples(
        [{"url": shard_paths(shards)[0]}]))))
    lay = model.layout
    batch = build_batch(tok, lay, [CAPTION], [""], [sample["caption"]], torch.as_tensor(sample["tokens"])[None].float())
    ids = batch["text_ids"][0]
    assert ids[lay.boi] == tok.specials.boi and ids[lay.eoi] == tok.specials.eoi
    suffix = ids[lay.suffix_start:].tolist()
    assert suffix[:len(tok.encode(sample["caption"])) + 1] == tok.encode(sample["caption"]) + [tok.specials.eos]
    assert tok.decode(suffix) == sample["caption"]


def test_init_from_qwen2_fills_every_row_the_tokenizer_uses(qwen2_dir, tmp_path):
    pytest.importorskip("transformers")
    from mmar_cli.config import ModelConfig
    from mmar_cli.model.backbone import Backbone
    from mmar_cli.model.presets import resolve
    from mmar_cli.model.qwen2_adapter import load_qwen2_into, read_qwen2

    sizes = dict(width=64, depth=1, heads=2, kv_heads=1, mlp_hidden=128)
    hf_dir = scale_assets.qwen2_checkpoint(tmp_path / "qwen2", **sizes)  # Qwen2-0.5B's 151,936-row embedding
    tok = file_tokenizer(qwen2_dir)
    backbone = Backbone(resolve(ModelConfig(preset="qwen2-0.5b", vocab_size=tok.vocab_size, **sizes)))
    load_qwen2_into(backbone, hf_dir)
    hf_rows = read_qwen2(hf_dir)[1]["model.embed_tokens.weight"]
    assert hf_rows.shape[0] == PRESETS["qwen2-0.5b"]["vocab_size"] > tok.vocab_size
    assert torch.equal(backbone.embed_tokens.weight.detach(), hf_rows[:tok.vocab_size].float())
