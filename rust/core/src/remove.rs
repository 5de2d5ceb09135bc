//! `remove`: take samples out of a store in place.
//!
//! Documents found after the capture to be duplicates, test-set contamination or data that
//! must be deleted leave the store without the rest being decoded: only the shards that hold
//! them are rewritten, each as a new shard in the old one's place (and under its sequence
//! number, so that a manifest rebuilt from the shard files keeps the order). A chunk none of whose
//! records goes keeps its stored bytes (copied unchanged, so its values stay bit for bit
//! what they were, whatever the codec); a chunk all of whose records go is left out; a chunk
//! that holds both is decoded and its remaining records encoded again with the store's
//! codec (exact for `lossless`; for a lossy codec the bound then holds against the values
//! decoded before, as for any record written again).
//!
//! It is a writer like any other: it holds the store's lock, writes and fsyncs the new
//! shards first, then replaces the manifest atomically, so a removal that fails or is
//! killed leaves the store as it was (plus orphan files, which `verify` lists), but for a
//! failed fsync of the directory after the new manifest is in place: then it reports the
//! error and keeps the old shard files as well as the new ones. The old
//! shard files are deleted once the new manifest is committed (as a writer replacing a
//! store does; a file hard-linked into another store by `merge` stays there).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::clean::{FileLeft, delete_left_out};
use crate::codec::{self, ChunkBuf, CodecParams, EncodeScratch};
use crate::error::{Error, Result};
use crate::manifest::{self, CommitError, MANIFEST_NAME, Manifest, ShardInfo};
use crate::progress::{self, Progress, Ticker};
use crate::reader::{ShardReader, params_from_manifest};
use crate::writer::{self, SHARDS_DIR, ShardWriter};

/// What [`remove_samples`] may do.
#[derive(Debug, Clone, Copy, Default)]
pub struct RemoveOptions {
    /// Plan only: report what would be removed and rewritten, change nothing (and take no
    /// lock).
    pub dry_run: bool,
    /// Ignore ids the store does not hold (by default one of them stops the removal before
    /// anything changes).
    pub missing_ok: bool,
}

/// What became of one shard that held samples to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardRemoval {
    /// The shard's file before the removal.
    pub file: String,
    /// The shard written in its place; `None` when none of its samples is left, or in a
    /// dry run.
    pub new_file: Option<String>,
    pub samples_removed: u64,
    pub positions_removed: u64,
    /// Samples of the shard that stay.
    pub samples_kept: u64,
    /// Chunks whose stored bytes were copied unchanged.
    pub chunks_copied: u64,
    /// Chunks that held removed and remaining records: decoded and encoded again.
    pub chunks_reencoded: u64,
    /// Chunks that held only removed records.
    pub chunks_dropped: u64,
}

/// What [`remove_samples`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoveReport {
    /// The shards that held samples to remove, in manifest order.
    pub shards: Vec<ShardRemoval>,
    pub samples_removed: u64,
    pub positions_removed: u64,
    /// Requested ids the store does not hold, in increasing order (only with
    /// [`RemoveOptions::missing_ok`]; otherwise the first of them is an error).
    pub missing_ids: Vec<u64>,
    /// The store's samples and positions after the removal.
    pub num_samples: u64,
    pub num_positions: u64,
    /// Bytes of the store's shard files before and after (after: planned, in a dry run
    /// only the shards dropped whole are counted out).
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Whether a new manifest was committed (false in a dry run and when nothing was to
    /// be removed).
    pub committed: bool,
    /// Old shard files that could not be deleted after the commit, with the error: they
    /// still hold the removed samples' bytes, though the store no longer refers to them
    /// (`verify` lists them as orphans; `clean` deletes them once the cause is fixed).
    pub left_behind: Vec<FileLeft>,
}

/// Remove the samples `sample_ids` from the store at `dir`; see the module documentation.
pub fn remove_samples(dir: &Path, sample_ids: &[u64], opts: RemoveOptions) -> Result<RemoveReport> {
    remove_samples_with_progress(dir, sample_ids, opts, &progress::ignore)
}

