"""
Interop: agent run tracing with the real ``car-runtime`` 0.58.0 client.

A supervised agent written with ``car_runtime`` (attached through
``CAR_AGENT_ID`` / ``CAR_AGENT_TOKEN`` alone) starts a run, records its
turns in batches and completes it with the client's public wrappers
(``runs_start`` / ``runs_record_turns`` / ``runs_complete``).  While the
run is open a second connection holding the per-launch host token lists
it, subscribes to it and sees the later turns arrive live as
``runs.trace.event``; afterwards it replays the stored trace.  A
connection with only the daemon token (a plain ``CarRuntime`` reading
the token file) is refused every read of that agent's runs, and neither
that connection nor the host connection can write turns into the run.

The host-token connection is a minimal standard-library WebSocket client:
the client's host-management path (``daemon_call_host_management``)
refuses the ``runs.*`` read methods (they are not on its host-management
list), and ``websockets`` is not in the interop environment.  It sends
``session.auth {host_token}`` and ``server.handshake`` like any client.

The agent setup (real base interpreter as ``command``, ``PYTHONPATH`` to
the installed ``car_runtime``, an empty ``HOME``) follows
``test_car_runtime_agents``; the daemon fixtures come from
``test_car_runtime``.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import pytest

car_runtime = pytest.importorskip("car_runtime")

from test_car_runtime import (  # noqa: E402,F401  (fixtures are used by name)
    HANDSHAKE_V3,
    Daemon,
    client_env,
    daemon,
    start_daemon,
)

AGENT_ID = "runs-agent"
INTENT = "count to six, narrating each step"
TIMEOUT = 20.0
REFUSED = "not visible to this connection"

# Six turns: two batches before the test subscribes, two after.  The
# client-sent ``index`` values are decorative; the daemon stamps its own.
TURNS = [
    {"prompt": f"step {i}", "tool": "count", "parameters": {"n": i, "tag": "t" * i}, "output": f"counted {i}", "index": 100 + i}
    for i in range(6)
]
BATCHES_BEFORE = [[0, 1], [2]]
BATCHES_AFTER = [[3, 4], [5]]
OUTCOME = {
    "status": "success",
    "summary": "counted to six",
    "evidence": ["six turns"],
    "metrics": {"turns": 6},
    "timestamp": "2025-01-01T00:00:00Z",
}

AGENT_SCRIPT = textwrap.dedent(
    '''
    import json
    import os
    import signal
    import sys
    import time
    import traceback

    sys.path.insert(0, os.environ["INTEROP_SITE_DIR"])
    import car_runtime

    stopping = False

    def on_term(signum, frame):
        global stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    plan = json.load(open(sys.argv[1]))
    go_file = sys.argv[2]
    rt = car_runtime.CarRuntime()

    def record(run_id, batches):
        replies = []
        for batch in batches:
            turns = [plan["turns"][i] for i in batch]
            replies.append(json.loads(rt.runs_record_turns(json.dumps({"run_id": run_id, "turns": turns}))))
        return replies

    try:
        started = json.loads(rt.runs_start(json.dumps({"intent": plan["intent"], "agent_name": "runs interop agent"})))
        run_id = started["run_id"]
        before = record(run_id, plan["before"])
        print("AGENT-RUN " + json.dumps({"started": started, "batches": before}), flush=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(go_file) and time.monotonic() < deadline:
            time.sleep(0.02)
        after = record(run_id, plan["after"])
        completed = json.loads(rt.runs_complete(json.dumps({"run_id": run_id, "outcome": plan["outcome"]})))
        # The owning agent's own connection may read its runs.
        own = json.loads(rt.runs_list(json.dumps({"agent_id": started["agent_id"]})))
        print("AGENT-DONE " + json.dumps({
            "go_seen": os.path.exists(go_file),
            "batches": after,
            "completed": completed,
            "own_list": own,
        }), flush=True)
    except Exception:
        print("AGENT-ERROR " + json.dumps(traceback.format_exc()), flush=True)

    while not stopping:
        time.sleep(0.05)
    rt.close()
    sys.exit(0)
    '''
)


# -- a minimal host-token WebSocket client ---------------------------------


class HostConnection:
    """
    Blocking JSON-RPC over one WebSocket; notifications received while
    waiting for a reply are queued in ``notifications``.
    """

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET / HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, f"connection closed during the upgrade: {head!r}"
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        assert b" 101 " in status, f"no WebSocket upgrade: {head!r}"
        self.buf = bytearray(head.split(b"\r\n\r\n", 1)[1])
        self.next_id = 0
        self.notifications: list[dict[str, Any]] = []

    def _send(self, payload: bytes, opcode: int = 1) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", n)
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + struct.pack("!Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _frame(self) -> tuple[int, bool, bytes]:
        while True:
            if len(self.buf) >= 2:
                fin, opcode, n = self.buf[0] & 0x80, self.buf[0] & 0x0F, self.buf[1] & 0x7F
                off = {126: 4, 127: 10}.get(n, 2)
                if len(self.buf) >= off:
                    if n == 126:
                        n = struct.unpack("!H", bytes(self.buf[2:4]))[0]
                    elif n == 127:
                        n = struct.unpack("!Q", bytes(self.buf[2:10]))[0]
                    if len(self.buf) >= off + n:
                        payload = bytes(self.buf[off : off + n])
                        del self.buf[: off + n]
                        return opcode, bool(fin), payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the daemon closed the host connection")
            self.buf.extend(chunk)

    def _message(self, deadline: float) -> dict[str, Any]:
        """The next whole text message; answers pings on the way."""
        parts: list[bytes] = []
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            opcode, fin, payload = self._frame()
            if opcode == 0x9:
                self._send(payload, opcode=0xA)
            elif opcode == 0x8:
                raise ConnectionError(f"the daemon closed the host connection: {payload!r}")
            elif opcode in (0x1, 0x0):
                parts.append(payload)
                if fin:
                    return json.loads(b"".join(parts))

    def request(self, method: str, params: Any) -> dict[str, Any]:
        """The whole JSON-RPC response (``result`` or ``error``)."""
        self.next_id += 1
        rid = self.next_id
        self._send(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode())
        deadline = time.monotonic() + TIMEOUT
        while True:
            msg = self._message(deadline)
            if "id" in msg and msg["id"] == rid:
                return msg
            assert "id" not in msg, f"reply to an unknown request: {msg}"
            self.notifications.append(msg)

    def call(self, method: str, params: Any) -> Any:
        reply = self.request(method, params)
        assert "error" not in reply, f"{method} failed on the host connection: {reply['error']}"
        return reply["result"]

    def wait_notifications(self, until: Callable[[list[dict[str, Any]]], bool], timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while not until(self.notifications):
            try:
                self.notifications.append(self._message(deadline))
            except (socket.timeout, TimeoutError):
                raise AssertionError(f"notifications incomplete after {timeout:g}s: {self.notifications}") from None
        return self.notifications

    def close(self) -> None:
        try:
            self._send(struct.pack("!H", 1000), opcode=0x8)
        finally:
            self.sock.close()


def _prefixed(lines: list[str], prefix: str) -> list[Any]:
    return [json.loads(line[len(prefix):]) for line in lines if line.startswith(prefix)]


def _as_stored(i: int) -> dict[str, Any]:
    """Turn ``i`` as the daemon stores and streams it."""
    sent = {k: v for k, v in TURNS[i].items() if k != "index"}
    return {"record": "turn", "index": i, "verifier_verdict": "not_run", **sent}


@pytest.mark.interop
def test_supervised_run_is_traced_for_the_host_and_refused_to_the_daemon_token(daemon: Daemon, client_env, tmp_path: Path):
    began = time.monotonic()
    client_env(daemon)
    op = car_runtime.CarRuntime()  # the daemon token only, from the token file
    op_events: list[str] = []
    op.register_daemon_notification_handler("runs.trace.event", op_events.append)

    def call(method: str, params: Any = None) -> Any:
        return json.loads(op.daemon_call(method, json.dumps({} if params is None else params)))

    agent_dir = tmp_path / "agent"
    agent_home = agent_dir / "home"
    (agent_home / "xdg").mkdir(parents=True)
    script = agent_dir / "agent.py"
    script.write_text(AGENT_SCRIPT)
    plan = agent_dir / "plan.json"
    plan.write_text(json.dumps({"intent": INTENT, "turns": TURNS, "before": BATCHES_BEFORE, "after": BATCHES_AFTER, "outcome": OUTCOME}))
    go_file = agent_dir / "go"
    site_dir = os.path.dirname(os.path.dirname(os.path.realpath(car_runtime.__file__)))
    spec = {
        "id": AGENT_ID,
        "name": "car-runtime runs agent",
        "command": os.path.realpath(sys.executable),
        "args": ["-u", str(script), str(plan), str(go_file)],
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
            tail = json.dumps(call("agents.tail_log", {"id": AGENT_ID, "n": 50}), indent=1)
        except Exception as e:  # pragma: no cover - diagnostics only
            tail = f"({type(e).__name__}: {e})"
        return f"tail_log: {tail}\ndaemon log:\n{daemon.log()}"

    def agent_line(prefix: str) -> Any:
        deadline = time.monotonic() + TIMEOUT
        while True:
            tail = call("agents.tail_log", {"id": AGENT_ID, "n": 100, "stream": "stdout"})
            assert not _prefixed(tail["stdout"], "AGENT-ERROR "), diagnose()
            found = _prefixed(tail["stdout"], prefix)
            if found:
                [line] = found
                return line
            assert time.monotonic() < deadline, f"no {prefix!r} line from the agent\n{diagnose()}"
            time.sleep(0.05)

    def refused(method: str, params: dict[str, Any]) -> None:
        """The daemon-token connection gets a JSON-RPC error and no data."""
        with pytest.raises(car_runtime.DaemonRpcError) as info:
            getattr(op, method.replace(".", "_"))(json.dumps(params))
        err = info.value
        assert err.code == -32603, (method, err.code, err.message)
        assert REFUSED in err.message, (method, err.message)
        # (``data`` is absent when the error frame carries none.)
        data = getattr(err, "data", None)
        for secret in ("step 1", "counted", INTENT):
            assert secret not in f"{err.message} {data!r}", (method, err.message, data)

    # -- the agent starts a run and records the first three turns ----------
    # agents.upsert is host-only: the client sends it through HostClient.
    assert json.loads(car_runtime.HostClient(op).agents_upsert(json.dumps(spec)))["id"] == AGENT_ID
    call("agents.start", {"id": AGENT_ID})
    assert call("agents.wait", {"id": AGENT_ID, "targets": ["running"], "timeout_secs": 10})["status"] == "running", diagnose()
    first = agent_line("AGENT-RUN ")
    run_id = first["started"]["run_id"]
    assert isinstance(run_id, str) and run_id, first
    # The daemon took the owning agent from the connection's agent binding.
    assert first["started"] == {"run_id": run_id, "agent_id": AGENT_ID}
    assert first["batches"] == [
        {"run_id": run_id, "base_index": 0, "count": 2, "ok": True},
        {"run_id": run_id, "base_index": 2, "count": 1, "ok": True},
    ], diagnose()

    # The client's host-management path does not carry runs.* reads.
    for method in ("runs.list", "runs.get_trace", "runs.subscribe"):
        with pytest.raises(RuntimeError, match="not a host-management method"):
            op.daemon_call_host_management(method, json.dumps({"agent_id": AGENT_ID, "run_id": run_id}))

    # -- the host-token connection ----------------------------------------
    host = HostConnection(daemon.url)
    try:
        host_token = daemon.host_token_file.read_text().strip()
        assert host.request("session.auth", {"host_token": host_token}).get("error") is None
        assert host.call("server.handshake", HANDSHAKE_V3)["protocol_version"] == 3

        # Mid-run: listed as in progress with three turns.
        listed = host.call("runs.list", {"agent_id": AGENT_ID})
        assert listed["agent_id"] == AGENT_ID
        [summary] = listed["runs"]
        assert summary["run_id"] == run_id and summary["agent_id"] == AGENT_ID
        assert summary["intent"] == INTENT
        assert summary["status"] == "in_progress" and summary["turn_count"] == 3
        assert "ended_at" not in summary and summary["started_at"]

        # The daemon token alone reads nothing of the live run.
        refused("runs.list", {"agent_id": AGENT_ID})
        refused("runs.get_trace", {"run_id": run_id})
        refused("runs.subscribe", {"run_id": run_id})

        # Neither the host token nor the daemon token may write turns: the
        # uniform not-found drop, nothing appended.
        forged = {"run_id": run_id, "turns": [{"prompt": "forged", "output": "forged"}]}
        dropped = {"run_id": run_id, "base_index": 0, "count": 0, "ok": False, "dropped": "run_not_found"}
        assert host.call("runs.record_turns", forged) == dropped
        assert json.loads(op.runs_record_turns(json.dumps(forged))) == dropped

        # Subscribe mid-run: the snapshot is the three turns so far.
        snap = host.call("runs.subscribe", {"run_id": run_id})
        assert snap["run_id"] == run_id and snap["agent_id"] == AGENT_ID
        assert snap["status"] == "in_progress"
        assert snap["cursor"] == 3 == len(snap["turns_so_far"])
        assert snap["turns_so_far"] == [_as_stored(i) for i in range(3)], snap
        assert host.notifications == [], "events before the agent recorded anything new"

        # Let the agent go on: three more turns, then the outcome, live.
        go_file.write_text("go")
        events = host.wait_notifications(
            lambda ns: any(n.get("params", {}).get("record", {}).get("record") == "ended" for n in ns),
            TIMEOUT,
        )
        done = agent_line("AGENT-DONE ")
        assert done["go_seen"] is True
        assert done["batches"] == [
            {"run_id": run_id, "base_index": 3, "count": 2, "ok": True},
            {"run_id": run_id, "base_index": 5, "count": 1, "ok": True},
        ], diagnose()
        assert done["completed"] == {"run_id": run_id, "ok": True}
        assert [r["run_id"] for r in done["own_list"]["runs"]] == [run_id]

        assert all(n.get("method") == "runs.trace.event" and "id" not in n for n in events), events
        params = [n["params"] for n in events]
        assert all(p["run_id"] == run_id and p["agent_id"] == AGENT_ID for p in params), params
        turn_events = [p for p in params if p["record"]["record"] == "turn"]
        ended_events = [p for p in params if p["record"]["record"] == "ended"]
        assert len(turn_events) + len(ended_events) == len(params), params
        assert [p["record"] for p in turn_events] == [_as_stored(i) for i in range(3, 6)], params
        # Contiguous cursors after the snapshot's, each turn exactly once.
        assert [p["cursor"] for p in turn_events] == [4, 5, 6], params
        assert all(p["status"] == "in_progress" for p in turn_events), params
        [ended] = ended_events
        assert params[-1] is ended, "a record after the ended record"
        assert ended["cursor"] == 6 and ended["status"] == "completed", ended
        assert ended["record"].get("status") == "completed", ended
        streamed = snap["turns_so_far"] + [p["record"] for p in turn_events]
        assert [t["index"] for t in streamed] == list(range(6))

        # After completion: listed completed with six turns (the forged
        # writes were not counted).
        [summary] = host.call("runs.list", {"agent_id": AGENT_ID})["runs"]
        assert summary["run_id"] == run_id and summary["intent"] == INTENT
        assert summary["status"] == "completed" and summary["turn_count"] == 6, summary
        assert summary["ended_at"] >= summary["started_at"], summary

        # Replay: started, the same six turn records the live view had, ended.
        trace = host.call("runs.get_trace", {"run_id": run_id})
        assert trace["run_id"] == run_id and trace["agent_id"] == AGENT_ID and trace["cursor"] == 0
        records = trace["records"]
        assert [r["record"] for r in records] == ["started"] + ["turn"] * 6 + ["ended"], records
        assert records[0]["run_id"] == run_id and records[0]["intent"] == INTENT
        assert records[1:7] == streamed
        assert records[7] == ended["record"]
        paged = host.call("runs.get_trace", {"run_id": run_id, "cursor": 5})
        assert paged["cursor"] == 5 and paged["records"] == records[5:]
        assert host.call("runs.get_trace", {"run_id": "no-such-run"}) == {"run_id": "no-such-run", "not_found": True}
        assert host.call("runs.unsubscribe", {"run_id": run_id}) == {"run_id": run_id, "removed": True}

        # The completed run stays refused to the daemon token.
        refused("runs.list", {"agent_id": AGENT_ID})
        refused("runs.get_trace", {"run_id": run_id})
        refused("runs.subscribe", {"run_id": run_id})
    finally:
        host.close()

    # The daemon-token connection never received a trace event.
    time.sleep(0.2)
    assert op_events == []
    assert call("capabilities.list")["server"] == "car-twisted"

    stopped = call("agents.stop", {"id": AGENT_ID})
    assert stopped["status"] == "stopped" and stopped["last_exit_code"] == 0, diagnose()
    op.close()
    assert time.monotonic() - began < 60
