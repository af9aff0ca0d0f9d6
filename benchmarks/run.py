#!/usr/bin/env python3
"""
Throughput benchmark: the car-twisted daemon against two bare WebSocket
JSON-RPC responders (Autobahn and ``websockets``), under the same Node.js
load generator (``loadgen.js``, ``ws`` package).

Each server runs as its own subprocess on a free loopback port.  For every
shape ``CxD`` (C connections, D requests in flight on each) and every
server, ``loadgen.js`` runs ``--warmup`` + ``--seconds``; the whole set is
repeated ``--repeat`` times round-robin and the medians are reported, with
the daemon/baseline throughput ratios per shape.

    python benchmarks/run.py [--shapes 16x8,1x1] [--seconds 4] [--warmup 1]
                             [--repeat 3] [--json out.json]

``--scenario callback`` measures the daemon alone instead: a
``proposal.submit`` with one ``tool_call`` whose ``tools.execute``
callback the load generator answers at once, next to one ``bench.echo``
and two sequential ``bench.echo`` requests, in the same run and shapes
(default 16x4,1x1).

``--scenario runs`` measures the daemon's run tracing: each connection
binds as an agent, opens runs and keeps ``runs.record_turns`` batches of
B turns in flight (B from ``--batches``, default 1,256); the daemon acks a
batch once its JSONL lines are written to the run file.  Reports turns/s,
batches/s, ack latency and the bytes written (default shapes 1x1,4x4).
``--stalled-subscribers 0,2`` adds, per value K, cells in which every run
also gets K host connections that subscribe to it (``runs.subscribe``) and
then never read; ``--reading-subscribers`` the control with subscribers
that read everything; ``--output-bytes`` sizes each turn's output.

``--scenario connections`` measures the daemon with many connections: on
a fresh daemon per round (``max_connections`` raised, open-file limits of
the daemon and of the load generators raised), its RSS and a 1x1
``bench.echo`` probe's latency first with no other connection, then with
N (``--idle-connections``, default 10000) authenticated idle connections
held by one ``loadgen.js --mode hold`` process (opened ``--open-window``
at a time, so the daemon's guest slots never overflow); then M
(``--active-connections``, default 1000) connections with one request in
flight each.  One extra launch runs the daemon under ``tracemalloc`` and
prints the allocation sites that grow per idle connection.

The throughput table also has ``websockets-tuned`` (uvloop, orjson) next
to the stock ``websockets`` responder and bare Autobahn.

Standard library only (plus ``node``/``npm`` on PATH).  See README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import secrets
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.js"

# name -> (label, script, takes --token)
SERVERS: dict[str, tuple[str, str, bool]] = {
    "car": ("car-twisted", "servers/car_server.py", True),
    "autobahn": ("autobahn-bare", "servers/autobahn_bare.py", False),
    "websockets": ("websockets-bare", "servers/websockets_bare.py", False),
    "websockets-tuned": ("websockets-tuned", "servers/websockets_tuned.py", False),
}
BASELINES = ("autobahn", "websockets", "websockets-tuned")

# --scenario callback: loadgen modes, measured on the car server only.
# mode -> label; every mode is one "operation" (rps = operations/s).
MODES: dict[str, str] = {
    "echo": "1 echo",
    "echo2": "2 echoes (seq.)",
    "callback": "proposal+callback",
}
DEFAULT_SHAPES = {"throughput": "16x8,1x1", "callback": "16x4,1x1", "runs": "1x1,4x4",
                  "connections": "1x1"}
# The daemon's per-run ceiling (car_twisted.runs.model.RECORD_TURNS_RUN_CEILING).
RUN_TURN_LIMIT = 2000
# --scenario runs: the daemon's store quota and retention, out of the way.
RUNS_STORE_LIMITS = ("run_store_max_bytes=1024GiB", "run_retention_per_agent=1000000",
                     "run_retention_total=1000000")

SERVER_START_TIMEOUT = 20.0
SERVER_STOP_TIMEOUT = 15.0  # generous: a cProfile'd server writes its stats on exit


class BenchError(RuntimeError):
    pass


# -- child processes ------------------------------------------------------------

try:
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:
    _LIBC = None
_PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _child_setup(cpus: set[int] | None, nofile: int | None = None):
    """
    preexec_fn: optional CPU pinning; on Linux, die with the runner; with
    C{nofile}, raise the child's open-file limit (RLIMIT_NOFILE) to it
    (the hard limit too when allowed, else as far as the hard limit goes).
    """

    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if nofile is not None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft == resource.RLIM_INFINITY or soft >= nofile:
                pass  # high enough already
            elif hard == resource.RLIM_INFINITY or hard >= nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
            else:
                try:  # root may raise the hard limit (up to fs.nr_open)
                    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
                except (ValueError, OSError):
                    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup


def nofile_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of process C{pid} (Linux /proc), or None."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                value = line.split()[3]
                return None if value == "unlimited" else int(value)
    except (OSError, IndexError, ValueError):
        pass
    return None


def rss_kib(pid: int) -> int | None:
    """Resident set size of process C{pid} in KiB (VmRSS), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def pid_cpu_seconds(pid: int) -> float | None:
    """User+system CPU seconds process C{pid} used so far (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_busy_seconds() -> float | None:
    """CPU seconds all CPUs spent not idle since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal ...
    values = [int(v) for v in fields[1:9]]
    return (sum(values) - values[3] - values[4]) / _CLK_TCK


def process_cpu_seconds(exclude: set[int]) -> dict[int, float]:
    """
    CPU seconds used so far by every user-space process but C{exclude} and
    this runner (Linux /proc; empty elsewhere).  Kernel threads are left
    out: softirq work for our own loopback traffic lands there.
    """
    me = os.getpid()
    out: dict[int, float] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me or pid in exclude:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ppid = int(fields[1])
        if pid == 2 or ppid == 2 or ppid == me:  # kernel threads; our own children
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return out


def wait_until_quiet(max_busy_pct: float, timeout: float) -> float | None:
    """
    Wait (at most C{timeout} seconds) until the whole machine uses less than
    C{max_busy_pct} % of one CPU over a 0.5 s sample.  @return: the last sample.
    """
    deadline = time.monotonic() + timeout
    while True:
        b0, t0 = system_busy_seconds(), time.monotonic()
        if b0 is None:
            return None
        time.sleep(0.5)
        busy = 100.0 * (system_busy_seconds() - b0) / (time.monotonic() - t0)
        if busy < max_busy_pct or time.monotonic() >= deadline:
            return busy


