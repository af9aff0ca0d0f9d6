"""
What every hostile scenario shares: a real ``twist car`` process, its RSS,
the well-behaved probe in a process of its own, a blocking raw-socket
WebSocket client for the attackers, and the phases the figures come from.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from support import client_frame, free_port, port_open

TWIST = [sys.executable, "-m", "twisted", "--log-format=text", "car"]
PROBE = Path(__file__).with_name("probe.py")
MiB = 1024 * 1024

# Probe p99 during an attack may be this many times its baseline p99, and
# never needs to be below the floor (these are bounds, not benchmarks).
P99_FACTOR = 20
P99_FLOOR_MS = 1000.0


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to C{wanted} (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_bytes(pid: int) -> int:
    """VmRSS of process C{pid}, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def wait_for(predicate: Any, what: str, timeout: float = 20.0, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Daemon:
    """A ``twist car`` process on a fresh state root and a loopback port."""

    def __init__(self, base: Path) -> None:
        self.home = base / "car-home"
        self.port = free_port()
        self.log = base / "daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                TWIST + ["--car-home", str(self.home), "--listen", f"tcp:{self.port}:interface=127.0.0.1"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        tokens = self.home / "ai.parslee.car"
        try:
            wait_for(
                lambda: port_open(self.port) and (tokens / "auth-token").exists() and (tokens / "host-token").exists(),
                "the daemon's port and token files",
                proc=self.proc,
            )
            wait_for(lambda: (tokens / "auth-token").read_text().strip() != "", "the token", proc=self.proc)
        except BaseException:
            self.stop()
            raise
        self.token = (tokens / "auth-token").read_text().strip()
        self.host_token = (tokens / "host-token").read_text().strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        self.assert_alive()
        return rss_bytes(self.pid)

    def assert_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int | None:
        """SIGTERM, then wait up to 15 s (SIGKILL after that)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
                raise AssertionError("the daemon did not stop within 15 s of SIGTERM")
        return self.proc.returncode


class RssWatch:
    """Samples a process's RSS every few milliseconds and keeps the peak."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid = pid
        self.every = every
        self.before = self.peak = rss_bytes(pid)
        self.after = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, AssertionError):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.after = rss_bytes(self.pid)
        except (OSError, AssertionError):
            self.after = self.peak
        self.peak = max(self.peak, self.after)

    @property
    def growth(self) -> int:
        return self.peak - self.before


class Probe:
    """The well-behaved client (``probe.py``) in its own process."""

    def __init__(self, daemon: Daemon) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PROBE), str(daemon.port), daemon.token, "600"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=15)
            raise AssertionError(f"the probe did not start: {line!r} {err.decode(errors='replace')[-2000:]}")

    def finish(self) -> dict[str, Any]:
        """Stop the loop and return its figures."""
        out, err = self.proc.communicate(input=b"", timeout=30)
        lines = out.decode().strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            raise AssertionError(f"the probe failed ({self.proc.returncode}): {err.decode(errors='replace')[-2000:]}")
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Phase:
    """
    A stretch of time with the probe running and the daemon's RSS sampled:
    ``with Phase(daemon, seconds) as phase: <attack>``; the phase lasts at
    least C{seconds}.  Afterwards ``probe`` holds the probe's figures and
    ``rss`` the RSS before, peak and after.
    """

    def __init__(self, daemon: Daemon, seconds: float) -> None:
        self.daemon = daemon
        self.seconds = seconds
        self.probe: dict[str, Any] = {}
        self.rss: RssWatch | None = None
        self.elapsed = 0.0

    def __enter__(self) -> "Phase":
        self._probe = Probe(self.daemon)
        self.rss = RssWatch(self.daemon.pid)
        self.started = time.monotonic()
        return self

    def remaining(self) -> float:
        return self.started + self.seconds - time.monotonic()

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                left = self.remaining()
                if left > 0:
                    time.sleep(left)
            self.elapsed = time.monotonic() - self.started
            self.rss.stop()
            if exc[0] is None:
                self.probe = self._probe.finish()
        finally:
            self._probe.kill()


def baseline(daemon: Daemon, seconds: float = 2.0) -> Phase:
    """The probe alone against the daemon, no attack."""
    with Phase(daemon, seconds) as phase:
        pass
    return phase


def figures(name: str, base: Phase, attack: Phase, rss_limit: int, **counts: Any) -> dict[str, Any]:
    """One scenario's row for the report."""
    return {
        "scenario": name,
        "baseline": {k: base.probe.get(k) for k in ("count", "p50_ms", "p99_ms", "max_ms", "errors")},
        "attack": {k: attack.probe.get(k) for k in ("count", "p50_ms", "p99_ms", "max_ms", "errors")},
        "attack_seconds": round(attack.elapsed, 2),
        "p99_limit_ms": p99_limit(base),
        "rss_before_mib": round(attack.rss.before / MiB, 1),
        "rss_peak_mib": round(attack.rss.peak / MiB, 1),
        "rss_after_mib": round(attack.rss.after / MiB, 1),
        "rss_growth_mib": round(attack.rss.growth / MiB, 1),
        "rss_limit_mib": round(rss_limit / MiB, 1),
        "probe_errors": (base.probe.get("error_samples") or []) + (attack.probe.get("error_samples") or []),
        "counts": counts,
    }


