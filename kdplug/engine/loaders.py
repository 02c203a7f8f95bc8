"""The run's training and test loaders.

The training order is a function of (seed, epoch) alone (:class:`EpochSampler`), each item's
augmentation of (seed, epoch, index) (:class:`SeededDataset`), and the loaders draw their worker
seeds from their own generators, never from the global RNG, so a resumed run's RNG stream is the
uninterrupted run's. With a teacher cache the training items carry their index and the batches the
cached targets (:mod:`kdplug.cache.integration`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader

from ..cache.integration import CachedCollate, IndexedDataset
from ..cache.reader import TeacherCache
from ..data import DataSplits
from .batching import EpochSampler, SeededDataset, ShardSampler, needs_seeding
from .config import DistillConfig
from .distributed import DistEnv

__all__ = ["Loaders", "build_loaders"]


@dataclass
class Loaders:
    """What every phase of a run trains and evaluates on."""

    train_dataset: Any  # the training split as the loader reads it (seeded, indexed for a cache)
    sampler: EpochSampler
    train: DataLoader
    test: DataLoader
    #: with a teacher cache: the training collate, whose ``enabled`` says whether batches carry
    #: the cached targets (only the distilled student reads them)
    cached_collate: Optional[CachedCollate] = None

    def read_cached_targets(self, enabled: bool) -> None:
        if self.cached_collate is not None:
            self.cached_collate.enabled = enabled


def build_loaders(splits: DataSplits, collate: Callable, cfg: DistillConfig, env: DistEnv,
                  cache: Optional[TeacherCache] = None) -> Loaders:
    train = splits.train
    train_dataset = SeededDataset(train, cfg.seed) if needs_seeding(train) else train
    train_collate = collate
    cached_collate = None
    if cache is not None:
        train_dataset = IndexedDataset(train_dataset, cache.views,
                                       replay_views=not cache.deterministic)
        train_collate = cached_collate = CachedCollate(collate, cache)
    sampler = EpochSampler(len(train), cfg.batch_size, cfg.seed, env.rank, env.world_size)
    pin = env.device.type == "cuda"
    train_loader = DataLoader(
        train_dataset, batch_size=sampler.local_batch, sampler=sampler, collate_fn=train_collate,
        num_workers=cfg.num_workers, pin_memory=pin,
        generator=torch.Generator().manual_seed(cfg.seed))
    test_loader = DataLoader(
        splits.test, batch_size=cfg.eval_batch_size,
        sampler=ShardSampler(len(splits.test), env.rank, env.world_size), collate_fn=collate,
        num_workers=cfg.num_workers, pin_memory=pin,
        generator=torch.Generator().manual_seed(cfg.seed))
    return Loaders(train_dataset=train_dataset, sampler=sampler, train=train_loader,
                   test=test_loader, cached_collate=cached_collate)
