"""logitcache: offline knowledge distillation stores and losses for language models."""

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
from logitcache.losses import KDLoss, kd_loss, sampled_kd_loss, sparse_kd_loss, token_metrics

__all__ = [
    "CorruptStoreError",
    "DuplicateSampleError",
    "FormatVersionError",
    "InvalidRecordError",
    "KDLoss",
    "MissingSampleError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreMismatchError",
    "__version__",
    "get_num_threads",
    "kd_loss",
    "sampled_kd_loss",
    "set_num_threads",
    "sparse_kd_loss",
    "token_metrics",
]
