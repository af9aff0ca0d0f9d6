"""
The memory engine on a Clock: multi-hop retrieval by personalized
PageRank, constraints, delete and replace, consolidation, the utility
blend, context assembly within a budget, snapshots, bounds, the
incremental matrix, and proactive memory (intervene, evaluate, maintain).
"""

import math

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from car_twisted.interfaces import IMemgine
from car_twisted.memory import proactive
from car_twisted.memory.graph import MemoryGraph
from car_twisted.memory.index import COMPACT_MIN
from car_twisted.memory.model import MemoryFull
from car_twisted.memory.terms import fact_terms, query_terms

DISTRACTORS = [
    ("Bob", "Bob works at Initech"),
    ("Initech", "Initech is based in Berlin"),
    ("Carol", "Carol drinks green tea every morning"),
    ("Weather", "Rain is expected on Tuesday"),
    ("Dave", "Dave plays chess on weekends"),
]


@pytest.fixture
def clock():
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest.fixture
def graph(clock):
    return MemoryGraph(clock)


def bodies(facts):
    return [fact.body for fact in facts]


def add_all(graph, pairs, **kw):
    return [graph.add(subject, body, **kw) for subject, body in pairs]


def test_provides_the_interface(graph):
    assert verifyObject(IMemgine, graph)
    assert graph.fact_limit == 100_000 and graph.generation == 0


def test_terms_words_entities_compounds_and_tags():
    terms = fact_terms("Alice Smith", "She moved to New York, then read config.json", ["Ops Team"])
    assert terms[:3] == ["alice", "smith", "alice smith"]
    assert "new york" in terms and "config.json" in terms and "config" in terms
    assert "#ops team" in terms and "ops" in terms
    assert "she" not in terms and "to" not in terms and "then" not in terms  # stopwords
    assert query_terms("where is Alice based?") == ["alice", "based"]


# -- retrieval ----------------------------------------------------------------------


def test_a_fact_two_hops_away_is_found_through_the_shared_entity(graph):
    link = graph.add("Alice", "Alice works at Acme")
    far = graph.add("Acme", "Acme is based in Paris")
    add_all(graph, DISTRACTORS)
    assert {f.id for f in graph.query("Alice Paris", 2)} == {link.id, far.id}
    assert {link.id, far.id} <= {f.id for f in graph.query("where is Alice based", 3)}
    # "Acme ... Paris" shares no term with the query "Alice": only the entity Acme leads there.
    assert not set(fact_terms(far.subject, far.body)) & set(query_terms("Alice"))
    assert far.id in [f.id for f in graph.query("Alice", 3)]


def test_without_the_linking_fact_the_far_fact_is_not_found(graph):
    graph.add("Alice", "Alice owns a bicycle")
    far = graph.add("Acme", "Acme is based in Paris")
    add_all(graph, DISTRACTORS)
    found = graph.query("Alice", 10)
    assert bodies(found) == ["Alice owns a bicycle"]
    assert far.id not in [f.id for f in found]


def test_query_bounds_and_nothing_matching(graph):
    add_all(graph, [(f"Topic {i}", f"shared keyword item{i}") for i in range(150)])
    assert len(graph.query("keyword", 1000)) == 100  # k capped
    assert graph.query("keyword", 0) == []
    assert graph.query("", 5) == []
    assert graph.query("nothing here matches", 5) == []
    assert len(graph.query("keyword " + "x" * 100_000, 3)) == 3  # long text is cut, not refused


def test_equal_scores_keep_insertion_order(graph):
    ids = [graph.add("Zeta", "zeta marker", fact_id=fact_id).id for fact_id in ("m-3", "a-9", "z-1", "b-2", "k-5")]
    assert [f.id for f in graph.query("zeta", 5)] == ids
    assert [f.id for f in graph.query("zeta", 3)] == ids[:3]  # the cut keeps the first ones too
    # A replacement keeps its place among equals.
    graph.add("Zeta", "zeta marker", fact_id="a-9", tags=())
    assert [f.id for f in graph.query("zeta", 5)] == ids


