"""
Interop: agent chat and host state with the real ``car-runtime`` 0.58.0
client on both sides of a live ``twist car`` daemon.

The agent is a supervised child written with ``car_runtime``: it attaches
through ``CAR_AGENT_ID`` / ``CAR_AGENT_TOKEN`` alone, serves ``agent.chat``
with ``register_chat_handler`` and streams with ``chat_event``; it answers
``agent.chat.approve`` with ``register_daemon_handler`` and hears
``agent.chat.cancel`` with ``register_daemon_notification_handler`` (the
client has no built-in handler for either).  The host side is the test's
own ``CarRuntime`` (the daemon token from the token file): it upserts the
agent through ``HostClient(rt).agents_upsert``, chats with
``agents_chat`` / ``agents_chat_approve`` / ``agents_chat_cancel`` and
collects ``agents.chat.event`` with a notification handler.

Host state goes through the client's typed wrappers: ``host_subscribe``,
``host_register_agent``, ``host_set_status``, ``host_request_approval``,
``host_resolve_approval`` and ``host_events``, on two connections.

Notification handlers run on a client-owned thread: the test waits on a
condition they signal.  Only what happens in the agent process (attached,
what it printed) is polled, over agents.* calls.  The agent setup (real
base interpreter as ``command``, the client's site directory through
``INTEROP_SITE_DIR``, an empty ``HOME``) follows
``test_car_runtime_agents``; the daemon fixtures come from
``test_car_runtime``.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

car_runtime = pytest.importorskip("car_runtime")

from test_car_runtime import (  # noqa: E402,F401  (fixtures are used by name)
    Daemon,
    Inbox,
    client_env,
    daemon,
    start_daemon,
)

AGENT_ID = "chat-interop-agent"
TIMEOUT = 20.0

# The prompt's first word picks the behaviour; every other word is one
# token.  ``approval_pending`` carries its approval id in ``delta``:
# ``chat_event(session_id, kind, delta)`` has no other field.
AGENT_SCRIPT = textwrap.dedent(
    '''
    import json
    import os
    import signal
    import sys
    import threading
    import time

    sys.path.insert(0, os.environ["INTEROP_SITE_DIR"])
    import car_runtime

    stopping = False

    def on_term(signum, frame):
        global stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)

    def say(word, what):
        print(word + " " + json.dumps(what, sort_keys=True), flush=True)

    lock = threading.Lock()
    approvals = {}
    cancels = {}

    def on_chat(params_json):
        params = json.loads(params_json)
        say("AGENT-CHAT", params)
        session_id = params["session_id"]
        mode, *words = params["prompt"].split()
        stop = threading.Event()
        with lock:
            cancels[session_id] = stop
        for word in words:
            rt.chat_event(session_id, "token", word)
        if mode == "fail":
            raise ValueError("the turn failed on purpose")
        if mode == "linger":
            sent = 0
            while not stop.wait(0.05) and sent < 1200:
                rt.chat_event(session_id, "token", "t%d" % sent)
                sent += 1
            say("AGENT-STOPPED", {"session_id": session_id, "tokens": sent})
            return
        if mode == "approve":
            approval_id = "approval-" + session_id
            answered = [threading.Event()]
            with lock:
                approvals[approval_id] = answered
            rt.chat_event(session_id, "approval_pending", approval_id)
            if not answered[0].wait(30):
                rt.chat_event(session_id, "error", "nobody answered the approval")
                return
            rt.chat_event(session_id, "token", "decision=" + json.dumps(answered[1], sort_keys=True))
        rt.chat_event(session_id, "done")

    def on_approve(params_json):
        params = json.loads(params_json)
        say("AGENT-APPROVE", params)
        with lock:
            answered = approvals.pop(params.get("approval_id"), None)
        if answered is not None:
            answered.append(params.get("decision"))
            answered[0].set()
        return json.dumps({"resolved": answered is not None})

    def on_cancel(params_json):
        params = json.loads(params_json)
        with lock:
            stop = cancels.get(params.get("session_id"))
        say("AGENT-CANCEL", {"params": params, "known": stop is not None})
        if stop is not None:
            stop.set()

    car_runtime.register_chat_handler(on_chat)
    rt = car_runtime.CarRuntime()
    rt.register_daemon_handler("agent.chat.approve", on_approve)
    rt.register_daemon_notification_handler("agent.chat.cancel", on_cancel)
    say("AGENT-READY", {"epoch": rt.connection_epoch()})

    while not stopping:
        time.sleep(0.05)
    print("AGENT-STOPPING", flush=True)
    rt.close()
    sys.exit(0)
    '''
)


def _of(session_id: str) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    return lambda items: [e for e in items if e.get("session_id") == session_id]


def _ended(session_id: str) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    """The chat's events once its terminal event has arrived."""

    def check(items: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        mine = _of(session_id)(items)
        return mine if mine and mine[-1]["kind"] in ("done", "error") else None

    return check


def _prefixed(lines: list[str], prefix: str) -> list[Any]:
    return [json.loads(line[len(prefix):]) for line in lines if line.startswith(prefix)]


def _poll(what: str, check: Callable[[], Any], diagnose: Callable[[], str]) -> Any:
    """For what happens in the agent process only (it signals nothing here)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {TIMEOUT:g}s\n{diagnose()}")
        time.sleep(0.05)


@pytest.mark.interop
def test_chat_between_car_runtime_host_and_agent(daemon: Daemon, client_env, tmp_path: Path):
    """A car_runtime host chats with a car_runtime agent: every event arrives in order; approve, cancel and a failing turn behave."""
    began = time.monotonic()
    client_env(daemon)
    rt = car_runtime.CarRuntime()
    events = Inbox(rt, "agents.chat.event", TIMEOUT)

    def call(method: str, params: Any = None) -> Any:
        return json.loads(rt.daemon_call(method, json.dumps({} if params is None else params)))

    def stdout() -> list[str]:
        return call("agents.tail_log", {"id": AGENT_ID, "n": 1000, "stream": "stdout"})["stdout"]

    def diagnose() -> str:
        try:
            tail = json.dumps(call("agents.tail_log", {"id": AGENT_ID, "n": 60}), indent=1)
        except Exception as e:  # pragma: no cover - diagnostics only
            tail = f"({type(e).__name__}: {e})"
        return f"tail_log: {tail}\ndaemon log:\n{daemon.log()}"

    def printed(prefix: str, **match: Any) -> Any:
        def found() -> Any:
            return next((line for line in _prefixed(stdout(), prefix) if all(line.get(k) == v for k, v in match.items())), None)

        return _poll(f"{prefix.strip()} {match} from the agent", found, diagnose)

    agent_dir = tmp_path / "agent"
    agent_home = agent_dir / "home"
    (agent_home / "xdg").mkdir(parents=True)
    script = agent_dir / "agent.py"
    script.write_text(AGENT_SCRIPT)
    site_dir = os.path.dirname(os.path.dirname(os.path.realpath(car_runtime.__file__)))
    spec = {
        "id": AGENT_ID,
        "name": "car-runtime chat agent",
        "command": os.path.realpath(sys.executable),
        "args": ["-u", str(script)],
        "cwd": str(agent_dir),
        "env": {
            # Loader variables (PYTHONPATH, LD_*) are refused in an agent's
            # env; the script puts the client's site directory on its path.
            "INTEROP_SITE_DIR": site_dir,
            "HOME": str(agent_home),
            "XDG_RUNTIME_DIR": str(agent_home / "xdg"),
            "CAR_NO_VERSION_WARNING": "1",
        },
        "restart": "never",
    }

    # agents.upsert is host-only: HostClient sends it on a host-token connection.
    upserted = json.loads(car_runtime.HostClient(rt).agents_upsert(json.dumps(spec)))
    assert upserted["id"] == AGENT_ID and upserted["attached"] is False
    call("agents.start", {"id": AGENT_ID})
    attached = _poll(
        "the agent to attach",
        lambda: next((a for a in call("agents.list") if a["id"] == AGENT_ID and a["attached"]), None),
        diagnose,
    )
    assert attached["status"] == "running"
    assert f"client {attached['session_id']} authenticated (role=None, agent={AGENT_ID})" in daemon.log()
    printed("AGENT-READY ")

    # -- every token, in order, then done -------------------------------------
    words = [f"w{i}" for i in range(20)]
    prompt = "echo " + " ".join(words)
    accepted = json.loads(rt.agents_chat(json.dumps({"agent_id": AGENT_ID, "prompt": prompt, "model": "m-1", "context": {"topic": "interop"}})))
    echo = accepted["session_id"]
    assert accepted == {"accepted": True, "session_id": echo} and echo
    got = events.wait(_ended(echo), "the echo chat's done")
    assert [(e["kind"], e["delta"]) for e in got] == [("token", w) for w in words] + [("done", None)], got
    assert all(e["agent_id"] == AGENT_ID for e in got)
    seen = printed("AGENT-CHAT ", session_id=echo)
    assert seen == {"session_id": echo, "prompt": prompt, "model": "m-1", "context": {"topic": "interop"}}, seen

    # A session id of the host's choosing.
    accepted = json.loads(rt.agents_chat(json.dumps({"agent_id": AGENT_ID, "prompt": "echo mine", "session_id": "host-picked-1"})))
    assert accepted == {"accepted": True, "session_id": "host-picked-1"}
    got = events.wait(_ended("host-picked-1"), "the second chat's done")
    assert [(e["kind"], e["delta"]) for e in got] == [("token", "mine"), ("done", None)]

    # -- approve ----------------------------------------------------------------
    approve = json.loads(rt.agents_chat(json.dumps({"agent_id": AGENT_ID, "prompt": "approve x"})))["session_id"]
    [pending] = events.wait(
        lambda items: [e for e in _of(approve)(items) if e["kind"] == "approval_pending"], "approval_pending"
    )
    approval_id = pending["delta"]
    assert approval_id == f"approval-{approve}"
    decision = {"allow": True}
    resolved = json.loads(rt.agents_chat_approve(json.dumps({"session_id": approve, "approval_id": approval_id, "decision": decision})))
    assert resolved == {"resolved": True, "session_id": approve}
    got = events.wait(_ended(approve), "the approved chat's done")
    assert [(e["kind"], e["delta"]) for e in got] == [
        ("token", "x"),
        ("approval_pending", approval_id),
        ("token", 'decision={"allow": true}'),
        ("done", None),
    ], got
    assert printed("AGENT-APPROVE ", session_id=approve) == {"session_id": approve, "approval_id": approval_id, "decision": decision}

    # -- cancel -----------------------------------------------------------------
    linger = json.loads(rt.agents_chat(json.dumps({"agent_id": AGENT_ID, "prompt": "linger"})))["session_id"]
    events.wait(lambda items: len(_of(linger)(items)) >= 2, "two lingering tokens")
    assert json.loads(rt.agents_chat_cancel(json.dumps({"session_id": linger}))) == {"cancelled": True, "session_id": linger}
    cancelled = printed("AGENT-CANCEL ", known=True)
    assert cancelled["params"] == {"session_id": linger}
    assert printed("AGENT-STOPPED ", session_id=linger)["tokens"] >= 2

    # -- a turn that raises: the client's bridge ends it with an error event -----
    fail = json.loads(rt.agents_chat(json.dumps({"agent_id": AGENT_ID, "prompt": "fail before"})))["session_id"]
    got = events.wait(_ended(fail), "the failed turn's error")
    assert [(e["kind"], e["delta"]) for e in got] == [
        ("token", "before"),
        ("error", "agent chat handler raised: ValueError: the turn failed on purpose"),
    ], got
    # The error was terminal: the chat is over.
    assert json.loads(rt.agents_chat_cancel(json.dumps({"session_id": fail}))) == {"cancelled": False, "session_id": fail}

    # Every event named one of these chats; the cancelled one got no terminal event.
    everything = events.snapshot()
    assert {e["session_id"] for e in everything} == {echo, "host-picked-1", approve, linger, fail}
    assert {e["kind"] for e in _of(linger)(everything)} == {"token"}
    stopped = call("agents.stop", {"id": AGENT_ID})
    assert stopped["status"] == "stopped" and stopped["last_exit_code"] == 0, diagnose()
    assert stdout()[-1] == "AGENT-STOPPING"
    rt.close()
    assert time.monotonic() - began < 30


@pytest.mark.interop
def test_host_state_through_the_client(daemon: Daemon, client_env):
    """host_subscribe, host_register_agent, host_set_status, host_request_approval, host_resolve_approval and host_events work through the client."""
    client_env(daemon)
    watcher = car_runtime.CarRuntime()
    pushed = Inbox(watcher, "host.event", TIMEOUT)
    snapshot = json.loads(watcher.host_subscribe("{}"))
    assert snapshot["subscribed"] is True and snapshot["agents"] == [] and snapshot["approvals"] == []
    assert snapshot["identity"]["pid"] == daemon.proc.pid and snapshot["identity"]["manifest_role"] == "owner"

    worker = car_runtime.CarRuntime()

    def event(kind: str, **match: Any) -> dict[str, Any]:
        def found(items: list[dict[str, Any]]) -> Any:
            return next((e for e in items if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())), None)

        return pushed.wait(found, f"host.event {kind} {match}")

    registered = json.loads(worker.host_register_agent(json.dumps({"id": "worker-1", "name": "Worker", "capabilities": ["chat"]})))
    assert registered["id"] == "worker-1" and registered["status"] == "idle" and registered["capabilities"] == ["chat"]
    assert event("agent.registered", agent_id="worker-1")["payload"]["agent"] == registered

    changed = json.loads(worker.host_set_status(json.dumps({"agent_id": "worker-1", "status": "running", "message": "indexing"})))
    assert changed["status"] == "running" and changed["message"] == "indexing"
    assert event("agent.status_changed", message="indexing")["payload"]["agent"] == changed

    approval = json.loads(worker.host_request_approval(json.dumps({"title": "Ship it?", "agent_id": "worker-1", "context": {"n": 1}})))
    assert approval["status"] == "pending" and approval["context"] == {"n": 1}
    requested = event("approval.requested", message="Ship it?")
    assert requested["payload"]["approval_id"] == approval["id"]

    # The other connection may not change the worker's rows.  The typed
    # host_* wrappers raise RuntimeError("<code> <message>"), not
    # DaemonRpcError (daemon_call does).
    with pytest.raises(RuntimeError, match="^-32603 agent 'worker-1' is owned by another session$"):
        watcher.host_set_status(json.dumps({"agent_id": "worker-1", "status": "paused"}))
    with pytest.raises(car_runtime.DaemonRpcError, match="^agent 'worker-1' is owned by another session$"):
        watcher.daemon_call("host.unregister_agent", json.dumps({"agent_id": "worker-1"}))
    with pytest.raises(RuntimeError, match=f"^-32603 approval '{approval['id']}' was requested by another session$"):
        watcher.host_resolve_approval(json.dumps({"approval_id": approval["id"], "approved": True}))

    resolved = json.loads(worker.host_resolve_approval(json.dumps({"approval_id": approval["id"], "approved": False, "notes": "not today"})))
    assert resolved["status"] == "denied" and resolved["notes"] == "not today"
    assert event("approval.resolved", message="Ship it?: denied")["payload"]["approval"] == resolved

    # host_events: the same events the subscriber was pushed, in order.
    recorded = json.loads(worker.host_events())["events"]
    assert [e["kind"] for e in recorded] == [
        "agent.registered",
        "agent.status_changed",
        "approval.requested",
        "agent.status_changed",
        "approval.resolved",
    ], recorded
    assert pushed.wait(lambda items: len(items) == len(recorded) and list(items), "every event pushed") == recorded
    assert json.loads(worker.host_events(2))["events"] == recorded[-2:]
    [listed] = json.loads(watcher.host_agents())
    assert listed["id"] == "worker-1" and listed["name"] == "Worker"

    # A gated call's system approval: any connection resolves it with
    # host_resolve_approval.  A changed launch spec gates agents.start.
    spec = {
        "id": "sleeper",
        "command": os.path.realpath(sys.executable),
        "args": ["-c", "import time; time.sleep(120)", "v1"],
        "restart": "never",
    }
    host = car_runtime.HostClient(worker)
    host.agents_upsert(json.dumps(spec))
    assert json.loads(worker.daemon_call("agents.start", json.dumps({"id": "sleeper"})))["status"] in ("starting", "running")
    assert json.loads(worker.daemon_call("agents.stop", json.dumps({"id": "sleeper"})))["status"] == "stopped"
    host.agents_upsert(json.dumps({**spec, "args": spec["args"][:-1] + ["v2"]}))
    outcome: list[Any] = []
    starting = threading.Thread(
        target=lambda: outcome.append(json.loads(worker.daemon_call("agents.start", json.dumps({"id": "sleeper"})))),
        daemon=True,
    )
    starting.start()
    gated = pushed.wait(
        lambda items: next((e for e in items if e["payload"].get("approval", {}).get("action") == "ws.method:agents.start"), None),
        "the gate's approval.requested",
    )
    system = json.loads(watcher.host_resolve_approval(json.dumps({"approval_id": gated["payload"]["approval_id"], "approved": True})))
    assert system["status"] == "approved" and system["client_id"] is None
    starting.join(TIMEOUT)
    assert outcome and outcome[0]["status"] in ("starting", "running"), outcome
    assert outcome[0]["spec"]["args"][-1] == "v2"
    assert json.loads(worker.daemon_call("agents.stop", json.dumps({"id": "sleeper"})))["status"] == "stopped"
    watcher.close()
    worker.close()
