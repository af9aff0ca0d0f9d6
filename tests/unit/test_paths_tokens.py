"""CAR_HOME paths, token minting and files, and the primary lock."""

import os
import re
import stat

import pytest

from car_twisted.auth import PrimaryLock, mint_token, remove_if_ours, tokens_equal, write_secret_file
from car_twisted.config import ServerStateConfig
from car_twisted.paths import CarPaths, ConfigError


def test_car_home_layout():
    p = CarPaths.resolve({"CAR_HOME": "/srv/car", "XDG_RUNTIME_DIR": "/run/user/1"})
    assert str(p.auth_token_file) == "/srv/car/ai.parslee.car/auth-token"
    assert str(p.host_token_file) == "/srv/car/ai.parslee.car/host-token"
    assert str(p.shared_socket) == "/srv/car/run/car-server.sock"
    assert str(p.lock_file) == "/srv/car/run/daemon.lock"
    assert str(p.secondary_socket(9200)) == "/srv/car/run/car-server-9200.sock"


def test_xdg_layout():
    p = CarPaths.resolve({"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1"})
    assert str(p.auth_token_file) == "/run/user/1/ai.parslee.car/auth-token"
    assert str(p.shared_socket) == "/run/user/1/ai.parslee.car/car-server.sock"
    assert str(p.home) == "/home/u/.car"


def test_plain_home_layout():
    p = CarPaths.resolve({"HOME": "/home/u"})
    assert str(p.auth_token_file) == "/home/u/.config/ai.parslee.car/auth-token"
    assert str(p.shared_socket) == "/home/u/.car/run/car-server.sock"


def test_option_wins_over_environment():
    p = CarPaths.resolve({"CAR_HOME": "/a"}, car_home="/b")
    assert str(p.home) == "/b"


@pytest.mark.parametrize("value", ["relative/dir", "./x", "~/car"])
def test_relative_car_home_refused(value):
    with pytest.raises(ConfigError, match=re.escape(repr(value))):
        CarPaths.resolve({"CAR_HOME": value})


def test_config_from_environ():
    cfg = ServerStateConfig.from_environ(
        {"CAR_HOME": "/x", "CAR_NO_AUTH": "1", "CAR_AUTH_TOKEN": " pinned \n", "CAR_HANDLER_TIMEOUT": "12"}
    )
    assert cfg.auth_enabled is False and cfg.auth_token == "pinned" and cfg.handler_timeout == 12.0
    assert "pinned" not in repr(cfg)
    with pytest.raises(ConfigError):
        ServerStateConfig.from_environ({"CAR_HOME": "/x", "CAR_HANDLER_TIMEOUT": "soon"})
    assert ServerStateConfig.from_environ({"CAR_HOME": "/x"}, auth_token="opt").auth_token == "opt"


def test_mint_token_shape():
    tokens = {mint_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", t) for t in tokens)


def test_tokens_equal():
    assert tokens_equal("abc", "abc")
    assert not tokens_equal("abd", "abc")
    assert not tokens_equal("ab", "abc")
    assert not tokens_equal(None, "abc")
    assert not tokens_equal(5, "abc")
    assert not tokens_equal("abc", None)


def test_secret_file_modes(tmp_path):
    target = tmp_path / "new" / "dir" / "auth-token"
    write_secret_file(target, "tok")
    assert target.read_text() == "tok\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(target.parent).st_mode) == 0o700
    write_secret_file(target, "tok2")
    assert target.read_text() == "tok2\n"
    assert [p.name for p in target.parent.iterdir()] == ["auth-token"]


def test_remove_if_ours(tmp_path):
    f = tmp_path / "t"
    write_secret_file(f, "mine")
    assert not remove_if_ours(f, "theirs") and f.exists()
    assert remove_if_ours(f, "mine") and not f.exists()
    assert not remove_if_ours(f, "mine")


def test_primary_lock(tmp_path):
    first, second = PrimaryLock(tmp_path / "run" / "daemon.lock"), PrimaryLock(tmp_path / "run" / "daemon.lock")
    assert first.acquire() and first.held
    assert not second.acquire() and not second.held
    first.release()
    assert second.acquire()
    second.release()