def test_ids_are_minted_or_given(graph):
    minted = graph.add("s", "b")
    assert minted.id.startswith("fact-") and len(minted.id) == len("fact-") + 16
    assert graph.add("s", "b", fact_id="mine").id == "mine"
    with pytest.raises(ValueError):
        graph.add("s", "b", fact_id="")
    with pytest.raises(ValueError):
        graph.add("s", "b", confidence=1.5)
    with pytest.raises(ValueError):
        graph.add("s", "b", confidence=float("nan"))


def test_timestamps_come_from_the_clock(graph, clock):
    fact = graph.add("s", "b", fact_id="f")
    assert fact.created_at == fact.updated_at == 1000
    clock.advance(5)
    again = graph.add("s", "b2", fact_id="f")
    assert again.created_at == 1000 and again.updated_at == 1005


# -- constraints, delete, replace ------------------------------------------------------


def test_constraint_flag_and_context(graph):
    by_kind = graph.add("Deploys", "Never deploy on Fridays", kind="constraint")
    by_flag = graph.add("Secrets", "Do not print secrets", kind="knowledge", constraint=True)
    plain = graph.add("Colour", "The logo is blue", kind="knowledge")
    assert by_kind.constraint and by_flag.constraint and not plain.constraint
    context = graph.build_context("what colour is the logo", 500)
    constraints = context.split("## Constraints\n")[1].split("\n\n")[0]
    assert "Never deploy on Fridays" in constraints and "Do not print secrets" in constraints
    assert "- Colour: The logo is blue" in context.split("## Facts\n")[1]


def test_delete_removes_from_query_count_and_facts(graph):
    keep = graph.add("Alice", "Alice works at Acme")
    gone = graph.add("Alice", "Alice lives in Lyon")
    generation = graph.generation
    assert graph.delete(gone.id) is gone
    assert graph.generation == generation + 1
    assert graph.count() == 1 and graph.facts() == [keep]
    assert graph.get(gone.id) is None
    assert bodies(graph.query("Alice Lyon", 5)) == ["Alice works at Acme"]
    assert graph.delete(gone.id) is None and graph.generation == generation + 1


def test_replace_by_id(graph, clock):
    first = graph.add("Office", "The office is in Lyon", fact_id="office")
    other = graph.add("Team", "The team meets on Monday")
    graph.record_outcome("office", True)
    clock.advance(1)
    second = graph.add("Office", "The office is in Nantes", fact_id="office", tags=["moved"])
    assert graph.count() == 2 and graph.get("office") is second
    assert [f.id for f in graph.facts()] == ["office", other.id]  # keeps its place
    assert second.created_at == first.created_at and second.successes == 1
    assert bodies(graph.query("Nantes", 5)) == ["The office is in Nantes"]
    assert graph.query("Lyon", 5) == []


def test_mark_used_and_record_outcome(graph):
    fact = graph.add("s", "b")
    generation = graph.generation
    graph.mark_used(fact.id)
    graph.record_outcome(fact.id, True)
    graph.record_outcome(fact.id, False)
    graph.record_outcome(fact.id, False)
    assert (fact.uses, fact.successes, fact.failures) == (1, 1, 2)
    assert graph.generation == generation + 4
    assert graph.mark_used("nope") is None and graph.record_outcome("nope", True) is None


# -- consolidate ------------------------------------------------------------------------


