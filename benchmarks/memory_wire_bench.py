#!/usr/bin/env python3
"""
Memory over the wire (on demand): ``memory.*`` through the real daemon
(``twist car``) over a real loopback WebSocket, at 1k, 10k and 100k facts.

``memory_bench.py`` measures the engine alone; this measures what a client
gets and what the daemon pays: the WebSocket framing, the JSON-RPC
envelope, parameter checks, dispatch and the graph's background
write-back on top of the engine.  The facts and queries come from
``memory_bench.Vocabulary`` (same generator, same seed).

    python benchmarks/memory_wire_bench.py                  # 1k, 10k, 100k
    python benchmarks/memory_wire_bench.py --sizes 1000,10000 --queries 100 --window 64 --json out.json
    python benchmarks/memory_wire_bench.py --profile /tmp/daemon.prof   # the daemon under cProfile

One daemon subprocess (``twist car``, fresh temporary ``CAR_HOME``, a
free loopback TCP port, auth on) and one client connection
(``websockets``, asyncio, compression off) that authenticates with the
daemon's token (``session.auth {token}``).  The connection is unbound, so
every call acts on the daemon's shared graph.  Then, per size:

- **grow**: ``memory.add_fact {subject, body, kind: "knowledge", tags?}``
  pipelined, ``--window`` requests in flight, until the graph holds that
  many facts.  Reported: adds per second (wall, first send to last
  reply), and the daemon's CPU per fact (utime + stime of the daemon
  process from ``/proc/<pid>/stat``, all threads, clock-tick resolution)
  twice: over the phase alone, and until the daemon is idle again after
  it (the graph's batched write-back, which the adds cause and which runs
  half a second after a change); also how many write-backs of the graph
  file happened (``WriteBacks``);
- **trivial**: ``memory.fact_count`` pipelined the same way
  (``--trivial`` requests): the daemon's CPU per request of a method that
  does next to nothing, i.e. the WebSocket + JSON-RPC cost, so
  add - fact_count is what storing a fact costs the daemon;
- **query**: ``memory.query {query, k: 10}``, ``--queries`` requests one at
  a time: round-trip latency p50 / p99 / max (client wall clock), the
  daemon's CPU per query, and per query the daemon's reactor thread's
  time on a CPU and waiting for one (``/proc/<pid>/schedstat``), which
  tells a slow daemon from a busy machine;
- **build_context**: ``memory.build_context {query}``, ``--contexts``
  requests one at a time: round-trip p50.

Before each phase the runner waits (at most ``--quiet-timeout`` s) until
the machine is quiet (``--quiet-pct``, as ``run.py`` does), and every
phase records the CPU the rest of the machine used meanwhile ("others'
CPU"; above ~20 % the figures are suspect).

Linux only (``/proc``).  Needs car-twisted and ``websockets`` (the
``bench`` extra) in the running interpreter; ``twist`` is looked up next
to it (``--twist`` to change).  The daemon's log is kept on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib.metadata
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
from memory_bench import Vocabulary, percentile
from run import system_busy_seconds, wait_until_quiet
from websockets.asyncio.client import ClientConnection, connect

HERE = Path(__file__).resolve().parent
TOKEN_DIR = "ai.parslee.car"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 120.0  # the daemon writes every changed graph before it exits
DEFAULT_FACT_LIMIT = 100_000  # the daemon's memory_fact_limit
SETTLE_AFTER = 0.6  # past the daemon's write-back delay (0.5 s)
SETTLE_QUIET = 0.3  # a sample this long with no daemon CPU tick: settled
SETTLE_MAX = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
_CAR_ENV = (
    "CAR_HOME",
    "CAR_AUTH_TOKEN",
    "CAR_NO_AUTH",
    "CAR_DAEMON_URL",
    "CAR_HANDLER_TIMEOUT",
    "CAR_AGENT_ID",
    "CAR_AGENT_TOKEN",
    "CAR_MEMORY_NAMESPACE",
)

# Run ``twist`` under cProfile.  ``twist`` ends a SIGTERM'd daemon by
# re-raising the signal once the reactor has stopped, which would kill the
# process before the stats are written: here it returns normally.  Clock
# "wall": cProfile's default (cheap); "thread": the reactor thread's CPU
# time (time in epoll or waiting for a CPU not counted, so usable on a busy
# machine, but each call costs a system call and small functions look far
# bigger).  Only the main thread is profiled either way.
PROFILE_WRAPPER = """\
import cProfile, sys, time
from twisted.application.twist import _twist
out, clock = sys.argv.pop(1), sys.argv.pop(1)
_twist._exitWithSignal = lambda sig: None
profile = cProfile.Profile(time.thread_time) if clock == "thread" else cProfile.Profile()
try:
    profile.runcall(_twist.Twist.main, sys.argv)
