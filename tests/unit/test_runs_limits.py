"""runs.* bounds: open-run caps, agent naming, connection pins, and the store's retention and quota."""

import json

import pytest
from twisted.internet.task import Clock

from car_twisted.runs.store import JsonlRunStore, read_records
from support import make_state
from test_runs import Conn, turns


@pytest.fixture
def clock():
    return Clock()


def runs_dir(tmp_path):
    return tmp_path / "car-home" / "runs"


def files(tmp_path):
    """Every file in the run store, as agent/name."""
    root = runs_dir(tmp_path)
    if not root.exists():
        return set()
    return {f"{d.name}/{f.name}" for d in root.iterdir() for f in d.iterdir()}


def run_files(agent_id, run_id):
    return {f"{agent_id}/{run_id}.jsonl", f"{agent_id}/{run_id}.summary.json"}


def store_bytes(tmp_path):
    root = runs_dir(tmp_path)
    return sum(f.stat().st_size for d in root.iterdir() for f in d.iterdir())


def start(conn, clock, **params):
    run_id = conn.result("runs.start", {"intent": "x", **params})["run_id"]
    clock.advance(1)  # every run starts at its own time: "oldest" is well defined
    return run_id


def start_and_complete(conn, clock, **params):
    run_id = start(conn, clock, **params)
    conn.result("runs.complete", {"run_id": run_id, "outcome": {}})
    return run_id


# -- the open-run caps -----------------------------------------------------------------------


def test_open_runs_per_agent_cap(tmp_path, clock):
    state = make_state(tmp_path, clock, max_open_runs_per_agent=2)
    a, b = Conn(state, "ag-1"), Conn(state, "ag-1")
    first = start(a, clock)
    start(b, clock)
    before = files(tmp_path)
    refused = a.call("runs.start", {"intent": "one too many"})["error"]
    assert refused["code"] == -32603
    assert refused["data"] == {"reason": "open_run_limit", "limit": 2}
    assert "max_open_runs_per_agent" in refused["message"] and "2" in refused["message"]
    assert files(tmp_path) == before  # nothing written for a refused start
    assert len(state.runs.runs) == 2
    # Another agent has its own allowance; an ended run frees a slot.
    start(Conn(state, "ag-2"), clock)
    a.result("runs.complete", {"run_id": first, "outcome": {}})
    start(a, clock)


def test_open_runs_per_connection_cap(tmp_path, clock):
    state = make_state(tmp_path, clock, max_open_runs_per_connection=2)
    conn = Conn(state)  # unbound: a new agent per agent_name, so only the connection cap applies
    first = start(conn, clock, agent_name="one")
    start(conn, clock, agent_name="two")
    before = files(tmp_path)
    refused = conn.call("runs.start", {"intent": "x", "agent_name": "three"})["error"]
    assert refused["data"] == {"reason": "open_run_limit", "limit": 2}
    assert "max_open_runs_per_connection" in refused["message"]
    assert files(tmp_path) == before
    # Another connection has its own allowance.
    start(Conn(state), clock, agent_name="three")
    conn.result("runs.complete", {"run_id": first, "outcome": {}})
    start(conn, clock, agent_name="four")


def test_idempotent_restart_is_not_a_new_run(tmp_path, clock):
    state = make_state(tmp_path, clock, max_open_runs_per_agent=2)
    a = Conn(state, "ag-1")
    start(a, clock, idempotency_key="k1")
    start(a, clock, idempotency_key="k2")
    assert a.result("runs.start", {"intent": "x", "idempotency_key": "k1"}) == {"run_id": "k1", "agent_id": "ag-1"}
    assert a.call("runs.start", {"intent": "x", "idempotency_key": "k3"})["error"]["data"]["reason"] == "open_run_limit"


def test_runs_left_by_a_closed_connection_still_count_for_their_agent(tmp_path, clock):
    state = make_state(tmp_path, clock, max_open_runs_per_agent=1, run_complete_grace=5.0)
    a = Conn(state, "ag-1")
    run_id = start(a, clock)
    a.close()
    b = Conn(state, "ag-1")  # the agent reconnects inside the grace window
    assert b.call("runs.start", {"intent": "x"})["error"]["data"]["reason"] == "open_run_limit"
    clock.advance(5)  # the grace runs out: the old run is incomplete, its slot free
    assert state.runs.runs[run_id].status == "incomplete"
    start(b, clock)