def test_consolidate_merges_duplicates_and_expires_superseded(graph, clock):
    oldest = graph.add("Build", "Run make before tests.", tags=["ci"], confidence=0.5)
    twin = graph.add("build ", "run  MAKE before tests", tags=["make"], confidence=0.9)
    graph.record_outcome(oldest.id, True)
    graph.record_outcome(twin.id, True)
    graph.record_outcome(twin.id, False)
    graph.mark_used(twin.id)
    old_port = graph.add("Port", "The API listens on 8080", fact_id="port-v1")
    new_port = graph.add("Port", "The API listens on 9090", fact_id="port-v2", metadata={"supersedes": "port-v1"})
    unrelated = graph.add("Lang", "The service is written in Go")
    # Superseded at once: kept (get finds it) but never retrieved.
    assert graph.get("port-v1").status == "superseded" and graph.count() == 4
    assert [f.id for f in graph.query("API listens", 5)] == ["port-v2"]
    generation = graph.generation
    report = graph.consolidate()
    assert report == {
        "merged": 1,
        "expired": 1,
        "before": 5,
        "after": 3,
        "merged_ids": [twin.id],
        "expired_ids": [old_port.id],
    }
    assert graph.generation == generation + 1
    assert [f.id for f in graph.facts()] == [oldest.id, new_port.id, unrelated.id]
    kept = graph.get(oldest.id)
    assert (kept.uses, kept.successes, kept.failures) == (1, 2, 1)
    assert kept.tags == ("ci", "make") and kept.confidence == 0.9
    assert graph.get("port-v1") is None and graph.get(twin.id) is None
    # The merged tag links the keeper now.
    assert [f.id for f in graph.query("make", 5)] == [oldest.id]
    # Nothing left to do: no change.
    assert graph.consolidate()["merged"] == 0 and graph.generation == generation + 1


# -- utility ----------------------------------------------------------------------------


def test_utility_settings_clamp(graph):
    assert graph.utility() == (0.0, 1.0)
    assert graph.set_utility(2.0, 9.0) == (1.0, 4.0)
    assert graph.set_utility(-1.0, -3.0) == (0.0, 0.0)
    assert graph.set_utility(0.5, None) == (0.5, 0.0)
    assert graph.set_utility(None, 2.0) == (0.5, 2.0)
    assert graph.set_utility(float("nan"), float("inf")) == (0.0, 0.0)
    assert graph.set_utility(float("-inf"), 1.5) == (0.0, 1.5)
    generation = graph.generation
    graph.set_utility(None, None)
    assert graph.generation == generation  # no change, no new generation


def _utility_graph(clock):
    graph = MemoryGraph(clock)
    ids = [graph.add(f"Deploy {i}", f"deploy step {'extra words ' * i}number {i}", fact_id=f"d{i}").id for i in range(6)]
    return graph, ids


def test_utility_weight_zero_keeps_the_relevance_order(clock):
    plain, _ = _utility_graph(clock)
    rated, ids = _utility_graph(clock)
    for _ in range(20):
        rated.record_outcome(ids[0], False)
        rated.record_outcome(ids[5], True)
    expected = [f.id for f in plain.query("deploy step", 6)]
    assert [f.id for f in rated.query("deploy step", 6)] == expected
    assert [s for _, s in rated.ranked("deploy step", 6)] == [s for _, s in plain.ranked("deploy step", 6)]


def test_utility_weight_one_reorders_by_outcomes(clock):
    graph, ids = _utility_graph(clock)
    relevance_order = [f.id for f in graph.query("deploy step", 6)]
    top, bottom = relevance_order[0], relevance_order[-1]
    for _ in range(20):
        graph.record_outcome(top, False)
        graph.record_outcome(bottom, True)
    graph.set_utility(1.0, 1.0)
    blended = [f.id for f in graph.query("deploy step", 6)]
    assert blended[0] == bottom and blended[-1] == top
    # Part way: utility moves the proven fact up without the failed one leading.
    graph.set_utility(0.5, 0.0)
    half = [f.id for f in graph.query("deploy step", 6)]
    assert half.index(bottom) < relevance_order.index(bottom) and half[0] != top
    # Facts the query does not reach are never pulled in by utility.
    graph.add("Other", "an unrelated pebble", fact_id="x")
    for _ in range(50):
        graph.record_outcome("x", True)
    assert "x" not in [f.id for f in graph.query("deploy step", 10)]


