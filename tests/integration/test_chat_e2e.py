"""
Chat relay and host.* end to end: the real daemon on loopback, a real
supervised agent (tests/agents/chat_agent.py) that attaches with the token
the supervisor gave it, and real WebSocket clients as the host and the
chatting connections.
"""

import json
import os
import sys
from pathlib import Path

import pytest_twisted

from car_twisted.host.gate import ApprovalGate
from support import HOST_TOKEN, start_server, until

AGENT = str(Path(__file__).resolve().parents[1] / "agents" / "chat_agent.py")
# The real interpreter: a venv's python may live under a world-writable
# directory (CI clones into /tmp), which the supervisor rightly refuses.
PYTHON = os.path.realpath(sys.executable)
AGENT_ID = "chatty"

# The agent is a child process: whether it has attached, or printed what
# it saw, is polled (``until``) over agents.* calls; nothing in this
# process fires when the child gets there.  Everything the daemon sends to
# the test's own connections is awaited with ``WsTestClient.when``.


class Conn:
    """One of the test's authenticated connections."""

    def __init__(self, client):
        self.client = client

    async def call(self, method, params=None):
        reply = await self.client.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    async def error(self, method, params=None):
        reply = await self.client.call(method, params)
        assert "error" in reply, reply
        return reply["error"]

    def chat_events(self, session_id):
        return [
            n["params"]
            for n in self.client.notifications
            if n["method"] == "agents.chat.event" and n["params"].get("session_id") == session_id
        ]

    def chat_event(self, session_id, kind, what, count=1):
        """Wait until C{count} events of C{kind} have arrived for the chat; fire with the last."""

        def arrived():
            found = [e for e in self.chat_events(session_id) if e["kind"] == kind]
            return found[count - 1] if len(found) >= count else None

        return self.client.when(arrived, what)

    def host_events(self, kind=None):
        return [
            n["params"]
            for n in self.client.notifications
            if n["method"] == "host.event" and (kind is None or n["params"]["kind"] == kind)
        ]

    def host_event(self, kind, what, nth=1, **match):
        """Wait for the C{nth} host.event of C{kind} whose fields match (``a__b`` is ``event[a][b]``)."""

        def arrived():
            found = [e for e in self.host_events(kind) if all(_dig(e, key) == value for key, value in match.items())]
            return found[nth - 1] if len(found) >= nth else None

        return self.client.when(arrived, what)


def _dig(event, dotted):
    value = event
    for part in dotted.split("__"):
        value = value.get(part) if isinstance(value, dict) else None
    return value


async def daemon_conn(server, handshake=True):
    client = await server.client("tcp")
    await client.authenticate(handshake=handshake)
    return Conn(client)


async def host_conn(server):
    client = await server.client("tcp")
    reply = await client.call("session.auth", {"host_token": HOST_TOKEN}, rid=0)
    assert reply["result"]["role"] == "host", reply
    return Conn(client)


async def attached(conn, not_session=None):
    [agent] = [a for a in await conn.call("agents.list", {}) if a["id"] == AGENT_ID]
    return agent if agent["attached"] and agent["session_id"] != not_session else None


async def agent_lines(conn, word):
    """What the agent printed as ``<word> <json>`` lines, parsed."""
    tail = await conn.call("agents.tail_log", {"id": AGENT_ID, "n": 500, "stream": "stdout"})
    return [json.loads(line[len(word) + 1 :]) for line in tail["stdout"] if line.startswith(word + " ")]


async def agent_printed(reactor, conn, word, what, **match):
    """Poll the agent's stdout for a ``<word>`` line whose fields match."""

    async def found():
        lines = await agent_lines(conn, word)
        return next((line for line in lines if all(line.get(k) == v for k, v in match.items())), None)

    return await until(reactor, found, what)


async def start_agent(reactor, server):
    """The host upserts and starts the chat agent; fires with its agents.list row once attached."""
    host = await host_conn(server)
    spec = {"id": AGENT_ID, "name": "Chatty", "command": PYTHON, "args": ["-u", AGENT], "restart": "never"}
    upserted = await host.call("agents.upsert", spec)
    assert upserted["status"] == "stopped" and upserted["attached"] is False
    await host.call("agents.start", {"id": AGENT_ID})
    row = await until(reactor, lambda: attached(host), "the chat agent to attach")
    await agent_printed(reactor, host, "READY", "the agent's auth reply")
    return host, row


