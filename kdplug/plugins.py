"""The plugin manager: finds plugins through entry points, loads them once, remembers what failed.

Built-in plugins (kdplug_cifar, kdplug_transformer, kdplug.losses, ...) and third-party ones are
found the same way: entry points of the group ``kdplug``. Two environment variables choose among
them, by plugin (entry-point) name:

  KDPLUG_DISABLE_PLUGINS=a,b   load every plugin except a and b (built-ins included)
  KDPLUG_LOAD_PLUGINS=a,b      of the third-party plugins, load only a and b (set but empty: none)

Built-ins (the entry points of the kdplug distribution itself) load unless disabled by name, as
pytest's own plugins do unless `-p no:NAME`: narrowing the third-party set never loses kdplug's
losses or models.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pluggy

from . import hookspecs
from .errors import KdplugError, PluginError, PluginLoadWarning, UnknownHookError, closest
from .registry import Registry, build_registry

ENTRY_POINT_GROUP = "kdplug"
BUILTIN_DISTRIBUTION = "kdplug"  # its entry points are the built-in plugins
DISABLE_ENV = "KDPLUG_DISABLE_PLUGINS"
LOAD_ENV = "KDPLUG_LOAD_PLUGINS"


@dataclass(frozen=True)
class Distribution:
    """The installed package a plugin came from."""

    name: str
    version: str


@dataclass(frozen=True)
class FailedPlugin:
    """A plugin whose entry point could not be loaded."""

    name: str
    distribution: str
    version: str
    entry_point: str  # "module:attr" as the distribution declares it
    error: str  # "ModuleNotFoundError: No module named 'x'"


@dataclass(frozen=True)
class SkippedPlugin:
    """An installed plugin left out on purpose (block or allow list)."""

    name: str
    distribution: str
    version: str
    reason: str


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus where each plugin came from, what failed, and the registry."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.failed: List[FailedPlugin] = []
        self.skipped: List[SkippedPlugin] = []
        self._distributions: Dict[str, Distribution] = {}
        self._registry: Optional[Registry] = None

    # Any change of plugins drops the registry; the next read rebuilds it.
    def register(self, plugin: Any, name: Optional[str] = None) -> Optional[str]:
        registered = super().register(plugin, name)
        self._registry = None
        return registered

    def unregister(self, plugin: Any = None, name: Optional[str] = None) -> Any:
        name = name if name is not None else self.get_name(plugin)
        removed = super().unregister(plugin, name)
        self._distributions.pop(name, None)
        self._registry = None
        return removed

    @property
    def registry(self) -> Registry:
        """What every plugin registered; built on first use after any change."""
        registry = self._registry
        if registry is None:
            registry = self._registry = build_registry(self)
        return registry

    def distribution_of(self, plugin_name: str) -> Optional[Distribution]:
        """The distribution that installed ``plugin_name``; None for in-process plugins."""
        return self._distributions.get(plugin_name)

    def hook_names(self) -> List[str]:
        """Every hook kdplug defines (the contract in hookspecs.py)."""
        return sorted(name for name, caller in vars(self.hook).items()
                      if not name.startswith("_") and caller.has_spec())

    def register_checked(self, plugin: Any, name: Optional[str] = None,
                         distribution: Optional[Distribution] = None) -> str:
        """Register ``plugin`` and check its hooks now, so a bad plugin fails with its name."""
        name = name or self.get_canonical_name(plugin)
        where = f"plugin {name!r}" + (
            f" ({distribution.name} {distribution.version})" if distribution else "")
        if self.is_blocked(name):
            raise PluginError(f"{where} is blocked by {DISABLE_ENV}")
        try:
            self.register(plugin, name)
        except pluggy.PluginValidationError as exc:  # a hook with arguments the spec lacks
            raise PluginError(f"{where} does not match kdplug's hookspecs: {exc}") from exc
        except ValueError as exc:  # pluggy: name taken, or the object is already registered
            raise PluginError(f"{where} cannot be registered: {exc}") from exc
        unknown = self._unknown_hooks(plugin)
        if unknown:
            self.unregister(name=name)
            raise UnknownHookError(self._unknown_hook_message(where, name, unknown))
        if distribution is not None:
            self._distributions[name] = distribution
        return name

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load every plugin the block/allow lists let through; a failed import is recorded."""
        disabled = _names_from_env(DISABLE_ENV) or set()
        allowed = _names_from_env(LOAD_ENV)  # None: no allow list
        for name in disabled:
            self.set_blocked(name)
        seen: Dict[str, Distribution] = {}
        for dist, entry_point in _entry_points(group):
            name = entry_point.name
            if name in seen:
                if seen[name].name != dist.name:  # else: one distribution twice on sys.path
                    self._fail(name, dist, entry_point.value,
                               f"entry point name {name!r} is already used by {seen[name].name}")
                continue
            seen[name] = dist
            if self.is_blocked(name):
                self.skipped.append(SkippedPlugin(name, dist.name, dist.version,
                                                  f"disabled by {DISABLE_ENV}"))
            elif allowed is not None and name not in allowed and not _is_builtin(dist):
                self.skipped.append(SkippedPlugin(name, dist.name, dist.version,
                                                  f"not listed in {LOAD_ENV}"))
            else:
                try:
                    plugin = entry_point.load()
                except Exception as exc:  # any import-time error: isolate this plugin only
                    self._fail(name, dist, entry_point.value, f"{type(exc).__name__}: {exc}")
                    continue
                self.register_checked(plugin, name, dist)
        for env, names in ((DISABLE_ENV, disabled), (LOAD_ENV, allowed or set())):
            for missing in sorted(names - set(seen)):
                warnings.warn(f"{env} names {missing!r}, but no installed plugin is called that; "
                              f"installed: {', '.join(sorted(seen)) or 'none'}",
                              PluginLoadWarning, stacklevel=2)
        self.check_pending()  # pluggy's own guard against hooks without a spec

    def _fail(self, name: str, dist: Distribution, value: str, error: str) -> None:
        self.failed.append(FailedPlugin(name, dist.name, dist.version, value, error))
        warnings.warn(f"kdplug plugin {name!r} ({dist.name} {dist.version}) failed to load and "
                      f"is skipped: {error}", PluginLoadWarning, stacklevel=3)

    def _unknown_hooks(self, plugin: Any) -> List[str]:
        return sorted(
            caller.name for caller in self.get_hookcallers(plugin) or ()
            if not caller.has_spec() and any(
                impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()))

    def _unknown_hook_message(self, where: str, name: str, unknown: List[str]) -> str:
        known = self.hook_names()
        parts = []
        for hook in unknown:
            match = closest(hook, known)
            parts.append(f"{hook!r}" + (f" (did you mean {match!r}?)" if match else ""))
        return (f"{where} implements unknown hook {', '.join(parts)}. kdplug's hooks are: "
                f"{', '.join(known)}. Fix the name, or skip the plugin with {DISABLE_ENV}={name}")


