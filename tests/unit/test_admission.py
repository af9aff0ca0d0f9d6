"""
The guest phase of a connection (accept to session.auth), the upgrade
bounds and the read throttle, on the real protocol over an in-memory
transport with a Clock.
"""

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer

from car_twisted.interfaces import IAgentIdentities
from car_twisted.ws.admission import Admission
from support import HANDSHAKE, TOKEN, MemoryConnection, client_frame, make_state, memory_factory

KIB = 1024


@pytest.fixture
def clock():
    return Clock()


def factory_for(tmp_path, clock, **config):
    config.setdefault("ping_interval", 0)
    return memory_factory(make_state(tmp_path, clock, **config))


def auth(conn, token=TOKEN, rid=0, **extra):
    conn.send({"jsonrpc": "2.0", "id": rid, "method": "session.auth", "params": {"token": token, **extra}})
    return [m for m in conn.messages() if m.get("id") == rid][-1]


def test_deadline_runs_from_accept(tmp_path, clock):
    """A socket that never upgrades, and one that upgrades but never authenticates, go at the deadline."""
    factory = factory_for(tmp_path, clock)
    silent = MemoryConnection.open(factory, upgrade=False)
    upgraded = MemoryConnection.open(factory)
    good = MemoryConnection.open(factory)
    assert auth(good)["result"]["ok"] is True
    clock.advance(factory.state.config.auth_timeout - 0.1)
    assert not silent.dropped and not upgraded.dropped
    clock.advance(0.2)
    assert silent.dropped
    assert upgraded.close_code() == 1008 and upgraded.dropped
    assert not good.dropped and good.close_code() is None
    assert len(factory.admission) == 0 and factory.admission.expired == 2


def test_silent_flood_cannot_lock_out_a_client(tmp_path, clock):
    """Past the guest slots the oldest guest is dropped: 1 024 silent sockets hold only a few, a real client still gets in."""
    factory = factory_for(tmp_path, clock, max_preauth_connections=8, max_preauth_per_peer=8)
    flood = [MemoryConnection.open(factory, port=20000 + i) for i in range(1024)]
    assert len(factory.admission) == 8
    assert sum(1 for c in flood if not c.dropped) == 8
    assert factory.admission.evicted == 1024 - 8
    client = MemoryConnection.open(factory, port=1)
    assert auth(client)["result"]["ok"] is True
    assert not client.dropped and len(factory.admission) == 7


def test_guest_slots_per_peer(tmp_path, clock):
    """One peer address cannot take the guest slots of the others."""
    factory = factory_for(tmp_path, clock, max_preauth_connections=100, max_preauth_per_peer=3)
    noisy = [MemoryConnection.open(factory, host="10.0.0.9", port=i + 1) for i in range(20)]
    quiet = [MemoryConnection.open(factory, host="10.0.0.7", port=i + 1) for i in range(3)]
    assert factory.admission.guests_of("10.0.0.9") == 3
    assert sum(1 for c in noisy if not c.dropped) == 3
    assert all(not c.dropped for c in quiet)


def test_authenticated_connections_are_not_guests(tmp_path, clock):
    """Authenticated connections never count against, nor get evicted for, guests."""
    factory = factory_for(tmp_path, clock, max_preauth_connections=2, max_preauth_per_peer=2)
    clients = []
    for i in range(5):
        clients.append(MemoryConnection.open(factory, port=i + 1))
        assert auth(clients[-1])["result"]["ok"] is True
    for i in range(50):
        MemoryConnection.open(factory, port=100 + i, upgrade=False)
    assert all(not c.dropped for c in clients)


@implementer(IAgentIdentities)
class OneAgent:
    def verify(self, agent_id, token):
        return agent_id == "worker" and token == "agent-secret"

    def attach(self, agent_id, session):
        pass

    def detach(self, agent_id, session):
        pass


def test_authenticated_cap_spares_agents(tmp_path, clock):
    """max_connections counts authenticated non-agent connections; an agent always gets in."""
    factory = factory_for(tmp_path, clock, max_connections=2, agent_identities=OneAgent())
    a, b, c = (MemoryConnection.open(factory, port=i + 1) for i in range(3))
    assert auth(a)["result"]["ok"] and auth(b)["result"]["ok"]
    busy = auth(c)
    assert busy["error"]["data"] == {"reason": "connections", "limit": 2}
    clock.advance(0)
    assert c.close_code() == 1013
    agent = MemoryConnection.open(factory, port=9)
    reply = auth(agent, token="agent-secret", agent_id="worker")
    assert reply["result"]["agent_id"] == "worker"
    a.transport.loseConnection()
    d = MemoryConnection.open(factory, port=10)
    assert auth(d)["result"]["ok"] is True


def test_preauth_messages_are_small(tmp_path, clock):
    """Before auth a frame announcing 15 MiB is refused with 1009 from its header alone; after auth large messages pass."""
    factory = factory_for(tmp_path, clock)
    conn = MemoryConnection.open(factory)
    conn.feed(client_frame(b"", length=15 * 1024 * KIB)[:14])
    assert conn.close_code() == 1009 and conn.dropped


