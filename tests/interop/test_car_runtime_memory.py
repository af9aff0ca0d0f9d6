"""
Interop: memory.* with the real ``car-runtime`` 0.58.0 client against a
live ``twist car`` daemon.

The typed wrappers (``add_fact``, ``query_facts``, ``fact_count``,
``build_context``, ``build_context_fast``, ``persist_memory``,
``load_memory``, ``consolidate``) parse what the daemon answers: bare
integers, a JSON array, bare strings, a report.  ``CAR_MEMORY_NAMESPACE``
is read by the client when it connects and ``set_memory_namespace`` is
process-wide, so each namespaced client here is a process of its own
(a small script run with the venv's interpreter); the test process
itself stays unbound (the shared graph).

The daemon fixtures come from ``test_car_runtime``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

car_runtime = pytest.importorskip("car_runtime")

from test_car_runtime import (  # noqa: E402,F401  (fixtures are used by name)
    Daemon,
    client_env,
    daemon,
    start_daemon,
)

CLIENT_TIMEOUT = 30.0

# One namespaced client: its namespace comes from CAR_MEMORY_NAMESPACE
# alone; it prints what the typed wrappers returned as one JSON line.
CLIENT_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import car_runtime

    marker = sys.argv[1]
    rt = car_runtime.CarRuntime()
    out = {"before": rt.fact_count()}
    if sys.argv[2] == "write":
        out["added"] = rt.add_fact("marker", "fact written by " + marker, "pattern", tags=[marker])
        out["persisted"] = rt.persist_memory("export-" + marker + ".json")
    out["count"] = rt.fact_count()
    out["query"] = json.loads(rt.query_facts("fact written marker", 10))
    out["context"] = rt.build_context("fact written marker")
    try:
        rt.load_memory("../escape-" + marker + ".json")
        out["escape"] = None
    except RuntimeError as e:
        out["escape"] = str(e)
    rt.close()
    print("CLIENT-RESULT " + json.dumps(out), flush=True)
    """
)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def facts_in(path: Path) -> list[Any]:
    return json.loads(path.read_text())["facts"]


