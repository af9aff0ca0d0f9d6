"""
Where a surface owned by an A2A task is continued, and with what credentials.

``a2ui.ingest`` may name an ``endpoint`` (and ``routeAuth``) for the A2A
task that owns a surface; ``a2ui.action`` later sends the user's action
there (``car_twisted.a2ui.continuation``).  This module holds the checks
made when the route is recorded and the server-side store it goes to:

* ``A2aRouteAuth``: ``{type: "none"}``, ``{type: "bearer", token}`` or
  ``{type: "header", name, value}``.  The token and the header value are
  secrets: no repr, str, error message or wire form of ours carries them,
  and ``scrub`` takes them out of any text that might (an exception's
  message, an answer from the endpoint).
* ``parse_endpoint`` / ``check_endpoint`` / ``is_loopback_endpoint``: an
  endpoint is an absolute ``http``/``https`` URL of printable ASCII with
  no user information (credentials go in ``routeAuth``) and no fragment.
  It is loopback when its host is an IPv4 address in 127.0.0.0/8, the
  IPv6 address ``::1`` (in brackets) or the name ``localhost`` (any case).
  Nothing else counts, however it might resolve: ``localhost.``,
  ``127.1``, ``2130706433``, ``[::ffff:127.0.0.1]`` and
  ``127.0.0.1.evil.com`` are not loopback, so they need the caller's
  ``allowUntrustedEndpoint`` opt-in like any other host.  (``localhost``
  is trusted to resolve to loopback as RFC 6761 asks; a host whose
  resolver says otherwise is misconfigured.)
* ``RouteVault``: surface id to (endpoint, auth), kept in memory only.
  Nothing in it has a wire form; the surface a client sees carries the
  owner, never the credentials.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Iterator
from urllib.parse import quote

import attrs
from twisted.web.client import URI

from car_twisted.errors import InvalidParams

__all__ = [
    "AUTH_TYPES",
    "MAX_TOKEN_CHARS",
    "MAX_HEADER_NAME_CHARS",
    "MAX_HEADER_VALUE_CHARS",
    "MAX_ENDPOINT_CHARS",
    "REFUSED_HEADER_NAMES",
    "REDACTED",
    "A2aRouteAuth",
    "NO_AUTH",
    "Endpoint",
    "parse_endpoint",
    "is_loopback_endpoint",
    "check_endpoint",
    "A2aRoute",
    "RouteVault",
]

AUTH_TYPES = ("none", "bearer", "header")
MAX_TOKEN_CHARS = 4096
MAX_HEADER_NAME_CHARS = 128
MAX_HEADER_VALUE_CHARS = 8192
MAX_ENDPOINT_CHARS = 2048

#: What stands in for a secret wherever text might have carried it.
REDACTED = "[redacted]"

#: Header names ``{type: "header"}`` may not use: the hop-by-hop headers
#: (RFC 9110 section 7.6.1, and Proxy-Authenticate / Proxy-Authorization,
#: meant for a proxy and not the endpoint), those the HTTP client frames
#: the request with (Host, Content-Length, Content-Type), and the two the
#: continuation sets itself: ``A2A-Version`` (the protocol it speaks) and
#: ``Accept-Encoding`` (identity only: a compressed answer is refused
#: rather than inflated past the response bound).
REFUSED_HEADER_NAMES = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "a2a-version",
        "accept-encoding",
    }
)

# RFC 9110 section 5.6.2: token = 1*tchar.
_TCHARS = re.compile(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Visible ASCII: a bearer token (token68 and the like has no whitespace).
_VISIBLE = re.compile(r"\A[\x21-\x7e]+\Z")
# Printable ASCII, spaces allowed inside: a header value.  Leading or
# trailing whitespace is refused apart from this (HTTP would strip it).
_PRINTABLE = re.compile(r"\A[\x20-\x7e]+\Z")


def _check_token(token: object, field: str) -> str:
    # No message here may quote the token, not even a part of it.
    if not isinstance(token, str):
        raise InvalidParams(field, "must be a string")
    if not token:
        raise InvalidParams(field, "must not be empty")
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidParams(field, f"must be at most {MAX_TOKEN_CHARS} characters")
    if not _VISIBLE.match(token):
        raise InvalidParams(field, "must be printable ASCII without spaces, CR or LF")
    return token


def _check_header_name(name: object, field: str) -> str:
    if not isinstance(name, str):
        raise InvalidParams(field, "must be a string")
    if not name:
        raise InvalidParams(field, "must not be empty")
    if len(name) > MAX_HEADER_NAME_CHARS:
        raise InvalidParams(field, f"must be at most {MAX_HEADER_NAME_CHARS} characters")
    if not _TCHARS.match(name):
        raise InvalidParams(field, "must be an HTTP field name (RFC 9110 token characters only)")
    if name.lower() in REFUSED_HEADER_NAMES:
        raise InvalidParams(field, "names a header the continuation may not carry (hop-by-hop or set by the client)")
    return name


def _check_header_value(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidParams(field, "must be a string")
    if not value:
        raise InvalidParams(field, "must not be empty")
    if len(value) > MAX_HEADER_VALUE_CHARS:
        raise InvalidParams(field, f"must be at most {MAX_HEADER_VALUE_CHARS} characters")
    if not _PRINTABLE.match(value):
        raise InvalidParams(field, "must be printable ASCII without CR, LF or NUL")
    if value != value.strip(" "):
        raise InvalidParams(field, "must not begin or end with a space")
    return value


@attrs.frozen(repr=False)
class A2aRouteAuth:
    """
    The credentials a continuation carries to its endpoint.

    Build one with ``parse`` (wire params) or ``bearer`` / ``header``;
    ``NO_AUTH`` is ``{type: "none"}``.  Construction validates whatever
    the path, so an instance always holds a well-formed header.
    """

    type: str = "none"
    token: str | None = attrs.field(default=None, repr=False)
    name: str | None = None
    value: str | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.type == "none":
            if self.token is not None or self.name is not None or self.value is not None:
                raise InvalidParams("routeAuth", "type none carries no credentials")
        elif self.type == "bearer":
            _check_token(self.token, "routeAuth.token")
            if self.name is not None or self.value is not None:
                raise InvalidParams("routeAuth", "type bearer carries a token only")
        elif self.type == "header":
            _check_header_name(self.name, "routeAuth.name")
            _check_header_value(self.value, "routeAuth.value")
            if self.token is not None:
                raise InvalidParams("routeAuth", "type header carries a name and a value only")
        else:
            raise InvalidParams("routeAuth.type", "must be one of none, bearer, header")

    @classmethod
    def bearer(cls, token: str) -> A2aRouteAuth:
        return cls(type="bearer", token=token)

    @classmethod
    def header(cls, name: str, value: str) -> A2aRouteAuth:
        return cls(type="header", name=name, value=value)

    @classmethod
    def parse(cls, raw: object, field: str = "routeAuth") -> A2aRouteAuth:
        """
        ``routeAuth`` as the client sent it; ``InvalidParams`` (-32602,
        ``data.field`` naming the key) when it does not fit.  Keys that do
        not belong to the type are ignored, as elsewhere in params.
        """
        if not isinstance(raw, dict):
            raise InvalidParams(field, "must be an object")
        kind = raw.get("type")
        if not isinstance(kind, str) or kind not in AUTH_TYPES:
            raise InvalidParams(f"{field}.type", "must be one of none, bearer, header")
        if kind == "bearer":
            return cls(type="bearer", token=_check_token(raw.get("token"), f"{field}.token"))
        if kind == "header":
            name = _check_header_name(raw.get("name"), f"{field}.name")
            value = _check_header_value(raw.get("value"), f"{field}.value")
            return cls(type="header", name=name, value=value)
        return NO_AUTH

    def headers(self) -> dict[bytes, list[bytes]]:
        """The request headers these credentials add (ASCII, as validated)."""
        if self.type == "bearer" and self.token is not None:
            return {b"Authorization": [b"Bearer " + self.token.encode("ascii")]}
        if self.type == "header" and self.name is not None and self.value is not None:
            return {self.name.encode("ascii"): [self.value.encode("ascii")]}
        return {}

    def secrets(self) -> tuple[str, ...]:
        """The strings no output may carry: the token, or the header value."""
        return tuple(s for s in (self.token, self.value) if s)

    def scrub(self, text: str) -> str:
        """
        C{text} with every secret replaced by ``[redacted]``, also in the
        escaped forms a repr, JSON or a URL would give it.  Longer forms
        go first, so no escaped form survives in part.
        """
        forms: set[str] = set()
        for secret in self.secrets():
            forms.update(
                {
                    secret,
                    repr(secret)[1:-1],
                    repr(secret.encode("ascii"))[2:-1],
                    json.dumps(secret)[1:-1],
                    quote(secret, safe=""),
                }
            )
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, REDACTED)
        return text

    def describe(self) -> dict[str, str]:
        """A redacted view (the type, and a header's name): never a secret."""
        if self.type == "header" and self.name is not None:
            return {"type": "header", "name": self.name}
        return {"type": self.type}

    def __repr__(self) -> str:
        if self.type == "bearer":
            return f"A2aRouteAuth(type='bearer', token={REDACTED})"
        if self.type == "header":
            return f"A2aRouteAuth(type='header', name={self.name!r}, value={REDACTED})"
        return "A2aRouteAuth(type='none')"

    __str__ = __repr__


NO_AUTH = A2aRouteAuth()


# -- endpoints ---------------------------------------------------------------

_URL_CHARS = re.compile(r"\A[\x21-\x7e]+\Z")
_HOST_CHARS = re.compile(r"\A[A-Za-z0-9.-]+\Z")
_PORT = re.compile(r"\A[0-9]{1,5}\Z")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@attrs.frozen
class Endpoint:
    """
    An endpoint URL as ``parse_endpoint`` checked it.

    ``url`` is the normalised form (scheme and host in lower case, an IPv6
    address compressed and in brackets, an explicit port kept) and is the
    only URL a continuation connects to; ``host`` is as it appears in it.
    """

    url: str
    scheme: str
    host: str
    port: int
    loopback: bool


def _bad_endpoint(field: str, problem: str) -> InvalidParams:
    # The URL itself is not quoted: it may carry a query the caller
    # considers private.
    return InvalidParams(field, problem)


def _parse_host(authority: str, field: str) -> tuple[str, str, bool]:
    """(host as written in the URL, the port text after it or '', loopback)."""
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise _bad_endpoint(field, "has an unclosed IPv6 address")
        literal, rest = authority[1:close], authority[close + 1 :]
        if "%" in literal:
            raise _bad_endpoint(field, "must not carry an IPv6 zone identifier")
        try:
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            raise _bad_endpoint(field, "host is not a valid IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise _bad_endpoint(field, "has characters after its IPv6 address")
        return f"[{address.compressed}]", rest[1:] if rest else "", address.is_loopback
    host, _, port_text = authority.partition(":")
    if ":" in authority and not port_text:
        raise _bad_endpoint(field, "has an empty port")
    if not host:
        raise _bad_endpoint(field, "has no host")
    if not _HOST_CHARS.match(host) or len(host) > 253:
        raise _bad_endpoint(field, "host must be a DNS name, an IPv4 address or an IPv6 address in brackets")
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if any(not label or len(label) > 63 or label.startswith("-") or label.endswith("-") for label in labels):
        raise _bad_endpoint(field, "host is not a valid DNS name")
    host = host.lower()
    try:
        loopback = ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return host, port_text, loopback


def parse_endpoint(url: object, field: str = "endpoint") -> Endpoint:
    """
    C{url} checked and normalised; ``InvalidParams`` (-32602) when it is
    not an absolute ``http``/``https`` URL of printable ASCII with a host,
    an optional port (1-65535), no user information and no fragment.

    The result is cross-checked against the parse Twisted's HTTP client
    makes of it (host and port), so the host judged here is the host the
    client connects to.
    """
    if not isinstance(url, str):
        raise _bad_endpoint(field, "must be a string")
    if len(url) > MAX_ENDPOINT_CHARS:
        raise _bad_endpoint(field, f"must be at most {MAX_ENDPOINT_CHARS} characters")
    if not _URL_CHARS.match(url) or "\\" in url:
        raise _bad_endpoint(field, "must be printable ASCII without spaces or backslashes")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise _bad_endpoint(field, "must be an absolute http or https URL")
    end = len(rest)
    for stop in "/?#":
        at = rest.find(stop)
        if at >= 0:
            end = min(end, at)
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        raise _bad_endpoint(field, "must not carry user information (put credentials in routeAuth)")
    if "#" in tail:
        raise _bad_endpoint(field, "must not carry a fragment")
    host, port_text, loopback = _parse_host(authority, field)
    if port_text:
        port = int(port_text) if _PORT.match(port_text) else 0
        if not 1 <= port <= 65535:
            raise _bad_endpoint(field, "port must be a number from 1 to 65535")
        normalised = f"{scheme}://{host}:{port}{tail}"
    else:
        port = _DEFAULT_PORTS[scheme]
        normalised = f"{scheme}://{host}{tail}"
    seen = URI.fromBytes(normalised.encode("ascii"))
    # Twisted gives an IPv6 host without its brackets (older releases kept them).
    hosts = {host.encode("ascii"), host.strip("[]").encode("ascii")}
    if seen.host not in hosts or seen.port != port or seen.scheme != scheme.encode("ascii"):
        raise _bad_endpoint(field, "cannot be parsed unambiguously")
    return Endpoint(url=normalised, scheme=scheme, host=host, port=port, loopback=loopback)


def is_loopback_endpoint(url: object) -> bool:
    """Whether C{url} is a valid endpoint on a loopback host (see the module doc)."""
    try:
        return parse_endpoint(url).loopback
    except InvalidParams:
        return False


def check_endpoint(url: object, allow_untrusted: bool, field: str = "endpoint") -> str:
    """
    The normalised endpoint URL, or ``InvalidParams`` (-32602) when it is
    invalid, or when it is not loopback and C{allow_untrusted} is false.
    """
    endpoint = parse_endpoint(url, field)
    if not endpoint.loopback and not allow_untrusted:
        raise InvalidParams(
            field,
            f"host {endpoint.host} is not loopback; set allowUntrustedEndpoint: true to send continuations to it",
        )
    return endpoint.url


# -- the vault ---------------------------------------------------------------


@attrs.frozen
class A2aRoute:
    """One surface's route: a checked endpoint URL and its credentials."""

    endpoint: str
    auth: A2aRouteAuth = NO_AUTH


class RouteVault:
    """
    Surface id to ``A2aRoute``, on the server only.

    Nothing here is serialised: there is no ``to_wire``, and the repr
    counts routes without naming them.  Endpoints are stored as given, so
    store what ``check_endpoint`` returned.
    """

    def __init__(self) -> None:
        self._routes: dict[str, A2aRoute] = {}

    def set(self, surface_id: str, endpoint: str, auth: A2aRouteAuth = NO_AUTH) -> A2aRoute:
        route = A2aRoute(endpoint=endpoint, auth=auth)
        self._routes[surface_id] = route
        return route

    def get(self, surface_id: str) -> A2aRoute | None:
        return self._routes.get(surface_id)

    def discard(self, surface_id: str) -> bool:
        """Forget a surface's route; whether there was one."""
        return self._routes.pop(surface_id, None) is not None

    def discard_many(self, surface_ids: Iterable[str]) -> int:
        """Forget the routes of C{surface_ids}; how many there were."""
        return sum(1 for surface_id in surface_ids if self.discard(surface_id))

    def __contains__(self, surface_id: object) -> bool:
        return surface_id in self._routes

    def __len__(self) -> int:
        return len(self._routes)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._routes))

    def __repr__(self) -> str:
        return f"<RouteVault: {len(self._routes)} route(s)>"
