"""logitcache: offline knowledge distillation stores and losses for language models.

Write a store of teacher targets with :class:`StoreWriter`, read it with :func:`open_store`,
check it with :func:`verify_store`; fit a student with :class:`KDLoss` and the functions of
:mod:`logitcache.losses` (imported on first use: the store works without torch).
"""

from __future__ import annotations

import os
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
from logitcache.store import (
    Batch,
    PackedBatch,
    Record,
    Store,
    StoreWriter,
    config_fingerprint,
    open_store,
    vocab_fingerprint,
)

if TYPE_CHECKING:
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
    if name in _LOSS_NAMES:
        from logitcache import losses

        return getattr(losses, name)
    raise AttributeError(f"module 'logitcache' has no attribute {name!r}")


def verify_store(path: str | os.PathLike[str], *, progress: bool | None = False) -> dict[str, Any]:
    """Check every checksum (manifest, shard files, headers, footers, chunks) and every
    decoded value of a store. Returns a report: ``ok`` (no fault in committed data),
    ``problems`` (each names file, shard, chunk and what is wrong), ``orphans`` (files no
    manifest refers to, e.g. left by a writer that was killed), and counts.

    ``progress=True`` shows a progress bar (tqdm, on stderr) of the store's bytes checked;
    ``None`` shows it only when stderr is a terminal. Each byte is read twice (the
    whole-file checksum, then the chunks' decoding), and the bar counts both halves."""
    if progress is False:
        return dict(_core.verify(os.fspath(path)))
    from tqdm.auto import tqdm

    disable = None if progress is None else False  # None: tqdm's test for a terminal
    with tqdm(
        total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=disable
    ) as bar:

        def update(done: int, total: int) -> None:
            bar.total = total / 2
            bar.n = done / 2
            bar.refresh()

        return dict(_core.verify(os.fspath(path), update))


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
    "config_fingerprint",
    "get_num_threads",
    "kd_loss",
    "open_store",
    "sampled_kd_loss",
    "set_num_threads",
    "sparse_kd_loss",
    "token_metrics",
    "verify_store",
    "vocab_fingerprint",
]
