"""Small helpers several engines share: timestamps and work off the reactor."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

__all__ = ["iso_utc", "off_reactor"]

R = TypeVar("R")


def iso_utc(seconds: float) -> str:
    """RFC 3339 UTC with a ``Z``, from a reactor clock reading."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def off_reactor(reactor: object, fn: Callable[..., R], *args: object) -> Deferred[R]:
    """
    Run blocking C{fn} in the reactor's thread pool.  A reactor without
    threads (a test ``Clock``) runs it inline, which keeps tests
    deterministic.
    """
    if IReactorThreads.providedBy(reactor):
        return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)
    return maybeDeferred(fn, *args)
