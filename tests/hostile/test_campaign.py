"""
The hostile-client campaign: each scenario re-creates an attack against a
real ``twist car`` process while the probe (a well-behaved client in its
own process) loops ``state.get``, and shows the daemon's RSS growth and
the probe's p99 latency both bounded, next to a baseline without the
attack.  Every scenario's figures go to the campaign's report.
"""

from __future__ import annotations

import selectors
import socket
import time
from typing import Any

import pytest

from campaign import (
    MiB,
    Closed,
    Phase,
    Ws,
    assert_bounded,
    authenticated,
    baseline,
    figures,
    peer_state,
    split_frame,
    tcp_state,
    upgrade_request,
)
from support import client_frame

pytestmark = pytest.mark.hostile

KiB = 1024
# The daemon's defaults these attacks push against.
GUEST_SLOTS = 128  # unauthenticated connections in all
AUTH_DEADLINE = 5.0  # seconds from accept to session.auth
OPEN_RUNS = 16  # open runs per agent and per connection
RUN_RETENTION = 1000  # ended runs kept per agent
FILES_PER_RUN = 2  # {run_id}.jsonl and {run_id}.summary.json
CHURN_RUNS = 1500  # runs started and completed, well past the retention


def sources(n: int, spread: int = 16) -> list[str]:
    """C{n} loopback source addresses over C{spread} peers, so the per-peer slots do not hide the global ones."""
    return [f"127.0.0.{2 + i % spread}" for i in range(n)]


def error_reason(reply: dict[str, Any]) -> Any:
    return ((reply.get("error") or {}).get("data") or {}).get("reason")


# -- 3. pre-auth slots -----------------------------------------------------------


def test_preauth_slots(daemon, report):
    """1 024 silent upgraded sockets cannot lock a real client out, and the daemon drops them all by the auth deadline."""
    base = baseline(daemon)
    attackers: list[Ws] = []
    refused = 0
    with Phase(daemon, 3.0) as phase:
        for source in sources(1024):
            try:
                attackers.append(Ws(daemon.port, source=source, timeout=5))
            except (OSError, Closed, AssertionError):
                refused += 1
        last_opened = time.monotonic()
        started = time.monotonic()
        fresh = Ws(daemon.port, timeout=5)
        auth = fresh.call("session.auth", {"token": daemon.token})
        handshake = fresh.call(
            "server.handshake", {"protocol_version": 3, "client_version": "fresh", "required_capabilities": []}
        )
        fresh_secs = time.monotonic() - started
        fresh.close()
        time.sleep(max(0.0, phase.remaining()))
        open_at_end = [i for i, a in enumerate(attackers) if peer_state(a.sock) == "open"]
    time.sleep(max(0.0, last_opened + AUTH_DEADLINE + 1.5 - time.monotonic()))
    open_after_deadline = sum(peer_state(a.sock) == "open" for a in attackers)
    for a in attackers:
        a.close()
    row = figures(
        "3 pre-auth slots",
        base,
        phase,
        64 * MiB,
        sockets=1024,
        upgraded=len(attackers),
        refused=refused,
        fresh_client_s=round(fresh_secs, 3),
        open_at_phase_end=len(open_at_end),
        oldest_open=min(open_at_end, default=None),
        open_after_deadline=open_after_deadline,
    )
    report(row)
    assert_bounded(row)
    assert auth["result"]["ok"] and handshake["result"]["protocol_version"] == 3
    assert fresh_secs < 2.0
    # The newest guests are the ones left: the oldest went first.
    assert len(open_at_end) <= GUEST_SLOTS and min(open_at_end, default=1024) >= len(attackers) - GUEST_SLOTS
    assert open_after_deadline == 0


# -- 4. pre-auth buffering -------------------------------------------------------


