"""
Proactive memory: deciding, without a model, whether one stored fact is
worth putting in front of an agent now, measuring that choice, and mining
an agent's recent trajectory into facts.

**The request** is the query, the last ``MAX_RECENT_TEXTS`` of ``recent``
(strings) and, from ``trigger``, its ``error`` and ``tool`` strings, joined
into one text.  Its candidates are the engine's ``query`` of that text
(``max_candidates`` of them, 1 to ``MAX_CANDIDATES``).

**A candidate's score** is

    weight(kind) * confidence * (0.6 * grounding + 0.4 / (1 + rank))

where ``grounding`` is the share of terms it has in common with the
request (shared terms over the smaller of the two term sets, so 1 when one
covers the other), ``rank`` its place in the retrieval (0 first), and
``weight`` from ``KIND_WEIGHTS`` (``OTHER_KIND_WEIGHT`` for other kinds):
constraints 1.0, knowledge 0.8 plus ``REQUIREMENT_BONUS`` when its body
states a requirement (must, never, always, required, avoid, do not, ...),
procedural 0.6 plus ``PROCEDURAL_BOOST`` when ``trigger.tool_error`` is set
or ``trigger.repeated_failures >= 2``.  The best score (ties: retrieval
order) is injected when it reaches ``THRESHOLD`` (0.45), or whatever it is
when ``force`` is set; otherwise the answer is silent.  No weight reaches
1.125, so a candidate sharing no term with the request never passes the
threshold on its own: what is injected without ``force`` is always about
the request.  The reminder is the fact's own text (``Reminder (kind):
subject: body``), nothing generated.  Every answer carries ``bank``, the
graph's valid facts counted by kind.

**evaluate** replays labelled cases against four strategies on the live
graph, without ``mark_used`` (it changes nothing):

- ``selective``: what ``intervene`` would do (the case's own ``force``);
- ``always_inject``: ``intervene`` with ``force``: the best candidate
  whenever there is one;
- ``passive_retrieval``: every candidate shown, no selection;
- ``no_memory``: nothing shown.

Per strategy, over the cases: ``interventions`` = cases where at least one
fact was shown; ``true_positives`` = cases where a shown fact is in the
case's ``relevant_fact_ids``; ``false_positives`` = interventions minus
true positives; ``false_negatives`` = cases with relevant facts minus true
positives; ``precision`` = true positives / interventions; ``recall`` =
true positives / cases with relevant facts; ``interruption_rate`` =
interventions / cases; ``avg_candidates_exposed`` = facts shown / cases.
A ratio with a zero denominator is 0.0; ratios are rounded to 6 decimals.

**maintain** mines the last ``max_recent`` events (1 to ``MAX_EVENTS``)
into procedural and knowledge facts with ids derived from the events
(``car_twisted.memory.mining`` says which events and what they yield), so
mining the same events again saves nothing (``skipped_existing``), and
answers the window's trigger for ``intervene``.  A full graph raises
``MemoryFull`` from the add that found it full; facts saved before it stay
(a retry skips them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import attrs

from car_twisted.json_value import JsonValue
from car_twisted.memory import mining
from car_twisted.memory.graph import MemoryGraph
from car_twisted.memory.model import Fact
from car_twisted.memory.terms import fact_terms, query_terms

__all__ = [
    "KIND_WEIGHTS",
    "MemoryEngine",
    "MAX_CANDIDATES",
    "THRESHOLD",
    "evaluate",
    "intervene",
    "maintain",
]

KIND_WEIGHTS = {
    "constraint": 1.0,
    "knowledge": 0.8,
    "procedural": 0.6,
    "pattern": 0.5,
    "environment": 0.4,
    "identity": 0.3,
    "conversation": 0.2,
    "unknown": 0.2,
}
OTHER_KIND_WEIGHT = 0.4
REQUIREMENT_BONUS = 0.2
PROCEDURAL_BOOST = 0.5
THRESHOLD = 0.45
GROUNDING_SHARE = 0.6
MAX_CANDIDATES = 64
DEFAULT_CANDIDATES = 5
MAX_RECENT_TEXTS = 8
MAX_TEXT_CHARS = 2000
MAX_CASES = 1000
MAX_EVENTS = 500
MAINTAIN_SOURCE = "memory.maintain"



class MemoryEngine(Protocol):
    """What these functions use of an engine (any ``IMemgine`` provider has it)."""

    def get(self, fact_id: str) -> Fact | None: ...

    def facts(self) -> Iterable[Fact]: ...

    def query(self, text: str, k: int) -> Iterable[Fact]: ...

    def mark_used(self, fact_id: str) -> object: ...

    def add(
        self,
        subject: str,
        body: str,
        kind: str = ...,
        fact_id: str | None = ...,
        confidence: float = ...,
        tags: tuple[str, ...] = ...,
        source: str = ...,
        constraint: bool | None = ...,
        metadata: dict[str, JsonValue] | None = ...,
    ) -> object: ...


def _bank(engine: MemoryEngine) -> dict[str, JsonValue]:
    if isinstance(engine, MemoryGraph):
        return dict(engine.kind_counts())
    counts: dict[str, int] = {}
    for fact in engine.facts():
        counts[fact.kind] = counts.get(fact.kind, 0) + 1
    return dict(sorted(counts.items()))


def _text(value: object) -> str:
    return value[:MAX_TEXT_CHARS] if isinstance(value, str) else ""


@attrs.frozen
class _Request:
    text: str
    boost_procedural: bool


def _request(query: str | None, recent: Sequence[str], trigger: Mapping[str, JsonValue] | None) -> _Request:
    parts = [_text(query)]
    parts.extend(_text(item) for item in list(recent)[-MAX_RECENT_TEXTS:])
    boost = False
    if trigger:
        tool_error = trigger.get("tool_error")
        failures = trigger.get("repeated_failures")
        repeated = isinstance(failures, int) and not isinstance(failures, bool) and failures >= 2
        boost = bool(tool_error) or repeated
        parts.extend(_text(trigger.get(name)) for name in ("error", "tool"))
        if isinstance(tool_error, str):
            parts.append(_text(tool_error))
    return _Request(" ".join(part for part in parts if part).strip(), boost)


def _weight(fact: Fact, boost_procedural: bool) -> float:
    if fact.constraint:
        return KIND_WEIGHTS["constraint"]
    weight = KIND_WEIGHTS.get(fact.kind, OTHER_KIND_WEIGHT)
    if fact.kind == "knowledge" and mining.REQUIREMENT.search(fact.body):
        weight += REQUIREMENT_BONUS
    if fact.kind == "procedural" and boost_procedural:
        weight += PROCEDURAL_BOOST
    return weight


def _score(fact: Fact, rank: int, request_terms: set[str], boost_procedural: bool) -> float:
    terms = set(fact_terms(fact.subject, fact.body, fact.tags))
    shared = len(terms & request_terms)
    grounding = shared / max(1, min(len(terms), len(request_terms)))
    relevance = GROUNDING_SHARE * min(1.0, grounding) + (1.0 - GROUNDING_SHARE) / (1 + rank)
    return round(_weight(fact, boost_procedural) * fact.confidence * relevance, 6)


@attrs.frozen
class _Decision:
    candidates: list[Fact]
    selected: Fact | None
    score: float
    reason: str


def _decide(engine: MemoryEngine, request: _Request, force: bool, max_candidates: int) -> _Decision:
    if not request.text:
        return _Decision([], None, 0.0, "empty_request")
    candidates: list[Fact] = list(engine.query(request.text, max(1, min(max_candidates, MAX_CANDIDATES))))
    if not candidates:
        return _Decision([], None, 0.0, "no_candidates")
    request_terms = set(query_terms(request.text))
    scored = [(_score(fact, rank, request_terms, request.boost_procedural), rank) for rank, fact in enumerate(candidates)]
    # Best score first, retrieval order among equals.
    score, rank = min(scored, key=lambda pair: (-pair[0], pair[1]))
    if score < THRESHOLD and not force:
        return _Decision(candidates, None, score, "below_threshold")
    return _Decision(candidates, candidates[rank], score, "")


def _reminder(fact: Fact) -> str:
    label = "constraint" if fact.constraint else fact.kind
    subject, body = " ".join(fact.subject.split()), " ".join(fact.body.split())
    text = f"{subject}: {body}" if subject and body else subject or body
    return f"Reminder ({label}): {text}"


def intervene(
    engine: MemoryEngine,
    query: str | None = "",
    recent: Sequence[str] = (),
    trigger: Mapping[str, JsonValue] | None = None,
    force: bool = False,
    max_candidates: int = DEFAULT_CANDIDATES,
) -> dict[str, JsonValue]:
    """
    At most one reminder for the request (see the module docstring);
    an injected one counts as a use of its fact (``mark_used``).
    """
    decision = _decide(engine, _request(query, recent, trigger), force, max_candidates)
    bank = _bank(engine)
    if decision.selected is None:
        return {"decision": "silent", "reason": decision.reason, "candidates": len(decision.candidates), "bank": bank}
    fact = decision.selected
    engine.mark_used(fact.id)
    selected = fact.to_wire()
    selected["score"] = decision.score
    return {
        "decision": "inject",
        "reminder": _reminder(fact),
        "selected": selected,
        "candidates": len(decision.candidates),
        "bank": bank,
    }


# -- evaluation ------------------------------------------------------------------

STRATEGIES = ("selective", "always_inject", "passive_retrieval", "no_memory")


@attrs.define
class _Tally:
    interventions: int = 0
    true_positives: int = 0
    exposed: int = 0

    def count(self, shown: Iterable[str], relevant: set[str]) -> None:
        shown = list(shown)
        if shown:
            self.interventions += 1
            self.exposed += len(shown)
            if relevant.intersection(shown):
                self.true_positives += 1

    def metrics(self, cases: int, with_relevant: int) -> dict[str, JsonValue]:
        def ratio(a: int, b: int) -> float:
            return round(a / b, 6) if b else 0.0

        return {
            "interventions": self.interventions,
            "true_positives": self.true_positives,
            "false_positives": self.interventions - self.true_positives,
            "false_negatives": with_relevant - self.true_positives,
            "precision": ratio(self.true_positives, self.interventions),
            "recall": ratio(self.true_positives, with_relevant),
            "interruption_rate": ratio(self.interventions, cases),
            "avg_candidates_exposed": ratio(self.exposed, cases),
        }


def _case(case: object, position: int) -> tuple[_Request, bool, int, set[str]]:
    if not isinstance(case, Mapping):
        raise ValueError(f"case {position}: must be an object")
    request = case.get("request", {})
    if not isinstance(request, Mapping):
        raise ValueError(f"case {position}: request must be an object")
    query = request.get("query", "")
    recent = request.get("recent", [])
    trigger = request.get("trigger")
    force = request.get("force", False)
    max_candidates = request.get("max_candidates", DEFAULT_CANDIDATES)
    relevant = case.get("relevant_fact_ids", [])
    if not isinstance(query, str):
        raise ValueError(f"case {position}: query must be a string")
    if not isinstance(recent, list) or not all(isinstance(item, str) for item in recent):
        raise ValueError(f"case {position}: recent must be a list of strings")
    if trigger is not None and not isinstance(trigger, Mapping):
        raise ValueError(f"case {position}: trigger must be an object")
    if not isinstance(force, bool):
        raise ValueError(f"case {position}: force must be true or false")
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, int):
        raise ValueError(f"case {position}: max_candidates must be an integer")
    if not isinstance(relevant, list) or not all(isinstance(item, str) for item in relevant):
        raise ValueError(f"case {position}: relevant_fact_ids must be a list of strings")
    return _request(query, recent, trigger), force, max_candidates, set(relevant)


def evaluate(engine: MemoryEngine, cases: Sequence[object]) -> dict[str, JsonValue]:
    """
    Metrics of the four strategies over C{cases} (see the module
    docstring); changes nothing in C{engine}.

    @raise ValueError: a malformed case, or more than C{MAX_CASES}.
    """
    if len(cases) > MAX_CASES:
        raise ValueError(f"at most {MAX_CASES} cases")
    checked = [_case(case, position) for position, case in enumerate(cases)]
    tallies = {name: _Tally() for name in STRATEGIES}
    with_relevant = 0
    for request, force, max_candidates, relevant in checked:
        if relevant:
            with_relevant += 1
        selective = _decide(engine, request, force, max_candidates)
        always = _decide(engine, request, True, max_candidates)
        tallies["selective"].count([selective.selected.id] if selective.selected else [], relevant)
        tallies["always_inject"].count([always.selected.id] if always.selected else [], relevant)
        tallies["passive_retrieval"].count([fact.id for fact in always.candidates], relevant)
        tallies["no_memory"].count([], relevant)
    out: dict[str, JsonValue] = {"cases": len(checked)}
    for name in STRATEGIES:
        out[name] = tallies[name].metrics(len(checked), with_relevant)
    return out


def maintain(engine: MemoryEngine, events: Sequence[object], max_recent: int = 50) -> dict[str, JsonValue]:
    """
    Mine the last C{max_recent} (1 to C{MAX_EVENTS}) of C{events} into
    facts, idempotently (see the module docstring).

    @return: C{{trigger, saved, skipped_existing, ignored}}.
    """
    window = list(events)[-max(1, min(max_recent, MAX_EVENTS)) :]
    known = [event for event in window if isinstance(event, Mapping)]
    ignored = len(window) - len(known)
    saved = skipped = 0
    for event in known:
        mined = mining.mine(event)
        if mined is None:
            ignored += 1
            continue
        for item in mined:
            if engine.get(item.fact_id) is not None:
                skipped += 1
                continue
            engine.add(
                item.subject,
                item.body,
                kind=item.kind,
                fact_id=item.fact_id,
                confidence=0.7,
                tags=item.tags,
                source=MAINTAIN_SOURCE,
                metadata=item.metadata,
            )
            saved += 1
    return {"trigger": mining.trigger(known), "saved": saved, "skipped_existing": skipped, "ignored": ignored}
