"""
The agents manifest: ``AgentSpec`` validation and ``$CAR_HOME/agents.json``.

A spec's ``command`` must be an absolute path to an executable regular
file that only the daemon's user (or root) can change: the file, every
directory on the way to it and every symlink followed are owned by the
daemon's user or root, and no file or directory among them is writable by
its group or by others (anyone else could swap the binary).
``interpreter`` is resolved once against ``PATH`` at upsert and frozen
into ``command``.  ``env`` may not set loader variables (``LD_*``,
``DYLD_*``, ``PYTHON*``).  The manifest is written atomically (temp file +
rename), mode 0600, and holds each agent's token, which no method returns
and no log line shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import attrs

from car_twisted.errors import InvalidParams
from car_twisted.json_value import JsonValue
from car_twisted.private_files import read_private

__all__ = [
    "AgentSpec",
    "ManifestEntry",
    "parse_agent_spec",
    "validate_command",
    "spec_problem",
    "check_agent_id",
    "launch_fields",
    "store_installed",
    "load_manifest",
    "save_manifest",
    "RESTART_POLICIES",
    "DEFAULT_STOP_GRACE_SECS",
    "MAX_AGENTS",
]

RESTART_POLICIES = ("never", "on_failure", "always")
# Seconds from SIGTERM to SIGKILL when an agent is stopped.
DEFAULT_STOP_GRACE_SECS = 10.0
MAX_AGENTS = 256
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_RESERVED_ENV = ("CAR_AGENT_ID", "CAR_AGENT_TOKEN", "CAR_DAEMON_URL", "CAR_AUTH_TOKEN")
# Variables that make a dynamic loader or the Python interpreter run code
# the command's owner did not put there (LD_PRELOAD, PYTHONPATH, ...).
LOADER_ENV_PREFIXES = ("LD_", "DYLD_", "PYTHON")
# Symlinks followed while checking a command, like the kernel's limit.
_MAX_SYMLINKS = 40


@attrs.frozen
class AgentSpec:
    id: str
    name: str
    command: str
    args: tuple[str, ...] = ()
    cwd: str | None = None
    env: Mapping[str, str] = attrs.field(factory=dict)
    restart: str = "on_failure"
    max_restarts: int | None = 5
    backoff_secs: float = 1.0
    auto_start: bool = False
    interpreter: str | None = None
    capabilities: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "command": self.command,
            "args": list(self.args),
            "cwd": self.cwd,
            "env": dict(self.env),
            "restart": self.restart,
            "max_restarts": self.max_restarts,
            "backoff_secs": self.backoff_secs,
            "auto_start": self.auto_start,
            "interpreter": self.interpreter,
            "capabilities": list(self.capabilities),
        }


@attrs.frozen
class ManifestEntry:
    spec: AgentSpec
    token: str = attrs.field(repr=False)


def launch_fields(spec: AgentSpec) -> tuple[str, tuple[str, ...], dict[str, str], str | None]:
    """What decides which program runs and how: a change rotates the token."""
    return (spec.command, spec.args, dict(spec.env), spec.cwd)


def _untrusted(path: str, st: os.stat_result, euid: int) -> str | None:
    """Why C{path} could be changed by someone other than the daemon, if so."""
    if st.st_uid not in (euid, 0):
        return f"{path} is owned by uid {st.st_uid}, not by the daemon's user (uid {euid}) or root"
    # A symlink's own mode bits mean nothing; only who owns it does.
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
        # Sticky directories (/tmp) are no exception: the sticky bit does
        # not stop anyone from adding a new file or symlink in them.
        return f"{kind} {path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _untrusted_chain(command: str, euid: int) -> str | None:
    """
    Walk C{command} the way the kernel resolves it: check the root, every
    directory entered, every symlink followed (its owner) and the final
    file.  This covers the path as given, every symlink on it, the
    directories holding those symlinks, and the real path.
    """
    problem = _untrusted("/", os.lstat("/"), euid)
    if problem is not None:
        return problem
    todo = [part for part in command.split("/") if part]
    current = "/"
    followed = 0
    while todo:
        name = todo.pop(0)
        if name == ".":
            continue
        if name == "..":
            # ``current`` never contains a symlink, so its parent is real.
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        st = os.lstat(candidate)
        problem = _untrusted(candidate, st, euid)
        if problem is not None:
            return problem if not stat.S_ISLNK(st.st_mode) else f"symlink {problem}"
        if stat.S_ISLNK(st.st_mode):
            followed += 1
            if followed > _MAX_SYMLINKS:
                return f"too many symlinks under {command}"
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            todo[:0] = [part for part in target.split("/") if part]
            continue
        current = candidate
    return None


def _untrusted_real_path(command: str, euid: int) -> str | None:
    """The same rules over C{command}'s real path, every ancestor included."""
    real = Path(os.path.realpath(command))
    for path in (*reversed(real.parents), real):
        problem = _untrusted(str(path), os.lstat(path), euid)
        if problem is not None:
            return problem
    return None


