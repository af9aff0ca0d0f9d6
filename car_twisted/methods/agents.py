"""
``agents.*``: the manifest and supervision of agent processes.

Every method works on ``state.agents`` (the ``Supervisor``).  Results are
``ManagedAgent`` objects: ``{id, spec, status, pid, last_exit_code,
restart_count, started_at, attached, session_id}``; agent tokens never
appear in them.

Roles: ``agents.upsert``, ``agents.remove`` and ``agents.install`` decide
what runs as the daemon's user, so they need the host role (the host
token).  A connection holding only an agent's own token reads only that
agent's log.  The lifecycle and read methods (``start``, ``stop``,
``restart``, ``wait``, ``list``, ``health``) are open to every
authenticated connection: they run nothing that a host did not put in the
manifest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, cast

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from car_twisted._version import __version__
from car_twisted.agents.manifest import AgentSpec, check_agent_id, parse_agent_spec
from car_twisted.agents.supervisor import STATUSES, HealthReport, ManagedAgent, Supervisor
from car_twisted.errors import Forbidden, InvalidParams
from car_twisted.interfaces import IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.proposal.ir import JsonObject
from car_twisted.rpc.registry import MethodSpec
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["AgentMethods", "version_satisfies", "TRANSPORT_KINDS"]

_ID = {"max_len": 64}
TRANSPORT_KINDS = ("external_process", "pure_data")
# ``transport`` fields of an external process, and where they go in a spec.
_LAUNCH_KEYS = ("command", "interpreter", "args", "env", "cwd")
_LIFECYCLE_KEYS = ("restart", "max_restarts", "backoff_secs", "auto_start")
_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)$")
_REQUIREMENT = re.compile(r"^(>=|<=|>|<|==|=)?\s*(\S+)$")
_CAPABILITY_LIMIT = 64
# (Aliases: ``list`` is a method name inside AgentMethods.)
ManagedAgents = list[ManagedAgent]
MissingFeatures = list[dict[str, str | None]]


@attrs.frozen
class IdParams:
    id: str = attrs.field(metadata=_ID)


@attrs.frozen
class StopParams:
    id: str = attrs.field(metadata=_ID)
    signal: str = "term"


@attrs.frozen
class WaitParams:
    id: str = attrs.field(metadata=_ID)
    targets: list[str] | None = attrs.field(default=None, metadata={"max_len": 8})
    timeout_secs: float = 30.0
    poll_ms: float = 200.0


@attrs.frozen
class TailParams:
    id: str = attrs.field(metadata=_ID)
    n: int | None = None
    lines: int | None = None
    stream: str = "combined"
    offset: int = 0


@implementer(IMethodProvider)
class AgentMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def supervisor(self) -> Supervisor:
        return self.state.agents

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec("agents.list", self.list, description="Every manifest agent with its live status."),
            MethodSpec("agents.upsert", self.upsert, description="Host only: create or update an agent spec (not started)."),
            MethodSpec("agents.install", self.install, description="Host only: install an agent from its manifest."),
            MethodSpec("agents.health", self.health, description="Re-validate every agent's command."),
            MethodSpec("agents.remove", self.remove, params=IdParams, description="Host only: stop and forget an agent."),
            MethodSpec("agents.start", self.start, params=IdParams, description="Spawn an agent if not running.",
                       approval=self._launch_changed),
            MethodSpec("agents.stop", self.stop, params=StopParams, description="SIGTERM, grace, SIGKILL (or kill at once)."),
            MethodSpec("agents.restart", self.restart, params=IdParams, description="Stop, then start.",
                       approval=self._launch_changed),
            MethodSpec("agents.wait", self.wait, params=WaitParams, description="Wait for an agent to reach a status."),
            MethodSpec("agents.tail_log", self.tail_log, params=TailParams, description="The end of an agent's stdout/stderr."),
        )

    def list(self, session: ClientSession, params: JsonValue) -> ManagedAgents:
        return self.supervisor.list()

    def upsert(self, session: ClientSession, params: JsonValue) -> Deferred[ManagedAgent]:
        _need_host(session, "agents.upsert")
        spec = parse_agent_spec(params, os.environ)
        return self.supervisor.upsert(spec)

    def health(self, session: ClientSession, params: JsonValue) -> HealthReport:
        return self.supervisor.health()

    def remove(self, session: ClientSession, p: IdParams) -> Deferred[dict[str, bool]]:
        _need_host(session, "agents.remove")
        return self.supervisor.remove(p.id)

    def _launch_changed(self, session: ClientSession, p: IdParams) -> str | None:
        """The approval gate's rule: a start that runs a changed launch spec waits for approval."""
        return self.supervisor.launch_changed(p.id)

    def start(self, session: ClientSession, p: IdParams) -> ManagedAgent:
        return self.supervisor.start(p.id)

    def stop(self, session: ClientSession, p: StopParams) -> Deferred[ManagedAgent]:
        if p.signal not in ("term", "kill"):
            raise InvalidParams("signal", "expected term or kill")
        return self.supervisor.stop(p.id, p.signal)

    def restart(self, session: ClientSession, p: IdParams) -> Deferred[ManagedAgent]:
        return self.supervisor.restart(p.id)

    def wait(self, session: ClientSession, p: WaitParams) -> Deferred[ManagedAgent]:
        targets = tuple(p.targets) if p.targets is not None else ("running",)
        bad = [t for t in targets if t not in STATUSES]
        if bad or not targets:
            raise InvalidParams("targets", "expected statuses among " + ", ".join(STATUSES))
        if not 0 <= p.timeout_secs <= 3600:
            raise InvalidParams("timeout_secs", "expected 0 to 3600 seconds")
        return self.supervisor.wait(p.id, targets, p.timeout_secs)

    def tail_log(self, session: ClientSession, p: TailParams) -> Deferred[dict[str, object]]:
        if session.agent_only and p.id != session.agent_id:
            raise Forbidden(
                f"a connection bound to agent {session.agent_id!r} reads only that agent's log "
                "(the daemon token or the host token reads any)"
            )
        n = p.n if p.n is not None else (p.lines if p.lines is not None else 100)
        if not 0 <= n <= 100_000:
            raise InvalidParams("n", "expected 0 to 100000 lines")
        if not 0 <= p.offset <= 10_000_000:
            raise InvalidParams("offset", "expected a non-negative line count")
        streams = {"combined": ("stdout", "stderr"), "stdout": ("stdout",), "stderr": ("stderr",)}.get(p.stream)
        if streams is None:
            raise InvalidParams("stream", "expected combined, stdout or stderr")
        return self.supervisor.tail_log(p.id, streams, n, p.offset)

    # -- agents.install ------------------------------------------------------------

    def install(self, session: ClientSession, params: JsonValue) -> dict[str, object] | Deferred[dict[str, object]]:
        """
        Install an agent from its manifest ``{agent, transport, runtime?,
        capabilities?}``: check the daemon's version and methods against
        it, then adopt an external process through the same path as
        ``agents.upsert``, or keep a manifest with nothing to run.
        """
        _need_host(session, "agents.install")
        if type(params) is not dict:
            raise InvalidParams("params", "expected an agent manifest object")
        agent = params.get("agent")
        if type(agent) is not dict:
            raise InvalidParams("agent", "expected an object with at least an id")
        agent_id = check_agent_id(agent.get("id"), "agent.id")
        transport = params.get("transport")
        if type(transport) is not dict or transport.get("kind") not in TRANSPORT_KINDS:
            raise InvalidParams("transport", "expected an object with kind " + " or ".join(TRANSPORT_KINDS))
        _check_runtime(params.get("runtime"))
        report: dict[str, object] = {"missingOptional": self._check_capabilities(params.get("capabilities"))}
        launch = _launch_table(transport)
        if launch is None:
            self.supervisor.store_manifest(agent_id, params)
            return {"report": report, "agent": None}
        spec = _install_spec(agent_id, agent, launch, params.get("lifecycle"))
        return maybeDeferred(self.supervisor.upsert, spec).addCallback(
            lambda managed: {"report": report, "agent": managed}
        )

    def _check_capabilities(self, raw: JsonValue) -> MissingFeatures:
        """
        Fail on a required namespace the daemon serves no method of; list
        the features of missing optional namespaces.
        """
        if raw is None:
            return []
        if type(raw) is not dict:
            raise InvalidParams("capabilities", "expected {required?, optional?}")
        served = self.state.capability_names()
        required = _capability_table(raw, "required")
        for namespace, features in required.items():
            if namespace not in served:
                wanted = f" ({', '.join(features)})" if features else ""
                raise InvalidParams(
                    f"capabilities.required.{namespace}",
                    f"this daemon serves no {namespace}.* method{wanted}",
                )
        missing: MissingFeatures = []
        for namespace, features in _capability_table(raw, "optional").items():
            if namespace not in served:
                # A namespace asked for as a whole is reported as such.
                missing.extend({"namespace": namespace, "feature": f} for f in (features or (None,)))
        return missing


