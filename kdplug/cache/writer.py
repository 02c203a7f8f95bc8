"""``kdplug.cache_teacher``: run a teacher once over a data provider's training split and keep its
outputs in a versioned, checksummed cache folder (layout in :mod:`kdplug.cache.format`).

The samples are cut into chunks of ``chunk_size`` consecutive indices; each chunk is written
through a memory map under a temporary name, fsync'ed, renamed, checksummed, and recorded in its
own small JSON file (the progress record). The manifest is written last, atomically, from those
records. A killed run leaves whole chunks and at most some temporary files: ``resume=True`` keeps
every chunk whose files still match their recorded checksum and writes the rest.

Under ``torchrun`` chunk ``u`` (counting views × chunks) is written by process ``u mod W``: each
process writes its own shard; process 0 writes the manifest after a barrier.
"""
from __future__ import annotations

import datetime
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .._version import __version__
from .._writable import check_writable, creating_folder
from ..data import DataSplits
from ..engine.batching import (EpochItems, SeededDataset, ShardSampler, call_model, check_batch,
                               collate, probe_batch, to_device)
from ..engine.components import Source, build_data, build_teacher
from ..engine.distributed import DistEnv, setup
from ..engine.evaluate import evaluate
from ..engine.loop import autocast_factory
from ..errors import KdplugError
from .config import CacheConfig
from .format import (CHUNK_DIR, DTYPES, FORMAT, FORMAT_VERSION, HASH, MANIFEST, PLAN, CacheError,
                     CacheMismatchError, NpyWriter, atomic_write_json, canonical, chunk_ranges,
                     describe_differences, file_digest, fsync_dir, index_dtype, read_json,
                     seal_manifest, short, to_storage, unit_stem, write_npy)
from .hashing import order_fingerprint, transform_info, weights_hash

__all__ = ["cache_teacher", "CacheResult", "IDENTITY_SECTIONS"]

#: The manifest sections that decide what the cache holds (the rest describes how it was made).
IDENTITY_SECTIONS = ("format", "format_version", "teacher", "data", "transform", "storage")
#: Teacher fields recorded but not compared when resuming (a moved checkpoint is the same teacher).
_NOT_IDENTITY = {"teacher": ("checkpoint",)}


@dataclass
class CacheResult:
    """What :func:`cache_teacher` returns (the manifest holds the same and more)."""

    out: Path
    manifest: Dict[str, Any]
    written: int  # chunks written by this call (all processes)
    skipped: int  # chunks kept from an earlier, interrupted run (resume)
    seconds: float

    @property
    def num_samples(self) -> int:
        return int(self.manifest["data"]["num_samples"])

    @property
    def bytes(self) -> int:
        return int(self.manifest["bytes"])

    @property
    def bytes_per_sample(self) -> float:
        return self.bytes / max(1, self.num_samples * int(self.manifest["transform"]["views"]))

    @property
    def teacher_accuracy(self) -> Optional[float]:
        return (self.manifest.get("teacher_eval") or {}).get("accuracy")

    def summary(self) -> str:
        s = self.manifest["storage"]
        what = f"top-{s['k']}" if s["kind"] == "topk" else "dense"
        views = int(self.manifest["transform"]["views"])
        lines = [f"teacher cache {self.out}: {self.num_samples:,} samples"
                 + (f" x {views} views" if views > 1 else "")
                 + f", {what} {s['dtype']}, {s['num_classes']:,} classes, "
                   f"{self.bytes / 2**20:,.1f} MiB ({self.bytes_per_sample:,.0f} bytes/sample)",
                 f"chunks: {self.written} written, {self.skipped} kept from before; "
                 f"{self.seconds:.1f} s"]
        ev = self.manifest.get("teacher_eval")
        if ev:
            extra = f", perplexity {ev['perplexity']:.3f}" if "perplexity" in ev else ""
            lines.append(f"teacher on the test split: accuracy {100 * ev['accuracy']:.2f}%, "
                         f"loss {ev['loss']:.4f}{extra}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def cache_teacher(teacher: Any = None, data: Any = None, out: Any = None, *,
                  callbacks: Sequence[Any] = (), **options: Any) -> CacheResult:
    """Run ``teacher`` once over ``data``'s training split and write its outputs to ``out``.

    Args:
        teacher: a teacher name (``kdplug.list_teachers()``, ``hf:PATH`` too) or an nn.Module.
        data: a data provider name or a ``kdplug.data.DataSplits``.
        out: the cache folder (created; must be new or empty unless resume/overwrite).
        callbacks: objects with an optional ``on_chunk(view, chunk, start, stop, written)``.
        **options: any :class:`~kdplug.cache.config.CacheConfig` field (``kdplug cache-teacher
            --help`` shows them with their defaults): teacher_checkpoint (the teacher's weights,
            e.g. a distill run's ``checkpoints/teacher.pt``), teacher_options, data_options,
            dtype, top_k (keep the k largest classes per row as indices + log-probabilities at
            T = 1), chunk_size, batch_size, device, amp, resume, overwrite,
            allow_random_transforms and views (a random transform: ``views`` augmented views per
            sample, view v drawn as the engine draws epoch v's under ``seed``), seed,
            evaluate_teacher (measure it on the test split, kept in the manifest and shown as
            the teacher of runs that use the cache), num_workers, threads, quiet.

    Returns a :class:`CacheResult`. Under ``torchrun`` each process writes its share.
    """
    cfg = CacheConfig.from_options({"teacher": teacher, "data": data, "out": out, **options})
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    env = setup(cfg.device)
    try:
        return _Writer(cfg, env, list(callbacks)).run()
    finally:
        env.teardown()
        torch.set_num_threads(threads_before)


