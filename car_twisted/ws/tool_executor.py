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
    """One ``tools.execute`` call: its request, its timeout and how it ends."""

    _log = Logger()

    def __init__(self, executor: WsToolExecutor, call: ToolCall) -> None:
        self.call = call
        self.executor = executor
        self.channel = executor.channel
        self.clock = executor.clock
        self.request_id = self.channel.next_id("cb")
        if call.timeout_ms is not None:
            self.wait = call.timeout_ms / 1000.0
            self.timeout_reason = f"tool '{call.tool}' exceeded its timeout_ms ({call.timeout_ms}ms)"
        else:
            self.wait = executor.default_timeout_ms / 1000.0
            self.timeout_reason = f"tool '{call.tool}' callback timed out ({self.wait:g}s)"
        self.result: Deferred[JsonValue] = Deferred(self._cancelled)
        self.pending: Deferred[JsonValue] | None = None

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
        self.pending = pending
        pending.addTimeout(self.wait, self.clock)
        pending.addCallbacks(self._answered, self._failed)
        return self.result

    # -- how it ends ---------------------------------------------------------------

    def _answered(self, value: JsonValue) -> None:
        if not self.result.called:
            self.result.callback(value)

    def _failed(self, failure: Failure) -> None:
        if self.result.called:
            return  # already settled: we gave up ourselves
        handle = self._handlers.get(failure.check(*self._handlers))
        if handle is None:
            self._log.failure("tools.execute callback failed", failure=failure)
            self.result.errback(ToolError(f"tool '{self.call.tool}' failed"))
        else:
            handle(self, failure.value)  # type: ignore[arg-type]  # a Failure always holds its exception

    def _timed_out(self, exc: BaseException) -> None:
        if self.executor.stats is not None:
            self.executor.stats.callback_timeouts += 1
        self._give_up(self.timeout_reason)
        self.result.errback(ToolError(self.timeout_reason, kind="timeout"))

    def _disconnected(self, exc: BaseException) -> None:
        self.result.errback(ToolError(f"tool '{self.call.tool}': client disconnected", kind="disconnected"))

    def _refused(self, exc: BaseException) -> None:
        assert isinstance(exc, ClientRpcError)
        self.result.errback(client_error(self.call.tool, exc))

    def _unencodable(self, exc: BaseException) -> None:
        self.result.errback(ToolError(f"tool '{self.call.tool}': {exc}", kind="unsupported"))

    def _ignore(self, exc: BaseException) -> None:
        """The request was cancelled by our own ``_cancelled``."""

    _handlers: dict[type[BaseException], Callable[[_Attempt, BaseException], None]] = {
        TimeoutError: _timed_out,
        ChannelClosed: _disconnected,
        ClientRpcError: _refused,
        CallbackUnencodable: _unencodable,
        CancelledError: _ignore,
    }

    def _cancelled(self, result: Deferred[JsonValue]) -> None:
        """Cancelled from outside (the handler deadline): forget the request and tell the client."""
        if self.pending is not None and not self.pending.called:
            self.pending.cancel()
        self._give_up(f"tool '{self.call.tool}' call cancelled by the daemon")

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
