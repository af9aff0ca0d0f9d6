"""The twist plugin and its options."""

import os
import stat

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage

from car_twisted import tap
from car_twisted.daemon import CarDaemonService
from car_twisted.endpoints import secure_endpoint_description, unix_path, unix_socket_description


def test_plugin_is_discoverable():
    """twist finds exactly one plugin named car."""
    makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "car"]
    assert len(makers) == 1
    assert makers[0].options is tap.Options


def test_listen_is_repeatable(monkeypatch):
    monkeypatch.delenv("CAR_HOME", raising=False)
    opts = tap.Options()
    opts.parseOptions(["--listen", "tcp:1", "--listen", "unix:/tmp/x.sock", "--no-auth"])
    assert opts["listen"] == ["tcp:1", "unix:/tmp/x.sock"]
    assert opts.config_kwargs["no_auth"] is True


@pytest.mark.parametrize("args,env", [(["--car-home", "rel/dir"], {}), ([], {"CAR_HOME": "rel"})])
def test_relative_car_home_exits_2(monkeypatch, capsys, args, env):
    """A relative state root exits with status 2 and names the value."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(args)
    assert e.value.code == 2
    bad = args[1] if args else env["CAR_HOME"]
    assert repr(bad) in capsys.readouterr().err


def test_unknown_option_is_usage_error():
    with pytest.raises(usage.UsageError):
        tap.Options().parseOptions(["--bogus"])


def test_make_service_defaults(tmp_path, monkeypatch):
    """makeService builds the daemon service on a memory reactor: TCP 9100 plus the 0600 socket."""
    monkeypatch.setenv("CAR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CAR_AUTH_TOKEN", raising=False)
    opts = tap.Options()
    opts.parseOptions([])
    reactor = MemoryReactorClock()
    service = tap.makeService(opts, reactor)
    assert isinstance(service, CarDaemonService)
    service.startService()
    try:
        tcp, http = reactor.tcpServers
        assert tcp[0] == 9100 and tcp[3] == "127.0.0.1"
        assert http[0] == 9101 and http[3] == "127.0.0.1"  # the dashboard
        (unix,) = reactor.unixServers
        assert unix[0] == str(tmp_path / "home" / "run" / "car-server.sock")
        assert unix[3] == 0o600
        token_file = tmp_path / "home" / "ai.parslee.car" / "auth-token"
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert token_file.read_text().strip() == service.state.auth_token
    finally:
        service.stopService()
    assert not token_file.exists()


class _TokenCheckingReactor(MemoryReactorClock):
    """Records what the token files held at the moment each listener bound."""

    def __init__(self, token_dir):
        super().__init__()
        self.token_dir = token_dir
        self.seen_at_listen = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        self.seen_at_listen.append(
            {n: (self.token_dir / n).read_text().strip() if (self.token_dir / n).exists() else None
             for n in ("auth-token", "host-token")}
        )
        return super().listenTCP(port, factory, backlog, interface)


def test_tokens_are_current_before_any_listener_binds(tmp_path, monkeypatch):
    """After a crash the old token files remain; a client that sees the port
    open must read this launch's tokens, never the dead daemon's."""
    home = tmp_path / "home"
    token_dir = home / "ai.parslee.car"
    token_dir.mkdir(parents=True)
    for name in ("auth-token", "host-token"):
        (token_dir / name).write_text("stale-from-a-killed-daemon\n")
    monkeypatch.setenv("CAR_HOME", str(home))
    monkeypatch.delenv("CAR_AUTH_TOKEN", raising=False)
    opts = tap.Options()
    opts.parseOptions(["--listen", "tcp:9100:interface=127.0.0.1"])
    reactor = _TokenCheckingReactor(token_dir)
    service = tap.makeService(opts, reactor)
    service.startService()
    try:
        assert reactor.seen_at_listen == [
            {"auth-token": service.state.auth_token, "host-token": service.state.host_token}
        ]
    finally:
        service.stopService()


def test_endpoint_strings():
    assert secure_endpoint_description("unix:/tmp/a.sock") == "unix:/tmp/a.sock:mode=600:lockfile=0"
    assert secure_endpoint_description("unix:/tmp/a.sock:mode=660") == "unix:/tmp/a.sock:mode=660:lockfile=0"
    assert secure_endpoint_description("unix:address=/tmp/a.sock:lockfile=1") == "unix:address=/tmp/a.sock:lockfile=1:mode=600"
    assert secure_endpoint_description("tcp:9100:interface=127.0.0.1") == "tcp:9100:interface=127.0.0.1"
    assert unix_path("unix:address=/tmp/a.sock:lockfile=1") == __import__("pathlib").Path("/tmp/a.sock")
    d = unix_socket_description(__import__("pathlib").Path("/tmp/a:b.sock"))
    assert d == "unix:/tmp/a\\:b.sock:mode=600:lockfile=0"
    assert unix_path(d) == __import__("pathlib").Path("/tmp/a:b.sock")


def test_limits_are_settable(tmp_path):
    """--limit NAME=VALUE sets any listed bound, with byte suffixes; a bad one exits 2."""
    opts = tap.Options()
    opts.parseOptions(
        ["--car-home", str(tmp_path / "h"), "--limit", "max_state_bytes=32MiB", "--limit", "auth-timeout=2.5",
         "--limit", "idle_timeout=0"]
    )
    assert opts.config_kwargs["max_state_bytes"] == 32 * 1024 * 1024
    assert opts.config_kwargs["auth_timeout"] == 2.5 and opts.config_kwargs["idle_timeout"] == 0
    for bad in ("nonsense=1", "max_state_bytes", "max_state_bytes=lots", "max_batch=0", "auth_timeout=-1"):
        with pytest.raises(SystemExit) as e:
            tap.Options().parseOptions(["--car-home", str(tmp_path / "h"), "--limit", bad])
        assert e.value.code == 2
