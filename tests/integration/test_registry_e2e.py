"""
registry.* over real sockets, with the file work in the reactor's thread
pool: what one connection registers another sees, and pipelined writes
to one entry from several connections leave it whole.
"""

import json
import os
import time

import pytest_twisted
from twisted.internet import defer

from support import start_server


@pytest_twisted.ensureDeferred
async def test_round_trip_between_connections(reactor, tmp_path):
    server = await start_server(reactor, tmp_path)
    try:
        agent = await server.client("unix")
        await agent.authenticate()
        tray = await server.client("tcp")
        await tray.authenticate()
        entry = {"name": "writer", "dashboard_url": "http://127.0.0.1:8123/", "status": "running", "pid": os.getpid()}
        assert await agent.result("registry.register", {"entry": entry}) is None
        stale = {"name": "stale", "dashboard_url": "http://127.0.0.1:8124/", "last_heartbeat_at": int(time.time()) - 600}
        assert await agent.result("registry.register", {"entry": stale}) is None

        listed = await tray.result("registry.list")
        assert [e["name"] for e in listed] == ["stale", "writer"]
        assert listed[1]["pid"] == os.getpid() and abs(listed[1]["registered_at"] - time.time()) < 5

        assert await agent.result("registry.heartbeat", {"name": "writer"}) == {"refreshed": True}
        assert await tray.result("registry.reap", {}) == ["stale"]
        assert await agent.result("registry.heartbeat", {"name": "stale"}) == {"refreshed": False}

        reply = await tray.call("registry.list", {"registry_path": "/etc"})
        assert reply["error"]["code"] == -32602 and reply["error"]["data"] == {"field": "registry_path"}

        assert await agent.result("registry.unregister", {"name": "writer"}) is None
        assert await tray.result("registry.list") == []
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_pipelined_writes_to_one_entry(reactor, tmp_path):
    server = await start_server(reactor, tmp_path)
    try:
        clients = [await server.client("tcp") for _ in range(3)]
        for client in clients:
            await client.authenticate()
        entry = {"name": "busy", "dashboard_url": "http://127.0.0.1:9/"}
        await clients[0].result("registry.register", {"entry": entry})
        sent = []
        for i in range(60):
            client = clients[i % 3]
            if i % 4 == 0:
                status = ("running", "idle")[i % 2]
                sent.append(client.send("registry.register", {"entry": dict(entry, status=status, port=i)}))
            else:
                sent.append(client.send("registry.heartbeat", {"name": "busy"}))
        replies = await defer.gatherResults(sent)
        assert all("result" in r for r in replies), [r for r in replies if "result" not in r][:3]
        assert all(r["result"] == {"refreshed": True} for r in replies if isinstance(r["result"], dict))
        directory = server.state.config.paths.home / "registry"
        assert os.listdir(directory) == ["busy.json"]
        on_disk = json.loads((directory / "busy.json").read_text())
        assert on_disk["name"] == "busy" and on_disk["port"] % 4 == 0
    finally:
        await server.stop()
