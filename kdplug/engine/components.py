"""Building a run's parts from what the user gave: the data, the models and the loss.

Each part comes as a registry name (built by the factory a plugin registered) or as a ready object
(a DataSplits, an nn.Module, a callable). A factory gets what the engine knows — the data's
``model_options`` for a model, ``temperature``/``alpha`` for a loss — filtered to the parameters
it accepts, under the user's own options, which are always passed (a misspelt option is an
error that names the factory's plugin).

``kdplug distill`` and ``kdplug cache-teacher`` build through these functions, so a teacher is
built from the same seed, with the same options, and loaded from its checkpoint in the same single
place (:func:`build_teacher`) by both.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional

import torch
from torch import nn

from ..api import get_registration
from ..data import DataSplits
from ..errors import KdplugError
from ..feature_source import attach_models
from ..registry import Registration
from .batching import collate as default_collate
from .batching import mix_seed, requirements
from .checkpoint import load_model_weights
from .config import ConfigError, DistillConfig
from .distributed import DistEnv

__all__ = ["Source", "BuiltModel", "Components", "build_components", "build_data", "build_model",
           "build_teacher", "build_loss", "model_options", "factory_options", "display_name",
           "uses_teacher", "check_teacher_given",
           "SEED_TEACHER_INIT", "SEED_STUDENT_INIT"]

#: Seed keys of the models' initial weights (mixed with the run's seed): a teacher built by
#: cache-teacher from its name has the weights distill would give it.
SEED_TEACHER_INIT, SEED_STUDENT_INIT = 1, 2
_INIT_SEEDS = {"teacher": SEED_TEACHER_INIT, "student": SEED_STUDENT_INIT}
#: role -> the registry kind its names are looked up in
_KINDS = {"teacher": "teacher", "student": "student", "data": "dataset", "loss": "loss"}


@dataclass(frozen=True)
class Source:
    """One part as the user gave it: a registered name, or a ready object."""

    role: str  # "teacher", "student", "data" or "loss"
    name: str  # the registry name, or the object's display name (for reports)
    registration: Optional[Registration] = None  # by name
    obj: Any = None  # a ready object

    @classmethod
    def of(cls, role: str, value: Any) -> Optional["Source"]:
        """None for None; a name is looked up now (an unknown name fails here, naming the
        closest known one)."""
        if value is None:
            return None
        if isinstance(value, str):
            return cls(role, value, registration=get_registration(_KINDS[role], value))
        return cls(role, display_name(value), obj=value)

    @property
    def by_name(self) -> bool:
        return self.registration is not None

    def no_options_for_objects(self, options: Mapping[str, Any]) -> None:
        if options and not self.by_name:
            raise ConfigError(f"{self.role}_options apply to a {self.role} built by name; this "
                              f"{self.role} was given as a ready object")

    def create(self, options: Mapping[str, Any]) -> Any:
        """The factory's product; its failures are named with the plugin that registered it."""
        registration = self.registration
        try:
            return registration.create(**options)
        except KdplugError:
            raise
        except TypeError as exc:
            raise KdplugError(f"{self.role} {self.name!r} (from plugin {registration.origin()}) "
                              f"refused the options {dict(options)}: {exc}") from None
        except Exception as exc:
            raise KdplugError(f"{self.role} {self.name!r} (from plugin {registration.origin()}) "
                              f"failed to build with options {dict(options)}: "
                              f"{type(exc).__name__}: {exc}") from exc


def display_name(obj: Any) -> str:
    """How a ready object is named in reports: a DataSplits' info name, else its class name."""
    if isinstance(obj, DataSplits):
        return str(obj.info.get("name", "DataSplits"))
    return getattr(obj, "__name__", None) or type(obj).__name__


def factory_options(registration: Registration, given: Mapping[str, Any],
                    user: Mapping[str, Any]) -> Dict[str, Any]:
    """``given`` (from the data or the engine) filtered to what the registered factory accepts,
    under ``user`` (always passed: a misspelt user option is an error)."""
    accepted = registration.options
    passed = dict(given) if accepted is None else {k: v for k, v in given.items() if k in accepted}
    return {**passed, **user}


# ----------------------------------------------------------------------------- single parts

def build_data(source: Source, options: Mapping[str, Any], env: DistEnv) -> DataSplits:
    """The data's splits; under torchrun rank 0 builds first (it may download), then the others
    read what it left."""
    if source.by_name:
        splits = None
        for turn in ((0,) if not env.distributed else (0, 1)):
            if (env.rank == 0) == (turn == 0):
                splits = source.create(options)
            env.barrier()
    else:
        source.no_options_for_objects(options)
        splits = source.obj
    if not isinstance(splits, DataSplits):
        raise KdplugError(f"data {source.name!r} gave a {type(splits).__name__}; a data provider "
                          "must return a kdplug.data.DataSplits")
    return splits


def model_options(source: Source, splits: DataSplits, user: Mapping[str, Any]
                  ) -> Optional[Dict[str, Any]]:
    """The options a model's factory gets (the data's model_options it accepts, under the
    user's); None for a ready module."""
    if not source.by_name:
        return None
    return factory_options(source.registration, splits.model_options, user)


@dataclass
class BuiltModel:
    """A teacher or student and how it was made."""

    model: nn.Module
    name: str
    options: Optional[Dict[str, Any]]  # what its factory got; None for a ready module