def validate_command(command: str, euid: int | None = None) -> str | None:
    """
    Check that C{command} is an absolute path to an executable regular
    file that only the daemon's user (C{euid}, default ``os.geteuid()``)
    or root can replace.

    @return: None when C{command} is acceptable, else the reason, naming
        the offending path.
    """
    if not os.path.isabs(command):
        return f"command must be an absolute path, got {command!r}"
    try:
        st = os.stat(command)
    except FileNotFoundError:
        return f"command {command} does not exist"
    except OSError as e:
        return f"command {command} cannot be examined: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"command {command} is not a regular file"
    if not os.access(command, os.X_OK):
        return f"command {command} is not executable"
    uid = os.geteuid() if euid is None else euid
    try:
        # The walk already ends on the real path; checking it on its own
        # as well keeps that rule independent of the walk's resolution.
        problem = _untrusted_chain(command, uid) or _untrusted_real_path(command, uid)
    except OSError as e:
        return f"command {command} cannot be examined: {e.strerror}"
    if problem is not None:
        return f"command {command}: {problem}"
    return None


def _loader_variable(key: str) -> bool:
    return key.upper().startswith(LOADER_ENV_PREFIXES)


def spec_problem(spec: AgentSpec) -> str | None:
    """
    Why C{spec} must not be started now (re-checked at every spawn: the
    filesystem may have changed since the upsert), else None.
    """
    problem = validate_command(spec.command)
    if problem is not None:
        return problem
    loaders = sorted(k for k in spec.env if _loader_variable(k))
    if loaders:
        return f"env sets the loader variable {loaders[0]}"
    return None


def check_agent_id(agent_id: JsonValue, field: str = "id") -> str:
    """An agent id: a filename-safe string (it names files and directories)."""
    if type(agent_id) is not str or not _ID.match(agent_id) or agent_id in (".", ".."):
        raise InvalidParams(field, "must be filename-safe: letters, digits, '-', '_' and '.'; at most 64")
    return agent_id


