"""
A2A continuations end to end: ``send_continuation`` against a real
``twisted.web`` server on loopback, with the real reactor.

The endpoint records what it received; some paths misbehave (hang, hang
mid-body, redirect, answer 500, answer too much, slowly).  Every outcome
is checked for the route's credentials, and so is every log event of the
test.
"""

import gc
import json
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import resource, server

from car_twisted.a2ui.continuation import A2A_VERSION, send_continuation
from car_twisted.a2ui.route import A2aRouteAuth

from support import free_port

TOKEN = "tok-" + "s3cr3t-Bearer-Value-0123456789abcdef"
HEADER_VALUE = "hv-" + "another secret value 9876543210"
ACTION = {"name": "submit", "surfaceId": "s1", "sourceComponentId": "btn", "timestamp": "2026-01-01T00:00:00Z", "context": {"n": 1}}
CHUNK = 64 * 1024
TEN_MB = 10 * 1024 * 1024
MIB = 1024 * 1024


class Endpoint(resource.Resource):
    """An A2A endpoint whose behaviour is chosen by the request path."""

    isLeaf = True

    def __init__(self, reactor):
        super().__init__()
        self.reactor = reactor
        self.received = []  # (path, headers dict of lists, body bytes)
        self.closed = defer.Deferred()  # fires (bytes written, seconds) when a misbehaving request's connection goes
        self.other_origin = None

    def render_POST(self, request):
        path = request.path.decode()
        headers = {k.decode().lower(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        body = request.content.read()
        self.received.append((path, headers, body))
        rpc = json.loads(body) if body.startswith(b"{") else {}
        handler = getattr(self, "do_" + path.strip("/").replace("-", "_"), None)
        if handler is None:
            request.setResponseCode(404)
            return b""
        return handler(request, rpc)

    def _json(self, request, value):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value).encode()

    def _watch(self, request, written=lambda: 0):
        started = self.reactor.seconds()
        request.notifyFinish().addBoth(lambda _: self.closed.callback((written(), self.reactor.seconds() - started)))

    def do_ok(self, request, rpc):
        task_ = {"id": rpc["params"]["message"]["taskId"], "contextId": "ctx-1", "status": {"state": "TASK_STATE_WORKING"}}
        return self._json(request, {"jsonrpc": "2.0", "id": rpc["id"], "result": {"task": task_}})

    def do_v03(self, request, rpc):
        result = {"kind": "task", "id": "t", "contextId": "c", "status": {"state": "input-required"}}
        return self._json(request, {"jsonrpc": "2.0", "id": rpc["id"], "result": result})

    def do_message(self, request, rpc):
        message = {"messageId": "m", "role": "ROLE_AGENT", "parts": [{"text": "thanks"}]}
        return self._json(request, {"jsonrpc": "2.0", "id": rpc["id"], "result": {"message": message}})

    def do_wrong_id(self, request, rpc):
        return self._json(request, {"jsonrpc": "2.0", "id": "someone-else", "result": {}})

    def do_echo_error(self, request, rpc):
        # A careless endpoint that quotes the credentials it got back.
        quoted = json.dumps([request.getHeader("authorization"), request.getHeader("x-api-key")])
        return self._json(request, {"jsonrpc": "2.0", "id": rpc["id"], "error": {"code": -32001, "message": f"bad credentials {quoted}"}})

    def do_not_json(self, request, rpc):
        return b"<html>hello</html>"

    def do_fail(self, request, rpc):
        request.setResponseCode(500)
        return b"internal trouble"

    def do_redirect_same(self, request, rpc):
        request.setResponseCode(302)
        request.setHeader(b"location", b"/ok")
        return b""

    def do_redirect_other(self, request, rpc):
        request.setResponseCode(302)
        request.setHeader(b"location", self.other_origin.encode())
        return b""

    def do_gzip(self, request, rpc):
        request.setHeader(b"content-encoding", b"gzip")
        return b"\x1f\x8b not really gzip"

    def do_hang(self, request, rpc):
        self._watch(request)
        return server.NOT_DONE_YET

    def do_hang_body(self, request, rpc):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"1000")
        request.write(b'{"jsonrpc": "2.0", ')
        self._watch(request)
        return server.NOT_DONE_YET

    def do_declared_big(self, request, rpc):
        request.setHeader(b"content-length", str(TEN_MB).encode())
        request.write(b"x" * CHUNK)
        self._watch(request, lambda: CHUNK)
        return server.NOT_DONE_YET

    def do_big(self, request, rpc):
        # 10 MB, 64 KiB every 10 ms (chunked: no declared length): sending it
        # all would take 1.6 s; the client must cut it at its bound long before.
        sent = [0]
        finished = []
        request.notifyFinish().addBoth(finished.append)

        def more():
            if finished:
                loop.stop()
            elif sent[0] >= TEN_MB:
                loop.stop()
                request.finish()
            else:
                request.write(b" " * CHUNK)
                sent[0] += CHUNK

        loop = task.LoopingCall(more)
        loop.clock = self.reactor
        loop.start(0.01)
        self._watch(request, lambda: sent[0])
        return server.NOT_DONE_YET


