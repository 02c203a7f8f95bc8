"""``--strategy fsdp``: models sharded across torchrun's processes with FSDP2 (``fully_shard``).

With K processes and a model of P parameters, each process keeps P/K of the parameters, of their
gradients and of the optimizer state; a shard unit's parameters are gathered whole just for its
forward (and again for its backward) and freed after (:mod:`.shard_units` says which units).

- the student (and a trained teacher or scratch model) is sharded unit by unit, then as a whole;
  the parameters of the loss (hint projections) are sharded as one more unit, so one optimizer
  steps over shards only and the loss's parameters are checkpointed with the student;
- a teacher that is not trained is sharded for inference: frozen (no gradients, no optimizer
  state), run under no_grad, and every unit, its root included, freed right after its forward;
- ``--amp bf16``: FSDP2's MixedPrecisionPolicy gathers and computes in bfloat16 and reduces the
  gradients in float32 (autocast still runs, so losses compute as in other strategies);
- checkpoints are sharded (:mod:`.sharded_checkpoint`): each process writes its own shards.

Models are built whole on the CPU (host memory) by every process and sharded as they are built:
``fully_shard`` moves each unit's shard to the device, so a device never holds a whole model.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .distributed import DistEnv
from .shard_units import shard_units
from .sharded_checkpoint import save_sharded
from .strategy import Strategy, release_gathered, trainer_content

__all__ = ["FSDPStrategy", "mixed_precision"]

_WHOLE = StateDictOptions(full_state_dict=True)


def mixed_precision(amp: str) -> MixedPrecisionPolicy:
    if amp == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class FSDPStrategy(Strategy):
    name = "fsdp"
    lockstep = True

    def __init__(self, env: DistEnv, amp: str = "none") -> None:
        super().__init__(env)
        self.mesh = init_device_mesh(env.device.type, (env.world_size,))
        self.mp_policy = mixed_precision(amp)

    def _shard(self, module: nn.Module, reshard_after_forward: Optional[bool] = None) -> None:
        fully_shard(module, mesh=self.mesh, mp_policy=self.mp_policy,
                    reshard_after_forward=reshard_after_forward)

    def prepare_model(self, model: nn.Module, what: str, units: Optional[Sequence[str]] = None,
                      inference: bool = False) -> nn.Module:
        if isinstance(model, FSDPModule):
            return model
        for _, unit in shard_units(model, units, what):
            self._shard(unit, reshard_after_forward=True)
        # the root keeps its parameters gathered from forward to backward, unless never trained
        self._shard(model, reshard_after_forward=True if inference else None)
        return model

    def prepare_teacher(self, teacher: nn.Module) -> None:
        if not isinstance(teacher, FSDPModule):
            self.prepare_model(teacher, "the teacher", inference=True)
        teacher.set_reshard_after_forward(True)  # a teacher trained in this run: its root too

    def wrap(self, step_module: nn.Module) -> nn.Module:
        self.prepare_model(step_module.model, "the model")  # already done when the engine built it
        loss = step_module.loss
        if (isinstance(loss, nn.Module) and not isinstance(loss, FSDPModule)
                and next(loss.parameters(), None) is not None):
            self._shard(loss)
        return step_module

    @contextlib.contextmanager
    def no_sync(self, forward: nn.Module) -> Iterator[None]:
        modules = [m for m in (forward.model, forward.loss) if isinstance(m, FSDPModule)]
        for module in modules:
            module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for module in modules:
                module.set_requires_gradient_sync(True)

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The norm over every shard of every gradient (all processes agree on it)."""
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # -- checkpoints: sharded when written; a one-file checkpoint (DDP's) is read and sharded
    def save_checkpoint(self, trainer: Any, status: Dict[str, Any], path: Path) -> None:
        # state dicts are read and written shard by shard: no parameter may be left gathered
        # (a root keeps its own gathered after a forward until its backward)
        release_gathered(trainer.model, trainer.loss)
        save_sharded(trainer_content(trainer), {**status, "state": trainer.schedule_state()},
                     path, self.env)

    def load_checkpoint(self, trainer: Any, ckpt: Mapping[str, Any], path: Path) -> None:
        release_gathered(trainer.model, trainer.loss)
        super().load_checkpoint(trainer, ckpt, path)

    def load_weights(self, model: nn.Module, ckpt: Mapping[str, Any], path: Path) -> None:
        release_gathered(model)
        super().load_weights(model, ckpt, path)

    def load_full_state(self, trainer: Any, state: Mapping[str, Any]) -> None:
        self.load_full_weights(trainer.model, state["model"])
        if isinstance(trainer.loss, nn.Module) and state.get("loss"):
            set_model_state_dict(trainer.loss, state["loss"], options=_WHOLE)
        set_optimizer_state_dict(trainer.step_module, trainer.optimizer,
                                 _optimizer_state_by_name(trainer, state["optimizer"]),
                                 options=_WHOLE)
        trainer.load_schedule_state(state)

    def load_full_weights(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        set_model_state_dict(model, dict(state), options=_WHOLE)


def _optimizer_state_by_name(trainer: Any, state: Mapping[str, Any]) -> Dict[str, Any]:
    """torch's optimizer state_dict (parameters by position) keyed by parameter names instead,
    as torch.distributed.checkpoint's set_optimizer_state_dict reads it."""
    names = [name for name, p in trainer.step_module.named_parameters() if p.requires_grad]
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}
