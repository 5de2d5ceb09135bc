//! `merge`: one store from several stores of the same configuration, without decoding.
//!
//! Stores written side by side (one per rank of a multi-GPU capture, one per job of a
//! cluster array) become one store: every committed shard of every source becomes a shard
//! of the destination as it is, hard-linked where the file system allows (no bytes copied,
//! no space used; shard files are never modified, so sharing one is safe) and copied,
//! with its checksum checked, where it does not. The destination is written like any
//! store: under its lock, its manifest committed atomically once every shard is in place,
//! so a merge that fails or is killed leaves it as it was (a new destination is not
//! created at all). The sources are only read.
//!
//! The sources must agree on what a store is (kind, K, vocabulary, temperature, codec,
//! and teacher and tokenizer where both name one), and no sample id may be in two of them
//! (or in the destination, when merging into an existing store). A dry run checks all that
//! and lists every sample id held twice, writing nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::manifest::{MANIFEST_NAME, Manifest};
use crate::progress::{self, Progress, Ticker};
use crate::reader::{ShardReader, params_from_manifest};
use crate::writer::{
    ExistsAdvice, Mode, ShardPlacement, StoreSpec, StoreWriter, WriterOptions, check_append,
    fill_identity, refuse_foreign_dir, store_exists,
};

/// What [`merge`] may do.
#[derive(Debug, Clone, Copy, Default)]
pub struct MergeOptions {
    /// Merge into the store at the destination when there is one (else the destination
    /// must not exist).
    pub append: bool,
    /// Copy every shard file instead of hard-linking it.
    pub copy: bool,
    /// Check the stores and report what the merge would do, listing every sample id held
    /// twice instead of refusing them; write nothing (the destination's lock is not taken).
    pub dry_run: bool,
}

/// One source store, as merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedSource {
    pub path: PathBuf,
    pub shards: usize,
    pub samples: u64,
    pub positions: u64,
    pub bytes: u64,
    /// A dry run's: this source's sample ids that the destination or an earlier source
    /// also holds, in increasing order. Taking them out of every source keeps each sample
    /// once, in the first store that holds it. (An id a store holds twice itself, which no
    /// writer makes, is in the report's `duplicates` only.)
    pub duplicates: Vec<u64>,
}

/// What [`merge`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeReport {
    pub sources: Vec<MergedSource>,
    /// Shard files hard-linked and copied.
    pub shards_linked: usize,
    pub shards_copied: usize,
    /// Totals of the merged store (the destination's earlier samples included; a dry run's
    /// count each sample held twice once).
    pub num_samples: u64,
    pub num_positions: u64,
    /// Metadata keys that two stores set to different values; the later store's value
    /// (in the order: destination, then the sources in order) is the one kept.
    pub metadata_conflicts: Vec<String>,
    /// Sample ids held by more than one store (or twice by one), in increasing order. A
    /// merge refuses them, so only a dry run reports any.
    pub duplicates: Vec<u64>,
}

/// Merge the stores at `sources` into `dest`; see the module documentation.
pub fn merge(dest: &Path, sources: &[PathBuf], opts: MergeOptions) -> Result<MergeReport> {
    merge_with_progress(dest, sources, opts, &progress::ignore)
}

