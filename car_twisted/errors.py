"""
JSON-RPC error codes and the exceptions that carry them.

Handlers raise these; ``rpc.dispatch`` is the one place that turns an
exception into an error response (``error_for``).  Anything else a handler
raises is an internal error: logged with its traceback, answered ``-32603``
without one.
"""

from __future__ import annotations

import reprlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from car_twisted.json_value import JsonValue

__all__ = [
    "short_repr",
    "PARSE_ERROR",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "INVALID_PARAMS",
    "INTERNAL_ERROR",
    "AUTH_REQUIRED",
    "APPROVAL_DENIED",
    "ApprovalDenied",
    "HANDLER_DEADLINE",
    "HANDSHAKE_REQUIRED",
    "PROTOCOL_MISMATCH",
    "RpcError",
    "InvalidParams",
    "Forbidden",
    "AuthFailed",
    "AgentAlreadyAttached",
    "ProtocolMismatch",
    "HandlerDeadlineExceeded",
    "ChannelClosed",
    "CallbackTimeout",
    "CallbackUnencodable",
    "ClientRpcError",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
AUTH_REQUIRED = -32001
APPROVAL_DENIED = -32003
HANDLER_DEADLINE = -32004
HANDSHAKE_REQUIRED = -32005
PROTOCOL_MISMATCH = -32006


_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = 60
_repr.maxother = 60


def short_repr(value: object) -> str:
    """A bounded repr of a wire value for error messages (no deep recursion)."""
    return _repr.repr(value)


class RpcError(Exception):
    """An error with a JSON-RPC code, safe to show to the client."""

    code = INTERNAL_ERROR

    def __init__(self, message: str, data: object = None, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data
        if code is not None:
            self.code = code

    def to_wire(self) -> dict[str, object]:
        err: dict[str, object] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


class Forbidden(RpcError):
    """The connection's role does not allow this method."""

    def __init__(self, what: str) -> None:
        super().__init__(f"forbidden: {what}")


class InvalidParams(RpcError):
    """Params that do not fit the method; always names the field."""

    code = INVALID_PARAMS

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(
            f"invalid params: {field}: {problem}", data={"field": field}
        )
        self.field = field
        self.problem = problem


class AuthFailed(RpcError):
    """A failed ``session.auth``: generic ``-32603`` as the client expects."""

    code = INTERNAL_ERROR

    def __init__(self, reason: str = "token mismatch") -> None:
        super().__init__(f"auth failed: {reason}")


class AgentAlreadyAttached(AuthFailed):
    def __init__(self, agent_id: str) -> None:
        super().__init__(f"agent '{agent_id}' is already attached on another connection")


class ProtocolMismatch(RpcError):
    code = PROTOCOL_MISMATCH


class ApprovalDenied(RpcError):
    """A gated call that was denied, or not approved in time."""

    code = APPROVAL_DENIED

    def __init__(self, method: str, approval_id: str, reason: str) -> None:
        super().__init__(
            f"approval required: {method} was not run ({reason})",
            data={"approval_id": approval_id, "method": method, "reason": reason},
        )


class HandlerDeadlineExceeded(RpcError):
    code = HANDLER_DEADLINE

    def __init__(self, method: str, seconds: float) -> None:
        super().__init__(
            f"handler deadline exceeded: {method} did not finish within "
            f"{seconds:g}s; it may have committed, read its state before retrying",
            data={"method": method, "deadline_secs": seconds},
        )


class ChannelClosed(Exception):
    """The connection went away while a server-to-client request waited."""


class CallbackTimeout(Exception):
    """A server-to-client request got no answer in time."""

    def __init__(self, method: str, seconds: float) -> None:
        super().__init__(f"{method} callback timed out ({seconds:g}s)")
        self.method = method
        self.seconds = seconds


class CallbackUnencodable(Exception):
    """A server-to-client request whose params cannot be encoded as JSON."""

    def __init__(self, method: str, reason: str) -> None:
        super().__init__(f"{method} params cannot be sent as JSON: {reason}")
        self.method = method
        self.reason = reason


class ClientRpcError(Exception):
    """The client answered a server-to-client request with an error."""

    def __init__(self, code: JsonValue, message: str, data: JsonValue = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
