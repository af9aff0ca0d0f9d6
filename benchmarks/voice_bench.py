#!/usr/bin/env python3
"""
Voice transcription through the daemon (on demand): how fast pocketsphinx
runs in a real ``twist car``, and what two busy streams do to everyone
else's round trips.

    python benchmarks/voice_bench.py                          # 60 s of speech per stream
    python benchmarks/voice_bench.py --seconds 30 --probe-interval 0.002 --json out.json
    python benchmarks/voice_bench.py --limit voice_workers=1  # any twist car --limit

One daemon subprocess (``twist car``, fresh temporary ``CAR_HOME``, a free
loopback TCP port, auth on; the ``Daemon`` of ``memory_wire_bench``) and
``websockets`` clients (asyncio, compression off) authenticated with the
daemon's token.  The speech is made once, before anything is measured:
a few sentences said by ``espeak-ng -v en-us`` (22050 Hz), resampled to
16 kHz with the daemon's own ``StreamResampler``, each after 0.8 s of
silence, cycled to ``--seconds`` of audio, over a faint noise floor
(espeak-ng's pauses are exact zeros, which no microphone gives and which
throw pocketsphinx's cepstral mean normalisation).

A warm-up stream (2 s of the speech) comes first: the daemon imports
pocketsphinx on its first stream.  Then:

(a) **real-time factor**: one stream (``voice.transcribe_stream.start``
    ``pcm_push`` 16 kHz mono) gets the whole audio by base64
    ``voice.transcribe_stream.push`` in 0.5 s pushes, as fast as the
    replies come, so far faster than real time.  A push past the
    stream's buffer (30 s of audio) is refused with ``-32603``
    ``data.reason: "overrun"`` and queues nothing: the pusher waits
    ``--backoff`` seconds and sends the same chunk again (the count of
    refusals is reported).  Then ``stop``.  Measured from the first push
    to the stop's reply: the daemon's CPU (utime + stime of
    ``/proc/<pid>/stat``, every thread) and, apart, the CPU of its pool
    threads (``/proc/<pid>/task/*/stat`` less the main thread), where the
    recognizer runs (the memory write-back of the transcript's facts runs
    there too, a few milliseconds).  **RTF** = audio seconds / pool CPU
    seconds (how many seconds of speech one CPU second recognises; above
    1 is faster than real time); also audio / whole-daemon CPU and audio
    / wall.  The stream's open (the model load) is measured apart.
    **Words** is the share of the spoken words the transcript holds
    (bag of words, each counted at most as often as it was said).

(b) **reactor latency under load**: a third connection runs a
    ``state.get {key}`` loop, one request at a time, ``--probe-interval``
    seconds between a reply and the next request: first for
    ``--idle-seconds`` with nothing else going on, then while two streams
    on two other connections transcribe the same audio at once, pushed as
    in (a) (their model loads are not in the window).  Per phase:
    round-trip p50 / p99 / max (client wall clock), and over the slowest
    1 % of calls the reactor thread's time on a CPU, waiting for one,
    and neither (``/proc/<pid>/schedstat`` of the main thread, read
    around each call; "neither" is the round trip less both), which
    tells a reactor busy with work of its own, one waiting for a CPU (two
    recognizer threads on a 2-CPU machine) and one blocked (on the GIL,
    a lock) apart.

Before each phase the runner waits (at most ``--quiet-timeout`` s) until
the machine is quiet (``--quiet-pct``, as ``run.py`` does) and records the
CPU the rest of the machine used meanwhile ("others' CPU", less the daemon
and this runner).

Linux only (``/proc``).  Needs car-twisted with the ``voice`` extra
(pocketsphinx) and ``websockets`` (the ``bench`` extra) in the running
interpreter, whose ``twist`` runs the daemon, and ``espeak-ng`` on
``PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import wave
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from memory_bench import percentile
from memory_wire_bench import CLK_TCK, BenchError, Daemon, environment
from run import system_busy_seconds, wait_until_quiet
from websockets.asyncio.client import ClientConnection, connect

from car_twisted.voice.pocketsphinx_stt import MODEL_SAMPLE_RATE, StreamResampler

RATE = MODEL_SAMPLE_RATE
PUSH_SECS = 0.5
GAP_SECS = 0.8
NOISE = 50.0
STATE_KEY = "voice-bench-probe"
SENTENCES = (
    "the meeting starts at nine tomorrow morning",
    "please send the report to the team before lunch",
    "we need three more servers for the new project",
    "the weather will be cold and windy this weekend",
    "call me back when you have finished the review",
    "one two three four five six seven eight nine ten",
    "the quick brown fox jumps over the lazy dog",
    "turn left at the next light and park near the station",
)


# -- the speech -------------------------------------------------------------------------


def synthesize(espeak: str, work: Path, seconds: float, seed: int) -> tuple[bytes, list[str]]:
    """C{seconds} (at least) of 16 kHz mono s16le speech, and the words said in it."""
    said = []
    resampled = []
    for n, text in enumerate(SENTENCES):
        path = work / f"sentence{n}.wav"
        subprocess.run([espeak, "-w", str(path), "-v", "en-us", "--stdin"], input=text.encode(), check=True,
                       capture_output=True, timeout=60)
        with wave.open(str(path)) as w:
            if (w.getnchannels(), w.getsampwidth()) != (1, 2):
                raise BenchError(f"espeak-ng wrote {w.getnchannels()} channels of {w.getsampwidth()} bytes")
            rate = w.getframerate()
            samples = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
        resampler = StreamResampler(rate, RATE)
        resampled.append(np.concatenate([resampler.feed(samples), resampler.flush()]))
    gap = np.zeros(int(GAP_SECS * RATE))
    parts: list[np.ndarray] = []
    total = 0
    n = 0
    while total < seconds * RATE:
        sentence = resampled[n % len(resampled)]
        parts += [gap, sentence]
        said += SENTENCES[n % len(SENTENCES)].split()
        total += len(gap) + len(sentence)
        n += 1
    parts.append(gap)
    audio = np.concatenate(parts)
    audio += np.random.default_rng(seed).normal(0.0, NOISE, len(audio))
    return np.clip(np.rint(audio), -32768, 32767).astype("<i2").tobytes(), said


def word_share(text: str, said: list[str]) -> float:
    return sum((Counter(text.split()) & Counter(said)).values()) / len(said)


# -- the daemon ---------------------------------------------------------------------------


class VoiceDaemon(Daemon):
    """``memory_wire_bench.Daemon`` with ``--limit NAME=VALUE`` options."""

    def __init__(self, twist: str, home: Path, log_path: Path, limits: list[str]) -> None:
        super().__init__(twist, home, log_path, None, None)
        self.limits = limits

    def argv(self) -> list[str]:
        argv = super().argv()
        for limit in self.limits:
            argv += ["--limit", limit]
        return argv

    def pool_cpu_seconds(self) -> float:
        """utime + stime of every thread of the daemon but the main (reactor) one, and of its recognizer processes."""
        assert self.proc is not None
        pid = self.proc.pid
        total = 0
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError as e:
            raise BenchError(f"cannot list the daemon's threads: {e}{self.log_tail()}") from None
        for tid in tids:
            if tid == str(pid):
                continue
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # a thread that just ended (pool threads live as long as the daemon)
            total += int(fields[11]) + int(fields[12])
        # Recognizers that run in worker processes: the live ones, and (the
        # daemon's cutime + cstime) the ones that ended and were reaped.
        try:
            own = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(own[13]) + int(own[14])
        except (OSError, IndexError):
            pass
        for child in os.listdir("/proc"):
            if not child.isdigit():
                continue
            try:
                fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[1] == str(pid):
                total += int(fields[11]) + int(fields[12])
        return total / CLK_TCK


class Meter:
    """One phase: wall time, the daemon's CPU (all, and its pool threads), others' CPU in % of one CPU."""

    def __init__(self, daemon: VoiceDaemon, args: argparse.Namespace) -> None:
        self.daemon = daemon
        self.args = args
        self.quiet_waits: list[float] = []

    def quiet(self) -> None:
        if self.args.quiet_pct > 0:
            t = time.monotonic()
            busy = wait_until_quiet(self.args.quiet_pct, self.args.quiet_timeout)
            self.quiet_waits.append(time.monotonic() - t)
            if busy is not None and busy >= self.args.quiet_pct:
                print(f"note: the machine is still {busy:.0f} % busy; measuring anyway", file=sys.stderr)

    def start(self) -> None:
        self.cpu0 = self.daemon.cpu_seconds()
        self.pool0 = self.daemon.pool_cpu_seconds()
        self.own0 = time.process_time()
        self.busy0 = system_busy_seconds()
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self.t0
        cpu = self.daemon.cpu_seconds() - self.cpu0
        pool = self.daemon.pool_cpu_seconds() - self.pool0
        own = time.process_time() - self.own0
        busy = system_busy_seconds()
        other = None if busy is None or self.busy0 is None else max(0.0, 100.0 * (busy - self.busy0 - cpu - own) / wall)
        return {"wall_s": wall, "cpu_s": cpu, "pool_cpu_s": pool, "other_pct": other}


# -- the client ---------------------------------------------------------------------------


class Connection:
    """JSON-RPC over one WebSocket: replies matched by id, ``voice.event`` notifications kept."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 1
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, daemon: VoiceDaemon) -> Connection:
        ws = await connect(daemon.url, compression=None, max_size=None, max_queue=None, ping_interval=None, open_timeout=10)
        conn = cls(ws)
        await conn.call("session.auth", {"token": daemon.token})
        return conn

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    continue
                msg = orjson.loads(raw)
                if msg.get("method") == "voice.event":
                    self.events.append(msg["params"])
                    continue
                waiter = self.pending.pop(msg.get("id"), None) if isinstance(msg.get("id"), int) else None
                if waiter is not None:
                    waiter.set_result(msg)
                elif "error" in msg:
                    raise BenchError(f"unexpected error {raw[:300]!r}")
        finally:
            for waiter in self.pending.values():
                if not waiter.done():
                    waiter.set_exception(BenchError("the connection closed"))

    async def request(self, method: str, params: Any = None) -> dict[str, Any]:
        rid = self.next_id
        self.next_id += 1
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = waiter
        await self.ws.send(orjson.dumps(msg), text=True)
        return await waiter

    async def call(self, method: str, params: Any = None) -> Any:
        reply = await self.request(method, params)
        if "error" in reply:
            raise BenchError(f"{method}: {orjson.dumps(reply['error'])[:500].decode()}")
        return reply["result"]

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


