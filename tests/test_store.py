"""The artifact store: content keys, atomic commits, failed attempts never count as done."""
import os

import numpy as np
import pytest

from nbutils.core.store import ArtifactStore, atomic_write_bytes, load_arrays, save_arrays, stage_key


def test_key_is_stable_and_sensitive():
    spec = {"a": 1, "b": [1, 2], "device": "cpu"}
    key = stage_key("search", spec, {"poison": "abc"})
    assert key == stage_key("search", {"b": [1, 2], "a": 1, "device": "cpu"}, {"poison": "abc"})
    assert key == stage_key("search", {**spec, "device": "cuda"}, {"poison": "abc"})  # where, not what
    assert key != stage_key("search", {**spec, "a": 2}, {"poison": "abc"})
    assert key != stage_key("search", spec, {"poison": "abd"})
    assert key != stage_key("retrain", spec, {"poison": "abc"})
    assert len(key) == 16


def test_commit_is_all_or_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    work = store.begin("search", "k1")
    (work / "genotype.json").write_text("{}")
    assert not store.exists("search", "k1")  # written, not committed: does not count
    final = store.commit(work, "search", "k1", {"spec": 1})
    assert store.exists("search", "k1") and (final / "genotype.json").exists()
    assert not work.exists()


def test_failed_attempt_is_kept_apart_and_replaced(tmp_path):
    store = ArtifactStore(tmp_path)
    work = store.begin("retrain", "k2")
    (work / "partial.txt").write_text("half")
    failed = store.fail(work, "retrain", "k2")
    assert failed.name == "k2.failed" and not store.exists("retrain", "k2")
    work = store.begin("retrain", "k2")
    store.commit(work, "retrain", "k2", {})
    assert store.exists("retrain", "k2") and not failed.exists()


def test_clean_partial_removes_only_dead_writers(tmp_path):
    store = ArtifactStore(tmp_path)
    mine = store.begin("search", "live")
    dead = tmp_path / "search" / ".tmp-dead-999999999-x"
    dead.mkdir()
    other_live = tmp_path / "search" / f".tmp-other-{os.getppid()}-x"
    other_live.mkdir()
    store.clean_partial()
    assert not dead.exists() and other_live.exists()
    assert not mine.exists()  # our own leftovers from an interrupted attempt go too


def test_arrays_round_trip_without_pickle(tmp_path):
    save_arrays(tmp_path / "a.npz", x=np.arange(6).reshape(2, 3), y=np.ones(2, dtype=np.float32))
    arrays = load_arrays(tmp_path / "a.npz")
    np.testing.assert_array_equal(arrays["x"], np.arange(6).reshape(2, 3))
    with pytest.raises(TypeError, match="object"):
        save_arrays(tmp_path / "b.npz", z=np.array([{"a": 1}], dtype=object))


def test_key_leaves_out_where_the_data_is_read_from_at_any_depth():
    spec = {"data": {"dataset": "mnist", "data_root": "/a", "download": False}, "seed": 0}
    key = stage_key("search", spec, {})
    assert key == stage_key("search", {**spec, "data": {**spec["data"], "data_root": "/b", "download": True}}, {})
    assert key != stage_key("search", {**spec, "data": {**spec["data"], "dataset": "svhn"}}, {})


def test_key_holds_the_code_version():
    assert stage_key("retrain", {"a": 1}, {}, code=1) != stage_key("retrain", {"a": 1}, {}, code=2)


def test_written_files_are_readable_like_any_other(tmp_path):
    before = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "report.html", b"<html>")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.txt", b"x")
    finally:
        os.umask(before)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600


def test_replacing_commit_swaps_in_the_new_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    work = store.begin("retrain", "k3")
    (work / "result.json").write_text("old")
    store.commit(work, "retrain", "k3", {})
    again = store.begin("retrain", "k3")
    (again / "result.json").write_text("new")
    store.commit(again, "retrain", "k3", {}, replace=False)   # kept: completed meanwhile elsewhere
    assert (store.path("retrain", "k3") / "result.json").read_text() == "old"
    again = store.begin("retrain", "k3")
    (again / "result.json").write_text("new")
    store.commit(again, "retrain", "k3", {}, replace=True)
    assert (store.path("retrain", "k3") / "result.json").read_text() == "new"
    assert [p.name for p in (tmp_path / "retrain").iterdir()] == ["k3"]


def test_store_root_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ArtifactStore("outputs")
    assert store.root == tmp_path.resolve() / "outputs" and store.path("search", "k").is_absolute()
