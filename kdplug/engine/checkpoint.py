"""Checkpoints: atomic writes, full training state, RNG capture and restore.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then moved
over the old one with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsync'ed: a
run killed at any instant leaves either the previous checkpoint or the new one, never a torn file.
Checkpoints load with ``weights_only=True``: they hold only tensors and plain Python values.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from .._atomic import atomic_write
from ..errors import KdplugError

__all__ = ["atomic_save", "load_checkpoint", "checkpoint_identity", "rng_state", "set_rng_state",
           "load_model_weights", "FORMAT"]

FORMAT = "kdplug-checkpoint-v1"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: Path) -> None:
    """A text file (report.json, config), atomically."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def load_checkpoint(path: Path, mmap: bool = False) -> Dict[str, Any]:
    """A checkpoint file as a dict (on the CPU); a clear error if it cannot be read. ``mmap``
    maps the tensors instead of reading them (for a look at the plain values)."""
    path = Path(path)
    if not path.is_file():
        raise KdplugError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # e.g. KeyError: 105 for a text file: say what was expected
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise KdplugError(f"cannot read checkpoint {str(path)!r}: it is not a file torch.save "
                          "wrote (a kdplug checkpoint or a state_dict of tensors), or it is "
                          f"damaged (torch.load: {type(exc).__name__}: {detail})") from None
    if not isinstance(obj, dict):
        raise KdplugError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}; expected a "
                          "kdplug checkpoint or a state_dict")
    return obj


def checkpoint_identity(path: Path) -> Dict[str, Any]:
    """The settings the run that wrote a kdplug checkpoint was started with (its tensors are
    memory-mapped, not read: this is cheap for a large model)."""
    identity = load_checkpoint(path, mmap=True).get("identity")
    if not isinstance(identity, dict):
        raise KdplugError(f"{str(path)!r} is not a checkpoint of a kdplug run (it records no "
                          "settings); --resume continues only a run kdplug wrote")
    return identity


def load_model_weights(model: torch.nn.Module, path: Path, what: str) -> Dict[str, Any]:
    """Loads ``path`` (a kdplug checkpoint or a plain state_dict) into ``model``.

    Returns the checkpoint dict. A state_dict that does not fit is a clear error naming the
    missing, unexpected and mis-shaped keys.
    """
    ckpt = load_checkpoint(path)
    state = ckpt["model"] if ckpt.get("format") == FORMAT else ckpt
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise KdplugError(f"{str(path)!r} is neither a kdplug checkpoint nor a state_dict of "
                          "tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch", shapes)):
            if keys:
                more = f", … ({len(keys)} in all)" if len(keys) > 5 else ""
                shown = ", ".join(keys[:5]) + more
                parts.append(f"{label}: {shown}")
        raise KdplugError(f"{str(path)!r} does not fit the {what} ({type(model).__name__}): "
                          + "; ".join(parts) + ". Was it saved from the same model with the same "
                          "options?")
    model.load_state_dict(state)
    return ckpt


# ----------------------------------------------------------------------------- RNG

def rng_state() -> Dict[str, Any]:
    """This process's random state: torch CPU and CUDA, Python's random, NumPy's global RNG."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def seed_everything(seed: int) -> None:
    """torch (CPU and CUDA), Python's random and NumPy, from one seed."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _plain(value: Any) -> Any:
    return list(_plain(v) for v in value) if isinstance(value, tuple) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def optional_state(obj: Optional[Any]) -> Optional[Dict[str, Any]]:
    return None if obj is None else obj.state_dict()
