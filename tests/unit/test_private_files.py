"""The state root's trust rules: ownership, modes, symlinks, and 0700 at every level."""

import os
import stat

import pytest

from car_twisted.auth import PrimaryLock, remove_if_ours, write_secret_file
from car_twisted.private_files import (
    UnsafeStateError,
    check_private_tree,
    ensure_private_dir,
    open_private,
    read_private,
)

ME = os.geteuid()


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "car-home"
    (r / "run").mkdir(parents=True, mode=0o700)
    (r / "agents.json").write_text("{}")
    return r


def test_a_private_tree_passes(root):
    check_private_tree(root)
    check_private_tree(root / "missing")  # created 0700 later; its ancestors are fine


def test_group_or_world_writable_entries_are_refused(root):
    os.chmod(root / "run", 0o777)
    with pytest.raises(UnsafeStateError, match=r"run is writable by group or others \(mode 0777\)"):
        check_private_tree(root)
    os.chmod(root / "run", 0o700)
    os.chmod(root / "agents.json", 0o620)
    with pytest.raises(UnsafeStateError, match="agents.json is writable by group or others"):
        check_private_tree(root)


def test_the_root_itself_is_checked(root):
    os.chmod(root, 0o777)
    with pytest.raises(UnsafeStateError, match="car-home is writable"):
        check_private_tree(root)


def test_entries_of_another_owner_are_refused(root):
    """Seen from another uid, everything here is someone else's (no root needed for this one)."""
    with pytest.raises(UnsafeStateError, match=f"owned by uid {ME}, not by the daemon's user"):
        check_private_tree(root, uid=ME + 1)


def test_symlinks_inside_are_refused(root, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (root / "run" / "daemon.lock").symlink_to(victim)
    with pytest.raises(UnsafeStateError, match="daemon.lock is a symbolic link"):
        check_private_tree(root)


def test_an_unsafe_ancestor_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # writable by others and not sticky: the root could be swapped
    with pytest.raises(UnsafeStateError, match="shared is writable by group or others .* and not sticky"):
        check_private_tree(shared / "car-home")
    os.chmod(shared, 0o1777)  # like /tmp
    check_private_tree(shared / "car-home")


def test_foreign_file_inside_is_refused_for_a_real_other_user(root, other_user):
    os.chown(root / "agents.json", other_user.pw_uid, other_user.pw_gid)
    with pytest.raises(UnsafeStateError, match=f"agents.json is owned by uid {other_user.pw_uid}"):
        check_private_tree(root)


def test_ensure_private_dir_makes_every_level_0700(tmp_path):
    old = os.umask(0)
    try:
        ensure_private_dir(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert mode(p) == 0o700


def test_ensure_private_dir_refuses_a_loose_existing_one(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o775)
    with pytest.raises(UnsafeStateError, match="writable by group or others"):
        ensure_private_dir(loose)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(UnsafeStateError, match="symbolic link"):
        ensure_private_dir(link)


def test_open_private_never_follows_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(UnsafeStateError, match="symbolic link"):
        open_private(link, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    assert victim.read_text() == "precious"
    os.chmod(victim, 0o666)
    with pytest.raises(UnsafeStateError, match="writable by group or others"):
        read_private(victim)


def test_lock_file_symlink_is_not_followed(tmp_path):
    """A daemon.lock planted as a symlink is refused; its target is not truncated."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "daemon.lock").symlink_to(victim)
    with pytest.raises(UnsafeStateError):
        PrimaryLock(run / "daemon.lock").acquire()
    assert victim.read_text() == "precious"


def test_token_files_through_symlinks_are_refused(tmp_path):
    d = tmp_path / "tokens"
    write_secret_file(d / "auth-token", "tok")
    assert mode(d) == 0o700 and mode(d / "auth-token") == 0o600
    victim = tmp_path / "victim"
    victim.write_text("tok")
    os.unlink(d / "auth-token")
    (d / "auth-token").symlink_to(victim)
    with pytest.raises(UnsafeStateError):
        remove_if_ours(d / "auth-token", "tok")
    assert victim.exists()


def test_log_and_run_directories_are_0700_at_every_level(tmp_path):
    """logs/, logs/agents/, runs/ and runs/<agent>/ are made 0700, whatever the umask."""
    from twisted.internet.task import Clock

    from car_twisted.agents.logs import AgentLog
    from car_twisted.runs.store import JsonlRunStore

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    old = os.umask(0)
    try:
        log = AgentLog(home / "logs" / "agents" / "a1.stdout.log")
        log.write(b"hello\n")
        log.close()
        store = JsonlRunStore(Clock(), home / "runs")
        store.append("a1", "r1", [{"record": "started"}])
    finally:
        os.umask(old)
    for d in ("logs", "logs/agents", "runs", "runs/a1"):
        assert mode(home / d) == 0o700, d
    assert mode(home / "logs" / "agents" / "a1.stdout.log") == 0o600
    assert mode(home / "runs" / "a1" / "r1.jsonl") == 0o600


@pytest.mark.parametrize("loose", ["ai.parslee.car", "runs", "runs/agent-7", "logs/agents"])
def test_loose_token_run_or_log_directory_is_refused(root, loose):
    """A pre-existing token, run or log directory that others may write fails the start-up check."""
    (root / loose).mkdir(parents=True, mode=0o700)
    os.chmod(root / loose, 0o775)
    with pytest.raises(UnsafeStateError, match=f"{loose} is writable by group or others"):
        check_private_tree(root)
