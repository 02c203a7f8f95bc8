"""Settings dataclasses, one source of truth per option.

A field of a run's :class:`~kdplug.engine.config.DistillConfig` or of cache-teacher's
:class:`~kdplug.cache.config.CacheConfig` is declared once, with :func:`setting`: its type, its
default and its help. The Python API takes it as a keyword, a TOML file as a key, and the CLI's
options are generated from it (:mod:`kdplug.cli_options`), so a new option is added in one place.
This module knows nothing about click: the metadata is plain data.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["setting", "Setting", "settings_of", "declared_problem"]

_KEY = "kdplug"


def setting(default: Any = None, *, help: str, default_factory: Any = dataclasses.MISSING,
            choices: Optional[Tuple[str, ...]] = None, short: Optional[str] = None,
            path: Optional[str] = None, flag: Optional[str] = None, negatable: bool = False,
            required: bool = False, default_text: Optional[str] = None,
            metavar: Optional[str] = None) -> Any:
    """A dataclass field with what the CLI needs to offer it.

    help: one sentence, shown by ``--help`` (the default is shown after it).
    choices: the allowed values. short: a short flag (``"-T"``). path: ``"file"`` or ``"dir"``.
    flag: the long flag when not ``--field-name`` (``"--teacher-option"`` for an option table).
    negatable: a bool with ``--x/--no-x`` (default: ``--x`` alone, a switch that turns it on).
    required: the command needs it (the Python API says which are missing).
    default_text: what the default means when it is None (``"= --epochs"``).
    """
    info = {"help": help, "choices": choices, "short": short, "path": path, "flag": flag,
            "negatable": negatable, "required": required, "default_text": default_text,
            "metavar": metavar}
    if path not in (None, "file", "dir"):
        raise ValueError(f"setting path must be 'file' or 'dir', got {path!r}")
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={_KEY: info})
    return dataclasses.field(default=default, metadata={_KEY: info})


@dataclass(frozen=True)
class Setting:
    """One field of a settings dataclass, as the CLI and the docs see it."""

    name: str
    type: Any  # the annotation without Optional[]: str, int, float, bool, dict or Any
    optional: bool  # None is a valid value
    default: Any  # the dataclass default (an option table's is {})
    help: str
    choices: Optional[Tuple[str, ...]] = None
    short: Optional[str] = None
    path: Optional[str] = None
    flag: Optional[str] = None
    negatable: bool = False
    required: bool = False
    default_text: Optional[str] = None
    metavar: Optional[str] = None

    @property
    def long_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def is_table(self) -> bool:
        """An option table (``teacher_options``): repeated ``KEY=VALUE`` on the command line."""
        return self.type is dict

    @property
    def shown_default(self) -> Optional[str]:
        """The default as ``--help`` shows it, or None to show none."""
        if self.default_text is not None:
            return self.default_text
        if self.type is bool:
            return "on" if self.default else None
        if self.default is None or self.is_table or self.required:
            return None
        return str(self.default)


@functools.lru_cache(maxsize=None)
def settings_of(cls: type) -> Tuple[Setting, ...]:
    """The fields of a settings dataclass in declaration order; each must come from setting()."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        info: Dict[str, Any] = dict(f.metadata.get(_KEY) or {})
        if not info:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with kdplug.settings.setting")
        kind, optional = _plain_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        found.append(Setting(name=f.name, type=kind, optional=optional, default=default, **info))
    return tuple(found)


def _plain_type(annotation: Any) -> Tuple[Any, bool]:
    optional = False
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else Any
    origin = typing.get_origin(annotation)
    if origin is not None:
        annotation = origin  # Dict[str, Any] -> dict
    return annotation, optional


_TYPE_CHECKS: Dict[Any, Tuple[str, Callable[[Any], bool]]] = {
    str: ("a string", lambda v: isinstance(v, str)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    dict: ("a table of name = value options",
           lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)),
}


def declared_problem(obj: Any) -> Optional[Tuple[str, str]]:
    """The first field of a settings dataclass instance whose value does not fit what its
    declaration says (type, choices), as (field name, what was expected); None if all fit.
    Ranges and other rules stay with each dataclass's own validation."""
    for item in settings_of(type(obj)):
        value = getattr(obj, item.name)
        if value is None and item.optional:
            continue
        check = _TYPE_CHECKS.get(item.type)
        if check is not None and not check[1](value):
            return item.name, check[0]
        if item.choices and value not in item.choices:
            return item.name, "one of " + ", ".join(item.choices)
    return None
