"""
Bounds on a proposal's work: linear scheduling, one serialisation per
parameter, unknown dependencies and the edge / policy-scan limits.
"""

import json

import pytest
from twisted.internet.task import Clock

from car_twisted.errors import InvalidParams
from car_twisted.interfaces import IToolExecutor
from car_twisted.proposal import engine as engine_mod
from car_twisted.proposal import rules
from car_twisted.proposal.engine import MAX_DEPENDENCY_EDGES, MAX_POLICY_SCAN_CHARS, ProposalEngine
from car_twisted.proposal.ir import ToolError, ToolSchema, parse_proposal
from car_twisted.proposal.rules import parse_policy
from car_twisted.runtime import KeyValueStore
from car_twisted.testing import FakeToolExecutor
from support import TOKEN, DispatchConn, make_state


def tool(aid, name="echo", **kw):
    return {"id": aid, "type": "tool_call", "tool": name, "parameters": kw.pop("parameters", {}), **kw}


def reverse_chain(n):
    """Action i depends on action i+1; the last one has no dependency."""
    return [tool(f"a{i}", dependencies=[f"a{i + 1}"] if i + 1 < n else []) for i in range(n)]


def engine_for(executor, policies=(), clock=None, **kw):
    view = KeyValueStore().view(None)
    schemas = {name: ToolSchema(name) for name in executor.tools}
    return ProposalEngine(clock or Clock(), executor, view, schemas, [parse_policy(p) for p in policies], **kw)


class CountingDict(dict):
    """A dict that counts item look-ups: the scheduler reads an action's result through one."""

    lookups = 0

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)


@pytest.fixture
def lookups(monkeypatch):
    """Every execution's ``results`` mapping counts its look-ups; returns the live list of them."""
    made = []
    original = engine_mod._Execution.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.results = CountingDict(self.results)
        made.append(self.results)

    monkeypatch.setattr(engine_mod._Execution, "__init__", init)
    return made


# -- scheduling ------------------------------------------------------------------


def test_reverse_chain_of_1000_runs_in_dependency_order(lookups):
    """The probe's 1 000-action reverse chain: every action succeeds, last one first, with linear work."""
    n = 1000
    clock = Clock()
    executor = FakeToolExecutor({"echo": lambda c: c.action_id})
    d = engine_for(executor, clock=clock).run(parse_proposal({"id": "chain", "actions": reverse_chain(n)}))
    assert d.called
    result = d.result
    assert [c.action_id for c in executor.calls] == [f"a{i}" for i in reversed(range(n))]
    assert [r.action_id for r in result.results] == [f"a{i}" for i in range(n)]
    assert all(r.status == "succeeded" and r.output == r.action_id for r in result.results)
    assert result.cost["tool_calls"] == n and result.cost["actions_executed"] == n
    (results,) = lookups
    assert results.lookups <= 10 * (n + (n - 1))


@pytest.mark.parametrize("shape", ["reverse_chain", "fan_in", "fan_out"])
def test_scheduler_work_is_linear_in_actions_and_edges(lookups, shape):
    """Result look-ups stay within a constant factor of actions + edges, whatever the shape."""
    n = 300
    if shape == "reverse_chain":
        actions, edges = reverse_chain(n), n - 1
    elif shape == "fan_in":  # the first action waits for all the others
        actions = [tool("a0", dependencies=[f"a{i}" for i in range(1, n)])] + [tool(f"a{i}") for i in range(1, n)]
        edges = n - 1
    else:  # every action waits for the last one
        actions = [tool(f"a{i}", dependencies=[f"a{n - 1}"]) for i in range(n - 1)] + [tool(f"a{n - 1}")]
        edges = n - 1
    executor = FakeToolExecutor({"echo": lambda c: None})
    executor.hold = {"echo"}
    d = engine_for(executor, max_concurrency=4).run(parse_proposal({"actions": actions}))
    # Complete one held call at a time, so every completion goes through the scheduler.
    while not d.called:
        next(h for h in executor.held.values() if not h.called).callback(None)
    assert all(r.status == "succeeded" for r in d.result.results)
    (results,) = lookups
    assert results.lookups <= 10 * (n + edges)


