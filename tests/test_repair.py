"""`repair_store` / `logitcache repair`: after damage anywhere in a shard, the repaired store
opens and verifies, every surviving sample reads back exactly as before, and exactly the
samples reported lost are gone."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import make_undeletable, progress_into_core, store_contents, store_files, write_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitcache as lc
from logitcache.cli import main

N_SAMPLES = 18


def _store(path: Path, kind: str) -> None:
    """A store of several shards of several chunks each."""
    write_store(
        path,
        range(0, N_SAMPLES * 10, 10),
        lambda sid: 3 + sid // 10 % 7,
        kind=kind,
        k=4 if kind == "topk" else 6,
        seed=7,
        chunk_positions=12,
        shard_size=900,
    )


def _shards(path: Path) -> list[str]:
    return [
        s["file"] for s in json.loads((path / "manifest.json").read_text())["manifest"]["shards"]
    ]


@pytest.fixture(scope="module", params=["topk", "sampled"])
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(request.param) / "s"
    _store(path, request.param)
    assert len(_shards(path)) >= 3
    return path, store_contents(path)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_repair_after_a_flipped_byte_anywhere(
    base: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    src, original = base
    work = tmp_path_factory.mktemp("work") / "s"
    shutil.copytree(src, work)
    shards = _shards(work)
    victim = work / data.draw(st.sampled_from(shards), label="shard")
    raw = bytearray(victim.read_bytes())
    footer_off, footer_len = struct.unpack_from("<QQ", raw, len(raw) - 32)
    region = data.draw(
        st.sampled_from(
            [
                (0, 64),
                (64, footer_off),
                (footer_off, footer_off + footer_len),
                (len(raw) - 32, len(raw)),
            ]
        ),
        label="region",
    )
    at = data.draw(st.integers(region[0], region[1] - 1), label="byte")
    raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    victim.write_bytes(bytes(raw))
    assert not lc.verify_store(work)["ok"]

    plan = lc.repair_store(work, dry_run=True)
    assert victim.read_bytes() == bytes(raw) and _shards(work) == shards
    report = lc.repair_store(work)
    assert report["committed"] and not report["sound"]
    assert [r["file"] for r in report["repairs"]] == [str(victim.relative_to(work))]
    for key in ("lost_sample_ids", "samples_lost", "positions_lost"):
        assert np.array_equal(report[key], plan[key]), key
    assert lc.verify_store(work)["ok"]
    store = lc.open_store(work)
    got = store_contents(work)
    # Survivors read back bit for bit; exactly the reported samples are gone.
    for sid, arrays in got.items():
        assert arrays == original[sid], sid
    lost = set(original) - set(got)
    assert len(lost) == report["samples_lost"] == len(original) - len(store)
    assert (
        store.meta["num_positions"]
        == sum(v[0][1][0] for v in original.values()) - report["positions_lost"]
    )
    (repair,) = report["repairs"]
    if repair["lost_ids_known"]:
        assert set(report["lost_sample_ids"].tolist()) == lost
    else:
        assert len(report["lost_sample_ids"]) == 0 and repair["new_file"] is None
    assert report["lost_sample_ids"].dtype == np.uint64
    shutil.rmtree(work)


def test_repair_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s"
    _store(path, "topk")
    original = store_contents(path)
    assert main(["repair", str(path)]) == 0
    assert "nothing to repair" in capsys.readouterr().out
    victim_rel = _shards(path)[1]
    victim = path / victim_rel
    raw = bytearray(victim.read_bytes())
    raw[70] ^= 4  # inside chunk 0
    victim.write_bytes(bytes(raw))

    assert main(["repair", "--dry-run", str(path)]) == 1
    cap = capsys.readouterr()
    assert "DRY RUN" in cap.out and victim_rel in cap.out and "would be lost" in cap.out
    assert "FAULT" in cap.err and "chunk 0" in cap.err
    assert _shards(path)[1] == victim_rel

    assert main(["verify", str(path)]) == 1
    assert "logitcache repair --dry-run" in capsys.readouterr().err
    # info cannot open it (a damaged chunk is found only when read: damage the footer of
    # another shard): it prints the manifest, exits 1 and points to verify and repair.
    other = path / _shards(path)[0]
    sound = other.read_bytes()
    data = bytearray(sound)
    data[-40] ^= 1
    other.write_bytes(bytes(data))
    assert main(["info", str(path)]) == 1
    captured = capsys.readouterr()
    assert "samples" in captured.out
    assert "logitcache verify" in captured.err and "logitcache repair --dry-run" in captured.err
    other.write_bytes(sound)

    # An ids file that cannot be written stops the repair before it changes anything.
    files = store_files(path)
    nowhere = tmp_path / "no" / "such" / "lost.txt"
    assert main(["repair", "--lost-ids", str(nowhere), "--remove-damaged", str(path)]) == 2
    assert "No such file or directory" in capsys.readouterr().err
    assert store_files(path) == files
    # One given (and not there before) is not left behind by a repair that fails.
    lost_file = tmp_path / "lost.txt"
    with lc.StoreWriter(path, vocab_size=300, k=4, mode="a"):
        assert main(["repair", "--lost-ids", str(lost_file), str(path)]) == 2
    assert "locked" in capsys.readouterr().err and not lost_file.exists()
    lost_file.write_text("stale\n" * 100)
    assert main(["repair", "--lost-ids", str(lost_file), str(path)]) == 0
    out = capsys.readouterr().out
    assert "REPAIRED" in out and f"the damaged shard file(s) are kept: {victim_rel}" in out
    lost = {int(line) for line in lost_file.read_text().split()}
    assert lost and lost == set(original) - set(store_contents(path))
    assert victim_rel not in _shards(path)

    assert main(["verify", str(path)]) == 0
    assert victim_rel in capsys.readouterr().err  # an orphan now
    assert main(["repair", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sound"] and report["lost_sample_ids"] == []

    assert main(["repair", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_repair_refuses_while_a_writer_holds_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s"
    _store(path, "topk")
    victim = path / _shards(path)[0]
    with lc.StoreWriter(path, vocab_size=300, k=4, mode="a"):
        victim.write_bytes(victim.read_bytes()[:-1])  # truncated: the whole shard is lost
        with pytest.raises(lc.StoreLockedError):
            lc.repair_store(path)
        assert main(["repair", str(path)]) == 2
        assert "lock" in capsys.readouterr().err
        assert lc.repair_store(path, dry_run=True)["samples_lost"] > 0
    report = lc.repair_store(path, remove_damaged=True)
    assert report["removed"] == [str(victim.relative_to(path))] and not victim.exists()
    repair = report["repairs"][0]
    assert not repair["lost_ids_known"] and repair["chunks_kept"] == 0
    assert lc.verify_store(path)["orphans"] == []


def test_a_damaged_manifest_is_not_repaired(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _store(path, "topk")
    m = path / "manifest.json"
    damaged = m.read_text().replace('"num_samples"', '"num_sampler"', 1)
    m.write_text(damaged)
    files = sorted(p.name for p in (path / "shards").iterdir())
    with pytest.raises(lc.CorruptStoreError):
        lc.repair_store(path)
    assert m.read_text() == damaged
    assert sorted(p.name for p in (path / "shards").iterdir()) == files


def test_repair_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s"
    _store(path, "topk")
    assert lc.repair_store(path, progress=True)["sound"]
    err = capsys.readouterr().err
    assert "repair" in err and "100%" in err, err
    calls: list[tuple[int, int]] = []
    lc._core.repair(str(path), dry_run=True, progress=lambda d, t: calls.append((d, t)))
    store_bytes = sum(f.stat().st_size for f in (path / "shards").iterdir())
    assert calls[-1] == (2 * store_bytes, 2 * store_bytes)

    def fail(done: int, total: int) -> None:
        raise RuntimeError(f"stop at {done} of {total}")

    with pytest.raises(RuntimeError, match="stop at"):
        lc._core.repair(str(path), progress=fail)


def test_repair_says_kept_only_of_files_it_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s"
    _store(path, "topk")
    (path / _shards(path)[0]).unlink()  # a missing shard: no file to keep
    assert main(["repair", str(path)]) == 0
    out = capsys.readouterr().out
    assert "REPAIRED" in out and "kept" not in out, out
    victim = path / _shards(path)[0]
    victim.write_bytes(victim.read_bytes()[:-1])
    assert main(["repair", "--remove-damaged", str(path)]) == 0
    out = capsys.readouterr().out
    assert "removed damaged file" in out and "kept" not in out, out


def test_damaged_files_that_cannot_be_deleted_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--remove-damaged that cannot delete a damaged file after its commit reports the file
    and the error with the rest of the report (the lost ids), where it used to raise and lose
    the report of a repair that was done; the CLI exits 1 and points to clean."""
    path = tmp_path / "s"
    _store(path, "topk")
    name = _shards(path)[1]
    victim = path / name
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))

    def block_deletion(done: int, total: int) -> None:
        # At the end of the check, which has opened (mapped) what it keeps of the shard.
        if done == total and victim.is_file():
            make_undeletable(victim)

    progress_into_core(monkeypatch, "repair", block_deletion)
    lost_file = tmp_path / "lost.txt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command says it itself, not as a warning too
        assert main(["repair", "--remove-damaged", "--lost-ids", str(lost_file), str(path)]) == 1
    captured = capsys.readouterr()
    assert "REPAIRED: 1 of" in captured.out and "removed damaged file" not in captured.out
    assert "kept" not in captured.out, captured.out
    assert f"could not delete damaged shard file {name}: " in captured.err, captured.err
    assert "Is a directory" in captured.err and f"logitcache clean {path}" in captured.err
    lost = [int(x) for x in lost_file.read_text().split()]
    assert lost and lc.verify_store(path)["ok"]
    assert not any(sid in store_contents(path) for sid in lost)
    # The Python function says it with a warning too, for a caller that does not read the
    # report.
    data = bytearray((path / _shards(path)[0]).read_bytes())
    data[len(data) // 2] ^= 0x10
    victim = path / _shards(path)[0]  # block_deletion reads `victim` when called
    victim.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match=r"could not delete 1 damaged shard file\(s\) \("):
        report = lc.repair_store(path, remove_damaged=True)
    assert report["left_behind"][0]["file"] == victim.relative_to(path).as_posix()


