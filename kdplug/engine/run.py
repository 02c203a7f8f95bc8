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
T, α, a dry forward of both models on two training samples, the loss on that batch). This module
is the procedure, start to end; each step is a call into the module that does that job.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..cache.integration import DryRunTeacher, open_for_run
from ..cache.reader import TeacherCache
from ..feature_source import detach_models
from ..losses import CrossEntropyLoss
from . import preflight
from . import report as reporting
from .checkpoint import seed_everything
from .components import Components, Source, build_components, build_data, check_teacher_given
from .config import ConfigError, DistillConfig, resolve_config
from .distributed import DistEnv, setup
from .evaluate import time_inference
from .loaders import build_loaders
from .loop import announce_epoch, autocast_factory
from .phases import SEED_STUDENT_PHASE, SEED_TEACHER_PHASE, Phases
from .results import DistillResult, PhaseResult
from .run_folder import RunFolder

__all__ = ["distill", "DistillResult", "PhaseResult"]


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
    given = {"teacher": teacher, "student": student, "data": data, "loss": loss}
    objects = {role: value for role, value in given.items()
               if value is not None and not isinstance(value, str)}
    names = {role: value if isinstance(value, str) else Source.of(role, value).name
             for role, value in given.items() if value is not None}
    cfg = resolve_config(config, **names, **options)
    missing = [k for k in ("student", "data") if getattr(cfg, k) is None]
    if missing:
        raise ConfigError(f"distill needs a student and data (and a teacher, unless the loss "
                          f"uses none); missing: {', '.join(missing)} (names: `kdplug plugins` "
                          "lists them)")
    if cfg.resume and not cfg.out:
        raise ConfigError("resume needs out: the folder of the run to continue")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = setup(cfg.device)
    try:
        return _run(cfg, objects, env, list(callbacks))
    finally:
        env.teardown()
        torch.set_num_threads(threads)


def _run(cfg: DistillConfig, objects: Dict[str, Any], env: DistEnv,
         callbacks: List[Any]) -> DistillResult:
    quiet = cfg.quiet or not env.is_main
    log = _stderr_log(quiet)
    # names first: an unknown one fails before anything is built or written
    sources = {role: Source.of(role, objects.get(role, getattr(cfg, role)))
               for role in ("teacher", "student", "data", "loss")}
    check_teacher_given(cfg, sources)
    folder = RunFolder.prepare(cfg, env, log)
    seed_everything(cfg.seed)
    splits = build_data(sources["data"], cfg.data_options, env)
    preflight.check_data(splits, cfg, env)
    parts = build_components(cfg, sources, splits, env)
    try:
        return _run_parts(cfg, env, callbacks, log, quiet, folder, parts)
    finally:
        detach_models(parts.loss)  # the hooks of features by module path come off


def _run_parts(cfg: DistillConfig, env: DistEnv, callbacks: List[Any], log: Callable[[str], None],
               quiet: bool, folder: RunFolder, parts: Components) -> DistillResult:
    cache = None
    if cfg.teacher_cache:
        cache = _open_cache(cfg, env, parts)
        parts.teacher = None  # built only to hash its weights: free its memory
    teacher = parts.teacher.model if parts.teacher is not None else None
    announce_epoch(parts.loss, 0)  # a loss that follows the epoch sees the first one in the dry run
    preflight.dry_run(teacher if cache is None else DryRunTeacher(cache), parts.student.model,
                      parts.loss, parts.splits, parts.collate, parts.requires, cfg, env)
    folder.open(cfg)  # every check has passed: the first write to out
    loaders = build_loaders(parts.splits, parts.collate, cfg, env, cache)
    if cfg.num_workers is None and loaders.train_workers:
        log(f"data: {loaders.train_workers} worker process(es) load the training items "
            "(--num-workers to choose)")
    phases = Phases(cfg=cfg, env=env, splits=parts.splits, loaders=loaders, folder=folder,
                    callbacks=callbacks, log=log, cache=cache,
                    show_progress=not quiet and sys.stderr.isatty())

    if cache is not None:
        teacher_result = phases.cached_teacher()
    elif teacher is None:  # the loss uses no teacher and none was given: the student alone
        teacher_result = None
    elif cfg.teacher_checkpoint:
        log(f"teacher: loaded from {cfg.teacher_checkpoint}")
        teacher_result = phases.untrained("teacher", teacher,
                                          f"checkpoint {cfg.teacher_checkpoint}")
    elif cfg.resolved_teacher_epochs == 0:
        teacher_result = phases.untrained("teacher", teacher, "as built")
    else:
        teacher_result = phases.train("teacher", teacher, CrossEntropyLoss(), None,
                                      cfg.resolved_teacher_epochs, cfg.resolved_teacher_lr,
                                      SEED_TEACHER_PHASE)
    student_result = phases.train("student", parts.student.model, parts.loss, teacher,
                                  cfg.epochs, cfg.lr, SEED_STUDENT_PHASE)
    scratch_result = None
    if parts.scratch is not None:
        scratch_result = phases.train("scratch", parts.scratch, CrossEntropyLoss(), None,
                                      cfg.epochs, cfg.lr, SEED_STUDENT_PHASE)
    return _finish(cfg, env, parts, folder, cache, teacher_result, student_result,
                   scratch_result)


def _open_cache(cfg: DistillConfig, env: DistEnv, parts: Components) -> TeacherCache:
    """The teacher cache, checked against this run: the teacher's name, options and (when the
    run gives them) weights, the data and its order, the transform, the checksums."""
    return open_for_run(cfg, env, parts.splits, parts.loss,
                        teacher_name=cfg.teacher,
                        teacher_options=parts.teacher_options,
                        teacher_model=parts.teacher.model if parts.teacher else None)


def _finish(cfg: DistillConfig, env: DistEnv, parts: Components, folder: RunFolder,
            cache: Optional[TeacherCache], teacher: Optional[PhaseResult], student: PhaseResult,
            scratch: Optional[PhaseResult]) -> DistillResult:
    """Inference timings, report.json, metrics.jsonl, curves.png; the result."""
    results = [r for r in (teacher, student, scratch) if r is not None]
    batch_size = time_inference(results, parts.splits.test, parts.collate, cfg.eval_batch_size,
                                autocast_factory(cfg.amp, env.device), env)
    config = folder.resolved_config(cfg)
    report = reporting.build_report(
        cfg, task=parts.splits.task, num_classes=parts.splits.num_classes,
        input_shape=parts.splits.input_shape, device=str(env.device),
        world_size=env.world_size, inference_batch_size=batch_size, results=results,
        cache_summary=cache.summary() if cache is not None else None, config=config,
        out=folder.path)
    if env.is_main:
        title = f"{cfg.student} on {cfg.data}"
        if teacher is not None:
            title = f"{teacher.name} → {title}"
        reporting.write_outputs(folder.path, report, folder.records, title=title)
    env.barrier()
    return DistillResult(teacher=teacher, student=student, scratch=scratch, config=cfg,
                         out=folder.path, report=report)


def _stderr_log(quiet: bool) -> Callable[[str], None]:
    def log(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    return log
