"""msrnn's version, in a module of its own so that code below the package root can read it without importing
the root (which imports the model registry)."""

__version__ = "0.1.0"
