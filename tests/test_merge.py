"""`merge_stores` / `logitcache merge`: stores written side by side become one store in which
every sample reads back exactly as from its source; what would not make one store is refused
with nothing changed."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_topk, store_contents, store_files, write_manifest, write_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitcache as lc
from logitcache.cli import main


def _write(
    path: Path,
    sample_ids: list[int],
    *,
    kind: str = "topk",
    vocab: int = 200,
    seed: int = 0,
    **kwargs: object,
) -> None:
    write_store(
        path,
        sample_ids,
        lambda sid: 1 + sid % 9,
        kind=kind,
        k=4 if kind == "topk" else 5,
        vocab=vocab,
        seed=seed,
        chunk_positions=8,
        shard_size=700,
        **kwargs,
    )


def _shard_paths(path: Path) -> list[Path]:
    return [path / s["file"] for s in lc.open_store(path).meta["shards"]]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["topk", "sampled"]),
    parts=st.lists(
        st.lists(st.integers(0, 10**12), min_size=0, max_size=12, unique=True),
        min_size=1,
        max_size=4,
    ),
    copy=st.booleans(),
)
def test_merged_store_reads_back_every_source(
    tmp_path_factory: pytest.TempPathFactory, kind: str, parts: list[list[int]], copy: bool
) -> None:
    """Random samples split over random stores: the merged store holds exactly their union,
    each sample bit for bit as its source decodes it, verifies, and the sources are
    untouched."""
    seen: set[int] = set()
    parts = [[s for s in p if not (s in seen or seen.add(s))] for p in parts]
    root = tmp_path_factory.mktemp("merge")
    sources = []
    for i, ids in enumerate(parts):
        src = root / f"rank{i}"
        _write(src, ids, kind=kind, seed=i, metadata={"rank": i, "run": "r1"})
        sources.append(src)
    before = [store_files(s) for s in sources]
    want: dict[int, tuple] = {}
    for s in sources:
        want.update(store_contents(s))
    dest = root / "merged"
    report = lc.merge_stores(dest, sources, copy=copy)
    n_shards = sum(len(_shard_paths(s)) for s in sources)
    assert report["shards_copied" if copy else "shards_linked"] == n_shards
    assert report["num_samples"] == len(want) == len(lc.open_store(dest))
    assert [Path(s["path"]) for s in report["sources"]] == sources
    assert store_contents(dest) == want
    merged = lc.open_store(dest)
    assert merged.meta["metadata"] == {"rank": len(parts) - 1, "run": "r1"}
    assert report["metadata_conflicts"] == (["rank"] if len(parts) > 1 else [])
    for shard in _shard_paths(dest):
        assert shard.stat().st_nlink == (1 if copy else 2)
    check = lc.verify_store(dest)
    assert check["ok"] and not check["orphans"], check
    assert [store_files(s) for s in sources] == before


def test_merge_into_an_existing_store_then_append(tmp_path: Path) -> None:
    _write(tmp_path / "a", [1, 2, 3], teacher="t", metadata={"from": "a"})
    _write(tmp_path / "b", [10, 11], seed=1)
    _write(tmp_path / "c", [20], seed=2, tokenizer=None)
    want = {
        **store_contents(tmp_path / "a"),
        **store_contents(tmp_path / "b"),
        **store_contents(tmp_path / "c"),
    }
    dest = tmp_path / "a"
    report = lc.merge_stores(dest, [tmp_path / "b", str(tmp_path / "c")], mode="a")
    assert report["num_samples"] == 6 and report["shards_linked"] >= 2
    assert store_contents(dest) == want
    assert lc.open_store(dest).meta["teacher"]["name"] == "t"
    assert lc.open_store(dest).meta["metadata"] == {"from": "a"}
    with lc.StoreWriter(dest, vocab_size=200, k=4, mode="a") as w:
        w.add(99, *make_topk(np.random.default_rng(5), 3, 4, 200))
    assert len(lc.open_store(dest)) == 7
    # mode="a" on a path without a store creates it.
    report = lc.merge_stores(tmp_path / "new", [tmp_path / "b"], mode="a")
    assert report["num_samples"] == 2


def test_merge_refusals_change_nothing(tmp_path: Path) -> None:
    _write(tmp_path / "a", [1, 2, 3])
    _write(tmp_path / "b", [3, 4], seed=1)
    _write(tmp_path / "v", [7], vocab=300)
    _write(tmp_path / "s", [8], kind="sampled")
    _write(tmp_path / "t1", [9], teacher="teacher-one")
    _write(tmp_path / "t2", [10], teacher="teacher-two")
    dest = tmp_path / "dest"
    with pytest.raises(lc.DuplicateSampleError, match="duplicate sample id 3") as e:
        lc.merge_stores(dest, [tmp_path / "a", tmp_path / "b"])
    assert str(tmp_path / "a") in str(e.value) and str(tmp_path / "b") in str(e.value)
    with pytest.raises(lc.StoreMismatchError, match="vocab_size expected 200, found 300") as e:
        lc.merge_stores(dest, [tmp_path / "a", tmp_path / "v"])
    assert str(tmp_path / "v") in str(e.value)
    with pytest.raises(lc.StoreMismatchError, match="kind expected topk, found sampled"):
        lc.merge_stores(dest, [tmp_path / "a", tmp_path / "s"])
    with pytest.raises(
        lc.StoreMismatchError, match=re.escape('teacher.name expected "teacher-one"')
    ):
        lc.merge_stores(dest, [tmp_path / "t1", tmp_path / "a", tmp_path / "t2"])
    with pytest.raises(ValueError, match="are the same store"):
        lc.merge_stores(dest, [tmp_path / "a", tmp_path / "." / "a"])
    with pytest.raises(ValueError, match="no store to merge"):
        lc.merge_stores(dest, [])
    with pytest.raises(TypeError, match="sequence of store paths"):
        lc.merge_stores(dest, str(tmp_path / "a"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        lc.merge_stores(dest, [tmp_path / "a"], mode="w")
    with pytest.raises(FileNotFoundError):
        lc.merge_stores(dest, [tmp_path / "a", tmp_path / "missing"])
    assert not dest.exists()

    files = store_files(tmp_path / "b")
    with pytest.raises(lc.StoreExistsError, match='merge into it with mode="a"'):
        lc.merge_stores(tmp_path / "b", [tmp_path / "v"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(lc.StoreExistsError) as e:
        lc.merge_stores(tmp_path / "empty", [tmp_path / "v"])
    assert 'mode="a" (logitcache merge --append) writes a new store into it' in str(e.value)
    with pytest.raises(ValueError, match="the destination itself"):
        lc.merge_stores(tmp_path / "b", [tmp_path / "b"], mode="a")
    with lc.StoreWriter(tmp_path / "b", vocab_size=200, k=4, mode="a"):
        with pytest.raises(lc.StoreLockedError):
            lc.merge_stores(tmp_path / "b", [tmp_path / "t1"], mode="a")
    assert store_files(tmp_path / "b") == files


def test_a_copy_checks_every_byte(tmp_path: Path) -> None:
    _write(tmp_path / "a", list(range(20)))
    shard = _shard_paths(tmp_path / "a")[0]
    raw = bytearray(shard.read_bytes())
    raw[70] ^= 0x10  # inside the first chunk: opening the shard does not read it
    shard.write_bytes(bytes(raw))
    with pytest.raises(lc.CorruptStoreError, match="CRC-32") as e:
        lc.merge_stores(tmp_path / "dest", [tmp_path / "a"], copy=True)
    assert str(shard) in str(e.value)
    assert not (tmp_path / "dest").exists()
    # A link does not read the file: the damage comes along, and verify finds it.
    lc.merge_stores(tmp_path / "dest", [tmp_path / "a"])
    assert not lc.verify_store(tmp_path / "dest")["ok"]


def test_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "a", list(range(30)))
    total = sum(p.stat().st_size for p in _shard_paths(tmp_path / "a"))
    lc.merge_stores(tmp_path / "d1", [tmp_path / "a"], copy=True, progress=True)
    err = capsys.readouterr().err
    assert "merge" in err and "100%" in err, err
    assert sum(p.stat().st_size for p in _shard_paths(tmp_path / "d1")) == total


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "a", [1, 2], metadata={"rank": 0})
    _write(tmp_path / "b", [3], seed=1, metadata={"rank": 1})
    dest = str(tmp_path / "m")
    assert main(["merge", dest, str(tmp_path / "a"), str(tmp_path / "b"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "MERGED into" in out and "3 samples" in out, out
    assert "'rank'" in err, err
    # Linked shards are not read; copied ones are (against their size and checksum).
    linked = "the linked shards' chunks were not read"
    assert (linked in err) == ("2 linked" in out or "1 linked" in out), (out, err)
    copied = str(tmp_path / "copied")
    assert main(["merge", copied, str(tmp_path / "a"), "--copy", "--no-progress"]) == 0
    assert linked not in capsys.readouterr().err
    assert main(["merge", dest, str(tmp_path / "a")]) == 2
    out, err = capsys.readouterr()
    assert "already holds a store" in err and "logitcache merge --append" in err, err
    _write(tmp_path / "c", [4], seed=2)
    assert main(["merge", "--append", "--copy", "--json", dest, str(tmp_path / "c")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards_copied"] == 1 and report["num_samples"] == 4
    assert main(["merge", str(tmp_path / "x"), str(tmp_path / "a"), str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "duplicate sample id 1" in err and "a sample id may be in one store only" in err, err
    assert "2 sample ids in all are held twice (1, 2)" in err, err
    assert "--dry-run --duplicates DIR" in err, err
    assert not os.path.exists(tmp_path / "x")


def test_dry_run_lists_every_duplicate_and_changes_nothing(tmp_path: Path) -> None:
    """A refused merge names the first id held twice and counts the others; a dry run lists
    them all (across every pair of stores, the destination's included with mode="a"),
    writes nothing, and what it reports is what the merge then makes."""
    _write(tmp_path / "a", list(range(0, 30)))
    _write(tmp_path / "b", list(range(20, 45)), seed=1)
    _write(tmp_path / "c", [44, 50, 2], seed=2)
    srcs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    want = sorted(set(range(20, 30)) | {44, 2})
    before = {s: store_files(s) for s in srcs}
    dest = tmp_path / "dest"
    with pytest.raises(lc.DuplicateSampleError) as e:
        lc.merge_stores(dest, srcs)
    assert e.value.sample_id == 20, str(e.value)
    msg = str(e.value)
    assert f"{len(want)} sample ids in all are held twice" in msg, msg
    assert "(2, 20, 21, 22, 23, 24, 25, 26, 27, 28, and 2 more)" in msg, msg
    report = lc.merge_stores(dest, srcs, dry_run=True)
    assert report["duplicates"] == want
    # Per source, the ids an earlier store holds: taking those out keeps each sample once,
    # in its first store (44 stays in b; it was in b and c only).
    assert [s["duplicates"] for s in report["sources"]] == [[], list(range(20, 30)), [2, 44]]
    distinct = set(range(0, 45)) | {50}
    assert report["num_samples"] == len(distinct)  # each sample counted once
    assert [s["samples"] for s in report["sources"]] == [30, 25, 3]
    assert report["shards_linked"] == report["shards_copied"] == 0
    assert not dest.exists()
    assert {s: store_files(s) for s in srcs} == before
    # Its progress goes from 0 to the sources' bytes (the footers it reads, shard by shard).
    seen: list[tuple[int, int]] = []
    lc._core.merge(
        str(dest), [str(p) for p in srcs], dry_run=True, progress=lambda d, t: seen.append((d, t))
    )
    total = sum(s["bytes"] for s in report["sources"])
    assert seen[-1] == (total, total) and seen[0][0] < total, seen
    for s in report["sources"]:
        lc.remove_samples(s["path"], s["duplicates"])
    planned = lc.merge_stores(dest, srcs, dry_run=True)
    assert planned["duplicates"] == []
    merged = lc.merge_stores(dest, srcs)
    assert merged["duplicates"] == []
    assert (merged["num_samples"], merged["num_positions"]) == (
        planned["num_samples"],
        planned["num_positions"],
    )
    assert merged["num_samples"] == report["num_samples"]
    assert merged["num_positions"] == report["num_positions"]
    assert sorted(lc.open_store(dest).sample_ids().tolist()) == sorted(distinct)
    # mode="a": the destination's own ids count, and a dry run into an existing store
    # without mode="a" is refused as the merge would be.
    _write(tmp_path / "d", [7, 100], seed=3)
    assert lc.merge_stores(dest, [tmp_path / "d"], mode="a", dry_run=True)["duplicates"] == [7]
    with pytest.raises(lc.StoreExistsError):
        lc.merge_stores(dest, [tmp_path / "d"], dry_run=True)
    # mode="a" where there is no store: a new path or an empty directory take one (what a
    # merge killed before its commit leaves is such a directory), other files do not.
    for where in ("fresh", "empty"):
        if where == "empty":
            (tmp_path / where).mkdir()
        report = lc.merge_stores(tmp_path / where, [tmp_path / "d"], mode="a", dry_run=True)
        assert (report["num_samples"], report["duplicates"]) == (2, [])
    assert not (tmp_path / "fresh").exists() and not any((tmp_path / "empty").iterdir())
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a logitcache store"):
        lc.merge_stores(tmp_path / "empty", [tmp_path / "d"], mode="a", dry_run=True)


def test_one_store_holding_an_id_twice_is_named(tmp_path: Path) -> None:
    """Two shards of one source with the same id (a manifest put together by hand, say): the
    refusal and the dry run name them too."""
    _write(tmp_path / "a", [1, 2, 3, 4, 5, 6, 7, 8])
    _write(tmp_path / "x", [2, 3], seed=4)
    _write(tmp_path / "b", [9], seed=1)
    # x's shard listed in a's manifest too (the manifest's envelope: FORMAT.md section 2).
    envelope = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest = envelope["manifest"]
    (extra,) = lc.open_store(tmp_path / "x").meta["shards"]
    name = f"shards/{len(manifest['shards']):06}-{extra['uid']}.lcs"
    os.link(tmp_path / "x" / extra["file"], tmp_path / "a" / name)
    manifest["shards"].append({**extra, "file": name})
    manifest["num_samples"] += extra["num_samples"]
    manifest["num_positions"] += extra["num_positions"]
    write_manifest(tmp_path / "a", manifest)
    srcs = [tmp_path / "a", tmp_path / "b"]
    assert lc.merge_stores(tmp_path / "m", srcs, dry_run=True)["duplicates"] == [2, 3]
    with pytest.raises(lc.DuplicateSampleError) as e:
        lc.merge_stores(tmp_path / "m", srcs)
    assert e.value.sample_id == 2
    assert str(tmp_path / "a" / name) in str(e.value), str(e.value)
    assert "2 sample ids in all are held twice (2, 3)" in str(e.value), str(e.value)


def _repeat_first_id_in_a_shard(store: Path) -> int:
    """Give record 1 of the store's first shard record 0's id, footer, trailer and manifest
    checksums made to match (FORMAT.md sections 2 and 3): one shard holding an id twice,
    which no writer makes. Returns the id."""
    envelope = json.loads((store / "manifest.json").read_text())
    body = envelope["manifest"]
    entry = body["shards"][0]
    file = store / entry["file"]
    data = bytearray(file.read_bytes())
    footer_offset, footer_len = struct.unpack_from("<QQ", data, len(data) - 32)
    num_chunks, num_records, _ = struct.unpack_from("<QQQ", data, footer_offset)
    assert num_records >= 2
    records = footer_offset + 24 + 32 * num_chunks
    (first,) = struct.unpack_from("<Q", data, records)
    struct.pack_into("<Q", data, records + 12, first)
    footer = bytes(data[footer_offset : footer_offset + footer_len])
    struct.pack_into("<I", data, len(data) - 16, zlib.crc32(footer))
    struct.pack_into("<I", data, len(data) - 12, zlib.crc32(bytes(data[-32:-12])))
    file.write_bytes(bytes(data))
    entry["checksum"] = f"crc32:{zlib.crc32(bytes(data)):08x}"
    write_manifest(store, body)
    return int(first)


def test_a_shard_holding_an_id_twice_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusal and the dry run name a shard that holds an id twice itself (the scan of
    the footers indexed past its list of files: a panic)."""
    _write(tmp_path / "a", [1, 2, 3, 4, 5, 6, 7, 8])
    sid = _repeat_first_id_in_a_shard(tmp_path / "a")
    report = lc.merge_stores(tmp_path / "m", [tmp_path / "a"], dry_run=True)
    # Not in the source's list: removing it there would remove both records.
    assert report["duplicates"] == [sid] and report["sources"][0]["duplicates"] == []
    assert report["num_samples"] == 7  # the distinct ids (record 1 lost its own)
    with pytest.raises(lc.DuplicateSampleError, match="holds it twice") as e:
        lc.merge_stores(tmp_path / "m", [tmp_path / "a"])
    assert e.value.sample_id == sid
    assert not (tmp_path / "m").exists()
    argv = ["merge", "--dry-run", "--duplicates", str(tmp_path / "d"), str(tmp_path / "m")]
    assert main([*argv, str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert f"1 sample id(s) are held twice within one store ({sid})" in err, err
    assert "logitcache remove" not in err, err


def test_cli_dry_run_and_duplicates_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "a", [1, 2, 3])
    _write(tmp_path / "b", [3, 4, 2, 9], seed=1)
    _write(tmp_path / "c", [9, 10], seed=2)
    a, b, c = (str(tmp_path / n) for n in "abc")
    dest, dups = str(tmp_path / "m"), tmp_path / "dups"
    assert main(["merge", "--dry-run", "--duplicates", str(dups), dest, a, b, c]) == 1
    out, err = capsys.readouterr()
    assert "would be refused: 3 sample id(s) are held by more than one store: 2, 3, 9" in out
    # Per source, the ids an earlier store holds, and the commands that take them out.
    assert [(dups / f).read_text() for f in ("0-a.ids", "1-b.ids", "2-c.ids")] == [
        "",
        "2\n3\n",
        "9\n",
    ]
    assert f"logitcache remove {b} --ids {dups / '1-b.ids'}" in err, err
    assert f"logitcache remove {c} --ids {dups / '2-c.ids'}" in err, err
    assert "logitcache remove " + a not in err, err
    assert not os.path.exists(dest)
    assert main(["merge", "--dry-run", "--json", dest, a, b, c]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["duplicates"] == [2, 3, 9]
    assert [s["duplicates"] for s in report["sources"]] == [[], [2, 3], [9]]
    # Refused for real: the files are written all the same; without --duplicates the hint
    # says how to have them.
    assert main(["merge", dest, a, b, c]) == 2
    err = capsys.readouterr().err
    assert "3 sample ids in all are held twice" in err and "--dry-run --duplicates DIR" in err
    for f in dups.iterdir():
        f.unlink()
    assert main(["merge", "--duplicates", str(dups), dest, a, b, c]) == 2
    err = capsys.readouterr().err
    assert "duplicate sample id" in err and f"--ids {dups / '1-b.ids'}" in err, err
    assert (dups / "1-b.ids").read_text() == "2\n3\n" and not os.path.exists(dest)
    # The commands given: then the merge goes through, every sample kept once.
    for store, file in ((b, "1-b.ids"), (c, "2-c.ids")):
        assert main(["remove", store, "--ids", str(dups / file), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["merge", "--dry-run", "--duplicates", str(dups), dest, a, b, c]) == 0
    out = capsys.readouterr().out
    assert "3 shard(s) would be merged" in out and "would hold 6 samples" in out, out
    assert all(f.read_text() == "" for f in dups.iterdir()) and not os.path.exists(dest)
    assert (
        main(["merge", "--no-progress", "--duplicates", str(tmp_path / "unused"), dest, a, b, c])
        == 0
    )
    assert "now holds 6 samples" in capsys.readouterr().out
    assert not (tmp_path / "unused").exists()  # a merge that goes through writes no list
    assert sorted(lc.open_store(dest).sample_ids().tolist()) == [1, 2, 3, 4, 9, 10]

    # A second dry run over other sources deletes the lists of the first (a stale 2-c.ids
    # would be read for another store); paths that need quoting are quoted.
    _write(tmp_path / "x y", [4, 20], seed=3)
    (dups / "notes.txt").write_text("mine")
    assert main(["merge", "--append", "--dry-run", "--duplicates", str(dups), dest, b]) == 1
    capsys.readouterr()
    assert sorted(f.name for f in dups.iterdir()) == ["0-b.ids", "notes.txt"]
    other = str(tmp_path / "x y")
    assert main(["merge", "--append", "--dry-run", "--duplicates", str(dups), dest, other]) == 1
    err = capsys.readouterr().err
    assert f"logitcache remove '{other}' --ids {dups / '0-x y.ids'}"[:60] in err, err
    assert "--ids '" in err, err
    assert (dups / "0-x y.ids").read_text() == "4\n"


# The core's merge with a progress callback that kills the process at its first call, while
# the first shard is being copied.
KILLED_MERGE = r"""
import os, signal, sys
from logitcache import _core

def die(done, total):
    os.kill(os.getpid(), signal.SIGKILL)

_core.merge(sys.argv[1], sys.argv[2:], append=True, copy=True, progress=die)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_a_killed_merge_leaves_the_last_committed_state(tmp_path: Path, existing: bool) -> None:
    """SIGKILL in the middle of a merge: the destination is as it was (or, new, a directory
    without a manifest), the half-copied file an orphan; merging again completes it."""
    _write(tmp_path / "a", list(range(40)))
    _write(tmp_path / "b", list(range(100, 140)), seed=1)
    dest = tmp_path / "dest"
    if existing:
        _write(dest, [1000, 1001], seed=2)
    before = store_contents(dest) if existing else None
    srcs = [str(tmp_path / "a"), str(tmp_path / "b")]
    proc = subprocess.run([sys.executable, "-c", KILLED_MERGE, str(dest), *srcs], check=False)
    assert proc.returncode == -signal.SIGKILL
    if existing:
        assert store_contents(dest) == before
        report = lc.verify_store(dest)
        assert report["ok"] and len(report["orphans"]) == 1, report
    else:
        assert dest.is_dir() and not (dest / "manifest.json").exists()
        with pytest.raises(lc.StoreExistsError):
            lc.merge_stores(dest, srcs)
    lc.merge_stores(dest, srcs, mode="a", copy=True)
    want = {**store_contents(tmp_path / "a"), **store_contents(tmp_path / "b"), **(before or {})}
    assert store_contents(dest) == want
    assert lc.verify_store(dest)["ok"]
