"""The supervisor on a fake process reactor and a Clock."""

import json
import os
import shutil
import signal as signals
import stat
import sys
import tempfile
from pathlib import Path

import pytest
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from car_twisted.agents.logs import tail
from car_twisted.agents.manifest import parse_agent_spec, validate_command
from car_twisted.agents.process import EXEC_WRAPPER
from car_twisted.agents.supervisor import Supervisor
from car_twisted.errors import AgentAlreadyAttached, InvalidParams, RpcError
from car_twisted.interfaces import IAgentIdentities

PYTHON = os.path.realpath(sys.executable)
# Above the largest pid Linux hands out (PID_MAX_LIMIT): a fake pid never
# names a real process, whatever happens to it.
FAKE_PID_BASE = 4_194_304 + 1000
SIGNAL_NAMES = {signals.SIGTERM: "TERM", signals.SIGKILL: "KILL"}


class FakeProcess:
    """
    A child as Twisted reports it: C{processExited} when it dies, then
    C{processEnded} once nothing holds its pipes any more.

    @ivar in_group: the wrapper has called setsid (killpg reaches it).
    @ivar group_members: grandchildren in its group hold its pipes.
    @ivar escaped: a grandchild outside its group holds its pipes.
    @ivar pipes: what the protocol may drain at exit (fd -> reader).
    """

    def __init__(self, reactor, protocol, pid):
        self.reactor, self.protocol, self.pid = reactor, protocol, pid
        self.pgid = pid
        self.signals = []
        self.alive = True
        self.stdin_closed = False
        self.in_group = True
        self.group_members = False
        self.escaped = False
        self.unkillable = False
        self.pipes = {}
        self.pipes_open = True
        self.lost = False
        self.reason = None

    def closeStdin(self):
        self.stdin_closed = True

    def signalProcess(self, name):
        if not self.alive:
            raise ProcessExitedAlready()
        self.signals.append(name)
        self.deliver(name)

    def deliver(self, name):
        if self.unkillable:
            return
        if name == "KILL" or (name == "TERM" and self.reactor.obey_term):
            self.die(signal=9 if name == "KILL" else 15)

    def die(self, code=None, signal=None):
        if not self.alive:
            return
        self.alive = False
        self.pid = None  # as Twisted does once the child is reaped
        if code == 0 and signal is None:
            self.reason = Failure(ProcessDone(0))
        else:
            self.reason = Failure(ProcessTerminated(exitCode=code, signal=signal))
        self.protocol.processExited(self.reason)
        self.maybe_end()

    def maybe_end(self):
        if self.pipes_open and not self.alive and not self.group_members and not self.escaped:
            self.close_pipes()

    def close_pipes(self):
        self.pipes_open = False
        self.protocol.outConnectionLost()
        self.protocol.errConnectionLost()
        self.protocol.processEnded(self.reason)

    def loseConnection(self):
        self.lost = True
        if self.pipes_open and not self.alive:
            self.close_pipes()


class FakeProcessReactor(Clock):
    """Clock plus a spawnProcess that records children, and a killpg for them."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.obey_term = True
        self._pid = FAKE_PID_BASE
        self.killpg_calls = []

    def spawnProcess(self, protocol, executable, args, env=None, path=None, **kw):
        self._pid += 1
        proc = FakeProcess(self, protocol, self._pid)
        self.spawned.append({"proc": proc, "executable": executable, "args": args, "env": env, "path": path})
        protocol.makeConnection(proc)
        return proc

    def killpg(self, pgid, sig):
        procs = [c["proc"] for c in self.spawned if c["proc"].pgid == pgid]
        proc = procs[-1] if procs else None
        reachable = proc is not None and proc.in_group and (proc.alive or proc.group_members)
        self.killpg_calls.append((pgid, SIGNAL_NAMES[sig], reachable))
        if not reachable:
            raise ProcessLookupError(3, "No such process")
        if sig == signals.SIGKILL and not proc.unkillable:
            proc.group_members = False
        if proc.alive:
            proc.deliver(SIGNAL_NAMES[sig])
        else:
            proc.maybe_end()


def group_signals(reactor, proc):
    """The signals that reached C{proc}'s process group."""
    return [name for pgid, name, reached in reactor.killpg_calls if pgid == proc.pgid and reached]


