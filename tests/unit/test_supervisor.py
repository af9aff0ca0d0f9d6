"""The supervisor on a fake process reactor and a Clock."""

import json
import os
import stat
import sys

import pytest
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from car_twisted.agents.logs import tail
from car_twisted.agents.manifest import parse_agent_spec, validate_command
from car_twisted.agents.supervisor import Supervisor
from car_twisted.errors import AgentAlreadyAttached, InvalidParams, RpcError
from car_twisted.interfaces import IAgentIdentities

PYTHON = os.path.realpath(sys.executable)


class FakeProcess:
    def __init__(self, reactor, protocol, pid):
        self.reactor, self.protocol, self.pid = reactor, protocol, pid
        self.signals = []
        self.alive = True
        self.stdin_closed = False

    def closeStdin(self):
        self.stdin_closed = True

    def signalProcess(self, name):
        if not self.alive:
            raise ProcessExitedAlready()
        self.signals.append(name)
        if name == "KILL" or (name == "TERM" and self.reactor.obey_term):
            self.die(signal=9 if name == "KILL" else 15)

    def die(self, code=None, signal=None):
        if not self.alive:
            return
        self.alive = False
        if code == 0 and signal is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(exitCode=code, signal=signal))
        self.protocol.processEnded(reason)


class FakeProcessReactor(Clock):
    """Clock plus a spawnProcess that records children."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.obey_term = True
        self._pid = 1000

    def spawnProcess(self, protocol, executable, args, env=None, path=None, **kw):
        self._pid += 1
        proc = FakeProcess(self, protocol, self._pid)
        self.spawned.append({"proc": proc, "executable": executable, "args": args, "env": env, "path": path})
        protocol.makeConnection(proc)
        return proc


@pytest.fixture
def reactor():
    return FakeProcessReactor()


@pytest.fixture
def sup(reactor, tmp_path):
    s = Supervisor(reactor, tmp_path / "home", environ={"PATH": os.environ["PATH"], "CAR_AUTH_TOKEN": "daemon-secret"}, stop_grace=10)
    s.daemon_url = "ws://127.0.0.1:9100"
    s.load()
    return s


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
    managed = sup.upsert(spec(env={"FOO": "bar"}))
    token = sup._agents["a1"].entry.token
    assert token not in json.dumps(managed)
    out = sup.start("a1")
    child = reactor.spawned[0]
    assert child["executable"] == PYTHON and child["args"] == [PYTHON, "agent.py"]
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
    assert proc.signals == ["TERM"] and not d.called
    reactor.advance(9.9)
    assert proc.signals == ["TERM"]
    reactor.advance(0.2)
    assert proc.signals == ["TERM", "KILL"]
    assert d.result["status"] == "stopped" and d.result["pid"] is None
    assert reactor.getDelayedCalls() == []


def test_stop_kill_and_stop_during_backoff(sup, reactor):
    sup.upsert(spec())
    sup.start("a1")
    d = sup.stop("a1", "kill")
    assert last(reactor).signals == ["KILL"] and d.result["status"] == "stopped"
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
    assert proc.signals == ["TERM"] and sup.list() == []
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
    first = Supervisor(reactor, home, environ={})
    first.upsert(spec(auto_start=True))
    first.upsert(spec(id="manual"))
    token = first._agents["a1"].entry.token
    first.shutdown()
    second = Supervisor(reactor, home, environ={})
    second.boot()
    assert {a["id"]: a["status"] for a in second.list()} == {"a1": "running", "manual": "stopped"}
    assert second._agents["a1"].entry.token == token


def test_second_supervisor_is_observe_only(reactor, tmp_path):
    home = tmp_path / "home"
    owner = Supervisor(reactor, home, environ={})
    owner.upsert(spec())
    observer = Supervisor(reactor, home, environ={})
    observer.load()
    assert observer.observer and [a["id"] for a in observer.list()] == ["a1"]
    with pytest.raises(RpcError, match="observe-only"):
        observer.start("a1")


def test_unreadable_manifest_is_set_aside(reactor, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "agents.json").write_text("{torn")
    s = Supervisor(reactor, home, environ={})
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
    s = Supervisor(reactor, tmp_path / "home", environ={}, log_max_bytes=1000)
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
