"""
Interop: the real ``car-runtime`` 0.58.0 client (PyPI, module
``car_runtime``) against a live ``twist car`` daemon subprocess.

Only the client's public Python API and its documented environment
variables are used (CAR_HOME, CAR_DAEMON_URL, CAR_AUTH_TOKEN unset,
CAR_NO_VERSION_WARNING).  The client is blocking, so it is called
directly from the test thread; the daemon runs in another process.

Run with ``tox -e interop`` or ``pytest -m interop tests/interop``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import free_port, port_open

car_runtime = pytest.importorskip("car_runtime")

TWIST = str(Path(sys.executable).with_name("twist"))
TOKEN_DIR = "ai.parslee.car"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0

# Everything the daemon or the client would read from the environment.
_CAR_ENV = (
    "CAR_HOME",
    "CAR_AUTH_TOKEN",
    "CAR_NO_AUTH",
    "CAR_DAEMON_URL",
    "CAR_HANDLER_TIMEOUT",
    "CAR_AGENT_ID",
    "CAR_AGENT_TOKEN",
    "CAR_MEMORY_NAMESPACE",
)


class Daemon:
    """One ``twist car`` subprocess on a loopback TCP port."""

    def __init__(self, home: Path, log_path: Path, no_auth: bool) -> None:
        self.home = home
        self.token_dir = home / TOKEN_DIR
        self.auth_token_file = self.token_dir / "auth-token"
        self.host_token_file = self.token_dir / "host-token"
        self.log_path = log_path
        self.no_auth = no_auth
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _CAR_ENV}
        for attempt in range(5):
            self.port = free_port()
            argv = [
                TWIST,
                "--log-format=text",
                "car",
                "--car-home",
                str(self.home),
                "--listen",
                f"tcp:{self.port}:interface=127.0.0.1",
            ]
            if self.no_auth:
                argv.append("--no-auth")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=env
                )
            if self._wait_ready():
                return
            if self.proc.poll() is None:
                self._terminate()
                break
            # Exited early: most likely lost the port race; try another.
        raise AssertionError(f"daemon did not start; log:\n{self.log()}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        # Token files are written only after the listeners are up; the
        # host token is written in both modes, the auth token only with auth.
        marker = self.host_token_file if self.no_auth else self.auth_token_file
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if marker.exists() and self.host_token_file.exists() and port_open(self.port):
                return True
            time.sleep(0.05)
        return False

    def _terminate(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def stop(self) -> None:
        """SIGTERM, then check a clean exit that removed the token files."""
        assert self.proc is not None
        was_running = self.proc.poll() is None
        rc = self._terminate()
        assert was_running, f"daemon died during the test (rc={rc}); log:\n{self.log()}"
        # ``twist`` stops the reactor on SIGTERM and then re-raises the
        # signal to report it (twisted.application.twist._exitWithSignal),
        # so a clean shutdown exits with -SIGTERM; the log tells it apart
        # from a raw kill.
        assert rc in (0, -signal.SIGTERM), (
            f"daemon did not exit cleanly on SIGTERM (rc={rc}); log:\n{self.log()}"
        )
        assert "Main loop terminated" in self.log(), f"no clean shutdown; log:\n{self.log()}"
        assert not self.auth_token_file.exists(), "auth-token left behind after SIGTERM"
        assert not self.host_token_file.exists(), "host-token left behind after SIGTERM"


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(no_auth: bool = False) -> Daemon:
        n = len(started)
        d = Daemon(tmp_path / f"home{n or ''}", tmp_path / f"daemon{n or ''}.log", no_auth)
        started.append(d)
        d.start()
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


@pytest.fixture
def client_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[Daemon], None]:
    """Point the client at a daemon; nothing but its token file supplies a token."""

    def point_at(d: Daemon) -> None:
        for name in _CAR_ENV:
            monkeypatch.delenv(name, raising=False)
        # Empty fallbacks, so no stray token from the real XDG / ~/.config is found.
        isolated = tmp_path / "client-home"
        (isolated / "xdg").mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv("HOME", str(isolated))
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(isolated / "xdg"))
        monkeypatch.setenv("CAR_HOME", str(d.home))
        monkeypatch.setenv("CAR_DAEMON_URL", d.url)
        monkeypatch.setenv("CAR_NO_VERSION_WARNING", "1")

    return point_at


class Inbox:
    """Notifications one method delivers to a handler on the client's thread; waitable for C{timeout} seconds."""

    def __init__(self, rt: Any, method: str, timeout: float) -> None:
        self.items: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.timeout = timeout
        rt.register_daemon_notification_handler(method, self._received)

    def _received(self, params_json: str) -> None:
        with self.cond:
            self.items.append(json.loads(params_json))
            self.cond.notify_all()

    def snapshot(self) -> list[dict[str, Any]]:
        with self.cond:
            return list(self.items)

    def wait(self, predicate: Callable[[list[dict[str, Any]]], Any], what: str) -> Any:
        with self.cond:
            value = self.cond.wait_for(lambda: predicate(self.items), self.timeout)
            assert value, f"no {what} within {self.timeout:g}s; got {self.items}"
            return value


