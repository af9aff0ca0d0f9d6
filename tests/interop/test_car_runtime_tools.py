"""
Interop: tool callbacks and proposals between the real ``car-runtime``
0.58.0 client and a live ``twist car`` daemon subprocess.

The client's process-wide ``register_tool_handler`` /
``register_tool_cancel_handler`` callables serve the daemon's
``tools.execute`` requests and ``tools.cancel`` notifications (the bridge
is installed by the runtime's first ``submit_proposal`` or
``execute_proposal``).  Only the public Python API is used.

The daemon fixtures (subprocess start, SIGTERM and clean-exit checks,
client environment) come from ``test_car_runtime``; pytest's default
import mode puts this directory on ``sys.path``.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from typing import Any, Callable, Iterator

import pytest

car_runtime = pytest.importorskip("car_runtime")

from test_car_runtime import (  # noqa: E402,F401  (fixtures are used by name)
    Daemon,
    call,
    client_env,
    daemon,
    start_daemon,
)

WAIT = 10.0  # upper bound for anything that should happen well within it


class ToolHost:
    """
    The process-wide tool and cancel handlers for one test.

    ``behaviours`` maps a tool name to ``fn(call) -> result``; each call's
    decoded ``call_json`` is recorded before the behaviour runs.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.cancels: list[Any] = []
        self.cancelled = threading.Event()
        self.behaviours: dict[str, Callable[[dict[str, Any]], Any]] = {}
        self.lock = threading.Lock()

    def tool(self, name: str) -> Callable:
        def register(fn: Callable[[dict[str, Any]], Any]) -> Callable:
            self.behaviours[name] = fn
            return fn

        return register

    def handle(self, call_json: str) -> str:
        c = json.loads(call_json)
        with self.lock:
            self.calls.append(c)
        fn = self.behaviours.get(c.get("tool"))
        if fn is None:
            raise LookupError(f"test has no behaviour for tool {c.get('tool')!r}")
        return json.dumps(fn(c))

    def cancel(self, request_id: Any) -> None:
        with self.lock:
            self.cancels.append(request_id)
        self.cancelled.set()

    def calls_for(self, tool: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if c.get("tool") == tool]


@pytest.fixture
def host() -> Iterator[ToolHost]:
    h = ToolHost()
    car_runtime.register_tool_handler(h.handle)
    car_runtime.register_tool_cancel_handler(h.cancel)
    try:
        yield h
    finally:
        car_runtime.unregister_tool_handler()
        car_runtime.unregister_tool_cancel_handler()


@pytest.fixture
def rt(daemon: Daemon, client_env: Callable[[Daemon], None]) -> Iterator[Any]:  # noqa: F811
    client_env(daemon)
    runtime = car_runtime.CarRuntime()
    try:
        yield runtime
    finally:
        runtime.close()


def submit(rt: Any, actions: list[dict[str, Any]]) -> dict[str, Any]:
    return json.loads(rt.submit_proposal(json.dumps({"actions": actions})))


def results_by_id(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["action_id"]: r for r in result["results"]}


def tool_call(aid: str, tool: str, parameters: dict[str, Any] | None = None, **extra: Any) -> dict:
    return {"id": aid, "type": "tool_call", "tool": tool, "parameters": parameters or {}, **extra}


