"""The proposal engine over a fake executor and a Clock."""

import pytest
from twisted.internet.task import Clock

from car_twisted.proposal.engine import ProposalEngine, holds
from car_twisted.proposal.ir import Precondition, ToolError, ToolSchema, parse_proposal
from car_twisted.proposal.rules import parse_policy
from car_twisted.runtime import KeyValueStore
from car_twisted.testing import FakeToolExecutor


class Rig:
    def __init__(self, tools=None, policies=(), state=None):
        self.clock = Clock()
        self.executor = FakeToolExecutor(tools or {"echo": lambda c: {"echo": c.parameters}})
        self.store = KeyValueStore()
        self.view = self.store.view(None)
        for k, v in (state or {}).items():
            self.view.set(k, v)
        self.schemas = {name: ToolSchema(name) for name in self.executor.tools}
        self.policies = [parse_policy(p) for p in policies]

    def run(self, actions, **kw):
        engine = ProposalEngine(self.clock, self.executor, self.view, self.schemas, self.policies, **kw)
        self.d = engine.run(parse_proposal({"id": "p1", "actions": actions}))
        return self.d

    def result(self):
        assert self.d.called, "proposal still running"
        return self.d.result

    def statuses(self):
        return {r.action_id: r.status for r in self.result().results}


def tool(aid, name="echo", **kw):
    return {"id": aid, "type": "tool_call", "tool": name, "parameters": kw.pop("parameters", {}), **kw}


def test_single_tool_call():
    rig = Rig()
    rig.run([tool("a1", parameters={"x": 1})])
    res = rig.result()
    assert res.proposal_id == "p1"
    (r,) = res.results
    assert (r.status, r.output, r.error, r.attempts) == ("succeeded", {"echo": {"x": 1}}, None, 1)
    assert res.cost == {"tool_calls": 1, "actions_executed": 1, "actions_rejected": 0,
                        "actions_skipped": 0, "total_duration_ms": 0.0, "retries": 0}
    wire = res.to_wire()
    assert wire["results"][0]["status"] == "succeeded" and wire["results"][0]["timestamp"].endswith("Z")


def test_independent_actions_overlap_dependent_wait():
    """a1 and a2 run together; a3 (state dependency on a1's effect) starts only after a1."""
    rig = Rig(tools={"slow": lambda c: None})
    rig.executor.hold = {"slow"}
    rig.run([
        tool("a1", "slow", expected_effects={"built": True}),
        tool("a2", "slow"),
        tool("a3", "slow", state_dependencies=["built"]),
    ])
    assert set(rig.executor.held) == {"a1", "a2"}
    rig.executor.held["a2"].callback("two")
    assert "a3" not in rig.executor.held
    rig.executor.held["a1"].callback("one")
    assert "a3" in rig.executor.held and rig.view.get("built") is True
    rig.executor.held["a3"].callback("three")
    assert rig.statuses() == {"a1": "succeeded", "a2": "succeeded", "a3": "succeeded"}
    assert [c.action_id for c in rig.executor.calls] == ["a1", "a2", "a3"]


def test_explicit_dependencies_by_id():
    rig = Rig(tools={"slow": lambda c: None})
    rig.executor.hold = {"slow"}
    rig.run([tool("a1", "slow", dependencies=["a2"]), tool("a2", "slow")])
    assert set(rig.executor.held) == {"a2"}
    rig.executor.held["a2"].callback(None)
    rig.executor.held["a1"].callback(None)
    assert rig.statuses() == {"a1": "succeeded", "a2": "succeeded"}


def test_deny_tool_rejects_before_any_call():
    rig = Rig(policies=[{"name": "no_echo", "rule": "deny_tool", "target": "echo"}])
    rig.run([tool("a1"), {"id": "w", "type": "state_write", "parameters": {"key": "k", "value": 1}}])
    res = rig.result()
    assert rig.executor.calls == []
    assert res.results[0].status == "rejected" and "no_echo" in res.results[0].error
    assert res.results[1].status == "skipped"  # abort: nothing runs
    assert "k" not in rig.view
    assert res.cost["actions_rejected"] == 1 and res.cost["actions_skipped"] == 1


def test_deny_tool_param_does_not_leak_value():
    rig = Rig(policies=[{"name": "no_rm", "rule": "deny_tool_param", "target": "echo", "key": "cmd", "pattern": "rm -rf"}])
    rig.run([tool("a1", parameters={"cmd": "sudo rm -rf /secret"}, failure_behavior="skip"), tool("a2", parameters={"cmd": "ls"})])
    res = rig.result()
    assert rig.statuses() == {"a1": "rejected", "a2": "succeeded"}
    assert "secret" not in res.results[0].error and "deny_tool_param:echo.cmd" in res.results[0].error


