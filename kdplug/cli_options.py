"""Click options made from a settings dataclass (:mod:`kdplug.settings`): one option per field,
with the field's flag, type, choices, help and default, so a command never restates them.

Every generated option defaults to None ("not given"): the command passes on only what the user
gave, and the dataclass (or a ``--config`` file under the flags) supplies the rest. ``--help``
shows the dataclass default.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import click

from .engine.config import parse_options
from .settings import Setting, settings_of

__all__ = ["settings_options", "click_option", "given_settings"]

_CLICK_TYPES = {int: int, float: float, str: str}


def click_option(item: Setting) -> Callable[[Callable], Callable]:
    """The click option of one setting, as a decorator."""
    decls = [item.long_flag] + ([item.short] if item.short else [])
    shown = "" if item.shown_default is None else f"  [default: {item.shown_default}]"
    kwargs: Dict[str, Any] = {"default": None, "help": item.help + shown,
                              "required": item.required}
    if item.type is bool:
        if item.negatable:
            decls[0] = f"{item.long_flag}/--no-{item.long_flag[2:]}"
        else:
            kwargs["is_flag"] = True
    elif item.is_table:
        kwargs.update(multiple=True, metavar=item.metavar or "KEY=VALUE", default=())
    elif item.choices:
        kwargs["type"] = click.Choice(list(item.choices))
    elif item.path:
        kwargs["type"] = click.Path(dir_okay=item.path == "dir", file_okay=item.path == "file")
    else:
        kwargs["type"] = _CLICK_TYPES.get(item.type, str)
    if item.metavar and not item.is_table:
        kwargs["metavar"] = item.metavar
    return click.option(*decls, item.name, **kwargs)


def settings_options(cls: type) -> Callable[[Callable], Callable]:
    """A decorator that adds one option per field of ``cls``, in declaration order."""
    def decorate(command: Callable) -> Callable:
        for item in reversed(settings_of(cls)):
            command = click_option(item)(command)
        return command

    return decorate


def given_settings(cls: type, values: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings the user gave on the command line (options left out are not in it); an
    option table's repeated KEY=VALUE become a dict."""
    given: Dict[str, Any] = {}
    for item in settings_of(cls):
        value = values.get(item.name)
        if item.is_table:
            if value:
                given[item.name] = parse_options(value, item.long_flag)
        elif value is not None:
            given[item.name] = value
    return given
