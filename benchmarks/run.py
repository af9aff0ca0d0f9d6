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
}
BASELINES = ("autobahn", "websockets")

# --scenario callback: loadgen modes, measured on the car server only.
# mode -> label; every mode is one "operation" (rps = operations/s).
MODES: dict[str, str] = {
    "echo": "1 echo",
    "echo2": "2 echoes (seq.)",
    "callback": "proposal+callback",
}
DEFAULT_SHAPES = {"throughput": "16x8,1x1", "callback": "16x4,1x1", "runs": "1x1,4x4"}
# The daemon's per-run ceiling (car_twisted.runs.model.RECORD_TURNS_RUN_CEILING).
RUN_TURN_LIMIT = 2000

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


def _child_setup(cpus: set[int] | None):
    """preexec_fn: optional CPU pinning; on Linux, die with the runner."""

    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


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
                 extra_args: list[str] | None = None) -> None:
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
                preexec_fn=_child_setup(self.cpus),
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
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

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
                extra_args: list[str] | None = None) -> dict:
    cmd = [
        node, str(LOADGEN),
        "--mode", mode,
        "--url", server.url,
        "--token", token,
        "--conns", str(conns),
        "--depth", str(depth),
        "--seconds", str(args.seconds),
        "--warmup", str(args.warmup),
        "--max-requests", str(args.max_requests),
    ] + (extra_args or [])
    limit = args.warmup + args.seconds + 40
    server_cpu0 = server.cpu_seconds()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    exclude = {server.proc.pid} if server.proc is not None else set()
    procs0 = process_cpu_seconds(exclude)
    busy0 = system_busy_seconds()
    wall0 = time.monotonic()
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=limit, preexec_fn=_child_setup(cpus))
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
                     ("car-twisted", "twisted", "autobahn", "websockets", "orjson")},
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
            ut, ub = row["server_us_per_turn"], base["server_us_per_turn"]
            ratios.append({
                "shape": shape, "batch": b, "subscribers": k, "subscribers_read": reading,
                "label": runs_label(b, k, reading),
                "turns_per_s": row["turns_per_s"] / base["turns_per_s"],
                "turns_per_s_paired_median": statistics.median(paired) if paired else None,
                "turns_per_s_paired": paired,
                "p50": row["p50_ms"] / base["p50_ms"],
                "p99": row["p99_ms"] / base["p99_ms"],
                "server_us_per_turn": ut / ub if ut and ub else None,
            })
    return {"rows": rows, "ratios": ratios}


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
        cols = [b for b in BASELINES if any(f"car/{b}" in e for e in summary["ratios"])]
        print(f"{'shape':>6} " + " ".join(f"{'car/' + b + ' rps':>20}" for b in cols), file=out)
        for e in summary["ratios"]:
            cells = []
            for b in cols:
                v = e.get(f"car/{b}")
                cells.append(f"{v:>20.2f}" if v is not None else f"{'-':>20}")
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


# -- main -----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="JSON-RPC over WebSocket throughput: car-twisted vs bare Autobahn and websockets.")
    p.add_argument("--scenario", choices=("throughput", "callback", "runs"), default="throughput",
                   help="throughput: bench.echo on every server (default); callback: the "
                        "car server only, proposal.submit with one tool_call next to one and "
                        "two sequential bench.echo requests; runs: the car server only, "
                        "runs.record_turns batches acked once written to the run file")
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
                   help="comma-separated subset of car,autobahn,websockets (default all; "
                        "--scenario callback uses car only)")
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
    if args.shapes is None:
        args.shapes = parse_shapes(DEFAULT_SHAPES[args.scenario])
    if callback or runs_scn:
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
    if "websockets" in args.servers and importlib.util.find_spec("websockets") is None \
            and args.python == sys.executable:
        print("error: the 'websockets' package is missing (pip install 'car-twisted[bench]', "
              "or use 'tox -e bench'), or leave it out with --servers car,autobahn",
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
