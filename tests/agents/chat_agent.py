"""
A small conversational agent for the chat end-to-end tests (standard
library only).

It connects to CAR_DAEMON_URL, authenticates with CAR_AGENT_ID and
CAR_AGENT_TOKEN and serves the daemon's ``agent.chat`` reverse calls.  The
prompt's first word picks the behaviour; every other word becomes one
``token`` event (its ``delta`` is the word), in order:

- ``echo ...``: ack ``{accepted: true}``, stream the tokens, then ``done``;
- ``eager ...``: stream the tokens and ``done`` first, then ack;
- ``approve ...``: ack, stream the tokens, send ``approval_pending
  {approval_id}`` and wait for ``agent.chat.approve`` with that id; answer
  it ``{resolved: true}``, then send one token ``decision=<decision as
  JSON>`` and ``done``;
- ``linger``: ack, then one token every 50 ms (``t0``, ``t1``, ...) until
  the chat is cancelled (or a minute has passed), then ``done``.

``agent.chat.cancel`` stops the streaming for that session.  Every line on
stdout is ``<WORD> <json>`` so the tests can read it with agents.tail_log:
``READY`` (the auth reply), ``CHAT`` (the params of each agent.chat),
``APPROVE`` (the params of each agent.chat.approve), ``CANCEL`` (each
agent.chat.cancel, with whether that session was still streaming) and
``STOPPED`` (a cancelled session's tokens sent before it stopped).
"""

import base64
import json
import os
import socket
import struct
import sys
import threading
from urllib.parse import urlsplit

LINGER_EVERY = 0.05
LINGER_FOR = 60.0
APPROVAL_WAIT = 60.0


def frame(payload: bytes, opcode: int = 1) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def recv_frame(sock: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """One whole (unmasked, server-sent, unfragmented) frame: opcode and payload."""
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


def say(word: str, what: object) -> None:
    print(f"{word} {json.dumps(what, sort_keys=True)}", flush=True)


class Agent:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()
        self.cancelled: dict[str, threading.Event] = {}
        self.approvals: dict[tuple[str, str], list] = {}

    # -- sending ---------------------------------------------------------------

    def send_frame(self, payload: bytes, opcode: int) -> None:
        with self.send_lock:
            self.sock.sendall(frame(payload, opcode))

    def send(self, msg: dict) -> None:
        self.send_frame(json.dumps(msg).encode(), 1)

    def reply(self, rid: object, result: object) -> None:
        self.send({"jsonrpc": "2.0", "id": rid, "result": result})

    def error(self, rid: object, message: str) -> None:
        self.send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": message}})

    def event(self, session_id: str, kind: str, **fields: object) -> None:
        params = {"session_id": session_id, "kind": kind, **fields}
        self.send({"jsonrpc": "2.0", "method": "agent.chat.event", "params": params})

    # -- the daemon's calls ------------------------------------------------------

    def serve(self, msg: dict) -> None:
        method, params, rid = msg.get("method"), msg.get("params") or {}, msg.get("id")
        if method == "agent.chat" and rid is not None:
            say("CHAT", params)
            session_id = params["session_id"]
            with self.lock:
                self.cancelled[session_id] = threading.Event()
            threading.Thread(target=self.chat, args=(rid, session_id, params["prompt"]), daemon=True).start()
        elif method == "agent.chat.approve" and rid is not None:
            say("APPROVE", params)
            with self.lock:
                waiting = self.approvals.pop((params.get("session_id"), params.get("approval_id")), None)
            self.reply(rid, {"resolved": waiting is not None})
            if waiting is not None:
                waiting.append(params.get("decision"))
                waiting[0].set()
        elif method == "agent.chat.cancel" and rid is None:
            session_id = params.get("session_id")
            with self.lock:
                stop = self.cancelled.get(session_id)
            say("CANCEL", {"session_id": session_id, "streaming": stop is not None})
            if stop is not None:
                stop.set()
        elif rid is not None:
            self.error(rid, f"chat_agent does not serve {method}")

    def chat(self, rid: object, session_id: str, prompt: str) -> None:
        mode, *words = prompt.split()
        stop = self.cancelled[session_id]
        try:
            if mode != "eager":
                self.reply(rid, {"accepted": True})
            if mode == "linger":
                sent = 0
                while not stop.wait(LINGER_EVERY) and sent * LINGER_EVERY < LINGER_FOR:
                    self.event(session_id, "token", delta=f"t{sent}")
                    sent += 1
                if stop.is_set():
                    say("STOPPED", {"session_id": session_id, "tokens": sent})
                    return
            for word in words:
                if stop.is_set():
                    return
                self.event(session_id, "token", delta=word)
            if mode == "approve":
                approval_id = f"approval-{session_id}"
                waiting: list = [threading.Event()]
                with self.lock:
                    self.approvals[(session_id, approval_id)] = waiting
                self.event(session_id, "approval_pending", approval_id=approval_id)
                if not waiting[0].wait(APPROVAL_WAIT):
                    self.event(session_id, "error", message="nobody answered the approval")
                    return
                self.event(session_id, "token", delta="decision=" + json.dumps(waiting[1], sort_keys=True))
            self.event(session_id, "done")
            if mode == "eager":
                self.reply(rid, {"accepted": True})
        except OSError:
            pass  # the connection went; the daemon ends the chat itself
        finally:
            with self.lock:
                self.cancelled.pop(session_id, None)


def main() -> None:
    url = urlsplit(os.environ["CAR_DAEMON_URL"])
    sock = socket.create_connection((url.hostname, url.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            sys.exit("the daemon closed the connection during the upgrade")
        head += chunk
    buf = bytearray(head.split(b"\r\n\r\n", 1)[1])
    agent = Agent(sock)
    auth = {"agent_id": os.environ["CAR_AGENT_ID"], "token": os.environ["CAR_AGENT_TOKEN"]}
    agent.send({"jsonrpc": "2.0", "id": 0, "method": "session.auth", "params": auth})
    while True:
        try:
            opcode, payload = recv_frame(sock, buf)
        except ConnectionError:
            say("CLOSED", {})
            return
        if opcode == 0x9:  # ping
            agent.send_frame(payload, 0xA)
        elif opcode == 0x8:
            say("CLOSED", {"code": int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None})
            return
        elif opcode == 0x1:
            msg = json.loads(payload)
            if msg.get("id") == 0 and "method" not in msg:
                say("READY", msg)
            else:
                agent.serve(msg)


if __name__ == "__main__":
    main()
