"""Serving: the exported student (no teacher or encoder inside) and :class:`Ranker`."""

from appdistill.export.artifact import Ranker, export_run

__all__ = ["Ranker", "export_run"]
