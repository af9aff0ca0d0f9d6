"""Framing helpers, the origin policy and the factory's protocol options."""

import pytest
from twisted.internet.task import Clock

from car_twisted.ws.protocol import CarServerFactory, frame_text, origin_is_loopback
from support import make_state


@pytest.mark.parametrize(
    "size,header",
    [(0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"), (65535, b"\x81\x7e\xff\xff"),
     (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00")],
)
def test_frame_text_header(size, header):
    """Replies are single unmasked FIN text frames with the right length encoding."""
    assert frame_text(b"x" * size) == header


@pytest.mark.parametrize(
    "origin,ok",
    [
        ("http://localhost", True),
        ("http://localhost:3000", True),
        ("https://app.localhost:8443", True),
        ("http://127.0.0.1:9101", True),
        ("http://127.8.9.10", True),
        ("http://[::1]:80", True),
        ("http://evil.example", False),
        ("http://localhost.evil.example", False),
        ("http://192.168.1.5", False),
        ("null", False),
        ("", False),
        ("http://[not-an-ip", False),
    ],
)
def test_origin_is_loopback(origin, ok):
    assert origin_is_loopback(origin) is ok


def test_factory_options(tmp_path):
    """Size limits, keep-alive, compression and the connection cap come from the config."""
    state = make_state(tmp_path, Clock(), max_message_bytes=1234, ping_interval=7.0, ping_timeout=3.0,
                       max_preauth_connections=9, max_preauth_per_peer=4, auth_timeout=2.5,
                       allowed_origins=["https://app.example:*"])
    factory = CarServerFactory(state)
    assert factory.maxMessagePayloadSize == 1234 and factory.maxFramePayloadSize == 1234
    # Keep-alive is the factory's one KeepAlive, not Autobahn's per-connection timers.
    assert factory.autoPingInterval == 0
    assert (factory.keepalive.interval, factory.keepalive.timeout) == (7.0, 3.0)
    # Autobahn's own cap is off: guests have the Admission's slots and
    # authenticated connections are counted at session.auth.
    assert factory.maxConnections == 0 and factory.webStatus is False and factory.server is None
    adm = factory.admission
    assert (adm.max_total, adm.max_per_peer, adm.deadline) == (9, 4, 2.5)
    assert factory.allowNullOrigin is False
    assert factory.perMessageCompressionAccept([object()]) is None
    assert factory.origin_allowed("https://app.example:443")
    assert factory.origin_allowed("http://localhost:1")
    assert not factory.origin_allowed("https://other.example:443")
