"""Progress bars that know where they print (ground floor: every layer may use it).

A bar draws only when its caller asks for one *and* stderr is a terminal *and* no one switched bars
off for the process (``appdistill ... --no-progress``, or ``APPDISTILL_PROGRESS=0``). Redirected to a
file, a run therefore writes its one-line-per-epoch summaries and no carriage-return animation.

Example:
    >>> for batch in bar(loader, desc="epoch 1/4", enabled=progress):
    ...     step(batch)
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

_ENABLED = [os.environ.get("APPDISTILL_PROGRESS", "1") not in ("0", "false", "no")]


def set_enabled(on: bool) -> None:
    """Switch every bar of this process on (still only on a terminal) or off."""
    _ENABLED[0] = bool(on)


def draws(requested: bool = True) -> bool:
    """Whether a bar the caller ``requested`` draws here."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        tty = False
    return bool(requested and _ENABLED[0] and tty)


def bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar over ``iterable`` (or a manual one with ``total=``), drawn only where it helps."""
    return tqdm(iterable, disable=not draws(enabled), **kwargs)


def write(line: str) -> None:
    """One line that does not tear a live bar (``tqdm.write``)."""
    tqdm.write(line)
