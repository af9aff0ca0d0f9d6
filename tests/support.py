"""
Shared test helpers: an in-memory sink, a real WebSocket test client, and
a way to run the real server on loopback TCP and UNIX sockets.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from car_twisted.config import ServerStateConfig
from car_twisted.testing import MemorySink
from car_twisted.paths import CarPaths
from car_twisted.endpoints import unix_socket_description
from car_twisted.service import make_car_service
from car_twisted.state import ServerState

TOKEN = "test-daemon-token-0123456789abcdefghijklmnopq"
HOST_TOKEN = "test-host-token-0123456789abcdefghijklmnopqrs"


FakeSink = MemorySink


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def make_config(tmp_path: Path, **overrides: Any) -> ServerStateConfig:
    home = tmp_path / "car-home"
    kwargs: dict[str, Any] = dict(
        paths=CarPaths.resolve({"CAR_HOME": str(home)}),
        auth_token=TOKEN,
        host_token=HOST_TOKEN,
    )
    kwargs.update(overrides)
    return ServerStateConfig(**kwargs)


def make_state(tmp_path: Path, clock: Any = None, **overrides: Any) -> ServerState:
    return ServerState(make_config(tmp_path, **overrides), clock or Clock())


def stray_timers(clock: Any) -> list[Any]:
    """
    C{clock}'s pending calls but the dispatcher's progress-pulse timer,
    which by design outlives the last answered request by up to one beat.
    """
    return [c for c in clock.getDelayedCalls() if getattr(c.func, "__name__", "") != "_beat"]


def request(method: str, params: Any = None, rid: Any = 1) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg).encode()


class DispatchConn:
    """
    One connection driven through the state's real ``Dispatcher`` on a
    ``MemorySink``: ``call`` sends a request and returns the reply with its
    id; ``auth`` (the ``session.auth`` params) authenticates first.
    """

    def __init__(self, state: ServerState, auth: Any = None) -> None:
        from car_twisted.rpc.dispatch import Dispatcher

        self.state = state
        self.sink = MemorySink()
        self.session = state.open_session(self.sink)
        self.dispatcher = Dispatcher(state)
        self.rid = 10
        if auth is not None:
            reply = self.call("session.auth", auth)
            assert reply["result"]["ok"] is True, reply

    def send(self, method: str, params: Any = None) -> int:
        self.rid += 1
        self.dispatcher.dispatch_text(self.session, request(method, params, self.rid))
        return self.rid

    def call(self, method: str, params: Any = None) -> Any:
        rid = self.send(method, params)
        replies = [m for m in self.sink.pop() if m.get("id") == rid]
        assert replies, f"no reply to {method}"
        return replies[0]

    def result(self, method: str, params: Any = None) -> Any:
        reply = self.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    def close(self) -> None:
        self.state.close_session(self.session)


# -- a real WebSocket client ---------------------------------------------------


class CallbackError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.error = {"code": code, "message": message}
        if data is not None:
            self.error["data"] = data


class _ClientProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.owner._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.owner._received(payload, isBinary)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.owner._closed_with(code, reason)


@attrs.define
class WsTestClient:
    """
    A real Autobahn client: ``call`` sends a request and waits for the
    response with that id; everything received is kept in ``received``;
    ``when`` waits for a condition on what has arrived.
    """

    protocol: Any = None
    reactor: Any = None
    received: list[Any] = attrs.field(factory=list)
    binary: list[bytes] = attrs.field(factory=list)
    close_code: Any = None
    closed: defer.Deferred = attrs.field(factory=defer.Deferred)
    _opened_d: defer.Deferred = attrs.field(factory=defer.Deferred)
    _waiters: dict[Any, defer.Deferred] = attrs.field(factory=dict)
    _next: int = 100
    _frame_waiters: list[defer.Deferred] = attrs.field(factory=list)
    # Server-to-client requests: ``on_request(msg)`` returns a result, a
    # Deferred of one, or raises ``CallbackError`` to answer with an error.
    on_request: Any = None
    requests: list[Any] = attrs.field(factory=list)
    notifications: list[Any] = attrs.field(factory=list)
    _watchers: list[Any] = attrs.field(factory=list)

    @classmethod
    async def connect(
        cls, reactor: Any, endpoint: str, url: str = "ws://localhost/", headers: Any = None
    ) -> "WsTestClient":
        client = cls(reactor=reactor)
        factory = WebSocketClientFactory(url, headers=headers or {}, reactor=reactor)
        factory.protocol = _ClientProtocol
        factory.owner = client
        ep = clientFromString(reactor, endpoint)
        await ep.connect(factory)
        await client._opened_d
        return client

    def _opened(self, protocol: Any) -> None:
        self.protocol = protocol
        self._opened_d.callback(self)

    def _received(self, payload: bytes, is_binary: bool) -> None:
        self._record(payload, is_binary)
        self._wake()

    def _record(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            self.binary.append(payload)
            return
        msg = json.loads(payload)
        self.received.append(msg)
        waiters, self._frame_waiters = self._frame_waiters, []
        for d in waiters:
            d.callback(msg)
        if isinstance(msg, dict) and "method" in msg:
            if "id" in msg:
                self.requests.append(msg)
                self._serve(msg)
            else:
                self.notifications.append(msg)
            return
        if isinstance(msg, dict) and "id" in msg and ("result" in msg or "error" in msg):
            key = (type(msg["id"]).__name__, msg["id"])
            d = self._waiters.pop(key, None)
            if d is not None:
                d.callback(msg)

    def _serve(self, msg: dict) -> None:
        def reply(result: Any) -> None:
            self.send_raw(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}))

        def error(failure: Any) -> None:
            exc = failure.value
            err = exc.error if isinstance(exc, CallbackError) else {"code": -32000, "message": str(exc)}
            self.send_raw(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "error": err}))

        if self.on_request is None:
            error(Failure(CallbackError(-32601, f"no handler for {msg['method']}")))
            return
        d = defer.maybeDeferred(self.on_request, msg)
        d.addCallbacks(reply, error)

    def _closed_with(self, code: Any, reason: Any) -> None:
        self.close_code = code
        self._wake(closed=True)
        for d in self._waiters.values():
            d.errback(ConnectionError(f"closed ({code})"))
        self._waiters.clear()
        if not self.closed.called:
            self.closed.callback(code)
        if not self._opened_d.called:
            self._opened_d.errback(ConnectionError(f"closed before open ({code}: {reason})"))

    def send_raw(self, payload: bytes | str, binary: bool = False) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        self.protocol.sendMessage(payload, isBinary=binary)

    def send(self, method: str, params: Any = None, rid: Any = None) -> defer.Deferred:
        if rid is None:
            self._next += 1
            rid = self._next
        d = defer.Deferred()
        self._waiters[(type(rid).__name__, rid)] = d
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.send_raw(json.dumps(msg))
        return d

    async def call(self, method: str, params: Any = None, rid: Any = None) -> Any:
        return await self.send(method, params, rid)

    async def result(self, method: str, params: Any = None) -> Any:
        msg = await self.call(method, params)
        assert "result" in msg, msg
        return msg["result"]

    def next_frame(self) -> defer.Deferred:
        d = defer.Deferred()
        self._frame_waiters.append(d)
        return d

    def when(self, predicate: Any, what: str, timeout: float = 15.0) -> defer.Deferred:
        """
        Fire with C{predicate()}'s value once it is truthy: tried now and
        after each message this client receives (with ``received``,
        ``notifications`` and reply callbacks already updated).  Fails if
        the connection closes first, or after C{timeout} seconds.
        """
        value = predicate()
        if value:
            return defer.succeed(value)
        entry: list[Any] = [predicate, what]

        def forget(d: defer.Deferred) -> None:
            if entry in self._watchers:
                self._watchers.remove(entry)

        d = defer.Deferred(forget)
        entry.append(d)
        self._watchers.append(entry)
        return _bounded(d, self.reactor, timeout, what)

    def _wake(self, closed: bool = False) -> None:
        watchers, self._watchers = self._watchers, []
        for entry in watchers:
            predicate, what, d = entry
            try:
                value = predicate()
            except Exception:
                d.errback()
                continue
            if value:
                d.callback(value)
            elif closed:
                d.errback(ConnectionError(f"closed ({self.close_code}) while waiting for {what}"))
            else:
                self._watchers.append(entry)

    async def authenticate(self, token: str = TOKEN, handshake: bool = True) -> None:
        reply = await self.call("session.auth", {"token": token}, rid=0)
        assert reply["result"]["ok"] is True, reply
        if handshake:
            reply = await self.call(
                "server.handshake",
                {"protocol_version": 3, "client_version": "test", "required_capabilities": []},
                rid=2,
            )
            assert reply["result"]["protocol_version"] == 3, reply

    def drop(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.abortConnection()


# -- the real server on loopback ----------------------------------------------------


@attrs.define
class RunningServer:
    state: ServerState
    service: Any
    tcp: str
    unix: str
    reactor: Any

    def endpoint(self, kind: str) -> str:
        return self.tcp if kind == "tcp" else self.unix

    async def client(self, kind: str = "tcp", **kw: Any) -> WsTestClient:
        return await WsTestClient.connect(self.reactor, self.endpoint(kind), **kw)

    async def stop(self) -> None:
        # Drop every server-side connection first so no stray transport outlives the test.
        for session in list(self.state.sessions.values()):
            session.channel.sink.dropConnection(abort=True)
        await defer.maybeDeferred(self.service.stopService)


async def start_server(reactor: Any, tmp_path: Path, state: ServerState | None = None, **overrides: Any) -> RunningServer:
    if state is None:
        state = ServerState(make_config(tmp_path, **overrides), reactor)
    sock = tmp_path / "run" / "car.sock"
    service = make_car_service(state, reactor, ["tcp:0:interface=127.0.0.1", unix_socket_description(sock)])
    service.startService()
    port = service.tcp_port()
    return RunningServer(
        state=state,
        service=service,
        tcp=f"tcp:127.0.0.1:{port}",
        unix=f"unix:{sock}",
        reactor=reactor,
    )


def _bounded(d: defer.Deferred, clock: Any, timeout: float, what: str) -> defer.Deferred:
    """C{d}, failed with a readable AssertionError after C{timeout} seconds."""

    def timed_out(failure: Failure) -> None:
        failure.trap(defer.TimeoutError)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    return d.addTimeout(timeout, clock).addErrback(timed_out)


def sessions_closed(
    state: ServerState, *which: Any, what: str = "the session to close", timeout: float = 15.0
) -> defer.Deferred:
    """
    Fire once each server-side session in C{which} (sessions or client
    ids; by default every session live now) has been closed by
    ``ServerState.close_session``; at once for one already gone.  Fires on
    the reactor turn after the last close, so the teardown (features,
    cleanups) is complete when the waiter resumes.
    """
    if not which:
        which = tuple(state.sessions.values())
    live = [state.sessions.get(item) if isinstance(item, str) else item for item in which]
    live = [session for session in live if session is not None]  # an absent id: closed already
    done: defer.Deferred = defer.Deferred()
    left = [len(live)]

    def one_closed() -> None:
        left[0] -= 1
        if left[0] == 0 and not done.called:
            done.callback(None)

    for session in live:
        session.on_close(lambda: state.clock.callLater(0, one_closed))
    if not live:
        done.callback(None)
    return _bounded(done, state.clock, timeout, what)


async def until(reactor: Any, predicate: Any, what: str, timeout: float = 15.0) -> Any:
    """
    Poll C{predicate} (plain or returning a Deferred) until truthy; bounded.
    Only for what happens outside this process (a child process, a file a
    daemon subprocess writes): in-process events have waits of their own
    (``WsTestClient.when``, ``client.closed``, ``sessions_closed``).
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = await defer.maybeDeferred(predicate)
        if value:
            return value
        assert reactor.seconds() < deadline, f"timed out waiting for {what}"
        await task.deferLater(reactor, 0.02, lambda: None)


