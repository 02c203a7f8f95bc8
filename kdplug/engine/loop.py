"""The training loop: one step (:class:`Trainer`) and one phase of epochs (:class:`PhaseRun`).

A distillation step: the teacher, in ``eval()`` mode with its parameters frozen, runs under
``torch.no_grad()``; the student runs in train mode; the loss gets both outputs and the batch; the
student (and the loss's own parameters, if any) take an optimizer step; the LR schedule advances.
Student and loss are wrapped in one module, so under torchrun one DistributedDataParallel syncs
every trainable parameter; how the models sit on the processes (one, DDP, FSDP) is the run's
:class:`~kdplug.engine.strategy.Strategy`, which the loop calls without knowing which it is.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence

import torch
from torch import nn

from .._op_support import (backward_with_unit_gradient, check_kernel_faults,
                           deferred_value_checks)
from ..cache.targets import cached_teacher_output
from ..errors import KdplugError
from ..kd_augment import augment_batch
from ..outputs import ModelOutput
from .batching import EpochSampler, batches, call_model, mix_seed, requirements
from .checkpoint import FORMAT, optional_state, rng_state, seed_everything, set_rng_state
from .config import DistillConfig
from .distributed import DistEnv
from .evaluate import evaluate
from .interrupt import RunInterrupted, StopSignals
from .meters import EPOCH_PARTS, EpochClock, RunningLoss
from .strategies import make_strategy
from .strategy import Strategy

__all__ = ["Trainer", "PhaseRun", "NonFiniteLossError", "make_optimizer", "make_schedule",
           "autocast_factory", "announce_epoch", "optimizer_steps_per_epoch",
           "accumulation_group", "defers_value_checks"]

#: how often (seconds) the progress bar shows the running loss: each time is a read of it
PROGRESS_SECONDS = 0.5
#: under torchrun, the processes agree on a SIGTERM/SIGINT every this many optimizer steps (and
#: at each epoch's end): a stop comes at most twice this many steps late there
#: (benchmarks/bench_stop_agreement.py)
STOP_CHECK_STEPS = 4


class NonFiniteLossError(KdplugError):
    """The loss became NaN or infinite; the run stopped before the step was applied."""

    def __init__(self, message: str, phase: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.phase, self.epoch, self.step = phase, epoch, step


def autocast_factory(amp: str, device: torch.device) -> Callable[[], ContextManager]:
    if amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if not autocast_computes_in(device, dtype):
        raise KdplugError(f"amp {amp!r}: torch {torch.__version__}'s autocast on {device.type} "
                          f"does not compute in {dtype} (it would silently run in float32); "
                          f"use --amp bf16, or a newer torch")
    return lambda: torch.autocast(device.type, dtype=dtype)


def autocast_computes_in(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether autocast on this device really runs a matmul in dtype: older torch builds accept
    float16 on the CPU but only warn and leave autocast off."""
    if device.type == "cuda":
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device.type, dtype=dtype):
            probe = torch.mm(torch.ones(1, 1, device=device), torch.ones(1, 1, device=device))
    return probe.dtype == dtype


