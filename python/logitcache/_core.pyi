"""Type stubs of the Rust extension module. Only logitcache's own modules import it."""

import numpy as np
from numpy.typing import NDArray

__version__: str

class StoreError(Exception): ...
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
