//! `rebuild_manifest`: a store whose `manifest.json` is damaged or gone, made readable again
//! from its shard files.
//!
//! Everything a reader needs to decode a shard is in the shard itself (its header holds the
//! configuration, its footer the samples); what only the manifest holds is the teacher and
//! tokenizer, the user's metadata, and which shard files were committed. The rebuild takes
//! the first three from the caller (unknown when not given) and, for the last, every shard
//! file in `shards/` that opens cleanly on its own. That includes any shard a writer
//! finished but did not commit before it died, whose samples are as complete as any
//! other's; a shard that does not open (a killed writer's unfinished file, damage in its
//! header, trailer or footer) is left out and reported.
//!
//! Nothing is guessed where the files disagree: shards of different configurations (left
//! behind by a store that replaced another, say) or a sample id in two shards (a damaged
//! shard and the one a repair wrote in its place) stop the rebuild, naming the files, so
//! that whoever knows which belong can move the others away. The damaged manifest is kept
//! as `manifest.json.damaged`; the new one is committed like a writer's, under the lock.
//! Chunks are not checked here: run `repair` next, which checks every chunk against the
//! new manifest and gives up what is damaged.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use crate::codec::CodecParams;
use crate::error::{Error, IoContext, Result};
use crate::format::FORMAT_VERSION;
use crate::manifest::{
    self, CommitError, FORMAT_NAME, MANIFEST_NAME, Manifest, ShardInfo, TeacherInfo, TokenizerInfo,
};
use crate::progress::{Progress, Ticker};
use crate::reader::ShardReader;
use crate::source::Source;
use crate::verify::{file_crc, is_damage};
use crate::writer::{self, SHARDS_DIR};

/// Where the damaged manifest is kept.
pub const DAMAGED_MANIFEST_NAME: &str = "manifest.json.damaged";

/// What the rebuilt manifest says that the shards cannot.
#[derive(Debug, Clone, Default)]
pub struct RebuildOptions {
    /// Plan only: report what the manifest would hold, change nothing, take no lock.
    pub dry_run: bool,
    pub teacher: Option<TeacherInfo>,
    pub tokenizer: Option<TokenizerInfo>,
    /// A JSON object; `{}` when not given.
    pub metadata: Option<serde_json::Value>,
}

/// A shard file the rebuild could not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    pub file: String,
    pub problem: String,
}

/// What [`rebuild_manifest`] found and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebuildReport {
    /// The manifest entries of the shards taken, in file-name (write) order.
    pub shards: Vec<ShardInfo>,
    pub left_out: Vec<LeftOut>,
    pub num_samples: u64,
    pub num_positions: u64,
    /// Why the old manifest could not be read.
    pub manifest_problem: String,
    /// The shards' configuration, in words (empty when no shard could be opened).
    pub configuration: String,
    /// Whether the new manifest was committed (false in a dry run).
    pub committed: bool,
    /// The name the damaged manifest was kept under, when there was one.
    pub kept_damaged: Option<String>,
}

