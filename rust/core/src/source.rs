//! Byte access to a shard file: a memory map where that is safe, positioned reads where it
//! is not (network file systems, where another client truncating a file would turn a mapped
//! read into SIGBUS). Every access is bounds-checked against the file length.

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, IoContext, Location, Result};

pub enum Source {
    Mmap(memmap2::Mmap),
    File {
        file: File,
        len: u64,
    },
    /// A shard read with positioned reads through a store's [`FileCache`]: open only while
    /// the cache keeps it (stores of more shards than the process may keep files open).
    Cached {
        path: PathBuf,
        len: u64,
        files: Arc<FileCache>,
        key: u64,
    },
    /// A shard held in memory (tests, fuzz targets, bytes received from elsewhere).
    Bytes(Vec<u8>),
}

/// Open files of a store's shards, at most `capacity` of them; the least recently used is
/// closed to make room. Its lock is only ever tried, never waited for: a process forked
/// while another thread held it (a DataLoader worker) finds it held forever, and then
/// reads through a file opened for that read alone, so it is slower, never stuck.
pub struct FileCache {
    capacity: usize,
    clock: AtomicU64,
    next_key: AtomicU64,
    open: Mutex<Vec<(u64, u64, Arc<File>)>>,
}

impl FileCache {
    pub fn new(capacity: usize) -> FileCache {
        FileCache {
            capacity: capacity.max(1),
            clock: AtomicU64::new(0),
            next_key: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
        }
    }

    /// Files open now.
    pub fn open_files(&self) -> usize {
        self.open.try_lock().map_or(0, |o| o.len())
    }

    fn file(&self, key: u64, path: &Path) -> std::io::Result<Arc<File>> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut open) = self.open.try_lock()
            && let Some(e) = open.iter_mut().find(|e| e.0 == key)
        {
            e.1 = now;
            return Ok(Arc::clone(&e.2));
        }
        let file = Arc::new(File::open(path)?);
        if let Ok(mut open) = self.open.try_lock()
            && !open.iter().any(|e| e.0 == key)
        {
            if open.len() >= self.capacity
                && let Some(oldest) = open.iter().enumerate().min_by_key(|e| e.1.1).map(|e| e.0)
            {
                open.swap_remove(oldest);
            }
            open.push((key, now, Arc::clone(&file)));
        }
        Ok(file)
    }

    fn forget(&self, key: u64) {
        if let Ok(mut open) = self.open.try_lock() {
            open.retain(|e| e.0 != key);
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Source::Cached { files, key, .. } = self {
            files.forget(*key);
        }
    }
}

impl Source {
    pub fn open(path: &Path, use_mmap: bool) -> Result<Source> {
        let file = File::open(path).io_ctx("open shard", path)?;
        let len = file.metadata().io_ctx("stat shard", path)?.len();
        if use_mmap && len > 0 {
            // SAFETY: shards are immutable once their manifest is committed: logitcache never
            // writes to, truncates or replaces a committed shard file (a replacing writer
            // deletes it, which keeps the mapping valid on POSIX systems). The map is
            // read-only. What the map cannot defend against is another program truncating the
            // file while it is mapped; that is why network file systems, where such changes
            // come from other machines, are read with positioned reads instead.
            match unsafe { memmap2::Mmap::map(&file) } {
                Ok(map) => Ok(Source::Mmap(map)),
                // Out of address space (e.g. under `ulimit -v`) or a file system without
                // mmap: positioned reads work everywhere.
                Err(_) => Ok(Source::File { file, len }),
            }
        } else {
            Ok(Source::File { file, len })
        }
    }

    /// A shard read through `files` (see [`Source::Cached`]); its length is taken now.
    pub fn open_cached(path: &Path, files: &Arc<FileCache>) -> Result<Source> {
        let key = files.next_key.fetch_add(1, Ordering::Relaxed);
        let file = files.file(key, path).io_ctx("open shard", path)?;
        let len = file.metadata().io_ctx("stat shard", path)?.len();
        Ok(Source::Cached { path: path.to_path_buf(), len, files: Arc::clone(files), key })
    }

    /// A shard whose bytes are already in memory: read with the same bounds checks as a file.
    pub fn from_bytes(bytes: Vec<u8>) -> Source {
        Source::Bytes(bytes)
    }

