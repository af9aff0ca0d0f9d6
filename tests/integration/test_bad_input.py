"""
Bad input over real loopback sockets: garbage and invalid frames, oversized
messages, floods, half-open and non-reading peers, foreign browser origins.
Whatever one connection does, the daemon keeps serving the others.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from support import TOKEN, WsTestClient, request, sessions_closed, start_server

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
AUTH_REQUIRED = -32001

UPGRADE = (
    b"GET / HTTP/1.1\r\n"
    b"Host: localhost\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)


# -- helpers ------------------------------------------------------------------------


async def within(reactor: Any, d: Any, secs: float = 5.0) -> Any:
    """Await C{d} (a Deferred or coroutine) but fail after C{secs} seconds."""
    d = defer.ensureDeferred(d) if not isinstance(d, defer.Deferred) else d
    return await d.addTimeout(secs, reactor)


async def eventually(reactor: Any, pred: Callable[[], bool], secs: float = 5.0, what: str = "") -> None:
    """Poll C{pred}: only where no event marks the condition (see its uses)."""
    deadline = reactor.seconds() + secs
    while not pred():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {secs}s waiting for {what or pred}")
        await deferLater(reactor, 0.02, lambda: None)


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame, masked with an all-zero key (payload unchanged)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


class RawClient(Protocol):
    """A bare TCP peer: speaks whatever bytes the test hands it."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.head: bytes | None = None
        self.frames: list[tuple[int, bytes]] = []
        self.lost: defer.Deferred = defer.Deferred()
        self.is_lost = False
        self._watchers: list[tuple[Callable[[], bool], defer.Deferred]] = []

    def when(self, pred: Callable[[], bool]) -> defer.Deferred:
        """Fires once C{pred()} holds: tried now, after each read and at connection loss."""
        if pred():
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._watchers.append((pred, d))
        return d

    def _wake(self) -> None:
        watchers, self._watchers = self._watchers, []
        for pred, d in watchers:
            if d.called:
                continue  # timed out
            if pred():
                d.callback(None)
            else:
                self._watchers.append((pred, d))

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(self.buf[: end + 4])
            del self.buf[: end + 4]
        self._parse_frames()
        self._wake()

    def _parse_frames(self) -> None:
        while len(self.buf) >= 2:
            opcode = self.buf[0] & 0x0F
            n = self.buf[1] & 0x7F
            pos = 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n = int.from_bytes(self.buf[2:4], "big")
                pos = 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n = int.from_bytes(self.buf[2:10], "big")
                pos = 10
            if len(self.buf) < pos + n:
                return
            self.frames.append((opcode, bytes(self.buf[pos : pos + n])))
            del self.buf[: pos + n]

    def connectionLost(self, reason: Any) -> None:
        self.is_lost = True
        if not self.lost.called:
            self.lost.callback(None)
        self._wake()

    def abort(self) -> None:
        if self.transport is not None and not self.is_lost:
            self.transport.abortConnection()

    def texts(self) -> list[Any]:
        return [json.loads(p) for op, p in self.frames if op == 0x1]


async def raw_connect(reactor: Any, endpoint: str) -> RawClient:
    proto = RawClient()
    await connectProtocol(clientFromString(reactor, endpoint), proto)
    return proto


async def raw_upgrade(reactor: Any, endpoint: str, origin: str | None = None) -> RawClient:
    proto = await raw_connect(reactor, endpoint)
    extra = b"" if origin is None else b"Origin: " + origin.encode() + b"\r\n"
    proto.transport.write(UPGRADE + extra + b"\r\n")
    await within(reactor, proto.when(lambda: proto.head is not None or proto.is_lost))
    return proto


async def raw_ws_authenticated(reactor: Any, endpoint: str) -> RawClient:
    proto = await raw_upgrade(reactor, endpoint)
    assert proto.head is not None and proto.head.startswith(b"HTTP/1.1 101"), proto.head
    proto.transport.write(
        client_frame(request("session.auth", {"token": TOKEN}, 0))
        + client_frame(request("server.handshake", {"protocol_version": 3}, 1))
    )
    await within(reactor, proto.when(lambda: len(proto.texts()) >= 2 or proto.is_lost))
    assert [m.get("id") for m in proto.texts()] == [0, 1]
    assert all("result" in m for m in proto.texts()), proto.texts()
    return proto


async def expect_result(reactor: Any, client: WsTestClient, method: str = "capabilities.list", secs: float = 5.0) -> Any:
    reply = await within(reactor, client.call(method, {}), secs)
    assert "result" in reply, reply
    return reply["result"]


