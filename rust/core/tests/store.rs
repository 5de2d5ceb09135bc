//! End-to-end tests of the writer and reader through the core API.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use logitcache_core::Error;
use logitcache_core::codec::{LogprobCodec, Record};
use logitcache_core::format::Kind;
use logitcache_core::reader::{OpenOptions, Store};
use logitcache_core::record::{self, IdArray};
use logitcache_core::writer::{Mode, StoreSpec, StoreWriter, WriterOptions};

fn spec(kind: Kind, k: u32, vocab: u32, codec: Option<LogprobCodec>) -> StoreSpec {
    StoreSpec {
        kind,
        k,
        vocab_size: vocab,
        temperature: 1.0,
        logprobs: codec,
        teacher: None,
        tokenizer: None,
        metadata: None,
    }
}

/// A deterministic top-K record: ids distinct per row, log-probs sorted and normalisable.
fn topk_rec(sid: u64, len: usize, k: usize, vocab: u32) -> (Vec<i64>, Vec<i64>, Vec<f32>) {
    let mut x = sid.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let input: Vec<i64> = (0..len).map(|_| (next() % u64::from(vocab)) as i64).collect();
    let mut ids = Vec::new();
    let mut lps = Vec::new();
    for _ in 0..len {
        let start = next() % u64::from(vocab);
        for j in 0..k {
            ids.push(((start + j as u64 * 7919) % u64::from(vocab)) as i64);
        }
        let mut v = -((next() % 1000) as f32) / 500.0 - 0.7;
        for _ in 0..k {
            lps.push(v);
            v -= 1.0 + (next() % 100) as f32 / 37.0;
        }
    }
    (input, ids, lps)
}

fn add_topk(
    w: &mut StoreWriter,
    sid: u64,
    input: &[i64],
    ids: &[i64],
    lps: &[f32],
) -> Result<(), Error> {
    let k = w.params().k;
    let vocab = w.params().vocab_size;
    let len = input.len();
    w.add(sid, len, |buf, seen| {
        record::append_topk(
            buf,
            seen,
            sid,
            IdArray::I64(input),
            IdArray::I64(ids),
            &[len, k as usize],
            lps,
            &[len, k as usize],
            k,
            vocab,
        )
    })
}

fn write_topk(w: &mut StoreWriter, sid: u64, len: usize) -> (Vec<i64>, Vec<i64>, Vec<f32>) {
    let k = w.params().k as usize;
    let vocab = w.params().vocab_size;
    let (input, ids, lps) = topk_rec(sid, len, k, vocab);
    add_topk(w, sid, &input, &ids, &lps).unwrap();
    (input, ids, lps)
}

fn small_opts() -> WriterOptions {
    WriterOptions { zstd_level: 3, chunk_positions: 50, shard_bytes: 20_000 }
}

fn check_same(r: &Record, input: &[i64], ids: &[i64], lps: &[f32], max_err: f32) {
    assert_eq!(r.input_ids.iter().map(|&v| i64::from(v)).collect::<Vec<_>>(), input);
    assert_eq!(r.ids.iter().map(|&v| i64::from(v)).collect::<Vec<_>>(), ids);
    assert_eq!(r.logprobs.len(), lps.len());
    for (a, b) in r.logprobs.iter().zip(lps) {
        assert!((a - b).abs() <= max_err, "{a} vs {b}");
    }
}

#[test]
fn topk_roundtrip_every_codec_many_shards() {
    for (codec, err) in [
        (LogprobCodec::Lossless, 0.0),
        (LogprobCodec::Abs { step_log2: 6, mult: 1 }, 1.0 / 128.0),
        (LogprobCodec::Abs { step_log2: 8, mult: 5 }, 5.0 / 512.0),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut w = StoreWriter::open(
            &path,
            spec(Kind::TopK, 8, 1000, Some(codec)),
            Mode::Create,
            WriterOptions { shard_bytes: 3000, ..small_opts() },
        )
        .unwrap();
        let mut expect = Vec::new();
        for sid in 0..40u64 {
            let len = (sid as usize * 7) % 33;
            expect.push((sid * 1000 + 3, write_topk(&mut w, sid * 1000 + 3, len)));
        }
        w.close().unwrap();
        let s = Store::open(&path, &OpenOptions::default()).unwrap();
        assert!(s.shards.len() > 1, "expected several shards: {:?}", s.manifest.shards);
        assert_eq!(s.len(), 40);
        for (sid, (input, ids, lps)) in &expect {
            check_same(&s.get(*sid).unwrap(), input, ids, lps, err);
        }
        let order: Vec<u64> = expect.iter().rev().map(|e| e.0).collect();
        let b = s.read_batch(&order).unwrap();
        assert_eq!(b.batch, 40);
        for (bi, (sid, (input, _, lps))) in expect.iter().rev().enumerate() {
            assert_eq!(b.lengths[bi] as usize, input.len(), "{sid}");
            for (j, v) in input.iter().enumerate() {
                assert_eq!(i64::from(b.input_ids[bi * b.max_len + j]), *v);
            }
            if !lps.is_empty() {
                let lp0 = b.logprobs[bi * b.max_len * b.width];
                assert!((lp0 - lps[0]).abs() <= err);
            }
        }
        assert!(matches!(s.get(12345), Err(Error::MissingSample { sample_id: 12345, .. })));
    }
}

#[test]
fn append_overwrite_abort_and_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let sp = spec(Kind::TopK, 4, 300, None);
    {
        let mut w = StoreWriter::open(&path, sp.clone(), Mode::Create, small_opts()).unwrap();
        write_topk(&mut w, 1, 10);
        w.close().unwrap();
    }
    assert!(matches!(
        StoreWriter::open(&path, sp.clone(), Mode::Create, small_opts()),
        Err(Error::StoreExists { .. })
    ));
    // Append: duplicates refused, aborted additions vanish, committed ones stay.
    {
        let mut w = StoreWriter::open(&path, sp.clone(), Mode::Append, small_opts()).unwrap();
        let (input, ids, lps) = topk_rec(1, 3, 4, 300);
        assert!(matches!(
            add_topk(&mut w, 1, &input, &ids, &lps),
            Err(Error::DuplicateSample { sample_id: 1, .. })
        ));
        write_topk(&mut w, 2, 60);
        w.abort();
    }
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(s.sample_ids(), vec![1]);
    let files = std::fs::read_dir(path.join("shards")).unwrap().count();
    assert_eq!(files, 1, "aborted shard files must be removed");
    {
        let mut w = StoreWriter::open(&path, sp.clone(), Mode::Append, small_opts()).unwrap();
        write_topk(&mut w, 2, 60);
        w.commit().unwrap();
        write_topk(&mut w, 3, 5);
        w.close().unwrap();
    }
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(s.len(), 3);
    // A mismatching append names the field.
    let mut bad = sp.clone();
    bad.vocab_size = 301;
    match StoreWriter::open(&path, bad, Mode::Append, small_opts()) {
        Err(Error::Mismatch { field, .. }) => assert_eq!(field, "vocab_size"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("mismatch accepted"),
    }
    // Overwrite: the old store is readable until the commit, then replaced.
    {
        let mut w = StoreWriter::open(&path, sp.clone(), Mode::Overwrite, small_opts()).unwrap();
        write_topk(&mut w, 9, 4);
        assert_eq!(Store::open(&path, &OpenOptions::default()).unwrap().len(), 3);
        w.close().unwrap();
    }
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(s.sample_ids(), vec![9]);
    assert_eq!(std::fs::read_dir(path.join("shards")).unwrap().count(), 1);
}

#[test]
fn second_writer_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let sp = spec(Kind::TopK, 2, 50, None);
    let mut w = StoreWriter::open(&path, sp.clone(), Mode::Create, small_opts()).unwrap();
    w.commit().unwrap();
    assert!(matches!(
        StoreWriter::open(&path, sp.clone(), Mode::Append, small_opts()),
        Err(Error::Locked { .. })
    ));
    w.close().unwrap();
    let w2 = StoreWriter::open(&path, sp, Mode::Append, small_opts());
    assert!(w2.is_ok());
}

#[test]
fn sampled_roundtrip_with_and_without_logprobs() {
    for codec in [
        LogprobCodec::None,
        LogprobCodec::Abs { step_log2: 4, mult: 1 },
        LogprobCodec::Abs { step_log2: 6, mult: 7 },
        LogprobCodec::Lossless,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let n = 5u32;
        let mut w = StoreWriter::open(
            &path,
            spec(Kind::Sampled, n, 40, Some(codec)),
            Mode::Create,
            small_opts(),
        )
        .unwrap();
        let input = [3i64, 4, 5];
        let ids = [7i64, 9, -1, 1, -1, -1, 2, 3, 4];
        let counts = [3i64, 2, 0, 5, 0, 0, 1, 1, 3];
        let lps = [-0.5f32, -1.0, 0.0, -0.01, 0.0, 0.0, -2.0, -2.5, -0.25];
        let lp_arg = (codec != LogprobCodec::None).then_some((&lps[..], &[3usize, 3][..]));
        w.add(77, 3, |buf, seen| {
            record::append_sampled(
                buf,
                seen,
                77,
                IdArray::I64(&input),
                IdArray::I64(&ids),
                &[3, 3],
                IdArray::I64(&counts),
                &[3, 3],
                lp_arg,
                n,
                40,
                codec != LogprobCodec::None,
                Some(record::MAX_ROW_MASS),
            )
        })
        .unwrap();
        w.close().unwrap();
        let s = Store::open(&path, &OpenOptions::default()).unwrap();
        let r = s.get(77).unwrap();
        assert_eq!(r.row_lens, vec![2, 1, 3]);
        assert_eq!(r.ids, vec![7, 9, 1, 2, 3, 4]);
        assert_eq!(r.counts, vec![3, 2, 5, 1, 1, 3]);
        if codec == LogprobCodec::None {
            assert!(r.logprobs.is_empty());
        } else {
            let want = [-0.5f32, -1.0, -0.01, -2.0, -2.5, -0.25];
            let bound = codec.max_abs_error().unwrap();
            for (a, b) in r.logprobs.iter().zip(want) {
                assert!(f64::from((a - b).abs()) <= bound, "{codec:?} {a} {b}");
            }
        }
        let b = s.read_batch(&[77]).unwrap();
        assert_eq!(b.width, 3);
        assert_eq!(&b.ids[..9], &[7, 9, -1, 1, -1, -1, 2, 3, 4]);
        assert_eq!(&b.counts[..9], &[3, 2, 0, 5, 0, 0, 1, 1, 3]);
    }
}

