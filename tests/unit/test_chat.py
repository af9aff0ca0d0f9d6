"""
The chat relay on a Clock, through the dispatcher: a host connection, an
attached agent connection, and every path of a chat turn.
"""

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer

from car_twisted.host.chat import CHAT_ACK_TIMEOUT_SECS
from car_twisted.interfaces import IAgentIdentities
from support import HOST_TOKEN, TOKEN, DispatchConn, make_state, request, stray_timers


@implementer(IAgentIdentities)
class Agents:
    def verify(self, agent_id, token):
        return token == f"{agent_id}-secret"

    def attach(self, agent_id, session):
        pass

    def detach(self, agent_id, session):
        pass


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def state(tmp_path, clock):
    return make_state(tmp_path, clock, agent_identities=Agents())


def agent_conn(state, agent_id="worker"):
    return DispatchConn(state, {"agent_id": agent_id, "token": f"{agent_id}-secret"})


def send(conn, method, params):
    conn.rid += 1
    conn.dispatcher.dispatch_text(conn.session, request(method, params, conn.rid))
    return conn.rid


def notify(conn, method, params):
    conn.dispatcher.dispatch_text(conn.session, request(method, params, rid=None).replace(b'"id": null, ', b""))


def frames(conn):
    return conn.sink.pop()


def reply(conn, rid, sent):
    return next((m for m in sent if m.get("id") == rid), None)


def answer(conn, rid, result=None, error=None):
    msg = {"jsonrpc": "2.0", "id": rid, **({"error": error} if error else {"result": result})}
    import json

    conn.dispatcher.dispatch_text(conn.session, json.dumps(msg).encode())


def chat_events(sent):
    return [m["params"] for m in sent if m.get("method") == "agents.chat.event"]


def start_chat(host, agent, prompt="hi", **extra):
    rid = send(host, "agents.chat", {"agent_id": "worker", "prompt": prompt, **extra})
    (call,) = [m for m in frames(agent) if m.get("method") == "agent.chat"]
    return rid, call


def test_a_chat_streams_in_order_and_ends_on_done(state):
    """Events sent before the ack are routed too; the host gets every token in order, then done; the chat ends."""
    host, agent = DispatchConn(state, {"token": TOKEN}), agent_conn(state)
    rid, call = start_chat(host, agent, "hello", session_id="chat-1", model="m1", context="c")
    assert call["params"] == {"session_id": "chat-1", "prompt": "hello", "model": "m1", "context": "c"}
    assert isinstance(call["id"], str)
    notify(agent, "agent.chat.event", {"session_id": "chat-1", "kind": "token", "delta": "hel"})
    answer(agent, call["id"], {"accepted": True})
    for delta in ("lo ", "world"):
        notify(agent, "agent.chat.event", {"session_id": "chat-1", "kind": "token", "delta": delta})
    notify(agent, "agent.chat.event", {"session_id": "chat-1", "kind": "done", "delta": None})
    sent = frames(host)
    assert reply(host, rid, sent)["result"] == {"accepted": True, "session_id": "chat-1"}
    events = chat_events(sent)
    assert [e["kind"] for e in events] == ["token", "token", "token", "done"]
    assert "".join(e["delta"] for e in events if e["kind"] == "token") == "hello world"
    assert all(e["session_id"] == "chat-1" and e["agent_id"] == "worker" for e in events)
    assert state.chats.chats == {}
    # Late events of a finished chat go nowhere.
    notify(agent, "agent.chat.event", {"session_id": "chat-1", "kind": "token", "delta": "late"})
    assert chat_events(frames(host)) == []


def test_agent_not_attached_or_not_accepting(state, clock):
    host = DispatchConn(state, {"token": TOKEN})
    assert host.call("agents.chat", {"agent_id": "worker", "prompt": "hi"})["error"]["data"]["reason"] == "agent_not_attached"
    agent = agent_conn(state)
    rid, call = start_chat(host, agent)
    answer(agent, call["id"], error={"code": -32000, "message": "no agent.chat handler registered on this agent"})
    err = reply(host, rid, frames(host))["error"]
    assert "did not accept the chat: no agent.chat handler" in err["message"] and state.chats.chats == {}
    rid, call = start_chat(host, agent)
    clock.advance(CHAT_ACK_TIMEOUT_SECS)
    assert "no answer within 10s" in reply(host, rid, frames(host))["error"]["message"]
    assert stray_timers(clock) == []


def test_params_are_validated(state):
    host, _agent = DispatchConn(state, {"token": TOKEN}), agent_conn(state)
    bad = [
        ({"attachments": [{"type": "image_base64", "data": "x", "media_type": "image/tiff"}]}, "attachments[0].media_type"),
        ({"attachments": [{"type": "image_url", "url": "file:///etc/passwd"}]}, "attachments[0].url"),
        ({"attachments": [{"type": "audio"}]}, "attachments[0].type"),
        ({"goal": {"check": " "}}, "goal.check"),
        ({"goal": {"check": "true"}, "attachments": [{"type": "image_url", "url": "https://x/y.png"}]}, "goal"),
    ]
    for extra, field in bad:
        r = host.call("agents.chat", {"agent_id": "worker", "prompt": "hi", **extra})
        assert r["error"]["code"] == -32602 and r["error"]["data"]["field"] == field, r


