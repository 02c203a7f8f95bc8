"""The checks before any training: everything that can be wrong with a run's inputs fails here,
with a message that names the part and the data, before the first optimizer step.

- :func:`check_data`: the splits hold at least one batch; the batch divides across processes.
- :func:`dry_run`: one forward of each model on two training samples and the loss on them: the
  logits' shape against the data's classes (or vocabulary), the intermediate outputs the loss
  requires, the loss's scalar result. A loss with lazily built parameters (feature projections)
  creates them here, before the optimizer exists.
"""
from __future__ import annotations

from typing import Callable, Dict, FrozenSet, Optional

import torch
from torch import nn

from ..data import DataSplits
from ..errors import KdplugError
from ..outputs import ModelOutput
from .batching import call_model, probe_batch
from .config import DistillConfig
from .distributed import DistEnv
from .loop import autocast_factory

__all__ = ["check_data", "dry_run"]


def check_data(splits: DataSplits, cfg: DistillConfig, env: DistEnv) -> None:
    n_train, n_test = len(splits.train), len(splits.test)  # type: ignore[arg-type]
    if n_train < cfg.batch_size:
        raise KdplugError(f"data {cfg.data!r} has {n_train} training samples, fewer than one "
                          f"batch (batch_size {cfg.batch_size}); lower --batch-size")
    if n_test < 1:
        raise KdplugError(f"data {cfg.data!r} has an empty test split")
    if cfg.batch_size % env.world_size:
        raise KdplugError(f"batch_size {cfg.batch_size} must be divisible by the number of "
                          f"processes ({env.world_size}): it is the global batch")


def dry_run(teacher: Optional[nn.Module], student: nn.Module, loss: Callable, splits: DataSplits,
            collate: Callable, requires: FrozenSet[str], cfg: DistillConfig,
            env: DistEnv) -> None:
    """One forward of each model on two training samples, and the loss on them (``teacher``
    None: a run whose loss uses no teacher; the loss gets None for its output)."""
    where = f"data {cfg.data!r}"
    batch = probe_batch(splits.train, collate, where, env.device)
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
    autocast = autocast_factory(cfg.amp, env.device)
    models = (("teacher", teacher), ("student", student)) if teacher is not None else (
        ("student", student),)
    for role, model in models:
        name = getattr(cfg, role)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast():
                out = call_model(model, batch, requires)
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
        for need in sorted(requires):
            if getattr(out, need) is None:
                raise KdplugError(f"the loss {cfg.loss!r} requires {need}, but the {role} "
                                  f"{name!r} returned none with output_{need}=True")
        outs[role] = out
    if splits.task == "lm" and any(v != classes for v in vocabularies.values()):
        predicts = ", ".join(f"the {role} {getattr(cfg, role)!r} "
                             + (f"predicts {size} tokens" if i == 0 else str(size))
                             for i, (role, size) in enumerate(vocabularies.items()))
        raise KdplugError(
            f"vocabulary mismatch: {predicts}, and {where} has a vocabulary of {classes}; "
            "token-level distillation needs one vocabulary for the models and the data. Check "
            f"the models' vocab_size options or the data's tokenizer. The data: {about}")
    try:
        with torch.no_grad(), autocast():
            value = loss(outs["student"], outs.get("teacher"), batch)
    except Exception as exc:
        raise KdplugError(f"the loss {cfg.loss!r} failed on the first batch of {where}: "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise KdplugError(f"the loss {cfg.loss!r} returned {type(value).__name__} "
                          f"{list(getattr(value, 'shape', []))}; expected a scalar tensor")
