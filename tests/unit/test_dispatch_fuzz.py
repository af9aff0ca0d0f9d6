"""
Bad input against the dispatcher, no sockets: whatever arrives in a text
frame, ``dispatch_text`` must not raise and every frame it writes must be
a well-formed JSON-RPC 2.0 response (or a batch of them).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from car_twisted.rpc.dispatch import Dispatcher
from support import TOKEN, FakeSink, make_state, request

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
AUTH_REQUIRED = -32001
PROTOCOL_MISMATCH = -32006

INT64 = 2**63

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KNOWN_METHODS = [
    "session.auth",
    "server.handshake",
    "capabilities.list",
    "server.schema",
    "host.subscribe",
    "auth.login",
    "infer",
    "mail.send",
    "nope.nothing",
]


# -- helpers -----------------------------------------------------------------


class Conn:
    """A fresh Clock-based state, one session on a FakeSink, a dispatcher."""

    def __init__(self, home: Any, authed: bool = False, **overrides: Any) -> None:
        self.state = make_state(home, **overrides)
        self.sink = FakeSink()
        self.session = self.state.open_session(self.sink)
        self.dispatcher = Dispatcher(self.state)
        if authed:
            self.send(request("session.auth", {"token": TOKEN}, 0))
            self.send(
                request(
                    "server.handshake",
                    {"protocol_version": 3, "client_version": "fuzz", "required_capabilities": []},
                    1,
                )
            )
            replies = self.pop()
            assert [r["id"] for r in replies] == [0, 1], replies
            assert all("result" in r for r in replies), replies
            assert self.session.authenticated and self.session.protocol_version == 3

    def send(self, payload: bytes) -> None:
        # Must never raise, whatever the payload.
        self.dispatcher.dispatch_text(self.session, payload)

    def frames(self) -> list[Any]:
        """Every frame written so far, each checked as a JSON-RPC 2.0 reply."""
        return [check_frame(f) for f in self.sink.frames]

    def pop(self) -> list[Any]:
        out = self.frames()
        self.sink.frames.clear()
        return out


def _strict_json(raw: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(raw.decode("utf-8"), parse_constant=no_constants)


def is_valid_id(value: Any) -> bool:
    t = type(value)
    if t is int:
        return -INT64 <= value < INT64
    if t is str:
        return len(value) <= 256
    return value is None


def check_response(obj: Any) -> dict:
    assert type(obj) is dict, obj
    assert obj.get("jsonrpc") == "2.0", obj
    assert "id" in obj, obj
    assert is_valid_id(obj["id"]), obj
    assert ("result" in obj) != ("error" in obj), obj
    assert set(obj) <= {"jsonrpc", "id", "result", "error"}, obj
    if "error" in obj:
        err = obj["error"]
        assert type(err) is dict, obj
        assert type(err.get("code")) is int, obj
        assert type(err.get("message")) is str, obj
        assert set(err) <= {"code", "message", "data"}, obj
    return obj


def check_frame(frame: bytes) -> Any:
    """A frame is one response object, or a non-empty array of them."""
    assert type(frame) is bytes
    msg = _strict_json(frame)
    if type(msg) is list:
        assert msg, "an empty batch reply must not be sent"
        for item in msg:
            check_response(item)
    else:
        check_response(msg)
    return msg


def encode(value: Any, ensure_ascii: bool = True) -> bytes:
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


def error_code(reply: Any) -> int | None:
    return reply["error"]["code"] if "error" in reply else None


# -- strategies ---------------------------------------------------------------

# Text without lone surrogates, so the payload is always valid UTF-8 JSON.
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
# Integers far beyond 64 bits but still representable as a finite double.
ints = st.integers(min_value=-(10**30), max_value=10**30)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=25,
)

ids = st.one_of(
    st.integers(min_value=-INT64, max_value=INT64 - 1),
    st.sampled_from([INT64 - 1, -INT64, INT64, -INT64 - 1, 2**64, 2**64 + 1, 10**30, -(10**30)]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=257, max_size=600),
    st.just(""),
    json_values,
)
methods = st.one_of(
    st.sampled_from(KNOWN_METHODS),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300),
    json_values,
)
params = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "token": st.one_of(st.just(TOKEN), json_values),
            "host_token": json_values,
            "agent_id": json_values,
            "memory_namespace": json_values,
            "protocol_version": st.one_of(st.sampled_from([2, 3, 3.0, 4, "3"]), json_values),
            "client_version": json_values,
            "required_capabilities": st.one_of(st.lists(texts, max_size=5), json_values),
        },
    ),
)
messages = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.one_of(st.just("2.0"), st.just(2.0), st.just("1.0"), json_values),
        "id": ids,
        "method": methods,
        "params": params,
        "result": json_values,
        "error": json_values,
    },
)


# -- arbitrary input never raises, every reply is JSON-RPC 2.0 ----------------------


@FUZZ
@given(authed=st.booleans(), payload=st.binary(max_size=300))
def test_arbitrary_bytes(tmp_path, authed, payload):
    conn = Conn(tmp_path, authed)
    conn.send(payload)
    replies = conn.frames()
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        # Not UTF-8: a text frame like that is closed with 1007, unanswered.
        assert replies == [] and conn.sink.closed_with[0] == 1007
        return
    try:
        _strict_json(payload)
    except ValueError:
        # Not JSON at all: exactly one parse error with id null.
        assert len(replies) == 1, replies
        assert error_code(replies[0]) == PARSE_ERROR, replies
        assert replies[0]["id"] is None


@FUZZ
@given(authed=st.booleans(), value=json_values, ensure_ascii=st.booleans())
def test_arbitrary_json_values(tmp_path, authed, value, ensure_ascii):
    conn = Conn(tmp_path, authed)
    conn.send(encode(value, ensure_ascii))
    replies = conn.frames()
    for reply in replies:
        items = reply if type(reply) is list else [reply]
        assert all(error_code(r) != PARSE_ERROR for r in items), replies
    if type(value) not in (dict, list):
        assert len(replies) == 1, replies
        assert error_code(replies[0]) == INVALID_REQUEST and replies[0]["id"] is None


@FUZZ
@given(authed=st.booleans(), msg=messages, ensure_ascii=st.booleans())
def test_wrongly_typed_envelopes(tmp_path, authed, msg, ensure_ascii):
    conn = Conn(tmp_path, authed)
    conn.send(encode(msg, ensure_ascii))
    replies = conn.frames()
    assert all(type(r) is dict for r in replies), replies
    assert all(error_code(r) != PARSE_ERROR for r in replies), replies
    assert len(replies) <= 1, replies

    method = msg.get("method")
    if method is None and "id" in msg and ("result" in msg or "error" in msg):
        # Shaped like a client response: never answered once authenticated;
        # before auth it is refused at the gate (id null) and the sink closed.
        if authed:
            assert replies == [], replies
        else:
            assert len(replies) == 1 and error_code(replies[0]) == AUTH_REQUIRED, replies
            assert replies[0]["id"] is None
    elif "id" in msg and not is_valid_id(msg["id"]):
        # An id we cannot echo: -32600 with id null, whatever else is wrong.
        assert len(replies) == 1, replies
        assert error_code(replies[0]) == INVALID_REQUEST, replies
        assert replies[0]["id"] is None, replies
    elif method is not None and "id" in msg:
        # A request with a usable id is answered once, with that id, same JSON type.
        assert len(replies) == 1, replies
        rid = replies[0]["id"]
        assert type(rid) is type(msg["id"]) and rid == msg["id"], (msg, replies)
    if replies and error_code(replies[0]) == AUTH_REQUIRED:
        assert conn.sink.closed_with is not None and conn.sink.closed_with[0] == 1008
    if not authed and conn.sink.closed_with is not None:
        assert replies and error_code(replies[-1]) == AUTH_REQUIRED, replies


@FUZZ
@given(items=st.lists(st.one_of(messages, json_values), max_size=12), ensure_ascii=st.booleans())
def test_arbitrary_batches_authenticated(tmp_path, items, ensure_ascii):
    conn = Conn(tmp_path, authed=True)
    conn.send(encode(items, ensure_ascii))
    replies = conn.frames()
    assert len(replies) <= 1, replies
    if not items:
        assert len(replies) == 1 and type(replies[0]) is dict
        assert error_code(replies[0]) == INVALID_REQUEST and replies[0]["id"] is None
        return
    if replies:
        (batch,) = replies
        assert type(batch) is list, batch
        assert len(batch) <= len(items), (items, batch)
        request_ids = [m["id"] for m in items if type(m) is dict and "id" in m and is_valid_id(m["id"])]
        for r in batch:
            assert r["id"] is None or r["id"] in request_ids, (items, batch)
    # A non-object entry always earns its own -32600.
    non_objects = sum(1 for m in items if type(m) is not dict)
    if non_objects:
        assert replies
        assert sum(1 for r in replies[0] if error_code(r) == INVALID_REQUEST and r["id"] is None) >= non_objects


# -- ids ------------------------------------------------------------------------


VALID_IDS = [
    0,
    1,
    -1,
    INT64 - 1,
    -INT64,
    "",
    "1",
    "x" * 256,
    "\U0001f600" * 256,
    None,
]
INVALID_IDS = [
    INT64,
    -INT64 - 1,
    2**64,
    2**64 + 7,
    10**30,
    -(10**30),
    2**200,
    1.0,
    1.5,
    -0.0,
    True,
    False,
    "x" * 257,
    "\U0001f600" * 257,
    "y" * 100_000,
    [],
    [1],
    {},
    {"id": 1},
]


@pytest.mark.parametrize("rid", VALID_IDS, ids=lambda v: f"{type(v).__name__}:{str(v)[:12]}")
@pytest.mark.parametrize("authed", [False, True], ids=["unauthenticated", "authenticated"])
def test_valid_ids_echoed_with_same_type(tmp_path, authed, rid):
    conn = Conn(tmp_path, authed)
    method = "capabilities.list"
    conn.send(encode({"jsonrpc": "2.0", "id": rid, "method": method}, ensure_ascii=False))
    (reply,) = conn.frames()
    assert type(reply["id"]) is type(rid) and reply["id"] == rid
    if authed:
        assert "result" in reply, reply
    else:
        assert error_code(reply) == AUTH_REQUIRED
        assert conn.sink.closed_with[0] == 1008


def test_huge_id_text_kept_exact(tmp_path):
    conn = Conn(tmp_path, authed=True)
    for raw, expected in [
        (b"9223372036854775807", INT64 - 1),
        (b"-9223372036854775808", -INT64),
    ]:
        conn.send(b'{"jsonrpc":"2.0","method":"capabilities.list","id":' + raw + b"}")
        (reply,) = conn.pop()
        assert type(reply["id"]) is int and reply["id"] == expected


@pytest.mark.parametrize("rid", INVALID_IDS, ids=lambda v: f"{type(v).__name__}:{str(v)[:12]}")
@pytest.mark.parametrize("authed", [False, True], ids=["unauthenticated", "authenticated"])
def test_invalid_ids_get_null_and_invalid_request(tmp_path, authed, rid):
    conn = Conn(tmp_path, authed)
    conn.send(encode({"jsonrpc": "2.0", "id": rid, "method": "capabilities.list"}))
    (reply,) = conn.frames()
    assert reply["id"] is None
    assert error_code(reply) == INVALID_REQUEST


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b" ",
        b"{",
        b"}",
        b"[",
        b"nul",
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"{'jsonrpc': '2.0'}",
        b'{"jsonrpc":"2.0","id":1,"method":"x",}',
        b'{"jsonrpc":"2.0","id":1,"method":"x"} trailing',
        b'{"jsonrpc":"2.0","id":1 "method":"x"}',
        b"\x00",
        b"[" * 100_000,
        b"{" * 100_000,
    ],
)
@pytest.mark.parametrize("authed", [False, True], ids=["unauthenticated", "authenticated"])
def test_parse_errors(tmp_path, authed, raw):
    conn = Conn(tmp_path, authed)
    conn.send(raw)
    (reply,) = conn.frames()
    assert reply["id"] is None
    assert error_code(reply) == PARSE_ERROR
    # A parse error does not close the connection.
    assert conn.sink.closed_with is None


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b'{"method":"\xc3"}', b'{"jsonrpc":"2.0","id":1,"method":"\xed\xa0\x80"}'])
@pytest.mark.parametrize("authed", [False, True], ids=["unauthenticated", "authenticated"])
def test_invalid_utf8_closes_1007(tmp_path, authed, raw):
    """The transport leaves UTF-8 to the parser: a non-UTF-8 text frame is closed with 1007."""
    conn = Conn(tmp_path, authed)
    conn.send(raw)
    assert conn.frames() == []
    assert conn.sink.closed_with == (1007, "invalid UTF-8 in text frame")


@pytest.mark.parametrize(
    "raw",
    [
        # Valid JSON grammar that a strict decoder may still refuse.
        b"1e400",
        b'"\\ud800"',
        b'{"jsonrpc":"2.0","id":"\\udc00","method":"capabilities.list"}',
        b'{"jsonrpc":"2.0","id":1,"method":"\\udc00"}',
        b'{"jsonrpc":"2.0","id":1,"method":"capabilities.list","params":["\\ud800"]}',
        b"\xef\xbb\xbf{}",
    ],
)
@pytest.mark.parametrize("authed", [False, True], ids=["unauthenticated", "authenticated"])
def test_edge_of_json_grammar(tmp_path, authed, raw):
    conn = Conn(tmp_path, authed)
    conn.send(raw)
    (reply,) = conn.frames()
    assert "error" in reply or reply["id"] == 1, reply
    if "error" in reply and error_code(reply) in (PARSE_ERROR, INVALID_REQUEST):
        assert reply["id"] is None or reply["id"] == 1


# -- deep nesting ---------------------------------------------------------------------


def _nest(depth: int, kind: str, core: str = "1") -> str:
    if kind == "list":
        return "[" * depth + core + "]" * depth
    return '{"a":' * depth + core + "}" * depth


@FUZZ
@given(
    authed=st.booleans(),
    depth=st.integers(min_value=1, max_value=3000),
    kind=st.sampled_from(["list", "dict"]),
    where=st.sampled_from(["top", "id", "method", "params", "jsonrpc", "batch", "version", "result"]),
)
def test_deep_nesting(tmp_path, authed, depth, kind, where):
    conn = Conn(tmp_path, authed)
    deep = _nest(depth, kind)
    if where == "top":
        text = deep
    elif where == "batch":
        text = "[" + _nest(depth, kind, '{"jsonrpc":"2.0","id":1,"method":"capabilities.list"}') + "]"
    elif where == "version":
        text = '{"jsonrpc":"2.0","id":1,"method":"server.handshake","params":{"protocol_version":%s}}' % deep
    elif where == "result":
        text = '{"jsonrpc":"2.0","id":"srv-1","result":%s}' % deep
    else:
        fields = {"jsonrpc": '"2.0"', "id": "1", "method": '"capabilities.list"'}
        fields[where] = deep
        text = "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    conn.send(text.encode())
    replies = conn.frames()
    assert len(replies) <= 1


def test_deep_protocol_version_is_a_protocol_mismatch(tmp_path):
    """
    server.handshake answers -32006 for any non-numeric protocol_version;
    a nested (but parseable) array is non-numeric too, and must not turn
    into an internal error.  Past the daemon's depth limit the request is
    refused on the way in with -32602 instead.
    """
    conn = Conn(tmp_path, authed=True)
    for depth, code in ((10, PROTOCOL_MISMATCH), (120, PROTOCOL_MISMATCH), (200, INVALID_PARAMS), (1000, INVALID_PARAMS)):
        deep = _nest(depth, "list", "")
        conn.send(
            (
                '{"jsonrpc":"2.0","id":%d,"method":"server.handshake","params":{"protocol_version":%s}}'
                % (depth, deep)
            ).encode()
        )
        (reply,) = conn.pop()
        assert reply["id"] == depth
        assert error_code(reply) == code, reply


# -- the auth gate --------------------------------------------------------------------


@FUZZ
@given(
    method=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=256).filter(
        lambda m: m != "session.auth"
    ),
    rid=st.one_of(st.integers(min_value=-INT64, max_value=INT64 - 1), st.text(max_size=256).filter(
        lambda s: all(not 0xD800 <= ord(c) <= 0xDFFF for c in s)
    )),
    p=st.one_of(st.none(), st.dictionaries(texts, json_values, max_size=3), st.lists(json_values, max_size=3)),
)
def test_unauthenticated_request_is_denied_and_closed(tmp_path, method, rid, p):
    conn = Conn(tmp_path)
    conn.send(request(method, p, rid))
    (reply,) = conn.frames()
    assert error_code(reply) == AUTH_REQUIRED, reply
    assert type(reply["id"]) is type(rid) and reply["id"] == rid
    assert conn.sink.closed_with is not None and conn.sink.closed_with[0] == 1008
    assert not conn.session.authenticated


def test_unauthenticated_client_response_and_batch_are_denied(tmp_path):
    conn = Conn(tmp_path)
    conn.send(b'{"jsonrpc":"2.0","id":"srv-1","result":{}}')
    (reply,) = conn.frames()
    assert error_code(reply) == AUTH_REQUIRED and reply["id"] is None
    assert conn.sink.closed_with[0] == 1008

    conn = Conn(tmp_path)
    conn.send(encode([json.loads(request("session.auth", {"token": TOKEN}, 1))]))
    (reply,) = conn.frames()
    assert error_code(reply) == AUTH_REQUIRED
    assert conn.sink.closed_with[0] == 1008
    assert not conn.session.authenticated


def test_unauthenticated_garbage_then_request(tmp_path):
    conn = Conn(tmp_path)
    for raw in (b"garbage", b"[]", b"42", b'{"id":1}', b'{"jsonrpc":"2.0","id":[],"method":"x"}'):
        conn.send(raw)
    codes = [error_code(r) for r in conn.pop()]
    assert codes == [PARSE_ERROR, INVALID_REQUEST, INVALID_REQUEST, INVALID_REQUEST, INVALID_REQUEST]
    conn.send(request("server.schema", None, 7))
    (reply,) = conn.frames()
    assert error_code(reply) == AUTH_REQUIRED and reply["id"] == 7
    assert conn.sink.closed_with[0] == 1008


def test_garbage_params_to_session_auth(tmp_path):
    conn = Conn(tmp_path)
    for i, p in enumerate([[TOKEN], "x", 5, {"token": 5}, {"token": None}, {"token": "x" * 5000}, {"token": [TOKEN]}]):
        conn.send(encode({"jsonrpc": "2.0", "id": i, "method": "session.auth", "params": p}))
    replies = conn.pop()
    assert [r["id"] for r in replies] == list(range(7))
    assert all("error" in r for r in replies), replies
    assert not conn.session.authenticated
    conn.send(request("session.auth", {"token": TOKEN}, "ok"))
    (reply,) = conn.frames()
    assert reply["result"]["ok"] is True


# -- batches ----------------------------------------------------------------------


def _req(rid: Any, method: str = "capabilities.list", **extra: Any) -> dict:
    msg = {"jsonrpc": "2.0", "id": rid, "method": method}
    msg.update(extra)
    return msg


def _note(method: str = "capabilities.list", **extra: Any) -> dict:
    msg = {"jsonrpc": "2.0", "method": method}
    msg.update(extra)
    return msg


@pytest.mark.parametrize("authed", [False, True], ids=["unauthenticated", "authenticated"])
def test_empty_batch(tmp_path, authed):
    conn = Conn(tmp_path, authed)
    conn.send(b"[]")
    (reply,) = conn.frames()
    assert type(reply) is dict
    assert error_code(reply) == INVALID_REQUEST and reply["id"] is None


@pytest.mark.parametrize("authed", [False, True], ids=["unauthenticated", "authenticated"])
def test_oversized_batch_is_one_invalid_request(tmp_path, authed):
    conn = Conn(tmp_path, authed)
    limit = conn.state.config.max_batch
    conn.send(encode([_req(i) for i in range(limit + 1)]))
    (reply,) = conn.frames()
    assert type(reply) is dict, "an oversized batch is refused with one object, not an array"
    assert error_code(reply) == INVALID_REQUEST and reply["id"] is None


def test_batch_at_the_limit_is_served(tmp_path):
    conn = Conn(tmp_path, authed=True, max_batch=16)
    conn.send(encode([_req(i) for i in range(16)]))
    (reply,) = conn.frames()
    assert sorted(r["id"] for r in reply) == list(range(16))
    assert all("result" in r for r in reply)
    conn.send(encode([_req(i) for i in range(17)]))
    (reply,) = conn.frames()[1:]
    assert type(reply) is dict and error_code(reply) == INVALID_REQUEST


def test_batch_of_non_objects(tmp_path):
    conn = Conn(tmp_path, authed=True)
    conn.send(b"[1,2,3]")
    (reply,) = conn.frames()
    assert len(reply) == 3
    assert all(error_code(r) == INVALID_REQUEST and r["id"] is None for r in reply)


def test_mixed_batch(tmp_path):
    conn = Conn(tmp_path, authed=True)
    batch = [
        _req(1),  # ok
        _note(),  # notification: no reply
        1,  # not an object
        {"foo": "boo"},  # no method, no id
        _req("5", "foo.get"),  # unknown method
        _note("nope.nothing", params=[1]),  # notification to unknown method: no reply
        _req(9, "server.handshake", params=[3]),  # params of the wrong shape
        _req([9], "capabilities.list"),  # invalid id
        _req(10, "server.schema", jsonrpc="1.0"),  # wrong version
        _req(11, 5),  # method of the wrong type
        _req(12, "capabilities.list", params="x"),  # params of the wrong type
        {"jsonrpc": "2.0", "id": "srv-404", "result": 1},  # a stray client response: no reply
        _req("last", "server.schema"),
    ]
    conn.send(encode(batch))
    (reply,) = conn.frames()
    assert type(reply) is list
    got = sorted(((json.dumps(r["id"]), error_code(r)) for r in reply))
    expected = sorted(
        [
            ("1", None),
            ("null", INVALID_REQUEST),
            ("null", INVALID_REQUEST),
            ('"5"', METHOD_NOT_FOUND),
            ("9", INVALID_PARAMS),
            ("null", INVALID_REQUEST),
            ("10", INVALID_REQUEST),
            ("11", INVALID_REQUEST),
            ("12", INVALID_REQUEST),
            ('"last"', None),
        ]
    )
    assert got == expected, reply


def test_all_notification_batch_sends_nothing(tmp_path):
    conn = Conn(tmp_path, authed=True)
    conn.send(
        encode(
            [
                _note(),
                _note("server.schema"),
                _note("nope.nothing"),
                _note("server.handshake", params={"protocol_version": 99}),
                {"jsonrpc": "2.0", "id": "srv-1", "result": None},
            ]
        )
    )
    assert conn.sink.frames == []
    assert conn.sink.closed_with is None


# -- garbage after auth ---------------------------------------------------------------


@FUZZ
@given(
    garbage=st.lists(
        st.one_of(
            st.binary(max_size=200),
            messages.map(lambda m: encode(m)),
            json_values.map(lambda v: encode(v, ensure_ascii=False)),
            st.lists(messages, max_size=6).map(lambda b: encode(b)),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_garbage_after_auth_and_handshake(tmp_path, garbage):
    conn = Conn(tmp_path, authed=True)
    for payload in garbage:
        conn.send(payload)
    conn.frames()
    conn.sink.frames.clear()
    # The connection still works (unless the garbage closed it through the auth gate).
    if conn.sink.writable:
        conn.send(request("capabilities.list", None, "after"))
        (reply,) = conn.frames()
        assert reply["id"] == "after" and "result" in reply


# -- the message-size limit holds for our replies too -------------------------------


def test_error_reply_within_message_limit(tmp_path):
    """
    A request that fits max_message_bytes must not earn a reply that does
    not (the limit is "either way"; the client closes with 1009 otherwise).
    """
    conn = Conn(tmp_path, authed=True, max_message_bytes=4096)
    payload = encode(
        {"jsonrpc": "2.0", "id": 3, "method": "server.handshake", "params": {"protocol_version": "\x85" * 1500}},
        ensure_ascii=False,
    )
    assert len(payload) < 4096
    conn.send(payload)
    (reply,) = conn.frames()
    assert reply["id"] == 3 and "error" in reply
    assert len(conn.sink.frames[0]) <= 4096, f"reply of {len(conn.sink.frames[0])} bytes"


def test_batch_reply_within_message_limit(tmp_path):
    conn = Conn(tmp_path, authed=True, max_message_bytes=4096)
    payload = encode([_req(i) for i in range(20)])
    assert len(payload) < 4096
    conn.send(payload)
    conn.frames()
    sizes = [len(f) for f in conn.sink.frames]
    assert sizes and all(n <= 4096 for n in sizes), sizes
