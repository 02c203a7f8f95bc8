"""The on-disk format of a teacher cache: folder layout, file names, dtypes, atomic writes (the
errors live in :mod:`.errors` and are re-exported here).

A cache folder::

    DIR/
      manifest.json                        written last, atomically: its presence = complete
      cache-plan.json                      while writing only: what the cache will be (resume)
      chunks/
        view0-chunk000000.logits.npy       dense: [rows, C] raw logits (float16/float32; bfloat16
                                           as uint16 bits)
        view0-chunk000000.indices.npy      top-k: [rows, k] class indices (int16 or int32) …
        view0-chunk000000.logprobs.npy     … and their log-probabilities at T = 1
        view0-chunk000000.lengths.npy      sequences only: [samples] int32 rows per sample
        view0-chunk000000.json             the chunk's record: samples, rows, bytes, checksums

A *unit* is one chunk of ``chunk_size`` consecutive training samples (by index) for one *view*
(views > 1 only for random transforms, see the README). Rows are the teacher's output rows: one per
sample for classification, one per real (non-padding) token for sequences.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch

from .._atomic import atomic_write, fsync_dir, tmp_path
from .errors import CacheCorruptError, CacheError, CacheIncompleteError, CacheMismatchError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "PLAN", "CHUNK_DIR", "DTYPES", "CacheError",
           "CacheMismatchError", "CacheCorruptError", "CacheIncompleteError", "unit_stem",
           "chunk_ranges", "file_digest", "write_npy", "atomic_write_json", "read_json",
           "to_storage", "from_storage", "index_dtype", "flatten", "describe_differences"]

FORMAT = "kdplug-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "cache-plan.json"
CHUNK_DIR = "chunks"
#: storage dtype name -> numpy dtype on disk (bfloat16 is kept as its raw 16 bits)
DTYPES: Dict[str, Any] = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
HASH = "blake2b"
_BLOCK = 1 << 20


def unit_stem(view: int, chunk: int) -> str:
    return f"view{view}-chunk{chunk:06d}"


def chunk_ranges(num_samples: int, chunk_size: int) -> List[Tuple[int, int]]:
    return [(start, min(start + chunk_size, num_samples))
            for start in range(0, num_samples, chunk_size)]


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NpyWriter:
    """An .npy file written in place through a memory map (temp name), then fsync'ed and moved
    to its name; ``close()`` returns its record ``{"path", "bytes", "shape", "dtype", HASH}``."""

    def __init__(self, path: Path, shape: Tuple[int, ...], dtype: Any, root: Path) -> None:
        self.path, self.root = Path(path), Path(root)
        self.tmp = tmp_path(self.path)
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        if int(np.prod(self.shape)) == 0:  # an empty map cannot be mmap'ed
            self.array = np.zeros(self.shape, self.dtype)
        else:
            self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=self.dtype,
                                                   shape=self.shape)

    def close(self) -> Dict[str, Any]:
        if isinstance(self.array, np.memmap):
            self.array.flush()
            del self.array
        else:
            with open(self.tmp, "wb") as f:
                np.save(f, self.array)
        _fsync_file(self.tmp)
        os.replace(self.tmp, self.path)
        return {"path": self.path.relative_to(self.root).as_posix(),
                "bytes": self.path.stat().st_size, "shape": list(self.shape),
                "dtype": self.dtype.str, HASH: file_digest(self.path)}

    def abort(self) -> None:
        self.array = None
        if self.tmp.exists():
            self.tmp.unlink()


def write_npy(array: np.ndarray, path: Path, root: Path) -> Dict[str, Any]:
    writer = NpyWriter(path, array.shape, array.dtype, root)
    writer.array[...] = array
    return writer.close()


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n"), "w")


def read_json(path: Path, what: str) -> Dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheCorruptError(f"{what} {str(path)!r} cannot be read ({type(exc).__name__}: "
                                f"{exc}); the cache is damaged: rebuild it with kdplug "
                                "cache-teacher") from None
    if not isinstance(value, dict):
        raise CacheCorruptError(f"{what} {str(path)!r} holds no JSON object; rebuild the cache")
    return value


# ----------------------------------------------------------------------------- values

def to_storage(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the numpy array stored for ``dtype`` (bfloat16: its raw bits as uint16)."""
    tensor = tensor.detach().cpu()
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return tensor.to(getattr(torch, dtype)).numpy()


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values back as a float32 tensor."""
    array = np.ascontiguousarray(array)
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(array).float()


def index_dtype(num_classes: int) -> Any:
    """The smallest signed integer type for class indices (the op takes int16/int32/int64)."""
    return np.int16 if num_classes <= 2 ** 15 else np.int32


# ----------------------------------------------------------------------------- identity

def canonical(value: Any) -> Any:
    """JSON-normal form (tuples become lists, keys strings), for comparing options."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def flatten(record: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"teacher": {"name": x}} -> {"teacher.name": x}; option tables stay whole values."""
    out: Dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not key.endswith("options"):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def describe_differences(cached: Mapping[str, Any], expected: Mapping[str, Any]
                         ) -> Dict[str, Tuple[Any, Any]]:
    """The fields of ``expected`` (flattened) whose value differs from the cache's."""
    flat_cached, flat_expected = flatten(cached), flatten(expected)
    return {key: (flat_cached.get(key), value) for key, value in flat_expected.items()
            if canonical(flat_cached.get(key)) != canonical(value)}


def short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) \
        else repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"