class Server:
    def __init__(self, name: str, python: str, token: str, log_dir: Path,
                 cpus: set[int] | None, profile: Path | None,
                 extra_args: list[str] | None = None, nofile: int | None = None) -> None:
        self.name = name
        self.label, script, takes_token = SERVERS[name]
        self.log_path = log_dir / f"{name}.log"
        cmd = [python]
        if profile is not None:
            cmd += ["-m", "cProfile", "-o", str(profile)]
        cmd += [str(HERE / script), "--port", "0"]
        if takes_token:
            cmd += ["--token", token]
        cmd += extra_args or []
        self.cmd = cmd
        self.cpus = cpus
        self.nofile = nofile
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self) -> None:
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                bufsize=0,
                preexec_fn=_child_setup(self.cpus, self.nofile),
            )
        finally:
            log.close()
        self.port = self._read_port()

    def _read_port(self) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{self.label} did not report its port within "
                                     f"{SERVER_START_TIMEOUT:.0f}s{self.log_tail()}")
                if not sel.select(left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise BenchError(f"{self.label} exited before listening "
                                     f"(status {self.proc.wait()}){self.log_tail()}")
                buf += chunk
        line = buf.split(b"\n", 1)[0].decode(errors="replace").strip()
        word, _, port = line.partition(" ")
        if word != "LISTENING" or not port.isdigit():
            raise BenchError(f"{self.label}: unexpected first line {line!r}{self.log_tail()}")
        return int(port)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            status = None if self.proc is None else self.proc.returncode
            raise BenchError(f"{self.label} is not running (status {status}){self.log_tail()}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(SERVER_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def cpu_seconds(self) -> float | None:
        """User+system CPU seconds used so far (Linux /proc), else None."""
        if self.proc is None:
            return None
        return pid_cpu_seconds(self.proc.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        if not text:
            return ""
        return f"\n--- {self.log_path} (last {lines} lines) ---\n" + "\n".join(text[-lines:])


def run_loadgen(node: str, server: Server, conns: int, depth: int, args: argparse.Namespace,
                token: str, cpus: set[int] | None, mode: str = "echo",
                extra_args: list[str] | None = None, nofile: int | None = None,
                seconds: float | None = None) -> dict:
    seconds = args.seconds if seconds is None else seconds
    cmd = [
        node, str(LOADGEN),
        "--mode", mode,
        "--url", server.url,
        "--token", token,
        "--conns", str(conns),
        "--depth", str(depth),
        "--seconds", str(seconds),
        "--warmup", str(args.warmup),
        "--max-requests", str(args.max_requests),
    ] + (extra_args or [])
    limit = args.warmup + seconds + 40 + conns / 50
    server_cpu0 = server.cpu_seconds()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    exclude = {server.proc.pid} if server.proc is not None else set()
    procs0 = process_cpu_seconds(exclude)
    busy0 = system_busy_seconds()
    wall0 = time.monotonic()
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=limit, preexec_fn=_child_setup(cpus, nofile))
    except subprocess.TimeoutExpired:
        raise BenchError(f"loadgen against {server.label} did not finish within {limit:.0f}s")
    wall = time.monotonic() - wall0
    busy1 = system_busy_seconds()
    procs1 = process_cpu_seconds(exclude)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu1 = server.cpu_seconds()
    lines = done.stdout.strip().splitlines()
    result = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except ValueError:
            result = None
    if done.returncode != 0 or result is None:
        detail = (result or {}).get("first_error")
        raise BenchError(
            f"loadgen against {server.label} failed (status {done.returncode})"
            f"{': ' + json.dumps(detail) if detail else ''}\n{done.stderr.strip()}"
            f"{server.log_tail()}"
        )
    # CPU use over the whole loadgen run (connect + warm-up + window + drain),
    # in % of one core: near 100 means that process was the bottleneck.
    result["loadgen_cpu_pct"] = 100.0 * (
        (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    ) / wall
    server_cpu_s = (server_cpu1 - server_cpu0
                    if server_cpu0 is not None and server_cpu1 is not None else None)
    result["server_cpu_pct"] = 100.0 * server_cpu_s / wall if server_cpu_s is not None else None
    # Server CPU per completed operation, over the whole run (set-up is a
    # few requests per connection, negligible); clock-tick resolution.
    ops = result.get("ops_done") or 0
    result["server_cpu_s"] = server_cpu_s
    result["server_us_per_op"] = (1e6 * server_cpu_s / ops
                                  if server_cpu_s is not None and ops else None)
    # Everything else the machine did meanwhile; a high figure means a
    # disturbed run.  Two estimates, the larger counts: CPU time of the other
    # processes (misses processes that came and went during the run), and
    # the machine's busy time minus ours (tick-sampled, so it reads low by
    # 10-20 points when the run is mostly wake-ups, as at 1x1).
    by_process = sum(t - procs0.get(pid, 0.0) for pid, t in procs1.items())
    estimates = [100.0 * by_process / wall]
    if busy0 is not None and busy1 is not None and result["server_cpu_pct"] is not None:
        estimates.append(100.0 * (busy1 - busy0) / wall
                         - result["loadgen_cpu_pct"] - result["server_cpu_pct"])
    result["other_cpu_pct"] = max(estimates)
    result["wall_s"] = wall
    if result["completed"] == 0:
        raise BenchError(f"loadgen against {server.label}: no request completed{server.log_tail()}")
    return result


class RunFiles:
    """
    What the daemon wrote under C{CAR_HOME/runs}: each C{.jsonl} run file
    is append-only, so its growth since the last look is exactly the bytes
    written, and the newlines in that growth are the records written.  Run
    summaries (C{.summary.json}) are rewritten whole (temp + rename) at a
    run's start and end: counted as 2 writes of their final size per new
    summary.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: dict[Path, int] = {}  # jsonl file -> bytes already counted
        self.summaries: set[Path] = set()
        self.ended: set[Path] = set()  # jsonl files whose last record is "ended"

    def delta(self) -> dict:
        jsonl_bytes = lines = files = 0
        summary_new = summary_bytes = 0
        for path in self.root.rglob("*"):
            name = path.name
            if name.endswith(".jsonl"):
                old = self.seen.get(path, 0)
                with open(path, "rb") as f:
                    f.seek(old)
                    data = f.read()
                if data:
                    files += old == 0
                    jsonl_bytes += len(data)
                    lines += data.count(b"\n")
                    self.seen[path] = old + len(data)
                    last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
                    if b'"record":"ended"' in last:
                        self.ended.add(path)
            elif name.endswith(".summary.json") and path not in self.summaries:
                self.summaries.add(path)
                summary_new += 1
                summary_bytes += 2 * path.stat().st_size
        return {"jsonl_bytes": jsonl_bytes, "jsonl_lines": lines, "jsonl_files_new": files,
                "summary_files_new": summary_new, "summary_bytes_est": summary_bytes,
                "bytes_written": jsonl_bytes + summary_bytes}

    def discard(self) -> int:
        """
        Delete the files of ended runs (already counted; the daemon never
        writes to an ended run again).  Deleting drops their dirty pages, so
        gigabytes written by one run are not still being flushed, throttling
        writers, during the next one.  @return: files deleted.
        """
        n = 0
        for path in list(self.ended):
            for victim in (path, path.with_suffix(".summary.json")):
                try:
                    victim.unlink()
                    n += 1
                except FileNotFoundError:
                    pass
            self.ended.discard(path)
        return n


# -- set-up ---------------------------------------------------------------------

def ensure_node_modules(npm: str) -> None:
    if (HERE / "node_modules" / "ws" / "package.json").is_file():
        return
    print(f"installing the load generator's dependencies: {npm} install --prefix {HERE}",
          file=sys.stderr)
    subprocess.run([npm, "install", "--prefix", str(HERE), "--no-audit", "--no-fund"],
                   check=True, stdin=subprocess.DEVNULL, timeout=300)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        c, sep, d = part.partition("x")
        if not sep or not c.isdigit() or not d.isdigit() or int(c) < 1 or int(d) < 1:
            raise argparse.ArgumentTypeError(f"bad shape {part!r}: expected CONNSxDEPTH, e.g. 16x8")
        shapes.append((int(c), int(d)))
    if not shapes:
        raise argparse.ArgumentTypeError("no shape given")
    return shapes


def choice_list(what: str, choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma list of names, each one of C{choices}."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(choices)}")
        return names

    return parse


def parse_batches(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad batch list {text!r}") from None
    if not sizes or any(not 1 <= b <= 256 for b in sizes):
        raise argparse.ArgumentTypeError("batch sizes must be 1..256 (the daemon's per-batch cap)")
    return sizes


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad list {text!r}") from None
    if any(not 0 <= k <= 64 for k in counts):
        raise argparse.ArgumentTypeError("subscriber counts must be 0..64")
    return counts


def runs_cell(batch: int, subs: int, reading: bool) -> str:
    """The mode string of a runs cell: ``runs:B``, ``runs:B:sK`` or ``runs:B:rK``."""
    if subs == 0:
        return f"runs:{batch}"
    return f"runs:{batch}:{'r' if reading else 's'}{subs}"


def parse_runs_cell(mode: str) -> tuple[int, int, bool]:
    parts = mode.split(":")
    if len(parts) == 2:
        return int(parts[1]), 0, False
    return int(parts[1]), int(parts[2][1:]), parts[2][0] == "r"


def runs_label(batch: int, subs: int, reading: bool) -> str:
    if subs == 0:
        return f"B={batch}"
    return f"B={batch} +{subs} {'reading' if reading else 'stalled'}"


def parse_cpus(text: str) -> set[int]:
    try:
        return {int(c) for c in text.split(",") if c.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad CPU list {text!r}") from None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state() -> dict | None:
    """The checkout measured: commit, and uncommitted changes to the package."""
    root = HERE.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "car_twisted"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {
        "commit": commit.stdout.strip(),
        "uncommitted_in_car_twisted": [line[3:] for line in dirty.stdout.splitlines()],
    }


def environment(node: str) -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        node_version = subprocess.run([node, "--version"], capture_output=True, text=True,
                                      timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        node_version = None
    try:
        ws_version = json.loads((HERE / "node_modules/ws/package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        ws_version = None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": _git_state(),
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "versions": {d: _version(d) for d in
                     ("car-twisted", "twisted", "autobahn", "websockets", "orjson", "uvloop")},
        "node": node_version,
        "ws": ws_version,
    }


# -- results ------------------------------------------------------------------

def _median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _row(mine: list[dict]) -> dict:
    rps = [r["rps"] for r in mine]
    med = statistics.median(rps)
    return {
        "runs": len(mine),
        "rps": med,
        "rps_min": min(rps),
        "rps_max": max(rps),
        "spread_pct": 100.0 * (max(rps) - min(rps)) / med if med else None,
        "p50_ms": statistics.median(r["p50_ms"] for r in mine),
        "p99_ms": statistics.median(r["p99_ms"] for r in mine),
        "server_cpu_pct": _median_or_none(r.get("server_cpu_pct") for r in mine),
        "server_us_per_op": _median_or_none(r.get("server_us_per_op") for r in mine),
    }


def _cell_runs(runs: list[dict], field: str, name: str, shape: str) -> list[dict]:
    """The runs of one cell: C{field} (server or mode) is C{name}, at C{shape}."""
    return [r for r in runs if r[field] == name and r["shape"] == shape]


def _paired_ratios(runs: list[dict], field: str, subject: str, base: str, shape: str,
                   metric: str) -> list[float]:
    """
    C{metric} of C{subject} over C{base}, one ratio per round both ran:
    robust against slow drift of the machine.
    """
    bases = _cell_runs(runs, field, base, shape)
    return [r[metric] / o[metric]
            for r in _cell_runs(runs, field, subject, shape)
            for o in bases if o["round"] == r["round"]]


def summarize_callback(runs: list[dict], modes: list[str], shapes: list[tuple[int, int]]) -> dict:
    """Medians per (mode, shape) on the car server, and callback/echo ratios."""
    rows = []
    by_key: dict[tuple[str, str], dict] = {}
    for c, d in shapes:
        shape = f"{c}x{d}"
        for mode in modes:
            mine = _cell_runs(runs, "mode", mode, shape)
            if not mine:
                continue
            row = {"server": "car", "mode": mode, "label": MODES[mode], "shape": shape,
                   **_row(mine)}
            rows.append(row)
            by_key[(mode, shape)] = row
    ratios = []
    for c, d in shapes:
        shape = f"{c}x{d}"
        cb = by_key.get(("callback", shape))
        if cb is None:
            continue
        entry: dict = {"shape": shape}
        for base in ("echo", "echo2"):
            other = by_key.get((base, shape))
            if other is None:
                continue
            entry[f"callback/{base}_rps"] = cb["rps"] / other["rps"]
            entry[f"callback/{base}_p50"] = cb["p50_ms"] / other["p50_ms"]
            entry[f"callback/{base}_p99"] = cb["p99_ms"] / other["p99_ms"]
            if cb["server_us_per_op"] and other["server_us_per_op"]:
                entry[f"callback/{base}_server_cpu_per_op"] = (
                    cb["server_us_per_op"] / other["server_us_per_op"])
            paired = _paired_ratios(runs, "mode", "callback", base, shape, "rps")
            if paired:
                entry[f"callback/{base}_rps_paired_median"] = statistics.median(paired)
            # Time per operation, proposal over baseline: latency p50 and
            # p99, and 1 / throughput (the time per operation under load);
            # per-round pairs too, for their spread.
            entry[f"callback/{base}_time_per_op"] = other["rps"] / cb["rps"]
            for metric, key in (("p50_ms", "p50"), ("p99_ms", "p99"), ("rps", "time_per_op")):
                pairs = _paired_ratios(runs, "mode", "callback", base, shape, metric)
                if metric == "rps":
                    pairs = [1.0 / x for x in pairs]
                if pairs:
                    entry[f"callback/{base}_{key}_paired"] = pairs
        ratios.append(entry)
    return {"rows": rows, "ratios": ratios}


def summarize_runs(runs: list[dict], cells: list[str], shapes: list[tuple[int, int]]) -> dict:
    """
    Medians per (cell, shape) on the car server; a cell is a batch size
    with 0, K stalled or K reading subscribers per run.  Ratios: every cell
    with subscribers against the same batch size and shape without.
    """
    rows = []
    by_key: dict[tuple[str, str], dict] = {}
    for c, d in shapes:
        shape = f"{c}x{d}"
        for mode in cells:
            b, k, reading = parse_runs_cell(mode)
            mine = _cell_runs(runs, "mode", mode, shape)
            if not mine:
                continue
            row = {"server": "car", "mode": mode, "batch": b, "subscribers": k,
                   "subscribers_read": reading, "label": runs_label(b, k, reading),
                   "shape": shape, **_row(mine)}
            # _row's rps is batches/s; a batch of b turns is acked as a whole.
            row["batches_per_s"] = row["rps"]
            row["turns_per_s"] = statistics.median(r["turns_per_s"] for r in mine)
            row["server_us_per_turn"] = (row["server_us_per_op"] / b
                                         if row["server_us_per_op"] is not None else None)
            row["bytes_per_s"] = statistics.median(r["files"]["bytes_written"] / r["wall_s"]
                                                   for r in mine)
            row["bytes_written"] = statistics.median(r["files"]["bytes_written"] for r in mine)
            row["jsonl_bytes_per_turn"] = statistics.median(
                r["files"]["jsonl_bytes"] / r["turns_acked"] for r in mine)
            row["runs_started"] = statistics.median(r["runs_started"] for r in mine)
            row["ack_max_ms"] = statistics.median(r["max_ms"] for r in mine)
            if k:
                st = [r["stalled"] for r in mine]
                ss = [r["sub_stats"] for r in mine if r.get("sub_stats")]
                row["sub_connections"] = statistics.median(x["opened"] for x in st)
                row["sub_subscribe_p50_ms"] = _median_or_none(x["subscribe_p50_ms"] for x in st)
                row["sub_gate_waits"] = statistics.median(x["gate_waits"] for x in st)
                row["sub_gate_wait_ms"] = statistics.median(x["gate_wait_ms"] for x in st)
                row["sub_late_pct"] = statistics.median(
                    100.0 * x["late"] / x["subscribed"] if x["subscribed"] else 0.0 for x in st)
                row["sub_max_open"] = statistics.median(x["max_open"] for x in st)
                if ss:
                    tot = [_sub_totals(x) for x in ss]
                    row["sub_dropping_pct"] = statistics.median(
                        100.0 * t["dropping"] / t["subscriptions"] if t["subscriptions"] else 0.0
                        for t in tot)
                    row["sub_events_dropped"] = statistics.median(t["events_dropped"] for t in tot)
                    row["sub_busy"] = statistics.median(t["busy"] for t in tot)
                    row["sub_busy_dropping_pct"] = _median_or_none(
                        100.0 * t["busy_dropping"] / t["busy"] if t["busy"] else None for t in tot)
                    row["sub_busy_stuck_pct"] = _median_or_none(
                        100.0 * t["busy_stuck"] / t["busy"] if t["busy"] else None for t in tot)
            rows.append(row)
            by_key[(mode, shape)] = row
    ratios = []
    for c, d in shapes:
        shape = f"{c}x{d}"
        for mode in cells:
            b, k, reading = parse_runs_cell(mode)
            base_mode = runs_cell(b, 0, False)
            row, base = by_key.get((mode, shape)), by_key.get((base_mode, shape))
            if k == 0 or row is None or base is None:
                continue
            paired = _paired_ratios(runs, "mode", mode, base_mode, shape, "turns_per_s")
            p99_paired = _paired_ratios(runs, "mode", mode, base_mode, shape, "p99_ms")
            ut, ub = row["server_us_per_turn"], base["server_us_per_turn"]
            ratios.append({
                "shape": shape, "batch": b, "subscribers": k, "subscribers_read": reading,
                "label": runs_label(b, k, reading),
                "turns_per_s": row["turns_per_s"] / base["turns_per_s"],
                "turns_per_s_paired_median": statistics.median(paired) if paired else None,
                "turns_per_s_paired": paired,
                "p50": row["p50_ms"] / base["p50_ms"],
                "p99": row["p99_ms"] / base["p99_ms"],
                # The recorder's ack latency p99 side by side: without, with
                # (medians over the rounds, with their range), per-round ratios.
                "p99_ms_without": base["p99_ms"],
                "p99_ms_with": row["p99_ms"],
                "p99_ms_without_range": _range(_cell_runs(runs, "mode", base_mode, shape), "p99_ms"),
                "p99_ms_with_range": _range(_cell_runs(runs, "mode", mode, shape), "p99_ms"),
                "p99_paired": p99_paired,
                "server_us_per_turn": ut / ub if ut and ub else None,
            })
    return {"rows": rows, "ratios": ratios}


def _range(runs: list[dict], field: str) -> list[float] | None:
    values = [r[field] for r in runs if r.get(field) is not None]
    return [min(values), max(values)] if values else None


def _sub_totals(stats: dict) -> dict:
    """bench.sub_stats: the closed subscriptions plus the live ones."""
    closed, live = stats.get("closed") or {}, stats.get("live") or {}
    return {key: closed.get(key, 0) + live.get(key, 0)
            for key in ("subscriptions", "dropping", "events_dropped", "stuck", "busy",
                        "busy_dropping", "busy_stuck")}


def summarize(runs: list[dict], servers: list[str], shapes: list[tuple[int, int]]) -> dict:
    rows = []
    by_key: dict[tuple[str, str], dict] = {}
    for c, d in shapes:
        shape = f"{c}x{d}"
        for name in servers:
            mine = _cell_runs(runs, "server", name, shape)
            if not mine:
                continue
            row = {"server": name, "label": SERVERS[name][0], "shape": shape, **_row(mine)}
            rows.append(row)
            by_key[(name, shape)] = row
    ratios = []
    for c, d in shapes:
        shape = f"{c}x{d}"
        car = by_key.get(("car", shape))
        if car is None:
            continue
        entry: dict = {"shape": shape}
        for base in BASELINES:
            other = by_key.get((base, shape))
            if other is None:
                continue
            entry[f"car/{base}"] = car["rps"] / other["rps"]
            paired = _paired_ratios(runs, "server", "car", base, shape, "rps")
            if paired:
                entry[f"car/{base}_paired_median"] = statistics.median(paired)
                entry[f"car/{base}_paired_min"] = min(paired)
                entry[f"car/{base}_paired_max"] = max(paired)
                entry[f"car/{base}_paired"] = paired
        ratios.append(entry)
    return {"rows": rows, "ratios": ratios}


def print_table(summary: dict, args: argparse.Namespace, out=sys.stdout) -> None:
    print(file=out)
    print(f"median of {args.repeat} run(s) per cell; {args.seconds:g}s measured after "
          f"{args.warmup:g}s warm-up; spread = (max-min)/median of rps", file=out)
    header = f"{'server':<16} {'shape':>6} {'rps':>10} {'spread':>7} {'p50 ms':>8} {'p99 ms':>8}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in summary["rows"]:
        spread = f"{row['spread_pct']:.0f}%" if row["spread_pct"] is not None else "-"
        print(f"{row['label']:<16} {row['shape']:>6} {row['rps']:>10.0f} {spread:>7} "
              f"{row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f}", file=out)
    if summary["ratios"]:
        print(file=out)
        print("car-twisted rps / baseline rps, side by side: ratio of the medians, then the "
              "median [min-max] of the per-round paired ratios", file=out)
        cols = [b for b in BASELINES if any(f"car/{b}" in e for e in summary["ratios"])]
        w = 28
        print(f"{'shape':>6} " + " ".join(f"{'car / ' + SERVERS[b][0]:>{w}}" for b in cols),
              file=out)
        for e in summary["ratios"]:
            cells = []
            for b in cols:
                v = e.get(f"car/{b}")
                if v is None:
                    cells.append(f"{'-':>{w}}")
                    continue
                pm = e.get(f"car/{b}_paired_median")
                paired = (f" ({pm:.2f} [{e[f'car/{b}_paired_min']:.2f}-"
                          f"{e[f'car/{b}_paired_max']:.2f}])" if pm is not None else "")
                cells.append(f"{f'{v:.2f}' + paired:>{w}}")
            print(f"{e['shape']:>6} " + " ".join(cells), file=out)
    print(file=out)


def print_callback_table(summary: dict, args: argparse.Namespace, out=sys.stdout) -> None:
    print(file=out)
    print(f"car-twisted only; median of {args.repeat} run(s) per cell; {args.seconds:g}s measured "
          f"after {args.warmup:g}s warm-up; one op = one echo / two sequential echoes / one "
          f"proposal.submit with one tool_call (callback answered at once); "
          f"server us/op = server CPU per op", file=out)
    header = (f"{'operation':<18} {'shape':>6} {'ops/s':>10} {'spread':>7} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'srv cpu':>8} {'srv us/op':>10}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in summary["rows"]:
        spread = f"{row['spread_pct']:.0f}%" if row["spread_pct"] is not None else "-"
        us = f"{row['server_us_per_op']:.1f}" if row["server_us_per_op"] is not None else "-"
        print(f"{row['label']:<18} {row['shape']:>6} {row['rps']:>10.0f} {spread:>7} "
              f"{row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} {_pct(row['server_cpu_pct']):>8} "
              f"{us:>10}", file=out)
    if summary["ratios"]:
        print(file=out)
        print(f"{'shape':>6} {'vs':>6} {'ops/s':>7} {'p50':>7} {'p99':>7} {'srv us/op':>10}"
              f"   (proposal+callback / baseline)", file=out)
        for e in summary["ratios"]:
            for base in ("echo", "echo2"):
                if f"callback/{base}_rps" not in e:
                    continue
                cpu = e.get(f"callback/{base}_server_cpu_per_op")
                print(f"{e['shape']:>6} {base:>6} {e[f'callback/{base}_rps']:>7.2f} "
                      f"{e[f'callback/{base}_p50']:>7.2f} {e[f'callback/{base}_p99']:>7.2f} "
                      f"{(f'{cpu:.2f}' if cpu is not None else '-'):>10}", file=out)
        if any("callback/echo2_p50" in e for e in summary["ratios"]):
            print(file=out)
            print("proposal path vs plain calls: time of one proposal.submit round trip (one "
                  "tool_call; its tools.execute callback answered by the client) / time of two "
                  "sequential plain calls (bench.echo, the second sent on the first's reply); "
                  "ratio of the medians, then the median [min-max] of the per-round ratios", file=out)
            for e in summary["ratios"]:
                if "callback/echo2_p50" not in e:
                    continue
                parts = []
                for key, what in (("p50", "p50 latency"), ("p99", "p99 latency"),
                                  ("time_per_op", "time per op (1/ops/s)")):
                    pairs = e.get(f"callback/echo2_{key}_paired") or []
                    spread = (f" ({statistics.median(pairs):.2f} [{min(pairs):.2f}-{max(pairs):.2f}])"
                              if pairs else "")
                    parts.append(f"{what} {e[f'callback/echo2_{key}']:.2f}x{spread}")
                print(f"  proposal / 2 plain calls at {e['shape']:>5}: " + ", ".join(parts), file=out)
    print(file=out)


def print_runs_table(summary: dict, args: argparse.Namespace, out=sys.stdout) -> None:
    print(file=out)
    print(f"car-twisted runs.record_turns; median of {args.repeat} run(s) per cell; "
          f"{args.seconds:g}s measured after {args.warmup:g}s warm-up; ack = the batch's lines "
          f"written to the run file; latency per batch; spread = (max-min)/median of batches/s; "
          f"written = run files over the whole run (jsonl + summaries)", file=out)
    subs = any(row["subscribers"] for row in summary["rows"])
    w = 20 if subs else 6
    header = (f"{'batch':<{w}} {'shape':>6} {'turns/s':>10} {'batches/s':>10} {'spread':>7} "
              f"{'p50 ms':>8} {'p99 ms':>8} {'srv cpu':>8} {'us/batch':>9} {'us/turn':>8} "
              f"{'MB/s':>6} {'MB':>6} {'B/turn':>7} {'runs':>5}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in summary["rows"]:
        spread = f"{row['spread_pct']:.0f}%" if row["spread_pct"] is not None else "-"
        us = row["server_us_per_op"]
        ut = row["server_us_per_turn"]
        print(f"{row['label']:<{w}} {row['shape']:>6} {row['turns_per_s']:>10.0f} "
              f"{row['batches_per_s']:>10.0f} {spread:>7} {row['p50_ms']:>8.3f} "
              f"{row['p99_ms']:>8.3f} {_pct(row['server_cpu_pct']):>8} "
              f"{(f'{us:.1f}' if us is not None else '-'):>9} "
              f"{(f'{ut:.2f}' if ut is not None else '-'):>8} "
              f"{row['bytes_per_s'] / 1e6:>6.1f} {row['bytes_written'] / 1e6:>6.1f} "
              f"{row['jsonl_bytes_per_turn']:>7.1f} {row['runs_started']:>5.0f}", file=out)
    if subs:
        print(file=out)
        print("subscribers (per run of the load generator, medians): host connections opened, "
              "most open at once, runs.subscribe p50, roll-overs that waited for the spare's "
              "subscriptions and the total wait (all connections), % of subscriptions whose "
              "queue overflowed (events dropped), events dropped; busy: subscriptions to runs "
              "that got >= 1500 turns, % of those dropping, % of those stuck (output still backed "
              "up at close: socket buffers full)", file=out)
        header = (f"{'cell':<20} {'shape':>6} {'conns':>6} {'open':>5} {'sub ms':>7} "
                  f"{'waits':>6} {'wait ms':>8} {'dropping':>9} {'dropped':>9} {'busy':>5} "
                  f"{'drop':>5} {'stuck':>6}")
        print(header, file=out)
        print("-" * len(header), file=out)
        for row in summary["rows"]:
            if not row["subscribers"]:
                continue
            dp = row.get("sub_dropping_pct")
            ed = row.get("sub_events_dropped")
            sp = row.get("sub_subscribe_p50_ms")
            bs, bd, bk = (row.get("sub_busy"), row.get("sub_busy_dropping_pct"),
                          row.get("sub_busy_stuck_pct"))
            print(f"{row['label']:<20} {row['shape']:>6} {row['sub_connections']:>6.0f} "
                  f"{row['sub_max_open']:>5.0f} {(f'{sp:.1f}' if sp is not None else '-'):>7} "
                  f"{row['sub_gate_waits']:>6.0f} {row['sub_gate_wait_ms']:>8.0f} "
                  f"{(f'{dp:.0f}%' if dp is not None else '-'):>9} "
                  f"{(f'{ed:.0f}' if ed is not None else '-'):>9} "
                  f"{(f'{bs:.0f}' if bs is not None else '-'):>5} "
                  f"{(f'{bd:.0f}%' if bd is not None else '-'):>5} "
                  f"{(f'{bk:.0f}%' if bk is not None else '-'):>6}", file=out)
    if summary["ratios"]:
        print(file=out)
        print("with subscribers / without (same batch size and shape): turns/s (medians), "
              "turns/s (median of per-round pairs), ack p50, ack p99, server us/turn", file=out)
        header = (f"{'cell':<20} {'shape':>6} {'turns/s':>8} {'paired':>8} {'p50':>6} "
                  f"{'p99':>6} {'us/turn':>8}")
        print(header, file=out)
        print("-" * len(header), file=out)
        for e in summary["ratios"]:
            pm, ut = e["turns_per_s_paired_median"], e["server_us_per_turn"]
            print(f"{e['label']:<20} {e['shape']:>6} {e['turns_per_s']:>8.2f} "
                  f"{(f'{pm:.2f}' if pm is not None else '-'):>8} {e['p50']:>6.2f} "
                  f"{e['p99']:>6.2f} {(f'{ut:.2f}' if ut is not None else '-'):>8}", file=out)
        print(file=out)
        print("recorder's ack latency p99 (runs.record_turns send -> ack), without and with "
              "subscribers per run, side by side: medians over the rounds [min-max], ratio of "
              "the medians, then the median [min-max] of the per-round ratios", file=out)
        header = (f"{'cell':<20} {'shape':>6} {'p99 ms without':>22} {'p99 ms with':>22} "
                  f"{'with/without':>13} {'per round':>20}")
        print(header, file=out)
        print("-" * len(header), file=out)

        def ms(v, r):
            return f"{v:.3f}" + (f" [{r[0]:.2f}-{r[1]:.2f}]" if r else "")

        for e in summary["ratios"]:
            pr = e["p99_paired"]
            rounds = (f"{statistics.median(pr):.2f} [{min(pr):.2f}-{max(pr):.2f}]" if pr else "-")
            print(f"{e['label']:<20} {e['shape']:>6} "
                  f"{ms(e['p99_ms_without'], e['p99_ms_without_range']):>22} "
                  f"{ms(e['p99_ms_with'], e['p99_ms_with_range']):>22} "
                  f"{e['p99']:>12.2f}x {rounds:>20}", file=out)
    print(file=out)


def print_profile(path: Path, limit: int) -> None:
    import pstats

    print(f"\ncProfile of the car-twisted server ({path}), top {limit} by self time:")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats("car_twisted", limit)


def check_run_files(res: dict, files: dict, server: Server) -> None:
    """
    Attach the run-file growth to C{res} and check it holds every
    acknowledged turn: one line per turn plus a ``started`` and an ``ended``
    record per run (every run the load generator opened it also completed).
    The daemon acks only after writing, and the load generator has seen
    every ack by now, so fewer lines means an acked batch is missing.
    """
    res["files"] = files
    expected = res["turns_acked"] + res["runs_started"] + res["runs_completed"]
    res["files"]["lines_expected"] = expected
    if files["jsonl_lines"] < expected:
        raise BenchError(f"run files hold {files['jsonl_lines']} records, fewer than the "
                         f"{expected} acknowledged (turns + started + ended){server.log_tail()}")
    res["bytes_per_turn"] = files["jsonl_bytes"] / res["turns_acked"] if res["turns_acked"] else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


# -- connections at scale ---------------------------------------------------------

class Holder:
    """
    A ``loadgen.js --mode hold`` process: opens C{conns} connections (at
    most C{window} unauthenticated at once), authenticates them and keeps
    them open and silent until its stdin is closed.
    """

    def __init__(self, node: str, server: Server, token: str, conns: int, window: int,
                 log_dir: Path, cpus: set[int] | None, nofile: int | None,
                 connect_timeout: float = 10.0) -> None:
        self.conns = conns
        # The holder gives up by itself if opening does not progress (see
        # loadgen.js); the runner allows a little more.
        self.ready_timeout = connect_timeout + conns / 50 + 15
        self.cmd = [node, str(LOADGEN), "--mode", "hold", "--url", server.url, "--token", token,
                    "--conns", str(conns), "--open-window", str(window),
                    "--connect-timeout", str(connect_timeout), "--seconds", str(HOLD_CAP_SECONDS)]
        self.log_path = log_dir / "holder.log"
        self.cpus = cpus
        self.nofile = nofile
        self.proc: subprocess.Popen | None = None
        self._buf = b""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> dict:
        """Start it and wait until every connection is authenticated: the ready line."""
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, bufsize=0,
                                         preexec_fn=_child_setup(self.cpus, self.nofile))
        finally:
            log.close()
        line = self._read_line(self.ready_timeout)
        if line.get("event") != "ready":
            raise BenchError(f"the connection holder failed while opening: "
                             f"{json.dumps(line.get('first_error'))} ({json.dumps(line)})")
        return line

    def _read_line(self, timeout: float) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"the connection holder said nothing within {timeout:.0f}s"
                                     f"{self.log_tail()}")
                if not sel.select(left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise BenchError(f"the connection holder exited (status {self.proc.wait()})"
                                     f"{self.log_tail()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise BenchError(f"the connection holder printed {line[:200]!r}") from None

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"the connection holder is not running{self.log_tail()}")

    def cpu_seconds(self) -> float | None:
        return pid_cpu_seconds(self.proc.pid) if self.proc is not None else None

    def stop(self) -> dict:
        """Close its stdin: it closes the connections and reports how they fared."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None
        try:
            proc.stdin.close()
            return self._read_line(30)
        finally:
            self.kill()

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        finally:
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return (f"\n--- {self.log_path} (last {lines} lines) ---\n" + "\n".join(text[-lines:])
                if text else "")


# Longest the holder keeps its connections if the runner never closes its stdin.
HOLD_CAP_SECONDS = 1800


def _wait_quiet(args: argparse.Namespace) -> None:
    if args.pause > 0:
        time.sleep(args.pause)
    if args.quiet_pct > 0:
        idle_busy = wait_until_quiet(args.quiet_pct, args.quiet_timeout)
        if idle_busy is not None and idle_busy >= args.quiet_pct:
            print(f"note: machine still {idle_busy:.0f}% busy after waiting "
                  f"{args.quiet_timeout:g}s; running anyway", file=sys.stderr)


def measured_loadgen(args: argparse.Namespace, server: Server, conns: int, depth: int,
                     token: str, cpus: set[int] | None, label: str,
                     extra: list[str] | None = None, nofile: int | None = None,
                     seconds: float | None = None, holder: Holder | None = None) -> dict:
    """
    One ``bench.echo`` load run after waiting for a quiet machine, re-run
    (up to --retries) when other work disturbed it; with C{holder}, also
    the holder's CPU over the run (it is the runner's child, so not in
    "other").
    """
    for attempt in range(args.retries + 1):
        _wait_quiet(args)
        server.check_alive()
        if holder is not None:
            holder.check_alive()
        h0, t0 = (holder.cpu_seconds() if holder else None), time.monotonic()
        res = run_loadgen(args.node, server, conns, depth, args, token, cpus, "echo", extra,
                          nofile, seconds)
        h1, wall = (holder.cpu_seconds() if holder else None), time.monotonic() - t0
        res["holder_cpu_pct"] = (100.0 * (h1 - h0) / wall
                                 if h0 is not None and h1 is not None else None)
        server.check_alive()
        other = res["other_cpu_pct"]
        res["disturbed"] = other is not None and other > args.max_other
        res["attempt"] = attempt + 1
        holder_cpu = f" holder {_pct(res['holder_cpu_pct'])}" if holder is not None else ""
        print(f"    {label:<34} {conns}x{depth}: {res['rps']:>9.0f} rps  p50 {res['p50_ms']:.3f} ms  "
              f"p99 {res['p99_ms']:.3f} ms  cpu: daemon {_pct(res['server_cpu_pct'])} "
              f"loadgen {_pct(res['loadgen_cpu_pct'])}{holder_cpu} other {_pct(other)}"
              + ("  DISTURBED" if res["disturbed"] else ""), file=sys.stderr)
        if not res["disturbed"]:
            break
    return res


def _cpu_over(server: Server, seconds: float) -> float | None:
    """The daemon's CPU use over the next C{seconds}, % of one core."""
    c0, t0 = server.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    c1, wall = server.cpu_seconds(), time.monotonic() - t0
    return 100.0 * (c1 - c0) / wall if c0 is not None and c1 is not None else None


def _daemon_limits(args: argparse.Namespace) -> list[str]:
    """--limit arguments for car_server.py: room for every connection, then --daemon-limit."""
    limits = [f"max_connections={args.idle_connections + args.active_connections + 64}"]
    limits += args.daemon_limit
    return [a for spec in limits for a in ("--limit", spec)]


def _nofile(args: argparse.Namespace) -> dict[str, int]:
    """Open-file limits for the daemon, the holder and the load generator."""
    n, m = args.idle_connections, args.active_connections
    return {"daemon": n + m + 1024, "holder": n + 1024, "loadgen": m + 1024}


def connections_round(rnd: int, args: argparse.Namespace, token: str, log_dir: Path,
                      server_cpus: set[int] | None, loadgen_cpus: set[int] | None) -> dict:
    """
    One round on a fresh daemon: RSS and a 1x1 probe with no other
    connection; open N idle connections; RSS and the same probe with them
    held; close them; then M connections with one request in flight each.
    """
    n, m = args.idle_connections, args.active_connections
    nofile = _nofile(args)
    server = Server("car", args.python, token, log_dir, server_cpus, None, _daemon_limits(args),
                    nofile=nofile["daemon"])
    holder: Holder | None = None
    out: dict = {"round": rnd, "idle_connections": n, "active_connections": m}
    try:
        server.start()
        pid = server.proc.pid
        out["daemon_pid_nofile"] = nofile_limit(pid)
        print(f"round {rnd + 1}: daemon pid {pid} on {server.url} (open files limit "
              f"{out['daemon_pid_nofile']})", file=sys.stderr)
        if out["daemon_pid_nofile"] is not None and out["daemon_pid_nofile"] < nofile["daemon"]:
            print(f"note: the daemon's open-file limit is {out['daemon_pid_nofile']}, below the "
                  f"{nofile['daemon']} wanted (the hard limit, which this user may not raise)",
                  file=sys.stderr)
        time.sleep(args.settle)
        out["rss_start_kib"] = rss_kib(pid)
        out["probe_0"] = measured_loadgen(args, server, 1, 1, token, loadgen_cpus,
                                          "probe, 0 idle", seconds=args.probe_seconds)
        out["idle_cpu_pct_0"] = _cpu_over(server, min(args.idle_seconds, 5.0))
        out["rss_before_kib"] = rss_kib(pid)
        out["fds_before"] = fd_count(pid)

        _wait_quiet(args)
        holder = Holder(args.node, server, token, n, args.open_window, log_dir, loadgen_cpus,
                        nofile["holder"])
        c0, t0 = server.cpu_seconds(), time.monotonic()
        ready = holder.start()
        wall = time.monotonic() - t0
        c1 = server.cpu_seconds()
        ready["holder_pid_nofile"] = nofile_limit(holder.pid)
        ready["wall_s"] = wall
        ready["daemon_cpu_s"] = c1 - c0 if c0 is not None and c1 is not None else None
        ready["daemon_us_per_conn"] = (1e6 * ready["daemon_cpu_s"] / n
                                       if ready["daemon_cpu_s"] is not None else None)
        ready["holder_cpu_s"] = holder.cpu_seconds()
        out["open"] = ready
        print(f"    opened {n} connections in {ready['open_s']:.1f} s ({ready['opened_per_s']:.0f}/s, "
              f"auth p50 {ready['auth_p50_ms']:.1f} ms p99 {ready['auth_p99_ms']:.1f} ms, "
              f"daemon {ready['daemon_us_per_conn'] or 0:.0f} us CPU each)", file=sys.stderr)
        time.sleep(args.settle)
        out["rss_after_kib"] = rss_kib(pid)
        out["fds_after"] = fd_count(pid)
        if out["rss_after_kib"] is not None and out["rss_before_kib"] is not None:
            out["rss_per_conn_bytes"] = 1024.0 * (out["rss_after_kib"] - out["rss_before_kib"]) / n
        print(f"    daemon RSS {out['rss_before_kib'] / 1024:.1f} -> {out['rss_after_kib'] / 1024:.1f} "
              f"MiB ({out.get('rss_per_conn_bytes', 0) / 1024:.1f} KiB per connection), "
              f"{out['fds_after']} fds", file=sys.stderr)
        out["probe_n"] = measured_loadgen(args, server, 1, 1, token, loadgen_cpus,
                                          f"probe, {n} idle", seconds=args.probe_seconds,
                                          holder=holder)
        out["idle_cpu_pct_n"] = _cpu_over(server, args.idle_seconds)
        out["rss_after_probe_kib"] = rss_kib(pid)
        holder.check_alive()
        hold = out["hold"] = holder.stop()
        holder = None
        if hold.get("event") != "done" or hold.get("errors") or hold.get("closed_by_server") \
                or hold.get("held_at_end") != n:
            raise BenchError(f"the idle connections did not all stay open: {json.dumps(hold)}"
                             f"{server.log_tail()}")
        time.sleep(args.settle)
        out["rss_after_close_kib"] = rss_kib(pid)

        if m:
            out["active"] = measured_loadgen(
                args, server, m, 1, token, loadgen_cpus, f"{m} connections x 1 in flight",
                extra=["--open-window", str(args.open_window)], nofile=nofile["loadgen"])
            if out["active"]["loadgen_cpu_pct"] > 90:
                print(f"note: the load generator used {out['active']['loadgen_cpu_pct']:.0f}% of a "
                      f"CPU in the {m}x1 phase: it may be the bottleneck", file=sys.stderr)
            out["rss_after_active_kib"] = rss_kib(pid)
    finally:
        if holder is not None:
            holder.kill()
        server.stop()
    return out


def _signal_snapshot(server: Server, directory: Path, n: int, timeout: float = 300.0) -> dict:
    """SIGUSR1 the tracemalloc'd daemon and wait for its snapshot C{n}."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    names = (directory / f"snapshot-{n}.pickle", directory / f"types-{n}.json")
    while not all(p.exists() for p in names):
        server.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"heap snapshot {n} not written within {timeout:.0f}s{server.log_tail()}")
        time.sleep(0.1)
    return {"rss_kib": rss_kib(server.proc.pid)}


def _short_path(filename: str) -> str:
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    root = str(HERE.parent) + os.sep
    if filename.startswith(root):
        return filename[len(root):]
    return filename


def heap_diagnostic(args: argparse.Namespace, token: str, log_dir: Path,
                    server_cpus: set[int] | None, loadgen_cpus: set[int] | None) -> dict:
    """
    One extra launch of the daemon under tracemalloc: heap snapshots before
    and after opening the N idle connections, compared by allocation site
    (file:line); also the growth of live objects per type.
    """
    import linecache
    import tracemalloc

    n = args.idle_connections
    nofile = _nofile(args)
    snap_dir = Path(tempfile.mkdtemp(prefix="car-bench-heap-"))
    server = Server("car", args.python, token, log_dir, server_cpus, None,
                    _daemon_limits(args) + ["--tracemalloc", str(snap_dir)], nofile=nofile["daemon"])
    holder: Holder | None = None
    out: dict = {"idle_connections": n}
    try:
        server.start()
        print(f"heap diagnostic: tracemalloc'd daemon pid {server.proc.pid}", file=sys.stderr)
        time.sleep(args.settle)
        out["before"] = _signal_snapshot(server, snap_dir, 0)
        holder = Holder(args.node, server, token, n, args.open_window, log_dir, loadgen_cpus,
                        nofile["holder"])
        out["open"] = holder.start()
        time.sleep(args.settle)
        out["after"] = _signal_snapshot(server, snap_dir, 1)
        hold = out["hold"] = holder.stop()
        holder = None
        if hold.get("closed_by_server") or hold.get("held_at_end") != n:
            raise BenchError(f"the idle connections did not all stay open: {json.dumps(hold)}")
        s0 = tracemalloc.Snapshot.load(str(snap_dir / "snapshot-0.pickle"))
        s1 = tracemalloc.Snapshot.load(str(snap_dir / "snapshot-1.pickle"))
        types0 = json.loads((snap_dir / "types-0.json").read_text())
        types1 = json.loads((snap_dir / "types-1.json").read_text())
    finally:
        if holder is not None:
            holder.kill()
        server.stop()
        shutil.rmtree(snap_dir, ignore_errors=True)
    skip = [tracemalloc.Filter(False, "*/tracemalloc.py"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
            tracemalloc.Filter(False, "<unknown>")]
    s0, s1 = s0.filter_traces(skip), s1.filter_traces(skip)
    diffs = s1.compare_to(s0, "lineno")
    total = sum(d.size_diff for d in diffs)
    out["traced_bytes_per_conn"] = total / n
    out["traced_blocks_per_conn"] = sum(d.count_diff for d in diffs) / n
    out["rss_per_conn_bytes"] = (1024.0 * (out["after"]["rss_kib"] - out["before"]["rss_kib"]) / n
                                 if out["after"]["rss_kib"] and out["before"]["rss_kib"] else None)
    sites = []
    for d in sorted(diffs, key=lambda d: d.size_diff, reverse=True)[:args.heap_top]:
        frame = d.traceback[0]
        sites.append({
            "site": f"{_short_path(frame.filename)}:{frame.lineno}",
            "bytes_per_conn": d.size_diff / n,
            "blocks_per_conn": d.count_diff / n,
            "bytes_total": d.size_diff,
            "share_pct": 100.0 * d.size_diff / total if total else None,
            "code": linecache.getline(frame.filename, frame.lineno).strip(),
        })
    out["top_sites"] = sites
    growth = sorted(((name, types1.get(name, 0) - types0.get(name, 0)) for name in types1),
                    key=lambda kv: kv[1], reverse=True)
    out["objects_per_conn"] = sum(types1.values()) / n - sum(types0.values()) / n
    out["top_types"] = [{"type": name, "per_conn": delta / n}
                        for name, delta in growth[:args.heap_top] if delta > 0]
    return out


def _stat(values) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


def summarize_connections(rounds: list[dict]) -> dict:
    """Medians with [min, max] over the rounds of every figure the table shows."""
    def get(path: str):
        out = []
        for r in rounds:
            v = r
            for key in path.split("."):
                v = v.get(key) if isinstance(v, dict) else None
            out.append(v)
        return out

    kib_to_mib = lambda vs: [v / 1024 if v is not None else None for v in vs]  # noqa: E731
    p99_ratio = [a / b for a, b in zip(get("probe_n.p99_ms"), get("probe_0.p99_ms"), strict=True)
                 if a is not None and b]
    p50_ratio = [a / b for a, b in zip(get("probe_n.p50_ms"), get("probe_0.p50_ms"), strict=True)
                 if a is not None and b]
    s = {
        "rounds": len(rounds),
        "rss_start_mib": _stat(kib_to_mib(get("rss_start_kib"))),
        "rss_before_mib": _stat(kib_to_mib(get("rss_before_kib"))),
        "rss_after_mib": _stat(kib_to_mib(get("rss_after_kib"))),
        "rss_after_probe_mib": _stat(kib_to_mib(get("rss_after_probe_kib"))),
        "rss_after_close_mib": _stat(kib_to_mib(get("rss_after_close_kib"))),
        "rss_per_conn_kib": _stat(v / 1024 if v is not None else None
                                  for v in get("rss_per_conn_bytes")),
        "fds_after": _stat(get("fds_after")),
        "open_s": _stat(get("open.open_s")),
        "opened_per_s": _stat(get("open.opened_per_s")),
        "open_auth_p50_ms": _stat(get("open.auth_p50_ms")),
        "open_auth_p99_ms": _stat(get("open.auth_p99_ms")),
        "open_daemon_us_per_conn": _stat(get("open.daemon_us_per_conn")),
        "idle_cpu_pct_0": _stat(get("idle_cpu_pct_0")),
        "idle_cpu_pct_n": _stat(get("idle_cpu_pct_n")),
        "pings_per_conn": _stat(p / n if p is not None and n else None
                                for p, n in zip(get("hold.pings"), get("idle_connections"), strict=True)),
        "p99_ratio": _stat(p99_ratio),
        "p50_ratio": _stat(p50_ratio),
    }
    for key in ("probe_0", "probe_n", "active"):
        s[key] = {f: _stat(get(f"{key}.{f}")) for f in
                  ("rps", "p50_ms", "p99_ms", "max_ms", "server_cpu_pct", "loadgen_cpu_pct",
                   "holder_cpu_pct", "other_cpu_pct", "server_us_per_op")}
    p0, pn = s["probe_0"]["p99_ms"], s["probe_n"]["p99_ms"]
    if p0 and pn:
        s["p99_ratio_of_medians"] = pn["median"] / p0["median"]
    if s["rss_after_mib"]:
        s["rss_after_under_1gib"] = s["rss_after_mib"]["max"] < 1024
    if s["p99_ratio"]:
        s["p99_ratio_within_2x"] = s["p99_ratio"]["median"] <= 2.0
    return s


def _med(st: dict | None, key: str = "median") -> float | None:
    return None if st is None else st[key]


def _ms(st: dict | None, fmt: str = ".3f") -> str:
    if st is None:
        return "-"
    return f"{st['median']:{fmt}} [{st['min']:{fmt}}-{st['max']:{fmt}}]"


def print_connections_table(summary: dict, heap: dict | None, args: argparse.Namespace,
                            out=sys.stdout) -> None:
    n, m = args.idle_connections, args.active_connections
    s = summary
    print(file=out)
    print(f"connections: {n} authenticated idle connections (session.auth + server.handshake, "
          f"then silent; opened {args.open_window} unauthenticated at a time) on a fresh daemon per "
          f"round; median [min-max] over {s['rounds']} round(s)", file=out)
    print(f"  daemon RSS MiB: at start {_ms(s['rss_start_mib'], '.1f')}, before "
          f"{_ms(s['rss_before_mib'], '.1f')}, with {n} idle {_ms(s['rss_after_mib'], '.1f')}, "
          f"after the probe {_ms(s['rss_after_probe_mib'], '.1f')}, after closing them "
          f"{_ms(s['rss_after_close_mib'], '.1f')}", file=out)
    ok = s.get("rss_after_under_1gib")
    print(f"  RSS per idle connection: {_ms(s['rss_per_conn_kib'], '.1f')} KiB "
          f"(target: RSS < 1 GiB with {n}: {'met' if ok else 'NOT met' if ok is not None else '-'})",
          file=out)
    print(f"  opening: {_ms(s['opened_per_s'], '.0f')} connections/s, session.auth answered "
          f"p50 {_ms(s['open_auth_p50_ms'], '.1f')} ms p99 {_ms(s['open_auth_p99_ms'], '.1f')} ms "
          f"after connect, daemon CPU {_ms(s['open_daemon_us_per_conn'], '.0f')} us per connection",
          file=out)
    print(f"  daemon CPU while nothing is sent: {_ms(s['idle_cpu_pct_0'], '.1f')} % with 0 idle, "
          f"{_ms(s['idle_cpu_pct_n'], '.1f')} % with {n} (keep-alive pings: "
          f"{_ms(s['pings_per_conn'], '.1f')} per connection while held)", file=out)
    print(file=out)
    print(f"  one active connection, bench.echo 1x1 for {args.probe_seconds:g}s after "
          f"{args.warmup:g}s warm-up:", file=out)
    header = (f"  {'':<14} {'rps':>22} {'p50 ms':>24} {'p99 ms':>24} {'max ms':>22} "
              f"{'daemon cpu':>11} {'loadgen':>8} {'holder':>7} {'other':>6}")
    print(header, file=out)
    for key, label in (("probe_0", "0 idle"), ("probe_n", f"{n} idle")):
        p = s[key]
        print(f"  {label:<14} {_ms(p['rps'], '.0f'):>22} {_ms(p['p50_ms']):>24} "
              f"{_ms(p['p99_ms']):>24} {_ms(p['max_ms'], '.2f'):>22} "
              f"{_pct(_med(p['server_cpu_pct'])):>11} {_pct(_med(p['loadgen_cpu_pct'])):>8} "
              f"{_pct(_med(p['holder_cpu_pct'])):>7} {_pct(_med(p['other_cpu_pct'], 'max')):>6}",
              file=out)
    within = s.get("p99_ratio_within_2x")
    print(f"  p99 with {n} idle / with 0 idle: {_ms(s['p99_ratio'], '.2f')} per round, "
          f"{s.get('p99_ratio_of_medians', float('nan')):.2f} as the ratio of the medians "
          f"(target <= 2x: {'met' if within else 'NOT met' if within is not None else '-'}); "
          f"p50: {_ms(s['p50_ratio'], '.2f')}", file=out)
    a = s["active"]
    if a["rps"] is not None:
        print(file=out)
        print(f"  {m} connections, 1 bench.echo in flight on each ({args.seconds:g}s after "
              f"{args.warmup:g}s warm-up): {_ms(a['rps'], '.0f')} rps, p50 {_ms(a['p50_ms'])} ms, "
              f"p99 {_ms(a['p99_ms'])} ms; daemon {_pct(_med(a['server_cpu_pct']))} "
              f"({_ms(a['server_us_per_op'], '.1f')} us/request), load generator "
              f"{_pct(_med(a['loadgen_cpu_pct']))}, other (max) "
              f"{_pct(_med(a['other_cpu_pct'], 'max'))}", file=out)
    if heap is not None:
        print(file=out)
        print(f"  what grows per idle connection (one extra launch under tracemalloc, 1 frame; "
              f"snapshots before / after opening {n}, after a full collection): traced "
              f"{heap['traced_bytes_per_conn']:.0f} B and {heap['traced_blocks_per_conn']:.1f} "
              f"blocks per connection; RSS {(heap['rss_per_conn_bytes'] or 0) / 1024:.1f} KiB "
              f"(tracemalloc's own overhead included); {heap['objects_per_conn']:.1f} gc-tracked "
              f"objects", file=out)
        print(f"  {'B/conn':>8} {'blocks':>7} {'share':>6}  site", file=out)
        for site in heap["top_sites"]:
            print(f"  {site['bytes_per_conn']:>8.0f} {site['blocks_per_conn']:>7.2f} "
                  f"{site['share_pct']:>5.1f}%  {site['site']}  {site['code'][:90]}", file=out)
        print("  gc-tracked objects per connection, by type: " + ", ".join(
            f"{t['type']} {t['per_conn']:.2f}" for t in heap["top_types"]), file=out)
    print(file=out)


def main_connections(args: argparse.Namespace, env: dict, token: str, log_dir: Path,
                     server_cpus: set[int] | None, loadgen_cpus: set[int] | None) -> int:
    rounds: list[dict] = []
    heap: dict | None = None
    failed = False

    def on_sigterm(signum, frame):  # make `kill <runner>` clean up like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for rnd in range(args.repeat):
            rounds.append(connections_round(rnd, args, token, log_dir, server_cpus, loadgen_cpus))
        if args.heap_diagnostic:
            heap = heap_diagnostic(args, token, log_dir, server_cpus, loadgen_cpus)
    except BenchError as e:
        failed = True
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = True
        print("interrupted; stopping the servers", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not rounds:
        print(f"logs kept in {log_dir}", file=sys.stderr)
        return 1
    summary = summarize_connections(rounds)
    print_connections_table(summary, heap, args)
    if args.json is not None:
        doc = {
            "config": {
                "scenario": "connections",
                "idle_connections": args.idle_connections,
                "active_connections": args.active_connections,
                "open_window": args.open_window,
                "probe_seconds": args.probe_seconds,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "idle_seconds": args.idle_seconds,
                "repeat": args.repeat,
                "daemon_limits": _daemon_limits(args)[1::2],
                "open_file_limits": _nofile(args),
                "pinned": bool(args.pin),
                "complete": not failed,
            },
            "environment": env,
            "summary": summary,
            "heap": heap,
            "rounds": rounds,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    if failed:
        print(f"logs kept in {log_dir}", file=sys.stderr)
        return 1
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


# -- main -----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="JSON-RPC over WebSocket throughput: car-twisted vs bare Autobahn and websockets.")
    p.add_argument("--scenario", choices=("throughput", "callback", "runs", "connections"),
                   default="throughput",
                   help="throughput: bench.echo on every server (default); callback: the "
                        "car server only, proposal.submit with one tool_call next to one and "
                        "two sequential bench.echo requests; runs: the car server only, "
                        "runs.record_turns batches acked once written to the run file; "
                        "connections: the car server only, RSS and bench.echo latency with N "
                        "idle authenticated connections held, then M connections x 1 in flight")
    p.add_argument("--idle-connections", type=int, default=10_000, metavar="N",
                   help="with --scenario connections: idle connections held (default 10000)")
    p.add_argument("--active-connections", type=int, default=1000, metavar="M",
                   help="with --scenario connections: connections of the second phase, one "
                        "request in flight on each (default 1000; 0: skip)")
    p.add_argument("--open-window", type=int, default=32, metavar="W",
                   help="with --scenario connections: connections opened and not yet "
                        "authenticated at once (default 32; the daemon admits 64 guests per "
                        "peer by default and drops the oldest beyond)")
    p.add_argument("--probe-seconds", type=float, default=30.0,
                   help="with --scenario connections: measured seconds of each 1x1 probe "
                        "(default 30: the daemon pings every connection every 30 s)")
    p.add_argument("--idle-seconds", type=float, default=30.0,
                   help="with --scenario connections: window for the daemon's CPU use while "
                        "nothing is sent, with the N idle connections held (default 30: every "
                        "connection is pinged once in it; with 0 idle the window is at most 5 s)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="with --scenario connections: seconds to wait before reading RSS "
                        "(default 2)")
    p.add_argument("--daemon-limit", action="append", default=[], metavar="NAME=VALUE",
                   help="with --scenario connections: one more of the daemon's bounds (as twist "
                        "car --limit; repeatable); max_connections is raised to N + M + 64")
    p.add_argument("--no-heap-diagnostic", dest="heap_diagnostic", action="store_false",
                   help="with --scenario connections: skip the extra tracemalloc launch")
    p.add_argument("--heap-top", type=int, default=15,
                   help="with --scenario connections: allocation sites to print (default 15)")
    p.add_argument("--batches", type=parse_batches, default=[1, 256],
                   help="with --scenario runs: comma-separated turns per batch (default 1,256)")
    p.add_argument("--stalled-subscribers", type=parse_counts, default=[0], metavar="K,...",
                   help="with --scenario runs: comma-separated counts of host connections per "
                        "run that subscribe to it and never read (default 0; e.g. 0,2: both, "
                        "round-robin)")
    p.add_argument("--reading-subscribers", type=parse_counts, default=[], metavar="K,...",
                   help="with --scenario runs: control cells, K subscribers per run that read "
                        "(and discard) everything (default none)")
    p.add_argument("--keep-run-files", action="store_true",
                   help="with --scenario runs: keep the run files until the end (default: "
                        "delete each run's files of ended runs once counted)")
    p.add_argument("--output-bytes", type=int, default=1,
                   help="with --scenario runs: characters in each turn's output (default 1)")
    p.add_argument("--modes", type=choice_list("mode", MODES), default=list(MODES),
                   help="with --scenario callback: comma-separated subset of "
                        "echo,echo2,callback (default all)")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma-separated CONNSxDEPTH shapes (default 16x8,1x1; "
                        "16x4,1x1 with --scenario callback; 1x1,4x4 with --scenario runs)")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run (default 4)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="round-robin rounds (default 3)")
    p.add_argument("--servers", type=choice_list("server", SERVERS), default=None,
                   help="comma-separated subset of car,autobahn,websockets,websockets-tuned "
                        "(default all; the other scenarios use car only)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--pause", type=float, default=0.5, help="idle seconds between runs (default 0.5)")
    p.add_argument("--quiet-pct", type=float, default=20.0,
                   help="before each run, wait until the machine is below this %% of one CPU "
                        "busy (0: don't wait; default 20)")
    p.add_argument("--quiet-timeout", type=float, default=120.0,
                   help="longest wait for a quiet machine, seconds (default 120)")
    p.add_argument("--max-other", type=float, default=20.0,
                   help="a run during which other work used more than this %% of one CPU is "
                        "'disturbed' and retried (default 20)")
    p.add_argument("--retries", type=int, default=3,
                   help="re-runs of a disturbed run; the last attempt counts (default 3)")
    p.add_argument("--max-requests", type=int, default=20_000_000,
                   help="cap on requests sent per run (default 20M)")
    p.add_argument("--pin", action="store_true",
                   help="pin servers and the load generator to separate CPUs")
    p.add_argument("--server-cpus", type=parse_cpus, default={0}, help="CPUs for servers with --pin")
    p.add_argument("--loadgen-cpus", type=parse_cpus, default={1}, help="CPUs for node with --pin")
    p.add_argument("--python", default=sys.executable, help="interpreter for the servers")
    p.add_argument("--node", default="node")
    p.add_argument("--npm", default="npm")
    p.add_argument("--server-nodelay", action="store_true",
                   help="what-if: the car server sets TCP_NODELAY on accepted sockets "
                        "(the daemon itself leaves Nagle on)")
    p.add_argument("--profile", type=Path, metavar="PATH",
                   help="run the car-twisted server under cProfile, write its stats to PATH "
                        "and print the top entries (the figures are then distorted)")
    p.add_argument("--profile-top", type=int, default=30)
    args = p.parse_args(argv)
    callback = args.scenario == "callback"
    runs_scn = args.scenario == "runs"
    conns_scn = args.scenario == "connections"
    if args.shapes is None:
        args.shapes = parse_shapes(DEFAULT_SHAPES[args.scenario])
    if conns_scn and (args.idle_connections < 1 or args.active_connections < 0
                      or args.open_window < 1 or args.probe_seconds <= 0
                      or args.idle_seconds <= 0 or args.settle < 0 or args.profile is not None):
        p.error("--scenario connections needs --idle-connections >= 1, --active-connections "
                ">= 0, --open-window >= 1, --probe-seconds and --idle-seconds > 0, and no "
                "--profile")
    if callback or runs_scn or conns_scn:
        if args.servers is not None and args.servers != ["car"]:
            p.error(f"--scenario {args.scenario} runs the car server only "
                    f"(--servers car, or leave it out)")
        args.servers = ["car"]
    elif args.servers is None:
        args.servers = list(SERVERS)
    if args.repeat < 1 or args.seconds <= 0 or args.warmup < 0 or args.max_requests < 1 \
            or args.retries < 0:
        p.error("--repeat and --max-requests must be >= 1, --seconds > 0, "
                "--warmup and --retries >= 0")
    if not 1 <= args.output_bytes <= 16384:
        p.error("--output-bytes must be 1..16384 (the daemon truncates longer strings)")
    if not runs_scn and (args.stalled_subscribers != [0] or args.reading_subscribers):
        p.error("--stalled-subscribers and --reading-subscribers need --scenario runs")
    if args.profile is not None and "car" not in args.servers:
        p.error("--profile needs the car server in --servers")

    if shutil.which(args.node) is None:
        print(f"error: {args.node!r} not found on PATH (Node.js >= 18 is required)", file=sys.stderr)
        return 2
    for name, needs in (("websockets", ("websockets",)),
                        ("websockets-tuned", ("websockets", "uvloop", "orjson"))):
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if name in args.servers and missing and args.python == sys.executable:
            print(f"error: {', '.join(missing)} missing for {name} (pip install "
                  f"'car-twisted[bench]', or use 'tox -e bench'), or leave it out with --servers",
                  file=sys.stderr)
            return 2
    ensure_node_modules(args.npm)

    server_cpus = args.server_cpus if args.pin else None
    loadgen_cpus = args.loadgen_cpus if args.pin else None
    env = environment(args.node)
    if env["loadavg_at_start"] and env["loadavg_at_start"][0] > 0.5:
        print(f"note: load average {env['loadavg_at_start'][0]:.2f} before starting; "
              f"other work on the machine will add noise", file=sys.stderr)

    token = secrets.token_hex(16)
    if conns_scn:
        return main_connections(args, env, token, Path(tempfile.mkdtemp(prefix="car-bench-logs-")),
                                server_cpus, loadgen_cpus)
    host_token = secrets.token_hex(16)
    with_subscribers = runs_scn and (any(args.stalled_subscribers) or any(args.reading_subscribers))
    log_dir = Path(tempfile.mkdtemp(prefix="car-bench-logs-"))
    # runs: the daemon's CAR_HOME is ours, so its run files can be measured.
    car_home = Path(tempfile.mkdtemp(prefix="car-bench-home-")) if runs_scn else None
    run_files = RunFiles(car_home / "runs") if car_home is not None else None
    servers: dict[str, Server] = {}
    runs: list[dict] = []

    def on_sigterm(signum, frame):  # make `kill <runner>` clean up like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    failed = False
    try:
        for name in args.servers:
            profile = args.profile.resolve() if (name == "car" and args.profile) else None
            extra = []
            if name == "car" and car_home is not None:
                extra += ["--agent-token", token, "--car-home", str(car_home)]
                # The runner deletes the run files it has counted, behind the
                # daemon's back: lift the store's quota and retention, or the
                # daemon, still booking the deleted bytes, prunes runs of the
                # measurement before they are counted.
                for spec in RUNS_STORE_LIMITS:
                    extra += ["--limit", spec]
                if with_subscribers:
                    extra += ["--host-token", host_token]
            if name == "car" and args.server_nodelay:
                extra += ["--tcp-nodelay"]
            server = Server(name, args.python, token, log_dir, server_cpus, profile, extra)
            servers[name] = server
            server.start()
            print(f"started {server.label} (pid {server.proc.pid}) on {server.url}", file=sys.stderr)

        # One cell = one server driven in one loadgen mode.
        if runs_scn:
            cells = [("car", runs_cell(b, k, False)) for b in args.batches
                     for k in dict.fromkeys(args.stalled_subscribers)]
            cells += [("car", runs_cell(b, k, True)) for b in args.batches
                      for k in dict.fromkeys(args.reading_subscribers) if k]
        elif callback:
            cells = [("car", m) for m in args.modes]
        else:
            cells = [(name, "echo") for name in args.servers]
        total = args.repeat * len(args.shapes) * len(cells)
        n = 0
        for rnd in range(args.repeat):
            # Rotate the cell order each round so no server/mode always runs first.
            order = cells[rnd % len(cells):] + cells[:rnd % len(cells)]
            for conns, depth in args.shapes:
                for name, mode in order:
                    server = servers[name]
                    if runs_scn:
                        batch, subs, reading = parse_runs_cell(mode)
                        label = "runs " + runs_label(batch, subs, reading)
                        lg_mode, lg_extra = "runs", ["--batch", str(batch),
                                                     "--run-limit", str(RUN_TURN_LIMIT),
                                                     "--output-bytes", str(args.output_bytes)]
                        if args.output_bytes > 1:
                            lg_extra += ["--zero-mask", "1"]
                        if subs:
                            lg_extra += ["--stalled-subscribers", str(subs),
                                         "--host-token", host_token,
                                         "--subscribers-read", str(int(reading))]
                    else:
                        label = MODES[mode] if callback else server.label
                        lg_mode, lg_extra = mode, None
                    n += 1
                    for attempt in range(args.retries + 1):
                        if args.pause > 0:
                            time.sleep(args.pause)
                        if args.quiet_pct > 0:
                            idle_busy = wait_until_quiet(args.quiet_pct, args.quiet_timeout)
                            if idle_busy is not None and idle_busy >= args.quiet_pct:
                                print(f"note: machine still {idle_busy:.0f}% busy after waiting "
                                      f"{args.quiet_timeout:g}s; running anyway", file=sys.stderr)
                        server.check_alive()
                        if run_files is not None:
                            run_files.delta()  # anything left over is not this run's
                        res = run_loadgen(args.node, server, conns, depth, args, token,
                                          loadgen_cpus, lg_mode, lg_extra)
                        server.check_alive()
                        if run_files is not None:
                            check_run_files(res, run_files.delta(), server)
                            if not args.keep_run_files:
                                res["files"]["deleted_after"] = run_files.discard()
                        other = res["other_cpu_pct"]
                        res["disturbed"] = other is not None and other > args.max_other
                        res["attempt"] = attempt + 1
                        turns = (f"{res['turns_per_s']:>9.0f} turns/s  {res['files']['bytes_written'] / 1e6:.1f} MB  "
                                 if runs_scn else "")
                        print(f"[{n}/{total}] round {rnd + 1} {label:<26} {conns}x{depth}: "
                              f"{turns}{res['rps']:>9.0f} {'batches/s' if runs_scn else 'rps'}  "
                              f"p50 {res['p50_ms']:.3f} ms  "
                              f"p99 {res['p99_ms']:.3f} ms  cpu: server {_pct(res['server_cpu_pct'])} "
                              f"loadgen {_pct(res['loadgen_cpu_pct'])} other {_pct(other)}"
                              + ("  DISTURBED" if res["disturbed"] else ""), file=sys.stderr)
                        if not res["disturbed"]:
                            break
                    res.update(server=name, mode=mode, shape=f"{conns}x{depth}", round=rnd)
                    if runs_scn:
                        res["batch"] = batch
                        res["subscribers"] = subs
                        res["subscribers_read"] = reading
                    runs.append(res)
    except BenchError as e:
        failed = True
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = True
        print("interrupted; stopping the servers", file=sys.stderr)
    finally:
        for server in servers.values():
            try:
                server.stop()
            except Exception as e:  # keep stopping the others
                print(f"warning: could not stop {server.label}: {e}", file=sys.stderr)
        signal.signal(signal.SIGTERM, previous)
        if car_home is not None:
            shutil.rmtree(car_home, ignore_errors=True)

    if not runs:
        print(f"server logs kept in {log_dir}", file=sys.stderr)
        return 1
    if runs_scn:
        summary = summarize_runs(runs, [mode for _, mode in cells], args.shapes)
    elif callback:
        summary = summarize_callback(runs, args.modes, args.shapes)
    else:
        summary = summarize(runs, args.servers, args.shapes)
    if args.profile is not None:
        print("note: the car-twisted server ran under cProfile; its figures are distorted",
              file=sys.stderr)
    if runs_scn:
        print_runs_table(summary, args)
    elif callback:
        print_callback_table(summary, args)
    else:
        print_table(summary, args)
    if args.json is not None:
        doc = {
            "config": {
                "scenario": args.scenario,
                "modes": (args.modes if callback else
                          [mode for _, mode in cells] if runs_scn else ["echo"]),
                "batches": args.batches if runs_scn else None,
                "stalled_subscribers": args.stalled_subscribers if runs_scn else None,
                "reading_subscribers": args.reading_subscribers if runs_scn else None,
                "output_bytes": args.output_bytes if runs_scn else None,
                "keep_run_files": bool(args.keep_run_files) if runs_scn else None,
                "run_turn_limit": RUN_TURN_LIMIT if runs_scn else None,
                "daemon_limits": list(RUNS_STORE_LIMITS) if runs_scn else None,
                "shapes": [f"{c}x{d}" for c, d in args.shapes],
                "seconds": args.seconds,
                "warmup": args.warmup,
                "repeat": args.repeat,
                "servers": args.servers,
                "pinned": bool(args.pin),
                "profiled": args.profile is not None,
                "server_tcp_nodelay": bool(args.server_nodelay),
                "complete": not failed,
            },
            "environment": env,
            "summary": summary,
            "runs": runs,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    if args.profile is not None and args.profile.exists():
        print_profile(args.profile, args.profile_top)
    if failed:
        print(f"server logs kept in {log_dir}", file=sys.stderr)
        return 1
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
