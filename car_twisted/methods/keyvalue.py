"""
``state.*``: the connection's key-value state, optionally per tenant.

Results are bare values as the client reads them: ``state.get`` the value
(or null), ``state.keys`` an array, ``state.set`` ``"ok"``.  Values are
stored encoded and spliced into replies as ``orjson.Fragment``s, so a read
costs no decode and no re-encode.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
import orjson
from zope.interface import implementer

from car_twisted.interfaces import IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.rpc.registry import MethodSpec
from car_twisted.runtime import KeyValueView, runtime_of
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["KeyValueMethods"]

_KEY = {"max_len": 1024}
_TENANT = {"max_len": 256}


@attrs.frozen
class KeyParams:
    key: str = attrs.field(metadata=_KEY)
    tenant_id: str | None = attrs.field(default=None, metadata=_TENANT)


@attrs.frozen
class SetParams:
    key: str = attrs.field(metadata=_KEY)
    value: JsonValue = None
    tenant_id: str | None = attrs.field(default=None, metadata=_TENANT)


@attrs.frozen
class TenantParams:
    tenant_id: str | None = attrs.field(default=None, metadata=_TENANT)


@implementer(IMethodProvider)
class KeyValueMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec("state.get", self.get, params=KeyParams, description="The value at key, or null."),
            MethodSpec("state.set", self.set, params=SetParams, description="Set key to value."),
            MethodSpec("state.exists", self.exists, params=KeyParams, description="Whether key is set."),
            MethodSpec("state.keys", self.keys, params=TenantParams, description="Every key (of the tenant, when given)."),
            MethodSpec("state.snapshot", self.snapshot, params=TenantParams, description="Every key and value."),
        )

    @staticmethod
    def _view(session: ClientSession, tenant_id: str | None) -> KeyValueView:
        return runtime_of(session).keyvalue.view(tenant_id or None)

    def get(self, session: ClientSession, p: KeyParams) -> orjson.Fragment | None:
        encoded = self._view(session, p.tenant_id).get_encoded(p.key)
        return None if encoded is None else orjson.Fragment(encoded)

    def set(self, session: ClientSession, p: SetParams) -> str:
        self._view(session, p.tenant_id).set(p.key, p.value)
        return "ok"

    def exists(self, session: ClientSession, p: KeyParams) -> bool:
        return p.key in self._view(session, p.tenant_id)

    def keys(self, session: ClientSession, p: TenantParams) -> list[str]:
        return self._view(session, p.tenant_id).keys()

    def snapshot(self, session: ClientSession, p: TenantParams) -> dict[str, orjson.Fragment]:
        return {key: orjson.Fragment(encoded) for key, encoded in self._view(session, p.tenant_id).encoded_items()}
