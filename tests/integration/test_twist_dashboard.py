"""
``twist car``'s sibling HTTP endpoint as an operator meets it: the login URL
in the log and the code file beside the tokens, ``--http none``, ``--http
unix:…``, and a dashboard port already taken.
"""

import http.client
import os
import re
import socket
import stat
import subprocess

import pytest

from support import free_port, port_open
from test_twist_daemon import TWIST, Daemon, env_for, wait_for

URL = re.compile(r"dashboard: (http://127\.0\.0\.1:(\d+)/login\?code=([A-Za-z0-9_-]+))")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5)
        self.sock.connect(str(self.path))


def get(conn, path, host, headers=None):
    conn.request("GET", path, headers={"Host": host, **(headers or {})})
    response = conn.getresponse()
    return response, response.read()


@pytest.fixture
def home(tmp_path):
    return tmp_path / "car"


def free_pair():
    """A port whose successor is free too (the dashboard's)."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and not port_open(port + 1):
            return port
    raise AssertionError("no free pair of ports")


def test_the_login_url_is_logged_and_the_code_file_follows_it(home):
    port = free_pair()
    daemon = Daemon(home, port)
    try:
        wait_for(lambda: URL.search(daemon.output()), proc=daemon.proc)
        url, http_port, code = URL.search(daemon.output()).groups()
        assert int(http_port) == port + 1
        code_file = home / "ai.parslee.car" / "dashboard-code"
        assert code_file.read_text().strip() == code
        assert stat.S_IMODE(os.stat(code_file).st_mode) == 0o600
        host = f"127.0.0.1:{port + 1}"
        conn = http.client.HTTPConnection("127.0.0.1", port + 1, timeout=5)
        response, body = get(conn, "/health", host)
        assert response.status == 200 and b'"status":"ok"' in body
        response, _ = get(conn, f"/login?code={code}", host)
        assert response.status == 303
        cookie = response.getheader("set-cookie").split(";")[0]
        response, body = get(conn, "/auth-token", host, {"Cookie": cookie})
        assert response.status == 200
        assert body.decode() == (home / "ai.parslee.car" / "auth-token").read_text().strip()
        # The code is spent: the next URL is logged and written.
        wait_for(lambda: len(URL.findall(daemon.output())) == 2, proc=daemon.proc)
        next_code = URL.findall(daemon.output())[1][2]
        assert next_code != code and code_file.read_text().strip() == next_code
        response, _ = get(conn, f"/login?code={code}", host)
        assert response.status == 403
        conn.close()
    finally:
        assert daemon.stop()
    assert not (home / "ai.parslee.car" / "dashboard-code").exists()
    # No access log: the code never reached the log as part of a request line.
    assert "GET /login" not in daemon.output()


def test_http_none_serves_no_dashboard(home):
    port = free_pair()
    daemon = Daemon(home, port, "--http", "none")
    try:
        assert not port_open(port + 1)
        assert "dashboard:" not in daemon.output()
        assert not (home / "ai.parslee.car" / "dashboard-code").exists()
    finally:
        assert daemon.stop()


def test_http_on_a_unix_socket(home, tmp_path):
    port = free_pair()
    path = tmp_path / "dash" / "http.sock"
    daemon = Daemon(home, port, "--http", f"unix:{path}")
    try:
        wait_for(lambda: path.exists(), proc=daemon.proc)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert not port_open(port + 1)
        conn = UnixHTTPConnection(path)
        response, body = get(conn, "/health", "localhost")
        assert response.status == 200 and b'"status":"ok"' in body
        conn.close()
        conn = UnixHTTPConnection(path)
        response, _ = get(conn, "/health", "evil.example")
        assert response.status == 403
        conn.close()
    finally:
        assert daemon.stop()


def test_a_taken_dashboard_port_is_one_line_and_exit_1(home):
    port = free_pair()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port + 1))
    blocker.listen(1)
    try:
        result = subprocess.run(
            TWIST + ["car", "--port", str(port)], env=env_for(home), capture_output=True, timeout=30
        )
    finally:
        blocker.close()
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("twist car: ") and str(port + 1) in lines[0], lines
    assert b"Traceback" not in result.stdout + result.stderr