/// [`remove_samples`], calling `progress(done, total)` with the bytes of the affected
/// shards processed so far and their total; a `false` from it stops the removal before the
/// next chunk, with nothing changed ([`progress::stopped`]).
pub fn remove_samples_with_progress(
    dir: &Path,
    sample_ids: &[u64],
    opts: RemoveOptions,
    progress: Progress<'_>,
) -> Result<RemoveReport> {
    // A directory without a store is refused before the lock would leave a file in it.
    Manifest::read_committed(dir)?;
    let _lock = if opts.dry_run { None } else { Some(writer::lock(dir)?) };
    let manifest = Manifest::read(dir)?;
    let p = params_from_manifest(&manifest, &dir.join(MANIFEST_NAME))?;
    let removed: HashSet<u64> = sample_ids.iter().copied().collect();
    let mut found: HashSet<u64> = HashSet::with_capacity(removed.len());

    // Which shards hold what: footers only, one shard open at a time (a store may hold
    // more shards than a process may open files).
    let mut affected: Vec<usize> = Vec::new();
    let mut report = RemoveReport::default();
    for (i, info) in manifest.shards.iter().enumerate() {
        // Opening checks the entry's size against the file's: the sum is of real sizes.
        let shard = ShardReader::open(dir, i as u32, info, &p, false)?;
        report.bytes_before += info.bytes;
        let mut r = ShardRemoval { file: info.file.clone(), ..Default::default() };
        for rec in &shard.footer.records {
            if removed.contains(&rec.sample_id) {
                found.insert(rec.sample_id);
                r.samples_removed += 1;
                r.positions_removed += u64::from(rec.length);
            } else {
                r.samples_kept += 1;
            }
        }
        if r.samples_removed > 0 {
            affected.push(i);
            report.shards.push(r);
        }
    }
    report.missing_ids = removed.difference(&found).copied().collect();
    report.missing_ids.sort_unstable();
    if let (false, Some(&sample_id)) = (opts.missing_ok, report.missing_ids.first()) {
        let more = report.missing_ids.len() as u64 - 1;
        return Err(Error::MissingSample { sample_id, path: dir.to_path_buf(), more });
    }
    report.samples_removed = report.shards.iter().map(|r| r.samples_removed).sum();
    report.positions_removed = report.shards.iter().map(|r| r.positions_removed).sum();
    // (Each shard's counts were checked against its footer as it was opened.)
    report.num_samples = manifest.num_samples.saturating_sub(report.samples_removed);
    report.num_positions = manifest.num_positions.saturating_sub(report.positions_removed);
    let dropped_whole: u64 = affected
        .iter()
        .map(|&i| &manifest.shards[i])
        .zip(&report.shards)
        .filter(|(_, r)| r.samples_kept == 0)
        .map(|(info, _)| info.bytes)
        .sum();
    report.bytes_after = report.bytes_before.saturating_sub(dropped_whole);
    if opts.dry_run || affected.is_empty() {
        return Ok(report);
    }

    let total: u64 = affected.iter().map(|&i| manifest.shards[i].bytes).sum();
    let ticker = Ticker::new(progress, total);
    let mut created: Vec<PathBuf> = Vec::new();
    let rewritten =
        rewrite_shards(dir, &manifest, &p, &affected, &removed, &mut report, &mut created, &ticker);
    let committed = rewritten.and_then(|new_infos| {
        ticker.check()?;
        let mut m = manifest.clone();
        let mut replacements = affected.iter().zip(new_infos).peekable();
        let mut shards = Vec::with_capacity(m.shards.len());
        for (i, info) in manifest.shards.iter().enumerate() {
            match replacements.next_if(|(a, _)| **a == i) {
                Some((_, Some(new))) => shards.push(new),
                Some((_, None)) => {}
                None => shards.push(info.clone()),
            }
        }
        m.shards = shards;
        m.num_samples = m.shards.iter().map(|s| s.num_samples).sum();
        m.num_positions = m.shards.iter().map(|s| s.num_positions).sum();
        m.updated_by = writer::tool();
        manifest::sync_dir(&dir.join(SHARDS_DIR))?;
        Ok(m)
    });
    let m = match committed.map(|m| m.commit(dir).map(|()| m)) {
        Ok(Ok(m)) => m,
        Err(e) | Ok(Err(CommitError::NotReplaced(e))) => {
            for path in created {
                let _ = fs::remove_file(path);
            }
            return Err(e);
        }
        // The new manifest is in place (not durably): its new shards must stay, and so must
        // the old ones a power loss could bring the old manifest back to.
        Ok(Err(CommitError::NotDurable(e))) => return Err(e),
    };
    report.committed = true;
    report.bytes_after = m.shards.iter().map(|s| s.bytes).sum();
    // The old files are no longer part of the store. Failing to delete one leaves an
    // orphan, not a fault, but one that holds what was to be removed: it is reported.
    let old_files = affected.iter().map(|&i| manifest.shards[i].file.as_str());
    report.left_behind = delete_left_out(dir, old_files).1;
    // Best effort: the removal is committed; deletions lost to a power loss leave orphans.
    let _ = manifest::sync_dir(&dir.join(SHARDS_DIR));
    ticker.finish();
    Ok(report)
}

