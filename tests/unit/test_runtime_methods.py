"""tools.*, policy.*, state.*, session.init/policy.* and proposal.submit through the dispatcher."""

import json

import pytest
from twisted.internet.task import Clock

from support import TOKEN, DispatchConn, make_state


def Conn(state):
    return DispatchConn(state, {"token": TOKEN})


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def conn(tmp_path, clock):
    return Conn(make_state(tmp_path, clock))


def field_of(reply):
    assert reply["error"]["code"] == -32602, reply
    return reply["error"]["data"]["field"]


def test_tools_register_list_unregister(conn):
    assert conn.result("tools.register", [{"name": "zeta"}, {"name": "alpha", "description": "A", "parameters": {"type": "object"}}]) == 2
    assert conn.result("tools.register", {"tools": [{"name": "mid"}]}) == 1
    assert conn.result("tools.register", {"name": "solo", "idempotent": True}) == 1
    listed = conn.result("tools.list", {})
    assert [t["name"] for t in listed["tools"]] == ["alpha", "mid", "solo", "zeta"]
    assert listed["count"] == 4
    assert listed["tools"][0] == {"name": "alpha", "description": "A", "parameters": {"type": "object"}, "idempotent": False}
    assert conn.result("tools.unregister", {"name": "mid"}) == {"unregistered": "mid", "removed": 1}
    assert conn.result("tools.unregister", {"name": "mid"}) == {"unregistered": "mid", "removed": 0}
    assert field_of(conn.call("tools.unregister", {})) == "name"


@pytest.mark.parametrize(
    "params,field",
    [
        ([{"description": "no name"}], "params[0].name"),
        ([{"name": ""}], "params[0].name"),
        ([{"name": "x", "parameters": "nope"}], "params[0].parameters"),
        ([{"name": "x"}, 5], "params[1]"),
        ({"tools": "x"}, "params.tools"),
        ([{"name": "x", "rate_limit": {"max_calls": -1, "interval_secs": 1}}], "params[0].rate_limit.max_calls"),
        ("str", "params"),
    ],
)
def test_bad_tool_definitions(conn, params, field):
    reply = conn.call("tools.register", params) if params != "str" else conn.call("tools.register", None)
    assert field_of(reply) == field


def test_detached_handle_methods(conn):
    assert conn.result("tools.poll", {"handle": "h1"}) is None
    assert conn.result("tools.cancel", {"handle": "h1"}) == {"cancelled": False}
    assert conn.result("tools.stream.subscribe", {}) == {"subscribed": True}


def test_policies(conn):
    assert conn.result("policy.register", {"name": "p1", "rule": "deny_tool", "target": "shell"}) == {
        "name": "p1", "registered": "p1", "scope": "global"}
    conn.result("policy.register", {"name": "p1", "rule": "require_state", "key": "ok", "value": True})
    listed = conn.result("policy.list", {})
    assert [p["rule"] for p in listed["policies"]] == ["deny_tool", "require_state"] and listed["scope"] == "global"
    assert conn.result("policy.unregister", {"name": "p1"})["removed"] == 2
    sid = conn.result("session.policy.open", {})["session_id"]
    conn.result("policy.register", {"name": "s", "rule": "deny_tool", "target": "x", "session_id": sid})
    assert conn.result("policy.list", {"session_id": sid})["scope"] == {"session_id": sid}
    assert conn.result("policy.list", {})["policies"] == []
    assert conn.result("session.policy.close", {"session_id": sid}) == {"closed": True}
    assert conn.result("session.policy.close", {"session_id": sid}) == {"closed": False}
    assert field_of(conn.call("policy.list", {"session_id": sid})) == "session_id"


@pytest.mark.parametrize(
    "params,field",
    [
        ({"rule": "deny_tool", "target": "x"}, "name"),
        ({"name": "n", "rule": "nope"}, "rule"),
        ({"name": "n", "rule": "deny_tool_callback", "target": "x"}, "rule"),
        ({"name": "n", "rule": "deny_tool"}, "target"),
        ({"name": "n", "rule": "deny_tool_param", "target": "t", "key": "k"}, "pattern"),
        ({"name": "n", "rule": "require_state"}, "key"),
        ({"name": "n", "rule": "require_state", "key": "k", "value_json": "{bad"}, "value_json"),
    ],
)
def test_bad_policies(conn, params, field):
    assert field_of(conn.call("policy.register", params)) == field