# -- naming the agent ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", [False, True])
def test_unbound_connections_may_not_name_an_agent(tmp_path, clock, host):
    state = make_state(tmp_path, clock)
    conn = Conn(state, host=host)
    refused = conn.call("runs.start", {"intent": "forged", "agent_id": "ag-1"})["error"]
    assert refused["code"] == -32602 and refused["data"]["field"] == "agent_id"
    assert files(tmp_path) == set() and state.runs.runs == {}
    # agent_name stays open to them, and a bound agent may name itself.
    assert conn.result("runs.start", {"intent": "x", "agent_name": "Helper"})["agent_id"] == "name:helper"
    assert Conn(state, "ag-1").result("runs.start", {"intent": "x", "agent_id": "ag-1"})["agent_id"] == "ag-1"


# -- pins -----------------------------------------------------------------------------------------


def test_an_open_run_pins_its_connection(tmp_path, clock):
    state = make_state(tmp_path, clock, run_complete_grace=5.0)
    conn = Conn(state)
    assert conn.session.reapable()
    run_id = start(conn, clock, agent_name="worker")
    assert conn.session.activity.pins == 1 and not conn.session.reapable()
    conn.result("runs.complete", {"run_id": run_id, "outcome": {}})
    assert conn.session.activity.pins == 0 and conn.session.reapable()
    # A run still open when its connection closes lets go of it then.
    start(conn, clock, agent_name="worker")
    start(conn, clock, agent_name="worker")
    assert conn.session.activity.pins == 2
    conn.close()
    assert conn.session.activity.pins == 0
    clock.advance(5)
    assert conn.session.activity.pins == 0


# -- retention ---------------------------------------------------------------------------------


def test_retention_per_agent_prunes_the_oldest_ended_runs(tmp_path, clock):
    state = make_state(tmp_path, clock, run_retention_per_agent=3)
    a, other = Conn(state, "ag-1"), Conn(state, "ag-2")
    live = start(a, clock)  # the oldest run, but open: never pruned
    kept_elsewhere = start_and_complete(other, clock)
    ended = [start_and_complete(a, clock) for _ in range(5)]
    expected = run_files("ag-1", live) | run_files("ag-2", kept_elsewhere)
    for run_id in ended[-3:]:
        expected |= run_files("ag-1", run_id)
    assert files(tmp_path) == expected
    assert a.result("runs.get_trace", {"run_id": ended[0]}) == {"run_id": ended[0], "not_found": True}
    assert [r["run_id"] for r in a.result("runs.list", {"agent_id": "ag-1"})["runs"]] == [*reversed(ended[-3:]), live]
    # Once the old live run ends it is the oldest ended run: it goes first.
    a.result("runs.complete", {"run_id": live, "outcome": {}})
    assert not files(tmp_path) & run_files("ag-1", live)
    assert state.runs.retention.index.bytes == store_bytes(tmp_path)


def test_retention_total_across_agents(tmp_path, clock):
    state = make_state(tmp_path, clock, run_retention_total=3)
    a, b = Conn(state, "ag-a"), Conn(state, "ag-b")
    ids = []
    for conn, agent in [(a, "ag-a"), (b, "ag-b")] * 3:
        ids.append((agent, start_and_complete(conn, clock)))
    expected = set().union(*(run_files(agent, run_id) for agent, run_id in ids[-3:]))
    assert files(tmp_path) == expected


def test_runs_from_an_earlier_daemon_life_count_as_ended(tmp_path, clock):
    first = make_state(tmp_path, clock)
    old = Conn(first, "ag-1")
    left_open = start(old, clock)  # the daemon "dies" with this run in_progress
    old.result("runs.record_turns", {"run_id": left_open, "turns": turns(2)})
    done = start_and_complete(old, clock)
    (runs_dir(tmp_path) / "ag-1" / "stray.txt").write_text("not a run")

    state = make_state(tmp_path, clock, run_retention_per_agent=2)
    inventories = []
    inventory = state.runs.store.inventory
    state.runs.store.inventory = lambda: inventories.append(1) or inventory()
    a = Conn(state, "ag-1")
    newest = start_and_complete(a, clock)
    assert not files(tmp_path) & run_files("ag-1", left_open)
    assert files(tmp_path) == run_files("ag-1", done) | run_files("ag-1", newest) | {"ag-1/stray.txt"}
    newer = start_and_complete(a, clock)
    assert inventories == [1]  # read once, then kept in memory
    assert files(tmp_path) == run_files("ag-1", newest) | run_files("ag-1", newer) | {"ag-1/stray.txt"}


