"""runs.* through the dispatcher, on a Clock (the store writes synchronously then)."""

import json

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from car_twisted.interfaces import IRunStore
from car_twisted.rpc.dispatch import Dispatcher
from car_twisted.runs.model import MAX_TURN_BYTES, RECORD_TURNS_RUN_CEILING, bound_turn
from car_twisted.runs.registry import SUBSCRIBER_BACKLOG_BYTES
from car_twisted.runs.store import JsonlRunStore, read_records
from support import HOST_TOKEN, TOKEN, FakeSink, make_state, request, stray_timers


class Conn:
    def __init__(self, state, agent_id=None, host=False):
        self.state = state
        self.sink = FakeSink()
        self.session = state.open_session(self.sink)
        self.dispatcher = Dispatcher(state)
        self.rid = 100
        self.send("session.auth", {"host_token": HOST_TOKEN} if host else {"token": TOKEN})
        self.session.agent_id = agent_id  # as a session.auth {agent_id} binding would
        self.sink.pop()

    def send(self, method, params=None):
        self.rid += 1
        self.dispatcher.dispatch_text(self.session, request(method, params, self.rid))
        return self.rid

    def reply(self, rid):
        for m in self.sink.messages():
            if m.get("id") == rid:
                return m
        return None

    def call(self, method, params=None):
        rid = self.send(method, params)
        reply = self.reply(rid)
        assert reply is not None, f"no synchronous reply to {method}"
        return reply

    def result(self, method, params=None):
        reply = self.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    def events(self):
        return [m["params"] for m in self.sink.messages() if m.get("method") == "runs.trace.event"]

    def close(self):
        self.state.close_session(self.session)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def state(tmp_path, clock):
    return make_state(tmp_path, clock, run_complete_grace=5.0)


def turns(n, text="t"):
    return [{"prompt": f"{text}{i}", "output": "ok"} for i in range(n)]


def test_store_provides_interface(state, tmp_path):
    verifyObject(IRunStore, JsonlRunStore(Clock(), tmp_path))
    verifyObject(IRunStore, state.runs.store)


def test_start_record_complete_round_trip(state, tmp_path):
    agent = Conn(state, "ag-1")
    started = agent.result("runs.start", {"intent": "deploy", "agent_name": "Deployer"})
    run_id = started["run_id"]
    assert started["agent_id"] == "ag-1" and agent.state.runs.connection(agent.session).current_run == run_id
    first = agent.result("runs.record_turns", {"run_id": run_id, "turns": turns(2)})
    assert first == {"run_id": run_id, "base_index": 0, "count": 2, "ok": True}
    second = agent.result("runs.record_turns", {"run_id": run_id, "turns": [{"index": 77, "prompt": "x"}]})
    assert second["base_index"] == 2
    assert agent.result("runs.complete", {"run_id": run_id, "outcome": {"status": "success"}}) == {"run_id": run_id, "ok": True}
    path = tmp_path / "car-home" / "runs" / "ag-1" / f"{run_id}.jsonl"
    records = read_records(path)
    assert [r["record"] for r in records] == ["started", "turn", "turn", "turn", "ended"]
    assert [r["index"] for r in records[1:4]] == [0, 1, 2]  # the daemon owns the index
    assert records[1]["verifier_verdict"] == "not_run"
    assert records[-1]["status"] == "completed" and records[-1]["outcome"] == {"status": "success"}
    again = agent.call("runs.complete", {"run_id": run_id, "outcome": {}})
    assert "already terminal" in again["error"]["message"]
    dropped = agent.result("runs.record_turns", {"run_id": run_id, "turns": turns(1)})
    assert dropped == {"run_id": run_id, "base_index": 0, "count": 0, "ok": False, "dropped": "run_terminal"}


def test_agent_resolution(state):
    bound = Conn(state, "ag-1")
    assert bound.result("runs.start", {"intent": "x"})["agent_id"] == "ag-1"
    assert bound.call("runs.start", {"intent": "x", "agent_id": "other"})["error"]["data"]["field"] == "agent_id"
    unbound = Conn(state)
    assert unbound.result("runs.start", {"intent": "x", "agent_name": "Run Scenarios!"})["agent_id"] == "name:run-scenarios"
    # Naming an agent is for that agent's own connection: no forged traces.
    refused = unbound.call("runs.start", {"intent": "x", "agent_id": "explicit"})["error"]
    assert refused["code"] == -32602 and refused["data"]["field"] == "agent_id"
    assert unbound.call("runs.start", {"intent": "x"})["error"]["code"] == -32602
    assert unbound.call("runs.start", {"intent": "x", "agent_id": "../etc"})["error"]["data"]["field"] == "agent_id"


