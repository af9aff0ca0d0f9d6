"""
What the dashboard's browser tests drive: a real ``twist car`` process on
a fresh state root, headless Chromium through Selenium, and plain blocking
WebSocket clients (``websockets.sync``) standing in for agents, hosts and
callers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENTS = REPO / "tests" / "agents"
# The real interpreter: a venv's python may live under a world-writable
# directory, which the supervisor rightly refuses to run.
PYTHON = os.path.realpath(sys.executable)
CHROMIUM = os.environ.get("CAR_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CAR_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
#: Figures the load test measured, for the terminal summary (conftest.py).
TIMINGS: list[str] = []
LOGIN_URL = re.compile(r"dashboard: (http://127\.0\.0\.1:(\d+)/login\?code=([A-Za-z0-9_-]+))")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_chromium() -> None:
    """Skip without Chromium locally; in CI (CI=true) a missing browser is a failure."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if not missing:
        return
    why = f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver)"
    if in_ci():
        pytest.fail(f"the browser tests need Chromium in CI: {why}", pytrace=False)
    pytest.skip(why)


def artifacts_dir() -> Path:
    """Where screenshots go: $CAR_TEST_ARTIFACTS, else artifacts/dashboard/ in the repository."""
    given = os.environ.get("CAR_TEST_ARTIFACTS")
    path = Path(given) if given else REPO / "artifacts" / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "a condition", every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


# -- ports and the daemon --------------------------------------------------------------


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def free_pair() -> int:
    """A free loopback port whose successor (the dashboard's) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535 and not _port_open(port + 1):
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no free pair of ports")


def new_home(base: Path) -> Path:
    home = base / "car-home"
    home.mkdir(mode=0o700)
    os.chmod(home, 0o700)
    return home


def agent_spec(agent_id: str, script: str | None = None, *args: str, **fields: Any) -> dict[str, Any]:
    """A manifest entry (with its token) running one of tests/agents/, or a plain python command."""
    argv = [str(AGENTS / script), *args] if script else list(args)
    return {"id": agent_id, "name": agent_id, "command": PYTHON, "args": argv, "token": secrets.token_urlsafe(32), **fields}


def write_manifest(home: Path, agents: list[dict[str, Any]]) -> None:
    path = home / "agents.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": 1, "agents": agents}, f)


class Daemon:
    """``twist car --port P`` on a fresh CAR_HOME: the dashboard on P + 1."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        self.port = free_pair()
        self.log = home.parent / f"daemon-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
        env["CAR_HOME"] = str(home)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "twisted", "--log-format=text", "car", "--port", str(self.port), *args],
            env=env,
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
        )
        found = wait_until(lambda: self._alive() and LOGIN_URL.search(self.output()), 30, "the logged login URL")
        self.login_url, http_port, self.first_code = found.groups()
        self.http_port = int(http_port)
        assert self.http_port == self.port + 1
        self.origin = f"http://127.0.0.1:{self.http_port}"
        wait_until(lambda: self._alive() and _port_open(self.port), 30, "the WebSocket listener")

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        return True

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def secret(self, name: str) -> str:
        return (self.home / "ai.parslee.car" / name).read_text().strip()

    def next_login_url(self) -> str:
        """A login URL with the code the daemon holds now (the dashboard-code file)."""
        return f"{self.origin}/login?code={self.secret('dashboard-code')}"

    def client(self, **auth: Any) -> RpcClient:
        """A blocking client: the host (default), ``daemon`` token, or an agent ``agent=(id, token)``."""
        return RpcClient(self, **auth)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.code = error.get("code")
        self.error = error


class RpcClient:
    """
    One blocking WebSocket connection to the daemon: a reader thread files
    replies by id and notifications in a queue.
    """

    def __init__(self, daemon: Daemon, role: str = "host", agent: tuple[str, str] | None = None) -> None:
        from websockets.sync.client import connect

        # Entered as a context manager (the way every websockets 12-17 expects), closed by close().
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(
            connect(f"ws://127.0.0.1:{daemon.port}/", open_timeout=10, max_size=64 * 1024 * 1024)
        )
        self.ids = itertools.count(1)
        self.replies: dict[Any, dict[str, Any]] = {}
        self.cond = threading.Condition()
        self.notifications: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if agent is not None:
            auth = {"agent_id": agent[0], "token": agent[1]}
        elif role == "host":
            auth = {"host_token": daemon.secret("host-token")}
        else:
            auth = {"token": daemon.secret("auth-token")}
        self.call("session.auth", auth)
        self.call("server.handshake", {"protocol_version": 3})

    def _read(self) -> None:
        try:
            for frame in self.ws:
                if isinstance(frame, bytes):
                    continue
                message = json.loads(frame)
                if "method" in message and "id" not in message:
                    self.notifications.put(message)
                    continue
                with self.cond:
                    self.replies[message.get("id")] = message
                    self.cond.notify_all()
        except Exception:  # the connection closed under us
            pass

    def send(self, method: str, params: Any = None) -> int:
        rid = next(self.ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            message["params"] = params
        self.ws.send(json.dumps(message))
        return rid

    def reply(self, rid: int, timeout: float = 30.0) -> dict[str, Any]:
        with self.cond:
            if not self.cond.wait_for(lambda: rid in self.replies, timeout):
                raise AssertionError(f"no reply to request {rid} within {timeout:g}s")
            return self.replies.pop(rid)

    def answered(self, rid: int) -> bool:
        with self.cond:
            return rid in self.replies

    def result(self, rid: int, timeout: float = 30.0) -> Any:
        reply = self.reply(rid, timeout)
        if "error" in reply:
            raise RpcError(reply["error"])
        return reply["result"]

    def call(self, method: str, params: Any = None, timeout: float = 30.0) -> Any:
        return self.result(self.send(method, params), timeout)

    def notification(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for a notification")
            try:
                message = self.notifications.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(message):
                return message

    def close(self) -> None:
        self._stack.close()


# -- the browser -------------------------------------------------------------------------


class Browser:
    """Headless Chromium with a fresh profile, driven by Selenium."""

    def __init__(self, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)
        self.driver.set_script_timeout(30)
        self.profile = profile

    def get(self, url: str) -> None:
        self.driver.get(url)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, predicate: Callable[[], Any], timeout: float = 15.0, what: str = "the page") -> Any:
        return wait_until(predicate, timeout, what)

    def text(self, selector: str) -> str | None:
        return self.js("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", selector)

    def count(self, selector: str) -> int:
        return int(self.js("return document.querySelectorAll(arguments[0]).length;", selector))

    def click(self, selector: str) -> None:
        """Click the element C{selector} finds (found again if the page redrew it meanwhile)."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        for attempt in range(5):
            try:
                self.driver.find_element(By.CSS_SELECTOR, selector).click()
                return
            except StaleElementReferenceException:
                if attempt == 4:
                    raise
                time.sleep(0.05)

    def tab(self, view: str) -> None:
        self.click(f'#tabs button[data-view="{view}"]')
        self.wait(lambda: self.js(f'return !document.getElementById("view-{view}").hidden;'), 5, f"the {view} view")

    def screenshot(self, name: str) -> Path:
        path = artifacts_dir() / f"{name}.png"
        self.js("window.scrollTo(0, 0);")
        self.driver.save_screenshot(str(path))
        return path

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
