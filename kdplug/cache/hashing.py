"""Fingerprints that decide whether a cache still fits a run: the teacher's weights, the training
samples at each index (the sample order), and the input transform (and whether it is random).

All of them are plugin-agnostic: they look only at ``state_dict`` tensors and at what
``dataset[i]`` returns (tensors, arrays, numbers, strings, nested in tuples, lists and dicts).
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..engine.batching import load_seeded_item, mix_seed

__all__ = ["weights_hash", "item_digest", "probe_indices", "order_fingerprint", "transform_info",
           "load_seeded"]

ORDER_PROBES = 32
TRANSFORM_PROBES = 4


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def weights_hash(module: torch.nn.Module) -> str:
    """blake2b over the state_dict (names, dtypes, shapes, values; buffers such as BatchNorm
    statistics included); the same weights on any device give the same hash."""
    h = hashlib.blake2b(digest_size=20)
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(f"{value.dtype}{tuple(value.shape)}".encode())
            h.update(_tensor_bytes(value))
        else:
            h.update(repr(value).encode())
    return "blake2b:" + h.hexdigest()


def _update(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        h.update(_tensor_bytes(value))
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        h.update(b"D")
        for key in sorted(value, key=str):
            h.update(str(key).encode())
            _update(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _update(h, v)
    elif isinstance(value, (bool, int, float, str, bytes)) or value is None:
        h.update(f"{type(value).__name__}:{value!r}".encode())
    elif hasattr(value, "__array__"):  # e.g. a PIL image
        _update(h, np.asarray(value))
    else:
        h.update(repr(value).encode())


def item_digest(item: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    _update(h, item)
    return h.hexdigest()


def load_seeded(dataset: Dataset, index: int, seed: int, epoch: int) -> Any:
    """``dataset[index]`` with torch's and Python's RNGs seeded exactly as the engine's
    SeededDataset seeds them for (seed, epoch, index); the global RNGs are left as they were."""
    return load_seeded_item(dataset, index, mix_seed(seed, epoch, index), python_random=True)


def probe_indices(size: int, count: int = ORDER_PROBES) -> List[int]:
    """Up to ``count`` indices spread evenly over [0, size), first and last included."""
    if size <= count:
        return list(range(size))
    return sorted({round(i * (size - 1) / (count - 1)) for i in range(count)})


def order_fingerprint(dataset: Dataset, seed: int = 0, epoch: int = 0) -> str:
    """What sits at each index: a hash of (index, item) over probe indices spread across the
    split, the items loaded as the engine loads them for (seed, epoch). A reordered, resized,
    re-split or edited data set changes it."""
    h = hashlib.blake2b(digest_size=20)
    size = len(dataset)  # type: ignore[arg-type]
    h.update(f"n={size}".encode())
    for index in probe_indices(size):
        h.update(f"#{index}".encode())
        _update(h, load_seeded(dataset, index, seed, epoch))
    return "blake2b:" + h.hexdigest()


def _transform_descriptions(dataset: Any, depth: int = 0) -> List[str]:
    """repr of the transforms found on the dataset and the datasets it wraps."""
    if dataset is None or depth > 8:
        return []
    found = []
    for attr in ("transform", "target_transform"):
        value = getattr(dataset, attr, None)
        if value is None or isinstance(value, Dataset):
            continue
        found.append(f"{type(dataset).__name__}.{attr}={value!r}")
    inner = getattr(dataset, "dataset", None)
    return found + _transform_descriptions(inner, depth + 1)


def describe_transform(dataset: Dataset) -> str:
    found = _transform_descriptions(dataset)
    chain = []
    current: Any = dataset
    while current is not None and len(chain) < 8:
        chain.append(type(current).__name__)
        current = getattr(current, "dataset", None)
    text = "; ".join(found) if found else "no transform attribute"
    text = f"{' > '.join(chain)}: {text}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(text.split()))


def transform_info(dataset: Dataset, probes: int = TRANSFORM_PROBES) -> Dict[str, Any]:
    """Whether ``dataset[i]`` is deterministic, found by loading probe items under two different
    seeds (and twice under one seed: ``reproducible`` says the engine's per-item seeding pins the
    randomness down, so augmented views can be replayed), plus a description of the transform."""
    description = describe_transform(dataset)
    if isinstance(dataset, TensorDataset):
        return {"description": description, "deterministic": True, "reproducible": True}
    size = len(dataset)  # type: ignore[arg-type]
    deterministic = reproducible = True
    differs: Optional[int] = None
    for index in probe_indices(size, probes):
        a = item_digest(load_seeded(dataset, index, 1234, 0))
        b = item_digest(load_seeded(dataset, index, 4321, 7))
        if a != b:
            deterministic = False
            differs = index if differs is None else differs
            if item_digest(load_seeded(dataset, index, 1234, 0)) != a:
                reproducible = False
    info = {"description": description, "deterministic": deterministic,
            "reproducible": reproducible}
    if differs is not None:
        info["differs_at"] = differs
    return info