# -- build_context ----------------------------------------------------------------------


def _context_graph(clock):
    graph = MemoryGraph(clock)
    graph.add("Me", "I am the release agent", kind="identity")
    graph.add("Freeze", "Never deploy on Fridays", kind="constraint")
    graph.add("Release", "The release runs deploy.sh on the build host", kind="knowledge")
    graph.add("Chat", "User asked about the release", kind="conversation")
    clock.advance(1)
    graph.add("Chat", "User confirmed the release date", kind="conversation")
    graph.add("Host", "The build host runs Debian 12", kind="environment")
    graph.add("Open", "Who approves the release is unknown", kind="unknown")
    return graph


def test_build_context_sections_in_order(clock):
    context = _context_graph(clock).build_context("how does the release deploy", 2000)
    titles = [line for line in context.splitlines() if line.startswith("## ")]
    assert titles == ["## Identity", "## Constraints", "## Facts", "## Conversation", "## Environment", "## Known Unknowns"]
    conversation = context.split("## Conversation\n")[1].split("\n\n")[0].splitlines()
    assert conversation == ["- Chat: User asked about the release", "- Chat: User confirmed the release date"]  # newest last
    assert context.split("## Facts\n")[1].split("\n\n")[0] == "- Release: The release runs deploy.sh on the build host"
    assert context == _context_graph(Clock()).build_context("how does the release deploy", 2000)  # deterministic


def test_build_context_respects_the_budget_and_keeps_constraints(clock):
    graph = _context_graph(clock)
    full = graph.build_context("release deploy", 2000)
    lines = set(full.splitlines())
    for budget in range(0, 80):
        context = graph.build_context("release deploy", budget)
        assert len(context) <= 4 * budget
        # Whole lines of the full context only: nothing cut in half.
        assert set(context.splitlines()) <= lines
    tiny = graph.build_context("release deploy", 12)
    assert tiny == "## Constraints\n- Freeze: Never deploy on Fridays"
    small = graph.build_context("release deploy", 30)
    assert "## Constraints" in small and "## Known Unknowns" not in small
    assert graph.build_context("release deploy", 0) == ""


def test_build_context_on_an_empty_graph(graph):
    assert graph.build_context("anything", 1000) == ""


# -- snapshot and restore -----------------------------------------------------------------


def test_snapshot_round_trip(graph, clock):
    graph.add("Alice", "Alice works at Acme", tags=["people"], source="ws-test")
    graph.add("Acme", "Acme is based in Paris", kind="knowledge", confidence=0.8)
    graph.add("Rule", "Never deploy on Fridays", kind="constraint")
    graph.add("Old", "Port 8080", fact_id="old")
    graph.add("New", "Port 9090", metadata={"supersedes": "old"})
    graph.record_outcome(graph.facts()[0].id, True)
    graph.set_utility(0.3, 2.0)
    snap = graph.snapshot()
    assert snap["version"] == 1 and snap["utility"] == {"utility_weight": 0.3, "utility_exploration": 2.0}
    copy = MemoryGraph(clock)
    assert copy.restore(snap) == 4
    assert copy.snapshot() == snap
    assert [f.id for f in copy.query("Alice Paris", 5)] == [f.id for f in graph.query("Alice Paris", 5)]
    assert copy.get("old").status == "superseded" and copy.utility() == (0.3, 2.0)


def test_restore_takes_the_other_forms(graph):
    assert graph.restore([{"subject": "a", "body": "alpha one"}, {"subject": "b", "body": "beta two", "kind": "constraint"}]) == 2
    assert graph.facts()[1].constraint and graph.facts()[0].id.startswith("fact-")
    assert graph.restore({"facts": [{"subject": "c", "body": "gamma", "id": "g"}]}) == 1
    assert [f.id for f in graph.facts()] == ["g"]
    assert graph.restore([]) == 0 and graph.count() == 0