@pytest.fixture
def reactor():
    return FakeProcessReactor()


@pytest.fixture
def sup(reactor, tmp_path):
    s = Supervisor(
        reactor,
        tmp_path / "home",
        environ={"PATH": os.environ["PATH"], "CAR_AUTH_TOKEN": "daemon-secret"},
        stop_grace=10,
        killpg=reactor.killpg,
    )
    s.daemon_url = "ws://127.0.0.1:9100"
    s.load()
    return s


def supervisor(reactor, home, **kw):
    return Supervisor(reactor, home, environ={}, killpg=reactor.killpg, **kw)


def spec(**kw):
    raw = {"id": "a1", "command": PYTHON, "args": ["agent.py"], "backoff_secs": 1.0}
    raw.update(kw)
    return parse_agent_spec(raw, os.environ)


def last(reactor):
    return reactor.spawned[-1]["proc"]


def test_verify_identities(sup):
    verifyObject(IAgentIdentities, sup)


def test_spawn_env_and_token_secrecy(sup, reactor, tmp_path):
    """Children get the spec env plus their identity; the daemon's token stays out; nothing returns the agent token."""
    managed = sup.upsert(spec(env={"FOO": "bar"})).result
    token = sup._agents["a1"].entry.token
    assert token not in json.dumps(managed)
    out = sup.start("a1")
    child = reactor.spawned[0]
    # Through the exec wrapper: the daemon's interpreter, then the command.
    assert child["executable"] == sys.executable
    assert child["args"] == [sys.executable, "-I", "-S", "-c", EXEC_WRAPPER, PYTHON, "agent.py"]
    assert child["path"] is None
    env = child["env"]
    assert env["FOO"] == "bar" and env["CAR_AGENT_ID"] == "a1" and env["CAR_AGENT_TOKEN"] == token
    assert env["CAR_DAEMON_URL"] == "ws://127.0.0.1:9100" and "CAR_AUTH_TOKEN" not in env
    assert out["status"] == "running" and out["pid"] == last(reactor).pid
    assert last(reactor).stdin_closed
    listed = sup.list()
    assert token not in json.dumps(listed) and token not in json.dumps(sup.health())
    manifest = tmp_path / "home" / "agents.json"
    assert stat.S_IMODE(os.stat(manifest).st_mode) == 0o600
    assert json.loads(manifest.read_text())["agents"][0]["token"] == token


def test_start_is_idempotent(sup, reactor):
    sup.upsert(spec())
    sup.start("a1")
    sup.start("a1")
    assert len(reactor.spawned) == 1


def test_backoff_schedule_and_max_restarts(sup, reactor):
    """Quick failures back off 1, 2, 4 s; past max_restarts the agent is errored."""
    sup.upsert(spec(restart="on_failure", max_restarts=3))
    sup.start("a1")
    delays = []
    for _ in range(3):
        last(reactor).die(code=1)
        assert sup.list()[0]["status"] == "backoff"
        (call,) = reactor.getDelayedCalls()
        delays.append(call.getTime() - reactor.seconds())
        reactor.advance(delays[-1] - 0.01)
        assert sup.list()[0]["status"] == "backoff"  # backoff holds
        reactor.advance(0.02)
        assert sup.list()[0]["status"] == "running"
    assert delays == pytest.approx([1.0, 2.0, 4.0])
    last(reactor).die(code=1)
    agent = sup.list()[0]
    assert (agent["status"], agent["restart_count"], agent["last_exit_code"]) == ("errored", 3, 1)
    assert reactor.getDelayedCalls() == []
    assert len(reactor.spawned) == 4


