"""The phases of a run, each turned into a :class:`PhaseResult`: a model trained (or resumed from
its checkpoint, or found finished in it), a model used as loaded or as built, or a teacher that
is a cache of its outputs.

A phase trains through :class:`~kdplug.engine.loop.Trainer` (one step) and
:class:`~kdplug.engine.loop.PhaseRun` (its epochs, checkpoints and progress); this module decides
what they get and what comes back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import nn

from ..cache.integration import teacher_phase_result
from ..cache.reader import TeacherCache
from ..data import DataSplits
from .batching import mix_seed
from .checkpoint import load_checkpoint
from .config import DistillConfig
from .distributed import DistEnv
from .evaluate import evaluate
from .loaders import Loaders
from .interrupt import StopSignals
from .loop import PhaseRun, Trainer, autocast_factory, optimizer_steps_per_epoch
from .results import PhaseResult
from .run_folder import RunFolder
from .strategy import Strategy

__all__ = ["Phases", "SEED_TEACHER_PHASE", "SEED_STUDENT_PHASE"]

#: Seed keys of the phases' training randomness (dropout, augmentation): the distilled student
#: and the scratch baseline share theirs, so they differ by the loss alone.
SEED_TEACHER_PHASE, SEED_STUDENT_PHASE = 11, 22


@dataclass
class Phases:
    """Runs the phases of one run on its loaders, into its folder."""

    cfg: DistillConfig
    env: DistEnv
    splits: DataSplits
    loaders: Loaders
    folder: RunFolder
    callbacks: Sequence[Any]
    log: Callable[[str], None]
    show_progress: bool
    strategy: Strategy
    cache: Optional[TeacherCache] = None  # a teacher cache stands for the teacher
    stop: Optional[StopSignals] = None  # SIGTERM/SIGINT end a phase after a checkpoint

    def train(self, phase: str, model: nn.Module, loss: Callable, teacher: Optional[nn.Module],
              epochs: int, lr: float, seed_key: int) -> PhaseResult:
        """Train ``model`` (with --resume: from its checkpoint, or not at all if it finished)."""
        cfg = self.cfg
        path = self.folder.checkpoint(phase)
        resume = None
        if cfg.resume and path.is_file():
            ckpt = load_checkpoint(path)  # its settings were checked by RunFolder.prepare
            if ckpt.get("done"):
                self.strategy.load_weights(model, ckpt, path)
                history = list(ckpt["history"])
                self.folder.add_records(history)
                self.log(f"{phase}: done in the run being resumed ({len(history)} epochs)")
                return self._result(phase, model, history, "trained", epochs, path)
            resume = ckpt
            self.folder.add_records(ckpt["history"])
        cached = self.cache is not None and phase == "student"
        if self.cache is not None:  # only the distilled student reads the cached targets
            self.loaders.read_cached_targets(cached and getattr(loss, "uses_teacher", True))
            teacher = None
        steps = optimizer_steps_per_epoch(self.loaders.sampler.batches_per_epoch,
                                          cfg.grad_accum_steps)
        trainer = Trainer(model, loss, cfg=cfg, env=self.env, lr=lr, total_steps=epochs * steps,
                          teacher=teacher, phase=phase, cached_teacher=cached,
                          steps_per_epoch=steps, strategy=self.strategy)
        if trainer.loss_note:
            self.log(f"{phase}: {trainer.loss_note}")
        run = PhaseRun(
            phase=phase, trainer=trainer, train_loader=self.loaders.train_loader(),
            sampler=self.loaders.sampler, train_dataset=self.loaders.train_dataset,
            test_loader=self.loaders.test, epochs=epochs, task=self.splits.task,
            seed=mix_seed(cfg.seed, seed_key), checkpoint_path=path, identity=cfg.identity(),
            on_record=self.folder.add_record, callbacks=self.callbacks, log=self.log,
            show_progress=self.show_progress, stop=self.stop)
        history = run.run(resume)
        return self._result(phase, model, history, "trained", epochs, path)

    def untrained(self, phase: str, model: nn.Module, source: str) -> PhaseResult:
        """A model used as it is (loaded from a checkpoint, or as built): evaluated once."""
        return self._result(phase, model, [], source, 0, None)

    def cached_teacher(self) -> PhaseResult:
        """The cache is the teacher: its numbers come from the manifest (None if not recorded)."""
        cache = self.cache
        info = teacher_phase_result(cache)
        self.log(f"teacher: from the cache {cache.path} ({cache.kind}"
                 + (f" top-{cache.k}" if cache.kind == "topk" else "")
                 + f", {cache.dtype}); no teacher phase")
        return PhaseResult(phase="teacher", name=self.cfg.teacher or info["name"],
                           params=info["params"], accuracy=info["accuracy"], loss=info["loss"],
                           metrics=info["metrics"], inference_ms_per_batch=None, epochs=0,
                           source=info["source"], train_time_s=0.0, model=None)

    def _result(self, phase: str, model: nn.Module, history: List[Dict[str, Any]], source: str,
                epochs: int, path: Optional[Path]) -> PhaseResult:
        if history:
            last = history[-1]
            metrics = {k[len("test_"):]: v for k, v in last.items() if k.startswith("test_")}
        else:
            metrics = evaluate(model, self.loaders.test, task=self.splits.task, env=self.env,
                               autocast=autocast_factory(self.cfg.amp, self.env.device),
                               where=f"{phase} evaluation")
        name = getattr(self.cfg, "student" if phase == "scratch" else phase)
        return PhaseResult(
            phase=phase, name=name, params=sum(p.numel() for p in model.parameters()),
            accuracy=float(metrics["accuracy"]), loss=float(metrics["loss"]), metrics=metrics,
            inference_ms_per_batch=None, epochs=len(history) if history else epochs,
            source=source, train_time_s=round(sum(r.get("epoch_time_s", 0.0) for r in history), 3),
            history=list(history), checkpoint=str(path) if path else None, model=model)
