"""The SKU version store on real SKU folders: add, activate, rollback, history, pre-flight and the lock."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from foundation.errors import DataError
from inspector.config import InspectorConfig
from inspector.preflight import version_check
from inspector.skustore import Provenance, SkuStore, VersionExists
from tests.fixtures_engines import copy_sku
from tests.waiting import holds_for

LOCAL = Provenance(origin="local", source="test", actor="tester")


def variant(sku_dir: Path, dest: Path, note: str) -> Path:
    """A copy of the SKU folder with one more file, so it is other content (another version id)."""
    folder = copy_sku(sku_dir, dest)
    (folder / "notes.txt").write_text(note)
    return folder


def station(sku_dir: Path) -> InspectorConfig:
    """A station config with SKU "part" (ONNX Runtime, the defaults)."""
    return InspectorConfig(active_sku="part", skus={"part": {"model_dir": sku_dir}})


@pytest.fixture
def folders(random_calibrated_sku: Path, tmp_path: Path) -> list[Path]:
    """Three versions' worth of SKU folders (each passes the daemon's pre-flight)."""
    return [variant(random_calibrated_sku, tmp_path / f"v{i}", f"version {i}") for i in range(3)]


def test_add_activate_rollback_and_the_history(folders: list[Path], tmp_path: Path) -> None:
    store = SkuStore(tmp_path / "store")
    a, b, c = (store.add_version("part", f, LOCAL) for f in folders)
    assert len({a, b, c}) == 3 and store.active("part") is None
    assert [v.id for v in store.versions("part")] == [a, b, c]
    assert {v.origin for v in store.versions("part")} == {"local"}
    assert store.skus() == ["part"]
    installed = store.path("part", a)
    assert (installed / "meta.json").read_bytes() == (folders[0] / "meta.json").read_bytes()
    assert all(not p.stat().st_mode & 0o222 for p in installed.iterdir()), "installed files are read-only"

    check = version_check(station(tmp_path / "store" / "part" / "active"), "part")
    for version in (a, b, c):
        store.activate("part", version, check=check, actor="alice", reason=f"ticket {version}")
    link = tmp_path / "store" / "part" / "active"
    assert os.readlink(link) == f"versions/{c}" and (link / "calibration.json").is_file()
    assert [v.id for v in store.versions("part") if v.active] == [c]

    assert store.rollback("part", check=check, actor="bob", reason="bad parts").after == b
    assert store.rollback("part", check=check, actor="bob").after == a
    with pytest.raises(DataError, match="no version was active before"):
        store.rollback("part", check=check)
    assert store.active("part") == a

    history = [(e.action, e.before, e.after) for e in store.history("part")]
    assert history == [("add", None, a), ("add", None, b), ("add", None, c),
                       ("activate", None, a), ("activate", a, b), ("activate", b, c),
                       ("rollback", c, b), ("rollback", b, a)]
    entry = store.history("part")[-2]
    assert (entry.actor, entry.reason) == ("bob", "bad parts") and entry.time.endswith("+00:00")


def test_activating_the_active_version_changes_nothing(folders: list[Path], tmp_path: Path) -> None:
    store = SkuStore(tmp_path / "store")
    a = store.add_version("part", folders[0], LOCAL)
    store.activate("part", a)
    change = store.activate("part", a)
    assert change.before == change.after == a
    assert [e.action for e in store.history("part")] == ["add", "activate"]


def test_the_same_content_is_one_version(folders: list[Path], tmp_path: Path) -> None:
    store = SkuStore(tmp_path / "store")
    store.add_version("part", folders[0], LOCAL)
    with pytest.raises(VersionExists, match="already has version"):
        store.add_version("part", folders[0], LOCAL)
    assert len(store.versions("part")) == 1
    assert not list((tmp_path / "store" / "part").glob(".staging-*"))


def test_a_folder_with_a_link_leaves_nothing_behind(folders: list[Path], tmp_path: Path) -> None:
    (folders[0] / "alias.onnx").symlink_to(folders[0] / "tdad.onnx")
    store = SkuStore(tmp_path / "store")
    with pytest.raises(DataError, match=r"alias\.onnx: a SKU version holds regular files only"):
        store.add_version("part", folders[0], LOCAL)
    assert store.versions("part") == [] and store.history("part") == []
    assert not list((tmp_path / "store" / "part").glob(".staging-*"))


def test_a_version_failing_the_preflight_is_not_activated(folders: list[Path], tmp_path: Path) -> None:
    (folders[1] / "calibration.json").unlink()
    store = SkuStore(tmp_path / "store")
    good, broken = store.add_version("part", folders[0], LOCAL), store.add_version("part", folders[1], LOCAL)
    check = version_check(station(tmp_path / "store" / "part" / "active"), "part")
    store.activate("part", good, check=check)
    with pytest.raises(DataError, match=rf"version {broken} fails the pre-flight, version {good} stays active: "
                                        r".*calibration\.json does not exist"):
        store.activate("part", broken, check=check)
    assert store.active("part") == good
    assert [e.after for e in store.history("part") if e.action == "activate"] == [good]


def test_two_activations_take_turns_on_the_lock(folders: list[Path], tmp_path: Path) -> None:
    store = SkuStore(tmp_path / "store")
    a, b = store.add_version("part", folders[0], LOCAL), store.add_version("part", folders[1], LOCAL)
    first_checking, release = threading.Event(), threading.Event()
    second_checked = threading.Event()

    def slow_check(_: Path) -> None:
        first_checking.set()
        release.wait(30)

    first = threading.Thread(target=store.activate, args=("part", a), kwargs={"check": slow_check})
    second = threading.Thread(target=store.activate, args=("part", b),
                              kwargs={"check": lambda _: second_checked.set()})
    first.start()
    assert first_checking.wait(30)
    second.start()
    assert holds_for(lambda: not second_checked.is_set(), 0.3), "the second activation ran inside the first"
    release.set()
    first.join(30)
    second.join(30)
    assert store.active("part") == b
    assert [(e.before, e.after) for e in store.history("part") if e.action == "activate"] == [(None, a), (a, b)]


def test_rollback_refuses_a_history_that_does_not_end_at_the_link(folders: list[Path], tmp_path: Path) -> None:
    store = SkuStore(tmp_path / "store")
    a, b = store.add_version("part", folders[0], LOCAL), store.add_version("part", folders[1], LOCAL)
    store.activate("part", a)
    store.activate("part", b)
    link = tmp_path / "store" / "part" / "active"
    link.unlink()
    link.symlink_to(f"versions/{a}")  # swapped by hand, not through the store
    with pytest.raises(DataError, match=f"history.jsonl ends at version {b}, but .* points at {a}"):
        store.rollback("part")


@pytest.mark.parametrize(("sku", "version", "message"), [
    ("../etc", "0123456789abcdef", "SKU name '../etc'"),
    (".hidden", "0123456789abcdef", "SKU name '.hidden'"),
    ("part", "../../x", "is not a version id"),
    ("part", "0123456789abcdef", "has no version 0123456789abcdef"),
])
def test_bad_names_are_one_line_errors(tmp_path: Path, sku: str, version: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        SkuStore(tmp_path / "store").activate(sku, version)
