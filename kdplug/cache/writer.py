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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..api import get_registration
from ..data import DataSplits
from ..engine.batching import (ShardSampler, call_model, check_batch, collate, mix_seed,
                               probe_batch, to_device)
from ..engine.checkpoint import load_model_weights
from ..engine.distributed import DistEnv, setup
from ..engine.evaluate import evaluate
from ..engine.loop import autocast_factory
from ..engine.run import SEED_TEACHER_INIT, _create, _display_name, _options_for
from ..errors import KdplugError
from .format import (CHUNK_DIR, DTYPES, FORMAT, FORMAT_VERSION, HASH, MANIFEST, PLAN, CacheError,
                     CacheMismatchError, NpyWriter, atomic_write_json, canonical, chunk_ranges,
                     describe_differences, file_digest, fsync_dir, index_dtype, read_json, short,
                     to_storage, unit_stem, write_npy)
from .hashing import load_seeded, order_fingerprint, transform_info, weights_hash

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
                  teacher_checkpoint: Optional[str] = None,
                  teacher_options: Optional[Mapping[str, Any]] = None,
                  data_options: Optional[Mapping[str, Any]] = None, dtype: str = "float32",
                  top_k: Optional[int] = None, chunk_size: int = 1024, batch_size: int = 64,
                  device: str = "auto", amp: str = "none", resume: bool = False,
                  overwrite: bool = False, allow_random_transforms: bool = False,
                  views: int = 1, seed: int = 0, evaluate_teacher: bool = True,
                  num_workers: int = 0, threads: Optional[int] = None, quiet: bool = False,
                  callbacks: Sequence[Any] = ()) -> CacheResult:
    """Run ``teacher`` once over ``data``'s training split and write its outputs to ``out``.

    Args:
        teacher: a teacher name (``kdplug.list_teachers()``, ``hf:PATH`` too) or an nn.Module.
        data: a data provider name or a ``kdplug.data.DataSplits``.
        out: the cache folder (created; must be new or empty unless resume/overwrite).
        teacher_checkpoint: load the teacher's weights from this file (e.g. the
            ``checkpoints/teacher.pt`` of a ``kdplug distill`` run, or a plain state_dict).
        teacher_options, data_options: factory options, as for ``kdplug.distill``.
        dtype: float32 (default), float16 or bfloat16: how dense logits (or top-k
            log-probabilities) are stored.
        top_k: keep only the k largest classes per row (indices + log-probabilities at T = 1).
        chunk_size: samples per chunk file (the unit of writing, checksumming and resuming).
        batch_size: teacher batch size; device, amp ("none", "bf16", "fp16"): where and how the
            teacher runs.
        resume: continue (or repair) the cache in ``out``: verified chunks are kept.
        overwrite: delete the cache in ``out`` first.
        allow_random_transforms: the training transform is random: store ``views`` augmented
            views per sample, view v drawn exactly as the engine draws epoch v's augmentation
            under ``seed`` (a run with the cache replays epoch e as view e mod views).
        evaluate_teacher: also measure the teacher on the test split (kept in the manifest and
            shown as the teacher in reports of runs that use the cache).
        callbacks: objects with an optional ``on_chunk(view, chunk, start, stop, written)``.

    Returns a :class:`CacheResult`. Under ``torchrun`` each process writes its share.
    """
    _check_arguments(dtype, top_k, chunk_size, batch_size, views, seed, resume, overwrite, amp)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    env = setup(device)
    try:
        writer = _Writer(env=env, teacher=teacher, data=data, out=out,
                         teacher_checkpoint=teacher_checkpoint,
                         teacher_options=dict(teacher_options or {}),
                         data_options=dict(data_options or {}), dtype=dtype, top_k=top_k,
                         chunk_size=chunk_size, batch_size=batch_size, amp=amp, resume=resume,
                         overwrite=overwrite, allow_random=allow_random_transforms, views=views,
                         seed=seed, evaluate_teacher=evaluate_teacher, num_workers=num_workers,
                         quiet=quiet or not env.is_main, callbacks=list(callbacks))
        return writer.run()
    finally:
        env.teardown()
        torch.set_num_threads(threads_before)


