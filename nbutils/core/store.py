"""The artifact store: every stage writes to ``outputs/<stage>/<key>/``.

The key is a hash of the stage's spec and of the keys of the artifacts it reads, so the
same work is found again and a change anywhere upstream gives new keys downstream.

A stage is written in a temporary folder and renamed into place only once complete, so an
interrupted run leaves nothing that counts as done; a failed attempt is kept beside it as
``<key>.failed/`` for inspection, and replaced by the next attempt. Formats are safe: JSON,
``.npz`` without pickle, ``torch.load(weights_only=True)``.

Several writers may share one folder (two runs, or Dask workers on several hosts):

* one writer computes a stage at a time (:mod:`nbutils.core.stage_lock`, :meth:`ArtifactStore.lock`);
* committing is atomic and idempotent: an artifact completed meanwhile by another writer is
  kept, and the new one dropped, never an error;
* replacing an artifact (``--rerun``) swaps the two folders in one step where the file system
  can (``renameat2(RENAME_EXCHANGE)``), so a reader finds the old artifact or the new one,
  never none;
* every file is flushed to disk (``fsync``) before the rename that makes it count.

An artifact's ``spec.json`` records the SHA-256 of each of its files, and :meth:`ArtifactStore.damage`
checks them, so a truncated or edited file is found before the artifact is reused or read.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .stage_lock import StageLock, is_stale, read_holder

SPEC_FILE = "spec.json"
#: the key of ``spec.json`` that maps each other file of the artifact (its path in the folder) to its SHA-256
FILES = "files"
#: Spec entries, at any depth, that choose where or how fast to compute or where the data is
#: read from, not what is computed: left out of keys.
NOT_IN_KEY = frozenset({"device", "data_root", "download"})
#: Spec entries that name a local file or folder (a pretrained model the user put on disk):
#: keys hold a digest of its content, not its path, so the same model in another checkout or
#: folder finds the same artifacts, and a replaced model computes anew.
LOCAL_FILES = frozenset({"ddpm_path", "extractor_weights"})


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _what(spec: Any) -> Any:
    """``spec`` without the entries of :data:`NOT_IN_KEY`, at every depth, and with the paths of
    :data:`LOCAL_FILES` replaced by their content's digest."""
    if isinstance(spec, dict):
        return {k: content_digest(v) if k in LOCAL_FILES and isinstance(v, str) else _what(v)
                for k, v in spec.items() if k not in NOT_IN_KEY}
    if isinstance(spec, list):
        return [_what(v) for v in spec]
    return spec


_CONTENT_DIGESTS: dict[tuple, str] = {}


