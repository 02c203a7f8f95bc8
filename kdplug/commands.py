"""The commands plugins add to ``kdplug`` through the ``register_commands(cli)`` hook.

Each implementation gets a click group of its own, so kdplug knows which plugin added which
command (for ``kdplug plugins`` and for a clear error when two of them take one name).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import click

from .errors import PluginError
from .plugins import get_plugin_manager

__all__ = ["PluginCommand", "plugin_commands"]

HOOK = "register_commands"


@dataclass(frozen=True)
class PluginCommand:
    """A ``kdplug NAME`` command and the plugin that added it."""

    name: str
    command: click.Command
    plugin: str


def plugin_commands(pm: Optional[Any] = None) -> List[PluginCommand]:
    """Every command the loaded plugins add, in pluggy's call order; a plugin that fails in the
    hook, or returns something, is a PluginError naming it."""
    pm = pm or get_plugin_manager()
    found: List[PluginCommand] = []
    for impl in reversed(getattr(pm.hook, HOOK).get_hookimpls()):  # pluggy calls the last first
        if impl.hookwrapper or impl.wrapper:
            raise PluginError(f"plugin {impl.plugin_name!r} implements {HOOK} as a wrapper; "
                              "drop wrapper=/hookwrapper=")
        group = click.Group(name="kdplug")
        try:
            returned = impl.function(**{arg: group for arg in impl.argnames})
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r} failed in {HOOK}: "
                              f"{type(exc).__name__}: {exc}") from exc
        if returned is not None:
            raise PluginError(f"plugin {impl.plugin_name!r}: {HOOK} returned {returned!r}; add "
                              "commands to the cli group it gets (@cli.command()) and return None")
        found += [PluginCommand(name, command, impl.plugin_name)
                  for name, command in group.commands.items()]
    return found
