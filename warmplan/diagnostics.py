"""Diagnostics: how every user input's problems are worded.

Each problem is ``file:line:column: path: message``; a ``Report`` collects them for
one file, finding each position by walking the YAML node tree along the path.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
