//! Helpers shared by the unit tests of several modules.

use std::path::Path;

use crate::codec::LogprobCodec;
use crate::format::Kind;
use crate::writer::{Mode, StoreSpec, StoreWriter, WriterOptions};

/// Xorshift64: the test data's random numbers (`x` must not be 0). Advances `x` and
/// returns its new value.
pub(crate) fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// A lossless top-K store (K = 2, V = 50) of the samples `ids`, 9 positions each, in shards
/// of about 400 bytes (several shards of several chunks).
pub(crate) fn write_small_store(dir: &Path, mode: Mode, ids: std::ops::Range<u64>) {
    let mut w = open_small_store(dir, mode);
    add_small_samples(&mut w, ids);
    w.close().unwrap();
}

/// The writer of [`write_small_store`], open and empty.
pub(crate) fn open_small_store(dir: &Path, mode: Mode) -> StoreWriter {
    let spec = StoreSpec {
        kind: Kind::TopK,
        k: 2,
        vocab_size: 50,
        temperature: 1.0,
        logprobs: Some(LogprobCodec::Lossless),
        teacher: None,
        tokenizer: None,
        metadata: None,
    };
    let opts = WriterOptions { shard_bytes: 400, chunk_positions: 20, zstd_level: 1 };
    StoreWriter::open(dir, spec, mode, opts).unwrap()
}

/// Adds the samples `ids` of [`write_small_store`] to `w`.
pub(crate) fn add_small_samples(w: &mut StoreWriter, ids: std::ops::Range<u64>) {
    for sid in ids {
        let input: Vec<i64> = (0..9).map(|i| (i * 3 + sid as i64) % 50).collect();
        let ids: Vec<i64> = (0..18).map(|i| (i * 7 + sid as i64) % 50).collect();
        let lps: Vec<f32> = (0..18).map(|i| if i % 2 == 0 { -0.5 } else { -2.0 }).collect();
        w.add(sid, 9, |buf, seen| {
            crate::record::append_topk(
                buf,
                seen,
                sid,
                crate::record::IdArray::I64(&input),
                crate::record::IdArray::I64(&ids),
                &[9, 2],
                &lps,
                &[9, 2],
                2,
                50,
            )
        })
        .unwrap();
    }
}
