"""
Who may call which agents.* method, token rotation as a connection sees
it, and agents.install: through the dispatcher, on a fake process reactor.
"""

import json
import os
import stat
import sys

import pytest

from car_twisted._version import __version__
from car_twisted.agents.manifest import parse_agent_spec
from support import HOST_TOKEN, TOKEN, DispatchConn, make_state
from test_supervisor import FakeProcessReactor, group_signals

PYTHON = os.path.realpath(sys.executable)
HOST_ONLY = "forbidden: {} needs the host role (session.auth with the host token)"


def Conn(state, **auth):
    return DispatchConn(state, auth or None)


@pytest.fixture
def reactor():
    return FakeProcessReactor()


@pytest.fixture
def state(tmp_path, reactor):
    state = make_state(tmp_path, reactor)
    # Fake pids are beyond any real one, and killpg stays in the fake anyway.
    state.agents._killpg = reactor.killpg
    return state


def agent_spec(agent_id, **kw):
    return {"id": agent_id, "command": PYTHON, "args": [f"{agent_id}.py"], **kw}


def add_agent(state, agent_id, **kw):
    """An agent put in the manifest directly; its token as the supervisor holds it."""
    state.agents.upsert(parse_agent_spec(agent_spec(agent_id, **kw), os.environ))
    return state.agents._agents[agent_id].entry.token


@pytest.fixture
def operator(state):
    return Conn(state, token=TOKEN)


@pytest.fixture
def host(state):
    return Conn(state, host_token=HOST_TOKEN)


@pytest.fixture
def agent(state):
    """A supervised child's own connection: its agent token and nothing else."""
    token = add_agent(state, "mine")
    add_agent(state, "other")
    conn = Conn(state, agent_id="mine", token=token)
    assert conn.session.agent_only
    return conn


def forbidden(reply, method):
    assert reply["error"] == {"code": -32603, "message": HOST_ONLY.format(method)}, reply


# -- host-only manifest changes ----------------------------------------------------------


@pytest.mark.parametrize("who", ["operator", "agent"])
def test_manifest_changes_need_the_host(request, state, who):
    """upsert, remove and install are refused to the daemon token and to an agent token."""
    conn = request.getfixturevalue(who)
    add_agent(state, "victim")
    before = state.agents._agents["victim"].entry
    forbidden(conn.call("agents.upsert", agent_spec("victim", args=["-c", "print(open('/etc/hostname').read())"])), "agents.upsert")
    forbidden(conn.call("agents.upsert", agent_spec("fresh")), "agents.upsert")
    forbidden(conn.call("agents.remove", {"id": "victim"}), "agents.remove")
    forbidden(
        conn.call("agents.install", {"agent": {"id": "fresh"}, "transport": {"kind": "external_process", "command": PYTHON}}),
        "agents.install",
    )
    assert state.agents._agents["victim"].entry == before
    assert "fresh" not in state.agents._agents


def test_host_changes_the_manifest(state, host):
    assert host.result("agents.upsert", agent_spec("h1"))["status"] == "stopped"
    assert host.result("agents.remove", {"id": "h1"}) == {"removed": True}


def test_auth_off_still_needs_the_host(tmp_path, reactor):
    """With auth disabled every connection is an operator, never the host."""
    state = make_state(tmp_path, reactor, auth_enabled=False)
    state.agents._killpg = reactor.killpg
    forbidden(Conn(state).call("agents.upsert", agent_spec("x")), "agents.upsert")


# -- logs ------------------------------------------------------------------------------


def test_agent_reads_only_its_own_log(state, agent):
    reply = agent.call("agents.tail_log", {"id": "other"})
    assert reply["error"]["code"] == -32603
    assert reply["error"]["message"].startswith("forbidden: a connection bound to agent 'mine' reads only")
    assert agent.result("agents.tail_log", {"id": "mine"})["lines"] == []


@pytest.mark.parametrize("who", ["operator", "host"])
def test_operator_and_host_read_any_log(request, state, who):
    conn = request.getfixturevalue(who)
    add_agent(state, "any")
    assert conn.result("agents.tail_log", {"id": "any", "n": 5})["stdout_path"].endswith("any.stdout.log")


# -- the lifecycle stays open ------------------------------------------------------------


@pytest.mark.parametrize("who", ["operator", "agent"])
def test_lifecycle_methods_stay_open(request, state, reactor, who):
    conn = request.getfixturevalue(who)
    if who == "operator":
        add_agent(state, "mine")
    assert conn.result("agents.start", {"id": "mine"})["status"] == "running"
    assert conn.result("agents.wait", {"id": "mine", "targets": ["running"], "timeout_secs": 1})["status"] == "running"
    assert conn.result("agents.restart", {"id": "mine"})["status"] == "running"
    assert conn.result("agents.stop", {"id": "mine"})["status"] == "stopped"
    assert "mine" in [a["id"] for a in conn.result("agents.list", {})]
    assert "mine" in [a["id"] for a in conn.result("agents.health", {})]
    assert len(reactor.spawned) == 2


# -- token rotation over the wire ------------------------------------------------------------


