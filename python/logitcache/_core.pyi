"""Type stubs of the Rust extension module. Only logitcache's own modules import it."""

from collections.abc import Callable
from typing import final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CorruptStoreError",
    "DuplicateSampleError",
    "FormatVersionError",
    "InvalidRecordError",
    "MissingSampleError",
    "Store",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreWriter",
    "__version__",
    "clean",
    "dense_kd",
    "get_num_threads",
    "merge",
    "read_manifest",
    "rebuild_manifest",
    "remove_samples",
    "repair",
    "sampled_kd",
    "scale_rows",
    "set_num_threads",
    "sparse_kd",
    "verify",
]

__version__: str

class StoreError(Exception):
    """Where the error happened (None where not known)."""

    file: str | None
    shard: int | None
    chunk: int | None
    offset: int | None
    sample_id: int | None

class CorruptStoreError(StoreError): ...
class FormatVersionError(StoreError): ...
class StoreMismatchError(StoreError, ValueError): ...
class MissingSampleError(StoreError, KeyError): ...
class DuplicateSampleError(StoreError, ValueError): ...
class InvalidRecordError(StoreError, ValueError): ...
class StoreExistsError(StoreError, FileExistsError): ...
class StoreLockedError(StoreError): ...

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...

@final
class StoreWriter:
    def __new__(
        cls,
        path: str,
        *,
        vocab_size: int,
        k: int,
        kind: str,
        codec: str | None,
        temperature: float,
        mode: str,
        teacher_name: str | None,
        teacher_fingerprint: str | None,
        tokenizer_name: str | None,
        tokenizer_fingerprint: str | None,
        metadata_json: str | None,
        chunk_positions: int,
        shard_bytes: int,
        zstd_level: int,
    ) -> StoreWriter: ...
    def add_topk(
        self, sample_id: int, input_ids: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray
    ) -> None: ...
    def add_logits(
        self,
        sample_id: int,
        input_ids: np.ndarray,
        logits: np.ndarray,
        dtype: str,
        seed: int = 0,
    ) -> None: ...
    def add_sampled(
        self,
        sample_id: int,
        input_ids: np.ndarray,
        ids: np.ndarray,
        counts: np.ndarray,
        logprobs: np.ndarray | None = None,
        check_mass: bool = True,
    ) -> None: ...
    def copy_from(
        self,
        source: str,
        sample_ids: NDArray[np.uint64],
        expect_shards: list[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, int]: ...
    def commit(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def num_uncommitted(self) -> int: ...
    def take_left_behind(self) -> list[dict[str, str]]: ...
    def holds(self, sample_id: int) -> bool: ...
    def manifest_json(self) -> str: ...

@final
class Store:
    def __new__(
        cls,
        path: str,
        *,
        mmap: bool | None = None,
        expect_vocab_size: int | None = None,
        expect_tokenizer_name: str | None = None,
        expect_tokenizer_fingerprint: str | None = None,
        cache_chunks: int | None = None,
    ) -> Store: ...
    def __len__(self) -> int: ...
    def __contains__(self, sample_id: int, /) -> bool: ...
    def manifest_json(self) -> str: ...
    @property
    def uses_mmap(self) -> bool: ...
    @property
    def mapped_shards(self) -> int: ...
    def sample_ids(self) -> np.ndarray: ...
    def sample_lengths(self) -> np.ndarray: ...
    def get(self, sample_id: int) -> dict[str, np.ndarray]: ...
    def read_batch(self, sample_ids: np.ndarray) -> dict[str, np.ndarray]: ...
    def read_packed(self, sample_ids: np.ndarray) -> dict[str, np.ndarray]: ...

def read_manifest(path: str) -> str: ...
def verify(path: str, progress: Callable[[int, int], None] | None = None) -> dict[str, object]: ...
def repair(
    path: str,
    dry_run: bool = False,
    remove_damaged: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]: ...
def merge(
    path: str,
    sources: list[str],
    append: bool = False,
    copy: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]: ...
def remove_samples(
    path: str,
    sample_ids: NDArray[np.uint64],
    dry_run: bool = False,
    missing_ok: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]: ...
def clean(path: str, dry_run: bool = False) -> dict[str, object]: ...
def rebuild_manifest(
    path: str,
    *,
    dry_run: bool = False,
    teacher_name: str | None = None,
    teacher_fingerprint: str | None = None,
    tokenizer_name: str | None = None,
    tokenizer_fingerprint: str | None = None,
    metadata_json: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]: ...

# Loss kernels (python/logitcache/_loss_kernels.py is their only user). Arrays are zero-copy
# numpy views of contiguous CPU tensors; bfloat16 arrays are uint16 views of their bits.
# Results are written into `values` ([N] float32) and, when not None, `grad` (the dtype and
# shape of `student_logits`). Bad arguments raise ValueError naming them.
def sparse_kd(
    student_logits: NDArray[np.float32] | NDArray[np.uint16],
    ids: NDArray[np.int64],
    logprobs: NDArray[np.float32],
    valid: NDArray[np.bool_],
    values: NDArray[np.float32],
    grad: NDArray[np.float32] | NDArray[np.uint16] | None,
    *,
    divergence: str,
    tail: str,
    temperature: float,
    teacher_temperature: float,
    beta: float,
    alpha: float,
) -> None: ...
def sampled_kd(
    student_logits: NDArray[np.float32] | NDArray[np.uint16],
    ids: NDArray[np.int64],
    counts: NDArray[np.int64],
    logprobs: NDArray[np.float32] | None,
    valid: NDArray[np.bool_],
    values: NDArray[np.float32],
    grad: NDArray[np.float32] | NDArray[np.uint16] | None,
    *,
    temperature: float,
    teacher_temperature: float,
) -> None: ...
def dense_kd(
    student_logits: NDArray[np.float32] | NDArray[np.uint16],
    teacher_logits: NDArray[np.float32] | NDArray[np.uint16],
    valid: NDArray[np.bool_],
    values: NDArray[np.float32],
    grad: NDArray[np.float32] | NDArray[np.uint16] | None,
    *,
    divergence: str,
    temperature: float,
    beta: float,
    alpha: float,
) -> None: ...
def scale_rows(
    grad: NDArray[np.float32] | NDArray[np.uint16], factors: NDArray[np.float32]
) -> None: ...
