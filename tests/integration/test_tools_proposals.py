"""
Tool callbacks and proposals over real sockets: the test client registers
tools and answers the daemon's tools.execute callbacks itself.
"""

import pytest
import pytest_twisted
from twisted.internet import defer, task

from support import CallbackError, sessions_closed, start_server

KINDS = ["tcp", "unix"]


async def ready_client(server, kind, tools=("echo",)):
    client = await server.client(kind)
    await client.authenticate()
    assert await client.result("tools.register", [{"name": t} for t in tools]) == len(tools)
    return client


def tool_action(aid, tool="echo", **kw):
    return {"id": aid, "type": "tool_call", "tool": tool, "parameters": kw.pop("parameters", {}), **kw}


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_proposal_served_by_the_client(reactor, tmp_path, kind):
    """Each tool_call becomes a tools.execute answered by the client; the result has its output."""
    server = await start_server(reactor, tmp_path)
    try:
        client = await ready_client(server, kind)
        client.on_request = lambda msg: {"echoed": msg["params"]["parameters"], "attempt": msg["params"]["attempt"]}
        mission = (await client.result("session.policy.open", {}))["session_id"]
        result = await client.result(
            "proposal.submit",
            {"proposal": {"actions": [tool_action("a1", parameters={"x": 1}, timeout_ms=5000)]}, "session_id": mission},
        )
        (action,) = result["results"]
        assert action["status"] == "succeeded"
        assert action["output"] == {"echoed": {"x": 1}, "attempt": 1}
        (req,) = client.requests
        params = req["params"]
        assert req["method"] == "tools.execute" and req["id"] == params["request_id"]
        assert (params["action_id"], params["tool"], params["timeout_ms"], params["session_id"]) == ("a1", "echo", 5000, mission)
        client.drop()
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_policy_denies_before_any_callback(reactor, tmp_path, kind):
    server = await start_server(reactor, tmp_path)
    try:
        client = await ready_client(server, kind, tools=("shell", "echo"))
        client.on_request = lambda msg: "ran"
        await client.result("policy.register", {"name": "no_shell", "rule": "deny_tool", "target": "shell"})
        result = await client.result(
            "proposal.submit",
            {"proposal": {"actions": [tool_action("a1", "shell"), tool_action("a2", "echo")]}},
        )
        statuses = [r["status"] for r in result["results"]]
        assert statuses == ["rejected", "skipped"]
        assert "no_shell" in result["results"][0]["error"]
        assert client.requests == []
        client.drop()
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_dependent_in_order_independent_overlap(reactor, tmp_path, kind):
    """Independent actions are both in flight at once; the dependent one starts after its producer."""
    server = await start_server(reactor, tmp_path)
    try:
        client = await ready_client(server, kind)
        log = []
        in_flight = {"now": 0, "max": 0}

        async def slow_tool(msg):
            aid = msg["params"]["action_id"]
            log.append(("start", aid))
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
            await task.deferLater(reactor, 0.05, lambda: None)
            in_flight["now"] -= 1
            log.append(("end", aid))
            return aid

        client.on_request = lambda msg: defer.ensureDeferred(slow_tool(msg))
        result = await client.result(
            "proposal.submit",
            {
                "proposal": {
                    "actions": [
                        tool_action("build", expected_effects={"artifact": "v1"}),
                        tool_action("lint"),
                        tool_action("deploy", state_dependencies=["artifact"]),
                    ]
                }
            },
        )
        assert [r["status"] for r in result["results"]] == ["succeeded"] * 3
        assert in_flight["max"] == 2
        assert log.index(("start", "deploy")) > log.index(("end", "build"))
        assert log.index(("start", "lint")) < log.index(("end", "build"))
        assert result["results"][0]["state_changes"] == {"artifact": "v1"}
        assert await client.result("state.get", {"key": "artifact"}) == "v1"
        client.drop()
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_timeout_sends_tools_cancel_and_retries(reactor, tmp_path, kind):
    """A tool past its timeout_ms gets tools.cancel with its request_id; retry attempts go 1, 2."""
    server = await start_server(reactor, tmp_path)
    try:
        client = await ready_client(server, kind)

        def never(msg):
            return defer.Deferred()  # the client never answers

        client.on_request = never
        result = await client.result(
            "proposal.submit",
            {"proposal": {"actions": [tool_action("a1", timeout_ms=100, failure_behavior="retry", max_retries=1)]}},
        )
        (action,) = result["results"]
        assert action["status"] == "failed" and "timeout_ms (100ms)" in action["error"]
        assert [r["params"]["attempt"] for r in client.requests] == [1, 2]
        cancels = [n for n in client.notifications if n["method"] == "tools.cancel"]
        assert [c["params"]["request_id"] for c in cancels] == [r["id"] for r in client.requests]
        session = next(iter(server.state.sessions.values()))
        assert session.channel.pending_count() == 0
        client.drop()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_terminal_error_halts_the_session(reactor, tmp_path):
    """A terminal client error is not retried and halts the session until reconnect."""
    server = await start_server(reactor, tmp_path)
    try:
        client = await ready_client(server, "tcp")

        def fail(msg):
            raise CallbackError(-32000, "Python tool callback raised: TerminalToolError: nope", {"terminal": True})

        client.on_request = fail
        proposal = {"proposal": {"actions": [tool_action("a1", failure_behavior="retry", max_retries=3)]}}
        result = await client.result("proposal.submit", proposal)
        (action,) = result["results"]
        assert action["status"] == "failed" and action["attempts"] == 1
        assert action["error"] == "Python tool callback raised: TerminalToolError: nope"
        assert result["halted"]["action_id"] == "a1"
        refused = await client.call("proposal.submit", proposal)
        assert "session halted" in refused["error"]["message"]
        assert len(client.requests) == 1
        client.drop()

        fresh = await ready_client(server, "tcp")
        fresh.on_request = lambda msg: "fine"
        assert (await fresh.result("proposal.submit", proposal))["results"][0]["status"] == "succeeded"
        fresh.drop()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_missing_handler_and_unknown_tool_follow_failure_behavior(reactor, tmp_path):
    """-32601 and "unknown tool" answers are retried per failure_behavior and never halt the session."""
    server = await start_server(reactor, tmp_path)
    try:
        client = await ready_client(server, "tcp")
        answers = iter(
            [
                CallbackError(-32601, "no handler registered on FFI client for `tools.execute`"),
                CallbackError(-32000, "unknown tool: echo"),
            ]
        )

        def answer(msg):
            err = next(answers, None)
            if err is not None:
                raise err
            return "third time lucky"

        client.on_request = answer
        proposal = {"proposal": {"actions": [tool_action("a1", failure_behavior="retry", max_retries=3)]}}
        result = await client.result("proposal.submit", proposal)
        (action,) = result["results"]
        assert action["status"] == "succeeded" and action["attempts"] == 3
        assert action["output"] == "third time lucky" and "halted" not in result
        again = await client.result("proposal.submit", proposal)
        assert again["results"][0]["status"] == "succeeded"
        client.drop()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_disconnect_mid_call_leaks_nothing(reactor, tmp_path):
    server = await start_server(reactor, tmp_path)
    try:
        client = await ready_client(server, "tcp")
        client.on_request = lambda msg: defer.Deferred()  # never answers
        pending = client.send("proposal.submit", {"proposal": {"actions": [tool_action("a2")]}})
        pending.addErrback(lambda f: None)  # the connection is about to go
        await client.when(lambda: client.requests, "the tools.execute callback")
        session = next(iter(server.state.sessions.values()))
        assert session.channel.pending_count() == 1 and session.in_flight == 1
        client.drop()
        await client.closed
        await sessions_closed(server.state, session)
        assert not server.state.sessions
        assert session.channel.pending_count() == 0 and session.in_flight == 0
    finally:
        await server.stop()
