"""
``registry.*``: the file-based agent registry, for discovery across
processes.

Each agent owns one JSON file (``$CAR_HOME/registry/<name>.json``) that
tray UIs poll; ``registry_path`` picks another registry directory, which
must be ``$CAR_HOME/registry`` or lie below ``$CAR_HOME/registries/``.
The files and their bounds are ``car_twisted.agent_registry``'s; this
module parses params at the edge, turns the store's refusals into
JSON-RPC errors and runs the file work in the reactor's thread pool, so
every handler answers through a Deferred.  Times are whole Unix seconds
from the daemon's clock.

Roles: every authenticated connection may call these.  A connection
holding only an agent's own token acts for that agent: it registers,
heartbeats and unregisters only the entry named after its agent id, and
may not reap (which removes other agents' entries).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NoReturn, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from car_twisted._util import off_reactor
from car_twisted.agent_registry import (
    MAX_CAPABILITY_LEN,
    MAX_DISPLAY_NAME_LEN,
    MAX_NAME_LEN,
    MAX_URL_LEN,
    AgentEntry,
    RegistryError,
    RegistryFiles,
    RegistryFull,
    check_name,
    make_entry,
)
from car_twisted.errors import Forbidden, InvalidParams, RpcError
from car_twisted.interfaces import IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.private_files import UnsafeStateError
from car_twisted.rpc.params import parse_params
from car_twisted.rpc.registry import MethodSpec
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["RegistryMethods", "DEFAULT_MAX_AGE_SECS"]

R = TypeVar("R")
# (Aliases: ``list`` is a method name inside RegistryMethods.)
EntryList = list[dict[str, str | int | None]]
NameList = list[str]

DEFAULT_MAX_AGE_SECS = 60
_NAME = {"max_len": MAX_NAME_LEN}
_PATH = {"max_len": 4096}


@attrs.frozen
class EntryParams:
    """``registry.register``'s ``entry``: wire types and lengths (the store checks the rest)."""

    name: str = attrs.field(metadata=_NAME)
    dashboard_url: str = attrs.field(metadata={"max_len": MAX_URL_LEN})
    status: str | None = attrs.field(default=None, metadata={"max_len": 32})
    display_name: str | None = attrs.field(default=None, metadata={"max_len": MAX_DISPLAY_NAME_LEN})
    capability: str | None = attrs.field(default=None, metadata={"max_len": MAX_CAPABILITY_LEN})
    port: int | None = None
    pid: int | None = None
    # Any number (checked by the store): a float field would overflow on
    # an integer too big for a double.
    registered_at: JsonValue = None
    last_heartbeat_at: JsonValue = None


@attrs.frozen
class RegisterParams:
    entry: dict[str, JsonValue]
    registry_path: str | None = attrs.field(default=None, metadata=_PATH)


@attrs.frozen
class NameParams:
    name: str = attrs.field(metadata=_NAME)
    registry_path: str | None = attrs.field(default=None, metadata=_PATH)


@attrs.frozen
class PathParams:
    registry_path: str | None = attrs.field(default=None, metadata=_PATH)


@attrs.frozen
class ReapParams:
    max_age_secs: JsonValue = DEFAULT_MAX_AGE_SECS
    registry_path: str | None = attrs.field(default=None, metadata=_PATH)