@pytest.mark.parametrize(
    "bad",
    [
        "not a snapshot",
        {"version": 2, "facts": []},
        {"version": 1},
        {"facts": "nope"},
        [{"subject": "only a subject"}],
        [{"subject": "s", "body": 3}],
        [{"subject": "s", "body": "b", "confidence": 2}],
        [{"subject": "s", "body": "b", "confidence": "high"}],
        [{"subject": "s", "body": "b", "tags": "t"}],
        [{"subject": "s", "body": "b", "uses": -1}],
        [{"subject": "s", "body": "b", "status": "gone"}],
        [{"subject": "s", "body": "b", "created_at": float("nan")}],
        [{"subject": "s", "body": "b", "id": "x"}, {"subject": "t", "body": "c", "id": "x"}],
        {"facts": [], "utility": {"utility_weight": "max"}},
        [{"subject": "s", "body": "b"}, 7],
    ],
)
def test_malformed_snapshots_leave_the_graph_untouched(graph, bad):
    graph.add("Alice", "Alice works at Acme", fact_id="a")
    before, generation = graph.snapshot(), graph.generation
    with pytest.raises(ValueError) as raised:
        graph.restore(bad)
    assert str(raised.value)
    assert graph.snapshot() == before and graph.generation == generation
    assert bodies(graph.query("Alice", 5)) == ["Alice works at Acme"]


def test_restore_refuses_more_than_the_limit(clock):
    graph = MemoryGraph(clock, fact_limit=2)
    with pytest.raises(ValueError, match="limit"):
        graph.restore([{"subject": str(i), "body": "b"} for i in range(3)])
    assert graph.count() == 0


# -- bounds and the incremental matrix --------------------------------------------------------


def test_memory_full_at_the_cap(clock):
    graph = MemoryGraph(clock, fact_limit=3)
    for i in range(3):
        graph.add("s", f"fact number {i}", fact_id=f"f{i}")
    generation = graph.generation
    with pytest.raises(MemoryFull) as raised:
        graph.add("s", "one too many")
    assert raised.value.data == {"reason": "memory_full", "limit": 3}
    assert graph.count() == 3 and graph.generation == generation
    graph.add("s", "replaced in place", fact_id="f1")  # a replacement needs no room
    graph.delete("f0")
    graph.add("s", "fits again")
    assert graph.count() == 3


def test_superseded_facts_give_way_at_the_cap(clock):
    graph = MemoryGraph(clock, fact_limit=2)
    graph.add("s", "version one", fact_id="v1")
    graph.add("s", "version two", fact_id="v2", metadata={"supersedes": "v1"})
    assert graph.count() == 1
    graph.add("s", "another fact", fact_id="n")  # v1 is dropped to make room
    assert graph.get("v1") is None and graph.count() == 2


def test_adds_do_not_rebuild_the_matrix(graph):
    index = graph.index
    for i in range(1000):
        graph.add(f"Person {i % 37}", f"note {i} about project {i % 11} in city {i % 7}")
        if i % 100 == 99:
            builds = index.builds
            assert graph.query(f"project {i % 11}", 5)
            assert index.builds == builds  # a query never rebuilds
    # Buffer growths only: logarithmic in the adds, nowhere near one per add.
    assert index.builds <= 3 * math.ceil(math.log2(1000)) and index.builds < 40
    assert index.live == 1000


def test_tombstones_are_compacted(graph):
    ids = [graph.add("Bulk", f"bulk item {i}").id for i in range(3 * COMPACT_MIN)]
    keeper = graph.add("Keeper", "the keeper stays findable")
    builds = graph.index.builds
    for fact_id in ids:
        graph.delete(fact_id)
    assert graph.index.builds > builds and graph.index.rows < len(ids)
    assert graph.query("bulk", 5) == [] and graph.query("keeper", 5) == [keeper]
    assert graph.count() == 1