def test_ready_actions_start_in_the_order_they_become_ready():
    executor = FakeToolExecutor({"echo": lambda c: None})
    executor.hold = {"echo"}
    d = engine_for(executor).run(parse_proposal({"actions": [
        tool("c3", dependencies=["r2"]), tool("c1", dependencies=["r1"]), tool("c2", dependencies=["r1"]),
        tool("r1"), tool("r2"),
    ]}))
    assert list(executor.held) == ["r1", "r2"]  # initial ready set in proposal order
    executor.held["r2"].callback(None)
    executor.held["r1"].callback(None)
    assert list(executor.held) == ["r1", "r2", "c3", "c1", "c2"]
    for aid in ("c3", "c1", "c2"):
        executor.held[aid].callback(None)
    assert all(r.status == "succeeded" for r in d.result.results)


def test_failure_skips_dependents_transitively_with_reasons():
    def boom(call):
        raise ToolError("exploded")

    executor = FakeToolExecutor({"echo": lambda c: 1, "boom": boom})
    d = engine_for(executor).run(parse_proposal({"actions": [
        tool("a3", dependencies=["a2", "ok"]), tool("a2", dependencies=["a1"]), tool("ok"),
        tool("a1", "boom", failure_behavior="skip"), tool("free"),
    ]}))
    res = {r.action_id: r for r in d.result.results}
    assert {k: r.status for k, r in res.items()} == {
        "a3": "skipped", "a2": "skipped", "ok": "succeeded", "a1": "failed", "free": "succeeded"}
    assert res["a2"].error == "dependency 'a1' did not succeed"
    assert res["a3"].error == "dependency 'a2' did not succeed"
    assert d.result.cost["actions_skipped"] == 2


def test_validation_rejection_skips_dependents():
    executor = FakeToolExecutor({"echo": lambda c: 1})
    d = engine_for(executor).run(parse_proposal({"actions": [
        tool("bad", "nope", failure_behavior="skip"), tool("after", dependencies=["bad"]),
        tool("later", dependencies=["after"]),
    ]}))
    res = {r.action_id: r for r in d.result.results}
    assert res["bad"].status == "rejected"
    assert (res["after"].status, res["after"].error) == ("skipped", "dependency 'bad' did not succeed")
    assert (res["later"].status, res["later"].error) == ("skipped", "dependency 'after' did not succeed")
    assert executor.calls == []


def test_cancel_skips_what_has_not_started():
    executor = FakeToolExecutor({"echo": lambda c: None})
    executor.hold = {"echo"}
    d = engine_for(executor).run(parse_proposal({"actions": [tool("a1"), tool("a2", dependencies=["a1"])]}))
    outcome = []
    d.addBoth(outcome.append)
    d.cancel()
    (result,) = outcome
    assert {r.action_id: r.status for r in result.results} == {"a1": "failed", "a2": "skipped"}
    assert result.results[1].error == "proposal aborted: cancelled"


# -- serialisation ---------------------------------------------------------------


def test_each_parameter_is_serialised_once_for_1024_policies(monkeypatch):
    blob = {"rows": [{"n": i, "text": "x" * 40} for i in range(500)]}
    seen = []
    real_dumps = rules.json.dumps

    def counting_dumps(value, *a, **kw):
        seen.append(value)
        return real_dumps(value, *a, **kw)

    monkeypatch.setattr(rules.json, "dumps", counting_dumps)
    policies = [
        {"name": f"p{i}", "rule": "deny_tool_param", "target": "echo", "key": "blob", "pattern": f"never-{i}"}
        for i in range(1023)
    ] + [{"name": "hit", "rule": "deny_tool_param", "target": "echo", "key": "blob", "pattern": '"n": 499'}]
    executor = FakeToolExecutor({"echo": lambda c: 1})
    d = engine_for(executor, policies).run(parse_proposal({"actions": [
        tool("a1", parameters={"blob": blob}, failure_behavior="skip"),
        tool("a2", parameters={"blob": {"small": True}}),
    ]}))
    res = {r.action_id: r for r in d.result.results}
    assert res["a1"].status == "rejected" and "policy 'hit'" in res["a1"].error
    assert res["a2"].status == "succeeded"
    assert sum(1 for v in seen if v is blob) == 1
    assert len(seen) == 2  # a1's blob and a2's, once each


