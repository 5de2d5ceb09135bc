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
//! (or in the destination, when merging into an existing store).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::manifest::{MANIFEST_NAME, Manifest};
use crate::progress::{self, Progress, Ticker};
use crate::reader::{ShardReader, params_from_manifest};
use crate::writer::{
    ExistsAdvice, Mode, ShardPlacement, StoreSpec, StoreWriter, WriterOptions, check_append,
    fill_identity, store_exists,
};

/// What [`merge`] may do.
#[derive(Debug, Clone, Copy, Default)]
pub struct MergeOptions {
    /// Merge into the store at the destination when there is one (else the destination
    /// must not exist).
    pub append: bool,
    /// Copy every shard file instead of hard-linking it.
    pub copy: bool,
}

/// One source store, as merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedSource {
    pub path: PathBuf,
    pub shards: usize,
    pub samples: u64,
    pub positions: u64,
    pub bytes: u64,
}

/// What [`merge`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeReport {
    pub sources: Vec<MergedSource>,
    /// Shard files hard-linked and copied.
    pub shards_linked: usize,
    pub shards_copied: usize,
    /// Totals of the merged store (the destination's earlier samples included).
    pub num_samples: u64,
    pub num_positions: u64,
    /// Metadata keys that two stores set to different values; the later store's value
    /// (in the order: destination, then the sources in order) is the one kept.
    pub metadata_conflicts: Vec<String>,
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
    check_distinct(dest, sources)?;
    let manifests = sources.iter().map(|s| Manifest::read(s)).collect::<Result<Vec<Manifest>>>()?;
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

    let total: u64 = manifests.iter().flat_map(|m| &m.shards).map(|s| s.bytes).sum();
    let ticker = Ticker::new(progress, total);
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
    let mut report = MergeReport { metadata_conflicts: conflicts, ..Default::default() };
    for (m, src) in manifests.iter().zip(sources) {
        let p = params_from_manifest(m, &src.join(MANIFEST_NAME))?;
        for (i, info) in m.shards.iter().enumerate() {
            ticker.check()?;
            let shard = ShardReader::open(src, i as u32, info, &p, false)?;
            match writer.add_shard(&shard, opts.copy, &tick) {
                Ok(ShardPlacement::Linked) => report.shards_linked += 1,
                Ok(ShardPlacement::Copied) => report.shards_copied += 1,
                Err(Error::DuplicateSample { sample_id, .. }) => {
                    return Err(duplicate(sample_id, &shard, dest, existing.is_some(), sources));
                }
                Err(e) => return Err(e),
            }
        }
        report.sources.push(MergedSource {
            path: src.clone(),
            shards: m.shards.len(),
            samples: m.num_samples,
            positions: m.num_positions,
            bytes: m.shards.iter().map(|s| s.bytes).sum(),
        });
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

/// A sample id found twice: name both stores that hold it. Only on this error path are
/// the footers read again to find the first holder.
fn duplicate(
    sample_id: u64,
    shard: &ShardReader,
    dest: &Path,
    dest_has_store: bool,
    sources: &[PathBuf],
) -> Error {
    let holds = |dir: &Path| -> Option<PathBuf> {
        let m = Manifest::read(dir).ok()?;
        let p = params_from_manifest(&m, &dir.join(MANIFEST_NAME)).ok()?;
        m.shards.iter().enumerate().find_map(|(i, info)| {
            let s = ShardReader::open(dir, i as u32, info, &p, false).ok()?;
            (s.path != shard.path && s.footer.records.iter().any(|r| r.sample_id == sample_id))
                .then_some(s.path)
        })
    };
    let dirs =
        dest_has_store.then_some(dest).into_iter().chain(sources.iter().map(|s| s.as_path()));
    let other = dirs.into_iter().find_map(holds);
    let msg = match other {
        Some(o) => format!("both {} and {} hold it", o.display(), shard.path.display()),
        None => format!("{} holds it twice", shard.path.display()),
    };
    Error::DuplicateSample { sample_id, msg }
}
