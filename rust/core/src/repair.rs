//! `repair`: make a damaged store whole again by giving up what cannot be read.
//!
//! A store opens only when every shard's header, trailer and footer are sound, so one
//! damaged shard footer makes every other shard unreachable too; a damaged chunk fails
//! every read that touches it. Repair checks the whole store as `verify` does, then
//! commits a manifest without the damage: a shard whose footer is sound but some of whose
//! chunks are not is rewritten as a new shard holding its sound chunks (their stored bytes
//! copied unchanged, so nothing is decoded and encoded again); a shard that cannot be
//! located at all (missing, truncated, damaged header, trailer or footer) is left out. The
//! samples of what is left out are lost, and reported (their ids where a footer names
//! them). Only what is shown to be damaged is given up: a shard that cannot be checked for
//! another reason (permission denied, say) stops the repair before anything changes.
//!
//! It is a writer like any other: it holds the store's lock, writes its new shards first
//! (fsynced) and then replaces the manifest atomically, so a repair that is killed leaves
//! the store as it found it (plus orphan files, which `verify` lists). The damaged shard
//! files are not part of the repaired store; they stay on disk, as orphans, unless asked to
//! be removed.

use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::clean::{FileLeft, delete_left_out};
use crate::error::{Error, Location, Result};
use crate::format::{HEADER_LEN, ShardHeader, ShardIndex, TRAILER_LEN, Trailer};
use crate::manifest::{self, CommitError, MANIFEST_NAME, Manifest, ShardInfo};
use crate::progress::{self, Progress, Ticker};
use crate::reader::{ShardReader, params_from_manifest};
use crate::source::Source;
use crate::verify::{ShardInspection, inspect_shard_ticked};
use crate::writer::{self, SHARDS_DIR, ShardWriter};

/// What [`repair`] may do.
#[derive(Debug, Clone, Copy, Default)]
pub struct RepairOptions {
    /// Check and plan only: report what a repair would do, change nothing (and take no
    /// lock: a writer may be at work).
    pub dry_run: bool,
    /// Delete the damaged shard files once the repaired manifest is committed (by default
    /// they stay, as orphans, for whoever wants to look at them).
    pub remove_damaged: bool,
}

/// What became of one damaged shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRepair {
    /// The damaged shard's file, as the manifest named it.
    pub file: String,
    /// Every fault found in it.
    pub problems: Vec<String>,
    /// The new shard holding its sound chunks; `None` when nothing of it was kept, or in a
    /// dry run.
    pub new_file: Option<String>,
    /// Sound chunks kept (copied into the new shard).
    pub chunks_kept: u64,
    /// Chunks given up (all of them when the shard cannot be located).
    pub chunks_lost: u64,
    pub samples_lost: u64,
    pub positions_lost: u64,
    /// Whether the lost samples' ids are known (the shard's footer could be read).
    pub lost_ids_known: bool,
}

/// What [`repair`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Shards in the manifest before the repair.
    pub shards: usize,
    /// The damaged shards, in manifest order; empty when the store is sound.
    pub repairs: Vec<ShardRepair>,
    /// Ids of the samples lost whose ids are known, in increasing order.
    pub lost_sample_ids: Vec<u64>,
    /// Samples and positions lost in all (those of unlocatable shards included, counted
    /// from the manifest).
    pub samples_lost: u64,
    pub positions_lost: u64,
    /// Whether a repaired manifest was committed.
    pub committed: bool,
    /// Damaged shard files deleted ([`RepairOptions::remove_damaged`]).
    pub removed: Vec<String>,
    /// Damaged shard files that could not be deleted after the commit, with the error
    /// (`verify` lists them as orphans; `clean` deletes them once the cause is fixed).
    pub left_behind: Vec<FileLeft>,
}

impl RepairReport {
    /// True when the store had no fault (nothing to repair).
    pub fn sound(&self) -> bool {
        self.repairs.is_empty()
    }
}

/// Repair the store at `dir`; see the module documentation.
pub fn repair(dir: &Path, opts: RepairOptions) -> Result<RepairReport> {
    repair_with_progress(dir, opts, &progress::ignore)
}

