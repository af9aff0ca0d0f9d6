"""
Agents run in their own process groups: a stop reaches what the agent
started, and neither ``agents.stop`` nor daemon shutdown waits for a
grandchild that keeps the agent's stdout open.  Real processes, the real
daemon on loopback.
"""

import os
import signal
import subprocess
import sys

import pytest_twisted
from twisted.internet import defer

from car_twisted.agents.process import wrapper_argv
from support import HOST_TOKEN, start_server, until

PYTHON = os.path.realpath(sys.executable)
SH = "/bin/sh"  # root-owned: passes the command ownership rule
LINGER = "sleep 45 & wait"
# A generous bound for a stop that should take well under a second.
PROMPT_SECS = 10.0
# What is awaited here (a grandchild starting, a process group gone) lives
# in other processes and is read from /proc: polled with ``until``.


def _processes():
    """(pid, state, ppid, pgid) of every process, from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(entry), fields[0], int(fields[1]), int(fields[2])


def group_members(pgid):
    """Pids in process group C{pgid} that are not zombies."""
    return [pid for pid, state, _, group in _processes() if group == pgid and state != "Z"]


def children(pid):
    return [child for child, state, ppid, _ in _processes() if ppid == pid and state != "Z"]


def group_gone(pgid):
    """
    No process of group C{pgid} is left.  A zombie an orphaned grandchild
    leaves behind is init's to reap; some container inits never do, so a
    group holding only zombies counts as gone.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return not group_members(pgid)


def bounded(reactor, d, secs, what):
    def expired(failure):
        failure.trap(defer.TimeoutError)
        raise AssertionError(f"{what} did not answer within {secs:g}s")

    return d.addTimeout(secs, reactor).addErrback(expired)


class Host:
    def __init__(self, reactor, client):
        self.reactor, self.client = reactor, client

    async def call(self, method, params=None, secs=PROMPT_SECS + 5):
        reply = await bounded(self.reactor, self.client.send(method, params), secs, method)
        assert "result" in reply, reply
        return reply["result"]


async def host(reactor, server):
    client = await server.client("tcp")
    reply = await client.call("session.auth", {"host_token": HOST_TOKEN}, rid=0)
    assert reply["result"]["role"] == "host", reply
    return Host(reactor, client)


async def start_lingering(reactor, h, agent_id, script=LINGER):
    await h.call("agents.upsert", {"id": agent_id, "command": SH, "args": ["-c", script], "restart": "never"})
    await h.call("agents.start", {"id": agent_id})
    running = await h.call("agents.wait", {"id": agent_id, "targets": ["running"], "timeout_secs": 10})
    pgid = running["pid"]
    await until(reactor, lambda: children(pgid), f"{agent_id}'s grandchild to start")
    return pgid


def cleanup(pgids):
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


def test_wrapper_makes_the_command_a_group_leader():
    """Exec keeps the pid: the spawned pid is the command's pid, group id and session id."""
    argv = wrapper_argv(sys.executable, PYTHON, ["-c", "import os; print(os.getpid(), os.getpgid(0), os.getsid(0))"])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert [int(x) for x in out.split()] == [proc.pid] * 3


