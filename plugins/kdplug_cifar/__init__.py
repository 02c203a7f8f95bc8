"""Built-in kdplug plugin: the CIFAR-10 CNN teacher/student pair and image data providers."""
import kdplug


@kdplug.hookimpl
def register_teachers(register):
    """Registers the CIFAR-10 CNN teacher once its model lands; nothing yet."""
