"""Batches and model calls: the part of the contract every model and loss sees.

A batch is a dict: ``{"inputs": Tensor, "labels": Tensor}`` plus optionally ``"attention_mask"``
(bool, True = real token). The default collate turns ``(inputs, labels)`` items into that; a data
provider's ``DataSplits.collate_fn`` overrides it. Models are called as
``model(batch["inputs"], **kw)`` where ``kw`` holds ``attention_mask=`` when the batch has one and
``output_hidden_states=True`` / ``output_attentions=True`` when the loss ``requires`` them.
"""
from __future__ import annotations

import random
from typing import (Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Sequence,
                    Tuple)

import torch
from torch.utils.data import Dataset, Sampler, Subset, TensorDataset, default_collate

from ..errors import KdplugError
from ..output_head import head_output
from ..outputs import ModelOutput, as_model_output

__all__ = ["collate", "to_device", "call_model", "requirements", "EpochSampler", "ShardSampler",
           "SeededDataset", "EpochKeys", "EpochItems", "load_items", "load_seeded_item",
           "uses_python_random",
           "holds_fixed_tensors", "REQUIREMENTS"]

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

_MIX_START, _MASK64 = 0x243F6A8885A308D3, 0xFFFFFFFFFFFFFFFF


def _mix(h: int, part: int) -> int:
    h = ((h ^ (int(part) & _MASK64)) * 0x100000001B3) & _MASK64
    return h ^ (h >> 29)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from small ints (deterministic across processes and Python versions)."""
    h = _MIX_START
    for p in parts:
        h = _mix(h, p)
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

    Each ``dataset[i]`` runs with torch's CPU generator (what torchvision's transforms draw from)
    seeded from (seed, epoch, i) and restored afterwards, so the same item gets the same
    augmentation whichever process or DataLoader worker loads it, and whether or not the run was
    resumed midway. Python's ``random`` is seeded and restored the same way only for a data set
    that draws from it (:func:`uses_python_random`): that round trip costs more than a small
    item. CUDA generators are never touched (seeding them per item is what made it slow).
    """

    def __init__(self, dataset: Dataset, seed: int, python_random: Optional[bool] = None) -> None:
        self.dataset, self.seed = dataset, seed
        self.python_random = (uses_python_random(dataset, seed) if python_random is None
                              else bool(python_random))
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._epoch_hash = _mix(_mix(_MIX_START, self.seed), epoch)  # mix_seed's first two parts

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def item_seed(self, index: int) -> int:
        return _mix(self._epoch_hash, index) & 0x7FFFFFFFFFFFFFFF  # mix_seed(seed, epoch, index)

    def __getitem__(self, index: int) -> Any:
        return load_seeded_item(self.dataset, index, self.item_seed(index), self.python_random)

    def __getitems__(self, indices: Sequence[int]) -> List[Any]:
        """A batch's items (DataLoader calls this): the RNG states are saved and restored once
        per batch, and each item is seeded as :meth:`__getitem__` seeds it."""
        generator = torch.default_generator
        torch_state = generator.get_state()
        python_state = random.getstate() if self.python_random else None
        try:
            items = []
            for index in indices:
                item_seed = self.item_seed(index)
                generator.manual_seed(item_seed)
                if python_state is not None:
                    random.seed(item_seed)
                items.append(self.dataset[index])
            return items
        finally:
            generator.set_state(torch_state)
            if python_state is not None:
                random.setstate(python_state)


def load_seeded_item(dataset: Dataset, index: int, item_seed: int, python_random: bool) -> Any:
    """``dataset[index]`` with torch's CPU generator (and, if ``python_random``, Python's
    ``random``) seeded with ``item_seed``; both are left as they were."""
    generator = torch.default_generator
    torch_state = generator.get_state()
    generator.manual_seed(item_seed)
    if python_random:
        python_state = random.getstate()
        random.seed(item_seed)
    try:
        return dataset[index]
    finally:
        generator.set_state(torch_state)
        if python_random:
            random.setstate(python_state)


#: how many items :func:`uses_python_random` loads to find out
PYTHON_RANDOM_PROBES = 4


def uses_python_random(dataset: Dataset, seed: int = 0) -> bool:
    """Whether loading items draws from Python's ``random``.

    A data set may say so itself with a ``uses_python_random`` attribute (True or False); that
    is the way for one that draws only for some items. Otherwise a few items spread over the
    data set are loaded, seeded as in training, and Python's random state compared before and
    after each; it is left as it was.
    """
    declared = getattr(dataset, "uses_python_random", None)
    if declared is not None:
        return bool(declared)
    if holds_fixed_tensors(dataset):
        return False
    size = len(dataset)  # type: ignore[arg-type]
    state = random.getstate()
    try:
        for index in range(0, size, max(1, size // PYTHON_RANDOM_PROBES))[:PYTHON_RANDOM_PROBES]:
            random.seed(mix_seed(seed, 0, index))
            before = random.getstate()
            load_seeded_item(dataset, index, mix_seed(seed, 0, index), python_random=False)
            if random.getstate() != before:
                return True
        return False
    finally:
        random.setstate(state)


def holds_fixed_tensors(dataset: Dataset) -> bool:
    """True for data sets whose items are fixed tensors already in memory: a TensorDataset, a
    Subset of one, or a data set that says so with ``fixed_tensors = True``. Their items need no
    seeding and no worker processes."""
    declared = getattr(dataset, "fixed_tensors", None)
    if declared is not None:
        return bool(declared)
    if isinstance(dataset, Subset):
        return holds_fixed_tensors(dataset.dataset)
    return isinstance(dataset, TensorDataset)


def needs_seeding(dataset: Dataset) -> bool:
    """False for data sets known to hold fixed tensors (no per-item randomness to pin down)."""
    return not holds_fixed_tensors(dataset)


class EpochKeys(Sampler):
    """The indices of an :class:`EpochSampler` as ``(epoch, index)`` keys, for
    :class:`EpochItems`."""

    def __init__(self, sampler: EpochSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class EpochItems(Dataset):
    """``dataset[(epoch, index)]``: sets the epoch of ``dataset`` (``set_epoch``) in the process
    that loads the item, then loads it. A persistent DataLoader worker keeps its own copy of the
    data set, which the main process's ``set_epoch`` never reaches; the key carries the epoch
    there. A data set without ``set_epoch`` gives the same items in every epoch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.epoch: Optional[int] = None
        self._set_epoch = getattr(dataset, "set_epoch", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Tuple[int, int]]) -> List[Any]:
        for epoch, _ in keys[:1]:  # a batch's keys share their epoch
            if epoch != self.epoch and self._set_epoch is not None:
                self._set_epoch(epoch)
                self.epoch = epoch
        return load_items(self.dataset, [index for _, index in keys])


def load_items(dataset: Dataset, indices: Sequence[int]) -> List[Any]:
    """``dataset``'s items at ``indices``, through its ``__getitems__`` when it has one (as
    DataLoader does: a SeededDataset seeds a whole batch at once)."""
    many = getattr(dataset, "__getitems__", None)
    return many(indices) if many is not None else [dataset[i] for i in indices]


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

