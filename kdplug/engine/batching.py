"""Batches and model calls: the part of the contract every model and loss sees.

A batch is a dict: ``{"inputs": Tensor, "labels": Tensor}`` plus optionally ``"attention_mask"``
(bool, True = real token). The default collate turns ``(inputs, labels)`` items into that; a data
provider's ``DataSplits.collate_fn`` overrides it. Models are called as
``model(batch["inputs"], **kw)`` where ``kw`` holds ``attention_mask=`` when the batch has one and
``output_hidden_states=True`` / ``output_attentions=True`` when the loss ``requires`` them.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List

import torch
from torch.utils.data import Dataset, Sampler, TensorDataset, default_collate

from ..errors import KdplugError
from ..output_head import head_output
from ..outputs import ModelOutput, as_model_output

__all__ = ["collate", "to_device", "call_model", "requirements", "EpochSampler", "ShardSampler",
           "SeededDataset", "REQUIREMENTS"]

REQUIREMENTS = ("hidden_states", "attentions", "output_head")


def collate(items: List[Any]) -> Dict[str, Any]:
    """(inputs, labels) items (or dict items) -> {"inputs": ..., "labels": ...}."""
    batch = default_collate(items)
    if isinstance(batch, dict):
        return batch
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return {"inputs": batch[0], "labels": batch[1]}
    raise KdplugError("data items must be (inputs, labels) pairs or dicts; got items of "
                      f"{type(items[0]).__name__} (give DataSplits.collate_fn for other shapes)")


def check_batch(batch: Any, where: str) -> Dict[str, Any]:
    if not isinstance(batch, dict) or "inputs" not in batch or "labels" not in batch:
        keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise KdplugError(f"{where}: a batch must be a dict with 'inputs' and 'labels' "
                          f"(and optionally 'attention_mask'), got {keys}")
    return batch


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def requirements(loss: Any) -> FrozenSet[str]:
    """The loss's ``requires`` set, checked."""
    wanted = frozenset(getattr(loss, "requires", ()) or ())
    unknown = wanted - set(REQUIREMENTS)
    if unknown:
        raise KdplugError(f"loss {type(loss).__name__} requires {sorted(unknown)}; a loss may "
                          f"require only {list(REQUIREMENTS)}")
    return wanted


def call_model(model: Callable, batch: Dict[str, Any], requires: FrozenSet[str] = frozenset()
               ) -> ModelOutput:
    """model(batch["inputs"], **kw) as a ModelOutput (see the module docstring for kw); for a
    loss that requires "output_head", the model's final hidden states and head instead of its
    logits (kdplug.output_head)."""
    kwargs: Dict[str, Any] = {}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    if "output_head" in requires:
        return head_output(model, batch["inputs"], kwargs.get("attention_mask"))
    if "hidden_states" in requires:
        kwargs["output_hidden_states"] = True
    if "attentions" in requires:
        kwargs["output_attentions"] = True
    return as_model_output(model(batch["inputs"], **kwargs))


# ----------------------------------------------------------------------------- data order

def mix_seed(*parts: int) -> int:
    """A 63-bit seed from small ints (deterministic across processes and Python versions)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[int]):
    """The training order: a permutation that is a function of (seed, epoch) only.

    Global batch ``b`` is ``perm[b*B:(b+1)*B]`` whatever the number of processes; process ``r`` of
    ``W`` takes its ``r``-th slice of ``B/W`` indices, so K processes see exactly the batches one
    process would. The incomplete last batch is dropped. ``set_epoch(e, skip_batches=k)`` starts
    the epoch after its first ``k`` batches (a resumed run continues mid-epoch).
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        if batch_size % world_size:
            raise KdplugError(f"batch_size {batch_size} must be divisible by the number of "
                              f"processes ({world_size}): it is the global batch")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.local_batch = batch_size // world_size
        self.epoch = 0
        self.skip_batches = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        lo = self.rank * self.local_batch
        for b in range(self.skip_batches, self.batches_per_epoch):
            start = b * self.batch_size + lo
            yield from order[start:start + self.local_batch].tolist()

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip_batches) * self.local_batch


class ShardSampler(Sampler[int]):
    """Evaluation order: process r of W takes items r, r+W, r+2W, … (no padding, no repeats), so
    the summed metrics are exactly those of one process."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededDataset(Dataset):
    """Makes a training item's randomness (augmentation) a function of (seed, epoch, index).

    Each ``dataset[i]`` runs with torch's and Python's global RNGs seeded from (seed, epoch, i)
    and restored afterwards, so the same item gets the same augmentation whichever process or
    DataLoader worker loads it, and whether or not the run was resumed midway.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        seed = mix_seed(self.seed, self.epoch, index)
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)


def needs_seeding(dataset: Dataset) -> bool:
    """False for data sets known to hold fixed tensors (no per-item randomness to pin down)."""
    return not isinstance(dataset, TensorDataset)


def first_items(dataset: Dataset, count: int) -> List[Any]:
    return [dataset[i] for i in range(min(count, len(dataset)))]  # type: ignore[arg-type]


def probe_batch(dataset: Dataset, collate_fn: Callable[[List[Any]], Any], where: str,
                device: torch.device) -> Dict[str, Any]:
    """The first two training items as a checked batch on ``device``, for the forward that checks
    models against the data before any work; a collate failure is named, not a traceback."""
    items = first_items(dataset, 2)
    try:
        batch = check_batch(collate_fn(items), where)
    except KdplugError:
        raise
    except Exception as exc:
        raise KdplugError(f"{where}: collating two training items failed: "
                          f"{type(exc).__name__}: {exc}") from None
    return to_device(batch, device)


def batches(loader: Iterable[Any], device: torch.device, where: str) -> Iterator[Dict[str, Any]]:
    for batch in loader:
        yield to_device(check_batch(batch, where), device)

