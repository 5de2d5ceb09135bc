"""The ``logitcache`` command line: ``logitcache info PATH``, ``verify PATH``, ``repair PATH``,
``stats PATH``, ``show PATH SAMPLE_ID``, ``copy SOURCE PATH``, ``merge PATH SOURCE...``,
``remove PATH ID...``, ``clean PATH``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

import logitcache
from logitcache.errors import (
    CorruptStoreError,
    DuplicateSampleError,
    MissingSampleError,
    StoreError,
    StoreExistsError,
)
from logitcache.store import _read_manifest


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _print_rows(rows: list[tuple[str, str]]) -> None:
    """Label-value lines, values aligned."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _codec_text(codec: dict[str, Any]) -> str:
    name = codec["logprobs"]
    if name == "abs":
        return f"abs (step {codec['step']:g} nat, max abs error {codec['max_abs_error']:g} nat)"
    if name == "kl":
        return f"kl (KL(P || P_decoded) <= {codec['kl_bound']:.3g} nat per position)"
    if name == "lossless":
        return "lossless (float32, bit for bit)"
    if name == "none":
        return "none (ids and counts only)"
    return name


def _info(args: argparse.Namespace) -> int:
    # The manifest is what info shows; a store that does not open (a damaged or missing
    # shard) still has one, shown with the reason it does not open.
    m = _read_manifest(args.path)
    open_error = None
    try:
        logitcache.open_store(args.path).close()
    except (StoreError, OSError) as e:
        open_error = str(e)
    status = 0 if open_error is None else 1
    total = sum(s["bytes"] for s in m["shards"])
    # None (JSON null) for a store of no positions: NaN is not JSON.
    per_token = total / m["num_positions"] if m["num_positions"] else None
    if args.json:
        out = dict(m)
        out["total_bytes"] = total
        out["bytes_per_token"] = per_token
        out["open_error"] = open_error
        print(json.dumps(out, indent=2))
        return status
    what = "top-K" if m["kind"] == "topk" else "sampled"
    kn = "K" if m["kind"] == "topk" else "n (draws)"
    teacher = m.get("teacher") or {}
    tokenizer = m.get("tokenizer") or {}
    rows = [
        ("store", args.path),
        ("format", f"{m['format']} v{m['format_version']}, written by {m['updated_by']}"),
        ("kind", what),
        (kn, str(m["k"])),
        ("vocab size", str(m["vocab_size"])),
        ("temperature", f"{m['temperature']:g}"),
        ("log-probabilities", _codec_text(m["codec"])),
        ("token ids", f"{m['codec']['ids']} (zstd level {m['codec']['zstd_level']})"),
        ("teacher", _identity_text(teacher, "config_fingerprint")),
        ("tokenizer", _identity_text(tokenizer, "vocab_fingerprint")),
        ("samples", f"{m['num_samples']:,}"),
        ("positions", f"{m['num_positions']:,}"),
        ("shards", str(len(m["shards"]))),
        ("bytes", f"{total:,} ({_human_bytes(total)})"),
        ("bytes per token", "n/a (no positions)" if per_token is None else f"{per_token:.2f}"),
    ]
    if m.get("metadata"):
        rows.append(("metadata", json.dumps(m["metadata"])))
    _print_rows(rows)
    if open_error is not None:
        print(f"the store does not open: {open_error}", file=sys.stderr)
        print(
            f"every fault: logitcache verify {args.path}; to keep what can still be read: "
            f"logitcache repair --dry-run {args.path}",
            file=sys.stderr,
        )
    return status


def _verify(args: argparse.Namespace) -> int:
    report = logitcache.verify_store(args.path, progress=None if args.progress else False)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for p in report["problems"]:
            print(f"FAULT: {p}", file=sys.stderr)
        for o in report["orphans"]:
            print(f"orphan (not in the manifest): {o}", file=sys.stderr)
        writer = report["writer"]
        if writer is not None:
            print(
                f"a writer ({writer}) had the store open: this checked the store's last commit"
                + (
                    ", and the orphans may be shards it has not committed yet"
                    if report["orphans"]
                    else ""
                ),
                file=sys.stderr,
            )
        if report["orphans"]:
            # Not "safe to delete": a writer that is still open has shards no manifest names
            # yet, and other files may be the user's. clean waits for no writer: it refuses
            # while one holds the lock, and keeps what logitcache did not write.
            when = (
                "once the writer has closed"
                if writer is not None
                else "never a writer's while it is open"
            )
            print(
                f"to delete those that logitcache wrote ({when}): logitcache clean {args.path}",
                file=sys.stderr,
            )
        counts = (
            f"{report['shards']} shards, {report['samples']:,} samples, "
            f"{report['positions']:,} positions, {_human_bytes(report['bytes'])}"
        )
        if report["ok"]:
            print(f"OK: {counts} ({report['chunks']} chunks) checked")
        elif not report["manifest_ok"]:
            print(f"{len(report['problems'])} FAULT(S)")  # no manifest to count from
        else:
            # Not "checked": a shard that cannot be read is counted as its manifest lists it.
            print(
                f"{len(report['problems'])} FAULT(S) in {counts} (as the manifest lists them; "
                f"{report['chunks']} chunks found)"
            )
        if not report["manifest_ok"]:
            print(
                "to rebuild the manifest from the shard files: logitcache repair "
                f"--rebuild-manifest --dry-run {args.path}",
                file=sys.stderr,
            )
        elif not report["ok"]:
            print(
                f"to keep what can still be read: logitcache repair --dry-run {args.path}",
                file=sys.stderr,
            )
    return 0 if report["ok"] else 1


