//! `verify`: check every byte of a store against its checksums and every decoded value
//! against the store's rules, reporting all faults found (not only the first), plus files
//! that no manifest refers to (orphans of a writer that died before committing).

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use crate::codec::DecodedChunk;
use crate::error::{Error, IoContext, Location, Result};
use crate::format::Kind;
use crate::manifest::{self, MANIFEST_NAME, Manifest};
use crate::progress::{self, Progress, Tick, Ticker};
use crate::reader::{ShardReader, params_from_manifest};
use crate::record::{self, MAX_LOGPROB, MAX_ROW_MASS, SeenIds};
use crate::writer::{LOCK_NAME, SHARDS_DIR};

/// What `verify` found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Faults in committed data: each says where and what.
    pub problems: Vec<String>,
    /// Files in the store directory that the manifest does not refer to.
    pub orphans: Vec<String>,
    /// Who held the store's lock as the check finished, or else as it started ("pid N"),
    /// if a writer did: the orphans may then include the shards it has not committed yet.
    /// `None` when no writer had the store open then, or when that could not be found out (a
    /// lock file that cannot be opened): it only qualifies the orphans, so it fails nothing.
    pub writer: Option<String>,
    /// Whether the manifest could be read (it cannot when damaged, or missing from a
    /// directory that holds `shards/`). When it could not, no shard was checked and no
    /// file is called an orphan: which files belong to the store is what it would say
    /// (`rebuild_manifest` finds out from the shards themselves).
    pub manifest_ok: bool,
    pub shards: usize,
    pub chunks: usize,
    pub samples: u64,
    pub positions: u64,
    pub bytes: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verify the store at `dir`.
pub fn verify(dir: &Path) -> Result<VerifyReport> {
    verify_with_progress(dir, &progress::ignore)
}

/// [`verify`], calling `progress(done, total)` as it goes, from whichever thread did the
/// work: `done` counts the bytes read for shards' whole-file checksums plus the stored bytes
/// of the chunks decoded and checked, out of `total`, twice the bytes the manifest lists
/// (shards are checked in parallel, so calls may arrive out of order; the last one is
/// `(total, total)`). Nothing is called when the manifest cannot be read. A `false` from
/// `progress` stops the check at its next chunk ([`progress::stopped`]).
pub fn verify_with_progress(dir: &Path, progress: Progress<'_>) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let manifest = match Manifest::read_committed(dir) {
        Ok(m) => m,
        // A writer creating the store has not committed yet: nothing to check, nothing
        // damaged.
        Err(Error::Locked { path, msg }) => {
            return Err(Error::Locked {
                path,
                msg: format!("{msg}, so there is nothing to verify"),
            });
        }
        // No manifest where shard files are: a store with a fault, as one whose manifest is
        // damaged. Otherwise (no such directory, a file, a writer killed before its first
        // shard left an empty shards/) there is no store to call damaged: an error.
        Err(e) if crate::manifest::is_missing(&e) => {
            if matches!(crate::writer::max_seq(dir), Ok(Some(_))) {
                report.problems.push(format!(
                    "{} is missing (the shard files are there: the manifest can be rebuilt \
                     from them)",
                    dir.join(MANIFEST_NAME).display()
                ));
                return Ok(report);
            }
            return Err(e);
        }
        // None is a fault of the store: an I/O error says nothing of its bytes, a newer
        // format is one this build cannot judge (upgrade logitcache), and an empty path
        // names no store.
        Err(
            e @ (Error::Io { .. }
            | Error::UnsupportedVersion { .. }
            | Error::InvalidArgument { .. }),
        ) => {
            return Err(e);
        }
        Err(e) => {
            report.problems.push(e.to_string());
            return Ok(report);
        }
    };
    let p = match params_from_manifest(&manifest, &dir.join(MANIFEST_NAME)) {
        Ok(p) => p,
        Err(e) => {
            report.problems.push(e.to_string());
            return Ok(report);
        }
    };
    report.manifest_ok = true;
    let writer_at_start = crate::writer::lock_holder(dir).ok().flatten();
    report.shards = manifest.shards.len();
    report.samples = manifest.num_samples;
    report.positions = manifest.num_positions;
    let total = 2 * manifest.shards.iter().map(|s| s.bytes).sum::<u64>();
    let ticker = Ticker::new(progress, total);
    let tick = |n: u64| ticker.tick(n);
    let results: Vec<(Vec<String>, usize, Vec<u64>)> = crate::threads::install(|| {
        manifest
            .shards
            .par_iter()
            .enumerate()
            .map(|(i, info)| {
                if ticker.stopping() {
                    return (Vec::new(), 0, Vec::new());
                }
                let found = inspect_shard_ticked(dir, i as u32, info, &p, &tick);
                match found.reader {
                    Some(shard) => {
                        let ids = shard.footer.records.iter().map(|r| r.sample_id).collect();
                        (found.problems, shard.num_chunks(), ids)
                    }
                    None => (found.problems, 0, Vec::new()),
                }
            })
            .collect()
    })?;
    ticker.check()?;
    ticker.finish();
    // Sized from the ids actually read, not from the manifest's count (untrusted until the
    // shards agree with it: a corrupt count must not drive an allocation).
    let read: usize = results.iter().map(|r| r.2.len()).sum();
    let mut seen_ids: HashSet<u64> = HashSet::with_capacity(read);
    for (i, (problems, chunks, ids)) in results.into_iter().enumerate() {
        report.problems.extend(problems);
        report.chunks += chunks;
        for sid in ids {
            if !seen_ids.insert(sid) {
                report.problems.push(format!(
                    "sample id {sid} is stored twice (again in shard {i}, {})",
                    manifest.shards[i].file
                ));
            }
        }
    }
    report.bytes = manifest.shards.iter().map(|s| s.bytes).sum();
    report.orphans = orphans(dir, &manifest)?;
    // The check may take minutes: shards that a writer committed meanwhile are named by the
    // manifest now, not by the one checked, and are the store's, not orphans.
    if let Ok(now) = Manifest::read(dir) {
        let named: HashSet<&str> = now.shards.iter().map(|s| s.file.as_str()).collect();
        report.orphans.retain(|f| !named.contains(f.as_str()));
    }
    report.writer = crate::writer::lock_holder(dir).ok().flatten().or(writer_at_start);
    Ok(report)
}