async def start(conn: Connection, sid: str) -> None:
    """Open a 16 kHz mono stream (the daemon loads a model for it)."""
    await conn.call("voice.transcribe_stream.start", {"session_id": sid, "audio_source": {"kind": "pcm_push", "sample_rate": RATE}})


async def push_and_stop(conn: Connection, sid: str, chunks: list[str], backoff: float) -> dict[str, Any]:
    overruns = 0
    for chunk in chunks:
        while True:
            reply = await conn.request("voice.transcribe_stream.push", {"session_id": sid, "pcm_b64": chunk})
            if "result" in reply:
                break
            data = reply["error"].get("data") or {}
            if data.get("reason") != "overrun":
                raise BenchError(f"push: {orjson.dumps(reply['error'])[:500].decode()}")
            overruns += 1
            await asyncio.sleep(backoff)
    result = await conn.call("voice.transcribe_stream.stop", {"session_id": sid})
    errors = [e for e in conn.events if e["session_id"] == sid and e["event"].get("type") == "error"]
    if errors or result.get("status") != "stopped":
        raise BenchError(f"stream {sid} ended {result.get('status')}: {errors[:3]}")
    result["overruns"] = overruns
    return result


async def probe(conn: Connection, daemon: VoiceDaemon, interval: float, until: asyncio.Event | float) -> list[tuple[float, float, float]]:
    """
    ``state.get`` one at a time until C{until} (an event set, or a
    duration): (round trip, reactor thread on CPU, its wait for a CPU) of
    each, seconds.
    """
    out = []
    deadline = time.perf_counter() + until if isinstance(until, float) else None
    params = {"key": STATE_KEY}
    while not (until.is_set() if isinstance(until, asyncio.Event) else time.perf_counter() >= deadline):
        run0, wait0 = daemon.schedstat()
        t0 = time.perf_counter()
        await conn.call("state.get", params)
        rtt = time.perf_counter() - t0
        run1, wait1 = daemon.schedstat()
        out.append((rtt, (run1 - run0) / 1e9, (wait1 - wait0) / 1e9))
        if interval > 0:
            await asyncio.sleep(interval)
    return out