#[test]
fn empty_store_and_uncommitted_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let sp = spec(Kind::TopK, 2, 50, None);
    StoreWriter::open(&path, sp.clone(), Mode::Create, small_opts()).unwrap().close().unwrap();
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    assert!(s.is_empty());
    // A writer dropped before any commit leaves no directory behind.
    let p2 = dir.path().join("t");
    {
        let mut w = StoreWriter::open(&p2, sp.clone(), Mode::Create, small_opts()).unwrap();
        write_topk(&mut w, 5, 70);
    }
    assert!(!Path::new(&p2).exists());
}

#[test]
fn hand_built_codecs_must_be_ones_a_reader_accepts() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        LogprobCodec::Abs { step_log2: 6, mult: 2 }, // 2^-5 spelled another way
        LogprobCodec::Abs { step_log2: 6, mult: 9 },
        LogprobCodec::Abs { step_log2: 30, mult: 1 },
        LogprobCodec::Kl { bound: -1.0 },
    ] {
        let path = dir.path().join("s");
        let r = StoreWriter::open(
            &path,
            spec(Kind::TopK, 4, 100, Some(bad)),
            Mode::Create,
            small_opts(),
        );
        assert!(
            matches!(&r, Err(Error::InvalidArgument { arg, .. }) if arg == "codec"),
            "{bad:?}: {:?}",
            r.err()
        );
        assert!(!path.join("manifest.json").exists());
    }
}

/// A batch as the per-record reads see it: every array element of `read_batch` and
/// `read_packed` equals the record from `get` (decode of the whole chunk, then a copy), or
/// the padding. Batches mix records decoded straight into the batch (alone in their chunk,
/// read once, not cached) with records copied out of decoded chunks (sharing a chunk, read
/// twice in one batch, or cached by an earlier read), for codecs decoded in place (abs) and
/// by copy (lossless, kl). Each batch's arrays go back to the store's pool, scribbled on, so
/// later batches are written into reused memory.
#[test]
fn batches_agree_with_single_records() {
    for codec in [
        LogprobCodec::Abs { step_log2: 8, mult: 5 },
        LogprobCodec::Lossless,
        LogprobCodec::Kl { bound: 1e-3 },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let k = 20usize;
        let mut w = StoreWriter::open(
            &path,
            spec(Kind::TopK, k as u32, 5000, Some(codec)),
            Mode::Create,
            WriterOptions { zstd_level: 1, chunk_positions: 40, shard_bytes: 1 << 20 },
        )
        .unwrap();
        // Records of 0 to 90 positions: long ones fill a chunk alone, short ones share.
        let sids: Vec<u64> = (0..30u64).map(|i| i * 17 + 5).collect();
        for (i, &sid) in sids.iter().enumerate() {
            write_topk(&mut w, sid, (i * 37) % 91);
        }
        w.close().unwrap();
        let check = |s: &Store, batch: &[u64]| {
            for packed in [false, true] {
                let b = if packed { s.read_packed(batch) } else { s.read_batch(batch) }.unwrap();
                assert_eq!(b.batch, batch.len());
                let mut at = 0usize;
                for (bi, &sid) in batch.iter().enumerate() {
                    let r = s.get(sid).unwrap();
                    let l = r.input_ids.len();
                    assert_eq!(b.lengths[bi] as usize, l);
                    let slot = if packed { l } else { b.max_len };
                    let inp = &b.input_ids[at..at + slot];
                    let ids = &b.ids[at * k..(at + slot) * k];
                    assert_eq!(inp[..l], r.input_ids.iter().map(|&v| v as i32).collect::<Vec<_>>());
                    assert!(inp[l..].iter().all(|&v| v == 0));
                    assert_eq!(ids[..l * k], r.ids.iter().map(|&v| v as i32).collect::<Vec<_>>());
                    assert!(ids[l * k..].iter().all(|&v| v == 0));
                    let lps = &b.logprobs[at * k..(at + slot) * k];
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&lps[..l * k]), bits(&r.logprobs));
                    assert!(lps[l * k..].iter().all(|&v| v == f32::NEG_INFINITY));
                    at += slot;
                }
                assert_eq!(b.input_ids.len(), at);
                // The next batches reuse these arrays (the store's buffer pool): what is
                // left in them must not show through.
                let pool = s.buffer_pool();
                let (mut inp, mut ids, mut lps) = (b.input_ids, b.ids, b.logprobs);
                inp.fill(7);
                ids.fill(7);
                lps.fill(7.0);
                pool.give(inp);
                pool.give(ids);
                pool.give(lps);
            }
        };
        // Without a cache every record alone in its chunk is decoded into the batch.
        let uncached =
            Store::open(&path, &OpenOptions { cache_chunks: Some(0), ..Default::default() })
                .unwrap();
        let mut order = sids.clone();
        order.reverse();
        check(&uncached, &order);
        check(&uncached, &[sids[20], sids[3], sids[20], sids[29]]);
        check(&uncached, &[]);
        // With a cache warmed by single reads, some chunks come from it.
        let cached = Store::open(&path, &OpenOptions::default()).unwrap();
        for &sid in &sids[10..14] {
            cached.get(sid).unwrap();
        }
        check(&cached, &sids);
    }
}

#[test]
fn a_record_that_would_overflow_the_pending_chunk_starts_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let opts = WriterOptions { chunk_positions: 50, ..WriterOptions::default() };
    let spec = spec(Kind::TopK, 4, 1000, None);
    let mut w = StoreWriter::open(&path, spec, Mode::Create, opts).unwrap();
    let lengths = [30, 30, 10, 80, 5, 45, 5];
    let written: Vec<_> =
        lengths.iter().enumerate().map(|(i, &n)| write_topk(&mut w, i as u64, n)).collect();
    w.close().unwrap();
    let store = Store::open(&path, &OpenOptions::default()).unwrap();
    let shard = &store.shards[0];
    // 30 | 30 + 10 (the next 80 would not fit) | 80 alone | 5 + 45 (full) | 5.
    let per_chunk: Vec<usize> = (0..shard.num_chunks()).map(|c| shard.chunk_records(c)).collect();
    assert_eq!(per_chunk, [1, 2, 1, 2, 1]);
    for (i, (input, ids, lps)) in written.iter().enumerate() {
        check_same(&store.get(i as u64).unwrap(), input, ids, lps, 0.01);
    }
}

/// verify's progress: every call names the same total (twice the shards' bytes, the
/// checksum pass and the decoding pass), counts only go up to it, the last call is
/// (total, total), and there is at least one call per chunk; the report is verify's.
#[test]
fn verify_reports_progress_up_to_twice_the_store_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let mut w = StoreWriter::open(
        &path,
        spec(Kind::TopK, 8, 1000, None),
        Mode::Create,
        WriterOptions { shard_bytes: 3000, ..small_opts() },
    )
    .unwrap();
    for sid in 0..30u64 {
        write_topk(&mut w, sid, 5 + (sid as usize * 7) % 33);
    }
    w.close().unwrap();
    let calls = std::sync::Mutex::new(Vec::new());
    let report = logitcache_core::verify::verify_with_progress(&path, &|done, total| {
        calls.lock().unwrap().push((done, total));
        true
    })
    .unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    let plain = logitcache_core::verify::verify(&path).unwrap();
    assert_eq!((report.chunks, report.samples), (plain.chunks, plain.samples));
    let calls = calls.into_inner().unwrap();
    let bytes: u64 = Store::open(&path, &OpenOptions::default())
        .unwrap()
        .manifest
        .shards
        .iter()
        .map(|s| s.bytes)
        .sum();
    assert!(report.shards > 1 && bytes > 0);
    assert!(calls.iter().all(|&(d, t)| t == 2 * bytes && d <= t), "{calls:?}");
    assert_eq!(calls.last(), Some(&(2 * bytes, 2 * bytes)));
    assert!(calls.len() > report.chunks, "{} calls for {} chunks", calls.len(), report.chunks);
    let mut sorted: Vec<u64> = calls.iter().map(|c| c.0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), calls.len() - 1, "counts repeat (besides the final call)");
}