/// [`repair`], calling `progress(done, total)` during its check of the store, as
/// [`crate::verify::verify_with_progress`] does (the copies of sound chunks that follow are
/// not counted: at most the size of the damaged shards). A `false` from `progress` stops
/// the repair at the next chunk of its check, or before its commit, with nothing changed
/// ([`progress::stopped`]).
pub fn repair_with_progress(
    dir: &Path,
    opts: RepairOptions,
    progress: Progress<'_>,
) -> Result<RepairReport> {
    // A directory without a store is refused before the lock would leave a file in it.
    Manifest::read_committed(dir)?;
    let _lock = if opts.dry_run { None } else { Some(writer::lock(dir)?) };
    // Everything hangs on the manifest (which shards are committed, what they must hold);
    // a damaged one is for `rebuild::rebuild_manifest`, which asks the caller what the
    // shards cannot say.
    let manifest = Manifest::read(dir)?;
    let mpath = dir.join(MANIFEST_NAME);
    let p = params_from_manifest(&manifest, &mpath)?;
    let total = 2 * manifest.shards.iter().map(|s| s.bytes).sum::<u64>();
    let ticker = Ticker::new(progress, total);
    let tick = |n: u64| ticker.tick(n);
    // Sound shards are kept by their sample ids only, not open: a store may hold more
    // shards than a process may open files (a shard with no fault is one whose problems
    // are empty; only damaged shards keep their reader, to copy from).
    let found: Vec<(ShardInspection, Vec<u64>)> = crate::threads::install(|| {
        manifest
            .shards
            .par_iter()
            .enumerate()
            .map(|(i, info)| {
                if ticker.stopping() {
                    return (ShardInspection::default(), Vec::new());
                }
                let mut f = inspect_shard_ticked(dir, i as u32, info, &p, &tick);
                let mut ids = Vec::new();
                if f.problems.is_empty()
                    && let Some(shard) = f.reader.take()
                {
                    ids = shard.footer.records.iter().map(|r| r.sample_id).collect();
                }
                (f, ids)
            })
            .collect()
    })?;
    let (found, sound_ids): (Vec<ShardInspection>, Vec<Vec<u64>>) = found.into_iter().unzip();
    ticker.check()?;
    ticker.finish();
    // Repair gives up only data shown to be damaged: a shard that could not be checked
    // (say, permission denied) is not dropped; the repair stops instead.
    if let Some(e) = found.iter().find_map(|f| f.unchecked.as_ref()) {
        return Err(Error::State(format!(
            "repair stopped, nothing changed: a shard could not be checked ({e}); fix that and run it again"
        )));
    }

    let mut report = RepairReport { shards: manifest.shards.len(), ..Default::default() };
    let mut lost_ids = Vec::new();
    let mut kept_ids: Vec<(u64, usize)> = Vec::new();
    for (i, (info, f)) in manifest.shards.iter().zip(&found).enumerate() {
        match (f.problems.is_empty(), &f.reader) {
            (true, _) => kept_ids.extend(sound_ids[i].iter().map(|&sid| (sid, i))),
            (false, Some(shard)) => {
                let mut r = ShardRepair {
                    file: info.file.clone(),
                    problems: f.problems.clone(),
                    new_file: None,
                    chunks_kept: 0,
                    chunks_lost: 0,
                    samples_lost: 0,
                    positions_lost: 0,
                    lost_ids_known: true,
                };
                for (c, e) in shard.footer.chunks.iter().enumerate() {
                    let records = shard.chunk_record_entries(c)?;
                    if f.bad_chunks.binary_search(&c).is_ok() {
                        r.chunks_lost += 1;
                        r.samples_lost += records.len() as u64;
                        r.positions_lost += u64::from(e.num_positions);
                        lost_ids.extend(records.iter().map(|rec| rec.sample_id));
                    } else {
                        r.chunks_kept += 1;
                        kept_ids.extend(records.iter().map(|rec| (rec.sample_id, i)));
                    }
                }
                report.repairs.push(r);
            }
            (false, None) => {
                // Left out whole; its footer may still say which samples it held (a damaged
                // header, say, makes the shard unreadable but leaves the footer sound).
                let ids = footer_sample_ids(&dir.join(&info.file), info);
                let lost_ids_known = ids.is_some();
                lost_ids.extend(ids.into_iter().flatten());
                report.repairs.push(ShardRepair {
                    file: info.file.clone(),
                    problems: f.problems.clone(),
                    new_file: None,
                    chunks_kept: 0,
                    chunks_lost: info.num_chunks,
                    samples_lost: info.num_samples,
                    positions_lost: info.num_positions,
                    lost_ids_known,
                });
            }
        }
    }
    // A sample id stored twice is not damage that dropping unreadable bytes can mend (both
    // copies read fine); which one is right is not for repair to guess.
    kept_ids.sort_unstable();
    if let Some(w) = kept_ids.windows(2).find(|w| w[0].0 == w[1].0) {
        let (a, b) = (&manifest.shards[w[0].1], &manifest.shards[w[1].1]);
        return Err(Error::corrupt(
            Location::file(dir.join(&b.file)).sample(w[0].0),
            format!(
                "sample id {} is stored twice (also in {}); repair cannot tell which copy to keep",
                w[0].0, a.file
            ),
        ));
    }
    lost_ids.sort_unstable();
    report.lost_sample_ids = lost_ids;
    report.samples_lost = report.repairs.iter().map(|r| r.samples_lost).sum();
    report.positions_lost = report.repairs.iter().map(|r| r.positions_lost).sum();
    if report.sound() || opts.dry_run {
        return Ok(report);
    }

    let mut created: Vec<PathBuf> = Vec::new();
    let rewritten = rewrite_damaged(dir, &found, &p, &mut report, &mut created);
    let committed = rewritten.and_then(|new_infos| {
        ticker.check()?;
        let mut m = manifest.clone();
        m.shards = manifest
            .shards
            .iter()
            .zip(&found)
            .zip(new_infos)
            .filter_map(
                |((info, f), new)| {
                    if f.problems.is_empty() { Some(info.clone()) } else { new }
                },
            )
            .collect();
        m.num_samples = m.shards.iter().map(|s| s.num_samples).sum();
        m.num_positions = m.shards.iter().map(|s| s.num_positions).sum();
        m.updated_by = writer::tool();
        manifest::sync_dir(&dir.join(SHARDS_DIR))?;
        Ok(m)
    });
    let not_committed = match committed.map(|m| m.commit(dir)) {
        Ok(Ok(())) => None,
        Err(e) | Ok(Err(CommitError::NotReplaced(e))) => Some(e),
        // The repaired manifest is in place (not durably): its new shards must stay, and so
        // must the damaged files a power loss could bring the old manifest back to.
        Ok(Err(CommitError::NotDurable(e))) => return Err(e),
    };
    if let Some(e) = not_committed {
        for path in created {
            let _ = fs::remove_file(path);
        }
        for r in &mut report.repairs {
            r.new_file = None;
        }
        return Err(e);
    }
    report.committed = true;
    if opts.remove_damaged {
        // After the commit, which stands whatever happens here: an error now would lose the
        // report (the lost ids) of a repair that was done.
        let damaged = report.repairs.iter().map(|r| r.file.as_str());
        (report.removed, report.left_behind) = delete_left_out(dir, damaged);
        // Best effort: deletions lost to a power loss leave orphans.
        let _ = manifest::sync_dir(&dir.join(SHARDS_DIR));
    }
    Ok(report)
}

