"""Writing and reading logit stores.

A store is a directory of immutable, checksummed shard files plus ``manifest.json``
(see FORMAT.md). :class:`StoreWriter` creates or extends one; :func:`open_store` reads one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import operator
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt

from logitcache import _core
from logitcache.errors import (
    InvalidRecordError,
    MissingSampleError,
    StoreError,
    StoreLockedError,
)

__all__ = [
    "Batch",
    "Record",
    "Store",
    "StoreWriter",
    "config_fingerprint",
    "open_store",
    "vocab_fingerprint",
]

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})

# Keys of a transformers config that change with the library or the checkout, not the model.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "name_or_path"}


def _int_arg(name: str, value: Any, minimum: int, maximum: int = 2**63 - 1) -> int:
    """``value`` as an int in ``[minimum, maximum]``: ints and numpy integers only (a float
    would be truncated without a word, a bool is no count; the maximum keeps the core's
    integer conversion from failing without the argument's name)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")
    return int(value)


def _parse_size(size: int | str) -> int:
    if not isinstance(size, str):
        return _int_arg("shard_size", size, 1)
    text = size.strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number) :]
    try:
        value = int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(
            f"shard_size {size!r}: expected bytes or a size like '512MiB' or '1GB'"
        ) from None
    return _int_arg("shard_size", value, 1)


def vocab_fingerprint(vocab: Mapping[str, int]) -> str:
    """``sha256:<hex>`` of a tokenizer vocabulary (token -> id), as FORMAT.md specifies:
    the SHA-256 of the compact UTF-8 JSON list ``[[token, id], ...]`` sorted by id, then token.
    """
    pairs = sorted(((str(t), int(i)) for t, i in vocab.items()), key=lambda p: (p[1], p[0]))
    text = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of a model configuration dict (keys that only name the checkout or the
    library version are left out), as FORMAT.md specifies: SHA-256 of the compact JSON with
    sorted keys."""
    clean = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(clean, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _teacher_info(teacher: Any) -> tuple[str | None, str | None]:
    """(name, config fingerprint) of a model name, a transformers model or config, or a dict
    with keys ``name`` / ``config_fingerprint``."""
    if teacher is None:
        return None, None
    if isinstance(teacher, str):
        return teacher, None
    if isinstance(teacher, Mapping):
        return _identity_fields("teacher", teacher, "name", "config_fingerprint")
    config = getattr(teacher, "config", teacher)
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        raise TypeError(
            "teacher must be a name, a dict, or a transformers model/config, "
            f"got {type(teacher).__name__}"
        )
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return (name or None), config_fingerprint(to_dict())


def _identity_fields(
    arg: str, d: Mapping[str, Any], name: str, fingerprint: str
) -> tuple[str | None, str | None]:
    """The two fields of a teacher or tokenizer given as a dict, each a string or None."""
    out = []
    for key in (name, fingerprint):
        v = d.get(key)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{arg}[{key!r}] must be a string or None, got {v!r}")
        out.append(v)
    return out[0], out[1]


def _tokenizer_info(tokenizer: Any) -> tuple[str | None, str | None]:
    """(name, vocabulary fingerprint) of a tokenizer name, a tokenizer object with
    ``get_vocab()``, or a dict with keys ``name`` / ``vocab_fingerprint``."""
    if tokenizer is None:
        return None, None
    if isinstance(tokenizer, str):
        return tokenizer, None
    if isinstance(tokenizer, Mapping):
        return _identity_fields("tokenizer", tokenizer, "name", "vocab_fingerprint")
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        raise TypeError(
            "tokenizer must be a name, a dict, or a tokenizer with get_vocab(), "
            f"got {type(tokenizer).__name__}"
        )
    name = getattr(tokenizer, "name_or_path", None)
    return (name or None), vocab_fingerprint(get_vocab())


def _metadata_json(metadata: Mapping[str, Any] | None) -> str | None:
    """User metadata as the JSON object text the core takes; ValueError if it is not one."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        # allow_nan=False: NaN is no JSON value (the core's parser would refuse the text).
        return json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from None


def _to_numpy(x: Any, name: str, *, keep_bf16: bool = False) -> np.ndarray:
    """A numpy view of a numpy array or CPU torch tensor (no copy when already contiguous).
    bfloat16 tensors become float32, or with ``keep_bf16`` uint16 bit patterns tagged with
    ``_BF16_TAG`` (numpy has no bfloat16)."""
    if isinstance(x, np.ndarray):
        return _native(x)
    detach = getattr(x, "detach", None)
    if detach is not None:  # a torch tensor
        import torch

        t = detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            if not keep_bf16:
                return t.float().numpy()
            return t.contiguous().view(torch.int16).numpy().view(np.uint16).view(_BF16_TAG)
        return t.numpy()
    try:
        return _native(np.asarray(x))
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"{name}: {e}") from None


