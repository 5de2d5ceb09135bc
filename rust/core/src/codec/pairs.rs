//! Deep-rank coded numbers of top-K rows, two per lead byte (FORMAT.md, section 4.2).
//!
//! Past rank 16 the log-probabilities of a row are close together: the numbers the abs and
//! kl codecs store there (level deltas) are below 15 in about 97% of pairs on the benchmark
//! corpus. One byte `15 a + b` per pair halves the symbols zstd's Huffman stage decodes and
//! lets it model the two deltas jointly (about 2 bytes per position smaller at K = 64, see
//! benches/codec_experiments.md). A pair with a larger number is an escape byte followed by
//! both numbers as varints in the extension stream. A row with an odd number of them pads
//! its last pair with a 0, which the reader checks, so every row has one encoding.

use crate::codec::bytes::{self, ByteReader};
use crate::error::{Error, Location, Result};

/// Numbers below this pair up into one lead byte.
pub const PAIR_BASE: u8 = 15;
/// Lead byte of a pair whose numbers follow as two varints; larger lead bytes are invalid.
pub const PAIR_ESCAPE: u8 = PAIR_BASE * PAIR_BASE;

/// Append one row's deep-rank numbers as pairs (`ext` receives the escaped pairs' varints).
#[inline]
pub fn put_row<T: Copy + Into<u64>>(lead: &mut Vec<u8>, ext: &mut Vec<u8>, numbers: &[T]) {
    for pair in numbers.chunks(2) {
        let a: u64 = pair[0].into();
        let b: u64 = pair.get(1).map_or(0, |&b| b.into());
        let base = u64::from(PAIR_BASE);
        if a < base && b < base {
            lead.push((a * base + b) as u8);
        } else {
            lead.push(PAIR_ESCAPE);
            bytes::put_varint(ext, a);
            bytes::put_varint(ext, b);
        }
    }
}

/// Number of lead bytes of a row with `n` deep-rank numbers.
#[inline]
pub fn lead_bytes(n: usize) -> usize {
    n.div_ceil(2)
}

/// `(a, b)` of each pair lead byte packed as `a | b << 8`; `ESCAPED` for the escape byte,
/// `INVALID` past it.
pub const ESCAPED: u16 = 0xFFFE;
pub const INVALID: u16 = 0xFFFF;
pub static UNPAIR: [u16; 256] = {
    let mut t = [INVALID; 256];
    let mut c = 0;
    while c < PAIR_ESCAPE as usize {
        t[c] = (c / PAIR_BASE as usize) as u16 | (((c % PAIR_BASE as usize) as u16) << 8);
        c += 1;
    }
    t[PAIR_ESCAPE as usize] = ESCAPED;
    t
};

/// Reads a stream of pairs back one number at a time, row by row.
pub struct PairReader<'a> {
    lead: ByteReader<'a>,
    ext: ByteReader<'a>,
    /// The second number of the pair last read, not yet handed out.
    pending: Option<u64>,
}

impl<'a> PairReader<'a> {
    pub fn new(lead: &'a [u8], ext: &'a [u8]) -> Self {
        PairReader {
            lead: ByteReader::new(lead, "log-probability pairs"),
            ext: ByteReader::new(ext, "log-probability pair extension"),
            pending: None,
        }
    }

    /// Both numbers of the next pair.
    #[inline]
    pub fn pair(&mut self, loc: &Location) -> Result<(u64, u64)> {
        let c = self.lead.byte(loc)?;
        match UNPAIR[usize::from(c)] {
            ESCAPED => Ok((self.ext.varint(loc)?, self.ext.varint(loc)?)),
            INVALID => Err(Error::corrupt(loc.clone(), format!("log-probability pair byte {c}"))),
            ab => Ok((u64::from(ab & 0xFF), u64::from(ab >> 8))),
        }
    }

    /// The next number of the current row.
    #[inline]
    pub fn next(&mut self, loc: &Location) -> Result<u64> {
        if let Some(b) = self.pending.take() {
            return Ok(b);
        }
        let (a, b) = self.pair(loc)?;
        self.pending = Some(b);
        Ok(a)
    }

    /// End of a row: an unread second number is the pad of an odd row and must be 0.
    #[inline]
    pub fn end_row(&mut self, loc: &Location) -> Result<()> {
        match self.pending.take() {
            None | Some(0) => Ok(()),
            Some(v) => Err(Error::corrupt(loc.clone(), format!("pair padding is {v}, not 0"))),
        }
    }

    /// The lead bytes of a whole row of `n` numbers, with the extension stream their
    /// escapes read from: for decoders that take a row in one pass (not mixed with
    /// [`PairReader::next`]).
    #[inline]
    pub fn row(&mut self, n: usize, loc: &Location) -> Result<(&'a [u8], &mut ByteReader<'a>)> {
        let codes = self.lead.take(lead_bytes(n), loc)?;
        Ok((codes, &mut self.ext))
    }

    /// Both streams must be used up.
    pub fn finish(&self, loc: &Location) -> Result<()> {
        self.lead.finish(loc)?;
        self.ext.finish(loc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loc() -> Location {
        Location::default()
    }

    fn read_rows(lead: &[u8], ext: &[u8], lens: &[usize]) -> Result<Vec<Vec<u64>>> {
        let mut r = PairReader::new(lead, ext);
        let mut out = Vec::new();
        for &n in lens {
            let row = (0..n).map(|_| r.next(&loc())).collect::<Result<Vec<_>>>()?;
            r.end_row(&loc())?;
            out.push(row);
        }
        r.finish(&loc())?;
        Ok(out)
    }

    proptest! {
        #[test]
        fn rows_round_trip(
            rows in prop::collection::vec(
                prop::collection::vec(
                    prop_oneof![4 => 0u64..15, 1 => 0u64..300, 1 => any::<u64>()], 0..50),
                0..20),
        ) {
            let (mut lead, mut ext) = (Vec::new(), Vec::new());
            for row in &rows {
                put_row(&mut lead, &mut ext, row);
            }
            let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
            prop_assert_eq!(lead.len(), lens.iter().map(|&n| lead_bytes(n)).sum::<usize>());
            prop_assert_eq!(read_rows(&lead, &ext, &lens).unwrap(), rows);
        }
    }

    #[test]
    fn small_pairs_take_one_byte_and_large_ones_escape() {
        let (mut lead, mut ext) = (Vec::new(), Vec::new());
        put_row(&mut lead, &mut ext, &[3u64, 14, 15, 0, 7]);
        assert_eq!(lead, vec![3 * 15 + 14, PAIR_ESCAPE, 7 * 15]);
        assert_eq!(ext, vec![15, 0]);
    }

    #[test]
    fn bad_bytes_padding_and_leftovers_are_errors() {
        // A lead byte past the escape.
        assert!(read_rows(&[PAIR_ESCAPE + 1], &[], &[2]).is_err());
        // A row of one number whose pad is not 0.
        assert!(read_rows(&[15 + 1], &[], &[1]).is_err());
        // An escaped pair without its varints.
        assert!(read_rows(&[PAIR_ESCAPE], &[20], &[2]).is_err());
        // Bytes left over.
        assert!(read_rows(&[0, 0], &[], &[2]).is_err());
        assert!(read_rows(&[PAIR_ESCAPE], &[20, 1, 1], &[2]).is_err());
        assert_eq!(read_rows(&[PAIR_ESCAPE], &[20, 1], &[2]).unwrap(), vec![vec![20, 1]]);
    }
}
