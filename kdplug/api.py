"""kdplug's Python API: list and build what plugins provide, manage in-process plugins, report.

The CLI is a thin layer over these functions; everything it shows comes from here.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, List, Optional, Union

from ._version import __version__
from .commands import plugin_commands
from .errors import KdplugError, UnknownNameError
from .plugins import get_plugin_manager
from .registry import Registration


def get_registration(kind: str, name: str) -> Registration:
    """The registration of ``name`` for ``kind`` ("teacher", "student", "loss" or "dataset").
    An unknown name's error also names the installed plugins that were not loaded (disabled,
    not allowed, or failed to import): the name may be theirs."""
    pm = get_plugin_manager()
    try:
        return pm.registry.get(kind, name)
    except UnknownNameError as exc:
        why: Dict[str, List[str]] = {}  # reason -> plugins
        for skipped in pm.skipped:
            why.setdefault(skipped.reason, []).append(repr(skipped.name))
        for failed in pm.failed:
            why.setdefault(f"failed to load: {failed.error}", []).append(repr(failed.name))
        if not why:
            raise
        left_out = "; ".join(f"{', '.join(names)} ({reason})" for reason, names in why.items())
        raise UnknownNameError(f"{exc} Installed plugins that were not loaded (the name may be "
                               f"theirs): {left_out}") from None


def _entries(kind: str) -> Dict[str, Registration]:
    return get_plugin_manager().registry.entries(kind)


def list_teachers() -> Dict[str, Registration]:
    """name -> Registration of every teacher, sorted by name."""
    return _entries("teacher")


def list_students() -> Dict[str, Registration]:
    """name -> Registration of every student, sorted by name."""
    return _entries("student")


def list_losses() -> Dict[str, Registration]:
    """name -> Registration of every loss, sorted by name."""
    return _entries("loss")


def list_datasets() -> Dict[str, Registration]:
    """name -> Registration of every data provider, sorted by name."""
    return _entries("dataset")


def create_teacher(name: str, **options: Any) -> Any:
    """Build the teacher registered as ``name``: a torch.nn.Module returning logits."""
    return get_registration("teacher", name).create(**options)


def create_student(name: str, **options: Any) -> Any:
    """Build the student registered as ``name``: a torch.nn.Module returning logits."""
    return get_registration("student", name).create(**options)


def create_loss(name: str, **options: Any) -> Any:
    """Build the loss registered as ``name``: ``loss(student_out, teacher_out, batch) -> tensor``."""
    return get_registration("loss", name).create(**options)


def create_dataset(name: str, **options: Any) -> Any:
    """Build the data set registered as ``name``: a kdplug.data.DataSplits."""
    return get_registration("dataset", name).create(**options)


def register_plugin(plugin: Any, name: Optional[str] = None) -> str:
    """Register a plugin object (module, class or instance with ``@kdplug.hookimpl`` functions)
    in this process, e.g. in a test or a notebook. Returns the name it is registered under.

    Its hooks run at once: a misspelt hook, a duplicate name or a bad factory raises a
    KdplugError here and leaves nothing registered. Undo with :func:`unregister_plugin`.
    """
    if name is None:  # a readable default for modules and classes; pluggy would use id() for objects
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
    pm = get_plugin_manager()
    name = pm.register_checked(plugin, name)
    try:
        pm.registry  # run its register hooks now, so a bad registration fails at this call
    except KdplugError:
        pm.unregister(name=name)
        raise
    return name


def unregister_plugin(plugin_or_name: Union[str, Any]) -> Any:
    """Remove a plugin registered by name or object; returns the plugin object."""
    pm = get_plugin_manager()
    if isinstance(plugin_or_name, str):
        name = plugin_or_name
    else:
        name = pm.get_name(plugin_or_name)
    if name is None or pm.get_plugin(name) is None:
        known = ", ".join(sorted(n for n, p in pm.list_name_plugin() if p is not None))
        raise KdplugError(f"no plugin {plugin_or_name!r} is registered; registered: {known}")
    return pm.unregister(name=name)


def plugin_report() -> Dict[str, Any]:
    """Everything ``kdplug plugins`` shows, as JSON-ready data.

    ``{"kdplug_version", "plugins": [{"name", "distribution", "version", "module", "hooks",
    "registered": {kind: [names]}, "descriptions": {kind: {name: description or None}},
    "commands": [names]}], "failed": [...], "skipped": [...]}``
    """
    pm = get_plugin_manager()
    registry = pm.registry
    commands = plugin_commands(pm)
    plugins = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:  # a blocked name
            continue
        distribution = pm.distribution_of(name)
        plugins.append({
            "name": name,
            "distribution": distribution.name if distribution else None,
            "version": distribution.version if distribution else None,
            "module": getattr(plugin, "__name__", None) or type(plugin).__name__,
            "hooks": sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()),
            "registered": registry.names_by_plugin(name),
            "descriptions": registry.descriptions_by_plugin(name),
            "commands": sorted(c.name for c in commands if c.plugin == name),
        })
    return {
        "kdplug_version": __version__,
        "plugins": plugins,
        "failed": [asdict(failed) for failed in pm.failed],
        "skipped": [asdict(skipped) for skipped in pm.skipped],
    }


__all__ = [
    "Registration", "create_dataset", "create_loss", "create_student",
    "create_teacher", "get_plugin_manager", "get_registration", "list_datasets", "list_losses",
    "list_students", "list_teachers", "plugin_report", "register_plugin", "unregister_plugin",
]