def test_after_deletes_and_compaction_answers_match_a_fresh_graph(clock):
    import random

    rng = random.Random(7)
    words = [f"w{i}" for i in range(60)] + ["Alice", "Acme Corp", "Paris"]
    graph = MemoryGraph(clock)
    for i in range(4 * COMPACT_MIN):
        graph.add("s", " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))), fact_id=f"f{i}")
    for i in rng.sample(range(4 * COMPACT_MIN), 3 * COMPACT_MIN):
        graph.delete(f"f{i}")
    assert graph.index.rows < 2 * graph.count() + COMPACT_MIN + 2  # compacted at least once
    fresh = MemoryGraph(clock)
    fresh.restore([fact.to_record() for fact in graph.facts()])
    for text in ["w1 w2", "Alice", "Acme Corp in Paris", "w59 w3 w17"]:
        ours, theirs = graph.ranked(text, 20), fresh.ranked(text, 20)
        assert [f.id for f, _ in ours] == [f.id for f, _ in theirs]
        assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-9)


# -- proactive memory ------------------------------------------------------------------------


def _proactive_graph(clock):
    graph = MemoryGraph(clock)
    graph.add("Deploys", "Never deploy to production on Fridays", kind="constraint", fact_id="no-friday")
    graph.add("Database", "The staging database must be migrated before deploy", kind="knowledge", fact_id="migrate")
    graph.add("pytest", "Run pytest with -x to stop at the first failure", kind="procedural", fact_id="pytest-x")
    graph.add("Lunch", "The team likes pizza for lunch", kind="pattern", fact_id="pizza")
    return graph


def test_intervene_injects_a_grounded_constraint_and_marks_it_used(clock):
    graph = _proactive_graph(clock)
    answer = proactive.intervene(graph, "deploy the new build to production today")
    assert answer["decision"] == "inject"
    assert answer["selected"]["fact_id"] == "no-friday"
    assert answer["reminder"] == "Reminder (constraint): Deploys: Never deploy to production on Fridays"
    assert answer["candidates"] >= 1 and answer["bank"] == {"constraint": 1, "knowledge": 1, "pattern": 1, "procedural": 1}
    assert graph.get("no-friday").uses == 1


def test_intervene_stays_silent(clock):
    graph = _proactive_graph(clock)
    generation = graph.generation
    assert proactive.intervene(graph, "what is the capital of Peru") == {
        "decision": "silent",
        "reason": "no_candidates",
        "candidates": 0,
        "bank": {"constraint": 1, "knowledge": 1, "pattern": 1, "procedural": 1},
    }
    weak = proactive.intervene(graph, "order lunch")  # a pattern fact: below the threshold
    assert weak["decision"] == "silent" and weak["reason"] == "below_threshold" and weak["candidates"] == 1
    assert proactive.intervene(graph, "")["reason"] == "empty_request"
    assert graph.generation == generation and graph.get("pizza").uses == 0
    forced = proactive.intervene(graph, "order lunch", force=True)
    assert forced["decision"] == "inject" and forced["selected"]["fact_id"] == "pizza"


def test_intervene_weighs_procedures_after_tool_errors(clock):
    graph = _proactive_graph(clock)
    calm = proactive.intervene(graph, "run the tests")
    assert calm["decision"] == "silent"
    failing = proactive.intervene(graph, "run the tests", recent=["pytest crashed"], trigger={"tool_error": True, "tool": "pytest"})
    assert failing["decision"] == "inject" and failing["selected"]["fact_id"] == "pytest-x"
    repeated = proactive.intervene(graph, "run the tests", trigger={"repeated_failures": 2})
    assert repeated["decision"] == "inject" and repeated["selected"]["fact_id"] == "pytest-x"