def call(rt: Any, method: str, params: Any = None) -> Any:
    return json.loads(rt.daemon_call(method, json.dumps({} if params is None else params)))


def rpc_error(rt: Any, method: str, params: Any = None) -> Any:
    with pytest.raises(car_runtime.DaemonRpcError) as info:
        rt.daemon_call(method, json.dumps({} if params is None else params))
    return info.value


HANDSHAKE_V3 = {
    "client_version": "0.58.0",
    "protocol_version": 3,
    "required_capabilities": [],
}


# -- auth from the token file and protocol 3 -------------------------------


@pytest.mark.interop
def test_token_file_auth_and_protocol_3(daemon, client_env):
    client_env(daemon)
    assert car_runtime.protocol_version() == 3
    rt = car_runtime.CarRuntime()
    caps = call(rt, "capabilities.list")
    assert 3 in caps["protocol_versions"]
    assert caps["auth_enabled"] is True
    assert rt.connection_epoch() == 1
    # The connection negotiated 3: repeating 3 is idempotent, asking for 2
    # on the same connection is refused naming the negotiated version.
    again = call(rt, "server.handshake", HANDSHAKE_V3)
    assert again["protocol_version"] == 3
    err = rpc_error(rt, "server.handshake", {"client_version": "0.58.0", "protocol_version": 2})
    assert err.code == -32006
    assert err.data["negotiated"] == 3
    assert rt.connection_epoch() == 1
    # The daemon logged the session.auth (the info line the no-auth test
    # checks is absent there).
    assert "client c1 authenticated" in daemon.log()


@pytest.mark.interop
def test_results_through_daemon_call(daemon, client_env):
    client_env(daemon)
    rt = car_runtime.CarRuntime()
    raw = rt.daemon_call("capabilities.list", "{}")
    assert isinstance(raw, str)
    caps = json.loads(raw)
    assert caps["server"] == "car-twisted"
    assert isinstance(caps["server_version"], str) and caps["server_version"]
    assert sorted(caps["protocol_versions"]) == [2, 3]
    for m in ("session.auth", "server.handshake", "capabilities.list", "server.schema"):
        assert m in caps["methods"]
    assert set(caps["namespaces"]) >= {"session", "server", "capabilities"}
    schema = call(rt, "server.schema")
    assert set(schema["methods"]) == set(caps["methods"])
    assert schema["server_version"] == caps["server_version"]
    assert "client_version" in json.dumps(schema["methods"]["server.handshake"]["params"])
    hs = call(rt, "server.handshake", HANDSHAKE_V3)
    assert hs == {
        "protocol_version": 3,
        "server_version": caps["server_version"],
        "client_protocol_version": 3,
    }


# -- JSON-RPC errors as DaemonRpcError -------------------------------------


@pytest.mark.interop
def test_errors_surface_as_daemon_rpc_error(daemon, client_env):
    client_env(daemon)
    rt = car_runtime.CarRuntime()

    err = rpc_error(rt, "nope.missing")
    assert err.code == -32601
    assert err.message == "method not found: nope.missing"
    assert str(err) == err.message

    err = rpc_error(rt, "infer", {"prompt": "hi"})
    assert err.code == -32601
    assert "infer" in err.message
    assert "not implemented by this daemon" in err.message

    err = rpc_error(rt, "server.handshake", {"client_version": 5})
    assert err.code == -32602
    assert isinstance(err.data, dict)
    assert err.data["field"] == "client_version"

    # Errors do not hurt the connection.
    assert 3 in call(rt, "capabilities.list")["protocol_versions"]
    assert rt.connection_epoch() == 1


# -- wrong token, then the right one ---------------------------------------


@pytest.mark.interop
def test_wrong_token_file_then_restored(daemon, client_env):
    client_env(daemon)
    good = daemon.auth_token_file.read_text()
    wrong = "x" * len(good.strip())
    assert wrong != good.strip()
    daemon.auth_token_file.write_text(wrong + "\n")
    try:
        rt = car_runtime.CarRuntime()
        with pytest.raises(RuntimeError) as info:
            rt.daemon_call("capabilities.list", "{}")
        assert not isinstance(info.value, car_runtime.DaemonRpcError)
        msg = str(info.value)
        assert "session.auth" in msg
        assert "token mismatch" in msg
    finally:
        daemon.auth_token_file.write_text(good)
    rt2 = car_runtime.CarRuntime()
    assert call(rt2, "capabilities.list")["auth_enabled"] is True


# -- concurrency ----------------------------------------------------------