class FragmentFlood:
    """
    One unauthenticated socket sending a fragmented message: a first text
    frame without FIN announcing 64 KiB, then continuation frames, up to
    C{total} bytes; non-blocking, pumped by the campaign's selector.
    """

    CHUNK = 64 * KiB

    def __init__(self, ws: Ws, total: int) -> None:
        self.ws = ws
        self.sock = ws.sock
        self.sock.setblocking(False)
        self.frames = total // self.CHUNK
        self.index = 0
        self.pending = memoryview(client_frame(b"x" * self.CHUNK, opcode=1, fin=False))
        self.sent = 0
        self.inbox = ws.buf
        self.close_code: int | None = None
        self.done = False

    def _next_frame(self) -> None:
        self.index += 1
        if self.index < self.frames:
            last = self.index == self.frames - 1
            self.pending = memoryview(client_frame(b"x" * self.CHUNK, opcode=0, fin=last))
        else:
            self.pending = memoryview(b"")

    def on_write(self) -> None:
        while self.pending:
            try:
                n = self.sock.send(self.pending)
            except BlockingIOError:
                return
            except OSError:
                self.done = True
                return
            self.sent += n
            self.pending = self.pending[n:]
            if not self.pending:
                self._next_frame()

    def on_read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.done = True
            return
        if not data:
            self.done = True
            return
        self.inbox += data
        while (got := split_frame(self.inbox)) is not None:
            opcode, payload, self.inbox = got
            if opcode == 8 and len(payload) >= 2:
                self.close_code = int.from_bytes(payload[:2], "big")


def test_preauth_buffering(daemon, report):
    """250 unauthenticated sockets streaming 15 MiB fragmented messages each are closed with 1009 at once; RSS stays flat."""
    per_socket = 15 * MiB
    base = baseline(daemon)
    floods: list[FragmentFlood] = []
    with Phase(daemon, 3.0) as phase:
        sel = selectors.DefaultSelector()
        for source in sources(250):
            flood = FragmentFlood(Ws(daemon.port, source=source, timeout=5), per_socket)
            flood.on_write()
            floods.append(flood)
            sel.register(flood.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, flood)
        deadline = time.monotonic() + 20.0
        live = len(floods)
        while live and time.monotonic() < deadline:
            for key, events in sel.select(timeout=0.2):
                flood = key.data
                if events & selectors.EVENT_READ:
                    flood.on_read()
                if events & selectors.EVENT_WRITE and not flood.done:
                    flood.on_write()
                if flood.done or (not flood.pending and flood.close_code is not None):
                    sel.unregister(flood.sock)
                    live -= 1
                    flood.done = True
        sel.close()
    still_sending = sum(not f.done for f in floods)
    for f in floods:
        f.ws.close()
    sent = sum(f.sent for f in floods)
    closed_1009 = sum(f.close_code == 1009 for f in floods)
    row = figures(
        "4 pre-auth buffering",
        base,
        phase,
        64 * MiB,
        sockets=len(floods),
        attempted_mib=round(len(floods) * per_socket / MiB),
        sent_mib=round(sent / MiB, 1),
        max_sent_per_socket_kib=round(max(f.sent for f in floods) / KiB),
        close_1009=closed_1009,
        other_closes=sum(f.close_code not in (None, 1009) for f in floods),
        still_sending=still_sending,
    )
    report(row)
    assert_bounded(row)
    assert still_sending == 0
    assert closed_1009 == len(floods)
    assert max(f.sent for f in floods) < per_socket


# -- 5. bytes ----------------------------------------------------------------------


def test_state_byte_budget(daemon, report):
    """Four 15 MiB state.set on one connection: at most one fits the 16 MiB budget, the rest are byte_budget errors."""
    base = baseline(daemon)
    value = "v" * (15 * MiB)
    with Phase(daemon, 2.0) as phase:
        ws = authenticated(daemon)
        replies = [ws.call("state.set", {"key": f"big{i}", "value": value}) for i in range(4)]
        keys = ws.result("state.keys")
        ws.close()
    stored = [r.get("result") == "ok" for r in replies]
    reasons = [error_reason(r) for r in replies if "error" in r]
    row = figures(
        "5a state byte budget",
        base,
        phase,
        256 * MiB,
        sets=4,
        stored=sum(stored),
        refused_byte_budget=reasons.count("byte_budget"),
        other=len(replies) - sum(stored) - reasons.count("byte_budget"),
    )
    report(row)
    assert_bounded(row)
    assert sum(stored) <= 1
    assert reasons == ["byte_budget"] * (4 - sum(stored))
    assert sorted(keys) == [f"big{i}" for i in range(4) if stored[i]]


def keep_writing(sock: socket.socket, block: bytes, limit: int, stuck_for: float = 1.0) -> int:
    """Write C{block} over and over until the peer stops taking bytes for C{stuck_for} s (or C{limit}); the bytes taken."""
    sock.setblocking(False)
    taken = 0
    view = memoryview(block)
    stuck_since = None
    try:
        while taken < limit:
            try:
                n = sock.send(view)
            except BlockingIOError:
                now = time.monotonic()
                stuck_since = stuck_since or now
                if now - stuck_since >= stuck_for:
                    break
                time.sleep(0.01)
                continue
            except OSError:
                break
            stuck_since = None
            taken += n
            view = view[n:] or memoryview(block)
    finally:
        sock.setblocking(True)
    return taken