def content_digest(path: str) -> str:
    """``"sha256:<hex>"`` of the file or folder at ``path`` (a folder: every file's path inside it
    and bytes, in sorted order), or ``path`` unchanged where nothing is there (the run then stops
    on it before any compute, and the key names what was asked for). Remembered per process by
    each file's size and modification time: a model of hundreds of megabytes is read once."""
    root = Path(path).expanduser()
    if not root.exists():
        return path
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stamp = (str(root.resolve()), tuple((str(p.relative_to(root)) if root.is_dir() else "", p.stat().st_size,
                                         p.stat().st_mtime_ns) for p in files))
    if stamp not in _CONTENT_DIGESTS:
        digest = hashlib.sha256()
        for file, (name, _, _) in zip(files, stamp[1]):
            digest.update(name.encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
        _CONTENT_DIGESTS[stamp] = "sha256:" + digest.hexdigest()
    return _CONTENT_DIGESTS[stamp]


def stage_key(stage: str, spec: dict, inputs: dict[str, str], code: int | None = None) -> str:
    """16 hex digits naming the artifact of ``stage`` run with ``spec`` on the artifacts ``inputs``
    (role -> key) by version ``code`` of the stage's code (:mod:`nbutils.pipeline.code_versions`)."""
    payload = {
        "stage": stage,
        "spec": _what(spec),
        "inputs": dict(sorted(inputs.items())),
    }
    if code is not None:
        payload["code"] = code
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def _umask() -> int:
    """The process's umask: read from /proc where it can be (setting it, the only portable way
    to read it, would change it for a moment for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed into place), with the
    permissions of any file created under the process's umask (``mkstemp`` alone gives 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """``.npz`` of plain numeric arrays (object arrays are refused, so loading never unpickles)."""
    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise TypeError(f"array {name!r} has dtype object; only numeric arrays are stored")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def file_digests(folder: Path) -> dict[str, str]:
    """The SHA-256 of every file under ``folder`` but ``spec.json``, by path in the folder; each
    file is flushed to disk as it is read (the folder is about to be renamed into place)."""
    folder = Path(folder)
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SPEC_FILE):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            os.fsync(f.fileno())
        digests[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return digests


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it, a new file) to disk, where the system allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux's ``renameat2`` with ``RENAME_EXCHANGE``);
    False where the system or the file system cannot (then nothing was moved)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


class ArtifactStore:
    """Artifacts under ``root``, always an absolute path: the folders it hands out cross into
    notebook kernels, which run in another working directory (``notebooks/``)."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self._sound: set[tuple[str, str, int]] = set()   # artifacts checked sound, with their spec's mtime

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def exists(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / SPEC_FILE).is_file()

    def lock(self, stage: str, key: str) -> StageLock:
        """The lock a writer holds while it computes the artifact (:mod:`nbutils.core.stage_lock`)."""
        return StageLock(self.root / stage / f".{key}.lock")

    def damage(self, stage: str, key: str) -> str | None:
        """What is wrong with an existing artifact, naming the file (None: it is sound).

        Its files must match the SHA-256 digests its ``spec.json`` records. An artifact written
        before digests were recorded is checked as far as it can be (every JSON file parses),
        then given its digests, so that later damage is found."""
        folder = self.path(stage, key)
        try:
            mtime = (folder / SPEC_FILE).stat().st_mtime_ns
            spec = read_json(folder / SPEC_FILE)
        except FileNotFoundError:
            return f"{stage}/{key}/{SPEC_FILE} is missing"
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{stage}/{key}/{SPEC_FILE} is not valid JSON"
        if (stage, key, mtime) in self._sound:
            return None
        recorded = spec.get(FILES) if isinstance(spec, dict) else None
        if recorded is None:
            for path in sorted(folder.rglob("*.json")):
                try:
                    read_json(path)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return f"{stage}/{key}/{path.relative_to(folder).as_posix()} is not valid JSON"
            atomic_write_json(folder / SPEC_FILE, {**spec, FILES: file_digests(folder)})
            mtime = (folder / SPEC_FILE).stat().st_mtime_ns
        else:
            for name, digest in recorded.items():
                path = folder / name
                if not path.is_file():
                    return f"{stage}/{key}/{name} is missing"
                if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                    return f"{stage}/{key}/{name} does not match its recorded SHA-256 (truncated or edited)"
        self._sound.add((stage, key, mtime))
        return None

    def begin(self, stage: str, key: str) -> Path:
        """A fresh private folder to write the stage's results into, readable by others as a
        folder made under the process's umask is (``mkdtemp`` alone gives 0700)."""
        parent = self.root / stage
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{key}-{os.getpid()}-{socket.gethostname()}-"))
        os.chmod(work, 0o777 & ~_umask())
        return work

    def commit(self, work: Path, stage: str, key: str, record: dict, replace: bool = False) -> Path:
        """Record the digest of every file, write ``spec.json`` last, flush, and move the folder
        into place in one rename.

        An artifact that exists already (completed meanwhile by another writer) is kept and
        ``work`` dropped: committing twice is a success, never an error. With ``replace`` the
        new artifact takes the old one's place in one step where the file system can swap
        folders (:func:`exchange`), else in two renames a moment apart."""
        work = Path(work)
        atomic_write_json(work / SPEC_FILE, {**record, FILES: file_digests(work)})
        fsync_folder(work)
        final = self.path(stage, key)
        shutil.rmtree(self.failed_path(stage, key), ignore_errors=True)
        if replace and self.exists(stage, key):
            if not exchange(work, final):
                aside = self._aside(final, "replaced")
                os.rename(final, aside)
                os.rename(work, final)
                work = aside
            shutil.rmtree(work, ignore_errors=True)   # the old artifact: no longer reachable by its path
        else:
            while True:
                try:
                    os.rename(work, final)
                    break
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                if self.exists(stage, key):   # completed elsewhere meanwhile
                    shutil.rmtree(work, ignore_errors=True)
                    return final
                aside = self._aside(final, "incomplete")   # a folder without spec.json never counted
                try:
                    os.rename(final, aside)
                except FileNotFoundError:
                    continue
                shutil.rmtree(aside, ignore_errors=True)
        fsync_folder(final.parent)
        return final

    def failed_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.failed"

    def fail(self, work: Path, stage: str, key: str) -> Path:
        """Keep a failed attempt for inspection; it never counts as done."""
        failed = self.failed_path(stage, key)
        shutil.rmtree(failed, ignore_errors=True)
        os.rename(work, failed)
        return failed

    def clean_partial(self) -> int:
        """Remove temporary folders left by interrupted writers: those of a stage whose lock is
        free or stale (a live writer holds its stage's lock while its folder exists)."""
        removed = 0
        for tmp in self.root.glob("*/.tmp-*"):
            key = tmp.name.split("-")[1]
            lock = tmp.parent / f".{key}.lock"
            if lock.exists() and not is_stale(lock, read_holder(lock)):
                continue
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
        return removed

    @staticmethod
    def _aside(final: Path, why: str) -> Path:
        """A name beside ``final`` for moving it out of the way (:meth:`clean_partial` removes
        what an interrupted writer leaves there)."""
        return final.with_name(f".tmp-{final.name}-{os.getpid()}-{why}-{secrets.token_hex(4)}")
