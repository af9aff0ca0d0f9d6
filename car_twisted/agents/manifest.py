"""
The agents manifest: ``AgentSpec`` validation and ``$CAR_HOME/agents.json``.

A spec's ``command`` must be an absolute path to an existing executable
file that does not live under a world-writable directory (``/tmp`` and
friends: anyone could swap the binary).  ``interpreter`` is resolved once
against ``PATH`` at upsert and frozen into ``command``.  The manifest is
written atomically (temp file + rename), mode 0600, and holds each agent's
token, which no method returns and no log line shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Mapping

import attrs

from car_twisted.errors import InvalidParams

__all__ = [
    "AgentSpec",
    "ManifestEntry",
    "parse_agent_spec",
    "validate_command",
    "load_manifest",
    "save_manifest",
    "RESTART_POLICIES",
    "MAX_AGENTS",
]

RESTART_POLICIES = ("never", "on_failure", "always")
MAX_AGENTS = 256
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_RESERVED_ENV = ("CAR_AGENT_ID", "CAR_AGENT_TOKEN", "CAR_DAEMON_URL", "CAR_AUTH_TOKEN")


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

    def to_wire(self) -> dict[str, Any]:
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


def _scratch_ancestor(path: Path) -> Path | None:
    """The first world-writable directory above C{path}, if any."""
    for parent in path.parents:
        try:
            mode = os.stat(parent).st_mode
        except OSError:
            continue
        if mode & stat.S_IWOTH:
            return parent
    return None


def validate_command(command: str) -> str | None:
    """
    @return: None when C{command} is acceptable, else the reason.
    """
    if not os.path.isabs(command):
        return f"command must be an absolute path, got {command!r}"
    path = Path(command)
    if not path.exists():
        return f"command {command} does not exist"
    if not path.is_file():
        return f"command {command} is not a regular file"
    if not os.access(path, os.X_OK):
        return f"command {command} is not executable"
    for candidate in (path, Path(os.path.realpath(path))):
        scratch = _scratch_ancestor(candidate)
        if scratch is not None:
            return f"command {candidate} lives under the world-writable directory {scratch}"
    return None


def _string(raw: Mapping[str, Any], key: str, max_len: int, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise InvalidParams(key, "required")
        return None
    if type(value) is not str or not value or len(value) > max_len:
        raise InvalidParams(key, f"expected a non-empty string of at most {max_len} characters")
    return value


def _strings(raw: Mapping[str, Any], key: str, max_items: int) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        return ()
    if type(value) is not list or len(value) > max_items:
        raise InvalidParams(key, f"expected an array of at most {max_items} strings")
    for i, item in enumerate(value):
        if type(item) is not str or len(item) > 4096 or "\0" in item:
            raise InvalidParams(f"{key}[{i}]", "expected a string of at most 4096 characters")
    return tuple(value)


def parse_agent_spec(raw: Any, environ: Mapping[str, str]) -> AgentSpec:
    """
    Validate an ``agents.upsert`` spec; resolve ``interpreter``.

    @raise InvalidParams: naming the field.
    """
    if type(raw) is not dict:
        raise InvalidParams("params", "expected an agent spec object")
    agent_id = _string(raw, "id", 64, required=True)
    assert agent_id is not None
    if not _ID.match(agent_id) or agent_id in (".", ".."):
        raise InvalidParams("id", "must be filename-safe: letters, digits, '-', '_' and '.'")
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
    restart = raw.get("restart", "on_failure")
    if restart not in RESTART_POLICIES:
        raise InvalidParams("restart", "expected one of " + ", ".join(RESTART_POLICIES))
    max_restarts = raw.get("max_restarts", 5)
    if max_restarts is not None and (type(max_restarts) is not int or not 0 <= max_restarts <= 10_000):
        raise InvalidParams("max_restarts", "expected an integer from 0 to 10000, or null for no limit")
    backoff = raw.get("backoff_secs", 1.0)
    if type(backoff) not in (int, float) or not 0.1 <= backoff <= 3600:
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
        env=dict(env),
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
        data = json.loads(path.read_bytes())
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
