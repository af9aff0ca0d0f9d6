"""
Memory engine benchmark (on demand): what ``memory.add_fact`` costs the
engine per fact, ``memory.query`` latency at 1k, 10k and 100k facts, and
the first query after a burst of adds.

Synthetic facts with a realistic vocabulary: people, companies and cities
(multi-word entities, so the graph has entity hubs) in a dozen sentence
templates, plus ordinary words drawn from a Zipf distribution (a few very
common words link thousands of facts, most are rare).  Queries mix an
entity with one or two words, some of them questions ("where does Ada
Lovelace work").

    python benchmarks/memory_bench.py                  # 1k, 10k, 100k
    python benchmarks/memory_bench.py --sizes 1000,10000 --queries 100 --json out.json

Add cost is CPU time (``time.process_time``) per ``MemoryGraph.add``
(tokenising, the fact record, and the matrix append), over the adds that
grew the graph to each size.  Query latency is wall time
(``time.perf_counter``) per ``MemoryGraph.query(text, 10)``; the engine
is single-threaded, so wall and CPU agree on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from twisted.internet.task import Clock

from car_twisted.memory.graph import MemoryGraph

FIRST = (
    "Ada Alan Grace Linus Barbara Ken Dennis Margaret Edsger Donald Frances John Radia Tim Vint Hedy Katherine Dorothy Guido Bjarne"
).split()
LAST = (
    "Lovelace Turing Hopper Torvalds Liskov Thompson Ritchie Hamilton Dijkstra Knuth "
    "Allen McCarthy Perlman Berners Cerf Lamarr Johnson Vaughan Rossum Stroustrup"
).split()
COMPANY_A = "Acme Globex Initech Umbrella Hooli Vandelay Stark Wayne Tyrell Cyberdyne Soylent Wonka Aperture Oscorp Massive Dynamic".split()
COMPANY_B = "Corp Labs Systems Industries Analytics Networks Foods Robotics".split()
CITIES = (
    "Paris Berlin London Lisbon Madrid Rome Vienna Prague Warsaw Oslo Stockholm Helsinki Dublin Zurich Geneva "
    "Amsterdam Brussels Munich Hamburg Lyon Marseille Porto Seville Milan Naples Krakow Bergen Aarhus Ghent Turin"
).split()
CITIES += [f"New {city}" for city in ("York", "Haven", "Delhi", "Orleans", "Castle", "Port")]
COMMON = (
    "project meeting report server database deploy release budget client invoice contract schedule review "
    "design test build pipeline incident ticket customer order payment account policy backup network storage "
    "cluster node service endpoint latency error warning feature roadmap team manager office travel flight "
    "hotel lunch coffee train bus ticket security audit license vendor support document spreadsheet email"
).split()
TEMPLATES = (
    "{p} works at {c} in {city}",
    "{c} is based in {city}",
    "{p} manages the {w1} {w2} for {c}",
    "{p} prefers {w1} over {w2} when handling {w3}",
    "The {w1} of {c} moved to {city} last {w2}",
    "{p} met {p2} about the {w1} {w2}",
    "{c} signed a {w1} with {c2} for {w2} {w3}",
    "Ask {p} before changing the {w1} {w2}",
    "The {w1} {w2} in {city} fails when the {w3} is {w4}",
    "{p} reported a {w1} with the {w2} {w3} at {c}",
    "{c} uses {w1} {w2} to track {w3}",
    "{p} travels to {city} for the {w1} {w2}",
)
QUESTIONS = (
    "where does {p} work",
    "{p} {w1}",
    "{c} {city}",
    "what is the {w1} {w2} of {c}",
    "who manages the {w1} in {city}",
    "{w1} {w2}",
)


class Vocabulary:
    """Deterministic synthetic names and words."""

    def __init__(self, rng: random.Random, extra_words: int = 6000) -> None:
        self.rng = rng
        self.people = [f"{first} {last}" for first in FIRST for last in LAST]
        self.companies = [f"{a} {b}" for a in COMPANY_A for b in COMPANY_B]
        syllables = "ka lo mi ra te su no vi de pa ru xo ze ti ba fe go hu".split()
        made = {"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(extra_words * 2)}
        self.words = COMMON + sorted(made)[:extra_words]
        # Zipf-like weights: word i drawn with weight 1 / (i + 1).
        self.cum = []
        total = 0.0
        for i in range(len(self.words)):
            total += 1.0 / (i + 1)
            self.cum.append(total)

    def word(self) -> str:
        return self.rng.choices(self.words, cum_weights=self.cum)[0]

    def fill(self, template: str) -> str:
        r = self.rng
        return template.format(
            p=r.choice(self.people),
            p2=r.choice(self.people),
            c=r.choice(self.companies),
            c2=r.choice(self.companies),
            city=r.choice(CITIES),
            w1=self.word(),
            w2=self.word(),
            w3=self.word(),
            w4=self.word(),
        )

    def fact(self) -> tuple[str, str, list[str]]:
        body = self.fill(self.rng.choice(TEMPLATES))
        subject = " ".join(body.split()[:2])
        tags = [self.word()] if self.rng.random() < 0.3 else []
        return subject, body, tags

    def query(self) -> str:
        return self.fill(self.rng.choice(QUESTIONS))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100.0 * (len(ordered) - 1))))]


def measure(sizes: list[int], queries: int, burst: int, seed: int) -> list[dict[str, float]]:
    rng = random.Random(seed)
    vocab = Vocabulary(rng)
    graph = MemoryGraph(Clock(), fact_limit=max(sizes) + burst + 10)
    rows = []
    for size in sizes:
        facts = [vocab.fact() for _ in range(size - graph.count())]
        started = time.process_time()
        for subject, body, tags in facts:
            graph.add(subject, body, kind="knowledge", tags=tags)
        add_cpu = time.process_time() - started
        texts = [vocab.query() for _ in range(queries)]
        graph.query(texts[0], 10)  # warm caches once
        latencies = []
        empty = 0
        for text in texts:
            t0 = time.perf_counter()
            found = graph.query(text, 10)
            latencies.append(time.perf_counter() - t0)
            empty += not found
        context_times = []
        for text in texts[:20]:
            t0 = time.perf_counter()
            graph.build_context(text, 8192)
            context_times.append(time.perf_counter() - t0)
        # A burst of adds, then the first query after it (and a second one).
        burst_facts = [vocab.fact() for _ in range(burst)]
        builds = graph.index.builds
        for subject, body, tags in burst_facts:
            graph.add(subject, body, kind="knowledge", tags=tags)
        t0 = time.perf_counter()
        graph.query(texts[1], 10)
        first_after = time.perf_counter() - t0
        t0 = time.perf_counter()
        graph.query(texts[1], 10)
        second_after = time.perf_counter() - t0
        rows.append(
            {
                "facts": size,
                "terms": graph.index.n_terms,
                "incidences": graph.index.nnz,
                "add_us": add_cpu / max(1, len(facts)) * 1e6,
                "query_p50_ms": percentile(latencies, 50) * 1e3,
                "query_p99_ms": percentile(latencies, 99) * 1e3,
                "query_max_ms": max(latencies) * 1e3,
                "empty_results": empty,
                "context_p50_ms": statistics.median(context_times) * 1e3,
                "burst": burst,
                "burst_builds": graph.index.builds - builds,
                "first_query_after_burst_ms": first_after * 1e3,
                "second_query_ms": second_after * 1e3,
            }
        )
        # Back to the nominal size for the next band: drop the burst.
        for fact in graph.facts()[-burst:]:
            graph.delete(fact.id)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="graph sizes, ascending (default 1000,10000,100000)")
    parser.add_argument("--queries", type=int, default=300, help="queries timed per size (default 300)")
    parser.add_argument("--burst", type=int, default=1000, help="adds before the first-query-after-burst figure (default 1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    sizes = sorted(int(size) for size in args.sizes.split(","))
    rows = measure(sizes, args.queries, args.burst, args.seed)
    header = (
        "| facts | terms | incidences | add µs CPU | query p50 ms | query p99 ms | query max ms "
        "| build_context p50 ms | first query after +1k adds ms | next query ms |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        print(
            f"| {row['facts']:,} | {row['terms']:,} | {row['incidences']:,} | {row['add_us']:.1f} | {row['query_p50_ms']:.2f} "
            f"| {row['query_p99_ms']:.2f} | {row['query_max_ms']:.2f} | {row['context_p50_ms']:.2f} "
            f"| {row['first_query_after_burst_ms']:.2f} | {row['second_query_ms']:.2f} |"
        )
    print(f"\n{args.queries} queries per size (k=10); {sum(r['empty_results'] for r in rows)} answered nothing.", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
