"""
``twist car`` as an operator runs it: a real process, its token files, a
graceful stop, and a second daemon on the same state root.
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from support import free_port, port_open

TWIST = [sys.executable, "-m", "twisted"]


def env_for(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
    env["CAR_HOME"] = str(home)
    return env


def wait_for(predicate, timeout=15.0, proc=None):
    """Poll C{predicate}: what it reads (a port, a file) belongs to a daemon subprocess."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError("timed out")


class Daemon:
    def __init__(self, home, port, *args, log=None):
        self.home, self.port = home, port
        self.log = log or home.parent / f"daemon-{port}.log"
        self.proc = subprocess.Popen(
            TWIST + ["--log-format=text", "car", "--port", str(port), *args],
            env=env_for(home),
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
        )
        # Signal handlers are installed once the reactor runs: wait for that.
        wait_for(lambda: b"Starting reactor" in self.log.read_bytes(), proc=self.proc)
        wait_for(lambda: port_open(port), proc=self.proc)

    def stop(self):
        """SIGTERM; True for a graceful stop (twist re-raises the signal after it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)
        return self.proc.returncode in (0, -signal.SIGTERM) and "Main loop terminated" in self.output()

    def output(self):
        return self.log.read_text()


def ws_call(port, frames, sock_path=None):
    """A tiny blocking WebSocket client (stdlib only) for a process under test."""
    import base64
    import struct

    if sock_path:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
    else:
        s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(5)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    assert b" 101 " in buf.split(b"\r\n")[0]
    buf = buf.split(b"\r\n\r\n", 1)[1]
    replies = []
    for frame in frames:
        payload = json.dumps(frame).encode()
        mask = os.urandom(4)
        header = bytes((0x81, 0x80 | len(payload))) if len(payload) < 126 else bytes((0x81, 0xFE)) + struct.pack("!H", len(payload))
        s.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            if len(buf) >= 2:
                n = buf[1] & 0x7F
                off = 2
                if n == 126:
                    n, off = struct.unpack("!H", buf[2:4])[0], 4
                if len(buf) >= off + n:
                    replies.append(json.loads(buf[off : off + n]))
                    buf = buf[off + n :]
                    break
            buf += s.recv(65536)
    s.close()
    return replies


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def test_daemon_publishes_and_removes_tokens(home):
    """Token files are 0600 in a 0700 directory, work on TCP and UNIX, and go on SIGTERM."""
    port = free_port()
    d = Daemon(home, port)
    try:
        token_file = home / "ai.parslee.car" / "auth-token"
        host_file = home / "ai.parslee.car" / "host-token"
        sock = home / "run" / "car-server.sock"
        wait_for(lambda: token_file.exists() and sock.exists(), proc=d.proc)
        for f in (token_file, host_file):
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(token_file.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) == 43 and token != host_file.read_text().strip()
        for sock_path in (None, sock):
            auth, hs = ws_call(
                port,
                [
                    {"jsonrpc": "2.0", "id": 0, "method": "session.auth", "params": {"token": token}},
                    {"jsonrpc": "2.0", "id": 2, "method": "server.handshake", "params": {"protocol_version": 3}},
                ],
                sock_path=sock_path,
            )
            assert auth["result"]["ok"] and hs["result"]["protocol_version"] == 3
        out = d.output()
        assert f"tcp:{port}:interface=127.0.0.1" in out and str(sock) in out and str(token_file) in out
        assert token not in out
    finally:
        assert d.stop()
    assert not token_file.exists() and not host_file.exists() and not sock.exists()


def test_second_daemon_leaves_the_first_alone(home):
    """A secondary on the same CAR_HOME keeps the primary's token file and socket."""
    p1, p2 = free_port(), free_port()
    first = Daemon(home, p1)
    token_file = home / "ai.parslee.car" / "auth-token"
    shared = home / "run" / "car-server.sock"
    try:
        wait_for(lambda: token_file.exists() and shared.exists(), proc=first.proc)
        token = token_file.read_text()
        second = Daemon(home, p2, "--auth-token", "pinned-secondary-token")
        secondary_sock = home / "run" / f"car-server-{p2}.sock"
        try:
            wait_for(lambda: secondary_sock.exists(), proc=second.proc)
            assert token_file.read_text() == token
            (auth,) = ws_call(
                p2,
                [{"jsonrpc": "2.0", "id": 0, "method": "session.auth", "params": {"token": "pinned-secondary-token"}}],
                sock_path=secondary_sock,
            )
            assert auth["result"]["ok"]
            out = second.output()
            assert "not writing the token files" in out and f"car-server-{p2}.sock" in out
        finally:
            assert second.stop()
        assert token_file.read_text() == token and shared.exists()
        (auth,) = ws_call(
            p1, [{"jsonrpc": "2.0", "id": 0, "method": "session.auth", "params": {"token": token.strip()}}], sock_path=shared
        )
        assert auth["result"]["ok"]
    finally:
        first.stop()
    assert not token_file.exists()


def test_stale_socket_is_replaced(home):
    """A socket file left by a crashed daemon does not stop the next one."""
    sock = home / "run" / "car-server.sock"
    sock.parent.mkdir(parents=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()
    assert sock.exists()
    d = Daemon(home, free_port())
    try:
        wait_for(lambda: (home / "ai.parslee.car" / "auth-token").exists(), proc=d.proc)
        assert "removed stale socket" in d.output()
    finally:
        assert d.stop()


def test_relative_car_home_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
    env["CAR_HOME"] = "relative/state"
    proc = subprocess.run(TWIST + ["car"], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert b"'relative/state'" in proc.stderr


def test_help_lists_options():
    proc = subprocess.run(TWIST + ["car", "--help"], capture_output=True, timeout=60)
    assert proc.returncode == 0
    for flag in (b"--listen", b"--no-auth", b"--auth-token", b"--car-home", b"--port"):
        assert flag in proc.stdout
