//! Bodies of the fuzz targets, shared by the cargo-fuzz targets in `fuzz/` and by the corpus
//! replay test (`tests/fuzz_corpus.rs`), so both run exactly the same code.
//!
//! Every body takes arbitrary bytes and must return normally: the reading API may reject
//! them with an error, never panic, and whatever it accepts must be self-consistent (the
//! `assert!`s below are the findings a fuzzer looks for).
//!
//! Input layout, shared by the three targets: byte 0 holds flags, the rest is the payload.
//! Flag bit 0 ([`REPAIR`]) asks the body to recompute the payload's checksums before parsing
//! it, so that mutations reach the code behind the checksum checks instead of stopping at
//! the first CRC; inputs without it exercise the checksum checks themselves.
//!
//! Not part of the public API (hidden from the docs; it may change with the fuzz targets).

// A failed assertion here is a finding: the fuzz targets report bugs by panicking.
#![allow(clippy::panic)]

use std::path::Path;

use crate::format::{HEADER_LEN, ShardIndex, TRAILER_LEN, Trailer, crc32};
use crate::manifest::Manifest;
use crate::pool::BufferPool;
use crate::reader::{ShardReader, assemble, extract, params_from_manifest};

/// Flag bit: recompute checksums before parsing.
pub const REPAIR: u8 = 1;

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Some(u32::from_le_bytes(a))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = at.checked_add(4).and_then(|end| b.get_mut(at..end)) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Recompute, as a writer would, the checksums of the footer's chunks that lie in `file`
/// (`file_base` is the file offset of `file[0]`), of the footer and of the trailer at the
/// end of `file`. Best effort: fields that point outside `file` are left alone.
fn repair_tail(file: &mut [u8], file_base: u64) {
    let Some(t) = file.len().checked_sub(TRAILER_LEN) else {
        return;
    };
    let (Some(fo), Some(fl)) = (u64_at(file, t), u64_at(file, t + 8)) else {
        return;
    };
    let local = |off: u64| usize::try_from(off.checked_sub(file_base)?).ok();
    let footer = local(fo)
        .zip(usize::try_from(fl).ok())
        .and_then(|(s, l)| Some((s, s.checked_add(l)?)))
        .filter(|&(s, e)| s <= e && e <= t);
    if let Some((fs, fe)) = footer {
        let chunks = u64_at(file, fs).unwrap_or(0);
        for i in 0..chunks.min(1 << 16) as usize {
            let e = fs + 24 + 32 * i;
            if e + 32 > fe {
                break;
            }
            let (Some(off), Some(len)) = (u64_at(file, e), u32_at(file, e + 8)) else {
                break;
            };
            let range = local(off).and_then(|s| Some((s, s.checked_add(len as usize)?)));
            if let Some((s, end)) = range.filter(|&(_, end)| end <= file.len()) {
                let crc = crc32(&file[s..end]);
                put_u32(file, e + 12, crc);
            }
        }
        let crc = crc32(&file[fs..fe]);
        put_u32(file, t + 16, crc);
    }
    let crc = crc32(&file[t..t + 20]);
    put_u32(file, t + 20, crc);
}

/// Recompute every checksum of a whole shard file: header, chunks, footer, trailer.
pub fn repair_shard(file: &mut [u8]) {
    if file.len() >= HEADER_LEN {
        let crc = crc32(&file[..60]);
        put_u32(file, 60, crc);
    }
    if file.len() >= HEADER_LEN + TRAILER_LEN {
        repair_tail(file, 0);
    }
}

/// Recompute the checksum of a manifest envelope (the 8 hex digits at bytes 19..27 cover
/// bytes 40..len-2).
pub fn repair_manifest(file: &mut [u8]) {
    let n = file.len();
    if n < 42 {
        return;
    }
    let hex = format!("{:08x}", crc32(&file[40..n - 2]));
    file[19..27].copy_from_slice(hex.as_bytes());
}

fn split(data: &[u8]) -> Option<(bool, Vec<u8>)> {
    let (&flags, rest) = data.split_first()?;
    Some((flags & REPAIR != 0, rest.to_vec()))
}

