"""
One run of one agent: the exec wrapper that gives the child its own
process group, and the ``ProcessProtocol`` that logs its output and reports
its exit.

The child is spawned as the daemon's own interpreter running
``EXEC_WRAPPER``, which calls ``setsid()`` and then ``execv()``s the
agent's command: exec keeps the pid, so the spawned pid is the agent's pid
and the id of its process group, and stopping the agent can signal
everything it started (``killpg``).

The protocol acts on the child's exit (``processExited``), not on
``processEnded``: Twisted only calls the latter once every holder of the
child's stdout and stderr is gone, and a grandchild that keeps them open
would otherwise keep a stopped agent ``running`` forever.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted.agents.logs import AgentLog
from car_twisted.private_files import read_private

__all__ = [
    "AgentProcess",
    "EXEC_WRAPPER",
    "wrapper_argv",
    "exit_code_of",
    "signal_group",
    "kill_group",
    "DRAIN_LIMIT_BYTES",
    "surviving_pid",
]

_log = Logger()

# Run with ``python -I -S -c``: no site, no user site, no PYTHON* variables,
# so nothing in the agent's environment runs code in the wrapper.  setsid()
# fails only for a process that already leads a group, which is as good.
EXEC_WRAPPER = (
    "import os, sys\n"
    "try:\n"
    "    os.setsid()\n"
    "except OSError:\n"
    "    pass\n"
    "try:\n"
    "    os.execv(sys.argv[1], sys.argv[1:])\n"
    "except OSError as e:\n"
    "    sys.stderr.write('cannot exec %s: %s\\n' % (sys.argv[1], e.strerror or e))\n"
    "    sys.stderr.flush()\n"
    "    os._exit(127)\n"
)

# Output still buffered in a pipe when the child exits is read at once, up
# to this much per stream (a pipe holds 64 KiB by default; the bound stops
# a lingering grandchild that keeps writing from holding the reactor).
DRAIN_LIMIT_BYTES = 1024 * 1024


def wrapper_argv(python: str, command: str, args: tuple[str, ...] | list[str]) -> list[str]:
    """The argv that runs C{command} with C{args} in a new process group."""
    return [python, "-I", "-S", "-c", EXEC_WRAPPER, command, *args]


def signal_group(killpg: Callable[[int, int], None], pgid: int, process: IProcessTransport, name: str) -> None:
    """
    Send SIGTERM or SIGKILL (C{name} ``"TERM"`` / ``"KILL"``) to the
    agent's whole process group C{pgid}; to the process alone while the
    group does not exist yet (the wrapper has not reached ``setsid()``).
    """
    try:
        killpg(pgid, signal.SIGKILL if name == "KILL" else signal.SIGTERM)
        return
    except ProcessLookupError:
        pass
    except OSError as e:
        _log.warn("cannot signal process group {pgid}: {error}", pgid=pgid, error=e.strerror)
    try:
        process.signalProcess(name)
    except ProcessExitedAlready:
        pass


def kill_group(killpg: Callable[[int, int], None], pgid: int) -> None:
    """SIGKILL what is left of an exited agent's process group C{pgid}."""
    try:
        killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing was left
    except OSError as e:
        _log.warn("cannot kill process group {pgid}: {error}", pgid=pgid, error=e.strerror)


def exit_code_of(reason: Failure) -> int:
    """A process-exit failure as one number: the status, or minus the signal."""
    value = reason.value
    code = getattr(value, "exitCode", None)
    sig = getattr(value, "signal", None)
    return -sig if sig else (code if code is not None else 0)


class AgentProcess(ProcessProtocol):
    """
    One run of one agent: stdout and stderr to its log files, its exit to
    C{on_exit(protocol, exit_code)}.

    @ivar pid: the child's pid, which is also its process group id (kept:
        the transport forgets it once the child is reaped).
    """

    _log = Logger()
    # Set before connectionMade (Twisted's types allow None).
    transport: IProcessTransport

    def __init__(
        self,
        agent_id: str,
        logs: dict[str, AgentLog],
        on_exit: Callable[[AgentProcess, int], None],
        kill_group: Callable[[int], None],
    ) -> None:
        self.agent_id = agent_id
        self.logs = logs
        self.on_exit = on_exit
        self.kill_group = kill_group
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def _write(self, name: str, data: bytes) -> None:
        try:
            self.logs[name].write(data)
        except OSError:
            self._log.failure("cannot write {stream} log of agent {agent_id}", stream=name, agent_id=self.agent_id)

    def outReceived(self, data: bytes) -> None:
        self._write("stdout", data)

    def errReceived(self, data: bytes) -> None:
        self._write("stderr", data)

    def processExited(self, reason: Failure) -> None:
        code = exit_code_of(reason)
        # Whatever the agent started dies with it: nothing of a stopped
        # agent keeps running, or keeps its pipes (and this protocol) open.
        if self.pid is not None:
            self.kill_group(self.pid)
        self._drain()
        self.transport.loseConnection()
        self.on_exit(self, code)

    def _drain(self) -> None:
        """
        Log what the child wrote before it exited and is still in the
        pipes: closing them right away must not lose its last lines.
        """
        pipes = getattr(self.transport, "pipes", None) or {}
        for fd, name in ((1, "stdout"), (2, "stderr")):
            reader = pipes.get(fd)
            if reader is None:
                continue
            budget = DRAIN_LIMIT_BYTES
            while budget > 0:
                try:
                    data = os.read(reader.fileno(), min(65536, budget))
                except OSError:  # EAGAIN: nothing more buffered
                    break
                if not data:
                    break
                self._write(name, data)
                budget -= len(data)

    # Log files close with their pipes (after the exit, see processExited).

    def outConnectionLost(self) -> None:
        self.logs["stdout"].close()

    def errConnectionLost(self) -> None:
        self.logs["stderr"].close()

    def processEnded(self, reason: Failure) -> None:
        for log in self.logs.values():
            log.close()


def surviving_pid(pid_file: Path, command: str) -> int | None:
    """
    The pid recorded in C{pid_file} if that process is still running
    C{command}: an earlier daemon's child that outlived it (starting
    another would run the agent twice).  A stale pid file is removed.
    """
    try:
        pid = int(read_private(pid_file).strip())
        exe = os.path.realpath(os.readlink(f"/proc/{pid}/exe"))
    except (OSError, ValueError):
        exe = None
    if exe is None or exe != os.path.realpath(command):
        try:
            pid_file.unlink()
        except OSError:
            pass
        return None
    return pid