def _footer_ids(shard: Path) -> list[int]:
    """The sample ids a shard's footer lists (FORMAT.md 3.2, 3.3)."""
    data = shard.read_bytes()
    footer_offset, _ = struct.unpack_from("<QQ", data, len(data) - 32)
    num_chunks, num_records, _ = struct.unpack_from("<QQQ", data, footer_offset)
    at = footer_offset + 24 + 32 * num_chunks
    return [struct.unpack_from("<Q", data, at + 12 * r)[0] for r in range(num_records)]


def test_a_shard_with_a_damaged_header_still_reports_its_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged header leaves the shard out whole, but its footer is sound: the lost samples
    are reported by id (they used to be "ids unknown", and --lost-ids wrote an empty file)."""
    path = tmp_path / "s"
    _store(path, "sampled")
    victim = path / _shards(path)[1]
    want = _footer_ids(victim)
    assert want
    data = bytearray(victim.read_bytes())
    data[5] ^= 0xFF  # the magic
    victim.write_bytes(bytes(data))
    lost_file = tmp_path / "lost.txt"
    assert main(["repair", "--dry-run", "--lost-ids", str(lost_file), str(path)]) == 1
    out = capsys.readouterr().out
    assert "ids unknown" not in out and f"their ids written to {lost_file}" in out, out
    assert [int(x) for x in lost_file.read_text().split()] == sorted(want)
    # With the trailer damaged too, nothing says which samples the shard held; nor does the
    # sound footer of another shard's file put in its place.
    for replacement in (
        bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]),
        (path / _shards(path)[2]).read_bytes(),
    ):
        victim.write_bytes(replacement)
        assert main(["repair", "--dry-run", "--lost-ids", str(lost_file), str(path)]) == 1
        out = capsys.readouterr().out
        assert "ids unknown: its footer cannot be read or is not the manifest's" in out, out
        assert f"none of their ids is known ({lost_file} is empty)" in out
        assert lost_file.read_text() == ""
