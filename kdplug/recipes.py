"""Recipes: ready-made run configs (TOML) for published distillation results.

A recipe is an ordinary config file for ``kdplug distill --config FILE``; its leading ``#``
comment lines say what it reproduces and which numbers were published. They live in the
repository's ``recipes/`` folder (``$KDPLUG_RECIPES_DIR`` points elsewhere); ``kdplug recipes``
lists them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .engine.config import load_config_file
from .errors import KdplugError

__all__ = ["Recipe", "RECIPES_DIR_ENV", "recipes_dir", "list_recipes", "find_recipe"]

RECIPES_DIR_ENV = "KDPLUG_RECIPES_DIR"


@dataclass(frozen=True)
class Recipe:
    """One recipe file: its name (the file name without .toml), path, notes and settings."""

    name: str
    path: Path
    notes: List[str] = field(default_factory=list)  # the leading comment lines
    config: Dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        c = self.config
        return (f"{c.get('teacher', '?')} -> {c.get('student', '?')} on {c.get('data', '?')}, "
                f"loss {c.get('loss', 'kd+ce')}, {c.get('epochs', '?')} epochs")

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "notes": list(self.notes),
                "config": dict(self.config)}


def recipes_dir() -> Path:
    """``$KDPLUG_RECIPES_DIR``, else the recipes shipped in the package (``kdplug/_recipes``, a
    wheel), else the ``recipes/`` folder beside the package (a checkout or an editable install)."""
    env = os.environ.get(RECIPES_DIR_ENV)
    if env:
        return Path(env).expanduser()
    package = Path(__file__).resolve().parent
    shipped = package / "_recipes"
    return shipped if shipped.is_dir() else package.parent / "recipes"


def _notes(path: Path) -> List[str]:
    notes = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        notes.append(line.lstrip("#").strip())
    return notes


def list_recipes(folder: Optional[Path] = None) -> List[Recipe]:
    """Every ``*.toml`` recipe in ``folder`` (default :func:`recipes_dir`), by name; each file is
    read as a config, so a broken recipe is an error naming it."""
    folder = Path(folder) if folder is not None else recipes_dir()
    if not folder.is_dir():
        raise KdplugError(f"no recipes folder at {folder}: recipes ship in the repository's "
                          f"recipes/ folder; point ${RECIPES_DIR_ENV} at it")
    return [Recipe(path.stem, path, _notes(path), load_config_file(path))
            for path in sorted(folder.glob("*.toml"))]


def find_recipe(name: str, folder: Optional[Path] = None) -> Recipe:
    """The recipe called ``name`` (with or without .toml); a clear error listing the known ones."""
    recipes = {r.name: r for r in list_recipes(folder)}
    key = name[:-5] if name.endswith(".toml") else name
    if key not in recipes:
        import difflib

        close = difflib.get_close_matches(key, list(recipes), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise KdplugError(f"no recipe {name!r}{hint} Recipes: {', '.join(recipes) or 'none'}")
    return recipes[key]