@pytest_twisted.ensureDeferred
async def test_chat_streams_every_token_in_order(reactor, tmp_path):
    """A daemon-token connection chats with the supervised agent and gets every token in order, then done."""
    server = await start_server(reactor, tmp_path)
    try:
        host, row = await start_agent(reactor, server)
        assert server.state.sessions[row["session_id"]].agent_id == AGENT_ID
        chatter = await daemon_conn(server)

        words = [f"w{i}" for i in range(40)]
        accepted = await chatter.call(
            "agents.chat",
            {"agent_id": AGENT_ID, "prompt": "echo " + " ".join(words), "model": "m-1", "context": {"topic": "tests"}},
        )
        session_id = accepted["session_id"]
        assert accepted == {"accepted": True, "session_id": session_id} and session_id
        await chatter.chat_event(session_id, "done", "the echo chat's done event")
        events = chatter.chat_events(session_id)
        assert [e["kind"] for e in events] == ["token"] * len(words) + ["done"], events
        assert [e["delta"] for e in events[:-1]] == words
        assert all(e["agent_id"] == AGENT_ID and e["session_id"] == session_id for e in events)

        # The agent was asked with the session id and the optional fields.
        seen = await agent_printed(reactor, host, "CHAT", "the agent.chat params", session_id=session_id)
        assert seen == {
            "session_id": session_id,
            "prompt": "echo " + " ".join(words),
            "model": "m-1",
            "context": {"topic": "tests"},
        }

        # The host's own chat, with its own session id: the agent streams
        # everything before it acks, and nothing is lost.
        sent = host.client.send("agents.chat", {"agent_id": AGENT_ID, "prompt": "eager a b c", "session_id": "host-chat-1"})
        reply = await sent
        assert reply["result"] == {"accepted": True, "session_id": "host-chat-1"}, reply
        events = host.chat_events("host-chat-1")
        assert [(e["kind"], e.get("delta")) for e in events] == [("token", "a"), ("token", "b"), ("token", "c"), ("done", None)]
        assert host.client.received.index(reply) > max(
            i for i, m in enumerate(host.client.received) if m.get("method") == "agents.chat.event"
        ), "the events came after the ack"
        # Each connection sees only its own chats.
        assert chatter.chat_events("host-chat-1") == [] and host.chat_events(session_id) == []

        error = await chatter.error("agents.chat", {"agent_id": "nobody", "prompt": "echo x"})
        assert "agent 'nobody' is not attached" in error["message"], error
        error = await chatter.error("agents.chat", {"agent_id": AGENT_ID, "prompt": ""})
        assert error["code"] == -32602, error
        chatter.client.drop()
        host.client.drop()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_cancel_and_approve(reactor, tmp_path):
    """
    agents.chat.cancel reaches the agent as agent.chat.cancel and nothing
    more of that chat is relayed; agents.chat.approve reaches the agent as
    agent.chat.approve, answers its {resolved: true}, and the chat then
    finishes.  Another daemon-token connection may steer neither chat; the
    host role may.
    """
    server = await start_server(reactor, tmp_path)
    try:
        host, _ = await start_agent(reactor, server)
        chatter = await daemon_conn(server)
        stranger = await daemon_conn(server)

        # -- cancel ---------------------------------------------------------------
        linger = (await chatter.call("agents.chat", {"agent_id": AGENT_ID, "prompt": "linger"}))["session_id"]
        await chatter.chat_event(linger, "token", "three lingering tokens", count=3)
        refused = await stranger.error("agents.chat.cancel", {"session_id": linger})
        assert refused["message"].startswith("forbidden: agents.chat.cancel"), refused
        sent = chatter.client.send("agents.chat.cancel", {"session_id": linger})
        cancel_reply = await sent
        assert cancel_reply["result"] == {"cancelled": True, "session_id": linger}, cancel_reply
        assert await chatter.call("agents.chat.cancel", {"session_id": linger}) == {"cancelled": False, "session_id": linger}
        await agent_printed(reactor, host, "CANCEL", "the agent to see agent.chat.cancel", session_id=linger, streaming=True)
        stopped = await agent_printed(reactor, host, "STOPPED", "the agent to stop streaming", session_id=linger)
        assert stopped["tokens"] >= 3

        # -- approve --------------------------------------------------------------
        approve = (await chatter.call("agents.chat", {"agent_id": AGENT_ID, "prompt": "approve x y"}))["session_id"]
        pending = await chatter.chat_event(approve, "approval_pending", "the approval_pending event")
        approval_id = pending["approval_id"]
        assert approval_id == f"approval-{approve}" and pending["agent_id"] == AGENT_ID
        refused = await stranger.error("agents.chat.approve", {"session_id": approve, "approval_id": approval_id, "decision": "allow"})
        assert refused["message"].startswith("forbidden: agents.chat.approve"), refused
        missing = await chatter.error("agents.chat.approve", {"session_id": "no-such-chat", "approval_id": approval_id})
        assert "no chat session 'no-such-chat'" in missing["message"], missing

        decision = {"allow": True, "note": "go ahead"}
        resolved = await chatter.call("agents.chat.approve", {"session_id": approve, "approval_id": approval_id, "decision": decision})
        assert resolved == {"resolved": True, "session_id": approve}
        await chatter.chat_event(approve, "done", "the approved chat to finish")
        events = chatter.chat_events(approve)
        assert [(e["kind"], e.get("delta")) for e in events] == [
            ("token", "x"),
            ("token", "y"),
            ("approval_pending", None),
            ("token", "decision=" + json.dumps(decision, sort_keys=True)),
            ("done", None),
        ], events
        seen = await agent_printed(reactor, host, "APPROVE", "the agent.chat.approve params", session_id=approve)
        assert seen == {"session_id": approve, "approval_id": approval_id, "decision": decision}

        # The host role may steer a chat another connection started.
        steered = (await chatter.call("agents.chat", {"agent_id": AGENT_ID, "prompt": "approve"}))["session_id"]
        pending = await chatter.chat_event(steered, "approval_pending", "the second approval_pending")
        resolved = await host.call("agents.chat.approve", {"session_id": steered, "approval_id": pending["approval_id"], "decision": "no"})
        assert resolved == {"resolved": True, "session_id": steered}
        await chatter.chat_event(steered, "done", "the host-approved chat to finish")
        assert [e.get("delta") for e in chatter.chat_events(steered)] == [None, 'decision="no"', None]

        # The agent sends on one socket in order, and it stopped the lingering
        # chat before the approve chat began: by the approve chat's done,
        # every lingering event has reached the daemon, and none of those
        # after the cancel were relayed.
        after_cancel = chatter.client.received[chatter.client.received.index(cancel_reply) :]
        assert not [m for m in after_cancel if m.get("params", {}).get("session_id") == linger], after_cancel
        assert stranger.client.notifications == []
        for conn in (chatter, stranger, host):
            conn.client.drop()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_both_disconnect_paths(reactor, tmp_path):
    """
    Killing the agent mid-chat gives the chatting connection a terminal
    error event; dropping the chatting connection mid-chat sends the agent
    agent.chat.cancel, and the agent goes on serving other chats.
    """
    server = await start_server(reactor, tmp_path)
    try:
        host, first = await start_agent(reactor, server)
        chatter = await daemon_conn(server)

        # -- the agent goes -------------------------------------------------------
        doomed = (await chatter.call("agents.chat", {"agent_id": AGENT_ID, "prompt": "linger"}))["session_id"]
        await chatter.chat_event(doomed, "token", "two lingering tokens", count=2)
        stopped = await host.call("agents.stop", {"id": AGENT_ID, "signal": "kill"})
        assert stopped["status"] == "stopped" and stopped["last_exit_code"] == -9, stopped
        error = await chatter.chat_event(doomed, "error", "the terminal error event")
        assert error == {"session_id": doomed, "agent_id": AGENT_ID, "kind": "error", "message": "the agent disconnected"}
        assert chatter.chat_events(doomed)[-1] == error
        assert {e["kind"] for e in chatter.chat_events(doomed)} == {"token", "error"}
        assert await chatter.call("agents.chat.cancel", {"session_id": doomed}) == {"cancelled": False, "session_id": doomed}
        gone = await chatter.error("agents.chat", {"agent_id": AGENT_ID, "prompt": "echo x"})
        assert f"agent '{AGENT_ID}' is not attached" in gone["message"], gone

        # -- the chatting connection goes ---------------------------------------------
        await host.call("agents.start", {"id": AGENT_ID})
        await until(reactor, lambda: attached(host, not_session=first["session_id"]), "the agent to attach again")
        leaving = await daemon_conn(server)
        orphan = (await leaving.call("agents.chat", {"agent_id": AGENT_ID, "prompt": "linger"}))["session_id"]
        await leaving.chat_event(orphan, "token", "two lingering tokens", count=2)
        leaving.client.drop()
        await agent_printed(reactor, host, "CANCEL", "the agent to see agent.chat.cancel", session_id=orphan, streaming=True)
        await agent_printed(reactor, host, "STOPPED", "the agent to stop streaming", session_id=orphan)

        # Still attached, and it serves the next chat.
        after = (await chatter.call("agents.chat", {"agent_id": AGENT_ID, "prompt": "echo still here"}))["session_id"]
        await chatter.chat_event(after, "done", "the next chat's done")
        assert [e.get("delta") for e in chatter.chat_events(after)] == ["still", "here", None]
        chatter.client.drop()
        host.client.drop()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_host_events_between_two_connections(reactor, tmp_path):
    """
    A subscriber sees another connection register an agent, set its status
    and raise and resolve an approval, as host.event notifications in
    order; it cannot change that connection's agent or approval, and it
    can approve (or deny) a gated call's system approval.
    """
    gate = ApprovalGate(methods={"state.set"}, timeout=30.0)
    server = await start_server(reactor, tmp_path, approval_gate=gate)
    try:
        watcher = await daemon_conn(server, handshake=False)
        early = await watcher.error("host.subscribe", {})
        assert early["code"] == -32005, early
        reply = await watcher.client.call(
            "server.handshake", {"protocol_version": 3, "client_version": "test", "required_capabilities": []}
        )
        assert reply["result"]["protocol_version"] == 3, reply
        snapshot = await watcher.call("host.subscribe", {})
        assert snapshot["subscribed"] is True
        assert snapshot["agents"] == snapshot["devices"] == snapshot["approvals"] == snapshot["events"] == []
        assert snapshot["identity"]["pid"] == os.getpid() and snapshot["identity"]["version"]

        worker = await daemon_conn(server)
        registered = await worker.call("host.register_agent", {"id": "worker-1", "name": "Worker", "capabilities": ["chat"]})
        assert registered["id"] == "worker-1" and registered["status"] == "idle" and registered["orphaned"] is False
        event = await watcher.host_event("agent.registered", "agent.registered", agent_id="worker-1")
        assert event["payload"]["agent"] == registered

        status = {"agent_id": "worker-1", "status": "running", "current_task": "indexing", "message": "busy"}
        changed = await worker.call("host.set_status", status)
        assert changed["status"] == "running" and changed["current_task"] == "indexing"
        event = await watcher.host_event("agent.status_changed", "the status change", payload__agent__status="running")
        assert event["agent_id"] == "worker-1" and event["message"] == "busy"

        approval = await worker.call("host.request_approval", {"title": "Deploy?", "agent_id": "worker-1"})
        assert approval["status"] == "pending" and approval["agent_id"] == "worker-1"
        event = await watcher.host_event("approval.requested", "approval.requested", payload__approval_id=approval["id"])
        assert event["message"] == "Deploy?" and event["agent_id"] == "worker-1"
        await watcher.host_event("agent.status_changed", "waiting_for_approval", payload__agent__status="waiting_for_approval")

        # The subscriber may read, not change, the other connection's rows.
        owned = "agent 'worker-1' is owned by another session"
        assert (await watcher.error("host.set_status", {"agent_id": "worker-1", "status": "paused"}))["message"] == owned
        assert (await watcher.error("host.unregister_agent", {"agent_id": "worker-1"}))["message"] == owned
        assert (await watcher.error("host.register_agent", {"id": "worker-1", "name": "Hijack"}))["message"] == owned
        refused = await watcher.error("host.resolve_approval", {"approval_id": approval["id"], "approved": True})
        assert refused["message"] == f"approval '{approval['id']}' was requested by another session", refused
        [listed] = await watcher.call("host.agents", {})
        assert listed["name"] == "Worker" and listed["status"] == "waiting_for_approval"

        done = await worker.call("host.resolve_approval", {"approval_id": approval["id"], "approved": True, "notes": "fine"})
        assert done["status"] == "approved" and done["notes"] == "fine"
        event = await watcher.host_event("approval.resolved", "approval.resolved", payload__approval_id=approval["id"])
        assert event["payload"]["approval"]["status"] == "approved"

        # A gated call: a system approval any connection may resolve.
        gated = worker.client.send("state.set", {"key": "k", "value": 1})
        event = await watcher.host_event("approval.requested", "the gate's approval", payload__approval__action="ws.method:state.set")
        system_id = event["payload"]["approval_id"]
        assert event["payload"]["approval"]["client_id"] is None
        assert (await watcher.call("host.resolve_approval", {"approval_id": system_id, "approved": True}))["status"] == "approved"
        assert "result" in await gated
        denied = worker.client.send("state.set", {"key": "k", "value": 2})
        event = await watcher.host_event("approval.requested", "the second gated call", nth=2, payload__approval__action="ws.method:state.set")
        await watcher.call("host.resolve_approval", {"approval_id": event["payload"]["approval_id"], "approved": False})
        refused = await denied
        assert refused["error"]["code"] == -32003, refused
        assert await worker.call("state.get", {"key": "k"}) == 1

        # The pushes are the recorded events, in the same order.
        recorded = (await worker.call("host.events", {}))["events"]
        assert watcher.host_events() == recorded
        assert [e["kind"] for e in recorded[:6]] == [
            "agent.registered",
            "agent.status_changed",
            "approval.requested",
            "agent.status_changed",
            "approval.resolved",
            "approval.requested",
        ]

        # The owner leaves: its agent stays, orphaned, and may be adopted.
        worker.client.drop()
        await watcher.host_event("agent.status_changed", "the orphaning", payload__orphaned=True)
        adopted = await watcher.call("host.register_agent", {"id": "worker-1", "name": "Adopted"})
        assert adopted["orphaned"] is False and adopted["name"] == "Adopted"
        watcher.client.drop()
    finally:
        await server.stop()
