"""
A2A route checks: ``A2aRouteAuth`` validation and redaction, endpoint
parsing and the loopback rule, the ``RouteVault``, and the scrubbing of
continuation outcomes.
"""

import json

import attrs
import pytest
from twisted.python.failure import Failure

from car_twisted.a2ui.continuation import RouteOutcome, _outcome_for_failure, send_message_request
from car_twisted.a2ui.route import (
    MAX_ENDPOINT_CHARS,
    MAX_HEADER_NAME_CHARS,
    MAX_HEADER_VALUE_CHARS,
    MAX_TOKEN_CHARS,
    NO_AUTH,
    REFUSED_HEADER_NAMES,
    A2aRoute,
    A2aRouteAuth,
    RouteVault,
    check_endpoint,
    is_loopback_endpoint,
    parse_endpoint,
)
from car_twisted.errors import INVALID_PARAMS, RpcError

TOKEN = "SeCrEt-t0ken.abc~XYZ_123"
VALUE = "secret header value 42"


def refused(raw, expected, secret=None, **kw):
    """Parse C{raw}, which must fail naming C{expected} and never quoting C{secret}."""
    with pytest.raises(RpcError) as info:
        A2aRouteAuth.parse(raw, **kw)
    err = info.value
    assert err.code == INVALID_PARAMS == -32602
    assert err.data == {"field": expected}
    assert err.message.startswith(f"invalid params: {expected}: ")
    if secret:
        for text in (err.message, str(err), repr(err), json.dumps(err.to_wire())):
            assert secret not in text
    return err


# -- A2aRouteAuth.parse ---------------------------------------------------------


def test_parse_the_three_types():
    assert A2aRouteAuth.parse({"type": "none"}) is NO_AUTH
    bearer = A2aRouteAuth.parse({"type": "bearer", "token": TOKEN})
    assert (bearer.type, bearer.token) == ("bearer", TOKEN)
    header = A2aRouteAuth.parse({"type": "header", "name": "X-Api-Key", "value": VALUE})
    assert (header.type, header.name, header.value) == ("header", "X-Api-Key", VALUE)
    # Keys that do not belong to the type are ignored, as elsewhere in params.
    assert A2aRouteAuth.parse({"type": "bearer", "token": TOKEN, "extra": 1}) == bearer
    assert A2aRouteAuth.parse({"type": "none", "token": "ignored"}) is NO_AUTH


@pytest.mark.parametrize("raw", [None, "bearer", ["type", "none"], 3])
def test_parse_needs_an_object(raw):
    refused(raw, "routeAuth")


@pytest.mark.parametrize("kind", [None, "", "Bearer", "basic", "oauth", 1, ["bearer"]])
def test_parse_refuses_other_types(kind):
    raw = {"token": TOKEN} if kind is None else {"type": kind, "token": TOKEN}
    refused(raw, "routeAuth.type", TOKEN)


def test_parse_names_the_field_under_a_prefix():
    refused({"type": "bearer"}, "owner.routeAuth.token", field="owner.routeAuth")


@pytest.mark.parametrize(
    "token, problem",
    [
        (None, "must be a string"),
        (12345, "must be a string"),
        ("", "must not be empty"),
        ("x" * (MAX_TOKEN_CHARS + 1), f"must be at most {MAX_TOKEN_CHARS} characters"),
        (TOKEN + "\r\nX-Injected: 1", "must be printable ASCII without spaces, CR or LF"),
        (TOKEN + "\n", "must be printable ASCII without spaces, CR or LF"),
        (TOKEN + "\r", "must be printable ASCII without spaces, CR or LF"),
        (TOKEN + "\x00", "must be printable ASCII without spaces, CR or LF"),
        (TOKEN + " more", "must be printable ASCII without spaces, CR or LF"),
        (TOKEN + "\t", "must be printable ASCII without spaces, CR or LF"),
        (TOKEN + "\x7f", "must be printable ASCII without spaces, CR or LF"),
        (TOKEN + "é", "must be printable ASCII without spaces, CR or LF"),
    ],
)
def test_bearer_token_rules(token, problem):
    err = refused({"type": "bearer", "token": token}, "routeAuth.token", token if isinstance(token, str) else None)
    assert err.message == f"invalid params: routeAuth.token: {problem}"
    assert TOKEN not in err.message


