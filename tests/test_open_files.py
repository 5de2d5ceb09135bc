"""A store of more shards than the process may open files reads with positioned reads
(network file systems, ``mmap=False``): its shards share a bounded set of open files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import make_topk

import logitcache as lc

CHILD = """
import resource, sys
import numpy as np
import logitcache as lc
resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
mapped = lc.open_store(sys.argv[1], mmap=True)
store = lc.open_store(sys.argv[1], mmap=False)
assert store.mapped_shards == 0
sids = store.sample_ids()
for sid in sids:
    a, b = store[int(sid)], mapped[int(sid)]
    assert np.array_equal(a.topk_ids, b.topk_ids)
    assert np.array_equal(a.topk_logprobs, b.topk_logprobs)
batch = store.read_batch(sids)
assert np.array_equal(batch.topk_ids, mapped.read_batch(sids).topk_ids)
print("read", len(sids), "samples from", len(store.meta["shards"]), "shards")
"""


def test_more_shards_than_open_files(tmp_path: Path) -> None:
    path = tmp_path / "s"
    rng = np.random.default_rng(3)
    with lc.StoreWriter(path, vocab_size=300, k=4, chunk_positions=4, shard_size=64) as w:
        for sid in range(300):
            w.add(sid, *make_topk(rng, 4, 4, 300))
    assert len(lc.open_store(path).meta["shards"]) == 300
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "read 300 samples from 300 shards" in r.stdout


REMOVED_UNDER_READER = """
import resource, sys
import logitcache as lc
resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
store = lc.open_store(sys.argv[1], mmap=False, cache_chunks=0)
for sid in range(1, 300):  # shard 0's file is closed to make room for the others
    store[sid]
lc.remove_samples(sys.argv[1], [0])  # deletes shard 0's file
try:
    store[0]
except FileNotFoundError as e:
    print("error:", e)
"""


def test_a_reopened_shard_deleted_meanwhile_says_to_open_again(tmp_path: Path) -> None:
    """The one case where a reader loses its view (docs/reliability.md, Open files): the
    error says why and what to do."""
    path = tmp_path / "s"
    rng = np.random.default_rng(4)
    with lc.StoreWriter(path, vocab_size=300, k=4, chunk_positions=4, shard_size=64) as w:
        for sid in range(300):
            w.add(sid, *make_topk(rng, 4, 4, 300))
    r = subprocess.run(
        [sys.executable, "-c", REMOVED_UNDER_READER, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "reopen shard (if a removal or a replacing writer deleted it" in r.stdout, r.stdout
    assert "open the store again" in r.stdout
