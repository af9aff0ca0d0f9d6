"""Smoke: the real server answers over TCP and UNIX."""

import pytest
import pytest_twisted

from support import start_server


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_auth_and_handshake(reactor, tmp_path, kind):
    server = await start_server(reactor, tmp_path)
    try:
        client = await server.client(kind)
        await client.authenticate()
        caps = await client.result("capabilities.list", {})
        assert 3 in caps["protocol_versions"]
        client.drop()
    finally:
        await server.stop()