def _identity_text(identity: dict[str, Any], fingerprint: str) -> str:
    """A teacher's or tokenizer's name and fingerprint, as far as the manifest knows them."""
    known = [str(identity[key]) for key in ("name", fingerprint) if identity.get(key)]
    return " ".join(known) or "unknown"


def _rebuild(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """The manifest part of ``repair --rebuild-manifest``: (exit status so far, report)."""
    teacher: Any = None
    tokenizer: Any = None
    metadata: dict[str, Any] | None = None
    if args.like is not None:
        try:
            # Its manifest is all that is taken: a sibling store damaged in the same incident
            # (a shard lost) serves as well as a sound one.
            like = _read_manifest(args.like)
        except (StoreError, OSError) as e:
            raise ValueError(f"--like {args.like}: {e}") from None
        teacher, tokenizer, metadata = like["teacher"], like["tokenizer"], like["metadata"]
    if args.teacher is not None:
        teacher = args.teacher
    if args.tokenizer is not None:
        tokenizer = args.tokenizer
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except json.JSONDecodeError as e:
            raise ValueError(f"--metadata is not valid JSON: {e}") from None
        if not isinstance(metadata, dict):
            raise ValueError(f"--metadata must be a JSON object, got {args.metadata!r}")
    report = logitcache.rebuild_manifest(
        args.path,
        teacher=teacher,
        tokenizer=tokenizer,
        metadata=metadata,
        dry_run=args.dry_run,
        progress=None if args.progress else False,
    )
    if not args.json:
        print(f"manifest: {report['manifest_problem']}", file=sys.stderr)
        for left in report["left_out"]:
            print(f"left out {left['file']}: {left['problem']}", file=sys.stderr)
        head = "DRY RUN, nothing changed" if args.dry_run else "REBUILT the manifest"
        print(
            f"{head}: {len(report['shards'])} shard(s) "
            f"{'would be ' if args.dry_run else ''}taken ({report['num_samples']:,} samples, "
            f"{report['num_positions']:,} positions; {report['configuration']}), "
            f"{len(report['left_out'])} left out"
        )
        if report["kept_damaged"]:
            print(f"the damaged manifest is kept as {report['kept_damaged']}")
    return (1 if args.dry_run else 0), report


def _repair(args: argparse.Namespace) -> int:
    rebuilt = None
    if args.rebuild_manifest:
        status, rebuilt = _rebuild(args)
        if args.dry_run:
            if args.json:
                print(json.dumps({"rebuild": rebuilt}, indent=2))
            return status
    elif any(getattr(args, o) is not None for o in ("like", "teacher", "tokenizer", "metadata")):
        raise ValueError("--like, --teacher, --tokenizer and --metadata need --rebuild-manifest")
    # The ids file is opened before the repair: once a repair is committed (and, with
    # --remove-damaged, the damaged files gone), a file that cannot be written loses them.
    lost_file = None
    if args.lost_ids is not None:
        created = not os.path.exists(args.lost_ids)
        lost_file = open(args.lost_ids, "a", encoding="utf-8")
    try:
        with _reported_here():
            report = logitcache.repair_store(
                args.path,
                dry_run=args.dry_run,
                remove_damaged=args.remove_damaged,
                progress=None if args.progress else False,
            )
    except BaseException:
        if lost_file is not None:
            lost_file.close()
            if created:
                os.remove(args.lost_ids)
        raise
    lost_ids = report["lost_sample_ids"]
    if lost_file is not None:
        with lost_file:
            lost_file.truncate(0)
            lost_file.writelines(f"{int(i)}\n" for i in lost_ids)
    if args.json:
        out = dict(report)
        out["lost_sample_ids"] = [int(i) for i in lost_ids]
        print(json.dumps(out if rebuilt is None else {"rebuild": rebuilt, "repair": out}, indent=2))
    elif report["sound"]:
        print(f"OK: {report['shards']} shards, nothing to repair")
    else:
        would = "would be " if args.dry_run else ""
        for r in report["repairs"]:
            for p in r["problems"]:
                print(f"FAULT: {p}", file=sys.stderr)
            if r["new_file"] is not None:
                fate = f"its sound chunks copied to {r['new_file']}"
            elif r["chunks_kept"]:
                fate = f"its {r['chunks_kept']} sound chunk(s) {would}copied to a new shard"
            else:
                fate = f"{would}left out whole"
            unknown = " (ids unknown: its footer cannot be read or is not the manifest's)"
            ids = "" if r["lost_ids_known"] else unknown
            print(
                f"{r['file']}: {r['chunks_lost']} chunk(s), {r['samples_lost']:,} sample(s), "
                f"{r['positions_lost']:,} position(s) {would}lost{ids}; {fate}"
            )
        for f in report["removed"]:
            print(f"removed damaged file {f}")
        _report_left_behind(args.path, report["left_behind"], "damaged shard file", "takes space")
        if args.dry_run:
            head = "DRY RUN, nothing changed"
        else:
            head = "REPAIRED"
        print(
            f"{head}: {len(report['repairs'])} of {report['shards']} shards damaged; "
            f"{report['samples_lost']:,} sample(s) ({report['positions_lost']:,} positions) "
            f"{would}lost" + _lost_ids_written(args.lost_ids, len(lost_ids), report["samples_lost"])
        )
        left = {f["file"] for f in report["left_behind"]}
        kept = [
            r["file"]
            for r in report["repairs"]
            if os.path.exists(os.path.join(args.path, r["file"])) and r["file"] not in left
        ]
        if not args.dry_run and kept:
            print(
                f"the damaged shard file(s) are kept: {', '.join(kept)} (verify lists them as "
                "orphans; logitcache clean deletes them)"
            )
    return 1 if (args.dry_run and not report["sound"]) or report["left_behind"] else 0


def _lost_ids_written(path: str | None, known: int, lost: int) -> str:
    """What repair's summary says of --lost-ids FILE: how many ids went there."""
    if path is None:
        return ""
    if known == lost:
        return f"; their ids written to {path}"
    if known == 0:
        return f"; none of their ids is known ({path} is empty)"
    return f"; the {known:,} ids known written to {path}"


def _merge(args: argparse.Namespace) -> int:
    def run(dry_run: bool) -> dict[str, Any]:
        return logitcache.merge_stores(
            args.path,
            args.sources,
            mode="a" if args.append else "x",
            copy=args.copy,
            dry_run=dry_run,
            progress=None if args.progress and not dry_run else False,
        )

    try:
        report = run(args.dry_run)
    except DuplicateSampleError:
        if args.duplicates is not None:
            # The merge stopped at the first id held twice; a dry run lists them all. Should
            # that fail, the refusal is still the error to report.
            with contextlib.suppress(StoreError, OSError):
                args.duplicates_report = run(True)
                args.duplicates_written = _write_duplicates(args.duplicates, args.duplicates_report)
        raise
    dups = report["duplicates"]
    written = []
    if args.dry_run and args.duplicates is not None:
        written = _write_duplicates(args.duplicates, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if dups else 0
    for s in report["sources"]:
        print(
            f"{s['path']}: {s['shards']} shard(s), {s['samples']:,} samples, "
            f"{s['positions']:,} positions, {_human_bytes(s['bytes'])}"
        )
    for key in report["metadata_conflicts"]:
        print(
            f"warning: the stores set metadata key {key!r} to different values; the last "
            "one is kept",
            file=sys.stderr,
        )
    if args.dry_run:
        shards = sum(s["shards"] for s in report["sources"])
        if dups:
            shown = ", ".join(str(i) for i in dups[:10])
            more = f", and {len(dups) - 10:,} more" if len(dups) > 10 else ""
            print(
                f"DRY RUN, nothing changed: the merge would be refused: {len(dups):,} sample "
                f"id(s) are held by more than one store: {shown}{more}"
            )
            _print_duplicates_hint(args, report, written)
            return 1
        print(
            f"DRY RUN, nothing changed: {shards} shard(s) would be merged into {args.path}; "
            f"the store would hold {report['num_samples']:,} samples, "
            f"{report['num_positions']:,} positions"
        )
        return 0
    shards = report["shards_linked"] + report["shards_copied"]
    print(
        f"MERGED into {args.path}: {shards} shard(s) ({report['shards_linked']} linked, "
        f"{report['shards_copied']} copied); the store now holds "
        f"{report['num_samples']:,} samples, {report['num_positions']:,} positions"
    )
    if report["shards_linked"]:
        # A link reads a shard's header, footer and trailer, not its chunks.
        print(
            f"the linked shards' chunks were not read (a damaged one comes along as it is): "
            f"logitcache verify {shlex.quote(args.path)} checks them",
            file=sys.stderr,
        )
    return 0


def _write_duplicates(directory: str, report: dict[str, Any]) -> list[tuple[str, str, int]]:
    """``merge --duplicates DIR``: per source, a file ``DIR/<i>-<name>.ids`` of its sample
    ids that PATH or an earlier source also holds, one per line as ``remove --ids`` reads
    it (empty for a source without any). Files of this form an earlier run left in DIR are
    deleted first, so that none is read for a source it was not written for. Returns
    (source, file, count) of the sources with some."""
    os.makedirs(directory, exist_ok=True)
    for old in os.listdir(directory):
        if _DUPLICATES_FILE.fullmatch(old):
            os.remove(os.path.join(directory, old))
    out = []
    for i, s in enumerate(report["sources"]):
        name = os.path.basename(os.path.abspath(s["path"])) or "store"
        file = os.path.join(directory, f"{i}-{name}.ids")
        with open(file, "w", encoding="utf-8") as f:
            f.writelines(f"{int(x)}\n" for x in s["duplicates"])
        if s["duplicates"]:
            out.append((s["path"], file, len(s["duplicates"])))
    return out


_DUPLICATES_FILE = re.compile(r"[0-9]+-.*\.ids")


def _print_duplicates_hint(
    args: argparse.Namespace, report: dict[str, Any] | None, written: list[tuple[str, str, int]]
) -> None:
    if report is not None:
        listed = {int(x) for s in report["sources"] for x in s["duplicates"]}
        within = [int(x) for x in report["duplicates"] if int(x) not in listed]
        if within:
            print(
                f"{len(within):,} sample id(s) are held twice within one store ("
                + ", ".join(map(str, within[:10]))
                + "): no writer makes such a store; logitcache verify names its shards",
                file=sys.stderr,
            )
    if written:
        print(
            "to keep each sample once, in the first store that holds it, take out of each "
            "source the ids an earlier store also holds, then merge again:",
            file=sys.stderr,
        )
        for source, file, n in written:
            print(
                f"  logitcache remove {shlex.quote(source)} --ids {shlex.quote(file)}"
                f"   # {n:,} id(s)",
                file=sys.stderr,
            )
        return
    if report is None or listed:
        append = " --append" if args.append else ""
        print(
            f"a sample id may be in one store only: `logitcache merge{append} --dry-run "
            "--duplicates DIR PATH SOURCE...` writes, per source, the ids that an earlier "
            "store also holds; take them out of each source and merge again",
            file=sys.stderr,
        )


def _percent(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _stats(args: argparse.Namespace) -> int:
    store = logitcache.open_store(args.path)
    limit = None if args.samples == 0 else args.samples
    st = logitcache.target_stats(store, max_samples=limit, seed=args.seed)
    if args.json:
        print(json.dumps(st, indent=2))
        return 1 if st["warning"] else 0
    subset = "all" if st["samples"] == len(store) else f"random, seed {args.seed}"
    rows = [
        ("store", args.path),
        ("samples read", f"{st['samples']:,} of {len(store):,} ({subset})"),
        ("positions", f"{st['positions']:,}"),
    ]
    if st["top1_probability"] is not None:
        rows.append(("top-1 probability", f"{st['top1_probability']:.3f} (mean)"))
    if st["target_mass"] is not None:
        tail = 1 - st["target_mass"]
        rows.append(("top-K mass", f"{st['target_mass']:.3f} (mean; tail {tail:.3f})"))
    if st["distinct_ids"] is not None:
        rows.append(("distinct ids per row", f"{st['distinct_ids']:.1f} (mean)"))
    names = {1: "input_ids[t + 1]", 0: "input_ids[t]", 2: "input_ids[t + 2]"}
    for s in (1, 0, 2):
        a = st["agreement"][s]
        rows.append(
            (
                f"row t vs {names[s]}",
                f"top-1 {_percent(a['top1'])}, in targets {_percent(a['in_targets'])}"
                + (" (what a row predicts)" if s == 1 else ""),
            )
        )
    _print_rows(rows)
    if st["warning"]:
        print(f"WARNING: {st['warning']}", file=sys.stderr)
        return 1
    return 0


def _position_slice(text: str) -> slice:
    """``A:B`` (either side may be left out, negatives count from the end) or ``A``."""
    try:
        if ":" not in text:
            at = int(text)
            return slice(at, at + 1 if at != -1 else None)
        a, b = text.split(":", 1)
        return slice(int(a) if a else None, int(b) if b else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B, A: , :B or A, got {text!r}") from None


def _int_at_least(minimum: int, wanted: str) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum`` (``wanted`` says so in words)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return n

    return parse


_count = _int_at_least(0, "0 or a positive integer")
_positive_int = _int_at_least(1, "a positive integer")


def _token_namer(
    path: str | None, store: logitcache.Store
) -> tuple[Callable[[int], str], Callable[[int], str | None]]:
    """(id -> what to print for it, id -> its token or None) from a tokenizer; without one,
    the id and None. Warns when the store recorded another tokenizer's vocabulary."""
    if path is None:
        return str, lambda i: None
    if os.path.isdir(path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(
                "--tokenizer DIR needs transformers (pip install 'logitcache[capture]'); "
                "or give a tokenizer.json file"
            ) from None
        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"--tokenizer {path}: no tokenizer could be loaded ({first})"
            ) from None

        def token(i: int) -> str | None:
            try:
                text = hf.convert_ids_to_tokens(i)
            except (IndexError, KeyError, OverflowError, ValueError):
                # Slow (sentencepiece) tokenizers raise for an id outside their vocabulary
                # where fast ones return None.
                return None
            return text if isinstance(text, str) else None

        vocab = hf.get_vocab()
    else:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("--tokenizer FILE needs the tokenizers package") from None
        if not os.path.exists(path):
            raise FileNotFoundError(2, "no such tokenizer file", path)
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers package raises a bare Exception
            raise ValueError(f"--tokenizer {path} is not a tokenizer.json file ({e})") from None

        def token(i: int) -> str | None:
            text = tok.id_to_token(i)
            return text if isinstance(text, str) else None

        vocab = tok.get_vocab()
    recorded = (store.meta.get("tokenizer") or {}).get("vocab_fingerprint")
    given = logitcache.vocab_fingerprint(vocab)
    if recorded is not None and recorded != given:
        print(
            f"warning: --tokenizer {path} is not the store's tokenizer (vocabulary fingerprint "
            f"{given[:19]}..., the store's {recorded[:19]}...): the tokens shown may be wrong",
            file=sys.stderr,
        )

    def name(i: int) -> str:
        text = token(i)
        return str(i) if text is None else repr(text)  # an id the tokenizer lacks: the id

    return name, token


def _show(args: argparse.Namespace) -> int:
    store = logitcache.open_store(args.path)
    rec = store[args.sample_id]
    name, token = _token_namer(args.tokenizer, store)
    tokens = args.tokenizer is not None
    sampled = store.kind == "sampled"
    rows = []
    shown = range(len(rec))[args.positions]
    if len(rec) and not shown:
        sl = args.positions
        raise ValueError(
            f"--positions {'' if sl.start is None else sl.start}:"
            f"{'' if sl.stop is None else sl.stop} selects none of sample {args.sample_id}'s "
            f"{len(rec)} positions"
        )
    for t in shown:
        ids = rec.topk_ids[t]
        lps = None if rec.topk_logprobs is None else rec.topk_logprobs[t]
        counts = None if rec.counts is None else rec.counts[t]
        if counts is not None:
            keep = np.flatnonzero(counts > 0)
            keep = keep[np.argsort(-counts[keep], kind="stable")]
        else:
            keep = np.arange(ids.shape[0])
        targets = []
        for j in keep[: args.top]:
            e: dict[str, Any] = {"id": int(ids[j])}
            if tokens:
                e["token"] = token(int(ids[j]))
            if counts is not None:
                e["count"] = int(counts[j])
            if lps is not None:
                # -inf is no JSON number: null stands for it (probability 0).
                e["logprob"] = float(lps[j]) if np.isfinite(lps[j]) else None
            targets.append(e)
        row: dict[str, Any] = {"t": t, "input_id": int(rec.input_ids[t])}
        if tokens:
            row["input_token"] = token(int(rec.input_ids[t]))
        row["targets"] = targets
        if not sampled and lps is not None:
            row["rest"] = max(0.0, 1.0 - float(np.exp(lps.astype(np.float64)).sum()))
        rows.append(row)
    if args.json:
        print(json.dumps({"sample_id": args.sample_id, "kind": store.kind, "rows": rows}))
        return 0
    what = f"top-K (K = {store.k})" if not sampled else f"sampled (n = {store.k} draws)"
    print(f"sample {args.sample_id}: {len(rec)} positions, {what}")
    for row in rows:
        parts = []
        for e in row["targets"]:
            text = name(e["id"])
            if "count" in e:
                text += f" {e['count']}/{store.k}"
            if "logprob" in e:
                text += f" {0.0 if e['logprob'] is None else math.exp(e['logprob']):.4f}"
            parts.append(text)
        rest = f"  [rest {row['rest']:.4f}]" if "rest" in row else ""
        print(f"{row['t']:>6}  {name(row['input_id'])} -> {' | '.join(parts)}{rest}")
    return 0


def _read_ids(path: str | None) -> np.ndarray | None:
    """Sample ids from a file, one per line (blank lines and ``#`` comments skipped)."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    try:
        return np.array([int(x) for x in lines if x], dtype=np.uint64)
    except (ValueError, OverflowError) as e:
        raise ValueError(f"{path}: expected one sample id (0 to 2^64 - 1) per line ({e})") from None


def _copy(args: argparse.Namespace) -> int:
    n = logitcache.copy_store(
        args.source,
        args.path,
        sample_ids=_read_ids(args.ids),
        exclude_ids=_read_ids(args.exclude_ids),
        codec=args.codec,
        mode="a" if args.append else "x",
        progress=None if args.progress else False,
    )
    store = logitcache.open_store(args.path)
    total = sum(s["bytes"] for s in store.meta["shards"])
    if args.json:
        report = {
            "copied": n,
            "path": args.path,
            "codec": store.meta["codec"],
            "num_samples": len(store),
            "num_positions": store.num_positions,
            "shard_bytes": total,
        }
        print(json.dumps(report, indent=2))
        return 0
    per_token = (
        f"{total / store.num_positions:.1f} bytes per token"
        if store.num_positions
        else "no positions"
    )
    print(
        f"COPIED {n:,} samples into {args.path} ({_codec_text(store.meta['codec'])}); it now "
        f"holds {len(store):,} samples, {per_token}"
    )
    return 0


def _remove(args: argparse.Namespace) -> int:
    ids = list(args.sample_ids)
    from_file = _read_ids(args.ids)
    if from_file is not None:
        ids.extend(int(x) for x in from_file)
    if not ids:
        raise ValueError("no sample id to remove: give IDs or --ids FILE")
    with _reported_here():
        report = logitcache.remove_samples(
            args.path,
            ids,
            missing_ok=args.missing_ok,
            dry_run=args.dry_run,
            progress=None if args.progress else False,
        )
    status = 1 if report["left_behind"] else 0
    if args.json:
        out = dict(report)
        out["missing_ids"] = [int(x) for x in report["missing_ids"]]
        print(json.dumps(out, indent=2))
        return status
    would = "would be " if args.dry_run else ""
    for s in report["shards"]:
        if s["samples_kept"] == 0:
            fate = f"nothing left: {would}dropped"
        elif args.dry_run:
            fate = f"would be rewritten with the {s['samples_kept']:,} other sample(s)"
        else:
            fate = (
                f"rewritten as {s['new_file']} ({s['chunks_copied']} chunk(s) copied, "
                f"{s['chunks_reencoded']} re-encoded, {s['chunks_dropped']} dropped)"
            )
        print(f"{s['file']}: {s['samples_removed']:,} sample(s) {would}removed; {fate}")
    missing = report["missing_ids"]
    if len(missing):
        shown = ", ".join(str(int(x)) for x in missing[:10])
        more = f" and {len(missing) - 10:,} more" if len(missing) > 10 else ""
        print(f"not in the store (ignored): {shown}{more}", file=sys.stderr)
    head = "DRY RUN, nothing changed" if args.dry_run else "REMOVED"
    print(
        f"{head}: {report['samples_removed']:,} sample(s) ({report['positions_removed']:,} "
        f"positions) {would}removed from {len(report['shards'])} shard(s); the store "
        f"{'would hold' if args.dry_run else 'now holds'} {report['num_samples']:,} samples, "
        # A plan knows the new size of the shards it drops, not of those it would rewrite.
        f"{'at most ' if args.dry_run else ''}{_human_bytes(report['bytes_after'])} "
        f"(was {_human_bytes(report['bytes_before'])}"
        f"{'; shards to rewrite counted at their present size' if args.dry_run else ''})"
    )
    _report_left_behind(
        args.path, report["left_behind"], "old shard file", "still holds removed samples"
    )
    return status


@contextlib.contextmanager
def _reported_here() -> Iterator[None]:
    """The Python functions' warning of files left behind, silenced: the command lists them
    itself (_report_left_behind)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="could not delete", category=RuntimeWarning)
        yield


def _report_left_behind(path: str, left: list[dict[str, str]], what: str, why: str) -> None:
    """Files a committed operation could not delete afterwards, and what to do about them."""
    for f in left:
        print(f"could not delete {what} {f['file']}: {f['error']}", file=sys.stderr)
    if left:
        print(
            f"the store no longer refers to {'it' if len(left) == 1 else 'them'}, but "
            f"{'it' if len(left) == 1 else 'each'} {why}: once the cause is fixed, "
            f"logitcache clean {path}",
            file=sys.stderr,
        )


def _clean(args: argparse.Namespace) -> int:
    report = logitcache.clean_store(args.path, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    would = "would delete" if args.dry_run else "deleted"
    for f in report["deleted"]:
        print(f"{would} {f}")
    for f in report["kept"]:
        print(
            f"kept {f} (clean deletes only orphan shard files and temporary manifests: "
            "delete it yourself if unwanted)"
        )
    head = "DRY RUN, nothing changed" if args.dry_run else "CLEANED"
    print(
        f"{head}: {len(report['deleted'])} file(s), {_human_bytes(report['bytes'])}, "
        f"{would} from {args.path}"
    )
    return 0


def _add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (by default one is shown on stderr when it is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitcache",
        description="Compact, checksummed stores of teacher logits for knowledge distillation.",
    )
    parser.add_argument("--version", action="version", version=logitcache.__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "info",
        help="print a store's manifest, counts, size and codec",
        description="Print what the store's manifest says: configuration, counts, size, "
        "codec. Exit status: 0, 1 when the store does not open (a shard missing, or its "
        "header, footer or size damaged: the manifest is printed all the same, and why it "
        "does not open), 2 when there is no readable manifest. Chunks are not read: verify "
        "checks them.",
    )
    p.add_argument("path", help="store directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_info)
    p = sub.add_parser(
        "verify",
        help="check every checksum and decoded value; exit 1 on any fault",
        description="Check the manifest, every shard's whole-file checksum, header, footer and "
        "chunk checksums, decode every chunk and check its values. A writer that has the "
        "store open is named; the check is of the last commit. Exit status: 0 sound, 1 "
        "faults found, 2 the store cannot be read at all, or a writer creating it has not "
        "committed it yet.",
    )
    p.add_argument("path", help="store directory")
    _add_report_options(p)
    p.set_defaults(func=_verify)
    p = sub.add_parser(
        "repair",
        help="drop what cannot be read from a damaged store, keep the rest",
        description="Check the store as verify does, then commit a manifest without the "
        "damage: a shard with damaged chunks is replaced by a new shard of its sound chunks "
        "(copied unchanged), a shard whose header, footer or trailer is damaged (or that is "
        "missing or truncated) is left out. The lost samples are reported. Takes the "
        "store's writer lock; a repair that fails or is killed changes nothing. Exit "
        "status: 0 the store is sound (repaired, or nothing to repair), 1 --dry-run found "
        "damage, or --remove-damaged could not delete a damaged file (the repair is "
        "committed), 2 the store cannot be repaired or is locked by a writer. A damaged or "
        "missing manifest.json stops a repair: --rebuild-manifest writes a new one from the "
        "shard files first (with --dry-run, only that step is planned). With --json the "
        'report is printed as it is, or, with --rebuild-manifest, as {"rebuild": ..., '
        '"repair": ...} (only "rebuild" with --dry-run).',
    )
    p.add_argument("path", help="store directory")
    p.add_argument(
        "--dry-run", action="store_true", help="report what would be done, change nothing"
    )
    p.add_argument(
        "--remove-damaged",
        action="store_true",
        help="delete the damaged shard files once the repair is committed (by default they "
        "stay, unreferenced)",
    )
    p.add_argument(
        "--lost-ids",
        metavar="FILE",
        help="write the ids of the lost samples to FILE, one per line (those a readable "
        "footer names)",
    )
    p.add_argument(
        "--rebuild-manifest",
        action="store_true",
        help="when manifest.json is damaged or missing: first write a new one listing every "
        "shard file that opens cleanly on its own (the damaged one is kept as "
        "manifest.json.damaged; shards of another configuration, or a sample in two shards, "
        "stop it), then repair as usual",
    )
    p.add_argument(
        "--like",
        metavar="STORE",
        help="with --rebuild-manifest: take teacher, tokenizer and metadata from this other "
        "store's manifest (e.g. another rank's store of the same capture)",
    )
    p.add_argument("--teacher", metavar="NAME", help="with --rebuild-manifest: the teacher's name")
    p.add_argument(
        "--tokenizer", metavar="NAME", help="with --rebuild-manifest: the tokenizer's name"
    )
    p.add_argument(
        "--metadata", metavar="JSON", help="with --rebuild-manifest: the metadata, a JSON object"
    )
    _add_report_options(p)
    p.set_defaults(func=_repair)
    p = sub.add_parser(
        "stats",
        help="what the targets look like, and whether they line up with the input tokens",
        description="Read a random subset of samples and print the mean top-1 probability, "
        "the mean top-K mass (top-K stores) or distinct ids per row (sampled stores), and how "
        "often a row's first target id is the next input token, the same one, or the one "
        "after next. Row t holds the teacher's prediction of input_ids[t + 1], so a capture "
        "shifted by one position shows up as better agreement with another token, and "
        "inputs from another tokenizer than the teacher's as targets that rarely hold the "
        "next token. Exit status: 0, 1 the targets look shifted or unrelated to the inputs, "
        "2 the store cannot be read.",
    )
    p.add_argument("path", help="store directory")
    p.add_argument(
        "--samples",
        type=_count,
        default=1000,
        metavar="N",
        help="samples to read, chosen at random (default 1000; 0: all)",
    )
    p.add_argument("--seed", type=_count, default=0, help="seed of the random choice (default 0)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_stats)
    p = sub.add_parser(
        "show",
        help="print one sample's input tokens and targets",
        description="Print, for each position of one sample, its input token and its first "
        "targets: for top-K stores the ids with their probabilities and the rest (the mass "
        "outside the K ids); for sampled stores the ids by count, with probabilities where "
        "the store keeps them. Row t is the teacher's prediction of the token at t + 1. "
        "With --json, a log-probability of -inf (an id of probability 0: a masked "
        "vocabulary's filler, or a value below the codec's range) is null.",
    )
    p.add_argument("path", help="store directory")
    p.add_argument("sample_id", type=int, help="the sample's id")
    p.add_argument(
        "--positions",
        type=_position_slice,
        default=slice(None),
        metavar="A:B",
        help="positions to show: A:B, A:, :B or one position A, negatives counting from the "
        "end (default: all); one that starts with a minus sign takes the = form: "
        "--positions=-3:",
    )
    p.add_argument(
        "--top", type=_positive_int, default=5, metavar="N", help="targets per row (default 5)"
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="print tokens, not ids (with --json: tokens beside the ids): a tokenizer.json "
        "file, or a local transformers tokenizer directory; a warning when its vocabulary is "
        "not the one the store recorded",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_show)
    p = sub.add_parser(
        "copy",
        help="write a store's records into a new store: another codec, or a subset",
        description="Write the records of SOURCE into a store at PATH with the same "
        "configuration, teacher, tokenizer and metadata, and --codec (default: SOURCE's, or "
        "with --append the codec of the store at PATH): to "
        "keep a subset (--ids FILE) or drop some (--exclude-ids FILE; one sample id per "
        "line), or to store them with another codec. With SOURCE's codec, records are copied "
        "as stored (only chunks shared with records left behind are decoded and encoded "
        "again); with another, every record is, and a lossy codec's bound holds against the "
        "values it is given: from a lossy SOURCE, its decoded values. Exit status: 0 copied, "
        "2 refused (PATH exists without --append, an id not in SOURCE, ...).",
    )
    p.add_argument("source", metavar="SOURCE", help="the store to read")
    p.add_argument("path", metavar="PATH", help="the store to write")
    p.add_argument(
        "--codec",
        help="e.g. abs:0.01, kl:1e-3 (top-K), lossless, none (sampled: no log-probabilities) "
        "(default: SOURCE's; with --append, the codec of the store at PATH)",
    )
    subset = p.add_mutually_exclusive_group()
    subset.add_argument("--ids", metavar="FILE", help="copy only these samples")
    subset.add_argument("--exclude-ids", metavar="FILE", help="copy all samples but these")
    p.add_argument(
        "--append", action="store_true", help="add to the store at PATH (same configuration)"
    )
    _add_report_options(p)
    p.set_defaults(func=_copy)
    p = sub.add_parser(
        "merge",
        help="join stores written side by side (one per rank or job) into one store",
        description="Make one store at PATH of the stores SOURCE...: every committed shard "
        "of every source becomes a shard of PATH as it is (nothing decoded), hard-linked "
        "where the file system allows it (no space used; shard files are never modified) "
        "and copied, with its checksum checked, otherwise. The sources must agree on kind, "
        "K, vocabulary, temperature and codec, and on teacher and tokenizer where two of "
        "them name one, and no sample id may be in two of them. The sources are only "
        "read. PATH is committed like a writer's "
        "store: a merge that fails leaves it as it was; one that is killed leaves the last "
        "committed state and orphan files (logitcache clean deletes them; a PATH it created "
        "is then a directory without a manifest, which --append merges into). Exit status: "
        "0 merged "
        "(or, with --dry-run, nothing in the way), 1 --dry-run found sample ids held by more "
        "than one store, 2 refused (PATH exists without --append, stores that differ, a "
        "sample in two stores, a locked PATH, a damaged copy).",
    )
    p.add_argument("path", metavar="PATH", help="the merged store's directory")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="store directories to merge")
    p.add_argument(
        "--append",
        action="store_true",
        help="merge into the store at PATH (by default PATH must not exist)",
    )
    p.add_argument(
        "--copy",
        action="store_true",
        help="copy every shard file, checking it against its checksum, instead of "
        "hard-linking it (the merged store then shares no file with its sources)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the stores and report what the merge would make, listing every sample "
        "id held by more than one store; change nothing",
    )
    p.add_argument(
        "--duplicates",
        metavar="DIR",
        help="with --dry-run, or when the merge is refused for sample ids held twice: write "
        "to DIR, per source, a file <i>-<name>.ids of its ids that PATH or an earlier source "
        "also holds, one per line (what remove --ids and copy --exclude-ids read): with them "
        "taken out of each source, every sample is kept once, in the first store holding it",
    )
    _add_report_options(p)
    p.set_defaults(func=_merge)
    p = sub.add_parser(
        "remove",
        help="take samples out of a store in place",
        description="Remove the samples ID... (and those listed in --ids FILE, one per line) "
        "from the store at PATH. Only the shards that hold them are rewritten: chunks none "
        "of whose records goes keep their stored bytes, chunks with removed and kept "
        "records are decoded and the kept ones encoded again (exact for lossless stores; a "
        "lossy codec's bound then holds against the values decoded before). Committed "
        "atomically under the store's lock; the old shard files are deleted afterwards. "
        "Exit status: 0 removed (or planned, with --dry-run), 1 removed, but an old shard "
        "file, which still holds removed samples, could not be deleted (listed with the "
        "error; logitcache clean PATH deletes it once the cause is fixed), 2 refused (an id "
        "not in the store without --missing-ok, a locked store, a damaged chunk in a shard "
        "to rewrite).",
    )
    p.add_argument("path", metavar="PATH", help="the store's directory")
    p.add_argument("sample_ids", nargs="*", type=int, metavar="ID", help="sample ids to remove")
    p.add_argument("--ids", metavar="FILE", help="remove the sample ids listed in FILE too")
    p.add_argument(
        "--missing-ok",
        action="store_true",
        help="ignore ids the store does not hold (by default one stops the removal)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="report what would be removed, change nothing"
    )
    _add_report_options(p)
    p.set_defaults(func=_remove)
    p = sub.add_parser(
        "clean",
        help="delete the files a store's writers left behind that its manifest does not name",
        description="Delete the orphan files of the store at PATH that logitcache itself "
        "wrote: shard files a writer that died before committing left, damaged shards that "
        "repair gave up, old shards of a removal killed after its commit (a manifest "
        "rebuilt from the shard files would take those back, removed samples and all), and "
        "temporary manifests. Other files the manifest does not name (manifest.json.damaged, "
        "files of your own) are listed and kept. Works under the store's lock, reading the "
        "manifest under it. Exit status: 0 cleaned (or planned, with --dry-run), 2 refused "
        "(a locked store, a manifest that cannot be read: rebuild it first).",
    )
    p.add_argument("path", metavar="PATH", help="the store's directory")
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be deleted, delete nothing"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_clean)
    return parser


def _store_without_manifest(e: Exception) -> str | None:
    """The store whose manifest.json ``e`` says is damaged or missing, if it says so."""
    where = getattr(e, "file", None) or getattr(e, "filename", None)
    if where is None or os.path.basename(str(where)) != "manifest.json":
        return None
    if not isinstance(e, (CorruptStoreError, FileNotFoundError)):
        return None
    store = os.path.dirname(str(where)) or "."
    # A directory without shard files is no store whose manifest was lost (a mistyped path,
    # say): a rebuild would find nothing to take.
    shards = os.path.join(store, "shards")
    try:
        has_shards = any(name.endswith(".lcs") for name in os.listdir(shards))
    except OSError:
        has_shards = False
    return store if has_shards else None


def _damaged_store(e: Exception) -> str | None:
    """The store whose shard ``e`` says is damaged or missing, if it says so."""
    if isinstance(e, CorruptStoreError):
        where = getattr(e, "file", None)
    elif isinstance(e, FileNotFoundError):
        where = e.filename
    else:
        return None
    if where is None or os.path.basename(os.path.dirname(str(where))) != "shards":
        return None
    return os.path.dirname(os.path.dirname(str(where))) or "."


# Commands that commit a new manifest at PATH.
_COMMITTING = frozenset({"copy", "merge", "remove", "repair"})


def _manifest_identity(path: str | None) -> tuple[int, int, int, int] | None:
    """What tells one committed manifest from the next (a commit renames a new file over
    it); None when there is none."""
    if path is None:
        return None
    try:
        st = os.stat(os.path.join(path, "manifest.json"))
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        # Before any command started.
        print("logitcache: interrupted; nothing was changed", file=sys.stderr)
        return 130
    # The manifest a command that commits may replace: a Ctrl-C that comes as it commits
    # can be raised only once the commit is done, and must not be reported as no change.
    dry = getattr(args, "dry_run", False)
    committed_to = args.path if args.command in _COMMITTING and not dry else None
    manifest_before = _manifest_identity(committed_to)
    try:
        status = int(args.func(args))
        # Flushed here, not at exit: a pipe closed by its reader then raises below.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader of our output went away (`logitcache verify --json | head`): nothing
        # left to say, and nothing to say it to. Python would complain again at exit while
        # flushing stdout, so it is pointed at /dev/null first. 128 + SIGPIPE, as a shell
        # reports a command a broken pipe stopped.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if committed_to is not None and _manifest_identity(committed_to) != manifest_before:
            left = (
                "; files it was to delete after its commit may be left: logitcache clean "
                f"{committed_to} deletes them"
                if args.command in ("remove", "repair")
                else ""
            )
            print(
                f"logitcache {args.command}: interrupted too late to stop it: {committed_to} "
                f"was committed (the {args.command} is done; logitcache info {committed_to} "
                f"shows it){left}",
                file=sys.stderr,
            )
        elif args.command == "clean" and not args.dry_run:
            # clean deletes file by file and cannot be stopped; it may have finished.
            print(
                f"logitcache clean: interrupted; files may have been deleted (logitcache "
                f"clean --dry-run {args.path} lists what is left)",
                file=sys.stderr,
            )
        else:
            # The core stopped at its next chunk, keeping nothing it had not committed.
            print(f"logitcache {args.command}: interrupted; nothing was changed", file=sys.stderr)
        return 130
    except (StoreError, OSError, ValueError) as e:
        print(f"logitcache {args.command}: {e}", file=sys.stderr)
        lost = _store_without_manifest(e)
        if lost is not None and not getattr(args, "rebuild_manifest", False):
            print(
                "to rebuild the manifest from the shard files: logitcache repair "
                f"--rebuild-manifest --dry-run {lost}",
                file=sys.stderr,
            )
            return 2
        if isinstance(e, MissingSampleError) and args.command == "remove":
            print("to remove the others and report those: --missing-ok", file=sys.stderr)
        if isinstance(e, DuplicateSampleError) and args.command == "merge":
            _print_duplicates_hint(
                args,
                getattr(args, "duplicates_report", None),
                getattr(args, "duplicates_written", []),
            )
        if isinstance(e, StoreExistsError) and args.command == "copy" and 'mode="a"' in str(e):
            # The message speaks of the Python API's modes: a store there, an empty directory
            # or a killed writer's files, which mode="a" (--append) writes into.
            print(
                f"to write into it: logitcache copy --append {shlex.quote(args.source)} "
                f"{shlex.quote(args.path)}"
                + (
                    "; to replace it, delete it first"
                    if os.path.exists(os.path.join(args.path, "manifest.json"))
                    else ""
                ),
                file=sys.stderr,
            )
        damaged = _damaged_store(e)
        if damaged is not None and args.command not in ("verify", "repair"):
            print(
                f"every fault: logitcache verify {damaged}; to keep what can still be "
                f"read: logitcache repair --dry-run {damaged}",
                file=sys.stderr,
            )
        return 2


if __name__ == "__main__":
    sys.exit(main())
