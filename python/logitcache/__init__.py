"""logitcache: offline knowledge distillation stores and losses for language models.

Write a store of teacher targets with :class:`StoreWriter`, read it with :func:`open_store`,
check it with :func:`verify_store`, mend a damaged one with :func:`repair_store` (and
:func:`rebuild_manifest` when its manifest is lost), join stores written side by side with
:func:`merge_stores`, re-encode or subset one with :func:`copy_store`, take samples out of
one in place with :func:`remove_samples`, and check that a capture's targets line up with
its inputs with :func:`target_stats`; fit a student with :class:`KDLoss` and the functions
of :mod:`logitcache.losses` (imported on first use: the store works without torch).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from logitcache import _core
from logitcache._core import __version__, get_num_threads, set_num_threads
from logitcache.errors import (
    CorruptStoreError,
    DuplicateSampleError,
    FormatVersionError,
    InvalidRecordError,
    MissingSampleError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreMismatchError,
)
from logitcache.stats import target_stats
from logitcache.store import (
    Batch,
    PackedBatch,
    Record,
    Store,
    StoreWriter,
    _warn_files_left,
    _with_progress_bar,
    config_fingerprint,
    copy_store,
    open_store,
    vocab_fingerprint,
)

if TYPE_CHECKING:
    import numpy.typing as npt

    from logitcache.losses import (
        KDLoss,
        kd_loss,
        sampled_kd_loss,
        sparse_kd_loss,
        token_metrics,
    )

_LOSS_NAMES = ("KDLoss", "kd_loss", "sampled_kd_loss", "sparse_kd_loss", "token_metrics")


def __getattr__(name: str) -> Any:
    # The losses need torch; the store does not. Import them on first use.
    if name in _LOSS_NAMES or name == "losses":
        # (Not `from logitcache import losses`: that looks the name up here first.)
        losses = importlib.import_module("logitcache.losses")
        return losses if name == "losses" else getattr(losses, name)
    raise AttributeError(f"module 'logitcache' has no attribute {name!r}")


def verify_store(path: str | os.PathLike[str], *, progress: bool | None = False) -> dict[str, Any]:
    """Check every checksum (manifest, shard files, headers, footers, chunks) and every
    decoded value of a store. Returns a report: ``ok`` (no fault in committed data),
    ``problems`` (each names file, shard, chunk and what is wrong), ``orphans`` (files no
    manifest refers to, e.g. left by a writer that was killed, or shards of a writer still
    open that it has not committed yet: :func:`clean_store` deletes those that logitcache
    wrote, never while a writer is open), ``writer`` (who held the store's lock as the check
    finished, or else as it started, e.g. ``"pid 1234"``, or None),
    ``manifest_ok`` (False when the manifest cannot be read, being damaged or missing from a
    directory whose ``shards/`` holds shard files: then nothing else is checked and no file
    is called an orphan; see :func:`rebuild_manifest`), and counts: ``shards``,
    ``samples``, ``positions`` and ``bytes`` as the manifest lists them, ``chunks`` as the
    shard footers that could be read list them. A path with no store raises
    :class:`FileNotFoundError` (:class:`NotADirectoryError` for a file); a store whose
    writer has not committed it yet (no manifest, the lock held) raises
    :class:`StoreLockedError`, and one of a newer format version
    :class:`FormatVersionError` (upgrade logitcache).

    ``progress=True`` shows a progress bar (tqdm, on stderr) of the store's bytes checked;
    ``None`` shows it only when stderr is a terminal. Each byte is read twice (the
    whole-file checksum, then the chunks' decoding), and the bar counts both halves."""
    return _with_progress_bar(
        "verify", progress, lambda cb: dict(_core.verify(os.fsdecode(path), cb))
    )


def repair_store(
    path: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    remove_damaged: bool = False,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Make a damaged store readable again by giving up what cannot be read.

    The store is checked as :func:`verify_store` checks it. A shard whose footer is sound
    but some of whose chunks are not is replaced by a new shard holding its sound chunks
    (their bytes copied unchanged); a shard that cannot be located at all (missing,
    truncated, damaged header, trailer or footer) is left out. The new manifest is
    committed atomically after the new shards are written, under the store's writer lock
    (:class:`StoreLockedError` while a writer is open): a repair that fails or is killed
    leaves the store as it was. A damaged ``manifest.json`` raises
    :class:`CorruptStoreError` (a missing one :class:`FileNotFoundError`): rebuild it from
    the shard files with :func:`rebuild_manifest` first. A sample id stored twice raises
    :class:`CorruptStoreError` too. A shard that cannot be checked for a reason that says
    nothing about its bytes (e.g. permission denied) stops the repair with
    :class:`StoreError`, nothing changed.

    ``dry_run=True`` checks and reports what a repair would do, changing nothing (and
    taking no lock). The damaged shard files stay on disk, unreferenced (``verify`` lists
    them as orphans), unless ``remove_damaged=True``. ``progress`` as for
    :func:`verify_store`.

    Returns a report: ``sound`` (nothing to repair), ``committed`` (a repaired manifest was
    written), ``repairs`` (per damaged shard: ``file``, ``problems``, ``new_file``,
    ``chunks_kept``, ``chunks_lost``, ``samples_lost``, ``positions_lost``,
    ``lost_ids_known``), ``lost_sample_ids`` (numpy uint64, sorted: the lost samples whose
    ids a footer names, that of a shard left out whole included when its trailer and footer
    check out, e.g. under a damaged header; a shard whose footer cannot be read loses
    samples whose ids are unknown), ``samples_lost``, ``positions_lost`` (all of them),
    ``shards``, ``removed`` (the damaged files deleted) and ``left_behind`` (damaged files
    that could not be deleted after the commit: ``[{"file": ..., "error": ...}]``, also said
    by a RuntimeWarning; the repair stands, and :func:`clean_store` deletes them once the
    cause is fixed)."""
    report = _with_progress_bar(
        "repair",
        progress,
        lambda cb: dict(
            _core.repair(
                os.fsdecode(path), dry_run=dry_run, remove_damaged=remove_damaged, progress=cb
            )
        ),
    )
    _warn_files_left(path, report["left_behind"], "damaged shard file", stacklevel=2)
    return report


def rebuild_manifest(
    path: str | os.PathLike[str],
    *,
    teacher: Any = None,
    tokenizer: Any = None,
    metadata: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Make a store whose ``manifest.json`` is damaged or missing readable again, from its
    shard files.

    A shard's header holds the store's configuration and its footer the samples, so the
    new manifest lists every shard file in ``shards/`` that opens cleanly on its own,
    with its counts and a freshly computed whole-file checksum. That includes a shard that a
    writer finished but did not commit before it died (its samples are complete). A shard
    that does not open (a killed writer's unfinished file, a damaged header, trailer or
    footer, a name that does not match its header) is left out and reported. What only the
    old manifest knew is taken from the arguments: ``teacher`` and ``tokenizer`` as for
    :class:`StoreWriter` (a name, a dict with ``name`` and the fingerprint, or the
    ``transformers`` object; e.g. another store's ``meta["teacher"]``) and ``metadata``;
    left out, they are unknown (``None``, ``{}``).

    Nothing is guessed where the files disagree: shards of different configurations raise
    :class:`StoreError` and a sample id in two shards raises :class:`DuplicateSampleError`,
    naming the files, with nothing changed: move away the ones that do not belong (a shard
    left behind by a store that replaced this one, a damaged shard that :func:`repair_store`
    already replaced) and call it again. A sound manifest is refused (:class:`StoreError`),
    and so is a manifest of a newer format version (:class:`FormatVersionError`).

    The damaged manifest is kept as ``manifest.json.damaged``; the new one is committed
    atomically under the writer lock. Chunks are not checked: call :func:`repair_store`
    next to give up damaged ones. ``dry_run=True`` reports the plan and changes nothing.
    ``progress`` as for :func:`verify_store` (each shard file is read once).

    Returns a report: ``manifest_problem`` (why the old manifest could not be read),
    ``configuration`` (in words), ``shards`` (per shard taken: ``file``, ``num_samples``,
    ``num_positions``, ``num_chunks``, ``bytes``), ``left_out`` (``file``, ``problem``),
    ``num_samples``, ``num_positions``, ``committed`` and ``kept_damaged``."""
    from logitcache.store import _metadata_json, _teacher_info, _tokenizer_info

    teacher_name, teacher_fp = _teacher_info(teacher)
    tok_name, tok_fp = _tokenizer_info(tokenizer)
    metadata_json = _metadata_json(metadata)
    return _with_progress_bar(
        "rebuild",
        progress,
        lambda cb: dict(
            _core.rebuild_manifest(
                os.fsdecode(path),
                dry_run=dry_run,
                teacher_name=teacher_name,
                teacher_fingerprint=teacher_fp,
                tokenizer_name=tok_name,
                tokenizer_fingerprint=tok_fp,
                metadata_json=metadata_json,
                progress=cb,
            )
        ),
        reads_per_byte=1,
    )


def merge_stores(
    path: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    *,
    mode: str = "x",
    copy: bool = False,
    dry_run: bool = False,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Merge stores written side by side (one per rank or job of a capture) into one store
    at ``path``, without decoding anything.

    Every committed shard of every source becomes a shard of the merged store as it is:
    hard-linked into ``path`` where the file system allows it (no bytes copied, no space
    used: shard files are never modified, so stores may share them), copied otherwise or
    when ``copy=True``. A copy is checked against the shard's size and CRC-32 in its
    manifest; a linked file is not read (run :func:`verify_store` on the result to check
    every byte). The sources are only read, and stay valid stores.

    ``mode="x"`` (default) creates ``path`` and refuses an existing one
    (:class:`StoreExistsError`); ``mode="a"`` merges into the store at ``path`` (created if
    missing). The merged store is committed like any writer's, under its lock
    (:class:`StoreLockedError` while a writer is open): a merge that fails leaves ``path`` as
    it was (one it created is removed again); one that is killed leaves the last committed
    state and orphan files, as a killed writer does (a ``path`` it created is then a
    directory without a manifest, which ``mode="a"`` merges into).

    The sources (and the store at ``path``, with ``mode="a"``) must agree on kind, K,
    vocabulary size, temperature and codec, and on teacher and tokenizer where two of them
    name one (:class:`StoreMismatchError`, naming the field and the store); no sample id may
    be in two of them (:class:`DuplicateSampleError`, naming both stores of the first one
    and counting the others; a dry run lists them all). The merged manifest
    takes the teacher and tokenizer fields any of them sets, and the union of their
    metadata; where two set a key to different values the later one wins (in the order
    ``path``, then ``sources``) and the key is listed in the report.

    ``dry_run=True`` checks all that and writes nothing: the report says what the merge
    would make, ``duplicates`` lists every sample id held by more than one store (or twice
    by one) instead of the merge refusing the first, and each source's ``duplicates`` its
    ids that ``path`` or an earlier source also holds: take those out of each source
    (:func:`remove_samples`, or :func:`copy_store` with ``exclude_ids``) and every sample
    is kept once, in the first store that holds it. A dry run does not take the
    destination's lock.

    ``progress=True`` shows a progress bar (tqdm, on stderr) of the shard bytes placed;
    ``None`` shows it only when stderr is a terminal.

    Returns a report: ``sources`` (per source: ``path``, ``shards``, ``samples``,
    ``positions``, ``bytes``, ``duplicates``), ``shards_linked``, ``shards_copied``,
    ``num_samples`` and ``num_positions`` (of the merged store; with ``dry_run``, what it
    would hold, each sample held twice counted once), ``metadata_conflicts`` and
    ``duplicates`` (sorted; the lists are empty but in a dry run)."""
    if mode not in ("x", "a"):
        raise ValueError(
            f'invalid argument `mode`: {mode!r}; expected "x" (create) or "a" (merge '
            "into the store at path)"
        )
    if isinstance(sources, (str, bytes, os.PathLike)):
        raise TypeError("sources must be a sequence of store paths, not one path")
    srcs = [os.fsdecode(s) for s in sources]
    report = _with_progress_bar(
        "merge",
        progress,
        lambda cb: dict(
            _core.merge(
                os.fsdecode(path),
                srcs,
                append=mode == "a",
                copy=copy,
                dry_run=dry_run,
                progress=cb,
            )
        ),
        reads_per_byte=1,
    )
    for s in report["sources"]:
        s["path"] = os.fspath(s["path"])  # as given, a str: the report is plain JSON data
    return report


def remove_samples(
    path: str | os.PathLike[str],
    sample_ids: Iterable[int] | npt.ArrayLike,
    *,
    missing_ok: bool = False,
    dry_run: bool = False,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Remove samples from the store at ``path`` in place (documents found to be
    duplicates, test-set contamination, data that must be deleted).

    Only the shards that hold them are rewritten, each as a new shard in the old one's
    place: a chunk none of whose records goes keeps its stored bytes (its values stay bit
    for bit what they were, whatever the codec), a chunk all of whose records go is left
    out, and a chunk that holds both is decoded and its other records encoded again with
    the store's codec (exact for ``"lossless"``; for a lossy codec its bound then holds
    against the values decoded before). What is left reads back in the same order.

    The removal is a writer: it holds the store's lock (:class:`StoreLockedError` while a
    writer is open), writes the new shards, then commits the manifest atomically; one that
    fails or is killed leaves the store as it was (a failed fsync of the directory after the
    new manifest is in place is reported, and keeps the old shard files too: see
    docs/reliability.md). The old shard files are deleted once the
    new manifest is committed (a file that :func:`merge_stores` linked into another store
    stays there). A damaged chunk in a shard to rewrite stops it (:class:`CorruptStoreError`;
    run :func:`repair_store` first).

    An id the store does not hold raises :class:`MissingSampleError` (the smallest such id)
    with nothing changed, unless ``missing_ok=True``, which reports them. ``dry_run=True``
    reports what would be removed and changes nothing. ``progress`` as for
    :func:`merge_stores` (the bytes of the shards that held samples to remove).

    Returns a report: ``shards`` (per shard that held some: ``file``, ``new_file`` (None
    when nothing of it is left), ``samples_removed``, ``positions_removed``, ``samples_kept``,
    ``chunks_copied``, ``chunks_reencoded``, ``chunks_dropped``), ``samples_removed``,
    ``positions_removed``, ``missing_ids`` (uint64), ``num_samples`` and ``num_positions``
    (left), ``bytes_before``, ``bytes_after`` (in a dry run, the shards to rewrite counted
    at their present size), ``committed`` and ``left_behind`` (old shard
    files that could not be deleted after the commit, ``[{"file": ..., "error": ...}]``,
    also said by a RuntimeWarning: the store no longer refers to them, but their bytes still
    hold removed samples; :func:`clean_store` deletes them once the cause is fixed)."""
    from logitcache.store import _sample_id_array

    sids = _sample_id_array(sample_ids, ordered=False)
    report = _with_progress_bar(
        "remove",
        progress,
        lambda cb: dict(
            _core.remove_samples(
                os.fsdecode(path), sids, dry_run=dry_run, missing_ok=missing_ok, progress=cb
            )
        ),
        reads_per_byte=1,
    )
    _warn_files_left(
        path,
        report["left_behind"],
        "old shard file",
        ", which still hold removed samples",
        stacklevel=2,
    )
    return report


def clean_store(path: str | os.PathLike[str], *, dry_run: bool = False) -> dict[str, Any]:
    """Delete the files that the store's own writers left behind and its manifest does not
    name: shard files of a writer that died before committing, the damaged shards
    :func:`repair_store` left out, the old shards of a :func:`remove_samples` killed after
    its commit, and temporary manifests.

    The old shards of a removal matter most: a manifest rebuilt from the shard files
    (:func:`rebuild_manifest`) would take them back, and with them the removed samples.
    Files of any other making that the manifest does not name (``manifest.json.damaged``
    kept by a rebuild, files someone put there, directories) are reported and kept.

    It holds the store's lock (:class:`StoreLockedError` while a writer is open) and reads
    the manifest under it, so it never deletes a shard a writer has just committed; a store
    whose manifest cannot be read is refused (rebuild it first: the shard files may be all
    that is left of it). A reader that opened the store before keeps the files it opened.
    ``dry_run=True`` reports and deletes nothing (and is refused while a writer is open, whose
    unfinished shards it would list).

    Returns a report: ``deleted`` (paths relative to the store, to delete in a dry run),
    ``bytes`` (their total size), ``kept`` (the other unnamed entries) and ``dry_run``."""
    return dict(_core.clean(os.fsdecode(path), dry_run=dry_run))


__all__ = [
    "Batch",
    "CorruptStoreError",
    "DuplicateSampleError",
    "FormatVersionError",
    "InvalidRecordError",
    "KDLoss",
    "MissingSampleError",
    "PackedBatch",
    "Record",
    "Store",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreWriter",
    "__version__",
    "clean_store",
    "config_fingerprint",
    "copy_store",
    "get_num_threads",
    "kd_loss",
    "merge_stores",
    "open_store",
    "rebuild_manifest",
    "remove_samples",
    "repair_store",
    "sampled_kd_loss",
    "set_num_threads",
    "sparse_kd_loss",
    "target_stats",
    "token_metrics",
    "verify_store",
    "vocab_fingerprint",
]