@implementer(IMethodProvider)
class RegistryMethods:
    """The ``registry.*`` methods over one L{RegistryFiles} in the daemon's state root."""

    _log = Logger()

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.files = RegistryFiles(state.config.paths.home)

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec("registry.register", self.register, params=RegisterParams, description="Write an agent's registry entry."),
            MethodSpec("registry.heartbeat", self.heartbeat, params=NameParams, description="Refresh an entry's last_heartbeat_at."),
            MethodSpec("registry.unregister", self.unregister, params=NameParams, description="Remove an agent's entry (idempotent)."),
            MethodSpec("registry.list", self.list, params=PathParams, description="Every well-formed entry, sorted by name."),
            MethodSpec("registry.reap", self.reap, params=ReapParams, description="Remove entries without a recent heartbeat."),
        )

    def _now(self) -> int:
        return int(self.state.clock.seconds())

    def _run(self, fn: Callable[..., R], *args: object) -> Deferred[R]:
        return off_reactor(self.state.clock, fn, *args).addErrback(_as_rpc_error)

    def register(self, session: ClientSession, p: RegisterParams) -> Deferred[None]:
        try:
            e = parse_params(EntryParams, p.entry)
            _own_entry(session, check_name(e.name), "register")
            entry = make_entry(
                name=e.name,
                dashboard_url=e.dashboard_url,
                now=self._now(),
                status=e.status,
                display_name=e.display_name,
                capability=e.capability,
                port=e.port,
                pid=e.pid,
                registered_at=e.registered_at,
                last_heartbeat_at=e.last_heartbeat_at,
            )
        except (InvalidParams, RegistryError) as err:
            raise InvalidParams(f"entry.{err.field}", err.problem) from None
        return self._run(self.files.register, p.registry_path, entry)

    def heartbeat(self, session: ClientSession, p: NameParams) -> Deferred[dict[str, bool]]:
        name = _name(p.name)
        _own_entry(session, name, "heartbeat")
        return self._run(self.files.heartbeat, p.registry_path, name, self._now()).addCallback(
            lambda refreshed: {"refreshed": refreshed}
        )

    def unregister(self, session: ClientSession, p: NameParams) -> Deferred[None]:
        name = _name(p.name)
        _own_entry(session, name, "unregister")
        return self._run(self.files.unregister, p.registry_path, name)

    def list(self, session: ClientSession, p: PathParams) -> Deferred[EntryList]:
        return self._run(self.files.entries, p.registry_path).addCallback(_entries_json)

    def reap(self, session: ClientSession, p: ReapParams) -> Deferred[NameList]:
        if session.agent_only:
            raise Forbidden(
                "registry.reap removes other agents' entries: it needs the daemon token or the host token, "
                "not an agent's own"
            )
        max_age = _max_age(p.max_age_secs)
        return self._run(self.files.reap, p.registry_path, self._now(), max_age).addCallback(self._reaped)

    def _reaped(self, names: NameList) -> NameList:
        if names:
            self._log.info("reaped {count} stale agent registry entries: {names}", count=len(names), names=names)
        return names


def _as_rpc_error(failure: Failure) -> NoReturn:
    """The store's refusals as JSON-RPC errors; anything else stays an internal error."""
    e = failure.value
    if isinstance(e, RegistryError):
        raise InvalidParams(e.field, e.problem)
    if isinstance(e, RegistryFull):
        raise RpcError(
            f"the agent registry is full: at most {e.limit} entries per registry directory; unregister or reap first",
            data={"reason": "registry_full", "limit": e.limit},
        )
    if isinstance(e, (UnsafeStateError, OSError)):
        raise RpcError(f"the agent registry is unavailable: {e}")
    failure.raiseException()


def _entries_json(entries: list[AgentEntry]) -> EntryList:
    return [entry.to_json() for entry in entries]


def _name(name: str) -> str:
    try:
        return check_name(name)
    except RegistryError as e:
        raise InvalidParams(e.field, e.problem) from None


def _own_entry(session: ClientSession, name: str, verb: str) -> None:
    if session.agent_only and name != session.agent_id:
        raise Forbidden(
            f"a connection bound to agent {session.agent_id!r} may {verb} only the registry entry named after it "
            "(the daemon token or the host token may name any)"
        )


def _max_age(value: JsonValue) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParams("max_age_secs", "expected a number of seconds")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidParams("max_age_secs", "expected a finite number of seconds")
    if value < 0:
        raise InvalidParams("max_age_secs", "expected a non-negative number of seconds")
    return value