# -- the real protocol over an in-memory transport ---------------------------------

HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: localhost:9100\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def client_frame(payload: bytes, opcode: int = 1, fin: bool = True, length: int | None = None) -> bytes:
    """A masked client frame (zero mask: the payload goes as is); C{length} may lie."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split what the server wrote (after the HTTP response) into (opcode, payload)."""
    out = []
    while len(data) >= 2:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        pos = 2
        if n == 126:
            n, pos = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, pos = int.from_bytes(data[2:10], "big"), 10
        if len(data) < pos + n:
            break
        out.append((opcode, data[pos : pos + n]))
        data = data[pos + n :]
    return out


def _lenient_transport(addr: Any) -> Any:
    from twisted.internet.testing import StringTransportWithDisconnection

    class LenientTransport(StringTransportWithDisconnection):
        # Like a real TCP transport: unregistering no producer is fine, an
        # abort loses the connection too.
        _lenient = True

        def unregisterProducer(self) -> None:
            self.producer = None

        def abortConnection(self) -> None:
            self.disconnected = True
            self.loseConnection()

    return LenientTransport(peerAddress=addr)


@attrs.define
class MemoryConnection:
    """The daemon's real protocol on a StringTransport: bytes in, frames out."""

    protocol: Any
    transport: Any

    @classmethod
    def open(cls, factory: Any, host: str = "127.0.0.1", port: int = 40000, upgrade: bool = True) -> "MemoryConnection":
        from twisted.internet.address import IPv4Address

        addr = IPv4Address("TCP", host, port)
        proto = factory.buildProtocol(addr)
        transport = _lenient_transport(addr)
        transport.protocol = proto
        proto.makeConnection(transport)
        conn = cls(proto, transport)
        if upgrade:
            conn.feed(HANDSHAKE)
            assert conn.http_response().startswith(b"HTTP/1.1 101"), conn.transport.value()
        return conn

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def send(self, msg: Any) -> None:
        self.feed(client_frame(json.dumps(msg).encode()))

    def http_response(self) -> bytes:
        value = self.transport.value()
        end = value.find(b"\r\n\r\n")
        return value[: end + 4] if end >= 0 else value

    def frames(self) -> list[tuple[int, bytes]]:
        value = self.transport.value()
        return server_frames(value[value.find(b"\r\n\r\n") + 4 :])

    def messages(self) -> list[Any]:
        return [json.loads(p) for op, p in self.frames() if op == 1]

    def close_code(self) -> int | None:
        for op, payload in self.frames():
            if op == 8:
                return int.from_bytes(payload[:2], "big")
        return None

    @property
    def dropped(self) -> bool:
        return self.transport.disconnecting or not self.transport.connected


def memory_factory(state: Any) -> Any:
    """A CarServerFactory whose Autobahn-side timers stay off the global reactor."""
    from car_twisted.ws.protocol import CarServerFactory

    factory = CarServerFactory(state)
    factory.openHandshakeTimeout = 0
    factory.closeHandshakeTimeout = 0
    factory.autoPingInterval = 0
    factory.keepalive.interval = 0  # the keep-alive's own tests turn it on
    return factory


# -- child processes, from /proc -------------------------------------------------


def espeak_children() -> list[int]:
    """Pids of this process's espeak-ng children that are not zombies (an in-process daemon's speakers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
        except OSError:
            continue
        fields = rest.split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and head.endswith("(espeak-ng"):
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """C{pid} exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