def test_preauth_fragments_are_counted_together(tmp_path, clock):
    """An unfinished fragmented message is refused once its fragments pass the guest limit."""
    factory = factory_for(tmp_path, clock)
    limit = factory.state.config.max_preauth_message_bytes
    conn = MemoryConnection.open(factory)
    conn.feed(client_frame(b"[" + b" " * (limit // 2), fin=False))
    assert conn.close_code() is None
    conn.feed(client_frame(b" " * (limit // 2 + 10), opcode=0, fin=False))
    assert conn.close_code() == 1009 and conn.dropped


def test_full_size_messages_after_auth(tmp_path, clock):
    factory = factory_for(tmp_path, clock)
    conn = MemoryConnection.open(factory)
    assert auth(conn)["result"]["ok"]
    value = "v" * (200 * KIB)
    conn.send({"jsonrpc": "2.0", "id": 5, "method": "state.set", "params": {"key": "k", "value": value}})
    assert [m for m in conn.messages() if m.get("id") == 5][0]["result"] == "ok"


def test_header_flood_is_refused(tmp_path, clock):
    """An upgrade request past 16 KiB, or with too many header lines, gets 431 and is dropped."""
    factory = factory_for(tmp_path, clock)
    endless = MemoryConnection.open(factory, upgrade=False)
    for _ in range(40):
        endless.feed(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        if endless.dropped:
            break
    assert endless.http_response().startswith(b"HTTP/1.1 431") and endless.dropped
    many = MemoryConnection.open(factory, upgrade=False)
    many.feed(HANDSHAKE[:-2] + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n")
    assert many.http_response().startswith(b"HTTP/1.1 431") and many.dropped


def test_trickled_upgrade_still_works(tmp_path, clock):
    """A valid upgrade that arrives a byte at a time is accepted (the end is found once)."""
    factory = factory_for(tmp_path, clock)
    conn = MemoryConnection.open(factory, upgrade=False)
    for i in range(len(HANDSHAKE)):
        conn.feed(HANDSHAKE[i : i + 1])
    assert conn.http_response().startswith(b"HTTP/1.1 101")


def test_plain_get_is_a_bare_426(tmp_path, clock):
    """GET / without an upgrade answers 426 with no status page and no version banner."""
    factory = factory_for(tmp_path, clock)
    conn = MemoryConnection.open(factory, upgrade=False)
    conn.feed(b"GET / HTTP/1.1\r\nHost: localhost:9100\r\n\r\n")
    response = conn.transport.value()
    assert response.startswith(b"HTTP/1.1 426") and conn.dropped
    assert b"Autobahn" not in response and b"<html" not in response.lower()
    upgraded = MemoryConnection.open(factory)
    assert b"Server:" not in upgraded.http_response()


def test_no_reading_while_output_is_backed_up(tmp_path, clock):
    """Requests read while our output is paused wait, unanswered, until it drains; then run in order."""
    factory = factory_for(tmp_path, clock)
    conn = MemoryConnection.open(factory)
    assert auth(conn)["result"]["ok"]
    conn.send({"jsonrpc": "2.0", "id": 1, "method": "state.set", "params": {"key": "k", "value": "x" * 1000}})
    before = len(conn.messages())
    conn.protocol._throttle.pauseProducing()
    assert conn.transport.producerState == "paused"
    burst = b"".join(
        client_frame(b'{"jsonrpc":"2.0","id":%d,"method":"state.get","params":{"key":"k"}}' % i) for i in range(10, 160)
    )
    conn.feed(burst)
    assert len(conn.messages()) == before
    conn.protocol._throttle.resumeProducing()
    replies = [m["id"] for m in conn.messages()[before:]]
    assert replies == list(range(10, 160))


def test_unread_output_past_the_budget_drops_the_client(tmp_path, clock):
    """A client that stops reading costs at most its output budget: past it the connection is dropped."""
    factory = factory_for(tmp_path, clock, max_output_backlog_bytes=64 * KIB)
    conn = MemoryConnection.open(factory)
    assert auth(conn)["result"]["ok"]
    session = conn.protocol.session
    conn.protocol._throttle.pauseProducing()
    assert session.channel.send(b'"' + b"x" * (40 * KIB) + b'"') is True
    assert not conn.dropped
    assert session.channel.send(b'"' + b"x" * (40 * KIB) + b'"') is False
    assert conn.dropped


def test_admission_unit(clock):
    """Eviction takes the oldest of the same peer first, else the oldest overall; timers are cancelled."""
    dropped = []
    adm = Admission(clock, max_total=3, max_per_peer=2, deadline=5.0)
    for name, peer in [("a1", "A"), ("a2", "A"), ("b1", "B")]:
        adm.admit(name, peer, lambda: None, lambda n=name: dropped.append(n))
    adm.admit("a3", "A", lambda: None, lambda: dropped.append("a3"))
    assert dropped == ["a1"]
    adm.admit("c1", "C", lambda: None, lambda: dropped.append("c1"))
    assert dropped == ["a1", "a2"]
    for name in ("b1", "a3", "c1"):
        adm.authenticated(name)
    assert len(adm) == 0 and clock.getDelayedCalls() == []
