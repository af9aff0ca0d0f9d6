"""
Host state through the dispatcher: ownership (the reference's error
texts), orphaned rows, approvals raised by a connection, the snapshot and
identity, and a subscriber that never reads.
"""

import pytest
from twisted.internet.task import Clock

from car_twisted.host.registry import HOST_BACKLOG_BYTES, MAX_HOST_EVENTS
from support import HOST_TOKEN, TOKEN, DispatchConn, make_state


@pytest.fixture
def state(tmp_path):
    return make_state(tmp_path, Clock())


def conn(state, host=False):
    return DispatchConn(state, {"host_token": HOST_TOKEN} if host else {"token": TOKEN})


def error_text(reply):
    assert "error" in reply, reply
    return reply["error"]["message"]


def test_only_the_owner_mutates_its_agent(state):
    a, b = conn(state), conn(state)
    agent = a.result("host.register_agent", {"id": "researcher-1", "name": "Researcher", "kind": "callback", "capabilities": ["chat"]})
    assert agent["session_id"] == a.session.client_id and agent["status"] == "idle"
    for method, params in [
        ("host.set_status", {"agent_id": "researcher-1", "status": "running"}),
        ("host.unregister_agent", {"agent_id": "researcher-1"}),
        ("host.register_agent", {"id": "researcher-1", "name": "Mine now", "kind": "callback"}),
    ]:
        assert error_text(b.call(method, params)) == "agent 'researcher-1' is owned by another session"
    updated = a.result("host.set_status", {"agent_id": "researcher-1", "status": "running", "current_task": "t"})
    assert updated["status"] == "running" and updated["current_task"] == "t"
    assert b.result("host.agents", {})[0]["status"] == "running"  # reads are open
    assert a.result("host.unregister_agent", {"agent_id": "researcher-1"}) == {"ok": True}


def test_only_the_owner_updates_its_device(state):
    a, b = conn(state), conn(state)
    device = a.result("host.register_device", {"id": "phone-1", "name": "Phone", "platform": "ios", "capabilities": ["notifications.deliver"]})
    assert device["session_id"] == a.session.client_id
    assert error_text(b.call("host.update_device", {"device_id": "phone-1", "status": "offline"})) == "device 'phone-1' is owned by another session"
    assert a.result("host.update_device", {"device_id": "phone-1", "status": "offline"})["status"] == "offline"
    assert [d["id"] for d in b.result("host.devices", {})] == ["phone-1"]


def test_session_approvals_resolve_only_from_their_session(state):
    a, b = conn(state), conn(state)
    a.result("host.register_agent", {"id": "worker", "name": "Worker", "kind": "callback"})
    approval = a.result("host.request_approval", {"agent_id": "worker", "title": "Deploy?", "context": {"env": "prod"}})
    assert approval["client_id"] == a.session.client_id and approval["status"] == "pending"
    assert a.result("host.agents", {})[0]["status"] == "waiting_for_approval"
    text = error_text(b.call("host.resolve_approval", {"approval_id": approval["id"], "approved": True}))
    assert text == f"approval '{approval['id']}' was requested by another session"
    resolved = a.result("host.resolve_approval", {"approval_id": approval["id"], "approved": True, "notes": "ok"})
    assert resolved["status"] == "approved" and resolved["resolved_by"] == a.session.client_id
    assert "already approved" in error_text(a.call("host.resolve_approval", {"approval_id": approval["id"], "approved": False}))


def test_rows_of_a_closed_connection_are_orphaned_not_dropped(state):
    """A gone owner's agent and device stay, marked orphaned (adoptable); its pending approvals are cancelled."""
    a, b = conn(state), conn(state)
    a.result("host.register_agent", {"id": "w", "name": "W", "kind": "callback"})
    a.result("host.register_device", {"id": "d", "name": "D", "platform": "linux"})
    pending = a.result("host.request_approval", {"title": "Go?"})
    a.close()
    (agent,) = b.result("host.agents", {})
    assert agent["orphaned"] is True and agent["session_id"] is None
    assert b.result("host.devices", {})[0]["orphaned"] is True
    assert b.result("host.approvals", {})["approvals"][0]["status"] == "cancelled"
    adopted = b.result("host.register_agent", {"id": "w", "name": "W again", "kind": "callback"})
    assert adopted["session_id"] == b.session.client_id and adopted["orphaned"] is False
    assert pending["id"] in {e["payload"].get("approval_id") for e in b.result("host.events", {"limit": 50})["events"]}


