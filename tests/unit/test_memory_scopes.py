"""
MemoryScopes on a Clock: one load per scope however many wait, batched
write-back, the flush at stop (changes made while it writes included),
corrupt and unsafe files, byte budgets per graph and for all graphs, idle
graphs let go, and an embedder's engine per scope.
"""

import json
import os

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from car_twisted.budget import BudgetExceeded, ByteBudget
from car_twisted.config import AdapterRegistration
from car_twisted.interfaces import IMemgine, IMemoryScope
from car_twisted.memory import scopes as scopes_module
from car_twisted.memory import writeback as writeback_module
from car_twisted.memory.graph import MemoryGraph
from car_twisted.memory.model import FACT_OVERHEAD_BYTES
from car_twisted.memory.records import MAX_TAGS
from car_twisted.memory.scopes import GRAPH_OVERHEAD_BYTES, SHARED, MemoryScope, MemoryScopes
from car_twisted.private_files import UnsafeStateError
from support import make_state

NS = MemoryScope("namespace", "ns-1")
AGENT = MemoryScope("agent", "agent-7")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def root(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    return home / "memory"


def make_scopes(clock, root, **kw):
    made = []

    def make(scope, budget):
        graph = MemoryGraph(clock, budget=budget)
        made.append(scope)
        return graph

    scopes = MemoryScopes(clock, root, make, **kw)
    scopes.made = made
    return scopes


def loaded(scopes, scope):
    out = []
    scopes.graph(scope).addCallback(out.append)
    assert out, "a Clock reactor loads inline"
    return out[0]


def on_disk(root, scope):
    return json.loads((root / scope.relative_path()).read_text())


def test_scope_provides_its_interface():
    for scope in (SHARED, NS, AGENT):
        assert verifyObject(IMemoryScope, scope)


def test_waiters_share_one_load(clock, root, monkeypatch):
    """Calls that arrive while a graph loads wait for that one load."""
    pending = Deferred()
    monkeypatch.setattr(scopes_module, "off_reactor", lambda reactor, fn: pending.addCallback(lambda _: fn()))
    scopes = make_scopes(clock, root)
    got = []
    for _ in range(3):
        scopes.graph(NS).addCallback(got.append)
    assert got == [] and scopes.loaded(NS) is None
    pending.callback(None)
    assert len(got) == 3 and got[0] is got[1] is got[2]
    assert scopes.made == [NS]


def settle(clock):
    """Run the compaction's chunk steps (one per reactor turn) to the end."""
    for _ in range(1000):
        if not clock.getDelayedCalls():
            return
        clock.advance(0)
    raise AssertionError("compaction did not finish")


def reload(clock, root, scope):
    return loaded(make_scopes(clock, root), scope)


def test_a_change_is_journaled_before_it_is_acknowledged(clock, root):
    """
    The first change of a graph with no file compacts at once (the
    snapshot appears); later ones are journal lines, O(change), on disk by
    the time changed(wait=True) fires; a reload replays them.
    """
    scopes = make_scopes(clock, root)
    graph = loaded(scopes, NS)
    path = root / NS.relative_path()
    graph.add("first", "the first fact", fact_id="f0")
    assert scopes.changed(NS, wait=True) is None  # a small change is written before changed returns
    journal_1 = path.with_name(path.name + ".journal-1")
    assert json.loads(journal_1.read_text())["put"]["id"] == "f0"
    settle(clock)
    assert [f["id"] for f in on_disk(root, NS)["facts"]] == ["f0"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    for i in range(1, 50):
        graph.add(f"s{i}", f"body {i}", fact_id=f"f{i}")
        assert scopes.changed(NS, wait=True) is None
    graph.delete("f3")
    scopes.changed(NS)
    settle(clock)
    assert len(on_disk(root, NS)["facts"]) == 1  # the snapshot was not rewritten ...
    journal_file = path.with_name(path.name + ".journal-2")
    lines = journal_file.read_text().splitlines()
    assert len(lines) == 50 and json.loads(lines[-1]) == {"del": "f3"}  # ... each change is one line
    assert oct(os.stat(journal_file).st_mode & 0o777) == "0o600"
    again = reload(clock, root, NS)
    assert again.count() == 49 and again.get("f3") is None and again.get("f49").body == "body 49"


def test_a_torn_last_journal_line_is_skipped(clock, root):
    scopes = make_scopes(clock, root)
    graph = loaded(scopes, SHARED)
    graph.add("a", "kept", fact_id="a")
    scopes.changed(SHARED)
    settle(clock)
    graph.add("b", "also kept", fact_id="b")
    scopes.changed(SHARED)
    path = root / "shared.json"
    (journal_file,) = path.parent.glob("shared.json.journal-*")
    with open(journal_file, "ab") as f:
        f.write(b'{"put": {"id": "c", "subj')  # the crash
    scopes2 = make_scopes(clock, root)
    again = loaded(scopes2, SHARED)
    assert sorted(f.id for f in again.facts()) == ["a", "b"]
    # Appends go to a fresh journal after a load, never after the torn line.
    again.add("d", "after the crash", fact_id="d")
    scopes2.changed(SHARED)
    newest = max(path.parent.glob("shared.json.journal-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    assert newest.name != journal_file.name and json.loads(newest.read_text())["put"]["id"] == "d"
    assert sorted(f.id for f in reload(clock, root, SHARED).facts()) == ["a", "b", "d"]


def test_compaction_folds_the_journal_into_a_new_snapshot(clock, root, monkeypatch):
    monkeypatch.setattr(writeback_module, "COMPACT_MIN_BYTES", 2000)
    scopes = make_scopes(clock, root)
    graph = loaded(scopes, AGENT)
    graph.add("seed", "seed", fact_id="seed")
    scopes.changed(AGENT)
    settle(clock)
    for i in range(40):
        graph.add(f"s{i}", "x" * 100, fact_id=f"f{i}")
        scopes.changed(AGENT)
        if i == 20:
            # Mid-compaction changes land in the journal after the snapshot.
            clock.advance(0)
    settle(clock)
    path = root / AGENT.relative_path()
    snapshot = on_disk(root, AGENT)
    journals_left = sorted(p.name for p in path.parent.glob(path.name + ".journal-*"))
    assert all(int(name.rsplit("-", 1)[1]) >= snapshot["journal"] for name in journals_left)
    again = reload(clock, root, AGENT)
    assert again.count() == 41


def test_flush_waits_for_a_compaction_and_changes_made_during_it(clock, root, monkeypatch):
    """
    A whole-graph load goes through a worker thread and is compacted; a
    change made while that write hangs is appended to the next journal;
    flush fires only when all of it is on disk, and a reload has it all.
    """
    scopes = make_scopes(clock, root)
    graph = loaded(scopes, SHARED)
    graph.add("seed", "seed", fact_id="seed")
    scopes.changed(SHARED)
    settle(clock)
    held = []
    real = writeback_module.off_reactor

    def hold(reactor, fn, *args):
        d = Deferred()
        held.append((d, fn, args))
        return d

    monkeypatch.setattr(writeback_module, "off_reactor", hold)
    monkeypatch.setattr(writeback_module, "SYNC_APPEND_MAX_BYTES", 100)  # a reset this big goes to a thread
    graph.restore({"facts": [{"id": "a", "subject": "a", "body": "loaded"}, {"id": "b", "subject": "b", "body": "loaded"}]})
    saved = scopes.changed(SHARED, wait=True)
    assert saved is not None and not saved.called and len(held) == 1  # the reset's append hangs
    graph.add("c", "made while it hangs", fact_id="c")
    scopes.changed(SHARED)  # queued behind it, in order
    flushed = []
    scopes.flush().addCallback(flushed.append)
    monkeypatch.setattr(writeback_module, "off_reactor", real)
    d, fn, args = held.pop()
    d.callback(fn(*args))
    settle(clock)
    assert saved.called and flushed == [None]
    assert sorted(f["id"] for f in on_disk(root, SHARED)["facts"]) == ["a", "b", "c"]
    assert sorted(f.id for f in reload(clock, root, SHARED).facts()) == ["a", "b", "c"]


@implementer(IMemgine)
class PlainGraph:
    """An engine with no journal: written back as whole snapshots."""

    def __init__(self, clock):
        self._inner = MemoryGraph(clock)
        self.fact_limit = self._inner.fact_limit

    @property
    def generation(self):
        return self._inner.generation

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_an_engine_without_a_journal_is_written_whole_and_batched(clock, root):
    scopes = MemoryScopes(clock, root, lambda scope, budget: PlainGraph(clock), persist_delay=0.5)
    graph = loaded(scopes, NS)
    path = root / NS.relative_path()
    for i in range(50):
        graph.add(f"s{i}", f"body {i}")
        scopes.changed(NS)
    assert not path.exists()  # nothing written inside the request
    assert len(clock.getDelayedCalls()) == 1  # one timer for the burst
    clock.advance(0.5)
    assert len(on_disk(root, NS)["facts"]) == 50
    assert clock.getDelayedCalls() == []
    graph.add("late", "one more")
    scopes.changed(NS)
    flushed = []
    scopes.flush().addCallback(flushed.append)
    assert flushed == [None] and len(on_disk(root, NS)["facts"]) == 51


def test_flush_with_nothing_changed_fires_at_once(clock, root):
    scopes = make_scopes(clock, root)
    loaded(scopes, SHARED)
    flushed = []
    scopes.flush().addCallback(flushed.append)
    assert flushed == [None]
    assert not (root / "shared.json").exists()


@pytest.mark.parametrize(
    "content",
    [b'{"version": 1, "facts": [{"id": "x", "subj', b"\x00\xff garbage", b'{"facts": "not a list"}', b"[1, 2, 3]"],
)
def test_corrupt_file_is_set_aside_never_emptied(clock, root, content):
    root.mkdir(mode=0o700)
    path = root / "shared.json"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    (root / "shared.json.corrupt-1").write_bytes(b"an earlier one")
    scopes = make_scopes(clock, root)
    graph = loaded(scopes, SHARED)
    assert graph.count() == 0
    assert (root / "shared.json.corrupt-2").read_bytes() == content
    assert (root / "shared.json.corrupt-1").read_bytes() == b"an earlier one"
    assert not path.exists()
    graph.add("fresh", "start")
    scopes.changed(SHARED)
    clock.advance(1)
    assert [f["subject"] for f in on_disk(root, SHARED)["facts"]] == ["fresh"]


def test_symlinked_scope_file_fails_the_call_and_stays(clock, root, tmp_path):
    """A scope file that is a symlink is nobody's graph: the call fails, nothing is moved or read."""
    root.mkdir(mode=0o700)
    target = tmp_path / "elsewhere.json"
    target.write_text('{"facts": []}')
    (root / "shared.json").symlink_to(target)
    scopes = make_scopes(clock, root)
    failures = []
    scopes.graph(SHARED).addErrback(failures.append)
    assert failures and failures[0].check(UnsafeStateError, OSError)
    assert (root / "shared.json").is_symlink()
    assert scopes.loaded(SHARED) is None


def test_graph_byte_budget(clock, root):
    scopes = make_scopes(clock, root, graph_bytes=GRAPH_OVERHEAD_BYTES + 8 * 1024, total_bytes=10**9)
    graph = loaded(scopes, NS)
    graph.add("s", "x" * 4000, fact_id="big")
    with pytest.raises(BudgetExceeded) as e:
        graph.add("s", "y" * 6000)
    assert e.value.code == -32603 and e.value.data["reason"] == "byte_budget"
    assert "namespace 'ns-1'" in e.value.message
    assert graph.count() == 1
    # Deleting gives the bytes back; replacing counts only the difference.
    graph.delete("big")
    graph.add("s", "y" * 6000, fact_id="big")
    graph.add("s", "z" * 6500, fact_id="big")
    assert graph.count() == 1


def test_all_graphs_share_one_total(clock, root):
    per_fact = 2000 + FACT_OVERHEAD_BYTES + 64
    scopes = make_scopes(clock, root, graph_bytes=10**9, total_bytes=2 * GRAPH_OVERHEAD_BYTES + 3 * per_fact)
    a = loaded(scopes, NS)
    b = loaded(scopes, AGENT)
    a.add("s", "a" * 2000)
    a.add("s", "b" * 2000)
    b.add("s", "c" * 2000)
    with pytest.raises(BudgetExceeded) as e:
        b.add("s", "d" * 2000)
    assert e.value.data["what"] == "memory (all graphs)"
    # A third graph cannot even be made without room for its overhead.
    failures = []
    scopes.graph(SHARED).addErrback(failures.append)
    assert failures and failures[0].check(BudgetExceeded)


def test_idle_graphs_are_let_go_past_the_cap(clock, root):
    scopes = make_scopes(clock, root, max_loaded=3)
    graphs = {}
    for i in range(3):
        scope = MemoryScope("namespace", f"n{i}")
        graphs[i] = loaded(scopes, scope)
    graphs[0].add("kept", "dirty, so kept")
    scopes.changed(MemoryScope("namespace", "n0"))
    loaded(scopes, MemoryScope("namespace", "n1"))  # n1 used recently: n2 is the oldest idle one
    loaded(scopes, MemoryScope("namespace", "n3"))
    assert len(scopes) == 3
    assert scopes.loaded(MemoryScope("namespace", "n2")) is None
    assert scopes.loaded(MemoryScope("namespace", "n0")) is graphs[0]
    assert scopes.total.used == 3 * GRAPH_OVERHEAD_BYTES + graphs[0].budget.used - GRAPH_OVERHEAD_BYTES
    # A graph let go loads again from its file on next use.
    clock.advance(1)
    loaded(scopes, MemoryScope("namespace", "n4"))
    again = loaded(scopes, MemoryScope("namespace", "n0"))
    assert [f.subject for f in again.facts()] == ["kept"]


def test_consolidate_keeps_merged_tags_within_the_cap_so_the_graph_reloads(clock, root):
    scopes = make_scopes(clock, root)
    graph = loaded(scopes, SHARED)
    graph.add("same", "same body", tags=[f"a{i}" for i in range(MAX_TAGS)])
    graph.add("same", "same body", tags=[f"b{i}" for i in range(MAX_TAGS)])
    assert graph.consolidate()["merged"] == 1
    (fact,) = graph.facts()
    assert len(fact.tags) == MAX_TAGS
    scopes.changed(SHARED)
    clock.advance(1)
    again = loaded(make_scopes(clock, root), SHARED)
    assert again.count() == 1 and not list(root.glob("*.corrupt-*"))


def test_restore_past_the_budget_leaves_graph_and_budget_as_they_were(clock):
    budget = ByteBudget("g", 64 * 1024)
    graph = MemoryGraph(clock, budget=budget)
    graph.add("s", "keep me", fact_id="k")
    used = budget.used
    big = {"facts": [{"id": f"f{i}", "subject": "s", "body": "x" * 5000} for i in range(20)]}
    with pytest.raises(BudgetExceeded):
        graph.restore(big)
    assert budget.used == used
    assert [f.id for f in graph.facts()] == ["k"]
    assert graph.restore({"facts": [{"id": "n", "subject": "s", "body": "small"}]}) == 1
    assert budget.used < used + 1024


@implementer(IMemgine)
class _Engine(MemoryGraph):
    """An embedder's engine (here a subclass, to keep the test short)."""


def test_an_embedder_engine_per_scope_through_the_registry(tmp_path):
    """
    An IMemoryScope -> IMemgine adapter in the daemon's registry decides
    per scope (None declines); else the config's factory; else the
    embedded engine.
    """
    clock = Clock()
    made = []

    def per_scope(scope):
        if scope.kind == "namespace":
            made.append(scope.name)
            return _Engine(clock)
        return None

    state = make_state(
        tmp_path,
        clock,
        adapters=[AdapterRegistration(IMemoryScope, IMemgine, per_scope)],
        memgine_factory=lambda scope, budget: MemoryGraph(clock, fact_limit=7, budget=budget),
    )
    ns = loaded(state.memory, NS)
    shared = loaded(state.memory, SHARED)
    assert type(ns) is _Engine and made == ["ns-1"]
    assert verifyObject(IMemgine, ns)
    assert type(shared) is MemoryGraph and shared.fact_limit == 7

    plain = make_state(tmp_path / "plain", Clock())
    graph = loaded(plain.memory, SHARED)
    assert type(graph) is MemoryGraph and graph.fact_limit == plain.config.memory_fact_limit