def test_bearer_token_at_the_bound():
    assert A2aRouteAuth.parse({"type": "bearer", "token": "t" * MAX_TOKEN_CHARS}).token == "t" * MAX_TOKEN_CHARS


@pytest.mark.parametrize(
    "name",
    [
        None,
        7,
        "",
        "n" * (MAX_HEADER_NAME_CHARS + 1),
        "X Api Key",
        "X-Api-Key:",
        "X-Api-Key\r\nX-Injected",
        "X-Api-Kéy",
        "(comment)",
        "X/Key",
        'X"Key',
        "X-Key\x00",
    ],
)
def test_header_name_rules(name):
    refused({"type": "header", "name": name, "value": VALUE}, "routeAuth.name", VALUE)


@pytest.mark.parametrize("name", sorted(REFUSED_HEADER_NAMES))
def test_header_names_that_are_refused(name):
    for spelled in (name, name.upper(), name.title()):
        err = refused({"type": "header", "name": spelled, "value": VALUE}, "routeAuth.name", VALUE)
        assert "hop-by-hop or set by the client" in err.message


def test_the_required_refused_names_are_there():
    required = {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length", "content-type",
    }
    assert required <= REFUSED_HEADER_NAMES


def test_header_names_that_are_tokens():
    for name in ("X-Api-Key", "Authorization", "x_api.key", "A!#$%&'*+-.^_`|~9", "n" * MAX_HEADER_NAME_CHARS):
        assert A2aRouteAuth.parse({"type": "header", "name": name, "value": VALUE}).name == name


@pytest.mark.parametrize(
    "value, problem",
    [
        (None, "must be a string"),
        (b"bytes", "must be a string"),
        ("", "must not be empty"),
        ("v" * (MAX_HEADER_VALUE_CHARS + 1), f"must be at most {MAX_HEADER_VALUE_CHARS} characters"),
        (VALUE + "\r\nX-Injected: 1", "must be printable ASCII without CR, LF or NUL"),
        (VALUE + "\n", "must be printable ASCII without CR, LF or NUL"),
        (VALUE + "\r", "must be printable ASCII without CR, LF or NUL"),
        (VALUE + "\x00", "must be printable ASCII without CR, LF or NUL"),
        (VALUE + "\t", "must be printable ASCII without CR, LF or NUL"),
        (VALUE + "ü", "must be printable ASCII without CR, LF or NUL"),
        (" " + VALUE, "must not begin or end with a space"),
        (VALUE + " ", "must not begin or end with a space"),
    ],
)
def test_header_value_rules(value, problem):
    err = refused(
        {"type": "header", "name": "X-Api-Key", "value": value}, "routeAuth.value", value if isinstance(value, str) else None
    )
    assert err.message == f"invalid params: routeAuth.value: {problem}"
    assert VALUE not in err.message


def test_header_value_at_the_bound_and_with_inner_spaces():
    value = "v" * (MAX_HEADER_VALUE_CHARS - 2) + " w"
    assert A2aRouteAuth.parse({"type": "header", "name": "X-K", "value": value}).value == value


def test_construction_validates_too():
    assert A2aRouteAuth.bearer(TOKEN).token == TOKEN
    with pytest.raises(RpcError) as info:
        A2aRouteAuth.bearer(TOKEN + "\n")
    assert info.value.data == {"field": "routeAuth.token"} and TOKEN not in info.value.message
    with pytest.raises(RpcError):
        A2aRouteAuth.header("Host", VALUE)
    with pytest.raises(RpcError):
        A2aRouteAuth(type="none", token=TOKEN)
    with pytest.raises(RpcError):
        A2aRouteAuth(type="bearer", token=TOKEN, value=VALUE)
    with pytest.raises(RpcError):
        A2aRouteAuth(type="magic")


def test_headers():
    assert NO_AUTH.headers() == {}
    assert A2aRouteAuth.bearer(TOKEN).headers() == {b"Authorization": [b"Bearer " + TOKEN.encode()]}
    assert A2aRouteAuth.header("X-Api-Key", VALUE).headers() == {b"X-Api-Key": [VALUE.encode()]}


# -- redaction --------------------------------------------------------------------