/// The CRC-32 and length of the file at `path`; `tick` gets the bytes as they are read, and
/// a `false` from it stops the reading with [`progress::stopped`].
pub(crate) fn file_crc(path: &Path, tick: Tick<'_>) -> Result<(u32, u64)> {
    let mut f = File::open(path).io_ctx("open shard", path)?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).io_ctx("read shard", path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
        if !tick(n as u64) {
            return Err(progress::stopped());
        }
    }
    Ok((h.finalize(), total))
}

/// [`inspect_shard`], with `tick` given twice the shard's listed bytes in all (the bytes of
/// its checksum pass and of its chunks as they are done, the rest once the shard is done,
/// whatever was found).
pub(crate) fn inspect_shard_ticked(
    dir: &Path,
    index: u32,
    info: &manifest::ShardInfo,
    p: &crate::codec::CodecParams,
    tick: Tick<'_>,
) -> ShardInspection {
    let ticked = AtomicU64::new(0);
    let count = |n: u64| {
        ticked.fetch_add(n, Ordering::Relaxed);
        tick(n)
    };
    let found = inspect_shard(dir, index, info, p, &count);
    let owed = (2 * info.bytes).saturating_sub(ticked.into_inner());
    if owed > 0 {
        tick(owed);
    }
    found
}

/// What checking one shard found: the faults, and what of the shard is sound.
#[derive(Default)]
pub(crate) struct ShardInspection {
    /// Each fault, as a message naming file, shard and chunk.
    pub problems: Vec<String>,
    /// The open shard when its header, trailer and footer are sound (else nothing of it
    /// can be located).
    pub reader: Option<ShardReader>,
    /// Chunks whose checksum, decoding or values failed, in increasing order.
    pub bad_chunks: Vec<usize>,
    /// The first error met that says nothing about the data (e.g. permission denied): the
    /// shard could not be checked, which is not the same as damaged.
    pub unchecked: Option<Error>,
}

