"""
Baseline: a bare Autobahn (Twisted) JSON-RPC echo responder.

Stock ``WebSocketServerProtocol.onMessage``, stdlib ``json``, and
``sendMessage`` for every reply; per-message compression is refused.  Any
request is answered ``{"jsonrpc":"2.0","id":id,"result":params}``;
``session.auth`` and ``server.handshake`` get a trivial result, so the
benchmark's load generator runs unchanged.  No auth, no validation.

Prints ``LISTENING <port>`` on stdout once bound (``--port 0`` picks a
free port); SIGINT/SIGTERM stop the reactor.
"""

from __future__ import annotations

import argparse
import json

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

_TRIVIAL = {"session.auth": {"ok": True}, "server.handshake": {"protocol_version": 3}}


class EchoProtocol(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        msg = json.loads(payload)
        method = msg.get("method")
        result = _TRIVIAL.get(method, msg.get("params"))
        reply = {"jsonrpc": "2.0", "id": msg.get("id"), "result": result}
        self.sendMessage(json.dumps(reply).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    factory = WebSocketServerFactory()
    factory.protocol = EchoProtocol
    factory.setProtocolOptions(perMessageCompressionAccept=lambda offers: None)
    port = reactor.listenTCP(args.port, factory, interface="127.0.0.1")
    print(f"LISTENING {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
