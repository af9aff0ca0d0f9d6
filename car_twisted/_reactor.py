"""The one place that looks up the global reactor, lazily."""

from __future__ import annotations

from typing import Any

__all__ = ["maybe_global_reactor"]


def maybe_global_reactor(reactor: Any = None) -> Any:
    """Return C{reactor}, or the installed global reactor if None."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor
