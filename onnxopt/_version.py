"""onnxopt's version, in a module of its own at the bottom of the import graph: inner modules read
it from here, never from the package ``__init__`` (which imports every API module)."""

__version__ = "0.1.0"
