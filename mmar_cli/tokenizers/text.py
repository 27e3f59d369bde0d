"""Text tokenizers: a small BPE trained on the captions, raw UTF-8 bytes, or a tokenizer.json used as is.

Whatever the kind, our 8 special tokens are appended after the base vocabulary, so the sequence layout
(`mmar_cli/data/sequence.py`) finds them under the same names everywhere:

    ids [0, base)            the base tokenizer's own ids (bytes, BPE merges, or e.g. Qwen2's vocabulary)
    ids [base, base + 8)     pad bos eos boi eoi gen cap ans

`spec()` is a plain dict that names everything needed to rebuild the tokenizer (kind, sizes and the
sha256 of its file), so a shard manifest or a checkpoint can tell two tokenizers apart.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

from mmar_cli.errors import UserError

SPECIAL_NAMES = ("pad", "bos", "eos", "boi", "eoi", "gen", "cap", "ans")
TEXT_TOKENIZER_FILE = "text_tokenizer.json"


@dataclass(frozen=True)
class Specials:
    pad: int
    bos: int
    eos: int
    boi: int
    eoi: int
    gen: int
    cap: int
    ans: int

    @classmethod
    def after(cls, base_vocab_size: int) -> "Specials":
        return cls(*range(base_vocab_size, base_vocab_size + len(SPECIAL_NAMES)))


class TextTokenizer:
    """`hf` is a Hugging Face `tokenizers.Tokenizer` ('bpe', 'file') or None for 'byte'."""

    def __init__(self, kind: str, hf=None):
        self.kind = kind
        self.hf = hf
        self.base_vocab_size = 256 if hf is None else hf.get_vocab_size(with_added_tokens=True)
        self.specials = Specials.after(self.base_vocab_size)
        self.vocab_size = self.base_vocab_size + len(SPECIAL_NAMES)

    def encode(self, text: str) -> List[int]:
        if self.hf is None:
            return list(text.encode("utf-8"))
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.base_vocab_size]
        if self.hf is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.hf.decode(ids, skip_special_tokens=True)

    def _file_text(self) -> Optional[str]:
        return None if self.hf is None else self.hf.to_str()

    def spec(self) -> dict:
        text = self._file_text()
        return {
            "kind": self.kind,
            "base_vocab_size": self.base_vocab_size,
            "vocab_size": self.vocab_size,
            "specials": list(SPECIAL_NAMES),
            "file": None if text is None else TEXT_TOKENIZER_FILE,
            "sha256": None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }

    def save(self, directory: str | Path) -> None:
        text = self._file_text()
        if text is not None:
            Path(directory, TEXT_TOKENIZER_FILE).write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------------
def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """A BPE over words: the text is split at spaces (kept as '▁', SentencePiece-style, so decode gives
    back the exact string) and before punctuation, so frequent words become single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    hf.decoder = decoders.Metaspace()
    # Printable ASCII is always in the alphabet, so a prompt with a letter the captions never used
    # still encodes (only characters outside it fall back to <unk>).
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False,
                                  initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation))
    hf.train_from_iterator(texts, trainer)
    return TextTokenizer("bpe", hf)


def byte_tokenizer() -> TextTokenizer:
    return TextTokenizer("byte")


def tokenizer_from_file(path: str | Path) -> TextTokenizer:
    """A tokenizer.json, or a directory that holds one (e.g. a Hugging Face Qwen2 checkpoint)."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"text_tokenizer.path: no tokenizer.json at {p}")
    try:
        return TextTokenizer("file", Tokenizer.from_file(str(p)))
    except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
        raise UserError(f"text_tokenizer.path: cannot read {p}: {e}") from None


def build_text_tokenizer(cfg, texts: Iterable[str]) -> TextTokenizer:
    """From a `TextTokenizerConfig`; `texts` (captions, questions, answers) only feed 'bpe'."""
    if cfg.kind == "bpe":
        return train_bpe(texts, cfg.vocab_size)
    if cfg.kind == "byte":
        return byte_tokenizer()
    if cfg.path is None:
        raise UserError("text_tokenizer.kind=file needs text_tokenizer.path (a tokenizer.json or its directory)")
    return tokenizer_from_file(cfg.path)


def load_text_tokenizer(directory: str | Path, spec: dict) -> TextTokenizer:
    """Rebuild the tokenizer a manifest's `spec` describes from the files in `directory`."""
    if spec["kind"] == "byte":
        tok = byte_tokenizer()
    else:
        path = Path(directory, spec["file"])
        if not path.is_file():
            raise UserError(f"{directory}: missing {spec['file']} (the text tokenizer of these shards)")
        tok = tokenizer_from_file(path)
        tok.kind = spec["kind"]
    if tok.spec() != spec:
        raise UserError(f"{directory}: the text tokenizer file does not match the manifest's spec "
                        f"(sha256 {tok.spec()['sha256']} vs {spec['sha256']})")
    return tok
