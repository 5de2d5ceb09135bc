"""`logitcache show`: one sample's rows as the store decodes them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import make_sampled, make_topk

import logitcache as lc
from logitcache.cli import main


@pytest.fixture
def stores(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    with lc.StoreWriter(tmp_path / "topk", vocab_size=50, k=6) as w:
        w.add(7, *make_topk(rng, 9, 6, 50))
    with lc.StoreWriter(tmp_path / "sampled", vocab_size=50, k=8, kind="sampled") as w:
        inp, ids, counts, _ = make_sampled(rng, 4, 8, 50)
        w.add_sampled(3, inp, ids, counts)
    return tmp_path


def test_json_is_the_record(stores: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = lc.open_store(stores / "topk")[7]
    assert (
        main(["show", "--json", "--top", "3", "--positions", "2:-2", str(stores / "topk"), "7"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert [r["t"] for r in out["rows"]] == list(range(2, 7))
    for r in out["rows"]:
        t = r["t"]
        assert r["input_id"] == rec.input_ids[t]
        assert [e["id"] for e in r["targets"]] == rec.topk_ids[t, :3].tolist()
        assert [e["logprob"] for e in r["targets"]] == rec.topk_logprobs[t, :3].tolist()
        rest = 1 - np.exp(rec.topk_logprobs[t].astype(np.float64)).sum()
        assert math.isclose(r["rest"], max(rest, 0.0), abs_tol=1e-12)


def test_text(stores: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = lc.open_store(stores / "topk")[7]
    assert main(["show", "--positions", "-1", str(stores / "topk"), "7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "sample 7: 9 positions, top-K (K = 6)"
    p = math.exp(float(rec.topk_logprobs[8, 0]))
    assert out[1].startswith(f"     8  {rec.input_ids[8]} -> {rec.topk_ids[8, 0]} {p:.4f} | ")
    assert len(out) == 2 and out[1].count("|") == 4


def test_sampled_rows_by_count(stores: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = lc.open_store(stores / "sampled")[3]
    assert main(["show", "--json", "--top", "50", str(stores / "sampled"), "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    for r in out["rows"]:
        counts = [e["count"] for e in r["targets"]]
        assert counts == sorted(counts, reverse=True) and sum(counts) == 8
        t = r["t"]
        live = rec.counts[t] > 0
        assert sorted(e["id"] for e in r["targets"]) == sorted(rec.topk_ids[t][live].tolist())
        assert "rest" not in r and "logprob" not in r["targets"][0]


def test_tokens_from_a_tokenizer_file(
    stores: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenizers import Tokenizer, models

    vocab = {f"tok{i}": i for i in range(50)}
    Tokenizer(models.WordLevel(vocab, unk_token="tok0")).save(str(tmp_path / "tok.json"))
    rec = lc.open_store(stores / "topk")[7]
    argv = ["show", "--positions", "0", "--tokenizer", str(tmp_path / "tok.json")]
    assert main([*argv, str(stores / "topk"), "7"]) == 0
    captured = capsys.readouterr()
    line = captured.out.splitlines()[1]
    assert line.startswith(f"     0  'tok{rec.input_ids[0]}' -> 'tok{rec.topk_ids[0, 0]}' ")
    assert captured.err == ""  # the store recorded no tokenizer to compare with
    # With --json the tokens come beside the ids.
    assert main([*argv, "--json", str(stores / "topk"), "7"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["input_token"] == f"tok{rec.input_ids[0]}"
    shown = [e["id"] for e in row["targets"]]
    assert shown == rec.topk_ids[0, : len(shown)].tolist()
    assert [e["token"] for e in row["targets"]] == [f"tok{i}" for i in shown]

    # A store that recorded its tokenizer: another one gets a warning, and an id it lacks
    # is shown as the id (not None).
    small = {f"tok{i}": i for i in range(10)}
    Tokenizer(models.WordLevel(small, unk_token="tok0")).save(str(tmp_path / "small.json"))
    tokenizer = Tokenizer.from_file(str(tmp_path / "tok.json"))
    with lc.StoreWriter(tmp_path / "recorded", vocab_size=50, k=6, tokenizer=tokenizer) as w:
        w.add(1, np.array([40, 3]), np.array([[45, 1, 2, 3, 4, 5]] * 2), rec.topk_logprobs[:2])
    assert (
        main(["show", str(tmp_path / "recorded"), "1", "--tokenizer", str(tmp_path / "tok.json")])
        == 0
    )
    assert capsys.readouterr().err == ""
    argv = ["show", str(tmp_path / "recorded"), "1", "--tokenizer", str(tmp_path / "small.json")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "is not the store's tokenizer" in captured.err, captured.err
    assert captured.out.splitlines()[1].startswith("     0  40 -> 45 ")
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["input_token"] is None


def test_errors(stores: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(stores / "topk"), "8"]) == 2
    assert "8" in capsys.readouterr().err
    assert main(["show", "--tokenizer", str(stores / "nope.json"), str(stores / "topk"), "7"]) == 2
    assert "nope.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["show", "--positions", "a:b", str(stores / "topk"), "7"])
    assert e.value.code == 2
    assert "expected A:B" in capsys.readouterr().err
    for top in ("0", "-1", "x"):
        with pytest.raises(SystemExit):
            main(["show", "--top", top, str(stores / "topk"), "7"])
        assert "expected a positive integer" in capsys.readouterr().err
    for positions in ("100", "5:3", "9:"):
        assert main(["show", f"--positions={positions}", str(stores / "topk"), "7"]) == 2
        assert "selects none of sample 7's 9 positions" in capsys.readouterr().err
    assert main(["show", "--positions=-2:", "--json", str(stores / "topk"), "7"]) == 0
    assert [r["t"] for r in json.loads(capsys.readouterr().out)["rows"]] == [7, 8]
    (stores / "bad.json").write_text("{")
    assert main(["show", "--tokenizer", str(stores / "bad.json"), str(stores / "topk"), "7"]) == 2
    assert "is not a tokenizer.json file" in capsys.readouterr().err
    # A directory that holds no tokenizer: one line, not transformers' whole explanation.
    assert main(["show", "--tokenizer", str(stores / "topk"), str(stores / "topk"), "7"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer could be loaded" in err and len(err.strip().splitlines()) == 1, err


def test_a_tokenizer_that_raises_for_an_id_it_lacks(
    stores: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Slow (sentencepiece) tokenizers raise IndexError for an id outside their vocabulary,
    where fast ones return None: shown as the id, as for the others (it was a traceback)."""
    import transformers

    class SentencePieceLike:
        def convert_ids_to_tokens(self, i: int) -> str:
            if i >= 10:
                raise IndexError("piece id is out of range.")
            return f"p{i}"

        def get_vocab(self) -> dict[str, int]:
            return {f"p{i}": i for i in range(10)}

    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: SentencePieceLike()
    )
    (tmp_path / "sp").mkdir()
    rec = lc.open_store(stores / "topk")[7]
    argv = ["show", "--json", "--tokenizer", str(tmp_path / "sp"), str(stores / "topk"), "7"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    tokens = [e["token"] for r in rows for e in r["targets"]]
    ids = [e["id"] for r in rows for e in r["targets"]]
    assert tokens == [f"p{i}" if i < 10 else None for i in ids]
    assert any(i >= 10 for i in ids) and any(i < 10 for i in ids), ids
    assert rows[0]["input_id"] == int(rec.input_ids[0])


def test_json_of_ids_at_minus_inf_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-inf (a masked row's fillers) is no JSON number: show --json writes null there (it
    wrote -Infinity, which JSON parsers other than Python's refuse); the text shows 0."""
    logits = np.full((3, 50), -np.inf, dtype=np.float32)
    logits[:, 7] = 1.0
    with lc.StoreWriter(tmp_path / "s", vocab_size=50, k=3, codec="lossless") as w:
        w.add_logits(4, [1, 2, 3], logits)

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in JSON")

    assert main(["show", str(tmp_path / "s"), "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=no_constants)
    assert [e["logprob"] for e in out["rows"][0]["targets"]] == [0.0, None, None]
    assert main(["show", str(tmp_path / "s"), "4"]) == 0
    assert "7 1.0000 | 0 0.0000 | 1 0.0000" in capsys.readouterr().out