def test_backoff_resets_after_a_stable_run(sup, reactor):
    sup.upsert(spec(max_restarts=None))
    sup.start("a1")
    last(reactor).die(code=1)
    reactor.advance(1.0)
    last(reactor).die(code=1)
    reactor.advance(2.0)
    reactor.advance(60)  # a healthy minute
    last(reactor).die(code=2)
    (call,) = reactor.getDelayedCalls()
    assert call.getTime() - reactor.seconds() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "policy,code,status,restarts",
    [("never", 1, "errored", 0), ("never", 0, "stopped", 0), ("on_failure", 0, "stopped", 0),
     ("always", 0, "backoff", 1), ("on_failure", None, "backoff", 1)],
)
def test_restart_policies(sup, reactor, policy, code, status, restarts):
    sup.upsert(spec(restart=policy))
    sup.start("a1")
    if code is None:
        last(reactor).die(signal=9)  # kill -9
    else:
        last(reactor).die(code=code)
    agent = sup.list()[0]
    assert (agent["status"], agent["restart_count"]) == (status, restarts)
    if code is None:
        assert agent["last_exit_code"] == -9


def test_stop_grace_escalates_to_kill(sup, reactor):
    """A child that ignores SIGTERM gets SIGKILL after the grace; stop answers after the exit."""
    reactor.obey_term = False
    sup.upsert(spec())
    sup.start("a1")
    proc = last(reactor)
    d = sup.stop("a1")
    assert group_signals(reactor, proc) == ["TERM"] and not d.called
    reactor.advance(9.9)
    assert group_signals(reactor, proc) == ["TERM"]
    reactor.advance(0.2)
    assert group_signals(reactor, proc) == ["TERM", "KILL"]
    assert proc.signals == []  # nothing went to the leader alone
    assert d.result["status"] == "stopped" and d.result["pid"] is None
    assert reactor.getDelayedCalls() == []


def test_stop_kill_and_stop_during_backoff(sup, reactor):
    sup.upsert(spec())
    sup.start("a1")
    d = sup.stop("a1", "kill")
    assert group_signals(reactor, last(reactor)) == ["KILL"] and d.result["status"] == "stopped"
    sup.start("a1")
    last(reactor).die(code=3)
    assert sup.list()[0]["status"] == "backoff"
    assert sup.stop("a1").result["status"] == "stopped"
    reactor.advance(100)
    assert len(reactor.spawned) == 2  # the pending restart was cancelled


def test_wait_resolves_on_transition_and_times_out(sup, reactor):
    sup.upsert(spec(restart="never"))
    ready = sup.wait("a1", ["running"], 5)
    assert not ready.called
    sup.start("a1")
    assert ready.result["status"] == "running"
    assert sup.wait("a1", ["running"], 5).result["status"] == "running"
    done = sup.wait("a1", ["stopped", "errored"], 5)
    timeout = sup.wait("a1", ["backoff"], 5)
    last(reactor).die(code=0)
    assert done.result["status"] == "stopped"
    reactor.advance(5.1)
    err = timeout.result
    timeout.addErrback(lambda f: None)
    assert isinstance(err.value, RpcError) and "WaitTimeout" in err.value.message
    assert sup._waiters == [] and reactor.getDelayedCalls() == []


def test_remove_stops_first_and_is_idempotent(sup, reactor):
    sup.upsert(spec())
    sup.start("a1")
    proc = last(reactor)
    assert sup.remove("a1").result == {"removed": True}
    assert group_signals(reactor, proc) == ["TERM"] and sup.list() == []
    assert sup.remove("a1").result == {"removed": False}


def test_identity_binding(sup):
    sup.upsert(spec())
    token = sup._agents["a1"].entry.token

    class S:
        def __init__(self, cid):
            self.client_id, self.closed = cid, False

    a, b = S("c1"), S("c2")
    assert sup.verify("a1", token) and not sup.verify("a1", "nope") and not sup.verify("ghost", token)
    sup.attach("a1", a)
    with pytest.raises(AgentAlreadyAttached):
        sup.attach("a1", b)
    assert sup.list()[0]["attached"] is True and sup.list()[0]["session_id"] == "c1"
    sup.detach("a1", b)  # not the holder: no effect
    assert sup.list()[0]["attached"]
    sup.detach("a1", a)
    sup.attach("a1", b)
    assert sup.list()[0]["session_id"] == "c2"


