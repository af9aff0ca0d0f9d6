"""
memory.* over real sockets: the scope of each connection (a namespace, an
agent, or the shared graph), graphs written back to ``$CAR_HOME/memory``
and found again by a fresh daemon on the same home, the file name of
every namespace, the ``memory.persist`` / ``memory.load`` sandbox, a
corrupt scope file set aside, and bad params answered without harm.

Files the daemon writes in the background (the batched write-back) are
waited for with ``until``; everything else waits on replies.
"""

import json
import os
import stat
from pathlib import Path

import pytest_twisted
from zope.interface import implementer

from car_twisted.interfaces import IAgentIdentities
from support import TOKEN, start_server, until

HANDSHAKE = {"protocol_version": 3, "client_version": "test", "required_capabilities": []}


@implementer(IAgentIdentities)
class Agents:
    """Any agent id, with the token ``token-of-<id>``; several connections may speak for one."""

    def verify(self, agent_id, token):
        return token == f"token-of-{agent_id}"

    def attach(self, agent_id, session):
        pass

    def detach(self, agent_id, session):
        pass


async def connect(server, namespace=None, agent=None):
    """A connection authenticated (as C{agent} if given, with C{namespace} if given) and handshaken."""
    client = await server.client("tcp")
    params = {"agent_id": agent, "token": f"token-of-{agent}"} if agent else {"token": TOKEN}
    if namespace is not None:
        params["memory_namespace"] = namespace
    reply = await client.call("session.auth", params, rid=0)
    assert reply["result"]["ok"] is True, reply
    assert (await client.call("server.handshake", HANDSHAKE, rid=2))["result"]["protocol_version"] == 3
    return client


async def error(client, method, params=None):
    reply = await client.call(method, params)
    assert "error" in reply, reply
    return reply["error"]


def add(client, subject, body, **extra):
    return client.result("memory.add_fact", {"subject": subject, "body": body, **extra})


def memory_dir(tmp_path):
    return tmp_path / "car-home" / "memory"


