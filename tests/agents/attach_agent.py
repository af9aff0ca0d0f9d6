"""
A small supervised agent for the end-to-end tests (standard library only).

It connects to CAR_DAEMON_URL, authenticates with CAR_AGENT_ID and
CAR_AGENT_TOKEN, prints what the daemon answered, and stays connected
(answering pings) until it is stopped.  With --ignore-term it ignores
SIGTERM, so only SIGKILL ends it.
"""

import base64
import json
import os
import signal
import socket
import struct
import sys
from urllib.parse import urlsplit


def frame(payload: bytes, opcode: int = 1) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    else:
        head = bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def recv_frame(sock: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """One whole (unmasked, server-sent) frame: opcode and payload."""
    while True:
        if len(buf) >= 2:
            opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
            off = {126: 4, 127: 10}.get(n, 2)
            if len(buf) >= off:
                if n == 126:
                    n = struct.unpack("!H", bytes(buf[2:4]))[0]
                elif n == 127:
                    n = struct.unpack("!Q", bytes(buf[2:10]))[0]
                if len(buf) >= off + n:
                    payload = bytes(buf[off : off + n])
                    del buf[: off + n]
                    return opcode, payload
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("daemon closed the connection")
        buf.extend(chunk)


def main() -> None:
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"agent {os.environ['CAR_AGENT_ID']} starting, pid {os.getpid()}", flush=True)
    print("stderr line from the agent", file=sys.stderr, flush=True)
    url = urlsplit(os.environ["CAR_DAEMON_URL"])
    sock = socket.create_connection((url.hostname, url.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    buf = bytearray(head.split(b"\r\n\r\n", 1)[1])
    auth = {"agent_id": os.environ["CAR_AGENT_ID"], "token": os.environ["CAR_AGENT_TOKEN"]}
    sock.sendall(frame(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "session.auth", "params": auth}).encode()))
    while True:
        opcode, payload = recv_frame(sock, buf)
        if opcode == 0x9:  # ping
            sock.sendall(frame(payload, opcode=0xA))
        elif opcode == 0x8:
            print("daemon closed the connection", flush=True)
            return
        elif opcode == 0x1:
            print(f"reply {payload.decode()}", flush=True)


if __name__ == "__main__":
    main()
