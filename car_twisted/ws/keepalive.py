"""
``KeepAlive``: WebSocket keep-alive pings for every connection of a
factory, from one timer.

Autobahn's own auto-ping keeps a timer, a Deferred and a batched-timer
entry per connection, each living a full interval: with ten thousand
connections that is tens of thousands of long-lived objects that make
every full garbage collection longer, and the connections opened in the
same second all ping in the same reactor turn.  Here one ``LoopingCall``
ticks ten times per interval; a connection silent for an interval is
pinged (at most a tenth of the connections per tick, the rest on the
next; never fewer than 100 a tick), and one that then says nothing for ``timeout`` is dropped.  Any
traffic from the peer counts as an answer.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["KeepAlive", "MIN_PINGS_PER_TICK", "Pingable", "TICKS_PER_INTERVAL"]

TICKS_PER_INTERVAL = 10
MIN_PINGS_PER_TICK = 100


class Pingable(Protocol):
    """What the keep-alive needs of a connection."""

    #: clock reading of the last bytes received from the peer
    heard_at: float
    #: clock reading of the unanswered ping, or None
    pinged_at: float | None

    def send_keepalive_ping(self) -> None: ...

    def keepalive_timed_out(self) -> None: ...


class KeepAlive:
    _log = Logger()

    def __init__(self, clock: IReactorTime, interval: float, timeout: float) -> None:
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.connections: dict[Pingable, None] = {}
        self._loop: LoopingCall | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def add(self, conn: Pingable) -> None:
        if not self.enabled:
            return
        conn.heard_at = self.clock.seconds()
        conn.pinged_at = None
        self.connections[conn] = None
        if self._loop is None:
            loop = self._loop = LoopingCall(self.tick)
            loop.clock = self.clock
            loop.start(self.interval / TICKS_PER_INTERVAL, now=False).addErrback(
                lambda f: self._log.failure("keep-alive sweep failed", failure=f)
            )

    def discard(self, conn: Pingable) -> None:
        self.connections.pop(conn, None)
        if not self.connections:
            self.stop()

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def tick(self) -> None:
        now = self.clock.seconds()
        # At most a tenth of the connections (or MIN_PINGS_PER_TICK) are
        # pinged per tick: those that fell silent together are spread over
        # the interval.
        budget = max(MIN_PINGS_PER_TICK, len(self.connections) // TICKS_PER_INTERVAL)
        silent_since = now - self.interval
        late_since = now - self.timeout
        expired: list[Pingable] = []
        for conn in list(self.connections):
            pinged = conn.pinged_at
            if pinged is not None:
                if conn.heard_at >= pinged:
                    conn.pinged_at = None  # answered (a pong, or anything else)
                elif pinged <= late_since:
                    expired.append(conn)
                continue
            if conn.heard_at <= silent_since and budget > 0:
                budget -= 1
                conn.pinged_at = now
                conn.send_keepalive_ping()
        for conn in expired:
            self.connections.pop(conn, None)
            conn.keepalive_timed_out()
        if not self.connections:
            self.stop()