def test_subscribe_needs_the_handshake_and_answers_a_snapshot(state):
    a = conn(state)
    assert a.call("host.subscribe", {})["error"]["code"] == -32005
    a.result("server.handshake", {"protocol_version": 3})
    a.result("host.register_agent", {"id": "x", "name": "X", "kind": "callback"})
    snap = a.result("host.subscribe", {})
    assert snap["subscribed"] is True and [g["id"] for g in snap["agents"]] == ["x"]
    assert snap["identity"]["manifest_role"] == "owner" and snap["identity"]["manifest_path"].endswith("agents.json")
    assert isinstance(snap["identity"]["pid"], int) and snap["events"][-1]["kind"] == "agent.registered"


def test_notify_records_and_refuses_the_daemons_own_kinds(state):
    a = conn(state)
    event = a.result("host.notify", {"message": "build finished", "payload": {"target_device_id": "d"}})
    assert event["kind"] == "host.notification" and event["payload"] == {"target_device_id": "d"}
    for kind in ("approval.resolved", "agent.unregistered", "device.updated", "host.gap"):
        assert a.call("host.notify", {"kind": kind})["error"]["data"]["field"] == "kind"


def test_supervised_agents_with_capabilities_are_merged(state):
    import os
    import sys

    host = conn(state, host=True)
    host.result("agents.upsert", {"id": "assistant", "command": os.path.realpath(sys.executable), "capabilities": ["chat"]})
    host.result("agents.upsert", {"id": "plain", "command": os.path.realpath(sys.executable)})
    agents = {a["id"]: a for a in host.result("host.agents", {})}
    assert set(agents) == {"assistant"} and agents["assistant"]["kind"] == "supervised"
    assert agents["assistant"]["capabilities"] == ["chat"] and agents["assistant"]["attached"] is False


def test_a_subscriber_that_never_reads_costs_a_bounded_backlog(state):
    """10 000 events: the stalled subscriber holds at most its backlog, a reading one gets them all, then a gap marker."""
    stalled, reader, source = conn(state), conn(state), conn(state)
    for c in (stalled, reader):
        c.result("server.handshake", {"protocol_version": 3})
        c.result("host.subscribe", {})
    stalled.sink.frames.clear()
    reader.sink.frames.clear()
    stalled.session.channel.pause()  # its socket buffer is full
    for i in range(10_000):
        source.result("host.notify", {"message": f"event {i}", "payload": {"i": i}})
    sub = state.host._subscribers[stalled.session.client_id]
    assert sub.backlog_bytes <= HOST_BACKLOG_BYTES and sub.dropped > 0
    assert len(sub.backlog) + sub.dropped == 10_000 and stalled.sink.frames == []
    got = [m["params"]["payload"]["i"] for m in reader.sink.pop() if m.get("method") == "host.event"]
    assert got == list(range(10_000))
    assert len(state.host.events) == MAX_HOST_EVENTS
    held, dropped = len(sub.backlog), sub.dropped
    stalled.session.channel.resume()
    frames = [m["params"] for m in stalled.sink.pop() if m.get("method") == "host.event"]
    assert [f["payload"]["i"] for f in frames[:-1]] == list(range(held))
    assert frames[-1]["kind"] == "host.gap" and frames[-1]["payload"] == {"dropped": dropped}
    assert sub.backlog_bytes == 0 and sub.dropped == 0


def test_supervised_status_changes_reach_host_subscribers(state):
    """A supervised agent's status change is a host event (the dashboard redraws on it)."""
    a = conn(state, host=True)
    a.result("server.handshake", {"protocol_version": 3})
    a.result("host.subscribe", {})
    a.sink.pop()
    state.agents.on_status("worker", "backoff", None, 2, 1)
    (note,) = [m for m in a.sink.pop() if m.get("method") == "host.event"]
    event = note["params"]
    assert (event["kind"], event["agent_id"]) == ("agent.supervisor_status", "worker")
    assert event["payload"] == {"status": "backoff", "pid": None, "restarts": 2, "last_exit_code": 1}
    assert a.call("host.notify", {"kind": "agent.supervisor_status"})["error"]["data"]["field"] == "kind"
