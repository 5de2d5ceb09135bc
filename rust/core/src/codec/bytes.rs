//! Byte-level building blocks of the chunk codecs: LEB128 varints and byte-plane
//! transposition. Readers never trust a length: every read is bounds-checked.

use crate::error::{Error, Location, Result};

/// Append `v` as an unsigned LEB128 varint (7 bits per byte, low bits first).
#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Sequential reader over a decoded stream.
pub struct ByteReader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> ByteReader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        ByteReader { buf, pos: 0, what }
    }

    fn err(&self, loc: &Location, msg: &str) -> Error {
        Error::corrupt(loc.clone(), format!("{} stream: {msg} at byte {}", self.what, self.pos))
    }

    #[inline]
    pub fn varint(&mut self, loc: &Location) -> Result<u64> {
        let mut v: u64 = 0;
        let mut shift = 0u32;
        loop {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(self.err(loc, "ends inside a varint"));
            };
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(self.err(loc, "varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
            if shift > 63 {
                return Err(self.err(loc, "varint longer than 10 bytes"));
            }
        }
    }

    #[inline]
    pub fn varint_u32(&mut self, loc: &Location) -> Result<u32> {
        let v = self.varint(loc)?;
        u32::try_from(v).map_err(|_| self.err(loc, "value does not fit 32 bits"))
    }

    #[inline]
    pub fn byte(&mut self, loc: &Location) -> Result<u8> {
        let Some(&b) = self.buf.get(self.pos) else {
            return Err(self.err(loc, "ends early"));
        };
        self.pos += 1;
        Ok(b)
    }

    pub fn take(&mut self, n: usize, loc: &Location) -> Result<&'a [u8]> {
        if n > self.buf.len() - self.pos {
            return Err(self.err(loc, "ends early"));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    /// Continue reading at `pos` (clamped to the end).
    pub fn skip_to(&mut self, pos: usize) {
        self.pos = pos.min(self.buf.len());
    }

    /// Fail unless every byte was consumed: trailing bytes mean the stream and the
    /// footer disagree about what the chunk holds.
    pub fn finish(&self, loc: &Location) -> Result<()> {
        if self.is_empty() { Ok(()) } else { Err(self.err(loc, "has trailing bytes")) }
    }
}

/// Every varint of `buf`, in order, as u32 values (a chunk's tables hold thousands of them:
/// one-byte values, the common case, take a loop without the general reader's checks).
pub fn varints_u32(buf: &[u8], what: &'static str, loc: &Location) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(buf.len());
    let mut r = ByteReader::new(buf, what);
    while let Some(rest) = buf.get(r.pos..) {
        let short = rest.iter().take_while(|&&b| b < 0x80).count();
        out.extend(rest[..short].iter().map(|&b| u32::from(b)));
        r.pos += short;
        if r.is_empty() {
            break;
        }
        out.push(r.varint_u32(loc)?);
    }
    Ok(out)
}

/// Split little-endian u32 values into 4 planes (all low bytes, then the next...), so that
/// zstd sees the slowly-varying high bytes as long runs.
pub fn u32_planes(values: &[u32]) -> Vec<u8> {
    let n = values.len();
    let mut out = vec![0u8; 4 * n];
    for (i, v) in values.iter().enumerate() {
        let b = v.to_le_bytes();
        out[i] = b[0];
        out[n + i] = b[1];
        out[2 * n + i] = b[2];
        out[3 * n + i] = b[3];
    }
    out
}

/// Inverse of [`u32_planes`] for `n` values.
pub fn u32_from_planes(
    planes: &[u8],
    n: usize,
    what: &'static str,
    loc: &Location,
) -> Result<Vec<u32>> {
    if planes.len() != 4 * n {
        return Err(Error::corrupt(
            loc.clone(),
            format!("{what} stream has {} bytes, expected {} for {n} values", planes.len(), 4 * n),
        ));
    }
    let (p0, rest) = planes.split_at(n);
    let (p1, rest) = rest.split_at(n);
    let (p2, p3) = rest.split_at(n);
    Ok((0..n).map(|i| u32::from_le_bytes([p0[i], p1[i], p2[i], p3[i]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_roundtrip_and_rejects() {
        let loc = Location::default();
        let vals = [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX];
        let mut b = Vec::new();
        for v in vals {
            put_varint(&mut b, v);
        }
        let mut r = ByteReader::new(&b, "t");
        for v in vals {
            assert_eq!(r.varint(&loc).unwrap(), v);
        }
        r.finish(&loc).unwrap();
        assert!(ByteReader::new(&[0x80], "t").varint(&loc).is_err());
        assert!(ByteReader::new(&[0xff; 11], "t").varint(&loc).is_err());
        assert!(ByteReader::new(&[0xff, 0xff, 0xff, 0xff, 0x7f], "t").varint_u32(&loc).is_err());
    }

    proptest::proptest! {
        /// The bulk decoder reads what the general reader reads, and fails where it fails.
        #[test]
        fn bulk_varints_agree_with_the_reader(
            vals in proptest::collection::vec(
                proptest::prop_oneof![0u64..128, 128u64..70_000, 0u64..=u64::from(u32::MAX),
                                      0u64..=u64::MAX],
                0..200),
            cut in proptest::option::of(0usize..2000),
        ) {
            let loc = Location::default();
            let mut b = Vec::new();
            for &v in &vals {
                put_varint(&mut b, v);
            }
            if let Some(c) = cut {
                b.truncate(c.min(b.len()));
            }
            let mut r = ByteReader::new(&b, "t");
            let mut want = Vec::new();
            let plain = loop {
                if r.is_empty() {
                    break Ok(want);
                }
                match r.varint_u32(&loc) {
                    Ok(v) => want.push(v),
                    Err(e) => break Err(e),
                }
            };
            let bulk = varints_u32(&b, "t", &loc);
            proptest::prop_assert_eq!(bulk.is_ok(), plain.is_ok());
            if let (Ok(a), Ok(w)) = (bulk, plain) {
                proptest::prop_assert_eq!(a, w);
            }
        }
    }

    #[test]
    fn planes_roundtrip() {
        let loc = Location::default();
        let v: Vec<u32> = (0..100u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        assert_eq!(u32_from_planes(&u32_planes(&v), 100, "t", &loc).unwrap(), v);
        assert!(u32_from_planes(&u32_planes(&v), 99, "t", &loc).is_err());
    }
}