def tree(root, skip=None):
    """Everything under C{root} (symlinks not followed): relative path -> (type, size, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            st = os.lstat(path)
            out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def facts_in(path):
    try:
        return json.loads(path.read_text())["facts"]
    except (FileNotFoundError, ValueError):
        return None


def written_with(path, count):
    """
    C{path} and its journals hold a graph of C{count} facts (the write-back
    got there): the snapshot's facts, then each journal line replayed.
    """
    try:
        snapshot = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return False
    ids = {f["id"] for f in snapshot["facts"]}
    journals = sorted(path.parent.glob(path.name + ".journal-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    for journal in journals:
        if int(journal.name.rsplit("-", 1)[1]) < snapshot.get("journal", 0):
            continue
        for line in journal.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("reset"):
                ids.clear()
            elif "put" in entry:
                ids.add(entry["put"]["id"])
            elif "del" in entry:
                ids.discard(entry["del"])
    return len(ids) == count


def compacted(path):
    """The snapshot names its journal and the older journals are gone (a compaction finished)."""
    try:
        first = json.loads(path.read_text()).get("journal", 0)
    except (FileNotFoundError, ValueError):
        return False
    return all(int(p.name.rsplit("-", 1)[1]) >= first for p in path.parent.glob(path.name + ".journal-*"))


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest_twisted.ensureDeferred
async def test_namespaces_isolate_unbound_share_and_a_namespace_wins(reactor, tmp_path):
    server = await start_server(reactor, tmp_path, agent_identities=Agents())
    try:
        a = await connect(server, namespace="proj-a")
        b = await connect(server, namespace="proj-b")
        assert await add(a, "deploy", "proj-a deploys with blue-green switching") == 1
        assert await add(a, "rule", "never deploy on fridays", kind="constraint") == 2
        assert await add(b, "deploy", "proj-b deploys with canary releases") == 1

        assert await a.result("memory.fact_count") == 2
        assert await b.result("memory.fact_count") == 1
        bodies_a = {f["body"] for f in await a.result("memory.query", {"query": "deploy deploys canary releases", "k": 10})}
        assert bodies_a == {"never deploy on fridays", "proj-a deploys with blue-green switching"}
        assert [f["body"] for f in await b.result("memory.query", {"query": "deploy blue-green fridays", "k": 10})] == [
            "proj-b deploys with canary releases"
        ]
        context_a = await a.result("memory.build_context", {"query": "deploy"})
        context_b = await b.result("memory.build_context_fast", {"query": "deploy"})
        assert "## Constraints\n- rule: never deploy on fridays" in context_a and "blue-green" in context_a
        assert "canary" not in context_a
        assert "## Facts\n- deploy: proj-b deploys with canary releases" in context_b
        assert "blue-green" not in context_b and "fridays" not in context_b

        # Two unbound connections share the one shared graph, which no namespace sees.
        u1, u2 = await connect(server), await connect(server)
        assert await add(u1, "editor", "the team edits with helix") == 1
        assert await u2.result("memory.fact_count") == 1
        assert [f["body"] for f in await u2.result("memory.query", {"query": "helix editor"})] == ["the team edits with helix"]
        assert await add(u2, "shell", "the team uses fish as its shell") == 2
        assert await u1.result("memory.fact_count") == 2
        assert all("team" not in f["body"] for f in await a.result("memory.query", {"query": "team helix editor fish shell"}))
        assert "helix" not in await b.result("memory.build_context", {"query": "helix"})

        # An agent bound with a namespace works in the namespace; bound alone, in its own graph.
        in_a = await connect(server, namespace="proj-a", agent="alice")
        assert await in_a.result("memory.fact_count") == 2
        assert await add(in_a, "owner", "alice owns the deploy pipeline") == 3
        assert await a.result("memory.fact_count") == 3
        alone = await connect(server, agent="alice")
        assert await alone.result("memory.fact_count") == 0
        assert await add(alone, "diary", "alice keeps her own notes") == 1
        assert await in_a.result("memory.fact_count") == 3
        assert await u1.result("memory.fact_count") == 2
        assert await b.result("memory.fact_count") == 1
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_bound_memory_survives_a_restart(reactor, tmp_path):
    mem = memory_dir(tmp_path)
    server = await start_server(reactor, tmp_path, agent_identities=Agents())
    try:
        agent = await connect(server, agent="ops-Bot")
        assert await add(agent, "db", "the primary database is postgres 16") == 1
        assert await add(agent, "limit", "keep replies under 200 words", kind="constraint", fact_id="rule-1",
                         tags=["style", "length"], source="planner", confidence=0.75) == 2
        assert await add(agent, "db", "backups run nightly at 02:00 UTC", kind="knowledge") == 3
        assert await add(await connect(server), "shared", "a shared fact everyone sees") == 1
        assert await add(await connect(server, namespace="Proj", agent="ops-Bot"), "ns", "a fact in namespace Proj") == 1
    finally:
        await server.stop()  # the stop writes back every changed graph before it fires

    agent_file = mem / "agents" / "ops-%42ot.json"
    shared_file = mem / "shared.json"
    ns_file = mem / "memory-namespaces" / "%50roj.json"
    assert len(facts_in(agent_file)) == 3 and len(facts_in(shared_file)) == 1 and len(facts_in(ns_file)) == 1
    for path in (agent_file, shared_file, ns_file):
        assert mode(path) == 0o600, path
    for path in (mem, mem / "agents", mem / "memory-namespaces"):
        assert mode(path) == 0o700, path
    assert sorted(tree(mem)) == [
        "agents", "agents/ops-%42ot.json", "memory-namespaces", "memory-namespaces/%50roj.json", "shared.json"
    ]

    server = await start_server(reactor, tmp_path, agent_identities=Agents())
    try:
        agent = await connect(server, agent="ops-Bot")
        assert await agent.result("memory.fact_count") == 3
        [limit] = await agent.result("memory.query", {"query": "replies words", "k": 1})
        assert limit == {"subject": "limit", "body": "keep replies under 200 words", "kind": "constraint",
                         "confidence": 0.75, "fact_id": "rule-1", "tags": ["style", "length"], "source": "ws-planner"}
        assert "## Constraints\n- limit: keep replies under 200 words" in await agent.result(
            "memory.build_context", {"query": "database backups"})
        assert {f["body"] for f in await agent.result("memory.query", {"query": "database postgres backups", "k": 5})} >= {
            "the primary database is postgres 16", "backups run nightly at 02:00 UTC"}
        assert await (await connect(server)).result("memory.fact_count") == 1
        assert await (await connect(server, namespace="Proj")).result("memory.fact_count") == 1
        other = await connect(server, agent="ops-bot")  # another id: another file
        assert await other.result("memory.fact_count") == 0
    finally:
        await server.stop()


NAMESPACE_FILES = {
    "A": "%41.json",
    "%": "%25.json",
    "ü": "%c3%bc.json",
    "a/b": "a%2fb.json",
    "a%2fb": "a%252fb.json",
    "..": "%2e%2e.json",
    ".": "%2e.json",
    "proj-1_x.y": "proj-1_x.y.json",
}


@pytest_twisted.ensureDeferred
async def test_namespace_file_names(reactor, tmp_path):
    mem = memory_dir(tmp_path)
    server = await start_server(reactor, tmp_path)
    try:
        before = tree(tmp_path)
        for namespace in NAMESPACE_FILES:
            client = await connect(server, namespace=namespace)
            assert await add(client, "marker", f"fact of namespace {namespace!r}") == 1
        files = {ns: mem / "memory-namespaces" / name for ns, name in NAMESPACE_FILES.items()}
        await until(reactor, lambda: all(path.exists() and compacted(path) for path in files.values()), "every namespace's write-back")
        for namespace, path in files.items():
            [fact] = facts_in(path)
            assert fact["body"] == f"fact of namespace {namespace!r}"
            assert mode(path) == 0o600
        after = tree(tmp_path)
        new = sorted(set(after) - set(before))
        assert new == sorted(
            ["car-home/memory", "car-home/memory/memory-namespaces"]
            + [f"car-home/memory/memory-namespaces/{n}" for n in NAMESPACE_FILES.values()]
        ), new
        # Nothing else changed but $CAR_HOME itself (it gained memory/).
        changed = [p for p in before if before[p] != after[p]]
        assert changed in ([], ["car-home"]), changed
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_persist_and_load_stay_in_the_sandbox(reactor, tmp_path):
    mem = memory_dir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.json").write_text('{"version": 1, "facts": [{"subject": "s", "body": "outside fact"}]}')
    server = await start_server(reactor, tmp_path)
    try:
        client = await connect(server, namespace="sandbox")
        await add(client, "alpha", "alpha fact about kiwis")
        assert await add(client, "beta", "beta fact about mangos") == 2
        scope_file = mem / "memory-namespaces" / "sandbox.json"
        await until(reactor, lambda: written_with(scope_file, 2) and compacted(scope_file), "the write-back")
        (mem / "link.json").symlink_to(outside / "victim.json")
        (mem / "dangling.json").symlink_to(outside / "created.json")
        (mem / "linkdir").symlink_to(outside, target_is_directory=True)

        rejected = [
            "../x.json", "sub/../../x.json", "/etc/x", str(outside / "x.json"), "link.json", "dangling.json",
            "linkdir/victim.json", str(mem / "linkdir" / "victim.json"), "linkdir/new/x.json",
            "n" * 300 + ".json", "sub/" + "n" * 256, "d/" * 600 + "x.json", "x\0.json", "",
        ]
        before = tree(tmp_path)
        for method in ("memory.persist", "memory.load"):
            for path in rejected:
                err = await error(client, method, {"path": path})
                assert err["code"] == -32602, (method, path, err)
                assert err["message"].startswith(f"{method} rejected path"), (method, path, err)
                assert err["data"] == {"field": "path"}
            huge = await error(client, method, {"path": "y" * 5000})
            assert huge["code"] == -32602 and huge["data"] == {"field": "path"}, huge
        assert tree(tmp_path) == before, "a rejected path wrote something"
        assert (outside / "victim.json").read_text().endswith('"outside fact"}]}')
        assert not (outside / "created.json").exists()
        assert await client.result("memory.fact_count") == 2

        # A relative path lands under $CAR_HOME/memory (directories 0700), an absolute one inside is taken.
        assert await client.result("memory.persist", {"path": "snaps/two.json"}) == 2
        assert mode(mem / "snaps") == 0o700 and mode(mem / "snaps" / "two.json") == 0o600
        assert [f["body"] for f in facts_in(mem / "snaps" / "two.json")] == ["alpha fact about kiwis", "beta fact about mangos"]
        assert await client.result("memory.persist", {"path": str(mem / "abs.json")}) == 2
        assert len(facts_in(mem / "abs.json")) == 2

        # Load is a full replace of the connection's graph.
        written = os.stat(scope_file).st_ino  # each write-back renames a new file into place
        assert await add(client, "gamma", "gamma fact about papayas") == 3
        assert await client.result("memory.load", {"path": "snaps/two.json"}) == 2
        assert await client.result("memory.fact_count") == 2
        assert all("papayas" not in f["body"] for f in await client.result("memory.query", {"query": "papayas gamma", "k": 10}))
        await until(
            reactor,
            lambda: os.stat(scope_file).st_ino != written and written_with(scope_file, 2) and compacted(scope_file),
            "the compaction after the load",
        )
        assert mode(scope_file) == 0o600

        # A failed load changes nothing and writes nothing.
        (mem / "torn.json").write_text('{"version": 1, "facts": [{"subject": "half')
        (mem / "malformed.json").write_text(json.dumps({"version": 1, "facts": [{"subject": "no body"}]}))
        (mem / "future.json").write_text(json.dumps({"version": 99, "facts": []}))
        for name in ("torn.json", "malformed.json", "future.json"):
            os.chmod(mem / name, 0o600)
        before = tree(tmp_path)
        assert (await error(client, "memory.load", {"path": "absent.json"}))["message"].startswith("memory.load: no such file")
        for name in ("torn.json", "malformed.json", "future.json"):
            err = await error(client, "memory.load", {"path": name})
            assert err["message"].startswith("memory.load: not a memory file"), err
        err = await error(client, "memory.load", {"path": "no-such-dir/x.json"})
        assert err["code"] == -32602 and err["message"].startswith("memory.load rejected path"), err
        assert await client.result("memory.fact_count") == 2
        assert {f["body"] for f in await client.result("memory.query", {"query": "kiwis mangos", "k": 10})} == {
            "alpha fact about kiwis", "beta fact about mangos"}
        assert tree(tmp_path) == before, "a failed load wrote something"
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_corrupt_scope_file_is_set_aside(reactor, tmp_path):
    mem = memory_dir(tmp_path)
    (mem / "memory-namespaces").mkdir(parents=True, mode=0o700)
    os.chmod(mem, 0o700)
    torn = '{"version": 1, "facts": [{"subject": "half'
    malformed = json.dumps({"version": 1, "facts": [{"subject": 5, "body": "b"}]})
    good = json.dumps({"version": 1, "facts": [{"subject": "kept", "body": "a fact that loads fine", "id": "k1"}]})
    files = {
        mem / "shared.json": torn,
        mem / "memory-namespaces" / "proj.json": malformed,
        mem / "memory-namespaces" / "proj.json.corrupt-1": "an earlier one",
        mem / "memory-namespaces" / "good.json": good,
    }
    for path, text in files.items():
        path.write_text(text)
        os.chmod(path, 0o600)
    server = await start_server(reactor, tmp_path)
    try:
        unbound = await connect(server)
        assert await unbound.result("memory.fact_count") == 0
        assert (mem / "shared.json.corrupt-1").read_text() == torn
        proj = await connect(server, namespace="proj")
        assert await proj.result("memory.query", {"query": "b"}) == []
        assert (mem / "memory-namespaces" / "proj.json.corrupt-2").read_text() == malformed
        assert (mem / "memory-namespaces" / "proj.json.corrupt-1").read_text() == "an earlier one"
        # The rest keeps working: the good file loads, the emptied scopes take new facts.
        good_ns = await connect(server, namespace="good")
        assert [f["fact_id"] for f in await good_ns.result("memory.query", {"query": "kept fact"})] == ["k1"]
        assert await add(unbound, "fresh", "a fact after the corruption") == 1
        assert await add(proj, "fresh", "proj starts over") == 1
        await until(reactor, lambda: written_with(mem / "shared.json", 1), "the new shared.json")
        await until(reactor, lambda: written_with(mem / "memory-namespaces" / "proj.json", 1), "the new proj.json")
        assert (mem / "shared.json.corrupt-1").read_text() == torn
        assert not (mem / "shared.json.corrupt-2").exists()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_bad_params_are_refused_and_the_daemon_keeps_serving(reactor, tmp_path):
    server = await start_server(reactor, tmp_path)
    try:
        client = await connect(server, namespace="bad-input")
        assert await add(client, "ok", "a valid fact") == 1
        bad = [
            ("memory.query", {"query": "x", "k": 0}, "k"),
            ("memory.query", {"query": "x", "k": 101}, "k"),
            ("memory.query", {"query": "x", "k": "5"}, "k"),
            ("memory.query", {"query": "x", "k": True}, "k"),
            ("memory.query", {"k": 5}, "query"),
            ("memory.query", {"query": "q" * (16 * 1024 + 1)}, "query"),
            ("memory.add_fact", {"subject": "s", "body": "b" * (64 * 1024 + 1)}, "body"),
            ("memory.add_fact", {"subject": "s" * 1025, "body": "b"}, "subject"),
            ("memory.add_fact", {"subject": 7, "body": "b"}, "subject"),
            ("memory.add_fact", {"subject": "s"}, "body"),
            ("memory.add_fact", {"subject": "s", "body": "b", "tags": "t"}, "tags"),
            ("memory.add_fact", {"subject": "s", "body": "b", "tags": [""]}, "tags[0]"),
            ("memory.add_fact", {"subject": "s", "body": "b", "tags": ["t"] * 65}, "tags"),
            ("memory.add_fact", {"subject": "s", "body": "b", "confidence": 1.5}, "confidence"),
            ("memory.add_fact", {"subject": "s", "body": "b", "confidence": "very"}, "confidence"),
            ("memory.add_fact", {"subject": "s", "body": "b", "confidence": True}, "confidence"),
            ("memory.add_fact", ["s", "b"], "params"),
            ("memory.build_context", {"query": "x", "model_context_window": 10}, "model_context_window"),
            ("memory.build_context", {"query": 3}, "query"),
            ("memory.persist", {"path": 42}, "path"),
            ("memory.load", {}, "path"),
        ]
        for method, params, field in bad:
            err = await error(client, method, params)
            assert err["code"] == -32602, (method, params, err)
            assert err["data"]["field"] == field, (method, err)
        # None of that changed the graph; this connection and a new one are served.
        assert await client.result("memory.fact_count") == 1
        assert await add(client, "after", "a fact after the bad input") == 2
        again = await connect(server, namespace="bad-input")
        assert await again.result("memory.fact_count") == 2
    finally:
        await server.stop()


# -- daemon defects found by this suite (strict: these start passing when fixed) ---------


@pytest_twisted.ensureDeferred
async def test_persist_and_load_cannot_reach_another_scopes_file(reactor, tmp_path):
    mem = memory_dir(tmp_path)
    server = await start_server(reactor, tmp_path)
    try:
        secret = await connect(server, namespace="secret")
        await add(secret, "vault", "the vault code is 1234")
        await until(reactor, lambda: written_with(mem / "memory-namespaces" / "secret.json", 1) and compacted(mem / "memory-namespaces" / "secret.json"), "the write-back")
        unbound = await connect(server)
        reply = await unbound.call("memory.load", {"path": "memory-namespaces/secret.json"})
        assert "error" in reply or await unbound.result("memory.query", {"query": "vault code"}) == [], reply
        await add(unbound, "mine", "an unbound fact")
        reply = await unbound.call("memory.persist", {"path": "memory-namespaces/secret.json"})
        assert "error" in reply or [f["body"] for f in facts_in(mem / "memory-namespaces" / "secret.json")] == [
            "the vault code is 1234"], reply
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_longest_namespace_is_kept_or_refused(reactor, tmp_path):
    namespace = "a" * 256
    server = await start_server(reactor, tmp_path)
    try:
        client = await server.client("tcp")
        reply = await client.call("session.auth", {"token": TOKEN, "memory_namespace": namespace}, rid=0)
        if "error" in reply:
            return  # refused up front: fine
        await client.call("server.handshake", HANDSHAKE, rid=2)
        assert await add(client, "s", "a fact in a long namespace") == 1
    finally:
        await server.stop()  # writes back every changed graph
    server = await start_server(reactor, tmp_path)
    try:
        client = await connect(server, namespace=namespace)
        assert await client.result("memory.fact_count") == 1
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_directory_path_is_refused_cleanly(reactor, tmp_path):
    mem = memory_dir(tmp_path)
    server = await start_server(reactor, tmp_path)
    try:
        client = await connect(server)
        (mem / "snaps").mkdir(parents=True, mode=0o700)
        before = tree(mem)
        for method in ("memory.persist", "memory.load"):
            err = await error(client, method, {"path": "snaps"})
            assert err["code"] == -32602 and err["message"].startswith(f"{method} rejected path"), err
        assert tree(mem) == before
    finally:
        await server.stop()
