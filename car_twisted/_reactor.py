"""The one place that looks up the global reactor, lazily."""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import IReactorTime

__all__ = ["maybe_global_reactor"]


def maybe_global_reactor(reactor: IReactorTime | None = None) -> IReactorTime:
    """Return C{reactor}, or the installed global reactor if None."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        # A module to the type checker; the reactor it installs at run time.
        return cast(IReactorTime, global_reactor)
    return reactor
