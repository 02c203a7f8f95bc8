"""Features of any model by module path, through forward hooks: no change to the model's forward.

A path names a module as ``model.named_modules()`` does (``layer3``, ``features.6``,
``encoder.layer.2``); ``NAME`` and ``output:NAME`` take what the module returns, ``input:NAME``
the first input it was called with (``input:fc`` is the pooled feature a ResNet classifies)::

    capture = FeatureCapture(model, "layer2,layer3,input:fc")
    logits = model(images)
    layer2, layer3, pooled = capture.features()   # in the order given, with their autograd graph
    capture.remove()                              # or: with FeatureCapture(...) as capture:

torchdistill's ``ForwardHookManager`` is the model. The hooks sit on the inner module of a
DistributedDataParallel (or DataParallel) wrapper, whose forward calls the inner one, so the same
paths work on one process and under torchrun. A model already compiled with ``torch.compile`` is
refused: compiled code does not see hooks added after its first run. (Capture first, then compile:
hooks in place before the first compiled call are traced with the model.)
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import KdplugError

__all__ = ["FeatureSpec", "FeatureCapture", "capture_features", "parse_feature_paths",
           "unwrap_model"]

_WHERE = ("output", "input")
Paths = Union[str, Sequence[str]]


@dataclass(frozen=True)
class FeatureSpec:
    """One requested feature: the module's path and whether its input or its output."""

    path: str
    where: str = "output"

    def __str__(self) -> str:
        return self.path if self.where == "output" else f"{self.where}:{self.path}"


def parse_feature_paths(paths: Paths) -> List[FeatureSpec]:
    """``"layer2,input:fc"`` or ``["layer2", "input:fc"]`` -> FeatureSpecs, in order."""
    items = paths.split(",") if isinstance(paths, str) else list(paths)
    specs = []
    for item in items:
        if not isinstance(item, str):
            raise KdplugError(f"feature path {item!r}: expected a module path string such as "
                              "'layer3', 'features.6', 'input:fc' or 'output:avgpool'")
        text = item.strip()
        if not text:
            continue
        where, colon, path = text.partition(":")
        if not colon:
            where, path = "output", text
        if where not in _WHERE or not path.strip():
            raise KdplugError(f"feature path {text!r}: expected NAME, output:NAME or input:NAME "
                              f"with NAME a module path such as 'layer3' or 'features.6'")
        specs.append(FeatureSpec(path.strip(), where))
    if not specs:
        raise KdplugError(f"no feature path in {paths!r}; give module paths such as "
                          "'layer2,layer3'")
    return specs


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose submodules the paths name: DDP/DataParallel's inner module; a compiled
    model is refused with the reason."""
    if not isinstance(model, nn.Module):
        raise KdplugError(f"features by module path need a torch.nn.Module, got "
                          f"{type(model).__name__}")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise KdplugError(
            "features by module path cannot be taken from a model already compiled with "
            "torch.compile: the compiled code does not run hooks added after its first call. "
            "Attach the feature capture before compiling, or distil the uncompiled model")
    inner = model
    while isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = inner.module
    return inner


def _unknown_path(spec: FeatureSpec, names: List[str], what: str) -> KdplugError:
    close = difflib.get_close_matches(spec.path, names, n=5, cutoff=0.5)
    if close:
        hint = f"closest module names: {', '.join(close)}"
    else:
        top = [n for n in names if n and "." not in n]
        hint = f"its top-level modules: {', '.join(top) or 'none'}"
    return KdplugError(f"{what} has no module {spec.path!r} (in feature path {str(spec)!r}); "
                       f"{hint}. `print(model)` shows every path")


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class FeatureCapture:
    """Forward hooks that keep the inputs/outputs of modules named by path, for each forward.

    ``features()`` returns them in the order of the paths (each one from the latest forward);
    ``clear()`` forgets them; ``remove()`` takes the hooks off (also on leaving a ``with``
    block). ``what`` names the model in error messages ("the student").
    """

    def __init__(self, model: nn.Module, paths: Paths, *, what: str = "the model") -> None:
        self.specs = parse_feature_paths(paths)
        self.what = what
        inner = unwrap_model(model)
        modules: Dict[str, nn.Module] = dict(inner.named_modules())
        names = [n for n in modules if n]
        self._values: Dict[FeatureSpec, Any] = {}
        self._handles: List[Any] = []
        try:
            for spec in dict.fromkeys(self.specs):  # a path given twice gets one hook
                path = spec.path
                if path not in modules and path.startswith("module.") and inner is not model:
                    path = path[len("module."):]  # a path copied from the wrapper's names
                if path not in modules:
                    raise _unknown_path(spec, names, what)
                self._handles.append(modules[path].register_forward_hook(
                    self._hook(spec), with_kwargs=True))
        except Exception:
            self.remove()
            raise

    def _hook(self, spec: FeatureSpec):
        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                 output: Any) -> None:
            if spec.where == "output":
                self._values[spec] = output
            else:
                self._values[spec] = args[0] if args else next(iter(kwargs.values()), None)

        return hook

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def clear(self) -> None:
        self._values.clear()

    def features(self) -> Tuple[torch.Tensor, ...]:
        """The captured tensors, in path order; a clear error for a module that did not run or
        gave no tensor."""
        out = []
        for spec in self.specs:
            if spec not in self._values:
                raise KdplugError(
                    f"feature {str(spec)!r} of {self.what} was not captured: module "
                    f"{spec.path!r} did not run in the last forward (or no forward ran since the "
                    f"capture began)")
            tensor = _first_tensor(self._values[spec])
            if tensor is None:
                raise KdplugError(
                    f"feature {str(spec)!r} of {self.what}: the module's {spec.where} is a "
                    f"{type(self._values[spec]).__name__}, not a tensor (nor a tuple starting "
                    f"with one); pick a module whose {spec.where} is a tensor")
            out.append(tensor)
        return tuple(out)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._values.clear()

    def __enter__(self) -> "FeatureCapture":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"FeatureCapture({', '.join(map(str, self.specs))}; {state})"


def capture_features(model: nn.Module, paths: Paths, inputs: Any, *,
                     what: str = "the model") -> Tuple[Any, Tuple[torch.Tensor, ...]]:
    """One forward with a temporary capture: ``(model(inputs), features)``; the hooks are gone
    afterwards, also when the forward fails."""
    with FeatureCapture(model, paths, what=what) as capture:
        out = model(inputs)
        return out, capture.features()