def test_unread_output_backlog(daemon, report):
    """A client that pipelines 150 reads of a 10 MiB value and never reads is stopped and dropped; RSS stays bounded."""
    base = baseline(daemon)
    with Phase(daemon, 2.0) as phase:
        ws = authenticated(daemon, rcvbuf=4096)
        assert ws.result("state.set", {"key": "big", "value": "b" * (10 * MiB)}) == "ok"
        more_gets = client_frame(b'{"jsonrpc":"2.0","id":5,"method":"state.get","params":{"key":"big"}}') * 1024
        burst = b"".join(
            client_frame(b'{"jsonrpc":"2.0","id":%d,"method":"state.get","params":{"key":"big"}}' % (1000 + i))
            for i in range(150)
        )
        ws.sock.settimeout(30)
        ws.sock.sendall(burst)
        sent_at = time.monotonic()
        more = keep_writing(ws.sock, more_gets, limit=64 * MiB)
        while tcp_state(ws.sock) == "ESTABLISHED" and time.monotonic() - sent_at < 70:
            time.sleep(0.1)
        state_seen = tcp_state(ws.sock)
        dropped_after = time.monotonic() - sent_at
    # Resume reading: what was queued for us, then the end of the stream.
    ws.sock.settimeout(10)
    read = len(ws.buf)
    ended = "open"
    try:
        while True:
            data = ws.sock.recv(1 << 20)
            if not data:
                ended = "eof"
                break
            read += len(data)
    except ConnectionResetError:
        ended = "reset"
    except socket.timeout:
        ended = "timeout"
    ws.close()
    row = figures(
        "5b unread output",
        base,
        phase,
        256 * MiB,
        requests=150,
        requested_mib=150 * 10,
        written_after_burst_kib=round(more / KiB),
        tcp_state=state_seen,
        dropped_after_s=round(dropped_after, 2),
        read_after_resume_mib=round(read / MiB, 1),
        ended=ended,
    )
    report(row)
    assert_bounded(row)
    assert more < 64 * MiB  # the daemon stopped reading: our writes blocked
    assert state_seen != "ESTABLISHED" and dropped_after < 70
    assert ended in ("eof", "reset")
    assert read < 150 * 10 * MiB / 4


# -- 6. runs -----------------------------------------------------------------------


def count_files(root) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def test_run_flood_and_churn(daemon, report):
    """13 000 pipelined runs.start open 16 runs and refuse the rest; start/complete churn keeps the run store pruned."""
    base = baseline(daemon)
    runs_dir = daemon.home / "runs"
    with Phase(daemon, 2.0) as phase:
        ws = authenticated(daemon)
        opened: list[str] = []
        reasons: dict[Any, int] = {}
        flood_started = time.monotonic()
        for batch in range(65):
            rids = [ws.send("runs.start", {"intent": f"flood {batch}/{i}", "agent_name": "flood"}) for i in range(200)]
            for rid in rids:
                reply = ws.reply(rid)
                if "result" in reply:
                    opened.append(reply["result"]["run_id"])
                else:
                    reason = error_reason(reply)
                    reasons[reason] = reasons.get(reason, 0) + 1
        flood_secs = time.monotonic() - flood_started
        for run_id in opened:
            ws.result("runs.complete", {"run_id": run_id})
        # At least ~2 s, and well past the retention so pruning must happen.
        churned = 0
        churn_refused = 0
        churn_started = time.monotonic()
        while time.monotonic() - churn_started < 2.0 or (churned < CHURN_RUNS and time.monotonic() - churn_started < 15.0):
            rids = [ws.send("runs.start", {"intent": "churn", "agent_name": "flood"}) for _ in range(OPEN_RUNS)]
            ids = []
            for rid in rids:
                reply = ws.reply(rid)
                if "result" in reply:
                    ids.append(reply["result"]["run_id"])
                else:
                    churn_refused += 1
            for rid in [ws.send("runs.complete", {"run_id": run_id}) for run_id in ids]:
                assert "result" in ws.reply(rid)
            churned += len(ids)
        churn_secs = time.monotonic() - churn_started
        ws.close()
    bound = FILES_PER_RUN * (RUN_RETENTION + OPEN_RUNS) + 4
    # Deletes run in the daemon's thread pool: give the last ones a moment.
    settle = time.monotonic() + 5.0
    files = count_files(runs_dir)
    while files > bound and time.monotonic() < settle:
        time.sleep(0.2)
        files = count_files(runs_dir)
    row = figures(
        "6 runs",
        base,
        phase,
        64 * MiB,
        starts=13_000,
        opened=len(opened),
        refused=dict(reasons),
        flood_s=round(flood_secs, 2),
        churned_runs=churned,
        churn_refused=churn_refused,
        churn_s=round(churn_secs, 2),
        run_files=files,
        run_files_bound=bound,
    )
    report(row)
    assert_bounded(row)
    assert len(opened) <= OPEN_RUNS
    assert reasons == {"open_run_limit": 13_000 - len(opened)}
    assert churn_refused == 0 and churned >= CHURN_RUNS
    assert files <= bound