/// [`merge`], calling `progress(done, total)` with the bytes of shard files placed so far
/// (a linked file counts whole at once) and the bytes of all the sources' shards; a `false`
/// from it stops the merge before the next shard or within a copy, with nothing changed
/// ([`progress::stopped`]).
pub fn merge_with_progress(
    dest: &Path,
    sources: &[PathBuf],
    opts: MergeOptions,
    progress: Progress<'_>,
) -> Result<MergeReport> {
    if sources.is_empty() {
        return Err(Error::invalid_argument("sources", "no store to merge"));
    }
    if sources.iter().any(|s| s.as_os_str().is_empty()) {
        // Not the working directory's store: an empty path is a mistake.
        return Err(Error::invalid_argument("sources", "a path is empty"));
    }
    check_distinct(dest, sources)?;
    let manifests =
        sources.iter().map(|s| Manifest::read_committed(s)).collect::<Result<Vec<Manifest>>>()?;
    let existing = if opts.append && dest.join(MANIFEST_NAME).exists() {
        Some(Manifest::read(dest)?)
    } else {
        None
    };
    let (base, base_path) = match &existing {
        Some(m) => (m, dest),
        None => (&manifests[0], sources[0].as_path()),
    };
    let mut spec = spec_of(base, base_path)?;
    // What the merged store says of its teacher, tokenizer and metadata: what any of them
    // says (check_append refuses two that disagree), later keys of metadata winning.
    let mut metadata = serde_json::Map::new();
    let mut conflicts = Vec::new();
    let all = existing
        .iter()
        .map(|m| (m, dest))
        .chain(manifests.iter().zip(sources).map(|(m, s)| (m, s.as_path())));
    for (m, path) in all {
        check_append(path, m, &spec)?;
        fill_identity(
            &mut spec.teacher,
            &mut spec.tokenizer,
            m.teacher.as_ref(),
            m.tokenizer.as_ref(),
        );
        if let Some(obj) = m.metadata.as_object() {
            for (k, v) in obj {
                if let Some(old) = metadata.insert(k.clone(), v.clone())
                    && old != *v
                    && !conflicts.contains(k)
                {
                    conflicts.push(k.clone());
                }
            }
        }
    }
    spec.metadata = Some(serde_json::Value::Object(metadata));

    let mut report = MergeReport { metadata_conflicts: conflicts, ..Default::default() };
    for (m, src) in manifests.iter().zip(sources) {
        report.sources.push(MergedSource {
            path: src.clone(),
            shards: m.shards.len(),
            samples: m.num_samples,
            positions: m.num_positions,
            bytes: m.shards.iter().map(|s| s.bytes).sum(),
            duplicates: Vec::new(),
        });
    }
    let total: u64 = manifests.iter().flat_map(|m| &m.shards).map(|s| s.bytes).sum();
    let ticker = Ticker::new(progress, total);
    let stores: Vec<(&Manifest, &Path)> = existing
        .iter()
        .map(|m| (m, dest))
        .chain(manifests.iter().zip(sources).map(|(m, s)| (m, s.as_path())))
        .collect();
    if opts.dry_run {
        // What the writer would refuse at the destination (it is not opened here).
        if !opts.append && dest.exists() {
            return Err(store_exists(dest, ExistsAdvice::Merge));
        }
        refuse_foreign_dir(dest)?;
        // The sources follow the destination (when there is one) in `stores`.
        let first_source = stores.len() - report.sources.len();
        let scan = scan_ids(&stores, &ticker, Some(first_source))?;
        report.duplicates = scan.twice.into_keys().collect();
        report.duplicates.sort_unstable();
        for (source, later) in
            report.sources.iter_mut().zip(scan.later.into_iter().skip(first_source))
        {
            source.duplicates = later;
        }
        report.num_samples = scan.samples;
        report.num_positions = scan.positions;
        return Ok(report);
    }

    let tick = |n: u64| ticker.tick(n);
    let mode = if opts.append { Mode::Append } else { Mode::Create };
    // The level is informational (decoding does not depend on it); keep the base's.
    let zstd_level = base.codec.zstd_level.clamp(1, 22);
    let wopts = WriterOptions { zstd_level, ..WriterOptions::default() };
    let mut writer = StoreWriter::open(dest, spec, mode, wopts).map_err(|e| match e {
        // A merge has no mode="w": the writer's advice would not do here.
        Error::StoreExists { path, .. } => store_exists(&path, ExistsAdvice::Merge),
        e => e,
    })?;
    for (m, src) in manifests.iter().zip(sources) {
        let p = params_from_manifest(m, &src.join(MANIFEST_NAME))?;
        for (i, info) in m.shards.iter().enumerate() {
            ticker.check()?;
            let shard = ShardReader::open(src, i as u32, info, &p, false)?;
            match writer.add_shard(&shard, opts.copy, &tick) {
                Ok(ShardPlacement::Linked) => report.shards_linked += 1,
                Ok(ShardPlacement::Copied) => report.shards_copied += 1,
                Err(Error::DuplicateSample { sample_id, msg }) => {
                    return Err(duplicate_error(sample_id, msg, &stores, &ticker));
                }
                Err(e) => return Err(e),
            }
        }
    }
    ticker.check()?;
    writer.close()?;
    report.num_samples = writer.manifest().num_samples;
    report.num_positions = writer.manifest().num_positions;
    Ok(report)
}

/// The same store named twice, or the destination among the sources, would merge a store
/// with itself: every sample twice.
fn check_distinct(dest: &Path, sources: &[PathBuf]) -> Result<()> {
    let dest_id = dest.canonicalize().ok();
    let mut seen: HashMap<PathBuf, &Path> = HashMap::new();
    for s in sources {
        let id = s.canonicalize().io_ctx("open store", s)?;
        if Some(&id) == dest_id.as_ref() {
            return Err(Error::invalid_argument(
                "sources",
                format!("{} is the destination itself", s.display()),
            ));
        }
        if let Some(first) = seen.insert(id, s) {
            return Err(Error::invalid_argument(
                "sources",
                format!("{} and {} are the same store", first.display(), s.display()),
            ));
        }
    }
    Ok(())
}

