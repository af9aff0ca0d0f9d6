"""
``/metrics``: the daemon's own counters (``DaemonStats``) in the Prometheus
text format.

A ``prometheus_client`` collector reads the counters when scraped, so the
request path keeps plain integer increments; each daemon has its own
``CollectorRegistry`` (two daemons in one process do not mix).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from car_twisted.stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["CONTENT_TYPE", "DaemonCollector", "metrics_registry", "render_metrics"]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class DaemonCollector(Collector):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        stats = state.stats
        sessions = list(state.sessions.values())
        connections = GaugeMetricFamily("car_connections", "Open WebSocket connections, by authentication.", labels=["state"])
        authenticated = sum(1 for s in sessions if s.authenticated)
        connections.add_metric(["authenticated"], authenticated)
        connections.add_metric(["guest"], len(sessions) - authenticated)
        yield connections

        requests = CounterMetricFamily(
            "car_requests", "JSON-RPC requests answered, by method and outcome (ok or the error code).", labels=["method", "outcome"]
        )
        latency = HistogramMetricFamily(
            "car_request_duration_seconds", "Seconds from a request's arrival to its reply, by method.", labels=["method"]
        )
        for method, per in sorted(stats.methods.items()):
            for outcome, count in sorted(per.outcomes.items()):
                requests.add_metric([method, outcome], count)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*map(repr, LATENCY_BUCKETS), "+Inf"), per.buckets, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([method], buckets, per.total_seconds)
        yield requests
        yield latency
        yield GaugeMetricFamily("car_requests_in_flight", "Requests waiting on their handler now.", value=stats.in_flight)
        yield CounterMetricFamily("car_callback_timeouts", "Tool callbacks to clients that timed out.", value=stats.callback_timeouts)
        yield CounterMetricFamily("car_run_turns", "Run turns appended to the run store.", value=stats.run_turns)
        yield CounterMetricFamily("car_agent_restarts", "Supervised agents restarted.", value=stats.agent_restarts)
        yield CounterMetricFamily(
            "car_subscriber_drops", "Fan-out frames dropped for subscribers that did not read.", value=stats.subscriber_drops
        )


def metrics_registry(state: ServerState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(state))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