def _string(raw: Mapping[str, JsonValue], key: str, max_len: int, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise InvalidParams(key, "required")
        return None
    if type(value) is not str or not value or len(value) > max_len:
        raise InvalidParams(key, f"expected a non-empty string of at most {max_len} characters")
    return value


def _strings(raw: Mapping[str, JsonValue], key: str, max_items: int) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        return ()
    if type(value) is not list or len(value) > max_items:
        raise InvalidParams(key, f"expected an array of at most {max_items} strings")
    for i, item in enumerate(value):
        if type(item) is not str or len(item) > 4096 or "\0" in item:
            raise InvalidParams(f"{key}[{i}]", "expected a string of at most 4096 characters")
    return tuple(cast("list[str]", value))  # every item checked above


def parse_agent_spec(raw: JsonValue, environ: Mapping[str, str]) -> AgentSpec:
    """
    Validate an ``agents.upsert`` spec; resolve ``interpreter``.

    @raise InvalidParams: naming the field.
    """
    if type(raw) is not dict:
        raise InvalidParams("params", "expected an agent spec object")
    if raw.get("id") is None:
        raise InvalidParams("id", "required")
    agent_id = check_agent_id(raw["id"])
    interpreter = _string(raw, "interpreter", 256)
    command = _string(raw, "command", 4096)
    if interpreter is not None:
        if "/" in interpreter:
            raise InvalidParams("interpreter", "a bare program name, resolved against PATH")
        if command is not None:
            raise InvalidParams("command", "give either command or interpreter, not both")
        resolved = shutil.which(interpreter, path=environ.get("PATH", os.defpath))
        if resolved is None:
            raise InvalidParams("interpreter", f"{interpreter!r} is not on PATH")
        command = os.path.abspath(resolved)
        field = "interpreter"
    else:
        field = "command"
    if command is None:
        raise InvalidParams("command", "required (or interpreter)")
    problem = validate_command(command)
    if problem is not None:
        raise InvalidParams(field, problem)
    cwd = _string(raw, "cwd", 4096)
    if cwd is not None and (not os.path.isabs(cwd) or not os.path.isdir(cwd)):
        raise InvalidParams("cwd", "must be an existing absolute directory")
    env = raw.get("env") or {}
    if type(env) is not dict or len(env) > 256:
        raise InvalidParams("env", "expected an object of at most 256 string values")
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or type(value) is not str or "\0" in value or len(value) > 65536:
            raise InvalidParams(f"env.{key}", "expected a string value")
        if key in _RESERVED_ENV:
            raise InvalidParams(f"env.{key}", "set by the supervisor; cannot be overridden")
        if _loader_variable(key):
            raise InvalidParams(
                f"env.{key}", "loader variables (LD_*, DYLD_*, PYTHON*) cannot be set for an agent"
            )
    restart = raw.get("restart", "on_failure")
    if restart not in RESTART_POLICIES:
        raise InvalidParams("restart", "expected one of " + ", ".join(RESTART_POLICIES))
    max_restarts = raw.get("max_restarts", 5)
    if max_restarts is not None and (type(max_restarts) is not int or not 0 <= max_restarts <= 10_000):
        raise InvalidParams("max_restarts", "expected an integer from 0 to 10000, or null for no limit")
    backoff = raw.get("backoff_secs", 1.0)
    if (type(backoff) is not int and type(backoff) is not float) or not 0.1 <= backoff <= 3600:
        raise InvalidParams("backoff_secs", "expected a number of seconds from 0.1 to 3600")
    auto_start = raw.get("auto_start", False)
    if type(auto_start) is not bool:
        raise InvalidParams("auto_start", "expected a boolean")
    return AgentSpec(
        id=agent_id,
        name=_string(raw, "name", 256) or agent_id,
        command=command,
        args=_strings(raw, "args", 256),
        cwd=cwd,
        env=dict(cast("dict[str, str]", env)),  # every value checked above
        restart=restart,
        max_restarts=max_restarts,
        backoff_secs=float(backoff),
        auto_start=auto_start,
        interpreter=interpreter,
        capabilities=_strings(raw, "capabilities", 64),
    )


def load_manifest(path: Path) -> list[ManifestEntry]:
    """
    Read ``agents.json``.  A missing file is an empty manifest.
    @raise ValueError: the file exists but cannot be read as a manifest.
    """
    try:
        data = json.loads(read_private(path))
    except FileNotFoundError:
        return []
    entries = []
    for item in data.get("agents", []):
        token = item.pop("token")
        spec = AgentSpec(
            id=item["id"],
            name=item.get("name") or item["id"],
            command=item["command"],
            args=tuple(item.get("args") or ()),
            cwd=item.get("cwd"),
            env=dict(item.get("env") or {}),
            restart=item.get("restart", "on_failure"),
            max_restarts=item.get("max_restarts", 5),
            backoff_secs=float(item.get("backoff_secs", 1.0)),
            auto_start=bool(item.get("auto_start", False)),
            interpreter=item.get("interpreter"),
            capabilities=tuple(item.get("capabilities") or ()),
        )
        entries.append(ManifestEntry(spec, token))
    return entries


def save_manifest(path: Path, entries: list[ManifestEntry]) -> None:
    """Atomically replace ``agents.json`` (temp + fsync + rename, 0600)."""
    from car_twisted.auth import write_secret_file

    body = {"version": 1, "agents": [{**e.spec.to_wire(), "token": e.token} for e in entries]}
    write_secret_file(path, json.dumps(body, indent=2, sort_keys=True))


def store_installed(home: Path, agent_id: str, manifest: Mapping[str, JsonValue]) -> Path:
    """
    Write an installed agent's manifest to
    ``<home>/agents/<id>/manifest.json`` (atomic, 0600).
    """
    from car_twisted.auth import write_secret_file

    check_agent_id(agent_id, "agent.id")
    path = home / "agents" / agent_id / "manifest.json"
    write_secret_file(path, json.dumps(manifest, indent=2, sort_keys=True))
    return path