def wait_for(what: str, check: Any, timeout: float = 10.0) -> Any:
    """Poll C{check} (a file the daemon process writes in the background) until truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not within {timeout:g}s"
        time.sleep(0.05)


def written(path: Path, count: int) -> bool:
    try:
        return len(facts_in(path)) == count
    except (FileNotFoundError, ValueError):
        return False


def run_clients(script: Path, runs: list[tuple[str, str | None, str]]) -> list[dict[str, Any]]:
    """Run one client process per (marker, namespace, action) at once; their results in order."""
    procs = []
    for marker, namespace, action in runs:
        env = dict(os.environ)
        env.pop("CAR_MEMORY_NAMESPACE", None)
        if namespace is not None:
            env["CAR_MEMORY_NAMESPACE"] = namespace
        procs.append(subprocess.Popen([sys.executable, str(script), marker, action], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=CLIENT_TIMEOUT)
        assert proc.returncode == 0, f"client failed ({proc.returncode}):\n{out}\n{err}"
        [line] = [line for line in out.splitlines() if line.startswith("CLIENT-RESULT ")]
        results.append(json.loads(line[len("CLIENT-RESULT "):]))
    return results


@pytest.mark.interop
def test_typed_memory_wrappers(daemon: Daemon, client_env):
    client_env(daemon)
    mem = daemon.home / "memory"
    rt = car_runtime.CarRuntime()
    assert rt.fact_count() == 0
    # add_fact answers the bare fact count; the optionals reach the daemon.
    assert rt.add_fact("deploy", "we deploy with canary releases", "pattern") == 1
    assert rt.add_fact("limit", "keep replies under 200 words", "constraint", confidence=0.5,
                       fact_id="rule-1", tags=["style", "length"], source="planner") == 2
    assert rt.add_fact("db", "the primary database is postgres", "knowledge") == 3
    assert rt.fact_count() == 3

    assert json.loads(rt.query_facts("replies words", 1)) == [{
        "subject": "limit", "body": "keep replies under 200 words", "kind": "constraint", "confidence": 0.5,
        "fact_id": "rule-1", "tags": ["style", "length"], "source": "ws-planner",
    }]
    found = json.loads(rt.query_facts("deploy canary releases"))
    assert found[0]["body"] == "we deploy with canary releases" and found[0]["source"] == "ws"
    assert isinstance(found[0]["fact_id"], str) and found[0]["fact_id"]

    context = rt.build_context("deploy canary releases", 100_000)
    assert context.startswith("## Constraints\n- limit: keep replies under 200 words")
    assert "## Facts\n" in context and "- deploy: we deploy with canary releases" in context
    fast = rt.build_context_fast("deploy canary releases", 4096)
    assert isinstance(fast, str) and fast.startswith("## Constraints\n- limit: keep replies under 200 words")
    assert "- deploy: we deploy with canary releases" in fast

    # persist_memory: a relative path lands under $CAR_HOME/memory, 0600.
    assert rt.persist_memory("snaps/all.json") == 3
    snap = mem / "snaps" / "all.json"
    assert mode(snap) == 0o600 and mode(mem / "snaps") == 0o700
    assert {f["body"] for f in facts_in(snap)} == {
        "we deploy with canary releases", "keep replies under 200 words", "the primary database is postgres"}

    # load_memory replaces the whole graph.
    assert rt.add_fact("temp", "a passing note about papayas", "pattern") == 4
    assert rt.load_memory("snaps/all.json") == 3
    assert rt.fact_count() == 3
    assert all("papayas" not in f["body"] for f in json.loads(rt.query_facts("papayas note", 10)))

    # consolidate merges a duplicate and reports it.
    assert rt.add_fact("deploy", "we deploy with canary releases", "pattern") == 4
    report = json.loads(rt.consolidate())
    assert (report["merged"], report["expired"], report["before"], report["after"]) == (1, 0, 4, 3)
    assert rt.fact_count() == 3

    # A path out of the sandbox: the daemon's code and message (these typed
    # wrappers raise RuntimeError("<code> <message>"), not DaemonRpcError),
    # and nothing written.
    for call, method in ((rt.persist_memory, "memory.persist"), (rt.load_memory, "memory.load")):
        with pytest.raises(RuntimeError) as info:
            call("../x.json")
        assert str(info.value) == f"-32602 {method} rejected path '../x.json': '..' segments are not allowed"
    with pytest.raises(RuntimeError, match=r"^-32602 memory\.load rejected path '/etc/passwd': absolute paths must be inside"):
        rt.load_memory("/etc/passwd")
    assert not (daemon.home / "x.json").exists() and not (daemon.home.parent / "x.json").exists()
    rt.close()

    # The shared graph is written back at SIGTERM and found by the next daemon on the home.
    daemon.stop()
    assert written(mem / "shared.json", 3) and mode(mem / "shared.json") == 0o600
    daemon.start()
    client_env(daemon)
    again = car_runtime.CarRuntime()
    assert again.fact_count() == 3
    assert json.loads(again.query_facts("replies words", 1))[0]["fact_id"] == "rule-1"
    again.close()


@pytest.mark.interop
def test_memory_namespace_isolates_clients(daemon: Daemon, client_env, tmp_path: Path):
    client_env(daemon)
    mem = daemon.home / "memory"
    script = tmp_path / "memory_client.py"
    script.write_text(CLIENT_SCRIPT)

    a, b = run_clients(script, [("a", "proj-a", "write"), ("b", "proj-b", "write")])
    for marker, result in (("a", a), ("b", b)):
        other = "b" if marker == "a" else "a"
        assert (result["before"], result["added"], result["count"], result["persisted"]) == (0, 1, 1, 1), result
        [fact] = result["query"]
        assert (fact["body"], fact["tags"]) == (f"fact written by {marker}", [marker])
        assert f"- marker: fact written by {marker}" in result["context"]
        assert f"written by {other}" not in result["context"]
        # persist_memory wrote the namespace's graph only.
        assert [f["body"] for f in facts_in(mem / f"export-{marker}.json")] == [f"fact written by {marker}"]
        assert result["escape"] == f"-32602 memory.load rejected path '../escape-{marker}.json': '..' segments are not allowed"

    # The unbound test process (the shared graph) sees neither.
    rt = car_runtime.CarRuntime()
    assert rt.fact_count() == 0
    assert "written by" not in rt.build_context("fact written marker")
    assert rt.add_fact("shared", "an unbound fact", "pattern") == 1
    rt.close()

    # Each namespace's graph has its own file; a later client in proj-a finds its fact.
    for name in ("proj-a", "proj-b"):
        wait_for(f"{name}'s write-back", lambda name=name: written(mem / "memory-namespaces" / f"{name}.json", 1))
        assert mode(mem / "memory-namespaces" / f"{name}.json") == 0o600
    [later] = run_clients(script, [("a2", "proj-a", "read")])
    assert later["before"] == 1 and [f["body"] for f in later["query"]] == ["fact written by a"]
    assert not (daemon.home / "escape-a.json").exists()