def test_idempotent_start(state, clock):
    a = Conn(state, "ag-1")
    first = a.result("runs.start", {"intent": "x", "idempotency_key": "occ-1"})
    again = a.result("runs.start", {"intent": "x", "idempotency_key": "occ-1"})
    assert first == again == {"run_id": "occ-1", "agent_id": "ag-1"}
    a.result("runs.complete", {"run_id": "occ-1", "outcome": {}})
    state.runs.runs.clear()  # as after a daemon restart: only the disk knows it
    assert a.result("runs.start", {"intent": "x", "idempotency_key": "occ-1"})["run_id"] == "occ-1"
    b = Conn(state, "ag-2")
    assert b.call("runs.start", {"intent": "x", "idempotency_key": "occ-1"})["error"]["data"]["field"] == "idempotency_key"
    assert a.call("runs.start", {"intent": "x", "idempotency_key": "a/b"})["error"]["data"]["field"] == "idempotency_key"


def test_writes_are_owner_bound(state):
    owner = Conn(state, "ag-1")
    run_id = owner.result("runs.start", {"intent": "x"})["run_id"]
    for other in (Conn(state, "ag-2"), Conn(state), Conn(state, host=True)):
        out = other.result("runs.record_turns", {"run_id": run_id, "turns": turns(1)})
        assert out["dropped"] == "run_not_found"
    assert owner.result("runs.record_turns", {"run_id": "no-such-run", "turns": turns(1)})["dropped"] == "run_not_found"


@pytest.mark.parametrize(
    "params",
    [{"turns": [{}]}, {"run_id": "r"}, {"run_id": "r", "turns": []}, {"run_id": "r", "turns": "x"},
     {"run_id": "r", "turns": [1]}, {"run_id": "", "turns": [{}]}],
)
def test_record_turns_validation(state, params):
    reply = Conn(state, "ag-1").call("runs.record_turns", params)
    assert reply["error"]["code"] == -32602
    assert reply["error"]["message"].startswith("runs.record_turns requires { run_id, turns: [RunTurn] }")


def test_batch_cap_and_ceiling(state):
    a = Conn(state, "ag-1")
    run_id = a.result("runs.start", {"intent": "x"})["run_id"]
    assert a.call("runs.record_turns", {"run_id": run_id, "turns": turns(257)})["error"]["code"] == -32602
    for _ in range(7):
        assert a.result("runs.record_turns", {"run_id": run_id, "turns": turns(256)})["ok"]
    assert state.runs.runs[run_id].turn_count == 1792
    refused = a.result("runs.record_turns", {"run_id": run_id, "turns": turns(209)})
    assert refused["dropped"] == "run_turn_limit" and state.runs.runs[run_id].turn_count == 1792
    fits = a.result("runs.record_turns", {"run_id": run_id, "turns": turns(208)})
    assert fits["base_index"] == 1792 and state.runs.runs[run_id].turn_count == RECORD_TURNS_RUN_CEILING
    assert a.result("runs.record_turns", {"run_id": run_id, "turns": turns(1)})["dropped"] == "run_turn_limit"


def test_turn_bounds():
    """Long strings are truncated; a turn over 256 KiB is cut down; one that cannot be is refused."""
    turn = bound_turn({"prompt": "p" * 20_000, "parameters": {"blob": "b" * 20_000, "n": 1}})
    assert len(turn["prompt"]) < 16_500 and turn["prompt"].endswith("…[truncated]")
    assert turn["parameters"]["blob"].endswith("…[truncated]") and turn["parameters"]["n"] == 1
    many = bound_turn({"output": ["x" * 15_000] * 30})
    assert many["output"] == "…[truncated: turn exceeded 256 KiB]"
    assert len(json.dumps(many)) < MAX_TURN_BYTES
    assert bound_turn({"tool": "t", "extra": "e" * (300 * 1024)}) is None