async def fresh_client_works(reactor: Any, server: Any, clients: list) -> None:
    """A brand-new connection authenticates and gets an answer promptly."""
    client = await within(reactor, server.client())
    clients.append(client)
    await within(reactor, client.authenticate())
    # A small reply: some tests run with a 1 KiB message cap.
    assert await expect_result(reactor, client, "state.keys") == []


async def cleanup(server: Any, clients: list, raws: list) -> None:
    for raw in raws:
        raw.abort()
    for client in clients:
        client.drop()
    await server.stop()


# -- garbage text frames ------------------------------------------------------------


GARBAGE = [
    (b"", PARSE_ERROR),
    (b"garbage", PARSE_ERROR),
    (b"{", PARSE_ERROR),
    (b"\x00\x01\x02", PARSE_ERROR),
    (b"[" * 5000, PARSE_ERROR),
    (b"null", INVALID_REQUEST),
    (b"42", INVALID_REQUEST),
    (b'"jsonrpc"', INVALID_REQUEST),
    (b"[]", INVALID_REQUEST),
    (b"{}", INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":[1],"method":"capabilities.list"}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":18446744073709551616,"method":"capabilities.list"}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":true,"method":"capabilities.list"}', INVALID_REQUEST),
    (b'{"jsonrpc":"1.0","id":1,"method":"capabilities.list"}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":7}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"capabilities.list","params":"x"}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"no.such"}', METHOD_NOT_FOUND),
    (b'{"jsonrpc":"2.0","id":1,"method":"server.handshake","params":[3]}', INVALID_PARAMS),
    ("{\"jsonrpc\":\"2.0\",\"id\":\"\u00e9\u6f22\U0001f600\",\"method\":\"x.\u00e9\"}".encode(), METHOD_NOT_FOUND),
]


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_garbage_text_frames(reactor, tmp_path, kind):
    server = await start_server(reactor, tmp_path)
    clients: list = []
    try:
        client = await within(reactor, server.client(kind))
        clients.append(client)
        await within(reactor, client.authenticate())
        for payload, code in GARBAGE:
            frame = client.next_frame()
            client.send_raw(payload)
            reply = await within(reactor, frame)
            assert type(reply) is dict and reply.get("jsonrpc") == "2.0", (payload, reply)
            assert reply["error"]["code"] == code, (payload, reply)
        # A binary frame that is no voice frame (and no stream is open) is refused, not fatal.
        frame = client.next_frame()
        client.send_raw(b"\x00\xff" * 100, binary=True)
        reply = await within(reactor, frame)
        assert reply["id"] is None and reply["error"]["code"] == -32602
        assert reply["error"]["message"].startswith("binary frame refused")
        # Still open, still answering, nothing left over.
        assert client.close_code is None
        before = len(client.received)
        await expect_result(reactor, client)
        assert len(client.received) == before + 1
        assert len(server.state.sessions) == 1
    finally:
        await cleanup(server, clients, [])


@pytest_twisted.ensureDeferred
async def test_unauthenticated_garbage_then_denied(reactor, tmp_path):
    server = await start_server(reactor, tmp_path)
    clients: list = []
    try:
        client = await within(reactor, server.client())
        clients.append(client)
        frame = client.next_frame()
        client.send_raw(b"not json at all")
        reply = await within(reactor, frame)
        assert reply["error"]["code"] == PARSE_ERROR and reply["id"] is None
        reply = await within(reactor, client.call("capabilities.list", {}, rid="x"))
        assert reply["error"]["code"] == AUTH_REQUIRED and reply["id"] == "x"
        code = await within(reactor, client.closed)
        assert code == 1008
        await sessions_closed(server.state, timeout=5, what="the denied session to go")
        assert not server.state.sessions
        await fresh_client_works(reactor, server, clients)
    finally:
        await cleanup(server, clients, [])


# -- invalid UTF-8 and oversized messages ------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"\xff"}',
        b"\xc0\xaf",  # overlong
        b'{"x":"\xed\xa0\x80"}',  # an encoded surrogate
        b'"\xe2\x82',  # ends inside a code point
    ],
    ids=["ff", "overlong", "surrogate", "truncated"],
)
@pytest_twisted.ensureDeferred
async def test_invalid_utf8_text_frame_closes_1007(reactor, tmp_path, payload):
    server = await start_server(reactor, tmp_path)
    clients: list = []
    try:
        client = await within(reactor, server.client())
        clients.append(client)
        await within(reactor, client.authenticate())
        client.send_raw(payload)
        code = await within(reactor, client.closed)
        assert code == 1007
        await sessions_closed(server.state, timeout=5)
        assert not server.state.sessions
        await fresh_client_works(reactor, server, clients)
    finally:
        await cleanup(server, clients, [])


