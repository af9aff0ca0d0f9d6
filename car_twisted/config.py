"""
``ServerStateConfig``: everything a ``ServerState`` is built from.

A frozen attrs class; embedders build one with keywords and refine it with
the ``with_*`` evolvers.  ``from_environ`` reads the daemon's environment
(``CAR_HOME``, ``CAR_NO_AUTH``, ``CAR_NO_APPROVALS``, ``CAR_AUTH_TOKEN``,
``CAR_HANDLER_TIMEOUT``, ``CAR_TOOL_TIMEOUT``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs
from zope.interface import Interface
from zope.interface.verify import verifyObject

from car_twisted.agents.manifest import DEFAULT_STOP_GRACE_SECS
from car_twisted.host.gate import ApprovalGate
from car_twisted.interfaces import IAgentIdentities, IMethodProvider, IRunStore, ISpeaker, ITranscriber
from car_twisted.memory.scopes import GraphFactory
from car_twisted.paths import CarPaths, ConfigError
from car_twisted.rpc.registry import MethodSpec, method_specs
from car_twisted.runs.model import RUN_COMPLETE_GRACE

__all__ = [
    "ServerStateConfig",
    "AdapterRegistration",
    "DEFAULT_HANDLER_TIMEOUT_SECS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_PREAUTH_MESSAGE_BYTES",
    "DEFAULT_MAX_JSON_DEPTH",
    "LIMITS",
    "parse_limit",
]

DEFAULT_HANDLER_TIMEOUT_SECS = 30 * 60.0
# The daemon's wait for a tools.execute answer when an action declares no
# timeout_ms; CAR_TOOL_TIMEOUT (seconds) overrides it.
DEFAULT_TOOL_TIMEOUT_MS = 300_000
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Until a connection authenticates, every message it sends is capped here.
DEFAULT_PREAUTH_MESSAGE_BYTES = 8 * 1024
# Deepest JSON nesting accepted in any message (orjson itself stops at 255
# when encoding; replies wrap values a few levels deeper).
DEFAULT_MAX_JSON_DEPTH = 128

T = TypeVar("T")
# An attrs validator: (instance, attribute, value).
Validator = Callable[[object, "attrs.Attribute[T]", T], None]


def _provides(iface: type[Interface]) -> Validator[T | None]:
    def check(instance: object, attribute: attrs.Attribute[T | None], value: T | None) -> None:
        if value is not None and not iface.providedBy(value):
            raise TypeError(f"{attribute.name} must provide {iface.__name__}")

    return check


def _each_provides(iface: type[Interface]) -> Validator[tuple[T, ...]]:
    def check(instance: object, attribute: attrs.Attribute[tuple[T, ...]], value: tuple[T, ...]) -> None:
        for item in value:
            verifyObject(iface, item)

    return check


def _strings(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)


def _providers(items: Iterable[IMethodProvider]) -> tuple[IMethodProvider, ...]:
    return tuple(items)


@attrs.frozen
class AdapterRegistration:
    """
    One adapter for a state's component registry: C{factory(obj)} provides
    C{provided} for objects providing C{required}.
    """

    #: One interface, or several for a multi-adapter (the ingest sink's is
    #: ``(IVoiceEventSink, IMemgine)``).
    required: type[Interface] | tuple[type[Interface], ...]
    provided: type[Interface]
    # Takes an object providing ``required``: a type named at run time.
    factory: Callable[[Any], object]
    name: str = ""


def _adapters(items: Iterable[AdapterRegistration]) -> tuple[AdapterRegistration, ...]:
    return tuple(items)


def _env_flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _positive_secs(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


# The bounds an operator may set with ``twist car --limit NAME=VALUE``;
# each is a ``ServerStateConfig`` field of the same name.
LIMITS = (
    "handler_timeout",
    "max_message_bytes",
    "max_batch",
    "max_in_flight",
    "max_connections",
    "auth_timeout",
    "max_auth_failures",
    "max_preauth_connections",
    "max_preauth_per_peer",
    "max_preauth_message_bytes",
    "max_json_depth",
    "max_state_bytes",
    "max_state_bytes_total",
    "max_output_backlog_bytes",
    "ping_interval",
    "ping_timeout",
    "write_stall_timeout",
    "idle_timeout",
    "tool_timeout_ms",
    "agent_stop_grace",
    "run_complete_grace",
    "max_open_runs_per_agent",
    "max_open_runs_per_connection",
    "run_store_max_bytes",
    "run_retention_per_agent",
    "run_retention_total",
    "memory_fact_limit",
    "memory_graph_max_bytes",
    "memory_max_bytes",
    "max_voice_streams",
    "voice_workers",
)
# Limits where 0 means "off" rather than "nothing allowed".
_ZERO_IS_OFF = frozenset({"idle_timeout", "ping_interval"})
_SIZE_SUFFIXES = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_limit(spec: str) -> tuple[str, int | float]:
    """
    ``NAME=VALUE`` for one of L{LIMITS}: a number of the field's type;
    integers may carry a ``KiB`` / ``MiB`` / ``GiB`` suffix.

    @raise ConfigError: an unknown name or a value that does not fit.
    """
    name, sep, raw = spec.partition("=")
    name, raw = name.strip().replace("-", "_"), raw.strip()
    if not sep or name not in LIMITS:
        raise ConfigError(f"--limit takes NAME=VALUE with NAME one of {', '.join(LIMITS)}; got {spec!r}")
    kind = attrs.fields_dict(ServerStateConfig)[name].type
    try:
        if kind in (int, "int"):
            scale = 1
            for suffix, factor in _SIZE_SUFFIXES.items():
                if raw.endswith(suffix):
                    raw, scale = raw[: -len(suffix)].strip(), factor
            value: int | float = int(raw) * scale
        else:
            value = float(raw)
    except ValueError:
        raise ConfigError(f"--limit {name}: {raw!r} is not a number") from None
    if value < 0 or (value == 0 and name not in _ZERO_IS_OFF):
        raise ConfigError(f"--limit {name}: must be {'0 or more' if name in _ZERO_IS_OFF else 'positive'}, got {raw!r}")
    return name, value


@attrs.frozen
class ServerStateConfig:
    """
    @ivar paths: the state root and token/socket locations.
    @ivar auth_enabled: the token gate (on unless ``--no-auth``).
    @ivar auth_token: a pinned daemon token; minted per launch when None.
    @ivar host_token: a pinned host token; minted per launch when None.
    @ivar handler_timeout: per-request deadline, seconds (``-32004``).
    @ivar max_message_bytes: largest WebSocket message either way (1009).
    @ivar max_batch: largest JSON-RPC batch.
    @ivar max_in_flight: concurrent unfinished requests per connection.
    @ivar max_connections: concurrent WebSocket connections (503 beyond).
    @ivar auth_timeout: seconds from TCP accept until a connection must have
        authenticated (the HTTP upgrade included).
    @ivar max_preauth_connections: connections not yet authenticated, in
        all; past it the oldest unauthenticated one is dropped.
    @ivar max_preauth_per_peer: the same, per peer address.
    @ivar max_preauth_message_bytes: largest message before auth (1009).
    @ivar max_json_depth: deepest nesting in any message (``-32600``).
    @ivar max_state_bytes: ``state.*`` bytes one connection may hold.
    @ivar max_state_bytes_total: ``state.*`` bytes all connections may hold.
    @ivar max_output_backlog_bytes: bytes written to a client that has
        stopped reading before it is dropped.
    @ivar max_open_runs_per_agent / max_open_runs_per_connection: runs
        started and not yet ended.
    @ivar run_store_max_bytes: the run store's quota on disk.
    @ivar run_retention_per_agent / run_retention_total: ended runs kept;
        the oldest beyond these are pruned.
    @ivar max_auth_failures: wrong tokens tolerated on one connection.
    @ivar ping_interval / ping_timeout: WebSocket keep-alive, seconds.
    @ivar write_stall_timeout: seconds a connection may refuse to read our
        output before it is dropped.
    @ivar idle_timeout: seconds an authenticated connection may stay silent
        with nothing in flight before it is closed (the client reconnects
        on its next call; it opens a new connection per host-management
        call and never closes them).  Agent-bound and pinned sessions
        (subscriptions) are exempt.  0 disables.
    @ivar allowed_origins: extra browser origins (fnmatch patterns on the
        full origin, e.g. ``"https://app.example:*"``); loopback origins
        are always allowed, others refused at the upgrade.
    @ivar tool_timeout_ms: wait for a ``tools.execute`` answer when the
        action has no ``timeout_ms`` (``CAR_TOOL_TIMEOUT`` seconds).
    @ivar agent_stop_grace: seconds between SIGTERM and SIGKILL when an
        agent is stopped.
    @ivar run_complete_grace: seconds after a disconnect before runs the
        connection opened and never completed are marked ``incomplete``.
    @ivar run_store_fsync: sync every run-store batch to disk before the
        ack (survives power loss, not only a daemon crash).
    @ivar run_store: an ``IRunStore`` to use instead of the JSONL store.
    @ivar methods / method_providers: extra JSON-RPC methods.
    @ivar adapters: extra component adapters for the state's registry.
    @ivar agent_identities: provides ``IAgentIdentities`` (agent binding).
    @ivar memgine_factory: makes the memory graph of each scope (the
        shared one, a namespace's, an agent's) given the byte budget its
        facts should count against; the embedded engine when None.
    @ivar memory_fact_limit: facts one memory graph may hold.
    @ivar memory_graph_max_bytes / memory_max_bytes: bytes of facts one
        graph, and all loaded graphs together, may hold.
    @ivar transcribers / speakers: the speech providers (``ITranscriber``,
        ``ISpeaker``); None: the offline ones (pocketsphinx, espeak-ng).
    @ivar max_voice_streams: live transcription and speech streams in all.
    @ivar voice_workers: recognizer calls running at once (threads).
    @ivar approval_gate: which calls wait for a person's approval
        (``twist car --no-approvals`` / ``CAR_NO_APPROVALS=1`` turn it off).
    """

    paths: CarPaths = attrs.field(factory=lambda: CarPaths.resolve({}))
    auth_enabled: bool = True
    auth_token: str | None = attrs.field(default=None, repr=False)
    host_token: str | None = attrs.field(default=None, repr=False)
    handler_timeout: float = DEFAULT_HANDLER_TIMEOUT_SECS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_batch: int = 256
    max_in_flight: int = 1024
    max_connections: int = 1024
    auth_timeout: float = 5.0
    max_preauth_connections: int = 128
    max_preauth_per_peer: int = 64
    max_preauth_message_bytes: int = DEFAULT_PREAUTH_MESSAGE_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_state_bytes: int = 16 * 1024 * 1024
    max_state_bytes_total: int = 256 * 1024 * 1024
    max_output_backlog_bytes: int = 32 * 1024 * 1024
    max_open_runs_per_agent: int = 16
    max_open_runs_per_connection: int = 16
    run_store_max_bytes: int = 1024 * 1024 * 1024
    run_retention_per_agent: int = 1000
    run_retention_total: int = 10_000
    max_auth_failures: int = 5
    ping_interval: float = 30.0
    ping_timeout: float = 30.0
    write_stall_timeout: float = 60.0
    idle_timeout: float = 300.0
    tool_timeout_ms: int = DEFAULT_TOOL_TIMEOUT_MS
    agent_stop_grace: float = DEFAULT_STOP_GRACE_SECS
    run_complete_grace: float = RUN_COMPLETE_GRACE
    run_store_fsync: bool = False
    run_store: IRunStore | None = attrs.field(default=None, validator=_provides(IRunStore))
    # The tuple converters are plain ``tuple``, typed for attrs' checker.
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    methods: tuple[MethodSpec, ...] = attrs.field(default=(), converter=method_specs)
    method_providers: tuple[IMethodProvider, ...] = attrs.field(
        default=(), converter=_providers, validator=_each_provides(IMethodProvider)
    )
    adapters: tuple[AdapterRegistration, ...] = attrs.field(default=(), converter=_adapters)
    agent_identities: IAgentIdentities | None = attrs.field(
        default=None, validator=_provides(IAgentIdentities)
    )
    approval_gate: ApprovalGate = attrs.field(factory=ApprovalGate)
    memgine_factory: GraphFactory | None = None
    memory_fact_limit: int = 100_000
    memory_graph_max_bytes: int = 256 * 1024 * 1024
    memory_max_bytes: int = 1024 * 1024 * 1024
    transcribers: tuple[ITranscriber, ...] | None = None
    speakers: tuple[ISpeaker, ...] | None = None
    max_voice_streams: int = 8
    voice_workers: int = 2

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str],
        *,
        car_home: str | None = None,
        no_auth: bool = False,
        no_approvals: bool = False,
        auth_token: str | None = None,
        **overrides: Any,
    ) -> ServerStateConfig:
        """
        The daemon's configuration from its environment and options;
        options win over the environment.

        @raise ConfigError: a relative ``CAR_HOME`` or a bad number.
        """
        paths = CarPaths.resolve(environ, car_home)
        token = auth_token or (environ.get("CAR_AUTH_TOKEN") or "").strip() or None
        kwargs: dict[str, Any] = dict(
            paths=paths,
            auth_enabled=not (no_auth or _env_flag(environ.get("CAR_NO_AUTH"))),
            auth_token=token,
        )
        if no_approvals or _env_flag(environ.get("CAR_NO_APPROVALS")):
            kwargs["approval_gate"] = ApprovalGate(enabled=False)
        raw_timeout = environ.get("CAR_HANDLER_TIMEOUT")
        if raw_timeout:
            kwargs["handler_timeout"] = _positive_secs("CAR_HANDLER_TIMEOUT", raw_timeout)
        raw_tool = environ.get("CAR_TOOL_TIMEOUT")
        if raw_tool:
            kwargs["tool_timeout_ms"] = int(_positive_secs("CAR_TOOL_TIMEOUT", raw_tool) * 1000)
        kwargs.update(overrides)
        return cls(**kwargs)

    def with_methods(self, *specs: MethodSpec) -> ServerStateConfig:
        return attrs.evolve(self, methods=self.methods + specs)

    def with_method_provider(self, provider: IMethodProvider) -> ServerStateConfig:
        return attrs.evolve(self, method_providers=self.method_providers + (provider,))

    def with_adapter(self, registration: AdapterRegistration) -> ServerStateConfig:
        return attrs.evolve(self, adapters=self.adapters + (registration,))

    def with_approval_gate(self, gate: ApprovalGate) -> ServerStateConfig:
        return attrs.evolve(self, approval_gate=gate)

    def with_agent_identities(self, identities: IAgentIdentities) -> ServerStateConfig:
        return attrs.evolve(self, agent_identities=identities)

    def with_auth(
        self, enabled: bool, token: str | None = None, host_token: str | None = None
    ) -> ServerStateConfig:
        return attrs.evolve(
            self, auth_enabled=enabled, auth_token=token, host_token=host_token
        )