def test_state_methods_and_tenants(conn):
    assert conn.result("state.set", {"key": "a", "value": {"n": 1}}) == "ok"
    conn.result("state.set", {"key": "a", "value": "tenant-a", "tenant_id": "t1"})
    assert conn.result("state.get", {"key": "a"}) == {"n": 1}
    assert conn.result("state.get", {"key": "a", "tenant_id": "t1"}) == "tenant-a"
    assert conn.result("state.get", {"key": "missing"}) is None
    assert conn.result("state.exists", {"key": "a"}) is True
    assert conn.result("state.exists", {"key": "b"}) is False
    assert conn.result("state.keys", {}) == ["a"]
    assert conn.result("state.keys", {"tenant_id": "t1"}) == ["a"]
    assert conn.result("state.snapshot", {"tenant_id": "t1"}) == {"a": "tenant-a"}
    assert conn.result("state.snapshot", {}) == {"a": {"n": 1}}
    assert field_of(conn.call("state.get", {})) == "key"


def test_session_init(conn):
    out = conn.result("session.init", {"tools": [{"name": "t1"}], "policies": [{"name": "p", "rule": "deny_tool", "target": "t1"}]})
    assert out["tools_registered"] == 1 and out["policies_registered"] == 1
    assert out["session_id"].startswith("sess-")
    assert field_of(conn.call("session.init", {"tools": [{"name": "ok"}], "policies": [{"name": "p", "rule": "x"}]})) == "policies[0].rule"


@pytest.mark.parametrize(
    "proposal,field",
    [
        ({}, "proposal.actions"),
        ({"actions": "x"}, "proposal.actions"),
        ({"actions": [{"tool": "x"}]}, "proposal.actions[0].type"),
        ({"actions": [{"type": "fly"}]}, "proposal.actions[0].type"),
        ({"actions": [{"type": "tool_call"}]}, "proposal.actions[0].tool"),
        ({"actions": [{"type": "tool_call", "tool": "t", "timeout_ms": -5}]}, "proposal.actions[0].timeout_ms"),
        ({"actions": [{"type": "tool_call", "tool": "t", "failure_behavior": "pray"}]}, "proposal.actions[0].failure_behavior"),
        ({"actions": [{"type": "tool_call", "tool": "t", "preconditions": [{"operator": "eq"}]}]}, "proposal.actions[0].preconditions[0].key"),
        ({"actions": [{"type": "tool_call", "tool": "t", "preconditions": [{"key": "k", "operator": "like"}]}]}, "proposal.actions[0].preconditions[0].operator"),
        ({"actions": [{"type": "state_write", "parameters": {}}]}, "proposal.actions[0].parameters.key"),
        ({"actions": [{"id": "a", "type": "state_read", "parameters": {"key": "k"}}, {"id": "a", "type": "state_read", "parameters": {"key": "k"}}]}, "proposal.actions[1].id"),
        ({"actions": [{"type": "tool_call", "tool": "t", "max_retries": 1000}]}, "proposal.actions[0].max_retries"),
    ],
)
def test_malformed_proposals(conn, proposal, field):
    assert field_of(conn.call("proposal.submit", {"proposal": proposal})) == field


def test_submit_round_trip_over_the_channel(conn):
    """proposal.submit sends tools.execute to this client and answers after the reply."""
    conn.result("tools.register", [{"name": "echo"}])
    rid = conn.send("proposal.submit", {"proposal": {"actions": [{"id": "a1", "type": "tool_call", "tool": "echo", "parameters": {"x": 1}}]}})
    (callback,) = conn.sink.pop()
    assert callback["method"] == "tools.execute" and callback["params"]["parameters"] == {"x": 1}
    conn.dispatcher.dispatch_text(conn.session, json.dumps({"jsonrpc": "2.0", "id": callback["id"], "result": {"echo": 1}}).encode())
    (reply,) = conn.sink.pop()
    assert reply["id"] == rid
    assert reply["result"]["results"][0]["status"] == "succeeded"
    assert reply["result"]["results"][0]["output"] == {"echo": 1}


