"""Where a feature loss finds its features: module paths captured by hooks, or hidden_states.

A feature loss (``hint``, ``hidden``, ``attention``, ``at``, ``sp``, ``rkd``, ``pkt``) holds a
:class:`FeatureSource`. Given ``student_layers`` and ``teacher_layers`` (module paths, see
:mod:`kdplug.capture`), the source reads the features that forward hooks on the two models
captured in their latest forward; the models are attached once, before training::

    loss = kdplug.create_loss("hint", student_layers="features.6", teacher_layers="layer3")
    attach_models(loss, student=student, teacher=teacher)   # kdplug.distill does this
    ...                                                     # forward both models, call the loss
    detach_models(loss)                                     # the hooks come off

Without module paths the source reads ``ModelOutput.hidden_states`` (or ``.attentions``) that
models return when called with ``output_hidden_states=True``: the loss then lists that attribute
in its ``requires``, and nothing needs attaching.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .capture import FeatureCapture, Paths, parse_feature_paths
from .errors import KdplugError
from .outputs import as_model_output

__all__ = ["FeatureSource", "attach_models", "detach_models", "feature_sources"]

SIDES = ("student", "teacher")


class FeatureSource:
    """The student's and the teacher's features for one loss term, in order."""

    def __init__(self, attribute: str = "hidden_states", student_layers: Optional[Paths] = None,
                 teacher_layers: Optional[Paths] = None) -> None:
        if (student_layers is None) != (teacher_layers is None):
            given = "student_layers" if student_layers is not None else "teacher_layers"
            raise KdplugError(
                f"{given} is given alone: features by module path need both student_layers and "
                f"teacher_layers (e.g. student_layers='features.6' teacher_layers='layer3')")
        self.attribute = attribute
        self.paths: Optional[Dict[str, List[str]]] = None
        if student_layers is not None:
            self.paths = {"student": [str(s) for s in parse_feature_paths(student_layers)],
                          "teacher": [str(s) for s in parse_feature_paths(teacher_layers)]}
        self._captures: Dict[str, FeatureCapture] = {}

    @property
    def by_path(self) -> bool:
        return self.paths is not None

    @property
    def requires(self) -> frozenset:
        """What the models must return for this source (nothing when hooks capture it)."""
        return frozenset() if self.by_path else frozenset({self.attribute})

    @property
    def attached(self) -> bool:
        return bool(self._captures)

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        """Put the hooks on the models (a second attach moves them to the new models)."""
        if not self.by_path:
            return
        self.detach()
        try:
            for side, model in zip(SIDES, (student, teacher)):
                self._captures[side] = FeatureCapture(model, self.paths[side], what=f"the {side}")
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for capture in self._captures.values():
            capture.remove()
        self._captures = {}

    def get(self, out: Any, side: str) -> Tuple[torch.Tensor, ...]:
        """The features of ``side`` ("student" or "teacher") from its latest forward."""
        if self.by_path:
            capture = self._captures.get(side)
            if capture is None:
                raise KdplugError(
                    f"this loss takes features by module path ({side}_layers="
                    f"{','.join(self.paths[side])!r}) but no {side} model is attached: call "
                    "kdplug.feature_source.attach_models(loss, student=..., teacher=...) before "
                    "the first forward (kdplug.distill does it)")
            return capture.features()
        value = getattr(as_model_output(out), self.attribute)
        if not value:
            flag = "output_hidden_states" if self.attribute == "hidden_states" else \
                "output_attentions"
            raise KdplugError(
                f"the {side} returned no {self.attribute}; this loss needs models that return "
                f"them when called with {flag}=True (as ModelOutput.{self.attribute}), or module "
                f"paths: student_layers=... teacher_layers=... (captured with forward hooks)")
        return tuple(value)

    def __repr__(self) -> str:
        if not self.by_path:
            return f"FeatureSource({self.attribute})"
        return (f"FeatureSource(student={','.join(self.paths['student'])}, "
                f"teacher={','.join(self.paths['teacher'])})")


def feature_sources(loss: Any) -> Iterator[FeatureSource]:
    """Every FeatureSource held by ``loss`` or its submodules (attribute ``feature_source``)."""
    modules = loss.modules() if isinstance(loss, nn.Module) else [loss]
    seen = set()
    for module in modules:
        source = getattr(module, "feature_source", None)
        if isinstance(source, FeatureSource) and id(source) not in seen:
            seen.add(id(source))
            yield source


def attach_models(loss: Any, *, student: nn.Module, teacher: nn.Module) -> int:
    """Attach the models to every module-path source of ``loss``; returns how many sources.

    (Refused for models compiled with torch.compile, see kdplug.capture.)"""
    attached = []
    try:
        for source in feature_sources(loss):
            if source.by_path:
                source.attach(student, teacher)
                attached.append(source)
    except Exception:
        for source in attached:
            source.detach()
        raise
    return len(attached)


def detach_models(loss: Any) -> None:
    """Take every hook that ``attach_models`` put on the models off again."""
    for source in feature_sources(loss):
        source.detach()
