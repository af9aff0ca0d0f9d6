"""
memory.persist / memory.load paths stay inside $CAR_HOME/memory/, and
namespace file names are an injective encoding that never leaves their
directory.
"""

import os

import pytest

from car_twisted.errors import RpcError
from car_twisted.sandbox import memory_path
from car_twisted.memory.scopes import MemoryScope, encode_namespace, scope_of


@pytest.fixture
def base(tmp_path):
    home = tmp_path / "car-home"
    home.mkdir(mode=0o700)
    return home / "memory"


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_relative_paths_land_in_the_memory_directory(base):
    assert memory_path(base, "facts.json", "memory.persist", create_dirs=True) == base / "facts.json"
    target = memory_path(base, "projects/a/facts.json", "memory.persist", create_dirs=True)
    assert target == base / "projects" / "a" / "facts.json"
    for d in (base, base / "projects", base / "projects" / "a"):
        assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    assert memory_path(base, str(base / "facts.json"), "memory.load", create_dirs=False) == base / "facts.json"


@pytest.mark.parametrize(
    "attempt",
    ["../x.json", "a/../../x.json", "/etc/x", "/etc/passwd", "..", ".", "", "a\0b", "x" * 300, "d/" * 600 + "f"],
)
@pytest.mark.parametrize("method", ["memory.persist", "memory.load"])
def test_escapes_are_rejected(tmp_path, base, attempt, method):
    before = listing(tmp_path)
    with pytest.raises(RpcError) as e:
        memory_path(base, attempt, method, create_dirs=method == "memory.persist")
    assert e.value.code == -32602 and e.value.message.startswith(f"{method} rejected path")
    assert e.value.data == {"field": "path"}
    after = [p for p in listing(tmp_path) if not p.startswith("car-home/memory")]
    assert after == [p for p in before if not p.startswith("car-home/memory")]


def test_symlinks_that_lead_out_are_rejected(tmp_path, base):
    outside = tmp_path / "outside"
    outside.mkdir()
    memory_path(base, "keep.json", "memory.persist", create_dirs=True)
    (base / "linkdir").symlink_to(outside)
    (base / "linkfile.json").symlink_to(outside / "target.json")
    for attempt in ("linkdir/x.json", "linkfile.json", str(base / "linkdir" / "x.json")):
        for method, create in (("memory.persist", True), ("memory.load", False)):
            with pytest.raises(RpcError, match="rejected path"):
                memory_path(base, attempt, method, create_dirs=create)
    assert list(outside.iterdir()) == []


def test_a_symlinked_memory_root_still_resolves_inside(tmp_path):
    """An absolute path through the real location of the memory directory is inside too."""
    real = tmp_path / "real-home"
    (real / "memory").mkdir(parents=True, mode=0o700)
    os.chmod(real, 0o700)
    link = tmp_path / "home-link"
    link.symlink_to(real)
    target = memory_path(link / "memory", str(real / "memory" / "f.json"), "memory.persist", create_dirs=True)
    assert target.parent == real / "memory"


@pytest.mark.parametrize(
    "namespace,encoded",
    [
        ("myapp-1", "myapp-1"),
        ("A", "%41"),
        ("%", "%25"),
        ("ü", "%c3%bc"),
        ("a/b", "a%2fb"),
        ("..", "%2e%2e"),
        (".", "%2e"),
        ("a.b_c-d", "a.b_c-d"),
        ("a%41", "a%2541"),
    ],
)
def test_namespace_encoding(namespace, encoded):
    assert encode_namespace(namespace) == encoded
    assert MemoryScope("namespace", namespace).relative_path().name == f"{encoded}.json"


def test_encoding_is_injective_on_tricky_names():
    names = ["A", "a", "%41", "%", "%25", "ü", "a/b", "a%2fb", "..", ".", "%2e", "", " ", "Ab", "aB"]
    assert len({encode_namespace(n) for n in names}) == len(names)


def test_scope_table():
    assert scope_of("ns", "agent-1") == MemoryScope("namespace", "ns")  # the namespace wins
    assert scope_of(None, "agent-1") == MemoryScope("agent", "agent-1")
    assert scope_of(None, None) == MemoryScope("shared")
    assert MemoryScope("shared").relative_path().as_posix() == "shared.json"
    assert MemoryScope("agent", "a.b").relative_path().as_posix() == "agents/a.b.json"