fn flip_byte(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

/// The store's files and their bytes, to show that something changed nothing.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in [dir.to_path_buf(), dir.join("shards")] {
        for e in std::fs::read_dir(&sub).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() && e.file_name() != ".lock" {
                out.push((e.path().display().to_string(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

type TopkRows = (Vec<i64>, Vec<i64>, Vec<f32>);

/// A store of `n` samples with ids from `first`, in shards of a few samples each; returns
/// what was written.
fn store_of(path: &Path, first: u64, n: u64, spec: StoreSpec) -> Vec<(u64, TopkRows)> {
    let mut w = StoreWriter::open(
        path,
        spec,
        Mode::Create,
        WriterOptions { shard_bytes: 6000, ..small_opts() },
    )
    .unwrap();
    let expect = (first..first + n)
        .map(|sid| (sid, write_topk(&mut w, sid, 10 + (sid as usize * 7) % 40)))
        .collect();
    w.close().unwrap();
    expect
}

fn many_shard_store(path: &Path, n: u64) -> Vec<(u64, TopkRows)> {
    store_of(path, 0, n, spec(Kind::TopK, 8, 1000, None))
}

/// Repair gives up exactly what cannot be read: a damaged chunk's records (the rest of its
/// shard is rewritten), a shard whose footer is damaged and a missing shard (whole); every
/// other sample reads back as written, the repaired store opens and verifies, the damaged
/// files stay as orphans, a dry run changes nothing, and a second repair finds nothing.
#[test]
fn repair_gives_up_only_what_cannot_be_read() {
    use logitcache_core::repair::{RepairOptions, repair};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let expect = many_shard_store(&path, 60);
    let before = Store::open(&path, &OpenOptions::default()).unwrap();
    assert!(before.shards.len() >= 4, "{}", before.shards.len());
    let decoded: std::collections::HashMap<u64, Record> =
        expect.iter().map(|(sid, _)| (*sid, before.get(*sid).unwrap())).collect();
    let (a, b, c) = (&before.shards[0], &before.shards[1], &before.shards[2]);
    assert!(a.num_chunks() >= 3);
    // A: a byte in the middle of chunk 1. B: a byte of the footer. C: gone.
    let e = a.footer.chunks[1];
    flip_byte(&a.path, e.offset + u64::from(e.stored_len) / 2);
    let lost_a: Vec<u64> = a.footer.records
        [e.first_record as usize..(e.first_record + e.num_records) as usize]
        .iter()
        .map(|r| r.sample_id)
        .collect();
    let footer_at = b.footer.chunks.last().map(|e| e.offset + u64::from(e.stored_len)).unwrap();
    flip_byte(&b.path, footer_at + 30);
    std::fs::remove_file(&c.path).unwrap();
    let lost_whole = b.info.num_samples + c.info.num_samples;
    let (a_file, b_file, c_file) = (a.info.file.clone(), b.info.file.clone(), c.info.file.clone());
    let lost_positions = u64::from(e.num_positions) + b.info.num_positions + c.info.num_positions;
    drop(before);
    assert!(Store::open(&path, &OpenOptions::default()).is_err());

    let files = snapshot(&path);
    let plan = repair(&path, RepairOptions { dry_run: true, ..Default::default() }).unwrap();
    assert_eq!(snapshot(&path), files, "a dry run must change nothing");
    assert!(!plan.committed && !plan.sound());
    let names: Vec<&str> = plan.repairs.iter().map(|r| r.file.as_str()).collect();
    assert_eq!(names, [a_file.as_str(), b_file.as_str(), c_file.as_str()]);
    assert_eq!(plan.lost_sample_ids, lost_a);
    assert_eq!(plan.samples_lost, lost_a.len() as u64 + lost_whole);
    assert_eq!(plan.positions_lost, lost_positions);
    assert!(plan.repairs.iter().all(|r| r.new_file.is_none() && !r.problems.is_empty()));
    let ra = &plan.repairs[0];
    assert_eq!((ra.chunks_lost, ra.lost_ids_known), (1, true));
    assert!(!plan.repairs[1].lost_ids_known && !plan.repairs[2].lost_ids_known);
    assert!(
        plan.repairs[0].problems.iter().any(|m| m.contains("chunk 1,")),
        "{:?}",
        plan.repairs[0].problems
    );

    let done = repair(&path, RepairOptions::default()).unwrap();
    assert!(done.committed);
    assert_eq!(
        (done.lost_sample_ids.clone(), done.samples_lost),
        (plan.lost_sample_ids.clone(), plan.samples_lost)
    );
    let new_a = done.repairs[0].new_file.clone().unwrap();
    assert!(done.repairs[1].new_file.is_none() && done.repairs[2].new_file.is_none());
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(s.len() as u64, 60 - done.samples_lost);
    assert!(s.manifest.shards.iter().any(|i| i.file == new_a));
    let mut kept = 0;
    for (sid, (input, ids, lps)) in &expect {
        if s.contains(*sid) {
            let r = s.get(*sid).unwrap();
            check_same(&r, input, ids, lps, 5.0 / 512.0);
            let was = &decoded[sid];
            assert_eq!((&r.input_ids, &r.ids), (&was.input_ids, &was.ids));
            assert_eq!(
                r.logprobs.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                was.logprobs.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            kept += 1;
        } else {
            assert!(matches!(s.get(*sid), Err(Error::MissingSample { .. })));
        }
    }
    assert_eq!(kept, s.len());
    assert!(lost_a.iter().all(|sid| !s.contains(*sid)));
    let v = logitcache_core::verify::verify(&path).unwrap();
    assert!(v.ok(), "{:?}", v.problems);
    assert_eq!(v.orphans, [a_file.clone(), b_file.clone()], "damaged files stay, as orphans");
    let again = repair(&path, RepairOptions::default()).unwrap();
    assert!(again.sound() && !again.committed && again.samples_lost == 0);
    // The repaired store takes appends under fresh names.
    let mut w =
        StoreWriter::open(&path, spec(Kind::TopK, 8, 1000, None), Mode::Append, small_opts())
            .unwrap();
    let extra = write_topk(&mut w, 1000, 12);
    w.close().unwrap();
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    check_same(&s.get(1000).unwrap(), &extra.0, &extra.1, &extra.2, 5.0 / 512.0);
}

/// A sound store: repair commits nothing and touches no file.
#[test]
fn repair_of_a_sound_store_changes_nothing() {
    use logitcache_core::repair::{RepairOptions, repair};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    many_shard_store(&path, 20);
    let files = snapshot(&path);
    let r = repair(&path, RepairOptions { dry_run: false, remove_damaged: true }).unwrap();
    assert!(r.sound() && !r.committed && r.removed.is_empty() && r.lost_sample_ids.is_empty());
    assert_eq!(snapshot(&path), files);
}

/// A shard none of whose chunks is sound is left out whole (no empty shard written), and
/// `remove_damaged` deletes the damaged files once the repair is committed. Another
/// writer's lock keeps repair out (a dry run still reads).
#[test]
fn repair_drops_a_shard_with_nothing_sound_and_removes_damaged_files() {
    use logitcache_core::repair::{RepairOptions, repair};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    many_shard_store(&path, 40);
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    let victim = &s.shards[1];
    for e in &victim.footer.chunks {
        flip_byte(&victim.path, e.offset + 3);
    }
    let (file, samples) = (victim.info.file.clone(), victim.info.num_samples);
    let shards_before = s.shards.len();
    drop(s);
    let w = StoreWriter::open(&path, spec(Kind::TopK, 8, 1000, None), Mode::Append, small_opts())
        .unwrap();
    assert!(matches!(repair(&path, RepairOptions::default()), Err(Error::Locked { .. })));
    let plan = repair(&path, RepairOptions { dry_run: true, ..Default::default() }).unwrap();
    assert_eq!(plan.samples_lost, samples);
    drop(w);
    let r = repair(&path, RepairOptions { dry_run: false, remove_damaged: true }).unwrap();
    assert!(r.committed);
    assert_eq!(r.repairs.len(), 1);
    assert_eq!((r.repairs[0].chunks_kept, r.repairs[0].new_file.clone()), (0, None));
    assert_eq!(r.removed, std::slice::from_ref(&file));
    assert!(!path.join(&file).exists());
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(s.shards.len(), shards_before - 1);
    assert_eq!(s.len() as u64, 40 - samples);
    let v = logitcache_core::verify::verify(&path).unwrap();
    assert!(v.ok() && v.orphans.is_empty(), "{:?} {:?}", v.problems, v.orphans);
}

/// Two readable copies of a sample id are not damage repair can mend: it refuses, naming
/// the id, and changes nothing.
#[test]
fn repair_refuses_a_sample_stored_twice() {
    use logitcache_core::manifest::Manifest;
    use logitcache_core::repair::{RepairOptions, repair};
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
    for (p, first) in [(&pa, 0u64), (&pb, 5)] {
        let mut w =
            StoreWriter::open(p, spec(Kind::TopK, 8, 1000, None), Mode::Create, small_opts())
                .unwrap();
        for sid in first..first + 10 {
            write_topk(&mut w, sid, 7);
        }
        w.close().unwrap();
    }
    let mut ma = Manifest::read(&pa).unwrap();
    let mb = Manifest::read(&pb).unwrap();
    for s in &mb.shards {
        std::fs::copy(pb.join(&s.file), pa.join(&s.file)).unwrap();
        ma.shards.push(s.clone());
        ma.num_samples += s.num_samples;
        ma.num_positions += s.num_positions;
    }
    ma.commit(&pa).unwrap();
    assert!(Store::open(&pa, &OpenOptions::default()).is_err());
    let files = snapshot(&pa);
    let err = repair(&pa, RepairOptions::default()).unwrap_err();
    assert!(err.to_string().contains("sample id 5 is stored twice"), "{err}");
    assert_eq!(snapshot(&pa), files);
}

/// A repair that fails before its manifest is committed (here: the temporary manifest's
/// name is taken by a directory) removes the shards it wrote and leaves the store as it
/// was; the next repair goes through.
#[test]
fn a_repair_that_cannot_commit_leaves_the_store_as_it_was() {
    use logitcache_core::repair::{RepairOptions, repair};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    many_shard_store(&path, 30);
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    let e = s.shards[0].footer.chunks[0];
    flip_byte(&s.shards[0].path, e.offset + 5);
    drop(s);
    let files = snapshot(&path);
    let blocker = path.join(format!(".manifest.json.tmp-{}", std::process::id()));
    std::fs::create_dir(&blocker).unwrap();
    let err = repair(&path, RepairOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_eq!(snapshot(&path), files, "the new shard must be removed again");
    std::fs::remove_dir(&blocker).unwrap();
    let r = repair(&path, RepairOptions::default()).unwrap();
    assert!(r.committed && r.repairs[0].new_file.is_some());
    assert!(Store::open(&path, &OpenOptions::default()).is_ok());
}

/// A shard that cannot be checked for a reason that says nothing about its bytes (here its
/// path is a directory: reading it fails with EISDIR) stops the repair: nothing is given
/// up that was not shown to be damaged. A missing shard is given up.
#[test]
fn repair_stops_at_a_shard_it_cannot_check() {
    use logitcache_core::repair::{RepairOptions, repair};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    many_shard_store(&path, 30);
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    let (victim, samples) = (s.shards[0].path.clone(), s.shards[0].info.num_samples);
    drop(s);
    std::fs::remove_file(&victim).unwrap();
    std::fs::create_dir(&victim).unwrap();
    let files = snapshot(&path);
    for dry_run in [true, false] {
        let err = repair(&path, RepairOptions { dry_run, ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("could not be checked"), "{err}");
    }
    assert_eq!(snapshot(&path), files);
    assert!(victim.is_dir());
    std::fs::remove_dir(&victim).unwrap();
    let r = repair(&path, RepairOptions::default()).unwrap();
    assert!(r.committed && r.samples_lost == samples && !r.repairs[0].lost_ids_known);
}

/// A store of more shards than the process may open files: repair keeps only the damaged
/// shards open (the sound ones by their sample ids), so it goes through. The test runs
/// itself again in a child process, which lowers its own limit, so that no other test
/// sees the limit (cargo test runs tests as threads of one process).
#[test]
fn repair_of_a_store_with_more_shards_than_open_files() {
    use logitcache_core::repair::{RepairOptions, repair};
    const NAME: &str = "repair_of_a_store_with_more_shards_than_open_files";
    if std::env::var_os("LOGITCACHE_TEST_CHILD").is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
            .env("LOGITCACHE_TEST_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let mut w = StoreWriter::open(
        &path,
        spec(Kind::TopK, 8, 1000, None),
        Mode::Create,
        WriterOptions { shard_bytes: 100, chunk_positions: 6, ..small_opts() },
    )
    .unwrap();
    for sid in 0..150u64 {
        write_topk(&mut w, sid, 6);
    }
    w.close().unwrap();
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    assert!(s.shards.len() >= 100, "{}", s.shards.len());
    let e = s.shards[7].footer.chunks[0];
    flip_byte(&s.shards[7].path, e.offset + 2);
    drop(s);
    let limit = libc::rlimit { rlim_cur: 64, rlim_max: 64 };
    // SAFETY: setrlimit reads one rlimit struct through a valid pointer to a local.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let r = repair(&path, RepairOptions::default()).unwrap();
    assert!(r.committed && r.repairs.len() == 1 && r.samples_lost >= 1);
}

/// Shards read with positioned reads beyond `max_open_files` share that many open files:
/// every record reads back as through maps, the cache never holds more files than allowed,
/// and a store under the limit keeps a file per shard as before.
#[test]
fn positioned_reads_of_many_shards_share_a_bounded_set_of_files() {
    use logitcache_core::source::Source;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let mut w = StoreWriter::open(
        &path,
        spec(Kind::TopK, 8, 1000, None),
        Mode::Create,
        WriterOptions { shard_bytes: 100, chunk_positions: 6, ..small_opts() },
    )
    .unwrap();
    for sid in 0..40u64 {
        write_topk(&mut w, sid, 6);
    }
    w.close().unwrap();
    let mapped =
        Store::open(&path, &OpenOptions { mmap: Some(true), ..Default::default() }).unwrap();
    assert!(mapped.shards.len() >= 30, "{}", mapped.shards.len());
    let opts = |max| OpenOptions {
        mmap: Some(false),
        max_open_files: Some(max),
        cache_chunks: Some(0),
        ..Default::default()
    };
    let eager = Store::open(&path, &opts(1000)).unwrap();
    assert!(eager.shards.iter().all(|s| matches!(s.source, Source::File { .. })));
    let s = Store::open(&path, &opts(4)).unwrap();
    let Source::Cached { files, .. } = &s.shards[0].source else {
        panic!("expected shards read through the file cache");
    };
    assert!(s.shards.iter().all(|s| matches!(s.source, Source::Cached { .. })));
    assert!(files.open_files() <= 4);
    let sids = mapped.sample_ids();
    for round in 0..2 {
        for &sid in &sids {
            let (a, b) = (s.get(sid).unwrap(), mapped.get(sid).unwrap());
            assert_eq!((&a.input_ids, &a.ids), (&b.input_ids, &b.ids), "{sid} round {round}");
            assert_eq!(a.logprobs, b.logprobs);
            assert!(files.open_files() <= 4);
        }
    }
    let (a, b) = (s.read_batch(&sids).unwrap(), mapped.read_batch(&sids).unwrap());
    assert_eq!((a.ids, a.logprobs, a.input_ids), (b.ids, b.logprobs, b.input_ids));
    assert!(files.open_files() <= 4 && files.open_files() > 0);
    let files = std::sync::Arc::clone(files);
    drop(s);
    assert_eq!(files.open_files(), 0, "a dropped store closes its files");
}

fn with_identity(
    mut s: StoreSpec,
    teacher: (Option<&str>, Option<&str>),
    metadata: serde_json::Value,
) -> StoreSpec {
    use logitcache_core::manifest::TeacherInfo;
    s.teacher = Some(TeacherInfo {
        name: teacher.0.map(String::from),
        config_fingerprint: teacher.1.map(String::from),
    });
    s.metadata = Some(metadata);
    s
}

/// Every record of `dir`, decoded.
fn records(dir: &Path) -> Vec<(u64, Record)> {
    let s = Store::open(dir, &OpenOptions::default()).unwrap();
    let mut ids = s.sample_ids();
    ids.sort_unstable();
    ids.into_iter().map(|sid| (sid, s.get(sid).unwrap())).collect()
}

/// Stores written side by side become one: every record reads back from the merged store
/// exactly as from its source, the shard files are hard links (or copies, when asked), the
/// teacher and metadata are what the sources say together, the sources are untouched,
/// and the merged store verifies and takes appends like any other.
#[test]
fn merge_makes_one_store_of_several() {
    use logitcache_core::merge::{MergeOptions, merge, merge_with_progress};
    use logitcache_core::verify::verify;
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let base = spec(Kind::TopK, 8, 1000, None);
    let srcs: Vec<_> = (0..3).map(|i| dir.path().join(format!("rank{i}"))).collect();
    store_of(
        &srcs[0],
        0,
        40,
        with_identity(base.clone(), (Some("t"), None), serde_json::json!({"a": 1, "rank": 0})),
    );
    store_of(
        &srcs[1],
        1000,
        25,
        with_identity(base.clone(), (None, Some("sha256:f")), serde_json::json!({"rank": 1})),
    );
    store_of(&srcs[2], 2000, 1, base.clone());
    let before: Vec<_> = srcs.iter().map(|s| snapshot(s)).collect();
    let mut want: Vec<(u64, Record)> = srcs.iter().flat_map(|s| records(s)).collect();
    want.sort_by_key(|(sid, _)| *sid);
    let shards: usize = srcs
        .iter()
        .map(|s| logitcache_core::manifest::Manifest::read(s).unwrap().shards.len())
        .sum();
    assert!(shards >= 6, "{shards}");

    let dest = dir.path().join("merged");
    let seen = std::sync::Mutex::new(Vec::new());
    let r = merge_with_progress(&dest, &srcs, MergeOptions::default(), &|d, t| {
        seen.lock().unwrap().push((d, t));
        true
    })
    .unwrap();
    assert_eq!((r.shards_linked, r.shards_copied), (shards, 0));
    assert_eq!((r.num_samples, r.sources.len()), (66, 3));
    assert_eq!(r.sources[1].samples, 25);
    assert_eq!(r.metadata_conflicts, vec!["rank".to_string()]);
    let total: u64 = r.sources.iter().map(|s| s.bytes).sum();
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), shards);
    assert!(seen.iter().all(|&(_, t)| t == total) && seen.last().unwrap().0 == total);
    assert_eq!(records(&dest), want);
    let m = logitcache_core::manifest::Manifest::read(&dest).unwrap();
    let t = m.teacher.clone().unwrap();
    assert_eq!((t.name.as_deref(), t.config_fingerprint.as_deref()), (Some("t"), Some("sha256:f")));
    assert_eq!(m.metadata, serde_json::json!({"a": 1, "rank": 1}));
    for s in &m.shards {
        assert_eq!(std::fs::metadata(dest.join(&s.file)).unwrap().nlink(), 2, "{}", s.file);
    }
    let v = verify(&dest).unwrap();
    assert!(v.problems.is_empty() && v.orphans.is_empty(), "{v:?}");
    for (s, b) in srcs.iter().zip(&before) {
        assert_eq!(&snapshot(s), b);
    }

    // Copies: same store, files of their own.
    let copied = dir.path().join("copied");
    let r = merge(&copied, &srcs, MergeOptions { copy: true, ..Default::default() }).unwrap();
    assert_eq!((r.shards_linked, r.shards_copied), (0, shards));
    assert_eq!(records(&copied), want);
    let mc = logitcache_core::manifest::Manifest::read(&copied).unwrap();
    for (a, b) in mc.shards.iter().zip(&m.shards) {
        assert_eq!(std::fs::metadata(copied.join(&a.file)).unwrap().nlink(), 1);
        assert_eq!(
            std::fs::read(copied.join(&a.file)).unwrap(),
            std::fs::read(dest.join(&b.file)).unwrap()
        );
    }

    // The merged store takes appends, and a second merge into it.
    let mut w = StoreWriter::open(&dest, base.clone(), Mode::Append, small_opts()).unwrap();
    write_topk(&mut w, 5000, 12);
    w.close().unwrap();
    let more = dir.path().join("more");
    store_of(&more, 6000, 5, base);
    let r = merge(
        &dest,
        std::slice::from_ref(&more),
        MergeOptions { append: true, ..Default::default() },
    )
    .unwrap();
    assert_eq!(r.num_samples, 66 + 1 + 5);
    let got = records(&dest);
    assert_eq!(got.len(), 72);
    assert_eq!(&got[..66], &want[..]);
    assert_eq!(got[67..], records(&more)[..]);
    assert!(verify(&dest).unwrap().problems.is_empty());
}

/// What a merge refuses, changing nothing: stores that differ in configuration (naming the
/// field and the store), a sample id in two stores (naming both, counting the others: a
/// dry run lists them), a store merged with
/// itself, an existing destination without `append`, a locked destination, no sources.
#[test]
fn merge_refuses_what_would_not_be_one_store() {
    use logitcache_core::merge::{MergeOptions, merge};
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    store_of(&p("a"), 0, 10, spec(Kind::TopK, 8, 1000, None));
    store_of(&p("b"), 100, 10, spec(Kind::TopK, 8, 1000, None));
    store_of(&p("k4"), 200, 10, spec(Kind::TopK, 4, 1000, None));
    store_of(&p("lossless"), 300, 10, spec(Kind::TopK, 8, 1000, Some(LogprobCodec::Lossless)));
    store_of(&p("overlap"), 105, 3, spec(Kind::TopK, 8, 1000, None));
    let mut hot = spec(Kind::TopK, 8, 1000, None);
    hot.temperature = 2.0;
    store_of(&p("hot"), 400, 10, hot);
    store_of(
        &p("other_teacher"),
        500,
        10,
        with_identity(spec(Kind::TopK, 8, 1000, None), (Some("x"), None), serde_json::json!({})),
    );
    store_of(
        &p("teacher"),
        600,
        10,
        with_identity(spec(Kind::TopK, 8, 1000, None), (Some("y"), None), serde_json::json!({})),
    );
    let dest = p("dest");
    let opts = MergeOptions::default();
    let refuse = |srcs: &[&str], want: &str| {
        let srcs: Vec<_> = srcs.iter().map(|s| p(s)).collect();
        let err = merge(&dest, &srcs, opts).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert!(!dest.exists(), "{err}: the destination must not be created");
        err
    };
    let e = refuse(&["a", "k4"], "k expected 8, found 4");
    assert!(e.to_string().contains(&p("k4").display().to_string()), "{e}");
    refuse(&["a", "lossless"], "codec expected abs");
    refuse(&["a", "hot"], "temperature expected 1, found 2");
    refuse(&["teacher", "a", "other_teacher"], "teacher.name expected \"y\", found \"x\"");
    let e = refuse(&["a", "b", "overlap"], "duplicate sample id 105");
    assert!(
        e.to_string().contains(&p("b").display().to_string())
            && e.to_string().contains(&p("overlap").display().to_string()),
        "{e}"
    );
    assert!(e.to_string().contains("3 sample ids in all are held twice (105, 106, 107)"), "{e}");
    // A dry run lists them, and writes nothing.
    let srcs = [p("a"), p("b"), p("overlap")];
    let r = merge(&dest, &srcs, MergeOptions { dry_run: true, ..opts }).unwrap();
    assert_eq!(r.duplicates, vec![105, 106, 107]);
    // Each sample once; per source, the ids an earlier store holds.
    assert_eq!((r.num_samples, r.shards_linked, r.shards_copied), (20, 0, 0));
    let per_source: Vec<&[u64]> = r.sources.iter().map(|s| s.duplicates.as_slice()).collect();
    assert_eq!(per_source, [&[][..], &[], &[105, 106, 107]]);
    assert!(!dest.exists());
    refuse(&["a", "b", "a"], "are the same store");
    refuse(&[], "no store to merge");
    refuse(&["a", "missing"], "missing");

    // An existing destination: refused without append, and itself as a source.
    std::fs::rename(p("b"), &dest).unwrap();
    let files = snapshot(&dest);
    let err = merge(&dest, &[p("a")], opts).unwrap_err();
    assert!(matches!(err, Error::StoreExists { .. }), "{err}");
    let append = MergeOptions { append: true, ..opts };
    let err = merge(&dest, &[p("a"), dest.clone()], append).unwrap_err();
    assert!(err.to_string().contains("is the destination itself"), "{err}");
    let err = merge(&dest, &[p("overlap")], append).unwrap_err();
    assert!(err.to_string().contains("duplicate sample id 105"), "{err}");
    let w = StoreWriter::open(&dest, spec(Kind::TopK, 8, 1000, None), Mode::Append, small_opts())
        .unwrap();
    let err = merge(&dest, &[p("a")], append).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    drop(w);
    assert_eq!(snapshot(&dest), files);
    merge(&dest, &[p("a")], append).unwrap();
    assert_eq!(Store::open(&dest, &OpenOptions::default()).unwrap().sample_ids().len(), 20);
}

/// A copy checks the whole file against its manifest entry: a damaged chunk (which opening
/// the shard does not read) stops the merge, and nothing of it is left behind.
#[test]
fn a_merge_that_copies_a_damaged_shard_leaves_nothing_behind() {
    use logitcache_core::merge::{MergeOptions, merge};
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    store_of(&a, 0, 30, spec(Kind::TopK, 8, 1000, None));
    store_of(&b, 100, 30, spec(Kind::TopK, 8, 1000, None));
    let s = Store::open(&b, &OpenOptions::default()).unwrap();
    let last = s.shards.last().unwrap();
    flip_byte(&last.path, last.footer.chunks[0].offset + 3);
    let bad = last.path.clone();
    drop(s);
    let dest = dir.path().join("dest");
    let err =
        merge(&dest, &[a.clone(), b.clone()], MergeOptions { copy: true, ..Default::default() })
            .unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&bad.display().to_string()), "{err}");
    assert!(!dest.exists());
    // Into an existing store: it stays as it was, without the copies made before the fault.
    store_of(&dest, 900, 3, spec(Kind::TopK, 8, 1000, None));
    let files = snapshot(&dest);
    let err = merge(&dest, &[a, b], MergeOptions { copy: true, append: true, dry_run: false })
        .unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert_eq!(snapshot(&dest), files);
}

/// A writer can take whole shards of another store between records of its own: records
/// added before stay in a shard before it, those added after go to a new one.
#[test]
fn a_writer_adopts_shards_between_its_own_records() {
    use logitcache_core::manifest::Manifest;
    use logitcache_core::reader::{ShardReader, params_from_manifest};
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    store_of(&other, 100, 20, spec(Kind::TopK, 8, 1000, None));
    let path = dir.path().join("s");
    let mut w =
        StoreWriter::open(&path, spec(Kind::TopK, 8, 1000, None), Mode::Create, small_opts())
            .unwrap();
    write_topk(&mut w, 1, 5);
    let m = Manifest::read(&other).unwrap();
    let p = params_from_manifest(&m, &other.join("manifest.json")).unwrap();
    for (i, info) in m.shards.iter().enumerate() {
        let shard = ShardReader::open(&other, i as u32, info, &p, false).unwrap();
        w.add_shard(&shard, i % 2 == 1, &|_| true).unwrap();
        let err = w.add_shard(&shard, false, &|_| true).unwrap_err();
        assert!(matches!(err, Error::DuplicateSample { .. }), "{err}");
    }
    write_topk(&mut w, 2, 5);
    assert_eq!(w.num_samples(), 22);
    w.close().unwrap();
    let mut want = records(&other);
    let own = records(&path);
    assert_eq!(own.len(), 22);
    assert_eq!((own[0].0, own[1].0), (1, 2));
    want.insert(0, own[1].clone());
    want.insert(0, own[0].clone());
    assert_eq!(own, want);
    let mine = Manifest::read(&path).unwrap();
    assert_eq!(mine.shards.len(), m.shards.len() + 2);
    assert_eq!(mine.shards[0].num_samples, 1);
    assert_eq!(mine.shards.last().unwrap().num_samples, 1);

    // A shard of a store encoded otherwise is refused, naming the field.
    let k4 = dir.path().join("k4");
    store_of(&k4, 500, 3, spec(Kind::TopK, 4, 1000, None));
    let m = Manifest::read(&k4).unwrap();
    let p = params_from_manifest(&m, &k4.join("manifest.json")).unwrap();
    let shard = ShardReader::open(&k4, 0, &m.shards[0], &p, false).unwrap();
    let mut w =
        StoreWriter::open(&path, spec(Kind::TopK, 8, 1000, None), Mode::Append, small_opts())
            .unwrap();
    let err = w.add_shard(&shard, false, &|_| true).unwrap_err();
    assert!(matches!(&err, Error::Mismatch { field, .. } if field == "k"), "{err}");
}

/// A store whose manifest is damaged (or deleted) reads again after a rebuild from its
/// shard files: the rebuilt manifest lists exactly the shards the old one did, with the
/// same entries, and the configuration; teacher and metadata are what the caller gives;
/// the damaged manifest is kept; a dry run changes nothing; a sound manifest is refused.
#[test]
fn rebuild_manifest_from_the_shards() {
    use logitcache_core::manifest::{Manifest, TeacherInfo};
    use logitcache_core::rebuild::{RebuildOptions, rebuild_manifest};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let mut sp = spec(Kind::TopK, 8, 1000, Some(LogprobCodec::Lossless));
    sp.temperature = 0.7;
    store_of(&path, 0, 60, sp.clone());
    let original = Manifest::read(&path).unwrap();
    assert!(original.shards.len() >= 4);
    let want = records(&path);
    let none = |_: u64, _: u64| true;

    let err = rebuild_manifest(&path, &RebuildOptions::default(), &none).unwrap_err();
    assert!(err.to_string().contains("nothing to rebuild"), "{err}");

    let mpath = path.join("manifest.json");
    flip_byte(&mpath, 60);
    let damaged = std::fs::read(&mpath).unwrap();
    assert!(Store::open(&path, &OpenOptions::default()).is_err());
    let files = snapshot(&path);
    let dry = RebuildOptions { dry_run: true, ..Default::default() };
    let plan = rebuild_manifest(&path, &dry, &none).unwrap();
    assert!(!plan.committed && plan.left_out.is_empty());
    assert_eq!(plan.shards, original.shards);
    assert!(plan.manifest_problem.contains("manifest.json"), "{}", plan.manifest_problem);
    assert!(
        plan.configuration.contains("k 8, vocab_size 1000, codec lossless"),
        "{}",
        plan.configuration
    );
    assert_eq!(snapshot(&path), files);

    let seen = std::sync::Mutex::new(Vec::new());
    let opts = RebuildOptions {
        teacher: Some(TeacherInfo { name: Some("t".into()), config_fingerprint: None }),
        metadata: Some(serde_json::json!({"note": "rebuilt"})),
        ..Default::default()
    };
    let r = rebuild_manifest(&path, &opts, &|d, t| {
        seen.lock().unwrap().push((d, t));
        true
    })
    .unwrap();
    assert!(r.committed);
    assert_eq!(r.kept_damaged.as_deref(), Some("manifest.json.damaged"));
    assert_eq!(std::fs::read(path.join("manifest.json.damaged")).unwrap(), damaged);
    let total: u64 = original.shards.iter().map(|s| s.bytes).sum();
    assert_eq!(seen.lock().unwrap().last(), Some(&(total, total)));
    let m = Manifest::read(&path).unwrap();
    assert_eq!(m.shards, original.shards);
    assert_eq!((m.num_samples, m.num_positions), (original.num_samples, original.num_positions));
    assert_eq!((m.kind.as_str(), m.k, m.vocab_size, m.temperature), ("topk", 8, 1000, 0.7));
    assert_eq!(m.codec.logprobs, original.codec.logprobs);
    assert_eq!(m.teacher.unwrap().name.as_deref(), Some("t"));
    assert_eq!(m.metadata, serde_json::json!({"note": "rebuilt"}));
    assert_eq!(records(&path), want);
    // The rebuilt store takes appends of the same configuration (0.7 read back as 0.7).
    let mut w = StoreWriter::open(&path, sp, Mode::Append, small_opts()).unwrap();
    write_topk(&mut w, 999, 4);
    w.close().unwrap();

    // A deleted manifest: the same.
    std::fs::remove_file(&mpath).unwrap();
    let r = rebuild_manifest(&path, &RebuildOptions::default(), &none).unwrap();
    assert!(r.committed && r.kept_damaged.is_none());
    assert_eq!(r.num_samples, 61);
    assert!(logitcache_core::verify::verify(&path).unwrap().problems.is_empty());
}

/// What a rebuild takes, leaves out and refuses among the files of `shards/`: a complete
/// shard that no manifest named is taken; a truncated one, or one renamed, is left out and
/// reported; shards of another configuration, or two shards holding one sample, stop it
/// with nothing changed and the files named. A damaged chunk does not stop it: repair, run
/// next, gives the chunk up.
#[test]
fn rebuild_manifest_takes_only_what_is_sound_and_refuses_to_guess() {
    use logitcache_core::manifest::Manifest;
    use logitcache_core::rebuild::{RebuildOptions, rebuild_manifest};
    use logitcache_core::repair::{RepairOptions, repair};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    store_of(&path, 0, 40, spec(Kind::TopK, 8, 1000, None));
    let extra = dir.path().join("extra");
    store_of(&extra, 500, 20, spec(Kind::TopK, 8, 1000, None));
    let other = dir.path().join("other");
    store_of(&other, 700, 3, spec(Kind::TopK, 4, 1000, None));
    let original = Manifest::read(&path).unwrap();
    let shard = |m: &Manifest, i: usize| m.shards[i].file.clone();
    let put = |from: &Path, file: &str, seq: u64, uid: &str| {
        let name = format!("shards/{seq:06}-{uid}.lcs");
        std::fs::copy(from.join(file), path.join(&name)).unwrap();
        name
    };
    let me = Manifest::read(&extra).unwrap();
    let uncommitted = put(&extra, &shard(&me, 0), 90, &me.shards[0].uid);
    let truncated = put(&extra, &shard(&me, 1), 91, &me.shards[1].uid);
    let f = std::fs::OpenOptions::new().write(true).open(path.join(&truncated)).unwrap();
    f.set_len(me.shards[1].bytes - 10).unwrap();
    let renamed = put(&extra, &shard(&me, 0), 92, "00000000000000aa");
    std::fs::remove_file(path.join("manifest.json")).unwrap();
    let none = |_: u64, _: u64| true;
    let dry = RebuildOptions { dry_run: true, ..Default::default() };

    let r = rebuild_manifest(&path, &dry, &none).unwrap();
    let taken: Vec<_> = r.shards.iter().map(|s| s.file.clone()).collect();
    let mut want: Vec<_> = original.shards.iter().map(|s| s.file.clone()).collect();
    want.push(uncommitted.clone());
    assert_eq!(taken, want);
    let left: Vec<_> = r.left_out.iter().map(|l| l.file.clone()).collect();
    assert_eq!(left, vec![truncated.clone(), renamed.clone()]);
    assert!(r.left_out[1].problem.contains("uid"), "{:?}", r.left_out);

    // Another store's shard: two configurations.
    let mo = Manifest::read(&other).unwrap();
    let foreign = put(&other, &shard(&mo, 0), 93, &mo.shards[0].uid);
    let err = rebuild_manifest(&path, &RebuildOptions::default(), &none).unwrap_err();
    assert!(err.to_string().contains("2 different configurations"), "{err}");
    assert!(err.to_string().contains(&foreign), "{err}");
    assert!(!path.join("manifest.json").exists());
    std::fs::remove_file(path.join(&foreign)).unwrap();

    // A shard holding samples another shard holds.
    let twin = put(&path, &shard(&original, 1), 94, "00000000000000bb");
    let mut h = std::fs::read(path.join(&twin)).unwrap();
    h[40..48].copy_from_slice(&0xbbu64.to_le_bytes());
    let crc = crc32fast::hash(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path.join(&twin), h).unwrap();
    let err = rebuild_manifest(&path, &RebuildOptions::default(), &none).unwrap_err();
    assert!(matches!(err, Error::DuplicateSample { .. }), "{err}");
    assert!(err.to_string().contains(&twin) && err.to_string().contains(&shard(&original, 1)));
    assert!(!path.join("manifest.json").exists());
    std::fs::remove_file(path.join(&twin)).unwrap();

    // A damaged chunk: taken; repair then gives it up.
    let s0 = path.join(shard(&original, 0));
    let (s0_reader, _) =
        logitcache_core::reader::ShardReader::from_bytes(std::fs::read(&s0).unwrap(), &s0).unwrap();
    flip_byte(&s0, s0_reader.footer.chunks[0].offset + 2);
    let r = rebuild_manifest(&path, &RebuildOptions::default(), &none).unwrap();
    assert!(r.committed && r.shards.len() == original.shards.len() + 1);
    assert_eq!(r.num_samples, 40 + me.shards[0].num_samples);
    let fixed = repair(&path, RepairOptions::default()).unwrap();
    assert_eq!(fixed.repairs.len(), 1);
    assert!(Store::open(&path, &OpenOptions::default()).is_ok());
}

/// The footer's sample ids of every shard of `dir`, shard by shard.
fn shard_sample_ids(dir: &Path) -> Vec<Vec<u64>> {
    let s = Store::open(dir, &OpenOptions::default()).unwrap();
    s.shards.iter().map(|sh| sh.footer.records.iter().map(|r| r.sample_id).collect()).collect()
}

/// Removal takes exactly the asked samples out: a shard left with nothing is dropped, the
/// others that held some are rewritten (untouched chunks copied byte for byte, chunks that
/// held removed and kept records encoded again), shards that held none keep their files,
/// the old files are deleted, and the store reads back as before minus the removed
/// samples, in the same order (lossless: bit for bit; abs: within its bound of before).
#[test]
fn remove_samples_rewrites_only_the_shards_that_hold_them() {
    use logitcache_core::manifest::Manifest;
    use logitcache_core::remove::{RemoveOptions, remove_samples, remove_samples_with_progress};
    use logitcache_core::verify::verify;
    for codec in [Some(LogprobCodec::Lossless), None] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        store_of(&path, 0, 60, spec(Kind::TopK, 8, 1000, codec));
        let before = records(&path);
        let order = Store::open(&path, &OpenOptions::default()).unwrap().sample_ids();
        let by_shard = shard_sample_ids(&path);
        let m0 = Manifest::read(&path).unwrap();
        let old_crcs: Vec<Vec<u32>> = Store::open(&path, &OpenOptions::default())
            .unwrap()
            .shards
            .iter()
            .map(|sh| sh.footer.chunks.iter().map(|e| e.crc32).collect())
            .collect();
        assert!(by_shard.len() >= 5 && by_shard[1].len() >= 2, "{by_shard:?}");
        // Shard 1 whole, two samples of shard 3 (one shared chunk at least: records of 10-49
        // positions in chunks of 50), the last sample of the store.
        let mut gone: Vec<u64> = by_shard[1].clone();
        gone.extend(&by_shard[3][..2]);
        gone.push(*order.last().unwrap());
        let last_shard = by_shard.len() - 1;

        let plan =
            remove_samples(&path, &gone, RemoveOptions { dry_run: true, ..Default::default() })
                .unwrap();
        assert!(!plan.committed);
        assert_eq!(Manifest::read(&path).unwrap().shards, m0.shards, "a dry run changes nothing");

        let seen = std::sync::Mutex::new(Vec::new());
        let r = remove_samples_with_progress(&path, &gone, RemoveOptions::default(), &|d, t| {
            seen.lock().unwrap().push((d, t));
            true
        })
        .unwrap();
        assert!(r.committed);
        assert_eq!((r.samples_removed, r.num_samples), (gone.len() as u64, 60 - gone.len() as u64));
        assert_eq!(plan.samples_removed, r.samples_removed);
        assert_eq!(plan.positions_removed, r.positions_removed);
        let want_files: Vec<&str> =
            [1, 3, last_shard].iter().map(|&i| m0.shards[i].file.as_str()).collect();
        assert_eq!(r.shards.iter().map(|s| s.file.as_str()).collect::<Vec<_>>(), want_files);
        assert!(r.shards[0].new_file.is_none(), "shard 1 has nothing left");
        assert_eq!(r.shards[0].chunks_dropped, m0.shards[1].num_chunks);
        for (s, &i) in r.shards.iter().zip(&[1, 3, last_shard]) {
            let n = s.chunks_copied + s.chunks_reencoded + s.chunks_dropped;
            assert_eq!(n, m0.shards[i].num_chunks, "{s:?}");
        }
        assert!(r.shards.iter().map(|s| s.chunks_reencoded).sum::<u64>() >= 1, "{r:?}");
        assert!(r.shards.iter().map(|s| s.chunks_copied).sum::<u64>() >= 1, "{r:?}");
        let seen = seen.into_inner().unwrap();
        let total: u64 = [1, 3, last_shard].iter().map(|&i| m0.shards[i].bytes).sum();
        assert_eq!(seen.last().copied(), Some((total, total)));

        let m = Manifest::read(&path).unwrap();
        assert_eq!(m.shards.len(), m0.shards.len() - 1);
        assert_eq!((m.num_samples, m.num_positions), (r.num_samples, r.num_positions));
        assert_eq!(r.bytes_after, m.shards.iter().map(|s| s.bytes).sum::<u64>());
        for (i, old) in m0.shards.iter().enumerate() {
            let kept = m.shards.iter().any(|s| s == old);
            assert_eq!(kept, ![1, 3, last_shard].contains(&i), "{}", old.file);
            assert_eq!(path.join(&old.file).exists(), kept, "old files are deleted");
        }
        let v = verify(&path).unwrap();
        assert!(v.problems.is_empty() && v.orphans.is_empty(), "{v:?}");
        let s = Store::open(&path, &OpenOptions::default()).unwrap();
        // Copied chunks are the old stored bytes (their checksums); the others are new.
        for (rm, &i) in r.shards.iter().zip(&[1, 3, last_shard]) {
            let Some(new) = &rm.new_file else { continue };
            let sh = s.shards.iter().find(|sh| sh.info.file == *new).unwrap();
            let same = sh.footer.chunks.iter().filter(|e| old_crcs[i].contains(&e.crc32)).count();
            assert_eq!(same as u64, rm.chunks_copied, "{rm:?}");
            assert_eq!(sh.footer.chunks.len() as u64, rm.chunks_copied + rm.chunks_reencoded);
        }
        let want_order: Vec<u64> = order.iter().copied().filter(|x| !gone.contains(x)).collect();
        assert_eq!(s.sample_ids(), want_order, "the order of what is left is kept");
        // Rewritten shards keep their old sequence numbers: a manifest rebuilt from the
        // shard files lists them where the old ones were.
        std::fs::remove_file(path.join("manifest.json")).unwrap();
        let opts = logitcache_core::rebuild::RebuildOptions::default();
        logitcache_core::rebuild::rebuild_manifest(&path, &opts, &|_, _| true).unwrap();
        let rebuilt = Store::open(&path, &OpenOptions::default()).unwrap();
        assert_eq!(rebuilt.sample_ids(), want_order);
        drop(rebuilt);
        let after = records(&path);
        let kept: Vec<&(u64, Record)> = before.iter().filter(|(x, _)| !gone.contains(x)).collect();
        assert_eq!(after.len(), kept.len());
        for ((sa, a), (sb, b)) in after.iter().zip(kept) {
            assert_eq!((sa, &a.input_ids, &a.ids), (sb, &b.input_ids, &b.ids));
            if codec.is_some() {
                assert_eq!(a.logprobs, b.logprobs);
            } else {
                let bound = LogprobCodec::parse("abs:0.01").unwrap().max_abs_error().unwrap();
                for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                    assert!(f64::from((x - y).abs()) <= bound, "{x} vs {y}");
                }
            }
        }
        // Unaffected shards' records are bit for bit what they were, whatever the codec.
        for (sid, rec) in &after {
            if by_shard[0].contains(sid) {
                assert_eq!(Some(rec), before.iter().find(|(x, _)| x == sid).map(|(_, r)| r));
            }
        }
        // Everything: an empty store that still opens and takes appends.
        let rest = s.sample_ids();
        drop(s);
        let r = remove_samples(&path, &rest, RemoveOptions::default()).unwrap();
        assert_eq!((r.num_samples, r.num_positions, r.bytes_after), (0, 0, 0));
        assert_eq!(Store::open(&path, &OpenOptions::default()).unwrap().len(), 0);
        let mut w =
            StoreWriter::open(&path, spec(Kind::TopK, 8, 1000, codec), Mode::Append, small_opts())
                .unwrap();
        write_topk(&mut w, 7, 12);
        w.close().unwrap();
        assert_eq!(records(&path).len(), 1);
    }
}

/// What a removal refuses or cannot finish leaves the store as it was: an id the store does
/// not hold (unless missing_ok, which reports it), a locked store, a damaged chunk in a
/// shard to rewrite (damage is not copied into a new shard), a manifest that cannot be
/// committed.
#[test]
fn a_removal_that_fails_leaves_the_store_as_it_was() {
    use logitcache_core::remove::{RemoveOptions, remove_samples};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    many_shard_store(&path, 30);
    let files = snapshot(&path);

    let err = remove_samples(&path, &[3, 999, 555], RemoveOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::MissingSample { sample_id: 555, .. }),
        "the smallest missing id is named: {err}"
    );
    assert_eq!(snapshot(&path), files);
    let r = remove_samples(
        &path,
        &[999, 555],
        RemoveOptions { missing_ok: true, ..Default::default() },
    )
    .unwrap();
    assert_eq!((r.missing_ids.clone(), r.samples_removed, r.committed), (vec![555, 999], 0, false));
    assert_eq!(snapshot(&path), files);

    {
        let _w =
            StoreWriter::open(&path, spec(Kind::TopK, 8, 1000, None), Mode::Append, small_opts())
                .unwrap();
        let err = remove_samples(&path, &[3], RemoveOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err}");
    }
    assert_eq!(snapshot(&path), files);

    let blocker = path.join(format!(".manifest.json.tmp-{}", std::process::id()));
    std::fs::create_dir(&blocker).unwrap();
    let err = remove_samples(&path, &[3], RemoveOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_eq!(snapshot(&path), files, "the new shard must be removed again");
    std::fs::remove_dir(&blocker).unwrap();

    // A damaged chunk in the shard of a sample to remove, away from that sample.
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    let sh = &s.shards[0];
    let last = sh.footer.chunks.len() - 1;
    let e = sh.footer.chunks[last];
    let victim = sh.footer.records[0].sample_id;
    flip_byte(&sh.path, e.offset + 5);
    drop(s);
    let files = snapshot(&path);
    let err = remove_samples(&path, &[victim], RemoveOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("checksum"), "{err}");
    assert_eq!(snapshot(&path), files);
}

/// Records of a store of the same encoding are copied as they are stored, between records
/// added one by one and in the source's order: chunks copied whole keep their bytes, a chunk
/// shared with a record left behind is decoded and its other records encoded again; a
/// store encoded otherwise, or a sample already in the destination, is refused.
#[test]
fn copy_records_takes_stored_chunks_in_order() {
    use logitcache_core::copy::copy_records;
    use std::collections::HashSet;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let lossless = spec(Kind::TopK, 8, 1000, Some(LogprobCodec::Lossless));
    store_of(&src, 0, 40, lossless.clone());
    let src_order = Store::open(&src, &OpenOptions::default()).unwrap().sample_ids();
    let src_crcs: HashSet<u32> = Store::open(&src, &OpenOptions::default())
        .unwrap()
        .shards
        .iter()
        .flat_map(|s| s.footer.chunks.iter().map(|e| e.crc32).collect::<Vec<_>>())
        .collect();
    let keep: HashSet<u64> = src_order.iter().copied().filter(|&s| s != 5 && s != 6).collect();

    let dest = dir.path().join("dest");
    let mut w = StoreWriter::open(&dest, lossless.clone(), Mode::Create, small_opts()).unwrap();
    write_topk(&mut w, 1000, 12);
    let seen = std::sync::Mutex::new(Vec::new());
    let r = copy_records(&mut w, &src, &keep, None, &|d, t| {
        seen.lock().unwrap().push((d, t));
        true
    })
    .unwrap();
    write_topk(&mut w, 1001, 7);
    w.close().unwrap();
    assert_eq!(r.samples, 38);
    assert!(r.chunks_copied >= 1 && r.chunks_reencoded >= 1, "{r:?}");
    let (d, t) = *seen.lock().unwrap().last().unwrap();
    assert_eq!(d, t);

    let s = Store::open(&dest, &OpenOptions::default()).unwrap();
    let mut want_order = vec![1000];
    want_order.extend(src_order.iter().copied().filter(|sid| keep.contains(sid)));
    want_order.push(1001);
    assert_eq!(s.sample_ids(), want_order);
    let copied: usize = s
        .shards
        .iter()
        .flat_map(|sh| sh.footer.chunks.iter())
        .filter(|e| src_crcs.contains(&e.crc32))
        .count();
    assert_eq!(copied as u64, r.chunks_copied, "copied chunks are the source's bytes");
    let before: std::collections::HashMap<u64, Record> = records(&src).into_iter().collect();
    for (sid, rec) in records(&dest) {
        if let Some(b) = before.get(&sid) {
            assert_eq!(&rec, b, "lossless: every record bit for bit");
        }
    }
    assert!(logitcache_core::verify::verify(&dest).unwrap().problems.is_empty());

    // Refused before anything is added: another encoding, a sample already there.
    for (other, field) in [
        (spec(Kind::TopK, 4, 1000, Some(LogprobCodec::Lossless)), "k"),
        (spec(Kind::TopK, 8, 1000, None), "codec"),
        (StoreSpec { temperature: 2.0, ..lossless.clone() }, "temperature"),
    ] {
        let path = dir.path().join(format!("other-{field}"));
        let mut w = StoreWriter::open(&path, other, Mode::Create, small_opts()).unwrap();
        let err = copy_records(&mut w, &src, &keep, None, &|_, _| true).unwrap_err();
        assert!(matches!(&err, Error::Mismatch { field: f, .. } if f == field), "{err}");
        assert_eq!(w.num_samples(), 0);
    }
    // Only the last sample to copy is already there (5 and 6 are not): nothing is added.
    let mut w = StoreWriter::open(&dest, lossless.clone(), Mode::Append, small_opts()).unwrap();
    let held = w.num_samples();
    let last = *src_order.iter().rev().find(|s| keep.contains(s)).unwrap();
    let err = copy_records(&mut w, &src, &HashSet::from([5, 6, last]), None, &|_, _| true);
    assert!(matches!(err, Err(Error::DuplicateSample { sample_id, .. }) if sample_id == last));
    assert_eq!(w.num_samples(), held);

    // The shards the caller saw when it opened the source: the same, or the same and more
    // (appended since), copy; one gone (the store rewritten since) is refused.
    let uids: Vec<String> = logitcache_core::manifest::Manifest::read(&src)
        .unwrap()
        .shards
        .into_iter()
        .map(|s| s.uid)
        .collect();
    assert!(uids.len() > 1, "the source has shards to leave out");
    let one = HashSet::from([src_order[0]]);
    for (first, ok) in [(&uids[..], true), (&uids[..1], true), (&uids[1..], false)] {
        let path = dir.path().join(format!("expect-{}-{ok}", first.len()));
        let mut w = StoreWriter::open(&path, lossless.clone(), Mode::Create, small_opts()).unwrap();
        let r = copy_records(&mut w, &src, &one, Some(first), &|_, _| true);
        if ok {
            assert_eq!(r.unwrap().samples, 1);
        } else {
            let err = r.unwrap_err();
            assert!(matches!(&err, Error::Mismatch { field, .. } if field == "shards"), "{err}");
            assert!(err.to_string().contains(&format!("shard 0 to be {}", uids[1])), "{err}");
            assert_eq!(w.num_samples(), 0);
        }
    }
}

/// A progress callback that returns false stops each long operation at its next shard or
/// chunk with nothing changed: the store's files as they were, no new store, no orphans.
#[test]
fn a_progress_callback_can_stop_every_long_operation() {
    use logitcache_core::merge::{MergeOptions, merge_with_progress};
    use logitcache_core::progress::stopped;
    use logitcache_core::rebuild::{RebuildOptions, rebuild_manifest};
    use logitcache_core::remove::{RemoveOptions, remove_samples_with_progress};
    use logitcache_core::repair::{RepairOptions, repair_with_progress};
    use logitcache_core::verify::verify_with_progress;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    many_shard_store(&path, 30);
    let files = snapshot(&path);
    let stop = |_: u64, _: u64| false;
    let is_stop = |e: Error| e.to_string() == stopped().to_string();

    assert!(is_stop(verify_with_progress(&path, &stop).unwrap_err()));
    let gone: Vec<u64> = (0..30).step_by(4).collect();
    let e = remove_samples_with_progress(&path, &gone, RemoveOptions::default(), &stop);
    assert!(is_stop(e.unwrap_err()));
    assert_eq!(snapshot(&path), files, "a stopped removal changes nothing");
    let dest = dir.path().join("m");
    let e = merge_with_progress(&dest, std::slice::from_ref(&path), MergeOptions::default(), &stop);
    assert!(is_stop(e.unwrap_err()));
    assert!(!dest.exists(), "a stopped merge creates nothing");
    // Repair checks every shard first: damage one chunk so that there is something to do.
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    flip_byte(&s.shards[0].path, s.shards[0].footer.chunks[0].offset + 5);
    drop(s);
    let files = snapshot(&path);
    assert!(is_stop(repair_with_progress(&path, RepairOptions::default(), &stop).unwrap_err()));
    assert_eq!(snapshot(&path), files, "a stopped repair changes nothing");
    std::fs::write(path.join("manifest.json"), b"damaged").unwrap();
    let files = snapshot(&path);
    assert!(is_stop(rebuild_manifest(&path, &RebuildOptions::default(), &stop).unwrap_err()));
    assert_eq!(snapshot(&path), files, "a stopped rebuild changes nothing");
    // Asked at the very end (every shard read): the damaged manifest is not kept either.
    let at_end = |d: u64, t: u64| d < t;
    let e = rebuild_manifest(&path, &RebuildOptions::default(), &at_end).unwrap_err();
    assert!(is_stop(e));
    assert_eq!(snapshot(&path), files, "a rebuild stopped at its end changes nothing");
    // After the stops, each runs to the end.
    rebuild_manifest(&path, &RebuildOptions::default(), &|_, _| true).unwrap();
    let r = repair_with_progress(&path, RepairOptions::default(), &|_, _| true).unwrap();
    assert!(r.committed);
    let first = Store::open(&path, &OpenOptions::default()).unwrap().sample_ids()[0];
    let r = remove_samples_with_progress(&path, &[first], RemoveOptions::default(), &|_, _| true);
    assert!(r.unwrap().committed);
}

/// A stop asked for in the middle of a shard takes effect there, not once the shard is
/// done: verify and repair stop within the shard's checksum pass or at its next chunk, a
/// copy of records at its next chunk (the callback is not called again for each chunk left).
#[test]
fn a_stop_takes_effect_inside_a_shard() {
    use logitcache_core::copy::copy_records;
    use logitcache_core::repair::{RepairOptions, repair_with_progress};
    use logitcache_core::verify::verify_with_progress;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let mut w = StoreWriter::open(
        &path,
        spec(Kind::TopK, 8, 1000, None),
        Mode::Create,
        WriterOptions { chunk_positions: 20, shard_bytes: 1 << 30, zstd_level: 3 },
    )
    .unwrap();
    for sid in 0..60u64 {
        write_topk(&mut w, sid, 15);
    }
    w.close().unwrap();
    let src = Store::open(&path, &OpenOptions::default()).unwrap();
    let chunks: usize = src.shards.iter().map(|s| s.footer.chunks.len()).sum();
    let shards = src.shards.len();
    assert_eq!(shards, 1);
    assert!(chunks >= 30, "{chunks} chunks");
    let calls = AtomicUsize::new(0);
    let stop = |_: u64, _: u64| {
        calls.fetch_add(1, Ordering::Relaxed);
        false
    };
    let is_stop = |e: Error| e.to_string() == logitcache_core::progress::stopped().to_string();
    let counted = |what: &str, run: &dyn Fn() -> bool| {
        calls.store(0, Ordering::Relaxed);
        assert!(run(), "{what} was not stopped");
        // A tick of the checksum pass, and the rest of the shard's bytes counted at once.
        let n = calls.load(Ordering::Relaxed);
        assert!(n <= 2, "{what}: the callback was called {n} times after asking to stop");
    };
    counted("verify", &|| is_stop(verify_with_progress(&path, &stop).unwrap_err()));
    counted("repair", &|| {
        is_stop(repair_with_progress(&path, RepairOptions::default(), &stop).unwrap_err())
    });
    let mut dest = StoreWriter::open(
        &dir.path().join("d"),
        spec(Kind::TopK, 8, 1000, None),
        Mode::Create,
        small_opts(),
    )
    .unwrap();
    calls.store(0, Ordering::Relaxed);
    let keep: HashSet<u64> = (0..60).collect();
    assert!(is_stop(copy_records(&mut dest, &path, &keep, None, &stop).unwrap_err()));
    assert_eq!(calls.load(Ordering::Relaxed), 1);
}

/// Clean deletes the store's own leftovers and nothing else: the shard a removal killed
/// after its commit did not get to delete (which a manifest rebuild would otherwise take
/// back, removed samples and all), a killed writer's temporary manifest; files of other
/// making are reported and kept. A dry run deletes nothing, a locked store or a directory
/// without a manifest is refused, and the store reads and verifies as before.
#[test]
fn clean_deletes_only_the_stores_own_leftovers() {
    use logitcache_core::clean::clean_store;
    use logitcache_core::manifest::Manifest;
    use logitcache_core::rebuild::{RebuildOptions, rebuild_manifest};
    use logitcache_core::remove::{RemoveOptions, remove_samples};
    use logitcache_core::verify::verify;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    store_of(&path, 0, 60, spec(Kind::TopK, 8, 1000, None));
    let by_shard = shard_sample_ids(&path);
    let m0 = Manifest::read(&path).unwrap();
    // A removal of shard 1's samples, killed after its commit: its old file is still there.
    let old = path.join(&m0.shards[1].file);
    let saved = std::fs::read(&old).unwrap();
    remove_samples(&path, &by_shard[1], RemoveOptions::default()).unwrap();
    std::fs::write(&old, &saved).unwrap();
    // The hazard: a rebuild from the shard files would bring the removed samples back.
    std::fs::rename(path.join("manifest.json"), dir.path().join("m")).unwrap();
    let dry = RebuildOptions { dry_run: true, ..Default::default() };
    let plan = rebuild_manifest(&path, &dry, &|_, _| true).unwrap();
    assert_eq!(plan.num_samples, 60);
    std::fs::rename(dir.path().join("m"), path.join("manifest.json")).unwrap();

    std::fs::write(path.join(".manifest.json.tmp-4242"), b"{").unwrap();
    for kept in ["manifest.json.damaged", "notes.txt", "shards/junk.lcs.tmp"] {
        std::fs::write(path.join(kept), b"x").unwrap();
    }
    std::fs::create_dir(path.join("shards/000999-0123456789abcdef.lcs")).unwrap();
    let want_deleted = vec![".manifest.json.tmp-4242".to_string(), m0.shards[1].file.clone()];
    let want_kept = [
        "manifest.json.damaged",
        "notes.txt",
        "shards/000999-0123456789abcdef.lcs",
        "shards/junk.lcs.tmp",
    ];
    let current = Store::open(&path, &OpenOptions::default()).unwrap().sample_ids();

    let files_before = snapshot(&path);
    let r = clean_store(&path, true).unwrap();
    assert!(r.dry_run);
    assert_eq!(r.deleted, want_deleted);
    assert_eq!(r.kept, want_kept);
    assert_eq!(r.bytes, saved.len() as u64 + 1);
    assert_eq!(snapshot(&path), files_before, "a dry run deletes nothing");

    let lock = std::fs::File::open(path.join(".lock")).unwrap();
    lock.lock().unwrap();
    let err = clean_store(&path, false).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    drop(lock);
    assert_eq!(snapshot(&path), files_before);

    let r = clean_store(&path, false).unwrap();
    assert!(!r.dry_run);
    assert_eq!((r.deleted, r.kept.clone()), (want_deleted, want_kept.map(String::from).to_vec()));
    assert!(!old.exists() && !path.join(".manifest.json.tmp-4242").exists());
    for kept in want_kept {
        assert!(path.join(kept).exists(), "{kept}");
    }
    let v = verify(&path).unwrap();
    assert!(v.problems.is_empty(), "{v:?}");
    assert_eq!(v.orphans, r.kept);
    assert_eq!(Store::open(&path, &OpenOptions::default()).unwrap().sample_ids(), current);
    assert_eq!(clean_store(&path, false).unwrap().deleted, Vec::<String>::new());

    // Now a rebuild takes back exactly the committed store.
    std::fs::remove_dir(path.join("shards/000999-0123456789abcdef.lcs")).unwrap();
    std::fs::remove_file(path.join("manifest.json")).unwrap();
    let plan = rebuild_manifest(&path, &dry, &|_, _| true).unwrap();
    assert_eq!(plan.num_samples, current.len() as u64);

    // No manifest: refused, and no lock file is left in the directory.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    assert!(clean_store(&other, false).is_err());
    assert!(!other.join(".lock").exists());
}

/// Writers that open one new path at the same moment: with mode "x" exactly one creates the
/// store and the others are refused without touching it (a loser used to remove the
/// directory the winner was writing in); with mode "a", retried while locked, every
/// writer's samples end up in the store (one that found no manifest before another's commit
/// used to replace that store instead of appending to it).
#[test]
fn writers_racing_to_create_a_store_neither_remove_nor_replace_it() {
    use std::sync::Barrier;
    const WRITERS: u64 = 6;
    let dir = tempfile::tempdir().unwrap();
    for round in 0..15 {
        let path = dir.path().join(format!("x{round}"));
        let barrier = Barrier::new(WRITERS as usize);
        let won: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..WRITERS)
                .map(|t| {
                    let (path, barrier) = (&path, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        let spec = spec(Kind::TopK, 4, 100, None);
                        match StoreWriter::open(path, spec, Mode::Create, small_opts()) {
                            Ok(mut w) => {
                                write_topk(&mut w, t, 5);
                                w.close().unwrap();
                                true
                            }
                            Err(Error::StoreExists { .. } | Error::Locked { .. }) => false,
                            Err(e) => panic!("{e}"),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(won.iter().filter(|&&w| w).count(), 1, "{won:?}");
        assert_eq!(Store::open(&path, &OpenOptions::default()).unwrap().len(), 1);

        let path = dir.path().join(format!("a{round}"));
        let barrier = Barrier::new(WRITERS as usize);
        std::thread::scope(|s| {
            for t in 0..WRITERS {
                let (path, barrier) = (&path, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    loop {
                        let spec = spec(Kind::TopK, 4, 100, None);
                        match StoreWriter::open(path, spec, Mode::Append, small_opts()) {
                            Ok(mut w) => {
                                write_topk(&mut w, t, 5);
                                w.close().unwrap();
                                return;
                            }
                            Err(Error::Locked { .. }) => std::thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                });
            }
        });
        let mut ids = Store::open(&path, &OpenOptions::default()).unwrap().sample_ids();
        ids.sort_unstable();
        assert_eq!(ids, (0..WRITERS).collect::<Vec<_>>(), "round {round}");
    }
}

/// A store path whose last part is "." names the directory before it (creating "new/."
/// creates "new"); one ending in ".." is taken only where it names an existing directory,
/// with the checks any existing path gets: a missing "up/sub/.." is refused with nothing
/// created (it used to create "up/sub" and write a store into "up", whatever "up" held).
#[test]
fn a_store_path_may_end_in_dot_or_dot_dot() {
    let dir = tempfile::tempdir().unwrap();
    let dotted = dir.path().join("new").join(".");
    let mut w =
        StoreWriter::open(&dotted, spec(Kind::TopK, 8, 1000, None), Mode::Create, small_opts())
            .unwrap();
    write_topk(&mut w, 1, 3);
    w.close().unwrap();
    assert_eq!(Store::open(&dir.path().join("new"), &OpenOptions::default()).unwrap().len(), 1);
    let up = dir.path().join("up").join("sub").join("..");
    for mode in [Mode::Create, Mode::Append, Mode::Overwrite] {
        let w = StoreWriter::open(&up, spec(Kind::TopK, 8, 1000, None), mode, small_opts());
        let Err(err) = w else { panic!("{mode:?} opened {}", up.display()) };
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        assert!(!dir.path().join("up").exists(), "nothing is created");
    }
    // Existing: ".." names "new", which holds a store, and is taken as such.
    let into = dir.path().join("new").join("shards").join("..");
    let w = StoreWriter::open(&into, spec(Kind::TopK, 8, 1000, None), Mode::Create, small_opts());
    assert!(matches!(w, Err(Error::StoreExists { .. })));
    let mut w =
        StoreWriter::open(&into, spec(Kind::TopK, 8, 1000, None), Mode::Append, small_opts())
            .unwrap();
    write_topk(&mut w, 2, 3);
    w.close().unwrap();
    assert_eq!(Store::open(&dir.path().join("new"), &OpenOptions::default()).unwrap().len(), 2);
}