def test_no_secret_in_repr_str_or_description():
    bearer = A2aRouteAuth.bearer(TOKEN)
    header = A2aRouteAuth.header("X-Api-Key", VALUE)
    assert repr(bearer) == str(bearer) == "A2aRouteAuth(type='bearer', token=[redacted])"
    assert repr(header) == "A2aRouteAuth(type='header', name='X-Api-Key', value=[redacted])"
    assert repr(NO_AUTH) == "A2aRouteAuth(type='none')"
    route = A2aRoute(endpoint="http://127.0.0.1:9/a2a", auth=bearer)
    for text in (repr(bearer), str(bearer), f"{bearer}", "%r %s" % (header, header), repr(route), repr([route, header])):
        assert TOKEN not in text and VALUE not in text
    assert bearer.describe() == {"type": "bearer"}
    assert header.describe() == {"type": "header", "name": "X-Api-Key"}
    fields = attrs.fields(A2aRouteAuth)
    assert fields.token.repr is False and fields.value.repr is False


def test_scrub_takes_out_every_form_of_the_secret():
    tricky = "ab\\cd\"ef'gh/ij%kl"
    auth = A2aRouteAuth.bearer(tricky)
    texts = [
        f"plain {tricky}",
        f"repr {tricky!r}",
        f"bytes {tricky.encode()!r}",
        f"json {json.dumps(tricky)}",
        f"exc {Exception(tricky)!r}",
        "url http://x/?t=" + __import__("urllib.parse").parse.quote(tricky, safe=""),
        f"header Bearer {tricky}",
    ]
    for text in texts:
        scrubbed = auth.scrub(text)
        assert "[redacted]" in scrubbed, text
        assert tricky not in scrubbed and "cd\\\"ef" not in scrubbed and "ij%25kl" not in scrubbed
    assert NO_AUTH.scrub("nothing to hide") == "nothing to hide"
    assert A2aRouteAuth.header("X-K", VALUE).scrub(f"echo: {VALUE}") == "echo: [redacted]"


def test_outcomes_are_scrubbed_even_when_an_exception_quotes_the_secret():
    for auth, secret in ((A2aRouteAuth.bearer(TOKEN), TOKEN), (A2aRouteAuth.header("X-K", VALUE), VALUE)):
        failure = Failure(RuntimeError(f"could not send Authorization: Bearer {secret} / {secret!r}"))
        outcome = _outcome_for_failure(failure, auth, 10.0)
        assert outcome.delivered is False
        assert outcome.error == "RuntimeError: could not send Authorization: Bearer [redacted] / '[redacted]'"
        assert secret not in json.dumps(outcome.to_wire()) and secret not in repr(outcome)


def test_outcome_errors_are_bounded():
    outcome = _outcome_for_failure(Failure(ValueError("x" * 5000)), NO_AUTH, 1.0)
    assert len(outcome.error) == 300 and outcome.error.endswith("...")


def test_outcome_wire_form():
    assert RouteOutcome(delivered=False, error="nope").to_wire() == {"delivered": False, "error": "nope"}
    full = RouteOutcome(delivered=True, status=200, result_kind="task", task_state="TASK_STATE_WORKING", rpc_error_code=None)
    assert full.to_wire() == {"delivered": True, "status": 200, "resultKind": "task", "taskState": "TASK_STATE_WORKING"}
    assert RouteOutcome(False, 200, "e", rpc_error_code=-32001).to_wire()["rpcErrorCode"] == -32001


def test_send_message_request_shape():
    action = {"name": "go", "surfaceId": "s", "context": {}}
    assert send_message_request("t1", "c1", action, request_id="r", message_id="m") == {
        "jsonrpc": "2.0",
        "id": "r",
        "method": "SendMessage",
        "params": {
            "message": {
                "messageId": "m",
                "role": "ROLE_USER",
                "taskId": "t1",
                "contextId": "c1",
                "parts": [{"data": {"a2uiAction": action}, "mediaType": "application/json"}],
            },
            "configuration": {"returnImmediately": True},
        },
    }
    assert "contextId" not in send_message_request("t1", None, action, request_id="r", message_id="m")["params"]["message"]
    assert "contextId" not in send_message_request("t1", "", action, request_id="r", message_id="m")["params"]["message"]


# -- endpoints --------------------------------------------------------------------

