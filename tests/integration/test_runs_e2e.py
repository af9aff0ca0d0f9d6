"""
Run tracing over real sockets with the threaded JSONL store: the ceiling
under pipelined batches from several connections, subscribing mid-run,
a subscriber that never reads, and a daemon killed with -9 mid-append.
"""

import json
import os
import signal
import subprocess
import sys

import pytest_twisted
from twisted.internet import defer, task
from zope.interface import implementer

from car_twisted.interfaces import IAgentIdentities
from car_twisted.runs.registry import SUBSCRIBER_BACKLOG_BYTES
from car_twisted.runs.store import read_records
from support import HOST_TOKEN, WsTestClient, free_port, port_open, start_server


@implementer(IAgentIdentities)
class SharedIdentities:
    """Lets several connections speak for one agent (an embedder's choice)."""

    def verify(self, agent_id, token):
        return token == f"token-of-{agent_id}"

    def attach(self, agent_id, session):
        pass

    def detach(self, agent_id, session):
        pass


async def as_agent(server, agent_id, kind="tcp"):
    client = await server.client(kind)
    reply = await client.call("session.auth", {"agent_id": agent_id, "token": f"token-of-{agent_id}"}, rid=0)
    assert reply["result"]["agent_id"] == agent_id
    return client


async def as_host(server):
    client = await server.client("tcp")
    assert (await client.call("session.auth", {"host_token": HOST_TOKEN}, rid=0))["result"]["role"] == "host"
    return client


def batch(n, tag):
    return [{"prompt": f"{tag}-{i}", "output": "x" * 100} for i in range(n)]