def _ts(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- 1. a Python handler serves a proposal ------------------------------------


@pytest.mark.interop
def test_registered_handler_serves_proposal(rt, host):
    @host.tool("echo")
    def echo(c: dict[str, Any]) -> Any:
        return {"echoed": c["params"], "n": [1, 2.5, None, "x"]}

    rt.register_tool("echo")
    assert "echo" in [t["name"] for t in json.loads(rt.list_tools())]

    params = {"text": "hello", "nested": {"k": [1, 2]}, "flag": True}
    result = submit(rt, [tool_call("a1", "echo", params, timeout_ms=5000)])

    assert isinstance(result["proposal_id"], str) and result["proposal_id"]
    [res] = result["results"]
    assert res["action_id"] == "a1"
    assert res["status"] == "succeeded", res
    assert res["output"] == {"echoed": params, "n": [1, 2.5, None, "x"]}
    assert res["error"] is None
    assert res["attempts"] == 1

    [c] = host.calls_for("echo")
    assert c["tool"] == "echo"
    assert c["action_id"] == "a1"
    assert c["params"] == params
    assert c["attempt"] == 1
    assert c["timeout_ms"] == 5000
    assert isinstance(c["request_id"], str) and c["request_id"].startswith("cb-")
    assert host.cancels == []

    # A per-call tool_fn (execute_proposal) takes this proposal's callbacks;
    # the process-wide handler is left alone.
    seen: list[dict[str, Any]] = []

    def tool_fn(call_json: str) -> str:
        seen.append(json.loads(call_json))
        return json.dumps({"via": "tool_fn"})

    out = json.loads(
        rt.execute_proposal(json.dumps({"actions": [tool_call("b1", "echo", {"q": 7})]}), tool_fn)
    )
    [res2] = out["results"]
    assert res2["status"] == "succeeded", res2
    assert res2["output"] == {"via": "tool_fn"}
    assert [(s["tool"], s["params"], s["action_id"]) for s in seen] == [("echo", {"q": 7}, "b1")]
    assert isinstance(seen[0]["request_id"], str) and seen[0]["request_id"] != c["request_id"]
    assert len(host.calls_for("echo")) == 1


# -- 2. timeout_ms: the daemon fails the action and cancels the callback -----


@pytest.mark.interop
def test_timeout_sends_cancel_to_cancel_handler(rt, host):
    release = threading.Event()
    finished = threading.Event()

    @host.tool("slow")
    def slow(c: dict[str, Any]) -> Any:
        try:
            release.wait(2.0)  # "sleeps 2 s" (ends early once the test is done)
            return {"late": True}
        finally:
            finished.set()

    rt.register_tool("slow")
    t0 = time.monotonic()
    try:
        result = submit(rt, [tool_call("a1", "slow", {"n": 1}, timeout_ms=300)])
        elapsed = time.monotonic() - t0
        [res] = result["results"]
        assert res["status"] == "failed", res
        assert "timeout_ms" in (res["error"] or ""), res
        assert "300" in res["error"]
        assert elapsed < 2.0, f"proposal waited for the tool ({elapsed:.2f}s), not its budget"

        assert host.cancelled.wait(WAIT), "tools.cancel never reached the cancel handler"
        [c] = host.calls_for("slow")
        assert c["timeout_ms"] == 300
        assert isinstance(c["request_id"], str)
        assert host.cancels == [c["request_id"]]
    finally:
        release.set()
        assert finished.wait(WAIT)

    # The late reply to the reaped callback does not hurt the connection.
    time.sleep(0.2)
    assert call(rt, "capabilities.list")["server"] == "car-twisted"
    assert rt.connection_epoch() == 1
    assert host.cancels == [c["request_id"]]


# -- 3. retries, and a terminal error that is not retried ----------------------


@pytest.mark.interop
def test_retry_until_third_attempt_succeeds(rt, host):
    @host.tool("flaky")
    def flaky(c: dict[str, Any]) -> Any:
        if c["attempt"] < 3:
            raise ValueError(f"flaky attempt {c['attempt']}")
        return {"ok": c["attempt"]}

    rt.register_tool("flaky")
    result = submit(
        rt,
        [tool_call("a1", "flaky", {"x": 1}, failure_behavior="retry", max_retries=3, timeout_ms=5000)],
    )
    [res] = result["results"]
    assert res["status"] == "succeeded", res
    assert res["output"] == {"ok": 3}
    assert res["attempts"] == 3
    calls = host.calls_for("flaky")
    assert [c["attempt"] for c in calls] == [1, 2, 3]
    assert all(c["params"] == {"x": 1} and c["action_id"] == "a1" for c in calls)
    rids = [c["request_id"] for c in calls]
    assert all(isinstance(r, str) for r in rids) and len(set(rids)) == 3


@pytest.mark.interop
def test_terminal_tool_error_is_not_retried(rt, host):
    @host.tool("fatal")
    def fatal(c: dict[str, Any]) -> Any:
        raise car_runtime.TerminalToolError("disk is gone")

    rt.register_tool("fatal")
    result = submit(
        rt,
        [tool_call("a1", "fatal", {}, failure_behavior="retry", max_retries=3, timeout_ms=5000)],
    )
    [res] = result["results"]
    assert res["status"] == "failed", res
    assert "disk is gone" in (res["error"] or ""), res
    assert res["attempts"] == 1
    assert [c["attempt"] for c in host.calls_for("fatal")] == [1]


# -- 4. a deny_tool policy stops the action before any callback --------------


@pytest.mark.interop
def test_deny_tool_policy_rejects_without_callback(rt, host):
    @host.tool("danger")
    def danger(c: dict[str, Any]) -> Any:
        return {"ran": True}

    rt.register_tool("danger")
    rt.register_policy("no-danger", "deny_tool", target="danger")
    assert "no-danger" in json.dumps(json.loads(rt.list_policies()))

    result = submit(rt, [tool_call("a1", "danger", {"x": 1}, timeout_ms=5000)])
    [res] = result["results"]
    assert res["status"] == "rejected", res
    assert "no-danger" in (res["error"] or ""), res
    assert host.calls_for("danger") == []

    # The handler works: without the policy the same action runs.
    assert rt.unregister_policy("no-danger") == 1
    result = submit(rt, [tool_call("a1", "danger", {"x": 1}, timeout_ms=5000)])
    [res] = result["results"]
    assert res["status"] == "succeeded", res
    assert res["output"] == {"ran": True}
    assert len(host.calls_for("danger")) == 1


# -- 5. a state dependency orders two actions ----------------------------------


@pytest.mark.interop
def test_state_dependency_runs_actions_in_order(rt, host):
    order: list[str] = []

    @host.tool("produce")
    def produce(c: dict[str, Any]) -> Any:
        order.append("produce:start")
        time.sleep(0.3)
        order.append("produce:end")
        return {"made": c["params"]["item"]}

    @host.tool("consume")
    def consume(c: dict[str, Any]) -> Any:
        order.append("consume:start")
        # The producer's expected effect is already in the daemon's state.
        seen = json.loads(rt.state_get("stage"))
        order.append("consume:end")
        return {"stage_seen": seen}

    rt.register_tool("produce")
    rt.register_tool("consume")
    # The consumer is listed first: only the state dependency orders them.
    result = submit(
        rt,
        [
            tool_call("a2", "consume", {}, state_dependencies=["stage"], timeout_ms=5000),
            tool_call("a1", "produce", {"item": "widget"}, expected_effects={"stage": "produced"}, timeout_ms=5000),
        ],
    )
    res = results_by_id(result)
    assert res["a1"]["status"] == "succeeded", res
    assert res["a2"]["status"] == "succeeded", res
    assert res["a1"]["output"] == {"made": "widget"}
    assert res["a1"]["state_changes"] == {"stage": "produced"}
    assert res["a2"]["output"] == {"stage_seen": "produced"}
    assert order == ["produce:start", "produce:end", "consume:start", "consume:end"]
    # The daemon dispatched the consumer only after the producer finished.
    a1_end = _ts(res["a1"]["timestamp"]) + datetime.timedelta(milliseconds=res["a1"]["duration_ms"])
    assert _ts(res["a2"]["timestamp"]) >= a1_end - datetime.timedelta(milliseconds=1)
    [p] = host.calls_for("produce")
    [q] = host.calls_for("consume")
    assert int(p["request_id"].removeprefix("cb-")) < int(q["request_id"].removeprefix("cb-"))
    assert json.loads(rt.state_get("stage")) == "produced"
    assert "stage" in rt.state_keys()
