"""state.* holds bytes on a budget per connection and per daemon; tenants never share keys."""

import pytest
from twisted.internet.task import Clock

from car_twisted.budget import BudgetExceeded, ByteBudget
from car_twisted.runtime import runtime_of
from support import TOKEN, DispatchConn, make_state

KIB = 1024


def Conn(state):
    return DispatchConn(state, {"token": TOKEN})


@pytest.fixture
def state(tmp_path):
    return make_state(tmp_path, Clock(), max_state_bytes=64 * KIB, max_state_bytes_total=100 * KIB)


def test_byte_budget_is_all_or_nothing():
    """A reservation that any enclosing budget cannot hold takes nothing anywhere."""
    daemon = ByteBudget("daemon state", 100)
    conn = ByteBudget("connection state", 80, parent=daemon)
    other = ByteBudget("connection state", 80, parent=daemon)
    conn.reserve(60)
    with pytest.raises(BudgetExceeded) as e:
        other.reserve(50)
    assert e.value.data == {"reason": "byte_budget", "what": "daemon state", "limit": 100}
    assert (daemon.used, conn.used, other.used) == (60, 60, 0)
    conn.release(60)
    other.reserve(50)
    assert daemon.used == 50


def test_connection_budget_counts_bytes_not_keys(state):
    """One connection may hold its budget in bytes; a value that does not fit is refused and not stored."""
    c = Conn(state)
    big = "x" * (40 * KIB)
    assert c.call("state.set", {"key": "a", "value": big})["result"] == "ok"
    refused = c.call("state.set", {"key": "b", "value": big})
    assert refused["error"]["code"] == -32603
    assert refused["error"]["data"] == {"reason": "byte_budget", "what": "connection state", "limit": 64 * KIB}
    assert c.call("state.exists", {"key": "b"})["result"] is False
    # Replacing a value only costs the difference.
    assert c.call("state.set", {"key": "a", "value": big + "y"})["result"] == "ok"
    assert c.call("state.set", {"key": "a", "value": "small"})["result"] == "ok"
    assert c.call("state.set", {"key": "b", "value": big})["result"] == "ok"
    assert c.call("state.get", {"key": "b"})["result"] == big


def test_daemon_budget_spans_connections_and_is_given_back(state):
    """All connections together stay within the daemon's budget; a closed connection's bytes return."""
    a, b = Conn(state), Conn(state)
    big = "x" * (60 * KIB)
    assert a.call("state.set", {"key": "k", "value": big})["result"] == "ok"
    refused = b.call("state.set", {"key": "k", "value": big})
    assert refused["error"]["data"]["what"] == "daemon state"
    a.close()
    assert state.state_budget.used == 0
    assert b.call("state.set", {"key": "k", "value": big})["result"] == "ok"


def test_values_are_stored_encoded(state):
    """What is stored is the value's JSON: reads give back exactly what was set."""
    c = Conn(state)
    value = {"n": [1, 2.5, None, True], "s": "é\u2028", "deep": {"a": {"b": []}}}
    c.call("state.set", {"key": "v", "value": value})
    assert c.call("state.get", {"key": "v"})["result"] == value
    assert c.call("state.snapshot", {})["result"] == {"v": value}
    view = runtime_of(c.session).keyvalue.view(None)
    assert view.get_encoded("v") == b'{"n":[1,2.5,null,true],"s":"\xc3\xa9\xe2\x80\xa8","deep":{"a":{"b":[]}}}'
    assert view["v"] == value and view.get("missing", 7) == 7


def test_tenant_prefixed_key_does_not_reach_the_tenant(state):
    """An unscoped key spelled like a tenant's internal key stays unscoped."""
    c = Conn(state)
    c.call("state.set", {"key": "tenant:A:x", "value": "forged"})
    assert c.call("state.get", {"key": "x", "tenant_id": "A"})["result"] is None
    assert c.call("state.keys", {"tenant_id": "A"})["result"] == []
    assert c.call("state.exists", {"key": "x", "tenant_id": "A"})["result"] is False
    assert c.call("state.keys", {})["result"] == ["tenant:A:x"]
    c.call("state.set", {"key": "x", "value": "real", "tenant_id": "A"})
    assert c.call("state.get", {"key": "tenant:A:x"})["result"] == "forged"
    assert c.call("state.snapshot", {"tenant_id": "A"})["result"] == {"x": "real"}
