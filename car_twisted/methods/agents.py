"""
``agents.*``: the manifest and supervision of agent processes.

Every method works on ``state.agents`` (the ``Supervisor``).  Results are
``ManagedAgent`` objects: ``{id, spec, status, pid, last_exit_code,
restart_count, started_at, attached, session_id}``; agent tokens never
appear in them.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import attrs
from zope.interface import implementer

from car_twisted.agents.manifest import parse_agent_spec
from car_twisted.agents.supervisor import STATUSES
from car_twisted.errors import InvalidParams
from car_twisted.interfaces import IMethodProvider
from car_twisted.rpc.registry import MethodSpec
from car_twisted.session import ClientSession

__all__ = ["AgentMethods"]

_ID = {"max_len": 64}


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
    def __init__(self, state: Any) -> None:
        self.state = state

    @property
    def supervisor(self) -> Any:
        return self.state.agents

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec("agents.list", self.list, description="Every manifest agent with its live status."),
            MethodSpec("agents.upsert", self.upsert, description="Create or update an agent spec (not started)."),
            MethodSpec("agents.health", self.health, description="Re-validate every agent's command."),
            MethodSpec("agents.remove", self.remove, params=IdParams, description="Stop and forget an agent."),
            MethodSpec("agents.start", self.start, params=IdParams, description="Spawn an agent if not running."),
            MethodSpec("agents.stop", self.stop, params=StopParams, description="SIGTERM, grace, SIGKILL (or kill at once)."),
            MethodSpec("agents.restart", self.restart, params=IdParams, description="Stop, then start."),
            MethodSpec("agents.wait", self.wait, params=WaitParams, description="Wait for an agent to reach a status."),
            MethodSpec("agents.tail_log", self.tail_log, params=TailParams, description="The end of an agent's stdout/stderr."),
        )

    def list(self, session: ClientSession, params: Any) -> list[dict[str, Any]]:
        return self.supervisor.list()

    def upsert(self, session: ClientSession, params: Any) -> dict[str, Any]:
        spec = parse_agent_spec(params, os.environ)
        return self.supervisor.upsert(spec)

    def health(self, session: ClientSession, params: Any) -> list[dict[str, Any]]:
        return self.supervisor.health()

    def remove(self, session: ClientSession, p: IdParams) -> Any:
        return self.supervisor.remove(p.id)

    def start(self, session: ClientSession, p: IdParams) -> dict[str, Any]:
        return self.supervisor.start(p.id)

    def stop(self, session: ClientSession, p: StopParams) -> Any:
        if p.signal not in ("term", "kill"):
            raise InvalidParams("signal", "expected term or kill")
        return self.supervisor.stop(p.id, p.signal)

    def restart(self, session: ClientSession, p: IdParams) -> Any:
        return self.supervisor.restart(p.id)

    def wait(self, session: ClientSession, p: WaitParams) -> Any:
        targets = tuple(p.targets) if p.targets is not None else ("running",)
        bad = [t for t in targets if t not in STATUSES]
        if bad or not targets:
            raise InvalidParams("targets", "expected statuses among " + ", ".join(STATUSES))
        if not 0 <= p.timeout_secs <= 3600:
            raise InvalidParams("timeout_secs", "expected 0 to 3600 seconds")
        return self.supervisor.wait(p.id, targets, p.timeout_secs)

    def tail_log(self, session: ClientSession, p: TailParams) -> Any:
        n = p.n if p.n is not None else (p.lines if p.lines is not None else 100)
        if not 0 <= n <= 100_000:
            raise InvalidParams("n", "expected 0 to 100000 lines")
        if not 0 <= p.offset <= 10_000_000:
            raise InvalidParams("offset", "expected a non-negative line count")
        streams = {"combined": ("stdout", "stderr"), "stdout": ("stdout",), "stderr": ("stderr",)}.get(p.stream)
        if streams is None:
            raise InvalidParams("stream", "expected combined, stdout or stderr")
        return self.supervisor.tail_log(p.id, streams, n, p.offset)
