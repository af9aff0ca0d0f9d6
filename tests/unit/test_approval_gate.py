"""
The approval gate on a Clock: a gated call parks until a person approves
it, deny and timeout answer -32003 with the connection still working, the
gate can be turned off, a parked caller that leaves leaves no timer, and
host subscribers see the approval row and both events.
"""

import pytest
from twisted.internet.task import Clock

from car_twisted.host.gate import ApprovalGate
from support import HOST_TOKEN, TOKEN, DispatchConn, make_state, request, stray_timers


def gated_state(tmp_path, clock, **gate):
    state = make_state(tmp_path, clock, approval_gate=ApprovalGate(methods={"app.wipe"}, **gate))
    ran = []
    state.register_method("app.wipe", lambda session, params: ran.append(params) or {"wiped": True})
    return state, ran


def subscriber(state):
    sub = DispatchConn(state, {"host_token": HOST_TOKEN})
    assert sub.result("server.handshake", {"protocol_version": 3})["protocol_version"] == 3
    assert sub.result("host.subscribe", {})["subscribed"] is True
    return sub


def events(conn):
    return [m["params"] for m in conn.sink.pop() if m.get("method") == "host.event"]


def send(conn, method, params):
    """Send without waiting: a parked call answers later."""
    conn.rid += 1
    conn.dispatcher.dispatch_text(conn.session, request(method, params, conn.rid))
    return conn.rid


def reply_to(conn, rid):
    found = [m for m in conn.sink.pop() if m.get("id") == rid]
    return found[0] if found else None


@pytest.fixture
def clock():
    return Clock()


def test_approved_call_runs(tmp_path, clock):
    """A listed embedder method waits for approval, then runs; a second subscriber sees the row and both events."""
    state, ran = gated_state(tmp_path, clock)
    watcher = subscriber(state)
    caller = DispatchConn(state, {"token": TOKEN})
    rid = send(caller, "app.wipe", {"target": "cache"})
    assert reply_to(caller, rid) is None and ran == []
    (requested,) = events(watcher)
    assert requested["kind"] == "approval.requested"
    approval_id = requested["payload"]["approval_id"]
    row = requested["payload"]["approval"]
    assert row["action"] == "ws.method:app.wipe" and row["client_id"] is None and row["status"] == "pending"
    assert '"target":"cache"' in row["context"]["params_preview"]
    # Any authenticated connection may resolve a system approval.
    approver = DispatchConn(state, {"token": TOKEN})
    assert approver.result("host.resolve_approval", {"approval_id": approval_id, "approved": True})["status"] == "approved"
    assert reply_to(caller, rid)["result"] == {"wiped": True} and ran == [{"target": "cache"}]
    (resolved,) = events(watcher)
    assert resolved["kind"] == "approval.resolved" and resolved["payload"]["approval"]["status"] == "approved"
    assert stray_timers(clock) == []


def test_denied_call_is_32003_and_the_connection_goes_on(tmp_path, clock):
    state, ran = gated_state(tmp_path, clock)
    watcher = subscriber(state)
    caller = DispatchConn(state, {"token": TOKEN})
    rid = send(caller, "app.wipe", {})
    approval_id = events(watcher)[0]["payload"]["approval_id"]
    watcher.result("host.resolve_approval", {"approval_id": approval_id, "approved": False, "notes": "no"})
    err = reply_to(caller, rid)["error"]
    assert err["code"] == -32003 and err["data"]["approval_id"] == approval_id and ran == []
    assert caller.result("state.keys", {}) == []
    assert [a["status"] for a in caller.result("host.approvals", {})["approvals"]] == ["denied"]


def test_unanswered_call_times_out(tmp_path, clock):
    state, ran = gated_state(tmp_path, clock, timeout=5.0)
    caller = DispatchConn(state, {"token": TOKEN})
    rid = send(caller, "app.wipe", {})
    clock.advance(4.9)
    assert reply_to(caller, rid) is None
    clock.advance(0.2)
    err = reply_to(caller, rid)["error"]
    assert err["code"] == -32003 and "not approved within 5s" in err["message"] and ran == []
    assert caller.result("host.approvals", {})["approvals"][0]["status"] == "expired"
    assert stray_timers(clock) == []


@pytest.mark.parametrize("off", ["config", "environ", "option"])
def test_gate_can_be_turned_off(tmp_path, clock, off, monkeypatch):
    """ApprovalGate(enabled=False), CAR_NO_APPROVALS=1 and --no-approvals all let gated calls straight through."""
    from car_twisted.config import ServerStateConfig
    from car_twisted.state import ServerState

    if off == "config":
        state = make_state(tmp_path, clock, approval_gate=ApprovalGate(methods={"app.wipe"}, enabled=False))
    else:
        if off == "environ":
            config = ServerStateConfig.from_environ({"CAR_HOME": str(tmp_path / "h"), "CAR_NO_APPROVALS": "1"})
        else:
            from car_twisted.tap import Options

            opts = Options()
            opts.parseOptions(["--car-home", str(tmp_path / "h"), "--no-approvals"])
            config = ServerStateConfig.from_environ({}, **opts.config_kwargs)
        assert config.approval_gate.enabled is False
        state = ServerState(config, clock)
    state.register_method("app.wipe", lambda session, params: "done")
    conn = DispatchConn(state, None if not state.auth_enabled else {"token": state.auth_token})
    assert conn.result("app.wipe", {}) == "done"


def test_parked_caller_that_leaves_leaves_no_timer(tmp_path, clock):
    state, ran = gated_state(tmp_path, clock)
    caller = DispatchConn(state, {"token": TOKEN})
    send(caller, "app.wipe", {})
    assert state.host.parked_count() == 1 and clock.getDelayedCalls()
    caller.close()
    assert state.host.parked_count() == 0
    assert stray_timers(clock) == [] and ran == []
    (row,) = state.host.approvals.values()
    assert row.status == "cancelled"


def test_agents_start_of_a_changed_launch_spec_is_gated(tmp_path, clock):
    """The daemon's own rule: starting an agent whose command changed since it last ran waits for approval."""
    from car_twisted.agents.manifest import launch_fields, parse_agent_spec
    import os
    import sys

    state = make_state(tmp_path, clock)
    host = DispatchConn(state, {"host_token": HOST_TOKEN})
    python = os.path.realpath(sys.executable)
    host.result("agents.upsert", {"id": "a1", "command": python, "args": ["one.py"]})
    assert state.agents.launch_changed("a1") is None  # never ran here: nothing changed
    agent = state.agents._agents["a1"]
    agent.last_launch = launch_fields(parse_agent_spec({"id": "a1", "command": python, "args": ["old.py"]}, os.environ))
    reason = state.agents.launch_changed("a1")
    assert reason is not None and "changed since it last ran" in reason
    caller = DispatchConn(state, {"token": TOKEN})
    rid = send(caller, "agents.start", {"id": "a1"})
    assert reply_to(caller, rid) is None and state.host.parked_count() == 1
    (row,) = state.host.approvals.values()
    assert row.action == "ws.method:agents.start" and "changed since it last ran" in row.description
    host.result("host.resolve_approval", {"approval_id": row.id, "approved": False})
    assert reply_to(caller, rid)["error"]["code"] == -32003
