"""
Continuing an A2A task when the user acts on a surface it owns.

``send_continuation`` POSTs one A2A v1.0 ``SendMessage`` JSON-RPC request
to the surface's endpoint (with ``treq`` over a ``twisted.web`` ``Agent``
built on the reactor it is given) and reports what happened as a
``RouteOutcome``.  Its Deferred never fails: DNS errors, refused or cut
connections, timeouts, redirects, error statuses, oversize or unreadable
answers and JSON-RPC errors all come back as ``delivered: false`` with an
``error`` string.

The request, exactly (``id`` and ``messageId`` are fresh UUID4 strings;
``contextId`` is left out when the owner has none)::

    POST <endpoint>
    Content-Type: application/json
    Accept: application/json
    Accept-Encoding: identity
    A2A-Version: 1.0
    Authorization: Bearer <token>          (routeAuth bearer)
    <name>: <value>                        (routeAuth header)

    {"jsonrpc": "2.0",
     "id": "<uuid4>",
     "method": "SendMessage",
     "params": {
       "message": {
         "messageId": "<uuid4>",
         "role": "ROLE_USER",
         "taskId": "<taskId>",
         "contextId": "<contextId>",
         "parts": [{"data": {"a2uiAction": <action>}, "mediaType": "application/json"}]},
       "configuration": {"returnImmediately": true}}}

``returnImmediately`` asks the agent to answer once it has the message
rather than when its turn ends: the user's click is acknowledged within
the timeout however long the agent works on it.

What the exchange is held to:

* Redirects are never followed, to any origin: a 3xx answer is reported
  (``delivered: false``, its ``status``).  A continuation carries
  credentials meant for one endpoint, and that endpoint was checked when
  the route was recorded; a redirect would send them somewhere unchecked.
* The URL connected to is the one ``parse_endpoint`` checked: the agent
  under treq is pinned to it (treq is handed a stand-in URL, which never
  leaves the process; hyperlink, which treq parses URLs with, cannot
  re-encode an IPv6 literal such as ``[::1]``).
* The whole exchange (connect, send, answer, body) is bounded by
  ``timeout``; when it runs out the request is cancelled, which closes
  the connection.
* At most ``max_response_bytes`` of body are read.  A declared length
  above that is refused unread; a body that grows past it is cut there
  and the connection closed, so a large answer is never buffered whole.
  Only identity encoding is asked for and a compressed answer is refused
  unread, so the bound is on the bytes received, not on what they might
  inflate to.
* Each call has its own non-persistent connection pool: the connection
  closes when the exchange ends, whatever the outcome.
* No outcome carries a credential or a request header: every string in
  it is scrubbed of the route's secrets (``A2aRouteAuth.scrub``) and
  bounded in length.  This module logs nothing; Twisted's client logs
  only its connection factory (host and port) starting and stopping.
"""

from __future__ import annotations

import uuid
from typing import Any, cast

import attrs
import orjson

# treq ships its types (py.typed) and is checked wherever it is installed;
# a type-checking environment without it (only install_requires) is not
# an error here.
from treq.client import HTTPClient  # type: ignore[import-not-found, unused-ignore]
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from car_twisted.a2ui.route import A2aRouteAuth, parse_endpoint
from car_twisted.errors import RpcError
from car_twisted.json_value import JsonValue

__all__ = [
    "A2A_VERSION",
    "DEFAULT_TIMEOUT",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "MAX_ERROR_CHARS",
    "RouteOutcome",
    "send_message_request",
    "send_continuation",
]

A2A_VERSION = "1.0"
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
#: Longest ``error`` (or answer-derived) string an outcome carries.
MAX_ERROR_CHARS = 300

# What treq is handed instead of the endpoint (see the module doc): a name
# under the reserved .invalid TLD, so a request that somehow bypassed the
# pinning agent could not reach anything.
_STAND_IN_URL = "http://a2a-endpoint.invalid/"


@attrs.frozen
class RouteOutcome:
    """
    What became of one continuation.

    ``delivered`` is true only when the endpoint answered 2xx with a
    JSON-RPC result for our request.  ``status`` is the HTTP status when
    there was one; ``result_kind`` (``"task"`` or ``"message"``) and
    ``task_state`` summarise the result; ``rpc_error_code`` is the code of
    a JSON-RPC error answer.
    """

    delivered: bool
    status: int | None = None
    error: str | None = None
    result_kind: str | None = None
    task_state: str | None = None
    rpc_error_code: int | None = None

    def to_wire(self) -> dict[str, JsonValue]:
        wire: dict[str, JsonValue] = {"delivered": self.delivered}
        if self.status is not None:
            wire["status"] = self.status
        if self.error is not None:
            wire["error"] = self.error
        if self.result_kind is not None:
            wire["resultKind"] = self.result_kind
        if self.task_state is not None:
            wire["taskState"] = self.task_state
        if self.rpc_error_code is not None:
            wire["rpcErrorCode"] = self.rpc_error_code
        return wire


