"""Every seed of a run and every random generator, made one way.

    seed_run(seed)                  a training run: torch, NumPy, Python and the loader workers, once
    seed_torch(seed)                torch's global RNG (each training step reseeds it: `step_seed`)
    derived_seed(*entropy)          one 32-bit seed from several numbers, the same in every process
    generator(seed)                 a CPU generator: a stream of its own, the global RNG untouched
    forked(seed)                    a block that draws from torch's global RNG, seeded, and leaves it as it was
    rng_state() / set_rng_state()   the global states a checkpoint saves and a resume puts back

Generation draws from one generator or one per row (`per_row`, `randn_rows`): a list gives each row a
stream of its own, so a row's draws do not depend on which rows share its batch.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


# --------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------
def seed_run(seed: int) -> None:
    """Seed a training run: torch, NumPy and Python's RNGs, and (through Lightning) the loader workers."""
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)


def seed_torch(seed: int) -> None:
    torch.manual_seed(seed)


def derived_seed(*entropy: int) -> int:
    """A 32-bit seed from several numbers (NumPy's SeedSequence): near seeds give unrelated streams."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's global RNG at the start of a training step, so a resumed run draws the masks
    and noise the uninterrupted one would have."""
    return derived_seed(seed, step, rank)


def generator(seed: int) -> torch.Generator:
    """A seeded CPU generator (a CPU generator also keeps CUDA runs reproducible)."""
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def forked(seed: int) -> Iterator[None]:
    """Inside: torch's global RNG seeded with `seed` (for what draws from it, e.g. a module's init or
    dropout). After: the global state it had before."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# Draws of generation: global RNG, one generator, or one generator per row
# --------------------------------------------------------------------------------------------------
def per_row(generators: Generators, rows: int) -> list:
    """One generator (or None: the global RNG) per row."""
    if generators is None or isinstance(generators, torch.Generator):
        return [generators] * rows
    if len(generators) != rows:
        raise ValueError(f"{len(generators)} generators for {rows} rows")
    return list(generators)


def draw_device(generator: Optional[torch.Generator], default):
    """Draws from a generator must happen on its device."""
    return default if generator is None else generator.device


def randn_rows(gens: list, shape: tuple, device) -> torch.Tensor:
    """[rows, *shape] standard normal, row i drawn from gens[i]."""
    return torch.stack([torch.randn(shape, generator=g, device=draw_device(g, device)) for g in gens]).to(device)


# --------------------------------------------------------------------------------------------------
# Global RNG states as tensors and plain types (so trainer.pt loads with weights_only=True)
# --------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
