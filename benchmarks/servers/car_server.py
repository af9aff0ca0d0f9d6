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
measure it; the directory is then left in place.  ``--host-token TOKEN``
pins the host token (``ServerStateConfig(host_token=...)``; the daemon
mints one per launch otherwise), so load connections can authenticate as
the host role (``session.auth {host_token}``) and read any agent's runs
(``runs.subscribe``); it also adds ``bench.sub_stats``, which reports how
run-trace subscriptions fared (see ``SubStats``).  ``--tcp-nodelay`` is a
what-if, not the daemon's behaviour: it sets ``TCP_NODELAY`` on every
accepted socket (the daemon leaves Nagle on), by wrapping Twisted's
``tcp.Server``.

``--limit NAME=VALUE`` (repeatable) sets one of the daemon's bounds, as
``twist car --limit`` does (``car_twisted.config.LIMITS``: the
``connections`` scenario raises ``max_connections``).  ``--tracemalloc
DIR`` is a diagnostic: it starts ``tracemalloc`` (one frame per trace) once
the daemon is set up, and on every SIGUSR1 runs a full collection, then
writes a snapshot to ``DIR/snapshot-<n>.pickle`` and the count of
gc-tracked objects per type to ``DIR/types-<n>.json`` (each file written
under a temporary name and renamed, so a reader never sees half of one).

Prints ``LISTENING <port>`` on stdout once bound (``--port 0`` picks a
free port).  SIGINT/SIGTERM stop the reactor cleanly, so the script can be
run under ``python -m cProfile -o out.prof``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import tracemalloc
from pathlib import Path

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
from car_twisted.config import parse_limit
from car_twisted.interfaces import IAgentIdentities
from car_twisted.runs.registry import SUBSCRIBER_BACKLOG_BYTES
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


class SubStats:
    """
    Counts, per run-trace subscription, whether its reader kept up: the
    daemon queues at most ``SUBSCRIBER_BACKLOG_BYTES`` of events for a connection whose
    output is backed up (Twisted's write buffer for it over its limit, the
    producer paused: ``session.channel.paused``) and drops the rest.  Taken when a
    subscribed connection closes (a wrapper around
    ``RunRegistry.session_closed``, one call per closed connection, off the
    record path) and, for the live ones, when ``bench.sub_stats`` is called.
    ``stuck``: the connection's output was still backed up when it closed
    (its socket buffers full: the load generator closes a run's subscribers
    only after the run has ended, so a reader would have caught up).
    ``busy``: subscriptions to runs that got at least ``BUSY_RUN_TURNS``
    turns (the load generator's spare runs and the runs cut short by the
    end of a measurement get fewer).
    """

    def __init__(self, state) -> None:
        self.state = state
        self.reset()
        registry = state.runs
        original = registry.session_closed

        def session_closed(session):
            self.closed_sessions += 1
            self._add(self.closed, session)
            original(session)

        registry.session_closed = session_closed  # the on_close hooks look it up per call

    def reset(self) -> None:
        self.closed_sessions = 0
        self.closed = self._zero()

    @staticmethod
    def _zero() -> dict:
        return {"subscriptions": 0, "dropping": 0, "events_dropped": 0, "stuck": 0,
                "busy": 0, "busy_dropping": 0, "busy_stuck": 0}

    def _add(self, acc: dict, session) -> None:
        for subs in self.state.runs.subscriptions._by_run.values():
            sub = subs.get(session.client_id)
            if sub is None or sub.session is not session:
                continue
            meta = self.state.runs.runs.get(sub.run_id)
            busy = meta is not None and meta.turn_count >= BUSY_RUN_TURNS
            acc["subscriptions"] += 1
            acc["dropping"] += sub.dropped > 0
            acc["events_dropped"] += sub.dropped
            acc["busy"] += busy
            acc["busy_dropping"] += busy and sub.dropped > 0
            # Output still backed up when the connection closes, although
            # the load generator closes it only after the run has ended (no
            # more events): the kernel buffers are full, nothing moves.
            stuck = bool(session.channel.paused)
            acc["stuck"] += stuck
            acc["busy_stuck"] += busy and stuck

    def snapshot(self, session, params) -> dict:
        live = self._zero()
        seen = set()
        for subs in self.state.runs.subscriptions._by_run.values():
            for sub in subs.values():
                if id(sub.session) not in seen:
                    seen.add(id(sub.session))
                    self._add(live, sub.session)
        out = {"closed_sessions": self.closed_sessions, "closed": self.closed, "live": live,
               "subscriber_backlog_bytes": SUBSCRIBER_BACKLOG_BYTES, "busy_run_turns": BUSY_RUN_TURNS}
        if isinstance(params, dict) and params.get("reset"):
            self.reset()
        return out