# -- 7. proposals ------------------------------------------------------------------


def submit_until(phase: Phase, ws: Ws, params: dict[str, Any]) -> tuple[list[dict[str, Any]], list[float]]:
    """Submit the same proposal again and again (at least once) until the phase is nearly over; the replies and their times."""
    replies, took = [], []
    while not replies or phase.remaining() > 0.3:
        started = time.monotonic()
        replies.append(ws.call("proposal.submit", params))
        took.append(time.monotonic() - started)
    return replies, took


def test_reverse_dependency_chain(daemon, report):
    """A 1 000-action chain submitted in reverse order, again and again, answers with all 1 000 succeeded, quickly."""
    actions = [
        {
            "id": f"a{i}",
            "type": "state_write",
            "parameters": {"key": f"k{i}", "value": i},
            **({"dependencies": [f"a{i + 1}"]} if i < 999 else {}),
        }
        for i in range(1000)
    ]
    base = baseline(daemon)
    with Phase(daemon, 2.0) as phase:
        ws = authenticated(daemon)
        replies, took = submit_until(phase, ws, {"proposal": {"actions": actions}})
        value = ws.result("state.get", {"key": "k0"})
        ws.close()
    all_statuses = [[r["status"] for r in reply.get("result", {}).get("results", [])] for reply in replies]
    statuses = all_statuses[0]
    row = figures(
        "7a reverse chain",
        base,
        phase,
        128 * MiB,
        actions=1000,
        submissions=len(replies),
        all_succeeded=sum(st == ["succeeded"] * 1000 for st in all_statuses),
        slowest_submit_s=round(max(took), 3),
    )
    report(row)
    assert_bounded(row)
    assert statuses == ["succeeded"] * 1000, replies[0].get("error")
    assert all(st == statuses for st in all_statuses)
    assert value == 0
    assert max(took) < 5.0


def test_policy_scan_bound(daemon, report):
    """1 024 deny_tool_param policies against a 1.4 MB parameter: every submission is answered at once, the daemon never freezes."""
    base = baseline(daemon)
    with Phase(daemon, 2.0) as phase:
        ws = authenticated(daemon)
        for batch in range(8):
            rids = [
                ws.send(
                    "policy.register",
                    {"name": f"deny{batch}-{i}", "rule": "deny_tool_param", "target": "t", "key": "p", "pattern": f"needle-{batch}-{i}-"},
                )
                for i in range(128)
            ]
            for rid in rids:
                assert "result" in ws.reply(rid)
        assert ws.result("tools.register", [{"name": "t"}]) == 1
        proposal = {"actions": [{"id": "call", "type": "tool_call", "tool": "t", "parameters": {"p": "q" * 1_400_000}}]}
        replies, took = submit_until(phase, ws, {"proposal": proposal})
        ws.close()
    reply = replies[0]
    error = reply.get("error") or {}
    row = figures(
        "7b policy scan",
        base,
        phase,
        128 * MiB,
        policies=1024,
        param_chars=1_400_000,
        answer=f"error {error.get('code')}" if error else "result",
        submissions=len(replies),
        slowest_submit_s=round(max(took), 3),
    )
    report(row)
    assert_bounded(row)
    if error:
        assert error["code"] == -32602 and "polic" in error["message"], error
    else:
        assert reply["result"]["results"]
    assert all(r.get("error", r.get("result")) == reply.get("error", reply.get("result")) for r in replies)
    assert max(took) < 5.0


# -- 8. nesting --------------------------------------------------------------------


