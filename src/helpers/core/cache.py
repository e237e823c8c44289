"""On-disk cache keyed by what produced a result.

Every expensive result (corpus, trained models, statistics) is stored under
`<artifacts_dir>/<kind>/<key>/`, where `key` is a short hash of the JSON-serialised inputs that
determine it. A re-run with the same inputs reuses the result; a changed input gets a new key.
Writes are atomic (temp file + rename) so a killed run never leaves a half-written file that a
later run would trust.

`cached_result(kind, identity, compute, ...)` is the one read-or-compute step of the analyses. The
identity is content, never a path (weights' sha256, the token rows' sha256, the parameters, a code
version), so a moved or re-cloned checkout with the same artifacts folder reuses every result. A
finished result folder holds `result.json`, written last: its identity and the size and sha256 of
each of its files. A file that fails that check is reported in one line and the result recomputed;
a folder recorded with another identity is refused, naming the fields that differ. Two processes
asking for the same missing result take turns on a lock file in its folder: the second waits, finds
the first one's result and reuses it instead of computing it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: results are not locked there
    fcntl = None

DEBUG_ENV = "HELPERS_DEBUG"
RESULT_FILE = "result.json"
LOCK_FILE = ".lock"


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Damaged files and one-line errors
# --------------------------------------------------------------------------------------------


class DamagedFile(RuntimeError):
    """A file on disk is truncated, unreadable or fails its recorded checksum. The message is one
    line: which file, what is wrong, and what to do or what the program does about it."""

    def __init__(self, path: str | os.PathLike, problem: str, action: str):
        self.path, self.problem, self.action = Path(path), problem, action
        super().__init__(f"{path}: {problem}; {action}")


class IdentityMismatch(ValueError):
    """A stored result or checkpoint was made from other inputs than the ones asked for."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def notice(message: str) -> None:
    """A one-line notice on stderr (what was found and what the program does about it)."""
    print(message, file=sys.stderr, flush=True)


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Run a command-line `main`: an error is printed as one line and exits with status 1; the
    traceback only with `--debug` or `HELPERS_DEBUG=1`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    try:
        return main(argv)
    except Exception as e:  # noqa: BLE001 - the command line's one place for errors
        if debug_enabled():
            raise
        notice(f"error: {e} (traceback: --debug or {DEBUG_ENV}=1)")
        raise SystemExit(1) from None


