"""Test assets for sample/evaluate: tiny built-in token shards and a random-weight checkpoint written by
the training engine's own checkpoint writer (so the layout is exactly what `mmar pretrain` leaves), and
the ways a file of it gets damaged."""

import re
from pathlib import Path

import torch

from mmar_cli.config import TokenizeConfig, TrainConfig, load_config, to_yaml
from mmar_cli.data.shards import load_tokenizers
from mmar_cli.engine import checkpoint
from mmar_cli.model.mmar import MMAR

# Small enough for a CPU test, big enough to have every part (2 blocks, GQA, a 1-block head).
TINY_MODEL = ["model.width=64", "model.depth=2", "model.heads=2", "model.kv_heads=1", "model.mlp_hidden=128",
              "model.diffusion.width=64", "model.diffusion.depth=1"]


def make_data(root: Path, num_test: int = 16, overrides=()) -> Path:
    from stages import tokenize

    cfg = load_config(TokenizeConfig, overrides=[f"out={root}", "shapes.num_train=64", "shapes.num_val=0",
                                                 f"shapes.num_test={num_test}", *overrides])
    tokenize.run(cfg)
    return root


def make_checkpoint(data: Path, out: Path, model_overrides=TINY_MODEL, seed: int = 0, ema: bool = True) -> Path:
    from mmar_cli.model.factory import model_config

    cfg = load_config(TrainConfig, overrides=[f"data={data / 'train'}", f"out={out}", *model_overrides])
    tok, image_tok = load_tokenizers(data / "train")
    cfg.model = model_config(cfg, tok, image_tok)
    torch.manual_seed(seed)
    model = MMAR(cfg.model)
    # Zero-initialised layers (the head's output, AdaLN gates) would make the conditional and unguided
    # predictions identical; a trained model's are not zero.
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    state = model.state_dict()
    return checkpoint.save(out / "final", model_state=state, ema_state=state if ema else None,
                           trainer_state={"step": 0}, config_yaml=to_yaml(cfg), shard_dir=data / "train",
                           command="tests/tiny_checkpoint.py")


DAMAGES = ("truncated", "altered", "missing")


def damage(file, how):
    """Truncate `file` to half, overwrite (invert) 4000 bytes in its middle (all of a smaller file), or
    delete it."""
    data = bytearray(file.read_bytes())
    if how == "truncated":
        file.write_bytes(bytes(data[:len(data) // 2]))
    elif how == "altered":
        start = max(0, len(data) // 2 - 2000)
        end = min(len(data), start + 4000)
        data[start:end] = bytes(255 - b for b in data[start:end])
        file.write_bytes(bytes(data))
    else:
        file.unlink()


def assert_damage_reported(code, out, err, key, file, how):
    """A stage stopped on `file`, damaged `how`: exit code 2 and one line that names the file, says what is
    wrong with it and what to do, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, out + err
    file = Path(file)
    what = {"truncated": rf"{re.escape(str(file))} is \d+ bytes, \d+ when written \(truncated or overwritten\)",
            "altered": rf"{re.escape(str(file))} does not match its sha256 in COMPLETE \(its bytes changed after "
                       r"it was written\)",
            "missing": rf"{re.escape(str(file.parent))} has no {re.escape(file.name)}, which its COMPLETE lists"}[how]
    assert re.fullmatch(rf"error: {key}: {what}; the checkpoint is damaged: use another checkpoint \(an earlier "
                        r"step-XXXXXXXX/ of the run\) or train it again", lines[0]), lines[0]
