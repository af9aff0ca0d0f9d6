"""
registry.* through the real dispatcher on a Clock (the file work runs
inline then), and the file store underneath it.
"""

import json
import os
import stat
import threading

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer

from car_twisted import agent_registry
from car_twisted.agent_registry import MAX_ENTRIES, RegistryFiles, RegistryFull, make_entry
from car_twisted.interfaces import IAgentIdentities
from support import HOST_TOKEN, TOKEN, DispatchConn, make_state

START = 1_700_000_000


@implementer(IAgentIdentities)
class Identities:
    """Any agent id whose token is ``token-of-<id>``."""

    def verify(self, agent_id, token):
        return token == f"token-of-{agent_id}"

    def attach(self, agent_id, session):
        pass

    def detach(self, agent_id, session):
        pass


@pytest.fixture
def clock():
    clock = Clock()
    clock.advance(START)
    return clock


@pytest.fixture
def state(tmp_path, clock):
    return make_state(tmp_path, clock, agent_identities=Identities())


@pytest.fixture
def home(state):
    return state.config.paths.home


@pytest.fixture
def conn(state):
    return DispatchConn(state, {"token": TOKEN})


def entry(name="alpha", **kw):
    return {"name": name, "dashboard_url": f"http://127.0.0.1:8000/{name}", **kw}


def register(conn, registry_path=None, **kw):
    params = {"entry": entry(**kw)}
    if registry_path is not None:
        params["registry_path"] = str(registry_path)
    return conn.call("registry.register", params)


def invalid(reply, field):
    assert reply["error"]["code"] == -32602, reply
    assert reply["error"]["data"] == {"field": field}, reply
    return reply["error"]["message"]


def names(conn, **params):
    return [e["name"] for e in conn.result("registry.list", params or None)]


# -- the round trip ----------------------------------------------------------------------


def test_register_heartbeat_list_unregister_reap(conn, clock, home):
    assert conn.result("registry.register", {"entry": entry("beta", status="running", port=8001, pid=4242)}) is None
    clock.advance(5)
    assert conn.result("registry.register", {"entry": entry("alpha", display_name="Alpha", capability="writes")}) is None
    listed = conn.result("registry.list")
    assert [e["name"] for e in listed] == ["alpha", "beta"]
    assert listed[0] == {
        "name": "alpha",
        "dashboard_url": "http://127.0.0.1:8000/alpha",
        "status": "idle",
        "display_name": "Alpha",
        "capability": "writes",
        "port": None,
        "pid": None,
        "registered_at": START + 5,
        "last_heartbeat_at": START + 5,
    }
    assert listed[1]["status"] == "running" and listed[1]["port"] == 8001 and listed[1]["pid"] == 4242
    assert listed[1]["registered_at"] == listed[1]["last_heartbeat_at"] == START

    clock.advance(20)
    assert conn.result("registry.heartbeat", {"name": "beta"}) == {"refreshed": True}
    beta = conn.result("registry.list")[1]
    assert (beta["registered_at"], beta["last_heartbeat_at"]) == (START, START + 25)

    # alpha's last heartbeat is START+5: 60 s later it is not yet older than 60 s.
    clock.advance(40)
    assert conn.result("registry.reap") == []
    clock.advance(1)
    assert conn.result("registry.reap") == ["alpha"]
    assert names(conn) == ["beta"]
    assert conn.result("registry.heartbeat", {"name": "alpha"}) == {"refreshed": False}

    assert conn.result("registry.unregister", {"name": "beta"}) is None
    assert conn.result("registry.unregister", {"name": "beta"}) is None  # idempotent
    assert conn.result("registry.list") == []
    assert conn.result("registry.heartbeat", {"name": "beta"}) == {"refreshed": False}
    assert sorted(os.listdir(home / "registry")) == []


def test_reap_threshold_is_a_parameter(conn, clock):
    register(conn, name="a")
    clock.advance(10)
    register(conn, name="b")
    clock.advance(5)
    assert conn.result("registry.reap", {"max_age_secs": 15}) == []
    assert conn.result("registry.reap", {"max_age_secs": 14.5}) == ["a"]
    assert conn.result("registry.reap", {"max_age_secs": 0}) == ["b"]
    for bad in (-1, "60", True, [60]):
        invalid(conn.call("registry.reap", {"max_age_secs": bad}), "max_age_secs")