def test_evaluate_metrics_on_a_labelled_set(clock):
    graph = _proactive_graph(clock)
    cases = [
        {"id": "friday", "request": {"query": "deploy to production now"}, "relevant_fact_ids": ["no-friday"]},
        {"id": "migrate", "request": {"query": "is the staging database ready"}, "relevant_fact_ids": ["migrate"]},
        {"id": "lunch", "request": {"query": "order lunch"}, "relevant_fact_ids": []},
        {"id": "peru", "request": {"query": "capital of Peru"}, "relevant_fact_ids": []},
        {"id": "tests", "request": {"query": "run the tests"}, "relevant_fact_ids": ["pytest-x"]},
    ]
    before = graph.snapshot()
    generation = graph.generation
    report = proactive.evaluate(graph, cases)
    assert graph.snapshot() == before and graph.generation == generation  # nothing marked used
    assert report["cases"] == 5
    # selective: friday and migrate injected correctly; lunch and pytest below the threshold; Peru has no candidates.
    assert report["selective"] == {
        "interventions": 2,
        "true_positives": 2,
        "false_positives": 0,
        "false_negatives": 1,
        "precision": 1.0,
        "recall": 0.666667,
        "interruption_rate": 0.4,
        "avg_candidates_exposed": 0.4,
    }
    # always: injects for every case with a candidate (all but Peru): lunch is a false positive.
    always = report["always_inject"]
    assert (always["interventions"], always["true_positives"], always["false_positives"], always["false_negatives"]) == (4, 3, 1, 0)
    assert always["precision"] == 0.75 and always["recall"] == 1.0 and always["interruption_rate"] == 0.8
    passive = report["passive_retrieval"]
    assert passive["interventions"] == 4 and passive["recall"] == 1.0
    assert passive["avg_candidates_exposed"] >= always["avg_candidates_exposed"]
    assert report["no_memory"] == {
        "interventions": 0,
        "true_positives": 0,
        "false_positives": 0,
        "false_negatives": 3,
        "precision": 0.0,
        "recall": 0.0,
        "interruption_rate": 0.0,
        "avg_candidates_exposed": 0.0,
    }
    assert proactive.evaluate(graph, cases) == report  # deterministic
    with pytest.raises(ValueError):
        proactive.evaluate(graph, [{"request": {"query": 3}}])


def test_maintain_is_idempotent(clock):
    graph = MemoryGraph(clock)
    events = [
        {"kind": "action_failed", "action_id": "a1", "tool": "shell", "error": "exit status 2 at line 14", "attempts": 1},
        {"kind": "action_retried", "action_id": "a2", "tool": "http_get", "attempts": 3},
        {"kind": "turn", "role": "user", "text": "Please be quick. You must never push to main directly."},
        {"kind": "turn", "tool": "shell", "status": "failed", "action_id": "a1", "error": "exit status 2 at line 14"},
        {"kind": "turn", "tool": "rm", "status": "rejected", "error": "denied by policy", "policy_rejected": True},
        {"kind": "action_failed", "action_id": "a3", "tool": "shell", "error": "exit status 2 at line 99"},
        {"kind": "mystery"},
        "not an event",
    ]
    first = proactive.maintain(graph, events, 50)
    assert first["saved"] == 4 and first["skipped_existing"] == 2 and first["ignored"] == 2
    assert first["trigger"] == {"tool_error": False, "repeated_failures": 2, "tool": "shell", "error": "exit status 2 at line 99"}
    kinds = {f.subject: f.kind for f in graph.facts()}
    assert kinds == {"shell failure": "procedural", "http_get retries": "procedural", "User requirement": "knowledge", "rm refused": "knowledge"}
    assert all(f.id.startswith("fact-mem-") for f in graph.facts())
    assert [f.body for f in graph.facts() if f.subject == "User requirement"] == ["You must never push to main directly."]
    snapshot = graph.snapshot()
    again = proactive.maintain(graph, events, 50)
    assert again["saved"] == 0 and again["skipped_existing"] == 6
    assert graph.snapshot() == snapshot
    # The window is the last max_recent events.
    assert proactive.maintain(MemoryGraph(clock), events, 2)["saved"] == 0
    recent = proactive.maintain(MemoryGraph(clock), events[:1], 1)
    assert recent["saved"] == 1 and recent["trigger"]["tool_error"] is True
