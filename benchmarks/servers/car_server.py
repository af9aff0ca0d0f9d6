"""
The car-twisted daemon for the benchmark, built with the public embedding
API: a ``ServerState`` with one extra method, ``bench.echo`` (answers its
params), served on a loopback TCP port by ``make_car_service``.

Auth stays on (the default), so every load connection goes through
``session.auth`` and ``server.handshake`` first, like a real client.

``--agent-token TOKEN`` (the ``runs`` scenario) also installs a bench
agent-identity provider: any agent id ``bench-<n>`` binds with that token
(``session.auth {agent_id, token}``), so load connections can own runs
without supervised agent processes.  Without it the daemon keeps its
default identities (the supervisor, no agents), as before.  ``--car-home
DIR`` puts ``CAR_HOME`` (run files under ``DIR/runs``) where the runner can
measure it; the directory is then left in place.  ``--tcp-nodelay`` is a
what-if, not the daemon's behaviour: it sets ``TCP_NODELAY`` on every
accepted socket (the daemon leaves Nagle on), by wrapping Twisted's
``tcp.Server``.

Prints ``LISTENING <port>`` on stdout once bound (``--port 0`` picks a
free port).  SIGINT/SIGTERM stop the reactor cleanly, so the script can be
run under ``python -m cProfile -o out.prof``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile

from twisted.internet import reactor, tcp
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from zope.interface import implementer

from car_twisted import CarPaths, MethodSpec, ServerState, ServerStateConfig, make_car_service
from car_twisted.auth import tokens_equal
from car_twisted.interfaces import IAgentIdentities
from car_twisted.service import freeze_startup_heap


def echo(session, params):
    return params


@implementer(IAgentIdentities)
class BenchAgents:
    """Agent ids ``bench-<n>``, all with one token; one live connection each."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.attached: dict[str, object] = {}

    def verify(self, agent_id: str, token: str) -> bool:
        ok = tokens_equal(token, self.token)  # constant time, whatever the id
        prefix, _, n = agent_id.partition("-")
        return ok and prefix == "bench" and n.isdigit()

    def attach(self, agent_id: str, session) -> None:
        # Lenient, unlike the supervisor: the newest connection wins, so a
        # load run starting while the previous one's sockets are still being
        # torn down on this side never fails its set-up.
        self.attached[agent_id] = session

    def detach(self, agent_id: str, session) -> None:
        if self.attached.get(agent_id) is session:
            del self.attached[agent_id]


def force_tcp_nodelay() -> None:
    """What-if: Nagle off on every accepted connection."""
    init = tcp.Server.__init__

    def __init__(self, sock, *args, **kwargs):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        init(self, sock, *args, **kwargs)

    tcp.Server.__init__ = __init__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", required=True)
    parser.add_argument("--agent-token", default=None,
                        help="accept agent ids bench-<n> with this token (runs scenario)")
    parser.add_argument("--car-home", default=None,
                        help="CAR_HOME to use (kept); default a temp dir removed on exit")
    parser.add_argument("--tcp-nodelay", action="store_true",
                        help="what-if: set TCP_NODELAY on accepted sockets (the daemon does not)")
    args = parser.parse_args()
    if args.tcp_nodelay:
        force_tcp_nodelay()

    # Warnings and errors only, to stderr: the hot path logs nothing.
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )

    tmpdir = None if args.car_home else tempfile.mkdtemp(prefix="car-bench-")
    try:
        config = ServerStateConfig(
            paths=CarPaths.resolve({"CAR_HOME": args.car_home or tmpdir}),
            auth_token=args.token,
        ).with_methods(MethodSpec("bench.echo", echo))
        if args.agent_token:
            config = config.with_agent_identities(BenchAgents(args.agent_token))
        state = ServerState(config, reactor)
        svc = make_car_service(state, reactor, [f"tcp:{args.port}:interface=127.0.0.1"])
        svc.startService()
        freeze_startup_heap()  # as `twist car` does once it is listening
        port = next(iter(svc)).port.getHost().port
        print(f"LISTENING {port}", flush=True)
        reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
        reactor.run()  # installs SIGINT/SIGTERM handlers that stop the reactor
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    main()
