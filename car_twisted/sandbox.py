"""
Paths from the wire, confined to one base directory: ``memory.persist`` /
``memory.load`` files inside ``$CAR_HOME/memory/``, a meeting ``root``
inside ``$CAR_HOME/meeting-roots/``.

A relative path lands under the base; an absolute one must already point
inside it.  Refused, with ``<method> rejected path …``: a ``..``
segment, a NUL, a name or path too long, a directory on the way that is a
symlink or resolves outside the base, and a file that is a symlink (the
file itself is opened with ``O_NOFOLLOW`` too, and directories created on
the way are 0700).  The checks run where the file is touched (off the
reactor thread), right before the open.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from car_twisted.errors import INVALID_PARAMS, RpcError
from car_twisted.private_files import ensure_private_dir

__all__ = ["confined_dir", "memory_path", "sandbox_path", "MAX_PATH_CHARS", "MAX_NAME_CHARS"]

MAX_PATH_CHARS = 1024
MAX_NAME_CHARS = 255
#: Where the scopes keep their graphs (``car_twisted.memory.scopes``): out of reach of persist/load.
RESERVED_DIRS = frozenset({"agents", "memory-namespaces"})
RESERVED_FILE = "shared.json"


def _rejected(method: str, path: str, why: str) -> RpcError:
    return RpcError(f"{method} rejected path {path[:200]!r}: {why}", data={"field": "path"}, code=INVALID_PARAMS)


def memory_path(base: Path, raw: str, method: str, create_dirs: bool) -> Path:
    """
    The file C{raw} names inside C{base} (``$CAR_HOME/memory``), never one
    of the scope graphs' own files.

    @param create_dirs: make missing directories (0700) on the way
        (``memory.persist``); ``memory.load`` needs them to exist.
    @raise RpcError: C{-32602}: the path leaves the sandbox or cannot be
        used; the message says ``<method> rejected path …`` and why.
    """
    return sandbox_path(base, raw, method, create_dirs, reserved=_memory_reserved)


def _memory_reserved(parts: list[str]) -> bool:
    # The scope graphs' own files: persist/load must not reach another scope's graph.
    return parts[0] in RESERVED_DIRS or (len(parts) == 1 and parts[0].startswith(RESERVED_FILE))


def confined_dir(base: Path, raw: str, method: str) -> Path:
    """The directory C{raw} names inside C{base}, made (0700) if missing."""
    return sandbox_path(base, raw, method, create_dirs=True, directory=True)


def sandbox_path(
    base: Path,
    raw: str,
    method: str,
    create_dirs: bool,
    directory: bool = False,
    reserved: Callable[[list[str]], bool] | None = None,
) -> Path:
    """
    The file (or with C{directory}, the directory) C{raw} names inside C{base}.

    @param reserved: refuses paths (given their parts) the caller keeps for itself.
    @raise RpcError: C{-32602}: the path leaves the sandbox or cannot be
        used; the message says ``<method> rejected path …`` and why.
    """
    if not raw or "\0" in raw:
        raise _rejected(method, raw, "empty or contains a NUL")
    if len(raw) > MAX_PATH_CHARS:
        raise _rejected(method, raw, f"longer than {MAX_PATH_CHARS} characters")
    pure = PurePosixPath(raw)
    if any(part == ".." for part in pure.parts):
        raise _rejected(method, raw, "'..' segments are not allowed")
    if any(len(part.encode()) > MAX_NAME_CHARS for part in pure.parts):
        raise _rejected(method, raw, f"a path component is longer than {MAX_NAME_CHARS} bytes")
    ensure_private_dir(base)
    real_base = Path(os.path.realpath(base))
    if pure.is_absolute():
        candidate = Path(pure)
        try:
            relative = candidate.relative_to(base)
        except ValueError:
            try:
                relative = candidate.relative_to(real_base)
            except ValueError:
                raise _rejected(method, raw, "absolute paths must be inside its base directory") from None
    else:
        relative = Path(pure)
    parts = [part for part in relative.parts if part != "."]
    if directory:
        walk = parts
    else:
        if not parts or relative.name in ("", "."):
            raise _rejected(method, raw, "names a directory, not a file")
        walk = parts[:-1]
    if parts and reserved is not None and reserved(parts):
        raise _rejected(method, raw, "names the daemon's own files")
    # Walk the directories one by one: none may be a symlink (a symlinked
    # directory could lead anywhere), each must stay inside the base.
    folder = real_base
    for part in walk:
        folder = folder / part
        shown = folder.relative_to(real_base)
        if os.path.islink(folder):
            raise _rejected(method, raw, f"{shown} is a symbolic link")
        if not os.path.exists(folder):
            if not create_dirs:
                raise _rejected(method, raw, f"{shown} does not exist")
            ensure_private_dir(folder)
        elif not os.path.isdir(folder):
            raise _rejected(method, raw, f"{shown} is not a directory")
    if directory:
        if Path(os.path.realpath(folder)) != folder:
            raise _rejected(method, raw, "resolves outside its base directory")
        return folder
    target = folder / relative.name
    if os.path.islink(target):
        raise _rejected(method, raw, "the file is a symbolic link")
    if os.path.isdir(target):
        raise _rejected(method, raw, "names a directory, not a file")
    if Path(os.path.realpath(target.parent)) != folder:
        raise _rejected(method, raw, "resolves outside its base directory")
    return target
