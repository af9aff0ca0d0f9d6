"""
The memory engine ("memgine"): one graph of facts, linked through the terms
they share (``car_twisted.memory.terms``) and ranked for a query by
personalized PageRank over the fact-term incidence matrix
(``car_twisted.memory.index``).

What it keeps:

- every stored fact by id, in insertion order (a replacement keeps its
  place, its ``created_at`` and its outcome record);
- valid facts take part in retrieval; a fact named by another's
  ``metadata["supersedes"]`` becomes ``superseded``: kept (``get`` finds
  it) but never retrieved, until ``consolidate`` expires it or room is
  needed (at ``fact_limit`` stored facts the oldest superseded ones go
  first, so superseded facts never hold more than the cap);
- the utility settings: ``utility_weight`` in [0, 1] (0: pure relevance)
  and ``utility_exploration`` in [0, 4] (standard deviations of the
  outcome posterior added to its mean).

Bounds: at most ``fact_limit`` valid facts (``MemoryFull`` past it), the
stored facts' bytes within ``budget`` (``BudgetExceeded`` past it; the
daemon gives each graph a budget inside one for all graphs), query
text cut to ``MAX_QUERY_CHARS``, ``k`` cut to ``MAX_K``, ``build_context``
looks at ``CONTEXT_K`` retrieved facts and a bounded number per section.
``generation`` goes up by one with every change, so persistence can tell
when to write.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from itertools import islice

import attrs
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from car_twisted.budget import ByteBudget
from car_twisted.interfaces import IJournaledMemgine
from car_twisted.json_value import JsonValue
from car_twisted.memory.context import MAX_ITEMS_PER_SECTION, Section, assemble
from car_twisted.memory.index import TermIndex
from car_twisted.memory.model import Fact, MemoryFull
from car_twisted.memory.records import (
    MAX_TAGS,
    SNAPSHOT_VERSION,
    FactSpec,
    check_confidence,
    check_fact_id,
    check_kind,
    check_tags,
    parse_snapshot,
    supersedes_ids,
)
from car_twisted.memory.terms import fact_terms, normalise_text, query_terms

__all__ = ["CONTEXT_K", "DEFAULT_FACT_LIMIT", "DEFAULT_GRAPH_BYTES", "MAX_K", "MAX_QUERY_CHARS", "MemoryGraph"]

DEFAULT_FACT_LIMIT = 100_000
DEFAULT_GRAPH_BYTES = 256 * 1024 * 1024
MAX_K = 100
MAX_QUERY_CHARS = 4096
CONTEXT_K = 32
MAX_EXPLORATION = 4.0
DEFAULT_EXPLORATION = 1.0
# Ids listed in a consolidate report, per list.
MAX_REPORT_IDS = 100
MAX_BUDGET_TOKENS = 1_000_000

#: The build_context sections: shown in this order ...
SECTION_ORDER = ("Identity", "Constraints", "Facts", "Conversation", "Environment", "Known Unknowns")
#: ... and filled in this one.
SECTION_PRIORITY = ("Constraints", "Identity", "Facts", "Conversation", "Environment", "Known Unknowns")
#: Kinds with a section of their own (constraint facts go by their flag).
_KIND_SECTIONS = {"identity": "Identity", "conversation": "Conversation", "environment": "Environment", "unknown": "Known Unknowns"}


def _clamp(value: float, high: float) -> float:
    if not math.isfinite(value):
        return 0.0
    return min(max(value, 0.0), high)


@implementer(IJournaledMemgine)
class MemoryGraph:
    """One memory graph; see the module docstring."""

    def __init__(self, clock: IReactorTime, fact_limit: int = DEFAULT_FACT_LIMIT, budget: ByteBudget | None = None) -> None:
        if isinstance(fact_limit, bool) or not isinstance(fact_limit, int) or fact_limit < 1:
            raise ValueError("fact_limit must be a positive integer")
        self._clock = clock
        self.fact_limit = fact_limit
        self.budget = budget if budget is not None else ByteBudget("memory graph", DEFAULT_GRAPH_BYTES)
        self.generation = 0
        self._utility_weight = 0.0
        self._utility_exploration = DEFAULT_EXPLORATION
        # What changed since the last drain_changes (the journal's next lines).
        self._dirty: dict[str, None] = {}
        self._utility_dirty = False
        self._rewrite = False
        self._reset()

    def _reset(self) -> None:
        # Every stored fact (valid and superseded), in insertion order.
        self._facts: dict[str, Fact] = {}
        # Insertion sequence per id: orders equal scores; a replacement keeps it.
        self._seq: dict[str, int] = {}
        self._next_seq = 0
        # Valid facts by kind, and by the constraint flag, in the order added.
        self._by_kind: dict[str, dict[str, None]] = {}
        self._constraints: dict[str, None] = {}
        # Superseded facts, oldest first.
        self._superseded: dict[str, None] = {}
        self._index = TermIndex()
        # What each stored fact holds of the byte budget (Fact.size when stored).
        self._sizes: dict[str, int] = {}

    @property
    def index(self) -> TermIndex:
        """The incidence matrix and walk (for tests and benchmarks: ``builds``, ``nnz``)."""
        return self._index

    # -- reads ---------------------------------------------------------------

    def get(self, fact_id: str) -> Fact | None:
        return self._facts.get(fact_id)

    def count(self) -> int:
        return self._index.live

    def facts(self) -> list[Fact]:
        return [fact for fact in self._facts.values() if fact.valid]

    def kind_counts(self) -> dict[str, int]:
        """Valid facts per kind, kinds in sorted order."""
        return {kind: len(ids) for kind, ids in sorted(self._by_kind.items()) if ids}

    def utility(self) -> tuple[float, float]:
        return self._utility_weight, self._utility_exploration

    def ranked(self, text: str, k: int) -> list[tuple[Fact, float]]:
        """
        What ``query`` answers, with each fact's score: its relevance
        relative to the best one, in (0, 1], blended with its utility when
        the utility weight is above 0 (``TermIndex.rank``).
        """
        k = min(k, MAX_K)
        if k <= 0 or not text:
            return []
        terms = query_terms(text[:MAX_QUERY_CHARS])
        ranked = self._index.rank(terms, k, self._utility_weight, self._utility_exploration)
        return [(self._facts[key], score) for key, score in ranked]

    def query(self, text: str, k: int) -> list[Fact]:
        return [fact for fact, _ in self.ranked(text, k)]

    def build_context(self, query: str, budget_tokens: int) -> str:
        """
        The context text (``car_twisted.memory.context``): Identity (identity
        facts), Constraints (every valid constraint-flagged fact), Facts
        (C{query}'s best C{CONTEXT_K} of the rest), Conversation (newest
        last), Environment and Known Unknowns (``unknown`` facts), each only
        if something in it fits.  Showing facts here does not count as a
        use: the caller credits what it sends (``mark_used``).
        """
        budget_tokens = min(budget_tokens, MAX_BUDGET_TOKENS)
        facts = self._facts

        def kind(name: str, newest_first: bool = False) -> list[Fact]:
            ids = self._by_kind.get(name, {})
            order = reversed(ids) if newest_first else iter(ids)
            return [facts[fact_id] for fact_id in islice(order, MAX_ITEMS_PER_SECTION)]

        retrieved = [
            fact for fact, _ in self.ranked(query, CONTEXT_K) if not fact.constraint and fact.kind not in _KIND_SECTIONS
        ]
        conversation = kind("conversation", newest_first=True)
        sections = {
            "Identity": Section("Identity", [fact for fact in kind("identity") if not fact.constraint]),
            "Constraints": Section("Constraints", [facts[fact_id] for fact_id in islice(self._constraints, MAX_ITEMS_PER_SECTION)]),
            "Facts": Section("Facts", retrieved),
            "Conversation": Section("Conversation", [fact for fact in conversation if not fact.constraint], reverse=True),
            "Environment": Section("Environment", [fact for fact in kind("environment") if not fact.constraint]),
            "Known Unknowns": Section("Known Unknowns", [fact for fact in kind("unknown") if not fact.constraint]),
        }
        return assemble([sections[title] for title in SECTION_ORDER], SECTION_PRIORITY, budget_tokens)

    # -- changes -------------------------------------------------------------

    def add(
        self,
        subject: str,
        body: str,
        kind: str = "pattern",
        fact_id: str | None = None,
        confidence: float = 1.0,
        tags: Iterable[str] = (),
        source: str = "",
        constraint: bool | None = None,
        metadata: Mapping[str, JsonValue] | None = None,
    ) -> Fact:
        if not isinstance(subject, str) or not isinstance(body, str):
            raise ValueError("subject and body must be strings")
        if not isinstance(source, str):
            raise ValueError("source must be a string")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError("metadata must be an object")
        spec = FactSpec(
            subject=subject,
            body=body,
            fact_id=None if fact_id is None else check_fact_id(fact_id),
            kind=check_kind(kind),
            constraint=bool(constraint) or kind == "constraint",
            confidence=check_confidence(confidence),
            tags=check_tags(tags),
            source=source,
            metadata=dict(metadata or {}),
        )
        old = self._facts.get(spec.fact_id) if spec.fact_id is not None else None
        if old is None or not old.valid:
            self._make_room()
        now = self._clock.seconds()
        fact = self._fact(spec, now, old)
        self._store(fact, fact_terms(fact.subject, fact.body, fact.tags))
        self._apply_supersedes(fact, now)
        self.generation += 1
        return fact

    def _make_room(self) -> None:
        """Room for one more valid fact, or MemoryFull."""
        if self._index.live >= self.fact_limit:
            raise MemoryFull(self.fact_limit)
        # Superseded facts give way, oldest first, so storage stays within the cap.
        while len(self._facts) >= self.fact_limit and self._superseded:
            self._drop(next(iter(self._superseded)))

    def _mint_id(self, taken: Container[str] = ()) -> str:
        while True:
            fact_id = f"fact-{secrets.token_hex(8)}"
            if fact_id not in self._facts and fact_id not in taken:
                return fact_id

    def _fact(self, spec: FactSpec, now: float, old: Fact | None) -> Fact:
        """A new Fact from C{spec}; replacing C{old} keeps its creation time and outcome record."""
        return Fact(
            id=spec.fact_id if spec.fact_id is not None else self._mint_id(),
            subject=spec.subject,
            body=spec.body,
            kind=spec.kind,
            constraint=spec.constraint,
            confidence=spec.confidence,
            tags=spec.tags,
            source=spec.source,
            created_at=old.created_at if old is not None else (now if spec.created_at is None else spec.created_at),
            updated_at=now if spec.updated_at is None or old is not None else spec.updated_at,
            uses=old.uses if old is not None else spec.uses,
            successes=old.successes if old is not None else spec.successes,
            failures=old.failures if old is not None else spec.failures,
            status=spec.status,
            metadata=spec.metadata,
        )

    def _store(self, fact: Fact, terms: Sequence[str]) -> None:
        """
        Put C{fact} in place (replacing one with its id); no generation change.

        @raise BudgetExceeded: its bytes do not fit; nothing changed.
        """
        size = fact.size()
        grows = size - self._sizes.get(fact.id, 0)
        if grows > 0:
            self.budget.reserve(grows)
        else:
            self.budget.release(-grows)
        self._sizes[fact.id] = size
        if fact.id in self._facts:
            self._unlink(self._facts[fact.id])
        else:
            self._seq[fact.id] = self._next_seq
            self._next_seq += 1
        # Assigning an existing key keeps its place in insertion order.
        self._facts[fact.id] = fact
        self._dirty[fact.id] = None
        if fact.valid:
            self._index.add(fact.id, terms, self._seq[fact.id], fact.successes, fact.failures)
            self._by_kind.setdefault(fact.kind, {})[fact.id] = None
            if fact.constraint:
                self._constraints[fact.id] = None
        else:
            self._superseded[fact.id] = None

    def _unlink(self, fact: Fact) -> None:
        """Take C{fact} out of retrieval and the kind indexes (it stays stored)."""
        if self._index.remove(fact.id):
            self._by_kind.get(fact.kind, {}).pop(fact.id, None)
            self._constraints.pop(fact.id, None)
        self._superseded.pop(fact.id, None)

    def _drop(self, fact_id: str) -> Fact | None:
        fact = self._facts.pop(fact_id, None)
        if fact is not None:
            self._unlink(fact)
            del self._seq[fact_id]
            self.budget.release(self._sizes.pop(fact_id, 0))
            self._dirty[fact_id] = None
        return fact

    def _supersede(self, fact: Fact, now: float) -> None:
        self._unlink(fact)
        fact.status = "superseded"
        fact.updated_at = now
        self._superseded[fact.id] = None
        self._dirty[fact.id] = None

    def _apply_supersedes(self, fact: Fact, now: float) -> None:
        for target_id in supersedes_ids(fact.metadata):
            target = self._facts.get(target_id)
            if target is not None and target is not fact and target.valid:
                self._supersede(target, now)

    def delete(self, fact_id: str) -> Fact | None:
        fact = self._drop(fact_id)
        if fact is not None:
            self.generation += 1
        return fact

    def mark_used(self, fact_id: str) -> Fact | None:
        """Count a use of the fact; @return: it, or None if there is none."""
        fact = self._facts.get(fact_id)
        if fact is not None:
            fact.uses += 1
            self._dirty[fact.id] = None
            self.generation += 1
        return fact

    def record_outcome(self, fact_id: str, success: bool) -> Fact | None:
        """Add a success or a failure to the fact's record; @return: it, or None if there is none."""
        fact = self._facts.get(fact_id)
        if fact is None:
            return None
        if success:
            fact.successes += 1
        else:
            fact.failures += 1
        fact.updated_at = self._clock.seconds()
        self._index.set_outcome(fact.id, fact.successes, fact.failures)
        self._dirty[fact.id] = None
        self.generation += 1
        return fact

    def set_utility(self, weight: float | None = None, exploration: float | None = None) -> tuple[float, float]:
        """
        Set the utility weight (clamped to [0, 1]) and exploration (clamped
        to [0, 4]); a non-finite value becomes 0, None keeps the current one.
        """
        before = self.utility()
        if weight is not None:
            self._utility_weight = _clamp(float(weight), 1.0)
        if exploration is not None:
            self._utility_exploration = _clamp(float(exploration), MAX_EXPLORATION)
        if self.utility() != before:
            self._utility_dirty = True
            self.generation += 1
        return self.utility()

    def consolidate(self) -> dict[str, JsonValue]:
        """
        Expire superseded facts, then merge duplicates.

        Expired: every fact marked superseded, and every fact some stored
        fact's ``metadata["supersedes"]`` names.  Duplicates: valid facts
        with the same normalised subject and body
        (``terms.normalise_text``); the oldest keeps its id and gets the
        others' uses, successes and failures added, their tags appended
        (first occurrence kept), the highest confidence, and the constraint
        flag if any had it; the others are removed.

        @return: C{{merged, expired, before, after, merged_ids,
            expired_ids}}: counts of facts removed each way, stored facts
            before and after (C{after == before - merged - expired}), and the
            first C{MAX_REPORT_IDS} ids removed each way.
        """
        before = len(self._facts)
        now = self._clock.seconds()
        named = {target for fact in self._facts.values() for target in supersedes_ids(fact.metadata) if target != fact.id}
        expired = [fact_id for fact_id, fact in self._facts.items() if not fact.valid or fact_id in named]
        for fact_id in expired:
            self._drop(fact_id)
        keepers: dict[tuple[str, str], Fact] = {}
        merged: list[str] = []
        changed: dict[str, Fact] = {}
        for fact in list(self._facts.values()):
            key = (normalise_text(fact.subject), normalise_text(fact.body))
            keeper = keepers.setdefault(key, fact)
            if keeper is fact:
                continue
            keeper.uses += fact.uses
            keeper.successes += fact.successes
            keeper.failures += fact.failures
            # Capped as an add would be, so the graph always reloads.
            keeper.tags = tuple(dict.fromkeys(keeper.tags + fact.tags))[:MAX_TAGS]
            keeper.confidence = max(keeper.confidence, fact.confidence)
            keeper.constraint = keeper.constraint or fact.constraint
            keeper.updated_at = now
            changed[keeper.id] = keeper
            self._drop(fact.id)
            merged.append(fact.id)
        for keeper in changed.values():
            # Re-linked: its tags (terms) and constraint flag may have changed.
            self._store(keeper, fact_terms(keeper.subject, keeper.body, keeper.tags))
        if merged or expired:
            self.generation += 1
        return {
            "merged": len(merged),
            "expired": len(expired),
            "before": before,
            "after": len(self._facts),
            "merged_ids": list(merged[:MAX_REPORT_IDS]),
            "expired_ids": list(expired[:MAX_REPORT_IDS]),
        }

    def snapshot(self) -> dict[str, JsonValue]:
        return {
            "version": SNAPSHOT_VERSION,
            "facts": [fact.to_record() for fact in self._facts.values()],
            "utility": {"utility_weight": self._utility_weight, "utility_exploration": self._utility_exploration},
        }

    def restore(self, snapshot: object) -> int:
        """
        Replace the whole graph with C{snapshot} (``car_twisted.memory.records``
        says what is taken).  Records without an id get one; a record's
        ``metadata["supersedes"]`` marks the facts it names superseded, as an
        ``add`` would.

        @return: how many valid facts the graph now holds.
        @raise ValueError: the snapshot is malformed or holds more than
            C{fact_limit} facts; the graph is untouched.
        """
        specs, utility = parse_snapshot(snapshot, self.fact_limit)
        now = self._clock.seconds()
        # Built aside and swapped in whole, so a failure leaves the graph as
        # it was; the old facts' bytes are given back while the new ones are
        # counted, and taken again if the new ones do not fit.
        saved = self.__dict__.copy()
        held = sum(self._sizes.values())
        self.budget.release(held)
        try:
            self._reset()
            given = {spec.fact_id for spec in specs if spec.fact_id is not None}
            restored = []
            for spec in specs:
                if spec.fact_id is None:
                    spec = attrs.evolve(spec, fact_id=self._mint_id(given))
                fact = self._fact(spec, now, None)
                self._store(fact, fact_terms(fact.subject, fact.body, fact.tags))
                restored.append(fact)
            for fact in restored:
                if fact.valid:
                    self._apply_supersedes(fact, now)
        except BaseException:
            self.budget.release(sum(self._sizes.values()))
            self.__dict__.update(saved)
            self.budget.retake(held)
            raise
        if utility is not None:
            weight, exploration = utility
            self._utility_weight = _clamp(weight, 1.0) if weight is not None else self._utility_weight
            self._utility_exploration = _clamp(exploration, MAX_EXPLORATION) if exploration is not None else self._utility_exploration
        # A whole-graph change: the journal starts again from a full copy.
        self._dirty.clear()
        self._rewrite = True
        self.generation += 1
        return self._index.live

    # -- the journal (IJournaledMemgine) ------------------------------------------------

    def _utility_record(self) -> dict[str, JsonValue]:
        return {"utility_weight": self._utility_weight, "utility_exploration": self._utility_exploration}

    def drain_changes(self) -> list[dict[str, JsonValue]]:
        """
        What changed since the last drain, as journal entries: C{{"put":
        record}} (the fact's whole state), C{{"del": id}}, C{{"utility":
        {...}}}, or after a whole-graph change C{{"reset": true}} and every
        fact.  O(changes), not O(graph).
        """
        entries: list[dict[str, JsonValue]] = []
        if self._rewrite:
            entries.append({"reset": True})
            entries.extend({"put": fact.to_record()} for fact in self._facts.values())
            entries.append({"utility": self._utility_record()})
        else:
            for fact_id in self._dirty:
                fact = self._facts.get(fact_id)
                entries.append({"put": fact.to_record()} if fact is not None else {"del": fact_id})
            if self._utility_dirty:
                entries.append({"utility": self._utility_record()})
        self.mark_saved()
        return entries

    def mark_saved(self) -> None:
        """Everything so far is on disk (just loaded, or drained)."""
        self._dirty.clear()
        self._utility_dirty = False
        self._rewrite = False

    def replay(self, entries: Iterable[object]) -> int:
        """
        Apply journal entries in order (loading): each C{put} sets a fact's
        whole state, C{del} removes one, C{reset} empties the graph.

        @return: how many entries were malformed and skipped.
        @raise BudgetExceeded: the facts do not fit the byte budget.
        """
        skipped = 0
        now = self._clock.seconds()
        for entry in entries:
            if not isinstance(entry, dict):
                skipped += 1
                continue
            try:
                if entry.get("reset") is True:
                    for fact_id in list(self._facts):
                        self._drop(fact_id)
                elif "put" in entry:
                    (spec,), _ = parse_snapshot([entry["put"]], 1)
                    if spec.fact_id is None:
                        raise ValueError("a journal record needs its id")
                    fact = self._fact(spec, now, None)
                    self._store(fact, fact_terms(fact.subject, fact.body, fact.tags))
                elif isinstance(entry.get("del"), str):
                    self._drop(str(entry["del"]))
                elif isinstance(entry.get("utility"), dict):
                    raw = entry["utility"]
                    self.set_utility(_number(raw.get("utility_weight")), _number(raw.get("utility_exploration")))
                else:
                    skipped += 1
            except ValueError:
                skipped += 1
        self.generation += 1
        self.mark_saved()
        return skipped

    def snapshot_chunks(self, size: int = 2048) -> tuple[dict[str, JsonValue], Iterator[list[JsonValue]]]:
        """
        The snapshot's header (version, utility) and its fact records in
        chunks, built lazily: a caller takes one chunk per reactor turn so a
        large graph never holds the thread.  Facts changed or removed
        meanwhile are in the journal that follows the snapshot.
        """
        header: dict[str, JsonValue] = {"version": SNAPSHOT_VERSION, "utility": self._utility_record()}
        ids = list(self._facts)

        def chunks() -> Iterator[list[JsonValue]]:
            for start in range(0, len(ids), size):
                batch = (self._facts.get(fact_id) for fact_id in ids[start : start + size])
                yield [fact.to_record() for fact in batch if fact is not None]

        return header, chunks()


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
