"""``kdplug.distill``: teacher phase → distilled student → optional scratch baseline → report.

The procedure (Hinton et al., 2015), with the usual sketch's bugs designed out:

1. **teacher**: trained on the labels with cross-entropy (its own optimizer), or loaded from
   ``teacher_checkpoint``;
2. **student**: trained with the distillation loss (default ``kd+ce``); the teacher is in
   ``eval()`` mode, frozen, and runs under ``torch.no_grad()``; the loss feeds log-probabilities
   of both sides at temperature T to the KL, scales it by T² and mixes in the hard labels by α;
3. **scratch** (``baseline=True``): a copy of the student's initial weights trained on the labels
   alone with the same epochs, optimizer, schedule, data order and seed;
4. evaluation after every epoch; ``report.json``, ``metrics.jsonl``, ``curves.png``, the resolved
   config and checkpoints in ``out``.

Everything that can be wrong with the inputs is checked before the first step (names, options,
T, α, a dry forward of both models on two training samples, the loss on that batch).
"""
from __future__ import annotations

import copy
import datetime
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import __version__
from ..api import get_registration
from ..data import DataSplits
from ..errors import KdplugError
from ..losses import CrossEntropyLoss
from ..outputs import ModelOutput
from . import report as reporting
from .batching import (EpochSampler, SeededDataset, ShardSampler, call_model, check_batch,
                       collate, mix_seed, needs_seeding, probe_batch, requirements, to_device)
from .checkpoint import load_checkpoint, load_model_weights, seed_everything
from .config import ConfigError, DistillConfig, resolve_config
from .distributed import DistEnv, setup
from .evaluate import evaluate, measure_inference_ms
from .loop import PhaseRun, Trainer, autocast_factory

__all__ = ["distill", "DistillResult", "PhaseResult"]

OUTPUT_FILES = ("report.json", "metrics.jsonl", "curves.png", "config.json", "config.toml")
SEED_TEACHER_INIT, SEED_STUDENT_INIT, SEED_TEACHER_PHASE, SEED_STUDENT_PHASE = 1, 2, 11, 22


@dataclass
class PhaseResult:
    """One model's outcome: the numbers of report.json plus its history and the trained module."""

    phase: str  # "teacher", "student" (distilled) or "scratch"
    name: str
    params: int
    accuracy: Optional[float]  # None: not available (a teacher cache without its evaluation)
    loss: Optional[float]
    metrics: Dict[str, Any]  # final test metrics (accuracy, loss; perplexity for "lm")
    inference_ms_per_batch: Optional[float]
    epochs: int  # epochs trained (0: loaded or used as built)
    source: str  # "trained", "checkpoint <path>", "as built"
    train_time_s: float
    history: List[Dict[str, Any]] = field(default_factory=list)
    checkpoint: Optional[str] = None
    model: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        out = {k: getattr(self, k) for k in ("name", "params", "accuracy", "loss",
                                             "inference_ms_per_batch", "epochs", "source",
                                             "train_time_s", "checkpoint")}
        out.update({k: v for k, v in self.metrics.items() if k not in out})
        return out


@dataclass
class DistillResult:
    """What :func:`distill` returns (the same numbers as ``out/report.json``)."""

    teacher: PhaseResult
    student: PhaseResult
    scratch: Optional[PhaseResult]
    config: DistillConfig
    out: Path
    report: Dict[str, Any]

    @property
    def task(self) -> str:
        return self.report["task"]

    @property
    def gain(self) -> Optional[float]:
        """Distilled minus scratch accuracy (None without a baseline)."""
        return None if self.scratch is None else self.student.accuracy - self.scratch.accuracy

    def table(self) -> str:
        """The side-by-side summary the CLI prints."""
        return reporting.format_table(self.report)

    def __str__(self) -> str:
        return self.table()


