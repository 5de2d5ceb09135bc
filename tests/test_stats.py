"""`target_stats` / `logitcache stats`: the summary of a store's targets equals a plain
float64 loop over its records, and a capture shifted by one position is flagged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import make_sampled, make_topk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitcache as lc
from logitcache.cli import main


def _reference(store: lc.Store, ids: list[int]) -> dict:
    """The statistics by the definition, one row at a time."""
    positions = 0
    top1 = mass = distinct = 0.0
    hits = {s: [0, 0, 0] for s in (0, 1, 2)}
    for sid in ids:
        r = store[sid]
        for t in range(len(r)):
            positions += 1
            if store.kind == "sampled":
                counts = [int(c) for c in r.counts[t]]
                row = [int(i) for i, c in zip(r.topk_ids[t], counts, strict=True) if c > 0]
                first = int(r.topk_ids[t][counts.index(max(counts))])
                top1 += max(counts) / store.k
                distinct += len(row)
            else:
                lps = [float(v) for v in r.topk_logprobs[t]]
                # Ids at -inf are no targets (fillers of a masked row).
                row = [int(i) for i, v in zip(r.topk_ids[t], lps, strict=True) if v > -math.inf]
                first = int(r.topk_ids[t][0]) if lps[0] > -math.inf else -1
                top1 += math.exp(lps[0])
                mass += sum(math.exp(v) for v in lps)
            for s in (0, 1, 2):
                if t + s < len(r):
                    tok = int(r.input_ids[t + s])
                    hits[s][0] += 1
                    hits[s][1] += first == tok
                    hits[s][2] += tok in row
    return {
        "positions": positions,
        "top1_probability": top1 / positions if positions else None,
        "target_mass": mass / positions if positions and store.kind == "topk" else None,
        "distinct_ids": distinct / positions if positions and store.kind == "sampled" else None,
        "agreement": {
            s: {
                "rows": n,
                "top1": a / n if n else None,
                "in_targets": b / n if n else None,
            }
            for s, (n, a, b) in hits.items()
        },
    }


def _close(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key])
    elif isinstance(a, float):
        assert b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (a, b)
    else:
        assert a == b


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["topk", "sampled"]),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=10),
    max_samples=st.one_of(st.none(), st.integers(1, 12)),
    seed=st.integers(0, 3),
    vocab=st.sampled_from([5, 40]),
)
def test_stats_equal_the_definition(
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
    lengths: list[int],
    max_samples: int | None,
    seed: int,
    vocab: int,
) -> None:
    path = tmp_path_factory.mktemp("stats") / "s"
    rng = np.random.default_rng(len(lengths))
    k = 3
    with lc.StoreWriter(
        path, vocab_size=vocab, k=k, kind=kind, codec=None if kind == "topk" else "abs:0.01"
    ) as w:
        for sid, n in enumerate(lengths):
            if kind == "topk":
                w.add(sid * 7, *make_topk(rng, n, k, vocab))
            else:
                w.add_sampled(sid * 7, *make_sampled(rng, n, k, vocab))
    store = lc.open_store(path)
    got = lc.target_stats(store, max_samples=max_samples, seed=seed, batch_size=3)
    ids = store.sample_ids()
    if max_samples is not None and len(ids) > max_samples:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=max_samples, replace=False))
    assert got["samples"] == len(ids)
    want = _reference(store, [int(i) for i in ids])
    _close(want, {key: got[key] for key in want})


def _aligned(path: Path, shift: int, vocab: int = 100) -> None:
    """Targets whose first id is input_ids[t + 1] in every row (shifted by ``shift``)."""
    rng = np.random.default_rng(0)
    k = 4
    with lc.StoreWriter(path, vocab_size=vocab, k=k) as w:
        for sid in range(20):
            tokens = rng.integers(0, vocab, size=40)
            _, ids, lps = make_topk(rng, 38, k, vocab)
            nxt = tokens[1 + shift : 39 + shift]
            # Put the token to predict first: swap it into rank 0 (or overwrite rank 0).
            for t in range(38):
                hit = np.flatnonzero(ids[t] == nxt[t])
                ids[t, hit[0] if hit.size else 0] = ids[t, 0]
                ids[t, 0] = nxt[t]
            w.add(sid, tokens[:38], ids, lps)


@pytest.mark.parametrize("shift", [-1, 0, 1])
def test_a_shifted_capture_is_flagged(tmp_path: Path, shift: int) -> None:
    _aligned(tmp_path / "s", shift)
    got = lc.target_stats(tmp_path / "s")
    assert got["agreement"][1 + shift]["top1"] == 1.0
    if shift == 0:
        assert got["warning"] is None
    else:
        assert "shifted by one position" in got["warning"]
        assert ("same position" in got["warning"]) == (shift == -1)


def test_a_constant_teacher_is_not_called_shifted(tmp_path: Path) -> None:
    """An untrained teacher predicting its most frequent token everywhere matches every
    shift about equally (here the same token slightly more often): no warning."""
    rng = np.random.default_rng(1)
    with lc.StoreWriter(tmp_path / "s", vocab_size=30, k=2) as w:
        for sid in range(30):
            tokens = np.where(rng.random(50) < 0.3, 0, rng.integers(1, 30, size=50))
            tokens[0] = 0  # counted at shift 0 only: a little more agreement there
            ids = np.tile([0, 1], (50, 1))
            lps = np.tile(np.log([0.6, 0.1]).astype(np.float32), (50, 1))
            w.add(sid, tokens, ids, lps)
    got = lc.target_stats(tmp_path / "s")
    assert got["agreement"][0]["top1"] > got["agreement"][1]["top1"] > 0.2
    assert got["warning"] is None


def test_targets_unrelated_to_the_inputs_are_flagged(tmp_path: Path) -> None:
    """Inputs from another tokenizer (here: token ids scrambled by a permutation) leave the
    targets unrelated to them: flagged, while the same store with its own inputs is not."""
    _aligned(tmp_path / "ok", 0, vocab=2000)
    store = lc.open_store(tmp_path / "ok")
    perm = np.random.default_rng(0).permutation(2000)
    with lc.StoreWriter(tmp_path / "other", vocab_size=2000, k=4) as w:
        for sid in store.sample_ids():
            r = store[int(sid)]
            w.add(int(sid), perm[r.input_ids], r.topk_ids, r.topk_logprobs)
    assert lc.target_stats(tmp_path / "ok")["warning"] is None
    got = lc.target_stats(tmp_path / "other")
    assert got["agreement"][1]["in_targets"] < 0.05
    assert "tokenizer" in got["warning"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _aligned(tmp_path / "ok", 0)
    _aligned(tmp_path / "bad", 1)
    assert main(["stats", str(tmp_path / "ok")]) == 0
    out, err = capsys.readouterr()
    assert "row t vs input_ids[t + 1]  top-1 100.0%" in out and "20 of 20 (all)" in out, out
    assert main(["stats", "--samples", "5", "--seed", "1", str(tmp_path / "bad")]) == 1
    out, err = capsys.readouterr()
    assert "5 of 20 (random, seed 1)" in out and "WARNING" in err, (out, err)
    assert main(["stats", "--json", "--samples", "0", str(tmp_path / "bad")]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 20 and report["agreement"]["2"]["top1"] == 1.0
    assert main(["stats", str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit):
        main(["stats", "--samples", "-5", str(tmp_path / "ok")])
    assert "expected 0 or a positive integer, got '-5'" in capsys.readouterr().err


def test_bad_arguments(tmp_path: Path) -> None:
    _aligned(tmp_path / "s", 0)
    with pytest.raises(ValueError, match="max_samples"):
        lc.target_stats(tmp_path / "s", max_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        lc.target_stats(tmp_path / "s", batch_size=0)


def test_ids_at_minus_inf_are_no_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row with fewer than K finite logits is filled with masked ids at -inf: they are not
    targets, so an input token among them does not count as in the targets (they used to)."""
    logits = np.full((40, 50), -np.inf, dtype=np.float32)
    logits[:, 10] = 0.0  # one finite logit per row: the fillers are ids 0, 1, 2
    inputs = np.arange(40) % 3  # every next token is a filler id
    with lc.StoreWriter(tmp_path / "s", vocab_size=50, k=4, codec="lossless") as w:
        w.add_logits(1, inputs, logits)
    store = lc.open_store(tmp_path / "s")
    assert store[1].topk_ids[0].tolist() == [10, 0, 1, 2]
    st = lc.target_stats(store)
    assert st["agreement"][1]["in_targets"] == 0.0 and st["agreement"][1]["top1"] == 0.0
    _close({k: st[k] for k in ("agreement",)}, {"agreement": _reference(store, [1])["agreement"]})
    with pytest.raises(SystemExit):
        main(["stats", str(tmp_path / "s"), "--seed", "-1"])
    assert "--seed: expected 0 or a positive integer, got '-1'" in capsys.readouterr().err
