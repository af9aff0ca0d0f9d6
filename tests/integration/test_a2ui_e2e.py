"""
a2ui.* end to end: the real daemon on loopback, real WebSocket clients
(an agent that ingests A2A payloads, a renderer that acts on surfaces, an
``a2ui/subscribe``d watcher and a ``host.subscribe``d host), and a real
``twisted.web`` A2A endpoint on loopback that the daemon continues tasks
at.

The route credentials are searched for in everything the daemon said:
every frame each client received, ``host.events``, and every log event the
in-process daemon emitted (formatted, with tracebacks, and as raw dicts).

Continuation timeouts: ``A2uiMethods`` calls ``send_continuation`` without
a timeout (its default, ``DEFAULT_TIMEOUT`` = 10 s, is bound when the
function is defined), so the misbehaving-endpoint test replaces the
``send_continuation`` that ``car_twisted.methods.a2ui`` calls with the real
one given a short ``timeout``, and ``car_twisted.methods.a2ui.DEFAULT_TIMEOUT``
(which the ``a2ui.action`` deadline is computed from) with the same value.
One hanging endpoint is also left to the real default, unpatched.
"""

import functools
import gc
import json

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import resource, server

from car_twisted.a2ui import continuation
from car_twisted.methods import a2ui as a2ui_methods

from support import start_server

# Distinctive, and plain ASCII letters and digits, so that any encoding
# (JSON, repr, a URL) would carry them verbatim.
BEARER_SECRET = "BearerSecret7f3c9a1e5b2d8c4f6a0e9b7d"
HEADER_SECRET = "HeaderSecret2b8e4d6f1a3c5e7b9d0f2a4c"
SECRETS = (BEARER_SECRET, HEADER_SECRET)

BASIC_CATALOG = "https://a2ui.org/specification/v0_9/basic_catalog.json"
SHORT_TIMEOUT = 1.0
CHUNK = 64 * 1024
TEN_MB = 10 * 1024 * 1024


# -- the A2A endpoint ----------------------------------------------------------------