finally:
    profile.dump_stats(out)
"""


class BenchError(RuntimeError):
    pass


try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _LIBC = None


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGTERM if this runner dies."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- the daemon -------------------------------------------------------------------


class Daemon:
    """One ``twist car`` subprocess on a loopback TCP port, CAR_HOME in C{home}."""

    def __init__(
        self, twist: str, home: Path, log_path: Path, fact_limit: int | None, profile: Path | None, profile_clock: str = "wall"
    ) -> None:
        self.twist = twist
        self.home = home
        self.log_path = log_path
        self.fact_limit = fact_limit
        self.profile = profile
        self.profile_clock = profile_clock
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def token(self) -> str:
        return (self.home / TOKEN_DIR / "auth-token").read_text().strip()

    def argv(self) -> list[str]:
        argv = [self.twist, "--log-format=text", "car", "--car-home", str(self.home), "--listen", f"tcp:{self.port}:interface=127.0.0.1"]
        if self.fact_limit is not None:
            argv += ["--limit", f"memory_fact_limit={self.fact_limit}"]
        if self.profile is not None:
            # the twist script's own interpreter, so the same site-packages
            python = Path(self.twist).read_text().splitlines()[0].removeprefix("#!").strip() or sys.executable
            argv = [python, "-c", PROFILE_WRAPPER, str(self.profile), self.profile_clock, *argv[1:]]
        return argv

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _CAR_ENV}
        env["CAR_HOME"] = str(self.home)
        for _ in range(5):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
                )
            if self._wait_ready():
                return
            if self.proc.poll() is None:
                break
            # exited early: most likely lost the race for the port; another one
        raise BenchError(f"the daemon did not start{self.log_tail()}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        marker = self.home / TOKEN_DIR / "auth-token"  # written once the listeners are up
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if marker.exists() and port_open(self.port):
                return True
            time.sleep(0.05)
        return False

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon process (all its threads) so far."""
        assert self.proc is not None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError) as e:
            raise BenchError(f"cannot read the daemon's CPU time: {e}{self.log_tail()}") from None
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def schedstat(self) -> tuple[int, int]:
        """
        The daemon's main (reactor) thread: nanoseconds on a CPU and waiting
        for one (/proc/<pid>/schedstat), so a slow round trip tells the
        daemon computing from the daemon waiting for a CPU.
        """
        assert self.proc is not None
        try:
            run, wait, _ = Path(f"/proc/{self.proc.pid}/schedstat").read_text().split()
        except (OSError, ValueError):
            return 0, 0
        return int(run), int(wait)

    def rss_mib(self) -> float | None:
        assert self.proc is not None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            status = None if self.proc is None else self.proc.returncode
            raise BenchError(f"the daemon is not running (status {status}){self.log_tail()}")

    def settle(self) -> float:
        """
        Wait for the work the last requests left behind (the write-back
        half a second later) to end: until a sample of SETTLE_QUIET
        seconds shows no CPU tick.  @return: the daemon's CPU seconds then.
        """
        time.sleep(SETTLE_AFTER)
        deadline = time.monotonic() + SETTLE_MAX
        last = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(SETTLE_QUIET)
            now = self.cpu_seconds()
            if now == last:
                return now
            last = now
        return last

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f"\n--- {self.log_path} (last {lines} lines) ---\n" + "\n".join(text[-lines:]) if text else ""


# -- the client -------------------------------------------------------------------