/// errno of a device read error on Linux, macOS and the BSDs.
const EIO: i32 = 5;

/// Whether an error met while checking a shard is evidence of damage. I/O errors are only
/// when the file is missing, ends early, or the device reports a read error (EIO); others
/// (permissions, too many open files, ...) say nothing about the bytes.
pub(crate) fn is_damage(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => {
            matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
            ) || (cfg!(unix) && source.raw_os_error() == Some(EIO))
        }
        _ => true,
    }
}

/// Check one shard: its whole-file checksum, header, trailer, footer, and every chunk
/// (checksum, decoding, the writer's rules on the decoded values). `tick` receives the
/// bytes of the checksum pass and each chunk's stored bytes as they are done; a `false`
/// from it cuts the inspection short, the shard then `unchecked` ([`progress::stopped`]).
pub(crate) fn inspect_shard(
    dir: &Path,
    index: u32,
    info: &manifest::ShardInfo,
    p: &crate::codec::CodecParams,
    tick: Tick<'_>,
) -> ShardInspection {
    let path = dir.join(&info.file);
    let loc = Location::file(&path).shard(index);
    let mut found = ShardInspection {
        problems: Vec::new(),
        reader: None,
        bad_chunks: Vec::new(),
        unchecked: None,
    };
    let fail = |found: &mut ShardInspection, e: Error| {
        found.problems.push(e.to_string());
        if !is_damage(&e) && found.unchecked.is_none() {
            found.unchecked = Some(e);
        }
    };
    // A stop leaves the shard unchecked, not damaged: a caller that missed the stop would
    // then refuse to act on it (repair) instead of giving up data for it.
    let stopped = std::sync::atomic::AtomicBool::new(false);
    let tick = |n: u64| {
        let go = tick(n);
        if !go {
            stopped.store(true, Ordering::Relaxed);
        }
        go
    };
    let cut_short = |mut found: ShardInspection| {
        found.unchecked = Some(progress::stopped());
        found
    };
    match file_crc(&path, &tick) {
        Ok((crc, len)) => {
            let want = manifest::parse_checksum(&info.checksum);
            if Some(crc) != want || len != info.bytes {
                found.problems.push(
                    Error::corrupt(
                        loc.clone(),
                        format!(
                            "whole-file checksum {} over {len} bytes, manifest says {} over {} bytes",
                            manifest::format_checksum(crc),
                            info.checksum,
                            info.bytes
                        ),
                    )
                    .to_string(),
                );
            }
        }
        Err(_) if stopped.load(Ordering::Relaxed) => return cut_short(found),
        Err(e) => {
            fail(&mut found, e);
            return found;
        }
    }
    let shard = match ShardReader::open(dir, index, info, p, false) {
        Ok(s) => s,
        Err(e) => {
            fail(&mut found, e);
            return found;
        }
    };
    let mut seen = SeenIds::new(p.vocab_size);
    for c in 0..shard.num_chunks() {
        if !tick(shard.footer.chunks.get(c).map_or(0, |e| u64::from(e.stored_len))) {
            return cut_short(found);
        }
        let cloc = loc.clone().chunk(c as u64);
        let checked = shard.decode_chunk(c, p).and_then(|d| check_values(&d, p, &mut seen, &cloc));
        if let Err(e) = checked {
            fail(&mut found, e);
            found.bad_chunks.push(c);
        }
    }
    found.reader = Some(shard);
    found
}

/// Mass below which the writer's quick pass clears a decoded top-K row here: its sum of
/// [`record::approx_exp`] (relative error 2e-4, f32 sum within 1e-5) then puts the exact
/// mass below [`MAX_ROW_MASS`], under every limit the exact loop below applies, so a row it
/// clears passes that loop too.
const VERIFY_QUICK_MASS: f64 = MAX_ROW_MASS * (1.0 - 3e-4) - 2e-5;