def test_an_unreadable_store_fails_the_start_and_the_next_one_retries(tmp_path, clock):
    from twisted.internet.defer import fail

    state = make_state(tmp_path, clock)
    inventory, calls = state.runs.store.inventory, []

    def flaky():
        calls.append(1)
        return fail(OSError("disk on fire")) if len(calls) == 1 else inventory()

    state.runs.store.inventory = flaky
    a = Conn(state, "ag-1")
    assert "could not be read" in a.call("runs.start", {"intent": "x"})["error"]["message"]
    assert files(tmp_path) == set() and state.runs.runs == {}
    start(a, clock)
    assert len(calls) == 2


def test_a_store_over_its_limits_is_pruned_before_the_first_new_run(tmp_path, clock):
    first = make_state(tmp_path, clock)
    old = Conn(first, "ag-1")
    ids = [start_and_complete(old, clock) for _ in range(4)]
    state = make_state(tmp_path, clock, run_retention_per_agent=1)
    Conn(state, "ag-1").result("runs.start", {"intent": "x"})
    assert ids[-1] + ".jsonl" in {f.split("/")[1] for f in files(tmp_path)}
    assert not any(files(tmp_path) & run_files("ag-1", run_id) for run_id in ids[:-1])


def test_a_run_is_not_pruned_before_its_last_writes_land(tmp_path, clock):
    """An ended run becomes prunable once its terminal record and summary are stored, not before."""
    from twisted.internet.defer import Deferred

    state = make_state(tmp_path, clock, run_retention_per_agent=1)
    a = Conn(state, "ag-1")
    slow = start(a, clock)
    store = state.runs.store
    write_summary, gate = store.write_summary, Deferred()

    def held(summary):
        if summary["run_id"] == slow and summary["status"] != "in_progress":
            return gate.addCallback(lambda _: write_summary(summary))
        return write_summary(summary)

    store.write_summary = held
    rid = a.send("runs.complete", {"run_id": slow, "outcome": {}})  # its summary write hangs
    assert a.reply(rid) is None
    newer = start_and_complete(a, clock)
    assert run_files("ag-1", slow) <= files(tmp_path)  # not yet prunable
    gate.callback(None)
    assert a.reply(rid)["result"] == {"run_id": slow, "ok": True}
    # Now it is the oldest ended run past the limit: all of it goes, no summary left behind.
    assert files(tmp_path) == run_files("ag-1", newer)


# -- the byte quota ----------------------------------------------------------------------------


def test_bytes_quota_prunes_oldest_down_to_ninety_percent(tmp_path, clock):
    state = make_state(tmp_path, clock, run_store_max_bytes=9_500)
    a = Conn(state, "ag-1")
    ids = []
    for _ in range(3):
        run_id = start(a, clock)
        a.result("runs.record_turns", {"run_id": run_id, "turns": [{"output": "o" * 2500}]})
        a.result("runs.complete", {"run_id": run_id, "outcome": {}})
        ids.append(run_id)
    # Three runs of about 3 000 bytes each: within the quota, nothing pruned.
    assert all(run_files("ag-1", r) <= files(tmp_path) for r in ids)
    index = state.runs.retention.index
    assert 8_550 < index.bytes == store_bytes(tmp_path) <= 9_500
    fourth = start(a, clock)
    a.result("runs.record_turns", {"run_id": fourth, "turns": [{"output": "o" * 2500}]})
    assert index.bytes > 9_500
    a.result("runs.complete", {"run_id": fourth, "outcome": {}})
    # Dropping the oldest alone would leave it within the quota but above
    # 90 % of it (8 550 bytes): the two oldest go.
    assert files(tmp_path) == run_files("ag-1", ids[2]) | run_files("ag-1", fourth)
    assert index.bytes == store_bytes(tmp_path) <= 8_550