class RpcClient:
    """JSON-RPC 2.0 over one WebSocket: round trips and pipelined streams."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 1

    def frame(self, method: str, params: Any = None) -> tuple[int, bytes]:
        rid = self.next_id
        self.next_id += 1
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        return rid, orjson.dumps(msg)

    @staticmethod
    def _result(raw: bytes | str, method: str) -> tuple[Any, Any]:
        reply = orjson.loads(raw)
        if not isinstance(reply, dict) or "id" not in reply:
            raise BenchError(f"{method}: unexpected frame {raw[:300]!r}")
        if "error" in reply:
            raise BenchError(f"{method}: error reply {orjson.dumps(reply['error'])[:500].decode()}")
        return reply["id"], reply.get("result")

    async def call(self, method: str, params: Any = None) -> Any:
        rid, data = self.frame(method, params)
        await self.ws.send(data, text=True)
        got, result = self._result(await self.ws.recv(decode=False), method)
        if got != rid:
            raise BenchError(f"{method}: reply to id {got}, expected {rid}")
        return result

    async def timed_calls(self, method: str, params: Iterable[Any], probe: Daemon | None = None) -> list[tuple[float, float, float]]:
        """
        One request at a time: (round trip, the daemon's reactor thread on
        CPU, its wait for a CPU) of each, seconds; the last two from
        C{probe}'s schedstat, read outside the round trip (0 without one).
        """
        out = []
        ws = self.ws
        for p in params:
            rid, data = self.frame(method, p)
            run0, wait0 = probe.schedstat() if probe is not None else (0, 0)
            t0 = time.perf_counter()
            await ws.send(data, text=True)
            raw = await ws.recv(decode=False)
            rtt = time.perf_counter() - t0
            run1, wait1 = probe.schedstat() if probe is not None else (0, 0)
            out.append((rtt, (run1 - run0) / 1e9, (wait1 - wait0) / 1e9))
            got, _ = self._result(raw, method)
            if got != rid:
                raise BenchError(f"{method}: reply to id {got}, expected {rid}")
        return out

    async def pipelined(self, method: str, frames: Sequence[tuple[int, bytes]], window: int) -> list[Any]:
        """Send C{frames}, C{window} in flight; the results, in request order."""
        ws = self.ws
        pending: dict[int, int] = {}  # id -> position
        results: list[Any] = [None] * len(frames)
        sent = 0
        for rid, data in frames[:window]:
            pending[rid] = sent
            sent += 1
            await ws.send(data, text=True)
        while pending:
            got, result = self._result(await ws.recv(decode=False), method)
            pos = pending.pop(got, None)
            if pos is None:
                raise BenchError(f"{method}: reply to unknown id {got}")
            results[pos] = result
            if sent < len(frames):
                rid, data = frames[sent]
                pending[rid] = sent
                sent += 1
                await ws.send(data, text=True)
        return results


# -- the measurement --------------------------------------------------------------


def _ms(values: list[float], p: float) -> float:
    return percentile(values, p) * 1e3


class Meter:
    """
    One phase: wall time, the daemon's CPU (utime + stime), and the CPU
    everything else on the machine used meanwhile (busy time from
    /proc/stat less the daemon and this client), in % of one CPU: a high
    figure means the phase shared the machine.
    """

    def __init__(self, daemon: Daemon, args: argparse.Namespace) -> None:
        self.daemon = daemon
        self.args = args
        self.quiet_waits: list[float] = []

    def start(self) -> None:
        if self.args.quiet_pct > 0:
            t = time.monotonic()
            busy = wait_until_quiet(self.args.quiet_pct, self.args.quiet_timeout)
            self.quiet_waits.append(time.monotonic() - t)
            if busy is not None and busy >= self.args.quiet_pct:
                print(f"note: the machine is still {busy:.0f} % busy; measuring anyway", file=sys.stderr)
        self.cpu0 = self.daemon.cpu_seconds()
        self.own0 = time.process_time()
        self.busy0 = system_busy_seconds()
        self.t0 = time.perf_counter()

    def stop(self) -> tuple[float, float, float | None]:
        """@return: wall seconds, daemon CPU seconds, others' CPU %."""
        wall = time.perf_counter() - self.t0
        cpu = self.daemon.cpu_seconds() - self.cpu0
        own = time.process_time() - self.own0
        busy = system_busy_seconds()
        other = None if busy is None or self.busy0 is None else max(0.0, 100.0 * (busy - self.busy0 - cpu - own) / wall)
        return wall, cpu, other


