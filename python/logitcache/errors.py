"""The exception hierarchy of logitcache (the classes are created by the Rust core)."""

from logitcache._core import (
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
]