def _need_host(session: ClientSession, method: str) -> None:
    if not session.is_host:
        raise Forbidden(f"{method} needs the host role (session.auth with the host token)")


def _capability_table(raw: Mapping[str, JsonValue], key: str) -> dict[str, list[str]]:
    table = raw.get(key) or {}
    field = f"capabilities.{key}"
    if type(table) is not dict or len(table) > _CAPABILITY_LIMIT:
        raise InvalidParams(field, f"expected an object of at most {_CAPABILITY_LIMIT} namespaces")
    for namespace, features in table.items():
        if not namespace or len(namespace) > 256:
            raise InvalidParams(field, "namespaces are non-empty strings of at most 256 characters")
        if (
            type(features) is not list
            or len(features) > _CAPABILITY_LIMIT
            or any(type(f) is not str or not f or len(f) > 256 for f in features)
        ):
            raise InvalidParams(f"{field}.{namespace}", "expected an array of feature names")
    return cast("dict[str, list[str]]", table)  # every entry checked above


def _launch_table(transport: Mapping[str, JsonValue]) -> Mapping[str, JsonValue] | None:
    """
    Where an external process's command, args, env and cwd are: the
    ``external_process`` sub-object if given, else ``transport`` itself.
    None when there is nothing to run.
    """
    if transport["kind"] != "external_process":
        return None
    nested = transport.get("external_process")
    if nested is not None and type(nested) is not dict:
        raise InvalidParams("transport.external_process", "expected an object")
    launch = nested if nested is not None else transport
    if launch.get("command") is None and launch.get("interpreter") is None:
        return None
    return launch


