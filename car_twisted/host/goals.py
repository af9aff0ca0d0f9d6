"""
``GoalStore``: standing completion contracts for chat sessions (``goal.*``).

A goal is a deterministic check (a shell command the agent runs after each
iteration) and an iteration budget, kept per chat ``session_id`` and
applied to ``agents.chat`` when the call brings no goal of its own.  Its
status follows the chat's ``goal_evaluated``, ``done`` and ``error``
events.  The store is ``$CAR_HOME/chat-goals.json``, rewritten atomically
(temp + rename, 0600) off the reactor thread after each change, one write
at a time; a ``running`` status left by an earlier daemon reloads as
``active``.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted._util import iso_utc, off_reactor
from car_twisted.auth import write_secret_file
from car_twisted.errors import RpcError
from car_twisted.json_value import JsonValue
from car_twisted.private_files import read_private

__all__ = [
    "ChatGoal",
    "GoalStore",
    "DEFAULT_MAX_ITERATIONS",
    "MAX_GOALS",
    "clamp_iterations",
]

DEFAULT_MAX_ITERATIONS = 8
MAX_GOALS = 1024


def clamp_iterations(value: int | None) -> int:
    """``max_iterations``: default 8, clamped to 1..50."""
    if value is None:
        return DEFAULT_MAX_ITERATIONS
    return max(1, min(50, value))


@attrs.define(eq=False)
class ChatGoal:
    session_id: str
    check: str
    max_iterations: int
    updated_at: str
    status: str = "active"
    last_iteration: int | None = None
    last_met: bool | None = None
    last_grounded: bool | None = None
    last_reason: str | None = None
    terminal_kind: str | None = None
    terminal_message: str | None = None

    def to_wire(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {
            "session_id": self.session_id,
            "check": self.check,
            "max_iterations": self.max_iterations,
            "status": self.status,
            "updated_at": self.updated_at,
        }
        for name in ("last_iteration", "last_met", "last_grounded", "last_reason", "terminal_kind", "terminal_message"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def contract(self) -> dict[str, JsonValue]:
        """What ``agent.chat`` carries as ``goal``."""
        return {"check": self.check, "max_iterations": self.max_iterations}


class GoalStore:
    _log = Logger()

    def __init__(self, reactor: IReactorTime, path: Path) -> None:
        self.reactor = reactor
        self.path = path
        self._goals: dict[str, ChatGoal] | None = None
        self._writing: Deferred[None] = succeed(None)

    # -- load and save ---------------------------------------------------------------

    def _all(self) -> dict[str, ChatGoal]:
        if self._goals is None:
            self._goals = self._load()
        return self._goals

    def _load(self) -> dict[str, ChatGoal]:
        # Small and bounded (MAX_GOALS rows): read once, on first use.
        try:
            raw = json.loads(read_private(self.path))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            self._log.failure("cannot read {path}; starting with no goals", path=str(self.path))
            return {}
        goals: dict[str, ChatGoal] = {}
        for item in raw.get("goals", []) if isinstance(raw, dict) else []:
            try:
                goal = ChatGoal(**{f.name: item[f.name] for f in attrs.fields(ChatGoal) if f.name in item})
            except (TypeError, KeyError):
                continue
            if goal.status == "running":
                goal.status = "active"  # the daemon that ran it is gone
            goals[goal.session_id] = goal
        return goals

    def _save(self) -> Deferred[None]:
        body = json.dumps({"version": 1, "goals": [g.to_wire() for g in self._all().values()]}, sort_keys=True)

        def write(_: object) -> Deferred[None]:
            return off_reactor(self.reactor, write_secret_file, self.path, body)

        def failed(failure: Failure) -> None:
            self._log.failure("cannot write {path}", failure=failure, path=str(self.path))

        # One write at a time, in order; a failure is logged, never raised.
        self._writing = self._writing.addCallback(write).addErrback(failed)
        return self._writing

    # -- the goals -------------------------------------------------------------------

    def set(self, session_id: str, check: str, max_iterations: int | None) -> ChatGoal:
        goals = self._all()
        if session_id not in goals and len(goals) >= MAX_GOALS:
            raise RpcError(f"too many standing goals: at most {MAX_GOALS}", data={"reason": "goals", "limit": MAX_GOALS})
        goal = ChatGoal(session_id, check, clamp_iterations(max_iterations), iso_utc(self.reactor.seconds()))
        goals[session_id] = goal
        self._save()
        return goal

    def get(self, session_id: str) -> ChatGoal | None:
        return self._all().get(session_id)

    def every(self) -> list[ChatGoal]:
        return sorted(self._all().values(), key=lambda g: g.session_id)

    def clear(self, session_id: str | None) -> int:
        goals = self._all()
        if session_id is None:
            count = len(goals)
            goals.clear()
        else:
            count = 1 if goals.pop(session_id, None) is not None else 0
        if count:
            self._save()
        return count

    def observe(self, session_id: str, kind: str, event: dict[str, JsonValue]) -> None:
        """Follow a chat event of C{session_id}'s standing goal, if it has one."""
        goal = self._all().get(session_id)
        if goal is None or kind not in ("goal_evaluated", "done", "error"):
            return
        goal.updated_at = iso_utc(self.reactor.seconds())
        if kind == "goal_evaluated":
            iteration, met, grounded, reason = (event.get(k) for k in ("iteration", "met", "grounded", "reason"))
            goal.last_iteration = iteration if isinstance(iteration, int) else goal.last_iteration
            goal.last_met = met if isinstance(met, bool) else goal.last_met
            goal.last_grounded = grounded if isinstance(grounded, bool) else goal.last_grounded
            goal.last_reason = reason[:1024] if isinstance(reason, str) else goal.last_reason
            goal.status = "met" if goal.last_met else "running"
        else:
            message = event.get("message", event.get("delta"))
            goal.terminal_kind = kind
            goal.terminal_message = message[:1024] if isinstance(message, str) else None
            goal.status = ("met" if goal.last_met else "done") if kind == "done" else "errored"
        self._save()
