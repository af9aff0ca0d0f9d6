"""
Files and directories only the daemon's user controls.

The state root holds what decides who the daemon trusts (token files, the
agents manifest with its commands and tokens, run traces), so a root that
another local user prepared, or could change, must not be used: at start
the daemon walks it and refuses anything not owned by its own user, any
group- or world-writable entry, and any symbolic link inside it.  Files
it opens there are opened with ``O_NOFOLLOW``; directories it creates
are 0700, every level.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from car_twisted.paths import ConfigError

__all__ = [
    "FileTooLarge",
    "UnsafeStateError",
    "check_private_tree",
    "check_private_paths",
    "ensure_private_dir",
    "open_private",
    "read_private",
]

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeStateError(ConfigError):
    """A state path another user controls or could change (exit 2)."""


class FileTooLarge(OSError):
    """A private file larger than the reader would take."""


def _uid() -> int:
    return os.geteuid()


def _loose(mode: int) -> bool:
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def _describe(path: Path, st: os.stat_result, uid: int) -> str | None:
    """Why C{path} (already lstat'ed) is not private to C{uid}, or None."""
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not by the daemon's user (uid {uid})"
    if _loose(st.st_mode):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _check_ancestors(path: Path, uid: int) -> None:
    """
    Every existing directory above the state root must be owned by the
    daemon's user or root, and writable by others only if sticky (like
    ``/tmp``): otherwise its owner could swap the root out.
    """
    for parent in [path, *path.parents]:
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            continue
        if st.st_uid not in (uid, 0):
            raise UnsafeStateError(f"{parent} is owned by uid {st.st_uid}, not by the daemon's user or root")
        if _loose(st.st_mode) and not st.st_mode & stat.S_ISVTX:
            raise UnsafeStateError(
                f"{parent} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}) and not sticky"
            )


def check_private_tree(root: Path, uid: int | None = None) -> None:
    """
    Refuse a state root the daemon's user does not fully control: the root
    (a symbolic link to it is fine if the link is the user's or root's),
    its ancestors, and every directory and file below it.  A root that
    does not exist yet passes if its ancestors do (it is created 0700).

    @raise UnsafeStateError: naming the first offending path and why.
    """
    uid = _uid() if uid is None else uid
    try:
        lst = os.lstat(root)
    except FileNotFoundError:
        _check_ancestors(root.parent, uid)
        return
    real = root
    if stat.S_ISLNK(lst.st_mode):
        if lst.st_uid not in (uid, 0):
            raise UnsafeStateError(f"{root} is a symbolic link owned by uid {lst.st_uid}")
        real = Path(os.path.realpath(root))
    _check_ancestors(real.parent, uid)
    st = os.stat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStateError(f"{root} is not a directory")
    problem = _describe(real, st, uid)
    if problem is not None:
        raise UnsafeStateError(problem)
    _check_below(real, uid)


def _check_below(top: Path, uid: int) -> None:
    pending = [top]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                path = Path(entry.path)
                st = entry.stat(follow_symlinks=False)
                if _legacy_socket_lock(path, st, uid):
                    continue  # removed with the stale socket at start-up
                problem = _describe(path, st, uid)
                if problem is not None:
                    raise UnsafeStateError(problem)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)


def _legacy_socket_lock(path: Path, st: os.stat_result, uid: int) -> bool:
    """Twisted's pid lock beside a socket: a symlink of ours, never followed."""
    return stat.S_ISLNK(st.st_mode) and st.st_uid == uid and path.name.endswith(".sock.lock")


def check_private_paths(paths: Iterable[Path], uid: int | None = None) -> None:
    """L{check_private_tree} for each distinct root in C{paths}."""
    seen: set[Path] = set()
    for path in paths:
        if path not in seen and not any(path.is_relative_to(s) for s in seen):
            seen.add(path)
            check_private_tree(path, uid)


def ensure_private_dir(path: Path) -> None:
    """
    Make C{path} a directory only the daemon's user can write: each
    missing level is created 0700; an existing one must be a real
    directory owned by that user and not group/other-writable.

    @raise UnsafeStateError: it exists and is not private.
    """
    uid = _uid()
    missing = []
    probe = path
    while True:
        try:
            st = os.lstat(probe)
            break
        except FileNotFoundError:
            missing.append(probe)
            if probe.parent == probe:
                return
            probe = probe.parent
    if not missing:
        problem = _describe(path, st, uid)
        if problem is None and not stat.S_ISDIR(st.st_mode):
            problem = f"{path} is not a directory"
        if problem is not None:
            raise UnsafeStateError(problem)
        return
    for level in reversed(missing):
        try:
            os.mkdir(level, 0o700)
        except FileExistsError:
            # Created meanwhile (another daemon of ours, or someone else):
            # it has to pass the same test as any existing directory.
            ensure_private_dir(level)
            continue
        os.chmod(level, 0o700)


def open_private(path: Path, flags: int, mode: int = 0o600) -> int:
    """
    C{os.open} that never follows a symbolic link at C{path} and refuses
    an existing file another user owns or may write.

    @raise UnsafeStateError: the file is not private.
    @raise OSError: as C{os.open} (ELOOP for a symlink, ENOENT, ...).
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # the name is a symbolic link
            raise UnsafeStateError(f"{path} is a symbolic link") from None
        raise
    try:
        problem = _describe(path, os.fstat(fd), _uid())
    except BaseException:
        os.close(fd)
        raise
    if problem is not None:
        os.close(fd)
        raise UnsafeStateError(problem)
    return fd


def read_private(path: Path, max_bytes: int | None = None) -> bytes:
    """
    The whole of a small private file (no symlinks followed).

    @raise FileTooLarge: it holds more than C{max_bytes} (read no further).
    """
    fd = open_private(path, os.O_RDONLY)
    try:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise FileTooLarge(f"{path.name} holds more than {max_bytes} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
