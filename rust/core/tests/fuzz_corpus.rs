//! Short versions of the fuzz targets for CI (stable toolchain, no cargo-fuzz): every input
//! of the committed corpus `fuzz/corpus/<target>/` (seeds and regressions), then a fixed
//! number of deterministic random mutations of them, through the same target bodies the
//! cargo-fuzz targets run (`logitcache_core::fuzz_targets`). A panic is a failure.

// Test code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use logitcache_core::fuzz_targets;

/// Mutations per target; each takes well under a millisecond in a debug build.
const MUTATIONS: usize = 2000;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
}

/// xorshift64*: the same mutations on every run and platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four edits of the kinds that break length and offset fields: bit flips, random
/// bytes, extreme little-endian integers, truncation, insertion and deletion. Byte 0 (the
/// targets' flags) is kept half of the time, and the checksum-repair flag set on the rest.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if b.len() < 2 {
            b.push(rng.next() as u8);
            continue;
        }
        let at = 1 + rng.below(b.len() - 1);
        match rng.below(7) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = rng.next() as u8,
            2 => {
                let v: u64 = match rng.below(5) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => u64::from(u32::MAX),
                    3 => 1 << rng.below(64),
                    _ => rng.next(),
                };
                let width = [1, 2, 4, 8][rng.below(4)];
                for (i, byte) in v.to_le_bytes()[..width].iter().enumerate() {
                    if let Some(d) = b.get_mut(at + i) {
                        *d = *byte;
                    }
                }
            }
            3 => b.truncate(at),
            4 => {
                let n = 1 + rng.below(16);
                let fill = rng.next() as u8;
                b.splice(at..at, std::iter::repeat_n(fill, n));
            }
            5 => {
                let end = (at + 1 + rng.below(16)).min(b.len());
                b.drain(at..end);
            }
            _ => {
                let from = 1 + rng.below(b.len() - 1);
                b[at] = b[from];
            }
        }
    }
    if rng.below(2) == 0 {
        b[0] |= fuzz_targets::REPAIR;
    }
    b
}

fn replay(target: &str, body: fn(&[u8]), seed: u64) {
    let files = corpus(target);
    for (name, data) in &files {
        let r = std::panic::catch_unwind(|| body(data));
        assert!(r.is_ok(), "{target}: corpus input {name} panics");
    }
    let mut rng = Rng(seed);
    for i in 0..MUTATIONS {
        let (name, data) = &files[rng.below(files.len())];
        let m = mutate(&mut rng, data);
        let r = std::panic::catch_unwind(|| body(&m));
        assert!(r.is_ok(), "{target}: mutation {i} of {name} panics; input: {m:?}");
    }
}

#[test]
fn shard_decoder_corpus_and_mutations() {
    replay("shard_decoder", fuzz_targets::shard_decoder, 0x5eed_0001);
}

#[test]
fn footer_index_corpus_and_mutations() {
    replay("footer_index", fuzz_targets::footer_index, 0x5eed_0002);
}

#[test]
fn manifest_corpus_and_mutations() {
    replay("manifest", fuzz_targets::manifest, 0x5eed_0003);
}
