"""
Supervised agents end to end: real processes from tests/agents/, the real
daemon on loopback, and a real WebSocket client driving agents.*.
"""

import json
import os
import signal
import stat
import sys
from pathlib import Path

import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from support import HOST_TOKEN, sessions_closed, start_server, until

AGENT = str(Path(__file__).resolve().parents[1] / "agents" / "attach_agent.py")
# The real interpreter: a venv's python may live under a world-writable
# directory (CI clones into /tmp), which the supervisor rightly refuses.
PYTHON = os.path.realpath(sys.executable)


class Operator:
    """The test's own authenticated connection; remembers every reply."""

    def __init__(self, client):
        self.client = client
        self.replies = []

    async def call(self, method, params=None):
        reply = await self.client.call(method, params)
        self.replies.append(reply)
        assert "result" in reply, reply
        return reply["result"]

    async def agent(self, agent_id):
        return next(a for a in await self.call("agents.list", {}) if a["id"] == agent_id)


async def operator(server):
    client = await server.client("tcp")
    await client.authenticate()
    return Operator(client)


async def host(server):
    """The host's connection: the only one that may change the manifest."""
    client = await server.client("tcp")
    reply = await client.call("session.auth", {"host_token": HOST_TOKEN}, rid=0)
    assert reply["result"]["role"] == "host", reply
    return Operator(client)


def spec(agent_id, *args, **kw):
    return {"id": agent_id, "command": PYTHON, "args": [AGENT, *args], "backoff_secs": 0.2, **kw}


# The agents are child processes: whether one has started, attached or
# logged a line is polled (``until``) over agents.* calls; nothing in this
# process fires when a child gets there.


@pytest_twisted.ensureDeferred
async def test_supervised_agent_lifecycle(reactor, tmp_path):
    """Spawn, attach with the env token, survive kill -9, show logs, kill a TERM-ignoring child."""
    log_lines = []

    def observe(event):
        log_lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    server = await start_server(reactor, tmp_path, agent_stop_grace=1.0)
    try:
        op = await operator(server)
        admin = await host(server)
        refused = await op.client.call("agents.upsert", spec("e2e"))
        assert refused["error"]["message"].startswith("forbidden: agents.upsert needs the host role")
        upserted = await admin.call("agents.upsert", spec("e2e", restart="on_failure"))
        assert upserted["status"] == "stopped" and upserted["spec"]["command"] == PYTHON
        await op.call("agents.start", {"id": "e2e"})
        running = await op.call("agents.wait", {"id": "e2e", "targets": ["running"], "timeout_secs": 10})
        assert running["pid"]

        attached = await until(reactor, lambda: _attached(op, "e2e"), "the agent to attach")
        first_session = attached["session_id"]
        assert first_session in server.state.sessions
        assert server.state.sessions[first_session].agent_id == "e2e"

        tail = await until(reactor, lambda: _tail_has(op, "e2e", '"agent_id":"e2e"'), "the agent's auth reply in its log")
        assert any("starting" in line for line in tail["stdout"])
        assert tail["stderr"] == ["stderr line from the agent"]
        assert tail["stdout_path"].endswith("e2e.stdout.log")

        # kill -9 under on_failure: back after the backoff, attached again.
        os.kill(running["pid"], signal.SIGKILL)
        await until(reactor, lambda: _running_again(op, "e2e", running["pid"]), "the restart")
        again = await until(reactor, lambda: _attached(op, "e2e", not_session=first_session), "the re-attach")
        assert again["restart_count"] == 1 and again["last_exit_code"] == -9

        # A child that ignores SIGTERM is killed after the grace.
        await admin.call("agents.upsert", spec("stubborn", "--ignore-term", restart="never"))
        await op.call("agents.start", {"id": "stubborn"})
        await until(reactor, lambda: _tail_has(op, "stubborn", "starting"), "the stubborn agent to start")
        before = reactor.seconds()
        stopped = await op.call("agents.stop", {"id": "stubborn"})
        assert stopped["status"] == "stopped" and stopped["last_exit_code"] == -9
        assert reactor.seconds() - before >= 1.0

        # Stop the first one too: it honours SIGTERM.
        done = await op.call("agents.stop", {"id": "e2e"})
        assert done["status"] == "stopped" and done["last_exit_code"] == -15
        await until(reactor, lambda: _not_attached(op, "e2e"), "the detach")

        # No agent token in any response or log line.
        manifest = json.loads((tmp_path / "car-home" / "agents.json").read_text())
        tokens = [a["token"] for a in manifest["agents"]]
        blob = json.dumps([op.replies, op.client.received, admin.replies, admin.client.received]) + "\n".join(log_lines)
        assert tokens and not any(t in blob for t in tokens)
        op.client.drop()
        admin.client.drop()
    finally:
        globalLogPublisher.removeObserver(observe)
        await server.stop()


async def _attached(op, agent_id, not_session=None):
    agent = await op.agent(agent_id)
    if agent["attached"] and agent["session_id"] != not_session:
        return agent
    return None