def identity(record: Mapping[str, Any]) -> Dict[str, Any]:
    """The sections of a plan/manifest that say what the cache holds."""
    out = {}
    for key in IDENTITY_SECTIONS:
        value = record.get(key)
        if isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in _NOT_IDENTITY.get(key, ())}
        out[key] = value
    return out


@dataclass(frozen=True)
class _Layout:
    """How the cache is cut and stored (decided from the teacher's output on two samples)."""

    ranges: List[Tuple[int, int]]  # the chunks' sample ranges [start, stop)
    views: int  # augmented views per sample (1 for a deterministic transform)
    sequence: bool  # token outputs [B, L, V]: one row per real token
    num_classes: int
    kind: str  # "dense" or "topk"
    index_dtype: np.dtype  # top-k class indices on disk


class _Writer:
    """One cache-teacher run: everything is built and checked in ``__init__`` (data, teacher,
    plan), then :meth:`run` prepares the folder, writes this process's chunks and the manifest."""

    def __init__(self, cfg: CacheConfig, env: DistEnv, callbacks: List[Any]) -> None:
        self.cfg, self.env, self.callbacks = cfg, env, callbacks
        self.out = Path(cfg.out)
        env.on_main(lambda: check_writable(self.out), error=CacheError)  # before any work
        self.quiet = cfg.quiet or not env.is_main
        self.autocast = autocast_factory(cfg.amp, env.device)
        data = Source.of("data", cfg.data)
        self.data_name = data.name
        self.splits = build_data(data, cfg.data_options, env)
        if len(self.splits.train) < 1:
            raise CacheError(f"data {self.data_name!r} has an empty training split")
        self.collate: Callable = self.splits.collate_fn or collate
        teacher = Source.of("teacher", cfg.teacher)
        built = build_teacher(teacher, self.splits, cfg.teacher_options, cfg.seed,
                              cfg.teacher_checkpoint)  # as kdplug.distill builds it
        self.teacher_name = built.name
        self.teacher_options = built.options or {}
        self.model = built.model.to(env.device).eval()
        self.model.requires_grad_(False)
        self.plan, self.layout = self._plan()

    def log(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def run(self) -> CacheResult:
        started = time.perf_counter()
        env = self.env
        env.on_main(lambda: self._prepare_folder(self.plan), error=CacheError)
        written, skipped, error = 0, 0, None
        try:
            written, skipped = self._write_units()
        except BaseException as exc:  # noqa: BLE001 (re-raised below, on every process)
            error = exc
        if env.any_true(error is not None):
            if error is not None:
                raise error
            raise CacheError("another process failed while writing the teacher cache (its error "
                             "is above); rerun with --resume to keep the chunks written so far")
        counts = env.gather((written, skipped))
        written, skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
        env.barrier()
        teacher_eval = self._evaluate() if self.cfg.evaluate_teacher else None
        manifest = None
        if env.is_main:
            manifest = self._write_manifest(teacher_eval, started)
        manifest = env.broadcast(manifest)
        env.barrier()
        return CacheResult(out=self.out, manifest=manifest, written=written, skipped=skipped,
                           seconds=round(time.perf_counter() - started, 3))

    # ------------------------------------------------------------------ set-up
    def _plan(self) -> Tuple[Dict[str, Any], _Layout]:
        cfg = self.cfg
        train = self.splits.train
        info = transform_info(train)
        random_transform = not info["deterministic"]
        if random_transform:
            if not cfg.allow_random_transforms:
                raise CacheError(
                    f"data {self.data_name!r}: its training transform is random (sample "
                    f"{info.get('differs_at')} differs between two loads): a teacher's cached "
                    "outputs would not match the augmented inputs the student sees. Turn the "
                    "augmentation off (the built-in providers: --data-option augment=0), "
                    "or pass --allow-random-transforms to store --views K augmented views per "
                    "sample that distillation then replays exactly (epoch e shows view e mod K; "
                    "the run's --seed must equal the cache's)")
            if not info["reproducible"]:
                raise CacheError(
                    f"data {self.data_name!r}: its training transform is random and not "
                    "reproducible from kdplug's per-item seeding (it draws from an RNG other "
                    "than torch's or Python's global one, e.g. NumPy's), so its views cannot be "
                    "replayed; turn the augmentation off to cache this teacher")
        elif cfg.views != 1:
            raise CacheError(f"views={cfg.views} asks for augmented views, but the training "
                             f"transform of data {self.data_name!r} is deterministic: one view is "
                             "all there is; leave views at 1")
        view_seed = cfg.seed if random_transform else None
        order = order_fingerprint(train, seed=view_seed or 0, epoch=0)
        logits = self._probe_forward()
        sequence = logits.dim() == 3
        num_classes = int(logits.shape[-1])
        if logits.dim() not in (2, 3):
            raise CacheError(f"teacher {self.teacher_name!r} gives logits "
                             f"{list(logits.shape)}; a cache stores [batch, classes] or "
                             "[batch, tokens, vocabulary] outputs")
        if cfg.top_k is not None and cfg.top_k > num_classes:
            raise CacheError(f"top_k={cfg.top_k} exceeds the teacher's {num_classes} classes")
        kind = "dense" if cfg.top_k is None else "topk"
        num_samples = len(train)  # type: ignore[arg-type]
        layout = _Layout(ranges=chunk_ranges(num_samples, cfg.chunk_size),
                         views=cfg.views if random_transform else 1, sequence=sequence,
                         num_classes=num_classes, kind=kind,
                         index_dtype=np.dtype(index_dtype(num_classes)))
        storage = {"kind": kind, "dtype": cfg.dtype, "k": cfg.top_k,
                   "index_dtype": layout.index_dtype.name if kind == "topk" else None,
                   "num_classes": num_classes, "sequence": sequence,
                   "rows": "one per real token (attention_mask)" if sequence else "one per sample",
                   "values": ("log-probabilities at T=1 of the k largest classes, descending"
                              if kind == "topk" else "raw logits (before temperature)"),
                   "chunk_size": cfg.chunk_size, "num_chunks": len(layout.ranges)}
        teacher = {"name": self.teacher_name, "options": self.teacher_options,
                   "class": type(self.model).__name__,
                   "params": sum(p.numel() for p in self.model.parameters()),
                   "weights_hash": weights_hash(self.model), "amp": cfg.amp,
                   "checkpoint": str(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else None}
        data = {"name": self.data_name, "options": cfg.data_options, "split": "train",
                "task": self.splits.task, "num_samples": num_samples,
                "num_classes": self.splits.num_classes, "order": order}
        transform = {"description": info["description"], "deterministic": info["deterministic"],
                     "views": layout.views, "seed": view_seed}
        plan = {"format": FORMAT, "format_version": FORMAT_VERSION, "kdplug_version": __version__,
                "teacher": canonical(teacher), "data": canonical(data),
                "transform": canonical(transform), "storage": storage,
                "writer": {"batch_size": cfg.batch_size, "device": str(self.env.device),
                           "world_size": self.env.world_size,
                           # CPU sums depend on it: equal bytes need equal thread counts
                           "threads": torch.get_num_threads(),
                           "partition": "chunk u (view-major) is written by process u mod "
                                        "world_size",
                           "started": datetime.datetime.now().isoformat(timespec="seconds")}}
        return plan, layout

    def _probe_forward(self) -> torch.Tensor:
        batch = probe_batch(self.splits.train, self.collate, f"data {self.data_name!r}",
                            self.env.device)
        try:
            with torch.no_grad(), self.autocast():
                return call_model(self.model, batch).logits
        except Exception as exc:
            raise KdplugError(f"the teacher {self.teacher_name!r} does not fit data "
                              f"{self.data_name!r}: a forward on two training samples failed "
                              f"with {type(exc).__name__}: {exc}") from None

    def _prepare_folder(self, plan: Dict[str, Any]) -> None:
        out = self.out
        manifest_path, plan_path, chunks = out / MANIFEST, out / PLAN, out / CHUNK_DIR
        existing = None
        if manifest_path.is_file():
            existing, state = read_json(manifest_path, "the manifest"), "complete"
        elif plan_path.is_file():
            existing, state = read_json(plan_path, "the cache plan"), "incomplete"
        if existing is not None:
            if self.cfg.overwrite:
                manifest_path.unlink(missing_ok=True)
                plan_path.unlink(missing_ok=True)
                shutil.rmtree(chunks, ignore_errors=True)
            elif self.cfg.resume:
                differ = describe_differences(identity(existing), identity(plan))
                if differ:
                    shown = "; ".join(f"{key}: {short(then)} then, {short(now)} now"
                                      for key, (then, now) in differ.items())
                    raise CacheMismatchError(
                        f"--resume: the {state} teacher cache in {str(out)!r} was written with "
                        f"other settings ({shown}). Resume with the same settings, or "
                        "--overwrite to rebuild it", differ)
                self.log(f"cache-teacher: resuming the {state} cache in {out}")
            else:
                hint = ("--resume to check it and rewrite any damaged chunk" if state == "complete"
                        else "--resume to finish it (a run stopped mid-write)")
                article = "a" if state == "complete" else "an"
                raise CacheError(f"{str(out)!r} already holds {article} {state} teacher cache; "
                                 f"pass {hint}, --overwrite to rebuild it, or choose another "
                                 "--out")
        elif out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CacheError(f"{str(out)!r} exists and is not an empty folder nor a teacher cache; "
                             "choose a new or empty folder for --out")
        with creating_folder(out):  # the plan first: a failed start leaves no empty folder
            atomic_write_json(plan, plan_path)
            chunks.mkdir(exist_ok=True)
            for stale in chunks.glob(".*.tmp-*"):  # a killed run's half-written files
                stale.unlink()

    # ------------------------------------------------------------------ writing
    def _write_units(self) -> Tuple[int, int]:
        env = self.env
        layout = self.layout
        units = [(v, c) for v in range(layout.views) for c in range(len(layout.ranges))]
        mine = [u for i, u in enumerate(units) if i % env.world_size == env.rank]
        total_samples = sum(layout.ranges[c][1] - layout.ranges[c][0] for _, c in mine)
        bar = None
        if not self.quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=total_samples, desc="cache-teacher", unit="sample", leave=False,
                       file=sys.stderr, dynamic_ncols=True)
        written = skipped = done = 0
        every = max(1, math.ceil(len(mine) / 10))
        seeded = self.layout.views > 1 or self.plan["transform"]["seed"] is not None
        # keyed (view, index): view v is what the engine's epoch v loads
        items = EpochItems(SeededDataset(self.splits.train, self.cfg.seed) if seeded
                           else self.splits.train)
        for n, (view, chunk) in enumerate(mine, 1):
            start, stop = self.layout.ranges[chunk]
            unit_started = time.perf_counter()
            if self._verified(view, chunk):
                skipped += 1
                kept = True
            else:
                self._write_unit(items, view, chunk, start, stop)
                written += 1
                kept = False
            done += stop - start
            if bar is not None:
                bar.update(stop - start)
            elif n % every == 0 or n == len(mine):
                what = "kept (verified)" if kept else "written"
                self.log(f"cache-teacher: chunk {n}/{len(mine)} {what}: samples "
                         f"{start}..{stop - 1}" + (f" view {view}" if layout.views > 1 else "")
                         + f" ({time.perf_counter() - unit_started:.1f} s)")
            for cb in self.callbacks:
                hook = getattr(cb, "on_chunk", None)
                if hook is not None:
                    hook(view=view, chunk=chunk, start=start, stop=stop, written=not kept)
        if bar is not None:
            bar.close()
        return written, skipped

    def _sidecar(self, view: int, chunk: int) -> Path:
        return self.out / CHUNK_DIR / f"{unit_stem(view, chunk)}.json"

    def _verified(self, view: int, chunk: int) -> bool:
        """The chunk's record exists, fits this plan and its files match their checksums."""
        path = self._sidecar(view, chunk)
        if not path.is_file():
            return False
        try:
            record = read_json(path, "chunk record")
        except CacheError:
            return False
        start, stop = self.layout.ranges[chunk]
        if (record.get("start"), record.get("stop"), record.get("view")) != (start, stop, view):
            return False
        for file_record in record.get("files", {}).values():
            file = self.out / file_record["path"]
            if not file.is_file() or file.stat().st_size != file_record["bytes"] \
                    or file_digest(file) != file_record[HASH]:
                self.log(f"cache-teacher: {file_record['path']} fails its checksum; rewriting")
                return False
        return bool(record.get("files"))

    def _write_unit(self, items: Dataset, view: int, chunk: int, start: int, stop: int) -> None:
        self._sidecar(view, chunk).unlink(missing_ok=True)
        keys = [(view, i) for i in range(start, stop)]
        size = self.cfg.batch_size
        sampler = [keys[i:i + size] for i in range(0, len(keys), size)]
        loader = DataLoader(items, batch_sampler=sampler, collate_fn=self.collate,
                            num_workers=self.cfg.num_workers)
        batches, lengths = [], []
        for batch in loader:  # the inputs of one chunk: small next to its outputs
            batch = check_batch(batch, f"data {self.data_name!r}")
            if self.layout.sequence:
                mask = batch.get("attention_mask")
                if not isinstance(mask, torch.Tensor):
                    mask = torch.ones(batch["inputs"].shape[:2], dtype=torch.bool)
                mask = mask.to(torch.bool)
                lengths += mask.sum(1).tolist()
            else:
                mask = None
                lengths += [1] * int(batch["labels"].shape[0])
            batches.append((batch, mask))
        rows = int(sum(lengths))
        stem = self.out / CHUNK_DIR / unit_stem(view, chunk)
        storage_dtype = DTYPES[self.cfg.dtype]
        if self.layout.kind == "dense":
            writers = {"logits": NpyWriter(Path(f"{stem}.logits.npy"),
                                           (rows, self.layout.num_classes),
                                           storage_dtype, self.out)}
        else:
            writers = {"indices": NpyWriter(Path(f"{stem}.indices.npy"), (rows, self.cfg.top_k),
                                            self.layout.index_dtype, self.out),
                       "logprobs": NpyWriter(Path(f"{stem}.logprobs.npy"), (rows, self.cfg.top_k),
                                             storage_dtype, self.out)}
        try:
            row = 0
            for b, (batch, mask) in enumerate(batches):
                out = self._forward(batch, mask, start + b * self.cfg.batch_size)
                n = int(out.shape[0])
                if self.layout.kind == "dense":
                    writers["logits"].array[row:row + n] = to_storage(out, self.cfg.dtype)
                else:
                    values, top = out.topk(self.cfg.top_k, dim=-1)
                    logprobs = values - torch.logsumexp(out, dim=-1, keepdim=True)
                    writers["indices"].array[row:row + n] = top.cpu().numpy().astype(
                        self.layout.index_dtype)
                    writers["logprobs"].array[row:row + n] = to_storage(logprobs, self.cfg.dtype)
                row += n
            files = {name: w.close() for name, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        if self.layout.sequence:
            files["lengths"] = write_npy(np.asarray(lengths, dtype=np.int32),
                                         Path(f"{stem}.lengths.npy"), self.out)
        atomic_write_json({"view": view, "chunk": chunk, "start": start, "stop": stop,
                           "rows": rows, "files": files, "rank": self.env.rank},
                          self._sidecar(view, chunk))

    def _forward(self, batch: Dict[str, Any], mask: Optional[torch.Tensor], first: int
                 ) -> torch.Tensor:
        batch = to_device(batch, self.env.device)
        with torch.no_grad(), self.autocast():
            logits = call_model(self.model, batch).logits
        logits = logits.float()
        if self.layout.sequence:
            if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(mask.shape):
                raise CacheError(f"teacher {self.teacher_name!r} gave logits "
                                 f"{list(logits.shape)} for a batch of {list(mask.shape)} tokens")
            logits = logits[mask.to(logits.device)]
        if logits.shape[-1] != self.layout.num_classes:
            raise CacheError(f"teacher {self.teacher_name!r} gave {logits.shape[-1]} classes at "
                             f"sample {first}, {self.layout.num_classes} before")
        finite = torch.isfinite(logits).all(-1)
        if not bool(finite.all()):
            raise CacheError(f"teacher {self.teacher_name!r} gave non-finite logits in the batch "
                             f"starting at sample {first}; nothing is cached for it")
        return logits

    # ------------------------------------------------------------------ finishing
    def _evaluate(self) -> Dict[str, Any]:
        env = self.env
        loader = DataLoader(self.splits.test, batch_size=self.cfg.batch_size,
                            sampler=ShardSampler(len(self.splits.test), env.rank, env.world_size),
                            collate_fn=self.collate, num_workers=self.cfg.num_workers)
        metrics = evaluate(self.model, loader, task=self.splits.task, env=env,
                           autocast=self.autocast, where="teacher evaluation (cache-teacher)")
        return {"split": "test", **metrics}

    def _write_manifest(self, teacher_eval: Optional[Dict[str, Any]], started: float
                        ) -> Dict[str, Any]:
        records: List[Dict[str, Any]] = []
        for view in range(self.layout.views):
            for chunk in range(len(self.layout.ranges)):
                path = self._sidecar(view, chunk)
                if not path.is_file():
                    raise CacheError(f"chunk {chunk} of view {view} has no record after every "
                                     "process finished; rerun with --resume")
                records.append(read_json(path, "chunk record"))
        manifest = dict(self.plan)
        manifest["writer"] = {**self.plan["writer"],
                              "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                              "seconds": round(time.perf_counter() - started, 3)}
        manifest["chunks"] = records
        manifest["rows"] = sum(int(r["rows"]) for r in records)
        manifest["bytes"] = sum(int(f["bytes"]) for r in records for f in r["files"].values())
        manifest["teacher_eval"] = teacher_eval
        manifest = seal_manifest(manifest)
        atomic_write_json(manifest, self.out / MANIFEST)
        (self.out / PLAN).unlink(missing_ok=True)
        fsync_dir(self.out)
        return manifest
