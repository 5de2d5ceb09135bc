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

__all__ = [
    "CorruptStoreError",
    "DuplicateSampleError",
    "FormatVersionError",
    "InvalidRecordError",
    "MissingSampleError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreMismatchError",
    "__version__",
    "get_num_threads",
    "set_num_threads",
]