def test_wrapper_exec_failure_is_one_line_on_stderr():
    proc = subprocess.run(
        wrapper_argv(sys.executable, "/nonexistent/agent", ["x"]), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 127
    assert proc.stderr == "cannot exec /nonexistent/agent: No such file or directory\n"


def test_wrapper_ignores_the_agents_python_variables(tmp_path):
    """-I -S: PYTHON* variables meant for the agent run nothing in the wrapper."""
    (tmp_path / "sitecustomize.py").write_text("print('wrapper hijacked')\n")
    (tmp_path / "startup.py").write_text("print('wrapper hijacked')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONSTARTUP": str(tmp_path / "startup.py")}
    proc = subprocess.run(wrapper_argv(sys.executable, "/bin/echo", ["agent ran"]), env=env, capture_output=True, text=True, timeout=30)
    assert proc.stdout == "agent ran\n" and proc.returncode == 0


@pytest_twisted.ensureDeferred
async def test_kill_stop_does_not_wait_for_a_grandchild(reactor, tmp_path):
    """`sh -c "sleep 45 & wait"` stopped with signal kill: prompt answer, nothing of the group left."""
    server = await start_server(reactor, tmp_path, agent_stop_grace=1.0)
    pgids = []
    try:
        h = await host(reactor, server)
        pgid = await start_lingering(reactor, h, "linger")
        pgids.append(pgid)
        before = reactor.seconds()
        stopped = await h.call("agents.stop", {"id": "linger", "signal": "kill"}, secs=PROMPT_SECS)
        assert reactor.seconds() - before < PROMPT_SECS
        assert stopped["status"] == "stopped" and stopped["pid"] is None and stopped["last_exit_code"] == -9
        await until(reactor, lambda: group_gone(pgid), "the agent's process group to be gone", timeout=PROMPT_SECS)
        [listed] = await h.call("agents.list", {})
        assert listed["status"] == "stopped" and listed["pid"] is None
        # The pipes were let go: the agent starts again at once.
        await h.call("agents.start", {"id": "linger"})
        again = await h.call("agents.wait", {"id": "linger", "targets": ["running"], "timeout_secs": 10})
        pgids.append(again["pid"])
        await h.call("agents.stop", {"id": "linger"}, secs=PROMPT_SECS)
        await until(reactor, lambda: group_gone(again["pid"]), "the second group to be gone", timeout=PROMPT_SECS)
        h.client.drop()
    finally:
        cleanup(pgids)
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_term_stop_reaches_the_grandchild(reactor, tmp_path):
    server = await start_server(reactor, tmp_path, agent_stop_grace=30.0)
    pgids = []
    try:
        h = await host(reactor, server)
        pgid = await start_lingering(reactor, h, "linger")
        pgids.append(pgid)
        before = reactor.seconds()
        stopped = await h.call("agents.stop", {"id": "linger"}, secs=PROMPT_SECS)
        # Well inside the 30 s grace: SIGTERM reached the sleep too.
        assert reactor.seconds() - before < PROMPT_SECS
        assert stopped["status"] == "stopped" and stopped["last_exit_code"] == -signal.SIGTERM
        await until(reactor, lambda: group_gone(pgid), "the agent's process group to be gone", timeout=PROMPT_SECS)
        h.client.drop()
    finally:
        cleanup(pgids)
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_shutdown_finishes_within_the_grace(reactor, tmp_path):
    """Daemon shutdown with lingering agents running (one ignores SIGTERM) ends within the grace."""
    grace = 1.0
    server = await start_server(reactor, tmp_path, agent_stop_grace=grace)
    pgids = []
    stopped = False
    try:
        h = await host(reactor, server)
        pgids.append(await start_lingering(reactor, h, "linger"))
        pgids.append(await start_lingering(reactor, h, "deaf", "trap '' TERM; sleep 45 & wait"))
        h.client.drop()
        before = reactor.seconds()
        await bounded(reactor, defer.ensureDeferred(server.stop()), grace + 1.0 + 5.0, "daemon shutdown")
        stopped = True
        assert reactor.seconds() - before < grace + 1.0 + 5.0
        for pgid in pgids:
            await until(reactor, lambda: group_gone(pgid), f"process group {pgid} to be gone", timeout=PROMPT_SECS)
        assert {a["id"]: a["status"] for a in server.state.agents.list()} == {"deaf": "stopped", "linger": "stopped"}
        assert {a["id"]: a["last_exit_code"] for a in server.state.agents.list()} == {"deaf": -9, "linger": -15}
    finally:
        cleanup(pgids)
        if not stopped:
            await server.stop()