def latency_row(phase: str, timed: list[tuple[float, float, float]], meter: dict[str, Any]) -> dict[str, Any]:
    rtt = [t[0] for t in timed]
    slow = sorted(timed, reverse=True)[: max(1, len(timed) // 100)]  # the slowest 1 %
    return {
        "phase": phase,
        "calls": len(timed),
        "p50_ms": percentile(rtt, 50) * 1e3,
        "p99_ms": percentile(rtt, 99) * 1e3,
        "max_ms": max(rtt) * 1e3,
        "slowest_wait_ms": sum(t[2] for t in slow) / len(slow) * 1e3,
        "slowest_oncpu_ms": sum(t[1] for t in slow) / len(slow) * 1e3,
        # Neither running nor runnable: blocked (the GIL, a lock, I/O).
        "slowest_blocked_ms": sum(max(0.0, t[0] - t[1] - t[2]) for t in slow) / len(slow) * 1e3,
        "wait_p99_ms": percentile([t[2] for t in timed], 99) * 1e3,
        **meter,
    }


async def measure(daemon: VoiceDaemon, meter: Meter, pcm: bytes, said: list[str], args: argparse.Namespace) -> dict[str, Any]:
    step = int(PUSH_SECS * RATE) * 2
    chunks = [base64.b64encode(pcm[i : i + step]).decode("ascii") for i in range(0, len(pcm), step)]
    audio_secs = len(pcm) / (2 * RATE)
    out: dict[str, Any] = {"audio_secs": audio_secs, "words_said": len(said)}

    conns = [await Connection.open(daemon) for _ in range(3)]
    try:
        a, b, prober = conns
        await a.call("state.set", {"key": STATE_KEY, "value": {"probe": True}})
        # -- warm-up: the daemon imports pocketsphinx on its first stream
        await start(a, "warm-up")
        await push_and_stop(a, "warm-up", chunks[: int(2 / PUSH_SECS)], args.backoff)

        # -- (a) the real-time factor of one stream
        meter.quiet()
        meter.start()
        await start(a, "rtf")
        opened = meter.stop()
        meter.start()
        result = await push_and_stop(a, "rtf", chunks, args.backoff)
        m = meter.stop()
        daemon.check_alive()
        if abs(result["audio_secs"] - audio_secs) > 0.01:
            raise BenchError(f"the stream took {result['audio_secs']} s of the {audio_secs:.3f} s pushed")
        out["rtf"] = {
            "open_cpu_s": opened["cpu_s"],
            "open_wall_s": opened["wall_s"],
            **m,
            "rtf_pool": audio_secs / m["pool_cpu_s"] if m["pool_cpu_s"] else None,
            "rtf_daemon": audio_secs / m["cpu_s"] if m["cpu_s"] else None,
            "x_realtime_wall": audio_secs / m["wall_s"],
            "overruns": result["overruns"],
            "segments": result["segments"],
            "words": word_share(result["text"], said),
            "heard": result["text"][:300],
        }
        r = out["rtf"]
        print(
            f"(a) one stream: {audio_secs:.1f} s of speech in {m['wall_s']:.2f} s wall, pool threads {m['pool_cpu_s']:.2f} s CPU "
            f"(RTF {r['rtf_pool']:.1f}), daemon {m['cpu_s']:.2f} s CPU (RTF {r['rtf_daemon']:.1f}); open {opened['cpu_s']:.2f} s CPU; "
            f"{result['overruns']} overruns; {result['segments']} segments; words {100 * r['words']:.0f} %{_other(m['other_pct'])}",
            file=sys.stderr,
        )

        # -- (b) the reactor's latency: idle, then under two streams
        meter.quiet()
        meter.start()
        idle = await probe(prober, daemon, args.probe_interval, float(args.idle_seconds))
        rows = [latency_row("idle", idle, meter.stop())]
        meter.quiet()
        await asyncio.gather(start(a, "load-0"), start(b, "load-1"))  # the model loads are not measured
        done = asyncio.Event()
        meter.start()
        streams = [asyncio.ensure_future(push_and_stop(c, f"load-{n}", chunks, args.backoff)) for n, c in enumerate((a, b))]
        load_task = asyncio.ensure_future(probe(prober, daemon, args.probe_interval, done))
        try:
            results = await asyncio.gather(*streams)
        finally:
            done.set()
        loaded = await load_task
        m = meter.stop()
        daemon.check_alive()
        rows.append(latency_row("2 streams", loaded, m))
        rows[-1].update(
            rtf_pool=2 * audio_secs / m["pool_cpu_s"] if m["pool_cpu_s"] else None,
            x_realtime_wall=2 * audio_secs / m["wall_s"],
            overruns=sum(r["overruns"] for r in results),
            words=sum(word_share(r["text"], said) for r in results) / 2,
        )
        out["latency"] = rows
        for row in rows:
            print(
                f"(b) state.get {row['phase']}: {row['calls']} calls, p50 {row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} "
                f"max {row['max_ms']:.2f} ms; slowest 1 %: {row['slowest_oncpu_ms']:.2f} ms on CPU, {row['slowest_wait_ms']:.2f} "
                f"waiting for one, {row['slowest_blocked_ms']:.2f} neither{_other(row['other_pct'])}",
                file=sys.stderr,
            )
        out["daemon_rss_mib"] = daemon.rss_mib()
    finally:
        for conn in conns:
            await conn.close()
    return out


def _other(pct: float | None) -> str:
    return "" if pct is None else f"; others' CPU {pct:.0f} %"


def print_table(out: dict[str, Any], args: argparse.Namespace) -> None:
    r = out["rtf"]
    print("| stream | audio s | wall s | pool CPU s | daemon CPU s | RTF (audio / pool CPU) | audio / daemon CPU | x real time (wall) "
          "| open CPU s | overruns | words % | others' CPU % |")
    print("|---|" + "---:|" * 11)
    print(f"| one | {out['audio_secs']:.1f} | {r['wall_s']:.2f} | {r['pool_cpu_s']:.2f} | {r['cpu_s']:.2f} | {r['rtf_pool']:.1f} "
          f"| {r['rtf_daemon']:.1f} | {r['x_realtime_wall']:.1f} | {r['open_cpu_s']:.2f} | {r['overruns']} | {100 * r['words']:.0f} "
          f"| {_pct(r['other_pct'])} |")
    load = out["latency"][1]
    print(f"| two at once | 2 x {out['audio_secs']:.1f} | {load['wall_s']:.2f} | {load['pool_cpu_s']:.2f} | {load['cpu_s']:.2f} "
          f"| {load['rtf_pool']:.1f} | {2 * out['audio_secs'] / load['cpu_s']:.1f} | {load['x_realtime_wall']:.1f} | - "
          f"| {load['overruns']} | {100 * load['words']:.0f} | {_pct(load['other_pct'])} |")
    print()
    print("| state.get loop | calls | p50 ms | p99 ms | max ms | slowest 1 %: on CPU ms | waiting for a CPU ms | neither ms "
          "| others' CPU % |")
    print("|---|" + "---:|" * 8)
    for row in out["latency"]:
        print(f"| {row['phase']} | {row['calls']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['max_ms']:.2f} "
              f"| {row['slowest_oncpu_ms']:.2f} | {row['slowest_wait_ms']:.2f} | {row['slowest_blocked_ms']:.2f} "
              f"| {_pct(row['other_pct'])} |")
    print(
        f"\n{out['audio_secs']:.1f} s of speech per stream ({out['words_said']} words), pushed by base64 in {PUSH_SECS} s "
        f"pieces, {args.backoff} s back-off after an overrun; state.get every {args.probe_interval * 1e3:g} ms after the "
        f"previous reply.  CPU: utime+stime ({1000 / CLK_TCK:.0f} ms ticks); pool: the daemon's threads but the reactor's; "
        f"slowest 1 %: the mean over those calls of the reactor thread's time on a CPU, waiting for one, and neither "
        f"(blocked: the round trip less both).",
        file=sys.stderr,
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of speech per stream (default 60)")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="the idle state.get loop's length (default 5)")
    parser.add_argument("--probe-interval", type=float, default=0.005,
                        help="seconds between a state.get reply and the next request (default 0.005)")
    parser.add_argument("--backoff", type=float, default=0.1, help="seconds to wait after an overrun (default 0.1)")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE", help="passed to twist car --limit (repeatable)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quiet-pct", type=float, default=20.0,
                        help="before each phase wait until the machine uses less than this %% of a CPU (0: don't)")
    parser.add_argument("--quiet-timeout", type=float, default=30.0, help="wait at most this long, then measure anyway (default 30)")
    parser.add_argument("--json", type=Path, help="also write config, environment and figures here")
    parser.add_argument("--twist", default=str(Path(sys.executable).with_name("twist")), help="the twist script")
    args = parser.parse_args(argv)
    if args.seconds < 3 or args.idle_seconds <= 0 or args.probe_interval < 0 or args.backoff <= 0:
        parser.error("--seconds must be at least 3, --idle-seconds and --backoff positive, --probe-interval not negative")
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        parser.error("needs Linux /proc")
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        parser.error("espeak-ng is not on PATH (apt-get install espeak-ng)")

    env = environment(args)
    for dist in ("pocketsphinx",):
        try:
            env["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            parser.error("pocketsphinx is not installed: pip install 'car-twisted[voice]'")
    env["espeak_ng"] = subprocess.run([espeak, "--version"], capture_output=True, text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="car-voice-bench-"))
    home = work / "car-home"
    home.mkdir(mode=0o700)
    daemon = VoiceDaemon(args.twist, home, work / "daemon.log", args.limit)
    out: dict[str, Any] = {}
    meter: Meter | None = None
    failed = False
    t0 = time.monotonic()
    try:
        pcm, said = synthesize(espeak, work, args.seconds, args.seed)
        daemon.start()
        print(f"daemon pid {daemon.proc.pid} on {daemon.url} (CAR_HOME {home})", file=sys.stderr)
        meter = Meter(daemon, args)
        out = asyncio.run(measure(daemon, meter, pcm, said, args))
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
    if out:
        print_table(out, args)
        print(f"total {elapsed:.0f} s", file=sys.stderr)
    if args.json is not None and out:
        doc = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": env,
            "complete": not failed,
            "elapsed_s": elapsed,
            "quiet_wait_s": sum(meter.quiet_waits) if meter is not None else None,
            "results": out,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    if failed:
        print(f"daemon log kept in {work / 'daemon.log'}", file=sys.stderr)
        shutil.rmtree(home, ignore_errors=True)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