def test_proposal_deadline_is_derived_from_budgets(tmp_path, clock):
    """An in-budget proposal outlives the flat handler deadline."""
    state = make_state(tmp_path, clock, handler_timeout=10.0)
    c = Conn(state)
    spec = state.methods.get("proposal.submit")
    from car_twisted.methods.proposal import SubmitParams

    long = SubmitParams(proposal={"actions": [
        {"type": "tool_call", "tool": "t", "timeout_ms": 20_000, "failure_behavior": "retry", "max_retries": 2},
        {"type": "tool_call", "tool": "t"},
    ]})
    assert spec.deadline(long) == 20 * 3 + 300 + 15
    # Only ever raised above the flat deadline: here the 15 s grace alone exceeds 10 s.
    assert spec.deadline(SubmitParams(proposal={"actions": []})) == 15.0
    assert spec.deadline(SubmitParams(proposal={"no": "actions"})) == 10.0
    c.result("tools.register", [{"name": "t"}])
    rid = c.send("proposal.submit", {"proposal": {"actions": [{"id": "a", "type": "tool_call", "tool": "t", "timeout_ms": 20_000}]}})
    (cb,) = c.sink.pop()
    clock.pump([9, 10])  # past the flat 10 s, inside the derived 35 s
    # Only the liveness pulses (at 9 s and 18 s) that keep the client waiting.
    assert c.sink.pop() == [{"jsonrpc": "2.0", "method": "infer.progress", "params": {"id": rid}}] * 2
    c.dispatcher.dispatch_text(c.session, json.dumps({"jsonrpc": "2.0", "id": cb["id"], "result": 1}).encode())
    (reply,) = c.sink.pop()
    assert reply["id"] == rid and reply["result"]["results"][0]["status"] == "succeeded"


def test_handler_deadline_cancels_tool_and_answers_32004(tmp_path, clock):
    state = make_state(tmp_path, clock, handler_timeout=5.0, tool_timeout_ms=1000)
    c = Conn(state)
    c.result("tools.register", [{"name": "t"}])
    from car_twisted.interfaces import IToolExecutor
    from car_twisted.testing import FakeToolExecutor

    fake = FakeToolExecutor({"t": lambda call: None})
    fake.hold = {"t"}
    c.session._components[IToolExecutor] = fake
    rid = c.send("proposal.submit", {"proposal": {"actions": [{"id": "a", "type": "tool_call", "tool": "t"}]}})
    # Derived deadline: 1 s tool budget + 15 s grace = 16 s (above the flat 5 s).
    clock.advance(15.9)
    assert c.sink.pop() == [{"jsonrpc": "2.0", "method": "infer.progress", "params": {"id": rid}}]
    clock.advance(0.2)
    (reply,) = c.sink.pop()
    assert reply["error"]["code"] == -32004
    assert fake.held["a"].called  # the running call was cancelled


def test_halt_refuses_later_proposals_until_a_host_clears_it(tmp_path, clock):
    from car_twisted.interfaces import IToolExecutor
    from car_twisted.proposal.ir import ToolError
    from car_twisted.testing import FakeToolExecutor
    from support import HOST_TOKEN

    state = make_state(tmp_path, clock)
    agent = Conn(state)
    agent.result("tools.register", [{"name": "charge"}])

    def fatal(call):
        raise ToolError("card declined", terminal=True)

    agent.session._components[IToolExecutor] = FakeToolExecutor({"charge": fatal})
    submit = {"proposal": {"actions": [{"id": "pay", "type": "tool_call", "tool": "charge"}]}}
    assert agent.result("proposal.submit", submit)["halted"] == {"action_id": "pay", "reason": "card declined"}
    refused = agent.call("proposal.submit", submit)
    assert refused["error"]["code"] == -32603 and "session halted" in refused["error"]["message"]
    assert agent.call("session.clear_halt", {})["error"]["message"].startswith("forbidden:")

    host = Conn(state)
    host.send("session.auth", {"host_token": HOST_TOKEN})
    host.sink.pop()
    assert host.result("session.clear_halt", {"session_id": agent.session.client_id}) == {
        "cleared": 1, "client_ids": [agent.session.client_id]}
    assert "results" in agent.result("proposal.submit", submit)
