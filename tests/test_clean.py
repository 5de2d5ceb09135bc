"""`clean_store` / `logitcache clean`: the files a store's own writers left behind and its
manifest does not name are deleted, nothing else is, and the store reads as before."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_topk, store_contents, store_files, write_store

import logitcache as lc
from logitcache.cli import main

# A writer appending to a committed store, killed after finishing shards it never committed.
KILLED_APPEND = r"""
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import make_topk
import logitcache as lc

w = lc.StoreWriter(sys.argv[1], vocab_size=300, k=4, mode="a", chunk_positions=8,
                   shard_size=1500)
for sid in range(100, 160):
    w.add(sid, *make_topk(np.random.default_rng(sid), 5 + sid % 9, 4, 300))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _write(path: Path, sample_ids: list[int]) -> None:
    write_store(
        path, sample_ids, lambda sid: 3 + sid % 9, vocab=300, chunk_positions=8, shard_size=1500
    )


def _shard_of_each(path: Path) -> list[list[int]]:
    """The sample ids of each shard, in manifest order (one-shard stores read back)."""
    out = []
    for shard in lc.open_store(path).meta["shards"]:
        one = path.parent / f"one-{len(out)}"
        one.mkdir()
        (one / "shards").mkdir()
        (one / shard["file"]).hardlink_to(path / shard["file"])
        lc.rebuild_manifest(one)
        out.append(sorted(lc.open_store(one).sample_ids().tolist()))
    return out


def test_clean_deletes_what_a_killed_writer_left(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _write(path, list(range(30)))
    before = store_contents(path)
    code = KILLED_APPEND.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code, str(path)], check=False)
    assert proc.returncode == -signal.SIGKILL
    orphans = lc.verify_store(path)["orphans"]
    assert len(orphans) >= 2 and all(o.startswith("shards/") for o in orphans), orphans
    files = store_files(path)

    plan = lc.clean_store(path, dry_run=True)
    assert plan["dry_run"] and plan["deleted"] == orphans and plan["kept"] == []
    assert plan["bytes"] == sum(len(files[o]) for o in orphans)
    assert store_files(path) == files

    report = lc.clean_store(path)
    assert report["deleted"] == orphans and not report["dry_run"]
    assert not any((path / o).exists() for o in orphans)
    assert store_files(path) == {n: b for n, b in files.items() if n not in orphans}
    assert store_contents(path) == before
    assert lc.verify_store(path)["ok"] and lc.verify_store(path)["orphans"] == []
    with lc.StoreWriter(path, vocab_size=300, k=4, mode="a") as w:
        w.add(100, *make_topk(np.random.default_rng(1), 4, 4, 300))
    assert len(lc.open_store(path)) == 31


def test_clean_keeps_removed_samples_out_of_a_rebuilt_manifest(tmp_path: Path) -> None:
    """A removal killed after its commit leaves the old shard of the samples it removed; a
    manifest rebuilt from the shard files would take them back, unless clean ran first."""
    path = tmp_path / "s"
    _write(path, list(range(40)))
    shards = _shard_of_each(path)
    assert len(shards) >= 3, shards
    old = path / lc.open_store(path).meta["shards"][1]["file"]
    saved = old.read_bytes()
    lc.remove_samples(path, shards[1])
    old.write_bytes(saved)  # as if killed before deleting it
    left = sorted(lc.open_store(path).sample_ids().tolist())
    assert sorted(set(range(40)) - set(shards[1])) == left

    mpath = path / "manifest.json"
    manifest = mpath.read_bytes()
    mpath.unlink()
    assert lc.rebuild_manifest(path, dry_run=True)["num_samples"] == 40
    mpath.write_bytes(manifest)

    assert lc.clean_store(path)["deleted"] == [old.relative_to(path).as_posix()]
    mpath.unlink()
    lc.rebuild_manifest(path)
    assert sorted(lc.open_store(path).sample_ids().tolist()) == left


def test_clean_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s"
    _write(path, list(range(20)))
    (path / ".manifest.json.tmp-31337").write_text("{")
    (path / "notes.txt").write_text("mine")
    (path / "shards" / "999999-0123456789abcdef.lcs").write_bytes(b"\0" * 10)

    assert main(["verify", str(path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "orphan (not in the manifest): notes.txt" in err
    assert f"(never a writer's while it is open): logitcache clean {path}" in err
    files = store_files(path)
    assert main(["clean", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete .manifest.json.tmp-31337" in out
    assert "would delete shards/999999-0123456789abcdef.lcs" in out
    assert "kept notes.txt (clean deletes only orphan shard files and temporary" in out
    assert "DRY RUN, nothing changed: 2 file(s), 11 B" in out, out
    assert store_files(path) == files

    with lc.StoreWriter(path, vocab_size=300, k=4, mode="a"):
        assert main(["clean", str(path)]) == 2
        assert "locked" in capsys.readouterr().err
        with pytest.raises(lc.StoreLockedError):
            lc.clean_store(path)
        # A plan made while a writer is open would call its shards orphans: refused too.
        with pytest.raises(lc.StoreLockedError):
            lc.clean_store(path, dry_run=True)
    assert store_files(path) == files

    assert main(["clean", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "deleted": [".manifest.json.tmp-31337", "shards/999999-0123456789abcdef.lcs"],
        "bytes": 11,
        "kept": ["notes.txt"],
        "dry_run": False,
    }
    assert main(["clean", str(path)]) == 0
    assert "CLEANED: 0 file(s)" in capsys.readouterr().out
    assert (path / "notes.txt").exists()

    (path / "manifest.json").unlink()
    assert main(["clean", str(path)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "logitcache repair --rebuild-manifest" in err, err
    assert not (tmp_path / "none").exists()
    with pytest.raises(FileNotFoundError):
        lc.clean_store(tmp_path / "none")
    assert not (tmp_path / "none").exists()
