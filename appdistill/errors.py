"""Errors a user can act on.

Every problem with user input (a spec, a config, a table, a scoring file) raises
:class:`AppDistillError`; the CLI prints its message and exits with code 2. The message always
names where the problem is (file, feature, column, row) and what was expected.
"""

from __future__ import annotations


class AppDistillError(Exception):
    """A user-facing error: bad input, bad config, refused operation. CLI exit code 2."""

    exit_code = 2


class SpecError(AppDistillError):
    """The feature spec (or a table it names) is invalid."""


class ConfigError(AppDistillError):
    """The experiment config is invalid (unknown key, unknown registry key, bad override)."""


def where(file: str | None = None, feature: str | None = None, column: str | None = None,
          row: int | None = None) -> str:
    """Format a location prefix such as ``file 'x.csv', feature 'age', column 'age'``."""
    parts = []
    if file is not None:
        parts.append(f"file '{file}'")
    if feature is not None:
        parts.append(f"feature '{feature}'")
    if column is not None:
        parts.append(f"column '{column}'")
    if row is not None:
        parts.append(f"row {row}")
    return ", ".join(parts)
