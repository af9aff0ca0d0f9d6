"""
The hostile campaign's fixtures (a fresh daemon per test, the report) and
its summary: a table of every scenario's figures at the end of the run,
also written as JSON under pytest's base temporary directory.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest

from campaign import Daemon, raise_fd_limit

_ROWS = pytest.StashKey[list]()
_REPORT_PATH = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ROWS] = []


@pytest.fixture(scope="session")
def campaign_rows(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every scenario's row; written to ``hostile-report.json`` when the session ends."""
    rows = request.config.stash[_ROWS]
    yield rows
    if rows:
        path = tmp_path_factory.getbasetemp() / "hostile-report.json"
        path.write_text(json.dumps(rows, indent=2) + "\n")
        request.config.stash[_REPORT_PATH] = str(path)


@pytest.fixture
def report(campaign_rows: list) -> Any:
    """Add one scenario's figures (``campaign.figures``) to the campaign's report."""
    return campaign_rows.append


@pytest.fixture
def daemon(tmp_path: Any) -> Any:
    """A real ``twist car`` process on a fresh state root; it must survive the test and stop on SIGTERM."""
    raise_fd_limit(8192)  # inherited by the daemon too
    d = Daemon(tmp_path)
    try:
        yield d
        d.assert_alive()
    finally:
        code = d.stop()
    assert code in (0, -signal.SIGTERM), f"the daemon exited with {code}:\n{d.output()[-4000:]}"


def _ms(probe: dict[str, Any]) -> str:
    return f"{probe.get('p50_ms', 0):.2f}/{probe.get('p99_ms', 0):.2f}/{probe.get('max_ms', 0):.1f}"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    tr = terminalreporter
    tr.section("hostile campaign: daemon RSS and the probe's state.get latency")
    header = (
        f"{'scenario':<24} {'base p50/p99/max ms':>20} {'attack p50/p99/max ms':>22} {'p99 limit':>9} "
        f"{'errs':>4} {'RSS before/peak/after MiB':>26} {'growth':>7} {'limit':>6}"
    )
    tr.write_line(header)
    tr.write_line("-" * len(header))
    for row in rows:
        base, attack = row["baseline"], row["attack"]
        rss = f"{row['rss_before_mib']:.1f}/{row['rss_peak_mib']:.1f}/{row['rss_after_mib']:.1f}"
        tr.write_line(
            f"{row['scenario']:<24} {_ms(base):>20} {_ms(attack):>22} {row['p99_limit_ms']:>9.0f} "
            f"{(base.get('errors') or 0) + (attack.get('errors') or 0):>4} {rss:>26} "
            f"{row['rss_growth_mib']:>7.1f} {row['rss_limit_mib']:>6.0f}"
        )
        counts = ", ".join(f"{k}={v}" for k, v in row["counts"].items())
        tr.write_line(f"{'':<24} {counts}")
    path = config.stash.get(_REPORT_PATH, None)
    if path:
        tr.write_line(f"report: {path}")
