"""
Baseline: a bare ``websockets`` (asyncio) JSON-RPC echo responder.

One coroutine per connection reads messages and answers each with
``{"jsonrpc":"2.0","id":id,"result":params}`` (stdlib ``json``);
``session.auth`` and ``server.handshake`` get a trivial result, so the
benchmark's load generator runs unchanged.  ``compression=None``,
``max_queue=None``; no auth, no validation.

Prints ``LISTENING <port>`` on stdout once bound (``--port 0`` picks a
free port); SIGINT/SIGTERM close the server and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

try:  # websockets >= 13: the new asyncio implementation
    from websockets.asyncio.server import serve
except ImportError:  # websockets 12: the legacy implementation
    from websockets.server import serve  # type: ignore[no-redef]

from websockets.exceptions import ConnectionClosed

_TRIVIAL = {"session.auth": {"ok": True}, "server.handshake": {"protocol_version": 3}}


async def handler(ws, *_legacy_path):
    try:
        async for message in ws:
            msg = json.loads(message)
            method = msg.get("method")
            result = _TRIVIAL.get(method, msg.get("params"))
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": msg.get("id"), "result": result}))
    except ConnectionClosed:
        pass


async def serve_until_signalled(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with serve(handler, "127.0.0.1", port, compression=None, max_queue=None) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"LISTENING {bound}", flush=True)
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve_until_signalled(args.port))


if __name__ == "__main__":
    main()
