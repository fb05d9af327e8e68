"""Built-in table sources (``source: {key: ml100k}`` in a feature spec).

A source is a callable returning ``{table_name: DataFrame}``; register new ones with
``SOURCES.register(name, fn)``.
"""

from appdistill.registry import Registry

SOURCES: Registry = Registry("data source")

from appdistill.data import movielens as _movielens  # noqa: E402,F401  (registers ml100k)
from appdistill.data import synthetic as _synthetic  # noqa: E402,F401  (registers synthetic)
from appdistill.data import tabular as _tabular  # noqa: E402,F401  (registers synthetic_tabular)