def send_message_request(
    task_id: str,
    context_id: str | None,
    action: JsonValue,
    *,
    request_id: str,
    message_id: str,
) -> dict[str, JsonValue]:
    """The JSON-RPC ``SendMessage`` request a continuation sends (module doc)."""
    message: dict[str, JsonValue] = {"messageId": message_id, "role": "ROLE_USER", "taskId": task_id}
    if context_id:
        message["contextId"] = context_id
    message["parts"] = [{"data": {"a2uiAction": action}, "mediaType": "application/json"}]
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "SendMessage",
        "params": {"message": message, "configuration": {"returnImmediately": True}},
    }


class _Refused(Exception):
    """An answer this module will not read; its message says why."""


@implementer(IBodyProducer)
class _BytesBody:
    """A request body already in memory: written at once, no cooperator."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Discard(Protocol):
    """Takes an unwanted body by closing its connection at once."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]  # the response's producer proxy


def _discard(response: IResponse) -> None:
    response.deliverBody(_Discard())


@implementer(IAgent)
class _PinnedAgent:
    """
    The agent under treq: every request goes to the one checked URL,
    whatever URI treq passes down (its stand-in), asks for identity
    encoding only, and an answer with any other ``Content-Encoding`` is
    refused (closed unread).
    """

    def __init__(self, agent: IAgent, target: bytes) -> None:
        self._agent = agent
        self._target = target

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        sent = Headers()
        for name, values in (headers or Headers()).getAllRawHeaders():
            if name.lower() != b"accept-encoding":
                sent.setRawHeaders(name, list(values))
        sent.setRawHeaders(b"Accept-Encoding", [b"identity"])
        d = self._agent.request(method, self._target, sent, bodyProducer)
        d.addCallback(self._identity_only)
        return d

    @staticmethod
    def _identity_only(response: IResponse) -> IResponse:
        codings = [
            c.strip().lower() for v in response.headers.getRawHeaders(b"content-encoding", []) for c in v.split(b",")
        ]
        if any(c not in (b"", b"identity") for c in codings):
            _discard(response)
            raise _Refused(f"endpoint answered HTTP {response.code} with a Content-Encoding that was not asked for")
        return response


class _BoundedBody(Protocol):
    """
    Collects a response body of at most C{limit} bytes into ``done``.

    Past the limit it stops at once: drops what it holds, closes the
    connection (the transport's ``stopProducing``) and fails ``done``
    with ``_Refused``.  Cancelling ``done`` closes the connection too.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = 0
        self._chunks: list[bytes] = []
        self._stopped = False
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _stop(self) -> None:
        self._stopped = True
        self._chunks.clear()
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]  # the response's producer proxy

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._stop()

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        self.received += len(data)
        if self.received > self.limit:
            self._stop()
            self.done.errback(Failure(_Refused(f"endpoint answered more than {self.limit} bytes; the answer was cut there")))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._stopped:
            return
        self._stopped = True
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)
        self._chunks.clear()


@attrs.frozen
class _Answer:
    status: int
    body: bytes | None  # None: not read (not a 2xx)


async def _exchange(reactor: IReactorTime, target: bytes, headers: Headers, body: bytes, limit: int, timeout: float) -> _Answer:
    # Built here, so that even a reactor that cannot connect ends as a
    # failed exchange (an outcome), not as an exception from the caller's call.
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, connectTimeout=timeout, pool=pool)
    client = HTTPClient(_PinnedAgent(agent, target))
    response = await client.request(
        "POST",
        _STAND_IN_URL,
        headers=headers,
        data=_BytesBody(body),
        allow_redirects=False,
        unbuffered=True,
        reactor=cast(Any, reactor),
    )
    status = int(response.code)
    if not 200 <= status < 300:
        _discard(response)
        return _Answer(status=status, body=None)
    length = response.length
    if length is not UNKNOWN_LENGTH and int(length) > limit:
        _discard(response)
        raise _Refused(f"endpoint answered HTTP {status} with {int(length)} bytes, more than the {limit} allowed")
    reader = _BoundedBody(limit)
    response.deliverBody(reader)
    return _Answer(status=status, body=await reader.done)


def _bounded(text: str, auth: A2aRouteAuth) -> str:
    text = auth.scrub(text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _failed(auth: A2aRouteAuth, error: str, status: int | None = None, rpc_error_code: int | None = None) -> RouteOutcome:
    return RouteOutcome(delivered=False, status=status, error=_bounded(error, auth), rpc_error_code=rpc_error_code)


# Twisted's wrappers of lower-level failures, most specific first.
_WRAPPED: tuple[tuple[type[Exception], str], ...] = (
    (ResponseNeverReceived, "the connection closed before any answer"),
    (ResponseFailed, "the connection closed before the whole answer"),
    (RequestTransmissionFailed, "the request could not be sent"),
    (RequestGenerationFailed, "the request could not be written"),
)


def _why(exc: BaseException, timeout: float) -> str:
    """A short account of why an exchange failed (scrubbed by the caller)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s; the request was cancelled"
    if isinstance(exc, _Refused):
        return str(exc)
    if isinstance(exc, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, net_error.DNSLookupError):
        return "the endpoint's host name could not be resolved"
    if isinstance(exc, (net_error.TCPTimedOutError, net_error.TimeoutError)):
        return f"could not connect within {timeout:g}s"
    if isinstance(exc, CancelledError):
        return "the request was cancelled"
    for kind, what in _WRAPPED:
        if isinstance(exc, kind):
            reasons = getattr(exc, "reasons", None) or []
            inner = reasons[0].value if reasons and isinstance(reasons[0], Failure) else None
            return f"{what} ({type(inner).__name__}: {inner})" if inner is not None else what
    return f"{type(exc).__name__}: {exc}"


