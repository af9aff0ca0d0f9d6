"""
The Autobahn WebSocket protocol and factory: framing only.

``CarServerProtocol`` works the same over TCP and UNIX endpoints.  It
applies the origin policy at the upgrade, opens a ``ClientSession`` on
open, hands each complete text message to the dispatcher and each binary
message to the session's binary handler, and closes the session on close.

Until the connection authenticates it is a guest of the factory's
``Admission`` (a short deadline from TCP accept, a few guest slots,
messages of a few KiB), and the upgrade request itself is bounded in
bytes and header lines before anything parses it.  A client that stops
reading is not read either: its further requests wait unparsed until our
output drains, and past a byte budget of unread output it is dropped.

Two measured shortcuts keep the hot path lean (see
``docs/performance.md``): complete messages are taken in ``onMessageEnd``
(Autobahn's own ``onMessageFrameBegin`` still enforces the frame and
message size limits, closing with 1009), and text replies are framed here
and written straight to the transport (compression is off and outgoing
messages are never fragmented, so a reply is one unmasked FIN frame).
"""

from __future__ import annotations

import collections
import fnmatch
import ipaddress
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from car_twisted.interfaces import IWsSink
from car_twisted.rpc.dispatch import Dispatcher
from car_twisted.ws.admission import Admission
from car_twisted.ws.keepalive import KeepAlive

if TYPE_CHECKING:
    from car_twisted.session import ClientSession
    from car_twisted.state import ServerState

__all__ = ["CarServerProtocol", "CarServerFactory", "origin_is_loopback", "frame_text"]

_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSED = WebSocketProtocol.STATE_CLOSED
_COPY_LIMIT = 64 * 1024
# The upgrade request: bounded before Autobahn parses it (431 beyond).
MAX_HANDSHAKE_BYTES = 16 * 1024
MAX_HANDSHAKE_HEADERS = 64
# How long a refused upgrade's unread input is discarded before the
# connection is aborted anyway.
LINGER_SECS = 1.0
# Close codes an endpoint must not send (RFC 6455 section 7.4.1).
_RESERVED_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})
_CRLF2 = b"\r\n\r\n"
#: A Ping with no payload (FIN, opcode 0x9, unmasked, length 0).
_EMPTY_PING = b"\x89\x00"