def test_too_large_turn_drops_the_whole_batch(state):
    a = Conn(state, "ag-1")
    run_id = a.result("runs.start", {"intent": "x"})["run_id"]
    out = a.result("runs.record_turns", {"run_id": run_id, "turns": [{"prompt": "fine"}, {"huge": "h" * (300 * 1024)}]})
    assert out["dropped"] == "turn_too_large" and state.runs.runs[run_id].turn_count == 0


# -- the grace window ----------------------------------------------------------


def test_disconnect_marks_incomplete_exactly_at_the_grace(state, clock, tmp_path):
    a = Conn(state, "ag-1")
    run_id = a.result("runs.start", {"intent": "x"})["run_id"]
    a.close()
    clock.advance(4.99)
    assert state.runs.runs[run_id].status == "in_progress"
    clock.advance(0.01)
    assert state.runs.runs[run_id].status == "incomplete"
    records = read_records(tmp_path / "car-home" / "runs" / "ag-1" / f"{run_id}.jsonl")
    assert records[-1]["record"] == "ended" and records[-1]["status"] == "incomplete"
    # Reconnect and complete after the grace: already terminal.
    b = Conn(state, "ag-1")
    assert "already terminal" in b.call("runs.complete", {"run_id": run_id, "outcome": {}})["error"]["message"]
    assert stray_timers(clock) == []


def test_complete_inside_the_grace_cancels_it(state, clock):
    a = Conn(state, "ag-1")
    run_id = a.result("runs.start", {"intent": "x"})["run_id"]
    a.close()
    clock.advance(2)
    b = Conn(state, "ag-1")  # the agent reconnects
    assert b.result("runs.complete", {"run_id": run_id, "outcome": {"ok": 1}})["ok"]
    assert stray_timers(clock) == []
    clock.advance(10)
    assert state.runs.runs[run_id].status == "completed"


def test_only_owner_or_agent_may_complete(state):
    a = Conn(state, "ag-1")
    run_id = a.result("runs.start", {"intent": "x"})["run_id"]
    assert "unknown run_id" in Conn(state, "ag-2").call("runs.complete", {"run_id": run_id})["error"]["message"]
    assert "unknown run_id" in Conn(state).call("runs.complete", {"run_id": "nope"})["error"]["message"]


# -- reads and subscriptions ---------------------------------------------------------


def test_read_authorization(state):
    owner = Conn(state, "ag-1")
    run_id = owner.result("runs.start", {"intent": "x"})["run_id"]
    owner.result("runs.record_turns", {"run_id": run_id, "turns": turns(1, "secret-prompt")})
    plain, other = Conn(state), Conn(state, "ag-2")
    for conn in (plain, other):
        for method, params in (("runs.list", {"agent_id": "ag-1"}), ("runs.get_trace", {"run_id": run_id}),
                               ("runs.subscribe", {"run_id": run_id})):
            reply = conn.call(method, params)
            assert "not visible to this connection" in reply["error"]["message"]
            assert "secret-prompt" not in json.dumps(reply)
    host = Conn(state, host=True)
    assert [r["run_id"] for r in host.result("runs.list", {"agent_id": "ag-1"})["runs"]] == [run_id]
    assert host.result("runs.get_trace", {"run_id": run_id})["records"][1]["prompt"] == "secret-prompt0"
    assert owner.result("runs.list", {"agent_id": "ag-1"})["runs"][0]["turn_count"] == 1
    assert host.result("runs.get_trace", {"run_id": "never-was"}) == {"run_id": "never-was", "not_found": True}
    assert host.result("runs.list", {"agent_id": "nobody"}) == {"agent_id": "nobody", "runs": []}


def test_list_is_newest_first_and_get_trace_pages(state, clock):
    a = Conn(state, "ag-1")
    ids = []
    for i in range(3):
        ids.append(a.result("runs.start", {"intent": f"run {i}"})["run_id"])
        clock.advance(1)
    listed = a.result("runs.list", {"agent_id": "ag-1"})["runs"]
    assert [r["run_id"] for r in listed] == list(reversed(ids))
    a.result("runs.record_turns", {"run_id": ids[0], "turns": turns(3)})
    page = a.result("runs.get_trace", {"run_id": ids[0], "cursor": 2})
    assert page["cursor"] == 2 and [r["index"] for r in page["records"]] == [1, 2]


