"""
``memory.*`` through the real dispatcher on a Clock: the result shapes
car-runtime insists on, scopes per connection, params errors for what the
engine refuses, the private status slot, load as a full replace that
changes nothing on failure, and maintain mining a proposal's failures.
"""

import json
import os

import pytest
from twisted.internet.task import Clock

from car_twisted.memory.scopes import MemoryScope
from support import TOKEN, DispatchConn, make_state


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def state(tmp_path, clock):
    return make_state(tmp_path, clock)


def conn(state, **auth):
    return DispatchConn(state, auth={"token": TOKEN, **auth})


def error(reply):
    assert "error" in reply, reply
    return reply["error"]


def test_result_shapes_the_client_needs(state):
    c = conn(state)
    assert c.result("memory.add_fact", {"subject": "Alice", "body": "Alice works at Acme", "kind": "knowledge"}) == 1
    assert c.result("memory.add_fact", {"subject": "Acme", "body": "Acme is based in Paris", "kind": "knowledge",
                                         "confidence": "high", "fact_id": "acme", "tags": ["org"], "source": "crm"}) == 2
    assert c.result("memory.fact_count") == 2
    facts = c.result("memory.query", {"query": "where is Alice based", "k": 5})
    assert {f["subject"] for f in facts} == {"Alice", "Acme"}
    acme = next(f for f in facts if f["fact_id"] == "acme")
    assert acme == {"subject": "Acme", "body": "Acme is based in Paris", "kind": "knowledge", "confidence": 0.9,
                    "fact_id": "acme", "tags": ["org"], "source": "ws-crm"}
    context = c.result("memory.build_context", {"query": "Alice"})
    assert isinstance(context, str) and "## Facts" in context and "Alice works at Acme" in context
    assert c.result("memory.build_context_fast", {"query": "Alice", "model_context_window": 4096}) == context


def test_unbound_connections_share_a_graph_namespaces_and_agents_do_not(state):
    a, b = conn(state), conn(state)
    ns1, ns2 = conn(state, memory_namespace="one"), conn(state, memory_namespace="two")
    a.result("memory.add_fact", {"subject": "shared", "body": "seen by every unbound connection", "kind": "pattern"})
    ns1.result("memory.add_fact", {"subject": "private", "body": "only namespace one", "kind": "pattern"})
    assert b.result("memory.fact_count") == 1
    assert ns1.result("memory.fact_count") == 1 and ns2.result("memory.fact_count") == 0
    assert ns2.result("memory.query", {"query": "private namespace one"}) == []
    assert [f["subject"] for f in b.result("memory.query", {"query": "unbound connection"})] == ["shared"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"subject": "s", "body": "b", "confidence": 1.5}, "confidence"),
        ({"subject": "s", "body": "b", "confidence": "certain"}, "confidence"),
        ({"subject": "s", "body": "b", "tags": [""]}, "tags[0]"),
        ({"subject": "s", "body": "b", "tags": ["t"] * 65}, "tags"),
        ({"subject": "s", "body": "x" * (64 * 1024 + 1)}, "body"),
        ({"subject": "s", "body": "b", "kind": ""}, "fact"),
        ({"body": "b"}, "subject"),
    ],
)
def test_add_fact_bad_params(state, params, field):
    c = conn(state)
    err = error(c.call("memory.add_fact", params))
    assert err["code"] == -32602 and err["data"]["field"] == field, err
    assert c.result("memory.fact_count") == 0


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("memory.query", {"query": "q", "k": 0}, "k"),
        ("memory.query", {"query": "q", "k": 101}, "k"),
        ("memory.build_context", {"query": "q", "model_context_window": 10}, "model_context_window"),
        ("memory.intervene", {"max_candidates": 65}, "max_candidates"),
        ("memory.maintain", {"max_recent": 0}, "max_recent"),
        ("memory.evaluate", {"cases": [{"request": "not an object"}]}, "cases"),
    ],
)
def test_other_bad_params(state, method, params, field):
    err = error(conn(state).call(method, params))
    assert err["code"] == -32602 and err["data"]["field"] == field, err


def test_fact_cap_is_a_clear_error(tmp_path, clock):
    state = make_state(tmp_path, clock, memory_fact_limit=2)
    c = conn(state)
    for i in range(2):
        c.result("memory.add_fact", {"subject": f"s{i}", "body": "b"})
    err = error(c.call("memory.add_fact", {"subject": "s3", "body": "b"}))
    assert err["data"] == {"reason": "memory_full", "limit": 2}
    assert "at most 2 facts" in err["message"]


