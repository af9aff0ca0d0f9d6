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


class _Second:
    """The last whole second formatted (every action result carries a timestamp)."""

    whole = -1
    text = ""


def iso_utc(seconds: float) -> str:
    """
    RFC 3339 UTC with a ``Z``, from a reactor clock reading: the same text
    as ``datetime.isoformat`` (microseconds only when not zero), with the
    formatted second reused while the clock stays in it.
    """
    if seconds < 0:
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    whole = int(seconds)
    micro = round((seconds - whole) * 1_000_000)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    if _Second.whole != whole:
        _Second.text = datetime.datetime.fromtimestamp(whole, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _Second.whole = whole
    return f"{_Second.text}.{micro:06d}Z" if micro else f"{_Second.text}Z"


def off_reactor(reactor: object, fn: Callable[..., R], *args: object) -> Deferred[R]:
    """
    Run blocking C{fn} in the reactor's thread pool.  A reactor without
    threads (a test ``Clock``) runs it inline, which keeps tests
    deterministic.
    """
    if IReactorThreads.providedBy(reactor):
        return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)
    return maybeDeferred(fn, *args)