def test_string_parameters_are_scanned_as_they_are(monkeypatch):
    monkeypatch.setattr(rules.json, "dumps", lambda *a, **kw: pytest.fail("a string was serialised"))
    executor = FakeToolExecutor({"echo": lambda c: 1})
    d = engine_for(executor, [
        {"name": "q", "rule": "deny_tool_param", "target": "echo", "key": "cmd", "pattern": 'a"b'},
    ]).run(parse_proposal({"actions": [tool("a1", parameters={"cmd": 'xa"by'}, failure_behavior="skip")]}))
    assert d.result.results[0].status == "rejected"


# -- unknown dependencies -----------------------------------------------------------


@pytest.fixture
def conn(tmp_path):
    c = DispatchConn(make_state(tmp_path, Clock()), {"token": TOKEN})
    assert "result" in c.call("tools.register", [{"name": "echo"}])
    c.fake = FakeToolExecutor({"echo": lambda call: 1})
    c.session._components[IToolExecutor] = c.fake
    return c


def test_unknown_dependency_is_invalid_params(conn):
    reply = conn.call("proposal.submit", {"proposal": {"actions": [
        tool("a"), tool("b", dependencies=["a", "x"]),
    ]}})
    assert reply["error"]["code"] == -32602, reply
    assert reply["error"]["data"]["field"] == "proposal.actions[1].dependencies[1]"
    assert "unknown action id 'x'" in reply["error"]["message"]
    assert conn.fake.calls == []


def test_parse_proposal_names_the_unknown_dependency():
    with pytest.raises(InvalidParams) as e:
        parse_proposal({"actions": [tool("a", dependencies=["a"]), tool("b"), tool("c", dependencies=["b", "b", "zz"])]})
    assert (e.value.field, e.value.problem) == ("proposal.actions[2].dependencies[2]", "unknown action id 'zz'")


def test_self_dependency_is_still_ignored(conn):
    reply = conn.call("proposal.submit", {"proposal": {"actions": [tool("a", dependencies=["a"])]}})
    assert reply["result"]["results"][0]["status"] == "succeeded"


# -- work bounds ---------------------------------------------------------------------


def test_constants():
    assert MAX_DEPENDENCY_EDGES == 100_000
    assert MAX_POLICY_SCAN_CHARS == 64 * 1024 * 1024


def test_too_many_dependency_edges_is_refused_before_any_call(conn):
    """400 writers of one key and 300 readers of it: 120 000 edges once expanded."""
    writers = [tool(f"w{i}", expected_effects={"k": i}) for i in range(400)]
    readers = [tool(f"r{i}", state_dependencies=["k"]) for i in range(300)]
    reply = conn.call("proposal.submit", {"proposal": {"actions": writers + readers}})
    assert reply["error"]["code"] == -32602, reply
    assert reply["error"]["data"]["field"] == "proposal"
    assert "dependency edges" in reply["error"]["message"]
    assert conn.fake.calls == []


