//! `clean`: delete the files a store's own writers left behind and no manifest names.
//!
//! Shard files outside the committed manifest are left by a writer that died before its
//! commit, by `repair` (the damaged shards it gave up), and by a removal of samples killed
//! between its commit and its deletions, or whose deletions failed. The last kind matters
//! most: a manifest rebuilt from the shard files would take such a shard back, and with it
//! samples that were removed. Only files of the store's own making are deleted: shard
//! files (`shards/NNNNNN-UID.lcs`) and temporary manifests (`.manifest.json.tmp-PID`).
//! Anything else verify calls an orphan (`manifest.json.damaged`, which a rebuild keeps for
//! inspection, files someone else put there, directories) is reported and kept.
//!
//! Which files belong to the store is read from the manifest under the store's lock, so a
//! writer cannot commit new shards between the reading and the deleting; a store whose
//! manifest cannot be read is refused (its shard files may be all that is left of it:
//! rebuild the manifest first).

use std::fs;
use std::path::Path;

use crate::error::{Error, Result};
use crate::manifest::{self, Manifest};
use crate::verify::orphans;
use crate::writer::{self, SHARDS_DIR};

/// What [`clean_store`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanReport {
    /// Files deleted (to delete, in a dry run), relative to the store directory, in order.
    pub deleted: Vec<String>,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Files and directories no manifest names that are not the store's own leftovers,
    /// kept (verify still lists them as orphans).
    pub kept: Vec<String>,
    /// Whether this was a dry run (nothing deleted, no lock taken).
    pub dry_run: bool,
}

/// A file that a commit left out of the store and that could not be deleted after it
/// (`verify` lists it as an orphan; [`clean_store`] deletes it once the cause is fixed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLeft {
    /// Relative to the store directory.
    pub file: String,
    /// Why it could not be deleted.
    pub error: String,
}

/// Delete the files `names` (relative to `dir`) that a commit has just left out of the
/// store, after it: the commit stands whatever happens here, so a file that cannot be
/// deleted is reported, not an error. Returns the files deleted (not those gone already)
/// and those left.
pub(crate) fn delete_left_out<'a>(
    dir: &Path,
    names: impl IntoIterator<Item = &'a str>,
) -> (Vec<String>, Vec<FileLeft>) {
    let (mut deleted, mut left) = (Vec::new(), Vec::new());
    for name in names {
        // A reader that opened the file before keeps its open file or map.
        match fs::remove_file(dir.join(name)) {
            Ok(()) => deleted.push(name.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => left.push(FileLeft { file: name.to_string(), error: e.to_string() }),
        }
    }
    (deleted, left)
}

/// Delete the orphan shard files and temporary manifests of the store at `dir`; see the
/// module documentation. A dry run only reports.
pub fn clean_store(dir: &Path, dry_run: bool) -> Result<CleanReport> {
    // A directory without a readable manifest is refused before the lock would leave a
    // file in it.
    Manifest::read_committed(dir)?;
    let _lock = if dry_run {
        // A writer that is open has shards no manifest names yet: a plan that called them
        // orphans would be one the real run refuses.
        writer::check_unlocked(dir)?;
        None
    } else {
        Some(writer::lock(dir)?)
    };
    // Read again under the lock: a writer that committed in between added shards that the
    // first reading does not name.
    let manifest = Manifest::read(dir)?;
    if !dry_run {
        // The manifest just read must be the one a power loss comes back to before any file
        // it does not name goes: after a commit whose directory fsync failed, the previous
        // manifest may still be the durable one, and it names the shards about to go.
        manifest::sync_dir(dir)?;
    }
    let mut report = CleanReport { dry_run, ..Default::default() };
    for name in orphans(dir, &manifest)? {
        let path = dir.join(&name);
        // (A name that is not UTF-8 comes back altered and fails to stat: not ours either.)
        let meta = fs::symlink_metadata(&path).ok().filter(|m| m.is_file());
        let ours = manifest::is_valid_shard_file(&name) || is_temporary_manifest(&name);
        let (true, Some(meta)) = (ours, meta) else {
            report.kept.push(name);
            continue;
        };
        if !dry_run {
            // A reader that opened the file before keeps its open file or map.
            match fs::remove_file(&path) {
                Ok(()) => {}
                // Gone already (deleted by hand meanwhile): nothing left to do for it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("delete", &path, e)),
            }
        }
        report.bytes += meta.len();
        report.deleted.push(name);
    }
    if !dry_run && !report.deleted.is_empty() {
        manifest::sync_dir(&dir.join(SHARDS_DIR))?;
        manifest::sync_dir(dir)?;
    }
    Ok(report)
}

/// What [`Manifest::commit`] writes before its rename (the process that wrote it died).
fn is_temporary_manifest(name: &str) -> bool {
    name.strip_prefix(".manifest.json.tmp-")
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_manifests_are_named_by_a_pid() {
        assert!(is_temporary_manifest(".manifest.json.tmp-123"));
        assert!(!is_temporary_manifest(".manifest.json.tmp-"));
        assert!(!is_temporary_manifest(".manifest.json.tmp-12x"));
        assert!(!is_temporary_manifest("manifest.json.damaged"));
    }
}
