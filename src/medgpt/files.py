"""Files written whole or not at all, JSON in and out, digests of files, folders and values, a keyed result cache,
and which process of a multi-process run writes.

Every write goes to a temporary name of its own beside the target (two writers never share one) and is renamed
over the target once complete, so a reader sees the old file or the new one, never part of one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

BLOCK = 1 << 20


def cache_dir() -> Path:
    """medgpt's cache folder (converted models, measured speeds, shared results): $MEDGPT_CACHE, else
    ~/.cache/medgpt."""
    return Path(os.environ.get("MEDGPT_CACHE", "~/.cache/medgpt")).expanduser()


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new file beside `path` under a unique temporary name, created as a plain open() creates a file (mode 0666
    less the umask, so a cache shared by a team stays readable), not with mkstemp's private 0600."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_writer(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file opened in `mode` ("w" text UTF-8, "wb" bytes) under a unique temporary name beside `path`, renamed
    over `path` when the block ends without an error; on an error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` atomically."""
    with atomic_writer(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON (UTF-8, not escaped; values JSON lacks as their str()) atomically."""
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON value in `path`; `default` when the file is missing, unreadable, not JSON, or (for a non-None
    default) not of the default's type."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
    return data if default is None or isinstance(data, type(default)) else default


# ---- folders written whole ---------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def temporary_sibling(path: str | Path) -> Path:
    """This process's temporary folder name beside `path` (`.NAME.tmp-PID`, not created), once the ones that
    killed processes left there are removed: an interrupted write never leaves copies piling up."""
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    for old in path.parent.glob(glob.escape(prefix) + "*"):
        pid = old.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = path.with_name(prefix + str(os.getpid()))
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def save_atomic(out: str | Path, save: Callable[[Path], Any]) -> Path:
    """Call `save(tmp_folder)` and put the folder at `out` only when it is complete (removed if `save` fails); a
    folder already at `out` is moved aside first and removed last, so one complete folder is always at `out` or
    beside it."""
    out = Path(out)
    tmp = temporary_sibling(out)
    tmp.mkdir(parents=True)
    try:
        save(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = temporary_sibling(out.with_name(out.name + ".old"))
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


# ---- digests -----------------------------------------------------------------------------------


def _stream(digest, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    _stream(digest, Path(path))
    return digest.hexdigest()


def folder_digest(path: str | Path) -> str:
    """SHA-256 of a folder's files: each one's path inside it, size and bytes, in name order (a file path counts as
    a folder holding that file). Contents and names only: touching a file does not change it."""
    root = Path(path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for file in files:
        name = file.relative_to(root).as_posix() if root.is_dir() else file.name
        digest.update(f"{name}\0{file.stat().st_size}\0".encode("utf-8", "surrogateescape"))
        _stream(digest, file)
    return digest.hexdigest()


def value_digest(value: Any) -> str:
    """SHA-256 of a JSON-able value written canonically (keys sorted; values JSON lacks as their str()): what a
    result is keyed by."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def files_fingerprint(path: str | Path, skip: tuple[str, ...] | frozenset[str] = ()) -> list:
    """Names, sizes and modification times of a file or of a folder's files (not its subfolders, nor the names in
    `skip`): changes when a model is saved again, without reading gigabytes of weights."""
    path = Path(path).expanduser()
    if path.is_file():
        stat = path.stat()
        return [[path.name, stat.st_size, stat.st_mtime_ns]]
    if not path.is_dir():
        return []
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir())
            if p.is_file() and p.name not in skip]


# ---- results kept by key -----------------------------------------------------------------------


def read_keyed(path: str | Path, key: str) -> dict | None:
    """The JSON object in `path` when its "key" is `key`, else None (missing, unreadable, or another key's)."""
    data = read_json(path, {})
    return data if data.get("key") == key else None


class ResultCache:
    """JSON results kept in `folder`, one file per key, each file carrying its full key. A write is atomic, so
    processes writing the same key leave one writer's complete value (the last to finish) and a reader sees a
    complete value or none."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key[:32]}.json"

    def get(self, key: str) -> dict | None:
        """The value put under `key` (with its "key"), or None."""
        return read_keyed(self.path(key), key)

    def put(self, key: str, value: dict) -> None:
        write_json(self.path(key), {**value, "key": key})


def is_main_process() -> bool:
    """Whether this is the process that writes and prints: rank 0 of a multi-process run, or the only one."""
    return int(os.environ.get("RANK") or 0) == 0
