"""
The JSON-RPC 2.0 dispatcher: frames in, replies out.

One text frame is one request, notification, client response, or batch.
Each request passes, in order: envelope checks (``-32600``), the auth gate
(``-32001`` then close), the handshake gate (``-32005``), method lookup
(``-32601``), params parsing (``-32602``), then its handler.  A handler
that returns a plain value is answered at once, with no Deferred built; one
that waits (a Deferred or a coroutine) runs concurrently with everything
else on the connection under a deadline (``-32004``), and its id is named
in an ``infer.progress`` notification every few seconds while it waits, so
the client's 30 s silence limit does not give up on it.  ``error_for`` is the
one place exceptions become error responses.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from time import perf_counter as _now
from typing import TYPE_CHECKING, cast

from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted.errors import (
    AUTH_REQUIRED,
    HANDSHAKE_REQUIRED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    ApprovalDenied,
    HandlerDeadlineExceeded,
    RpcError,
)
from car_twisted.host.gate import params_preview
from car_twisted.interfaces import IBinaryReceiver
from car_twisted.json_value import JsonContainer, JsonValue
from car_twisted.rpc.envelope import (
    MAX_METHOD_LEN,
    DecodeError,
    encode_error,
    encode_result,
    loads,
    nested_deeper_than,
    valid_id,
)
from car_twisted.rpc.params import parse_params
from car_twisted.rpc.pulse import ProgressPulse
from car_twisted.rpc.scope import out_of_scope_reason

if TYPE_CHECKING:
    from car_twisted.host.registry import ApprovalOutcome
    from car_twisted.rpc.registry import MethodSpec
    from car_twisted.session import ClientSession
    from car_twisted.state import ServerState

    #: What one message comes to: its encoded reply, a Deferred firing
    #: with it (None: nothing to send), or None when there is nothing to send.
    Reply = bytes | Deferred[bytes | None] | None

__all__ = ["Dispatcher", "error_for"]

_CoroutineType = types.CoroutineType
# Result types answered at once without asking whether they are Deferreds.
_PLAIN = frozenset({dict, list, str, int, float, bool, type(None)})
_log = Logger()

_BAD_ID = (
    "invalid request: id must be a string of at most 256 characters, "
    "a 64-bit integer or null"
)


def error_for(exc: BaseException, method: str | None) -> tuple[int, str, object]:
    """
    Map an exception to ``(code, message, data)``.  Only ``RpcError``
    speaks to the client in its own words; anything else is logged with
    its traceback and answered as a bare internal error.
    """
    if isinstance(exc, RpcError):
        return exc.code, exc.message, exc.data
    if isinstance(exc, CancelledError):
        return INTERNAL_ERROR, f"request cancelled: {method}", None
    _log.failure(
        "unexpected error while handling {method}",
        failure=Failure(exc, exc.__class__, exc.__traceback__),
        method=method,
    )
    return INTERNAL_ERROR, f"internal error while handling {method}", None


class Dispatcher:
    """Routes decoded frames for every connection of one ``ServerState``."""

    _log = _log

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.methods = state.methods
        self.clock = state.clock
        config = state.config
        self.handler_timeout = config.handler_timeout
        self.max_batch = config.max_batch
        self.max_in_flight = config.max_in_flight
        self.max_message_bytes = config.max_message_bytes
        self.max_depth = config.max_json_depth
        self.gate = config.approval_gate
        self.pulse = ProgressPulse(self.clock)
        self.stats = state.stats

    # -- entry points --------------------------------------------------------

    def dispatch_text(self, session: ClientSession, payload: bytes) -> None:
        try:
            msg = loads(payload)
        except DecodeError as e:
            # orjson only accepts valid UTF-8, so the transport's incoming
            # UTF-8 check is off; a text frame that is not UTF-8 is caught
            # here and closed with 1007 as the WebSocket spec requires.
            if not _is_utf8(payload):
                session.channel.sink.close(1007, "invalid UTF-8 in text frame")
                return
            session.channel.send(encode_error(None, PARSE_ERROR, f"parse error: {e}"))
            if not session.authenticated:
                self.state.auth_failed(session)
            return
        if not session.authenticated and not _auth_request(msg):
            # Before auth, every frame that is not a well-formed
            # session.auth counts like a wrong token, so an unauthenticated
            # peer cannot keep a connection busy with malformed requests.
            self.state.auth_failed(session)
        if type(msg) is dict:
            if nested_deeper_than(payload, msg, self.max_depth):
                self._too_deep(session, msg)
                return
            out = self._handle(session, msg)
            if out is None:
                return
            if isinstance(out, bytes):
                session.channel.send(out)
            else:
                out.addCallback(self._send_deferred, session)
        elif type(msg) is list:
            if nested_deeper_than(payload, msg, self.max_depth):
                self._too_deep(session, msg)
                return
            self._batch(session, msg)
        else:
            session.channel.send(
                encode_error(None, INVALID_REQUEST, "invalid request: expected an object or an array")
            )

    def dispatch_binary(self, session: ClientSession, payload: bytes) -> None:
        if not session.authenticated:
            self._deny(session, None)
            return
        receiver = session.component(IBinaryReceiver)
        if receiver is None:
            session.channel.send(
                encode_error(
                    None,
                    INVALID_REQUEST,
                    "binary frame refused: no binary stream is open on this connection",
                    {"bytes": len(payload)},
                )
            )
            return
        try:
            receiver.receive(payload)
        except Exception:
            self._log.failure(
                "binary frame receiver failed for client {client_id}",
                client_id=session.client_id,
            )

    def _too_deep(self, session: ClientSession, msg: JsonContainer) -> None:
        """
        One depth limit, on the way in: a value is never stored or echoed
        that a reply could not encode.  A request gets ``-32602``; a
        client's answer to a callback fails that callback; anything else
        is ``-32600``.
        """
        text = f"JSON nested deeper than {self.max_depth} levels"
        if not session.authenticated:
            self._deny(session, None)
            return
        if type(msg) is dict and "method" not in msg and "id" in msg:
            session.channel.deliver(msg["id"], error={"code": INVALID_REQUEST, "message": f"invalid response: {text}"})
            return
        if type(msg) is dict and valid_id(msg.get("id")):
            if "id" in msg:
                session.channel.send(
                    encode_error(msg["id"], INVALID_PARAMS, f"invalid params: {text}", {"field": "params", "limit": self.max_depth})
                )
            return
        session.channel.send(encode_error(None, INVALID_REQUEST, f"invalid request: {text}"))

    # -- one message -----------------------------------------------------------

    def _handle(self, session: ClientSession, msg: dict[str, JsonValue]) -> Reply:
        """
        @return: the encoded reply, a Deferred firing with it (or None),
            or None when there is nothing to send.
        """
        method = msg.get("method")
        if method is None:
            return self._client_response(session, msg)
        notification = "id" not in msg
        rid = msg.get("id")
        if not valid_id(rid):
            return encode_error(None, INVALID_REQUEST, _BAD_ID)
        if msg.get("jsonrpc") != "2.0":
            return encode_error(rid, INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
        if type(method) is not str or not method or len(method) > MAX_METHOD_LEN:
            return encode_error(
                rid, INVALID_REQUEST, "invalid request: method must be a non-empty string of at most 256 characters"
            )
        params = msg.get("params")
        if params is not None and type(params) is not dict and type(params) is not list:
            return encode_error(rid, INVALID_REQUEST, "invalid request: params must be an object or an array")

        spec = self.methods.get(method)
        if not session.authenticated and (spec is None or spec.requires_auth):
            self._deny(session, rid)
            return None
        if session.protocol_version is None and (
            spec is not None and spec.requires_handshake
        ):
            return None if notification else encode_error(
                rid,
                HANDSHAKE_REQUIRED,
                f"protocol handshake required: call server.handshake before {method}",
            )
        if spec is None:
            if notification:
                return None
            reason = out_of_scope_reason(method)
            text = (
                f"method not found: {method} is not implemented by this daemon ({reason})"
                if reason
                else f"method not found: {method}"
            )
            self.stats.request(None, "-32601", 0.0)
            return encode_error(rid, METHOD_NOT_FOUND, text, {"method": method})
        start = _now()
        if session.in_flight >= self.max_in_flight:
            return None if notification else encode_error(
                rid,
                INTERNAL_ERROR,
                f"server busy: {self.max_in_flight} requests already in flight on this connection",
                {"reason": "busy", "limit": self.max_in_flight},
            )

        args: object
        try:
            args = params if spec.params is None or not spec.parse_at_edge else parse_params(spec.params, params)
            gate = self.gate
            if gate.enabled and (method in gate.methods or spec.approval is not None):
                why = "it is listed in the approval gate" if method in gate.methods else spec.approval(session, args)  # type: ignore[misc]
                if why is not None:
                    return self._wait(session, spec, args, rid, notification, self._park(session, spec, args, params, why), start)
            result = spec.handler(session, args)
        except Exception as e:
            return None if notification else self._error(rid, method, e, start)

        kind = type(result)
        if kind in _PLAIN or (kind is not _CoroutineType and not isinstance(result, Deferred)):
            return None if notification else self._encode(rid, method, result, start)
        # Not plain: a coroutine, or a Deferred (the check above).
        d: Deferred[object] = (
            Deferred.fromCoroutine(result) if isinstance(result, _CoroutineType) else cast("Deferred[object]", result)
        )
        return self._wait(session, spec, args, rid, notification, d, start)

    def _park(self, session: ClientSession, spec: MethodSpec, args: object, params: JsonValue, why: str) -> Deferred[object]:
        """Hold a gated call until a person approves it (``host.resolve_approval``); then run it."""
        waiting = self.state.host.park(session, spec.name, params_preview(params), why, self.gate.timeout)

        def decided(outcome: ApprovalOutcome) -> object:
            if not outcome.approved:
                raise ApprovalDenied(spec.name, outcome.approval.id, outcome.reason)
            result = spec.handler(session, args)
            if isinstance(result, _CoroutineType):
                return Deferred.fromCoroutine(result)
            return result

        return waiting.addCallback(decided)

    def _wait(
        self,
        session: ClientSession,
        spec: MethodSpec,
        args: object,
        rid: JsonValue,
        notification: bool,
        d: Deferred[object],
        start: float,
    ) -> Deferred[bytes | None]:
        method = spec.name
        timeout = self._deadline(spec, args)
        session.in_flight += 1
        stats = self.stats
        stats.in_flight += 1

        def on_timeout(result: object, seconds: float) -> Failure:
            return Failure(HandlerDeadlineExceeded(method, seconds))

        pulse = None if notification else self.pulse.add(session.channel, rid)

        def done(result: object) -> object:
            session.in_flight -= 1
            stats.in_flight -= 1
            if pulse is not None:
                self.pulse.discard(pulse)
            return result

        d.addTimeout(timeout, self.clock, onTimeoutCancel=on_timeout)
        d.addBoth(done)
        if notification:
            return d.addCallbacks(lambda _: None, self._log_notification_failure, errbackArgs=(method,))
        return d.addCallbacks(
            lambda result: self._encode(rid, method, result, start),
            lambda f: self._error(rid, method, f.value, start),
        )

    def _deadline(self, spec: MethodSpec, args: object) -> float:
        deadline = spec.deadline
        seconds: float | None
        if callable(deadline):
            try:
                seconds = deadline(args)
            except Exception:
                self._log.failure("deadline function failed for {method}", method=spec.name)
                seconds = None
        else:
            seconds = deadline
        return self.handler_timeout if seconds is None else float(seconds)

    def _client_response(self, session: ClientSession, msg: dict[str, JsonValue]) -> bytes | None:
        if "id" in msg and ("result" in msg or "error" in msg):
            if not session.authenticated:
                self._deny(session, None)
                return None
            if not session.channel.deliver(msg["id"], msg.get("result"), msg.get("error")):
                self._log.debug(
                    "client {client_id} answered unknown request id {rid!r}",
                    client_id=session.client_id,
                    rid=msg["id"],
                )
            return None
        rid = msg.get("id")
        return encode_error(
            rid if valid_id(rid) else None, INVALID_REQUEST, "invalid request: missing method"
        )

    # -- batches -----------------------------------------------------------

    def _batch(self, session: ClientSession, items: list[JsonValue]) -> None:
        send = session.channel.send
        if not items:
            send(encode_error(None, INVALID_REQUEST, "invalid request: empty batch"))
            return
        if len(items) > self.max_batch:
            send(
                encode_error(
                    None,
                    INVALID_REQUEST,
                    f"invalid request: batch of {len(items)} exceeds the limit of {self.max_batch}",
                )
            )
            return
        if not session.authenticated:
            # The auth handshake is a single request; a batch never opens a session.
            self._deny(session, None)
            return
        parts: list[bytes | None] = []
        ids: list[JsonValue] = []
        waits: list[Deferred[None]] = []
        for item in items:
            if type(item) is dict:
                out = self._handle(session, item)
                rid = item.get("id")
            else:
                out = encode_error(None, INVALID_REQUEST, "invalid request: batch entries must be objects")
                rid = None
            if out is None:
                continue
            ids.append(rid if valid_id(rid) else None)
            if isinstance(out, bytes):
                parts.append(out)
            else:
                index = len(parts)
                parts.append(None)
                waits.append(out.addCallback(_setter(parts, index)))

        def flush(_: object = None) -> None:
            body = [p for p in parts if p is not None]
            if not body:
                return
            frame = b"[" + b",".join(body) + b"]"
            if len(frame) > self.max_message_bytes:
                # Keep one answer per request so the client can correlate.
                text = (
                    f"batch response too large: {len(frame)} bytes exceeds the "
                    f"{self.max_message_bytes}-byte message limit; send the requests separately"
                )
                frame = b"[" + b",".join(
                    encode_error(rid, INTERNAL_ERROR, text)
                    for rid, p in zip(ids, parts, strict=True)
                    if p is not None
                ) + b"]"
            send(frame)

        if waits:
            gatherResults(waits).addCallback(flush).addErrback(
                lambda f: self._log.failure("batch reply failed", failure=f)
            )
        else:
            flush()

    # -- replies -------------------------------------------------------------

    def _encode(self, rid: JsonValue, method: str, result: object, start: float) -> bytes:
        try:
            frame = encode_result(rid, result)
        except Exception as e:
            return self._error(rid, method, e, start)
        if len(frame) <= self.max_message_bytes:
            self.stats.request(method, "ok", _now() - start)
            return frame
        self.stats.request(method, str(INTERNAL_ERROR), _now() - start)
        return encode_error(
                rid,
                INTERNAL_ERROR,
                f"response too large: {len(frame)} bytes exceeds the {self.max_message_bytes}-byte message limit",
                {"bytes": len(frame), "limit": self.max_message_bytes},
            )

    def _error(self, rid: JsonValue, method: str | None, exc: BaseException, start: float) -> bytes:
        code, message, data = error_for(exc, method)
        self.stats.request(method, str(code), _now() - start)
        frame = encode_error(rid, code, message, data)
        if len(frame) > self.max_message_bytes:
            # Errors obey the message cap too: keep the code, trim the rest.
            frame = encode_error(rid, code, message[:512] + " [truncated]")
        return frame

    def _send_deferred(self, frame: bytes | None, session: ClientSession) -> None:
        if frame is not None:
            session.channel.send(frame)

    def _log_notification_failure(self, failure: Failure, method: str) -> None:
        if isinstance(failure.value, RpcError):
            self._log.info(
                "notification {method} failed: {message}",
                method=method,
                message=failure.value.message,
            )
        else:
            self._log.failure("notification {method} failed", failure=failure, method=method)

    def _deny(self, session: ClientSession, rid: JsonValue) -> None:
        """The auth gate: ``-32001``, then close without waiting for the peer."""
        self._log.info(
            "client {client_id} refused: not authenticated", client_id=session.client_id
        )
        session.channel.send(
            encode_error(
                rid,
                AUTH_REQUIRED,
                "auth required: call session.auth with the daemon token before any other method",
            )
        )
        session.channel.sink.close(1008, "auth required")


def _auth_request(msg: JsonValue) -> bool:
    """A well-formed ``session.auth`` request envelope (params not checked)."""
    return (
        type(msg) is dict
        and msg.get("method") == "session.auth"
        and msg.get("jsonrpc") == "2.0"
        and valid_id(msg.get("id"))
        and type(msg.get("params", {})) in (dict, list, type(None))
    )


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _setter(parts: list[bytes | None], index: int) -> Callable[[bytes | None], None]:
    def fill(frame: bytes | None) -> None:
        parts[index] = frame

    return fill
