"""
The car-twisted daemon for the benchmark, built with the public embedding
API: a ``ServerState`` with one extra method, ``bench.echo`` (answers its
params), served on a loopback TCP port by ``make_car_service``.

Auth stays on (the default), so every load connection goes through
``session.auth`` and ``server.handshake`` first, like a real client.

Prints ``LISTENING <port>`` on stdout once bound (``--port 0`` picks a
free port).  SIGINT/SIGTERM stop the reactor cleanly, so the script can be
run under ``python -m cProfile -o out.prof``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile

from twisted.internet import reactor
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from car_twisted import CarPaths, MethodSpec, ServerState, ServerStateConfig, make_car_service
from car_twisted.service import freeze_startup_heap


def echo(session, params):
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()

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

    tmpdir = tempfile.mkdtemp(prefix="car-bench-")
    try:
        config = ServerStateConfig(
            paths=CarPaths.resolve({"CAR_HOME": tmpdir}),
            auth_token=args.token,
        ).with_methods(MethodSpec("bench.echo", echo))
        state = ServerState(config, reactor)
        svc = make_car_service(state, reactor, [f"tcp:{args.port}:interface=127.0.0.1"])
        svc.startService()
        freeze_startup_heap()  # as `twist car` does once it is listening
        port = next(iter(svc)).port.getHost().port
        print(f"LISTENING {port}", flush=True)
        reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
        reactor.run()  # installs SIGINT/SIGTERM handlers that stop the reactor
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    main()