/// Rebuild the manifest of the store at `dir`; see the module documentation.
/// `progress(done, total)` counts the bytes of the shard files read (each is read once,
/// for its whole-file checksum); a `false` from it stops the rebuild within the shard file
/// being read, with nothing changed ([`crate::progress::stopped`]).
pub fn rebuild_manifest(
    dir: &Path,
    opts: &RebuildOptions,
    progress: Progress<'_>,
) -> Result<RebuildReport> {
    let manifest_problem = match Manifest::read(dir) {
        Ok(_) => {
            return Err(Error::State(format!(
                "{} is sound: there is nothing to rebuild (to check the shards: logitcache \
                 verify; to mend them: logitcache repair)",
                dir.join(MANIFEST_NAME).display()
            )));
        }
        Err(e @ (Error::Corrupt { .. } | Error::Io { .. })) if is_damage(&e) => e.to_string(),
        // A newer format, or a manifest that could not be read for a reason that says
        // nothing about its bytes: not ours to replace.
        Err(e) => return Err(e),
    };
    if let Some(m) = &opts.metadata
        && !m.is_object()
    {
        return Err(Error::invalid_argument("metadata", "must be a JSON object (a dict)"));
    }
    let _lock = if opts.dry_run { None } else { Some(writer::lock(dir)?) };

    let names = shard_files(dir)?;
    let total = names.iter().map(|(_, len)| len).sum::<u64>();
    let ticker = Ticker::new(progress, total);
    let tick = |n: u64| ticker.tick(n);
    let mut report = RebuildReport { manifest_problem, ..Default::default() };
    // (configuration, the first shard that has it) of every configuration met.
    let mut configs: Vec<(Config, String)> = Vec::new();
    let mut owner: HashMap<u64, usize> = HashMap::new();
    for (name, len) in names {
        ticker.check()?;
        let path = dir.join(&name);
        let opened = Source::open(&path, false)
            .and_then(|src| {
                ShardReader::from_unlisted_source(src, &path, report.shards.len() as u32)
            })
            .and_then(|(shard, p)| {
                let (crc, read) = file_crc(&path, &tick)?;
                Ok((shard, p, crc, read))
            });
        let (shard, p, crc, read) = match opened {
            Ok(x) => x,
            Err(_) if ticker.stopping() => return Err(crate::progress::stopped()),
            Err(e) if is_damage(&e) => {
                tick(len);
                report.left_out.push(LeftOut { file: name, problem: e.to_string() });
                continue;
            }
            Err(e) => {
                return Err(Error::State(format!(
                    "{} could not be checked, so the rebuild stops with nothing changed: {e}",
                    path.display()
                )));
            }
        };
        let uid = format!("{:016x}", shard.header.uid);
        if !name.ends_with(&format!("-{uid}.lcs")) {
            report.left_out.push(LeftOut {
                file: name,
                problem: format!("its header's uid is {uid}, not the one in its name"),
            });
            continue;
        }
        let config = Config { params: p, temperature: shard.header.temperature };
        if !configs.iter().any(|(c, _)| *c == config) {
            configs.push((config, name.clone()));
        }
        let index = report.shards.len();
        for r in &shard.footer.records {
            if let Some(&other) = owner.get(&r.sample_id) {
                return Err(Error::DuplicateSample {
                    sample_id: r.sample_id,
                    msg: format!(
                        "both {} and {name} hold it; move away the shard file that does not \
                         belong to the store (one a repair replaced, or left by a writer \
                         that died and was run again) and rebuild again",
                        report.shards[other].file
                    ),
                });
            }
            owner.insert(r.sample_id, index);
        }
        report.shards.push(ShardInfo {
            file: name,
            checksum: manifest::format_checksum(crc),
            bytes: read,
            ..shard.info
        });
    }
    if configs.len() > 1 {
        let list: Vec<String> =
            configs.iter().map(|(c, first)| format!("{} (e.g. {first})", c.describe())).collect();
        return Err(Error::State(format!(
            "the shard files of {} have {} different configurations: {}; move away the ones \
             that do not belong to the store and rebuild again",
            dir.display(),
            configs.len(),
            list.join("; ")
        )));
    }
    let Some((config, _)) = configs.pop() else {
        return Err(Error::State(format!(
            "no shard of {} could be opened: nothing to rebuild a store from",
            dir.display()
        )));
    };
    report.configuration = config.describe();
    report.num_samples = report.shards.iter().map(|s| s.num_samples).sum();
    report.num_positions = report.shards.iter().map(|s| s.num_positions).sum();
    if opts.dry_run {
        return Ok(report);
    }
    let m = Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        kind: config.params.kind.name().into(),
        k: config.params.k,
        vocab_size: config.params.vocab_size,
        temperature: shortest_f64(config.temperature),
        codec: writer::codec_info(
            config.params.logprobs,
            writer::WriterOptions::default().zstd_level,
        ),
        teacher: opts.teacher.clone(),
        tokenizer: opts.tokenizer.clone(),
        created_by: writer::tool(),
        updated_by: writer::tool(),
        metadata: opts.metadata.clone().unwrap_or_else(|| serde_json::json!({})),
        num_samples: report.num_samples,
        num_positions: report.num_positions,
        shards: report.shards.clone(),
    };
    let mpath = dir.join(MANIFEST_NAME);
    m.validate(&mpath)?;
    // The last point to stop with nothing changed: the damaged manifest is copied next.
    ticker.check()?;
    if mpath.exists() {
        let kept = dir.join(DAMAGED_MANIFEST_NAME);
        fs::copy(&mpath, &kept).io_ctx("keep the damaged manifest", &kept)?;
        report.kept_damaged = Some(DAMAGED_MANIFEST_NAME.into());
    }
    ticker.check()?;
    m.commit(dir).map_err(CommitError::into_error)?;
    report.committed = true;
    Ok(report)
}

/// What a shard's header says the store is.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    params: CodecParams,
    temperature: f32,
}

impl Config {
    fn describe(&self) -> String {
        let p = &self.params;
        let codec = p.logprobs.describe();
        format!(
            "kind {}, k {}, vocab_size {}, codec {codec}, temperature {}",
            p.kind.name(),
            p.k,
            p.vocab_size,
            self.temperature
        )
    }
}

/// The store's shard files by name (`shards/NAME`, names as the format allows, in order:
/// the sequence number leads) with their sizes.
fn shard_files(dir: &Path) -> Result<Vec<(String, u64)>> {
    let sd = dir.join(SHARDS_DIR);
    let mut out = Vec::new();
    for e in fs::read_dir(&sd).io_ctx("list", &sd)? {
        let e = e.io_ctx("list", &sd)?;
        let Some(name) = e.file_name().to_str().map(|n| format!("{SHARDS_DIR}/{n}")) else {
            continue;
        };
        if manifest::is_valid_shard_file(&name) {
            let len = e.metadata().io_ctx("stat", e.path())?.len();
            out.push((name, len));
        }
    }
    // Sequence numbers have at least six digits: order by their value, then by name.
    out.sort_by_key(|(n, _)| {
        let seq = n[SHARDS_DIR.len() + 1..].split('-').next().unwrap_or_default();
        (seq.len(), seq.to_string(), n.clone())
    });
    Ok(out)
}

/// The f64 a user most likely gave for a value the header keeps as f32 (0.7, not
/// 0.699999988079071), so that a writer appending with the same temperature matches.
fn shortest_f64(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}