def _timed_out(result: object, seconds: float) -> Failure:
    return Failure(TimeoutError(seconds, "continuation"))


def _outcome_for_failure(failure: Failure, auth: A2aRouteAuth, timeout: float) -> RouteOutcome:
    exc = failure.value
    return _failed(auth, _why(exc, timeout) if exc is not None else "unknown failure")


def _text(value: object, auth: A2aRouteAuth) -> str | None:
    return _bounded(value, auth) if isinstance(value, str) else None


def _outcome_for_answer(answer: _Answer, request_id: str, auth: A2aRouteAuth) -> RouteOutcome:
    status = answer.status
    if 300 <= status < 400:
        return _failed(auth, f"endpoint answered a redirect (HTTP {status}); continuations never follow redirects", status)
    if answer.body is None:
        return _failed(auth, f"endpoint answered HTTP {status}", status)
    try:
        reply = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return _failed(auth, f"endpoint answered HTTP {status} with a body that is not JSON", status)
    if not isinstance(reply, dict) or ("result" not in reply and "error" not in reply):
        return _failed(auth, f"endpoint answered HTTP {status} with JSON that is not a JSON-RPC response", status)
    if "error" in reply:
        err = reply["error"]
        code = err.get("code") if isinstance(err, dict) else None
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        message = _text(err.get("message"), auth) if isinstance(err, dict) else None
        what = f"JSON-RPC error {code}" if code is not None else "a JSON-RPC error"
        return _failed(auth, f"endpoint answered {what}: {message or 'no message'}", status, code)
    if reply.get("id") != request_id:
        return _failed(auth, f"endpoint answered HTTP {status} with a JSON-RPC response to another request", status)
    result = reply["result"]
    kind: str | None = None
    task: object = None
    if isinstance(result, dict):
        if isinstance(result.get("task"), dict):  # v1.0: SendMessageResponse {task} | {message}
            kind, task = "task", result["task"]
        elif isinstance(result.get("message"), dict):
            kind = "message"
        elif result.get("kind") in ("task", "message"):  # v0.3: the Task or Message itself
            kind = result["kind"]
            task = result if kind == "task" else None
    state = None
    if isinstance(task, dict) and isinstance(task.get("status"), dict):
        state = _text(task["status"].get("state"), auth)
    return RouteOutcome(delivered=True, status=status, result_kind=kind, task_state=state)


def send_continuation(
    reactor: IReactorTime,
    endpoint: str,
    auth: A2aRouteAuth,
    task_id: str,
    context_id: str | None,
    action: JsonValue,
    timeout: float = DEFAULT_TIMEOUT,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
) -> Deferred[RouteOutcome]:
    """
    Send C{action} to the A2A task C{task_id} at C{endpoint} (the request
    and the rules are in the module doc); fires with a ``RouteOutcome``,
    never fails.

    @param reactor: connects and times the exchange; must also provide
        ``IReactorTCP`` and ``IReactorPluggableNameResolver`` (as a real
        reactor does).
    @param endpoint: the route's endpoint, as ``check_endpoint`` returned
        it; parsed again here, and the loopback policy is the caller's.
    """
    try:
        target = parse_endpoint(endpoint)
    except RpcError as exc:
        return succeed(_failed(auth, f"invalid endpoint: {exc.message}"))
    request_id = str(uuid.uuid4())
    request = send_message_request(task_id, context_id, action, request_id=request_id, message_id=str(uuid.uuid4()))
    try:
        body = orjson.dumps(request)
    except TypeError:
        return succeed(_failed(auth, "the action cannot be encoded as JSON"))

    headers = Headers(
        {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"application/json"],
            b"A2A-Version": [A2A_VERSION.encode("ascii")],
        }
    )
    for name, values in auth.headers().items():
        headers.setRawHeaders(name, values)

    exchange = _exchange(reactor, target.url.encode("ascii"), headers, body, max_response_bytes, timeout)
    d = Deferred.fromCoroutine(exchange)
    # However the exchange ended once it was cancelled (Twisted's client
    # may report a cancelled request as a connection that closed before
    # any answer), a timed-out exchange is reported as a timeout.
    d.addTimeout(timeout, reactor, onTimeoutCancel=_timed_out)
    outcome = d.addCallbacks(
        _outcome_for_answer,
        _outcome_for_failure,
        callbackArgs=(request_id, auth),
        errbackArgs=(auth, timeout),
    )

    def last_resort(failure: Failure) -> RouteOutcome:
        # A bug above still ends as an outcome, never as a failure.
        kind = failure.type.__name__ if failure.type is not None else "unknown"
        return _failed(auth, f"internal error: {kind}")

    return outcome.addErrback(last_resort)