class A2aEndpoint(resource.Resource):
    """
    A loopback A2A endpoint: records every request (path, lower-cased
    headers, parsed body) and behaves by path.
    """

    isLeaf = True

    def __init__(self, reactor):
        super().__init__()
        self.reactor = reactor
        self.received = []
        self.elsewhere = None  # the redirect target (another endpoint's URL)
        self.finished = {}  # path -> Deferred firing (bytes written, seconds open) when its connection ends

    def render_POST(self, request):
        path = request.path.decode()
        headers = {k.decode().lower(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        body = request.content.read()
        rpc = json.loads(body) if body.startswith(b"{") else None
        self.received.append((path, headers, rpc))
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
        done = self.finished.setdefault(request.path.decode(), defer.Deferred())
        request.notifyFinish().addBoth(lambda _: done.callback((written(), self.reactor.seconds() - started)))

    def do_a2a(self, request, rpc):
        message = rpc["params"]["message"]
        task_ = {"id": message["taskId"], "contextId": message.get("contextId"), "status": {"state": "TASK_STATE_WORKING"}}
        return self._json(request, {"jsonrpc": "2.0", "id": rpc["id"], "result": {"task": task_}})

    def do_echo(self, request, rpc):
        # A careless endpoint that quotes back the credentials it was sent.
        quoted = f"{request.getHeader('authorization')} / {request.getHeader('x-api-key')}"
        error = {"code": -32001, "message": f"rejected credentials: {quoted}"}
        return self._json(request, {"jsonrpc": "2.0", "id": rpc["id"], "error": error})

    def do_hang(self, request, rpc):
        self._watch(request)
        return server.NOT_DONE_YET

    def do_redirect(self, request, rpc):
        request.setResponseCode(302)
        request.setHeader(b"location", self.elsewhere.encode())
        return b""

    def _stream(self, request, declared):
        # 10 MB of JSON-looking padding, 64 KiB every 5 ms: all of it would
        # take 0.8 s; the daemon must cut it at its bound well before.
        request.setHeader(b"content-type", b"application/json")
        if declared:
            request.setHeader(b"content-length", str(TEN_MB).encode())
        sent = [0]
        ended = []
        request.notifyFinish().addBoth(ended.append)

        def more():
            if ended:
                loop.stop()
            elif sent[0] >= TEN_MB:
                loop.stop()
                request.finish()
            else:
                request.write(b" " * CHUNK)
                sent[0] += CHUNK

        loop = task.LoopingCall(more)
        loop.clock = self.reactor
        self._watch(request, lambda: sent[0])
        loop.start(0.005)
        return server.NOT_DONE_YET

    def do_big(self, request, rpc):
        return self._stream(request, declared=False)

    def do_big_declared(self, request, rpc):
        return self._stream(request, declared=True)


def serve_endpoint(reactor):
    endpoint = A2aEndpoint(reactor)
    site = server.Site(endpoint)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return endpoint, port


def url(port, path):
    return f"http://127.0.0.1:{port.getHost().port}/{path}"


# -- A2UI payloads -----------------------------------------------------------------------


def create(sid):
    return {"version": "v0.9", "createSurface": {"surfaceId": sid, "catalogId": BASIC_CATALOG}}


def components(sid, extra_children=(), extra=()):
    return {"version": "v0.9", "updateComponents": {"surfaceId": sid, "components": [
        {"id": "root", "component": "Column", "children": ["title", "go", *extra_children]},
        {"id": "title", "component": "Text", "text": "Deploy to production?"},
        {"id": "go", "component": "Button", "child": "label", "action": {"event": {"name": "deploy"}}},
        {"id": "label", "component": "Text", "text": "Deploy"},
        *extra,
    ]}}


def a2a_task(sid, task_id, context_id):
    """An A2A v1.0 Task waiting for input, its status message carrying the surface as an A2UI data part."""
    return {
        "id": task_id,
        "contextId": context_id,
        "status": {
            "state": "TASK_STATE_INPUT_REQUIRED",
            "message": {
                "messageId": f"msg-{task_id}",
                "role": "ROLE_AGENT",
                "taskId": task_id,
                "contextId": context_id,
                "parts": [
                    {"text": "Please confirm."},
                    {"data": [create(sid), components(sid)], "mediaType": "application/json",
                     "metadata": {"mimeType": "application/json+a2ui"}},
                ],
            },
        },
    }


# -- clients -----------------------------------------------------------------------------


class Conn:
    """One authenticated (and handshaken) connection of the test."""

    def __init__(self, client):
        self.client = client

    async def call(self, method, params=None):
        reply = await self.client.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    async def error(self, method, params=None):
        reply = await self.client.call(method, params)
        assert "error" in reply, reply
        return reply["error"]

    def notified(self, method):
        return [n["params"] for n in self.client.notifications if n["method"] == method]

    def a2ui_events(self, kind=None):
        return [e for e in self.notified("a2ui.event") if kind is None or e["kind"] == kind]

    def host_events(self, kind=None):
        return [e for e in self.notified("host.event") if kind is None or e["kind"] == kind]

    def wait(self, found, what):
        return self.client.when(found, what)

    def everything(self):
        """Every frame this connection received, as text."""
        return "\n".join([json.dumps(m) for m in self.client.received] + [repr(b) for b in self.client.binary])


async def connect(server, handshake=True):
    client = await server.client("tcp")
    await client.authenticate(handshake=handshake)
    return Conn(client)


async def marker_seen(writer, watcher, sid):
    """Apply a fresh surface and wait until the watcher has its event: all earlier events have arrived too."""
    await writer.call("a2ui.apply", create(sid))
    await watcher.wait(
        lambda: [e for e in watcher.a2ui_events("a2ui.surface_updated") if e["result"]["surfaceId"] == sid],
        f"the a2ui.event for {sid}",
    )


@pytest.fixture
def daemon_log():
    """Every log event while the test runs: formatted (with tracebacks) and as raw dicts."""
    lines = []

    def observe(event):
        lines.append(formatEvent(event) or "")
        failure = event.get("log_failure")
        if failure is not None:
            lines.append(failure.getTraceback())
        lines.append(repr(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def assert_no_secret(where, text):
    for secret in SECRETS:
        assert secret not in text, f"a route secret appears in {where}"


def assert_log_clean(daemon_log):
    gc.collect()  # unhandled Deferred failures are logged when collected
    assert any(line.startswith("CAR daemon listening on tcp:") for line in daemon_log), "the daemon's log was not captured"
    for i, line in enumerate(daemon_log):
        assert_no_secret(f"daemon log event #{i}", line)


# -- 1 and 2: continuations with credentials, and where the credentials are not --------------


@pytest_twisted.ensureDeferred
async def test_actions_continue_the_a2a_task_with_their_credentials_and_nothing_else_carries_them(reactor, tmp_path, daemon_log):
    """
    An agent ingests two A2A tasks whose surfaces route to a loopback
    endpoint, one with bearer credentials and one with a custom header; a
    renderer lists, gets and replays them and acts on each (``action``
    alias and ``name``).  The endpoint receives each SendMessage with the
    right header and the action as ``{a2uiAction}``; the RPC answers
    ``{event, route}`` with ``route.delivered``.  No frame sent to any
    client, no host event and no log event carries either secret.
    """
    endpoint, port = serve_endpoint(reactor)
    server = await start_server(reactor, tmp_path)
    try:
        agent = await connect(server)
        renderer = await connect(server)
        watcher = await connect(server)
        host = await connect(server)
        assert await watcher.call("a2ui/subscribe") == {"subscribed": True}
        snapshot = await host.call("host.subscribe")
        assert snapshot["subscribed"] is True

        a2a_url = url(port, "a2a")
        routes = {
            "deploy-bearer": ("task-bearer-1", "ctx-bearer-1", {"type": "bearer", "token": BEARER_SECRET}),
            "deploy-header": ("task-header-1", "ctx-header-1", {"type": "header", "name": "X-Api-Key", "value": HEADER_SECRET}),
        }
        for sid, (task_id, context_id, auth) in routes.items():
            ingested = await agent.call(
                "a2ui.ingest", {"payload": a2a_task(sid, task_id, context_id), "endpoint": a2a_url, "routeAuth": auth}
            )
            applied = ingested["applied"]
            assert [(r["surfaceId"], r["deleted"]) for r in applied] == [(sid, False), (sid, False)]
            surface = applied[-1]["surface"]
            assert [c["id"] for c in surface["components"]] == ["root", "title", "go", "label"]
            assert surface["owner"] == {"kind": "a2a", "taskId": task_id, "contextId": context_id, "endpoint": a2a_url}

        # Every change reached the subscriber, and the host as host events.
        updates = await watcher.wait(
            lambda: (lambda found: found if len(found) == 4 else None)(watcher.a2ui_events("a2ui.surface_updated")),
            "four surface updates",
        )
        assert [e["result"]["surfaceId"] for e in updates] == ["deploy-bearer"] * 2 + ["deploy-header"] * 2
        assert updates[-1]["result"] == applied[-1]
        await host.wait(lambda: len(host.host_events("a2ui.surface_updated")) == 4, "four host events")

        # The renderer reads the surfaces three ways.
        listed = await renderer.call("a2ui.surfaces")
        assert [s["surfaceId"] for s in listed] == ["deploy-bearer", "deploy-header"]
        for surface in listed:
            assert await renderer.call("a2ui.get", {"surface_id": surface["surfaceId"]}) == surface
            assert await renderer.call("a2ui/replay", {"surfaceId": surface["surfaceId"]}) == surface
            assert set(surface) == {"surfaceId", "catalogId", "components", "dataModel", "createdAt", "updatedAt",
                                    "expiresAt", "sendDataModel", "owner"}
        assert await renderer.call("a2ui.get", {"surfaceId": "no-such-surface"}) is None

        # Each surface acted on twice: the web renderer's ``action`` alias, then ``name``.
        acted = []
        for sid, (task_id, context_id, auth) in routes.items():
            for key in ("action", "name"):
                action = {key: "deploy", "surfaceId": sid, "sourceComponentId": "go",
                          "timestamp": "2026-12-02T10:00:00Z", "context": {"env": "prod", "via": key}}
                reply = await renderer.call("a2ui.action", action)
                assert reply["route"] == {
                    "kind": "a2a", "endpoint": a2a_url, "delivered": True, "status": 200,
                    "resultKind": "task", "taskState": "TASK_STATE_WORKING",
                }, reply
                event = reply["event"]
                assert event["kind"] == "a2ui.action"
                assert event["payload"]["route"] == reply["route"]
                assert event["payload"]["surfaceId"] == sid
                assert event["payload"]["owner"]["taskId"] == task_id
                acted.append((sid, task_id, context_id, auth, key))

        assert len(endpoint.received) == 4
        for (path, headers, rpc), (sid, task_id, context_id, auth, key) in zip(endpoint.received, acted):
            assert path == "/a2a"
            if auth["type"] == "bearer":
                assert headers["authorization"] == [f"Bearer {BEARER_SECRET}"]
                assert "x-api-key" not in headers
            else:
                assert headers["x-api-key"] == [HEADER_SECRET]
                assert "authorization" not in headers
            assert headers["a2a-version"] == ["1.0"] and headers["content-type"] == ["application/json"]
            assert rpc["jsonrpc"] == "2.0" and rpc["method"] == "SendMessage"
            message = rpc["params"]["message"]
            assert rpc["params"]["configuration"] == {"returnImmediately": True}
            assert (message["role"], message["taskId"], message["contextId"]) == ("ROLE_USER", task_id, context_id)
            assert message["parts"] == [{
                "data": {"a2uiAction": {"name": "deploy", "surfaceId": sid, "sourceComponentId": "go",
                                        "timestamp": "2026-12-02T10:00:00Z", "context": {"env": "prod", "via": key}}},
                "mediaType": "application/json",
            }]

        # The subscriber saw each action without its route; the host saw the route.
        actions = await watcher.wait(
            lambda: (lambda found: found if len(found) == 4 else None)(watcher.a2ui_events("a2ui.action")),
            "four a2ui.action events",
        )
        for event, (sid, task_id, context_id, _, key) in zip(actions, acted):
            assert set(event["result"]) == {"surfaceId", "action", "owner"}
            assert event["result"]["action"]["name"] == "deploy" and "action" not in event["result"]["action"]
            assert event["result"]["owner"] == {"kind": "a2a", "taskId": task_id, "contextId": context_id, "endpoint": a2a_url}
        recorded = await host.wait(
            lambda: (lambda found: found if len(found) == 4 else None)(host.host_events("a2ui.action")),
            "four host a2ui.action events",
        )
        assert all(e["payload"]["route"]["delivered"] is True for e in recorded)

        # An endpoint that quotes the credentials back: the error is scrubbed.
        echo_url = url(port, "echo")
        for sid, auth in (("echo-bearer", routes["deploy-bearer"][2]), ("echo-header", routes["deploy-header"][2])):
            await agent.call("a2ui.ingest", {"payload": a2a_task(sid, f"task-{sid}", "ctx-echo"),
                                             "endpoint": echo_url, "routeAuth": auth})
            reply = await renderer.call("a2ui.action", {"name": "deploy", "surfaceId": sid})
            route = reply["route"]
            assert route["delivered"] is False and route["rpcErrorCode"] == -32001, route
            assert route["error"].startswith("endpoint answered JSON-RPC error -32001: rejected credentials")
            assert "[redacted]" in route["error"]
        assert [r[1].get("authorization", r[1].get("x-api-key")) for r in endpoint.received[4:]] == [
            [f"Bearer {BEARER_SECRET}"], [HEADER_SECRET]
        ]

        # Deleting and reaping surfaces, then the renderer's report.
        await agent.call("a2ui.apply", {"deleteSurface": {"surfaceId": "echo-bearer"}})
        assert await agent.call("a2ui.reap") == {"removed": []}
        await renderer.call("a2ui.render_report", {"surfaceId": "deploy-bearer", "rendered": True})
        await marker_seen(agent, watcher, "marker-1")

        recent = await host.call("host.events", {"limit": 100})
        sweep = {
            "the a2ui/subscribe'd client's frames": watcher.everything(),
            "the host.subscribe'd client's frames": host.everything(),
            "the renderer's frames": renderer.everything(),
            "the agent's frames": agent.everything(),
            "host.events": json.dumps(recent),
            "the daemon's host events": json.dumps([e.to_wire() for e in server.state.host.events]),
        }
        assert len(recent["events"]) >= 4 + 4 + 2
        for where, text in sweep.items():
            assert_no_secret(where, text)
        for conn in (agent, renderer, watcher, host):
            conn.client.drop()
    finally:
        await server.stop()
        await port.stopListening()
    assert_log_clean(daemon_log)


@pytest_twisted.ensureDeferred
async def test_refused_route_auth_never_repeats_the_secret(reactor, tmp_path, daemon_log):
    """
    Ingests whose routeAuth is refused (a bad header name, a refused
    header, a bearer token with a space) answer -32602 without the secret,
    store nothing and broadcast nothing; sent as notifications they store
    nothing and log nothing that carries it.
    """
    server = await start_server(reactor, tmp_path)
    try:
        agent = await connect(server)
        watcher = await connect(server)
        host = await connect(server)
        await watcher.call("a2ui/subscribe")
        await host.call("host.subscribe")
        endpoint = "http://127.0.0.1:9/a2a"
        refused = [
            ({"type": "header", "name": "X Api Key", "value": HEADER_SECRET}, "routeAuth.name"),
            ({"type": "header", "name": "X-Api-Key:", "value": HEADER_SECRET}, "routeAuth.name"),
            ({"type": "header", "name": "Host", "value": HEADER_SECRET}, "routeAuth.name"),
            ({"type": "header", "name": "Proxy-Authorization", "value": f"Bearer {BEARER_SECRET}"}, "routeAuth.name"),
            ({"type": "header", "name": "X-Api-Key", "value": f" {HEADER_SECRET}"}, "routeAuth.value"),
            ({"type": "header", "name": "X-Api-Key", "value": f"{HEADER_SECRET}\r\nX-Injected: 1"}, "routeAuth.value"),
            ({"type": "bearer", "token": f"{BEARER_SECRET} trailing"}, "routeAuth.token"),
            ({"type": "basic", "token": BEARER_SECRET}, "routeAuth.type"),
        ]
        for i, (auth, field) in enumerate(refused):
            params = {"payload": a2a_task(f"refused-{i}", f"task-r{i}", "ctx-r"), "endpoint": endpoint, "routeAuth": auth}
            error = await agent.error("a2ui.ingest", params)
            assert error["code"] == -32602, error
            if field is not None:
                assert error["data"]["field"] == field, error
            assert_no_secret(f"the error for {auth}", json.dumps(error))
            # The same call as a notification: no answer, nothing stored, nothing logged with the secret.
            agent.client.send_raw(json.dumps({"jsonrpc": "2.0", "method": "a2ui.ingest", "params": params}))
        assert await agent.call("a2ui.surfaces") == []
        await marker_seen(agent, watcher, "marker-2")
        assert [e["result"]["surfaceId"] for e in watcher.a2ui_events()] == ["marker-2"]
        await host.wait(lambda: host.host_events(), "the marker's host event")
        assert [(e["kind"], e["payload"]["surfaceId"]) for e in host.host_events()] == [("a2ui.surface_updated", "marker-2")]
        recent = await host.call("host.events", {"limit": 100})
        for where, text in {
            "the agent's frames": agent.everything(),
            "the subscriber's frames": watcher.everything(),
            "the host's frames": host.everything(),
            "host.events": json.dumps(recent),
        }.items():
            assert_no_secret(where, text)
        for conn in (agent, watcher, host):
            conn.client.drop()
    finally:
        await server.stop()
    assert_log_clean(daemon_log)


# -- 3: endpoints that misbehave ---------------------------------------------------------------


async def act_on(agent, renderer, endpoint_url, sid):
    await agent.call("a2ui.ingest", {"payload": a2a_task(sid, f"task-{sid}", f"ctx-{sid}"), "endpoint": endpoint_url,
                                     "routeAuth": {"type": "bearer", "token": BEARER_SECRET}})
    started = renderer.client.reactor.seconds()
    reply = await renderer.call("a2ui.action", {"name": "deploy", "surfaceId": sid, "sourceComponentId": "go"})
    return reply, renderer.client.reactor.seconds() - started


@pytest_twisted.ensureDeferred
async def test_hanging_redirecting_and_flooding_endpoints_are_reported_in_bounds(reactor, tmp_path, daemon_log, monkeypatch):
    """
    With a 1 s continuation timeout: a hanging endpoint is given up on
    (and its connection closed) after about 1 s, a 302 is reported and
    not followed, and a 10 MB answer (chunked or with its length
    declared) is cut at the 1 MiB bound; each action answers promptly
    with ``route.delivered: false`` and an error, and the daemon stays
    responsive.
    """
    monkeypatch.setattr(a2ui_methods, "DEFAULT_TIMEOUT", SHORT_TIMEOUT)
    monkeypatch.setattr(a2ui_methods, "send_continuation",
                        functools.partial(continuation.send_continuation, timeout=SHORT_TIMEOUT))
    endpoint, port = serve_endpoint(reactor)
    other, other_port = serve_endpoint(reactor)
    endpoint.elsewhere = url(other_port, "a2a")
    server = await start_server(reactor, tmp_path)
    try:
        agent = await connect(server)
        renderer = await connect(server)
        host = await connect(server)
        await host.call("host.subscribe")

        reply, took = await act_on(agent, renderer, url(port, "hang"), "hang")
        assert reply["route"] == {"kind": "a2a", "endpoint": url(port, "hang"), "delivered": False,
                                  "error": "no answer within 1s; the request was cancelled"}, reply
        assert SHORT_TIMEOUT * 0.9 <= took < SHORT_TIMEOUT + 2.0, took
        _, open_for = await endpoint.finished["/hang"]  # the endpoint saw its connection go
        assert open_for < SHORT_TIMEOUT + 2.0

        reply, took = await act_on(agent, renderer, url(port, "redirect"), "redirect")
        assert reply["route"] == {
            "kind": "a2a", "endpoint": url(port, "redirect"), "delivered": False, "status": 302,
            "error": "endpoint answered a redirect (HTTP 302); continuations never follow redirects",
        }, reply
        assert took < 2.0, took
        assert other.received == []  # the redirect's target never heard of it

        for path in ("big", "big-declared"):
            reply, took = await act_on(agent, renderer, url(port, path), path)
            route = reply["route"]
            assert route["delivered"] is False, route
            if path == "big":
                assert route["error"] == f"endpoint answered more than {continuation.DEFAULT_MAX_RESPONSE_BYTES} bytes; the answer was cut there"
            else:
                assert route["error"] == (f"endpoint answered HTTP 200 with {TEN_MB} bytes, "
                                          f"more than the {continuation.DEFAULT_MAX_RESPONSE_BYTES} allowed")
            assert took < 2.0, (path, took)
            written, _ = await endpoint.finished[f"/{path}"]
            assert written < TEN_MB, (path, written)  # the connection closed long before it all went

        assert [p for p, _, _ in endpoint.received] == ["/hang", "/redirect", "/big", "/big-declared"]
        assert all(h["authorization"] == [f"Bearer {BEARER_SECRET}"] for _, h, _ in endpoint.received)
        # Recorded for the host with the outcome, and the daemon still answers at once.
        recorded = await host.wait(
            lambda: (lambda found: found if len(found) == 4 else None)(host.host_events("a2ui.action")), "four actions"
        )
        assert [e["payload"]["route"]["delivered"] for e in recorded] == [False] * 4
        assert len(await renderer.call("a2ui.surfaces")) == 4
        for where, text in {"renderer": renderer.everything(), "host": host.everything(), "agent": agent.everything()}.items():
            assert_no_secret(where, text)
        for conn in (agent, renderer, host):
            conn.client.drop()
    finally:
        await server.stop()
        await port.stopListening()
        await other_port.stopListening()
    assert_log_clean(daemon_log)


@pytest_twisted.ensureDeferred
async def test_hanging_endpoint_with_the_default_timeout(reactor, tmp_path, daemon_log):
    """Unpatched: the action answers after the 10 s default, inside its own RPC deadline, undelivered."""
    endpoint, port = serve_endpoint(reactor)
    server = await start_server(reactor, tmp_path)
    try:
        agent = await connect(server)
        renderer = await connect(server)
        reply, took = await act_on(agent, renderer, url(port, "hang"), "hang-default")
        assert reply["route"] == {"kind": "a2a", "endpoint": url(port, "hang"), "delivered": False,
                                  "error": f"no answer within {continuation.DEFAULT_TIMEOUT:g}s; the request was cancelled"}
        assert continuation.DEFAULT_TIMEOUT * 0.95 <= took < continuation.DEFAULT_TIMEOUT + 3.0, took
        await endpoint.finished["/hang"]
        for conn in (agent, renderer):
            conn.client.drop()
    finally:
        await server.stop()
        await port.stopListening()
    assert_log_clean(daemon_log)


# -- 4: endpoints off this host -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_non_loopback_endpoint_needs_the_opt_in(reactor, tmp_path):
    """
    ``http://192.0.2.1/a2a`` (TEST-NET-1) and names that only look like
    loopback are refused with -32602 unless ``allowUntrustedEndpoint``;
    with it the route is recorded.  Nothing is ever sent there: these
    surfaces are ingested, never acted on.
    """
    server = await start_server(reactor, tmp_path)
    try:
        agent = await connect(server)
        watcher = await connect(server)
        await watcher.call("a2ui/subscribe")
        remote = "http://192.0.2.1/a2a"
        auth = {"type": "bearer", "token": BEARER_SECRET}
        for bad in (remote, "http://127.0.0.1.example.com/a2a", "http://localhost./a2a", "http://2130706433/a2a",
                    "http://[::ffff:127.0.0.1]/a2a"):
            for allow in ({}, {"allowUntrustedEndpoint": False}):
                error = await agent.error("a2ui.ingest", {"payload": a2a_task("remote", "task-remote", "ctx-remote"),
                                                          "endpoint": bad, "routeAuth": auth, **allow})
                assert error["code"] == -32602 and error["data"]["field"] == "endpoint", (bad, error)
                assert "allowUntrustedEndpoint" in error["message"]
        owner_remote = {"kind": "a2a", "taskId": "task-remote", "endpoint": remote}
        error = await agent.error("a2ui.ingest", {"payload": a2a_task("remote", "task-remote", "ctx-remote"), "owner": owner_remote})
        assert error["code"] == -32602 and error["data"]["field"] == "owner.endpoint", error
        error = await agent.error("a2ui.ingest", {"payload": a2a_task("remote", "t", "c"), "endpoint": remote,
                                                  "allowUntrustedEndpoint": "yes"})
        assert error["code"] == -32602 and error["data"]["field"] == "allowUntrustedEndpoint", error
        assert await agent.call("a2ui.surfaces") == []

        opted = await agent.call("a2ui.ingest", {"payload": a2a_task("remote", "task-remote", "ctx-remote"),
                                                 "endpoint": remote, "routeAuth": auth, "allowUntrustedEndpoint": True})
        assert opted["applied"][-1]["surface"]["owner"] == {"kind": "a2a", "taskId": "task-remote",
                                                            "contextId": "ctx-remote", "endpoint": remote}
        owned = await agent.call("a2ui.ingest", {"payload": a2a_task("remote-owner", "x", "y"), "owner": owner_remote,
                                                 "allowUntrustedEndpoint": True})
        assert owned["applied"][-1]["surface"]["owner"] == owner_remote
        updates = await watcher.wait(
            lambda: (lambda found: found if len(found) == 4 else None)(watcher.a2ui_events("a2ui.surface_updated")),
            "the opted-in surfaces' events",
        )
        assert [e["result"]["surfaceId"] for e in updates] == ["remote", "remote", "remote-owner", "remote-owner"]
        assert [s["surfaceId"] for s in await agent.call("a2ui.surfaces")] == ["remote", "remote-owner"]
        # Deleting them drops their routes: nothing is left that could reach that host.
        for sid in ("remote", "remote-owner"):
            await agent.call("a2ui.apply", {"deleteSurface": {"surfaceId": sid}})
        assert len(server.state.methods.get("a2ui.apply").handler.__self__.vault) == 0
        assert_no_secret("the agent's frames", agent.everything())
        for conn in (agent, watcher):
            conn.client.drop()
    finally:
        await server.stop()


# -- 5: validation over the wire -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_invalid_messages_are_refused_with_a_reason_and_never_broadcast(reactor, tmp_path):
    """
    An unknown component, a dangling child, a cycle, an unknown catalog
    and an update to a missing surface are refused with -32602 and
    ``data.reason``, through ``a2ui.apply`` and through ``a2ui.ingest``;
    the subscriber gets no a2ui.event for any of them and the stored
    surface is unchanged.
    """
    server = await start_server(reactor, tmp_path)
    try:
        writer = await connect(server)
        watcher = await connect(server)
        await watcher.call("a2ui/subscribe")
        await writer.call("a2ui.apply", create("v1"))
        await writer.call("a2ui.apply", {"envelope": components("v1")})
        await watcher.wait(lambda: len(watcher.a2ui_events()) == 2, "the valid surface's two events")
        before = await writer.call("a2ui.get", {"surfaceId": "v1"})

        unknown = components("v1", extra_children=("blink",), extra=({"id": "blink", "component": "Marquee", "text": "!"},))
        dangling = components("v1", extra_children=("missing",))
        cycle = {"updateComponents": {"surfaceId": "v1", "components": [
            {"id": "box", "component": "Card", "child": "inner"},
            {"id": "inner", "component": "Column", "children": ["box"]},
            {"id": "root", "component": "Column", "children": ["box"]},
        ]}}
        catalog = {"createSurface": {"surfaceId": "v2", "catalogId": "https://example.com/my_catalog.json"}}
        missing = components("never-created")
        cases = [
            (unknown, "unsupported_component", {"component": "Marquee", "componentId": "blink"}),
            (dangling, "dangling_reference", {"missing": "missing"}),
            (cycle, "cycle", {}),
            (catalog, "unsupported_catalog", {}),
            (missing, "unknown_surface", {"surfaceId": "never-created"}),
        ]
        for message, reason, details in cases:
            for params in (message, {"envelope": message}):
                error = await writer.error("a2ui.apply", params)
                assert error["code"] == -32602 and error["data"]["reason"] == reason, error
                assert details.items() <= error["data"].items(), error
            # The same message as the only A2UI in an A2A payload.
            error = await writer.error("a2ui.ingest", {"payload": {"parts": [{"data": message}], "taskId": "t", "messageId": "m"}})
            assert error["code"] == -32602 and error["data"]["reason"] == reason, error

        assert await writer.call("a2ui.get", {"surfaceId": "v1"}) == before
        assert await writer.call("a2ui.get", {"surfaceId": "v2"}) is None
        await marker_seen(writer, watcher, "marker-5")
        assert [(e["kind"], e["result"]["surfaceId"]) for e in watcher.a2ui_events()] == [
            ("a2ui.surface_updated", "v1"), ("a2ui.surface_updated", "v1"), ("a2ui.surface_updated", "marker-5"),
        ]
        assert [e.kind for e in server.state.host.events] == ["a2ui.surface_updated"] * 3
        for conn in (writer, watcher):
            conn.client.drop()
    finally:
        await server.stop()
