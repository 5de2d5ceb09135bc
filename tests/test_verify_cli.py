"""`verify` catches a flipped byte in any region of a shard or the manifest; the CLI reports
it with a non-zero exit status."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_sampled, make_topk

import logitcache as lc
from logitcache.cli import main


def _small_store(path: Path, kind: str = "topk") -> None:
    rng = np.random.default_rng(5)
    if kind == "topk":
        with lc.StoreWriter(path, vocab_size=300, k=4, chunk_positions=8) as w:
            for sid in range(5):
                w.add(sid, *make_topk(rng, 6, 4, 300))
    else:
        with lc.StoreWriter(path, vocab_size=300, k=6, kind="sampled", chunk_positions=8) as w:
            for sid in range(5):
                inp, ids, counts, _ = make_sampled(rng, 6, 6, 300)
                w.add_sampled(sid, inp, ids, counts)


def _regions(shard: bytes) -> dict[str, range]:
    """Byte ranges of the shard's regions, read from its trailer (FORMAT.md)."""
    footer_off, footer_len = struct.unpack_from("<QQ", shard, len(shard) - 32)
    return {
        "header": range(0, 64),
        "chunks": range(64, footer_off),
        "footer": range(footer_off, footer_off + footer_len),
        "trailer": range(len(shard) - 32, len(shard)),
    }


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_every_flipped_byte_is_reported(tmp_path: Path, kind: str) -> None:
    base = tmp_path / "base"
    _small_store(base, kind)
    shard_rel = json.loads((base / "manifest.json").read_text())["manifest"]["shards"][0]["file"]
    original = (base / shard_rel).read_bytes()
    work = tmp_path / "work"
    shutil.copytree(base, work)
    target = work / shard_rel
    missed = []
    detected = {name: 0 for name in _regions(original)}
    for name, region in _regions(original).items():
        for i in region:
            damaged = bytearray(original)
            damaged[i] ^= 1 << (i % 8)
            target.write_bytes(bytes(damaged))
            if lc.verify_store(work)["ok"]:
                missed.append((name, i))
            else:
                detected[name] += 1
    target.write_bytes(original)
    assert missed == [], missed
    assert all(v > 0 for v in detected.values())
    # The manifest: every byte.
    mpath = work / "manifest.json"
    manifest = mpath.read_bytes()
    for i in range(len(manifest)):
        damaged = bytearray(manifest)
        damaged[i] ^= 1 << (i % 8)
        mpath.write_bytes(bytes(damaged))
        try:
            report = lc.verify_store(work)
        except (lc.StoreError, OSError):
            continue
        assert not report["ok"], f"manifest byte {i} flipped and not reported"
    mpath.write_bytes(manifest)
    assert lc.verify_store(work)["ok"]


