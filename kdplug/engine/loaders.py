"""The run's training and test loaders.

The training order is a function of (seed, epoch) alone (:class:`EpochSampler`), each item's
augmentation of (seed, epoch, index) (:class:`SeededDataset`), and the loaders draw their worker
seeds from their own generators, never from the global RNG, so a resumed run's RNG stream is the
uninterrupted run's. With a teacher cache the training items carry their index and the batches the
cached targets (:mod:`kdplug.cache.integration`).

A split whose items take real work to load is loaded by worker processes:
:func:`default_num_workers` of them unless ``num_workers`` is given (a split of fixed tensors is
read in the training process either way: workers would only copy it). They stay up for
the whole phase (the epoch travels to them with each index, :class:`EpochKeys`), prefetch, and
hand over pinned batches when the run trains on CUDA. Each phase gets a fresh training loader,
so its workers start from the data set and collate as that phase sets them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..cache.integration import CachedCollate, IndexedDataset
from ..cache.reader import TeacherCache
from ..data import DataSplits
from .batching import (EpochItems, EpochKeys, EpochSampler, SeededDataset, ShardSampler,
                       holds_fixed_tensors, load_items, needs_seeding)
from .config import DistillConfig
from .distributed import DistEnv

__all__ = ["Loaders", "build_loaders", "default_num_workers", "batch_load_seconds",
           "MAX_DEFAULT_WORKERS"]

#: the most worker processes chosen by default (per training process)
MAX_DEFAULT_WORKERS = 8
#: batches each worker loads ahead
PREFETCH_BATCHES = 4


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers(dataset: Dataset, batch_size: int, collate: Callable,
                        processes_per_node: int = 1) -> int:
    """Worker processes for loading ``dataset`` in batches of ``batch_size``: none where a
    worker would cost more than it saves (fixed tensors in memory, or items so quick to load and
    collate that handing each batch over from a worker costs about as much, see
    :func:`batch_load_seconds`); otherwise this process's share of the cores less one for the
    training loop, at least 1 and at most :data:`MAX_DEFAULT_WORKERS`."""
    if holds_fixed_tensors(dataset):
        return 0
    seconds, tensors = batch_load_seconds(dataset, batch_size, collate)
    if seconds < 2 * tensors * TRANSFER_SECONDS_PER_TENSOR:
        return 0
    cores = available_cores() // max(1, processes_per_node)
    return max(1, min(MAX_DEFAULT_WORKERS, cores - 1))


#: what the training process spends receiving one tensor of a batch from a worker (a file
#: descriptor passed over a fresh socket): measured ~1 ms on a busy 2-core machine
TRANSFER_SECONDS_PER_TENSOR = 1e-3
#: items timed (twice, the faster round counts) to estimate a batch's loading time
TIMED_ITEMS = 8


def batch_load_seconds(dataset: Dataset, batch_size: int, collate: Callable) -> Tuple[float, int]:
    """Seconds to load and collate a batch of ``dataset`` in the training process (from a few
    items), and how many tensors a batch holds."""
    indices = list(range(min(TIMED_ITEMS, len(dataset))))  # type: ignore[arg-type]
    if not indices:
        return 0.0, 1
    rounds = []
    for _ in range(2):
        started = time.perf_counter()
        batch = collate(load_items(dataset, indices))
        rounds.append(time.perf_counter() - started)
    values = (batch.values() if isinstance(batch, dict)
              else batch if isinstance(batch, (list, tuple)) else [batch])
    tensors = sum(isinstance(v, torch.Tensor) for v in values)
    return min(rounds) * batch_size / len(indices), max(1, tensors)


def _worker_options(workers: int, device: torch.device) -> Dict[str, Any]:
    options: Dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers:
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_BATCHES)
    return options


@dataclass
class Loaders:
    """What every phase of a run trains and evaluates on."""

    train_dataset: Any  # the training split as the loader reads it (seeded, indexed for a cache)
    sampler: EpochSampler
    test: DataLoader
    train_collate: Callable
    train_workers: int
    seed: int
    device: torch.device
    #: with a teacher cache: the training collate, whose ``enabled`` says whether batches carry
    #: the cached targets (only the distilled student reads them)
    cached_collate: Optional[CachedCollate] = None

    def read_cached_targets(self, enabled: bool) -> None:
        if self.cached_collate is not None:
            self.cached_collate.enabled = enabled

    def train_loader(self) -> DataLoader:
        """A training loader for one phase; its workers copy the data set and collate as they
        are now and stay up until the loader is dropped."""
        dataset, sampler = self.train_dataset, self.sampler
        if hasattr(dataset, "set_epoch"):  # the epoch must reach the workers' copies
            dataset, sampler = EpochItems(dataset), EpochKeys(sampler)
        return DataLoader(dataset, batch_size=self.sampler.local_batch, sampler=sampler,
                          collate_fn=self.train_collate,
                          generator=torch.Generator().manual_seed(self.seed),
                          **_worker_options(self.train_workers, self.device))


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
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))

    def workers(dataset: Dataset, batch_size: int, batch_collate: Callable) -> int:
        if holds_fixed_tensors(dataset):
            return 0
        if cfg.num_workers is not None:
            return cfg.num_workers
        return default_num_workers(dataset, batch_size, batch_collate, per_node)

    test_loader = DataLoader(
        splits.test, batch_size=cfg.eval_batch_size,
        sampler=ShardSampler(len(splits.test), env.rank, env.world_size), collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),
        **_worker_options(workers(splits.test, cfg.eval_batch_size, collate), env.device))
    return Loaders(train_dataset=train_dataset, sampler=sampler, test=test_loader,
                   train_collate=train_collate,
                   train_workers=workers(train_dataset, sampler.local_batch, train_collate),
                   seed=cfg.seed, device=env.device, cached_collate=cached_collate)