/// The configuration of a committed store, as a writer's spec.
fn spec_of(m: &Manifest, path: &Path) -> Result<StoreSpec> {
    let p = params_from_manifest(m, &path.join(MANIFEST_NAME))?;
    Ok(StoreSpec {
        kind: p.kind,
        k: m.k,
        vocab_size: m.vocab_size,
        temperature: m.temperature,
        logprobs: Some(p.logprobs),
        teacher: m.teacher.clone(),
        tokenizer: m.tokenizer.clone(),
        metadata: None,
    })
}

/// What the footers of the stores to merge say of their sample ids.
struct IdScan {
    /// Every id two shards hold, with the first two shard files that hold it.
    twice: HashMap<u64, (PathBuf, PathBuf)>,
    /// Per store, in order: its ids that an earlier store holds, sorted. (An id a store
    /// holds twice itself is not listed: removing it there would remove both records.)
    later: Vec<Vec<u64>>,
    /// Distinct samples and their positions, each sample counted once.
    samples: u64,
    positions: u64,
}

/// Read every shard footer of `stores` (the destination first, when merging into one).
/// Only a dry run and the refusal of a merge do this: a merge finds a duplicate as it places
/// the shards (the writer knows every id it holds). A stop asked for through `ticker`
/// (Ctrl-C) is checked before each shard; with `advance_from`, each shard of the stores from
/// that index on (the sources, whose bytes the ticker's total counts) ticks its bytes once
/// read (a dry run's progress; a refused merge has ticked its own already).
fn scan_ids(
    stores: &[(&Manifest, &Path)],
    ticker: &Ticker,
    advance_from: Option<usize>,
) -> Result<IdScan> {
    // The first holder of each id: its file, and its store's index in `stores`.
    let mut holder: HashMap<u64, (usize, usize)> = HashMap::new();
    let mut files: Vec<PathBuf> = Vec::new();
    let mut scan = IdScan { twice: HashMap::new(), later: Vec::new(), samples: 0, positions: 0 };
    for (store, (m, dir)) in stores.iter().enumerate() {
        let p = params_from_manifest(m, &dir.join(MANIFEST_NAME))?;
        let mut later = Vec::new();
        for (i, info) in m.shards.iter().enumerate() {
            if !ticker.tick(0) {
                return Err(progress::stopped());
            }
            let shard = ShardReader::open(dir, i as u32, info, &p, false)?;
            // Listed before its records: a shard may hold an id twice itself.
            let file = files.len();
            files.push(shard.path.clone());
            for r in &shard.footer.records {
                if let Some(&(first, first_store)) = holder.get(&r.sample_id) {
                    if first_store != store {
                        later.push(r.sample_id);
                    }
                    scan.twice
                        .entry(r.sample_id)
                        .or_insert_with(|| (files[first].clone(), shard.path.clone()));
                } else {
                    holder.insert(r.sample_id, (file, store));
                    scan.samples += 1;
                    scan.positions += u64::from(r.length);
                }
            }
            if advance_from.is_some_and(|a| store >= a) && !ticker.tick(info.bytes) {
                return Err(progress::stopped());
            }
        }
        later.sort_unstable();
        later.dedup();
        scan.later.push(later);
    }
    Ok(scan)
}

/// The error of a merge refused for a sample id held twice: both holders of the first one
/// found, and how many there are in all (listed up to ten). `msg` is the writer's, kept
/// where the footers can no longer be read (a source changed under the merge).
fn duplicate_error(
    sample_id: u64,
    msg: String,
    stores: &[(&Manifest, &Path)],
    ticker: &Ticker,
) -> Error {
    let all = match scan_ids(stores, ticker, None) {
        Ok(scan) => scan.twice,
        Err(e) if ticker.stopping() => return e,
        Err(_) => return Error::DuplicateSample { sample_id, msg },
    };
    let (sample_id, (a, b)) = match all.get(&sample_id) {
        Some(files) => (sample_id, files.clone()),
        None => match all.iter().min_by_key(|(id, _)| **id) {
            Some((id, files)) => (*id, files.clone()),
            None => return Error::DuplicateSample { sample_id, msg },
        },
    };
    let mut msg = if a == b {
        format!("{} holds it twice", a.display())
    } else {
        format!("both {} and {} hold it", a.display(), b.display())
    };
    if all.len() > 1 {
        let mut ids: Vec<u64> = all.into_keys().collect();
        ids.sort_unstable();
        const SHOWN: usize = 10;
        let shown: Vec<String> = ids.iter().take(SHOWN).map(u64::to_string).collect();
        let more = if ids.len() > SHOWN {
            format!(", and {} more", ids.len() - SHOWN)
        } else {
            String::new()
        };
        msg.push_str(&format!(
            "; {} sample ids in all are held twice ({}{more})",
            ids.len(),
            shown.join(", ")
        ));
    }
    Error::DuplicateSample { sample_id, msg }
}
