"""`rebuild_manifest` / `logitcache repair --rebuild-manifest`: a store whose manifest is
damaged or deleted reads again from its shard files, every sample bit for bit; what the
files cannot say (teacher, tokenizer, metadata) comes from the caller; nothing is guessed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_topk, store_contents, write_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitcache as lc
from logitcache.cli import main


def _store(path: Path, kind: str, n: int = 20) -> None:
    write_store(
        path,
        range(0, n * 3, 3),
        lambda sid: 2 + sid // 3 % 6,
        kind=kind,
        k=4 if kind == "topk" else 6,
        seed=3,
        codec="lossless" if kind == "topk" else "abs:0.01",
        temperature=0.8,
        teacher={"name": "teacher", "config_fingerprint": "sha256:abc"},
        tokenizer="tok",
        metadata={"run": 7},
        chunk_positions=10,
        shard_size=800,
    )


@pytest.fixture(scope="module", params=["topk", "sampled"])
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(request.param) / "s"
    _store(path, request.param)
    return path, store_contents(path), lc.open_store(path).meta


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_rebuild_after_any_damage_to_the_manifest(
    base: tuple[Path, dict, dict], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    src, original, meta = base
    work = tmp_path_factory.mktemp("work") / "s"
    shutil.copytree(src, work)
    mpath = work / "manifest.json"
    raw = bytearray(mpath.read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "delete"]), label="damage")
    if how == "flip":
        at = data.draw(st.integers(0, len(raw) - 1), label="byte")
        raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        mpath.write_bytes(bytes(raw))
    elif how == "truncate":
        mpath.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="len")]))
    else:
        mpath.unlink()
    with pytest.raises((lc.StoreError, FileNotFoundError)):
        lc.open_store(work)

    report = lc.rebuild_manifest(
        work, teacher=meta["teacher"], tokenizer=meta["tokenizer"], metadata=meta["metadata"]
    )
    assert report["committed"] and not report["left_out"]
    assert report["kept_damaged"] == (None if how == "delete" else "manifest.json.damaged")
    assert store_contents(work) == original
    # Everything the old manifest said, shard entries included, but who wrote it and the
    # (informational) zstd level.
    ignore = ("created_by", "updated_by")
    got = {k: v for k, v in lc.open_store(work).meta.items() if k not in ignore}
    want = {k: v for k, v in meta.items() if k not in ignore}
    want["codec"] = dict(want["codec"], zstd_level=got["codec"]["zstd_level"])
    assert got == want
    assert lc.verify_store(work)["ok"]


def test_refusals(base: tuple[Path, dict, dict], tmp_path: Path) -> None:
    src, _, _ = base
    with pytest.raises(lc.StoreError, match="nothing to rebuild"):
        lc.rebuild_manifest(src)
    work = tmp_path / "s"
    shutil.copytree(src, work)
    mpath = work / "manifest.json"
    body = json.loads(mpath.read_text())["manifest"]
    body["format_version"] = 99
    text = json.dumps(body, separators=(",", ":"))
    mpath.write_text(f'{{"checksum":"crc32:{zlib.crc32(text.encode()):08x}","manifest":{text}}}\n')
    with pytest.raises(lc.FormatVersionError):
        lc.rebuild_manifest(work)
    mpath.write_text("{")
    with pytest.raises(ValueError, match="metadata must be a dict"):
        lc.rebuild_manifest(work, metadata=[1])  # type: ignore[arg-type]
    for f in (work / "shards").iterdir():
        f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(lc.StoreError, match="no shard"):
        lc.rebuild_manifest(work)
    assert mpath.read_text() == "{"


KILLED_WRITER = r"""
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import make_topk
import logitcache as lc

w = lc.StoreWriter(sys.argv[1], vocab_size=500, k=8, chunk_positions=16, shard_size=3000)
for sid in range(80):
    w.add(sid, *make_topk(np.random.default_rng(sid), 5 + sid % 11, 8, 500))
    if sid == 29:
        w.commit()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_rebuild_after_a_killed_writer_takes_its_finished_shards(tmp_path: Path) -> None:
    """A writer killed after finishing shards it never committed, then the manifest lost:
    the rebuilt store holds the committed samples and those of the finished shards, each as
    written, and leaves out the unfinished file."""
    path = tmp_path / "s"
    code = KILLED_WRITER.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code, str(path)], check=False)
    assert proc.returncode == -signal.SIGKILL
    committed = set(lc.open_store(path).sample_ids().tolist())
    assert committed == set(range(30))
    (path / "manifest.json").unlink()
    report = lc.rebuild_manifest(path)
    assert [left["file"] for left in report["left_out"]] == [
        f"shards/{sorted(os.listdir(path / 'shards'))[-1]}"
    ]
    store = lc.open_store(path)
    present = set(store.sample_ids().tolist())
    assert committed < present < set(range(80))
    assert present == set(range(max(present) + 1))
    for sid in present:
        want = make_topk(np.random.default_rng(sid), 5 + sid % 11, 8, 500)
        r = store[sid]
        assert np.array_equal(r.input_ids, want[0]) and np.array_equal(r.topk_ids, want[1])
        assert np.abs(r.topk_logprobs - want[2]).max() <= 0.01


