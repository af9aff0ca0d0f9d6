"""
a2ui.* through the real dispatcher on a Clock: apply broadcasts only what
was stored, ingest records owners and routes (loopback unless opted in),
actions reach subscribers, host events and the A2A owner, credentials are
never in a reply or an event, subscriptions end with their connection.
"""

import json

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from car_twisted.a2ui.continuation import RouteOutcome
from car_twisted.methods import a2ui as a2ui_methods
from support import TOKEN, DispatchConn, make_state

SECRET = "s3cr3t-bearer-value-0123456789"
HEADER_SECRET = "hdr-value-abcdef-42"


class Conn(DispatchConn):
    """Keeps the notifications that arrive between replies."""

    def __init__(self, state):
        self.seen = []
        super().__init__(state, {"token": TOKEN})

    def call(self, method, params=None):
        rid = self.send(method, params)
        popped = self.sink.pop()
        self.seen += [m for m in popped if m.get("id") != rid]
        (reply,) = [m for m in popped if m.get("id") == rid]
        return reply

    def events(self, method="a2ui.event"):
        self.seen += self.sink.pop()
        return [m["params"] for m in self.seen if m.get("method") == method]


@pytest.fixture
def state(tmp_path):
    return make_state(tmp_path, Clock())


def create(sid="s1"):
    return {"version": "v0.9", "createSurface": {"surfaceId": sid, "catalogId": "https://a2ui.org/specification/v0_9/basic_catalog.json"}}


def components(sid="s1", extra=()):
    return {"version": "v0.9", "updateComponents": {"surfaceId": sid, "components": [
        {"id": "root", "component": "Column", "children": ["title", "go", *extra]},
        {"id": "title", "component": "Text", "text": "Deploy?"},
        {"id": "go", "component": "Button", "child": "label", "action": {"event": {"name": "deploy"}}},
        {"id": "label", "component": "Text", "text": "Go"},
    ]}}


def everything(state, *conns):
    frames = [json.dumps(m) for c in conns for m in c.seen + c.sink.messages()]
    frames += [json.dumps(e.to_wire()) for e in state.host.events]
    return "\n".join(frames)


def test_apply_broadcasts_what_was_stored_and_nothing_when_refused(state):
    writer, watcher = Conn(state), Conn(state)
    assert watcher.call("a2ui/subscribe")["result"] == {"subscribed": True}
    assert writer.call("a2ui.apply", create())["result"]["surfaceId"] == "s1"
    reply = writer.call("a2ui.apply", {"envelope": components()})["result"]
    assert [c["id"] for c in reply["surface"]["components"]] == ["root", "title", "go", "label"]
    kinds = [e["kind"] for e in watcher.events()]
    assert kinds == ["a2ui.surface_updated", "a2ui.surface_updated"]
    assert [e.kind for e in state.host.events][-2:] == ["a2ui.surface_updated", "a2ui.surface_updated"]
    before = writer.call("a2ui.get", {"surface_id": "s1"})["result"]
    bad = writer.call("a2ui.apply", components(extra=("missing",)))["error"]
    assert bad["code"] == -32602 and bad["data"]["reason"] == "dangling_reference"
    assert writer.call("a2ui.apply", {"version": "v0.9", "updateComponents": {"surfaceId": "s1", "components": [
        {"id": "x", "component": "Marquee"}]}})["error"]["data"]["reason"] == "unsupported_component"
    assert len(watcher.events()) == 2  # nothing more broadcast
    assert writer.call("a2ui/replay", {"surfaceId": "s1"})["result"] == before
    deleted = writer.call("a2ui.apply", {"deleteSurface": {"surfaceId": "s1"}})["result"]
    assert deleted == {"surfaceId": "s1", "deleted": True}
    assert watcher.events()[-1] == {"kind": "a2ui.surface_deleted", "result": deleted}
    assert writer.call("a2ui.get", {"surfaceId": "s1"})["result"] is None


def test_null_params_are_taken_where_the_client_sends_them(state):
    c = Conn(state)
    caps = c.call("a2ui.capabilities", None)["result"]
    assert len(caps["components"]) == 24 and caps["limits"]["maxSurfaces"] > 0
    assert c.call("a2ui.surfaces", None)["result"] == []
    assert c.call("a2ui.reap", None)["result"] == {"removed": []}


def a2a_payload(sid="t1"):
    return {"id": "task-9", "contextId": "ctx-3", "kind": "task", "status": {"state": "input-required", "message": {
        "role": "agent", "messageId": "m1", "parts": [{"kind": "data", "data": {"a2ui": create(sid)}},
                                                       {"kind": "data", "data": components(sid)}]}}}


def test_ingest_records_owner_and_keeps_the_route_server_side(state):
    c = Conn(state)
    c.call("a2ui/subscribe")
    refused = c.call("a2ui.ingest", {"payload": a2a_payload(), "endpoint": "https://agents.example.com/a2a"})["error"]
    assert refused["code"] == -32602 and refused["data"]["field"] == "endpoint"
    assert c.call("a2ui.surfaces")["result"] == []
    reply = c.call("a2ui.ingest", {"payload": a2a_payload(), "endpoint": "http://127.0.0.1:9/a2a",
                                   "routeAuth": {"type": "bearer", "token": SECRET}})["result"]
    assert [r["surfaceId"] for r in reply["applied"]] == ["t1", "t1"]
    owner = c.call("a2ui.get", {"surface_id": "t1"})["result"]["owner"]
    assert owner == {"kind": "a2a", "taskId": "task-9", "contextId": "ctx-3", "endpoint": "http://127.0.0.1:9/a2a"}
    opted = c.call("a2ui.ingest", {"payload": a2a_payload("t2"), "endpoint": "https://agents.example.com/a2a",
                                   "allowUntrustedEndpoint": True,
                                   "routeAuth": {"type": "header", "name": "X-Api-Key", "value": HEADER_SECRET}})
    assert "result" in opted
    bad_auth = c.call("a2ui.ingest", {"payload": a2a_payload("t3"), "endpoint": "http://127.0.0.1:9/",
                                      "routeAuth": {"type": "header", "name": "Host", "value": HEADER_SECRET}})["error"]
    assert bad_auth["code"] == -32602 and HEADER_SECRET not in json.dumps(bad_auth)
    c.call("a2ui.surfaces")
    assert SECRET not in everything(state, c) and HEADER_SECRET not in everything(state, c)