    pub fn len(&self) -> u64 {
        match self {
            Source::Mmap(m) => m.len() as u64,
            Source::File { len, .. } | Source::Cached { len, .. } => *len,
            Source::Bytes(b) => b.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_mmap(&self) -> bool {
        matches!(self, Source::Mmap(_))
    }

    /// Bytes `[offset, offset + len)`, or a corrupt-data error if they are not all in the file.
    pub fn read(&self, offset: u64, len: usize, loc: &Location) -> Result<Cow<'_, [u8]>> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.len()) {
            return Err(Error::corrupt(
                loc.clone().offset(offset),
                format!("needs bytes {offset}..+{len} but the file has {} bytes", self.len()),
            ));
        }
        match self {
            Source::Mmap(m) => {
                let start = offset as usize;
                Ok(Cow::Borrowed(&m[start..start + len]))
            }
            Source::Bytes(b) => {
                let start = offset as usize;
                Ok(Cow::Borrowed(&b[start..start + len]))
            }
            Source::File { file, .. } => {
                let mut buf = vec![0u8; len];
                read_exact_at(file, &mut buf, offset).map_err(|e| {
                    let path = loc.file.clone().unwrap_or_default();
                    Error::io("read shard", path, e)
                })?;
                Ok(Cow::Owned(buf))
            }
            Source::Cached { path, files, key, .. } => {
                // Reopened: the name may have gone since the store was opened (a removal or a
                // replacing writer deletes replaced shards), which only a new open can see.
                let file = files
                    .file(*key, path)
                    .io_ctx("reopen shard (if a removal or a replacing writer deleted it since the store was opened: open the store again)", path)?;
                let mut buf = vec![0u8; len];
                read_exact_at(&file, &mut buf, offset).io_ctx("read shard", path)?;
                Ok(Cow::Owned(buf))
            }
        }
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_read(buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Address space kept for the heap when deciding, under a limit, which shards to map: the
/// allocator's segments and the worker threads' stacks (measured: reading a store after
/// `ulimit -v` grew the address space by about 92 MiB with one thread).
pub const MAP_RESERVE: u64 = 256 << 20;

/// Bytes of address space this process may still take, when it runs under a limit
/// (`ulimit -v`, `RLIMIT_AS`): the soft limit minus the current virtual size, both read from
/// /proc/self on Linux. `None` when there is no limit or it cannot be read (other systems).
pub fn address_space_left() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max address space"))?;
    let soft = line["Max address space".len()..].split_whitespace().next()?;
    let limit: u64 = soft.parse().ok()?; // "unlimited" does not parse: no limit
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let size_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(limit.saturating_sub(size_kib.saturating_mul(1024)))
}

/// How many shards a store reads with a file open each before they share a
/// [`FileCache`] of that many files: a quarter of the soft open-file limit (`ulimit -n`,
/// read from /proc/self/limits on Linux), within 16..=1024; 256 where it is not known.
pub fn default_max_open_files() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..].split_whitespace().next()?.parse::<u64>().ok()
    });
    soft.map_or(256, |n| usize::try_from(n / 4).unwrap_or(1024).clamp(16, 1024))
}

/// File-system types on which a memory map is not trusted.
const NETWORK_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ncpfs",
    "afs",
    "9p",
    "fuse.sshfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "fuse.ceph",
    "glusterfs",
    "fuse.glusterfs",
    "fuse.s3fs",
    "fuse.gcsfuse",
    "fuse.juicefs",
    "fuse.rclone",
];

/// Whether `path` should be memory-mapped: not when `LOGITCACHE_MMAP=0`, and not on a network
/// file system (found from /proc/self/mountinfo on Linux; elsewhere mmap is used).
pub fn mmap_is_safe(path: &Path) -> bool {
    if std::env::var("LOGITCACHE_MMAP").is_ok_and(|v| v.trim() == "0") {
        return false;
    }
    match filesystem_type(path) {
        Some(fs) => !NETWORK_FS.contains(&fs.as_str()),
        None => true,
    }
}

fn filesystem_type(path: &Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source opts
        let mut parts = line.split(" - ");
        let (Some(left), Some(right)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let Some(fstype) = right.split(' ').next() else {
            continue;
        };
        let mount_point = mount_point.replace("\\040", " ");
        if path.starts_with(&mount_point)
            && best.as_ref().is_none_or(|(len, _)| mount_point.len() > *len)
        {
            best = Some((mount_point.len(), fstype.to_string()));
        }
    }
    best.map(|(_, fs)| fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache closes the least recently used file past its capacity, and with its lock
    /// held elsewhere (as in a child forked while another thread held it) reads still work,
    /// through a file of their own, instead of waiting.
    #[test]
    fn file_cache_is_bounded_and_never_waits() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(FileCache::new(2));
        let sources: Vec<Source> = (0..5)
            .map(|i| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::write(&p, format!("file {i}")).unwrap();
                Source::open_cached(&p, &files).unwrap()
            })
            .collect();
        let loc = Location::default();
        for _ in 0..3 {
            for (i, s) in sources.iter().enumerate() {
                assert_eq!(&*s.read(5, 1, &loc).unwrap(), format!("{i}").as_bytes());
                assert!(files.open_files() <= 2);
            }
        }
        // The two read last (keys 3 and 4, given in order) are the ones kept open.
        let mut keys: Vec<u64> = files.open.lock().unwrap().iter().map(|e| e.0).collect();
        keys.sort_unstable();
        assert_eq!(keys, [3, 4]);
        let held = files.open.lock().unwrap();
        assert_eq!(&*sources[0].read(5, 1, &loc).unwrap(), b"0");
        drop(held);
        assert_eq!(files.open_files(), 2);
        drop(sources);
        assert_eq!(files.open_files(), 0);
    }

    #[test]
    fn bounds_checked_in_both_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        for mmap in [true, false] {
            let s = Source::open(&p, mmap).unwrap();
            assert_eq!(s.is_mmap(), mmap);
            let loc = Location::file(&p);
            assert_eq!(&*s.read(2, 3, &loc).unwrap(), b"234");
            assert!(s.read(8, 3, &loc).is_err());
            assert!(s.read(u64::MAX, 2, &loc).is_err());
        }
        assert!(filesystem_type(dir.path()).is_some() || !cfg!(target_os = "linux"));
    }

    #[test]
    fn in_memory_bytes_are_bounds_checked() {
        let s = Source::from_bytes(b"0123456789".to_vec());
        let loc = Location::default();
        assert_eq!(s.len(), 10);
        assert!(!s.is_mmap());
        assert_eq!(&*s.read(7, 3, &loc).unwrap(), b"789");
        assert!(s.read(8, 3, &loc).is_err());
        assert!(s.read(u64::MAX, 2, &loc).is_err());
        assert!(matches!(s.read(8, 3, &loc), Err(Error::Corrupt { .. })));
    }
}