def distill(teacher: Any = None, student: Any = None, data: Any = None, loss: Any = None, *,
            config: Any = None, callbacks: Sequence[Any] = (), **options: Any) -> DistillResult:
    """Distil ``teacher`` into ``student`` on ``data``; see the module docstring for the phases.

    Args:
        teacher, student: registry names (``kdplug.list_teachers()``) or ready ``nn.Module``\\ s.
        data: a data provider name (``kdplug.list_datasets()``) or a ``kdplug.data.DataSplits``.
        loss: a loss name (default ``"kd+ce"``) or a ready callable
            ``loss(student_out, teacher_out, batch) -> scalar``.
        config: a TOML file path, a mapping or a DistillConfig; ``options`` override it.
        callbacks: objects with optional ``on_step(phase, epoch, step, loss)`` and
            ``on_epoch_end(phase, epoch, metrics)`` methods (called on every process).
        **options: any :class:`~kdplug.engine.config.DistillConfig` key: temperature, alpha,
            epochs, teacher_epochs, teacher_checkpoint, baseline, out, resume, overwrite, seed,
            batch_size, lr, optimizer, scheduler, device, amp, teacher_options, data_options, …

    Returns a :class:`DistillResult`. Under ``torchrun`` every process returns it; only rank 0
    writes files.
    """
    names: Dict[str, Any] = {}
    objects: Dict[str, Any] = {}
    for kind, value in (("teacher", teacher), ("student", student), ("data", data),
                        ("loss", loss)):
        if value is None:
            continue
        if isinstance(value, str):
            names[kind] = value
        else:
            objects[kind] = value
            names[kind] = _display_name(value)
    cfg = resolve_config(config, **names, **options)
    missing = [k for k in ("teacher", "student", "data") if getattr(cfg, k) is None
               and not (k == "teacher" and cfg.teacher_cache)]  # a cache stands for the teacher
    if missing:
        raise ConfigError(f"distill needs a teacher, a student and data; missing: "
                          f"{', '.join(missing)} (names: `kdplug plugins` lists them)")
    if cfg.resume and not cfg.out:
        raise ConfigError("resume needs out: the folder of the run to continue")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = setup(cfg.device)
    try:
        return _Run(cfg, objects, env, list(callbacks)).execute()
    finally:
        env.teardown()
        torch.set_num_threads(threads)


def _display_name(obj: Any) -> str:
    if isinstance(obj, DataSplits):
        return str(obj.info.get("name", "DataSplits"))
    return getattr(obj, "__name__", None) or type(obj).__name__


