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


def test_clean_partial_removes_only_folders_without_a_live_writer(tmp_path):
    """A temporary folder exists while its writer holds the stage's lock: one whose lock is free
    or stale is a leftover, whichever host wrote it; one whose lock is held is work in progress,
    even from another host (whose process ids mean nothing here)."""
    store = ArtifactStore(tmp_path)
    mine = store.begin("search", "aaaa")   # our own, from an interrupted attempt: no lock held
    held = store.lock("search", "bbbb")
    assert held.try_acquire()
    busy = store.begin("search", "bbbb")
    elsewhere = tmp_path / "search" / ".tmp-cccc-1-otherhost-x"   # another host's writer, lock fresh
    elsewhere.mkdir()
    (tmp_path / "search" / ".cccc.lock").write_text('{"host": "otherhost", "pid": 1, "since": 0, "token": "t"}')
    gone = tmp_path / "search" / ".tmp-dddd-2-otherhost-x"   # another host's writer, lock stale
    gone.mkdir()
    stale = tmp_path / "search" / ".dddd.lock"
    stale.write_text('{"host": "otherhost", "pid": 2, "since": 0, "token": "t"}')
    os.utime(stale, (1, 1))
    assert store.clean_partial() == 2
    assert not mine.exists() and not gone.exists()
    assert busy.exists() and elsewhere.exists()
    held.release()


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


def test_key_holds_a_local_model_by_its_content_not_its_folder(tmp_path):
    """A pretrained model on disk (defend.yaml: denoise.ddpm_path) keys its stages by its bytes:
    the same model in another checkout finds the same artifacts; a changed file, a new key."""
    def model(folder, weights=b"weights"):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "model.bin").write_bytes(weights)
        (folder / "scheduler.json").write_text("{}")
        return str(folder)

    def key(path):
        return stage_key("defend", {"defense": {"name": "denoise", "ddpm_path": path, "sigma": 0.1}}, {})
    here, there = model(tmp_path / "a" / "ddpm"), model(tmp_path / "b" / "ddpm")
    assert key(here) == key(there)
    assert key(here) != key(model(tmp_path / "c" / "ddpm", b"other weights"))
    assert key(here) != key(str(tmp_path / "missing"))   # nothing there: keyed by the path asked for
    renamed = tmp_path / "d"
    model(renamed)
    (renamed / "unet" / "model.bin").rename(renamed / "unet" / "other.bin")
    assert key(str(renamed)) != key(here)   # the files' names count too
    assert key(None) == key(None) != key(here)


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


# --- several writers, damaged artifacts ---------------------------------------------------------
def _artifact(store, kind="search", key="k1", text='{"acc": 0.9}'):
    work = store.begin(kind, key)
    (work / "result.json").write_text(text)
    (work / "sub").mkdir()
    (work / "sub" / "weights.bin").write_bytes(b"\0" * 1000)
    return work


def test_each_file_is_recorded_with_its_sha256_and_checked(tmp_path):
    import hashlib
    import json

    store = ArtifactStore(tmp_path)
    final = store.commit(_artifact(store), "search", "k1", {"spec": 1})
    files = json.loads((final / "spec.json").read_text())["files"]
    assert files == {"result.json": hashlib.sha256(b'{"acc": 0.9}').hexdigest(),
                     "sub/weights.bin": hashlib.sha256(b"\0" * 1000).hexdigest()}
    assert store.damage("search", "k1") is None
    (final / "result.json").write_text('{"acc": 0.')   # truncated
    assert ArtifactStore(tmp_path).damage("search", "k1") == \
        "search/k1/result.json does not match its recorded SHA-256 (truncated or edited)"
    (final / "result.json").write_text('{"acc": 1.0}')   # edited, still valid JSON
    assert "result.json does not match" in ArtifactStore(tmp_path).damage("search", "k1")
    (final / "result.json").unlink()
    assert ArtifactStore(tmp_path).damage("search", "k1") == "search/k1/result.json is missing"


def test_an_artifact_from_before_the_digests_is_checked_then_given_them(tmp_path):
    import json

    store = ArtifactStore(tmp_path)
    final = store.commit(_artifact(store), "search", "old", {"spec": 1})
    spec = json.loads((final / "spec.json").read_text())
    del spec["files"]
    (final / "spec.json").write_text(json.dumps(spec))
    assert store.damage("search", "old") is None
    assert "files" in json.loads((final / "spec.json").read_text())
    bad = store.commit(_artifact(store, key="bad"), "search", "bad", {"spec": 1})
    spec = json.loads((bad / "spec.json").read_text())
    del spec["files"]
    (bad / "spec.json").write_text(json.dumps(spec))
    (bad / "result.json").write_text('{"acc": ')
    assert ArtifactStore(tmp_path).damage("search", "bad") == "search/bad/result.json is not valid JSON"


def test_committing_what_another_writer_completed_is_a_success(tmp_path):
    store = ArtifactStore(tmp_path)
    first = store.commit(_artifact(store, text='{"by": 1}'), "search", "k1", {"spec": 1})
    second_work = _artifact(store, text='{"by": 2}')
    assert store.commit(second_work, "search", "k1", {"spec": 1}) == first
    assert (first / "result.json").read_text() == '{"by": 1}' and not second_work.exists()


def test_commits_racing_from_two_processes_all_succeed(tmp_path):
    """The issue's probe, 200 pairs of simultaneous commits of one key: each pair leaves one
    sound artifact and no error (3 in 200 failed with 'Directory not empty' before)."""
    import concurrent.futures

    store = ArtifactStore(tmp_path)
    works = [[_artifact(store, key=f"k{i}", text=f'{{"by": {w}}}') for w in range(2)] for i in range(200)]
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        finals = [[pool.submit(store.commit, work, "search", f"k{i}", {"spec": i}) for work in pair]
                  for i, pair in enumerate(works)]
        results = [[f.result() for f in pair] for pair in finals]
    for i, (a, b) in enumerate(results):
        assert a == b == store.path("search", f"k{i}") and store.damage("search", f"k{i}") is None
    assert not list(tmp_path.glob("search/.tmp-*"))


def test_replacing_leaves_no_moment_without_an_artifact(tmp_path):
    """``--rerun``: the new artifact takes the old one's place in one swap (on Linux file systems
    that support it), so a reader polling the path always finds a complete artifact."""
    import threading

    from nbutils.core.store import exchange

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    if not exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system cannot swap folders atomically (the two-rename fallback is used)")
    store = ArtifactStore(tmp_path)
    store.commit(_artifact(store, text='{"v": 0}'), "search", "k1", {"spec": 0})
    stop, missing = threading.Event(), []

    def read():
        while not stop.is_set():
            if not store.exists("search", "k1"):
                missing.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    for v in range(1, 50):
        store.commit(_artifact(store, text=f'{{"v": {v}}}'), "search", "k1", {"spec": v}, replace=True)
    stop.set()
    reader.join()
    assert (store.path("search", "k1") / "result.json").read_text() == '{"v": 49}'
    assert store.damage("search", "k1") is None and not missing
    assert not list(tmp_path.glob("search/.tmp-*"))


def test_stage_folders_are_readable_by_collaborators(tmp_path):
    before = os.umask(0o022)
    try:
        store = ArtifactStore(tmp_path)
        work = _artifact(store)
        assert work.stat().st_mode & 0o777 == 0o755
        final = store.commit(work, "search", "k1", {})
        assert final.stat().st_mode & 0o777 == 0o755
        assert (final / "spec.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(before)
