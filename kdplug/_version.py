"""kdplug's version, in a module of its own so that any module can read it without importing the
package façade (kdplug/__init__.py), which loads the engine lazily."""
__version__ = "0.1.0"
