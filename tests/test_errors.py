import pytest

import logitcache as lc


def test_hierarchy_roots_at_store_error() -> None:
    for cls in (
        lc.CorruptStoreError,
        lc.FormatVersionError,
        lc.StoreMismatchError,
        lc.MissingSampleError,
        lc.DuplicateSampleError,
        lc.InvalidRecordError,
        lc.StoreExistsError,
        lc.StoreLockedError,
    ):
        assert issubclass(cls, lc.StoreError), cls
    assert issubclass(lc.MissingSampleError, KeyError)
    assert issubclass(lc.StoreExistsError, FileExistsError)
    assert issubclass(lc.InvalidRecordError, ValueError)
    assert lc.StoreError.__module__ == "logitcache"


def test_thread_pool_resizes() -> None:
    before = lc.get_num_threads()
    try:
        lc.set_num_threads(1)
        assert lc.get_num_threads() == 1
        with pytest.raises(ValueError, match="at least 1"):
            lc.set_num_threads(0)
    finally:
        lc.set_num_threads(before)
