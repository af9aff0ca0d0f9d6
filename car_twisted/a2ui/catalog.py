"""
The A2UI v0.9 catalog the daemon advertises and accepts.

Catalog ids.  The published v0.9 basic catalog names itself
``https://a2ui.org/specification/v0_9/basic_catalog.json``
(``specification/v0_9/json/basic_catalog.json``, its ``catalogId``); the
same catalog is also published as
``https://a2ui.org/specification/v0_9/catalogs/basic/catalog.json``, and the
v0.9 drafts and the A2A extension's examples called it
``https://a2ui.org/specification/v0_9/standard_catalog.json``.  All three
are accepted as the basic catalog, and so is a ``createSurface`` with no
``catalogId`` at all (the schema requires one; CAR's agents omit it).  A
surface records the canonical id.

Components.  CAR advertises 24: the 18 of the published basic catalog
(``Text``, ``Image``, ``Icon``, ``Video``, ``AudioPlayer``, ``Row``,
``Column``, ``List``, ``Card``, ``Tabs``, ``Modal``, ``Divider``,
``Button``, ``TextField``, ``CheckBox``, ``ChoicePicker``, ``Slider``,
``DateTimeInput``) and six CAR additions its renderer draws (``Select``,
``Chart``, ``File``, ``FilePicker``, ``Spacer``, ``Badge``).

Component references (the properties that name other components by id;
the catalog forbids inline children), from the v0.9 schemas:

- ``Row``, ``Column``, ``List``: ``children``, a ``ChildList`` -- an array
  of ids, or a template ``{componentId, path}`` whose ``componentId`` is
  instantiated per item of a data-model list (common_types.json).
- ``Card``, ``Button``: ``child``, one id.
- ``Modal``: ``trigger`` and ``content``, one id each.
- ``Tabs``: ``tabs``, an array of ``{title, child}``; each ``child`` an id.

Inferred, not in the v0.9 schemas: the v0.8 spellings renderers still
accept are read as references too -- a ``ChildList`` written
``{explicitList: [...]}`` or ``{template: {componentId, ...}}``, ``Modal``'s
``entryPointChild`` / ``contentChild`` and ``Tabs``' ``tabItems``.  The six
CAR additions take no component references (they are leaf widgets in
CAR's renderer); none of the other basic components do either.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from car_twisted.errors import short_repr

__all__ = [
    "ROOT_ID",
    "BASIC_CATALOG_ID",
    "BASIC_CATALOG_IDS",
    "COMPONENTS",
    "COMPONENT_REFS",
    "RefKind",
    "ReferenceShapeError",
    "TreeError",
    "canonical_catalog_id",
    "child_references",
    "root_depth",
]

#: The id of the component a surface renders from (v0.9: one component
#: MUST have it).
ROOT_ID = "root"

#: The basic catalog's own ``catalogId`` in the v0.9 schemas.
BASIC_CATALOG_ID = "https://a2ui.org/specification/v0_9/basic_catalog.json"

#: Every id accepted as the basic catalog, canonical first.
BASIC_CATALOG_IDS: tuple[str, ...] = (
    BASIC_CATALOG_ID,
    "https://a2ui.org/specification/v0_9/catalogs/basic/catalog.json",
    "https://a2ui.org/specification/v0_9/standard_catalog.json",
)

#: The 24 component names CAR advertises, in the protocol document's order.
COMPONENTS: tuple[str, ...] = (
    "Text",
    "Row",
    "Column",
    "List",
    "Card",
    "Divider",
    "Button",
    "TextField",
    "CheckBox",
    "ChoicePicker",
    "Select",
    "Slider",
    "Image",
    "Icon",
    "Video",
    "AudioPlayer",
    "DateTimeInput",
    "Chart",
    "File",
    "FilePicker",
    "Spacer",
    "Badge",
    "Tabs",
    "Modal",
)


class RefKind(enum.Enum):
    """How a property names other components."""

    #: ``ChildList``: an array of ids or a template naming one id.
    CHILD_LIST = "childList"
    #: ``ComponentId``: one id.
    COMPONENT_ID = "componentId"
    #: ``Tabs``' items: an array of objects, each with a ``child`` id.
    TAB_ITEMS = "tabItems"


#: The reference properties of each component (absent: it has none).
COMPONENT_REFS: Mapping[str, tuple[tuple[str, RefKind], ...]] = {
    "Row": (("children", RefKind.CHILD_LIST),),
    "Column": (("children", RefKind.CHILD_LIST),),
    "List": (("children", RefKind.CHILD_LIST),),
    "Card": (("child", RefKind.COMPONENT_ID),),
    "Button": (("child", RefKind.COMPONENT_ID),),
    "Modal": (
        ("trigger", RefKind.COMPONENT_ID),
        ("content", RefKind.COMPONENT_ID),
        ("entryPointChild", RefKind.COMPONENT_ID),
        ("contentChild", RefKind.COMPONENT_ID),
    ),
    "Tabs": (("tabs", RefKind.TAB_ITEMS), ("tabItems", RefKind.TAB_ITEMS)),
}


class ReferenceShapeError(ValueError):
    """A reference property of the wrong shape; names the property."""

    def __init__(self, prop: str, problem: str) -> None:
        super().__init__(f"{prop}: {problem}")
        self.prop = prop
        self.problem = problem


def canonical_catalog_id(catalog_id: str | None) -> str | None:
    """The canonical id of an accepted catalog (None: missing), or None if unsupported."""
    if catalog_id is None or catalog_id in BASIC_CATALOG_IDS:
        return BASIC_CATALOG_ID
    return None


def _component_id(prop: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ReferenceShapeError(prop, "must be a non-empty component id string")
    return value


def _child_list(prop: str, value: object) -> list[str]:
    if isinstance(value, list):
        return [_component_id(f"{prop}[{i}]", item) for i, item in enumerate(value)]
    if isinstance(value, dict):
        if "componentId" in value:
            return [_component_id(f"{prop}.componentId", value["componentId"])]
        explicit = value.get("explicitList")
        if isinstance(explicit, list):
            return _child_list(f"{prop}.explicitList", explicit)
        template = value.get("template")
        if isinstance(template, dict) and "componentId" in template:
            return [_component_id(f"{prop}.template.componentId", template["componentId"])]
    return _bad(prop)


def _bad(prop: str) -> list[str]:
    raise ReferenceShapeError(prop, "must be an array of component ids or a template {componentId, path}")


def _tab_items(prop: str, value: object) -> list[str]:
    if not isinstance(value, list):
        raise ReferenceShapeError(prop, "must be an array of {title, child}")
    refs = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "child" not in item:
            raise ReferenceShapeError(f"{prop}[{i}]", "must be an object with a child id")
        refs.append(_component_id(f"{prop}[{i}].child", item["child"]))
    return refs


_READERS = {
    RefKind.CHILD_LIST: _child_list,
    RefKind.COMPONENT_ID: lambda prop, value: [_component_id(prop, value)],
    RefKind.TAB_ITEMS: _tab_items,
}


def child_references(component_type: str, component: Mapping[str, object]) -> tuple[str, ...]:
    """
    The ids C{component} (of catalog type C{component_type}) refers to, in
    property order, duplicates kept.  A reference property that is absent
    or null names nothing; one of the wrong shape raises
    L{ReferenceShapeError}.
    """
    refs: list[str] = []
    for prop, kind in COMPONENT_REFS.get(component_type, ()):
        value = component.get(prop)
        if value is not None:
            refs.extend(_READERS[kind](prop, value))
    return tuple(refs)


class TreeError(ValueError):
    """
    Components that do not form a tree: C{reason} is ``dangling_reference``
    (C{component_id} names C{missing}, which is not there) or ``cycle``
    (C{component_id} contains itself).
    """

    def __init__(self, reason: str, message: str, component_id: str, missing: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.component_id = component_id
        self.missing = missing


def root_depth(components: Mapping[str, Mapping[str, object]]) -> int:
    """
    How many components the longest chain from ``root`` holds (``root``
    alone: 1; no ``root`` yet: 0), once every reference of every component
    (by id; each with a string ``component`` type and well-shaped
    references) is checked to resolve and no component is found inside
    itself; else L{TreeError}.  Iterative: no recursion however deep.
    """
    edges = {cid: child_references(str(comp.get("component")), comp) for cid, comp in components.items()}
    for cid, children in edges.items():
        for child in children:
            if child not in edges:
                problem = f"component {short_repr(cid)} refers to {short_repr(child)}, which does not exist"
                raise TreeError("dangling_reference", problem, cid, child)
    height: dict[str, int] = {}
    visiting: set[str] = set()
    for start in edges:
        if start in height:
            continue
        visiting.add(start)
        stack = [(start, iter(edges[start]))]
        while stack:
            node, pending = stack[-1]
            for child in pending:
                if child in visiting:
                    raise TreeError("cycle", f"component {short_repr(child)} contains itself", child)
                if child not in height:
                    visiting.add(child)
                    stack.append((child, iter(edges[child])))
                    break
            else:
                stack.pop()
                visiting.discard(node)
                height[node] = 1 + max((height[c] for c in edges[node]), default=0)
    return height.get(ROOT_ID, 0)