def _native(a: np.ndarray) -> np.ndarray:
    """``a`` in the machine's byte order (the core reads native numbers)."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


# numpy has no bfloat16: bf16 tensors travel as uint16 bit patterns tagged with this dtype.
_BF16_TAG = np.dtype([("bfloat16", np.uint16)])


def _int_array(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.ndim == 0:
        raise ValueError(f"{name} must be an array, got a single value")
    if a.size == 0 and a.dtype == np.float64 and not isinstance(x, np.ndarray):
        a = a.astype(np.int64)  # an empty list: numpy makes it float64
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.dtype not in (np.int64, np.int32, np.uint32, np.uint16, np.uint64):
        a = a.astype(np.int64)
    return np.ascontiguousarray(a)


def _float_array(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.ndim == 0:
        raise ValueError(f"{name} must be an array, got a single value")
    if a.dtype.kind != "f":
        raise ValueError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


class _OneCallAtATime:
    """The core's writer, used by one thread at a time. A call into it releases the GIL for
    its work, and the binding refuses a second call meanwhile ("Already borrowed"): a writer
    shared by threads (one adding, another asking ``sid in writer``) waits its turn instead.
    (An RLock: a call that reached the writer again from the same thread, through a
    finalizer say, must not deadlock; the binding then refuses it as before.)"""

    __slots__ = ("_inner", "_lock")

    def __init__(self, inner: _core.StoreWriter) -> None:
        self._inner = inner
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in _OneCallAtATime.__slots__:
            # Protocols looked up on an instance without its slots set (copy, pickle), and
            # the slots themselves before they are set.
            raise AttributeError(name)
        with self._lock:
            attr = getattr(self._inner, name)  # a property reads the writer too
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call


class StoreWriter:
    """Create a store, or add to one, as a context manager.

    Args:
        path: The store directory (relative to the working directory at this call; the
            writer keeps to it if the process changes directory).
        vocab_size: Size V of the teacher vocabulary, below 2^31; every id must be in
            ``[0, V)``.
        k: K, the ids kept per position (top-K stores), or n, the draws per position
            (sampled stores); below 2^31.
        kind: ``"topk"`` or ``"sampled"``.
        codec: How log-probabilities are stored: ``"abs:<max error in nats>"`` (2^-14 =
            6.104e-5 to 1; uniform quantization with the largest step m 2^-e, m in 1, 3, 5,
            7 and e in 1 to 13, within twice the bound; the default for top-K is
            ``"abs:0.01"``: step 5 x 2^-8, a guaranteed maximum error of 0.0098 nat),
            ``"kl:<bound>"`` (top-K only: coarser steps where probability is small, with
            KL(P || P_decoded) <= bound nats guaranteed for every position, the rest bucket
            included), ``"lossless"`` (float32, bit for bit) or ``"none"`` (sampled stores
            without log-probabilities, their default). ``None`` means the default for a new
            store and the store's own codec when appending.
        teacher: The teacher: a name, a ``transformers`` model or config (its name and a
            fingerprint of its config are recorded), or a dict ``{"name", "config_fingerprint"}``.
        tokenizer: The tokenizer: a name, a tokenizer object (name and a fingerprint of its
            vocabulary are recorded), or a dict ``{"name", "vocab_fingerprint"}``.
        temperature: The capture temperature T_c of the stored distributions;
            :meth:`add_logits` divides logits by it.
        metadata: A JSON-serialisable dict kept in the manifest (merged on append).
        mode: ``"x"`` create (refuses an existing path), ``"a"`` append to a store of the same
            configuration (refuses a mismatch, naming the field; creates the store if missing),
            ``"w"`` replace (the old store stays readable until the first commit, after
            which its shard files are deleted; one that cannot be gets a RuntimeWarning).
        chunk_positions: A chunk (the unit of compression and of random access) holds at
            most this many positions, or a single record longer than that: it is closed once
            full and before a record that would not fit. With the default 1024, reading a
            record decodes at most max(1024, its length) positions (what shuffled training
            reads want); shorter records share chunks. Larger values can compress slightly
            better on repetitive data (benches/README.md).
        shard_size: Bytes per shard file before a new one is started (``"1GiB"``).
        zstd_level: zstd compression level (1-22). Level 1 is the default: on top-K streams
            it compresses as well as higher levels (benches/README.md) and is the fastest.
        lock_timeout: Seconds to wait for another writer of the store to finish (jobs that
            append to one store one after the other). By default a store that another writer
            holds is refused at once with :class:`StoreLockedError`; with a timeout the open
            is tried again, with pauses growing to 0.5 s, until it succeeds or the time is up
            (then :class:`StoreLockedError`). Ctrl-C interrupts the wait.

    Records become visible when the writer commits: at :meth:`close` (the end of the ``with``
    block) or at an explicit :meth:`commit` checkpoint. An exception inside the ``with`` block,
    or a killed process, leaves the last committed state; so does a writer garbage-collected
    without :meth:`close` (with a ``RuntimeWarning`` when that discards samples).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        vocab_size: int,
        k: int,
        kind: Literal["topk", "sampled"] = "topk",
        codec: str | None = None,
        teacher: Any = None,
        tokenizer: Any = None,
        temperature: float = 1.0,
        metadata: Mapping[str, Any] | None = None,
        mode: Literal["x", "a", "w"] = "x",
        chunk_positions: int = 1024,
        shard_size: int | str = "1GiB",
        zstd_level: int = 1,
        lock_timeout: float = 0.0,
    ) -> None:
        if kind not in ("topk", "sampled"):
            raise ValueError(f'kind must be "topk" or "sampled", got {kind!r}')
        if codec is not None and not isinstance(codec, str):
            raise ValueError(f"codec must be a string such as 'abs:0.01', got {codec!r}")
        if mode not in ("x", "a", "w"):
            raise ValueError(
                f'mode must be "x" (create), "a" (append) or "w" (replace), got {mode!r}'
            )
        vocab_size = _int_arg("vocab_size", vocab_size, 1)
        k = _int_arg("k", k, 1)
        if vocab_size >= 2**31:
            raise ValueError(f"vocab_size must be below 2**31, got {vocab_size}")
        if k >= 2**31:
            # (Ids and counts are read back as int32.)
            raise ValueError(f"k must be below 2**31, got {k}")
        chunk_positions = _int_arg("chunk_positions", chunk_positions, 1)
        zstd_level = _int_arg("zstd_level", zstd_level, 1, 22)
        teacher_name, teacher_fp = _teacher_info(teacher)
        tok_name, tok_fp = _tokenizer_info(tokenizer)
        metadata_json = _metadata_json(metadata)
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)):
            raise ValueError(f"lock_timeout must be a number of seconds, got {lock_timeout!r}")
        if not lock_timeout >= 0:
            raise ValueError(f"lock_timeout must be at least 0, got {lock_timeout!r}")
        # Absolute (not normalized, so that `a/b/..` keeps its meaning): a process that
        # changes its working directory while the writer is open must not write elsewhere.
        self.path = _absolute(path)
        open_writer = functools.partial(
            _core.StoreWriter,
            self.path,
            vocab_size=int(vocab_size),
            k=int(k),
            kind=kind,
            codec=codec,
            temperature=float(temperature),
            mode=mode,
            teacher_name=teacher_name,
            teacher_fingerprint=teacher_fp,
            tokenizer_name=tok_name,
            tokenizer_fingerprint=tok_fp,
            metadata_json=metadata_json,
            chunk_positions=int(chunk_positions),
            shard_bytes=_parse_size(shard_size),
            zstd_level=int(zstd_level),
        )
        # Waited for here, in Python, so that Ctrl-C interrupts the wait. Each try is a whole
        # open: what is at the path is looked at again once the other writer is done.
        deadline = time.monotonic() + lock_timeout
        pause = 0.01
        while True:
            try:
                self._w = cast(_core.StoreWriter, _OneCallAtATime(open_writer()))
                break
            except StoreLockedError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.5)
        manifest = json.loads(self._w.manifest_json())
        self.kind: str = manifest["kind"]
        self.k: int = manifest["k"]
        self.vocab_size: int = manifest["vocab_size"]
        #: How log-probabilities are stored (the manifest's ``codec`` object).
        self.codec: dict[str, Any] = manifest["codec"]

    def add(
        self,
        sample_id: int,
        input_ids: npt.ArrayLike,
        topk_ids: npt.ArrayLike,
        topk_logprobs: npt.ArrayLike,
    ) -> None:
        """Add one sequence of a top-K store.

        Args:
            sample_id: Any u64, unique in the store.
            input_ids: ``[L]`` input token ids.
            topk_ids: ``[L, K]`` teacher ids of each position, by decreasing probability.
            topk_logprobs: ``[L, K]`` their log-probabilities under the teacher's full
                softmax at the capture temperature (non-increasing along each row).

        Numpy arrays or CPU torch tensors. Raises ``InvalidRecordError`` (ids out of range or
        repeated in a row, NaN/+inf/positive/unsorted log-probabilities, a row's
        probabilities adding up to more than 1.02: a little above 1 is allowed for rounding,
        and so that records decoded from a store at ``abs:0.01`` or finer can be written
        again), ``DuplicateSampleError``, or ``ValueError`` for wrong shapes or dtypes.
        """
        self._w.add_topk(
            _sample_id(sample_id),
            _int_array(input_ids, "input_ids"),
            _int_array(topk_ids, "topk_ids"),
            _float_array(topk_logprobs, "topk_logprobs"),
        )

    def add_logits(
        self, sample_id: int, input_ids: npt.ArrayLike, logits: Any, *, seed: int | None = None
    ) -> None:
        """Add one sequence from the teacher's full logits ``[L, V]`` (float32, float16 or
        bfloat16; numpy or a torch tensor, any strides; float64 is cast to float32 first, so
        values beyond float32's range become infinite and +inf is refused). Log-softmax at
        the capture temperature (``log_softmax(logits / temperature)``) runs in Rust on all
        cores of the shared pool, then per position:

        - top-K stores keep the K most probable ids. Rows are ordered by log-probability,
          ties by the lower id first (``torch.topk`` may order ties otherwise). A row with
          fewer than K finite logits (a masked vocabulary) is filled with masked ids, lowest
          first, at log-probability -inf.
        - sampled stores keep the distinct ids of n (the store's ``k``) independent draws
          from that distribution, by decreasing count (ties: lower id first), with their
          counts and, if the store keeps them, their log-probabilities (what this method
          computes for a top-K store, bit for bit, before the codec). A masked (-inf) logit
          is never drawn. The draws depend on ``seed`` (default 0), the sample id and the
          position alone (the README's "Sampled stores from logits" says how): the same
          capture run again, on any number of threads, writes the same rows; pass another
          ``seed`` for other draws. The store does not record the seed. At most 2^24 draws
          per position.

        ``seed`` is refused for top-K stores, which draw nothing."""
        if seed is not None and self.kind != "sampled":
            raise ValueError(
                "seed is for sampled stores (kind='sampled'); a top-K store draws nothing"
            )
        seed = 0 if seed is None else _int_arg("seed", seed, 0, 2**64 - 1)
        a = _to_numpy(logits, "logits", keep_bf16=True)
        if a.ndim == 0:
            raise ValueError("logits must be 2-D [L, V], got a single value")
        if a.dtype == _BF16_TAG:
            dtype, arr = "bfloat16", np.ascontiguousarray(a.view(np.uint16))
        elif a.dtype == np.float16:
            dtype, arr = "float16", np.ascontiguousarray(a).view(np.uint16)
        elif a.dtype == np.float32:
            dtype, arr = "float32", np.ascontiguousarray(a)
        elif a.dtype == np.float64:
            dtype, arr = "float32", np.ascontiguousarray(a, dtype=np.float32)
        else:
            raise ValueError(f"logits must be float32, float16 or bfloat16, got {a.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"logits must be 2-D [L, V], got shape {arr.shape}")
        self._w.add_logits(
            _sample_id(sample_id), _int_array(input_ids, "input_ids"), arr, dtype, seed=seed
        )

    def add_sampled(
        self,
        sample_id: int,
        input_ids: npt.ArrayLike,
        ids: npt.ArrayLike,
        counts: npt.ArrayLike,
        logprobs: npt.ArrayLike | None = None,
        *,
        check_mass: bool = True,
    ) -> None:
        """Add one sequence of a sampled store.

        Args:
            sample_id: Any u64, unique in the store.
            input_ids: ``[L]`` input token ids.
            ids: ``[L, M]`` distinct ids drawn at each position, padded (any id, e.g. -1)
                where ``counts`` is 0.
            counts: ``[L, M]`` how many of the n draws gave each id; each row sums to n.
            logprobs: ``[L, M]`` teacher log-probabilities of the ids, if the store keeps them
                (the loss gradient needs only ids and counts): finite, at most 0, and adding
                up, as probabilities of distinct ids, to at most 1 (and 0.02 for rounding).
                An ``"abs"`` codec with step s = m 2^-e stores a value below -(Q + 1/2) s
                nats (Q = floor(2^24 / m): at least 2048 nats, about 65535 for abs:0.01's
                step 5 x 2^-8) as -Q s.
            check_mass: ``False`` skips the check that a row adds up to at most 1.02: for
                values read back from a store whose codec rounded them up (a coarse ``abs``
                codec rounds each value by up to its bound).
        """
        self._w.add_sampled(
            _sample_id(sample_id),
            _int_array(input_ids, "input_ids"),
            _int_array(ids, "ids"),
            _int_array(counts, "counts"),
            None if logprobs is None else _float_array(logprobs, "logprobs"),
            check_mass=check_mass,
        )

    def commit(self) -> None:
        """Checkpoint: make everything added so far durable and visible to readers."""
        with _too_late_noted(lambda: self._w.num_uncommitted == 0, f"the commit of {self.path}"):
            self._w.commit()
            self._warn_left_behind(stacklevel=3)

    def close(self) -> None:
        """Commit and release the store (idempotent)."""
        with _too_late_noted(lambda: self._w.closed, f"the commit of {self.path}"):
            self._w.close()
            self._warn_left_behind(stacklevel=3)

    def _warn_left_behind(self, stacklevel: int) -> None:
        # mode="w": the replaced store's shard files are deleted after the first commit,
        # which stands whether or not they can be. (stacklevel: the caller of close() or
        # commit(), or the with statement.)
        _warn_files_left(
            self.path,
            self._w.take_left_behind(),
            "shard file",
            " of the store it replaced",
            stacklevel=stacklevel,
        )

    def abort(self) -> None:
        """Discard what was added since the last commit and release the store."""
        self._w.abort()

    @property
    def closed(self) -> bool:
        return bool(self._w.closed)

    @property
    def num_samples(self) -> int:
        """Samples in the store once this writer commits."""
        return int(self._w.num_samples)

    def __contains__(self, sample_id: object) -> bool:
        """Whether the store holds ``sample_id``, committed or added since the last commit:
        a capture resumed with ``mode="a"`` after a crash skips what it already has
        (``if sid in writer: continue``)."""
        if self.closed:
            # After an abort it would still count the ids it discarded.
            raise StoreError(f"the writer of {self.path} is closed")
        try:
            return bool(self._w.holds(_sample_id(sample_id)))
        except ValueError:
            return False

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            with _too_late_noted(lambda: self._w.closed, f"the commit of {self.path}"):
                self._w.close()
                self._warn_left_behind(stacklevel=3)  # at the with statement
        else:
            self.abort()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"StoreWriter({self.path!r}, kind={self.kind!r}, k={self.k}, {state})"

    def __del__(self) -> None:
        # A writer dropped without close() or abort() discards what it added since its last
        # commit (as an exception would). Said loudly when that is data, since a forgotten
        # close() in a script otherwise loses a whole capture without a word.
        w = getattr(self, "_w", None)  # None: __init__ failed
        if w is None or w.closed:
            return
        lost = w.num_uncommitted
        if lost:
            warnings.warn(
                f"StoreWriter({self.path!r}) was not closed: the {lost} sample(s) added since "
                "its last commit are discarded (use it in a with block, or call close())",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            warnings.warn(f"unclosed StoreWriter({self.path!r})", ResourceWarning, stacklevel=2)


def _read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The committed manifest of the store at ``path`` (checksum and version checked), without
    opening its shards."""
    manifest: dict[str, Any] = json.loads(_core.read_manifest(os.fsdecode(path)))
    return manifest


def _warn_files_left(
    path: str | os.PathLike[str],
    left: list[dict[str, str]],
    what: str,
    why: str = "",
    *,
    stacklevel: int,
) -> None:
    """A RuntimeWarning for the files (``left_behind``) a committed operation could not
    delete afterwards: a caller that does not read its report still hears of them.
    ``stacklevel`` counts from the caller of this function (1: the caller itself)."""
    if left:
        files = "; ".join(f"{f['file']}: {f['error']}" for f in left)
        warnings.warn(
            f"could not delete {len(left)} {what}(s){why} ({files}); the store at "
            f"{os.fsdecode(path)} no longer refers to them: once the cause is fixed, logitcache "
            f"clean {os.fsdecode(path)} deletes them",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )


def _sample_id(sample_id: Any, name: str = "sample_id") -> int:
    # Any integer that says it is one through __index__: Python and numpy integers, a 0-d
    # integer tensor (torch). A bool is an int to Python but never an id.
    # torch's __index__ also takes a one-element tensor of any shape: refused, since a slice
    # ids[i:i + 1] meant as a batch would read as one record.
    is_bool = isinstance(sample_id, (bool, np.bool_)) or str(getattr(sample_id, "dtype", "")) in (
        "bool",
        "torch.bool",
    )
    shape = tuple(getattr(sample_id, "shape", ()))
    try:
        value = None if is_bool or shape else operator.index(sample_id)
    except TypeError:
        value = None
    except RuntimeError:
        # torch's __index__ of a uint64 tensor above 2**63 - 1 overflows int64; item() does
        # not (and an integer tensor's item() is an int).
        item = sample_id.item() if hasattr(sample_id, "item") else None
        value = item if isinstance(item, int) else None
    if value is None:
        got = type(sample_id).__name__ + (f" of shape {shape}" if shape else "")
        raise ValueError(f"{name} must be an integer, got {got}")
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


@dataclass(frozen=True)
class Record:
    """One stored sequence.

    For top-K stores ``topk_ids`` / ``topk_logprobs`` are ``[L, K]`` and ``counts`` is None.
    For sampled stores they are ``[L, M]`` (M = the record's widest row), padded with id -1,
    count 0 and log-probability -inf; ``topk_logprobs`` is None when the store keeps none.
    Arrays are int32 / float32 numpy arrays owned by the record.
    """

    sample_id: int
    input_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray | None
    counts: np.ndarray | None = None

    @property
    def ids(self) -> np.ndarray:
        """Alias of ``topk_ids``."""
        return self.topk_ids

    @property
    def logprobs(self) -> np.ndarray | None:
        """Alias of ``topk_logprobs``."""
        return self.topk_logprobs

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class Batch:
    """Records padded to a common length (``lengths`` tells the real ones).

    ``input_ids`` is ``[B, L]`` (padded with 0); ``topk_ids`` / ``topk_logprobs`` /
    ``counts`` are ``[B, L, W]`` with W = K (top-K) or the widest sampled row; padding is id 0
    (top-K) or -1 (sampled), log-probability -inf and count 0. Dtypes: ``sample_ids``
    uint64, ``lengths`` int64, ``input_ids`` / ``topk_ids`` / ``counts`` int32 (cast ids to
    int64 for ``F.cross_entropy`` targets; the losses take int32), ``topk_logprobs`` float32.
    For a sampled store ``topk_ids`` holds the sampled ids: they go to the losses as
    ``sampled_ids`` with ``counts`` as ``sampled_counts`` (README, "From a stored batch to
    the loss").
    """

    sample_ids: np.ndarray
    lengths: np.ndarray
    input_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray | None
    counts: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray:
        """``[B, L]`` True at real (non-padding) positions."""
        return np.arange(self.input_ids.shape[1])[None, :] < self.lengths[:, None]

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])


def _sample_id_array(
    sample_ids: Iterable[int] | npt.ArrayLike, *, ordered: bool = True
) -> np.ndarray:
    """Sample ids as a 1-D uint64 array, refusing what is not one. Any iterable of ids is
    taken (a generator, dict keys); a set only where the order does not matter
    (``ordered=False``: it is then sorted)."""
    if isinstance(sample_ids, (set, frozenset)):
        if ordered:
            raise ValueError(
                "sample_ids is a set, which has no order; give a sequence (e.g. sorted(ids))"
            )
        sample_ids = sorted(sample_ids)
    elif isinstance(sample_ids, (int, np.integer)):
        raise ValueError(
            f"sample_ids must be a sequence of ids, got the single id {sample_ids!r} "
            "(a list of one will do)"
        )
    elif hasattr(sample_ids, "detach") and hasattr(sample_ids, "cpu"):
        # A torch tensor: one that requires grad, or lives on an accelerator, converts only
        # detached and on the CPU.
        sample_ids = sample_ids.detach().cpu()
    elif (
        not isinstance(sample_ids, (np.ndarray, list, tuple, range, str, bytes))
        # Arrays of other libraries (torch, jax, pandas) convert as arrays, not one by one.
        and not any(hasattr(sample_ids, a) for a in ("__array__", "__array_interface__"))
        and isinstance(sample_ids, Iterable)
    ):
        sample_ids = [*sample_ids]  # generators, dict keys, other iterables of ids
    if isinstance(sample_ids, (list, tuple, range)):
        # Python ints may exceed int64; numpy would turn a mix into float64.
        return np.fromiter(
            (_sample_id(x, f"sample_ids[{i}]") for i, x in enumerate(sample_ids)),
            dtype=np.uint64,
        )
    sids = np.asarray(sample_ids)
    if sids.ndim != 1:
        raise ValueError(f"sample_ids must be 1-D, got shape {sids.shape}")
    if sids.dtype.kind not in "iu":
        raise ValueError(f"sample_ids must be integers, got dtype {sids.dtype}")
    if sids.dtype.kind == "i" and sids.size and sids.min() < 0:
        raise ValueError("sample_ids must be non-negative")
    # A copy: a batch's sample_ids must not change with the caller's array (a sampler that
    # refills one index buffer).
    return np.array(sids, dtype=np.uint64, order="C", copy=True)


@dataclass(frozen=True)
class PackedBatch:
    """Records one after the other, without padding between them (the layout of packed
    training with variable-length attention, e.g. ``cu_seqlens``).

    ``input_ids`` is ``[N]`` with N = ``sum(lengths)``; ``topk_ids`` / ``topk_logprobs`` /
    ``counts`` are ``[N, W]`` with W = K (top-K) or the widest sampled row (sampled rows are
    padded to it with id -1, log-probability -inf and count 0). Record ``i`` is rows
    ``offsets[i]:offsets[i + 1]``. Dtypes as :class:`Batch`'s; ``offsets`` is int64 (flash
    attention's ``cu_seqlens`` wants int32: ``.to(torch.int32)``).
    """

    sample_ids: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    input_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray | None
    counts: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])


class Store:
    """An open store (see :func:`open_store`). Safe to share between threads; a store opened
    before ``fork()`` keeps working in the child (e.g. DataLoader workers).

    A Store pickles (DataLoader workers started with ``spawn`` or ``forkserver`` receive the
    dataset pickled): the copy opens the store again at the same path with the same options.
    It then sees what is committed at that moment (samples appended since included); a store
    replaced since (``mode="w"``), rewritten (:func:`logitcache.remove_samples`,
    :func:`logitcache.repair_store`) or moved raises on unpickling rather than giving other
    data.
    """

    def __init__(self, inner: _core.Store, path: str, open_options: dict[str, Any]) -> None:
        self._s: _core.Store | _ClosedStore = inner
        self.path = path
        self._open_options = open_options
        self.meta: dict[str, Any] = json.loads(inner.manifest_json())
        self.kind: str = self.meta["kind"]
        self.k: int = self.meta["k"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.temperature: float = self.meta["temperature"]

    def __len__(self) -> int:
        return len(self._s)

    def __contains__(self, sample_id: object) -> bool:
        try:
            return _sample_id(sample_id) in self._s
        except ValueError:
            return False

    def __iter__(self) -> Iterator[Record]:
        for sid in self.sample_ids():
            yield self[int(sid)]

    def sample_ids(self) -> np.ndarray:
        """All sample ids (uint64), in storage order."""
        return self._s.sample_ids()

    def sample_lengths(self) -> np.ndarray:
        """Length of every sample (int64, as a batch's ``lengths``: torch compares and
        indexes with it, not with uint32), in the order of :meth:`sample_ids`."""
        return self._s.sample_lengths()

    @property
    def num_positions(self) -> int:
        return int(self.meta["num_positions"])

    @property
    def uses_mmap(self) -> bool:
        """Whether shards are memory-mapped (else read with positioned reads); says so of the
        first shard, see :attr:`mapped_shards`."""
        return bool(self._s.uses_mmap)

    @property
    def mapped_shards(self) -> int:
        """How many shards are memory-mapped; the others are read with positioned reads (all
        of them with ``mmap=False`` or on network file systems, those beyond half of the
        address space left at open, less 256 MiB, under ``ulimit -v``)."""
        return int(self._s.mapped_shards)

    def __getitem__(self, sample_id: int) -> Record:
        """One record (``MissingSampleError`` for an unknown id). Its arrays' memory is reused
        once released, as :meth:`read_batch` says."""
        sid = _sample_id(sample_id)
        return self._record(sid, self._s.get(sid))

    def _record(self, sample_id: int, raw: dict[str, np.ndarray]) -> Record:
        inp = raw["input_ids"].view(np.int32)
        n = inp.shape[0]
        if self.kind == "topk":
            ids = raw["ids"].view(np.int32).reshape(n, self.k)
            return Record(sample_id, inp, ids, raw["logprobs"].reshape(n, self.k))
        row_lens = raw["row_lens"].astype(np.int64)
        width = int(row_lens.max()) if n else 0
        cols = np.arange(width)[None, :] < row_lens[:, None]
        ids = np.full((n, width), -1, dtype=np.int32)
        counts = np.zeros((n, width), dtype=np.int32)
        ids[cols] = raw["ids"].view(np.int32)
        counts[cols] = raw["counts"].view(np.int32)
        lp = None
        if self.meta["codec"]["logprobs"] != "none":
            lp = np.full((n, width), -np.inf, dtype=np.float32)
            lp[cols] = raw["logprobs"]
        return Record(sample_id, inp, ids, lp, counts)

    def read_batch(self, sample_ids: Iterable[int] | npt.ArrayLike) -> Batch:
        """Decode many records into padded arrays, with the GIL released and chunks decoded in
        parallel on the shared pool. Raises ``MissingSampleError`` for an unknown id.
        ``sample_ids``: a list, array, range or any other iterable of ids, read in its
        order (a set, having none, is refused).

        The arrays are writeable and yours for as long as anything refers to them (views and
        ``torch.from_numpy`` tensors included). Once nothing does, the store keeps their
        memory for a later batch (up to four arrays per dtype, freed with the store): the
        next batch is written into pages the process already has instead of fresh ones
        from the OS, which in a training loop (a batch read, a step, the batch released)
        saves a page fault and a zeroed page per 4 KiB of every batch."""
        sids = _sample_id_array(sample_ids)
        raw = self._s.read_batch(sids)
        return Batch(
            sample_ids=sids,
            lengths=raw["lengths"].astype(np.int64),
            input_ids=raw["input_ids"],
            topk_ids=raw["ids"],
            topk_logprobs=raw.get("logprobs"),
            counts=raw.get("counts"),
        )

    def read_packed(self, sample_ids: Iterable[int] | npt.ArrayLike) -> PackedBatch:
        """Like :meth:`read_batch`, but the records follow one another without padding
        (``offsets`` gives where each starts): no memory or copying is spent on padding,
        which for records of mixed lengths is often most of a padded batch. Its arrays'
        memory is reused as :meth:`read_batch` says."""
        sids = _sample_id_array(sample_ids)
        raw = self._s.read_packed(sids)
        lengths = raw["lengths"].astype(np.int64)
        offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return PackedBatch(
            sample_ids=sids,
            lengths=lengths,
            offsets=offsets,
            input_ids=raw["input_ids"],
            topk_ids=raw["ids"],
            topk_logprobs=raw.get("logprobs"),
            counts=raw.get("counts"),
        )

    def verify(self) -> dict[str, Any]:
        """Check every checksum and decode every chunk; see :func:`logitcache.verify_store`."""
        from logitcache import verify_store

        return verify_store(self.path)

    def close(self) -> None:
        """Release the store's memory maps, open files and chunk cache now rather than when
        the object is garbage-collected (idempotent). Arrays already read stay valid; any
        later read raises :class:`StoreError`. Also ``with open_store(path) as store:``."""
        if not isinstance(self._s, _ClosedStore):
            self._s = _ClosedStore(self.path)

    @property
    def closed(self) -> bool:
        return isinstance(self._s, _ClosedStore)

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        if self.closed:
            # A copy would be an open store: refused, as every other use of a closed one.
            raise StoreError(f"the store {self.path} is closed")
        shard_uids = [s["uid"] for s in self.meta["shards"]]
        # (The path is absolute: the process that unpickles may run elsewhere.)
        return (_reopen_store, (self.path, self._open_options, shard_uids))

    def __repr__(self) -> str:
        return (
            f"Store({self.path!r}, kind={self.kind!r}, k={self.k}, vocab_size={self.vocab_size}, "
            f"samples={self.meta['num_samples']}, positions={self.num_positions}"
            + (", closed)" if self.closed else ")")
        )


class _ClosedStore:
    """Stands for the core's store once :meth:`Store.close` dropped it: every use raises."""

    def __init__(self, path: str) -> None:
        self._path = path

    def _closed(self) -> StoreError:
        return StoreError(f"the store {self._path} is closed")

    def __getattr__(self, name: str) -> Any:
        raise self._closed()

    def __len__(self) -> int:
        raise self._closed()

    def __contains__(self, sample_id: object) -> bool:
        raise self._closed()


def open_store(
    path: str | os.PathLike[str],
    *,
    expect_vocab_size: int | None = None,
    expect_tokenizer: Any = None,
    mmap: bool | None = None,
    cache_chunks: int = 8,
) -> Store:
    """Open a store for reading.

    Args:
        path: The store directory.
        expect_vocab_size: Raise ``StoreMismatchError`` unless the store's vocabulary has this
            size.
        expect_tokenizer: Raise ``StoreMismatchError`` unless the store was made with this
            tokenizer: a tokenizer object (its vocabulary fingerprint is compared), a name, or a
            dict ``{"name", "vocab_fingerprint"}``.
        mmap: Memory-map shards; ``None`` (default) does so except on network file systems,
            where positioned reads are used, and, under an address-space limit (``ulimit -v``),
            for shards beyond half of the address space left at open minus 256 MiB (maps
            count against the limit; the heap needs the rest). ``True`` maps every shard it can.
        cache_chunks: Decoded chunks kept for reuse by single-record reads.

    Every shard's header, trailer and footer (with their checksums) are checked at open; chunk
    checksums are checked on every read. A path that holds no store raises
    :class:`FileNotFoundError` (no such directory, or no ``manifest.json`` in it) or
    :class:`NotADirectoryError`; a store a writer is still creating (its lock held, nothing
    committed yet) :class:`StoreLockedError`; one of a newer format version
    :class:`FormatVersionError`.
    """
    name, fp = _tokenizer_info(expect_tokenizer)
    if expect_vocab_size is not None:
        expect_vocab_size = _int_arg("expect_vocab_size", expect_vocab_size, 1)
    cache_chunks = _int_arg("cache_chunks", cache_chunks, 0)
    if mmap is not None and not isinstance(mmap, bool):
        raise ValueError(f"mmap must be True, False or None, got {mmap!r}")
    # Absolute: pickling, verify() and copy_store use the path later, maybe after a chdir.
    p = _absolute(path)
    inner = _core.Store(
        p,
        mmap=mmap,
        expect_vocab_size=expect_vocab_size,
        expect_tokenizer_name=name,
        expect_tokenizer_fingerprint=fp,
        cache_chunks=cache_chunks,
    )
    return Store(inner, p, {"mmap": mmap, "cache_chunks": cache_chunks})


def _absolute(path: str | os.PathLike[str]) -> str:
    """``path`` made absolute against the working directory now, not normalized (``..`` and
    symbolic links keep their meaning), as the core does with it."""
    p = os.fsdecode(path)
    return p if os.path.isabs(p) or not p else os.path.join(os.getcwd(), p)


def _reopen_store(path: str, open_options: dict[str, Any], shard_uids: list[str]) -> Store:
    """Unpickle a :class:`Store`: open it again and check that it is the same store (its
    shards at pickling time are still its first shards; appends add shards after them)."""
    store = open_store(path, **open_options)
    _check_same_store(path, store.meta, shard_uids, "pickled")
    return store


def _check_same_store(path: str, now: Mapping[str, Any], shard_uids: list[str], since: str) -> None:
    """Refuse a store whose manifest ``now`` no longer starts with the shards ``shard_uids``
    it had when a Store was ``since`` (appends add shards after them)."""
    uids = [s["uid"] for s in now["shards"]]
    if uids[: len(shard_uids)] != shard_uids:
        gone = next(u for i, u in enumerate(shard_uids) if i >= len(uids) or uids[i] != u)
        raise _core.StoreMismatchError(
            f"{path}: the store was replaced or rewritten since this Store was {since} "
            f"(shard {gone} is gone: a writer with mode='w', repair_store or remove_samples); "
            "open it again with open_store"
        )


@contextlib.contextmanager
def _too_late_noted(done: Callable[[], bool], what: str) -> Iterator[None]:
    """Ctrl-C cannot stop a commit half way: pressed while the core commits, it is raised
    once the commit is done, here. Then the KeyboardInterrupt says so (when ``done()``), so
    that the caller does not take the store for unchanged. One raised while another
    exception was on its way (``__context__``) says nothing: that commit may have failed."""
    try:
        yield
    except KeyboardInterrupt as e:
        add_note = getattr(e, "add_note", None)  # Python 3.11+
        if add_note is not None and e.__context__ is None and done():
            add_note(f"logitcache: this came too late to stop {what}, which ran to its end")
        raise


def _codec_spec(codec: Mapping[str, Any]) -> str:
    """The writer's codec argument that stores values as the manifest's codec does."""
    name = codec["logprobs"]
    if name == "abs":
        # The writer takes the largest step whose half is within the bound: this one.
        return f"abs:{codec['max_abs_error']!r}"
    if name == "kl":
        return f"kl:{codec['kl_bound']!r}"
    return str(name)


def _with_progress_bar(
    desc: str,
    progress: bool | None,
    run: Callable[[Callable[[int, int], None] | None], dict[str, Any]],
    reads_per_byte: int = 2,
) -> dict[str, Any]:
    """``run(callback)`` with a tqdm bar of bytes fed by the core's ``(done, total)`` calls,
    which count every byte ``reads_per_byte`` times (verify and repair: twice, the
    whole-file checksum, then decoding)."""
    if progress is False:
        return run(None)
    from tqdm.auto import tqdm

    disable = None if progress is None else False  # None: tqdm's test for a terminal
    with tqdm(
        total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=disable
    ) as bar:

        def update(done: int, total: int) -> None:
            bar.total = total / reads_per_byte
            bar.n = done / reads_per_byte
            bar.refresh()

        return run(update)


def copy_store(
    source: Store | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    sample_ids: Iterable[int] | npt.ArrayLike | None = None,
    exclude_ids: Iterable[int] | npt.ArrayLike | None = None,
    codec: str | None = None,
    mode: Literal["x", "a", "w"] = "x",
    progress: bool | None = False,
    **writer_options: Any,
) -> int:
    """Write records of a store into another store: to keep a subset (``sample_ids``: those;
    ``exclude_ids``: all but those), or to store them with another codec (capture
    losslessly, choose the codec later).

    The new store takes the source's kind, K, vocabulary, temperature, teacher, tokenizer and
    metadata; ``codec`` defaults to the source's (the destination's when appending to a
    store). With the source's codec, records are copied as they are stored: a chunk all of
    whose records are copied keeps its stored bytes (its values bit for bit, checked against
    its checksum), and only a chunk shared with records left behind is decoded and its
    copied records encoded again. With another codec every record is decoded and encoded
    again, and a lossy codec's bound holds against the values it is given: from a lossless
    source, the originals; from a lossy one, its decoded values (so the two errors can add
    up). Records keep the source's order. ``mode`` and ``writer_options``
    (``chunk_positions``, ``shard_size``, ``zstd_level``, ``lock_timeout``; copied chunks
    keep their size) are :class:`StoreWriter`'s. An id of ``sample_ids`` or ``exclude_ids``
    that the source does not hold raises :class:`MissingSampleError` before anything is
    written. Given an open :class:`Store`, the copy is of that store: with the source's
    codec (records copied as stored, from the files at its path), one replaced or rewritten
    at its path since it was opened is refused (:class:`StoreMismatchError`); with another
    codec the records are decoded through the open Store, so the copy holds what it holds.
    ``progress=True`` shows a progress bar (``None``: only when stderr is a terminal).

    Returns the number of records written.
    """
    taken = {"chunk_positions", "shard_size", "zstd_level", "lock_timeout"}
    if not taken.issuperset(writer_options):
        other = sorted(set(writer_options) - taken)
        raise ValueError(
            f"copy_store takes no {', '.join(other)}: the copy has the source's configuration; "
            f"writer options are {', '.join(sorted(taken))}"
        )
    src = source if isinstance(source, Store) else open_store(source)
    if sample_ids is not None and exclude_ids is not None:
        raise ValueError("give sample_ids or exclude_ids, not both")
    if os.path.exists(path) and os.path.samefile(path, src.path):
        # mode="w" would delete what it copies from; "a" would find every id there already.
        raise ValueError(f"{os.fsdecode(path)} is the source store itself")
    ids = src.sample_ids()  # the source's order
    for chosen in (sample_ids, exclude_ids):
        if chosen is None:
            continue
        want = np.unique(_sample_id_array(chosen, ordered=False))
        absent = want[~np.isin(want, ids)]
        if absent.size:
            raise MissingSampleError(
                f"sample id {int(absent[0])} is not in the store {src.path}"
                + (f" (nor are {absent.size - 1} more)" if absent.size > 1 else "")
            )
        ids = ids[np.isin(ids, want) == (chosen is sample_ids)]
    m = src.meta
    appending = mode == "a" and os.path.exists(os.path.join(os.fsdecode(path), "manifest.json"))
    if codec is None and not appending:
        codec = _codec_spec(m["codec"])
    w = StoreWriter(
        path,
        vocab_size=src.vocab_size,
        k=src.k,
        kind=src.kind,  # type: ignore[arg-type]
        codec=codec,
        teacher=m["teacher"],
        tokenizer=m["tokenizer"],
        temperature=src.temperature,
        metadata=m["metadata"],
        mode=mode,
        **writer_options,
    )
    try:
        n = _copy_records(src, ids, w, progress)
        with _too_late_noted(lambda: w.closed, f"the copy into {w.path}"):
            w._w.close()
    except BaseException:
        w.abort()  # nothing after a close
        raise
    # A replaced store's files not deleted: said at the caller of copy_store (frames: the
    # warning, _warn_left_behind, here, the caller).
    w._warn_left_behind(stacklevel=3)
    return n


def _copy_records(src: Store, ids: np.ndarray, w: StoreWriter, progress: bool | None) -> int:
    """The body of :func:`copy_store`: the records ``ids`` of ``src`` into ``w``."""
    from tqdm.auto import tqdm

    m = src.meta
    keep_lp = w.codec["logprobs"] != "none"
    if keep_lp and m["codec"]["logprobs"] == "none":
        raise ValueError(
            f"{src.path} keeps no log-probabilities; the copy's codec "
            f'{w.codec["logprobs"]!r} needs them (use the codec "none")'
        )
    if all(w.codec[key] == m["codec"][key] for key in ("logprobs", "step", "kl_bound")):
        # This copy reads the store at src.path as it is now, not the open Store: the core
        # refuses it if that no longer starts with the shards the Store opened (the other
        # path decodes through src). Checked on the manifest the copy reads, so the store
        # cannot change between the check and the copy.
        ids64 = np.ascontiguousarray(ids, dtype=np.uint64)
        uids = [s["uid"] for s in m["shards"]]
        _with_progress_bar(
            "copy",
            progress,
            lambda cb: dict(
                w._w.copy_from(os.fspath(src.path), ids64, expect_shards=uids, progress=cb)
            ),
            reads_per_byte=1,
        )
        return len(ids)
    disable = None if progress is None else not progress
    for sid in tqdm(ids.tolist(), desc="copy", unit="sample", disable=disable):
        r = src[sid]
        if r.counts is None:
            # Top-K records always carry log-probabilities. Decoded from a valid store,
            # a row can fail only the writer's mass check: a coarse abs codec (a bound
            # of about 0.1 nat or more) rounds a row's mass up past what a store takes.
            try:
                w.add(sid, r.input_ids, r.topk_ids, np.asarray(r.topk_logprobs))
            except InvalidRecordError as e:
                err = InvalidRecordError(
                    f"{e}; they are the values of sample {sid} as decoded from "
                    f"{src.path}, whose codec {_codec_spec(m['codec'])!r} rounds rows "
                    "up: a copy with its own codec (codec=None) keeps them as stored"
                )
                err.sample_id = sid
                raise err from e
        else:
            lps = r.topk_logprobs if keep_lp else None
            # Decoded values: a coarse codec may have rounded a row's mass above what a
            # capture may pass (the bound of the codec they are written with still holds).
            w.add_sampled(sid, r.input_ids, r.topk_ids, r.counts, lps, check_mass=False)
    return len(ids)
