"""
``WsToolExecutor``: a tool call runs on the client, through ``tools.execute``.

Each call is one ``_Attempt``: a ``tools.execute`` request on the session's
channel, with one timeout (``Deferred.addTimeout`` on the reactor clock):
the action's ``timeout_ms`` when it has one, else the daemon's tool
timeout (``DEFAULT_TOOL_TIMEOUT_MS``, ``CAR_TOOL_TIMEOUT``).  Whenever the
daemon gives up while the client is still there (that timeout, or a
cancellation from outside, such as the handler deadline) it sends the
``tools.cancel`` notification so the client can kill the orphaned tool; a
late reply finds nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from car_twisted.config import DEFAULT_TOOL_TIMEOUT_MS
from car_twisted.errors import CallbackUnencodable, ChannelClosed, ClientRpcError
from car_twisted.interfaces import IToolExecutor
from car_twisted.json_value import JsonValue
from car_twisted.proposal.ir import ToolCall, ToolError
from car_twisted.ws.channel import WsChannel

if TYPE_CHECKING:
    from car_twisted.session import ClientSession
    from car_twisted.stats import DaemonStats

__all__ = ["WsToolExecutor", "session_tool_executor"]


@implementer(IToolExecutor)
class WsToolExecutor:
    """Runs each tool call as a ``tools.execute`` callback to one client."""

    supports_detached = False

    def __init__(
        self,
        channel: WsChannel,
        clock: IReactorTime,
        default_timeout_ms: int = DEFAULT_TOOL_TIMEOUT_MS,
        stats: DaemonStats | None = None,
    ) -> None:
        self.channel = channel
        self.clock = clock
        self.default_timeout_ms = default_timeout_ms
        self.stats = stats

    def execute(self, call: ToolCall) -> Deferred[JsonValue]:
        return _Attempt(self, call).run()


class _Attempt:
    """
    One ``tools.execute`` call: its request, its timeout and how it ends.
    The request's own Deferred is the call's: a reply is its result, and
    every failure becomes a ``ToolError`` (or stays a cancellation).
    """

    _log = Logger()
    __slots__ = ("call", "executor", "channel", "request_id", "wait")

    def __init__(self, executor: WsToolExecutor, call: ToolCall) -> None:
        self.call = call
        self.executor = executor
        self.channel = executor.channel
        self.request_id = self.channel.next_id("cb")
        timeout_ms = call.timeout_ms if call.timeout_ms is not None else executor.default_timeout_ms
        self.wait = timeout_ms / 1000.0

    def run(self) -> Deferred[JsonValue]:
        call = self.call
        params: dict[str, JsonValue] = {
            "action_id": call.action_id,
            "tool": call.tool,
            "parameters": call.parameters,
            "attempt": call.attempt,
            "request_id": self.request_id,
        }
        if call.timeout_ms is not None:
            params["timeout_ms"] = call.timeout_ms
        if call.session_id is not None:
            params["session_id"] = call.session_id
        pending = self.channel.request("tools.execute", params, timeout=None, request_id=self.request_id)
        pending.addTimeout(self.wait, self.executor.clock)
        return pending.addErrback(self._failed)

    # -- how it ends ---------------------------------------------------------------

    def _failed(self, failure: Failure) -> Failure:
        handle = self._handlers.get(failure.check(*self._handlers))
        if handle is None:
            self._log.failure("tools.execute callback failed", failure=failure)
            return Failure(ToolError(f"tool '{self.call.tool}' failed"))
        return handle(self, failure)

    def _timed_out(self, failure: Failure) -> Failure:
        call = self.call
        if self.executor.stats is not None:
            self.executor.stats.callback_timeouts += 1
        if call.timeout_ms is not None:
            reason = f"tool '{call.tool}' exceeded its timeout_ms ({call.timeout_ms}ms)"
        else:
            reason = f"tool '{call.tool}' callback timed out ({self.wait:g}s)"
        self._give_up(reason)
        return Failure(ToolError(reason, kind="timeout"))

    def _disconnected(self, failure: Failure) -> Failure:
        return Failure(ToolError(f"tool '{self.call.tool}': client disconnected", kind="disconnected"))

    def _refused(self, failure: Failure) -> Failure:
        exc = failure.value
        assert isinstance(exc, ClientRpcError)
        return Failure(client_error(self.call.tool, exc))

    def _unencodable(self, failure: Failure) -> Failure:
        return Failure(ToolError(f"tool '{self.call.tool}': {failure.value}", kind="unsupported"))

    def _cancelled(self, failure: Failure) -> Failure:
        """Cancelled from outside (the handler deadline): the request is forgotten; tell the client."""
        self._give_up(f"tool '{self.call.tool}' call cancelled by the daemon")
        return failure

    _handlers: dict[type[BaseException], Callable[[_Attempt, Failure], Failure]] = {
        TimeoutError: _timed_out,
        ChannelClosed: _disconnected,
        ClientRpcError: _refused,
        CallbackUnencodable: _unencodable,
        CancelledError: _cancelled,
    }

    def _give_up(self, reason: str) -> None:
        # Forgotten first (a late reply finds nothing), then the client is
        # told to kill the orphaned tool.
        self.channel.notify(
            "tools.cancel",
            {"request_id": self.request_id, "action_id": self.call.action_id, "reason": reason},
        )


def client_error(tool: str, exc: ClientRpcError) -> ToolError:
    """
    The client's error as a tool failure.  Only ``data.terminal: true``
    (``car_runtime.TerminalToolError``) is terminal: the client documents
    halting for that alone, so a missing handler (``-32601``) or an
    "unknown tool" message fails the action under its own
    ``failure_behavior`` like any other error.
    """
    message = exc.message or "tool failed"
    data = exc.data if isinstance(exc.data, dict) else {}
    terminal = data.get("terminal") is True
    if exc.code == -32601:
        return ToolError(
            f"tool '{tool}': the client serves no tools.execute handler ({message})",
            kind="unknown_tool",
            terminal=terminal,
        )
    if "unknown tool" in message.lower():
        return ToolError(f"unknown tool '{tool}': {message}", kind="unknown_tool", terminal=terminal)
    return ToolError(message, terminal=terminal)


def session_tool_executor(session: ClientSession) -> WsToolExecutor:
    """The daemon's default adapter: ClientSession -> IToolExecutor."""
    state = session.state
    return WsToolExecutor(session.channel, state.clock, state.config.tool_timeout_ms, state.stats)
