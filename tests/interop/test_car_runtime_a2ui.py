"""
Interop: a2ui.* with the real ``car-runtime`` 0.58.0 client against a
live ``twist car`` daemon.

The generated wrappers (``rt.a2ui_apply``, ``a2ui_surfaces``, ``a2ui_get``,
``a2ui_replay``, ``a2ui_action``, ``a2ui_subscribe``, ...) send their JSON
verbatim; ``a2ui.event`` notifications reach a handler registered with
``register_daemon_notification_handler``.  The module-level functions
(``car_runtime.a2ui_apply(rt, envelope_json)``, ``a2ui_capabilities(rt)``,
``a2ui_surfaces(rt)``, ``a2ui_reap(rt)``, ``a2ui_get(rt, id)``,
``a2ui_ingest(rt, json)``, ``a2ui_action(rt, json)``) reach the daemon
too; ``a2ui_capabilities``, ``a2ui_surfaces`` and ``a2ui_reap`` send
``"params": null``.

A surface ingested with a loopback ``endpoint`` and bearer ``routeAuth``
is continued, when acted on, at a small A2A endpoint served by this
process (``http.server`` on a thread): it checks what arrived.

The daemon fixtures come from ``test_car_runtime``.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

car_runtime = pytest.importorskip("car_runtime")

from test_car_runtime import (  # noqa: E402,F401  (fixtures are used by name)
    Daemon,
    Inbox,
    client_env,
    daemon,
    start_daemon,
)

TIMEOUT = 15.0
BASIC_CATALOG = "https://a2ui.org/specification/v0_9/basic_catalog.json"
ROUTE_SECRET = "InteropRouteSecret4d9a7c2e1f8b6d3a"


class A2uiEvents(Inbox):
    """``a2ui.event`` notifications as the client's handler receives them (on its own thread); waitable."""

    def __init__(self, rt: Any) -> None:
        super().__init__(rt, "a2ui.event", TIMEOUT)

    def count(self, kind: str, n: int) -> list[dict[str, Any]]:
        """Wait until C{n} events of C{kind} have arrived; the first C{n}."""

        def found(items: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            of_kind = [e for e in items if e["kind"] == kind]
            return of_kind[:n] if len(of_kind) >= n else None

        return self.wait(found, f"{n} {kind} event(s)")

    def kinds(self, kind: str, surface_id: str | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self.snapshot()
            if e["kind"] == kind and (surface_id is None or e["result"].get("surfaceId") == surface_id)
        ]


class A2aEndpoint:
    """A loopback A2A endpoint on a thread: answers SendMessage with a working task and records what it got."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                rpc = json.loads(body)
                owner.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, rpc))
                task = {"id": rpc["params"]["message"]["taskId"], "status": {"state": "TASK_STATE_WORKING"}}
                answer = json.dumps({"jsonrpc": "2.0", "id": rpc["id"], "result": {"task": task}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/a2a"


@pytest.fixture
def a2a_endpoint() -> Iterator[A2aEndpoint]:
    endpoint = A2aEndpoint()
    endpoint.thread.start()
    yield endpoint
    endpoint.server.shutdown()
    endpoint.server.server_close()


def create(sid: str) -> dict[str, Any]:
    return {"version": "v0.9", "createSurface": {"surfaceId": sid, "catalogId": BASIC_CATALOG}}


def components(sid: str, *extra_children: str) -> dict[str, Any]:
    return {"version": "v0.9", "updateComponents": {"surfaceId": sid, "components": [
        {"id": "root", "component": "Column", "children": ["title", "go", *extra_children]},
        {"id": "title", "component": "Text", "text": "Ship it?"},
        {"id": "go", "component": "Button", "child": "label", "action": {"event": {"name": "ship"}}},
        {"id": "label", "component": "Text", "text": "Ship"},
    ]}}


def j(value: Any) -> str:
    return json.dumps(value)


@pytest.mark.interop
def test_a2ui_through_the_generated_wrappers(daemon: Daemon, client_env, a2a_endpoint: A2aEndpoint):
    """
    a2ui_subscribe with a notification handler, a2ui_capabilities,
    a2ui_apply, a2ui_surfaces, a2ui_get, a2ui_replay, a2ui_ingest with a
    route, a2ui_action (local and A2A-owned), a2ui_render_report,
    a2ui_reap and a2ui_unsubscribe through ``rt.a2ui_*``; refused
    messages raise DaemonRpcError with ``data.reason`` and are not
    broadcast.
    """
    client_env(daemon)
    rt = car_runtime.CarRuntime()
    subscriber = car_runtime.CarRuntime()
    events = A2uiEvents(subscriber)
    assert json.loads(subscriber.a2ui_subscribe("{}")) == {"subscribed": True}

    caps = json.loads(rt.a2ui_capabilities("{}"))
    assert caps["version"] == "v0.9" and caps["mimeType"] == "application/json+a2ui"
    assert len(caps["components"]) == 24 and {"Column", "Text", "Button"} <= set(caps["components"])
    assert caps["limits"]["maxSurfaces"] > 0

    created = json.loads(rt.a2ui_apply(j(create("ship"))))
    assert created["surfaceId"] == "ship" and created["deleted"] is False and created["surface"]["components"] == []
    updated = json.loads(rt.a2ui_apply(j({"envelope": components("ship")})))
    assert [c["id"] for c in updated["surface"]["components"]] == ["root", "title", "go", "label"]
    pushed = events.count("a2ui.surface_updated", 2)
    assert [e["result"] for e in pushed] == [created, updated]

    [listed] = json.loads(rt.a2ui_surfaces("{}"))
    assert listed == updated["surface"]
    assert json.loads(rt.a2ui_get(j({"surface_id": "ship"}))) == listed
    assert json.loads(rt.a2ui_get(j({"surfaceId": "ship"}))) == listed
    assert json.loads(subscriber.a2ui_replay(j({"surfaceId": "ship"}))) == listed
    assert json.loads(rt.a2ui_get(j({"surface_id": "nothing-here"}))) is None

    # Refused messages: -32602 with data.reason, nothing broadcast.
    with pytest.raises(car_runtime.DaemonRpcError) as info:
        rt.a2ui_apply(j(components("ship", "missing")))
    assert info.value.code == -32602 and info.value.data["reason"] == "dangling_reference"
    with pytest.raises(car_runtime.DaemonRpcError) as info:
        rt.a2ui_apply(j({"updateComponents": {"surfaceId": "ship", "components": [{"id": "x", "component": "Marquee"}]}}))
    assert info.value.code == -32602 and info.value.data["reason"] == "unsupported_component"
    assert json.loads(rt.a2ui_get(j({"surface_id": "ship"}))) == listed

    # An action on a surface no A2A task owns: broadcast and recorded, routed nowhere.
    local = json.loads(rt.a2ui_action(j({"action": "ship", "surfaceId": "ship", "sourceComponentId": "go",
                                         "timestamp": "2026-12-02T00:00:00Z", "context": {"n": 1}})))
    assert local["route"] == {"kind": "none", "delivered": False}
    assert local["event"]["kind"] == "a2ui.action" and local["event"]["payload"]["action"]["name"] == "ship"
    [acted] = events.count("a2ui.action", 1)
    assert acted["result"] == {"surfaceId": "ship", "owner": None,
                               "action": {"name": "ship", "surfaceId": "ship", "sourceComponentId": "go",
                                          "timestamp": "2026-12-02T00:00:00Z", "context": {"n": 1}}}
    # The refused messages came before the action on this connection and were not broadcast.
    assert len(events.kinds("a2ui.surface_updated")) == 2

    # An A2A task's surface with a loopback route: the action continues the task.
    task = {"id": "task-7", "contextId": "ctx-7", "status": {"state": "TASK_STATE_INPUT_REQUIRED", "message": {
        "messageId": "msg-7", "role": "ROLE_AGENT",
        "parts": [{"data": [create("owned"), components("owned")], "mediaType": "application/json"}]}}}
    ingested = json.loads(rt.a2ui_ingest(j({"payload": task, "endpoint": a2a_endpoint.url,
                                            "routeAuth": {"type": "bearer", "token": ROUTE_SECRET}})))
    assert [r["surfaceId"] for r in ingested["applied"]] == ["owned", "owned"]
    owner = {"kind": "a2a", "taskId": "task-7", "contextId": "ctx-7", "endpoint": a2a_endpoint.url}
    assert ingested["applied"][-1]["surface"]["owner"] == owner
    routed = json.loads(rt.a2ui_action(j({"name": "ship", "surfaceId": "owned", "sourceComponentId": "go"})))
    assert routed["route"] == {"kind": "a2a", "endpoint": a2a_endpoint.url, "delivered": True, "status": 200,
                               "resultKind": "task", "taskState": "TASK_STATE_WORKING"}
    [(path, headers, rpc)] = a2a_endpoint.received
    assert path == "/a2a" and headers["authorization"] == f"Bearer {ROUTE_SECRET}"
    assert rpc["method"] == "SendMessage" and rpc["params"]["message"]["taskId"] == "task-7"
    assert rpc["params"]["message"]["parts"][0]["data"] == {
        "a2uiAction": {"name": "ship", "surfaceId": "owned", "sourceComponentId": "go"}
    }
    owned_action = events.count("a2ui.action", 2)[1]
    assert owned_action["result"]["owner"] == owner and "route" not in owned_action["result"]

    report = json.loads(rt.a2ui_render_report(j({"surfaceId": "owned", "rendered": True, "ms": 12})))
    assert report["recorded"] is True and report["event"]["kind"] == "a2ui.render_report"
    [reported] = events.count("a2ui.render_report", 1)
    assert reported["result"] == {"surfaceId": "owned", "rendered": True, "ms": 12}
    assert json.loads(rt.a2ui_reap("{}")) == {"removed": []}

    deleted = json.loads(rt.a2ui_apply(j({"deleteSurface": {"surfaceId": "owned"}})))
    assert deleted == {"surfaceId": "owned", "deleted": True}
    [gone] = events.count("a2ui.surface_deleted", 1)
    assert gone["result"] == deleted
    for event in events.snapshot():
        assert ROUTE_SECRET not in json.dumps(event)

    # Unsubscribed: later changes are not pushed to this connection.
    assert json.loads(subscriber.a2ui_unsubscribe("{}")) == {"subscribed": False}
    seen = len(events.snapshot())
    rt.a2ui_apply(j(create("after")))
    subscriber.a2ui_surfaces("{}")  # a round trip on the unsubscribed connection
    time.sleep(0.2)
    assert len(events.snapshot()) == seen
    rt.close()
    subscriber.close()


@pytest.mark.interop
def test_a2ui_through_the_module_level_functions(daemon: Daemon, client_env, a2a_endpoint: A2aEndpoint):
    """
    ``car_runtime.a2ui_*(rt, ...)`` reach the daemon: capabilities,
    surfaces and reap (which send null params), apply, get, ingest and
    action; a subscriber on another connection is pushed surface_updated
    and a2ui.action events for them.
    """
    client_env(daemon)
    rt = car_runtime.CarRuntime()
    subscriber = car_runtime.CarRuntime()
    events = A2uiEvents(subscriber)
    assert json.loads(subscriber.a2ui_subscribe("{}")) == {"subscribed": True}

    caps = json.loads(car_runtime.a2ui_capabilities(rt))
    assert caps == json.loads(rt.a2ui_capabilities("{}"))
    assert caps["version"] == "v0.9" and len(caps["components"]) == 24
    assert json.loads(car_runtime.a2ui_surfaces(rt)) == []
    assert json.loads(car_runtime.a2ui_reap(rt)) == {"removed": []}

    created = json.loads(car_runtime.a2ui_apply(rt, j(create("mod"))))
    assert created["surfaceId"] == "mod" and created["deleted"] is False
    updated = json.loads(car_runtime.a2ui_apply(rt, j(components("mod"))))
    assert [c["id"] for c in updated["surface"]["components"]] == ["root", "title", "go", "label"]
    # In the daemon's store, not a store of the client's own.
    [listed] = json.loads(rt.a2ui_surfaces("{}"))
    assert listed == updated["surface"]
    assert json.loads(car_runtime.a2ui_surfaces(rt)) == [listed]
    assert json.loads(car_runtime.a2ui_get(rt, "mod")) == listed
    assert json.loads(car_runtime.a2ui_get(rt, "nothing-here")) is None
    # The module-level functions raise RuntimeError("<code> <message>"), not DaemonRpcError.
    with pytest.raises(RuntimeError, match="^-32602 component 'root' refers to 'missing', which does not exist$"):
        car_runtime.a2ui_apply(rt, j(components("mod", "missing")))

    pushed = events.count("a2ui.surface_updated", 2)
    assert [e["result"] for e in pushed] == [created, updated]

    acted = json.loads(car_runtime.a2ui_action(rt, j({"surface_id": "mod", "name": "ship", "source_component_id": "go"})))
    assert acted["route"] == {"kind": "none", "delivered": False}
    assert acted["event"]["kind"] == "a2ui.action"
    [action] = events.count("a2ui.action", 1)
    assert action["result"]["surfaceId"] == "mod" and action["result"]["action"]["name"] == "ship"

    task = {"id": "task-m", "contextId": "ctx-m", "status": {"state": "TASK_STATE_INPUT_REQUIRED", "message": {
        "messageId": "msg-m", "role": "ROLE_AGENT", "parts": [{"data": {"a2ui": create("mod-owned")}}]}}}
    ingested = json.loads(car_runtime.a2ui_ingest(rt, j({"payload": task, "endpoint": a2a_endpoint.url,
                                                          "routeAuth": {"type": "bearer", "token": ROUTE_SECRET}})))
    [applied] = ingested["applied"]
    assert applied["surface"]["owner"] == {"kind": "a2a", "taskId": "task-m", "contextId": "ctx-m", "endpoint": a2a_endpoint.url}
    routed = json.loads(car_runtime.a2ui_action(rt, j({"surface_id": "mod-owned", "name": "ship"})))
    assert routed["route"]["delivered"] is True, routed
    [(_, headers, rpc)] = a2a_endpoint.received
    assert headers["authorization"] == f"Bearer {ROUTE_SECRET}"
    assert rpc["params"]["message"]["taskId"] == "task-m"
    assert rpc["params"]["message"]["parts"][0]["data"]["a2uiAction"]["name"] == "ship"
    events.count("a2ui.action", 2)
    events.wait(lambda items: events.kinds("a2ui.surface_updated", "mod-owned"), "the ingested surface's event")
    assert all(ROUTE_SECRET not in json.dumps(e) for e in events.snapshot())
    rt.close()
    subscriber.close()
