"""
The file-based agent registry: one JSON file per agent in a directory
that tray UIs, monitors and other processes poll to see what is running.

Each agent owns ``<name>.json`` in a registry directory (by default
``$CAR_HOME/registry``; per-tenant ones live below
``$CAR_HOME/registries/``).  A file is replaced as a whole (a 0600 temp
file renamed over the old one), so a reader sees the old entry or the new
one, never part of either.  Files are opened without following symbolic
links, and one that is not a well-formed entry is skipped, never an
error.  Everything here blocks on the file system: callers on the reactor
thread run it in a thread pool, and the writes of one ``RegistryFiles``
are serialised by its lock.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from car_twisted.auth import write_secret_file
from car_twisted.private_files import UnsafeStateError, ensure_private_dir, open_private

__all__ = [
    "AgentEntry",
    "RegistryError",
    "RegistryFull",
    "RegistryFiles",
    "STATUSES",
    "DEFAULT_STATUS",
    "MAX_NAME_LEN",
    "MAX_URL_LEN",
    "MAX_DISPLAY_NAME_LEN",
    "MAX_CAPABILITY_LEN",
    "MAX_ENTRIES",
    "MAX_ENTRY_BYTES",
    "check_name",
    "make_entry",
    "entry_from_json",
    "resolve_registry_dir",
]

STATUSES = ("running", "idle", "errored", "stopping")
DEFAULT_STATUS = "idle"
MAX_NAME_LEN = 128
MAX_URL_LEN = 2048
MAX_DISPLAY_NAME_LEN = 256
MAX_CAPABILITY_LEN = 1024
MAX_PID = 2**31 - 1
MAX_ENTRIES = 1024
# Far above the largest entry the bounds allow (every string escaped);
# a bigger file is not an entry, and is skipped unread.
MAX_ENTRY_BYTES = 64 * 1024
DEFAULT_DIR = "registry"
TENANT_ROOT = "registries"
SUFFIX = ".json"

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RegistryError(ValueError):
    """A value the registry refuses: C{field} names it, C{problem} says why."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class RegistryFull(Exception):
    """A new name in a registry directory that already holds C{limit} entries."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the registry directory already holds {limit} entries")
        self.limit = limit


# -- entries -------------------------------------------------------------------------------


def check_name(name: object, field: str = "name") -> str:
    """
    C{name} if it can name an entry's file: 1 to 128 letters, digits,
    ``-``, ``_`` or ``.``, and not ``.`` or ``..``.

    @raise RegistryError: it cannot.
    """
    if type(name) is not str or _NAME.fullmatch(name) is None or name in (".", ".."):
        raise RegistryError(
            field, f"expected 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.' (not '.' or '..')"
        )
    return name


def _text(field: str, limit: int) -> Callable[[object, attrs.Attribute[str | None], str | None], None]:
    def check(_: object, __: attrs.Attribute[str | None], value: str | None) -> None:
        if value is None:
            return
        if type(value) is not str or len(value) > limit:
            raise RegistryError(field, f"expected a string of at most {limit} characters")

    return check


def _check_name(_: object, __: attrs.Attribute[str], value: str) -> None:
    check_name(value)


def _check_url(_: object, __: attrs.Attribute[str], value: str) -> None:
    if type(value) is not str or not 0 < len(value) <= MAX_URL_LEN:
        raise RegistryError("dashboard_url", f"expected a string of 1 to {MAX_URL_LEN} characters")
    if not value.lower().startswith(("http://", "https://")):
        raise RegistryError("dashboard_url", "expected an http:// or https:// URL")
    if _CONTROL.search(value):
        raise RegistryError("dashboard_url", "control characters are not allowed")


def _check_status(_: object, __: attrs.Attribute[str], value: str) -> None:
    if value not in STATUSES:
        raise RegistryError("status", "expected one of " + ", ".join(STATUSES))


def _check_port(_: object, __: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and (type(value) is not int or not 0 <= value <= 65535):
        raise RegistryError("port", "expected an integer from 0 to 65535")


def _check_pid(_: object, __: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and (type(value) is not int or not 0 < value <= MAX_PID):
        raise RegistryError("pid", "expected a positive process id")


def _check_time(field: str) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(_: object, __: attrs.Attribute[int], value: int) -> None:
        if type(value) is not int or value < 0:
            raise RegistryError(field, "expected a non-negative number of Unix seconds")

    return check


@attrs.frozen
class AgentEntry:
    """
    One agent's registry entry, as its file holds it.  Times are whole
    Unix seconds; the validators hold every bound, so an entry that
    exists is one the registry may write.
    """

    name: str = attrs.field(validator=_check_name)
    dashboard_url: str = attrs.field(validator=_check_url)
    registered_at: int = attrs.field(validator=_check_time("registered_at"))
    last_heartbeat_at: int = attrs.field(validator=_check_time("last_heartbeat_at"))
    status: str = attrs.field(default=DEFAULT_STATUS, validator=_check_status)
    display_name: str | None = attrs.field(default=None, validator=_text("display_name", MAX_DISPLAY_NAME_LEN))
    capability: str | None = attrs.field(default=None, validator=_text("capability", MAX_CAPABILITY_LEN))
    port: int | None = attrs.field(default=None, validator=_check_port)
    pid: int | None = attrs.field(default=None, validator=_check_pid)

    def to_json(self) -> dict[str, str | int | None]:
        """The entry as its file and ``registry.list`` carry it (absent optionals as null)."""
        return {
            "name": self.name,
            "dashboard_url": self.dashboard_url,
            "status": self.status,
            "display_name": self.display_name,
            "capability": self.capability,
            "port": self.port,
            "pid": self.pid,
            "registered_at": self.registered_at,
            "last_heartbeat_at": self.last_heartbeat_at,
        }


def _given_time(field: str, value: object, now: int) -> int:
    """
    A caller's C{registered_at} / C{last_heartbeat_at}: missing or zero
    is C{now}; a time in the future is C{now} too, so no entry can hide
    from ``reap`` behind a heartbeat that has not happened.
    """
    if value is None:
        return now
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RegistryError(field, "expected a number of Unix seconds")
    if isinstance(value, float) and not math.isfinite(value):
        raise RegistryError(field, "expected a finite number of Unix seconds")
    if value < 0:
        raise RegistryError(field, "expected a non-negative number of Unix seconds")
    if value == 0 or value > now:
        return now
    return int(value)


def make_entry(
    *,
    name: str,
    dashboard_url: str,
    now: int,
    status: str | None = None,
    display_name: str | None = None,
    capability: str | None = None,
    port: int | None = None,
    pid: int | None = None,
    registered_at: object = None,
    last_heartbeat_at: object = None,
) -> AgentEntry:
    """
    The entry a ``register`` writes, its times filled from C{now} (whole
    Unix seconds) where missing or zero.

    @raise RegistryError: naming the first field out of bounds.
    """
    return AgentEntry(
        name=name,
        dashboard_url=dashboard_url,
        status=DEFAULT_STATUS if status is None else status,
        display_name=display_name,
        capability=capability,
        port=port,
        pid=pid,
        registered_at=_given_time("registered_at", registered_at, now),
        last_heartbeat_at=_given_time("last_heartbeat_at", last_heartbeat_at, now),
    )


def entry_from_json(raw: object) -> AgentEntry | None:
    """
    The entry a file holds, or None for anything that is not one (skipped
    by readers).  Times written by other writers may be fractional; they
    are read as whole seconds.
    """
    if not isinstance(raw, Mapping):
        return None
    times: list[int] = []
    for key in ("registered_at", "last_heartbeat_at"):
        value = raw.get(key)
        if type(value) is float and math.isfinite(value) and value >= 0:
            times.append(int(value))
        elif type(value) is int:
            times.append(value)
        else:
            return None
    name, url, status = raw.get("name"), raw.get("dashboard_url"), raw.get("status")
    if type(name) is not str or type(url) is not str:
        return None
    try:
        return AgentEntry(
            name=name,
            dashboard_url=url,
            status=DEFAULT_STATUS if status is None else status,
            display_name=raw.get("display_name"),
            capability=raw.get("capability"),
            port=raw.get("port"),
            pid=raw.get("pid"),
            registered_at=times[0],
            last_heartbeat_at=times[1],
        )
    except RegistryError:
        return None


# -- where registries live -----------------------------------------------------------------


def resolve_registry_dir(home: Path, requested: str | None) -> Path:
    """
    The registry directory for C{requested} (a caller's ``registry_path``,
    or None for the default ``home/registry``), created 0700 if missing.

    A requested path must be absolute and, once its symbolic links are
    resolved, be ``home/registry`` itself or a directory below
    ``home/registries/``: a caller names a registry, never an arbitrary
    place on disk.

    @raise RegistryError: for C{registry_path}, when the path is not one
        of those, or is there but not a private directory.
    @raise UnsafeStateError: the default directory is not private.
    @raise OSError: the default directory cannot be created.
    """
    default = home / DEFAULT_DIR
    if requested is None:
        ensure_private_dir(default)
        return default
    where = f"registries live in {default} or in a directory below {home / TENANT_ROOT}"
    if "\x00" in requested or not os.path.isabs(requested):
        raise RegistryError("registry_path", f"expected an absolute path; {where}")
    real_home = Path(os.path.realpath(home))
    real = Path(os.path.realpath(requested))
    tenants = real_home / TENANT_ROOT
    if real != real_home / DEFAULT_DIR and not (real != tenants and real.is_relative_to(tenants)):
        raise RegistryError("registry_path", f"{requested!r} is outside the state root's registries; {where}")
    try:
        ensure_private_dir(real)
    except (UnsafeStateError, OSError) as e:
        raise RegistryError("registry_path", f"cannot use it: {e}") from None
    return real


# -- the files -----------------------------------------------------------------------------


def _entry_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{SUFFIX}"


def _entry_names(directory: Path) -> list[str]:
    """The names of the entry files in C{directory}, sorted (temp files and strangers left out)."""
    names = []
    with os.scandir(directory) as found:
        for item in found:
            if not item.name.endswith(SUFFIX):
                continue
            stem = item.name[: -len(SUFFIX)]
            if _NAME.fullmatch(stem) and stem not in (".", ".."):
                names.append(stem)
    return sorted(names)


def _read_entry(directory: Path, name: str) -> AgentEntry | None:
    """
    The entry in C{name}'s file, or None when there is none (missing, a
    symbolic link, not a regular file, too big, not JSON, not an entry,
    or an entry for another name).
    """
    path = _entry_path(directory, name)
    try:
        # open_private rather than read_private: the same no-symlink,
        # owner-checked open, plus O_NONBLOCK (a FIFO planted here must not
        # hang a thread) and a size bound before anything is read.
        fd = open_private(path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, UnsafeStateError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_ENTRY_BYTES:
            return None
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_ENTRY_BYTES:
            chunk = os.read(fd, MAX_ENTRY_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    if size > MAX_ENTRY_BYTES:
        return None
    try:
        raw = json.loads(b"".join(chunks))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
        return None
    entry = entry_from_json(raw)
    return entry if entry is not None and entry.name == name else None


def _write_entry(directory: Path, entry: AgentEntry) -> None:
    text = json.dumps(entry.to_json(), indent=2, ensure_ascii=False, allow_nan=False)
    write_secret_file(_entry_path(directory, entry.name), text)


class RegistryFiles:
    """
    The agent registries under one state root.  Each method takes the
    caller's ``registry_path`` (None for the default directory) and
    blocks; writes hold a lock, so a heartbeat's read-and-rewrite and a
    register's count-then-write are not interleaved within this process.

    @ivar home: the state root (``CAR_HOME``).
    @ivar max_entries: entry files one registry directory may hold.
    """

    def __init__(self, home: Path, max_entries: int = MAX_ENTRIES) -> None:
        self.home = home
        self.max_entries = max_entries
        self._lock = threading.Lock()

    def directory(self, registry_path: str | None) -> Path:
        """The registry directory for C{registry_path}; see L{resolve_registry_dir}."""
        return resolve_registry_dir(self.home, registry_path)

    def register(self, registry_path: str | None, entry: AgentEntry) -> None:
        """
        Write C{entry}, replacing the agent's previous one.

        @raise RegistryFull: a new name, and the directory is full.
        """
        directory = self.directory(registry_path)
        with self._lock:
            if not os.path.lexists(_entry_path(directory, entry.name)):
                if len(_entry_names(directory)) >= self.max_entries:
                    raise RegistryFull(self.max_entries)
            _write_entry(directory, entry)

    def heartbeat(self, registry_path: str | None, name: str, now: int) -> bool:
        """Set C{name}'s ``last_heartbeat_at`` to C{now}; False when it has no entry."""
        directory = self.directory(registry_path)
        with self._lock:
            entry = _read_entry(directory, name)
            if entry is None:
                return False
            _write_entry(directory, attrs.evolve(entry, last_heartbeat_at=now))
            return True

    def unregister(self, registry_path: str | None, name: str) -> None:
        """Remove C{name}'s file (a link is removed, not followed); nothing if there is none."""
        directory = self.directory(registry_path)
        with self._lock:
            try:
                os.unlink(_entry_path(directory, name))
            except FileNotFoundError:
                pass

    def entries(self, registry_path: str | None) -> list[AgentEntry]:
        """Every well-formed entry, sorted by name: at most C{max_entries} of them."""
        directory = self.directory(registry_path)
        entries = []
        for name in _entry_names(directory):
            entry = _read_entry(directory, name)
            if entry is not None:
                entries.append(entry)
                if len(entries) >= self.max_entries:
                    break
        return entries

    def reap(self, registry_path: str | None, now: int, max_age: float) -> list[str]:
        """
        Remove the entries whose last heartbeat is more than C{max_age}
        seconds before C{now}; the names removed, sorted.  Files that are
        not entries are left alone.
        """
        directory = self.directory(registry_path)
        reaped = []
        with self._lock:
            for name in _entry_names(directory):
                entry = _read_entry(directory, name)
                if entry is None or now - entry.last_heartbeat_at <= max_age:
                    continue
                try:
                    os.unlink(_entry_path(directory, name))
                except FileNotFoundError:
                    continue
                reaped.append(name)
        return reaped
