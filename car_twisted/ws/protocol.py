"""
The Autobahn WebSocket protocol and factory: framing only.

``CarServerProtocol`` works the same over TCP and UNIX endpoints.  It
applies the origin policy at the upgrade, opens a ``ClientSession`` on
open, hands each complete text message to the dispatcher and each binary
message to the session's binary handler, and closes the session on close.

Two measured shortcuts keep the hot path lean (see
``docs/performance.md``): complete messages are taken in ``onMessageEnd``
(Autobahn's own ``onMessageFrameBegin`` still enforces the frame and
message size limits, closing with 1009), and text replies are framed here
and written straight to the transport (compression is off and outgoing
messages are never fragmented, so a reply is one unmasked FIN frame).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from typing import Any
from urllib.parse import urlsplit

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from car_twisted.interfaces import IWsSink
from car_twisted.rpc.dispatch import Dispatcher

__all__ = ["CarServerProtocol", "CarServerFactory", "origin_is_loopback", "frame_text"]

_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSED = WebSocketProtocol.STATE_CLOSED
_COPY_LIMIT = 64 * 1024


def frame_text(payload: bytes) -> bytes:
    """The header of one unmasked, final text frame of C{len(payload)}."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big")
    return b"\x81\x7f" + n.to_bytes(8, "big")


