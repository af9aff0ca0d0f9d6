"""
The per-state component registry.

Each ``ServerState`` owns a ``zope.interface`` ``AdapterRegistry``, seeded
here by one explicit call (no import-time global registration) and then
extended with the embedder's ``ServerStateConfig.adapters``.  The daemon
reaches a session's components by adaptation through that registry, so two
daemons in one process can carry different components.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from zope.interface.adapter import AdapterRegistry

from car_twisted.interfaces import (
    IBinaryReceiver,
    IClientSession,
    IMemgine,
    IMemgineIngestSink,
    IToolExecutor,
    IVoiceEventSink,
    IWsSink,
)
from car_twisted.voice.hub import voice_binary_receiver
from car_twisted.voice.sinks import WsMemgineIngestSink, WsVoiceEventSink
from car_twisted.ws.tool_executor import session_tool_executor

if TYPE_CHECKING:
    from car_twisted.config import AdapterRegistration
    from car_twisted.session import ClientSession

__all__ = ["default_registry", "session_sink"]


def session_sink(session: ClientSession) -> IWsSink:
    """A session's transport-neutral sink: what its channel writes to."""
    return session.channel.sink


def default_registry(extra: Iterable[AdapterRegistration] = ()) -> AdapterRegistry:
    """
    A fresh registry with the daemon's default adapters, then C{extra}
    (``AdapterRegistration`` values), which win over the defaults.
    """
    registry = AdapterRegistry()
    registry.register([IClientSession], IWsSink, "", session_sink)
    registry.register([IClientSession], IToolExecutor, "", session_tool_executor)
    registry.register([IClientSession], IVoiceEventSink, "", WsVoiceEventSink)
    registry.register([IClientSession], IBinaryReceiver, "", voice_binary_receiver)
    registry.register([IVoiceEventSink, IMemgine], IMemgineIngestSink, "", WsMemgineIngestSink)
    for reg in extra:
        required = list(reg.required) if isinstance(reg.required, tuple) else [reg.required]
        registry.register(required, reg.provided, reg.name, reg.factory)
    return registry