class WriteBacks(threading.Thread):
    """
    Counts the daemon's write-backs of the shared graph: each one replaces
    the file (temp file + rename), so a new inode or mtime is a new write.
    They are at least half a second apart; a 20 ms poll sees every one.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(name="write-backs", daemon=True)
        self.path = path
        self.count = 0
        self.bytes = 0
        self._done = threading.Event()

    def run(self) -> None:
        last = None
        while not self._done.wait(0.02):
            try:
                st = os.stat(self.path)
            except OSError:
                continue
            key = (st.st_ino, st.st_mtime_ns)
            if key != last:
                last = key
                self.count += 1
                self.bytes = st.st_size

    def stop(self) -> None:
        self._done.set()
        self.join(5)


async def measure(daemon: Daemon, meter: Meter, writes: WriteBacks, args: argparse.Namespace) -> list[dict[str, Any]]:
    vocab = Vocabulary(random.Random(args.seed))
    rows: list[dict[str, Any]] = []
    async with connect(daemon.url, compression=None, max_size=None, max_queue=None, ping_interval=None, open_timeout=10) as ws:
        rpc = RpcClient(ws)
        await rpc.call("session.auth", {"token": daemon.token})
        count = await rpc.call("memory.fact_count")  # loads the (empty) shared graph
        if count != 0:
            raise BenchError(f"a fresh daemon holds {count} facts")

        async def trivial() -> dict[str, float | None]:
            frames = [rpc.frame("memory.fact_count") for _ in range(args.trivial)]
            daemon.settle()
            meter.start()
            await rpc.pipelined("memory.fact_count", frames, args.window)
            wall, cpu, other = meter.stop()
            return {"trivial_rps": args.trivial / wall, "trivial_cpu_us": cpu / args.trivial * 1e6, "trivial_other_pct": other}

        base = await trivial()
        print(
            f"memory.fact_count on the empty graph: {base['trivial_rps']:,.0f}/s, daemon {base['trivial_cpu_us']:.1f} µs CPU/request",
            file=sys.stderr,
        )
        for size in args.sizes:
            row: dict[str, Any] = {"facts": size}
            # -- grow (adds never merge facts, so one pass; a second only if some did)
            n = 0
            wall = cpu_phase = cpu_settled = 0.0
            writes0 = writes.count
            others = []
            for _ in range(3):
                if count >= size:
                    break
                frames = []
                for subject, body, tags in (vocab.fact() for _ in range(size - count)):
                    params: dict[str, Any] = {"subject": subject, "body": body, "kind": "knowledge"}
                    if tags:
                        params["tags"] = tags
                    frames.append(rpc.frame("memory.add_fact", params))
                daemon.settle()
                meter.start()
                results = await rpc.pipelined("memory.add_fact", frames, args.window)
                w, c, other = meter.stop()
                wall += w
                cpu_phase += c
                cpu_settled += daemon.settle() - meter.cpu0
                others.append(other)
                n += len(frames)
                daemon.check_alive()
                if not all(isinstance(r, int) and not isinstance(r, bool) for r in results):
                    raise BenchError("memory.add_fact answered something else than a count")
                count = await rpc.call("memory.fact_count")
            if count != size:
                raise BenchError(f"the graph holds {count} facts after {n} adds, not {size}")
            row.update(
                adds=n,
                add_per_s=n / wall,
                add_wall_s=wall,
                add_cpu_s=cpu_phase,
                add_cpu_us=cpu_phase / n * 1e6,
                add_cpu_settled_s=cpu_settled,
                add_cpu_settled_us=cpu_settled / n * 1e6,
                add_other_pct=max((o for o in others if o is not None), default=None),
                write_backs=writes.count - writes0,
                graph_file_mib=writes.bytes / 2**20,
            )
            print(
                f"{size:>7,} facts: {n:,} adds in {wall:.2f} s = {n / wall:,.0f}/s, daemon "
                f"{row['add_cpu_us']:.1f} µs CPU/add ({row['add_cpu_settled_us']:.1f} with the write-back); "
                f"{row['write_backs']} write-backs, the last {row['graph_file_mib']:.1f} MiB"
                f"{_other(row['add_other_pct'])}",
                file=sys.stderr,
            )
            # -- the trivial method at this size
            row.update(await trivial())
            # -- query, one at a time
            texts = [vocab.query() for _ in range(args.queries)]
            await rpc.timed_calls("memory.query", [{"query": t, "k": 10} for t in texts[:3]])  # warm
            daemon.settle()
            meter.start()
            timed = await rpc.timed_calls("memory.query", [{"query": t, "k": 10} for t in texts], probe=daemon)
            _, qcpu, qother = meter.stop()
            rtt = [t[0] for t in timed]
            oncpu = [t[1] for t in timed]
            waiting = [t[2] for t in timed]
            slowest = max(timed)
            row.update(
                query_p50_ms=_ms(rtt, 50),
                query_p99_ms=_ms(rtt, 99),
                query_max_ms=slowest[0] * 1e3,
                query_cpu_ms=qcpu / len(timed) * 1e3,
                query_oncpu_p50_ms=_ms(oncpu, 50),
                query_oncpu_p99_ms=_ms(oncpu, 99),
                query_wait_p99_ms=_ms(waiting, 99),
                query_max_oncpu_ms=slowest[1] * 1e3,
                query_max_wait_ms=slowest[2] * 1e3,
                query_other_pct=qother,
            )
            # -- build_context, one at a time
            meter.start()
            ctimed = await rpc.timed_calls("memory.build_context", [{"query": t} for t in texts[: args.contexts]], probe=daemon)
            _, _, cother = meter.stop()
            row["context_p50_ms"] = _ms([t[0] for t in ctimed], 50)
            row["context_p99_ms"] = _ms([t[0] for t in ctimed], 99)
            row["context_oncpu_p50_ms"] = _ms([t[1] for t in ctimed], 50)
            row["context_other_pct"] = cother
            row["daemon_rss_mib"] = daemon.rss_mib()
            print(
                f"{size:>7,} facts: query p50 {row['query_p50_ms']:.2f} p99 {row['query_p99_ms']:.2f} "
                f"max {row['query_max_ms']:.2f} ms (reactor thread on CPU p50 {row['query_oncpu_p50_ms']:.2f} "
                f"p99 {row['query_oncpu_p99_ms']:.2f}; slowest: {row['query_max_oncpu_ms']:.2f} on CPU, "
                f"{row['query_max_wait_ms']:.2f} waiting for one){_other(qother)}; "
                f"build_context p50 {row['context_p50_ms']:.2f} ms; "
                f"fact_count {row['trivial_cpu_us']:.1f} µs CPU/request",
                file=sys.stderr,
            )
            rows.append(row)
        rows[0]["trivial_empty_cpu_us"] = base["trivial_cpu_us"]
    return rows


def _other(pct: float | None) -> str:
    return "" if pct is None else f" [others used {pct:.0f} % of a CPU]"


# -- reporting --------------------------------------------------------------------


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("car-twisted", "Twisted", "autobahn", "orjson", "websockets", "scipy", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit,
        "clock_ticks_per_s": CLK_TCK,
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    header = (
        "| facts | adds/s | add µs CPU | + write-back | write-backs | fact_count µs CPU | add - fact_count "
        "| query p50 ms | p99 ms | max ms | on CPU p99 ms | build_context p50 ms | others' CPU % | daemon RSS MiB |"
    )
    print(header)
    print("|" + "---:|" * (header.count("|") - 1))
    for r in rows:
        rss = r.get("daemon_rss_mib")
        others = [r[k] for k in ("add_other_pct", "trivial_other_pct", "query_other_pct", "context_other_pct") if r.get(k) is not None]
        print(
            f"| {r['facts']:,} | {r['add_per_s']:,.0f} | {r['add_cpu_us']:.0f} | {r['add_cpu_settled_us']:.0f} "
            f"| {r['write_backs']} | {r['trivial_cpu_us']:.0f} | {r['add_cpu_settled_us'] - r['trivial_cpu_us']:.0f} "
            f"| {r['query_p50_ms']:.2f} | {r['query_p99_ms']:.2f} | {r['query_max_ms']:.2f} | {r['query_oncpu_p99_ms']:.2f} "
            f"| {r['context_p50_ms']:.2f} | {f'{max(others):.0f}' if others else '-'} | {'-' if rss is None else f'{rss:.0f}'} |"
        )
    print(
        f"\nwindow {args.window}; {args.trivial} fact_count per size, pipelined; {args.queries} queries (k=10) and "
        f"{args.contexts} build_context per size, one at a time.  CPU: the daemon's utime+stime, all threads "
        f"({1000 / CLK_TCK:.0f} ms ticks); + write-back: until the daemon is idle again after the adds; "
        f"on CPU: the reactor thread's run time during each query (schedstat); others' CPU: the most any "
        f"phase of that size saw the rest of the machine use.",
        file=sys.stderr,
    )


def print_profile(path: Path, top: int) -> None:
    import pstats

    for key in ("cumulative", "tottime"):
        print(f"\n-- daemon profile, top {top} by {key} ({path}) --", file=sys.stderr)
        pstats.Stats(str(path), stream=sys.stderr).sort_stats(key).print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="graph sizes, ascending (default 1000,10000,100000)")
    parser.add_argument("--queries", type=int, default=300, help="memory.query round trips per size (default 300)")
    parser.add_argument("--contexts", type=int, default=50, help="memory.build_context round trips per size (default 50)")
    parser.add_argument("--window", type=int, default=64, help="pipelined requests in flight (default 64)")
    parser.add_argument("--trivial", type=int, default=20000, help="memory.fact_count requests per size (default 20000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--quiet-pct", type=float, default=20.0, help="before each phase wait until the machine uses less than this %% of a CPU (0: don't)"
    )
    parser.add_argument("--quiet-timeout", type=float, default=30.0, help="wait at most this long, then measure anyway (default 30)")
    parser.add_argument("--json", type=Path, help="also write config, environment and figures here")
    parser.add_argument("--twist", default=str(Path(sys.executable).with_name("twist")), help="the twist script")
    parser.add_argument(
        "--profile",
        type=Path,
        help="run the daemon under cProfile, write its stats here and print the top entries (the figures are then distorted)",
    )
    parser.add_argument(
        "--profile-clock", choices=("wall", "thread"), default="wall", help="cProfile's clock (default wall; see PROFILE_WRAPPER)"
    )
    parser.add_argument("--profile-top", type=int, default=30)
    args = parser.parse_args(argv)
    args.sizes = sorted({int(s) for s in args.sizes.split(",")})
    if args.sizes[0] < 1 or args.queries < 1 or args.contexts < 1 or args.window < 1 or args.trivial < 1:
        parser.error("sizes, --queries, --contexts, --window and --trivial must be positive")
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        parser.error("needs Linux /proc")

    env = environment(args)
    work = Path(tempfile.mkdtemp(prefix="car-memory-wire-"))
    home = work / "car-home"
    home.mkdir(mode=0o700)
    fact_limit = args.sizes[-1] if args.sizes[-1] > DEFAULT_FACT_LIMIT else None
    daemon = Daemon(args.twist, home, work / "daemon.log", fact_limit, args.profile, args.profile_clock)
    rows: list[dict[str, Any]] = []
    meter: Meter | None = None
    failed = False
    t0 = time.monotonic()
    try:
        daemon.start()
        print(f"daemon pid {daemon.proc.pid} on {daemon.url} (CAR_HOME {home})", file=sys.stderr)
        meter = Meter(daemon, args)
        writes = WriteBacks(home / "memory" / "shared.json")
        writes.start()
        try:
            rows = asyncio.run(measure(daemon, meter, writes, args))
        finally:
            writes.stop()
    except BenchError as e:
        failed = True
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = True
        print("interrupted", file=sys.stderr)
    finally:
        rc = daemon.stop()
        if rc not in (None, 0, -signal.SIGTERM):
            print(f"warning: the daemon exited with status {rc}{daemon.log_tail()}", file=sys.stderr)
            failed = True
    elapsed = time.monotonic() - t0
    if rows:
        print_table(rows, args)
        if args.profile is not None:
            print("note: the daemon ran under cProfile; its figures are distorted", file=sys.stderr)
        print(f"total {elapsed:.0f} s", file=sys.stderr)
    if args.json is not None and rows:
        doc = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": env,
            "complete": not failed,
            "elapsed_s": elapsed,
            "quiet_wait_s": sum(meter.quiet_waits) if meter is not None else None,
            "rows": rows,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    if args.profile is not None and args.profile.exists():
        print_profile(args.profile, args.profile_top)
    if failed:
        print(f"daemon log kept in {work / 'daemon.log'}", file=sys.stderr)
        shutil.rmtree(home, ignore_errors=True)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