async def serve(reactor, interface="127.0.0.1"):
    endpoint = Endpoint(reactor)
    site = server.Site(endpoint)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface=interface)
    return endpoint, port


def url(port, path, host="127.0.0.1"):
    return f"http://{host}:{port.getHost().port}/{path}"


@pytest.fixture
def logs():
    """Every log event during the test, formatted (with any traceback)."""
    lines = []

    def observe(event):
        lines.append(formatEvent(event) or "")
        failure = event.get("log_failure")
        if failure is not None:
            lines.append(failure.getTraceback())

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def assert_no_secret(outcome, logs):
    gc.collect()  # unhandled Deferred failures are logged when collected
    wire = json.dumps(outcome.to_wire())
    for secret in (TOKEN, HEADER_VALUE):
        assert secret not in wire and secret not in repr(outcome)
        assert not any(secret in line for line in logs)


async def send(reactor, endpoint_url, auth=None, timeout=5.0, **kw):
    return await send_continuation(
        reactor, endpoint_url, auth or A2aRouteAuth.bearer(TOKEN), "task-7", "ctx-1", ACTION, timeout=timeout, **kw
    )


@pytest_twisted.ensureDeferred
async def test_bearer_continuation_carries_the_documented_request(reactor, logs):
    endpoint, port = await serve(reactor)
    try:
        outcome = await send(reactor, url(port, "ok"))
        assert outcome.to_wire() == {"delivered": True, "status": 200, "resultKind": "task", "taskState": "TASK_STATE_WORKING"}
        [(path, headers, body)] = endpoint.received
        assert path == "/ok"
        assert headers["authorization"] == [f"Bearer {TOKEN}"]
        assert headers["content-type"] == ["application/json"]
        assert headers["a2a-version"] == [A2A_VERSION] == ["1.0"]
        assert headers["accept-encoding"] == ["identity"]
        assert headers["connection"] == ["close"]  # a non-persistent pool
        sent = json.loads(body)
        uuid.UUID(sent["id"])
        uuid.UUID(sent["params"]["message"]["messageId"])
        assert sent == {
            "jsonrpc": "2.0",
            "id": sent["id"],
            "method": "SendMessage",
            "params": {
                "message": {
                    "messageId": sent["params"]["message"]["messageId"],
                    "role": "ROLE_USER",
                    "taskId": "task-7",
                    "contextId": "ctx-1",
                    "parts": [{"data": {"a2uiAction": ACTION}, "mediaType": "application/json"}],
                },
                "configuration": {"returnImmediately": True},
            },
        }
        assert sent["id"] != sent["params"]["message"]["messageId"]
        assert_no_secret(outcome, logs)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_header_auth_and_no_context(reactor, logs):
    endpoint, port = await serve(reactor)
    try:
        auth = A2aRouteAuth.header("X-Api-Key", HEADER_VALUE)
        outcome = await send_continuation(reactor, url(port, "message"), auth, "task-7", None, ACTION, timeout=5.0)
        assert outcome.to_wire() == {"delivered": True, "status": 200, "resultKind": "message"}
        [(_, headers, body)] = endpoint.received
        assert headers["x-api-key"] == [HEADER_VALUE]
        assert "authorization" not in headers
        assert "contextId" not in json.loads(body)["params"]["message"]
        assert_no_secret(outcome, logs)

        none = await send_continuation(reactor, url(port, "v03"), A2aRouteAuth(), "task-7", "ctx-1", ACTION, timeout=5.0)
        assert none.to_wire() == {"delivered": True, "status": 200, "resultKind": "task", "taskState": "input-required"}
        assert "authorization" not in endpoint.received[-1][1] and "x-api-key" not in endpoint.received[-1][1]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_ipv6_loopback_endpoint(reactor, logs):
    try:
        endpoint, port = await serve(reactor, interface="::1")
    except Exception as exc:  # no IPv6 loopback here
        pytest.skip(f"cannot listen on ::1: {exc}")
    try:
        outcome = await send(reactor, url(port, "ok", host="[::1]"))
        assert outcome.delivered, outcome
        assert endpoint.received[0][1]["host"] == [f"[::1]:{port.getHost().port}"]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_hanging_endpoint_is_reported_within_the_timeout_and_closed(reactor, logs):
    endpoint, port = await serve(reactor)
    try:
        started = reactor.seconds()
        outcome = await send(reactor, url(port, "hang"), timeout=0.5)
        took = reactor.seconds() - started
        assert 0.45 <= took < 1.5, took
        assert outcome.to_wire() == {"delivered": False, "error": "no answer within 0.5s; the request was cancelled"}
        _, open_for = await endpoint.closed  # the server saw the connection go
        assert open_for < 1.5
        assert_no_secret(outcome, logs)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_endpoint_hanging_mid_body_is_cut_at_the_timeout(reactor, logs):
    endpoint, port = await serve(reactor)
    try:
        started = reactor.seconds()
        outcome = await send(reactor, url(port, "hang-body"), timeout=0.5)
        assert reactor.seconds() - started < 1.5
        assert not outcome.delivered and outcome.error.startswith("no answer within 0.5s")
        await endpoint.closed
        assert_no_secret(outcome, logs)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_redirects_are_reported_not_followed(reactor, logs):
    endpoint, port = await serve(reactor)
    other, other_port = await serve(reactor)
    endpoint.other_origin = url(other_port, "ok")
    try:
        for path in ("redirect-same", "redirect-other"):
            outcome = await send(reactor, url(port, path))
            assert outcome.to_wire() == {
                "delivered": False,
                "status": 302,
                "error": "endpoint answered a redirect (HTTP 302); continuations never follow redirects",
            }
            assert_no_secret(outcome, logs)
        assert [p for p, _, _ in endpoint.received] == ["/redirect-same", "/redirect-other"]
        assert other.received == []
    finally:
        await port.stopListening()
        await other_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_ten_megabytes_are_cut_at_the_bound(reactor, logs):
    endpoint, port = await serve(reactor)
    try:
        started = reactor.seconds()
        outcome = await send(reactor, url(port, "big"), max_response_bytes=MIB)
        took = reactor.seconds() - started
        assert outcome.to_wire() == {
            "delivered": False,
            "error": f"endpoint answered more than {MIB} bytes; the answer was cut there",
        }
        written, _ = await endpoint.closed
        # The server had written a little past the bound when it saw the
        # connection close: nowhere near the 10 MB, and well before the
        # 1.6 s sending them all would take.
        assert MIB < written < 3 * MIB, written
        assert took < 1.0, took
        assert_no_secret(outcome, logs)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_declared_length_past_the_bound_is_refused_unread(reactor, logs):
    endpoint, port = await serve(reactor)
    try:
        outcome = await send(reactor, url(port, "declared-big"), max_response_bytes=MIB)
        assert outcome.to_wire() == {
            "delivered": False,
            "error": f"endpoint answered HTTP 200 with {TEN_MB} bytes, more than the {MIB} allowed",
        }
        written, open_for = await endpoint.closed
        assert open_for < 1.0
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_error_statuses_and_unusable_answers(reactor, logs):
    endpoint, port = await serve(reactor)
    try:
        fail = await send(reactor, url(port, "fail"))
        assert fail.to_wire() == {"delivered": False, "status": 500, "error": "endpoint answered HTTP 500"}
        missing = await send(reactor, url(port, "nowhere"))
        assert missing.to_wire() == {"delivered": False, "status": 404, "error": "endpoint answered HTTP 404"}
        html = await send(reactor, url(port, "not-json"))
        assert html.to_wire() == {"delivered": False, "status": 200, "error": "endpoint answered HTTP 200 with a body that is not JSON"}
        other = await send(reactor, url(port, "wrong-id"))
        assert other.error == "endpoint answered HTTP 200 with a JSON-RPC response to another request"
        gz = await send(reactor, url(port, "gzip"))
        assert gz.to_wire() == {
            "delivered": False,
            "error": "endpoint answered HTTP 200 with a Content-Encoding that was not asked for",
        }
        for outcome in (fail, missing, html, other, gz):
            assert_no_secret(outcome, logs)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_credentials_echoed_by_the_endpoint_are_scrubbed(reactor, logs):
    endpoint, port = await serve(reactor)
    try:
        for auth in (A2aRouteAuth.bearer(TOKEN), A2aRouteAuth.header("X-Api-Key", HEADER_VALUE)):
            outcome = await send(reactor, url(port, "echo-error"), auth)
            assert not outcome.delivered and outcome.status == 200 and outcome.rpc_error_code == -32001
            assert outcome.error.startswith("endpoint answered JSON-RPC error -32001: bad credentials")
            assert "[redacted]" in outcome.error
            assert_no_secret(outcome, logs)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_connection_refused(reactor, logs):
    outcome = await send(reactor, f"http://127.0.0.1:{free_port()}/a2a")
    assert outcome.to_wire() == {"delivered": False, "error": "connection refused"}
    assert_no_secret(outcome, logs)


@pytest_twisted.ensureDeferred
async def test_unresolvable_host(reactor, logs):
    outcome = await send(reactor, "http://no-such-host.invalid/a2a", timeout=5.0)
    assert not outcome.delivered
    assert outcome.error in ("the endpoint's host name could not be resolved", "no answer within 5s; the request was cancelled")
    assert_no_secret(outcome, logs)


@pytest_twisted.ensureDeferred
async def test_bad_endpoint_and_bad_action_are_outcomes(reactor, logs):
    bad = await send(reactor, f"http://user:{TOKEN}@127.0.0.1/")
    assert bad.to_wire() == {
        "delivered": False,
        "error": "invalid endpoint: invalid params: endpoint: must not carry user information (put credentials in routeAuth)",
    }
    unencodable = await send_continuation(reactor, "http://127.0.0.1:9/", A2aRouteAuth(), "t", "c", {"x": {1, 2}})
    assert unencodable.to_wire() == {"delivered": False, "error": "the action cannot be encoded as JSON"}
    assert_no_secret(bad, logs)
