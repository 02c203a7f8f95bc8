"""Built-in kdplug plugin: Transformer teacher/student pairs and text data providers."""
import kdplug


@kdplug.hookimpl
def register_teachers(register):
    """Registers the Transformer teachers once their models land; nothing yet."""