LOOPBACK = [
    ("http://127.0.0.1/", "http://127.0.0.1/"),
    ("http://127.0.0.1", "http://127.0.0.1"),
    ("http://127.0.0.1:8080/a2a?x=1&y=%20", "http://127.0.0.1:8080/a2a?x=1&y=%20"),
    ("https://127.1.2.3/rpc", "https://127.1.2.3/rpc"),
    ("http://127.255.255.254:1/", "http://127.255.255.254:1/"),
    ("http://localhost:9/", "http://localhost:9/"),
    ("http://LocalHost:9/", "http://localhost:9/"),
    ("HTTP://127.0.0.1:65535/", "http://127.0.0.1:65535/"),
    ("http://[::1]:8080/a2a", "http://[::1]:8080/a2a"),
    ("http://[::1]/", "http://[::1]/"),
    ("http://[0:0:0:0:0:0:0:1]:80/", "http://[::1]:80/"),
    ("http://127.0.0.1?q", "http://127.0.0.1?q"),
]


@pytest.mark.parametrize("url, normalised", LOOPBACK)
def test_loopback_endpoints(url, normalised):
    assert is_loopback_endpoint(url)
    assert check_endpoint(url, allow_untrusted=False) == normalised
    assert parse_endpoint(url).loopback


NOT_LOOPBACK = [
    "http://127.0.0.1.evil.com/",
    "http://127.0.0.1.nip.io/",
    "http://localhost./",
    "http://localhost.evil.com/",
    "http://evil-localhost/",
    "http://example.com/a2a",
    "https://agent.example.com:8443/rpc",
    "http://10.0.0.1/",
    "http://128.0.0.1/",
    "http://0.0.0.0/",
    "http://126.255.255.255/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::2]/",
    "http://[::]/",
    "http://127.1/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0177.0.0.1/",
    "http://127.000.000.001/",
]


@pytest.mark.parametrize("url", NOT_LOOPBACK)
def test_endpoints_that_are_not_loopback(url):
    assert not is_loopback_endpoint(url)
    assert not parse_endpoint(url).loopback
    with pytest.raises(RpcError) as info:
        check_endpoint(url, allow_untrusted=False)
    assert info.value.code == -32602 and info.value.data == {"field": "endpoint"}
    assert "allowUntrustedEndpoint" in info.value.message
    # With the opt-in they are accepted, normalised.
    assert check_endpoint(url, allow_untrusted=True).startswith(("http://", "https://"))


INVALID = [
    ("http://user:pw@127.0.0.1/", "must not carry user information"),
    ("http://user@127.0.0.1/", "must not carry user information"),
    ("http://evil.com@127.0.0.1/", "must not carry user information"),
    ("http://127.0.0.1@evil.com/", "must not carry user information"),
    ("http://127.0.0.1:80@evil.com/", "must not carry user information"),
    ("http://127.0.0.1\\@evil.com/", "without spaces or backslashes"),
    ("http://127.0.0.1#@evil.com/", "must not carry a fragment"),
    ("http://127.0.0.1/#frag", "must not carry a fragment"),
    ("ftp://127.0.0.1/", "absolute http or https URL"),
    ("file:///etc/passwd", "absolute http or https URL"),
    ("ws://127.0.0.1/", "absolute http or https URL"),
    ("javascript:alert(1)", "absolute http or https URL"),
    ("127.0.0.1:8080", "absolute http or https URL"),
    ("//127.0.0.1/", "absolute http or https URL"),
    ("http:/127.0.0.1/", "absolute http or https URL"),
    ("/a2a", "absolute http or https URL"),
    (" http://127.0.0.1/", "without spaces"),
    ("http://127.0.0.1/ x", "without spaces"),
    ("http://127.0.0.1/\r\nHost: evil", "without spaces"),
    ("http://127.0.0.1/\x00", "without spaces"),
    ("http://éxample.com/", "without spaces"),
    ("http://127.0.0.1:0/", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:65536/", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:123456/", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:abc/", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:-1/", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:80:80/", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:/", "has an empty port"),
    ("http://[fe80::1%25eth0]/", "zone identifier"),
    ("http://[::1/", "unclosed IPv6 address"),
    ("http://[::1]x/", "characters after its IPv6 address"),
    ("http://[127.0.0.1]/", "not a valid IPv6 address"),
    ("http://[localhost]/", "not a valid IPv6 address"),
    ("http:///", "has no host"),
    ("http://:80/", "has no host"),
    ("http://a_b.example/", "host must be a DNS name"),
    ("http://-a.example/", "not a valid DNS name"),
    ("http://a..example/", "not a valid DNS name"),
    ("http://" + "a" * 64 + ".example/", "not a valid DNS name"),
]


