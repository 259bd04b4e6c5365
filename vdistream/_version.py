"""The package version: a leaf module, so that modules deep in the tree can name it
without importing the package root (which imports them)."""

__version__ = "0.1.0"
__all__ = ("__version__",)