/// The sample ids a shard's footer lists, read without its header, when the file is the
/// manifest's (its size; its header's uid, if the header can be read) and its trailer and
/// footer check out (their CRCs) and agree with the manifest's counts: what a shard left out
/// for a damaged header held.
fn footer_sample_ids(path: &Path, info: &ShardInfo) -> Option<Vec<u64>> {
    let source = Source::open(path, false).ok()?;
    let loc = Location::file(path);
    let len = source.len();
    if len != info.bytes {
        return None;
    }
    if let Ok(h) = ShardHeader::decode(&source.read(0, HEADER_LEN, &loc).ok()?, &loc)
        && format!("{:016x}", h.uid) != info.uid
    {
        return None;
    }
    let at = len.checked_sub(TRAILER_LEN as u64)?;
    let trailer = Trailer::decode(&source.read(at, TRAILER_LEN, &loc).ok()?, len, &loc).ok()?;
    let footer_len = usize::try_from(trailer.footer_len).ok()?;
    let bytes = source.read(trailer.footer_offset, footer_len, &loc).ok()?;
    let footer = ShardIndex::parse(&bytes, &trailer, &loc).ok()?.footer;
    let records = &footer.records;
    let positions: u64 = records.iter().map(|r| u64::from(r.length)).sum();
    (records.len() as u64 == info.num_samples
        && positions == info.num_positions
        && footer.chunks.len() as u64 == info.num_chunks)
        .then(|| records.iter().map(|r| r.sample_id).collect())
}

/// Write a new shard of the sound chunks of every damaged shard whose footer could be
/// read; returns, per manifest shard, the new shard's entry (None for sound shards, for
/// shards with nothing left, and for shards that cannot be located). `found` holds a
/// reader for exactly the damaged shards that can be located.
fn rewrite_damaged(
    dir: &Path,
    found: &[ShardInspection],
    p: &crate::codec::CodecParams,
    report: &mut RepairReport,
    created: &mut Vec<PathBuf>,
) -> Result<Vec<Option<ShardInfo>>> {
    let mut next_seq = writer::max_seq(dir)?.map_or(0, |s| s + 1);
    let mut repairs = report.repairs.iter_mut();
    let mut out = Vec::with_capacity(found.len());
    for (i, f) in found.iter().enumerate() {
        if f.problems.is_empty() {
            out.push(None);
            continue;
        }
        let r = repairs.next().ok_or_else(|| Error::State("repair plan out of step".into()))?;
        let Some(shard) = &f.reader else {
            out.push(None);
            continue;
        };
        if r.chunks_kept == 0 {
            out.push(None);
            continue;
        }
        let mut w = ShardWriter::replacing(dir, shard, &mut next_seq)?;
        created.push(w.path.clone());
        for (c, e) in shard.footer.chunks.iter().enumerate() {
            if f.bad_chunks.binary_search(&c).is_ok() {
                continue;
            }
            let bytes = shard.chunk_bytes(c)?;
            w.copy_chunk(&bytes, e, shard.chunk_record_entries(c)?)?;
        }
        let info = w.finish()?;
        // The new shard must open as the manifest will describe it before it is committed.
        ShardReader::open(dir, i as u32, &info, p, false)?;
        r.new_file = Some(info.file.clone());
        out.push(Some(info));
    }
    Ok(out)
}
