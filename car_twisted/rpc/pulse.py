"""
Liveness for requests that take a while.

``car-runtime`` gives up on a request after 30 s with nothing said about
it (180 s for ``infer``), but keeps waiting as long as an ``infer.progress
{id}`` notification names that request, whatever the method.  A call held
on the approval gate, a proposal running its actions, or a slow tool
callback can all outlast 30 s, so every pending request hears one pulse
per ``PULSE_SECS``.  One timer serves the whole daemon: started by the
first pending request, it stops at the first beat that finds nothing
pending (not when the last request is answered: a busy daemon would
otherwise schedule and cancel a timer for every request).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from car_twisted.json_value import JsonValue
    from car_twisted.ws.channel import WsChannel

__all__ = ["PULSE_METHOD", "PULSE_SECS", "ProgressPulse"]

#: The method the client reads as "still working on request id".
PULSE_METHOD = "infer.progress"
#: Well inside the client's 30 s silence limit (measured: a pulse every 9 s
#: kept a 45 s call alive).
PULSE_SECS = 9.0


class ProgressPulse:
    """Sends ``infer.progress {id}`` for each pending request, every ``interval`` seconds."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, interval: float = PULSE_SECS) -> None:
        self.clock = clock
        self.interval = interval
        self._pending: dict[int, tuple[WsChannel, JsonValue]] = {}
        self._next = 0
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, channel: WsChannel, request_id: JsonValue) -> int:
        """Start pulsing for C{request_id}; returns the key L{discard} takes."""
        self._next += 1
        key = self._next
        self._pending[key] = (channel, request_id)
        if self._timer is None:
            self._timer = self.clock.callLater(self.interval, self._beat)
        return key

    def discard(self, key: int) -> None:
        """The request was answered (or its connection went): stop pulsing."""
        self._pending.pop(key, None)

    def stop(self) -> None:
        """Cancel the timer (the daemon is going away)."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _beat(self) -> None:
        self._timer = None
        for key, (channel, request_id) in list(self._pending.items()):
            if channel.closed:
                del self._pending[key]
                continue
            # A paused channel is not fed more: the pulse waits for the next
            # beat rather than piling onto a reader that is not reading.
            if not channel.paused:
                channel.notify(PULSE_METHOD, {"id": request_id})
        if self._pending:
            self._timer = self.clock.callLater(self.interval, self._beat)