@pytest_twisted.ensureDeferred
async def test_ceiling_holds_under_pipelined_batches(reactor, tmp_path):
    """Batches racing from four connections never take a run past 2000; refusals are whole."""
    server = await start_server(reactor, tmp_path, agent_identities=SharedIdentities())
    try:
        clients = [await as_agent(server, "racer") for _ in range(4)]
        run_id = (await clients[0].result("runs.start", {"intent": "race"}))["run_id"]
        for _ in range(7):
            await clients[0].result("runs.record_turns", {"run_id": run_id, "turns": batch(256, "warm")})
        # 1792 stored; 16 pipelined batches of 50 (800 turns) race for the last 208.
        sends = [c.send("runs.record_turns", {"run_id": run_id, "turns": batch(50, f"c{i}-{k}")})
                 for k in range(4) for i, c in enumerate(clients)]
        replies = [r["result"] for r in await defer.gatherResults(sends)]
        accepted = [r for r in replies if r["ok"]]
        refused = [r for r in replies if not r["ok"]]
        assert len(accepted) == 4 and len(refused) == 12
        assert all(r == {"run_id": run_id, "base_index": 0, "count": 0, "ok": False, "dropped": "run_turn_limit"} for r in refused)
        assert sorted(r["base_index"] for r in accepted) == [1792, 1842, 1892, 1942]
        host = await as_host(server)
        trace = await host.result("runs.get_trace", {"run_id": run_id})
        turns = [r for r in trace["records"] if r["record"] == "turn"]
        assert len(turns) == 1992 and [t["index"] for t in turns] == list(range(1992))
        # Each accepted batch landed whole and contiguous.
        for r in accepted:
            tags = {t["prompt"].rsplit("-", 1)[0] for t in turns[r["base_index"]:r["base_index"] + 50]}
            assert len(tags) == 1
        for c in clients + [host]:
            c.drop()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_subscribe_mid_run_sees_every_turn_once(reactor, tmp_path):
    server = await start_server(reactor, tmp_path, agent_identities=SharedIdentities())
    try:
        agent = await as_agent(server, "writer")
        run_id = (await agent.result("runs.start", {"intent": "stream"}))["run_id"]
        host = await as_host(server)
        pending = [agent.send("runs.record_turns", {"run_id": run_id, "turns": batch(5, f"b{k}")}) for k in range(20)]
        snap = await host.result("runs.subscribe", {"run_id": run_id})  # lands somewhere mid-stream
        more = [agent.send("runs.record_turns", {"run_id": run_id, "turns": batch(5, f"c{k}")}) for k in range(20)]
        await defer.gatherResults(pending + more)
        await agent.result("runs.complete", {"run_id": run_id, "outcome": {"status": "done"}})

        await host.when(lambda: any(n["params"]["record"]["record"] == "ended" for n in host.notifications),
                        "the ended event")
        events = [n["params"] for n in host.notifications if n["method"] == "runs.trace.event"]
        turn_events = [e for e in events if e["record"]["record"] == "turn"]
        seen = [t["index"] for t in snap["turns_so_far"]] + [e["record"]["index"] for e in turn_events]
        assert seen == list(range(200)), "every turn exactly once, in order"
        cursors = [snap["cursor"]] + [e["cursor"] for e in turn_events]
        assert cursors == list(range(snap["cursor"], 201))
        assert events[-1]["status"] == "completed"
        agent.drop()
        host.drop()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_subscriber_that_never_reads_does_not_hold_up_the_recorder(reactor, tmp_path):
    """The recorder's acks all arrive while a subscriber's socket is full; it later sees a gap, not a stall."""
    server = await start_server(reactor, tmp_path, agent_identities=SharedIdentities())
    try:
        agent = await as_agent(server, "loud")
        run_id = (await agent.result("runs.start", {"intent": "flood"}))["run_id"]
        lazy = await as_host(server)
        await lazy.result("runs.subscribe", {"run_id": run_id})
        lazy.protocol.transport.pauseProducing()  # stop reading: the daemon's output to it backs up
        lazy_session = next(s for s in server.state.sessions.values() if s.is_host)
        big = [{"prompt": "p", "output": "o" * 12_000} for _ in range(20)]
        for k in range(60):
            reply = await agent.result("runs.record_turns", {"run_id": run_id, "turns": big})
            assert reply["ok"]
        assert lazy_session.channel.paused, "the lazy subscriber's output should have backed up"
        sub = server.state.runs.subscriptions.get(run_id, lazy_session.client_id)
        assert sub.dropped > 0 and sub.backlog_bytes <= SUBSCRIBER_BACKLOG_BYTES
        # The backlog drains only when the daemon's output resumes, and the
        # subscription's own resume hook (registered first) runs before this one.
        drained = defer.Deferred()

        def check_drained():
            if not drained.called and not sub.backlog and not lazy_session.channel.paused:
                reactor.callLater(0, drained.callback, None)

        lazy_session.channel.on_resume(check_drained)
        lazy.protocol.transport.resumeProducing()
        await drained.addTimeout(15, reactor)
        assert not sub.backlog and not lazy_session.channel.paused, "the backlog to drain"
        # Not stalled: the next turn reaches it live.
        await agent.result("runs.record_turns", {"run_id": run_id, "turns": batch(1, "after")})
        await lazy.when(lambda: lazy.notifications and lazy.notifications[-1]["params"]["cursor"] == 1201,
                        "the live event after the gap")
        cursors = [n["params"]["cursor"] for n in lazy.notifications]
        assert cursors == sorted(cursors) and cursors[0] == 1
        assert any(b - a > 1 for a, b in zip(cursors, cursors[1:])), "a gap, which the client re-subscribes over"
        agent.drop()
        lazy.drop()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_append_loses_nothing_acknowledged(reactor, tmp_path):
    home = tmp_path / "home"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
    cmd = [sys.executable, "-m", "twisted", "--log-format=text", "car", "--car-home", str(home),
           "--listen", f"tcp:{port}:interface=127.0.0.1"]

    async def boot():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # A daemon subprocess: its port and token file are all there is to watch.
        deadline = reactor.seconds() + 20
        while not (port_open(port) and (home / "ai.parslee.car" / "host-token").exists()):
            assert proc.poll() is None and reactor.seconds() < deadline, "daemon did not start"
            await task.deferLater(reactor, 0.05, lambda: None)
        return proc

    proc = await boot()
    try:
        host_token = (home / "ai.parslee.car" / "host-token").read_text().strip()
        op = await WsTestClient.connect(reactor, f"tcp:127.0.0.1:{port}")
        assert (await op.call("session.auth", {"host_token": host_token}, rid=0))["result"]["role"] == "host"
        await op.result("agents.upsert", {"id": "durable", "command": os.path.realpath(sys.executable)})
        agent_token = json.loads((home / "agents.json").read_text())["agents"][0]["token"]
        agent = await WsTestClient.connect(reactor, f"tcp:127.0.0.1:{port}")
        await agent.call("session.auth", {"agent_id": "durable", "token": agent_token}, rid=0)
        run_id = (await agent.result("runs.start", {"intent": "crash test"}))["run_id"]
        acked = []
        sends = []
        for k in range(300):
            d = agent.send("runs.record_turns", {"run_id": run_id, "turns": batch(4, f"k{k}")})
            d.addCallbacks(lambda r: acked.append(r["result"]) if "result" in r else None, lambda f: None)
            sends.append(d)
        await agent.when(lambda: len(acked) >= 40, "some acknowledgements")
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream
        proc.wait(timeout=10)
        await defer.DeferredList(sends, consumeErrors=True)
        op.drop()
        agent.drop()
    finally:
        if proc.poll() is None:
            proc.kill()
    acked_turns = {r["base_index"] + i for r in acked if r["ok"] for i in range(r["count"])}
    assert len(acked_turns) >= 160

    proc = await boot()
    try:
        host_token = (home / "ai.parslee.car" / "host-token").read_text().strip()
        host = await WsTestClient.connect(reactor, f"tcp:127.0.0.1:{port}")
        assert (await host.call("session.auth", {"host_token": host_token}, rid=0))["result"]["role"] == "host"
        trace = await host.result("runs.get_trace", {"run_id": run_id})
        stored = [r["index"] for r in trace["records"] if r["record"] == "turn"]
        assert stored == list(range(len(stored))), "contiguous, nothing corrupt"
        assert acked_turns <= set(stored), "every acknowledged turn survived"
        assert trace["records"][-1] == {"record": "ended", "status": "incomplete",
                                        "reason": "no terminal record: the daemon stopped during the run"}
        (summary,) = (await host.result("runs.list", {"agent_id": "durable"}))["runs"]
        assert summary["status"] == "incomplete" and summary["turn_count"] == len(stored)
        host.drop()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    raw = read_records(home / "runs" / "durable" / f"{run_id}.jsonl")
    assert raw[0]["record"] == "started"
