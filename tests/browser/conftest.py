"""
The dashboard in a real browser: headless Chromium (Debian's ``chromium``
and ``chromium-driver``) through Selenium, against ``twist car``
subprocesses.  Without Chromium these tests skip, except in CI (``CI``
set), where they fail.  Screenshots go to ``artifacts/dashboard/`` (or
``$CAR_TEST_ARTIFACTS``).
"""

from dashboard_harness import TIMINGS


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("-", "dashboard load")
        for line in TIMINGS:
            terminalreporter.write_line(line)