def test_status_slot_is_private_to_the_connection_and_never_a_fact(state):
    c, other = conn(state), conn(state)
    reply = c.result("memory.update_status", {"body": "half way through the migration", "tenant_id": "t1"})
    assert reply == {"id": "proactive-status:t1", "body": "half way through the migration", "tenant_id": "t1"}
    assert c.result("memory.fact_count") == 0
    assert c.result("memory.query", {"query": "migration"}) == []
    assert "migration" not in c.result("memory.build_context", {"query": "migration"})
    assert other.result("memory.delete", {"id": "proactive-status:t1"})["deleted"] is False
    assert c.result("memory.delete", {"id": "proactive-status:t1"}) == {
        "id": "proactive-status:t1", "deleted": True, "kind": "status", "fact_count": 0}


def test_save_delete_utility(state):
    c = conn(state)
    saved = c.result("memory.save_procedural", {"subject": "deploys", "body": "run the tests before deploying",
                                                 "id": "p1", "is_constraint": True})
    assert saved == {"id": "p1", "kind": "procedural", "fact_count": 1}
    assert "run the tests" in c.result("memory.build_context", {"query": "anything"}).split("## Facts")[0]
    assert c.result("memory.delete", {"id": "p1"}) == {"id": "p1", "deleted": True, "kind": "procedural", "fact_count": 0}
    assert c.result("memory.delete", {"id": "p1"})["deleted"] is False
    assert c.result("memory.utility_get") == {"utility_weight": 0.0, "utility_exploration": 1.0}
    assert c.result("memory.utility_set", {"utility_weight": 7, "utility_exploration": 0.5}) == {
        "utility_weight": 1.0, "utility_exploration": 0.5}


def test_persist_and_load_replace_the_graph_and_a_failed_load_changes_nothing(state, clock):
    c = conn(state, memory_namespace="ns")
    c.result("memory.add_fact", {"subject": "a", "body": "first fact", "fact_id": "a"})
    assert c.result("memory.persist", {"path": "snaps/one.json"}) == 1
    target = state.config.paths.home / "memory" / "snaps" / "one.json"
    assert oct(os.stat(target).st_mode & 0o777) == "0o600"
    c.result("memory.add_fact", {"subject": "b", "body": "second fact", "fact_id": "b"})
    assert c.result("memory.load", {"path": "snaps/one.json"}) == 1
    assert [f["fact_id"] for f in c.result("memory.query", {"query": "fact"})] == ["a"]

    memdir = state.config.paths.home / "memory"
    (memdir / "bad.json").write_text("{not json")
    (memdir / "shape.json").write_text(json.dumps({"facts": [{"subject": 1}]}))
    before = sorted(p.name for p in memdir.rglob("*"))
    for path, words in (("bad.json", "not a memory file"), ("shape.json", "not a memory file"), ("none.json", "no such file")):
        err = error(c.call("memory.load", {"path": path}))
        assert words in err["message"], err
    assert [f["fact_id"] for f in c.result("memory.query", {"query": "fact"})] == ["a"]
    assert sorted(p.name for p in memdir.rglob("*")) == before


def test_maintain_mines_a_failed_action_once(state, clock):
    """A proposal's failed action becomes one procedural fact; a second maintain saves nothing."""
    c = conn(state)
    c.result("tools.register", [{"name": "flaky"}])
    rid = c.send("proposal.submit", {"proposal": {"actions": [{"id": "a1", "type": "tool_call", "tool": "flaky"}]}})
    (callback,) = [m for m in c.sink.pop() if m.get("method") == "tools.execute"]
    c.dispatcher.dispatch_text(c.session, json.dumps(
        {"jsonrpc": "2.0", "id": callback["id"], "error": {"code": -32000, "message": "disk full"}}).encode())
    assert any(m.get("id") == rid for m in c.sink.pop())
    first = c.result("memory.maintain", {})
    assert first["saved"] >= 1, first
    count = c.result("memory.fact_count")
    second = c.result("memory.maintain", {})
    assert second["saved"] == 0 and c.result("memory.fact_count") == count
    assert any("flaky" in f["body"] or "disk full" in f["body"] for f in c.result("memory.query", {"query": "flaky disk full"}))


def test_changes_reach_the_scope_file(state, clock):
    c = conn(state, memory_namespace="Team A")
    c.result("memory.add_fact", {"subject": "s", "body": "remember me"})
    clock.advance(1)
    path = state.config.paths.home / "memory" / MemoryScope("namespace", "Team A").relative_path()
    assert path.name == "%54eam%20%41.json"
    assert [f["body"] for f in json.loads(path.read_text())["facts"]] == ["remember me"]
