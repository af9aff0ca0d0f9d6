"""
Interop: a supervised agent written with the real ``car-runtime`` 0.58.0
client attaches to a live ``twist car`` daemon through ``CAR_AGENT_ID`` /
``CAR_AGENT_TOKEN`` alone, and its calls work.

The test is the operator: it drives ``agents.*`` over a ``CarRuntime``
that authenticates with the daemon's token file.  The agent is a small
Python script run by the daemon's supervisor; it has no daemon token of
any kind (the supervisor strips ``CAR_*`` from the inherited environment
and its ``HOME`` / ``XDG_RUNTIME_DIR`` point at an empty directory), so
the only credential it can send is the agent token the supervisor gave
it.  Only the client's public Python API and documented environment
variables are used.

The agent's command is the real base interpreter (``command`` may not
live under a world-writable directory such as ``/tmp``, where CI's clone
and tox venv are); ``PYTHONPATH`` lets it import the installed
``car_runtime``.  The daemon fixtures come from ``test_car_runtime``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest

car_runtime = pytest.importorskip("car_runtime")

from test_car_runtime import (  # noqa: E402,F401  (fixtures are used by name)
    Daemon,
    client_env,
    daemon,
    start_daemon,
)

AGENT_ID = "interop-agent"
ATTACH_TIMEOUT = 20.0
DETACH_TIMEOUT = 10.0

# Printed by the agent; the test finds its results in agents.tail_log.
AGENT_SCRIPT = textwrap.dedent(
    '''
    import json
    import os
    import signal
    import sys
    import time

    sys.path.insert(0, os.environ["INTEROP_SITE_DIR"])
    import car_runtime

    stopping = False

    def on_term(signum, frame):
        global stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)

    # What the agent could authenticate with: only the supervisor's variables.
    home = os.environ.get("HOME", "")
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    candidates = [
        os.path.join(xdg, "ai.parslee.car", "auth-token"),
        os.path.join(home, ".config", "ai.parslee.car", "auth-token"),
    ]
    if os.environ.get("CAR_HOME"):
        candidates.append(os.path.join(os.environ["CAR_HOME"], "ai.parslee.car", "auth-token"))
    token = os.environ["CAR_AGENT_TOKEN"]
    print("AGENT-ENV " + json.dumps({
        "car_vars": sorted(k for k in os.environ if k.startswith("CAR_")),
        "agent_id": os.environ.get("CAR_AGENT_ID"),
        "daemon_url": os.environ.get("CAR_DAEMON_URL"),
        "token_length": len(token),
        "daemon_token_files": [p for p in candidates if os.path.exists(p)],
    }), flush=True)

    rt = car_runtime.CarRuntime()
    raw = []

    def call(method, params):
        reply = rt.daemon_call(method, json.dumps(params))
        raw.append(reply)
        return json.loads(reply)

    caps = call("capabilities.list", {})
    set_reply = call("state.set", {"key": "agent-key", "value": {"written-by": sys.argv[1], "n": [1, 2.5, None]}})
    got = call("state.get", {"key": "agent-key"})
    missing = call("state.get", {"key": "never-set"})
    try:
        rt.daemon_call("nope.missing", "{}")
        error = None
    except car_runtime.DaemonRpcError as e:
        error = {"code": e.code, "message": e.message}
    print("AGENT-RESULT " + json.dumps({
        "server": caps.get("server"),
        "auth_enabled": caps.get("auth_enabled"),
        "protocol_versions": caps.get("protocol_versions"),
        "has_agents_methods": "agents.list" in caps.get("methods", []),
        "set": set_reply,
        "got": got,
        "missing": missing,
        "error": error,
        "epoch": rt.connection_epoch(),
        "token_in_replies": any(token in r for r in raw),
    }), flush=True)

    while not stopping:
        time.sleep(0.05)
    print("AGENT-STOPPING", flush=True)
    rt.close()
    sys.exit(0)
    '''
)


class Operator:
    """The test's ``CarRuntime``; every raw reply is kept for the token check."""

    def __init__(self) -> None:
        self.rt = car_runtime.CarRuntime()
        self.replies: list[str] = []

    def call(self, method: str, params: Any = None) -> Any:
        raw = self.rt.daemon_call(method, json.dumps({} if params is None else params))
        self.replies.append(raw)
        return json.loads(raw)

    def agent(self) -> dict[str, Any]:
        [entry] = [a for a in self.call("agents.list") if a["id"] == AGENT_ID]
        return entry

    def poll(self, what: str, timeout: float, check: Callable[[], Any], diagnose: Callable[[], str]) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not within {timeout:g}s\n{diagnose()}")
            time.sleep(0.1)


def _prefixed(lines: list[str], prefix: str) -> list[Any]:
    return [json.loads(line[len(prefix):]) for line in lines if line.startswith(prefix)]