def _is_builtin(dist: Distribution) -> bool:
    return dist.name.lower().replace("_", "-") == BUILTIN_DISTRIBUTION


def builtin_plugin_names() -> List[str]:
    """The entry-point names of kdplug's own plugins."""
    return sorted({ep.name for dist, ep in _entry_points(ENTRY_POINT_GROUP) if _is_builtin(dist)})


def _names_from_env(variable: str) -> Optional[Set[str]]:
    raw = os.environ.get(variable)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _entry_points(group: str) -> Iterator[Tuple[Distribution, metadata.EntryPoint]]:
    # Walk distributions rather than metadata.entry_points(): it tells us the distribution on
    # every Python we support (EntryPoint.dist is 3.10+).
    for dist in metadata.distributions():
        for entry_point in dist.entry_points:
            if entry_point.group == group:
                yield Distribution(dist.metadata["Name"], dist.version), entry_point


_lock = threading.RLock()
_manager: Optional[PluginManager] = None
_loading = False


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager; plugins are loaded on the first call, once."""
    global _manager, _loading
    with _lock:
        if _manager is None:
            if _loading:
                raise KdplugError("a plugin used kdplug's plugin manager while plugins were "
                                  "still loading; do that inside hook functions, not at import")
            _loading = True
            try:
                manager = PluginManager()
                manager.load_entry_points()
            finally:
                _loading = False
            _manager = manager  # only a fully loaded manager is kept; a failure retries
        return _manager


def reset_plugin_manager() -> None:
    """Forget the loaded plugins; the next get_plugin_manager() finds and loads them again."""
    global _manager
    with _lock:
        _manager = None
