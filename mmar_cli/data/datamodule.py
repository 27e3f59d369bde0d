"""The training data pipeline: token shards -> task mixture -> fixed-frame batches.

    shard list, shuffled by (seed, epoch)
      -> split by rank, then by data-loader worker (resampled at random when there are fewer shards than
         ranks x workers, so every worker has data)
      -> samples (a shard whose sha256 differs from the manifest's, corrupt tars and samples are skipped and
         counted) -> decode; shards of a dataset of at most CACHE_MB on disk are read and decoded once per
         worker and replayed from memory after
      -> a task for each sample (text->image, caption, question->answer, unconditional), drawn from
         TaskMixConfig; samples whose text does not fit the layout are skipped and counted; a sample with
         mirrored tokens (tokenize's image_tokenizer.flip) reads them or the image's at random, for any
         task; an image -> text sample with shifted copies (image_tokenizer.shifts) reads the image or
         one copy
      -> a shuffle buffer -> batches collated by `sequence.build_batch`

The stream is infinite (epoch after epoch) and a pure function of (seed, rank, worker), so a resumed run
replays it and drops the batches it already trained on: the data order is exactly resumable.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import warnings
from typing import Dict, Iterator, List, Optional

import lightning as L
import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmar_cli.data.sequence import CAPTION, QA, T2I, UNCOND, Layout, build_batch, fits
from mmar_cli.data.shards import verify_shard
from mmar_cli.errors import UserError

SHUFFLE_BUFFER = 256  # samples; the shard order is shuffled too
# shards of a dataset at most this large on disk are decoded once per loader worker, then replayed from
# memory: each worker (of each rank) ends up holding about the whole dataset, decoded
CACHE_MB = 256


# --------------------------------------------------------------------------------------------------
# Task mixture
# --------------------------------------------------------------------------------------------------
def assign_task(rng: random.Random, sample: dict, mix) -> tuple[int, str, Optional[str]]:
    """(task, prefix text, suffix text) for one sample, drawn from the mixture `mix` (TaskMixConfig)."""
    caption = sample.get("caption") or ""
    total = mix.t2i + mix.i2t + mix.image_only
    r = rng.random() * total
    if r < mix.t2i:
        if rng.random() < mix.p_uncond:
            return UNCOND, "", None
        return T2I, caption, None
    if r < mix.t2i + mix.i2t:
        if sample.get("question") and sample.get("answer") and rng.random() < mix.qa_share:
            return QA, sample["question"], sample["answer"]
        return CAPTION, "", caption
    return UNCOND, "", None


# --------------------------------------------------------------------------------------------------
# Shard selection
# --------------------------------------------------------------------------------------------------
def shards_for(shards: List[str], seed: int, epoch: int, rank: int, world: int, worker: int,
               num_workers: int) -> List[str]:
    """The shards one worker of one rank reads in one epoch."""
    order = list(shards)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    if len(order) >= world * num_workers:
        return order[rank::world][worker::num_workers]
    # Too few shards to split: every worker draws its own (so ranks read different sample orders).
    rng = random.Random(f"{seed}-{epoch}-{rank}-{worker}")
    return [rng.choice(order)]


def batches_before(step: int, worker: int, num_workers: int) -> int:
    """Batches one worker produced before global batch `step`: a DataLoader takes batch k from worker
    k mod num_workers."""
    return len(range(worker, step, num_workers))


# --------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------
class TokenBatches(IterableDataset):
    """Infinite stream of collated batches for one rank. `start_batch`: batches this rank already trained
    on (skipped on resume). `checksums`: shard -> the sha256 its manifest records; a worker hashes each
    shard when it first opens it and skips one that differs. Each batch also carries the sample `keys` and
    the counters `skipped_long` and `corrupt` (samples, tars or changed shards dropped since the previous
    batch)."""

    def __init__(self, shards: List[str], tok, layout: Layout, mix, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, start_batch: int = 0, decode=None,
                 checksums: Optional[Dict[str, str]] = None):
        self.shards = list(shards)
        self.checksums = checksums
        self._verified: set = set()  # per worker: each shard is hashed once
        # a plain dataclass: DictConfig attribute access is too slow for once per sample
        self.tok, self.layout = tok, layout
        self.mix = OmegaConf.to_object(mix) if isinstance(mix, DictConfig) else mix
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world, self.start_batch = rank, world, start_batch
        if decode is None:
            from mmar_cli.data.shards import decode_sample as decode
        self.decode = decode
        try:  # parsing tars is most of the loader's time: a small dataset is read from disk only once
            small = sum(os.path.getsize(p) for p in self.shards) <= CACHE_MB * 2**20
        except OSError:  # not local files
            small = False
        self._cache: Optional[dict] = {} if small else None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            # SLURM signals every process of a job step; only the main process acts on a preemption
            # (`engine.slurm`), and a worker started by spawn or forkserver would die of it
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        skip = batches_before(self.start_batch, worker, num_workers)
        counts = {"skipped_long": 0, "corrupt": 0}
        for samples in self._sample_batches(worker, num_workers, counts):
            if skip:  # already trained on (and counted) before the resume
                skip -= 1
                counts.update(skipped_long=0, corrupt=0)
                continue
            batch = self.collate(samples)
            batch.update({k: torch.tensor(v) for k, v in counts.items()})
            counts.update(skipped_long=0, corrupt=0)
            yield batch

    def _sample_batches(self, worker: int, num_workers: int, counts: dict) -> Iterator[list]:
        def on_error(exn: Exception) -> bool:
            counts["corrupt"] += 1
            warnings.warn(f"skipping unreadable shard data: {exn!r}")
            return True

        rng = random.Random(f"{self.seed}-mix-{self.rank}-{worker}")
        buffer: list = []
        for epoch in itertools.count():
            urls = shards_for(self.shards, self.seed, epoch, self.rank, self.world, worker, num_workers)
            usable = 0
            for item in self._decoded(urls):
                if isinstance(item, Exception):  # a corrupt tar or sample
                    on_error(item)
                    continue
                sample = dict(item)
                task, text, answer = assign_task(rng, sample, self.mix)
                views = sample.get("views")
                if sample.get("flip") is not None and rng.random() < 0.5:
                    # the mirrored image, as MAR's augmentation (its shifted copies are of the image as is)
                    sample["tokens"], views = sample["flip"], None
                if task in (CAPTION, QA) and views is not None and len(views):
                    # understanding reads the image or one of its shifted copies; generation keeps learning
                    # the images as they are
                    pick = rng.randrange(len(views) + 1)
                    if pick:
                        sample["tokens"] = views[pick - 1]
                if not fits(self.tok, self.layout, task, text, answer):
                    counts["skipped_long"] += 1
                    continue
                sample.update(task=task, text=text, answer=answer)
                buffer.append(sample)
                usable += 1
                if len(buffer) >= SHUFFLE_BUFFER:
                    yield from self._drain(rng, buffer, SHUFFLE_BUFFER // 2)
            yield from self._drain(rng, buffer, 0)  # an epoch ends in its own batches (the rest carries over)
            if not usable:
                raise UserError(f"no usable sample in shards {', '.join(urls)} ({counts['corrupt']} corrupt, "
                                f"{counts['skipped_long']} too long for the layout)")

    def _decoded(self, urls: List[str]) -> Iterator:
        """The decoded samples of `urls` in order, and in their place the error of any that could not be
        read. With the cache on, each shard is read from disk once and replayed from memory after."""
        for url in urls:
            if self._cache is None:
                yield from self._read(url)
            elif url in self._cache:
                yield from self._cache[url]
            else:
                items = []
                for item in self._read(url):
                    items.append(item)
                    yield item
                # errors are kept without their tracebacks, which hold the raw bytes
                self._cache[url] = [e.with_traceback(None) if isinstance(e, Exception) else e for e in items]

    def _read(self, url: str) -> Iterator:
        """One shard from disk: its decoded samples, and the errors of the tar or of a sample in order (or
        only the error of a shard whose bytes changed since tokenize)."""
        if self.checksums is not None and url not in self._verified:
            try:
                verify_shard(url, self.checksums[url])
            except UserError as e:
                yield e
                return
            self._verified.add(url)
        errors: list = []
        for raw in wds.tariterators.tarfile_samples([{"url": url}], handler=lambda e: errors.append(e) or True):
            yield from errors
            errors.clear()
            yield self._decode_checked(raw)
        yield from errors

    def _decode_checked(self, raw: dict):
        """A decoded sample, or the error that makes it unusable."""
        try:
            sample = self.decode(raw)
            tokens, flip = sample["tokens"], sample.get("flip")
            if tokens is None or tokens.ndim != 2 or tokens.shape[0] != self.layout.num_image_tokens:
                raise ValueError(f"sample {sample['key']}: image tokens "
                                 f"{None if tokens is None else tokens.shape}, expected "
                                 f"{self.layout.num_image_tokens} rows")
            if flip is not None and flip.shape != tokens.shape:
                raise ValueError(f"sample {sample['key']}: mirrored tokens {flip.shape}, image tokens {tokens.shape}")
            return sample
        except Exception as exn:  # a corrupt sample: any decoding error
            return exn

    def _drain(self, rng: random.Random, buffer: list, keep: int) -> Iterator[list]:
        rng.shuffle(buffer)
        while len(buffer) - keep >= self.batch_size:
            yield [buffer.pop() for _ in range(self.batch_size)]

    def collate(self, samples: list) -> dict:
        tokens = torch.stack([torch.as_tensor(s["tokens"]).float() for s in samples])
        batch = build_batch(self.tok, self.layout, [s["task"] for s in samples], [s["text"] for s in samples],
                            [s["answer"] for s in samples], tokens)
        batch["keys"] = [s["key"] for s in samples]
        return batch


class ShardDataModule(L.LightningDataModule):
    """Training batches for this rank from `shards` (`shards.shard_checksums`: each shard file with its
    manifest's sha256, checked as the loader opens it); `start_batch` is the resume position."""

    def __init__(self, shards: Dict[str, str], tok, layout: Layout, cfg, start_batch: int = 0):
        super().__init__()
        self.shards, self.tok, self.layout, self.cfg = shards, tok, layout, cfg
        self.start_batch = start_batch

    def train_dataloader(self) -> DataLoader:
        t = self.cfg.trainer
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        data = TokenBatches(list(self.shards), self.tok, self.layout, self.cfg.tasks, t.batch_size, t.seed,
                            rank=rank, world=world, start_batch=self.start_batch, checksums=self.shards)
        return DataLoader(data, batch_size=None, num_workers=t.num_workers,
                          persistent_workers=False, prefetch_factor=2 if t.num_workers else None)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if device.type == "cpu":  # already there: skip Lightning's walk over every key and sample name
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