def frame_text(payload: bytes) -> bytes:
    """The header of one unmasked, final text frame of C{len(payload)}."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big")
    return b"\x81\x7f" + n.to_bytes(8, "big")


def peer_key(address: IAddress) -> str:
    """Who a connection comes from, for the per-peer guest slots."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host
    return "local"


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

    def __init__(self, protocol: CarServerProtocol, clock: IReactorTime, stall_secs: float) -> None:
        self.protocol = protocol
        self.clock = clock
        self.stall_secs = stall_secs
        self._timer: IDelayedCall | None = None

    def pauseProducing(self) -> None:
        session = self.protocol.session
        if session is not None:
            session.channel.pause()
        self.protocol._output_paused()
        # Stream transports are push producers too (ITransport does not say so).
        self.protocol.transport.pauseProducing()  # type: ignore[attr-defined]
        if self._timer is None:
            self._timer = self.clock.callLater(self.stall_secs, self._stalled)

    def resumeProducing(self) -> None:
        self._cancel()
        self.protocol.transport.resumeProducing()  # type: ignore[attr-defined]  # see pauseProducing
        session = self.protocol.session
        if session is not None:
            self.protocol._output_resumed()
            session.channel.resume()
            self.protocol._release_held(session)

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
    # Set before any callback below runs (Twisted's types allow None).
    transport: ITransport
    _dispatcher: Dispatcher
    session: ClientSession | None = None
    _throttle: _ReadThrottle | None = None
    # A guest until the session authenticates (see ``Admission``).
    _promoted = False
    # Requests read while our output was backed up, dispatched on drain.
    _held: collections.deque[tuple[bool, bytes]] | None = None
    # Bytes written while the client was not reading, against the budget.
    _paused = False
    _backlog = 0
    _scanned = 0
    # An upgrade refused before its end: input discarded until it closes.
    _discarding = False
    _linger: IDelayedCall | None = None
    # Keep-alive (``KeepAlive``): the last bytes heard, the unanswered ping.
    heard_at = 0.0
    pinged_at: float | None = None

    # -- Autobahn callbacks --------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        config = factory.state.config
        if factory.state.auth_enabled:
            # Set before Autobahn copies the factory's options, which it
            # does only for attributes the protocol does not have yet.
            self.maxMessagePayloadSize = config.max_preauth_message_bytes
            self.maxFramePayloadSize = config.max_preauth_message_bytes
        super().connectionMade()
        # Autobahn applies its tcpNoDelay option before it has copied the
        # factory's options onto the protocol, so the call silently does
        # nothing and Nagle stays on: small replies then wait ~40 ms for
        # the peer's delayed ACK.  Set it here, after the copy.
        try:
            self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]  # TCP only: caught below
        except (AttributeError, OSError):
            pass  # not TCP (a UNIX socket)
        factory.admission.admit(self, peer_key(self.transport.getPeer()), self._guest_expired, self._evict)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self.factory.admission.gone(self)
        self.factory.keepalive.discard(self)
        super().connectionLost(reason)

    def processHandshake(self) -> None:
        # Bound the upgrade request before Autobahn parses it, and look for
        # its end only in bytes not scanned yet (Autobahn rescans the whole
        # buffer on every read: quadratic under a trickle of headers).
        data = self.data
        end = data.find(_CRLF2, max(0, self._scanned - 3))
        if end < 0:
            self._scanned = len(data)
            if len(data) > MAX_HANDSHAKE_BYTES:
                self._refuse_upgrade(431, "Request Header Fields Too Large")
            return
        if end + 4 > MAX_HANDSHAKE_BYTES or data.count(b"\r\n", 0, end) > MAX_HANDSHAKE_HEADERS:
            self._refuse_upgrade(431, "Request Header Fields Too Large")
            return
        super().processHandshake()

    def _refuse_upgrade(self, code: int, reason: str) -> None:
        """
        Answer an upgrade request we will not read to its end, so that the
        answer arrives: closing a socket with unread input makes the kernel
        reset the connection, and the peer then loses our answer.  So our
        side is half-closed and whatever the peer still sends is discarded
        until it closes, or for at most ``LINGER_SECS``.
        """
        self.sendHttpErrorResponse(code, reason)
        self.state = WebSocketProtocol.STATE_CLOSED
        self.data = b""
        self._discarding = True
        transport = self.transport
        assert transport is not None
        # TCP and UNIX transports half-close (ITCPTransport, IUNIXTransport).
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        half_close()
        abort = getattr(transport, "abortConnection", transport.loseConnection)
        self._linger = self.factory.state.clock.callLater(LINGER_SECS, abort)

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return  # refused: the rest of the request goes nowhere
        self.heard_at = self.factory.state.clock.seconds()
        super().dataReceived(data)

    def onConnect(self, request: ConnectionRequest) -> None:
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
            # Stream transports are consumers too (ITransport does not say so).
            self.transport.registerProducer(self._throttle, True)  # type: ignore[attr-defined]
            self._log.debug(
                "client {client_id} connected from {peer}",
                client_id=self.session.client_id,
                peer=self.peer,
            )
            factory.keepalive.add(self)
            # The upgrade request and response are not read again: about
            # a kilobyte per connection, for the connection's whole life.
            self.http_request_data = self.http_response_data = self.http_headers = None  # type: ignore[assignment]
            if self.session.authenticated:
                self._promote()  # auth is off
        except Exception:
            self._log.failure("error in onOpen")
            self.dropConnection(abort=True)

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)
        if self.failedByMe and self.state == WebSocketProtocol.STATE_CLOSING:
            # Autobahn refused the size and sent its Close (1009); drop now
            # rather than wait for the peer's, as every close of ours does.
            self.dropConnection(abort=False)

    def onMessageEnd(self) -> None:
        data = self.message_data
        self.message_data = None  # type: ignore[assignment]  # dropped until Autobahn's next message begins
        session = self.session
        if self.failedByMe or session is None:
            return
        session.activity.active = True
        payload = data[0] if len(data) == 1 else b"".join(data)
        if self._held is not None or session.channel.paused:
            # Our output to this client is backed up: read no further
            # requests from it until it drains (their replies would only
            # pile up in memory).
            if self._held is None:
                self._held = collections.deque()
            self._held.append((self.message_is_binary, payload))
            return
        self._dispatch(session, self.message_is_binary, payload)

    def _dispatch(self, session: ClientSession, binary: bool, payload: bytes) -> None:
        try:
            if binary:
                self._dispatcher.dispatch_binary(session, payload)
            else:
                self._dispatcher.dispatch_text(session, payload)
        except Exception:
            self._log.failure(
                "error dispatching a frame from client {client_id}",
                client_id=session.client_id,
            )
        if not self._promoted and session.authenticated:
            self._promote()

    def _release_held(self, session: ClientSession) -> None:
        """Our output drained: dispatch what was read meanwhile, in order."""
        held = self._held
        while held and not session.channel.paused and self.state == _OPEN:
            binary, payload = held.popleft()
            self._dispatch(session, binary, payload)
        if not held:
            self._held = None

    def _promote(self) -> None:
        """Authenticated: a guest no more, and full-size messages from now on."""
        self._promoted = True
        self.factory.admission.authenticated(self)
        limit = self.factory.state.config.max_message_bytes
        self.maxMessagePayloadSize = limit
        self.maxFramePayloadSize = limit

    def send_keepalive_ping(self) -> None:
        if self.state == _OPEN:
            self.transport.write(_EMPTY_PING)

    def keepalive_timed_out(self) -> None:
        self._log.info("no answer to a keep-alive ping from {peer}; dropping it", peer=self.peer)
        self.dropConnection(abort=True)

    def _guest_expired(self) -> None:
        self._log.info("connection from {peer} did not authenticate in time; closing", peer=self.peer)
        if self.state == _OPEN:
            self.close(1008, "authentication timeout")
        else:
            self.dropConnection(abort=True)

    def _evict(self) -> None:
        self.dropConnection(abort=True)

    def _output_paused(self) -> None:
        self._paused = True
        self._backlog = 0

    def _output_resumed(self) -> None:
        self._paused = False
        self._backlog = 0

    def _over_backlog(self, size: int) -> bool:
        """Count output written while the client is not reading; drop it past the budget."""
        self._backlog += size
        limit = self.factory.state.config.max_output_backlog_bytes
        if self._backlog <= limit:
            return False
        self._log.warn(
            "client {client_id} left {bytes} bytes of output unread (limit {limit}); dropping it",
            client_id=getattr(self.session, "client_id", None),
            bytes=self._backlog,
            limit=limit,
        )
        self.dropConnection(abort=True)
        return True

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session = self.session
        if session is None:
            return
        if self._throttle is not None:
            self._throttle.stopProducing()
        self._held = None
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
        if self._paused and self._over_backlog(len(payload)):
            return False
        if len(payload) < _COPY_LIMIT:
            # One bytes object, one write: cheaper than a two-piece sequence.
            self.transport.write(frame_text(payload) + payload)
        else:
            self.transport.writeSequence((frame_text(payload), payload))
        return True

    def send_binary(self, payload: bytes) -> bool:
        if self._paused and self._over_backlog(len(payload)):
            return False
        try:
            self.sendMessage(payload, isBinary=True)
        except Disconnected:
            return False
        return True

    def close(self, code: int, reason: str) -> None:
        """Close frame, then drop at once: the real client never answers."""
        if self.state != _OPEN:
            return
        if not (1000 <= code <= 4999) or code in _RESERVED_CLOSE_CODES:
            code = 1011  # never send a code the protocol forbids on the wire
        # At most 120 bytes of reason, cut on a character boundary (the
        # reason must stay valid UTF-8).
        text = reason.encode()[:120].decode("utf-8", "ignore").encode()
        body = code.to_bytes(2, "big") + text
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

    def __init__(self, state: ServerState, reactor: object = None, url: str | None = None) -> None:
        # server=None: no version banner in any response.
        super().__init__(url=url, server=None, reactor=reactor if reactor is not None else state.clock)
        self.state = state
        self.dispatcher = Dispatcher(state)
        config = state.config
        self.keepalive = KeepAlive(state.clock, config.ping_interval, config.ping_timeout)
        self.admission = Admission(
            state.clock, config.max_preauth_connections, config.max_preauth_per_peer, config.auth_timeout
        )
        self._allowed_origins = tuple(config.allowed_origins)
        self.setProtocolOptions(
            maxFramePayloadSize=config.max_message_bytes,
            maxMessagePayloadSize=config.max_message_bytes,
            # Keep-alive pings are ours (KeepAlive): one timer for all.
            autoPingInterval=0,
            # The origin policy is ours (onConnect): loopback plus the
            # configured patterns.  Autobahn's own check is left open.
            allowedOrigins=["*"],
            allowNullOrigin=False,
            # Guests have their own slots (Admission); authenticated
            # connections are counted at session.auth (ServerState).
            maxConnections=0,
            # A plain GET gets a bare 426, not a status page with a version.
            webStatus=False,
            # Send a real Close (1007, 1009, ...) before dropping, so the
            # client learns why; the close handshake then times out fast.
            failByDrop=False,
            # orjson validates UTF-8 while parsing; the dispatcher closes
            # with 1007 when a text frame that failed to parse is not UTF-8.
            utf8validateIncoming=False,
            openHandshakeTimeout=config.auth_timeout,
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
        self.dispatcher.pulse.stop()
        self.keepalive.stop()
        super().stopFactory()

    def origin_allowed(self, origin: str) -> bool:
        if origin_is_loopback(origin):
            return True
        return any(fnmatch.fnmatchcase(origin, pat) for pat in self._allowed_origins)