def test_require_state_is_checked_at_dispatch():
    """require_state sees writes made earlier in the same proposal."""
    rig = Rig(policies=[{"name": "gate", "rule": "require_state", "key": "tests_passed", "value": True}])
    rig.run([
        {"id": "w", "type": "state_write", "parameters": {"key": "tests_passed", "value": True}},
        tool("deploy", state_dependencies=["tests_passed"]),
    ])
    # The state_write itself is also gated (require_state applies to every action).
    assert rig.statuses() == {"w": "rejected", "deploy": "skipped"}
    rig2 = Rig(policies=[{"name": "gate", "rule": "require_state", "key": "tests_passed", "value": True}],
               state={"tests_passed": True})
    rig2.run([tool("deploy")])
    assert rig2.statuses() == {"deploy": "succeeded"}


def test_preconditions():
    rig = Rig(state={"n": 5})
    rig.run([
        tool("ok", preconditions=[{"key": "n", "operator": "gt", "value": 3}]),
        tool("no", preconditions=[{"key": "n", "operator": "lt", "value": 3}], failure_behavior="skip"),
    ])
    res = rig.result()
    assert rig.statuses() == {"ok": "succeeded", "no": "rejected"}
    assert res.results[1].error == "precondition failed: n lt 3"


@pytest.mark.parametrize(
    "op,value,state,expected",
    [
        ("eq", 1, {"k": 1}, True), ("eq", 1, {}, False), ("neq", 1, {"k": 2}, True), ("neq", 1, {}, True),
        ("gt", 1, {"k": 2}, True), ("gte", 2, {"k": 2}, True), ("lt", 2, {"k": "x"}, False), ("lte", 2, {"k": 2.0}, True),
        ("exists", None, {"k": None}, True), ("not_exists", None, {}, True),
        ("contains", "ell", {"k": "hello"}, True), ("contains", 2, {"k": [1, 2]}, True), ("contains", 3, {"k": [1]}, False),
    ],
)
def test_operators(op, value, state, expected):
    assert holds(Precondition("k", op, value), state) is expected


def test_abort_stops_later_actions():
    def boom(call):
        raise ToolError("exploded")

    rig = Rig(tools={"echo": lambda c: 1, "boom": boom})
    rig.run([tool("a1", "boom"), tool("a2", dependencies=["a1"]), tool("a3", dependencies=["a2"])])
    res = rig.result()
    assert rig.statuses() == {"a1": "failed", "a2": "skipped", "a3": "skipped"}
    assert res.results[0].error == "exploded"
    assert [c.action_id for c in rig.executor.calls] == ["a1"]


def test_skip_continues_and_skips_dependents():
    def boom(call):
        raise ToolError("exploded")

    rig = Rig(tools={"echo": lambda c: 1, "boom": boom})
    rig.run([tool("a1", "boom", failure_behavior="skip"), tool("a2", dependencies=["a1"]), tool("a3")])
    assert rig.statuses() == {"a1": "failed", "a2": "skipped", "a3": "succeeded"}


def test_retry_then_terminal():
    seen = []

    def flaky(call):
        seen.append(call.attempt)
        if call.attempt < 3:
            raise ToolError("again")
        return "ok"

    def fatal(call):
        seen.append(("fatal", call.attempt))
        raise ToolError("fatal", terminal=True)

    rig = Rig(tools={"flaky": flaky, "fatal": fatal})
    rig.run([tool("a1", "flaky", failure_behavior="retry", max_retries=5),
             tool("a2", "fatal", failure_behavior="retry", max_retries=5, dependencies=["a1"])])
    res = rig.result()
    assert seen == [1, 2, 3, ("fatal", 1)]
    assert rig.statuses() == {"a1": "succeeded", "a2": "failed"}
    assert res.cost["retries"] == 2


def test_retry_exhausted():
    def boom(call):
        raise ToolError(f"fail {call.attempt}")

    rig = Rig(tools={"boom": boom})
    rig.run([tool("a1", "boom", failure_behavior="retry", max_retries=2)])
    (r,) = rig.result().results
    assert (r.status, r.attempts, r.error) == ("failed", 3, "fail 3")


def test_state_actions_and_assertion():
    rig = Rig()
    rig.run([
        {"id": "w", "type": "state_write", "parameters": {"key": "env", "value": "staging"}},
        {"id": "r", "type": "state_read", "parameters": {"key": "env"}, "state_dependencies": ["env"]},
        {"id": "ok", "type": "assertion", "parameters": {"key": "env", "value": "staging"}, "dependencies": ["w"]},
        {"id": "bad", "type": "assertion", "parameters": {"key": "env", "operator": "eq", "value": "prod"},
         "dependencies": ["w"], "failure_behavior": "skip"},
    ])
    res = rig.result()
    assert rig.statuses() == {"w": "succeeded", "r": "succeeded", "ok": "succeeded", "bad": "failed"}
    assert res.results[0].state_changes == {"env": "staging"}
    assert res.results[1].output == "staging"
    assert res.results[3].error == "assertion failed: env eq 'prod'"