def _install_spec(
    agent_id: str, agent: Mapping[str, JsonValue], launch: Mapping[str, JsonValue], lifecycle: JsonValue
) -> AgentSpec:
    """The ``agents.upsert`` spec an installed external process stands for."""
    given: JsonObject = {}
    if lifecycle is not None:
        if type(lifecycle) is not dict:
            raise InvalidParams("lifecycle", "expected an object")
        given = lifecycle
    raw: JsonObject = {"id": agent_id}
    if agent.get("name") is not None:
        raw["name"] = agent["name"]
    raw.update((k, launch[k]) for k in _LAUNCH_KEYS if launch.get(k) is not None)
    raw.update((k, given[k]) for k in _LIFECYCLE_KEYS if given and k in given)
    try:
        return parse_agent_spec(raw, os.environ)
    except InvalidParams as e:
        head = e.field.split(".", 1)[0].split("[", 1)[0]
        table = "agent" if head in ("id", "name") else "lifecycle" if head in _LIFECYCLE_KEYS else "transport"
        raise InvalidParams(f"{table}.{e.field}", e.problem) from None


def _version_tuple(text: str) -> tuple[int, ...] | None:
    match = _VERSION.match(text.strip())
    if match is None:
        return None
    parts = tuple(int(p) for p in match.group(1).split("."))
    return parts + (0,) * (3 - len(parts))


def version_satisfies(version: str, requirement: str) -> bool:
    """
    Whether C{version} meets C{requirement}: comma-separated comparisons
    (``>=0.8, <0.9``); a bare version is a minimum.

    @raise ValueError: a requirement this does not understand.
    """
    have = _version_tuple(version.split("+", 1)[0].split("-", 1)[0])
    if have is None:
        raise ValueError(f"unparseable daemon version {version!r}")
    for clause in requirement.split(","):
        match = _REQUIREMENT.match(clause.strip())
        want = _version_tuple(match.group(2)) if match else None
        if match is None or want is None:
            raise ValueError(f"cannot read {clause.strip()!r} (expected a version like 0.8 or >=0.8, <0.9)")
        op = match.group(1) or ">="
        ok = {
            ">=": have >= want,
            ">": have > want,
            "<=": have <= want,
            "<": have < want,
            "==": have == want,
            "=": have == want,
        }[op]
        if not ok:
            return False
    return True


def _check_runtime(raw: JsonValue) -> None:
    if raw is None:
        return
    if type(raw) is not dict:
        raise InvalidParams("runtime", "expected an object")
    requirement = raw.get("car_min_version")
    if requirement is None:
        return
    if type(requirement) is not str or not requirement.strip() or len(requirement) > 128:
        raise InvalidParams("runtime.car_min_version", "expected a version requirement string")
    try:
        ok = version_satisfies(__version__, requirement)
    except ValueError as e:
        raise InvalidParams("runtime.car_min_version", str(e)) from None
    if not ok:
        raise InvalidParams(
            "runtime.car_min_version", f"the agent needs car {requirement}; this daemon is {__version__}"
        )