def test_action_reaches_subscribers_host_events_and_the_a2a_owner(state, monkeypatch):
    sent = []

    def fake_send(reactor, endpoint, auth, task_id, context_id, action, *rest):
        sent.append((endpoint, auth, task_id, context_id, action))
        return succeed(RouteOutcome(delivered=True, status=200, result_kind="task", task_state="working"))

    monkeypatch.setattr(a2ui_methods, "send_continuation", fake_send)
    agent, renderer, host = Conn(state), Conn(state), Conn(state)
    host.call("server.handshake", {"protocol_version": 3})
    host.call("host.subscribe")
    agent.call("a2ui/subscribe")
    agent.call("a2ui.ingest", {"payload": a2a_payload(), "endpoint": "http://127.0.0.1:9/a2a",
                               "routeAuth": {"type": "bearer", "token": SECRET}})
    action = {"action": "deploy", "surfaceId": "t1", "sourceComponentId": "go", "timestamp": "2026-12-02T00:00:00Z",
              "context": {"env": "prod"}}
    reply = renderer.call("a2ui.action", action)["result"]
    assert reply["route"] == {"kind": "a2a", "endpoint": "http://127.0.0.1:9/a2a", "delivered": True, "status": 200,
                              "resultKind": "task", "taskState": "working"}
    ((endpoint, auth, task_id, context_id, body),) = sent
    assert (endpoint, task_id, context_id) == ("http://127.0.0.1:9/a2a", "task-9", "ctx-3")
    assert auth.headers() == {b"Authorization": [f"Bearer {SECRET}".encode()]}
    assert body == {"surfaceId": "t1", "sourceComponentId": "go", "timestamp": "2026-12-02T00:00:00Z",
                    "context": {"env": "prod"}, "name": "deploy"}  # the sender wraps it as {"a2uiAction": ...}
    (broadcast,) = [e for e in agent.events() if e["kind"] == "a2ui.action"]
    assert broadcast["result"]["action"]["name"] == "deploy" and "route" not in broadcast["result"]
    (recorded,) = [e for e in host.events("host.event") if e["kind"] == "a2ui.action"]
    assert recorded["payload"]["route"]["delivered"] is True
    assert SECRET not in everything(state, agent, renderer, host)


def test_action_on_a_local_surface_and_bad_actions(state):
    c = Conn(state)
    c.call("a2ui.apply", create("local"))
    reply = c.call("a2ui.action", {"name": "ping", "surfaceId": "local"})["result"]
    assert reply["route"] == {"kind": "none", "delivered": False} and reply["event"]["kind"] == "a2ui.action"
    assert c.call("a2ui.action", {"surfaceId": "local"})["error"]["data"]["field"] == "name"
    assert c.call("a2ui.action", {"name": "x", "surfaceId": "nope"})["error"]["data"]["reason"] == "unknown_surface"
    assert c.call("a2ui.action", {"name": "x", "surfaceId": "local", "context": "y" * 70_000})["error"]["code"] == -32602


def test_reap_removes_expired_surfaces_and_their_routes(tmp_path):
    clock = Clock()
    state = make_state(tmp_path, clock)
    c = Conn(state)
    c.call("a2ui.ingest", {"payload": a2a_payload(), "endpoint": "http://127.0.0.1:9/a2a",
                           "routeAuth": {"type": "bearer", "token": SECRET}})
    methods = state.methods.get("a2ui.apply").handler.__self__
    assert "t1" in methods.vault
    clock.advance(86400 + 1)
    assert c.call("a2ui.reap")["result"] == {"removed": ["t1"]}
    assert "t1" not in methods.vault and len(methods.vault) == 0


def test_subscriptions_are_idempotent_bounded_and_end_with_the_connection(state):
    watcher, writer = Conn(state), Conn(state)
    methods = state.methods.get("a2ui.apply").handler.__self__
    watcher.call("a2ui/subscribe")
    watcher.call("a2ui/subscribe")
    assert len(methods.subscribers) == 1
    assert watcher.call("a2ui/unsubscribe")["result"] == {"subscribed": False}
    assert watcher.call("a2ui/unsubscribe")["result"] == {"subscribed": False}
    watcher.call("a2ui/subscribe")
    watcher.session.channel.pause()
    for i in range(200):
        writer.call("a2ui.apply", create(f"s{i}"))
        for part in range(2):
            update = {"updateDataModel": {"surfaceId": f"s{i}", "path": f"/blob{part}", "value": "x" * 15_000}}
            assert "result" in writer.call("a2ui.apply", update)
    outbox = methods.subscribers[watcher.session.client_id]
    dropped = outbox.dropped
    assert dropped > 0 and outbox.backlog_bytes <= a2ui_methods.A2UI_BACKLOG_BYTES
    watcher.session.channel.resume()
    gaps = [e for e in watcher.events() if e["kind"] == "a2ui.gap"]
    assert len(gaps) == 1 and gaps[0]["result"]["dropped"] == dropped
    watcher.close()
    assert methods.subscribers == {}