def test_rotation_closes_the_old_binding(state, reactor, host):
    """A new args list from the host: the agent's connection is closed, its token dead, the child restarted."""
    token = add_agent(state, "worker")
    host.result("agents.start", {"id": "worker"})
    old = reactor.spawned[-1]["proc"]
    bound = Conn(state, agent_id="worker", token=token)
    assert state.agents.list()[0]["attached"]

    out = host.result("agents.upsert", agent_spec("worker", args=["v2.py"]))
    assert bound.sink.closed_with == (1008, "agent credentials rotated")
    assert out["attached"] is False and out["status"] == "running" and out["pid"] != old.pgid
    assert group_signals(reactor, old) == ["TERM"]
    new_token = state.agents._agents["worker"].entry.token
    assert reactor.spawned[-1]["env"]["CAR_AGENT_TOKEN"] == new_token != token

    late = Conn(state)
    assert late.call("session.auth", {"agent_id": "worker", "token": token})["error"]["message"] == "auth failed: token mismatch"
    assert late.result("session.auth", {"agent_id": "worker", "token": new_token})["agent_id"] == "worker"


def test_same_launch_keeps_the_binding(state, host):
    token = add_agent(state, "worker")
    bound = Conn(state, agent_id="worker", token=token)
    host.result("agents.upsert", agent_spec("worker", name="Renamed", restart="always"))
    assert bound.sink.closed_with is None and state.agents.verify("worker", token)


# -- agents.install ----------------------------------------------------------------------------


def install(conn, **manifest):
    return conn.call("agents.install", manifest)


def test_install_external_process_goes_through_upsert(state, host):
    reply = install(
        host,
        agent={"id": "ext", "name": "External"},
        transport={"kind": "external_process", "command": PYTHON, "args": ["ext.py"], "env": {"A": "1"}},
    )
    result = reply["result"]
    assert result["report"] == {"missingOptional": []}
    agent = result["agent"]
    assert agent["id"] == "ext" and agent["status"] == "stopped"
    assert agent["spec"]["name"] == "External" and agent["spec"]["args"] == ["ext.py"] and agent["spec"]["env"] == {"A": "1"}
    assert state.agents._agents["ext"].entry.token not in json.dumps(reply)


def test_install_nested_external_process_and_lifecycle(state, host):
    result = host.result(
        "agents.install",
        {
            "agent": {"id": "nested"},
            "transport": {"kind": "external_process", "external_process": {"command": "/bin/sh", "args": ["-c", "true"]}},
            "lifecycle": {"restart": "never"},
        },
    )
    assert result["agent"]["spec"]["command"] == "/bin/sh" and result["agent"]["spec"]["restart"] == "never"


@pytest.mark.parametrize(
    "transport,field",
    [
        ({"kind": "external_process", "command": "/tmp"}, "transport.command"),
        ({"kind": "external_process", "command": PYTHON, "env": {"LD_PRELOAD": "/x.so"}}, "transport.env.LD_PRELOAD"),
        ({"kind": "external_process", "external_process": {"command": PYTHON, "env": {"PYTHONPATH": "/x"}}}, "transport.env.PYTHONPATH"),
        ({"kind": "wasm"}, "transport"),
    ],
)
def test_install_uses_the_same_validation(host, transport, field):
    reply = install(host, agent={"id": "bad"}, transport=transport)
    assert reply["error"]["code"] == -32602 and reply["error"]["data"]["field"] == field, reply


def test_install_of_a_changed_command_rotates_like_upsert(state, host):
    token = add_agent(state, "ext")
    install(host, agent={"id": "ext"}, transport={"kind": "external_process", "command": "/bin/sh"})
    assert state.agents._agents["ext"].entry.token != token


def test_install_pure_data_stores_the_manifest(state, host, reactor):
    manifest = {"agent": {"id": "notes", "name": "Notes"}, "transport": {"kind": "pure_data", "prompt": "hi"}}
    result = host.result("agents.install", manifest)
    assert result == {"report": {"missingOptional": []}, "agent": None}
    path = state.config.paths.home / "agents" / "notes" / "manifest.json"
    assert json.loads(path.read_text()) == manifest
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "notes" not in state.agents._agents and reactor.spawned == []
    # An external process without a command is kept the same way.
    host.result("agents.install", {"agent": {"id": "url-only"}, "transport": {"kind": "external_process", "health_url": "http://x"}})
    assert (state.config.paths.home / "agents" / "url-only" / "manifest.json").exists()


def test_install_refuses_an_unsafe_id(host):
    reply = install(host, agent={"id": "../escape"}, transport={"kind": "pure_data"})
    assert reply["error"]["data"]["field"] == "agent.id"


@pytest.mark.parametrize("requirement,ok", [("0.0.1", True), (__version__, True), ("99.0", False), (">=0.1, <99", True), ("<0.0.1", False)])
def test_install_checks_the_daemon_version(host, requirement, ok):
    reply = install(host, agent={"id": "v"}, transport={"kind": "pure_data"}, runtime={"car_min_version": requirement})
    if ok:
        assert reply["result"]["agent"] is None
    else:
        assert reply["error"]["code"] == -32602 and reply["error"]["data"]["field"] == "runtime.car_min_version"
        assert __version__ in reply["error"]["message"]


def test_install_checks_capabilities(host):
    missing = install(host, agent={"id": "c"}, transport={"kind": "pure_data"}, capabilities={"required": {"browser": ["run"]}})
    assert missing["error"]["code"] == -32602
    assert missing["error"]["data"]["field"] == "capabilities.required.browser"
    assert "browser" in missing["error"]["message"]
    result = host.result(
        "agents.install",
        {
            "agent": {"id": "c"},
            "transport": {"kind": "pure_data"},
            "capabilities": {"required": {"agents": ["list"], "state": []}, "optional": {"browser": ["run", "close"], "runs": ["trace"]}},
        },
    )
    assert result["report"]["missingOptional"] == [
        {"namespace": "browser", "feature": "run"},
        {"namespace": "browser", "feature": "close"},
    ]