/// `shard_decoder`: the payload is a whole shard file. Open it on its own
/// ([`ShardReader::from_bytes`]), decode every chunk, extract every record and assemble
/// every chunk's records into a padded batch.
pub fn shard_decoder(data: &[u8]) {
    let Some((repair, mut bytes)) = split(data) else {
        return;
    };
    if repair {
        repair_shard(&mut bytes);
    }
    let Ok((shard, p)) = ShardReader::from_bytes(bytes, Path::new("fuzz.lcs")) else {
        return;
    };
    let k = p.k as usize;
    for (ci, entry) in shard.footer.chunks.iter().enumerate() {
        let Ok(chunk) = shard.decode_chunk(ci, &p) else {
            continue;
        };
        let first = entry.first_record as usize;
        let mut sources = Vec::new();
        for r in 0..entry.num_records as usize {
            let meta = shard.footer.records[first + r];
            assert_eq!(shard.locate(first + r), Some((ci, r)), "record {} misplaced", first + r);
            let rec = extract(&chunk, r, meta.sample_id, &p, &BufferPool::default());
            assert_eq!(rec.input_ids.len(), meta.length as usize, "record length");
            if p.kind == crate::format::Kind::TopK {
                assert_eq!(rec.ids.len(), rec.input_ids.len() * k, "top-K entries");
            } else {
                assert_eq!(rec.row_lens.len(), rec.input_ids.len(), "sampled rows");
                assert_eq!(rec.counts.len(), rec.ids.len(), "sampled counts");
            }
            if p.has_logprobs() {
                assert_eq!(rec.logprobs.len(), rec.ids.len(), "log-probabilities");
            }
            let vocab = p.vocab_size;
            assert!(rec.ids.iter().chain(&rec.input_ids).all(|&t| t < vocab), "id >= vocab");
            sources.push((&chunk, r));
        }
        for packed in [false, true] {
            if let Ok(batch) =
                crate::threads::install(|| assemble(&sources, &p, packed, &BufferPool::default()))
            {
                assert_eq!(batch.batch, sources.len(), "batch size");
                let rows: usize = if packed {
                    batch.lengths.iter().map(|&l| l as usize).sum()
                } else {
                    batch.batch * batch.max_len
                };
                assert_eq!(batch.input_ids.len(), rows, "input ids");
                assert_eq!(batch.ids.len(), rows * batch.width, "ids");
            }
        }
    }
    assert_eq!(shard.locate(shard.footer.records.len()), None, "record past the end");
}

/// `footer_index`: the payload is an 8-byte little-endian file offset followed by the tail
/// of a shard file from that offset on (its footer and trailer). Parse the trailer and the
/// footer ([`ShardIndex::parse`]) and locate every record.
pub fn footer_index(data: &[u8]) {
    let Some((repair, mut bytes)) = split(data) else {
        return;
    };
    let Some(base) = u64_at(&bytes, 0) else {
        return;
    };
    let tail = &mut bytes[8..];
    if repair {
        repair_tail(tail, base);
    }
    let n = tail.len();
    let Some(file_len) = base.checked_add(n as u64) else {
        return;
    };
    let loc = crate::error::Location::file("fuzz.lcs").shard(0);
    let Some(t) = n.checked_sub(TRAILER_LEN) else {
        assert!(Trailer::decode(tail, file_len, &loc).is_err(), "short trailer accepted");
        return;
    };
    let Ok(trailer) = Trailer::decode(&tail[t..], file_len, &loc) else {
        return;
    };
    // The trailer was checked to end the footer where the trailer starts.
    let Some(start) = trailer.footer_offset.checked_sub(base) else {
        return;
    };
    let Ok(index) = ShardIndex::parse(&tail[start as usize..t], &trailer, &loc) else {
        return;
    };
    let footer = &index.footer;
    for r in 0..footer.records.len() {
        let Some((c, i)) = index.locate(r) else {
            panic!("record {r} of {} has no chunk", footer.records.len());
        };
        let e = footer.chunks[c];
        assert!(i < e.num_records as usize && e.first_record as usize + i == r, "record {r}");
    }
    assert_eq!(index.locate(footer.records.len()), None, "record past the end");
}

/// `manifest`: the payload is a `manifest.json` file. Parse and check it, derive the codec
/// parameters, and check that writing it back and reading that gives the same manifest.
pub fn manifest(data: &[u8]) {
    let Some((repair, mut bytes)) = split(data) else {
        return;
    };
    if repair {
        repair_manifest(&mut bytes);
    }
    let path = Path::new("manifest.json");
    let Ok(m) = Manifest::from_file_bytes(&bytes, path) else {
        return;
    };
    let _ = params_from_manifest(&m, path);
    let Ok(again) = m.to_file_bytes() else {
        return;
    };
    match Manifest::from_file_bytes(&again, path) {
        Ok(back) => assert_eq!(back, m, "manifest changes when written back"),
        Err(e) => panic!("a manifest that was accepted does not read back: {e}"),
    }
}
