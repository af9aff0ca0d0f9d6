"""The example in docs/embedding.md, executed as written."""

import re
import socket
from pathlib import Path

import pytest_twisted
import treq
from twisted.internet import defer

from support import WsTestClient

DOC = Path(__file__).resolve().parents[2] / "docs" / "embedding.md"


def example_code():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, "docs/embedding.md should hold exactly one python example"
    return blocks[0]


@pytest_twisted.ensureDeferred
async def test_embedding_example_runs(reactor, tmp_path):
    """The app serves its page and the CAR server authenticates a client and answers the extra method."""
    namespace = {"__name__": "embedding_example"}
    exec(compile(example_code(), str(DOC), "exec"), namespace)
    sock = tmp_path / "car" / "car.sock"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app, state = namespace["build"](
        reactor, str(tmp_path / "car-home"), str(sock), f"tcp:{port}:interface=127.0.0.1", "doc-token"
    )
    app.startService()
    try:
        response = await treq.get(f"http://127.0.0.1:{port}/")
        assert response.code == 200
        assert b"My app" in await response.content()

        client = await WsTestClient.connect(reactor, f"unix:{sock}")
        await client.authenticate(token="doc-token")
        assert (await client.result("app.greet", {"name": "Ada", "excited": True}))["greeting"] == "Hello, Ada!"
        blank = await client.call("app.greet", {"name": " "})
        assert blank["error"]["code"] == -32602 and blank["error"]["data"] == {"field": "name"}
        caps = await client.result("capabilities.list", {})
        assert "app.greet" in caps["methods"]
        client.drop()
        await client.closed
    finally:
        await defer.maybeDeferred(app.stopService)
