"""One writer per stage: a lock file beside the stage's artifact, safe on a shared file system.

Two runs on one outputs folder (two users, two terminals, or the workers of a Dask cluster on
several hosts) would otherwise compute the same stage twice. Before computing a stage a writer
creates ``<kind>/.<key>.lock`` with ``O_CREAT | O_EXCL``, which is atomic on local file systems
and on NFS (v3 and later), and writes into it who holds it: host, process id, when, and a random
token. A writer that finds the lock taken waits for it, then finds the artifact done and reuses
it.

A lock whose holder died must not block forever. It is *stale* when

* its holder ran on this host and that process is gone, or
* it has not been touched for :data:`STALE_AFTER` seconds: the holder refreshes the file's
  modification time every :data:`HEARTBEAT` seconds from a thread, so only a holder that is
  gone (or a host that is down) lets it age, whichever host it ran on.

Breaking a stale lock and taking it are two steps, so two waiters may, rarely, both go on to
compute the stage. That costs time, never correctness: committing an artifact is atomic and
idempotent (:meth:`nbutils.core.store.ArtifactStore.commit`), so the second one to finish keeps
the first one's artifact. The lock saves work; the commit keeps the store right.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Callable

#: seconds between two refreshes of a held lock's modification time
HEARTBEAT = 30.0
#: a lock not refreshed for this long is stale, whichever host holds it
STALE_AFTER = 600.0
#: seconds between two looks at a lock held by another writer
POLL = 1.0


def holder_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(path: Path) -> dict | None:
    """Who holds the lock at ``path`` (None: no lock, or one being written this instant)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_stale(path: Path, holder: dict | None, now: float | None = None) -> bool:
    """The module docstring's rule; a lock without a readable holder counts as stale only
    once it is old (it may be being written)."""
    try:
        age = (now or time.time()) - Path(path).stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_AFTER:
        return True
    if holder is None:
        return False
    return holder.get("host") == socket.gethostname() and not holder_alive(int(holder.get("pid", -1)))


def describe(holder: dict | None) -> str:
    if holder is None:
        return "another writer"
    since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"process {holder.get('pid')} on {holder.get('host')} (since {since})"


class StageLock:
    """The lock of one stage's artifact; :meth:`acquire` waits for another holder to finish."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.token: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale; False if another live writer holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "token": token}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = read_holder(self.path)
            if not is_stale(self.path, holder):
                return False
            self._break(holder)
            return self.try_acquire()
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        self.token = token
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock-{self.path.name}", daemon=True)
        self._beat.start()
        return True

    def acquire(self, waiting: Callable[[dict | None], None] | None = None) -> None:
        """Take the lock, waiting while another live writer holds it; ``waiting`` is called once,
        with the holder, when the lock is found taken."""
        told = False
        while not self.try_acquire():
            if waiting is not None and not told:
                waiting(read_holder(self.path))
                told = True
            time.sleep(POLL)

    def release(self) -> None:
        """Give the lock back (only if it is still ours: a lock broken as stale and taken by
        another writer is theirs)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        holder = read_holder(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None

    def __enter__(self) -> "StageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def _break(self, holder: dict | None) -> None:
        """Remove a stale lock: moved aside under a name of our own first, so that of two
        writers breaking it at once only one removes it."""
        aside = self.path.with_name(f"{self.path.name}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if read_holder(aside) != holder and not is_stale(aside, read_holder(aside)):
            # between our look and the rename another writer broke it and took it: give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
