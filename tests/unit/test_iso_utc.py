"""``iso_utc`` reuses the formatted second; its text must stay datetime's."""

import datetime

from hypothesis import given
from hypothesis import strategies as st

from car_twisted._util import iso_utc


def reference(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


@given(st.floats(min_value=-2e9, max_value=4e9, allow_nan=False) | st.integers(min_value=0, max_value=4_000_000_000))
def test_same_text_as_datetime(seconds):
    assert iso_utc(seconds) == reference(seconds)


def test_edges_of_a_second():
    for seconds in (0, 0.5, 1796191851, 1796191851.0000004, 1796191851.0000005, 1796191851.9999995, 1796191851.999999, 1796191852):
        assert iso_utc(seconds) == reference(seconds), seconds
    # The cached second does not leak into the next one.
    assert iso_utc(1796191851.25) == "2026-12-02T06:10:51.250000Z"
    assert iso_utc(1796191852.0) == "2026-12-02T06:10:52Z"