def origin_is_loopback(origin: str) -> bool:
    """True for ``http(s)://localhost|127.x.x.x|[::1][:port]``."""
    try:
        host = urlsplit(origin).hostname
    except ValueError:
        return False
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@implementer(IPushProducer)
class _ReadThrottle:
    """
    Back-pressure for a client that does not read: when our output to it
    backs up, stop reading its requests; if it stays stalled past the
    configured window, drop it.  Other connections are unaffected.
    """

    def __init__(self, protocol: "CarServerProtocol", clock: Any, stall_secs: float):
        self.protocol = protocol
        self.clock = clock
        self.stall_secs = stall_secs
        self._timer: Any = None

    def pauseProducing(self) -> None:
        session = self.protocol.session
        if session is not None:
            session.write_paused = True
        self.protocol.transport.pauseProducing()
        if self._timer is None:
            self._timer = self.clock.callLater(self.stall_secs, self._stalled)

    def resumeProducing(self) -> None:
        self._cancel()
        self.protocol.transport.resumeProducing()
        session = self.protocol.session
        if session is not None:
            session.write_paused = False
            for hook in list(session.resume_hooks):
                try:
                    hook()
                except Exception:
                    self.protocol._log.failure("resume hook failed")

    def stopProducing(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _stalled(self) -> None:
        self._timer = None
        self.protocol._log.warn(
            "client {client_id} stopped reading for {secs}s; dropping it",
            client_id=getattr(self.protocol.session, "client_id", None),
            secs=self.stall_secs,
        )
        self.protocol.dropConnection(abort=True)


@implementer(IWsSink)
class CarServerProtocol(WebSocketServerProtocol):
    # Autobahn owns ``log``; ours is ``_log``.
    _log = Logger()
    session: Any = None
    _throttle: _ReadThrottle | None = None

    # -- Autobahn callbacks --------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        # Autobahn applies its tcpNoDelay option before it has copied the
        # factory's options onto the protocol, so the call silently does
        # nothing and Nagle stays on: small replies then wait ~40 ms for
        # the peer's delayed ACK.  Set it here, after the copy.
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not TCP (a UNIX socket)

    def onConnect(self, request: Any) -> None:
        try:
            origin = self.http_headers.get("origin")
            if origin is not None and not self.factory.origin_allowed(origin):
                self._log.warn("refused WebSocket upgrade from origin {origin}", origin=origin)
                raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        except ConnectionDeny:
            raise
        except Exception:
            self._log.failure("error in onConnect")
            raise
        return None

    def onOpen(self) -> None:
        try:
            factory = self.factory
            self.session = factory.state.open_session(self)
            self._dispatcher = factory.dispatcher
            self._throttle = _ReadThrottle(
                self, factory.state.clock, factory.state.config.write_stall_timeout
            )
            self.transport.registerProducer(self._throttle, True)
            self._log.debug(
                "client {client_id} connected from {peer}",
                client_id=self.session.client_id,
                peer=self.peer,
            )
        except Exception:
            self._log.failure("error in onOpen")
            self.dropConnection(abort=True)

    def onMessageEnd(self) -> None:
        data = self.message_data
        self.message_data = None
        if self.failedByMe or self.session is None:
            return
        self.session.active = True
        payload = data[0] if len(data) == 1 else b"".join(data)
        try:
            if self.message_is_binary:
                self._dispatcher.dispatch_binary(self.session, payload)
            else:
                self._dispatcher.dispatch_text(self.session, payload)
        except Exception:
            self._log.failure(
                "error dispatching a frame from client {client_id}",
                client_id=self.session.client_id,
            )

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        session = self.session
        if session is None:
            return
        if self._throttle is not None:
            self._throttle.stopProducing()
        try:
            self.factory.state.close_session(session)
        except Exception:
            self._log.failure("error closing client {client_id}", client_id=session.client_id)
        self._log.debug(
            "client {client_id} disconnected (code {code})",
            client_id=session.client_id,
            code=code,
        )

    # -- IWsSink -------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return getattr(self, "state", None) == _OPEN

    def send_text(self, payload: bytes) -> bool:
        if self.state != _OPEN:
            return False
        if len(payload) < _COPY_LIMIT:
            # One bytes object, one write: cheaper than a two-piece sequence.
            self.transport.write(frame_text(payload) + payload)
        else:
            self.transport.writeSequence((frame_text(payload), payload))
        return True

    def send_binary(self, payload: bytes) -> bool:
        try:
            self.sendMessage(payload, isBinary=True)
        except Disconnected:
            return False
        return True

    def close(self, code: int, reason: str) -> None:
        """Close frame, then drop at once: the real client never answers."""
        if self.state != _OPEN:
            return
        body = code.to_bytes(2, "big") + reason.encode()[:120]
        self.transport.write(bytes((0x88, len(body))) + body)
        self.state = WebSocketProtocol.STATE_CLOSING
        self.dropConnection(abort=False)


class CarServerFactory(WebSocketServerFactory):
    """
    The WebSocket factory for one ``ServerState``; hand it to any stream
    server endpoint (``serverFromString(reactor, "unix:...")``).
    """

    protocol = CarServerProtocol
    _reaper: LoopingCall | None = None

    def __init__(self, state: Any, reactor: Any = None, url: str | None = None) -> None:
        super().__init__(url=url, reactor=reactor if reactor is not None else state.clock)
        self.state = state
        self.dispatcher = Dispatcher(state)
        config = state.config
        self._allowed_origins = tuple(config.allowed_origins)
        self.setProtocolOptions(
            maxFramePayloadSize=config.max_message_bytes,
            maxMessagePayloadSize=config.max_message_bytes,
            autoPingInterval=config.ping_interval,
            autoPingTimeout=config.ping_timeout,
            # The origin policy is ours (onConnect): loopback plus the
            # configured patterns.  Autobahn's own check is left open.
            allowedOrigins=["*"],
            allowNullOrigin=False,
            maxConnections=config.max_connections,
            # Send a real Close (1007, 1009, ...) before dropping, so the
            # client learns why; the close handshake then times out fast.
            failByDrop=False,
            # orjson validates UTF-8 while parsing; the dispatcher closes
            # with 1007 when a text frame that failed to parse is not UTF-8.
            utf8validateIncoming=False,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=1,
            perMessageCompressionAccept=lambda offers: None,
        )

    def startFactory(self) -> None:
        super().startFactory()
        idle = self.state.config.idle_timeout
        if idle > 0:
            self._reaper = LoopingCall(self.state.reap_idle)
            self._reaper.clock = self.state.clock
            # Sweep often enough that a session idles at most ~1.25x the limit.
            self._reaper.start(idle / 4, now=False).addErrback(
                lambda f: CarServerProtocol._log.failure("idle sweep failed", failure=f)
            )

    def stopFactory(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None and reaper.running:
            reaper.stop()
        super().stopFactory()

    def origin_allowed(self, origin: str) -> bool:
        if origin_is_loopback(origin):
            return True
        return any(fnmatch.fnmatchcase(origin, pat) for pat in self._allowed_origins)