def identity_diff(recorded: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two identities differ (for messages)."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        out = []
        for k in sorted(set(recorded) | set(wanted), key=str):
            name = f"{prefix}{k}"
            if k not in recorded or k not in wanted:
                out.append(name)
            else:
                out += identity_diff(recorded[k], wanted[k], name + ".")
        return out
    return [] if _canonical(recorded) == _canonical(wanted) else [prefix.rstrip(".") or "(value)"]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def load_checkpoint(path: str | os.PathLike, identity: dict, map_location: Any = "cpu") -> dict | None:
    """The state saved by `save_checkpoint` at `path` if it was made with `identity`; None when
    there is none. A damaged checkpoint, or one with another identity, is reported in one line
    (naming the differing fields), deleted, and None returned: the caller starts fresh."""
    import torch

    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a damaged zip
        if debug_enabled():
            raise
        notice(str(DamagedFile(path, f"damaged checkpoint, unreadable ({type(e).__name__})", "deleting it and starting fresh")))
        path.unlink()
        return None
    if not isinstance(saved, dict) or "identity" not in saved or "state" not in saved:
        notice(f"{path}: checkpoint of another version (no recorded identity); deleting it and starting fresh")
        path.unlink()
        return None
    diff = identity_diff(saved["identity"], identity)
    if diff:
        notice(f"{path}: checkpoint made with another {', '.join(diff)}; not resumed, deleting it and starting fresh")
        path.unlink()
        return None
    return saved["state"]


def save_checkpoint(path: str | os.PathLike, identity: dict, state: dict) -> None:
    """Atomically save `state` together with the identity it belongs to."""
    atomic_torch_save({"identity": identity, "state": state}, path)


# --------------------------------------------------------------------------------------------
# Content-keyed results
# --------------------------------------------------------------------------------------------


def identity_key(identity: dict, length: int = 16) -> str:
    """Folder key of an identity: a short sha256 of its canonical JSON."""
    return config_hash(identity, length)


def result_dir(root: str | os.PathLike, kind: str, identity: dict, prefix: str = "") -> Path:
    """`<root>/<kind>/<prefix>-<key>`: the cache folder of a result (`prefix` is only for people)."""
    key = identity_key(identity)
    return Path(root) / kind / (f"{prefix}-{key}" if prefix else key)


@dataclass
class Result:
    """A finished result: its folder, identity, metadata (`meta`, what `compute` returned) and
    files ({name: {"size": bytes, "sha256": hex}}), each checked when the result was opened."""

    kind: str
    path: Path
    identity: dict
    meta: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def file(self, name: str) -> Path:
        if name not in self.files:
            raise KeyError(f"{self.kind} result {self.path} has no file {name!r}; files: {sorted(self.files)}")
        return self.path / name

    def table(self, name: str):
        """The parquet file `name` (with or without `.parquet`) as a DataFrame."""
        return read_parquet(self.file(name if name.endswith(".parquet") else f"{name}.parquet"))


def _file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _check_files(folder: Path, files: dict) -> str | None:
    """The first problem with the recorded files of a result, as '<file>: <what>', or None."""
    for name, rec in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            return f"{p}: missing"
        size = p.stat().st_size
        if size != rec["size"]:
            return f"{p}: {size:,} bytes, recorded {rec['size']:,} (truncated or changed)"
        if sha256_file(p) != rec["sha256"]:
            return f"{p}: sha256 differs from the recorded one (corrupted or changed)"
    return None


def open_result(folder: str | os.PathLike, kind: str, identity: dict) -> Result | None:
    """The finished result in `folder` if there is one made with `identity` and its files pass
    their checks; None if the folder holds no finished result, or (reported in one line, record
    removed) one whose files are damaged. Raises IdentityMismatch for a result of other inputs."""
    folder = Path(folder)
    rec_path = folder / RESULT_FILE
    if not rec_path.is_file():
        return None
    try:
        rec = read_json(rec_path)
    except (OSError, ValueError):
        notice(str(DamagedFile(rec_path, "unreadable result record", f"recomputing {kind}")))
        rec_path.unlink()
        return None
    diff = identity_diff(rec.get("identity"), identity)
    if rec.get("kind") != kind or diff:
        raise IdentityMismatch(f"{folder} holds a {rec.get('kind')} result made with another "
                               f"{', '.join(diff) or 'kind'}: delete that folder or write to another one")
    problem = _check_files(folder, rec.get("files", {}))
    if problem:
        notice(f"{problem}; recomputing {kind}")
        rec_path.unlink()
        return None
    return Result(kind, folder, rec["identity"], rec.get("meta", {}), rec["files"])


_held = threading.local()  # .folders: the result folders whose lock this thread holds


@contextmanager
def result_lock(folder: Path) -> Iterator[None]:
    """Hold the inter-process lock of the result folder `folder` (an exclusive `flock` on its
    `.lock` file, released when the block ends, also on an exception, or when the process dies).

    Not taken under torchrun (WORLD_SIZE > 1): there every rank calls `cached_result` on the same
    folder and computes the one result together, so a lock held by one rank would leave the others
    waiting for it while it waits for them. Re-entrant within a process (a `compute` that asks for
    the same folder again does not wait on itself). Without `fcntl` (Windows) nothing is locked."""
    folder = Path(folder).resolve()
    held = _held.__dict__.setdefault("folders", set())
    if fcntl is None or int(os.environ.get("WORLD_SIZE", "1")) > 1 or folder in held:
        yield
        return
    with open(folder / LOCK_FILE, "a") as f:  # never deleted: a removed lock file could be locked twice
        fcntl.flock(f, fcntl.LOCK_EX)
        held.add(folder)
        try:
            yield
        finally:
            held.discard(folder)
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_result(kind: str, identity: dict, compute: Callable[[Path], dict], root: str | os.PathLike | None = None,
                  folder: str | os.PathLike | None = None, prefix: str = "") -> Result:
    """Return the result of `kind` made with `identity`, computing it once.

    The folder is `folder` if given, else `result_dir(root, kind, identity, prefix)`.
    `compute(folder)` writes its files into the folder (atomically: `atomic_write_*`; it may keep
    checkpoints there to resume) and returns the metadata dict; every file it leaves, except
    checkpoints (`*.pt`) and temporary files, is recorded in `result.json`, which is written last.
    A finished result is reused when its identity matches and its files pass their size and sha256
    checks; a damaged file is reported in one line and the result recomputed; a result made with
    another identity raises IdentityMismatch naming the differing fields. A missing result is
    computed under `result_lock(folder)`, looked for again once the lock is held, so two processes
    asking for it at once compute it once: the second waits and reuses the first one's."""
    if folder is None:
        if root is None:
            raise ValueError("cached_result needs a root (the artifacts folder) or an explicit folder")
        folder = result_dir(root, kind, identity, prefix)
    folder = Path(folder)
    found = open_result(folder, kind, identity)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    with result_lock(folder):
        found = open_result(folder, kind, identity)  # another process may have finished it meanwhile
        if found is not None:
            return found
        return _compute_result(kind, identity, compute, folder)


def _compute_result(kind: str, identity: dict, compute: Callable[[Path], dict], folder: Path) -> Result:
    meta = compute(folder)
    if meta is None:  # a process that does not write the result (a torchrun rank other than 0)
        return Result(kind, folder, identity)
    files = {p.name: _file_record(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.name != RESULT_FILE and not p.name.startswith(".") and p.suffix != ".pt"}
    write_json(folder / RESULT_FILE, {"kind": kind, "identity": identity, "key": identity_key(identity), "meta": meta,
                                      "files": files})
    return Result(kind, folder, identity, meta, files)


def atomic_write_parquet(df, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp)
    os.replace(tmp, path)


def atomic_write_csv(df, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, df.to_csv(index=False).encode())


def read_parquet(path: str | os.PathLike):
    """A parquet file as a DataFrame; a damaged one raises DamagedFile (one line) naming it."""
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        if debug_enabled():
            raise
        raise DamagedFile(path, f"unreadable parquet ({type(e).__name__})", "delete it to recompute") from None


def array_sha256(arr) -> str:
    """sha256 of an integer array's int64 bytes and shape (numpy or torch)."""
    import numpy as np

    a = arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr)
    h = hashlib.sha256(repr(tuple(a.shape)).encode())
    h.update(np.ascontiguousarray(a.astype(np.int64)).tobytes())
    return h.hexdigest()
