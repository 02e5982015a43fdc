"""The artifact store: every stage writes to ``outputs/<stage>/<key>/``.

The key is a hash of the stage's spec and of the keys of the artifacts it reads, so the
same work is found again and a change anywhere upstream gives new keys downstream.

A stage is written in a temporary folder and renamed into place only once complete, so an
interrupted run leaves nothing that counts as done; a failed attempt is kept beside it as
``<key>.failed/`` for inspection, and replaced by the next attempt. Formats are safe: JSON,
``.npz`` without pickle, ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SPEC_FILE = "spec.json"
#: Spec entries, at any depth, that choose where or how fast to compute or where the data is
#: read from, not what is computed: left out of keys.
NOT_IN_KEY = frozenset({"device", "data_root", "download"})


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _what(spec: Any) -> Any:
    """``spec`` without the entries of :data:`NOT_IN_KEY`, at every depth."""
    if isinstance(spec, dict):
        return {k: _what(v) for k, v in spec.items() if k not in NOT_IN_KEY}
    if isinstance(spec, list):
        return [_what(v) for v in spec]
    return spec


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
    import io

    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise TypeError(f"array {name!r} has dtype object; only numeric arrays are stored")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


class ArtifactStore:
    """Artifacts under ``root``, always an absolute path: the folders it hands out cross into
    notebook kernels, which run in another working directory (``notebooks/``)."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def exists(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / SPEC_FILE).is_file()

    def begin(self, stage: str, key: str) -> Path:
        """A fresh private folder to write the stage's results into."""
        parent = self.root / stage
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{key}-{os.getpid()}-"))

    def commit(self, work: Path, stage: str, key: str, record: dict, replace: bool = False) -> Path:
        """Write ``spec.json`` last and move the folder into place in one rename.

        An artifact that exists already (completed meanwhile by another worker) is kept, unless
        ``replace``: then the new one takes its place (the old one is removed only after)."""
        atomic_write_json(work / SPEC_FILE, record)
        final = self.path(stage, key)
        shutil.rmtree(self.failed_path(stage, key), ignore_errors=True)
        if self.exists(stage, key) and replace:
            old = final.with_name(f".tmp-{key}-{os.getpid()}-replaced")
            os.rename(final, old)
            os.rename(work, final)
            shutil.rmtree(old, ignore_errors=True)
            return final
        if self.exists(stage, key):
            shutil.rmtree(work, ignore_errors=True)
            return final
        if final.exists():  # a folder without spec.json never counted as done
            shutil.rmtree(final)
        os.rename(work, final)
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
        """Remove temporary folders left by interrupted runs (whose process is gone)."""
        removed = 0
        for tmp in self.root.glob("*/.tmp-*"):
            pid = tmp.name.split("-")[2]
            if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
                continue
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