class _Run:
    def __init__(self, cfg: DistillConfig, objects: Dict[str, Any], env: DistEnv,
                 callbacks: List[Any]) -> None:
        self.cfg, self.objects, self.env, self.callbacks = cfg, objects, env, callbacks
        self.records: List[Dict[str, Any]] = []
        self.quiet = cfg.quiet or not env.is_main

    def log(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ set-up, all before training
    def execute(self) -> DistillResult:
        cfg, env = self.cfg, self.env
        registrations = {kind: get_registration(reg_kind, getattr(cfg, kind))
                         for kind, reg_kind in (("teacher", "teacher"), ("student", "student"),
                                                ("data", "dataset"), ("loss", "loss"))
                         if kind not in self.objects and getattr(cfg, kind) is not None}
        self.out = self._prepare_out()
        seed_everything(cfg.seed)
        splits = self._data(registrations.get("data"))
        self.splits = splits
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(cfg.seed, SEED_TEACHER_INIT))
            teacher = None
            if self._teacher_needed():
                teacher = self._model("teacher", registrations.get("teacher"), splits,
                                      cfg.teacher_options)
            torch.manual_seed(mix_seed(cfg.seed, SEED_STUDENT_INIT))
            student = self._model("student", registrations.get("student"), splits,
                                  cfg.student_options)
        scratch = copy.deepcopy(student) if cfg.baseline else None
        loss = self._loss(registrations.get("loss"))
        device = env.device
        for module in (teacher, student, scratch, loss):
            if isinstance(module, nn.Module):
                module.to(device)
        self.collate = splits.collate_fn or collate
        self.cache = None
        if cfg.teacher_cache:  # checked against this run; the teacher's checkpoint is loaded
            from ..cache.integration import DryRunTeacher, open_for_run

            self.cache = open_for_run(self, teacher, registrations.get("teacher"), splits, loss)
            teacher = None  # built only to hash its weights: free its memory
            self._dry_run(DryRunTeacher(self.cache), student, loss, splits)
        else:
            self._dry_run(teacher, student, loss, splits)
        if cfg.teacher_checkpoint and self.cache is None:
            load_model_weights(teacher, Path(cfg.teacher_checkpoint), f"teacher {cfg.teacher!r}")
        if env.is_main:
            reporting.write_config(self.out, cfg.to_dict() | {"out": str(self.out)})
        self._loaders(splits)

        # ------------------------------------------------------------------ phases
        if self.cache is not None:
            teacher_result = self._cached_teacher()
        elif cfg.teacher_checkpoint:
            self.log(f"teacher: loaded from {cfg.teacher_checkpoint}")
            teacher_result = self._untrained("teacher", teacher,
                                             f"checkpoint {cfg.teacher_checkpoint}")
        elif cfg.resolved_teacher_epochs == 0:
            teacher_result = self._untrained("teacher", teacher, "as built")
        else:
            teacher_result = self._phase("teacher", teacher, CrossEntropyLoss(), None,
                                         cfg.resolved_teacher_epochs, cfg.resolved_teacher_lr,
                                         SEED_TEACHER_PHASE)
        student_result = self._phase("student", student, loss, teacher, cfg.epochs, cfg.lr,
                                     SEED_STUDENT_PHASE)
        scratch_result = None
        if scratch is not None:
            scratch_result = self._phase("scratch", scratch, CrossEntropyLoss(), None, cfg.epochs,
                                         cfg.lr, SEED_STUDENT_PHASE)
        return self._finish(teacher_result, student_result, scratch_result)

    def _teacher_needed(self) -> bool:
        """Without a cache always; with one only to hash the weights the run names."""
        cfg = self.cfg
        if not cfg.teacher_cache or "teacher" in self.objects:
            return True
        if cfg.teacher_checkpoint and cfg.teacher is None:
            raise ConfigError("teacher_checkpoint with teacher_cache needs the teacher's name too "
                              "(--teacher NAME): its weights are hashed and compared with the "
                              "cache's")
        return bool(cfg.teacher_checkpoint)

    def _cached_teacher(self) -> PhaseResult:
        """The cache is the teacher: its numbers come from the manifest (None if not recorded)."""
        from ..cache.integration import teacher_phase_result

        info = teacher_phase_result(self.cache)
        self.log(f"teacher: from the cache {self.cache.path} ({self.cache.kind}"
                 + (f" top-{self.cache.k}" if self.cache.kind == "topk" else "")
                 + f", {self.cache.dtype}); no teacher phase")
        return PhaseResult(phase="teacher", name=self.cfg.teacher or info["name"],
                           params=info["params"], accuracy=info["accuracy"], loss=info["loss"],
                           metrics=info["metrics"], inference_ms_per_batch=None, epochs=0,
                           source=info["source"], train_time_s=0.0, model=None)

    def _prepare_out(self) -> Path:
        cfg, env = self.cfg, self.env
        if cfg.out:
            out = Path(cfg.out)
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"distill-{stamp}"
            n = 1
            while out.exists():
                out = Path("runs") / f"distill-{stamp}-{n}"
                n += 1
            out = Path(env.broadcast(str(out)))
        ckpt_dir = out / "checkpoints"
        existing = sorted(p.name for p in ckpt_dir.glob("*.pt")) if ckpt_dir.is_dir() else []
        env.barrier()  # every process has looked before rank 0 changes anything
        if existing and not (cfg.resume or cfg.overwrite):
            raise KdplugError(
                f"{out} already holds a run (checkpoints/{', checkpoints/'.join(existing)}); "
                "pass --resume to continue it, --overwrite to start over, or choose another --out")
        if cfg.resume and not existing:
            self.log(f"resume: no checkpoint in {ckpt_dir} yet; starting the run")
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.overwrite:
                for name in existing:
                    (ckpt_dir / name).unlink()
                for name in OUTPUT_FILES:
                    (out / name).unlink(missing_ok=True)
        env.barrier()
        self.ckpt_dir = ckpt_dir
        return out

    def _data(self, registration: Any) -> DataSplits:
        cfg, env = self.cfg, self.env
        if "data" in self.objects:
            splits = self.objects["data"]
        else:
            splits = None
            for turn in ((0,) if not env.distributed else (0, 1)):
                # rank 0 first (it may download), then the others read what it left
                if (env.rank == 0) == (turn == 0):
                    splits = _create(registration, "data", cfg.data, cfg.data_options)
                env.barrier()
        if not isinstance(splits, DataSplits):
            raise KdplugError(f"data {cfg.data!r} gave a {type(splits).__name__}; a data provider "
                              "must return a kdplug.data.DataSplits")
        n_train, n_test = len(splits.train), len(splits.test)
        if n_train < cfg.batch_size:
            raise KdplugError(f"data {cfg.data!r} has {n_train} training samples, fewer than one "
                              f"batch (batch_size {cfg.batch_size}); lower --batch-size")
        if n_test < 1:
            raise KdplugError(f"data {cfg.data!r} has an empty test split")
        if cfg.batch_size % env.world_size:
            raise KdplugError(f"batch_size {cfg.batch_size} must be divisible by the number of "
                              f"processes ({env.world_size}): it is the global batch")
        return splits

    def _model(self, role: str, registration: Any, splits: DataSplits,
               user_options: Mapping[str, Any]) -> nn.Module:
        if role in self.objects:
            model = self.objects[role]
            if not isinstance(model, nn.Module):
                raise KdplugError(f"the {role} must be a name or a torch.nn.Module, got "
                                  f"{type(model).__name__}")
            if user_options:
                raise ConfigError(f"{role}_options apply to a {role} built by name; this {role} "
                                  "was given as a ready object")
            return model
        options = _options_for(registration.factory, splits.model_options, user_options)
        return _create(registration, role, getattr(self.cfg, role), options)

    def _loss(self, registration: Any) -> Callable:
        cfg = self.cfg
        if "loss" in self.objects:
            loss = self.objects["loss"]
            if not callable(loss):
                raise KdplugError(f"the loss must be a name or a callable, got "
                                  f"{type(loss).__name__}")
            if cfg.loss_options:
                raise ConfigError("loss_options apply to a loss built by name; this loss was "
                                  "given as a ready object")
        else:
            engine = {"temperature": cfg.temperature, "alpha": cfg.alpha}
            loss = _create(registration, "loss", cfg.loss,
                           _options_for(registration.factory, engine, cfg.loss_options))
        self.requires = requirements(loss)
        return loss

    def _dry_run(self, teacher: nn.Module, student: nn.Module, loss: Callable,
                 splits: DataSplits) -> None:
        """One forward of each model on two training samples, and the loss on them."""
        cfg = self.cfg
        where = f"data {cfg.data!r}"
        batch = probe_batch(splits.train, self.collate, where, self.env.device)
        inputs, labels = batch["inputs"], batch["labels"]
        classes = splits.num_classes
        expected = (*labels.shape, classes) if splits.task == "lm" else (labels.shape[0], classes)
        about = (f"{where} gives inputs {list(inputs.shape)} ({inputs.dtype}), labels "
                 f"{list(labels.shape)}, {classes} classes (model options it passes: "
                 f"{splits.model_options or 'none'})")
        if splits.task == "classification" and labels.dim() != 1:
            raise KdplugError(f"{about}: classification labels must be [batch]")
        if splits.task == "classification" and labels.numel() and (
                int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise KdplugError(f"{about}: labels must lie in 0..{classes - 1}")
        outs: Dict[str, ModelOutput] = {}
        vocabularies: Dict[str, int] = {}  # lm: each model's logits width, for one clear error
        autocast = autocast_factory(cfg.amp, self.env.device)
        for role, model in (("teacher", teacher), ("student", student)):
            name = getattr(cfg, role)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), autocast():
                    out = call_model(model, batch, self.requires)
            except Exception as exc:
                raise KdplugError(f"the {role} {name!r} does not fit {where}: a forward on two "
                                  f"training samples failed with {type(exc).__name__}: {exc}. "
                                  f"The data: {about}") from None
            finally:
                model.train(was_training)
            shape = tuple(out.logits.shape)
            vocabularies[role] = shape[-1] if shape else 0
            if (splits.task == "lm" and shape != tuple(expected)
                    and shape[:-1] == tuple(expected[:-1])):
                pass  # a vocabulary mismatch: reported below with both models' sizes
            elif shape != tuple(expected):
                raise KdplugError(
                    f"the {role} {name!r} and {where} disagree: the {role} gives logits "
                    f"{list(shape)} for two samples, the data needs {list(expected)} "
                    f"({classes} classes). Check the {role}'s options (e.g. num_classes). "
                    f"The data: {about}")
            for need in sorted(self.requires):
                if getattr(out, need) is None:
                    raise KdplugError(f"the loss {cfg.loss!r} requires {need}, but the {role} "
                                      f"{name!r} returned none with output_{need}=True")
            outs[role] = out
        if splits.task == "lm" and any(v != classes for v in vocabularies.values()):
            raise KdplugError(
                f"vocabulary mismatch: the teacher {cfg.teacher!r} predicts "
                f"{vocabularies['teacher']} tokens, the student {cfg.student!r} "
                f"{vocabularies['student']}, and {where} has a vocabulary of {classes}; "
                "token-level distillation needs one vocabulary for all three. Check the models' "
                f"vocab_size options or the data's tokenizer. The data: {about}")
        try:
            with torch.no_grad(), autocast():
                value = loss(outs["student"], outs["teacher"], batch)
        except Exception as exc:
            raise KdplugError(f"the loss {cfg.loss!r} failed on the first batch of {where}: "
                              f"{type(exc).__name__}: {exc}") from None
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise KdplugError(f"the loss {cfg.loss!r} returned {type(value).__name__} "
                              f"{list(getattr(value, 'shape', []))}; expected a scalar tensor")

    def _loaders(self, splits: DataSplits) -> None:
        cfg, env = self.cfg, self.env
        train = splits.train
        self.train_dataset = SeededDataset(train, cfg.seed) if needs_seeding(train) else train
        train_collate = self.collate
        if self.cache is not None:  # items carry their index; batches carry the cached targets
            from ..cache.integration import CachedCollate, IndexedDataset

            self.train_dataset = IndexedDataset(self.train_dataset, self.cache.views,
                                                replay_views=not self.cache.deterministic)
            train_collate = self.train_collate = CachedCollate(self.collate, self.cache)
        self.sampler = EpochSampler(len(train), cfg.batch_size, cfg.seed, env.rank,
                                    env.world_size)
        pin = env.device.type == "cuda"
        # The loaders draw their worker seeds from their own generators, never from the global
        # RNG, so a resumed run's RNG stream is the uninterrupted run's.
        self.train_loader = DataLoader(
            self.train_dataset, batch_size=self.sampler.local_batch, sampler=self.sampler,
            collate_fn=train_collate, num_workers=cfg.num_workers, pin_memory=pin,
            generator=torch.Generator().manual_seed(cfg.seed))
        self.test_loader = DataLoader(
            splits.test, batch_size=cfg.eval_batch_size,
            sampler=ShardSampler(len(splits.test), env.rank, env.world_size),
            collate_fn=self.collate, num_workers=cfg.num_workers, pin_memory=pin,
            generator=torch.Generator().manual_seed(cfg.seed))

    # ------------------------------------------------------------------ phases
    def _phase(self, phase: str, model: nn.Module, loss: Callable, teacher: Optional[nn.Module],
               epochs: int, lr: float, seed_key: int) -> PhaseResult:
        cfg, env = self.cfg, self.env
        path = self.ckpt_dir / f"{phase}.pt"
        resume = None
        if cfg.resume and path.is_file():
            ckpt = load_checkpoint(path)
            self._check_identity(ckpt, path)
            if ckpt.get("done"):
                model.load_state_dict(ckpt["model"])
                history = list(ckpt["history"])
                self._add_records(history)
                self.log(f"{phase}: done in the run being resumed ({len(history)} epochs)")
                return self._result(phase, model, history, "trained", epochs, path)
            resume = ckpt
            self._add_records(ckpt["history"])
        cached = self.cache is not None and phase == "student"
        if self.cache is not None:  # only the distilled student reads the cached targets
            self.train_collate.enabled = cached and getattr(loss, "uses_teacher", True)
            teacher = None
        trainer = Trainer(model, loss, cfg=cfg, env=env, lr=lr,
                          total_steps=epochs * self.sampler.batches_per_epoch, teacher=teacher,
                          phase=phase, cached_teacher=cached)
        run = PhaseRun(
            phase=phase, trainer=trainer, train_loader=self.train_loader, sampler=self.sampler,
            train_dataset=self.train_dataset, test_loader=self.test_loader, epochs=epochs,
            task=self.splits.task, seed=mix_seed(cfg.seed, seed_key), checkpoint_path=path,
            identity=cfg.identity(), on_record=self._add_record, callbacks=self.callbacks,
            log=self.log, show_progress=not self.quiet and sys.stderr.isatty())
        history = run.run(resume)
        return self._result(phase, model, history, "trained", epochs, path)

    def _check_identity(self, ckpt: Mapping[str, Any], path: Path) -> None:
        saved, now = ckpt.get("identity", {}), self.cfg.identity()
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if differ:
            shown = "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in differ)
            raise ConfigError(f"--resume: {path} was written with other settings ({shown}). "
                              "Resume with the same settings, or --overwrite to start over")

    def _add_records(self, records: Sequence[Dict[str, Any]]) -> None:
        self.records.extend(records)
        if self.env.is_main:
            reporting.write_metrics(self.out / "metrics.jsonl", self.records)

    def _add_record(self, record: Dict[str, Any]) -> None:
        self._add_records([record])

    def _untrained(self, phase: str, model: nn.Module, source: str) -> PhaseResult:
        return self._result(phase, model, [], source, 0, None)

    def _result(self, phase: str, model: nn.Module, history: List[Dict[str, Any]], source: str,
                epochs: int, path: Optional[Path]) -> PhaseResult:
        autocast = autocast_factory(self.cfg.amp, self.env.device)
        if history:
            last = history[-1]
            metrics = {k[len("test_"):]: v for k, v in last.items() if k.startswith("test_")}
        else:
            metrics = evaluate(model, self.test_loader, task=self.splits.task, env=self.env,
                               autocast=autocast, where=f"{phase} evaluation")
        name = getattr(self.cfg, "student" if phase == "scratch" else phase)
        return PhaseResult(
            phase=phase, name=name, params=sum(p.numel() for p in model.parameters()),
            accuracy=float(metrics["accuracy"]), loss=float(metrics["loss"]), metrics=metrics,
            inference_ms_per_batch=None, epochs=len(history) if history else epochs,
            source=source, train_time_s=round(sum(r.get("epoch_time_s", 0.0) for r in history), 3),
            history=list(history), checkpoint=str(path) if path else None, model=model)

    # ------------------------------------------------------------------ report
    def _finish(self, teacher: PhaseResult, student: PhaseResult,
                scratch: Optional[PhaseResult]) -> DistillResult:
        cfg, env = self.cfg, self.env
        results = [r for r in (teacher, student, scratch) if r is not None]
        timing_batch = None
        timings: Dict[str, float] = {}
        if env.is_main:
            timing_batch = to_device(check_batch(next(iter(DataLoader(
                self.splits.test, batch_size=cfg.eval_batch_size, collate_fn=self.collate))),
                "evaluation"), env.device)
            autocast = autocast_factory(cfg.amp, env.device)
            for r in results:
                if r.model is not None:  # a cache's teacher has none: n/a
                    timings[r.phase] = round(measure_inference_ms(r.model, timing_batch,
                                                                  autocast=autocast), 4)
        timings = env.broadcast(timings)
        for r in results:
            r.inference_ms_per_batch = timings.get(r.phase)
        batch_size = env.broadcast(int(timing_batch["labels"].shape[0]) if timing_batch else None)
        report: Dict[str, Any] = {
            "kdplug_version": __version__,
            "task": self.splits.task,
            "data": cfg.data,
            "num_classes": self.splits.num_classes,
            "input_shape": list(self.splits.input_shape),
            "loss": cfg.loss, "temperature": cfg.temperature, "alpha": cfg.alpha,
            "device": str(env.device), "world_size": env.world_size, "amp": cfg.amp,
            "inference_batch_size": batch_size,
        }
        for r in results:
            report[r.phase] = r.to_dict()
        report["distillation_gain"] = (None if scratch is None
                                       else student.accuracy - scratch.accuracy)
        if self.cache is not None:
            report["teacher_cache"] = self.cache.summary()
        report["config"] = cfg.to_dict() | {"out": str(self.out)}
        report["out"] = str(self.out)
        if env.is_main:
            reporting.write_report(self.out / "report.json", report)
            reporting.write_metrics(self.out / "metrics.jsonl", self.records)
            if self.records:
                reporting.plot_curves(self.out / "curves.png", self.records,
                                      title=f"{teacher.name} → {cfg.student} on {cfg.data}")
        env.barrier()
        return DistillResult(teacher=teacher, student=student, scratch=scratch, config=cfg,
                             out=self.out, report=report)


def _options_for(factory: Callable, given: Mapping[str, Any], user: Mapping[str, Any]
                 ) -> Dict[str, Any]:
    """``given`` (from the data or the engine) filtered to what ``factory`` accepts, under
    ``user`` (always passed: a misspelt user option is an error)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {**given, **user}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        accepted = dict(given)
    else:
        names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)}
        accepted = {k: v for k, v in given.items() if k in names}
    return {**accepted, **user}


def _create(registration: Any, role: str, name: str, options: Mapping[str, Any]) -> Any:
    try:
        return registration.create(**options)
    except KdplugError:
        raise
    except TypeError as exc:
        raise KdplugError(f"{role} {name!r} (from plugin {registration.origin()}) refused the "
                          f"options {dict(options)}: {exc}") from None
    except Exception as exc:
        raise KdplugError(f"{role} {name!r} (from plugin {registration.origin()}) failed to "
                          f"build with options {dict(options)}: {type(exc).__name__}: {exc}"
                          ) from exc