/// The rules a writer enforces, re-checked on decoded data (all but the sampled rows' mass:
/// a coarse codec may round it above the writer's limit). Top-K rows go through the
/// writer's quick checks first (conflict detection for distinct ids, the branch-free pass
/// over the values); only rows those do not clear take the exact loop, which decides.
fn check_values(
    d: &DecodedChunk,
    p: &crate::codec::CodecParams,
    seen: &mut SeenIds,
    loc: &Location,
) -> Result<()> {
    let positions = d.input_ids.len();
    let k = p.k as usize;
    let topk = p.kind == Kind::TopK;
    let all_distinct = topk && record::rows_are_distinct_by_conflicts(&d.ids, k);
    for pos in 0..positions {
        let (e0, e1) = match p.kind {
            Kind::TopK => (pos * k, pos * k + k),
            Kind::Sampled => (d.entry_offsets[pos], d.entry_offsets[pos + 1]),
        };
        let ids = &d.ids[e0..e1];
        if !all_distinct && !seen.row_is_distinct(ids) {
            return Err(Error::corrupt(
                loc.clone(),
                format!("position {pos} of the chunk repeats a token id"),
            ));
        }
        if d.logprobs.is_empty() {
            continue;
        }
        let lp = &d.logprobs[e0..e1];
        if topk && record::row_values_are_clearly_fine(lp, VERIFY_QUICK_MASS) {
            continue;
        }
        let mut prev = f32::INFINITY;
        let mut mass = 0.0f64;
        for &v in lp {
            if v.is_nan() || v > MAX_LOGPROB {
                return Err(Error::corrupt(
                    loc.clone(),
                    format!("position {pos} of the chunk has log-probability {v}"),
                ));
            }
            if p.kind == Kind::TopK {
                if v > prev {
                    return Err(Error::corrupt(
                        loc.clone(),
                        format!("position {pos} of the chunk is not sorted by rank"),
                    ));
                }
                prev = v;
                mass += f64::from(v).exp();
            } else if v == f32::NEG_INFINITY {
                return Err(Error::corrupt(
                    loc.clone(),
                    format!("position {pos} of the chunk has a sampled id of probability 0"),
                ));
            }
        }
        // Quantization may round every entry up by its error bound; under a KL bound b the
        // decoded mass can exceed the written one by at most 2 TV <= sqrt(2 b) (Pinsker).
        let slack = match p.logprobs.kl_bound() {
            Some(b) => 1.0 + (2.0 * f64::from(b)).sqrt() + f64::from(b),
            None => p.logprobs.max_abs_error().unwrap_or(0.0).exp(),
        };
        if mass > MAX_ROW_MASS * slack + 1e-6 {
            return Err(Error::corrupt(
                loc.clone(),
                format!("position {pos} of the chunk has probability mass {mass:.4} > 1"),
            ));
        }
    }
    Ok(())
}

