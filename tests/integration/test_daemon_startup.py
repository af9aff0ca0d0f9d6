"""
``twist car`` start-up against what another local user, a crash or a busy
port leaves behind: a prepared state root is refused with one line and
exit 2; a daemon killed with -9 (still a zombie) does not block the next;
a port in use is one line and exit 1.  Never a traceback.
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

from car_twisted.endpoints import socket_answers
from support import free_port, port_open

TWIST = [sys.executable, "-m", "twisted", "--log-format=text", "car"]


def env_for(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
    env["CAR_HOME"] = str(home)
    return env


def run_to_exit(home, port, *args, timeout=60):
    return subprocess.run(TWIST + ["--port", str(port), *args], env=env_for(home), capture_output=True, timeout=timeout)


def one_clear_line(proc):
    err = proc.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("twist car: "), err
    assert "Traceback" not in err + proc.stdout.decode()
    return lines[0]


def prepared_root(base, owner, marker, mode=0o777):
    """What another user leaves for us: a root with an auto_start agent and a token they know."""
    home = base / "car-alt"
    home.mkdir()
    manifest = {
        "version": 1,
        "agents": [
            {
                "id": "planted",
                "name": "planted",
                "command": "/bin/sh",
                "args": ["-c", f"touch {marker}"],
                "auto_start": True,
                "token": "a-token-the-other-user-knows",
            }
        ],
    }
    (home / "agents.json").write_text(json.dumps(manifest))
    for path in (home, home / "agents.json"):
        os.chown(path, owner.pw_uid, owner.pw_gid)
    os.chmod(home, mode)
    return home


def test_state_root_prepared_by_another_user_is_refused(tmp_path, other_user):
    """Another user's 0777 CAR_HOME with an auto_start agent: exit 2, nothing run, nothing bound."""
    marker = tmp_path / "ran-as-the-daemon"
    home = prepared_root(tmp_path, other_user, marker)
    port = free_port()
    proc = run_to_exit(home, port)
    assert proc.returncode == 2
    line = one_clear_line(proc)
    assert str(home) in line and f"owned by uid {other_user.pw_uid}" in line
    assert not marker.exists() and not port_open(port)
    assert not (home / "ai.parslee.car").exists()


def test_world_writable_state_root_of_our_own_is_refused(tmp_path):
    home = tmp_path / "car-home"
    home.mkdir()
    os.chmod(home, 0o777)
    proc = run_to_exit(home, free_port())
    assert proc.returncode == 2
    assert "writable by group or others (mode 0777)" in one_clear_line(proc)


def test_foreign_manifest_in_our_root_is_refused(tmp_path, other_user):
    marker = tmp_path / "ran"
    home = prepared_root(tmp_path, other_user, marker, mode=0o700)
    os.chown(home, os.geteuid(), os.getegid())
    proc = run_to_exit(home, free_port())
    assert proc.returncode == 2
    assert f"agents.json is owned by uid {other_user.pw_uid}" in one_clear_line(proc)
    assert not marker.exists()


def test_lock_file_planted_as_a_symlink_is_not_followed(tmp_path):
    """run/daemon.lock as a symlink to a victim: refused, and the victim is not truncated."""
    victim = tmp_path / "victim"
    victim.write_text("precious data\n")
    home = tmp_path / "car-home"
    (home / "run").mkdir(parents=True, mode=0o700)
    os.chmod(home, 0o700)
    (home / "run" / "daemon.lock").symlink_to(victim)
    proc = run_to_exit(home, free_port())
    assert proc.returncode == 2
    assert "daemon.lock is a symbolic link" in one_clear_line(proc)
    assert victim.read_text() == "precious data\n"


def test_created_directories_are_0700(tmp_path):
    """The state root and everything the daemon makes in it are 0700 at every level."""
    home = tmp_path / "new" / "nested" / "car-home"
    port = free_port()
    old = os.umask(0o022)
    try:
        proc = subprocess.Popen(TWIST + ["--port", str(port)], env=env_for(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        os.umask(old)
    try:
        # The daemon is a subprocess: polled until it listens.
        deadline = time.monotonic() + 20
        while not port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        for path in (tmp_path / "new", tmp_path / "new" / "nested", home, home / "run", home / "ai.parslee.car"):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def test_restart_right_after_kill_9(tmp_path):
    """A daemon killed with -9 and not yet reaped (a zombie) leaves nothing that stops the next one."""
    home = tmp_path / "car-home"
    sock = home / "run" / "car-server.sock"
    first_port, second_port = free_port(), free_port()
    first = subprocess.Popen(TWIST + ["--port", str(first_port)], env=env_for(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The daemons are subprocesses: each is polled until it listens.
        deadline = time.monotonic() + 20
        while not (port_open(first_port) and sock.exists()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        time.sleep(0.2)  # dead, but a zombie until we reap it below
        with open(f"/proc/{first.pid}/stat") as f:
            assert f.read().split(") ")[1].startswith("Z")
        log = tmp_path / "second.log"
        second = subprocess.Popen(
            TWIST + ["--port", str(second_port)], env=env_for(home), stdout=open(log, "wb"), stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 20
            while not port_open(second_port):
                assert second.poll() is None, log.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # The shared socket becomes the new daemon's (bound just after
            # TCP); wait for the reactor too, so SIGTERM finds its handler.
            while not (socket_answers(sock) and b"Starting reactor" in log.read_bytes()):
                assert second.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            assert "primary daemon" in log.read_text()
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=15)
    finally:
        first.wait(timeout=15)


def test_port_in_use_is_one_line_and_exit_1(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        proc = run_to_exit(tmp_path / "car-home", busy.getsockname()[1])
    finally:
        busy.close()
    assert proc.returncode == 1
    assert "Address already in use" in one_clear_line(proc)
    assert not (tmp_path / "car-home" / "ai.parslee.car" / "auth-token").exists()