def test_truncation_reported(tmp_path: Path) -> None:
    _small_store(tmp_path / "s")
    shard = next((tmp_path / "s" / "shards").iterdir())
    data = shard.read_bytes()
    for cut in (0, 10, 64, len(data) // 2, len(data) - 33, len(data) - 1):
        shard.write_bytes(data[:cut])
        report = lc.verify_store(tmp_path / "s")
        assert not report["ok"] and report["problems"], cut


def test_orphans_reported_not_faults(tmp_path: Path) -> None:
    _small_store(tmp_path / "s")
    (tmp_path / "s" / "shards" / "000099-00000000000000ff.lcs").write_bytes(b"partial")
    report = lc.verify_store(tmp_path / "s")
    assert report["ok"]
    assert report["orphans"] == ["shards/000099-00000000000000ff.lcs"]


def test_verify_names_an_open_writer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """While a writer has the store open, verify checks its last commit and names the writer,
    whose finished shards are orphans until it commits; before its first commit there is
    nothing to verify (StoreLockedError, exit 2), where a store that lost its manifest would
    be reported damaged."""
    store = tmp_path / "s"
    me = f"pid {os.getpid()}"
    rng = np.random.default_rng(6)

    def add_samples(w: lc.StoreWriter, ids: range) -> None:
        for sid in ids:
            w.add(sid, *make_topk(rng, 6, 4, 300))

    w = lc.StoreWriter(store, vocab_size=300, k=4, chunk_positions=8, shard_size=300)
    add_samples(w, range(20))
    assert any((store / "shards").iterdir())
    with pytest.raises(lc.StoreLockedError, match=f"{me}: it has not committed a manifest"):
        lc.verify_store(store)
    assert main(["verify", str(store)]) == 2
    assert "nothing to verify" in capsys.readouterr().err
    w.close()
    assert lc.verify_store(store)["writer"] is None

    w = lc.StoreWriter(store, mode="a", vocab_size=300, k=4, chunk_positions=8, shard_size=300)
    add_samples(w, range(20, 40))
    report = lc.verify_store(store)
    assert report["ok"] and report["orphans"] and report["writer"] == me, report
    assert report["samples"] == 20
    assert main(["verify", str(store)]) == 0
    err = capsys.readouterr().err
    assert f"a writer ({me}) had the store open" in err, err
    assert "the orphans may be shards it has not committed yet" in err, err
    assert f"(once the writer has closed): logitcache clean {store}" in err, err
    w.close()
    report = lc.verify_store(store)
    assert report["writer"] is None and report["orphans"] == [] and report["samples"] == 40
    assert main(["verify", str(store)]) == 0
    assert "had the store open" not in capsys.readouterr().err


def test_cli_info_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _small_store(tmp_path / "s")
    assert main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "top-K" in out and "bytes per token" in out and "max abs error 0.00976562" in out
    assert main(["info", "--json", str(tmp_path / "s")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_samples"] == 5 and info["bytes_per_token"] > 0
    assert main(["verify", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.startswith("OK")
    shard = next((tmp_path / "s" / "shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[70] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["verify", str(tmp_path / "s")]) == 1
    out, err = capsys.readouterr()
    assert "FAULT" in err and shard.name in err and "chunk 0" in err
    # What a damaged store holds is not "checked": the counts are the manifest's.
    assert "FAULT(S) in 1 shards, 5 samples" in out and "as the manifest lists them" in out
    assert "checked" not in out, out
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_cli_info_of_a_store_that_does_not_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """info shows the manifest of a store that no longer opens (a shard's trailer damaged),
    says why it does not open and exits 1; without a manifest it is an error (exit 2)."""
    _small_store(tmp_path / "s")
    assert main(["info", "--json", str(tmp_path / "s")]) == 0
    sound = json.loads(capsys.readouterr().out)
    assert sound["open_error"] is None
    shard = next((tmp_path / "s" / "shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["info", str(tmp_path / "s")]) == 1
    captured = capsys.readouterr()
    assert "samples" in captured.out and "top-K" in captured.out, captured.out
    assert "the store does not open: " in captured.err and shard.name in captured.err
    assert f"logitcache verify {tmp_path / 's'}" in captured.err
    assert main(["info", "--json", str(tmp_path / "s")]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["num_samples"] == 5 and shard.name in info["open_error"]
    (tmp_path / "s" / "manifest.json").unlink()
    assert main(["info", str(tmp_path / "s")]) == 2


def test_cli_info_of_a_store_of_no_positions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bytes per token of a store with no position: JSON null (NaN is no JSON), "n/a"."""
    with lc.StoreWriter(tmp_path / "e", vocab_size=300, k=4) as w:
        w.add(0, *make_topk(np.random.default_rng(0), 0, 4, 300))
    assert main(["info", "--json", str(tmp_path / "e")]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text and json.loads(text)["bytes_per_token"] is None
    assert main(["info", str(tmp_path / "e")]) == 0
    assert "n/a (no positions)" in capsys.readouterr().out


def test_verify_reports_a_missing_manifest_as_a_fault(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store without its manifest is a store with a fault (exit 1, a JSON report), as one
    with a damaged manifest; a path with no store at all is an error (exit 2)."""
    store = tmp_path / "s"
    _small_store(store)
    (store / "manifest.json").unlink()
    report = lc.verify_store(store)
    assert not report["ok"] and not report["manifest_ok"] and report["orphans"] == []
    assert "manifest.json is missing" in report["problems"][0]
    assert main(["verify", "--json", str(store)]) == 1
    assert json.loads(capsys.readouterr().out) == report
    assert main(["verify", str(store)]) == 1
    out, err = capsys.readouterr()
    assert out == "1 FAULT(S)\n", out  # no manifest: nothing to count
    assert "FAULT: " in err and "logitcache repair --rebuild-manifest --dry-run" in err, err
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError):
        lc.verify_store(tmp_path / "plain")
    assert main(["verify", str(tmp_path / "plain")]) == 2


def test_paths_that_are_no_store_say_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command that reads a store says what is wrong with a path that holds none,
    instead of naming a missing manifest.json and offering to rebuild it: no such directory,
    a file, a store a writer is still creating (its lock held, nothing committed), a store of
    a newer format (exit 2 and the upgrade hint, also from verify, which used to call it a
    fault of the store and offer a rebuild that then refused)."""
    from conftest import write_manifest

    (tmp_path / "file").write_bytes(b"")
    newer = tmp_path / "newer"
    _small_store(newer)
    body = json.loads((newer / "manifest.json").read_bytes())["manifest"]
    write_manifest(newer, {**body, "format_version": 2})
    writer = lc.StoreWriter(tmp_path / "new", vocab_size=300, k=4)
    cases = {
        "missing": ("No such file or directory: '{}'", tmp_path / "missing"),
        "file": ("Not a directory: '{}'", tmp_path / "file"),
        "new": ("{} is locked by another writer (lock held by pid", tmp_path / "new"),
        "newer": ("format version 2 is not supported", newer),
    }
    for what, (message, path) in cases.items():
        for command in ("info", "verify", "stats", "show", "repair", "clean", "remove"):
            argv = [command, str(path), *{"show": ["0"], "remove": ["0"]}.get(command, [])]
            assert main(argv) == 2, (what, command)
            err = capsys.readouterr().err
            assert message.format(path) in err, (what, command, err)
            assert "rebuild" not in err, (what, command, err)
    writer.abort()
    with pytest.raises(lc.FormatVersionError):
        lc.verify_store(newer)
    # A directory whose shards/ holds no shard file: nothing a rebuild could take.
    # (A writer killed before its first shard leaves that.) verify says it is no store with
    # a fault, as the others do.
    (tmp_path / "hollow" / "shards").mkdir(parents=True)
    for command in ("info", "verify"):
        assert main([command, str(tmp_path / "hollow")]) == 2
        err = capsys.readouterr().err
        assert "manifest.json" in err and "rebuild" not in err, (command, err)
    assert main(["merge", str(tmp_path / "m"), str(newer.parent / "missing"), ""]) == 2
    assert "a path is empty" in capsys.readouterr().err
    # An empty path is a mistake, not the working directory's store.
    for command in ("info", "verify", "repair", "clean"):
        assert main([command, ""]) == 2
        assert "invalid argument `path`: is empty" in capsys.readouterr().err
    for call in (lc.open_store, lc.verify_store, lc.repair_store, lc.clean_store):
        with pytest.raises(ValueError, match="is empty"):
            call("")


def test_cli_points_to_verify_and_repair_for_a_missing_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "s"
    _small_store(store)
    next((store / "shards").iterdir()).unlink()
    # info still prints the manifest (exit 1); the others cannot do their work (exit 2).
    for argv, status in (
        (["info", str(store)], 1),
        (["show", str(store), "0"], 2),
        (["stats", str(store)], 2),
    ):
        assert main(argv) == status
        err = capsys.readouterr().err
        assert "No such file or directory" in err, err
        assert f"logitcache verify {store}; " in err and f"repair --dry-run {store}" in err, err
    assert main(["copy", str(store), str(tmp_path / "c")]) == 2
    assert f"logitcache verify {store}; " in capsys.readouterr().err


def test_console_entry_points(tmp_path: Path) -> None:
    _small_store(tmp_path / "s")
    for cmd in (
        [sys.executable, "-m", "logitcache"],
        [str(Path(sys.executable).parent / "logitcache")],
    ):
        r = subprocess.run([*cmd, "verify", str(tmp_path / "s")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([*cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "info" in r.stdout and "verify" in r.stdout


def test_a_reader_that_goes_away_is_no_error(tmp_path: Path) -> None:
    """`logitcache verify --json PATH | head -c 0`: the closed pipe ends the command quietly
    (status 141, as a shell reports SIGPIPE), without a traceback or an error message."""
    _small_store(tmp_path / "s")
    cmd = [sys.executable, "-m", "logitcache", "verify", "--json", str(tmp_path / "s")]
    # Block-buffered stdout, as a pipe normally gets (the output is written at the flush).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the interpreter has started: it writes to a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == "", err


def test_verify_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _small_store(tmp_path / "s")
    store_bytes = sum(f.stat().st_size for f in (tmp_path / "s" / "shards").iterdir())
    plain = lc.verify_store(tmp_path / "s")
    assert capsys.readouterr().err == ""
    # A bar of the store's bytes, run to its end, and the same report.
    assert lc.verify_store(tmp_path / "s", progress=True) == plain
    err = capsys.readouterr().err
    assert "verify" in err and "100%" in err, err
    # The core's calls: one total (twice the bytes), counts up to it, the last at it.
    calls: list[tuple[int, int]] = []
    report = lc._core.verify(str(tmp_path / "s"), lambda d, t: calls.append((d, t)))
    assert dict(report) == plain
    assert calls and {t for _, t in calls} == {2 * store_bytes}
    assert calls[-1] == (2 * store_bytes, 2 * store_bytes)
    assert all(0 < d <= t for d, t in calls)
    # Under pytest stderr is not a terminal: the CLI's default shows no bar, and
    # --no-progress none either.
    for args in (["verify"], ["verify", "--no-progress"]):
        assert main([*args, str(tmp_path / "s")]) == 0
        assert "100%" not in capsys.readouterr().err


def test_verify_progress_callback_errors_are_raised(tmp_path: Path) -> None:
    _small_store(tmp_path / "s")

    def fail(done: int, total: int) -> None:
        raise RuntimeError(f"stop at {done} of {total}")

    with pytest.raises(RuntimeError, match="stop at"):
        lc._core.verify(str(tmp_path / "s"), fail)


def test_ctrl_c_before_any_command_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import logitcache.cli as cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["info", "x"]) == 130
    assert "interrupted; nothing was changed" in capsys.readouterr().err
