"""Serving: the exported student (no teacher or encoder inside) and :class:`Ranker`."""

from appdistill.export.artifact import export_run
from appdistill.export.ranker import Ranker

__all__ = ["Ranker", "export_run"]
