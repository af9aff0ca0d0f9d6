"""
The state root (``CAR_HOME``) and every path the daemon derives from it.

Paths follow what the ``car-runtime`` client reads: with ``CAR_HOME`` set
the token directory is ``$CAR_HOME/ai.parslee.car`` and the socket
``$CAR_HOME/run/car-server.sock``; without it the token lives under
``$XDG_RUNTIME_DIR/ai.parslee.car`` (else ``~/.config/ai.parslee.car``)
and the socket under ``$XDG_RUNTIME_DIR/ai.parslee.car`` (else
``~/.car/run``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import attrs

__all__ = ["CarPaths", "ConfigError", "TOKEN_DIR_NAME"]

TOKEN_DIR_NAME = "ai.parslee.car"
SOCKET_NAME = "car-server.sock"


class ConfigError(ValueError):
    """A configuration value the daemon refuses to start with (exit 2)."""


@attrs.frozen
class CarPaths:
    home: Path
    token_dir: Path
    socket_dir: Path

    @classmethod
    def resolve(
        cls, environ: Mapping[str, str], car_home: str | None = None
    ) -> CarPaths:
        """
        Derive the paths from C{car_home} (the option) or C{CAR_HOME}.

        @raise ConfigError: the state root is not absolute.
        """
        raw = car_home if car_home is not None else environ.get("CAR_HOME")
        user_home = Path(environ.get("HOME") or os.path.expanduser("~"))
        if raw:
            if not os.path.isabs(raw):
                raise ConfigError(
                    f"CAR_HOME must be an absolute path, got {raw!r}"
                )
            home = Path(raw)
            return cls(
                home=home,
                token_dir=home / TOKEN_DIR_NAME,
                socket_dir=home / "run",
            )
        home = user_home / ".car"
        xdg = environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isabs(xdg):
            token_dir = Path(xdg) / TOKEN_DIR_NAME
            socket_dir = token_dir
        else:
            token_dir = user_home / ".config" / TOKEN_DIR_NAME
            socket_dir = home / "run"
        return cls(home=home, token_dir=token_dir, socket_dir=socket_dir)

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def lock_file(self) -> Path:
        return self.run_dir / "daemon.lock"

    @property
    def auth_token_file(self) -> Path:
        return self.token_dir / "auth-token"

    @property
    def host_token_file(self) -> Path:
        return self.token_dir / "host-token"

    @property
    def dashboard_code_file(self) -> Path:
        """The dashboard's current one-time login code (primary daemon only)."""
        return self.token_dir / "dashboard-code"

    @property
    def shared_socket(self) -> Path:
        return self.socket_dir / SOCKET_NAME

    def secondary_socket(self, port: int) -> Path:
        return self.socket_dir / f"car-server-{port}.sock"
