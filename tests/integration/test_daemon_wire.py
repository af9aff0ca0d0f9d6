"""
The real server on loopback TCP and on a UNIX socket, driven by a real
Autobahn WebSocket client: auth, handshake, every error code, batches,
concurrency and the handler deadline.
"""

import json

import pytest
import pytest_twisted
from twisted.internet import defer, task

from support import HOST_TOKEN, TOKEN, start_server

KINDS = ["tcp", "unix"]


def slow(reactor):
    async def handler(session, params):
        await task.deferLater(reactor, params["secs"], lambda: None)
        return {"slept": params["secs"], "tag": params["tag"]}

    return handler


async def serve(reactor, tmp_path, **overrides):
    server = await start_server(reactor, tmp_path, **overrides)
    server.state.register_method("test.slow", slow(reactor))
    server.state.register_method("test.echo", lambda s, p: p)
    server.state.register_method("test.watch", lambda s, p: "watching", requires_handshake=True)
    return server


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_auth_paths(reactor, tmp_path, kind):
    """Token, wrong token then retry, host token role, and the unauthenticated close."""
    server = await serve(reactor, tmp_path)
    try:
        good = await server.client(kind)
        wrong = await good.call("session.auth", {"token": "nope"}, rid=0)
        assert wrong["error"] == {"code": -32603, "message": "auth failed: token mismatch"}
        ok = await good.call("session.auth", {"token": TOKEN}, rid=1)
        assert ok == {"jsonrpc": "2.0", "id": 1, "result": {"ok": True, "auth_enabled": True}}

        host = await server.client(kind)
        reply = await host.call("session.auth", {"host_token": HOST_TOKEN}, rid=0)
        assert reply["result"]["role"] == "host"
        assert [s.role for s in server.state.sessions.values()].count("host") == 1

        rude = await server.client(kind)
        reply = await rude.call("capabilities.list", {}, rid=3)
        assert reply["error"]["code"] == -32001 and reply["id"] == 3
        code = await rude.closed
        assert code == 1008
        assert len(server.state.sessions) == 2
        good.drop()
        host.drop()
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_no_auth(reactor, tmp_path, kind):
    """With auth off, calls work without session.auth, and session.auth says so."""
    server = await serve(reactor, tmp_path, auth_enabled=False)
    try:
        client = await server.client(kind)
        assert (await client.result("test.echo", {"a": 1})) == {"a": 1}
        assert (await client.result("session.auth", {"token": "whatever"})) == {"ok": True, "auth_enabled": False}
        client.drop()
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_handshake(reactor, tmp_path, kind):
    """v3 and v2 negotiate; mismatch and missing answer -32006; a handshake-gated method answers -32005 before it."""
    server = await serve(reactor, tmp_path)
    try:
        c = await server.client(kind)
        await c.authenticate(handshake=False)
        gated = await c.call("test.watch", {})
        assert gated["error"]["code"] == -32005
        missing = await c.call("server.handshake", {"client_version": "0.58.0"})
        assert missing["error"]["code"] == -32006
        mismatch = await c.call("server.handshake", {"protocol_version": 9})
        assert mismatch["error"]["code"] == -32006 and "9" in mismatch["error"]["message"]
        v3 = await c.call(
            "server.handshake",
            {"client_version": "0.58.0", "protocol_version": 3, "required_capabilities": []},
            rid=2,
        )
        assert v3["id"] == 2 and v3["result"]["protocol_version"] == 3
        after = await c.call("test.watch", {})
        assert after["result"] == "watching"

        c2 = await server.client(kind)
        await c2.authenticate(handshake=False)
        v2 = await c2.call("server.handshake", {"protocol_version": 2, "client_version": "0.25.0"})
        assert v2["result"] == {"protocol_version": 2, "server_version": v3["result"]["server_version"], "client_protocol_version": 2}
        c.drop()
        c2.drop()
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_error_codes(reactor, tmp_path, kind):
    """-32700, -32600, -32601 (plain and out of scope), -32602 naming the field, -32603."""
    server = await serve(reactor, tmp_path)

    def broken(session, params):
        raise RuntimeError("do not show this")

    server.state.register_method("test.broken", broken)
    try:
        c = await server.client(kind)
        await c.authenticate()

        frame = c.next_frame()
        c.send_raw("{not json")
        assert (await frame)["error"]["code"] == -32700

        frame = c.next_frame()
        c.send_raw(json.dumps({"jsonrpc": "2.0", "id": 5}))
        assert (await frame) == {"jsonrpc": "2.0", "id": 5, "error": {"code": -32600, "message": "invalid request: missing method"}}

        assert (await c.call("no.such"))["error"]["code"] == -32601
        infer = await c.call("infer", {"prompt": "hi"})
        assert infer["error"]["code"] == -32601 and "not implemented by this daemon" in infer["error"]["message"]

        bad = await c.call("server.handshake", {"protocol_version": 3, "client_version": 5})
        assert bad["error"]["code"] == -32602 and bad["error"]["data"] == {"field": "client_version"}

        internal = await c.call("test.broken", {})
        assert internal["error"] == {"code": -32603, "message": "internal error while handling test.broken"}
        c.drop()
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_batch(reactor, tmp_path, kind):
    """A batch answers as one array: requests in order, notifications omitted."""
    server = await serve(reactor, tmp_path)
    try:
        c = await server.client(kind)
        await c.authenticate()
        frame = c.next_frame()
        c.send_raw(
            json.dumps(
                [
                    {"jsonrpc": "2.0", "id": 10, "method": "test.slow", "params": {"secs": 0.05, "tag": "a"}},
                    {"jsonrpc": "2.0", "method": "test.echo", "params": {}},
                    {"jsonrpc": "2.0", "id": "eleven", "method": "test.echo", "params": {"b": 2}},
                    {"jsonrpc": "2.0", "id": 12, "method": "nope"},
                ]
            )
        )
        batch = await frame
        assert [r["id"] for r in batch] == [10, "eleven", 12]
        assert batch[0]["result"]["tag"] == "a" and batch[1]["result"] == {"b": 2}
        assert batch[2]["error"]["code"] == -32601
        c.drop()
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_concurrent_requests_out_of_order(reactor, tmp_path, kind):
    """Pipelined requests run concurrently and are answered as they finish."""
    server = await serve(reactor, tmp_path)
    try:
        c = await server.client(kind)
        await c.authenticate()
        start = c.received.__len__()
        waits = [
            c.send("test.slow", {"secs": 0.3, "tag": "slow"}, rid=20),
            c.send("test.slow", {"secs": 0.1, "tag": "medium"}, rid=21),
            c.send("test.echo", {"tag": "fast"}, rid=22),
        ]
        await defer.gatherResults(waits)
        # Sent slow-first; answered as each finished, so the slow one ran alongside.
        order = [m["id"] for m in c.received[start:]]
        assert order == [22, 21, 20]
        c.drop()
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_handler_deadline(reactor, tmp_path, kind):
    """A handler past its deadline answers -32004; the connection keeps working."""
    server = await serve(reactor, tmp_path, handler_timeout=0.2)
    try:
        c = await server.client(kind)
        await c.authenticate()
        reply = await c.call("test.slow", {"secs": 5, "tag": "x"})
        assert reply["error"]["code"] == -32004
        assert (await c.result("test.echo", {"still": "alive"})) == {"still": "alive"}
        c.drop()
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_binary_frame_gets_error_notification(reactor, tmp_path, kind):
    server = await serve(reactor, tmp_path)
    try:
        c = await server.client(kind)
        await c.authenticate()
        frame = c.next_frame()
        c.send_raw(b"\x00\x01\x02", binary=True)
        reply = await frame
        assert reply["id"] is None and "binary frame refused" in reply["error"]["message"]
        c.drop()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_unix_socket_mode(reactor, tmp_path):
    """The UNIX listener is created 0600."""
    import os
    import stat

    server = await serve(reactor, tmp_path)
    try:
        sock = tmp_path / "run" / "car.sock"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    finally:
        await server.stop()
    assert not sock.exists()


@pytest_twisted.ensureDeferred
async def test_tcp_nodelay_is_on(reactor, tmp_path):
    """Small replies are not held back by Nagle's algorithm."""
    import socket as _socket

    server = await serve(reactor, tmp_path)
    try:
        c = await server.client("tcp")
        await c.authenticate()
        (session,) = server.state.sessions.values()
        sock = session.channel.sink.transport.getHandle()
        assert sock.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY) != 0
        c.drop()
    finally:
        await server.stop()