def test_list_pages_and_lists_every_agent_for_the_host(state, clock, tmp_path):
    """limit/offset cut a page and say the total; no agent_id lists every agent's runs, for the host role only."""
    conns = {agent_id: Conn(state, agent_id) for agent_id in ("ag-1", "ag-2")}
    started = []
    for i in range(5):
        for agent_id, conn in conns.items():
            run_id = conn.result("runs.start", {"intent": f"{agent_id} run {i}"})["run_id"]
            conn.result("runs.complete", {"run_id": run_id})
            started.append((agent_id, run_id))
            clock.advance(1)
    newest = [run_id for _, run_id in reversed(started)]
    mine = [run_id for agent_id, run_id in reversed(started) if agent_id == "ag-1"]
    owner = conns["ag-1"]
    # Unpaged: the answer is what it always was.
    assert set(owner.result("runs.list", {"agent_id": "ag-1"})) == {"agent_id", "runs"}
    page = owner.result("runs.list", {"agent_id": "ag-1", "limit": 2, "offset": 1})
    assert [r["run_id"] for r in page["runs"]] == mine[1:3]
    assert (page["agent_id"], page["total"], page["offset"]) == ("ag-1", 5, 1)
    assert owner.result("runs.list", {"agent_id": "ag-1", "offset": 4})["runs"][0]["run_id"] == mine[4]
    host = Conn(state, host=True)
    every = host.result("runs.list", {})
    assert [r["run_id"] for r in every["runs"]] == newest
    assert (every["agent_id"], every["total"], every["offset"]) == (None, 10, 0)
    assert {r["agent_id"] for r in every["runs"]} == {"ag-1", "ag-2"}
    tail = host.result("runs.list", {"limit": 3, "offset": 9})
    assert [r["run_id"] for r in tail["runs"]] == newest[9:] and tail["total"] == 10
    assert host.result("runs.list", {"limit": 3, "offset": 50})["runs"] == []
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "ten"}):
        assert host.call("runs.list", bad)["error"]["code"] == -32602, bad
    for conn in (owner, Conn(state)):
        reply = conn.call("runs.list", {})
        assert "not visible to this connection" in reply["error"]["message"] and "ag-" not in json.dumps(reply)
    # A later daemon life finds every agent's runs in the store.
    later = Conn(make_state(tmp_path, Clock()), host=True)
    assert [r["run_id"] for r in later.result("runs.list", {"limit": 4})["runs"]] == newest[:4]


def test_subscribe_snapshot_then_stream(state):
    owner, host = Conn(state, "ag-1"), Conn(state, host=True)
    run_id = owner.result("runs.start", {"intent": "x"})["run_id"]
    owner.result("runs.record_turns", {"run_id": run_id, "turns": turns(3)})
    snap = host.result("runs.subscribe", {"run_id": run_id})
    assert snap["cursor"] == 3 and [t["index"] for t in snap["turns_so_far"]] == [0, 1, 2]
    assert snap["status"] == "in_progress" and host.session.activity.pins == 1
    owner.result("runs.record_turns", {"run_id": run_id, "turns": turns(2)})
    owner.result("runs.complete", {"run_id": run_id, "outcome": {}})
    events = host.events()
    assert [e["cursor"] for e in events] == [4, 5, 5]
    assert [e["record"]["record"] for e in events] == ["turn", "turn", "ended"]
    assert events[-1]["status"] == "completed"
    assert host.result("runs.unsubscribe", {"run_id": run_id}) == {"run_id": run_id, "removed": True}
    assert host.result("runs.unsubscribe", {"run_id": run_id})["removed"] is False
    assert host.session.activity.pins == 0


def test_stalled_subscriber_drops_not_stalls(state):
    owner, host = Conn(state, "ag-1"), Conn(state, host=True)
    run_id = owner.result("runs.start", {"intent": "x"})["run_id"]
    host.result("runs.subscribe", {"run_id": run_id})
    host.session.channel.pause()  # its transport buffer is full
    big = [{"prompt": "p", "output": "o" * 15_000}]
    for _ in range(200):
        assert owner.result("runs.record_turns", {"run_id": run_id, "turns": big})["ok"]
    assert host.events() == []
    sub = state.runs.subscriptions.get(run_id, host.session.client_id)
    assert sub.backlog_bytes <= SUBSCRIBER_BACKLOG_BYTES and sub.dropped == 200 - len(sub.backlog)
    host.session.channel.resume()
    cursors = [e["cursor"] for e in host.events()]
    assert 100 < len(cursors) < 200
    assert cursors == list(range(1, len(cursors) + 1))  # the backlog, then a gap the client detects
    owner.result("runs.record_turns", {"run_id": run_id, "turns": big})
    assert host.events()[-1]["cursor"] == 201


