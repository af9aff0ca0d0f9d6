"""
Params parsed at the edge into frozen attrs types.

A method declares its params as an ``@attrs.frozen`` class whose field
annotations use a small wire vocabulary (``str``, ``int``, ``float``,
``bool``, ``dict``, ``list``, ``list[str]``, ``JsonValue`` (or ``Any``)
for any JSON value, ``dict[str, JsonValue]`` and ``list[JsonValue]`` as
``dict`` and ``list``, and ``X | None``).  ``parse_params(cls, raw)``
checks the JSON value against it and raises ``InvalidParams`` naming the
first field that does not fit.  Unknown keys are ignored: clients add
fields over time.  String and list sizes are bounded by
``attrs.field(metadata={"max_len": n})`` (default 64 KiB chars for
strings).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from attrs import AttrsInstance

from car_twisted.errors import InvalidParams
from car_twisted.json_value import JsonValue

__all__ = ["parse_params", "describe_params", "DEFAULT_MAX_STR_LEN"]

T = TypeVar("T", bound=AttrsInstance)

DEFAULT_MAX_STR_LEN = 64 * 1024
DEFAULT_MAX_LIST_LEN = 4096

# A field check: (wire name, value) to the value the params class gets.
_Check = Callable[[str, JsonValue], JsonValue]
_parsers: dict[type[AttrsInstance], Callable[[JsonValue], AttrsInstance]] = {}
_JSON_SCALARS = frozenset({type(None), bool, int, float, str})


class _AnyJson:
    """What ``JsonValue`` (and ``Any``) come to in the wire vocabulary: no check."""


def _is_json_value(tp: object) -> bool:
    """
    Whether C{tp} is ``JsonValue`` (or ``Any``, which embedders' params
    classes may use): the union as ``get_type_hints`` resolves it, whose
    recursive members may or may not be evaluated, so it is recognised
    by its shape.
    """
    if tp is Any:
        return True
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return False
    args = typing.get_args(tp)
    scalars = {a for a in args if a in _JSON_SCALARS}
    containers = {typing.get_origin(a) for a in args if a not in _JSON_SCALARS}
    return scalars == _JSON_SCALARS and containers == {list, dict}


def _wire_type(tp: object) -> object:
    """
    C{tp} in the wire vocabulary: ``JsonValue`` as ``_AnyJson``, and the
    JSON containers ``list[JsonValue]`` and ``dict[str, JsonValue]`` as
    the bare ``list`` and ``dict`` they check the same as.
    """
    if _is_json_value(tp):
        return _AnyJson
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is list and len(args) == 1 and _is_json_value(args[0]):
        return list
    if origin is dict and len(args) == 2 and args[0] is str and _is_json_value(args[1]):
        return dict
    return tp


def _type_name(tp: object) -> str:
    tp = _wire_type(tp)
    if tp is _AnyJson:
        return "any"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + " | null"
    if origin is list:
        (inner,) = typing.get_args(tp) or (_AnyJson,)
        return f"array of {_type_name(inner)}"
    names: dict[object, str] = {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        dict: "object",
        list: "array",
    }
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _checker(tp: object, max_len: int | None) -> _Check:
    """Build a checker for one annotation; runs once per params class."""
    tp = _wire_type(tp)
    if tp is _AnyJson:
        return lambda field, value: value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported params annotation {tp!r}")
        inner = _checker(args[0], max_len)

        def optional(field: str, value: JsonValue) -> JsonValue:
            return None if value is None else inner(field, value)

        return optional
    if origin is list or tp is list:
        (elem,) = typing.get_args(tp) or (_AnyJson,)
        elem_check = _checker(elem, None)
        limit = max_len or DEFAULT_MAX_LIST_LEN

        def array(field: str, value: JsonValue) -> JsonValue:
            if type(value) is not list:
                raise InvalidParams(field, f"expected {_type_name(tp)}")
            if len(value) > limit:
                raise InvalidParams(field, f"at most {limit} items")
            return [elem_check(f"{field}[{i}]", v) for i, v in enumerate(value)]

        return array
    if tp is str:
        limit = max_len or DEFAULT_MAX_STR_LEN

        def string(field: str, value: JsonValue) -> JsonValue:
            if type(value) is not str:
                raise InvalidParams(field, "expected string")
            if len(value) > limit:
                raise InvalidParams(field, f"at most {limit} characters")
            return value

        return string
    if tp is bool:

        def boolean(field: str, value: JsonValue) -> JsonValue:
            if type(value) is not bool:
                raise InvalidParams(field, "expected boolean")
            return value

        return boolean
    if tp is int:

        def integer(field: str, value: JsonValue) -> JsonValue:
            if type(value) is float and value.is_integer():
                value = int(value)
            if type(value) is not int:
                raise InvalidParams(field, "expected integer")
            return value

        return integer
    if tp is float:

        def number(field: str, value: JsonValue) -> JsonValue:
            if type(value) is not int and type(value) is not float:
                raise InvalidParams(field, "expected number")
            return float(value)

        return number
    if tp is dict:

        def obj(field: str, value: JsonValue) -> JsonValue:
            if type(value) is not dict:
                raise InvalidParams(field, "expected object")
            return value

        return obj
    raise TypeError(f"unsupported params annotation {tp!r}")


def _build_parser(cls: type[T]) -> Callable[[JsonValue], T]:
    hints = typing.get_type_hints(cls)
    fields = []
    for a in attrs.fields(cls):
        wire = a.alias or a.name
        required = a.default is attrs.NOTHING
        check = _checker(hints[a.name], a.metadata.get("max_len"))
        fields.append((a.name, wire, required, check))

    def parse(raw: JsonValue) -> T:
        if raw is None:
            raw = {}
        elif type(raw) is not dict:
            raise InvalidParams("params", "expected an object")
        kwargs: dict[str, JsonValue] = {}
        for name, wire, required, check in fields:
            if wire in raw:
                kwargs[name] = check(wire, raw[wire])
            elif required:
                raise InvalidParams(wire, "required")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            # attrs validators speak for a field through their message.
            raise InvalidParams(getattr(e, "field", "params"), str(e)) from None

    return parse


def parse_params(cls: type[T], raw: JsonValue) -> T:
    """
    Check C{raw} (the request's C{params}) against C{cls} and build it.

    @raise InvalidParams: naming the field that does not fit.
    """
    parser = _parsers.get(cls)
    if parser is None:
        parser = _parsers[cls] = _build_parser(cls)
    return parser(raw)  # type: ignore[return-value]  # the parser built for cls makes a cls


def describe_params(cls: type[AttrsInstance]) -> dict[str, dict[str, str | bool]]:
    """A small JSON description of C{cls} for ``server.schema``."""
    hints = typing.get_type_hints(cls)
    return {
        (a.alias or a.name): {
            "type": _type_name(hints[a.name]),
            "required": a.default is attrs.NOTHING,
        }
        for a in attrs.fields(cls)
    }
