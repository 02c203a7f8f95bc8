"""Reading a teacher cache: open and check it, compare it with a run, look rows up by sample index.

Chunk files are memory-mapped lazily, on the first lookup that touches them, so a process reads
only the pages that hold the rows of the samples it asks for (under torchrun: the samples its
sampler gives it), whatever the cache's size. A reader pickles without its maps (DataLoader
workers reopen what they touch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .format import (CHUNK_DIR, FORMAT, FORMAT_VERSION, HASH, MANIFEST, MANIFEST_CHECKSUM, PLAN,
                     CacheCorruptError, CacheError, CacheIncompleteError, CacheMismatchError,
                     describe_differences,
                     file_digest, from_storage, manifest_digest, read_json, short)
from .targets import DENSE_KEY, TOPK_KEYS

__all__ = ["TeacherCache", "open_cache", "VERIFY_MODES"]

VERIFY_MODES = ("full", "lazy", "size")


def open_cache(path: Any, *, verify: str = "full", expect: Optional[Mapping[str, Any]] = None
               ) -> "TeacherCache":
    """Open the cache in ``path``: manifest, files present with their sizes, and per ``verify``:
    ``"full"`` every chunk's checksum now, ``"lazy"`` each chunk's checksum on its first lookup,
    ``"size"`` sizes only. ``expect`` (nested like the manifest, e.g. ``{"teacher": {"name":
    ...}, "storage": {"dtype": "float16"}}``) must match, field by field."""
    cache = TeacherCache(path, verify=verify)
    cache.check_files()
    if expect:
        cache.compare(expect)
    if verify == "full":
        cache.verify_checksums()
    return cache


class TeacherCache:
    """A complete teacher cache (see :mod:`kdplug.cache.format` for the layout)."""

    def __init__(self, path: Any, *, verify: str = "full") -> None:
        if verify not in VERIFY_MODES:
            raise CacheError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        self.path = Path(path)
        self.verify_mode = verify
        self.manifest = self._read_manifest()
        self._check_format()
        storage = self.manifest["storage"]
        self.kind: str = storage["kind"]
        self.dtype: str = storage["dtype"]
        self.k: Optional[int] = storage.get("k")
        self.num_classes: int = int(storage["num_classes"])
        self.sequence: bool = bool(storage["sequence"])
        self.chunk_size: int = int(storage["chunk_size"])
        self.num_chunks: int = int(storage["num_chunks"])
        self.num_samples: int = int(self.manifest["data"]["num_samples"])
        transform = self.manifest["transform"]
        self.views: int = int(transform.get("views", 1))
        self.view_seed: Optional[int] = transform.get("seed")
        self.deterministic: bool = bool(transform["deterministic"])
        self.units: Dict[Tuple[int, int], Dict[str, Any]] = {}
        for record in self.manifest["chunks"]:
            self.units[(int(record["view"]), int(record["chunk"]))] = record
        missing = [(v, c) for v in range(self.views) for c in range(self.num_chunks)
                   if (v, c) not in self.units]
        if missing:
            v, c = missing[0]
            raise CacheCorruptError(f"{self._where()}: the manifest lists no chunk {c} of view {v} "
                                    f"({len(missing)} chunk records missing); rebuild the cache")
        self._maps: Dict[Tuple[int, int], Dict[str, np.ndarray]] = {}
        self._offsets: Dict[Tuple[int, int], np.ndarray] = {}
        self._verified: set = set()

    # ------------------------------------------------------------------ opening and checks
    def _where(self) -> str:
        return f"teacher cache {str(self.path)!r}"

    def _read_manifest(self) -> Dict[str, Any]:
        if not self.path.exists():
            raise CacheError(f"{self._where()} does not exist; write it first with `kdplug "
                             "cache-teacher --teacher NAME --data NAME --out DIR`")
        manifest = self.path / MANIFEST
        if manifest.is_file():
            return read_json(manifest, "the manifest")
        if (self.path / PLAN).is_file():
            plan = read_json(self.path / PLAN, "the cache plan")
            storage = plan.get("storage", {})
            total = int(storage.get("num_chunks", 0)) * int(plan.get("transform", {})
                                                           .get("views", 1))
            done = len(list((self.path / CHUNK_DIR).glob("*.json"))) \
                if (self.path / CHUNK_DIR).is_dir() else 0
            raise CacheIncompleteError(
                f"{self._where()} is incomplete (truncated): {done} of {total} chunks are written "
                f"and there is no {MANIFEST}, so a `kdplug cache-teacher` run stopped mid-write "
                "(or is still running). Finish it with the same command plus --resume: it keeps "
                "the chunks already written and verified.")
        raise CacheError(f"{self._where()} is not a kdplug teacher cache: no {MANIFEST} in it")

    def _check_format(self) -> None:
        m = self.manifest
        if m.get("format") != FORMAT:
            raise CacheError(f"{self._where()}: {MANIFEST} is not a kdplug teacher cache manifest "
                             f"(format {m.get('format')!r}, expected {FORMAT!r})")
        if m.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"{self._where()} does not match this kdplug: format_version: "
                f"{short(m.get('format_version'))} in the cache, {FORMAT_VERSION} in this kdplug "
                f"({m.get('kdplug_version')!r} wrote it). Rebuild it with this kdplug's "
                "`kdplug cache-teacher`.", {"format_version": (m.get("format_version"),
                                                                FORMAT_VERSION)})
        recorded = m.get(MANIFEST_CHECKSUM)
        if recorded != manifest_digest(m):
            found = ("records none" if recorded is None
                     else f"records {str(recorded)[:16]}…, its content gives "
                          f"{manifest_digest(m)[:16]}…")
            raise CacheCorruptError(
                f"{self._where()}: {MANIFEST} does not match its own checksum (it {found}): it "
                "was changed or damaged after cache-teacher wrote it. Rebuild the cache with "
                "`kdplug cache-teacher … --overwrite`")
        for key in ("teacher", "data", "transform", "storage", "chunks"):
            if key not in m:
                raise CacheCorruptError(f"{self._where()}: {MANIFEST} has no {key!r} section; "
                                        "rebuild the cache")

    def _file(self, record: Mapping[str, Any]) -> Path:
        return self.path / record["path"]

    def _chunk_label(self, unit: Tuple[int, int]) -> str:
        record = self.units[unit]
        view = f", view {unit[0]}" if self.views > 1 else ""
        return f"samples {record['start']}..{record['stop'] - 1}{view}"

    def check_files(self, units: Optional[Iterable[Tuple[int, int]]] = None) -> None:
        """Every chunk file exists with the size the manifest records (cheap: no reading)."""
        for unit in (self.units if units is None else units):
            for record in self.units[unit]["files"].values():
                path = self._file(record)
                if not path.is_file():
                    raise CacheCorruptError(
                        f"{self._where()}: chunk file {record['path']} is missing "
                        f"({self._chunk_label(unit)}). Rebuild it with the cache's `kdplug "
                        "cache-teacher` command plus --resume (it rewrites missing and corrupt "
                        "chunks only)")
                size = path.stat().st_size
                if size != int(record["bytes"]):
                    raise CacheCorruptError(
                        f"{self._where()}: chunk file {record['path']} is truncated or damaged: "
                        f"{size} bytes, the manifest records {record['bytes']} "
                        f"({self._chunk_label(unit)}). Rewrite it with the cache's `kdplug "
                        "cache-teacher` command plus --resume")

    def verify_checksums(self, units: Optional[Iterable[Tuple[int, int]]] = None) -> None:
        """Every chunk file's blake2b checksum against the manifest (reads the files)."""
        for unit in (sorted(self.units) if units is None else units):
            self._verify_unit(unit)

    def _verify_unit(self, unit: Tuple[int, int]) -> None:
        if unit in self._verified:
            return
        for record in self.units[unit]["files"].values():
            path = self._file(record)
            if not path.is_file():
                self.check_files([unit])
            digest = file_digest(path)
            if digest != record[HASH]:
                raise CacheCorruptError(
                    f"{self._where()}: chunk file {record['path']} is corrupt: its {HASH} "
                    f"checksum is {digest[:16]}…, the manifest records {record[HASH][:16]}… "
                    f"({self._chunk_label(unit)}). Rewrite it with the cache's `kdplug "
                    "cache-teacher` command plus --resume (it rewrites only chunks that fail "
                    "their checksum)")
        self._verified.add(unit)

    def compare(self, expected: Mapping[str, Any]) -> None:
        """Raise CacheMismatchError naming every field of ``expected`` that differs."""
        differ = describe_differences(self.manifest, expected)
        if differ:
            shown = "; ".join(f"{key}: {short(cached)} in the cache, {short(now)} in this run"
                              for key, (cached, now) in differ.items())
            raise CacheMismatchError(
                f"{self._where()} does not match this run: {shown}. Its targets would be wrong "
                "for this run; write a cache for these settings with `kdplug cache-teacher`, or "
                "run without --teacher-cache", differ)

    # ------------------------------------------------------------------ facts
    @property
    def teacher(self) -> Dict[str, Any]:
        return self.manifest["teacher"]

    @property
    def teacher_eval(self) -> Optional[Dict[str, Any]]:
        return self.manifest.get("teacher_eval")

    @property
    def nbytes(self) -> int:
        return int(self.manifest.get("bytes", 0))

    def summary(self) -> Dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "dtype": self.dtype, "k": self.k,
                "views": self.views, "num_samples": self.num_samples, "bytes": self.nbytes,
                "teacher": self.teacher.get("name"), "verify": self.verify_mode}

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"], state["_offsets"] = {}, {}
        return state

    # ------------------------------------------------------------------ lookups
    def _unit_arrays(self, unit: Tuple[int, int]) -> Dict[str, np.ndarray]:
        arrays = self._maps.get(unit)
        if arrays is None:
            if self.verify_mode == "lazy":
                self._verify_unit(unit)
            arrays = {}
            for field, record in self.units[unit]["files"].items():
                path = self._file(record)
                try:
                    arrays[field] = np.load(path, mmap_mode="r") if int(np.prod(
                        record["shape"])) else np.load(path)
                except (OSError, ValueError) as exc:
                    raise CacheCorruptError(f"{self._where()}: cannot read chunk file "
                                            f"{record['path']}: {exc}") from None
            if self.sequence:
                lengths = np.asarray(arrays["lengths"], dtype=np.int64)
                self._offsets[unit] = np.concatenate([[0], np.cumsum(lengths)])
            self._maps[unit] = arrays
        return arrays

    def _locate(self, index: int, view: int) -> Tuple[Tuple[int, int], int]:
        if not 0 <= index < self.num_samples:
            raise CacheError(f"{self._where()}: sample index {index} is outside the cache's "
                             f"{self.num_samples} training samples")
        return (view % self.views, index // self.chunk_size), index % self.chunk_size

    def rows(self, indices: Sequence[int], view: int = 0) -> Tuple[Dict[str, torch.Tensor],
                                                                     List[int]]:
        """The cached rows of ``indices`` (sample by sample, concatenated) and each sample's
        number of rows: ``{"logits": float32 [R, C]}`` or ``{"indices": int64 [R, k],
        "logprobs": float32 [R, k]}``."""
        fields = ("logits",) if self.kind == "dense" else ("indices", "logprobs")
        parts: Dict[str, List[np.ndarray]] = {f: [] for f in fields}
        lengths: List[int] = []
        for index in indices:
            unit, j = self._locate(int(index), view)
            arrays = self._unit_arrays(unit)
            if self.sequence:
                offsets = self._offsets[unit]
                lo, hi = int(offsets[j]), int(offsets[j + 1])
            else:
                lo, hi = j, j + 1
            lengths.append(hi - lo)
            for f in fields:
                parts[f].append(arrays[f][lo:hi])
        out: Dict[str, torch.Tensor] = {}
        for f in fields:
            joined = np.concatenate(parts[f]) if parts[f] else np.zeros((0, 1))
            if f == "indices":
                out[f] = torch.from_numpy(joined.astype(np.int64))
            else:
                out[f] = from_storage(joined, self.dtype)
        return out, lengths

    def targets(self, indices: Sequence[int], view: int, batch: Mapping[str, Any]
                ) -> Dict[str, torch.Tensor]:
        """The teacher targets for a collated ``batch`` of the samples ``indices`` (see
        :mod:`kdplug.cache.targets` for the keys and shapes)."""
        rows, lengths = self.rows(indices, view)
        size = len(indices)
        if not self.sequence:
            if self.kind == "dense":
                return {DENSE_KEY: rows["logits"].reshape(size, self.num_classes)}
            return {TOPK_KEYS[0]: rows["indices"].reshape(size, -1),
                    TOPK_KEYS[1]: rows["logprobs"].reshape(size, -1)}
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            mask = mask.to(device="cpu", dtype=torch.bool)
        else:
            inputs = batch["inputs"]
            mask = torch.ones(inputs.shape[:2], dtype=torch.bool)
        real = mask.sum(1).tolist()
        for row, (index, cached, now) in enumerate(zip(indices, lengths, real)):
            if cached != now:
                raise CacheMismatchError(
                    f"{self._where()}: sample {int(index)} has {cached} cached token rows but "
                    f"{now} real tokens in this run's batch: the data (or its tokenizer, max "
                    "length or padding) changed since the cache was written. Rebuild the cache",
                    {"data.tokens": (cached, now)})
        shape = tuple(mask.shape)
        if self.kind == "dense":
            logits = torch.zeros((*shape, self.num_classes), dtype=torch.float32)
            logits[mask] = rows["logits"]
            return {DENSE_KEY: logits}
        k = int(self.k or rows["indices"].shape[-1])
        top = torch.arange(k, dtype=torch.int64).expand(*shape, k).clone()
        logprobs = torch.full((*shape, k), -float(np.log(k)), dtype=torch.float32)
        top[mask] = rows["indices"]
        logprobs[mask] = rows["logprobs"]
        return {TOPK_KEYS[0]: top, TOPK_KEYS[1]: logprobs}