/// Write the new shard of every affected shard; returns, per affected shard, its new entry
/// (`None` when none of its samples is left).
#[allow(clippy::too_many_arguments)]
fn rewrite_shards(
    dir: &Path,
    manifest: &Manifest,
    p: &CodecParams,
    affected: &[usize],
    removed: &HashSet<u64>,
    report: &mut RemoveReport,
    created: &mut Vec<PathBuf>,
    ticker: &Ticker<'_>,
) -> Result<Vec<Option<ShardInfo>>> {
    let tick = |n: u64| ticker.tick(n);
    let mut next_seq = writer::max_seq(dir)?.map_or(0, |s| s + 1);
    // Chunks are encoded again with the store's settings (the level is informational in the
    // manifest; a level outside zstd's range there is not worth failing over).
    let params = CodecParams { zstd_level: manifest.codec.zstd_level.clamp(1, 22), ..*p };
    let mut scratch = EncodeScratch::default();
    let mut buf = ChunkBuf::default();
    let mut out = Vec::with_capacity(affected.len());
    for (&i, r) in affected.iter().zip(report.shards.iter_mut()) {
        let info = &manifest.shards[i];
        if r.samples_kept == 0 {
            r.chunks_dropped = info.num_chunks;
            tick(info.bytes);
            out.push(None);
            continue;
        }
        let shard = ShardReader::open(dir, i as u32, info, p, false)?;
        let mut w = ShardWriter::replacing(dir, &shard, &mut next_seq)?;
        created.push(w.path.clone());
        for (c, e) in shard.footer.chunks.iter().enumerate() {
            ticker.check()?;
            let records = shard.chunk_record_entries(c)?;
            let gone = records.iter().filter(|rec| removed.contains(&rec.sample_id)).count();
            if gone == 0 {
                w.copy_chunk(&shard.chunk_bytes(c)?, e, records)?;
                r.chunks_copied += 1;
            } else if gone == records.len() {
                r.chunks_dropped += 1;
            } else {
                let decoded = shard.decode_chunk(c, p)?;
                buf.clear();
                for (j, rec) in records.iter().enumerate() {
                    if !removed.contains(&rec.sample_id) {
                        buf.push_decoded(&decoded, j, rec.sample_id, p);
                    }
                }
                codec::encode_chunk(&buf, &params, &mut scratch)?;
                w.add_chunk(scratch.payload(), &buf)?;
                r.chunks_reencoded += 1;
            }
            tick(u64::from(e.stored_len));
        }
        tick(info.bytes.saturating_sub(crate::copy::chunk_bytes(&shard)));
        let new = w.finish()?;
        // The new shard must open as the manifest will describe it before it is committed.
        ShardReader::open(dir, i as u32, &new, p, false)?;
        r.new_file = Some(new.file.clone());
        out.push(Some(new));
    }
    Ok(out)
}