def p99_limit(base: Phase) -> float:
    return max(P99_FLOOR_MS, P99_FACTOR * float(base.probe["p99_ms"]))


def assert_bounded(row: dict[str, Any]) -> None:
    """The probe saw no errors and kept its p99; the daemon's RSS stayed under the scenario's bound."""
    assert row["baseline"]["errors"] == 0 and row["attack"]["errors"] == 0, row["probe_errors"]
    assert row["attack"]["count"] > 0, row
    assert row["attack"]["p99_ms"] <= row["p99_limit_ms"], row
    assert row["rss_growth_mib"] <= row["rss_limit_mib"], row


# -- a blocking raw-socket WebSocket client for the attackers ----------------------


class Closed(Exception):
    """The daemon closed the connection (C{code} from its Close frame, if any)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed by the daemon (code {code})")
        self.code = code


def upgrade_request(key: str | None = None) -> bytes:
    key = key or base64.b64encode(os.urandom(16)).decode()
    return (
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def request(rid: Any, method: str, params: Any = None) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg).encode()


def split_frame(buf: bytes) -> tuple[int, bytes, bytes] | None:
    """The first whole server frame in C{buf} as (opcode, payload, rest), or None."""
    if len(buf) < 2:
        return None
    n, pos = buf[1] & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, pos = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, pos = struct.unpack("!Q", buf[2:10])[0], 10
    if len(buf) < pos + n:
        return None
    return buf[0] & 0x0F, buf[pos : pos + n], buf[pos + n :]


class Ws:
    """One raw WebSocket connection, blocking, masked with a zero key."""

    def __init__(
        self,
        port: int,
        *,
        source: str | None = None,
        rcvbuf: int | None = None,
        timeout: float = 15.0,
        upgrade: bool = True,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source is not None:
                self.sock.bind((source, 0))
            self.sock.settimeout(timeout)
            self.sock.connect(("127.0.0.1", port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.sock.close()
            raise
        self.buf = b""
        self.next_id = 100
        self.early: dict[Any, dict[str, Any]] = {}
        if upgrade:
            self.upgrade()

    def upgrade(self) -> None:
        self.sock.sendall(upgrade_request())
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise AssertionError(f"upgrade refused: {head[:200]!r}")

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise Closed(None)
        self.buf += data

    def frame(self) -> tuple[int, bytes]:
        """The next frame from the daemon: (opcode, payload)."""
        while True:
            got = split_frame(self.buf)
            if got is not None:
                opcode, payload, self.buf = got
                return opcode, payload
            self._fill()

    def message(self) -> dict[str, Any]:
        """The next JSON-RPC message; a Close raises C{Closed}."""
        while True:
            opcode, payload = self.frame()
            if opcode == 1:
                return json.loads(payload)
            if opcode == 8:
                raise Closed(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None)
            if opcode == 9:
                self.sock.sendall(client_frame(payload, opcode=10))

    def send(self, method: str, params: Any = None, rid: Any = None) -> Any:
        if rid is None:
            self.next_id += 1
            rid = self.next_id
        self.sock.sendall(client_frame(request(rid, method, params)))
        return rid

    def reply(self, rid: Any) -> dict[str, Any]:
        """The reply to request C{rid}; replies to others that arrive first are kept for later."""
        while rid not in self.early:
            msg = self.message()
            self.early[msg.get("id")] = msg
        return self.early.pop(rid)

    def call(self, method: str, params: Any = None) -> dict[str, Any]:
        """The whole reply (``result`` or ``error``)."""
        return self.reply(self.send(method, params))

    def result(self, method: str, params: Any = None) -> Any:
        reply = self.call(method, params)
        if "error" in reply:
            raise AssertionError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def authenticate(self, token: str, handshake: bool = True) -> None:
        assert self.result("session.auth", {"token": token})["ok"]
        if handshake:
            self.result(
                "server.handshake",
                {"protocol_version": 3, "client_version": "hostile", "required_capabilities": []},
            )

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def authenticated(daemon: Daemon, **kw: Any) -> Ws:
    ws = Ws(daemon.port, **kw)
    ws.authenticate(daemon.token)
    return ws


def peer_state(sock: socket.socket) -> str:
    """
    "open" while the daemon has neither closed nor reset the connection
    (nothing is consumed: the check peeks without waiting), else "closed".
    """
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        data = sock.recv(16, socket.MSG_PEEK)
    except BlockingIOError:
        return "open"
    except OSError:
        return "closed"
    finally:
        sock.settimeout(timeout)
    if not data:
        return "closed"
    # Bytes are waiting: a Close frame (opcode 8) means the daemon is done with us.
    return "closed" if data[0] & 0x0F == 8 else "open"


TCP_STATES = {1: "ESTABLISHED", 7: "CLOSE", 8: "CLOSE_WAIT", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT", 11: "CLOSING", 9: "LAST_ACK"}


def tcp_state(sock: socket.socket) -> str:
    """The kernel's TCP state of C{sock} (TCP_INFO), read without touching its data."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return TCP_STATES.get(info[0], str(info[0]))
