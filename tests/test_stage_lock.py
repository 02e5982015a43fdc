"""One writer per stage: the lock file's rules (taken once, waited for, broken only when stale)."""
import json
import os
import socket
import subprocess
import sys
import threading
import time


from nbutils.core import stage_lock
from nbutils.core.stage_lock import StageLock, is_stale, read_holder


def test_a_lock_is_taken_once_and_names_its_holder(tmp_path):
    first, second = StageLock(tmp_path / ".k.lock"), StageLock(tmp_path / ".k.lock")
    assert first.try_acquire()
    assert not second.try_acquire()
    holder = read_holder(tmp_path / ".k.lock")
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    first.release()
    assert not (tmp_path / ".k.lock").exists()
    assert second.try_acquire()
    second.release()


def test_a_waiter_goes_on_when_the_holder_releases(tmp_path, monkeypatch):
    monkeypatch.setattr(stage_lock, "POLL", 0.05)
    holder, waiter = StageLock(tmp_path / ".k.lock"), StageLock(tmp_path / ".k.lock")
    holder.try_acquire()
    told = []
    thread = threading.Thread(target=waiter.acquire, kwargs={"waiting": told.append})
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive() and told and told[0]["pid"] == os.getpid()
    holder.release()
    thread.join(5)
    assert not thread.is_alive() and waiter.token is not None
    waiter.release()


def _lock_file(path, host, pid, age=0.0):
    path.write_text(json.dumps({"host": host, "pid": pid, "since": time.time() - age, "token": "theirs"}))
    os.utime(path, (time.time() - age, time.time() - age))


def test_stale_locks_by_the_rule(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    here = socket.gethostname()
    cases = [  # host, pid, age in seconds, stale?
        (here, os.getpid(), 0, False),                          # alive on this host
        (here, dead_pid, 0, True),                              # its process is gone
        ("another-host", dead_pid, 0, False),                   # another host's pid means nothing here
        ("another-host", 1, stage_lock.STALE_AFTER - 60, False),  # refreshed recently enough
        ("another-host", 1, stage_lock.STALE_AFTER + 60, True),   # not refreshed: its holder is gone
    ]
    for i, (host, pid, age, stale) in enumerate(cases):
        path = tmp_path / f".{i}.lock"
        _lock_file(path, host, pid, age)
        assert is_stale(path, read_holder(path)) is stale, (host, pid, age)


def test_a_stale_lock_is_broken_and_a_live_one_kept(tmp_path):
    path = tmp_path / ".k.lock"
    _lock_file(path, "another-host", 1, stage_lock.STALE_AFTER + 60)
    lock = StageLock(path)
    assert lock.try_acquire() and read_holder(path)["token"] == lock.token
    lock.release()
    _lock_file(path, "another-host", 1, 5)
    assert not StageLock(path).try_acquire()
    assert read_holder(path)["token"] == "theirs"


def test_a_held_lock_is_refreshed_so_that_it_never_ages(tmp_path, monkeypatch):
    monkeypatch.setattr(stage_lock, "HEARTBEAT", 0.05)
    lock = StageLock(tmp_path / ".k.lock")
    lock.try_acquire()
    os.utime(lock.path, (1, 1))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 5
    lock.release()


def test_release_leaves_a_lock_that_another_writer_took(tmp_path):
    """A writer whose lock was broken as stale (it hung for longer than STALE_AFTER) must not
    remove the new holder's lock when it finally lets go."""
    lock = StageLock(tmp_path / ".k.lock")
    lock.try_acquire()
    _lock_file(lock.path, "another-host", 1, 0)
    lock.release()
    assert read_holder(tmp_path / ".k.lock")["token"] == "theirs"
