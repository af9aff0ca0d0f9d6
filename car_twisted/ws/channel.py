"""
``WsChannel``: the write half of one connection plus its pending
server-to-client requests.

Requests the daemon sends to the client (``tools.execute``, ``agent.chat``,
...) get a string id, a Deferred and a timeout on the injected clock; the
client's response (routed here by the dispatcher) fires the Deferred, an
error response fails it with ``ClientRpcError``, and a disconnect fails
every pending call with ``ChannelClosed``.  Nothing is left behind: each
entry leaves the table exactly once, with its timer cancelled.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from car_twisted.errors import CallbackTimeout, CallbackUnencodable, ChannelClosed, ClientRpcError
from car_twisted.interfaces import IWsSink
from car_twisted.json_value import JsonValue
from car_twisted.rpc.envelope import encode_notification, encode_request

__all__ = ["WsChannel", "DEFAULT_MAX_PENDING"]

DEFAULT_MAX_PENDING = 1024


@attrs.define
class _Pending:
    method: str
    deferred: Deferred[JsonValue]
    timer: IDelayedCall | None


class WsChannel:
    _log = Logger()

    def __init__(
        self, sink: IWsSink, clock: IReactorTime, max_pending: int = DEFAULT_MAX_PENDING
    ) -> None:
        self.sink = sink
        self.clock = clock
        self.max_pending = max_pending
        self._pending: dict[str, _Pending] = {}
        self._counter = 0
        self._closed = False
        # Output back-pressure: True while the transport's buffer is full;
        # the resume hooks run when it drains (run-trace subscribers flush).
        self.paused = False
        self._resume_hooks: list[Callable[[], object]] = []

    def pause(self) -> None:
        """The client stopped reading: our output is backing up."""
        self.paused = True

    def resume(self) -> None:
        """Our output drained: run every resume hook."""
        self.paused = False
        for hook in list(self._resume_hooks):
            try:
                hook()
            except Exception:
                self._log.failure("resume hook failed")

    def on_resume(self, hook: Callable[[], object]) -> None:
        """Call C{hook} each time our output drains after a pause."""
        self._resume_hooks.append(hook)

    @property
    def closed(self) -> bool:
        return self._closed or not self.sink.writable

    def send(self, frame: bytes) -> bool:
        """Write one encoded JSON frame; False when the client is gone."""
        if self._closed:
            return False
        return self.sink.send_text(frame)

    def notify(self, method: str, params: object) -> bool:
        """Send a notification (no reply expected); False if not sent."""
        try:
            frame = encode_notification(method, params)
        except (TypeError, ValueError) as e:
            self._log.warn("{method} notification not sent: {error}", method=method, error=str(e))
            return False
        return self.send(frame)

    def next_id(self, prefix: str = "srv") -> str:
        self._counter += 1
        return f"{prefix}-{self._counter}"

    def pending_count(self) -> int:
        return len(self._pending)

    def request(
        self,
        method: str,
        params: object,
        timeout: float | None,
        request_id: str | None = None,
    ) -> Deferred[JsonValue]:
        """
        Send a request to the client and wait for its response.

        @param timeout: seconds, or None to wait until disconnect.
        @return: a Deferred firing with the C{result}, or failing with
            L{ClientRpcError}, L{CallbackTimeout}, L{ChannelClosed} or
            L{CallbackUnencodable} (nothing was sent or registered).
            Cancelling it forgets the call (a late reply is ignored).
        """
        rid = request_id if request_id is not None else self.next_id()
        try:
            # Encode before anything is registered, so a value that cannot
            # be sent leaves no pending entry and no timer behind.
            frame = encode_request(rid, method, params)
        except (TypeError, ValueError) as e:
            return fail(CallbackUnencodable(method, str(e)))

        def forget(d: Deferred[JsonValue]) -> None:
            self._pop(rid)

        d: Deferred[JsonValue] = Deferred(forget)
        if self.closed:
            d.errback(ChannelClosed(f"connection closed before {method}"))
            return d
        if len(self._pending) >= self.max_pending or rid in self._pending:
            d.errback(
                ChannelClosed(
                    f"too many pending {method} callbacks on this connection"
                    if rid not in self._pending
                    else f"duplicate callback id {rid}"
                )
            )
            return d
        timer = None
        if timeout is not None:
            timer = self.clock.callLater(timeout, self._expire, rid, timeout)
        self._pending[rid] = _Pending(method, d, timer)
        if not self.send(frame):
            self._fail(rid, ChannelClosed(f"connection closed before {method}"))
        return d

    def deliver(self, response_id: JsonValue, result: JsonValue = None, error: JsonValue = None) -> bool:
        """
        Route the client's response to its pending request.

        @return: False for an unknown (late, duplicate, never-sent) id.
        """
        if type(response_id) is not str:
            return False
        entry = self._pop(response_id)
        if entry is None:
            return False
        if error is not None:
            if type(error) is dict:
                failure = ClientRpcError(
                    error.get("code"), str(error.get("message", "")), error.get("data")
                )
            else:
                failure = ClientRpcError(None, "malformed error response")
            entry.deferred.errback(failure)
        else:
            entry.deferred.callback(result)
        return True

    def close(self) -> None:
        """Fail every pending request: the connection is gone."""
        self._closed = True
        for rid in list(self._pending):
            self._fail(rid, ChannelClosed("connection closed"))

    def _pop(self, rid: str) -> _Pending | None:
        entry = self._pending.pop(rid, None)
        if entry is not None and entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        return entry

    def _fail(self, rid: str, exc: Exception) -> None:
        entry = self._pop(rid)
        if entry is not None:
            entry.deferred.errback(exc)

    def _expire(self, rid: str, timeout: float) -> None:
        entry = self._pending.pop(rid, None)
        if entry is not None:
            entry.deferred.errback(CallbackTimeout(entry.method, timeout))