def test_times_are_filled_from_the_clock(conn, clock):
    register(conn, name="zero", registered_at=0, last_heartbeat_at=0)
    register(conn, name="past", registered_at=START - 100, last_heartbeat_at=START - 50.7)
    register(conn, name="future", registered_at=START + 10**6, last_heartbeat_at=10**30)
    times = {e["name"]: (e["registered_at"], e["last_heartbeat_at"]) for e in conn.result("registry.list")}
    assert times == {"zero": (START, START), "past": (START - 100, START - 51), "future": (START, START)}
    assert all(type(t) is int for pair in times.values() for t in pair)
    for field, bad in (("registered_at", -1), ("last_heartbeat_at", "now"), ("registered_at", True)):
        invalid(register(conn, name="x", **{field: bad}), f"entry.{field}")


def test_re_register_replaces_the_entry(conn, clock):
    register(conn, status="running", port=1)
    clock.advance(3)
    register(conn, status="stopping")
    (only,) = conn.result("registry.list")
    assert only["status"] == "stopping" and only["port"] is None and only["registered_at"] == START + 3


def test_files_are_private_json(conn, home):
    register(conn, display_name="Ünïcode ✓")
    directory = home / "registry"
    path = directory / "alpha.json"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(directory) == ["alpha.json"]  # no temp file left behind
    on_disk = json.loads(path.read_text())
    assert on_disk == conn.result("registry.list")[0]
    assert on_disk["display_name"] == "Ünïcode ✓"


def test_a_file_written_by_another_writer_is_listed(conn, home):
    """Another process's entry (fractional times, keys in another order) reads as an entry."""
    directory = home / "registry"
    directory.mkdir(mode=0o700, parents=True)
    raw = {"last_heartbeat_at": START + 0.9, "registered_at": START, "dashboard_url": "https://x", "name": "other"}
    fd = os.open(directory / "other.json", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps(raw).encode())
    os.close(fd)
    (listed,) = conn.result("registry.list")
    assert listed["status"] == "idle" and listed["last_heartbeat_at"] == START and listed["pid"] is None


# -- atomic replacement ------------------------------------------------------------------


def test_a_reader_during_a_write_sees_the_old_entry(conn, home, monkeypatch):
    """At the rename the new entry is complete in the temp file and the old one is still whole."""
    register(conn, status="running")
    path = home / "registry" / "alpha.json"
    old = path.read_bytes()
    real_replace = os.replace
    seen = []

    def replace(src, dst):
        src, dst = os.fspath(src), os.fspath(dst)
        if dst == os.fspath(path):
            assert os.path.dirname(src) == os.path.dirname(dst) and src != dst
            assert json.loads(open(src, "rb").read())["status"] == "stopping"  # complete before the rename
            assert path.read_bytes() == old
            seen.append([e.status for e in RegistryFiles(home).entries(None)])
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    register(conn, status="stopping")
    assert seen == [["running"]]
    assert conn.result("registry.list")[0]["status"] == "stopping"


def test_a_failed_write_leaves_the_old_entry(conn, home, monkeypatch):
    register(conn, status="running")

    def fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    reply = register(conn, status="errored")
    assert reply["error"]["code"] == -32603 and "unavailable" in reply["error"]["message"]
    monkeypatch.undo()
    assert [e["status"] for e in conn.result("registry.list")] == ["running"]


def test_concurrent_readers_never_see_a_partial_file(tmp_path):
    """A writer thread rewriting one entry while a reader reads the file raw: always whole JSON."""
    files = RegistryFiles(tmp_path / "home")
    big = "x" * 1000
    files.register(None, make_entry(name="a", dashboard_url="http://a", now=1, capability=big))
    path = tmp_path / "home" / "registry" / "a.json"
    stop = threading.Event()
    failures = []

    def write():
        for i in range(150):
            files.register(None, make_entry(name="a", dashboard_url="http://a", now=i + 1, capability=big * (i % 2)))
        stop.set()

    def read():
        while not stop.is_set():
            try:
                raw = json.loads(path.read_bytes())
            except ValueError as e:
                failures.append(e)
                return
            if raw["name"] != "a":
                failures.append(raw)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures


# -- what list skips ---------------------------------------------------------------------


def private_file(path, content):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, content)
    os.close(fd)


def test_list_skips_what_is_not_an_entry(conn, home):
    register(conn, name="good")
    directory = home / "registry"
    private_file(directory / "truncated.json", b'{"name": "truncated", "dashboard_url": "http')
    private_file(directory / "array.json", b"[1, 2]")
    private_file(directory / "binary.json", b"\xff\xfe\x00")
    private_file(directory / "empty.json", b"")
    private_file(directory / "nourl.json", json.dumps({"name": "nourl", "registered_at": 1, "last_heartbeat_at": 1}).encode())
    mismatched = dict(entry("someone-else"), registered_at=1, last_heartbeat_at=1)
    private_file(directory / "mismatch.json", json.dumps(mismatched).encode())
    bad_status = dict(entry("status"), status="dancing", registered_at=1, last_heartbeat_at=1)
    private_file(directory / "status.json", json.dumps(bad_status).encode())
    huge = dict(entry("huge"), display_name="x" * 70_000, registered_at=1, last_heartbeat_at=1)
    private_file(directory / "huge.json", json.dumps(huge).encode())
    private_file(directory / ".good.json.123.tmp", b"{")
    private_file(directory / "README.txt", b"hello")
    os.mkfifo(directory / "fifo.json", 0o600)
    os.mkdir(directory / "dir.json", 0o700)
    assert names(conn) == ["good"]
    clock_reaps = conn.result("registry.reap", {"max_age_secs": 0})
    assert clock_reaps == []  # nothing stale, and the strangers are left alone
    assert (directory / "truncated.json").exists()
    for name in ("truncated", "fifo", "huge"):
        assert conn.result("registry.heartbeat", {"name": name}) == {"refreshed": False}


# -- where registries may live -----------------------------------------------------------


def test_tenant_registries_are_separate(conn, home):
    tenant = home / "registries" / "tenant-a"
    register(conn, registry_path=tenant, name="t")
    register(conn, name="d")
    assert names(conn, registry_path=str(tenant)) == ["t"]
    assert names(conn) == ["d"]
    assert names(conn, registry_path=str(home / "registry")) == ["d"]
    assert stat.S_IMODE(os.stat(home / "registries").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tenant).st_mode) == 0o700
    nested = home / "registries" / "org" / "team"
    assert register(conn, registry_path=nested)["result"] is None
    assert conn.result("registry.heartbeat", {"name": "t", "registry_path": str(tenant)}) == {"refreshed": True}
    assert conn.result("registry.heartbeat", {"name": "t"}) == {"refreshed": False}