async def _not_attached(op, agent_id):
    return not (await op.agent(agent_id))["attached"]


async def _running_again(op, agent_id, old_pid):
    agent = await op.agent(agent_id)
    return agent["status"] == "running" and agent["pid"] not in (None, old_pid)


async def _tail_has(op, agent_id, needle):
    tail = await op.call("agents.tail_log", {"id": agent_id, "n": 50})
    return tail if any(needle in line for line in tail["lines"]) else None


@pytest_twisted.ensureDeferred
async def test_identity_and_persistence(reactor, tmp_path):
    """Wrong token and a second connection are refused; the manifest is 0600 and auto_start survives a restart."""
    server = await start_server(reactor, tmp_path)
    try:
        op = await operator(server)
        admin = await host(server)
        await admin.call("agents.upsert", spec("boot", auto_start=True))
        await op.call("agents.start", {"id": "boot"})
        await until(reactor, lambda: _attached(op, "boot"), "the agent to attach")
        manifest_path = tmp_path / "car-home" / "agents.json"
        assert stat.S_IMODE(os.stat(manifest_path).st_mode) == 0o600
        token = json.loads(manifest_path.read_text())["agents"][0]["token"]

        intruder = await server.client("tcp")
        wrong = await intruder.call("session.auth", {"agent_id": "boot", "token": "not-the-token"})
        assert wrong["error"]["message"] == "auth failed: token mismatch"
        twin = await intruder.call("session.auth", {"agent_id": "boot", "token": token})
        assert "already attached on another connection" in twin["error"]["message"]
        intruder.drop()
        op.client.drop()
        admin.client.drop()
    finally:
        await server.stop()  # stops the child too

    # The daemon comes back on the same CAR_HOME: the agent runs again.
    server = await start_server(reactor, tmp_path)
    try:
        op = await operator(server)
        agent = await until(reactor, lambda: _attached(op, "boot"), "the auto-started agent to attach")
        assert agent["status"] == "running"
        assert json.loads(manifest_path.read_text())["agents"][0]["token"] == token
        admin = await host(server)
        removed = await admin.call("agents.remove", {"id": "boot"})
        assert removed == {"removed": True} and await op.call("agents.list", {}) == []
        op.client.drop()
        admin.client.drop()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_new_launch_spec_rotates_the_token(reactor, tmp_path):
    """
    The host changes a running agent's args: the connection bound with the
    old token is closed, the child restarts with a new token and attaches
    with it; the old token is refused.  An agent token cannot change the
    manifest, nor read another agent's log.
    """
    server = await start_server(reactor, tmp_path, agent_stop_grace=2.0)
    try:
        op = await operator(server)
        admin = await host(server)
        await admin.call("agents.upsert", spec("rot"))
        await admin.call("agents.upsert", spec("neighbour"))
        await op.call("agents.start", {"id": "rot"})
        first = await until(reactor, lambda: _attached(op, "rot"), "the agent to attach")
        manifest_path = tmp_path / "car-home" / "agents.json"
        old_token = next(a["token"] for a in json.loads(manifest_path.read_text())["agents"] if a["id"] == "rot")

        # The agent's own token: its log yes, a neighbour's log or the manifest no.
        mine = await server.client("tcp")
        assert (await mine.call("session.auth", {"agent_id": "neighbour", "token": next(
            a["token"] for a in json.loads(manifest_path.read_text())["agents"] if a["id"] == "neighbour"
        )}, rid=0))["result"]["ok"]
        assert "result" in await mine.call("agents.tail_log", {"id": "neighbour"})
        assert "forbidden" in (await mine.call("agents.tail_log", {"id": "rot"}))["error"]["message"]
        assert "forbidden" in (await mine.call("agents.upsert", spec("rot", "--evil")))["error"]["message"]
        mine.drop()

        restarted = await admin.call("agents.upsert", spec("rot", "v2"))
        assert restarted["status"] == "running" and restarted["pid"] != first["pid"]
        assert restarted["spec"]["args"][-1] == "v2" and restarted["attached"] is False
        again = await until(reactor, lambda: _attached(op, "rot", not_session=first["session_id"]), "the re-attach")
        assert again["pid"] == restarted["pid"]
        await sessions_closed(server.state, first["session_id"], what="the old connection to close")
        assert first["session_id"] not in server.state.sessions
        new_token = next(a["token"] for a in json.loads(manifest_path.read_text())["agents"] if a["id"] == "rot")
        assert new_token != old_token

        late = await server.client("tcp")
        reply = await late.call("session.auth", {"agent_id": "rot", "token": old_token}, rid=0)
        assert reply["error"]["message"] == "auth failed: token mismatch"
        late.drop()

        # Renaming keeps the token and the binding.
        await admin.call("agents.upsert", spec("rot", "v2", name="Rotated"))
        assert (await op.agent("rot"))["session_id"] == again["session_id"]
        op.client.drop()
        admin.client.drop()
    finally:
        await server.stop()