def build_model(source: Source, splits: DataSplits, user_options: Mapping[str, Any],
                seed: int) -> BuiltModel:
    """A teacher or student, its initial weights drawn from (seed, role) whatever ran before."""
    if not source.by_name:
        if not isinstance(source.obj, nn.Module):
            raise KdplugError(f"the {source.role} must be a name or a torch.nn.Module, got "
                              f"{type(source.obj).__name__}")
        source.no_options_for_objects(user_options)
        return BuiltModel(source.obj, source.name, None)
    options = model_options(source, splits, user_options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, _INIT_SEEDS[source.role]))
        model = source.create(options)
    return BuiltModel(model, source.name, options)


def build_teacher(source: Source, splits: DataSplits, user_options: Mapping[str, Any], seed: int,
                  checkpoint: Optional[str]) -> BuiltModel:
    """The teacher, with the weights of ``checkpoint`` (a kdplug checkpoint or a state_dict)
    when given: the one place kdplug loads a teacher checkpoint."""
    built = build_model(source, splits, user_options, seed)
    if checkpoint:
        load_model_weights(built.model, Path(checkpoint), f"teacher {source.name!r}")
    return built


def build_loss(source: Source, options: Mapping[str, Any], temperature: float,
               alpha: float) -> Callable:
    """The loss; a factory gets the run's temperature and alpha when it takes them."""
    if not source.by_name:
        if not callable(source.obj):
            raise KdplugError(f"the loss must be a name or a callable, got "
                              f"{type(source.obj).__name__}")
        source.no_options_for_objects(options)
        return source.obj
    engine = {"temperature": temperature, "alpha": alpha}
    return source.create(factory_options(source.registration, engine, options))


# ----------------------------------------------------------------------------- a run's parts

@dataclass
class Components:
    """Everything :func:`kdplug.distill` builds before its checks, on the run's device."""

    splits: DataSplits
    collate: Callable  # the data's collate_fn, or kdplug's default
    teacher: Optional[BuiltModel]  # None with a teacher cache that needs no weights compared
    student: BuiltModel
    scratch: Optional[nn.Module]  # the student's initial weights, for the baseline
    loss: Callable
    requires: FrozenSet[str]  # what the loss asks the models for (hidden_states, attentions)
    teacher_options: Optional[Dict[str, Any]]  # the teacher factory's options (by name only)


def build_components(cfg: DistillConfig, sources: Mapping[str, Optional[Source]],
                     splits: DataSplits, env: DistEnv) -> Components:
    """The models for ``splits`` (seeded; the teacher with its checkpoint), the scratch copy
    and the loss, moved to ``env.device``."""
    teacher_source = sources.get("teacher")
    teacher = None
    if (teacher_source is not None or cfg.teacher_cache) and _teacher_needed(cfg, teacher_source):
        teacher = build_teacher(teacher_source, splits, cfg.teacher_options, cfg.seed,
                                cfg.teacher_checkpoint)
    student = build_model(sources["student"], splits, cfg.student_options, cfg.seed)
    scratch = copy.deepcopy(student.model) if cfg.baseline else None
    loss = build_loss(sources["loss"], cfg.loss_options, cfg.temperature, cfg.alpha)
    for module in (teacher and teacher.model, student.model, scratch, loss):
        if isinstance(module, nn.Module):
            module.to(env.device)
    if teacher is not None:  # features by module path: hooks on both models (removed at run end)
        attach_models(loss, student=student.model, teacher=teacher.model)
    teacher_options = (model_options(teacher_source, splits, cfg.teacher_options)
                       if teacher_source is not None else None)
    return Components(splits=splits, collate=splits.collate_fn or default_collate,
                      teacher=teacher, student=student, scratch=scratch, loss=loss,
                      requires=requirements(loss), teacher_options=teacher_options)


def uses_teacher(loss: Source) -> bool:
    """Whether a loss reads the teacher's output, from its ``uses_teacher`` attribute (on the
    registered class or factory, or on the object): True unless it says otherwise."""
    return bool(getattr(loss.registration.factory if loss.by_name else loss.obj, "uses_teacher",
                        True))


def check_teacher_given(cfg: DistillConfig, sources: Mapping[str, Optional[Source]]) -> None:
    """A run without a teacher (or a teacher cache) needs a loss that uses none."""
    if sources.get("teacher") is not None or cfg.teacher_cache:
        return
    if cfg.teacher_checkpoint:
        raise ConfigError("teacher_checkpoint needs the teacher's name too (--teacher NAME): "
                          "the checkpoint's weights are loaded into it")
    loss = sources["loss"]
    if uses_teacher(loss):
        raise ConfigError(f"the loss {loss.name!r} learns from a teacher, and none was given: "
                          "pass --teacher NAME (or --teacher-cache DIR), or train the student "
                          "alone with a loss that uses no teacher (--loss ce)")


def _teacher_needed(cfg: DistillConfig, source: Optional[Source]) -> bool:
    """Without a cache always; with one only to hash the weights the run names."""
    if not cfg.teacher_cache or (source is not None and not source.by_name):
        return True
    if cfg.teacher_checkpoint and source is None:
        raise ConfigError("teacher_checkpoint with teacher_cache needs the teacher's name too "
                          "(--teacher NAME): its weights are hashed and compared with the "
                          "cache's")
    return bool(cfg.teacher_checkpoint)