BUSY_RUN_TURNS = 1500


def force_tcp_nodelay() -> None:
    """What-if: Nagle off on every accepted connection."""
    init = tcp.Server.__init__

    def __init__(self, sock, *args, **kwargs):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        init(self, sock, *args, **kwargs)

    tcp.Server.__init__ = __init__


def install_heap_snapshots(directory: Path) -> None:
    """
    Diagnostic: trace allocations from now on; each SIGUSR1 writes a
    tracemalloc snapshot and a count of live objects per type to
    C{directory} (numbered from 0).  The handler runs on the reactor
    thread between two bytecodes, so the heap it sees is consistent.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(1)
    taken = [0]

    def dump(signum, frame) -> None:
        n = taken[0]
        taken[0] += 1
        gc.collect()
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        snapshot = tracemalloc.take_snapshot()
        for name, write in ((f"types-{n}.json", lambda p: p.write_text(json.dumps(types))),
                            (f"snapshot-{n}.pickle", lambda p: snapshot.dump(str(p)))):
            tmp = directory / (name + ".tmp")
            write(tmp)
            os.replace(tmp, directory / name)
        print(f"heap snapshot {n} written to {directory}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR1, dump)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", required=True)
    parser.add_argument("--agent-token", default=None,
                        help="accept agent ids bench-<n> with this token (runs scenario)")
    parser.add_argument("--host-token", default=None,
                        help="pin the host token (runs scenario: stalled host subscribers); "
                             "also adds bench.sub_stats")
    parser.add_argument("--car-home", default=None,
                        help="CAR_HOME to use (kept); default a temp dir removed on exit")
    parser.add_argument("--tcp-nodelay", action="store_true",
                        help="what-if: set TCP_NODELAY on accepted sockets (the daemon does not)")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                        help="one of the daemon's bounds, as twist car --limit (repeatable)")
    parser.add_argument("--tracemalloc", type=Path, default=None, metavar="DIR",
                        help="diagnostic: trace allocations; SIGUSR1 writes a snapshot to DIR")
    args = parser.parse_args()
    limits = dict(parse_limit(spec) for spec in args.limit)
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
            host_token=args.host_token,
            **limits,
        ).with_methods(MethodSpec("bench.echo", echo))
        stats: list[SubStats] = []
        if args.host_token:
            config = config.with_methods(
                MethodSpec("bench.sub_stats", lambda session, params: stats[0].snapshot(session, params)))
        if args.agent_token:
            config = config.with_agent_identities(BenchAgents(args.agent_token))
        state = ServerState(config, reactor)
        if args.host_token:
            stats.append(SubStats(state))
        svc = make_car_service(state, reactor, [f"tcp:{args.port}:interface=127.0.0.1"])
        svc.startService()
        freeze_startup_heap()  # as `twist car` does once it is listening
        if args.tracemalloc is not None:
            install_heap_snapshots(args.tracemalloc)
        port = svc.tcp_port()
        print(f"LISTENING {port}", flush=True)
        reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
        reactor.run()  # installs SIGINT/SIGTERM handlers that stop the reactor
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    main()
