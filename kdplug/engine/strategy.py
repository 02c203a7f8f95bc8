"""How a run's models sit on its processes: the few calls the engine makes, one class a way.

- one process: the models on the device, nothing to synchronise (:class:`Strategy`);
- ``ddp`` under torchrun: every process holds the whole models and DistributedDataParallel
  averages the gradients (:class:`DDPStrategy`, the default);
- ``fsdp``: FSDP2 shards parameters, gradients and optimizer state (:mod:`.fsdp`).

:func:`.strategies.make_strategy` picks one by name.

The engine calls :meth:`~Strategy.prepare_model` on each model as it is built,
:meth:`~Strategy.prepare_teacher` on a phase's teacher, :meth:`~Strategy.wrap` on the trained
model with its loss, :meth:`~Strategy.no_sync` to accumulate gradients without syncing them,
:meth:`~Strategy.clip_grad_norm`, and the checkpoint calls. A checkpoint is read whatever strategy
wrote it: one file, or a status file with shard folders (:mod:`.sharded_checkpoint`).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from .checkpoint import atomic_save
from .distributed import DistEnv
from .sharded_checkpoint import is_sharded, load_sharded, remove_shards, shards_folder

__all__ = ["Strategy", "DDPStrategy", "is_sharded_model", "release_gathered"]


class Strategy:
    """One process: nothing is wrapped, split or synchronised."""

    name = "single"
    #: every process must run each forward of a model (its parameters are gathered collectively)
    lockstep = False

    def __init__(self, env: DistEnv) -> None:
        self.env = env

    def prepare_model(self, model: nn.Module, what: str, units: Optional[Sequence[str]] = None,
                      inference: bool = False) -> nn.Module:
        """A model just built (on the CPU), made ready for the run's device; ``units`` are the
        shard units its plugin declared, ``inference`` says it will never be trained."""
        return model.to(self.env.device)

    def prepare_teacher(self, teacher: nn.Module) -> None:
        """The teacher of a distillation phase, run under no_grad."""

    def wrap(self, step_module: nn.Module) -> nn.Module:
        """What a training step calls: the model with its loss (``step_module.model``,
        ``step_module.loss``)."""
        return step_module

    @contextlib.contextmanager
    def no_sync(self, forward: nn.Module) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally; the first one after syncs."""
        yield

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    # -- checkpoints
    def save_checkpoint(self, trainer: Any, status: Dict[str, Any], path: Path) -> None:
        """Called on every process; ``status`` is all but the tensors of the trainer."""
        if self.env.is_main:
            atomic_save({**status, "state": trainer.state(), "model": trainer.model.state_dict()},
                        path)
            remove_shards(path)  # those of a sharded run this one resumed

    def load_checkpoint(self, trainer: Any, ckpt: Mapping[str, Any], path: Path) -> None:
        """The trainer's state from ``ckpt`` (read from ``path``), whichever strategy wrote it."""
        if is_sharded(ckpt):
            content = load_sharded(trainer_content(trainer), shards_folder(path, ckpt))
            set_trainer_content(trainer, content)
            trainer.load_schedule_state(ckpt["state"])
        else:
            self.load_full_state(trainer, ckpt["state"])

    def load_full_state(self, trainer: Any, state: Mapping[str, Any]) -> None:
        trainer.load_state(state)

    def load_weights(self, model: nn.Module, ckpt: Mapping[str, Any], path: Path) -> None:
        """The model of a finished phase, from its checkpoint."""
        if is_sharded(ckpt):
            from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                                 set_model_state_dict)

            content = load_sharded({"model": get_model_state_dict(model)},
                                   shards_folder(path, ckpt))
            set_model_state_dict(model, content["model"])
        else:
            self.load_full_weights(model, ckpt["model"])

    def load_full_weights(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        model.load_state_dict(state)


class DDPStrategy(Strategy):
    """torchrun with whole models: DistributedDataParallel averages the gradients."""

    name = "ddp"

    def wrap(self, step_module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = self.env.device
        return DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None)

    @contextlib.contextmanager
    def no_sync(self, forward: nn.Module) -> Iterator[None]:
        with forward.no_sync():
            yield


# ----------------------------------------------------------------------------- helpers

def is_sharded_model(model: Any) -> bool:
    """True for a module FSDP2 sharded (no FSDP import: none is sharded before one)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def release_gathered(*models: Any) -> None:
    """Frees the whole parameters sharded models keep gathered after a forward (their roots');
    anything else is left alone."""
    for model in models:
        if is_sharded_model(model):
            model.reshard()


def trainer_content(trainer: Any) -> Dict[str, Any]:
    """The trainer's model, loss parameters and optimizer state as this process holds them
    (shards under FSDP, whole tensors otherwise), keyed by parameter names, for DCP."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    content = {"model": get_model_state_dict(trainer.model)}
    if isinstance(trainer.loss, nn.Module) and trainer.loss.state_dict():
        content["loss"] = get_model_state_dict(trainer.loss)
    content["optimizer"] = get_optimizer_state_dict(trainer.step_module, trainer.optimizer)
    return content


def set_trainer_content(trainer: Any, content: Mapping[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(trainer.model, content["model"])
    if "loss" in content:
        set_model_state_dict(trainer.loss, content["loss"])
    set_optimizer_state_dict(trainer.step_module, trainer.optimizer, content["optimizer"])
