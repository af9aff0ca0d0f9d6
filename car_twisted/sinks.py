"""
Components that talk back to one client: ``WsToolExecutor``.

``WsToolExecutor`` runs a tool call by sending ``tools.execute`` to the
client and waiting for its answer.  It gives up at the action's
``timeout_ms`` (or, with no budget, at ``DEFAULT_TOOL_TIMEOUT_MS`` /
``CAR_TOOL_TIMEOUT``), when its Deferred is cancelled (the handler
deadline), and when the client goes; on every give-up while the client is
still there it sends the ``tools.cancel`` notification so the client can
kill the orphaned tool.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from car_twisted.config import DEFAULT_TOOL_TIMEOUT_MS
from car_twisted.errors import CallbackTimeout, CallbackUnencodable, ChannelClosed, ClientRpcError
from car_twisted.interfaces import IToolExecutor
from car_twisted.proposal.ir import ToolCall, ToolError
from car_twisted.ws.channel import WsChannel

__all__ = [
    "WsToolExecutor",
    "DEFAULT_TOOL_TIMEOUT_MS",
    "TOOL_CALLBACK_GRACE_SECS",
    "session_tool_executor",
]

# The channel's own wait outlives the action budget by this much, so the
# action deadline (with its precise reason) always fires first.
TOOL_CALLBACK_GRACE_SECS = 5.0


@implementer(IToolExecutor)
class WsToolExecutor:
    _log = Logger()
    supports_detached = False

    def __init__(
        self,
        channel: WsChannel,
        clock: IReactorTime,
        default_timeout_ms: int = DEFAULT_TOOL_TIMEOUT_MS,
    ) -> None:
        self.channel = channel
        self.clock = clock
        self.default_timeout_ms = default_timeout_ms

    def execute(self, call: ToolCall) -> Deferred:
        rid = self.channel.next_id("cb")
        params: dict[str, Any] = {
            "action_id": call.action_id,
            "tool": call.tool,
            "parameters": call.parameters,
            "attempt": call.attempt,
            "request_id": rid,
        }
        if call.timeout_ms is not None:
            params["timeout_ms"] = call.timeout_ms
            budget_secs = call.timeout_ms / 1000.0
            wait = budget_secs + TOOL_CALLBACK_GRACE_SECS
        else:
            budget_secs = None
            wait = self.default_timeout_ms / 1000.0
        if call.session_id is not None:
            params["session_id"] = call.session_id

        pending = self.channel.request("tools.execute", params, timeout=wait, request_id=rid)
        over: list[str] = []  # set when the action's own budget ran out

        def give_up(reason: str) -> None:
            # Forget the callback first so a late reply finds nothing, then
            # tell the client to kill the orphaned tool.
            if not pending.called:
                pending.cancel()
            self.channel.notify(
                "tools.cancel", {"request_id": rid, "action_id": call.action_id, "reason": reason}
            )

        def cancelled(d: Deferred) -> None:
            give_up(over[0] if over else f"tool '{call.tool}' call cancelled by the daemon")

        result: Deferred = Deferred(cancelled)
        budget_timer = None
        if budget_secs is not None:

            def over_budget() -> None:
                over.append(f"tool '{call.tool}' exceeded its timeout_ms ({call.timeout_ms}ms)")
                result.cancel()

            budget_timer = self.clock.callLater(budget_secs, over_budget)

        def stop_budget() -> None:
            if budget_timer is not None and budget_timer.active():
                budget_timer.cancel()

        def settle(value: Any) -> None:
            stop_budget()
            if not result.called:
                result.callback(value)

        def failed(failure: Any) -> None:
            stop_budget()
            exc = failure.value
            if result.called or isinstance(exc, CancelledError):
                return None  # we gave up ourselves; ``result`` says why
            if isinstance(exc, CallbackTimeout):
                reason = f"tool '{call.tool}' callback timed out ({exc.seconds:g}s)"
                give_up(reason)
                result.errback(ToolError(reason, kind="timeout"))
            elif isinstance(exc, ChannelClosed):
                result.errback(ToolError(f"tool '{call.tool}': client disconnected", kind="disconnected"))
            elif isinstance(exc, ClientRpcError):
                result.errback(_client_error(call.tool, exc))
            elif isinstance(exc, CallbackUnencodable):
                result.errback(ToolError(f"tool '{call.tool}': {exc}", kind="unsupported"))
            else:
                self._log.failure("tools.execute callback failed", failure=failure)
                result.errback(ToolError(f"tool '{call.tool}' failed"))
            return None

        pending.addCallbacks(settle, failed)

        def budget_as_timeout(failure: Any) -> Any:
            # Only our own budget turns a cancellation into a tool timeout;
            # a cancellation from outside (the handler deadline) stays one.
            if over and failure.check(CancelledError):
                raise ToolError(over[0], kind="timeout")
            return failure

        return result.addErrback(budget_as_timeout)


def _client_error(tool: str, exc: ClientRpcError) -> ToolError:
    """
    The client's error as a tool failure.  Only ``data.terminal: true``
    (``car_runtime.TerminalToolError``) is terminal: the client documents
    halting for that alone, so a missing handler (``-32601``) or an
    "unknown tool" message fails the action under its own
    ``failure_behavior`` like any other error.
    """
    message = exc.message or "tool failed"
    data = exc.data if type(exc.data) is dict else {}
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


def session_tool_executor(session: Any) -> WsToolExecutor:
    """The daemon's default adapter: ClientSession -> IToolExecutor."""
    state = session.state
    return WsToolExecutor(session.channel, state.clock, state.config.tool_timeout_ms)