def test_manifest_survives_reload_and_auto_start(reactor, tmp_path):
    home = tmp_path / "home"
    first = supervisor(reactor, home)
    first.upsert(spec(auto_start=True))
    first.upsert(spec(id="manual"))
    token = first._agents["a1"].entry.token
    first.shutdown()
    second = supervisor(reactor, home)
    second.boot()
    assert {a["id"]: a["status"] for a in second.list()} == {"a1": "running", "manual": "stopped"}
    assert second._agents["a1"].entry.token == token


def test_second_supervisor_is_observe_only(reactor, tmp_path):
    home = tmp_path / "home"
    owner = supervisor(reactor, home)
    owner.upsert(spec())
    observer = supervisor(reactor, home)
    observer.load()
    assert observer.observer and [a["id"] for a in observer.list()] == ["a1"]
    with pytest.raises(RpcError, match="observe-only"):
        observer.start("a1")


def test_unreadable_manifest_is_set_aside(reactor, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "agents.json").write_text("{torn")
    s = supervisor(reactor, home)
    s.load()
    assert s.list() == [] and (home / "agents.json.unreadable").exists()


def test_logs_capture_and_tail(sup, reactor):
    sup.upsert(spec())
    sup.start("a1")
    proto = last(reactor).protocol
    proto.outReceived(b"".join(b"out %d\n" % i for i in range(10)))
    proto.errReceived(b"err 1\n")
    out = sup.tail_log("a1", ("stdout", "stderr"), 3, 0).result
    assert out["stdout"] == ["out 7", "out 8", "out 9"] and out["stderr"] == ["err 1"]
    assert out["lines"] == ["out 7", "out 8", "out 9", "err 1"]
    assert out["stdout_total"] == 10 and out["more"] is True
    page = sup.tail_log("a1", ("stdout",), 3, 3).result
    assert page["stdout"] == ["out 4", "out 5", "out 6"] and page["stderr"] == []
    every = sup.tail_log("a1", ("stdout",), 0, 0).result
    assert len(every["stdout"]) == 10 and every["more"] is False


def test_log_size_bound_rotates(reactor, tmp_path):
    s = supervisor(reactor, tmp_path / "home", log_max_bytes=1000)
    s.upsert(spec())
    s.start("a1")
    proto = last(reactor).protocol
    for _ in range(50):
        proto.outReceived(b"x" * 99 + b"\n")
    path = s.log_path("a1", "stdout")
    assert path.stat().st_size <= 1000
    assert path.with_name(path.name + ".1").stat().st_size <= 1000


def test_tail_reads_only_the_ceiling(tmp_path):
    path = tmp_path / "big.log"
    path.write_bytes(b"".join(b"line %06d\n" % i for i in range(100_000)))
    t = tail(path, 5, 0, ceiling=1000)
    assert list(t.lines) == [f"line {i:06d}" for i in range(99_995, 100_000)]
    assert t.more and t.total < 100


@pytest.mark.parametrize(
    "raw,field",
    [
        ({"id": "../x", "command": PYTHON}, "id"),
        ({"id": "a/b", "command": PYTHON}, "id"),
        ({"id": "a"}, "command"),
        ({"id": "a", "command": "python3"}, "command"),
        ({"id": "a", "command": "/nonexistent/bin/x"}, "command"),
        ({"id": "a", "interpreter": "definitely-not-a-program-xyz"}, "interpreter"),
        ({"id": "a", "interpreter": "/usr/bin/python3"}, "interpreter"),
        ({"id": "a", "command": PYTHON, "restart": "sometimes"}, "restart"),
        ({"id": "a", "command": PYTHON, "backoff_secs": -1}, "backoff_secs"),
        ({"id": "a", "command": PYTHON, "backoff_secs": 0}, "backoff_secs"),
        ({"id": "a", "command": PYTHON, "backoff_secs": 1e9}, "backoff_secs"),
        ({"id": "a", "command": PYTHON, "max_restarts": -2}, "max_restarts"),
        ({"id": "a", "command": PYTHON, "env": {"CAR_AGENT_TOKEN": "x"}}, "env.CAR_AGENT_TOKEN"),
        ({"id": "a", "command": PYTHON, "cwd": "relative"}, "cwd"),
        ({"id": "a", "command": PYTHON, "args": "not-a-list"}, "args"),
    ],
)
def test_spec_validation(raw, field):
    with pytest.raises(InvalidParams) as e:
        parse_agent_spec(raw, os.environ)
    assert e.value.field == field


