"""
Baseline: a ``websockets`` JSON-RPC echo responder tuned the way its users
tune it: the ``uvloop`` event loop and ``orjson`` for parsing and
serialising.

Otherwise like ``websockets_bare.py``: one coroutine per connection,
``compression=None``, ``max_queue=None``, every request answered
``{"jsonrpc":"2.0","id":id,"result":params}`` (a trivial result for
``session.auth`` and ``server.handshake``), no auth, no validation.
Where the installed ``websockets`` allows it (the asyncio implementation
of 13 and later) frames are received undecoded (``recv(decode=False)``:
orjson validates UTF-8 itself) and replies are sent as text frames from
orjson's bytes (``send(..., text=True)``) with no ``str`` in between.

Prints ``LISTENING <port>`` on stdout once bound (``--port 0`` picks a
free port); SIGINT/SIGTERM close the server and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import signal

import orjson
import uvloop

try:  # websockets >= 13: the new asyncio implementation
    from websockets.asyncio.server import ServerConnection, serve

    _RECV_BYTES = "decode" in inspect.signature(ServerConnection.recv).parameters
    _SEND_TEXT_BYTES = "text" in inspect.signature(ServerConnection.send).parameters
except ImportError:  # websockets 12: the legacy implementation
    from websockets.server import serve  # type: ignore[no-redef]

    _RECV_BYTES = _SEND_TEXT_BYTES = False

from websockets.exceptions import ConnectionClosed

_TRIVIAL = {"session.auth": {"ok": True}, "server.handshake": {"protocol_version": 3}}


def _answer(message: bytes | str) -> bytes:
    msg = orjson.loads(message)
    result = _TRIVIAL.get(msg.get("method"), msg.get("params"))
    return orjson.dumps({"jsonrpc": "2.0", "id": msg.get("id"), "result": result})


async def handler(ws, *_legacy_path):
    try:
        if _RECV_BYTES and _SEND_TEXT_BYTES:
            recv, send = ws.recv, ws.send
            while True:
                await send(_answer(await recv(decode=False)), text=True)
        else:
            async for message in ws:
                await ws.send(_answer(message).decode())
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
    uvloop.run(serve_until_signalled(args.port))


if __name__ == "__main__":
    main()
