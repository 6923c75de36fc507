"""medgpt.files: atomic writes, digests checked against hashlib, the keyed result cache under two writing
processes and a reader, the main-process check, and temporary folders of killed writes removed by the next write
(a kill at the wrong moment leaves nothing taken for finished work)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medgpt.files import (ResultCache, atomic_write, atomic_writer, file_digest, folder_digest, is_main_process,
                          read_json, save_atomic, temporary_sibling, value_digest, write_json)

KEY = "k" * 64
ROUNDS = 1000  # each of two processes writes the same key this many times


def test_atomic_write_replaces_whole_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write(path, "first")
    atomic_write(path, b"second \xff")
    assert path.read_bytes() == b"second \xff"
    assert os.listdir(path.parent) == ["out.txt"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failing_write_keeps_the_old_content_and_removes_its_temporary_file(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"old": 1})
    with pytest.raises(RuntimeError), atomic_writer(path) as handle:
        handle.write('{"new": ')
        raise RuntimeError("killed half-way")
    assert read_json(path) == {"old": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_read_json_gives_the_default_for_missing_broken_or_other_typed_files(tmp_path):
    assert read_json(tmp_path / "missing.json", {}) == {}
    (tmp_path / "broken.json").write_text('{"a": ')
    assert read_json(tmp_path / "broken.json", {"d": 1}) == {"d": 1}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json", {}) == {} and read_json(tmp_path / "list.json") == [1, 2]
    write_json(tmp_path / "out.json", {"text": "心脏", "path": Path("x")})
    assert read_json(tmp_path / "out.json") == {"text": "心脏", "path": "x"}


def test_digests_are_sha256_of_the_bytes(tmp_path):
    data = os.urandom(3 << 20) + b"tail"  # more than one read block
    (tmp_path / "a.bin").write_bytes(data)
    assert file_digest(tmp_path / "a.bin") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_digest(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
    value = {"b": [1, "二"], "a": None}
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    assert value_digest(value) == hashlib.sha256(canonical).hexdigest() == value_digest({"a": None, "b": [1, "二"]})


def test_folder_digest_follows_contents_and_names_not_modification_times(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.txt").write_text("beta")
    before = folder_digest(folder)
    os.utime(folder / "a.txt", ns=(1, 1))
    assert folder_digest(folder) == before
    (folder / "sub" / "b.txt").write_text("betA")
    changed = folder_digest(folder)
    assert changed != before
    (folder / "sub" / "b.txt").rename(folder / "sub" / "c.txt")
    assert folder_digest(folder) not in (before, changed)
    # a name's end moved into the next file's bytes is another folder
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "ab").write_text("c")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "a").write_text("bc")
    assert folder_digest(tmp_path / "x") != folder_digest(tmp_path / "y")


def test_result_cache_keeps_values_by_key(tmp_path):
    cache = ResultCache(tmp_path / "cache")
    assert cache.get(KEY) is None
    cache.put(KEY, {"answers": ["a"]})
    assert cache.get(KEY) == {"answers": ["a"], "key": KEY}
    other = KEY[:32] + "x" * 32  # same file name, another key: not its value
    assert cache.get(other) is None


def _writer(folder: str, name: str) -> None:
    cache = ResultCache(folder)
    value = {"writer": name, "items": [name * 50] * 2000}  # ~100 kB: a torn file would show
    for _ in range(ROUNDS):
        cache.put(KEY, value)


def test_two_processes_writing_one_key_leave_one_complete_value_and_a_reader_never_sees_part(tmp_path):
    folder = tmp_path / "cache"
    cache = ResultCache(folder)
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(folder), name)) for name in ("a", "b")]
    for w in writers:
        w.start()
    seen = set()
    while any(w.is_alive() for w in writers):
        if cache.path(KEY).exists():
            text = cache.path(KEY).read_text(encoding="utf-8")  # raises nothing, parses whole: never a partial file
            value = json.loads(text)
            assert value["items"] == [value["writer"] * 50] * 2000 and value["key"] == KEY
            seen.add(value["writer"])
    for w in writers:
        w.join()
        assert w.exitcode == 0
    final = cache.get(KEY)
    assert final["writer"] in ("a", "b") and final["items"] == [final["writer"] * 50] * 2000
    assert seen and os.listdir(folder) == [cache.path(KEY).name]


def test_is_main_process_follows_rank(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()


def test_temporary_folders_of_killed_writes_are_removed_by_the_next_one(tmp_path):
    out = tmp_path / "merged"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".merged.tmp-{dead.stdout.strip()}"  # that process has exited: its folder is litter
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"x" * 1000)
    other = tmp_path / ".merged.tmp-1"  # pid 1 is alive: a write in progress elsewhere is left alone
    other.mkdir()
    save_atomic(out, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (out / "config.json").exists()
    assert not left.exists() and other.exists()
    assert temporary_sibling(out).name == f".merged.tmp-{os.getpid()}"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_and_folders_get_the_modes_the_umask_gives(tmp_path, umask):
    """A cache shared by a team (a common HF_HOME or MEDGPT_CACHE) needs the modes a plain `open()` and `mkdir()`
    give under the user's umask, not mkstemp's private 0600: the reference is what the OS gives a plain file."""
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        (tmp_path / "plain").mkdir()
        atomic_write(tmp_path / "a.txt", "x")
        write_json(tmp_path / "b.json", {"x": 1})
        ResultCache(tmp_path / "cache").put(KEY, {"x": 1})
        save_atomic(tmp_path / "model", lambda folder: (folder / "weights.bin").write_bytes(b"w"))
    finally:
        os.umask(old)
    file_mode, folder_mode = plain.stat().st_mode & 0o777, (tmp_path / "plain").stat().st_mode & 0o777
    assert file_mode == 0o666 & ~umask and folder_mode == 0o777 & ~umask
    for path in (tmp_path / "a.txt", tmp_path / "b.json", ResultCache(tmp_path / "cache").path(KEY),
                 tmp_path / "model" / "weights.bin"):
        assert path.stat().st_mode & 0o777 == file_mode, path
    for path in (tmp_path / "cache", tmp_path / "model"):
        assert path.stat().st_mode & 0o777 == folder_mode, path