/// Files in the store directory that the committed manifest does not account for.
pub(crate) fn orphans(dir: &Path, manifest: &Manifest) -> Result<Vec<String>> {
    let known: HashSet<&str> = manifest.shards.iter().map(|s| s.file.as_str()).collect();
    let mut out = Vec::new();
    let sd = dir.join(SHARDS_DIR);
    if let Ok(rd) = std::fs::read_dir(&sd) {
        for e in rd {
            let e = e.io_ctx("list", &sd)?;
            let rel = format!("{SHARDS_DIR}/{}", e.file_name().to_string_lossy());
            if !known.contains(rel.as_str()) {
                out.push(rel);
            }
        }
    }
    for e in std::fs::read_dir(dir).io_ctx("list", dir)? {
        let e = e.io_ctx("list", dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != MANIFEST_NAME && name != SHARDS_DIR && name != LOCK_NAME {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{CodecParams, LogprobCodec};
    use crate::test_util::xorshift;

    /// An inspection stopped in its checksum pass or at a chunk leaves the shard unchecked
    /// (the stop error), with no problem recorded: nothing a caller could take for damage.
    #[test]
    fn a_stopped_inspection_is_unchecked_not_damaged() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        crate::test_util::write_small_store(&dir, crate::writer::Mode::Create, 0..30);
        let m = Manifest::read(&dir).unwrap();
        let p = params_from_manifest(&m, &dir.join(MANIFEST_NAME)).unwrap();
        let info = &m.shards[0];
        // Stop at the first tick (the checksum pass), then at the first chunk.
        for go_for in [0, 1] {
            let calls = AtomicU64::new(0);
            let tick = |_: u64| calls.fetch_add(1, Ordering::Relaxed) < go_for;
            let found = inspect_shard(&dir, 0, info, &p, &tick);
            assert!(found.problems.is_empty(), "{:?}", found.problems);
            let unchecked = found.unchecked.map(|e| e.to_string());
            assert_eq!(unchecked, Some(progress::stopped().to_string()));
        }
        let found = inspect_shard(&dir, 0, info, &p, &|_| true);
        assert!(found.problems.is_empty() && found.unchecked.is_none() && found.reader.is_some());
    }

    /// verify names the writer that has the store open, whose finished but uncommitted
    /// shards are among the orphans, and before that writer's first commit refuses (the
    /// store is locked) instead of calling the missing manifest damage.
    #[test]
    fn verify_names_an_open_writer() {
        use crate::test_util::{add_small_samples, open_small_store};
        use crate::writer::Mode;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let me = format!("pid {}", std::process::id());
        let mut w = open_small_store(&dir, Mode::Create);
        add_small_samples(&mut w, 0..30);
        assert!(dir.join(crate::writer::SHARDS_DIR).is_dir());
        let err = verify(&dir).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }) && err.to_string().contains(&me), "{err}");
        w.close().unwrap();
        let r = verify(&dir).unwrap();
        assert!(r.ok() && r.orphans.is_empty() && r.writer.is_none(), "{r:?}");

        let mut w = open_small_store(&dir, Mode::Append);
        add_small_samples(&mut w, 30..60);
        let r = verify(&dir).unwrap();
        assert!(r.ok() && !r.orphans.is_empty(), "{r:?}");
        assert_eq!(r.writer.as_deref(), Some(me.as_str()));
        w.close().unwrap();
        let r = verify(&dir).unwrap();
        assert!(r.ok() && r.orphans.is_empty() && r.writer.is_none(), "{r:?}");
        assert_eq!(r.samples, 60);
    }

    /// A writer that commits while verify checks: its new shards are the store's, not
    /// orphans, and the writer that held the lock as the check started is named.
    #[test]
    fn a_commit_during_the_check_makes_no_orphans() {
        use crate::test_util::{add_small_samples, open_small_store, write_small_store};
        use crate::writer::Mode;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        write_small_store(&dir, Mode::Create, 0..30);
        let mut w = open_small_store(&dir, Mode::Append);
        add_small_samples(&mut w, 30..60);
        let writer = std::sync::Mutex::new(Some(w));
        let commit_now = |_: u64, _: u64| {
            if let Some(mut w) = writer.lock().unwrap().take() {
                w.close().unwrap();
            }
            true
        };
        let r = verify_with_progress(&dir, &commit_now).unwrap();
        assert!(writer.lock().unwrap().is_none(), "the writer closed during the check");
        assert!(r.ok() && r.samples == 30 && r.orphans.is_empty(), "{r:?}");
        assert_eq!(r.writer, Some(format!("pid {}", std::process::id())));
        assert_eq!(verify(&dir).unwrap().samples, 60);
    }

    /// `check_values` by its definition: every row through the stamps and the exact loop
    /// (what it was before the quick checks went in front).
    fn check_values_by_definition(
        d: &DecodedChunk,
        p: &CodecParams,
        seen: &mut SeenIds,
        loc: &Location,
    ) -> Result<()> {
        let k = p.k as usize;
        let slack = match p.logprobs.kl_bound() {
            Some(b) => 1.0 + (2.0 * f64::from(b)).sqrt() + f64::from(b),
            None => p.logprobs.max_abs_error().unwrap_or(0.0).exp(),
        };
        for pos in 0..d.input_ids.len() {
            if !seen.row_is_distinct(&d.ids[pos * k..pos * k + k]) {
                return Err(Error::corrupt(
                    loc.clone(),
                    format!("position {pos} of the chunk repeats a token id"),
                ));
            }
            let mut prev = f32::INFINITY;
            let mut mass = 0.0f64;
            for &v in &d.logprobs[pos * k..pos * k + k] {
                if v.is_nan() || v > MAX_LOGPROB {
                    return Err(Error::corrupt(
                        loc.clone(),
                        format!("position {pos} of the chunk has log-probability {v}"),
                    ));
                }
                if v > prev {
                    return Err(Error::corrupt(
                        loc.clone(),
                        format!("position {pos} of the chunk is not sorted by rank"),
                    ));
                }
                prev = v;
                mass += f64::from(v).exp();
            }
            if mass > MAX_ROW_MASS * slack + 1e-6 {
                return Err(Error::corrupt(
                    loc.clone(),
                    format!("position {pos} of the chunk has probability mass {mass:.4} > 1"),
                ));
            }
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(600))]
        /// The quick checks in front of the exact loop never change the verdict or the
        /// message, on decoded top-K rows with every fault verify looks for: a repeated id,
        /// NaN, a positive value, an unsorted row, and masses on both sides of the limit
        /// (for the lossless codec, whose limit is the tightest, and a quantized one).
        #[test]
        fn quick_checks_keep_the_verdicts_of_the_definition(
            k in proptest::sample::select(vec![8usize, 16, 24, 40, 64, 5, 65]),
            rows in 1usize..6,
            seed in proptest::num::u64::ANY,
            lossless in proptest::bool::ANY,
            // (row, fault): 0 none, 1 repeated id, 2 NaN, 3 positive, 4 unsorted
            fault in (0usize..6, 0u8..5),
            mass in proptest::sample::select(vec![
                0.3f64, 0.999, 1.0, 1.001, 1.015, 1.019, 1.0195, 1.0199, 1.02, 1.02001, 1.0201,
                1.021, 1.03, 1.05,
            ]),
        ) {
            let mut x = seed | 1;
            let mut next = || xorshift(&mut x);
            let vocab = 1000u64;
            let n = rows * k;
            let mut ids = Vec::with_capacity(n);
            let mut logprobs = Vec::with_capacity(n);
            for _ in 0..rows {
                let start = next() % vocab;
                ids.extend((0..k as u64).map(|j| ((start + j * 7) % vocab) as u32));
                // Probabilities decaying by rank, scaled to the row's mass.
                let w: Vec<f64> = (0..k).map(|j| 0.5f64.powf(j as f64 / 3.0) * (1.0 + (next() % 100) as f64 / 400.0)).collect();
                let total: f64 = w.iter().sum();
                let mut row: Vec<f32> = w.iter().map(|&x| (x / total * mass).ln() as f32).collect();
                row.sort_by(|a, b| b.total_cmp(a));
                logprobs.extend(row);
            }
            let (row, what) = fault;
            if row < rows {
                let at = row * k + (next() as usize % k);
                match what {
                    1 => ids[row * k + (at + 1 - row * k) % k] = ids[at],
                    2 => logprobs[at] = f32::NAN,
                    3 => logprobs[row * k] = 2e-6,
                    4 if at + 1 < (row + 1) * k => logprobs.swap(at, at + 1),
                    _ => {}
                }
            }
            let d = DecodedChunk {
                input_ids: vec![0; rows],
                ids,
                logprobs,
                pos_offsets: vec![0, rows],
                ..DecodedChunk::default()
            };
            let p = CodecParams {
                kind: Kind::TopK,
                k: k as u32,
                vocab_size: vocab as u32,
                logprobs: if lossless {
                    LogprobCodec::Lossless
                } else {
                    LogprobCodec::Abs { step_log2: 8, mult: 5 }
                },
                zstd_level: 1,
            };
            let loc = Location::default();
            let got = check_values(&d, &p, &mut SeenIds::new(vocab as u32), &loc);
            let want = check_values_by_definition(&d, &p, &mut SeenIds::new(vocab as u32), &loc);
            proptest::prop_assert_eq!(
                got.map_err(|e| e.to_string()),
                want.map_err(|e| e.to_string())
            );
        }
    }
}