def test_full_store_refuses_new_runs_and_appends(tmp_path, clock):
    from car_twisted.interfaces import IToolExecutor
    from car_twisted.testing import FakeToolExecutor

    state = make_state(tmp_path, clock, run_store_max_bytes=4096)
    a = Conn(state, "ag-1")
    a.session._components[IToolExecutor] = FakeToolExecutor({"echo": lambda c: "ok"})
    a.result("tools.register", [{"name": "echo"}])
    run_id = start(a, clock)
    # Within the quota when it is written; past it once stored.
    assert a.result("runs.record_turns", {"run_id": run_id, "turns": [{"output": "o" * 5000}]})["ok"]
    before = files(tmp_path)
    sizes = store_bytes(tmp_path)

    refused = a.call("runs.record_turns", {"run_id": run_id, "turns": turns(1)})["error"]
    assert refused["data"] == {"reason": "run_store_full", "limit": 4096}
    assert "run_store_max_bytes" in refused["message"]
    # The proposal recorder is refused the same way; the proposal itself still answers.
    result = a.result("proposal.submit", {"proposal": {"actions": [{"id": "p", "type": "tool_call", "tool": "echo"}]}})
    assert result["results"][0]["status"] == "succeeded"
    assert state.runs.runs[run_id].turn_count == 1
    other = Conn(state, "ag-2")
    assert other.call("runs.start", {"intent": "x"})["error"]["data"]["reason"] == "run_store_full"
    assert files(tmp_path) == before and store_bytes(tmp_path) == sizes

    # Ending the run makes it prunable: it goes, and the store takes new runs again.
    a.result("runs.complete", {"run_id": run_id, "outcome": {}})
    assert files(tmp_path) == set()
    fresh = start(other, clock)
    assert files(tmp_path) == run_files("ag-2", fresh)


# -- the store's side ---------------------------------------------------------------------------


def test_store_inventory_and_delete(tmp_path):
    from car_twisted.runs.model import StoredRun

    clock = Clock()
    store = JsonlRunStore(clock, tmp_path / "runs")
    assert store.inventory().result == []
    written = store.append("ag-1", "r1", [{"record": "started"}]).result
    size = store.write_summary({"run_id": "r1", "agent_id": "ag-1", "started_at": "2024-05-01T00:00:00Z", "status": "completed"}).result
    store.append("ag-1", "r2", [{"record": "started"}, {"record": "turn"}])
    store.write_summary({"run_id": "r2", "agent_id": "ag-1", "started_at": "2024-05-01T00:00:01.500000Z", "status": "in_progress"})
    store.append("ag-2", "r3", [{"record": "started"}])  # no summary: started is the log's mtime
    (tmp_path / "runs" / "ag-2" / ".r3.summary.json.1.tmp").write_text("{}")  # a summary write's leftover
    listed = {r.run_id: r for r in store.inventory().result}
    assert set(listed) == {"r1", "r2", "r3"}
    path = tmp_path / "runs" / "ag-1"
    assert listed["r1"] == StoredRun("ag-1", "r1", written + size, 1714521600.0, True)
    assert written == (path / "r1.jsonl").stat().st_size and size == (path / "r1.summary.json").stat().st_size
    assert listed["r2"].started == 1714521601.5 and listed["r2"].ended is False
    assert listed["r3"].bytes == (tmp_path / "runs" / "ag-2" / "r3.jsonl").stat().st_size
    assert listed["r3"].started == (tmp_path / "runs" / "ag-2" / "r3.jsonl").stat().st_mtime

    store.delete("ag-1", "r1")
    assert sorted(p.name for p in path.iterdir()) == ["r2.jsonl", "r2.summary.json"]
    store.delete("ag-1", "r1")  # already gone: no error
    store.delete("ag-1", "r2")
    assert not path.exists()  # an agent's last run takes its directory along
    # A later write for that agent makes the directory again.
    store.append("ag-1", "r4", [{"record": "started"}])
    assert read_records(path / "r4.jsonl") == [{"record": "started"}]


def test_delete_waits_for_the_runs_earlier_writes(tmp_path):
    """delete() goes through the run's queue: it runs after writes made before it."""
    from twisted.internet.defer import Deferred

    store = JsonlRunStore(Clock(), tmp_path / "runs")
    gate = Deferred()
    store._queues["r1"] = [gate, 1]  # an earlier operation on r1 still in flight
    order = []
    store.append("ag-1", "r1", [{"record": "started"}]).addCallback(lambda _: order.append("append"))
    store.delete("ag-1", "r1").addCallback(lambda _: order.append("delete"))
    assert order == []
    gate.callback(None)
    assert order == ["append", "delete"]
    assert not (tmp_path / "runs" / "ag-1").exists()


def test_inventory_reads_the_registrys_summaries(tmp_path, clock):
    """The start time and status the inventory reads are the ones the registry writes."""
    state = make_state(tmp_path, clock)
    run_id = start_and_complete(Conn(state, "ag-1"), clock)
    summary = json.loads((runs_dir(tmp_path) / "ag-1" / f"{run_id}.summary.json").read_text())
    (stored,) = state.runs.store.inventory().result
    assert stored.ended and summary["status"] == "completed" and stored.started == 0.0