@pytest.mark.parametrize("url, problem", INVALID)
def test_invalid_endpoints(url, problem):
    assert not is_loopback_endpoint(url)
    for allow in (False, True):
        with pytest.raises(RpcError) as info:
            check_endpoint(url, allow_untrusted=allow)
        err = info.value
        assert err.code == -32602 and err.data == {"field": "endpoint"}
        assert problem in err.message
        # The URL is never quoted back (it may carry a password or a query).
        assert "pw" not in err.message and url not in err.message


@pytest.mark.parametrize("url", [None, 80, b"http://127.0.0.1/", ["http://127.0.0.1/"], "http://127.0.0.1/" + "a" * MAX_ENDPOINT_CHARS])
def test_endpoints_of_the_wrong_kind_or_size(url):
    assert not is_loopback_endpoint(url)
    with pytest.raises(RpcError) as info:
        check_endpoint(url, allow_untrusted=True, field="owner.endpoint")
    assert info.value.data == {"field": "owner.endpoint"}


def test_parsed_endpoint_parts():
    ep = parse_endpoint("HTTPS://LOCALHOST/a2a")
    assert (ep.url, ep.scheme, ep.host, ep.port, ep.loopback) == ("https://localhost/a2a", "https", "localhost", 443, True)
    ep6 = parse_endpoint("http://[::1]:9999/x")
    assert (ep6.host, ep6.port) == ("[::1]", 9999)
    assert parse_endpoint("http://Agent.Example.com").port == 80


# -- the vault --------------------------------------------------------------------


def test_route_vault():
    vault = RouteVault()
    bearer = A2aRouteAuth.bearer(TOKEN)
    route = vault.set("s1", "http://127.0.0.1:9/a2a", bearer)
    assert route == A2aRoute("http://127.0.0.1:9/a2a", bearer)
    vault.set("s2", "http://localhost:9/", A2aRouteAuth.header("X-K", VALUE))
    vault.set("s3", "http://localhost:9/")
    assert vault.get("s1") is route and vault.get("s3").auth is NO_AUTH and vault.get("nope") is None
    assert len(vault) == 3 and "s2" in vault and sorted(vault) == ["s1", "s2", "s3"]
    vault.set("s1", "http://127.0.0.1:10/a2a")  # replaced
    assert vault.get("s1").endpoint == "http://127.0.0.1:10/a2a" and vault.get("s1").auth is NO_AUTH
    assert vault.discard("s1") is True and vault.discard("s1") is False
    assert vault.discard_many(["s2", "s3", "s4", "s2"]) == 2
    assert len(vault) == 0 and vault.get("s2") is None


def test_route_vault_is_never_serialised():
    vault = RouteVault()
    vault.set("s1", "http://127.0.0.1:9/a2a", A2aRouteAuth.bearer(TOKEN))
    vault.set("s2", "http://127.0.0.1:9/a2a", A2aRouteAuth.header("X-K", VALUE))
    for thing in (vault, vault.get("s1"), vault.get("s1").auth):
        assert not hasattr(thing, "to_wire")
        with pytest.raises(TypeError):
            json.dumps(thing)
    text = repr(vault)
    assert text == "<RouteVault: 2 route(s)>"
    assert TOKEN not in repr(vault.get("s1")) and VALUE not in repr(vault.get("s2"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # HostnameEndpoint on a reactor without a resolver
def test_a_reactor_that_cannot_connect_still_gives_an_outcome():
    from twisted.internet.task import Clock

    from car_twisted.a2ui.continuation import send_continuation

    clock = Clock()
    fired = []
    send_continuation(clock, "http://127.0.0.1:9/", A2aRouteAuth.bearer(TOKEN), "t", "c", {"name": "go"}, timeout=2.0).addBoth(fired.append)
    assert fired == []
    clock.advance(2.0)
    assert [o.to_wire() for o in fired] == [{"delivered": False, "error": "no answer within 2s; the request was cancelled"}]
