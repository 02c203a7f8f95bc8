"""kdplug: knowledge distillation for PyTorch, extended by plugins."""
__version__ = "0.1.0"

from .api import (  # noqa: E402  (the API reads __version__)
    create_dataset,
    create_loss,
    create_student,
    create_teacher,
    get_plugin_manager,
    get_registration,
    list_datasets,
    list_losses,
    list_students,
    list_teachers,
    plugin_report,
    register_plugin,
    unregister_plugin,
)
from .errors import KdplugError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .registry import Registration  # noqa: E402

# These need torch; they load on first use so that `import kdplug` (and `kdplug plugins`) stay
# light. `from kdplug import distill` works as usual.
_LAZY_EXPORTS = {"distill": "engine", "DistillConfig": "engine", "DistillResult": "engine",
                 "PhaseResult": "engine", "ModelOutput": "outputs", "DataSplits": "data",
                 "cache_teacher": "cache", "CacheResult": "cache", "TeacherCache": "cache"}


def __getattr__(name):  # PEP 562
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'kdplug' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_EXPORTS))
