"""
The proposal path without sockets: the daemon's own CPU per one-action
``proposal.submit`` (its ``tools.execute`` callback answered at once) next
to two ``bench.echo`` calls, through the real ``Dispatcher`` on an
in-memory sink.  WebSocket framing is not in either figure (the wire
benchmark, ``run.py --scenario callback``, has it); this isolates what the
proposal machinery costs over the plain request path.

    /work/venv/bin/python benchmarks/proposal_micro.py [--n 20000] [--rounds 5] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import statistics
import sys
import tempfile
import time
from collections import deque

import orjson
from twisted.internet.task import Clock
from zope.interface import implementer

from car_twisted.config import ServerStateConfig
from car_twisted.interfaces import IWsSink
from car_twisted.paths import CarPaths
from car_twisted.rpc.dispatch import Dispatcher
from car_twisted.rpc.registry import MethodSpec
from car_twisted.state import ServerState

TOKEN = "micro-bench-token-0123456789abcdef"


@implementer(IWsSink)
class LoopbackSink:
    """Keeps what the daemon sends; the client loop answers callbacks from it."""

    writable = True

    def __init__(self) -> None:
        self.out: deque[bytes] = deque()

    def send_text(self, payload: bytes) -> bool:
        self.out.append(payload)
        return True

    def send_binary(self, payload: bytes) -> bool:
        return True

    def close(self, code: int, reason: str) -> None:
        self.writable = False


class Client:
    def __init__(self, state: ServerState) -> None:
        self.sink = LoopbackSink()
        self.session = state.open_session(self.sink)
        self.dispatcher = Dispatcher(state)
        self.rid = 0
        self.call(b'{"jsonrpc":"2.0","id":0,"method":"session.auth","params":{"token":"%s"}}' % TOKEN.encode())
        self.call(b'{"jsonrpc":"2.0","id":0,"method":"server.handshake","params":{"protocol_version":3}}')
        self.call(b'{"jsonrpc":"2.0","id":0,"method":"tools.register","params":[{"name":"echo"}]}')

    def call(self, frame: bytes) -> None:
        """Send C{frame}; answer every tools.execute at once; return at the reply."""
        self.dispatcher.dispatch_text(self.session, frame)
        out = self.sink.out
        while out:
            msg = orjson.loads(out.popleft())
            if msg.get("method") == "tools.execute":
                answer = {"jsonrpc": "2.0", "id": msg["id"], "result": msg["params"]["parameters"]}
                self.dispatcher.dispatch_text(self.session, orjson.dumps(answer))
            elif "error" in msg:
                raise AssertionError(msg)
            else:
                results = msg["result"].get("results") if isinstance(msg.get("result"), dict) else None
                if results and results[0]["status"] != "succeeded":
                    raise AssertionError(msg)


PROPOSAL = (
    b'{"jsonrpc":"2.0","id":%d,"method":"proposal.submit","params":{"proposal":{"id":"p%d","actions":'
    b'[{"id":"a","type":"tool_call","tool":"echo","parameters":{"x":1}}]}}}'
)
ECHO = b'{"jsonrpc":"2.0","id":%d,"method":"bench.echo","params":{}}'


def measure(client: Client, kind: str, n: int) -> float:
    """CPU seconds per operation."""
    call = client.call
    gc.collect()
    start = time.process_time()
    if kind == "proposal":
        for i in range(n):
            call(PROPOSAL % (i, i))
    else:
        for i in range(n):
            call(ECHO % (2 * i))
            call(ECHO % (2 * i + 1))
    return (time.process_time() - start) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", default=None, help="cProfile the proposal loop into this file")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="car-micro-")
    config = ServerStateConfig(paths=CarPaths.resolve({"CAR_HOME": home}), auth_token=TOKEN).with_methods(
        MethodSpec("bench.echo", lambda session, params: params)
    )
    state = ServerState(config, Clock())
    client = Client(state)
    measure(client, "proposal", 2000)
    measure(client, "echo2", 2000)
    gc.freeze()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        measure(client, "proposal", args.n)
        profiler.disable()
        profiler.dump_stats(args.profile)
        import pstats

        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
        return 0
    proposal, echo2 = [], []
    for _ in range(args.rounds):
        proposal.append(measure(client, "proposal", args.n) * 1e6)
        echo2.append(measure(client, "echo2", args.n) * 1e6)
    ratios = [p / e for p, e in zip(proposal, echo2, strict=True)]
    med = statistics.median
    print(f"proposal (1 tool_call + its callback): {med(proposal):.1f} us CPU (min {min(proposal):.1f}, max {max(proposal):.1f})")
    print(f"2 echoes (sequential):                 {med(echo2):.1f} us CPU (min {min(echo2):.1f}, max {max(echo2):.1f})")
    print(f"proposal / 2 echoes:                   {med(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"{args.rounds} rounds of {args.n}; in process, no sockets; Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