def _check_arguments(dtype, top_k, chunk_size, batch_size, views, seed, resume, overwrite,
                     amp) -> None:
    if dtype not in DTYPES:
        raise CacheError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value, low in (("chunk_size", chunk_size, 1), ("batch_size", batch_size, 1),
                             ("views", views, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise CacheError(f"{name} must be an int >= {low}, got {value!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise CacheError(f"top_k must be an int >= 1 (or none for dense logits), got {top_k!r}")
    if resume and overwrite:
        raise CacheError("resume and overwrite exclude each other: resume continues the cache, "
                         "overwrite rebuilds it")
    if amp not in ("none", "bf16", "fp16"):
        raise CacheError(f"amp must be none, bf16 or fp16, got {amp!r}")


def identity(record: Mapping[str, Any]) -> Dict[str, Any]:
    """The sections of a plan/manifest that say what the cache holds."""
    out = {}
    for key in IDENTITY_SECTIONS:
        value = record.get(key)
        if isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in _NOT_IDENTITY.get(key, ())}
        out[key] = value
    return out


class _ViewItems(Dataset):
    """Items keyed by (view, index): loaded as the engine loads epoch ``view``'s item ``index``."""

    def __init__(self, dataset: Dataset, seed: int, seeded: bool) -> None:
        self.dataset, self.seed, self.seeded = dataset, seed, seeded

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        view, index = key
        if self.seeded:
            return load_seeded(self.dataset, index, self.seed, view)
        return self.dataset[index]


class _Writer:
    def __init__(self, *, env: DistEnv, teacher: Any, data: Any, out: Any, **options: Any) -> None:
        if teacher is None or data is None or out is None:
            missing = [n for n, v in (("teacher", teacher), ("data", data), ("out", out))
                       if v is None]
            raise CacheError(f"cache_teacher needs a teacher, data and an output folder; "
                             f"missing: {', '.join(missing)}")
        self.env, self.teacher_arg, self.data_arg = env, teacher, data
        self.out = Path(out)
        for key, value in options.items():
            setattr(self, key, value)
        self.autocast = autocast_factory(self.amp, env.device)

    def log(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ set-up
    def run(self) -> CacheResult:
        started = time.perf_counter()
        env = self.env
        self.splits = self._data()
        self.model = self._teacher()
        self.collate = self.splits.collate_fn or collate
        plan = self._plan()
        problem = None
        if env.is_main:
            try:
                self._prepare_folder(plan)
            except KdplugError as exc:
                problem = exc
        message = env.broadcast(None if problem is None else (type(problem).__name__,
                                                              str(problem)))
        if problem is not None:
            raise problem
        if message is not None:
            raise CacheError(message[1])
        self.plan = plan
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
        teacher_eval = self._evaluate() if self.evaluate_teacher else None
        manifest = None
        if env.is_main:
            manifest = self._write_manifest(teacher_eval, started)
        manifest = env.broadcast(manifest)
        env.barrier()
        result = CacheResult(out=self.out, manifest=manifest, written=written, skipped=skipped,
                             seconds=round(time.perf_counter() - started, 3))
        return result

    def _data(self) -> DataSplits:
        env = self.env
        if isinstance(self.data_arg, str):
            registration = get_registration("dataset", self.data_arg)
            self.data_name = self.data_arg
            splits = None
            for turn in ((0,) if not env.distributed else (0, 1)):
                if (env.rank == 0) == (turn == 0):  # rank 0 first: it may download
                    splits = _create(registration, "data", self.data_arg, self.data_options)
                env.barrier()
        else:
            if self.data_options:
                raise CacheError("data_options apply to data given by name; this data was given "
                                 "as a ready object")
            splits = self.data_arg
            self.data_name = _display_name(splits)
        if not isinstance(splits, DataSplits):
            raise KdplugError(f"data {self.data_name!r} gave a {type(splits).__name__}; a data "
                              "provider must return a kdplug.data.DataSplits")
        if len(splits.train) < 1:
            raise CacheError(f"data {self.data_name!r} has an empty training split")
        return splits

    def _teacher(self) -> torch.nn.Module:
        if isinstance(self.teacher_arg, str):
            registration = get_registration("teacher", self.teacher_arg)
            self.teacher_name = self.teacher_arg
            self.resolved_options = _options_for(registration.factory, self.splits.model_options,
                                                 self.teacher_options)
            with torch.random.fork_rng(devices=[]):  # as kdplug.distill builds it
                torch.manual_seed(mix_seed(self.seed, SEED_TEACHER_INIT))
                model = _create(registration, "teacher", self.teacher_arg, self.resolved_options)
        elif isinstance(self.teacher_arg, torch.nn.Module):
            if self.teacher_options:
                raise CacheError("teacher_options apply to a teacher given by name; this teacher "
                                 "was given as a ready nn.Module")
            model, self.teacher_name, self.resolved_options = (
                self.teacher_arg, _display_name(self.teacher_arg), {})
        else:
            raise CacheError(f"the teacher must be a name or a torch.nn.Module, got "
                             f"{type(self.teacher_arg).__name__}")
        if self.teacher_checkpoint:
            load_model_weights(model, Path(self.teacher_checkpoint),
                               f"teacher {self.teacher_name!r}")
        model.to(self.env.device).eval()
        model.requires_grad_(False)
        return model

    def _plan(self) -> Dict[str, Any]:
        train = self.splits.train
        info = transform_info(train)
        random_transform = not info["deterministic"]
        if random_transform:
            if not self.allow_random:
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
        elif self.views != 1:
            raise CacheError(f"views={self.views} asks for augmented views, but the training "
                             f"transform of data {self.data_name!r} is deterministic: one view is "
                             "all there is; leave views at 1")
        view_seed = self.seed if random_transform else None
        order = order_fingerprint(train, seed=view_seed or 0, epoch=0)
        logits = self._probe_forward()
        sequence = logits.dim() == 3
        num_classes = int(logits.shape[-1])
        if logits.dim() not in (2, 3):
            raise CacheError(f"teacher {self.teacher_name!r} gives logits "
                             f"{list(logits.shape)}; a cache stores [batch, classes] or "
                             "[batch, tokens, vocabulary] outputs")
        if self.top_k is not None and self.top_k > num_classes:
            raise CacheError(f"top_k={self.top_k} exceeds the teacher's {num_classes} classes")
        kind = "dense" if self.top_k is None else "topk"
        num_samples = len(train)  # type: ignore[arg-type]
        self.ranges = chunk_ranges(num_samples, self.chunk_size)
        self.sequence, self.num_classes, self.kind = sequence, num_classes, kind
        self.views = self.views if random_transform else 1
        self.index_dtype = np.dtype(index_dtype(num_classes))
        storage = {"kind": kind, "dtype": self.dtype, "k": self.top_k,
                   "index_dtype": self.index_dtype.name if kind == "topk" else None,
                   "num_classes": num_classes, "sequence": sequence,
                   "rows": "one per real token (attention_mask)" if sequence else "one per sample",
                   "values": ("log-probabilities at T=1 of the k largest classes, descending"
                              if kind == "topk" else "raw logits (before temperature)"),
                   "chunk_size": self.chunk_size, "num_chunks": len(self.ranges)}
        teacher = {"name": self.teacher_name, "options": self.resolved_options,
                   "class": type(self.model).__name__,
                   "params": sum(p.numel() for p in self.model.parameters()),
                   "weights_hash": weights_hash(self.model), "amp": self.amp,
                   "checkpoint": str(self.teacher_checkpoint) if self.teacher_checkpoint else None}
        data = {"name": self.data_name, "options": self.data_options, "split": "train",
                "task": self.splits.task, "num_samples": num_samples,
                "num_classes": self.splits.num_classes, "order": order}
        transform = {"description": info["description"], "deterministic": info["deterministic"],
                     "views": self.views, "seed": view_seed}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "kdplug_version": __version__,
                "teacher": canonical(teacher), "data": canonical(data),
                "transform": canonical(transform), "storage": storage,
                "writer": {"batch_size": self.batch_size, "device": str(self.env.device),
                           "world_size": self.env.world_size,
                           "partition": "chunk u (view-major) is written by process u mod "
                                        "world_size",
                           "started": datetime.datetime.now().isoformat(timespec="seconds")}}

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
            if self.overwrite:
                manifest_path.unlink(missing_ok=True)
                plan_path.unlink(missing_ok=True)
                shutil.rmtree(chunks, ignore_errors=True)
            elif self.resume:
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
        chunks.mkdir(parents=True, exist_ok=True)
        for stale in chunks.glob(".*.tmp-*"):  # a killed run's half-written files
            stale.unlink()
        atomic_write_json(plan, plan_path)

    # ------------------------------------------------------------------ writing
    def _write_units(self) -> Tuple[int, int]:
        env = self.env
        units = [(v, c) for v in range(self.views) for c in range(len(self.ranges))]
        mine = [u for i, u in enumerate(units) if i % env.world_size == env.rank]
        total_samples = sum(self.ranges[c][1] - self.ranges[c][0] for _, c in mine)
        bar = None
        if not self.quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=total_samples, desc="cache-teacher", unit="sample", leave=False,
                       file=sys.stderr, dynamic_ncols=True)
        written = skipped = done = 0
        every = max(1, math.ceil(len(mine) / 10))
        items = _ViewItems(self.splits.train, self.seed, seeded=self.views > 1 or
                           self.plan["transform"]["seed"] is not None)
        for n, (view, chunk) in enumerate(mine, 1):
            start, stop = self.ranges[chunk]
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
                         f"{start}..{stop - 1}" + (f" view {view}" if self.views > 1 else "")
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
        start, stop = self.ranges[chunk]
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
        sampler = [keys[i:i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
        loader = DataLoader(items, batch_sampler=sampler, collate_fn=self.collate,
                            num_workers=self.num_workers)
        batches, lengths = [], []
        for batch in loader:  # the inputs of one chunk: small next to its outputs
            batch = check_batch(batch, f"data {self.data_name!r}")
            if self.sequence:
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
        storage_dtype = DTYPES[self.dtype]
        if self.kind == "dense":
            writers = {"logits": NpyWriter(Path(f"{stem}.logits.npy"), (rows, self.num_classes),
                                           storage_dtype, self.out)}
        else:
            writers = {"indices": NpyWriter(Path(f"{stem}.indices.npy"), (rows, self.top_k),
                                            self.index_dtype, self.out),
                       "logprobs": NpyWriter(Path(f"{stem}.logprobs.npy"), (rows, self.top_k),
                                             storage_dtype, self.out)}
        try:
            row = 0
            for b, (batch, mask) in enumerate(batches):
                out = self._forward(batch, mask, start + b * self.batch_size)
                n = int(out.shape[0])
                if self.kind == "dense":
                    writers["logits"].array[row:row + n] = to_storage(out, self.dtype)
                else:
                    values, top = out.topk(self.top_k, dim=-1)
                    logprobs = values - torch.logsumexp(out, dim=-1, keepdim=True)
                    writers["indices"].array[row:row + n] = top.cpu().numpy().astype(
                        self.index_dtype)
                    writers["logprobs"].array[row:row + n] = to_storage(logprobs, self.dtype)
                row += n
            files = {name: w.close() for name, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        if self.sequence:
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
        if self.sequence:
            if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(mask.shape):
                raise CacheError(f"teacher {self.teacher_name!r} gave logits "
                                 f"{list(logits.shape)} for a batch of {list(mask.shape)} tokens")
            logits = logits[mask.to(logits.device)]
        if logits.shape[-1] != self.num_classes:
            raise CacheError(f"teacher {self.teacher_name!r} gave {logits.shape[-1]} classes at "
                             f"sample {first}, {self.num_classes} before")
        finite = torch.isfinite(logits).all(-1)
        if not bool(finite.all()):
            raise CacheError(f"teacher {self.teacher_name!r} gave non-finite logits in the batch "
                             f"starting at sample {first}; nothing is cached for it")
        return logits

    # ------------------------------------------------------------------ finishing
    def _evaluate(self) -> Dict[str, Any]:
        env = self.env
        loader = DataLoader(self.splits.test, batch_size=self.batch_size,
                            sampler=ShardSampler(len(self.splits.test), env.rank, env.world_size),
                            collate_fn=self.collate, num_workers=self.num_workers)
        metrics = evaluate(self.model, loader, task=self.splits.task, env=env,
                           autocast=self.autocast, where="teacher evaluation (cache-teacher)")
        return {"split": "test", **metrics}

    def _write_manifest(self, teacher_eval: Optional[Dict[str, Any]], started: float
                        ) -> Dict[str, Any]:
        records: List[Dict[str, Any]] = []
        for view in range(self.views):
            for chunk in range(len(self.ranges)):
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
        atomic_write_json(manifest, self.out / MANIFEST)
        (self.out / PLAN).unlink(missing_ok=True)
        fsync_dir(self.out)
        return manifest