def test_dependency_edge_limit_is_inclusive(monkeypatch):
    monkeypatch.setattr(engine_mod, "MAX_DEPENDENCY_EDGES", 5)
    executor = FakeToolExecutor({"echo": lambda c: 1})
    # 2 explicit edges (the self-dependency does not count) + 3 from the state dependency on k.
    at_limit = [
        tool("a", dependencies=["a", "b", "c"], state_dependencies=["k"], expected_effects={"k": 0}),
        tool("b", expected_effects={"k": 1}), tool("c", expected_effects={"k": 2}), tool("d", expected_effects={"k": 3}),
    ]
    d = engine_for(executor).run(parse_proposal({"actions": at_limit}))
    assert all(r.status == "succeeded" for r in d.result.results)
    over = at_limit + [tool("e", dependencies=["d"])]
    with pytest.raises(InvalidParams) as e:
        engine_for(executor).run(parse_proposal({"actions": over}))
    assert e.value.field == "proposal" and "MAX_DEPENDENCY_EDGES" in e.value.problem
    assert [c.action_id for c in executor.calls] == ["b", "c", "d", "a"]


def test_too_much_policy_scanning_is_refused_before_any_call(conn):
    """65 distinct patterns over a 1 MiB parameter: 65 MiB of scanning."""
    for i in range(65):
        reply = conn.call("policy.register", {
            "name": f"p{i}", "rule": "deny_tool_param", "target": "echo", "key": "text", "pattern": f"needle-{i}"})
        assert "result" in reply, reply
    big = "y" * (1024 * 1024)
    reply = conn.call("proposal.submit", {"proposal": {"actions": [
        tool("first"), tool("big", parameters={"text": big}),
    ]}})
    assert reply["error"]["code"] == -32602, reply
    assert reply["error"]["data"]["field"] == "proposal"
    assert "policy scanning" in reply["error"]["message"]
    assert conn.fake.calls == []


def test_identical_policies_are_scanned_once(conn):
    for i in range(65):
        conn.call("policy.register", {
            "name": f"p{i}", "rule": "deny_tool_param", "target": "echo", "key": "text", "pattern": "needle"})
    big = "y" * (1024 * 1024)
    reply = conn.call("proposal.submit", {"proposal": {"actions": [tool("big", parameters={"text": big})]}})
    assert reply["result"]["results"][0]["status"] == "succeeded"
    assert [c.action_id for c in conn.fake.calls] == ["big"]


def test_policy_scan_budget_counts_only_matching_checks(monkeypatch):
    """Budget = sum of text lengths over (action, distinct policy) pairs whose target and key match."""
    monkeypatch.setattr(engine_mod, "MAX_POLICY_SCAN_CHARS", 3 * 100)
    executor = FakeToolExecutor({"echo": lambda c: 1, "other": lambda c: 1})
    policies = [
        {"name": "p1", "rule": "deny_tool_param", "target": "echo", "key": "t", "pattern": "zz1"},
        {"name": "p1-again", "rule": "deny_tool_param", "target": "echo", "key": "t", "pattern": "zz1"},
        {"name": "p2", "rule": "deny_tool_param", "target": "echo", "key": "t", "pattern": "zz2"},
        {"name": "p3", "rule": "deny_tool_param", "target": "echo", "key": "u", "pattern": "zz3"},
        {"name": "p4", "rule": "deny_tool_param", "target": "other", "key": "t", "pattern": "zz4"},
    ]
    value = ["x" * 96]  # serialises to 100 characters
    assert len(json.dumps(value)) == 100
    fits = [
        tool("a", parameters={"t": value}),  # p1 and p2: 200
        tool("b", parameters={"u": "x" * 100, "v": "x" * 10_000}),  # p3 on u; v matches nothing: 100
        tool("c", "other", parameters={"u": "x" * 10_000}),  # p4 needs t
        tool("d", "nope", parameters={"t": "x" * 10_000}, failure_behavior="skip"),  # rejected before policies
    ]
    d = engine_for(executor, policies).run(parse_proposal({"actions": fits}))
    assert [r.status for r in d.result.results] == ["succeeded", "succeeded", "succeeded", "rejected"]
    with pytest.raises(InvalidParams) as e:
        engine_for(executor, policies).run(parse_proposal({"actions": fits + [tool("e", parameters={"u": "x"})]}))
    assert e.value.field == "proposal" and "MAX_POLICY_SCAN_CHARS" in e.value.problem
    assert len(executor.calls) == 3
