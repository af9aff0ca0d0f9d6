"""
``twist car``: command-line options and ``makeService``.

A thin layer over the public API: options and environment become a
``ServerStateConfig``, and ``service.make_daemon_service`` does the rest.
"""

from __future__ import annotations

import os
import sys

from twisted.internet.interfaces import IReactorTime
from twisted.python import usage

from car_twisted._reactor import maybe_global_reactor
from car_twisted.config import parse_limit
from car_twisted.daemon import DEFAULT_TCP_PORT, EXIT_CONFIG, CarDaemonService, make_daemon_service
from car_twisted.paths import ConfigError
from car_twisted.state import ServerState

__all__ = ["Options", "makeService", "EXIT_CONFIG"]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the CAR agent daemon: JSON-RPC 2.0 over WebSocket on TCP "
        "127.0.0.1:9100 and a 0600 UNIX socket, auth on, state under CAR_HOME."
    )
    optFlags = [
        ["no-auth", None, "Disable the token gate (also CAR_NO_AUTH=1). Trusted single-user machines only."],
        ["no-approvals", None, "Disable the approval gate for high-risk calls (also CAR_NO_APPROVALS=1)."],
    ]
    optParameters = [
        ["auth-token", None, None, "Pin the daemon token instead of minting one (also CAR_AUTH_TOKEN)."],
        ["car-home", None, None, "State root, an absolute path (also CAR_HOME; default ~/.car)."],
        ["allow-origin", None, None, "Extra browser Origin pattern allowed to upgrade (repeatable)."],
        ["port", None, DEFAULT_TCP_PORT, "TCP port of the default loopback listener.", int],
        [
            "http",
            None,
            None,
            "Endpoint of the dashboard, /health and /metrics (default: tcp:PORT+1 on 127.0.0.1 "
            "beside the default listeners; 'none': off).",
        ],
        ["idle-timeout", None, None, "Seconds a bare connection may stay silent before it is closed (0: never; default 300).", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["allow-origin"] = []
        self["limit"] = []

    def opt_listen(self, description: str) -> None:
        """A Twisted server endpoint string to listen on (repeatable; replaces the defaults; UNIX sockets default to mode=600)."""
        self["listen"].append(description)

    def opt_limit(self, spec: str) -> None:
        """Set one bound, NAME=VALUE (repeatable; see docs/security.md for the names and defaults)."""
        self["limit"].append(spec)

    def opt_allow_origin(self, pattern: str) -> None:
        """An extra browser Origin pattern (fnmatch) allowed to connect (repeatable)."""
        self["allow-origin"].append(pattern)

    def postOptions(self) -> None:
        environ = dict(os.environ)
        try:
            self.config_kwargs = dict(
                car_home=self["car-home"],
                no_auth=bool(self["no-auth"]),
                no_approvals=bool(self["no-approvals"]),
                auth_token=self["auth-token"],
            )
            if self["allow-origin"]:
                self.config_kwargs["allowed_origins"] = tuple(self["allow-origin"])
            for spec in self["limit"]:
                name, value = parse_limit(spec)
                self.config_kwargs[name] = value
            if self["idle-timeout"] is not None:
                if not self["idle-timeout"] >= 0:
                    raise ConfigError(f"--idle-timeout must be 0 or more seconds, got {self['idle-timeout']!r}")
                self.config_kwargs["idle_timeout"] = self["idle-timeout"]
            # Validate now so a bad value stops before anything binds.
            from car_twisted.config import ServerStateConfig

            ServerStateConfig.from_environ(environ, **self.config_kwargs)
        except ConfigError as e:
            sys.stderr.write(f"twist car: {e}\n")
            raise SystemExit(EXIT_CONFIG) from None


def makeService(options: Options, reactor: IReactorTime | None = None) -> CarDaemonService:
    reactor = maybe_global_reactor(reactor)
    state = ServerState.standalone(reactor, **getattr(options, "config_kwargs", {}))
    return make_daemon_service(
        state,
        reactor,
        options["listen"] or None,
        port=options["port"],
        exit_on_failure=True,
        http=options["http"],
    )
