"""kdplug: knowledge distillation for PyTorch, extended by plugins."""
from ._lazy import lazy_exports
from ._version import __version__
from .api import (
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
from .errors import KdplugError
from .hookspecs import hookimpl
from .registry import Registration

# These need torch; they load on first use so that `import kdplug` (and `kdplug plugins`) stay
# light. `from kdplug import distill` works as usual.
_LAZY_EXPORTS = {"distill": ".engine", "DistillConfig": ".engine", "DistillResult": ".engine",
                 "PhaseResult": ".engine", "ModelOutput": ".outputs", "DataSplits": ".data",
                 "cache_teacher": ".cache", "CacheResult": ".cache", "TeacherCache": ".cache"}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY_EXPORTS, globals())  # PEP 562
