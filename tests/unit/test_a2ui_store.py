"""
The A2UI surface store, catalog and A2A payload scanner: each refusal and
its ``data.reason``, atomicity (a refused message changes nothing, however
far it got), a whole surface round trip, every limit at exactly its value
and one past it, expiry and reaping on a fake clock, and ``find_envelopes``
over each A2A shape plus a fuzz that it only ever raises ``A2uiError``.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from car_twisted.a2ui.catalog import (
    BASIC_CATALOG_ID,
    BASIC_CATALOG_IDS,
    COMPONENTS,
    ReferenceShapeError,
    child_references,
)
from car_twisted.a2ui.ingest import MAX_HINT_CHARS, find_envelopes
from car_twisted.a2ui.store import REASONS, A2uiError, A2uiLimits, SurfaceOwner, SurfaceStore
from car_twisted.errors import INVALID_PARAMS

T0 = 1_700_000_000.0
FUZZ = settings(max_examples=300, deadline=None)


def make_store(**limits):
    clock = Clock()
    clock.advance(T0)
    return SurfaceStore(clock, A2uiLimits(**limits)), clock


def create(sid="s1", **extra):
    return {"version": "v0.9", "createSurface": {"surfaceId": sid, "catalogId": BASIC_CATALOG_ID, **extra}}


def update(sid, *components):
    return {"version": "v0.9", "updateComponents": {"surfaceId": sid, "components": list(components)}}


def set_data(sid, path=None, **value):
    body = {"surfaceId": sid, **value}
    if path is not None:
        body["path"] = path
    return {"version": "v0.9.1", "updateDataModel": body}


def delete(sid):
    return {"version": "v0.9", "deleteSurface": {"surfaceId": sid}}


def text(cid, words="hi"):
    return {"id": cid, "component": "Text", "text": words}


def column(cid, *children):
    return {"id": cid, "component": "Column", "children": list(children)}


def snapshot(store):
    return orjson.dumps([s.to_wire() for s in store.surfaces()])


def refused(store, envelope, reason, **expected):
    before = snapshot(store)
    with pytest.raises(A2uiError) as info:
        store.apply(envelope)
    err = info.value
    assert err.code == INVALID_PARAMS == -32602
    assert err.data["reason"] == reason and reason in REASONS
    for key, value in expected.items():
        assert err.data[key] == value, (key, err.data)
    assert snapshot(store) == before
    return err


@pytest.fixture
def populated():
    store, clock = make_store()
    store.apply(create("s1"))
    store.apply(update("s1", column("root", "a"), text("a")))
    store.apply(set_data("s1", value={"n": 1}))
    store.apply(create("s2"))
    return store


# --- one test per refusal ----------------------------------------------------


@pytest.mark.parametrize(
    "envelope",
    [
        None,
        "createSurface",
        [create()],
        {},
        {"version": "v0.9"},
        {"createSurface": {"surfaceId": "x"}, "deleteSurface": {"surfaceId": "x"}},
        {"createSurface": {"surfaceId": "x"}, "extra": 1},
        {"version": "v0.8", "createSurface": {"surfaceId": "x"}},
        {"version": "v1.0", "deleteSurface": {"surfaceId": "s1"}},
        {"beginRendering": {"surfaceId": "x", "root": "root"}},
        {"createSurface": "x"},
        {"createSurface": {"surfaceId": ""}},
        {"createSurface": {"surfaceId": 7}},
        {"createSurface": {"surfaceId": "x", "catalogId": 3}},
        {"createSurface": {"surfaceId": "x", "theme": "dark"}},
        {"createSurface": {"surfaceId": "x", "sendDataModel": "yes"}},
        {"createSurface": {"surfaceId": "x", "n": float("nan")}},
        {"createSurface": {"surfaceId": "x", "n": object()}},
        {"createSurface": {"surfaceId": "x", "n": 2**70}},
        update("s1"),
        {"updateComponents": {"surfaceId": "s1", "components": {"id": "root"}}},
        update("s1", "root"),
        update("s1", {"component": "Text", "text": "no id"}),
        update("s1", {"id": "", "component": "Text"}),
        update("s1", {"id": "root", "Text": {"text": "v0.8 style"}}),
        update("s1", {"id": "root", "component": {"Text": {"text": "v0.8 style"}}}),
        update("s1", text("b"), text("b")),
        update("s1", {"id": "root", "component": "Column", "children": "a"}),
        update("s1", {"id": "root", "component": "Column", "children": [1]}),
        update("s1", {"id": "root", "component": "Card", "child": ["a"]}),
        update("s1", {"id": "root", "component": "Tabs", "tabs": [{"title": "t"}]}),
        set_data("s1", path=3, value=1),
        set_data("s1", path="user/name", value=1),
        set_data("s1", value=[1, 2]),
        set_data("s1", path="/n/x", value=1),
    ],
)
def test_invalid_message(populated, envelope):
    refused(populated, envelope, "invalid_message")


def test_unsupported_catalog(populated):
    err = refused(populated, create("x", catalogId="https://example.com/catalog.json"), "unsupported_catalog")
    assert err.data["supported"] == list(BASIC_CATALOG_IDS)


def test_unsupported_component(populated):
    refused(populated, update("s1", {"id": "w", "component": "WebView"}), "unsupported_component", component="WebView", componentId="w")


@pytest.mark.parametrize("envelope", [update("nope", text("root")), set_data("nope", value={}), delete("nope")])
def test_unknown_surface(populated, envelope):
    refused(populated, envelope, "unknown_surface", surfaceId="nope")


def test_surface_exists(populated):
    refused(populated, create("s1"), "surface_exists", surfaceId="s1")


def test_dangling_reference(populated):
    refused(populated, update("s1", column("root", "a", "ghost")), "dangling_reference", componentId="root", missing="ghost")


@pytest.mark.parametrize(
    "components",
    [
        [column("root", "root")],
        [column("root", "x"), column("x", "y"), column("y", "x")],
        [{"id": "root", "component": "Card", "child": "m"}, {"id": "m", "component": "Modal", "trigger": "b", "content": "root"},
         {"id": "b", "component": "Button", "child": "a", "action": {"event": {"name": "go"}}}],
        [column("root", "a"), column("loop", "loop2"), column("loop2", "loop")],
    ],
)
def test_cycle(populated, components):
    refused(populated, update("s1", *components), "cycle")


def test_limit_exceeded_names_the_limit():
    store, _ = make_store(max_surfaces=1)
    store.apply(create("a"))
    refused(store, create("b"), "limit_exceeded", limit="maxSurfaces", max=1)


def test_the_reasons_are_the_documented_set():
    assert set(REASONS) == {
        "invalid_message", "unsupported_catalog", "unsupported_component", "limit_exceeded",
        "unknown_surface", "surface_exists", "dangling_reference", "cycle",
    }


# --- atomicity ---------------------------------------------------------------


@pytest.mark.parametrize(
    "last, reason",
    [
        ({"id": "z", "component": "Marquee"}, "unsupported_component"),
        ({"id": "z", "component": "Column", "children": ["nowhere"]}, "dangling_reference"),
        ({"id": "z", "component": "Column", "children": ["z"]}, "cycle"),
        ({"id": "z", "component": "Row", "children": {"path": "/items"}}, "invalid_message"),
        ({"id": "z"}, "invalid_message"),
    ],
)
def test_a_multi_component_update_bad_only_at_the_end_changes_nothing(populated, last, reason):
    batch = [column("root", "a", "b", "c"), text("a", "changed"), text("b"), text("c"), last]
    refused(populated, update("s1", *batch), reason)
    assert [c["id"] for c in populated.get("s1").to_wire()["components"]] == ["root", "a"]
    assert populated.get("s1").components["a"]["text"] == "hi"


def test_a_refused_data_update_keeps_the_model():
    store, _ = make_store(max_data_model_bytes=64)
    store.apply(create("s1"))
    store.apply(set_data("s1", value={"keep": [1, 2, 3]}))
    refused(store, set_data("s1", path="/big", value="x" * 100), "limit_exceeded", limit="maxDataModelBytes")
    assert store.get("s1").data_model == {"keep": [1, 2, 3]}


def test_the_caller_cannot_change_a_stored_surface_afterwards():
    store, _ = make_store()
    message = create("s1")
    store.apply(message)
    comps = update("s1", column("root", "a"), text("a"))
    store.apply(comps)
    comps["updateComponents"]["components"][1]["text"] = "mutated"
    value = {"list": [1]}
    store.apply(set_data("s1", value=value))
    value["list"].append(2)
    wire = store.get("s1").to_wire()
    assert wire["components"][1]["text"] == "hi"
    assert wire["dataModel"] == {"list": [1]}


# --- a whole surface ---------------------------------------------------------


def test_a_complete_surface_round_trips():
    store, clock = make_store()
    owner = SurfaceOwner("a2a", task_id="t1", context_id="c1", endpoint="http://127.0.0.1:9000/a2a")
    first = store.apply({"envelope": create("form", theme={"primaryColor": "#336699"})}, owner=owner)
    assert first.to_wire()["surface"]["components"] == []
    components = [
        column("root", "title", "name", "submit"),
        {"id": "title", "component": "Text", "text": "Contact", "variant": "h2"},
        {"id": "name", "component": "TextField", "label": "Name", "value": {"path": "/contact/name"}},
        {"id": "submit", "component": "Button", "child": "submit_label", "variant": "primary",
         "action": {"event": {"name": "submit", "context": {"name": {"path": "/contact/name"}}}}},
        text("submit_label", "Send"),
    ]
    clock.advance(5)
    store.apply(update("form", *components))
    clock.advance(5)
    result = store.apply(set_data("form", path="/contact", value={"name": "Ada"}))
    wire = result.to_wire()
    assert wire == {
        "surfaceId": "form",
        "deleted": False,
        "surface": {
            "surfaceId": "form",
            "catalogId": BASIC_CATALOG_ID,
            "components": components,
            "dataModel": {"contact": {"name": "Ada"}},
            "createdAt": "2023-11-14T22:13:20Z",
            "updatedAt": "2023-11-14T22:13:30Z",
            "expiresAt": "2023-11-15T22:13:30Z",
            "sendDataModel": False,
            "theme": {"primaryColor": "#336699"},
            "owner": {"kind": "a2a", "taskId": "t1", "contextId": "c1", "endpoint": "http://127.0.0.1:9000/a2a"},
        },
    }
    assert orjson.loads(orjson.dumps(wire)) == wire
    assert store.get("form").to_wire() == wire["surface"]
    assert [s.surface_id for s in store.surfaces()] == ["form"]
    gone = store.apply(delete("form"))
    assert gone.to_wire() == {"surfaceId": "form", "deleted": True}
    assert store.get("form") is None and store.surfaces() == []


def test_updates_upsert_by_id_and_may_refer_forward_or_back():
    store, _ = make_store()
    store.apply(create("s"))
    store.apply(update("s", column("root", "late"), text("late")))  # forward reference in one batch
    store.apply(update("s", text("late", "changed"), column("extra", "late")))  # back reference, upsert
    wire = store.get("s").to_wire()["components"]
    assert [c["id"] for c in wire] == ["root", "late", "extra"]
    assert wire[1]["text"] == "changed"


def test_every_reference_property_is_read():
    assert child_references("Row", {"children": ["a", "b"]}) == ("a", "b")
    assert child_references("List", {"children": {"componentId": "item", "path": "/items"}}) == ("item",)
    assert child_references("Column", {"children": {"explicitList": ["a"]}}) == ("a",)
    assert child_references("List", {"children": {"template": {"componentId": "t", "dataBinding": "/x"}}}) == ("t",)
    assert child_references("Card", {"child": "c"}) == ("c",)
    assert child_references("Button", {"child": "label"}) == ("label",)
    assert child_references("Modal", {"trigger": "open", "content": "body"}) == ("open", "body")
    assert child_references("Modal", {"entryPointChild": "open", "contentChild": "body"}) == ("open", "body")
    assert child_references("Tabs", {"tabs": [{"title": "A", "child": "a"}, {"title": "B", "child": "b"}]}) == ("a", "b")
    assert child_references("Text", {"text": "x", "child": "ignored"}) == ()
    assert child_references("Row", {"children": None}) == ()
    with pytest.raises(ReferenceShapeError) as info:
        child_references("Tabs", {"tabs": [{"title": "A", "child": 5}]})
    assert info.value.prop == "tabs[0].child"


def test_catalogs_accepted_and_capabilities():
    store, _ = make_store()
    for n, catalog in enumerate(BASIC_CATALOG_IDS):
        assert store.apply(create(f"c{n}", catalogId=catalog)).surface.catalog_id == BASIC_CATALOG_ID
    bare = store.apply({"createSurface": {"surfaceId": "bare"}})
    assert bare.surface.catalog_id == BASIC_CATALOG_ID
    caps = store.capabilities()
    assert caps["version"] == "v0.9" and caps["mimeType"] == "application/json+a2ui"
    assert caps["catalogs"][0] == BASIC_CATALOG_ID
    assert caps["components"] == list(COMPONENTS) and len(COMPONENTS) == 24
    assert caps["limits"]["maxSurfaces"] == 256 and caps["limits"]["maxComponentsPerSurface"] == 1000
    assert orjson.loads(orjson.dumps(caps)) == caps
    for name in COMPONENTS:
        store.apply(update("bare", {"id": f"w{name}", "component": name}))


def test_data_model_paths():
    store, _ = make_store()
    store.apply(create("s"))

    def model(**kw):
        return store.apply(set_data("s", **kw)).surface.data_model

    assert model(value={"a": 1}) == {"a": 1}
    assert model(path="/user/name", value="Ada") == {"a": 1, "user": {"name": "Ada"}}
    assert model(path="/a~1b/c~0d", value=True) == {"a": 1, "user": {"name": "Ada"}, "a/b": {"c~d": True}}
    refused(store, set_data("s", path="/a/b", value=1), "invalid_message", field="path")  # through a number
    store.apply(set_data("s", path="/", value={"items": [1, 2]}))
    assert model(path="/items/-", value=3) == {"items": [1, 2, 3]}
    assert model(path="/items/3", value=4) == {"items": [1, 2, 3, 4]}
    assert model(path="/items/0", value={"x": 0}) == {"items": [{"x": 0}, 2, 3, 4]}
    assert model(path="/items/0/x") == {"items": [{}, 2, 3, 4]}
    assert model(path="/items/1") == {"items": [{}, 3, 4]}
    assert model(path="/missing/deep") == {"items": [{}, 3, 4]}
    assert model(path="/items/9") == {"items": [{}, 3, 4]}
    assert model(path="/flag", value=None) == {"items": [{}, 3, 4], "flag": None}
    assert model(path="/") == {}
    for bad in ("/items/07", "/items/x"):
        store.apply(set_data("s", value={"items": [1]}))
        refused(store, set_data("s", path=bad, value=1), "invalid_message", field="path")
    refused(store, set_data("s", path="/items/5", value=1), "invalid_message")


def test_owner_is_recorded_replaced_or_kept():
    store, _ = make_store()
    local = SurfaceOwner("local", session="conn-1")
    assert store.apply(create("s"), owner=local).to_wire()["surface"]["owner"] == {"kind": "local", "session": "conn-1"}
    assert store.apply(set_data("s", value={})).surface.owner == local
    a2a = SurfaceOwner.from_wire({"taskId": "t", "contextId": "c"})
    assert store.apply(set_data("s", value={}), owner=a2a).surface.owner.to_wire() == {"kind": "a2a", "taskId": "t", "contextId": "c"}
    for bad in ("x", {"kind": "remote"}, {"taskId": 5}):
        with pytest.raises(A2uiError) as info:
            SurfaceOwner.from_wire(bad)
        assert info.value.data["reason"] == "invalid_message"
    with pytest.raises(ValueError):
        SurfaceOwner("remote")


# --- limits: exactly at the limit, then one past it --------------------------


def test_limit_components_per_surface():
    store, _ = make_store(max_components=5)
    store.apply(create("s"))
    store.apply(update("s", column("root", "a", "b", "c", "d"), *(text(x) for x in "abcd")))
    assert len(store.get("s").components) == 5
    store.apply(update("s", text("a", "upsert keeps the count")))
    refused(store, update("s", text("e")), "limit_exceeded", limit="maxComponentsPerSurface", max=5)
    store2, _ = make_store(max_components=5)
    store2.apply(create("s"))
    refused(store2, update("s", *(text(f"t{i}") for i in range(6))), "limit_exceeded", limit="maxComponentsPerSurface")


def test_limit_depth():
    store, _ = make_store(max_depth=4)
    store.apply(create("s"))
    store.apply(update("s", column("root", "d2"), column("d2", "d3"), column("d3", "d4"), text("d4")))
    refused(store, update("s", column("d4", "d5"), text("d5")), "limit_exceeded", limit="maxDepth", max=4)
    # Depth counts from root only: a deep subtree not under root yet is fine.
    store.apply(update("s", column("o1", "o2"), column("o2", "o3"), column("o3", "o4"), column("o4", "o5"), text("o5")))
    refused(store, update("s", column("d3", "d4", "o1")), "limit_exceeded", limit="maxDepth")


def test_limit_string_bytes():
    store, _ = make_store(max_string_bytes=60)
    store.apply(create("s"))
    store.apply(update("s", text("root", "x" * 60)))
    store.apply(update("s", text("root", "é" * 30)))
    refused(store, update("s", text("root", "x" * 61)), "limit_exceeded", limit="maxStringBytes", max=60)
    refused(store, update("s", text("root", "é" * 30 + "x")), "limit_exceeded", limit="maxStringBytes")
    refused(store, set_data("s", value={"k" * 61: 1}), "limit_exceeded", limit="maxStringBytes")
    with pytest.raises(A2uiError) as info:
        store.apply(set_data("s", value={}), owner=SurfaceOwner("a2a", task_id="t" * 61))
    assert info.value.data["limit"] == "maxStringBytes"


def test_limit_data_model_bytes():
    store, _ = make_store(max_data_model_bytes=100)
    store.apply(create("s"))
    store.apply(set_data("s", value={"k": "x" * 92}))  # {"k":"…"} is 92 + 8 bytes
    assert len(orjson.dumps(store.get("s").data_model)) == 100
    refused(store, set_data("s", value={"k": "x" * 93}), "limit_exceeded", limit="maxDataModelBytes", max=100)
    store.apply(set_data("s", value={}))
    store.apply(set_data("s", path="/k", value="x" * 92))
    refused(store, set_data("s", path="/j", value=0), "limit_exceeded", limit="maxDataModelBytes")


def test_limit_surfaces():
    store, _ = make_store(max_surfaces=3)
    for sid in ("a", "b", "c"):
        store.apply(create(sid))
    refused(store, create("d"), "limit_exceeded", limit="maxSurfaces", max=3)
    store.apply(delete("b"))
    store.apply(create("d"))
    assert [s.surface_id for s in store.surfaces()] == ["a", "c", "d"]


def test_limit_envelope_bytes():
    base = len(orjson.dumps(create("s", theme={"p": ""})))
    store, _ = make_store(max_envelope_bytes=base + 10)
    store.apply(create("s", theme={"p": "x" * 10}))
    refused(store, create("t", theme={"p": "x" * 11}), "limit_exceeded", limit="maxEnvelopeBytes", max=base + 10)


def test_limit_value_depth_and_path_tokens():
    store, _ = make_store(max_value_depth=6)
    store.apply(create("s"))
    # envelope(1) > updateDataModel(2) > value(3) > ... : 4 more levels fit.
    store.apply(set_data("s", value={"a": {"b": {"c": [1]}}}))
    refused(store, set_data("s", value={"a": {"b": {"c": [[1]]}}}), "limit_exceeded", limit="maxValueDepth")
    store.apply(set_data("s", path="/1/2/3/4/5/6", value=1))
    refused(store, set_data("s", path="/1/2/3/4/5/6/7", value=1), "limit_exceeded", limit="maxValueDepth")


def test_limits_wire_names():
    assert A2uiLimits().to_wire() == {
        "maxSurfaces": 256,
        "maxComponentsPerSurface": 1000,
        "maxDepth": 32,
        "maxStringBytes": 16384,
        "maxDataModelBytes": 1048576,
        "maxEnvelopeBytes": 2097152,
        "maxValueDepth": 64,
        "surfaceTtlSeconds": 86400.0,
        "maxIngestEnvelopes": 64,
        "maxIngestDepth": 32,
    }
    with pytest.raises(ValueError):
        A2uiLimits(max_surfaces=0)


# --- expiry ------------------------------------------------------------------


def test_expiry_and_reap():
    store, clock = make_store(surface_ttl_seconds=100)
    store.apply(create("old"))
    clock.advance(60)
    store.apply(create("young"))
    assert store.get("young").to_wire()["expiresAt"] == "2023-11-14T22:16:00Z"
    clock.advance(39)
    assert store.reap() == []
    clock.advance(1)
    assert store.reap() == ["old"]
    assert store.get("old") is None
    clock.advance(50)
    store.apply(set_data("young", value={"still": "here"}))  # an update pushes expiry out
    clock.advance(99)
    assert store.reap() == []
    clock.advance(1)
    assert store.reap() == ["young"] and store.surfaces() == []


def test_expired_surfaces_stay_until_reaped_and_delete():
    store, clock = make_store(surface_ttl_seconds=10)
    store.apply(create("s"))
    clock.advance(20)
    assert store.get("s") is not None
    assert store.delete("s") is True and store.delete("s") is False
    assert store.reap() == []


# --- find_envelopes ----------------------------------------------------------

ENV_A = create("a")
ENV_B = update("a", text("root"))


def found(payload, **kw):
    result = find_envelopes(payload, **kw)
    return [f.envelope for f in result.envelopes], result


@pytest.mark.parametrize(
    "payload, expected",
    [
        (ENV_A, [ENV_A]),
        ({"a2ui": ENV_A}, [ENV_A]),
        ({"a2ui": [ENV_A, ENV_B]}, [ENV_A, ENV_B]),
        ({"envelope": ENV_A}, [ENV_A]),
        ([ENV_A, {"a2ui": ENV_B}], [ENV_A, ENV_B]),
        ({"kind": "data", "data": ENV_A}, [ENV_A]),
        ({"kind": "data", "data": [ENV_A, ENV_B], "metadata": {"mimeType": "application/json+a2ui"}}, [ENV_A, ENV_B]),
        ({"data": {"messages": [ENV_A]}}, [ENV_A]),
        ({"kind": "message", "role": "agent", "messageId": "m", "parts": [
            {"kind": "text", "text": "here"}, {"kind": "data", "data": ENV_A}, {"data": {"a2ui": ENV_B}}]}, [ENV_A, ENV_B]),
        ({"artifacts": [{"artifactId": "x", "parts": [{"kind": "data", "data": ENV_A}]}]}, [ENV_A]),
        ({"jsonrpc": "2.0", "id": 1, "result": {"kind": "message", "parts": [{"data": ENV_A}]}}, [ENV_A]),
        ({"result": {"task": {"id": "t", "status": {"state": "completed", "message": {"parts": [{"data": ENV_A}]}}}}}, [ENV_A]),
        ({"statusUpdate": {"taskId": "t", "status": {"message": {"parts": [{"data": ENV_A}]}}}}, [ENV_A]),
        ({"kind": "artifact-update", "taskId": "t", "artifact": {"parts": [{"data": ENV_A}]}}, [ENV_A]),
        ({"artifactUpdate": {"artifact": {"parts": [{"data": ENV_A}]}}}, [ENV_A]),
        ({"kind": "text", "text": orjson.dumps(ENV_A).decode()}, []),
        ({"metadata": ENV_A, "error": {"data": ENV_A}}, []),
        ({}, []),
        ([], []),
        ("text", []),
        (None, []),
    ],
)
def test_find_envelopes_shapes(payload, expected):
    assert found(payload)[0] == expected


def test_find_envelopes_in_a_task_with_hints_and_order():
    status_message = {"messageId": "m2", "role": "agent", "parts": [{"kind": "data", "data": ENV_B}]}
    task = {
        "kind": "task",
        "id": "task-1",
        "contextId": "ctx-1",
        "status": {"state": "input-required", "message": status_message},
        "history": [
            {"messageId": "m1", "role": "agent", "taskId": "task-0", "parts": [{"kind": "data", "data": [ENV_A]}]},
            status_message,
        ],
        "artifacts": [{"artifactId": "art", "parts": [{"kind": "data", "data": delete("a")}]}],
    }
    envelopes, result = found({"jsonrpc": "2.0", "id": 9, "result": task})
    assert envelopes == [ENV_A, ENV_B, delete("a")]  # history, status (read once), artifacts
    assert [(f.task_id, f.context_id) for f in result.envelopes] == [("task-0", "ctx-1"), ("task-1", "ctx-1"), ("task-1", "ctx-1")]
    assert (result.task_id, result.context_id) == ("task-1", "ctx-1")
    assert result.owner_hint("http://127.0.0.1:1/").to_wire() == {
        "kind": "a2a", "taskId": "task-1", "contextId": "ctx-1", "endpoint": "http://127.0.0.1:1/"}
    assert result.envelopes[0].owner_hint() == SurfaceOwner("a2a", task_id="task-0", context_id="ctx-1")


def test_find_envelopes_hints_ignore_odd_values():
    result = find_envelopes({"taskId": 5, "contextId": "c" * (MAX_HINT_CHARS + 1), "data": ENV_A})
    assert len(result.envelopes) == 1
    assert (result.task_id, result.context_id) == (None, None)
    assert result.owner_hint() is None
    assert find_envelopes({"jsonrpc": "2.0", "id": "req", "result": ENV_A}).task_id is None


def test_find_envelopes_then_apply_in_order():
    store, _ = make_store()
    payload = {"kind": "message", "parts": [{"kind": "data", "data": [ENV_A, ENV_B, set_data("a", value={"x": 1})]}]}
    for item in find_envelopes(payload).envelopes:
        store.apply(item.envelope, owner=item.owner_hint())
    assert store.get("a").to_wire()["dataModel"] == {"x": 1}


def test_find_envelopes_count_limit():
    assert len(find_envelopes([ENV_A] * 3, max_envelopes=3).envelopes) == 3
    with pytest.raises(A2uiError) as info:
        find_envelopes([ENV_A] * 4, max_envelopes=3)
    assert info.value.data == {"reason": "limit_exceeded", "limit": "maxIngestEnvelopes", "max": 3}


def test_find_envelopes_depth_limit():
    def nest(levels):
        node = ENV_A
        for _ in range(levels):
            node = [node]
        return node

    assert len(find_envelopes(nest(4), max_depth=4).envelopes) == 1
    with pytest.raises(A2uiError) as info:
        find_envelopes(nest(5), max_depth=4)
    assert info.value.data == {"reason": "limit_exceeded", "limit": "maxIngestDepth", "max": 4}
    deep = {"note": nest(200)}  # members that are not walked are not a depth problem
    assert find_envelopes(deep).envelopes == ()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(["data", "parts", "a2ui", "result", "artifacts", "status", "message", "history", "kind",
                         "taskId", "contextId", "id", "messageId", "createSurface", "x"]) | st.text(max_size=4),
        children, max_size=4),
    max_leaves=40,
)


@FUZZ
@given(json_values, st.integers(min_value=1, max_value=6), st.integers(min_value=1, max_value=6))
def test_find_envelopes_only_raises_limits(payload, max_envelopes, max_depth):
    try:
        result = find_envelopes(payload, max_envelopes=max_envelopes, max_depth=max_depth)
    except A2uiError as e:
        assert e.data["reason"] == "limit_exceeded"
        return
    assert len(result.envelopes) <= max_envelopes
    for item in result.envelopes:
        assert isinstance(item.envelope, dict)


@FUZZ
@given(json_values)
def test_apply_only_raises_a2ui_errors_and_keeps_state(payload):
    store, _ = make_store(max_surfaces=4)
    store.apply(create("s1"))
    store.apply(update("s1", column("root", "a"), text("a")))
    before = snapshot(store)
    for candidate in (payload, {"createSurface": payload}, {"updateComponents": {"surfaceId": "s1", "components": payload}},
                      {"updateDataModel": {"surfaceId": "s1", "path": "/x", "value": payload}}):
        try:
            store.apply(candidate)
        except A2uiError as e:
            assert e.data["reason"] in REASONS
            assert snapshot(store) == before
        before = snapshot(store)