@pytest.mark.interop
def test_supervised_agent_attaches_with_agent_token_alone(daemon: Daemon, client_env, tmp_path: Path):
    client_env(daemon)
    op = Operator()

    agent_dir = tmp_path / "agent"
    agent_home = agent_dir / "home"
    (agent_home / "xdg").mkdir(parents=True)
    script = agent_dir / "agent.py"
    script.write_text(AGENT_SCRIPT)
    python = os.path.realpath(sys.executable)
    site_dir = os.path.dirname(os.path.dirname(os.path.realpath(car_runtime.__file__)))
    spec = {
        "id": AGENT_ID,
        "name": "car-runtime interop agent",
        "command": python,
        "args": ["-u", str(script), "marker-7f3a"],
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

    def diagnose() -> str:
        try:
            tail = json.dumps(op.call("agents.tail_log", {"id": AGENT_ID, "n": 50}), indent=1)
            listed = json.dumps(op.agent(), indent=1)
        except Exception as e:  # pragma: no cover - diagnostics only
            tail = listed = f"({type(e).__name__}: {e})"
        return f"agent: {listed}\ntail_log: {tail}\ndaemon log:\n{daemon.log()}"

    # agents.upsert is host-only: the client sends it through HostClient,
    # on a fresh connection authenticated with the host token.
    upserted = json.loads(car_runtime.HostClient(op.rt).agents_upsert(json.dumps(spec)))
    assert upserted["id"] == AGENT_ID
    assert upserted["status"] != "running" and upserted["attached"] is False
    assert upserted["spec"]["command"] == python
    assert upserted["spec"]["env"] == spec["env"]

    # The token lives only in the 0600 manifest; the test reads it from
    # there to look for it in everything the daemon said.
    manifest = daemon.home / "agents.json"
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600
    [entry] = [a for a in json.loads(manifest.read_text())["agents"] if a["id"] == AGENT_ID]
    agent_token = entry["token"]
    assert isinstance(agent_token, str) and len(agent_token) >= 16

    started = op.call("agents.start", {"id": AGENT_ID})
    assert started["status"] in ("starting", "running"), diagnose()
    running = op.call("agents.wait", {"id": AGENT_ID, "targets": ["running"], "timeout_secs": 10})
    assert running["status"] == "running" and isinstance(running["pid"], int), diagnose()

    # The agent's car-runtime sent session.auth {agent_id, token} and the
    # daemon bound that connection to the agent.
    attached = op.poll("attached: true", ATTACH_TIMEOUT, lambda: op.agent()["attached"] and op.agent(), diagnose)
    assert attached["status"] == "running"
    assert attached["pid"] == running["pid"]
    session_id = attached["session_id"]
    assert isinstance(session_id, str) and session_id, attached

    # Its calls worked: the results it printed are in its log.
    def results() -> Any:
        tail = op.call("agents.tail_log", {"id": AGENT_ID, "n": 100, "stream": "stdout"})
        return _prefixed(tail["stdout"], "AGENT-RESULT ") and tail

    tail = op.poll("the agent's results in agents.tail_log", ATTACH_TIMEOUT, results, diagnose)
    assert tail["stdout_path"].endswith(f"{AGENT_ID}.stdout.log")
    assert tail["stdout_total"] == len(tail["stdout"])
    [env] = _prefixed(tail["stdout"], "AGENT-ENV ")
    assert env == {
        "car_vars": ["CAR_AGENT_ID", "CAR_AGENT_TOKEN", "CAR_DAEMON_URL", "CAR_NO_VERSION_WARNING"],
        "agent_id": AGENT_ID,
        "daemon_url": daemon.url,
        "token_length": len(agent_token),
        "daemon_token_files": [],
    }, diagnose()
    [result] = _prefixed(tail["stdout"], "AGENT-RESULT ")
    assert result == {
        "server": "car-twisted",
        "auth_enabled": True,
        "protocol_versions": result["protocol_versions"],
        "has_agents_methods": True,
        "set": "ok",
        "got": {"written-by": "marker-7f3a", "n": [1, 2.5, None]},
        "missing": None,
        "error": {"code": -32601, "message": "method not found: nope.missing"},
        "epoch": 1,
        "token_in_replies": False,
    }, diagnose()
    assert 3 in result["protocol_versions"]
    combined = op.call("agents.tail_log", {"id": AGENT_ID})
    assert combined["stderr"] == [], diagnose()

    # State is per connection: the operator does not see the agent's key.
    assert op.call("state.get", {"key": "agent-key"}) is None

    # The daemon logged the binding, for the same connection id.
    log = daemon.log()
    assert f"agent {AGENT_ID} attached as {session_id}" in log, log
    assert re.search(rf"client {re.escape(session_id)} authenticated \(role=\w+, agent={re.escape(AGENT_ID)}\)", log), log

    # SIGTERM: the agent leaves cleanly, the supervisor reports it stopped
    # and the binding goes with the connection.
    stopped = op.call("agents.stop", {"id": AGENT_ID})
    assert stopped["status"] == "stopped", diagnose()
    assert stopped["pid"] is None and stopped["last_exit_code"] == 0, stopped
    after = op.poll(
        "attached: false after agents.stop",
        DETACH_TIMEOUT,
        lambda: (lambda a: a if not a["attached"] else None)(op.agent()),
        diagnose,
    )
    assert after["status"] == "stopped"
    assert after["session_id"] is None
    assert after["restart_count"] == 0
    final = op.call("agents.tail_log", {"id": AGENT_ID, "n": 10, "stream": "stdout"})
    assert final["stdout"][-1] == "AGENT-STOPPING", diagnose()
    assert f"agent {AGENT_ID} exited with 0" in daemon.log()

    # The agent token never left the manifest.
    assert op.replies, "no replies recorded"
    for raw in op.replies:
        assert agent_token not in raw, f"agent token in a daemon reply: {raw[:500]}"
    assert agent_token not in daemon.log(), "agent token in the daemon log"
    op.rt.close()
