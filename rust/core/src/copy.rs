//! `copy`: records of one store written into another store of the same encoding, as they are
//! stored (the fast and exact path of `copy_store` when the codec does not change).
//!
//! A chunk all of whose records are copied keeps its stored bytes; a chunk of copied and
//! other records is decoded and its copied records encoded again (exact for `lossless`,
//! within the codec's bound of the decoded values otherwise). Records keep the source's
//! order. The destination is an open [`StoreWriter`]: what is copied is committed with it.

use std::collections::HashSet;
use std::path::Path;

use crate::error::{Error, Result};
use crate::manifest::{MANIFEST_NAME, Manifest};
use crate::progress::{Progress, Ticker};
use crate::reader::{ShardReader, params_from_manifest};
use crate::writer::{CopiedRecords, StoreWriter};

/// Copy the records of the store at `source` whose sample ids are in `keep` into `writer`;
/// see the module documentation. The stores must be encoded alike (kind, K, vocabulary,
/// codec, temperature: else [`crate::Error::Mismatch`] before anything is added).
/// `expect_shards`: the uids of the shards the source had when the caller opened it; a
/// source whose manifest no longer starts with them (it was replaced or rewritten since, so
/// records the caller saw may be gone or different) is refused with [`crate::Error::Mismatch`]
/// (field `shards`). Checked against the manifest this copy reads, so nothing can change in
/// between; shards appended since hold none of the caller's ids.
/// `progress(done, total)` gets the bytes of the source's shards gone through; a `false`
/// from it stops the copy at the next chunk ([`crate::progress::stopped`]; what was
/// added stays in the writer, uncommitted: abort it).
pub fn copy_records(
    writer: &mut StoreWriter,
    source: &Path,
    keep: &HashSet<u64>,
    expect_shards: Option<&[String]>,
    progress: Progress<'_>,
) -> Result<CopiedRecords> {
    let m = Manifest::read_committed(source)?;
    if let Some(expected) = expect_shards {
        check_first_shards(&m, source, expected)?;
    }
    let p = params_from_manifest(&m, &source.join(MANIFEST_NAME))?;
    let total: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let ticker = Ticker::new(progress, total);
    let tick = |n: u64| ticker.tick(n);
    // Every sample to copy is checked against the destination first, so that a duplicate
    // stops the copy before anything is added. One shard open at a time: a store may hold
    // more shards than a process may open files.
    let mut seen = HashSet::with_capacity(keep.len());
    for (i, info) in m.shards.iter().enumerate() {
        let shard = ShardReader::open(source, i as u32, info, &p, false)?;
        for r in shard.footer.records.iter().filter(|r| keep.contains(&r.sample_id)) {
            if writer.holds(r.sample_id) || !seen.insert(r.sample_id) {
                return Err(Error::DuplicateSample {
                    sample_id: r.sample_id,
                    msg: format!(
                        "{} holds it, and it is already in {} (or earlier in {})",
                        shard.path.display(),
                        writer.dir().display(),
                        source.display()
                    ),
                });
            }
        }
    }
    let mut out = CopiedRecords::default();
    for (i, info) in m.shards.iter().enumerate() {
        ticker.check()?;
        let shard = ShardReader::open(source, i as u32, info, &p, false)?;
        let c = writer.copy_records(&shard, &|sid| keep.contains(&sid), &tick)?;
        tick(info.bytes.saturating_sub(chunk_bytes(&shard)));
        out.samples += c.samples;
        out.positions += c.positions;
        out.chunks_copied += c.chunks_copied;
        out.chunks_reencoded += c.chunks_reencoded;
    }
    ticker.check()?;
    ticker.finish();
    Ok(out)
}

/// Refuse a manifest whose shards do not start with the uids `expected`.
fn check_first_shards(m: &Manifest, source: &Path, expected: &[String]) -> Result<()> {
    let differs =
        expected.iter().enumerate().find(|&(i, uid)| m.shards.get(i).is_none_or(|s| &s.uid != uid));
    match differs {
        None => Ok(()),
        Some((i, uid)) => Err(Error::Mismatch {
            path: source.to_path_buf(),
            field: "shards".into(),
            expected: format!("shard {i} to be {uid}, as when it was opened"),
            found: format!(
                "{}: the store was replaced or rewritten since (a writer with mode='w', \
                 repair or remove); open it again",
                m.shards.get(i).map_or_else(|| "no shard".into(), |s| s.uid.clone())
            ),
        }),
    }
}

/// Stored bytes of a shard's chunks (the rest of the file: header, footer, trailer).
pub(crate) fn chunk_bytes(shard: &ShardReader) -> u64 {
    shard.footer.chunks.iter().map(|e| u64::from(e.stored_len)).sum()
}
