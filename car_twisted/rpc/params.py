"""
Params parsed at the edge into frozen attrs types.

A method declares its params as an ``@attrs.frozen`` class whose field
annotations use a small wire vocabulary (``str``, ``int``, ``float``,
``bool``, ``dict``, ``list``, ``list[str]``, ``Any`` and ``X | None``).
``parse_params(cls, raw)`` checks the JSON value against it and raises
``InvalidParams`` naming the first field that does not fit.  Unknown keys
are ignored: clients add fields over time.  String and list sizes are
bounded by ``attrs.field(metadata={"max_len": n})`` (default 64 KiB chars
for strings).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Callable, TypeVar

import attrs

from car_twisted.errors import InvalidParams

__all__ = ["parse_params", "describe_params", "DEFAULT_MAX_STR_LEN"]

T = TypeVar("T")

DEFAULT_MAX_STR_LEN = 64 * 1024
DEFAULT_MAX_LIST_LEN = 4096

_Check = Callable[[str, Any], Any]
_parsers: dict[type, Callable[[Any], Any]] = {}


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + " | null"
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"array of {_type_name(inner)}"
    return {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        dict: "object",
        list: "array",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _checker(tp: Any, max_len: int | None) -> _Check:
    """Build a checker for one annotation; runs once per params class."""
    if tp is Any:
        return lambda field, value: value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported params annotation {tp!r}")
        inner = _checker(args[0], max_len)

        def optional(field: str, value: Any) -> Any:
            return None if value is None else inner(field, value)

        return optional
    if origin is list or tp is list:
        (elem,) = typing.get_args(tp) or (Any,)
        elem_check = _checker(elem, None)
        limit = max_len or DEFAULT_MAX_LIST_LEN

        def array(field: str, value: Any) -> Any:
            if type(value) is not list:
                raise InvalidParams(field, f"expected {_type_name(tp)}")
            if len(value) > limit:
                raise InvalidParams(field, f"at most {limit} items")
            return [elem_check(f"{field}[{i}]", v) for i, v in enumerate(value)]

        return array
    if tp is str:
        limit = max_len or DEFAULT_MAX_STR_LEN

        def string(field: str, value: Any) -> Any:
            if type(value) is not str:
                raise InvalidParams(field, "expected string")
            if len(value) > limit:
                raise InvalidParams(field, f"at most {limit} characters")
            return value

        return string
    if tp is bool:

        def boolean(field: str, value: Any) -> Any:
            if type(value) is not bool:
                raise InvalidParams(field, "expected boolean")
            return value

        return boolean
    if tp is int:

        def integer(field: str, value: Any) -> Any:
            if type(value) is float and value.is_integer():
                value = int(value)
            if type(value) is not int:
                raise InvalidParams(field, "expected integer")
            return value

        return integer
    if tp is float:

        def number(field: str, value: Any) -> Any:
            if type(value) not in (int, float):
                raise InvalidParams(field, "expected number")
            return float(value)

        return number
    if tp is dict:

        def obj(field: str, value: Any) -> Any:
            if type(value) is not dict:
                raise InvalidParams(field, "expected object")
            return value

        return obj
    raise TypeError(f"unsupported params annotation {tp!r}")


def _build_parser(cls: type[T]) -> Callable[[Any], T]:
    hints = typing.get_type_hints(cls)
    fields = []
    for a in attrs.fields(cls):
        wire = a.alias or a.name
        required = a.default is attrs.NOTHING
        check = _checker(hints[a.name], a.metadata.get("max_len"))
        fields.append((a.name, wire, required, check))

    def parse(raw: Any) -> T:
        if raw is None:
            raw = {}
        elif type(raw) is not dict:
            raise InvalidParams("params", "expected an object")
        kwargs = {}
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


def parse_params(cls: type[T], raw: Any) -> T:
    """
    Check C{raw} (the request's C{params}) against C{cls} and build it.

    @raise InvalidParams: naming the field that does not fit.
    """
    parser = _parsers.get(cls)
    if parser is None:
        parser = _parsers[cls] = _build_parser(cls)
    return parser(raw)


def describe_params(cls: type) -> dict[str, Any]:
    """A small JSON description of C{cls} for ``server.schema``."""
    hints = typing.get_type_hints(cls)
    return {
        (a.alias or a.name): {
            "type": _type_name(hints[a.name]),
            "required": a.default is attrs.NOTHING,
        }
        for a in attrs.fields(cls)
    }