def test_goal_is_clamped_and_a_standing_goal_applies(state):
    host, agent = DispatchConn(state, {"token": TOKEN}), agent_conn(state)
    _, call = start_chat(host, agent, session_id="s1", goal={"check": "make test", "max_iterations": 99})
    assert call["params"]["goal"] == {"check": "make test", "max_iterations": 50}
    answer(agent, call["id"], {"accepted": True})
    notify(agent, "agent.chat.event", {"session_id": "s1", "kind": "done"})
    assert host.result("goal.set", {"session_id": "s2", "check": "pytest -q"})["goal"]["max_iterations"] == 8
    _, call = start_chat(host, agent, session_id="s2")
    assert call["params"]["goal"] == {"check": "pytest -q", "max_iterations": 8}
    answer(agent, call["id"], {"accepted": True})
    notify(agent, "agent.chat.event", {"session_id": "s2", "kind": "goal_evaluated", "iteration": 1, "met": True, "grounded": True, "reason": "green"})
    goal = host.result("goal.status", {"session_id": "s2"})["goal"]
    assert goal["status"] == "met" and goal["last_iteration"] == 1 and goal["last_reason"] == "green"
    assert host.result("goal.clear", {"session_id": "s2"}) == {"cleared": True, "session_id": "s2"}
    assert host.call("goal.suggest", {"prompt": "x"})["error"]["code"] == -32601


def test_cancel_reaches_the_agent_and_ends_the_chat(state):
    host, agent, stranger = DispatchConn(state, {"token": TOKEN}), agent_conn(state), DispatchConn(state, {"token": TOKEN})
    _, call = start_chat(host, agent, session_id="c1")
    answer(agent, call["id"], {"accepted": True})
    assert "forbidden" in stranger.call("agents.chat.cancel", {"session_id": "c1"})["error"]["message"]
    assert host.result("agents.chat.cancel", {"session_id": "c1"}) == {"cancelled": True, "session_id": "c1"}
    assert [m["params"] for m in frames(agent) if m.get("method") == "agent.chat.cancel"] == [{"session_id": "c1"}]
    assert host.result("agents.chat.cancel", {"session_id": "c1"}) == {"cancelled": False, "session_id": "c1"}


def test_approve_relays_the_agents_answer(state):
    host, agent = DispatchConn(state, {"token": TOKEN}), agent_conn(state)
    _, call = start_chat(host, agent, session_id="a1")
    answer(agent, call["id"], {"accepted": True})
    notify(agent, "agent.chat.event", {"session_id": "a1", "kind": "approval_pending", "approval_id": "ap-1"})
    assert chat_events(frames(host))[0]["approval_id"] == "ap-1"
    # The agent's own connection cannot approve its parked action.
    assert "forbidden" in agent.call("agents.chat.approve", {"session_id": "a1", "approval_id": "ap-1", "decision": True})["error"]["message"]
    rid = send(host, "agents.chat.approve", {"session_id": "a1", "approval_id": "ap-1", "decision": "approve"})
    (req,) = [m for m in frames(agent) if m.get("method") == "agent.chat.approve"]
    assert req["params"] == {"session_id": "a1", "approval_id": "ap-1", "decision": "approve"}
    answer(agent, req["id"], {"resolved": True})
    assert reply(host, rid, frames(host))["result"] == {"resolved": True, "session_id": "a1"}
    # A host-role connection may approve too.
    hosted = DispatchConn(state, {"host_token": HOST_TOKEN})
    send(hosted, "agents.chat.approve", {"session_id": "a1", "approval_id": "ap-2", "decision": False})
    assert [m for m in frames(agent) if m.get("method") == "agent.chat.approve"]


def test_agent_disconnect_ends_the_chat_with_an_error_for_the_host(state):
    host, agent = DispatchConn(state, {"token": TOKEN}), agent_conn(state)
    _, call = start_chat(host, agent, session_id="d1")
    answer(agent, call["id"], {"accepted": True})
    agent.close()
    (event,) = chat_events(frames(host))
    assert event["kind"] == "error" and event["message"] == "the agent disconnected" and state.chats.chats == {}


def test_host_disconnect_cancels_on_the_agent(state):
    host, agent = DispatchConn(state, {"token": TOKEN}), agent_conn(state)
    _, call = start_chat(host, agent, session_id="h1")
    answer(agent, call["id"], {"accepted": True})
    host.close()
    assert [m["params"] for m in frames(agent) if m.get("method") == "agent.chat.cancel"] == [{"session_id": "h1"}]
    assert state.chats.chats == {}


def test_events_from_another_connection_are_ignored(state):
    host, agent, other = DispatchConn(state, {"token": TOKEN}), agent_conn(state), agent_conn(state, "intruder")
    _, call = start_chat(host, agent, session_id="x1")
    notify(other, "agent.chat.event", {"session_id": "x1", "kind": "done"})
    assert chat_events(frames(host)) == [] and "x1" in state.chats.chats


def test_a_finished_chat_is_a_turn_of_the_agents_current_run(state):
    host, agent = DispatchConn(state, {"token": TOKEN}), agent_conn(state)
    run_id = agent.result("runs.start", {"intent": "serve chats"})["run_id"]
    _, call = start_chat(host, agent, "what time is it", session_id="r1")
    answer(agent, call["id"], {"accepted": True})
    notify(agent, "agent.chat.event", {"session_id": "r1", "kind": "token", "delta": "noon"})
    notify(agent, "agent.chat.event", {"session_id": "r1", "kind": "done"})
    trace = DispatchConn(state, {"host_token": HOST_TOKEN}).result("runs.get_trace", {"run_id": run_id})
    (turn,) = [r for r in trace["records"] if r["record"] == "turn"]
    assert turn["kind"] == "chat" and turn["prompt"] == "what time is it" and turn["output"] == "noon"
    assert turn["status"] == "succeeded" and turn["session_id"] == "r1"
