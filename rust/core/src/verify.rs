//! `verify`: check every byte of a store against its checksums and every decoded value
//! against the store's rules, reporting all faults found (not only the first), plus files
//! that no manifest refers to (orphans of a writer that died before committing).

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use rayon::prelude::*;

use crate::codec::DecodedChunk;
use crate::error::{Error, IoContext, Location, Result};
use crate::format::Kind;
use crate::manifest::{self, MANIFEST_NAME, Manifest};
use crate::reader::{ShardReader, params_from_manifest};
use crate::record::{MAX_LOGPROB, MAX_ROW_MASS, SeenIds};
use crate::writer::{LOCK_NAME, SHARDS_DIR};

/// What `verify` found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Faults in committed data: each says where and what.
    pub problems: Vec<String>,
    /// Files in the store directory that the manifest does not refer to.
    pub orphans: Vec<String>,
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
    let mut report = VerifyReport::default();
    let manifest = match Manifest::read(dir) {
        Ok(m) => m,
        Err(e @ Error::Io { .. }) => return Err(e),
        Err(e) => {
            report.problems.push(e.to_string());
            report.orphans = orphans(dir, None)?;
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
    report.shards = manifest.shards.len();
    report.samples = manifest.num_samples;
    report.positions = manifest.num_positions;
    let results: Vec<(Vec<String>, usize, Vec<u64>)> = crate::threads::install(|| {
        manifest
            .shards
            .par_iter()
            .enumerate()
            .map(|(i, info)| verify_shard(dir, i as u32, info, &p))
            .collect()
    })?;
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
    report.orphans = orphans(dir, Some(&manifest))?;
    Ok(report)
}

fn file_crc(path: &Path) -> Result<(u32, u64)> {
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
    }
    Ok((h.finalize(), total))
}

/// (problems, chunks checked, sample ids) of one shard.
fn verify_shard(
    dir: &Path,
    index: u32,
    info: &manifest::ShardInfo,
    p: &crate::codec::CodecParams,
) -> (Vec<String>, usize, Vec<u64>) {
    let path = dir.join(&info.file);
    let loc = Location::file(&path).shard(index);
    let mut problems = Vec::new();
    match file_crc(&path) {
        Ok((crc, len)) => {
            let want = manifest::parse_checksum(&info.checksum);
            if Some(crc) != want || len != info.bytes {
                problems.push(
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
        Err(e) => {
            problems.push(e.to_string());
            return (problems, 0, Vec::new());
        }
    }
    let shard = match ShardReader::open(dir, index, info, p, false) {
        Ok(s) => s,
        Err(e) => {
            problems.push(e.to_string());
            return (problems, 0, Vec::new());
        }
    };
    let mut seen = SeenIds::new(p.vocab_size);
    for c in 0..shard.num_chunks() {
        let cloc = loc.clone().chunk(c as u64);
        match shard.decode_chunk(c, p) {
            Ok(d) => {
                if let Err(e) = check_values(&d, p, &mut seen, &cloc) {
                    problems.push(e.to_string());
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    let ids = shard.footer.records.iter().map(|r| r.sample_id).collect();
    (problems, shard.num_chunks(), ids)
}

/// The rules a writer enforces, re-checked on decoded data.
fn check_values(
    d: &DecodedChunk,
    p: &crate::codec::CodecParams,
    seen: &mut SeenIds,
    loc: &Location,
) -> Result<()> {
    let positions = d.input_ids.len();
    let k = p.k as usize;
    for pos in 0..positions {
        let (e0, e1) = match p.kind {
            Kind::TopK => (pos * k, pos * k + k),
            Kind::Sampled => (d.entry_offsets[pos], d.entry_offsets[pos + 1]),
        };
        let ids = &d.ids[e0..e1];
        if !seen.row_is_distinct(ids) {
            return Err(Error::corrupt(
                loc.clone(),
                format!("position {pos} of the chunk repeats a token id"),
            ));
        }
        if d.logprobs.is_empty() {
            continue;
        }
        let lp = &d.logprobs[e0..e1];
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
fn orphans(dir: &Path, manifest: Option<&Manifest>) -> Result<Vec<String>> {
    let known: HashSet<&str> =
        manifest.map(|m| m.shards.iter().map(|s| s.file.as_str()).collect()).unwrap_or_default();
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
