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