@pytest.mark.parametrize("fragment", [None, 400], ids=["one-frame", "fragmented"])
@pytest_twisted.ensureDeferred
async def test_oversized_message_closes_1009(reactor, tmp_path, fragment):
    server = await start_server(reactor, tmp_path, max_message_bytes=1024)
    clients: list = []
    try:
        client = await within(reactor, server.client())
        clients.append(client)
        await within(reactor, client.authenticate())
        # Exactly at the limit is fine.
        at_limit = b'{"jsonrpc":"2.0","id":"at-limit","method":"state.keys","params":{"pad":"'
        at_limit += b"p" * (1024 - len(at_limit) - 3) + b'"}}'
        assert len(at_limit) == 1024
        frame = client.next_frame()
        client.send_raw(at_limit)
        reply = await within(reactor, frame)
        assert reply["id"] == "at-limit" and "result" in reply, reply
        # One byte over is not.
        over = at_limit[:-3] + b'p"}}'
        assert len(over) == 1025
        if fragment is None:
            client.send_raw(over)
        else:
            client.protocol.sendMessage(over, isBinary=False, fragmentSize=fragment)
        code = await within(reactor, client.closed)
        assert code == 1009
        await sessions_closed(server.state, timeout=5)
        assert not server.state.sessions
        await fresh_client_works(reactor, server, clients)
    finally:
        await cleanup(server, clients, [])


# -- a flood on one connection ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_flood_does_not_starve_other_connections(reactor, tmp_path):
    server = await start_server(reactor, tmp_path)
    clients: list = []
    try:
        flooder = await within(reactor, server.client())
        other = await within(reactor, server.client())
        clients += [flooder, other]
        await within(reactor, flooder.authenticate())
        await within(reactor, other.authenticate())

        n = 5000
        pending = [flooder.send("capabilities.list", {}, rid=1000 + i) for i in range(n)]
        reply = await within(reactor, other.call("server.schema", {}), 5)
        flood_done = sum(1 for d in pending if d.called)
        assert "result" in reply
        assert flood_done < n, "the second connection was only answered after the whole flood"

        replies = await within(reactor, defer.gatherResults(pending), 20)
        assert [r["id"] for r in replies] == [1000 + i for i in range(n)]
        assert all("result" in r for r in replies)
        assert flooder.close_code is None and other.close_code is None
    finally:
        await cleanup(server, clients, [])


# -- half-open and garbage TCP peers ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_half_open_upgrades_do_not_block_others(reactor, tmp_path):
    server = await start_server(reactor, tmp_path)
    clients: list = []
    raws: list = []
    try:
        for i in range(20):
            raw = await within(reactor, raw_connect(reactor, server.tcp))
            raws.append(raw)
            # A partial upgrade request, then silence.
            raw.transport.write(b"GET / HTTP/1.1\r\nHost: localh")
        # A wait for nothing to happen: no event marks "read and ignored".
        await deferLater(reactor, 0.2, lambda: None)
        await fresh_client_works(reactor, server, clients)
        # The half-open peers are no sessions, and nothing was written to them.
        assert len(server.state.sessions) == 1
        assert all(raw.head is None and not raw.buf for raw in raws)
    finally:
        await cleanup(server, clients, raws)


@pytest.mark.parametrize(
    "junk",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",  # a TLS hello
        b"garbage garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",  # plain HTTP, no upgrade
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ],
    ids=["tls", "garbage", "plain-http", "no-key"],
)
@pytest_twisted.ensureDeferred
async def test_junk_before_upgrade_is_refused(reactor, tmp_path, junk):
    server = await start_server(reactor, tmp_path)
    clients: list = []
    raws: list = []
    try:
        raw = await within(reactor, raw_connect(reactor, server.tcp))
        raws.append(raw)
        raw.transport.write(junk)
        await within(reactor, raw.lost, 5)
        assert not server.state.sessions
        await fresh_client_works(reactor, server, clients)
    finally:
        await cleanup(server, clients, raws)


# -- a peer that never reads ------------------------------------------------------------


async def _start_non_reader(reactor: Any, server: Any, count: int = 12000) -> tuple[RawClient, Any]:
    """
    A raw peer that upgrades, authenticates, then stops reading and
    pipelines C{count} requests whose replies (~1 KiB each) fill every buffer.
    """
    known = set(server.state.sessions)
    raw = await within(reactor, raw_ws_authenticated(reactor, server.tcp))
    (session,) = [s for cid, s in server.state.sessions.items() if cid not in known]
    raw.transport.pauseProducing()  # never read again
    raw.transport.write(b"".join(client_frame(request("server.schema", None, i)) for i in range(10, 10 + count)))
    return raw, session


