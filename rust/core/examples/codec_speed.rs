//! Encode and decode chunks of a corpus read from raw files, timing each stage on one
//! thread (CPU time of this thread). Used to tune the codec; the user-facing benchmark is
//! benches/store_bench.py.
//!
//! usage: codec_speed DIR K VOCAB CODEC [ZSTD_LEVEL [CHUNK_POSITIONS]]
//! (DIR holds input.u32, ids.u32, lp.f32; "check" is the record check and copy of
//! StoreWriter.add; REPS=n in the environment: best of n, default 5;
//! ENCODE_REPS=n overrides it for encoding, e.g. 1 to profile decoding)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The allocator of the Python extension, so that allocation costs match what users see.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use logitcache_core::Location;
use logitcache_core::codec::{self, ChunkBuf, CodecParams, EncodeScratch, LogprobCodec, Record};
use logitcache_core::format::Kind;
use logitcache_core::record::{self, IdArray, SeenIds};

fn read<T: Copy>(path: &str) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap();
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut out = Vec::with_capacity(n);
    for c in bytes.chunks_exact(std::mem::size_of::<T>()) {
        // SAFETY: T is u32 or f32 here, both 4 plain bytes; read_unaligned copes with any
        // alignment of the source slice.
        out.push(unsafe { std::ptr::read_unaligned(c.as_ptr() as *const T) });
    }
    out
}

/// CPU time of this thread in seconds: steadier than wall time on a shared machine.
fn cpu_time() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer to a local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = &args[1];
    let k: usize = args[2].parse().unwrap();
    let vocab: u32 = args[3].parse().unwrap();
    let logprobs = LogprobCodec::parse(&args[4]).unwrap();
    let level: i32 = args.get(5).map(|s| s.parse().unwrap()).unwrap_or(3);
    let chunk: usize = args.get(6).map(|s| s.parse().unwrap()).unwrap_or(4096);
    let input: Vec<u32> = read(&format!("{dir}/input.u32"));
    let ids: Vec<u32> = read(&format!("{dir}/ids.u32"));
    let lp: Vec<f32> = read(&format!("{dir}/lp.f32"));
    let p = CodecParams {
        kind: Kind::TopK,
        k: k as u32,
        vocab_size: vocab,
        logprobs,
        zstd_level: level,
    };
    let n = input.len();
    let recs: Vec<Record> = (0..n / chunk)
        .map(|c| Record {
            sample_id: c as u64,
            input_ids: input[c * chunk..(c + 1) * chunk].to_vec(),
            row_lens: vec![],
            ids: ids[c * chunk * k..(c + 1) * chunk * k].to_vec(),
            counts: vec![],
            logprobs: lp[c * chunk * k..(c + 1) * chunk * k].to_vec(),
        })
        .collect();
    let mut scratch = EncodeScratch::default();
    let bufs: Vec<ChunkBuf> = recs
        .iter()
        .map(|r| {
            let mut b = ChunkBuf::default();
            b.push(r);
            b
        })
        .collect();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let reps = env("REPS").unwrap_or(5);
    let enc_reps = env("ENCODE_REPS").unwrap_or(reps);
    let mut enc = f64::MAX;
    // Timed as the writer encodes: each payload is used (here: its length summed) and the
    // next chunk is encoded into the same scratch; the payloads kept for decoding are copied
    // out afterwards.
    let mut stored = 0usize;
    for _ in 0..enc_reps.max(1) {
        let t = cpu_time();
        for b in &bufs {
            codec::encode_chunk(b, &p, &mut scratch).unwrap();
            stored += scratch.payload().len();
        }
        enc = enc.min(cpu_time() - t);
    }
    std::hint::black_box(stored);
    let payloads: Vec<Vec<u8>> = bufs
        .iter()
        .map(|b| {
            codec::encode_chunk(b, &p, &mut scratch).unwrap();
            scratch.payload().to_vec()
        })
        .collect();
    // What StoreWriter.add does before encoding: check each record and copy it into the
    // chunk buffer.
    let mut seen = SeenIds::new(vocab);
    let mut add = f64::MAX;
    for _ in 0..enc_reps.max(1) {
        let t = cpu_time();
        for r in &recs {
            let mut b = ChunkBuf::default();
            let n = r.input_ids.len();
            record::append_topk(
                &mut b,
                &mut seen,
                r.sample_id,
                IdArray::U32(&r.input_ids),
                IdArray::U32(&r.ids),
                &[n, k],
                &r.logprobs,
                &[n, k],
                k as u32,
                vocab,
            )
            .unwrap();
            std::hint::black_box(&b);
        }
        add = add.min(cpu_time() - t);
    }
    let bytes: usize = payloads.iter().map(Vec::len).sum();
    let positions = recs.len() * chunk;
    let loc = Location::default();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = cpu_time();
        for pl in &payloads {
            let d = codec::decode_chunk(pl, &[chunk as u32], chunk * k, &p, &loc).unwrap();
            std::hint::black_box(&d);
        }
        best = best.min(cpu_time() - t);
    }
    println!(
        "{} positions, {:.2} bytes/pos, check {:.2} M pos/s, encode {:.3} M pos/s, decode {:.3} M pos/s",
        positions,
        bytes as f64 / positions as f64,
        positions as f64 / add / 1e6,
        positions as f64 / enc / 1e6,
        positions as f64 / best / 1e6
    );
}