def test_cli(base: tuple[Path, dict, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, original, meta = base
    work = tmp_path / "s"
    shutil.copytree(src, work)
    (work / "manifest.json").write_text("not json")
    # verify reports the fault (exit 1) and, without a manifest to say which files belong,
    # calls no shard an orphan ("safe to delete" would be the worst advice here).
    for command, status in (("info", 2), ("verify", 1), ("repair", 2)):
        assert main([command, str(work)]) == status
        err = capsys.readouterr().err
        assert "repair --rebuild-manifest --dry-run" in err, (command, err)
        assert "orphan" not in err
    # The hint names the store whose manifest is lost, not the command's first path.
    assert main(["merge", str(tmp_path / "m"), str(src), str(work)]) == 2
    assert f"--rebuild-manifest --dry-run {work}\n" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main(["repair", "--teacher", "x", str(work)]) == 2
    assert "need --rebuild-manifest" in capsys.readouterr().err
    assert main(["repair", "--teacher", "", str(work)]) == 2  # given, though empty
    assert "need --rebuild-manifest" in capsys.readouterr().err
    assert main(["repair", "--rebuild-manifest", "--dry-run", "--no-progress", str(work)]) == 1
    out = capsys.readouterr().out
    assert "DRY RUN" in out and "would be taken" in out, out
    assert (work / "manifest.json").read_text() == "not json"
    argv = ["repair", "--rebuild-manifest", "--like", str(src), "--json", str(work)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rebuild"]["committed"] and report["repair"]["sound"]
    assert store_contents(work) == original
    got = lc.open_store(work).meta
    assert (got["teacher"], got["tokenizer"], got["metadata"]) == (
        meta["teacher"],
        meta["tokenizer"],
        meta["metadata"],
    )
    (work / "manifest.json").unlink()
    argv = ["repair", "--rebuild-manifest", "--teacher", "t2", "--metadata", "{", str(work)]
    assert main(argv) == 2
    assert "--metadata is not valid JSON" in capsys.readouterr().err
    assert main([*argv[:-2], "[1]", str(work)]) == 2
    assert "--metadata must be a JSON object, got '[1]'" in capsys.readouterr().err
    like = ["repair", "--rebuild-manifest", "--like", str(tmp_path / "nosuch"), str(work)]
    assert main(like) == 2
    assert f"--like {tmp_path / 'nosuch'}: " in capsys.readouterr().err
    # Only the other store's manifest is read: one that lost a shard serves as well.
    sibling = tmp_path / "sibling"
    shutil.copytree(src, sibling)
    next((sibling / "shards").iterdir()).unlink()
    like = ["repair", "--rebuild-manifest", "--dry-run", "--like", str(sibling), str(work)]
    assert main(like) == 1  # a dry run that found work to do
    assert "would be taken" in capsys.readouterr().out
    argv[-2] = '{"a": 1}'
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "REBUILT the manifest" in out and "nothing to repair" in out, out
    got = lc.open_store(work).meta
    assert got["teacher"] == {"name": "t2", "config_fingerprint": None}
    assert got["metadata"] == {"a": 1}


def test_no_store_at_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A path with no store at all is said to be missing, with no advice to rebuild a
    manifest (that is for a store whose shards are there), and nothing is created."""
    missing = tmp_path / "nothing-here"
    for command in ("info", "verify", "repair", "remove"):
        argv = [command, str(missing)] + (["1"] if command == "remove" else [])
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "No such file or directory" in err and "rebuild" not in err, (command, err)
        assert ".lock" not in err, err  # said of the store, not of its lock file
    assert not missing.exists()
    (tmp_path / "file").write_text("x")
    assert main(["repair", str(tmp_path / "file")]) == 2
    assert "Not a directory" in capsys.readouterr().err
    assert main(["repair", "--rebuild-manifest", str(tmp_path / "file")]) == 2
    assert "Not a directory" in capsys.readouterr().err
    assert main(["repair", "--rebuild-manifest", str(missing)]) == 2
    assert "open store: No such file or directory" in capsys.readouterr().err
    # A directory without a store: refused, and left without a lock file.
    (tmp_path / "empty").mkdir()
    for argv in (["repair", str(tmp_path / "empty")], ["remove", str(tmp_path / "empty"), "1"]):
        assert main(argv) == 2
        assert "manifest.json" in capsys.readouterr().err
    assert not list((tmp_path / "empty").iterdir())
