"""Distillation methods, one file each, registered by name in :data:`METHODS`."""

from appdistill.methods.base import METHODS, Method
from appdistill.methods import avg_kd as _avg_kd  # noqa: F401
from appdistill.methods import diverse_distill as _diverse_distill  # noqa: F401
from appdistill.methods import kd as _kd  # noqa: F401
from appdistill.methods import none as _none  # noqa: F401
from appdistill.methods import taid as _taid  # noqa: F401
from appdistill.methods import talking as _talking  # noqa: F401

__all__ = ["METHODS", "Method"]