def make_optimizer(cfg: DistillConfig, params: Sequence[nn.Parameter], lr: float
                   ) -> torch.optim.Optimizer:
    """AdamW/Adam (the fused implementation where torch has one for these tensors) or SGD."""
    params = list(params)
    if not params:
        raise KdplugError("the model to train has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    fusable = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
                  and p.device.type in ("cpu", "cuda") for p in params)
    if fusable:
        try:
            return cls(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel for these tensors
            pass
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg: DistillConfig, total_steps: int,
                  steps_per_epoch: int = 1) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up, then cosine / linear decay to 0, constant, or step
    (× lr_decay from each of the lr_milestones epochs on, as the CIFAR recipes decay)."""
    warmup, kind = cfg.warmup_steps, cfg.scheduler
    milestones = cfg.milestones

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        if kind == "step":
            epoch = step // max(1, steps_per_epoch)
            return cfg.lr_decay ** sum(epoch >= m for m in milestones)
        return 1.0

    return factor


def optimizer_steps_per_epoch(batches: int, accum: int) -> int:
    """An epoch's optimizer steps: its batches in groups of ``accum`` (the last may be short)."""
    return -(-batches // accum)


def accumulation_group(step: int, batches: int, accum: int) -> range:
    """The micro-batches (0-based batch numbers of the epoch) that share an optimizer step with
    batch ``step``; each weighs 1/len of it in the summed gradient."""
    start = step - step % accum
    return range(start, min(start + accum, batches))


def defers_value_checks(device: torch.device) -> bool:
    """Whether a phase runs the ops without the value checks that read their inputs (labels and
    top-k indices in range, indices distinct; kdplug._op_support.deferred_value_checks): on CUDA
    only, where each read would make every step wait for the GPU. The kernels record such faults
    instead, and the phase raises them wherever it reads values anyway (progress, step hooks,
    checkpoints, the epoch's end). On the CPU the kernels raise at once and reads cost nothing."""
    return device.type == "cuda"


def announce_epoch(loss: Any, epoch: int) -> None:
    """The engine's epoch hook: a loss with ``set_epoch(epoch)`` (DKD's warm-up) learns the
    0-based epoch that begins, in every phase and on resume."""
    set_epoch = getattr(loss, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


class _StepModule(nn.Module):
    """The trained model plus the loss (a module with parameters, or a plain callable)."""

    def __init__(self, model: nn.Module, loss: Callable, requires: frozenset) -> None:
        super().__init__()
        self.model = model
        self.loss = loss  # registered as a submodule when it is an nn.Module
        self.requires = requires

    def forward(self, batch: Dict[str, Any], teacher_out: Optional[ModelOutput]) -> torch.Tensor:
        return self.loss(call_model(self.model, batch, self.requires), teacher_out, batch)


class Trainer:
    """The machinery of one phase: model (+ loss parameters) on the device, wrapped by the
    strategy (DDP or FSDP under torchrun), optimizer, per-step LR schedule, grad scaler (fp16),
    autocast, and :meth:`train_step`."""

    def __init__(self, model: nn.Module, loss: Callable, *, cfg: DistillConfig, env: DistEnv,
                 lr: float, total_steps: int, teacher: Optional[nn.Module] = None,
                 phase: str = "student", cached_teacher: bool = False,
                 steps_per_epoch: int = 1, strategy: Optional[Strategy] = None) -> None:
        self.cfg, self.env, self.phase = cfg, env, phase
        self.strategy = strategy or make_strategy(cfg.strategy, env, cfg.amp)
        # the transfer-set augmentation belongs to the distillation phase only
        self.kd_augment = cfg.kd_augment if phase == "student" else "none"
        # A loss may choose how the models are called once it knows them (the fused linear
        # head needs both models' output heads): it may then change its `requires`, and say so.
        configure = getattr(loss, "configure_models", None)
        options = dict(cached_teacher=cached_teacher and teacher is None)
        # parameters gathered collectively are shards outside a forward; only then is the
        # keyword passed, so a plugin's hook need not know it
        if self.strategy.lockstep:
            options["sharded"] = True
        self.loss_note = (configure(student=model, teacher=teacher, **options)
                          if callable(configure) else None)
        self.requires = requirements(loss)
        self.model = model.to(env.device)
        if isinstance(loss, nn.Module):
            loss.to(env.device)
        self.loss = loss
        # A loss may declare that it never reads the teacher's output (``uses_teacher = False``,
        # like "ce"): the teacher's forward is then skipped.
        self.teacher = teacher if getattr(loss, "uses_teacher", True) else None
        # With a teacher cache the batches carry the teacher's outputs (kdplug.cache.targets).
        self.cached_teacher = cached_teacher and getattr(loss, "uses_teacher", True)
        if self.teacher is not None:
            teacher.to(env.device)
            freeze_teacher(teacher)
            self.strategy.prepare_teacher(teacher)
        self.step_module = _StepModule(self.model, loss, self.requires)
        self.forward = self.strategy.wrap(self.step_module)
        self.params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, self.params, lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           make_schedule(cfg, total_steps,
                                                                         steps_per_epoch))
        self.scaler = torch.amp.GradScaler(env.device.type) if cfg.amp == "fp16" else None
        self.autocast = autocast_factory(cfg.amp, env.device)
        self._loss_total = torch.zeros(1, dtype=torch.float64, device=self._reduce_device())
        self._accumulated = 0  # micro-batches whose gradients wait for the optimizer step
        #: one process on the CPU: reading a tensor's value waits for nothing
        self.reads_are_free = env.device.type == "cpu" and not env.distributed

    def _reduce_device(self) -> torch.device:
        return self.env.device if self.env.device.type == "cuda" else torch.device("cpu")

    def train_step(self, batch: Dict[str, Any], where: str = "",
                   step_seed: int = 0) -> torch.Tensor:
        """One optimizer step on ``batch`` (already on the device): :meth:`micro_step` with the
        whole batch as the only micro-batch."""
        return self.micro_step(batch, where, step_seed)

    def micro_step(self, batch: Dict[str, Any], where: str = "", step_seed: int = 0,
                   weight: float = 1.0, last: bool = True) -> torch.Tensor:
        """Forward and backward of one micro-batch, its loss scaled by ``weight`` (1/K of a
        group of K: K micro-batches of B then sum the gradients of one batch of K·B); ``last``
        applies the optimizer step and advances the schedule. Under torchrun the gradients are
        synchronised on the last micro-batch only (the strategy's ``no_sync`` on the others).

        Returns the (unscaled) loss as a detached scalar tensor where it was computed: nothing
        waits for its value. ``step_seed`` draws the transfer-set augmentation (the same inputs
        reach teacher and student). Where reading the value costs nothing (one process on the
        CPU), a non-finite loss raises before anything is applied; otherwise :class:`PhaseRun`
        checks the summed loss whenever it reads it, before any checkpoint."""
        batch = augment_batch(batch, self.kd_augment, seed=step_seed,
                              mixup_alpha=self.cfg.kd_mixup_alpha)
        teacher_out = None
        if self.teacher is not None:
            with torch.no_grad(), self.autocast():
                teacher_out = call_model(self.teacher, batch, self.requires)
        elif self.cached_teacher:
            teacher_out = cached_teacher_output(batch)
            if teacher_out is None:
                raise KdplugError(f"phase {self.phase!r} {where}: the batch holds no cached "
                                  "teacher outputs (a teacher cache run needs its loader)")
        with contextlib.nullcontext() if last else self.strategy.no_sync(self.forward):
            with self.autocast():
                loss = self.forward(batch, teacher_out)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise KdplugError(f"the loss {type(self.loss).__name__} returned "
                                  f"{type(loss).__name__}{list(getattr(loss, 'shape', []))}; "
                                  "expected a scalar tensor")
            if self.reads_are_free:
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"non-finite loss ({value}) in phase {self.phase!r} {where}: the run "
                        "stopped before applying this step; the last good checkpoint is kept. "
                        "Try a lower lr, grad_clip, or amp none.", self.phase, -1, -1)
            if not self._accumulated:
                self.optimizer.zero_grad(set_to_none=True)
            scaled = loss if weight == 1.0 else loss * weight
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:  # with a weight the multiply passes an unmarked gradient on to the loss
                backward_with_unit_gradient(scaled)
        self._accumulated += 1
        if last:
            self._apply()
        return loss.detach()

    def _apply(self) -> None:
        """The optimizer step on the gradients summed so far (clipped, unscaled), the schedule's
        step; the gradients are then dropped."""
        if self.scaler is not None:
            if self.cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                self.strategy.clip_grad_norm(self.params, self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.cfg.grad_clip:
                self.strategy.clip_grad_norm(self.params, self.cfg.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._accumulated = 0

    def loss_value(self, loss: torch.Tensor) -> float:
        """A step's loss as a number, averaged over processes (a read, and under torchrun a
        collective: every process calls it)."""
        if not self.env.distributed:
            return float(loss)
        total = self._loss_total
        total.copy_(loss.reshape(1))
        self.env.all_reduce_sum(total)
        return float(total) / self.env.world_size

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict() if isinstance(self.loss, nn.Module) else None,
            "optimizer": self.optimizer.state_dict(),
            **self.schedule_state(),
        }

    def schedule_state(self) -> Dict[str, Any]:
        """The state beside the tensors of the model, loss and optimizer."""
        return {"scheduler": self.scheduler.state_dict(), "scaler": optional_state(self.scaler)}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if isinstance(self.loss, nn.Module) and state.get("loss") is not None:
            self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_schedule_state(state)

    def load_schedule_state(self, state: Dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])

    def release(self) -> None:
        """Unfreeze the teacher again (its requires_grad as it was before the phase)."""
        if self.teacher is not None:
            unfreeze_teacher(self.teacher)


