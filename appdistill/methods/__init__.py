"""Distillation methods, one file each, registered by name in :data:`METHODS`."""

from appdistill.methods.base import METHODS, Method
from appdistill.methods import none as _none  # noqa: F401

__all__ = ["METHODS", "Method"]
