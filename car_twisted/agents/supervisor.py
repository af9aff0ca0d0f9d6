"""
``Supervisor``: starts, watches and restarts the manifest's agent
processes, and is the daemon's ``IAgentIdentities``.

Children run under Twisted's process machinery (``spawnProcess`` and the
``ProcessProtocol`` in ``process``), each in its own process group, which
is what a stop signals; every timer (restart backoff, the stop grace, the
shutdown bound, waits) is on the injected reactor clock.
``twisted.runner.procmon`` was not used: it restarts every exit, has no
``never`` / ``on_failure`` policy, no ``max_restarts``, and sends output
to the log rather than to bounded per-agent files (see
``docs/decisions.md``).
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import attrs
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from car_twisted._util import iso_utc, off_reactor
from car_twisted.agents.logs import DEFAULT_MAX_LOG_BYTES, AgentLog, tail_streams
from car_twisted.agents.manifest import (
    DEFAULT_STOP_GRACE_SECS,
    MAX_AGENTS,
    AgentSpec,
    ManifestEntry,
    launch_fields,
    load_manifest,
    save_manifest,
    spec_problem,
    store_installed,
)
from car_twisted.agents.process import AgentProcess, kill_group, signal_group, surviving_pid, wrapper_argv
from car_twisted.auth import mint_token, tokens_equal, write_secret_file
from car_twisted.errors import AgentAlreadyAttached, InvalidParams, RpcError
from car_twisted.interfaces import IAgentIdentities
from car_twisted.json_value import JsonValue
from car_twisted.private_files import UnsafeStateError, ensure_private_dir, open_private
from car_twisted.stats import DaemonStats

if TYPE_CHECKING:
    from car_twisted.session import ClientSession

__all__ = ["Supervisor", "STATUSES", "ManagedAgent", "HealthReport"]

#: An agent as ``agents.*`` answers it (``Supervisor.managed``).
ManagedAgent = dict[str, object]
#: ``agents.health``: one ``{id, command, ok, reason?}`` per agent.
HealthReport = list[dict[str, object]]

STATUSES = ("stopped", "starting", "running", "backoff", "errored")
MAX_BACKOFF_SECS = 300.0
# A run this long counts as healthy: the next failure backs off from scratch.
STABLE_RUN_SECS = 30.0
# How often an agent blocked by a survivor of an earlier daemon is rechecked.
SURVIVOR_RECHECK_SECS = 5.0
# Shutdown waits the stop grace plus this for the children's exits, then
# gives up on any child that did not go (SIGKILL was sent at the grace).
SHUTDOWN_MARGIN_SECS = 1.0
# The close code and reason for an agent connection whose token was rotated.
ROTATED_CLOSE = (1008, "agent credentials rotated")


@attrs.define(eq=False)
class _Agent:
    entry: ManifestEntry
    status: str = "stopped"
    pid: int | None = None
    last_exit_code: int | None = None
    restart_count: int = 0
    quick_failures: int = 0
    started_at: float | None = None
    process: IProcessTransport | None = None
    protocol: AgentProcess | None = None
    restart_timer: IDelayedCall | None = None
    kill_timer: IDelayedCall | None = None
    stopping: bool = False
    blocked_by_pid: int | None = None
    exit_waiters: list[Deferred[None]] = attrs.field(factory=list)
    # What the agent last ran as in this daemon (see launch_changed).
    last_launch: tuple[str, tuple[str, ...], dict[str, str], str | None] | None = None

    @property
    def spec(self) -> AgentSpec:
        return self.entry.spec


@implementer(IAgentIdentities)
class Supervisor:
    _log = Logger()
    #: Told each status change: (agent id, status, pid, restarts, last exit code).
    on_status: Callable[[str, str, int | None, int, int | None], object] | None = None

    def __init__(
        self,
        reactor: IReactorTime,
        home: Path,
        environ: Mapping[str, str] | None = None,
        stop_grace: float = DEFAULT_STOP_GRACE_SECS,
        log_max_bytes: int = DEFAULT_MAX_LOG_BYTES,
        killpg: Callable[[int, int], None] | None = None,
        stats: DaemonStats | None = None,
    ) -> None:
        """
        @param killpg: signals a process group; C{os.killpg} unless a test
            brings its own.
        """
        self.reactor = reactor
        self.stats = stats if stats is not None else DaemonStats()
        self.home = home
        self.manifest_path = home / "agents.json"
        self.logs_dir = home / "logs" / "agents"
        self.pids_dir = home / "run" / "agents"
        self.environ = os.environ if environ is None else environ
        self.stop_grace = stop_grace
        self.log_max_bytes = log_max_bytes
        self._killpg = os.killpg if killpg is None else killpg
        self.daemon_url: str | None = None
        self.observer = False
        self._agents: dict[str, _Agent] = {}
        self._attached: dict[str, ClientSession] = {}
        self._waiters: list[tuple[str, frozenset[str], Deferred[ManagedAgent]]] = []
        self._loaded = False
        self._closing = False
        self._lock_fd: int | None = None
        self._dummy_token = mint_token()

    # -- manifest ----------------------------------------------------------------

    def load(self) -> None:
        """Read ``agents.json`` and take its lock (else: observe-only)."""
        if self._loaded:
            return
        self._loaded = True
        ensure_private_dir(self.manifest_path.parent)
        fd = open_private(Path(f"{self.manifest_path}.lock"), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock_fd = fd
        except OSError:
            os.close(fd)
            self.observer = True
            self._log.warn(
                "another daemon supervises {manifest}: agents.* is observe-only here",
                manifest=str(self.manifest_path),
            )
        try:
            entries = load_manifest(self.manifest_path)
        except UnsafeStateError:
            raise  # someone else's file: never "repair" it by renaming
        except (ValueError, KeyError, TypeError, AttributeError):
            self._log.failure("cannot read {manifest}; starting with no agents", manifest=str(self.manifest_path))
            if not self.observer:
                os.replace(self.manifest_path, f"{self.manifest_path}.unreadable")
            entries = []
        self._agents = {e.spec.id: _Agent(e) for e in entries}

    def _save(self) -> None:
        save_manifest(self.manifest_path, [a.entry for a in self._agents.values()])

    def _owner(self) -> None:
        self.load()
        if self.observer:
            raise RpcError(
                f"observe-only: {self.manifest_path} is supervised by another daemon; "
                "send agents.* to that daemon or give this one its own CAR_HOME"
            )

    def _get(self, agent_id: str) -> _Agent:
        self.load()
        agent = self._agents.get(agent_id)
        if agent is None:
            raise InvalidParams("id", f"no agent {agent_id!r} in the manifest")
        return agent

    def log_for(self, agent_id: str, stream: str) -> AgentLog:
        return AgentLog(self.log_path(agent_id, stream), self.log_max_bytes)

    def log_path(self, agent_id: str, stream: str) -> Path:
        return self.logs_dir / f"{agent_id}.{stream}.log"

    # -- views ---------------------------------------------------------------------

    def managed(self, agent: _Agent) -> ManagedAgent:
        session = self._attached.get(agent.spec.id)
        return {
            "id": agent.spec.id,
            "spec": agent.spec.to_wire(),
            "status": agent.status,
            "pid": agent.pid,
            "last_exit_code": agent.last_exit_code,
            "restart_count": agent.restart_count,
            "started_at": iso_utc(agent.started_at) if agent.started_at is not None else None,
            "attached": session is not None,
            "session_id": session.client_id if session is not None else None,
            **({"blocked_by_pid": agent.blocked_by_pid} if agent.blocked_by_pid is not None else {}),
        }

    def list(self) -> list[ManagedAgent]:
        self.load()
        return [self.managed(a) for a in sorted(self._agents.values(), key=lambda a: a.spec.id)]

    def health(self) -> HealthReport:
        self.load()
        out = []
        for agent in sorted(self._agents.values(), key=lambda a: a.spec.id):
            problem = spec_problem(agent.spec)
            entry: dict[str, object] = {"id": agent.spec.id, "command": agent.spec.command, "ok": problem is None}
            if problem is not None:
                entry["reason"] = problem
            out.append(entry)
        return out

    # -- manifest changes --------------------------------------------------------------

    def upsert(self, spec: AgentSpec) -> Deferred[ManagedAgent]:
        """
        Create or update an agent; fires with its ``ManagedAgent``.

        A change of command, args, env or cwd mints a new token: the
        connection bound with the old one is closed and unbound (the old
        token no longer verifies), and a running child is restarted with
        the new spec before this fires.  Other changes keep the token.
        """
        self._owner()
        agent = self._agents.get(spec.id)
        if agent is None:
            if len(self._agents) >= MAX_AGENTS:
                raise RpcError(f"too many agents: at most {MAX_AGENTS}")
            agent = _Agent(ManifestEntry(spec, mint_token()))
            self._agents[spec.id] = agent
            try:
                self._save()
            except BaseException:
                del self._agents[spec.id]
                raise
            self._log.info("agent {agent_id} upserted ({command})", agent_id=spec.id, command=spec.command)
            return succeed(self.managed(agent))
        rotate = launch_fields(agent.spec) != launch_fields(spec)
        previous = agent.entry
        agent.entry = ManifestEntry(spec, mint_token() if rotate else previous.token)
        try:
            self._save()
        except BaseException:
            agent.entry = previous
            raise
        self._log.info("agent {agent_id} upserted ({command})", agent_id=spec.id, command=spec.command)
        if not rotate:
            return succeed(self.managed(agent))
        self._revoke(spec.id)
        if agent.process is None or agent.stopping:
            # Not running (a pending restart spawns the new spec), or a
            # stop already under way: that stop stands.
            return succeed(self.managed(agent))
        self._log.info("agent {agent_id} restarts with its new spec", agent_id=spec.id)

        def start_again(_: None) -> ManagedAgent:
            if self._agents.get(spec.id) is not agent:
                return self.managed(agent)  # removed meanwhile
            return self.start(spec.id)

        return self._stop(agent, "term").addCallback(start_again)

    def _revoke(self, agent_id: str) -> None:
        """Unbind and close the connection that holds the agent's old token."""
        session = self._attached.pop(agent_id, None)
        if session is None or session.closed:
            return
        self._log.info(
            "agent {agent_id}'s token was rotated; closing its connection {client_id}",
            agent_id=agent_id,
            client_id=session.client_id,
        )
        session.disconnect(*ROTATED_CLOSE)

    def store_manifest(self, agent_id: str, manifest: Mapping[str, JsonValue]) -> Path:
        """Keep the manifest of an installed agent that names no command."""
        self._owner()
        path = store_installed(self.home, agent_id, manifest)
        self._log.info("agent {agent_id} installed as data ({path})", agent_id=agent_id, path=str(path))
        return path

    def remove(self, agent_id: str) -> Deferred[dict[str, bool]]:
        self._owner()
        agent = self._agents.get(agent_id)
        if agent is None:
            return succeed({"removed": False})
        d = self._stop(agent, "term")

        def forget(_: None) -> dict[str, bool]:
            if self._agents.get(agent_id) is agent:
                del self._agents[agent_id]
                self._save()
                self._notify(agent_id)
            return {"removed": True}

        return d.addCallback(forget)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, agent_id: str) -> ManagedAgent:
        self._owner()
        agent = self._get(agent_id)
        if agent.status in ("running", "starting"):
            return self.managed(agent)
        self._cancel_restart(agent)
        agent.restart_count = 0
        agent.quick_failures = 0
        self._spawn(agent)
        return self.managed(agent)

    def stop(self, agent_id: str, signal: str = "term") -> Deferred[ManagedAgent]:
        self._owner()
        agent = self._get(agent_id)
        return self._stop(agent, signal).addCallback(lambda _: self.managed(agent))

    def restart(self, agent_id: str) -> Deferred[ManagedAgent]:
        self._owner()
        agent = self._get(agent_id)
        return self._stop(agent, "term").addCallback(lambda _: self.start(agent_id))

    def boot(self) -> None:
        """Start every ``auto_start`` agent (daemon start-up)."""
        self.load()
        if self.observer:
            return
        for agent in list(self._agents.values()):
            if agent.spec.auto_start and agent.status not in ("running", "starting"):
                try:
                    self.start(agent.spec.id)
                except Exception:
                    self._log.failure("auto-start of agent {agent_id} failed", agent_id=agent.spec.id)

    def shutdown(self) -> Deferred[None]:
        """
        Stop every child (SIGTERM, then SIGKILL after the grace).  Fires
        once they have all exited, or at the latest the stop grace plus
        ``SHUTDOWN_MARGIN_SECS`` from now (logging the agents that did not
        exit): daemon shutdown never hangs on a child.
        """
        # Nothing starts from here on (a restart whose stop ends now, say).
        self._closing = True
        stops = {agent_id: self._stop(a, "term") for agent_id, a in self._agents.items()}
        done: Deferred[None] = Deferred()

        def release() -> None:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            if not done.called:
                done.callback(None)

        def give_up() -> None:
            stuck = sorted(agent_id for agent_id, d in stops.items() if not d.called)
            self._log.warn(
                "agents {agent_ids} did not exit within {secs}s of shutdown; not waiting for them",
                agent_ids=", ".join(stuck),
                secs=limit,
            )
            release()

        def all_exited(_: object) -> None:
            if timer.active():
                timer.cancel()
            release()

        limit = self.stop_grace + SHUTDOWN_MARGIN_SECS
        timer = self.reactor.callLater(limit, give_up)
        DeferredList(list(stops.values()), consumeErrors=True).addCallback(all_exited)
        return done

    def _child_env(self, agent: _Agent) -> dict[str, str]:
        # The daemon's own CAR_* settings (its token above all) stay out.
        env = {k: v for k, v in self.environ.items() if not k.startswith("CAR_")}
        env.update(agent.spec.env)
        env["CAR_AGENT_ID"] = agent.spec.id
        env["CAR_AGENT_TOKEN"] = agent.entry.token
        if self.daemon_url is not None:
            env["CAR_DAEMON_URL"] = self.daemon_url
        return env

    def _pid_file(self, agent_id: str) -> Path:
        return self.pids_dir / f"{agent_id}.pid"

    def _spawn(self, agent: _Agent) -> None:
        spec = agent.spec
        if self._closing:
            self._set(agent, "stopped")
            return
        problem = spec_problem(spec)
        if problem is not None:
            self._log.error("agent {agent_id} cannot start: {problem}", agent_id=spec.id, problem=problem)
            self._set(agent, "errored")
            return
        survivor = surviving_pid(self._pid_file(agent.spec.id), agent.spec.command)
        if survivor is not None:
            if agent.blocked_by_pid != survivor:
                self._log.warn(
                    "agent {agent_id} is still running as pid {pid} from an earlier daemon; "
                    "waiting for it to exit before starting another",
                    agent_id=spec.id,
                    pid=survivor,
                )
            agent.blocked_by_pid = survivor
            self._set(agent, "backoff")
            agent.restart_timer = self.reactor.callLater(SURVIVOR_RECHECK_SECS, self._restart_due, agent)
            return
        agent.blocked_by_pid = None
        self._set(agent, "starting")
        logs = {name: self.log_for(spec.id, name) for name in ("stdout", "stderr")}
        child = AgentProcess(spec.id, logs, lambda proc, code: self._exited(agent, proc, code), self._kill_group)
        try:
            # The wrapper puts the command in its own process group (see
            # ``process``); the agent's argv, env and cwd are unchanged.
            # The daemon's reactor spawns processes; a test's clock never gets here.
            process = cast(IReactorProcess, self.reactor).spawnProcess(
                child,
                sys.executable,
                wrapper_argv(sys.executable, spec.command, spec.args),
                env=self._child_env(agent),
                path=spec.cwd,
            )
        except OSError as e:
            self._log.error("agent {agent_id} failed to spawn: {error}", agent_id=spec.id, error=str(e))
            agent.last_exit_code = None
            self._after_failure(agent, ran=0.0)
            return
        agent.process, agent.protocol = process, child
        agent.last_launch = launch_fields(spec)
        agent.pid = process.pid
        agent.started_at = self.reactor.seconds()
        try:
            write_secret_file(self._pid_file(spec.id), str(agent.pid))
        except OSError:
            self._log.failure("cannot record the pid of agent {agent_id}", agent_id=spec.id)
        self._set(agent, "running")
        self._log.info("agent {agent_id} started (pid {pid})", agent_id=spec.id, pid=agent.pid)

    def _stop(self, agent: _Agent, signal: str) -> Deferred[None]:
        self._cancel_restart(agent)
        if agent.process is None:
            if agent.status == "backoff":
                self._set(agent, "stopped")
            return succeed(None)
        agent.stopping = True
        d: Deferred[None] = Deferred()
        agent.exit_waiters.append(d)
        self._signal(agent, agent.process, "KILL" if signal == "kill" else "TERM")
        if signal != "kill" and agent.kill_timer is None and agent.process is not None:
            agent.kill_timer = self.reactor.callLater(self.stop_grace, self._escalate, agent)
        return d

    def _escalate(self, agent: _Agent) -> None:
        agent.kill_timer = None
        if agent.process is not None:
            self._log.warn(
                "agent {agent_id} ignored SIGTERM for {secs}s; sending SIGKILL",
                agent_id=agent.spec.id,
                secs=self.stop_grace,
            )
            self._signal(agent, agent.process, "KILL")

    def _signal(self, agent: _Agent, process: IProcessTransport, name: str) -> None:
        assert agent.pid is not None
        signal_group(self._killpg, agent.pid, process, name)

    def _kill_group(self, pgid: int) -> None:
        kill_group(self._killpg, pgid)

    def _cancel_restart(self, agent: _Agent) -> None:
        if agent.restart_timer is not None and agent.restart_timer.active():
            agent.restart_timer.cancel()
        agent.restart_timer = None

    def _exited(self, agent: _Agent, child: AgentProcess, exit_code: int) -> None:
        if agent.protocol is not child:
            return
        ran = self.reactor.seconds() - (agent.started_at or self.reactor.seconds())
        agent.process = agent.protocol = None
        agent.pid = None
        agent.last_exit_code = exit_code
        try:
            self._pid_file(agent.spec.id).unlink()
        except OSError:
            pass
        if agent.kill_timer is not None and agent.kill_timer.active():
            agent.kill_timer.cancel()
        agent.kill_timer = None
        self._log.info("agent {agent_id} exited with {code}", agent_id=agent.spec.id, code=exit_code)
        if agent.stopping:
            agent.stopping = False
            self._set(agent, "stopped")
            waiters, agent.exit_waiters = agent.exit_waiters, []
            for d in waiters:
                if not d.called:
                    d.callback(None)
            return
        policy = agent.spec.restart
        if policy == "always" or (policy == "on_failure" and exit_code != 0):
            self._after_failure(agent, ran)
        else:
            self._set(agent, "stopped" if exit_code == 0 else "errored")

    def _after_failure(self, agent: _Agent, ran: float) -> None:
        spec = agent.spec
        if spec.max_restarts is not None and agent.restart_count >= spec.max_restarts:
            self._log.error(
                "agent {agent_id} gave up after {count} restarts", agent_id=spec.id, count=agent.restart_count
            )
            self._set(agent, "errored")
            return
        agent.restart_count += 1
        self.stats.agent_restarts += 1
        agent.quick_failures = agent.quick_failures + 1 if ran < STABLE_RUN_SECS else 1
        delay = min(spec.backoff_secs * 2 ** (agent.quick_failures - 1), max(spec.backoff_secs, MAX_BACKOFF_SECS))
        self._set(agent, "backoff")
        agent.restart_timer = self.reactor.callLater(delay, self._restart_due, agent)

    def _restart_due(self, agent: _Agent) -> None:
        agent.restart_timer = None
        if self._agents.get(agent.spec.id) is agent and agent.status == "backoff":
            self._spawn(agent)

    def launch_changed(self, agent_id: str) -> str | None:
        """
        Why starting C{agent_id} now runs something new: its command,
        arguments, environment or working directory differ from what it
        last ran as in this daemon.  None when it never ran here, or runs
        the same (the approval gate's rule for ``agents.start``).
        """
        agent = self._agents.get(agent_id)
        if agent is None or agent.last_launch is None or agent.last_launch == launch_fields(agent.spec):
            return None
        return f"agent '{agent_id}' would run {agent.spec.command} with a launch spec that changed since it last ran"

    # -- waiting -----------------------------------------------------------------------

    def _set(self, agent: _Agent, status: str) -> None:
        changed = agent.status != status
        agent.status = status
        self._notify(agent.spec.id)
        if changed and self.on_status is not None:
            try:
                self.on_status(agent.spec.id, status, agent.pid, agent.restart_count, agent.last_exit_code)
            except Exception:
                self._log.failure("status listener failed for agent {agent_id}", agent_id=agent.spec.id)

    def _notify(self, agent_id: str) -> None:
        agent = self._agents.get(agent_id)
        for entry in list(self._waiters):
            wid, targets, d = entry
            if wid != agent_id or d.called:
                continue
            if agent is None:
                self._waiters.remove(entry)
                d.errback(InvalidParams("id", f"agent {agent_id!r} was removed"))
            elif agent.status in targets:
                self._waiters.remove(entry)
                d.callback(self.managed(agent))

    def wait(self, agent_id: str, targets: Iterable[str], timeout: float) -> Deferred[ManagedAgent]:
        """Fire with the agent once its status is in C{targets} (event-driven)."""
        agent = self._get(agent_id)
        wanted = frozenset(targets)
        if agent.status in wanted:
            return succeed(self.managed(agent))
        d: Deferred[ManagedAgent] = Deferred()
        entry = (agent_id, wanted, d)
        self._waiters.append(entry)

        def expired(failure: Failure) -> Failure:
            if entry in self._waiters:
                self._waiters.remove(entry)
            if failure.check(TimeoutError):
                raise RpcError(
                    f"WaitTimeout: agent {agent_id!r} did not reach {sorted(wanted)} within {timeout:g}s",
                    data={"status": self._agents[agent_id].status if agent_id in self._agents else None},
                )
            return failure

        return d.addTimeout(timeout, self.reactor).addErrback(expired)

    def tail_log(self, agent_id: str, streams: tuple[str, ...], n: int, offset: int) -> Deferred[dict[str, object]]:
        self._get(agent_id)
        paths = {name: self.log_path(agent_id, name) for name in ("stdout", "stderr")}
        return off_reactor(self.reactor, tail_streams, paths, streams, n, offset)

    # -- IAgentIdentities ------------------------------------------------------------------

    def verify(self, agent_id: str, token: str) -> bool:
        self.load()
        agent = self._agents.get(agent_id)
        # Compare against a dummy for unknown ids so timing does not tell.
        expected = agent.entry.token if agent is not None else self._dummy_token
        return tokens_equal(token, expected) and agent is not None

    def attach(self, agent_id: str, session: ClientSession) -> None:
        current = self._attached.get(agent_id)
        if current is not None and current is not session and not current.closed:
            raise AgentAlreadyAttached(agent_id)
        self._attached[agent_id] = session
        self._log.info("agent {agent_id} attached as {client_id}", agent_id=agent_id, client_id=session.client_id)

    def detach(self, agent_id: str, session: ClientSession) -> None:
        if self._attached.get(agent_id) is session:
            del self._attached[agent_id]