def test_registry_path_escapes_are_refused(conn, home, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (home / "registries").mkdir(parents=True, mode=0o700)
    os.symlink(outside, home / "registries" / "link")
    sibling = tmp_path / "car-home-2" / "registry"
    attempts = [
        "registry",
        "registries/tenant",
        "./x",
        str(home / "registries" / ".." / ".." / "outside"),
        str(home / "registries" / "tenant" / ".." / ".." / "registry" / ".." / ".." / "outside"),
        str(home / "registries" / "link"),
        str(home / "registries" / "link" / "deeper"),
        str(home / "registries"),
        str(home),
        str(home / "registry" / "sub"),
        str(home / "ai.parslee.car"),
        str(sibling),
        str(tmp_path / "car-home2" / "registries" / "x"),
        "/etc",
        "/",
        str(home / "registries" / "a\x00b"),
    ]
    for path in attempts:
        for method, params in (
            ("registry.register", {"entry": entry()}),
            ("registry.heartbeat", {"name": "alpha"}),
            ("registry.unregister", {"name": "alpha"}),
            ("registry.list", {}),
            ("registry.reap", {"max_age_secs": 0}),
        ):
            message = invalid(conn.call(method, dict(params, registry_path=path)), "registry_path")
            assert str(home / "registry") in message and str(home / "registries") in message, message
    assert os.listdir(outside) == []
    assert not (tmp_path / "car-home-2").exists() and not (home / "registry" / "sub").exists()


def test_a_state_root_reached_through_a_symlink(tmp_path, clock):
    """CAR_HOME may itself be a symlink: paths through it or through its target both name its registries."""
    real = tmp_path / "real-home"
    real.mkdir(mode=0o700)
    link = tmp_path / "car-home"
    os.symlink(real, link)
    state = make_state(tmp_path, clock)
    conn = DispatchConn(state, {"token": TOKEN})
    register(conn, registry_path=link / "registries" / "t", name="one")
    assert names(conn, registry_path=str(real / "registries" / "t")) == ["one"]
    assert names(conn, registry_path=str(link / "registry")) == []


def test_a_registry_directory_that_is_not_private_is_refused(conn, home):
    loose = home / "registries" / "loose"
    loose.mkdir(parents=True)
    os.chmod(loose, 0o777)
    assert "writable by group or others" in invalid(register(conn, registry_path=loose), "registry_path")
    afile = home / "registries" / "file"
    afile.write_text("")
    assert "not a directory" in invalid(register(conn, registry_path=afile), "registry_path")


# -- names -------------------------------------------------------------------------------


BAD_NAMES = ["../x", "a/b", "/abs", ".", "..", "", "a b", "a\x00b", "a\\b", "é", "x" * 129, "a\nb"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_names_are_file_names(conn, home, bad):
    invalid(conn.call("registry.register", {"entry": entry(bad)}), "entry.name")
    for method in ("registry.heartbeat", "registry.unregister"):
        invalid(conn.call(method, {"name": bad}), "name")
    assert not (home / "registry").exists() or os.listdir(home / "registry") == []


def test_allowed_names(conn):
    for name in ("a", "A-b_c.d", "...", ".hidden", "x" * 128, "v1.2.3"):
        assert register(conn, name=name)["result"] is None, name
    assert names(conn) == sorted(["a", "A-b_c.d", "...", ".hidden", "x" * 128, "v1.2.3"])


def test_a_symlink_planted_as_an_entry_is_not_followed(conn, home, tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    directory = home / "registry"
    directory.mkdir(parents=True, mode=0o700)
    os.symlink(target, directory / "alpha.json")
    assert conn.result("registry.list") == []
    assert conn.result("registry.heartbeat", {"name": "alpha"}) == {"refreshed": False}
    assert conn.result("registry.reap", {"max_age_secs": 0}) == []
    assert target.read_text() == "keep me\n"
    # A register replaces the link itself, never writing through it.
    register(conn)
    assert not os.path.islink(directory / "alpha.json")
    assert target.read_text() == "keep me\n"
    assert names(conn) == ["alpha"]
    # An unregister removes a link, not what it points at.
    (directory / "alpha.json").unlink()
    os.symlink(target, directory / "alpha.json")
    assert conn.result("registry.unregister", {"name": "alpha"}) is None
    assert not os.path.lexists(directory / "alpha.json") and target.read_text() == "keep me\n"


# -- bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", "x" * 129),
        ("dashboard_url", "http://" + "x" * 2042),
        ("dashboard_url", "ftp://host/"),
        ("dashboard_url", "javascript:alert(1)"),
        ("dashboard_url", "file:///etc/passwd"),
        ("dashboard_url", "http://x/\nSet-Cookie: y"),
        ("dashboard_url", ""),
        ("dashboard_url", 80),
        ("display_name", "x" * 257),
        ("capability", "x" * 1025),
        ("status", "dancing"),
        ("status", "RUNNING"),
        ("status", 1),
        ("port", -1),
        ("port", 65536),
        ("port", "80"),
        ("port", True),
        ("pid", 0),
        ("pid", -5),
        ("pid", 2**31),
        ("pid", 1.5),
    ],
)
def test_entry_bounds(conn, home, field, value):
    invalid(conn.call("registry.register", {"entry": dict(entry(), **{field: value})}), f"entry.{field}")
    assert not os.path.exists(home / "registry" / "alpha.json")


def test_entry_at_its_bounds(conn):
    big = entry(
        "x" * 128,
        dashboard_url="https://" + "u" * 2040,
        display_name="d" * 256,
        capability="c" * 1024,
        port=65535,
        pid=2**31 - 1,
        status=None,
    )
    assert conn.result("registry.register", {"entry": big}) is None
    (listed,) = conn.result("registry.list")
    assert listed["status"] == "idle" and len(listed["dashboard_url"]) == 2048 and listed["port"] == 65535
    assert register(conn, name="zero-port", port=0, dashboard_url="HTTPS://Example")["result"] is None


def test_entry_must_be_an_object_with_name_and_url(conn):
    invalid(conn.call("registry.register", {"entry": "alpha"}), "entry")
    invalid(conn.call("registry.register", {}), "entry")
    invalid(conn.call("registry.register", {"entry": {"name": "a"}}), "entry.dashboard_url")
    invalid(conn.call("registry.register", {"entry": {"dashboard_url": "http://x"}}), "entry.name")


def test_entries_per_directory_are_bounded(conn, home):
    directory = home / "registry"
    directory.mkdir(parents=True, mode=0o700)
    for i in range(MAX_ENTRIES - 1):
        raw = dict(entry(f"n{i:04d}"), registered_at=START, last_heartbeat_at=START)
        private_file(directory / f"n{i:04d}.json", json.dumps(raw).encode())
    assert register(conn, name="last")["result"] is None
    reply = register(conn, name="one-too-many")
    assert reply["error"]["code"] == -32603
    assert reply["error"]["data"] == {"reason": "registry_full", "limit": MAX_ENTRIES}
    assert not (directory / "one-too-many.json").exists()
    # Replacing an existing entry is not a new one; a freed slot takes a new name.
    assert register(conn, name="last", status="running")["result"] is None
    assert conn.result("registry.unregister", {"name": "n0000"}) is None
    assert register(conn, name="one-too-many")["result"] is None
    assert len(conn.result("registry.list")) == MAX_ENTRIES
    # Another registry directory has its own room.
    assert register(conn, registry_path=home / "registries" / "t", name="one-too-many")["result"] is None


def test_store_bounds_directly(tmp_path):
    files = RegistryFiles(tmp_path, max_entries=2)
    files.register(None, make_entry(name="a", dashboard_url="http://a", now=1))
    files.register(None, make_entry(name="b", dashboard_url="http://b", now=1))
    with pytest.raises(RegistryFull):
        files.register(None, make_entry(name="c", dashboard_url="http://c", now=1))
    # Files that are not entries still take room: they are in the directory.
    private_file(tmp_path / "registry" / "junk.json", b"{")
    files.unregister(None, "a")
    with pytest.raises(RegistryFull):
        files.register(None, make_entry(name="c", dashboard_url="http://c", now=1))
    assert [e.name for e in files.entries(None)] == ["b"]
    assert files.reap(None, 100, 10) == ["b"]
    assert agent_registry.entry_from_json({"name": "b"}) is None


# -- roles -------------------------------------------------------------------------------


def test_an_agent_connection_writes_only_its_own_entry(state, conn):
    agent = DispatchConn(state, {"agent_id": "mine", "token": "token-of-mine"})
    assert agent.session.agent_only
    assert register(agent, name="mine")["result"] is None
    assert agent.result("registry.heartbeat", {"name": "mine"}) == {"refreshed": True}
    register(conn, name="theirs")
    for method, params in (
        ("registry.register", {"entry": entry("theirs")}),
        ("registry.heartbeat", {"name": "theirs"}),
        ("registry.unregister", {"name": "theirs"}),
        ("registry.reap", {"max_age_secs": 0}),
    ):
        reply = agent.call(method, params)
        assert reply["error"]["code"] == -32603 and "forbidden" in reply["error"]["message"], reply
    assert names(agent) == ["mine", "theirs"]
    assert agent.result("registry.unregister", {"name": "mine"}) is None
    host = DispatchConn(state, {"host_token": HOST_TOKEN})
    assert host.result("registry.reap", {"max_age_secs": 0}) == []
    assert host.result("registry.unregister", {"name": "theirs"}) is None


def test_methods_are_in_the_table(state, conn):
    table = set(state.methods.names())
    assert {"registry.register", "registry.heartbeat", "registry.unregister", "registry.list", "registry.reap"} <= table
    assert "registry" in conn.result("capabilities.list")["namespaces"]
