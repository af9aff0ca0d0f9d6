"""
Tokens: minting, constant-time checks, the 0600 token files and the
primary-daemon lock.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hmac
import os
import secrets
from pathlib import Path

from twisted.logger import Logger

from car_twisted.private_files import ensure_private_dir, open_private, read_private

__all__ = [
    "mint_token",
    "tokens_equal",
    "write_secret_file",
    "remove_if_ours",
    "ensure_private_dir",
    "PrimaryLock",
]

_log = Logger()


def mint_token() -> str:
    """32 random bytes as base64url without padding (43 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def tokens_equal(given: object, expected: str | None) -> bool:
    """Constant-time comparison; anything that is not a string fails."""
    if expected is None or type(given) is not str:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def write_secret_file(path: Path, content: str) -> None:
    """
    Atomically replace C{path} with C{content}, mode 0600, in a 0700
    directory: a temp file opened 0600 from the start, fsynced, renamed.
    """
    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, content.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # No temp file left behind when the write or the rename fails.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_if_ours(path: Path, content: str) -> bool:
    """Remove C{path} only if it still holds C{content} (ours)."""
    try:
        if read_private(path).decode(errors="replace").strip() != content:
            return False
        path.unlink()
        return True
    except FileNotFoundError:
        return False


class PrimaryLock:
    """
    The advisory lock on ``run/daemon.lock`` that makes a daemon the
    primary of its state root.  Held for the daemon's life; released
    (with the fd) on ``release`` or at process exit.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        ensure_private_dir(self.path.parent)
        # Never through a symlink: one planted here would have us truncate
        # whatever it points at.
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