def test_a_reader_that_keeps_up_gets_a_whole_batch(state):
    """A 256-turn batch fans out in one go; the backlog holds what the socket cannot take yet."""
    owner, host = Conn(state, "ag-1"), Conn(state, host=True)
    run_id = owner.result("runs.start", {"intent": "x"})["run_id"]
    host.result("runs.subscribe", {"run_id": run_id})
    host.session.channel.pause()  # the first frames filled the socket buffer
    owner.result("runs.record_turns", {"run_id": run_id, "turns": [{"output": "o" * 2000}] * 256})
    host.session.channel.resume()
    assert [e["cursor"] for e in host.events()] == list(range(1, 257))


def test_disconnect_drops_subscriptions(state):
    owner, host = Conn(state, "ag-1"), Conn(state, host=True)
    run_id = owner.result("runs.start", {"intent": "x"})["run_id"]
    host.result("runs.subscribe", {"run_id": run_id})
    host.close()
    owner.result("runs.record_turns", {"run_id": run_id, "turns": turns(1)})
    assert state.runs.subscriptions.is_empty()


def test_torn_last_line_reads_incomplete(state, tmp_path):
    a = Conn(state, "ag-1")
    run_id = a.result("runs.start", {"intent": "x"})["run_id"]
    a.result("runs.record_turns", {"run_id": run_id, "turns": turns(2)})
    path = tmp_path / "car-home" / "runs" / "ag-1" / f"{run_id}.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"record":"turn","index":2,"prom')  # a crash mid-write
    state.runs.runs.clear()  # a fresh daemon
    host = Conn(state, host=True)
    trace = host.result("runs.get_trace", {"run_id": run_id})
    assert [r["record"] for r in trace["records"]] == ["started", "turn", "turn", "ended"]
    assert trace["records"][-1]["status"] == "incomplete"
    (summary,) = host.result("runs.list", {"agent_id": "ag-1"})["runs"]
    assert summary["status"] == "incomplete" and summary["turn_count"] == 2


def test_proposals_are_recorded_into_the_current_run(state, tmp_path):
    """A bound agent's proposal lands in its current run as turns, before the proposal answers."""
    from car_twisted.interfaces import IToolExecutor
    from car_twisted.testing import FakeToolExecutor

    agent = Conn(state, "ag-1")
    agent.session._components[IToolExecutor] = FakeToolExecutor({"echo": lambda c: {"echo": c.parameters}})
    agent.result("tools.register", [{"name": "echo"}, {"name": "shell"}])
    agent.result("policy.register", {"name": "no_shell", "rule": "deny_tool", "target": "shell"})
    run_id = agent.result("runs.start", {"intent": "work"})["run_id"]
    result = agent.result("proposal.submit", {"proposal": {"actions": [
        {"id": "a1", "type": "tool_call", "tool": "echo", "parameters": {"x": 1}},
        {"id": "a2", "type": "tool_call", "tool": "shell", "failure_behavior": "skip"},
    ]}})
    assert [r["status"] for r in result["results"]] == ["succeeded", "rejected"]
    records = read_records(tmp_path / "car-home" / "runs" / "ag-1" / f"{run_id}.jsonl")
    turns = [r for r in records if r["record"] == "turn"]
    assert [(t["index"], t["action_id"], t["status"]) for t in turns] == [(0, "a1", "succeeded"), (1, "a2", "rejected")]
    assert turns[0]["output"] == {"echo": {"x": 1}} and turns[0]["proposal_id"] == result["proposal_id"]
    assert turns[1]["policy_rejected"] is True
    # An unbound connection's proposal records nothing (runs are owner-bound).
    plain = Conn(state)
    plain.result("tools.register", [{"name": "echo"}])
    plain.session._components[IToolExecutor] = FakeToolExecutor({"echo": lambda c: 1})
    plain.state.runs.connection(plain.session).current_run = run_id
    plain.result("proposal.submit", {"proposal": {"actions": [{"id": "b", "type": "tool_call", "tool": "echo"}]}})
    assert state.runs.runs[run_id].turn_count == 2