@pytest_twisted.ensureDeferred
async def test_non_reader_does_not_block_others(reactor, tmp_path):
    server = await start_server(reactor, tmp_path)
    clients: list = []
    raws: list = []
    try:
        raw, session = await _start_non_reader(reactor, server)
        raws.append(raw)
        transport = session.channel.sink.transport
        # The daemon's output to it backs up (its reads get throttled) ...
        # Polled: it waits on the kernel's socket buffers filling, which
        # fires nothing the test can hook.
        await eventually(reactor, lambda: transport.producerPaused, 10, "the non-reader's output to back up")
        # ... and everyone else is still served promptly.
        for _ in range(3):
            await fresh_client_works(reactor, server, clients)
        assert session.client_id in server.state.sessions
    finally:
        await cleanup(server, clients, raws)


@pytest_twisted.ensureDeferred
async def test_non_reader_is_dropped_after_write_stall_timeout(reactor, tmp_path):
    server = await start_server(reactor, tmp_path, write_stall_timeout=1.0)
    clients: list = []
    raws: list = []
    try:
        other = await within(reactor, server.client())
        clients.append(other)
        await within(reactor, other.authenticate())
        raw, session = await _start_non_reader(reactor, server)
        raws.append(raw)
        assert len(server.state.sessions) == 2
        await sessions_closed(server.state, session, timeout=10, what="the stalled non-reader to be dropped")
        assert len(server.state.sessions) == 1
        assert session.client_id not in server.state.sessions
        assert session.closed
        # The reading client was not touched.
        assert other.close_code is None
        await expect_result(reactor, other)
        await fresh_client_works(reactor, server, clients)
    finally:
        await cleanup(server, clients, raws)


# -- browser origins --------------------------------------------------------------------


REFUSED_ORIGINS = [
    "http://evil.example",
    "https://evil.example:443",
    "http://localhost.evil.example",
    "http://127.0.0.1.evil.example",
    "http://127.0.0.1@evil.example",
]
ACCEPTED_ORIGINS = [
    "http://127.0.0.1:1234",
    "http://localhost",
    "https://localhost:8443",
    "http://[::1]:3000",
]


@pytest.mark.parametrize("origin", REFUSED_ORIGINS)
@pytest_twisted.ensureDeferred
async def test_foreign_origin_refused_at_upgrade(reactor, tmp_path, origin):
    server = await start_server(reactor, tmp_path)
    clients: list = []
    raws: list = []
    try:
        with pytest.raises(ConnectionError):
            client = await within(reactor, server.client(headers={"Origin": origin}))
            clients.append(client)
        raw = await within(reactor, raw_upgrade(reactor, server.tcp, origin=origin))
        raws.append(raw)
        assert raw.head is not None and raw.head.startswith(b"HTTP/1.1 403"), raw.head
        assert not server.state.sessions
        await fresh_client_works(reactor, server, clients)
    finally:
        await cleanup(server, clients, raws)


@pytest_twisted.ensureDeferred
async def test_null_origin_refused_at_upgrade(reactor, tmp_path):
    # The opaque origin of sandboxed frames and file:// pages; Autobahn's own
    # allowNullOrigin=False check answers it (400) before ours would (403).
    server = await start_server(reactor, tmp_path)
    clients: list = []
    raws: list = []
    try:
        with pytest.raises(ConnectionError):
            client = await within(reactor, server.client(headers={"Origin": "null"}))
            clients.append(client)
        raw = await within(reactor, raw_upgrade(reactor, server.tcp, origin="null"))
        raws.append(raw)
        assert raw.head is not None and raw.head.split(b" ")[1] in (b"400", b"403"), raw.head
        assert not server.state.sessions
        await fresh_client_works(reactor, server, clients)
    finally:
        await cleanup(server, clients, raws)


@pytest.mark.parametrize("origin", ACCEPTED_ORIGINS)
@pytest_twisted.ensureDeferred
async def test_loopback_origin_accepted(reactor, tmp_path, origin):
    server = await start_server(reactor, tmp_path)
    clients: list = []
    try:
        client = await within(reactor, server.client(headers={"Origin": origin}))
        clients.append(client)
        await within(reactor, client.authenticate())
        await expect_result(reactor, client)
    finally:
        await cleanup(server, clients, [])