def test_non_executable_refused(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("data")
    os.chmod(plain, 0o644)
    assert validate_command(str(plain)) == f"command {plain} is not executable"
    assert "not a regular file" in validate_command(str(tmp_path))


def test_scratch_directory_binaries_refused(tmp_path):
    """An executable under a world-writable directory (like /tmp) is refused."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.chmod(scratch, 0o1777)
    binary = scratch / "tool"
    binary.write_text("#!/bin/sh\n")
    os.chmod(binary, 0o755)
    assert "world-writable" in validate_command(str(binary))
    assert validate_command(PYTHON) is None
    assert validate_command("/bin/sh") is None


def test_interpreter_is_frozen_into_command():
    s = parse_agent_spec({"id": "a", "interpreter": "sh"}, {"PATH": "/usr/bin:/bin"})
    assert os.path.isabs(s.command) and s.command.endswith("/sh") and s.interpreter == "sh"


def test_survivor_of_an_earlier_daemon_blocks_a_second_copy(sup, reactor, tmp_path):
    """A live process recorded for the agent by an earlier daemon is not started twice."""
    import subprocess

    sup.upsert(spec())
    pid_file = tmp_path / "home" / "run" / "agents" / "a1.pid"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))  # this very interpreter: alive, same executable
    out = sup.start("a1")
    assert out["status"] == "backoff" and out["blocked_by_pid"] == os.getpid()
    assert reactor.spawned == []
    dead = subprocess.Popen([PYTHON, "-c", "pass"])
    dead.wait()
    pid_file.write_text(str(dead.pid))  # the survivor is gone now
    reactor.advance(5)
    agent = sup.list()[0]
    assert agent["status"] == "running" and "blocked_by_pid" not in agent
    assert pid_file.read_text().strip() == str(last(reactor).pid)
    last(reactor).die(code=0)
    assert not pid_file.exists()


# -- process groups and exits --------------------------------------------------------


def test_stop_before_setsid_signals_the_process(sup, reactor):
    """No group yet (the wrapper has not reached setsid): the signal goes to the process itself."""
    sup.upsert(spec())
    sup.start("a1")
    proc = last(reactor)
    proc.in_group = False
    d = sup.stop("a1")
    assert reactor.killpg_calls[0] == (proc.pgid, "TERM", False)
    assert proc.signals == ["TERM"] and d.result["status"] == "stopped"


def test_exit_settles_even_while_a_grandchild_holds_the_pipes(sup, reactor):
    """
    The exit settles stop at once although an escaped grandchild keeps the
    pipes open; our ends are closed then, and the logs with them.
    """
    sup.upsert(spec())
    sup.start("a1")
    proc = last(reactor)
    proc.escaped = True
    d = sup.stop("a1", "kill")
    assert d.result["status"] == "stopped" and d.result["last_exit_code"] == -9
    assert proc.lost and not proc.pipes_open
    assert all(log._fd is None for log in proc.protocol.logs.values())
    assert sup.start("a1")["status"] == "running" and len(reactor.spawned) == 2


def test_exit_kills_what_is_left_of_the_group(sup, reactor):
    """A child that exits leaves no process of its group behind, and restart policy goes on."""
    sup.upsert(spec(restart="on_failure"))
    sup.start("a1")
    proc = last(reactor)
    proc.group_members = True  # `sleep 45 &` still running
    proc.die(code=1)
    assert group_signals(reactor, proc) == ["KILL"]
    assert not proc.group_members and not proc.pipes_open
    assert sup.list()[0]["status"] == "backoff"
    reactor.advance(1.0)
    assert sup.list()[0]["status"] == "running"


def test_output_still_in_the_pipes_at_exit_is_logged(sup, reactor):
    """What the child wrote just before it exited is read before our ends close."""
    sup.upsert(spec(restart="never"))
    sup.start("a1")
    proc = last(reactor)
    fds = []
    for fd, text in ((1, b"last words\n"), (2, b"last error\n")):
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.write(w, text)
        fds += [r, w]

        class Reader:
            def __init__(self, fd):
                self.fd = fd

            def fileno(self):
                return self.fd

        proc.pipes[fd] = Reader(r)
    proc.escaped = True
    try:
        proc.die(code=0)
    finally:
        for fd in fds:
            os.close(fd)
    out = sup.tail_log("a1", ("stdout", "stderr"), 10, 0).result
    assert out["stdout"] == ["last words"] and out["stderr"] == ["last error"]
    assert sup.list()[0]["status"] == "stopped"


def test_shutdown_gives_up_after_the_grace(sup, reactor):
    """A child that outlives even SIGKILL does not hold shutdown past the grace plus a margin."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        sup.upsert(spec())
        sup.upsert(spec(id="quiet"))
        sup.start("a1")
        sup.start("quiet")
        last(reactor).unkillable = True
        reactor.obey_term = False
        done = sup.shutdown()
        reactor.advance(10.5)
        assert not done.called  # SIGKILL went at 10 s; still waiting
        reactor.advance(0.6)
        assert done.called
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("did not exit" in e.get("log_format", "") and e.get("agent_ids") == "quiet" for e in events)
    assert sup._lock_fd is None
    assert reactor.getDelayedCalls() == []


def test_shutdown_fires_once_every_child_exited(sup, reactor):
    sup.upsert(spec())
    sup.start("a1")
    done = sup.shutdown()
    assert done.called and reactor.getDelayedCalls() == []


# -- token rotation ------------------------------------------------------------------------


class FakeSession:
    def __init__(self, client_id):
        self.client_id, self.closed = client_id, False
        self.disconnected = None

    def disconnect(self, code, reason):
        self.disconnected = (code, reason)


@pytest.mark.parametrize(
    "change",
    [{"command": "/bin/sh"}, {"args": ["other.py"]}, {"env": {"FOO": "baz"}}, {"cwd": "/"}],
    ids=["command", "args", "env", "cwd"],
)
def test_launch_change_rotates_the_token_and_restarts(sup, reactor, change):
    """A new command, args, env or cwd: new token, old binding closed, running child restarted."""
    sup.upsert(spec(env={"FOO": "bar"}))
    old_token = sup._agents["a1"].entry.token
    sup.start("a1")
    old_proc = last(reactor)
    session = FakeSession("c7")
    sup.attach("a1", session)
    d = sup.upsert(spec(**{"env": {"FOO": "bar"}, **change}))
    new_token = sup._agents["a1"].entry.token
    assert new_token != old_token
    assert not sup.verify("a1", old_token) and sup.verify("a1", new_token)
    assert session.disconnected == (1008, "agent credentials rotated")
    assert group_signals(reactor, old_proc) == ["TERM"] and len(reactor.spawned) == 2
    assert reactor.spawned[1]["env"]["CAR_AGENT_TOKEN"] == new_token
    result = d.result
    assert result["status"] == "running" and result["pid"] == last(reactor).pid
    assert result["attached"] is False and result["session_id"] is None
    manifest = json.loads((sup.manifest_path).read_text())
    assert manifest["agents"][0]["token"] == new_token


def test_restart_after_rotation_waits_for_the_old_child(sup, reactor):
    """A child slow to exit: the upsert answers once it is gone and the new one runs."""
    reactor.obey_term = False
    sup.upsert(spec())
    sup.start("a1")
    d = sup.upsert(spec(args=["v2.py"]))
    assert not d.called and len(reactor.spawned) == 1
    reactor.advance(10)
    assert d.result["status"] == "running" and reactor.spawned[1]["args"][-1] == "v2.py"


def test_other_changes_keep_the_token(sup, reactor):
    """Name, restart policy, backoff, auto_start: same token, binding kept, no restart."""
    sup.upsert(spec())
    token = sup._agents["a1"].entry.token
    sup.start("a1")
    session = FakeSession("c7")
    sup.attach("a1", session)
    out = sup.upsert(spec(name="renamed", restart="always", backoff_secs=2.0, auto_start=True)).result
    assert sup._agents["a1"].entry.token == token and sup.verify("a1", token)
    assert session.disconnected is None and out["attached"] and out["session_id"] == "c7"
    assert len(reactor.spawned) == 1 and group_signals(reactor, last(reactor)) == []


def test_rotation_of_a_stopped_agent_does_not_start_it(sup, reactor):
    sup.upsert(spec())
    token = sup._agents["a1"].entry.token
    out = sup.upsert(spec(args=["v2.py"])).result
    assert out["status"] == "stopped" and reactor.spawned == []
    assert sup._agents["a1"].entry.token != token


# -- command and env rules --------------------------------------------------------------


def _trusted_base():
    """A directory only this user (or root) can change, to build commands in."""
    for base in (Path.home(), Path(__file__).resolve().parents[2]):
        try:
            d = Path(tempfile.mkdtemp(dir=base, prefix=".car-test-"))
        except OSError:
            continue
        probe = d / "probe"
        probe.write_text("#!/bin/sh\n")
        os.chmod(probe, 0o755)
        if validate_command(str(probe)) is None:
            return d
        shutil.rmtree(d)
    return None


@pytest.fixture
def trusted():
    d = _trusted_base()
    if d is None:
        pytest.skip("no directory here that only this user and root can write")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _executable(path):
    path.write_text("#!/bin/sh\n")
    os.chmod(path, 0o755)
    return path


def _foreign(path):
    """Give C{path} to another user (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.lchown(path, 65534, 65534)


def test_group_writable_directory_in_the_chain_refused(trusted):
    """Not only o+w: a group-writable directory on the way is refused too, and named."""
    shared = trusted / "shared"
    shared.mkdir()
    tool = _executable(shared / "tool")
    assert validate_command(str(tool)) is None
    os.chmod(shared, 0o775)
    problem = validate_command(str(tool))
    assert problem == f"command {tool}: directory {shared} is group- or world-writable (mode 0775)"


def test_sticky_world_writable_directory_refused(trusted):
    scratch = trusted / "scratch"
    scratch.mkdir()
    os.chmod(scratch, 0o1777)
    tool = _executable(scratch / "tool")
    assert f"directory {scratch} is group- or world-writable" in validate_command(str(tool))


def test_group_writable_command_refused(trusted):
    tool = _executable(trusted / "tool")
    os.chmod(tool, 0o775)
    assert validate_command(str(tool)) == f"command {tool}: file {tool} is group- or world-writable (mode 0775)"


def test_command_owned_by_another_user_refused(trusted):
    tool = _executable(trusted / "tool")
    _foreign(tool)
    assert validate_command(str(tool)) == (
        f"command {tool}: {tool} is owned by uid 65534, not by the daemon's user (uid {os.geteuid()}) or root"
    )


def test_directory_owned_by_another_user_refused(trusted):
    theirs = trusted / "theirs"
    theirs.mkdir()
    tool = _executable(theirs / "tool")
    _foreign(theirs)
    assert f"{theirs} is owned by uid 65534" in validate_command(str(tool))


def test_symlink_owned_by_another_user_refused(trusted):
    """A symlink on the given path must itself belong to the daemon's user or root."""
    link = trusted / "python"
    link.symlink_to(PYTHON)
    assert validate_command(str(link)) is None
    _foreign(link)
    assert validate_command(str(link)) == (
        f"command {link}: symlink {link} is owned by uid 65534, not by the daemon's user (uid {os.geteuid()}) or root"
    )
    dir_link = trusted / "bin"
    dir_link.symlink_to(os.path.dirname(PYTHON))
    via_dir = dir_link / os.path.basename(PYTHON)
    assert validate_command(str(via_dir)) is None
    _foreign(dir_link)
    assert f"symlink {dir_link} is owned by uid 65534" in validate_command(str(via_dir))


def test_symlink_into_a_scratch_directory_refused(trusted, tmp_path):
    """The real path is checked as well: a trusted link to a file under /tmp is refused."""
    tool = _executable(tmp_path / "tool")
    link = trusted / "tool"
    link.symlink_to(tool)
    problem = validate_command(str(link))
    assert problem is not None and "group- or world-writable" in problem
    assert str(Path(tempfile.gettempdir())) in problem or str(tmp_path) in problem


def test_symlink_chain_through_an_untrusted_directory_refused(trusted):
    """Every symlink followed counts: a hop through a writable directory is refused."""
    hop_dir = trusted / "hop"
    hop_dir.mkdir()
    (hop_dir / "python").symlink_to(PYTHON)
    link = trusted / "python"
    link.symlink_to("hop/python")
    assert validate_command(str(link)) is None
    os.chmod(hop_dir, 0o777)
    assert f"directory {hop_dir} is group- or world-writable" in validate_command(str(link))


@pytest.mark.parametrize("key", ["LD_PRELOAD", "LD_LIBRARY_PATH", "DYLD_INSERT_LIBRARIES", "PYTHONPATH", "PYTHONSTARTUP", "ld_preload"])
def test_loader_variables_refused(key):
    with pytest.raises(InvalidParams) as e:
        parse_agent_spec({"id": "a", "command": PYTHON, "env": {key: "/x"}}, os.environ)
    assert e.value.field == f"env.{key}"


def test_loader_variable_in_a_stored_spec_blocks_the_spawn(reactor, tmp_path):
    """A manifest entry from before the rule is not started, and health says why."""
    home = tmp_path / "home"
    first = supervisor(reactor, home)
    first.upsert(spec())
    first.shutdown()
    manifest = json.loads((home / "agents.json").read_text())
    manifest["agents"][0]["env"] = {"LD_PRELOAD": "/tmp/evil.so"}
    (home / "agents.json").write_text(json.dumps(manifest))
    second = supervisor(reactor, home)
    assert second.start("a1")["status"] == "errored" and reactor.spawned == []
    [health] = second.health()
    assert health["ok"] is False and "LD_PRELOAD" in health["reason"]


def test_nothing_starts_once_shutdown_began(sup, reactor):
    """A restart (or a rotation's restart) whose stop ends during shutdown does not start a child again."""
    reactor.obey_term = False
    sup.upsert(spec())
    sup.start("a1")
    restarted = sup.restart("a1")
    done = sup.shutdown()
    reactor.advance(10)
    assert done.called and restarted.result["status"] == "stopped"
    assert len(reactor.spawned) == 1


def test_each_status_change_is_told_once(sup, reactor):
    """The status listener (the daemon turns it into host events) hears every change, and only changes."""
    heard = []
    sup.on_status = lambda *change: heard.append(change)
    sup.upsert(spec(restart="on_failure", max_restarts=1))
    sup.start("a1")
    sup.start("a1")  # already running: no change
    pid = last(reactor).pid
    last(reactor).die(code=1)
    reactor.advance(1.0)
    last(reactor).die(code=1)
    assert [(agent_id, status) for agent_id, status, *_ in heard] == [
        ("a1", "starting"), ("a1", "running"), ("a1", "backoff"), ("a1", "starting"), ("a1", "running"), ("a1", "errored")]
    assert heard[1][2] == pid
    assert heard[-1][3:] == (1, 1)  # restarts, last exit code


def test_a_failing_status_listener_does_not_stop_the_supervisor(sup, reactor):
    def broken(*change):
        raise RuntimeError("listener bug")

    sup.on_status = broken
    sup.upsert(spec())
    sup.start("a1")
    assert sup.list()[0]["status"] == "running"
