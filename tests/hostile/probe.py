"""
The well-behaved client of the hostile campaign, in a process of its own.

Usage: ``python probe.py PORT TOKEN [MAX_SECONDS]``.  It authenticates with
the daemon token, sets one small key, prints ``ready`` and then loops
``state.get`` of that key (one request at a time, about every 5 ms),
timing each reply, until its stdin closes or MAX_SECONDS pass.  It then
prints one JSON line: ``{count, p50_ms, p99_ms, max_ms, errors}``.  A
connection the daemon closes, a reply that is an error or the wrong value,
and a reply slower than the socket timeout each count as an error, and the
probe reconnects.  Standard library only.
"""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import struct
import sys
import threading
import time

INTERVAL = 0.005
TIMEOUT = 10.0
KEY = "probe"
VALUE = {"probe": "a small value", "n": 42}


class ProbeError(Exception):
    pass


def frame(payload: bytes) -> bytes:
    """One masked final text frame (zero mask key: the payload goes as is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = bytes((0x81, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((0x81, 0x80 | 127)) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload


class Connection:
    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        try:
            self._open(token)
        except BaseException:
            self.close()
            raise

    def _open(self, token: str) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ProbeError(f"upgrade refused: {head[:40]!r}")
        self.next_id = 0
        self.call("session.auth", {"token": token})
        self.call(
            "server.handshake",
            {"protocol_version": 3, "client_version": "probe", "required_capabilities": []},
        )

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ProbeError("connection closed by the daemon")
        self.buf += data

    def _frame(self) -> tuple[int, bytes] | None:
        """The next complete frame in the buffer, or None for more bytes."""
        buf = self.buf
        if len(buf) < 2:
            return None
        n, pos = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, pos = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, pos = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < pos + n:
            return None
        self.buf = buf[pos + n :]
        return buf[0] & 0x0F, buf[pos : pos + n]

    def _message(self) -> bytes:
        while True:
            got = self._frame()
            if got is None:
                self._fill()
                continue
            opcode, payload = got
            if opcode == 1:
                return payload
            if opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise ProbeError(f"daemon sent Close {code}")
            if opcode == 9:  # a ping: answer it
                self.sock.sendall(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)

    def call(self, method: str, params: dict) -> object:
        self.next_id += 1
        rid = self.next_id
        self.sock.sendall(frame(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()))
        while True:
            reply = json.loads(self._message())
            if reply.get("id") == rid:
                break
        if "error" in reply:
            raise ProbeError(f"{method}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def main(argv: list[str]) -> int:
    port, token = int(argv[1]), argv[2]
    max_seconds = float(argv[3]) if len(argv) > 3 else 600.0
    done = threading.Event()

    def watch_stdin() -> None:
        try:
            sys.stdin.read()
        finally:
            done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()

    conn = Connection(port, token)
    conn.call("state.set", {"key": KEY, "value": VALUE})
    sys.stdout.write("ready\n")
    sys.stdout.flush()

    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + max_seconds
    while not done.is_set() and time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            if conn is None:
                conn = Connection(port, token)
                conn.call("state.set", {"key": KEY, "value": VALUE})
                started = time.perf_counter()
            value = conn.call("state.get", {"key": KEY})
            elapsed = time.perf_counter() - started
            if value != VALUE:
                raise ProbeError(f"state.get answered {value!r}")
            latencies.append(elapsed * 1000.0)
        except (OSError, ProbeError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {e}")
            if conn is not None:
                conn.close()
            conn = None
            elapsed = time.perf_counter() - started
        if elapsed < INTERVAL:
            time.sleep(INTERVAL - elapsed)
    if conn is not None:
        conn.close()

    latencies.sort()
    report = {
        "count": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "max_ms": round(latencies[-1], 3) if latencies else 0.0,
        "errors": len(errors),
        "error_samples": errors[:5],
    }
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
