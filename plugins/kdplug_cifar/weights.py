"""Loading a local state_dict into a model built for other data (another head, another stem).

Every tensor whose name and shape match is loaded; the rest (say a 1000-class ImageNet head on a
100-class model) keeps its fresh initialization and is named in one warning. Nothing is ever
downloaded: files come from a local path or, for torchvision's own weights, from the torch hub
cache where an earlier download left them.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Mapping

import torch
from torch import nn

import kdplug

__all__ = ["read_state_dict", "load_matching"]

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "student", "teacher")


def read_state_dict(path: Any) -> Dict[str, torch.Tensor]:
    """The tensors of a saved state_dict (also one nested under 'state_dict' or 'model', as
    training scripts and kdplug's checkpoints save them; a DDP 'module.' prefix is dropped)."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise kdplug.KdplugError(f"weights file {str(path)!r} does not exist (resolved: "
                                 f"{str(file.resolve())!r}); weights=PATH takes a local "
                                 "state_dict saved with torch.save(model.state_dict(), PATH)")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or pickled objects weights_only refuses
        raise kdplug.KdplugError(f"cannot read weights from {str(file)!r}: "
                                 f"{type(exc).__name__}: {exc}") from None
    for key in _NESTED_KEYS:
        if isinstance(saved, Mapping) and isinstance(saved.get(key), Mapping):
            saved = saved[key]
            break
    if not isinstance(saved, Mapping) or not saved or not all(
            isinstance(v, torch.Tensor) for v in saved.values()):
        raise kdplug.KdplugError(f"{str(file)!r} holds no state_dict (a mapping of names to "
                                 f"tensors); got {type(saved).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in saved.items()}


def _some(names, shown: int = 6) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def load_matching(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> int:
    """Load the entries of ``state_dict`` that fit ``model`` by name and shape; returns how many.

    A clear error when fewer than half of the model's tensors fit (weights of another
    architecture); otherwise one warning naming what was left at its initialization (a new head,
    a new stem) and what the file had that the model does not use.
    """
    own = model.state_dict()
    fitting = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    if 2 * len(fitting) < len(own):
        raise kdplug.KdplugError(
            f"{source} does not fit this {type(model).__name__}: only {len(fitting)} of its "
            f"{len(own)} tensors match by name and shape (the file has e.g. "
            f"{_some(list(state_dict), 3)}; the model {_some(list(own), 3)}). Weights of "
            "another architecture?")
    model.load_state_dict(fitting, strict=False)
    kept = [k for k in own if k not in fitting]
    unused = [k for k in state_dict if k not in fitting]
    if kept or unused:
        warnings.warn(
            f"loaded {len(fitting)} of {len(own)} tensors from {source}; left at their "
            f"initialization (missing or another shape): {_some(kept)}; unused from the file: "
            f"{_some(unused)}", stacklevel=3)
    return len(fitting)