def freeze_teacher(teacher: nn.Module) -> None:
    """eval() mode and requires_grad False for the phase; remembers what to restore."""
    teacher.eval()
    if not hasattr(teacher, "_kdplug_requires_grad"):
        teacher._kdplug_requires_grad = [p.requires_grad for p in teacher.parameters()]
    teacher.requires_grad_(False)


def unfreeze_teacher(teacher: nn.Module) -> None:
    flags = getattr(teacher, "_kdplug_requires_grad", None)
    if flags is not None:
        for p, flag in zip(teacher.parameters(), flags):
            p.requires_grad_(flag)
        del teacher._kdplug_requires_grad


# ----------------------------------------------------------------------------- a phase

@dataclass
class PhaseRun:
    """The epochs of one phase ("teacher", "student" or "scratch"): train, evaluate (every
    ``eval_every`` epochs and after the last), checkpoint (rank 0, atomically), log, call
    callbacks; resumable from a checkpoint. Each epoch's record says where its time went
    (:class:`~kdplug.engine.meters.EpochClock`)."""

    phase: str
    trainer: Trainer
    train_loader: Any
    sampler: EpochSampler
    train_dataset: Any
    test_loader: Any
    epochs: int
    task: str
    seed: int
    checkpoint_path: Optional[Path]
    identity: Dict[str, Any]
    on_record: Callable[[Dict[str, Any]], None] = lambda record: None
    callbacks: Sequence[Any] = ()
    log: Callable[[str], None] = lambda line: None
    show_progress: bool = False
    stop: Optional[StopSignals] = None  # SIGTERM/SIGINT: checkpoint after the step, then stop
    history: List[Dict[str, Any]] = field(default_factory=list)
    _epoch_loader_state: Optional[torch.Tensor] = None
    _shown: float = float("-inf")  # when the progress bar last showed the loss

    @property
    def env(self) -> DistEnv:
        return self.trainer.env

    def run(self, resume: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        trainer, sampler = self.trainer, self.sampler
        per_epoch = sampler.batches_per_epoch
        running = RunningLoss(trainer._reduce_device())
        start_epoch, start_step = 0, 0
        if resume is not None:
            trainer.strategy.load_checkpoint(trainer, resume, self.checkpoint_path)
            self.history = list(resume["history"])
            start_epoch, start_step = int(resume["epoch"]), int(resume["step"])
            running.restart(float(resume["loss_sum"]), int(resume["loss_steps"]))
            rngs = resume["rng"]
            set_rng_state(rngs[self.env.rank] if len(rngs) == self.env.world_size else rngs[0])
            if self._loader_generator is not None and resume.get("loader_rng") is not None:
                self._loader_generator.set_state(resume["loader_rng"])
            if start_epoch < self.epochs:
                self.log(f"{self.phase}: resuming at epoch {start_epoch + 1}, step {start_step} "
                         f"of {per_epoch}")
        else:
            seed_everything(self.seed + self.env.rank)
            if self._loader_generator is not None:  # each phase's draws start afresh
                self._loader_generator.manual_seed(self.seed)
        every, accum = trainer.cfg.checkpoint_every, trainer.cfg.grad_accum_steps
        steps_per_epoch = optimizer_steps_per_epoch(per_epoch, accum)
        if start_step % accum and start_step < per_epoch:
            raise KdplugError(
                f"{self.checkpoint_path}: saved after micro-batch {start_step} of epoch "
                f"{start_epoch + 1}, inside a group of grad_accum_steps={accum}, whose summed "
                "gradients a checkpoint does not hold: it cannot be resumed exactly. Resume "
                "with the grad_accum_steps it was written with, or --overwrite to start over")
        step_hooks = [hook for hook in (getattr(cb, "on_step", None) for cb in self.callbacks)
                      if hook is not None]
        if self._stop_signal() is not None:  # it came before this phase began (or resumed)
            trainer.release()
            raise self._interrupted(start_epoch, start_step)
        deferral = contextlib.ExitStack()
        if defers_value_checks(self.env.device):
            deferral.enter_context(deferred_value_checks())
        try:
            for epoch in range(start_epoch, self.epochs):
                skip = start_step if epoch == start_epoch else 0
                if skip == 0:
                    running.restart()
                sampler.set_epoch(epoch, skip)
                if hasattr(self.train_dataset, "set_epoch"):  # SeededDataset, cache views
                    self.train_dataset.set_epoch(epoch)
                announce_epoch(trainer.loss, epoch)
                trainer.model.train()
                if trainer.teacher is not None:
                    trainer.teacher.eval()
                bar = self._progress(epoch, per_epoch, skip)
                # the loader draws its workers' base seed from this generator as the epoch's
                # iteration starts; a mid-epoch checkpoint keeps the state from before that draw
                self._epoch_loader_state = self._loader_state()
                started, samples = time.perf_counter(), 0
                clock = EpochClock()
                step = skip
                for batch in batches(self.train_loader, self.env.device, f"{self.phase} training"):
                    clock.tick("data")
                    where = f"epoch {epoch + 1}, step {step + 1}"
                    group = accumulation_group(step, per_epoch, accum)
                    last = step + 1 == group.stop
                    try:
                        loss = trainer.micro_step(batch, where,
                                                  mix_seed(self.seed, epoch, step, self.env.rank),
                                                  weight=1.0 / len(group), last=last)
                    except NonFiniteLossError as exc:
                        raise NonFiniteLossError(str(exc), self.phase, epoch + 1,
                                                 step + 1) from None
                    running.add(loss)
                    step += 1
                    samples += int(batch["labels"].shape[0]) * self.env.world_size
                    if bar is not None:
                        self._show_progress(bar, running, samples, started)
                    clock.tick("step")
                    saved = False
                    global_step = (epoch * steps_per_epoch  # optimizer steps so far
                                   + optimizer_steps_per_epoch(step, accum))
                    if last and every and global_step % every == 0 and step < per_epoch:
                        self.save(epoch, step, self._checked_sum(running, epoch), running.steps)
                        saved = True
                        clock.tick("checkpoint")
                    if step_hooks:  # a callback that wants each step's loss reads it
                        self._raise_kernel_faults()
                        value = trainer.loss_value(loss)
                        for hook in step_hooks:
                            hook(phase=self.phase, epoch=epoch + 1, step=step, loss=value)
                        clock.tick("step")
                    if last and step < per_epoch and self._stop_signal(global_step) is not None:
                        if not saved:
                            self.save(epoch, step, self._checked_sum(running, epoch),
                                      running.steps)
                        raise self._interrupted(epoch, step)
                if bar is not None:
                    bar.close()
                elapsed = time.perf_counter() - started
                record = {"phase": self.phase, "epoch": epoch + 1,
                          "train_loss": self._checked_sum(running, epoch) / max(running.steps, 1),
                          "lr": trainer.lr}
                if (epoch + 1) % trainer.cfg.eval_every == 0 or epoch + 1 == self.epochs:
                    metrics = evaluate(trainer.model, self.test_loader, task=self.task,
                                       env=self.env, autocast=trainer.autocast,
                                       where=f"{self.phase} evaluation")
                    record.update({f"test_{k}": v for k, v in metrics.items()})
                clock.tick("eval")
                record.update({"epoch_time_s": round(elapsed, 4),
                               "samples_per_s": round(samples / max(elapsed, 1e-9), 1),
                               **clock.record()})
                self.history.append(record)
                self.save(epoch + 1, 0, 0.0, 0)
                clock.tick("checkpoint")
                record["checkpoint_time_s"] = clock.record()["checkpoint_time_s"]
                self.on_record(record)
                if (epoch + 1) % max(1, self.epochs // 10) == 0 or epoch + 1 == self.epochs:
                    self.log(_epoch_line(record, self.epochs))  # at most ~10 lines a phase
                for cb in self.callbacks:
                    hook = getattr(cb, "on_epoch_end", None)
                    if hook is not None:
                        hook(phase=self.phase, epoch=epoch + 1, metrics=dict(record))
                if epoch + 1 < self.epochs and self._stop_signal() is not None:
                    raise self._interrupted(epoch + 1, 0)
        finally:
            deferral.close()
            trainer.release()
        return self.history

    def _stop_signal(self, optimizer_step: int = 0) -> Optional[int]:
        """The signal that stops the run after this step, agreed by every process (under
        torchrun after every STOP_CHECK_STEPS-th optimizer step only: the agreement is a
        collective)."""
        if self.stop is None or (self.env.distributed and optimizer_step % STOP_CHECK_STEPS):
            return None
        return self.stop.agreed(self.env)

    def _interrupted(self, epoch: int, step: int) -> RunInterrupted:
        """The error that ends an interrupted phase, once its checkpoint is written."""
        name = signal.Signals(self.stop.signum).name
        if step:
            where = f"after step {step} of {self.sampler.batches_per_epoch} in epoch {epoch + 1}"
        elif epoch:
            where = f"after epoch {epoch} of {self.epochs}"
        else:
            where = "before its first step"
        saved = (f"saved {self.checkpoint_path} (with every earlier phase's checkpoint)"
                 if step or epoch else "the earlier phases' checkpoints are saved")
        return RunInterrupted(
            f"Interrupted by {name}: the {self.phase} phase stopped {where}; {saved}. Run the "
            "same command with --resume auto (or --resume) to continue from there.",
            self.stop.signum)

    def _checked_sum(self, running: RunningLoss, epoch: int) -> float:
        """The epoch's summed loss so far (a read; under torchrun a collective); a non-finite
        sum stops the run here, before anything of those steps is checkpointed."""
        first, last = running.read_at + 1, running.steps
        self._raise_kernel_faults()
        total = running.global_sum(self.env)
        if not math.isfinite(total):
            raise NonFiniteLossError(
                f"non-finite loss ({total}) in phase {self.phase!r} epoch {epoch + 1}, within "
                f"steps {first}-{last}: the run stopped at this check, before checkpointing "
                "them; the last good checkpoint is kept. Try a lower lr, grad_clip, or amp "
                "none.", self.phase, epoch + 1, last)
        return total

    def _raise_kernel_faults(self) -> None:
        """Where the phase reads values from the GPU anyway: the first bad label or top-k index
        a CUDA kernel recorded since the last read (while the ops' own checks are deferred)."""
        if defers_value_checks(self.env.device):
            check_kernel_faults(wait=True)

    def _show_progress(self, bar: Any, running: RunningLoss, samples: int,
                       started: float) -> None:
        now = time.perf_counter()
        if now - self._shown >= PROGRESS_SECONDS:  # a read of the loss: not every step
            self._shown = now
            self._raise_kernel_faults()
            bar.set_postfix(loss=f"{running.local_mean():.4f}",
                            samples_s=f"{samples / max(now - started, 1e-9):.0f}", refresh=False)
        bar.update(1)

    def save(self, epoch: int, step: int, loss_sum: float, loss_steps: int) -> None:
        """The full state after ``step`` batches of epoch ``epoch`` (0-based; step 0 = start)."""
        rngs = self.env.gather(rng_state())  # a collective: every process calls save
        if self.checkpoint_path is None:
            return
        loader_rng = self._epoch_loader_state if step else self._loader_state()
        self.trainer.strategy.save_checkpoint(self.trainer, {
            "format": FORMAT, "phase": self.phase, "epoch": epoch, "step": step,
            "done": epoch >= self.epochs and step == 0, "epochs": self.epochs,
            "rng": rngs, "loss_sum": loss_sum,
            "loss_steps": loss_steps, "history": self.history, "identity": self.identity,
            "world_size": self.env.world_size, "loader_rng": loader_rng,
        }, self.checkpoint_path)

    @property
    def _loader_generator(self) -> Optional[torch.Generator]:
        return getattr(self.train_loader, "generator", None)

    def _loader_state(self) -> Optional[torch.Tensor]:
        generator = self._loader_generator
        return None if generator is None else generator.get_state()

    def _progress(self, epoch: int, total: int, initial: int) -> Any:
        if not self.show_progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=f"{self.phase} {epoch + 1}/{self.epochs}",
                    unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)


def _epoch_line(record: Dict[str, Any], epochs: int) -> str:
    tested = ""
    if "test_accuracy" in record:
        tested = (f"  test acc {record['test_accuracy']:.2%}  test loss {record['test_loss']:.4f}"
                  + (f"  ppl {record['test_perplexity']:.3f}" if "test_perplexity" in record
                     else ""))
    parts = ", ".join(f"{part} {record.get(f'{part}_time_s', 0.0):.2f}" for part in EPOCH_PARTS)
    return (f"{record['phase']:<8} epoch {record['epoch']:>3}/{epochs}  "
            f"train loss {record['train_loss']:.4f}{tested}  ({record['epoch_time_s']:.1f} s "
            f"training, {record['samples_per_s']:.0f} samples/s; seconds of {parts})")