@pytest.mark.interop
def test_eight_threads_one_runtime(daemon, client_env):
    client_env(daemon)
    rt = car_runtime.CarRuntime()
    assert rt.connection_epoch() == 1
    n_threads, rounds = 8, 10
    barrier = threading.Barrier(n_threads)
    failures: list[str] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(10)
            for k in range(rounds):
                # A unique error per request: a misrouted reply would show.
                name = f"nope.t{i}.r{k}"
                try:
                    rt.daemon_call(name, "{}")
                    failures.append(f"{name}: no error")
                except car_runtime.DaemonRpcError as e:
                    if (e.code, e.message, e.data) != (
                        -32601,
                        f"method not found: {name}",
                        {"method": name},
                    ):
                        failures.append(f"{name}: {e.code} {e.message!r} {e.data!r}")
                caps = json.loads(rt.daemon_call("capabilities.list", "{}"))
                if caps.get("server") != "car-twisted" or 3 not in caps["protocol_versions"]:
                    failures.append(f"t{i}: capabilities.list {caps!r}")
                hs = json.loads(rt.daemon_call("server.handshake", json.dumps(HANDSHAKE_V3)))
                if hs.get("protocol_version") != 3:
                    failures.append(f"t{i}: server.handshake {hs!r}")
        except Exception as e:  # pragma: no cover - reported below
            failures.append(f"t{i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "threads hung"
    assert failures == []
    assert rt.connection_epoch() == 1, "all calls should share one connection"


# -- reconnect ------------------------------------------------------------


@pytest.mark.interop
def test_reconnect_after_disconnect_and_close(daemon, client_env):
    client_env(daemon)
    rt = car_runtime.CarRuntime()
    assert call(rt, "capabilities.list")["auth_enabled"] is True
    assert rt.connection_epoch() == 1

    rt.disconnect()
    # The new connection re-authenticated and re-negotiated protocol 3.
    assert 3 in call(rt, "capabilities.list")["protocol_versions"]
    assert rt.connection_epoch() == 2
    assert call(rt, "server.handshake", HANDSHAKE_V3)["protocol_version"] == 3

    rt.close()
    assert rpc_error(rt, "nope.after_close").code == -32601
    assert rt.connection_epoch() == 3
    assert call(rt, "server.schema")["methods"]


# -- host-token connection -------------------------------------------------


@pytest.mark.interop
def test_host_token_connection(daemon, client_env):
    """
    None of the daemon's methods is on the client's host-management list,
    so the client refuses to send them with the host token.  A listed
    method still opens a host-token connection (session.auth host_token +
    handshake): a JSON-RPC -32601 (not a RuntimeError) shows the daemon
    accepted the host token and negotiated the connection.
    """
    client_env(daemon)
    rt = car_runtime.CarRuntime()
    host = car_runtime.HostClient(rt)
    for m in ("capabilities.list", "server.schema", "server.handshake", "session.auth"):
        with pytest.raises(RuntimeError, match="not a host-management method"):
            rt.daemon_call_host_management(m, "{}")

    with pytest.raises(car_runtime.DaemonRpcError) as info:
        host.auth_status("{}")
    assert info.value.code == -32601
    assert info.value.message.startswith("method not found: auth.status")

    # A wrong host token fails authentication on that connection.
    good = daemon.host_token_file.read_text()
    daemon.host_token_file.write_text("y" * len(good.strip()) + "\n")
    try:
        with pytest.raises(RuntimeError) as info2:
            rt.daemon_call_host_management("auth.status", "{}")
        assert not isinstance(info2.value, car_runtime.DaemonRpcError)
        assert "session.auth" in str(info2.value)
    finally:
        daemon.host_token_file.write_text(good)
    # The operator connection was never involved.
    assert call(rt, "capabilities.list")["auth_enabled"] is True
    assert rt.connection_epoch() == 1


# -- no token -------------------------------------------------------------


@pytest.mark.interop
def test_no_auth_daemon_without_token_file(start_daemon, client_env):
    d = start_daemon(no_auth=True)
    assert not d.auth_token_file.exists()
    client_env(d)
    rt = car_runtime.CarRuntime()
    caps = call(rt, "capabilities.list")
    assert caps["auth_enabled"] is False
    assert 3 in caps["protocol_versions"]
    assert call(rt, "server.handshake", HANDSHAKE_V3)["protocol_version"] == 3
    rt.disconnect()
    assert call(rt, "server.schema")["methods"]
    assert rt.connection_epoch() == 2
    # No token was found, so the client never sent session.auth (the
    # daemon logs each one, successful or not; its log is flushed per line).
    log = d.log()
    assert "authenticated" not in log and "failed session.auth" not in log


@pytest.mark.interop
def test_auth_daemon_refuses_client_without_token(daemon, client_env):
    """The contrast to the test above: with auth on, no token is no entry."""
    client_env(daemon)
    good = daemon.auth_token_file.read_text()
    daemon.auth_token_file.unlink()
    try:
        rt = car_runtime.CarRuntime()
        with pytest.raises(RuntimeError) as info:
            rt.daemon_call("capabilities.list", "{}")
        assert not isinstance(info.value, car_runtime.DaemonRpcError)
        assert "-32001" in str(info.value)
    finally:
        daemon.auth_token_file.write_text(good)
        os.chmod(daemon.auth_token_file, 0o600)