def test_deep_nesting(daemon, report):
    """state.set of a value nested 300 levels deep answers -32602 and stores nothing, again and again."""
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    frame = client_frame(
        b'{"jsonrpc":"2.0","id":7,"method":"state.set","params":{"key":"deep","value":%s}}'
        % (b"[" * 300 + b"1" + b"]" * 300)
    )
    base = baseline(daemon)
    codes: dict[Any, int] = {}
    sent = 0
    with Phase(daemon, 2.0) as phase:
        ws = authenticated(daemon)
        while phase.remaining() > 0.3:
            ws.sock.sendall(frame)
            reply = ws.reply(7)
            code = (reply.get("error") or {}).get("code")
            codes[code] = codes.get(code, 0) + 1
            sent += 1
        keys = ws.result("state.keys")
        stored = ws.result("state.get", {"key": "deep"})
        ws.close()
    row = figures("8 nesting", base, phase, 64 * MiB, depth=300, requests=sent, answers=codes, keys_after=len(keys))
    report(row)
    assert_bounded(row)
    assert codes == {-32602: sent}
    assert keys == [] and stored is None


# -- 9. the upgrade ----------------------------------------------------------------


class HeaderFlood:
    """An upgrade request that never ends: header lines, one at a time, never the blank line."""

    LINE = b"X-Padding-%06d: " + b"h" * 200 + b"\r\n"

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        self.sock.setblocking(False)
        self.pending = memoryview(upgrade_request().split(b"\r\n\r\n")[0] + b"\r\n")
        self.lines = 0
        self.sent = 0
        self.sent_at_response: int | None = None
        self.response = b""
        self.done = False

    def on_write(self) -> None:
        if not self.pending:
            self.lines += 1
            self.pending = memoryview(self.LINE % self.lines)
        try:
            n = self.sock.send(self.pending)
        except BlockingIOError:
            return
        except OSError:
            self.done = True
            return
        self.sent += n
        self.pending = self.pending[n:]

    def on_read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.done = True
            return
        if self.sent_at_response is None:
            self.sent_at_response = self.sent
        if not data:
            self.done = True
        self.response += data


def plain_get(port: int) -> bytes:
    """The daemon's whole answer to a plain GET without upgrade headers."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/html\r\n\r\n")
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if len(out) > 1 << 20:
                    break
        except (socket.timeout, ConnectionResetError):
            pass
    return out


def test_endless_upgrade(daemon, report):
    """20 upgrade requests that never end get 431 and are closed after ~16 KiB; a plain GET gets a bare 426."""
    base = baseline(daemon)
    with Phase(daemon, 2.0) as phase:
        floods = [HeaderFlood(daemon.port, source) for source in sources(20, spread=4)]
        sel = selectors.DefaultSelector()
        for f in floods:
            sel.register(f.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, f)
        deadline = time.monotonic() + 15.0
        live = len(floods)
        while live and time.monotonic() < deadline:
            for key, events in sel.select(timeout=0.2):
                f = key.data
                if events & selectors.EVENT_READ:
                    f.on_read()
                elif events & selectors.EVENT_WRITE and f.sent_at_response is None:
                    f.on_write()
                if f.done:
                    sel.unregister(f.sock)
                    live -= 1
            time.sleep(0.0005)  # a trickle of lines, as a slow client would send them
        sel.close()
        plain = plain_get(daemon.port)
    for f in floods:
        f.sock.close()
    statuses = {}
    for f in floods:
        status = f.response.split(b"\r\n", 1)[0].decode(errors="replace") or "(none)"
        statuses[status] = statuses.get(status, 0) + 1
    max_sent = max((f.sent_at_response or f.sent) for f in floods)
    row = figures(
        "9 endless upgrade",
        base,
        phase,
        64 * MiB,
        sockets=len(floods),
        responses=statuses,
        closed=sum(f.done for f in floods),
        max_sent_before_answer_kib=round(max_sent / KiB, 1),
        plain_get=plain.split(b"\r\n", 1)[0].decode(errors="replace"),
        plain_get_bytes=len(plain),
    )
    report(row)
    assert_bounded(row)
    assert all(f.done and f.response.startswith(b"HTTP/1.1 431") for f in floods), statuses
    # The daemon answers once a request passes 16 KiB; lines still in flight then count too.
    assert max_sent <= 32 * KiB
    assert plain.startswith(b"HTTP/1.1 426")
    assert b"autobahn" not in plain.lower() and b"<html" not in plain.lower()