def test_validation_rejections():
    rig = Rig(state={"present": 1})
    rig.schemas["strict"] = ToolSchema("strict", parameters={"type": "object", "required": ["env"]})
    rig.executor.tools["strict"] = lambda c: 1
    rig.run([
        tool("unknown", "nope", failure_behavior="skip"),
        tool("missing", "strict", failure_behavior="skip"),
        tool("dep", state_dependencies=["nobody_writes_this"], failure_behavior="skip"),
        tool("c1", dependencies=["c2"], failure_behavior="skip"),
        tool("c2", dependencies=["c1"], failure_behavior="skip"),
        tool("fine", state_dependencies=["present"]),
    ])
    res = {r.action_id: r for r in rig.result().results}
    assert "unknown tool 'nope'" in res["unknown"].error
    assert "missing required parameter 'env'" in res["missing"].error
    assert "unsatisfied state dependency 'nobody_writes_this'" in res["dep"].error
    assert res["c1"].error == res["c2"].error == "dependency cycle"
    assert res["fine"].status == "succeeded"
    assert [c.action_id for c in rig.executor.calls] == ["fine"]


def test_detached_modes_fail_clearly():
    rig = Rig()
    rig.run([tool("a1", invocation_mode="streaming")])
    (r,) = rig.result().results
    assert r.status == "failed" and "does not support streaming/long-running" in r.error
    assert rig.executor.calls == []


def test_cancel_cancels_running_calls():
    rig = Rig(tools={"slow": lambda c: None})
    rig.executor.hold = {"slow"}
    d = rig.run([tool("a1", "slow"), tool("a2", "slow")])
    d.cancel()
    assert all(h.called for h in rig.executor.held.values())


def test_concurrency_is_bounded():
    rig = Rig(tools={"slow": lambda c: None})
    rig.executor.hold = {"slow"}
    engine = ProposalEngine(rig.clock, rig.executor, rig.view, rig.schemas, [], max_concurrency=2)
    d = engine.run(parse_proposal({"actions": [tool(f"a{i}", "slow") for i in range(5)]}))
    assert len(rig.executor.held) == 2
    for _ in range(5):
        pending = [h for h in rig.executor.held.values() if not h.called]
        assert len(pending) <= 2
        if pending:
            pending[0].callback(None)
    assert d.called and all(r.status == "succeeded" for r in d.result.results)


def test_session_id_is_stamped():
    rig = Rig()
    rig.run([tool("a1")], session_id="psess-1")
    assert rig.executor.calls[0].session_id == "psess-1"


def test_terminal_error_aborts_rolls_back_and_halts():
    """A terminal tool error aborts even a skip action and undoes the proposal's writes."""
    def fatal(call):
        raise ToolError("card declined", terminal=True)

    rig = Rig(tools={"echo": lambda c: 1, "charge": fatal}, state={"balance": 10})
    rig.run([
        {"id": "w", "type": "state_write", "parameters": {"key": "balance", "value": 0}},
        tool("fx", expected_effects={"fx_locked": True}),
        tool("pay", "charge", failure_behavior="skip", dependencies=["w", "fx"]),
        tool("after", dependencies=["pay"], failure_behavior="skip"),
        tool("receipt", dependencies=["w"], failure_behavior="skip"),
    ])
    res = rig.result()
    assert res.halted == {"action_id": "pay", "reason": "card declined"}
    assert rig.view.get("balance") == 10 and "fx_locked" not in rig.view
    assert all(r.state_changes == {} for r in res.results)
    assert rig.statuses()["pay"] == "failed" and rig.statuses()["after"] == "skipped"
    assert res.to_wire()["halted"]["action_id"] == "pay"


def test_unknown_dependency_in_an_unparsed_proposal_is_invalid_params():
    """A proposal built in code skips parse_proposal; the engine still names the field instead of crashing."""
    from car_twisted.errors import InvalidParams
    from car_twisted.proposal.ir import Action, ActionProposal

    rig = Rig()
    proposal = ActionProposal("p1", "test", (
        Action("a1", "tool_call", tool="echo"),
        Action("a2", "tool_call", tool="echo", dependencies=("a1", "ghost")),
    ))
    engine = ProposalEngine(rig.clock, rig.executor, rig.view, rig.schemas, [])
    with pytest.raises(InvalidParams) as e:
        engine.run(proposal)
    assert (e.value.field, e.value.problem) == ("proposal.actions[1].dependencies[1]", "unknown action id 'ghost'")
    assert rig.executor.calls == []
