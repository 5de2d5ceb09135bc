//! Eight-lane `f32` arithmetic for the loss kernels and the vectorized `exp` / `ln` built on it.
//!
//! The kernels are written once, generic over [`Simd`], and run with one of two
//! implementations chosen at run time by [`dispatch`]:
//! * [`Avx2`]: AVX2 + FMA intrinsics, used when the CPU has both (the wheel is built for
//!   generic x86-64, so the features cannot be assumed at compile time);
//! * [`Portable`]: plain arrays and loops, which the compiler vectorizes for the baseline of
//!   the target (SSE2, NEON...). It is the path of every non-x86 target.
//!
//! Both evaluate the same `exp` / `ln` algorithms (below), so their accuracy is the same up to
//! the rounding of fused versus separate multiply-adds; `tests::exp_ln_accuracy` measures it
//! against `f64` for both.

/// Lanes of every vector.
pub(crate) const LANES: usize = 8;

/// One implementation of eight-lane `f32` arithmetic. Every method is `#[inline(always)]` so
/// that a kernel generic over `Simd` is compiled entirely inside the `#[target_feature]`
/// function that [`dispatch`] calls.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    /// Eight `f32`.
    type F: Copy;
    /// Eight lane masks.
    type M: Copy;

    fn splat(self, x: f32) -> Self::F;
    fn load(self, x: &[f32; LANES]) -> Self::F;
    fn store(self, v: Self::F, out: &mut [f32; LANES]);
    /// Load eight bfloat16 bit patterns (exact widening to `f32`).
    fn load_bf16(self, x: &[u16; LANES]) -> Self::F;
    /// Store as bfloat16, rounding to nearest even. Lanes must not be NaN.
    fn store_bf16(self, v: Self::F, out: &mut [u16; LANES]);

    fn add(self, a: Self::F, b: Self::F) -> Self::F;
    fn sub(self, a: Self::F, b: Self::F) -> Self::F;
    fn mul(self, a: Self::F, b: Self::F) -> Self::F;
    fn div(self, a: Self::F, b: Self::F) -> Self::F;
    /// `a * b + c`, fused where the implementation has FMA.
    fn mul_add(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// `if a > b { a } else { b }` per lane: a NaN in `b` propagates, a NaN in `a` does not.
    fn max(self, a: Self::F, b: Self::F) -> Self::F;
    /// `if a < b { a } else { b }` per lane: a NaN in `b` propagates, a NaN in `a` does not.
    fn min(self, a: Self::F, b: Self::F) -> Self::F;
    fn abs(self, a: Self::F) -> Self::F;
    /// The bits of each lane shifted left by 23, as `f32` (builds a power of two from an
    /// integer held in the low mantissa bits).
    fn shl23(self, t: Self::F) -> Self::F;
    /// `(m, e)` with `x = m * 2^e`, `m` in `[1, 2)`, for positive normal finite `x`.
    fn split_exponent(self, x: Self::F) -> (Self::F, Self::F);

    fn gt(self, a: Self::F, b: Self::F) -> Self::M;
    fn lt(self, a: Self::F, b: Self::F) -> Self::M;
    fn eq(self, a: Self::F, b: Self::F) -> Self::M;
    /// `!(a < b)`: true where `a >= b` or either lane is NaN.
    fn not_lt(self, a: Self::F, b: Self::F) -> Self::M;
    /// `if m { a } else { b }` per lane.
    fn select(self, m: Self::M, a: Self::F, b: Self::F) -> Self::F;

    /// Sum of the lanes in `f64`, in a fixed order.
    fn sum_f64(self, v: Self::F) -> f64;
    /// Largest lane (NaN lanes may be ignored).
    fn max_lane(self, v: Self::F) -> f32;
}

// exp: x = n ln2 + r with |r| <= ln2 / 2 and n = round(x log2 e), e^x = (2 e^r) 2^(n-1).
// * n is rounded by adding a magic constant (1.5 * 2^23 + 126) in one FMA: the sum's low
//   mantissa bits are then n + 126, so shifting its bits left by 23 builds 2^(n-1) directly
//   (no round or float-to-int conversion). 2^(n-1) keeps n = 128 (near the overflow bound)
//   representable, and n = -126 gives a zero exponent field, i.e. exactly 0: clamping x at
//   EXP_LO flushes results below 2^-125.5 (~1.7e-38, the subnormal edge) to 0, exp(-inf) too.
// * r = x - n ln2 with ln2 split in two (Cody-Waite) so that n * LN2_HI is exact.
// * 2 e^r = 2 + r (E0 + r (E1 + ... + r E5)), coefficients fitted (iteratively reweighted
//   least squares towards minimax of the relative error, then rounded to f32): relative error
//   1.7e-8 on |r| <= ln2 / 2, well under f32 rounding.
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 * 2^23 + 126.
const EXP_MAGIC: f32 = 12_583_038.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_E0: f32 = 2.0;
const EXP_E1: f32 = 0.999_999_9;
const EXP_E2: f32 = 0.333_328_63;
const EXP_E3: f32 = 0.083_336;
const EXP_E4: f32 = 0.016_748_311;
const EXP_E5: f32 = 0.002_768_730_7;
/// Largest argument with a finite result (the f32 below ln(f32::MAX)).
const EXP_HI: f32 = 88.722_83;
/// Clamp below: round(EXP_LO * log2(e)) = -126, the n whose 2^(n-1) is 0.
const EXP_LO: f32 = -87.0;

/// `e^x` per lane for `x <= 88.72283`: larger `x` (+inf included) give `e^88.72283` instead
/// of +inf, which the kernels never meet (their arguments are logits minus the row's max or
/// log-sum-exp, so at most ~0) and so need no overflow select. 0 below -125.5 ln 2 (about
/// -86.99), NaN for NaN; see `tests` for the measured error.
#[inline(always)]
pub(crate) fn exp_le_max<S: Simd>(s: S, x: S::F) -> S::F {
    // Clamp with the NaN-propagating operand order so that NaN stays NaN.
    let xc = s.min(s.splat(EXP_HI), s.max(s.splat(EXP_LO), x));
    let t = s.mul_add(xc, s.splat(LOG2E), s.splat(EXP_MAGIC));
    let n = s.sub(t, s.splat(EXP_MAGIC));
    let r = s.mul_add(n, s.splat(-LN2_HI), xc);
    let r = s.mul_add(n, s.splat(-LN2_LO), r);
    let mut p = s.mul_add(s.splat(EXP_E5), r, s.splat(EXP_E4));
    p = s.mul_add(p, r, s.splat(EXP_E3));
    p = s.mul_add(p, r, s.splat(EXP_E2));
    p = s.mul_add(p, r, s.splat(EXP_E1));
    p = s.mul_add(p, r, s.splat(EXP_E0));
    p = s.mul_add(p, r, s.splat(2.0));
    s.mul(p, s.shl23(t))
}

/// Two [`exp_le_max`] with their instructions interleaved: two independent dependency chains
/// keep the FP pipes busy where one chain would wait on latencies.
#[inline(always)]
pub(crate) fn exp_le_max2<S: Simd>(s: S, x0: S::F, x1: S::F) -> (S::F, S::F) {
    let hi = s.splat(EXP_HI);
    let lo = s.splat(EXP_LO);
    let l2e = s.splat(LOG2E);
    let magic = s.splat(EXP_MAGIC);
    let c0 = s.min(hi, s.max(lo, x0));
    let c1 = s.min(hi, s.max(lo, x1));
    let t0 = s.mul_add(c0, l2e, magic);
    let t1 = s.mul_add(c1, l2e, magic);
    let n0 = s.sub(t0, magic);
    let n1 = s.sub(t1, magic);
    let r0 = s.mul_add(n0, s.splat(-LN2_HI), c0);
    let r1 = s.mul_add(n1, s.splat(-LN2_HI), c1);
    let r0 = s.mul_add(n0, s.splat(-LN2_LO), r0);
    let r1 = s.mul_add(n1, s.splat(-LN2_LO), r1);
    let mut p0 = s.mul_add(s.splat(EXP_E5), r0, s.splat(EXP_E4));
    let mut p1 = s.mul_add(s.splat(EXP_E5), r1, s.splat(EXP_E4));
    p0 = s.mul_add(p0, r0, s.splat(EXP_E3));
    p1 = s.mul_add(p1, r1, s.splat(EXP_E3));
    p0 = s.mul_add(p0, r0, s.splat(EXP_E2));
    p1 = s.mul_add(p1, r1, s.splat(EXP_E2));
    p0 = s.mul_add(p0, r0, s.splat(EXP_E1));
    p1 = s.mul_add(p1, r1, s.splat(EXP_E1));
    p0 = s.mul_add(p0, r0, s.splat(EXP_E0));
    p1 = s.mul_add(p1, r1, s.splat(EXP_E0));
    p0 = s.mul_add(p0, r0, s.splat(2.0));
    p1 = s.mul_add(p1, r1, s.splat(2.0));
    (s.mul(p0, s.shl23(t0)), s.mul(p1, s.shl23(t1)))
}

// ln: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(u) with u = (m - 1) / (m + 1),
// |u| <= 0.1716, 2 atanh(u) = 2u + u^3 (2/3 + 2/5 u^2 + 2/7 u^4 + 2/9 u^6) + O(u^11)
// (truncation below 1e-9 relative). m - 1 is exact, so ln stays accurate near 1.
const LN_C3: f32 = 2.0 / 3.0;
const LN_C5: f32 = 2.0 / 5.0;
const LN_C7: f32 = 2.0 / 7.0;
const LN_C9: f32 = 2.0 / 9.0;
const SQRT2: f32 = std::f32::consts::SQRT_2;
/// 2^23: scales subnormal inputs into the normal range.
const TWO_POW_23: f32 = 8_388_608.0;

/// Natural logarithm per lane: -inf for 0, NaN for negatives and NaN, +inf for +inf;
/// subnormal inputs are handled.
#[inline(always)]
pub(crate) fn ln<S: Simd>(s: S, x: S::F) -> S::F {
    let tiny = s.lt(x, s.splat(f32::MIN_POSITIVE));
    let xs = s.select(tiny, s.mul(x, s.splat(TWO_POW_23)), x);
    let (m, e) = s.split_exponent(xs);
    let e = s.select(tiny, s.sub(e, s.splat(23.0)), e);
    let big = s.gt(m, s.splat(SQRT2));
    let m = s.select(big, s.mul(m, s.splat(0.5)), m);
    let e = s.select(big, s.add(e, s.splat(1.0)), e);
    let u = s.div(s.sub(m, s.splat(1.0)), s.add(m, s.splat(1.0)));
    let w = s.mul(u, u);
    let mut h = s.mul_add(s.splat(LN_C9), w, s.splat(LN_C7));
    h = s.mul_add(h, w, s.splat(LN_C5));
    h = s.mul_add(h, w, s.splat(LN_C3));
    let small = s.mul_add(s.mul(u, w), h, s.mul(e, s.splat(LN2_LO)));
    let y = s.add(s.mul_add(e, s.splat(LN2_HI), s.add(u, u)), small);
    // Special inputs: x <= 0 or NaN, and +inf.
    let nonpositive = s.not_lt(s.splat(0.0), x);
    let special = s.select(s.eq(x, s.splat(0.0)), s.splat(f32::NEG_INFINITY), s.splat(f32::NAN));
    let y = s.select(nonpositive, special, y);
    s.select(s.eq(x, s.splat(f32::INFINITY)), x, y)
}

/// Element types the kernels read and write: `f32`, and bfloat16 as its `u16` bit pattern
/// (numpy has no bfloat16, so Python hands bf16 tensors over as 16-bit integer views).
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// The value that pads a partial vector where it must not count (-inf).
    const NEG_INF: Self;
    /// Whether `Self` is `f32` (then [`Elem::as_f32_mut`] returns `Some`).
    const IS_F32: bool;
    /// The slice as `f32` when `Self` is `f32`.
    fn as_f32_mut(x: &mut [Self]) -> Option<&mut [f32]>;
    fn load<S: Simd>(s: S, x: &[Self; LANES]) -> S::F;
    fn store<S: Simd>(s: S, v: S::F, out: &mut [Self; LANES]);
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    const NEG_INF: Self = f32::NEG_INFINITY;
    const IS_F32: bool = true;
    #[inline(always)]
    fn as_f32_mut(x: &mut [Self]) -> Option<&mut [f32]> {
        Some(x)
    }
    #[inline(always)]
    fn load<S: Simd>(s: S, x: &[Self; LANES]) -> S::F {
        s.load(x)
    }
    #[inline(always)]
    fn store<S: Simd>(s: S, v: S::F, out: &mut [Self; LANES]) {
        s.store(v, out)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Elem for u16 {
    const NEG_INF: Self = 0xFF80;
    const IS_F32: bool = false;
    #[inline(always)]
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    #[inline(always)]
    fn load<S: Simd>(s: S, x: &[Self; LANES]) -> S::F {
        s.load_bf16(x)
    }
    #[inline(always)]
    fn store<S: Simd>(s: S, v: S::F, out: &mut [Self; LANES]) {
        s.store_bf16(v, out)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16_bits(x)
    }
}

/// bfloat16 bits of `x`, rounded to nearest even (NaN stays NaN).
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FC0;
    }
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1));
    (rounded >> 16) as u16
}

/// Split `x` into whole vectors and the remainder.
#[inline(always)]
pub(crate) fn split_lanes<E>(x: &[E]) -> (&[[E; LANES]], &[E]) {
    let n = x.len() / LANES;
    let (head, tail) = x.split_at(n * LANES);
    // SAFETY: `[E; LANES]` has the size of `LANES` values of `E` and the alignment of `E`;
    // `head` holds exactly `n * LANES` initialized values, borrowed for the returned lifetime.
    let chunks = unsafe { std::slice::from_raw_parts(head.as_ptr().cast::<[E; LANES]>(), n) };
    (chunks, tail)
}

/// Mutable version of [`split_lanes`].
#[inline(always)]
pub(crate) fn split_lanes_mut<E>(x: &mut [E]) -> (&mut [[E; LANES]], &mut [E]) {
    let n = x.len() / LANES;
    let (head, tail) = x.split_at_mut(n * LANES);
    // SAFETY: as in `split_lanes`; `head` is uniquely borrowed for the returned lifetime, so
    // the reinterpreted slice is the only access to those values.
    let chunks =
        unsafe { std::slice::from_raw_parts_mut(head.as_mut_ptr().cast::<[E; LANES]>(), n) };
    (chunks, tail)
}

/// A partial vector: `tail` (shorter than `LANES`) padded with `pad`.
#[inline(always)]
pub(crate) fn padded<E: Copy>(tail: &[E], pad: E) -> [E; LANES] {
    let mut a = [pad; LANES];
    a[..tail.len()].copy_from_slice(tail);
    a
}

/// A kernel generic over the SIMD implementation; see [`dispatch`].
pub(crate) trait Kernel {
    type Output;
    /// Implementations must be `#[inline(always)]` (and so must everything they call) so that
    /// the AVX2 instance is compiled with the features [`dispatch`] enables.
    fn run<S: Simd>(self, s: S) -> Self::Output;
}

/// Run `k` with the best implementation this CPU supports.
#[inline]
pub(crate) fn dispatch<K: Kernel>(k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx) = Avx2::detect() {
        // SAFETY: `Avx2::detect` returns a value only when the running CPU has AVX2 and FMA,
        // the features `run_avx2` is compiled for.
        return unsafe { run_avx2(avx, k) };
    }
    k.run(Portable)
}

/// Run `k` with the portable implementation (tests compare it with the dispatched one).
#[cfg(test)]
pub(crate) fn dispatch_portable<K: Kernel>(k: K) -> K::Output {
    k.run(Portable)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Kernel>(s: Avx2, k: K) -> K::Output {
    k.run(s)
}

/// Plain arrays; the compiler vectorizes the lane loops for the target's baseline.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

#[inline(always)]
fn map1(a: [f32; LANES], f: impl Fn(f32) -> f32) -> [f32; LANES] {
    let mut out = [0.0; LANES];
    for i in 0..LANES {
        out[i] = f(a[i]);
    }
    out
}

#[inline(always)]
fn map2(a: [f32; LANES], b: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> [f32; LANES] {
    let mut out = [0.0; LANES];
    for i in 0..LANES {
        out[i] = f(a[i], b[i]);
    }
    out
}

#[inline(always)]
fn cmp(a: [f32; LANES], b: [f32; LANES], f: impl Fn(f32, f32) -> bool) -> [bool; LANES] {
    let mut out = [false; LANES];
    for i in 0..LANES {
        out[i] = f(a[i], b[i]);
    }
    out
}

impl Simd for Portable {
    type F = [f32; LANES];
    type M = [bool; LANES];

    #[inline(always)]
    fn splat(self, x: f32) -> Self::F {
        [x; LANES]
    }
    #[inline(always)]
    fn load(self, x: &[f32; LANES]) -> Self::F {
        *x
    }
    #[inline(always)]
    fn store(self, v: Self::F, out: &mut [f32; LANES]) {
        *out = v;
    }
    #[inline(always)]
    fn load_bf16(self, x: &[u16; LANES]) -> Self::F {
        let mut out = [0.0; LANES];
        for i in 0..LANES {
            out[i] = f32::from_bits(u32::from(x[i]) << 16);
        }
        out
    }
    #[inline(always)]
    fn store_bf16(self, v: Self::F, out: &mut [u16; LANES]) {
        for i in 0..LANES {
            let b = v[i].to_bits();
            out[i] = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
        }
    }
    #[inline(always)]
    fn add(self, a: Self::F, b: Self::F) -> Self::F {
        map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    fn sub(self, a: Self::F, b: Self::F) -> Self::F {
        map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    fn mul(self, a: Self::F, b: Self::F) -> Self::F {
        map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    fn div(self, a: Self::F, b: Self::F) -> Self::F {
        map2(a, b, |x, y| x / y)
    }
    #[inline(always)]
    fn mul_add(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F {
        // Unfused: a software fma would be far slower where the CPU lacks the instruction.
        let mut out = [0.0; LANES];
        for i in 0..LANES {
            out[i] = a[i] * b[i] + c[i];
        }
        out
    }
    #[inline(always)]
    fn max(self, a: Self::F, b: Self::F) -> Self::F {
        map2(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    fn min(self, a: Self::F, b: Self::F) -> Self::F {
        map2(a, b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    fn abs(self, a: Self::F) -> Self::F {
        map1(a, f32::abs)
    }
    #[inline(always)]
    fn shl23(self, t: Self::F) -> Self::F {
        let mut out = [0.0; LANES];
        for i in 0..LANES {
            out[i] = f32::from_bits(t[i].to_bits() << 23);
        }
        out
    }
    #[inline(always)]
    fn split_exponent(self, x: Self::F) -> (Self::F, Self::F) {
        let mut m = [0.0; LANES];
        let mut e = [0.0; LANES];
        for i in 0..LANES {
            let b = x[i].to_bits();
            m[i] = f32::from_bits((b & 0x007F_FFFF) | 0x3F80_0000);
            e[i] = (((b >> 23) & 0xFF) as i32 - 127) as f32;
        }
        (m, e)
    }
    #[inline(always)]
    fn gt(self, a: Self::F, b: Self::F) -> Self::M {
        cmp(a, b, |x, y| x > y)
    }
    #[inline(always)]
    fn lt(self, a: Self::F, b: Self::F) -> Self::M {
        cmp(a, b, |x, y| x < y)
    }
    #[inline(always)]
    fn eq(self, a: Self::F, b: Self::F) -> Self::M {
        cmp(a, b, |x, y| x == y)
    }
    #[inline(always)]
    fn not_lt(self, a: Self::F, b: Self::F) -> Self::M {
        cmp(a, b, |x, y| x.partial_cmp(&y).is_none_or(|o| o.is_ge()))
    }
    #[inline(always)]
    fn select(self, m: Self::M, a: Self::F, b: Self::F) -> Self::F {
        let mut out = [0.0; LANES];
        for i in 0..LANES {
            out[i] = if m[i] { a[i] } else { b[i] };
        }
        out
    }
    #[inline(always)]
    fn sum_f64(self, v: Self::F) -> f64 {
        // Same pairing order as the AVX2 reduction.
        let mut h = [0.0f32; 4];
        for i in 0..4 {
            h[i] = v[i] + v[i + 4];
        }
        f64::from(h[0] + h[2]) + f64::from(h[1] + h[3])
    }
    #[inline(always)]
    fn max_lane(self, v: Self::F) -> f32 {
        let mut m = v[0];
        for &x in &v[1..] {
            if x > m {
                m = x;
            }
        }
        m
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{LANES, Simd};

    /// Proof that the running CPU has AVX2 and FMA: a value exists only via [`Avx2::detect`].
    /// Every intrinsic below is sound to execute because such a value was passed in.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2 {
        _private: (),
    }

    impl Avx2 {
        #[inline]
        pub(crate) fn detect() -> Option<Self> {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Some(Avx2 { _private: () })
            } else {
                None
            }
        }
    }

    // SAFETY (all `unsafe` blocks in this impl): `self: Avx2` proves the CPU supports AVX2 and
    // FMA (see `Avx2::detect`), so executing these instructions is defined; the only memory
    // accesses are unaligned loads/stores of exactly the `LANES` elements (32 bytes of f32,
    // 16 bytes of u16) behind references of that exact size.
    impl Simd for Avx2 {
        type F = __m256;
        type M = __m256;

        #[inline(always)]
        fn splat(self, x: f32) -> Self::F {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, x: &[f32; LANES]) -> Self::F {
            unsafe { _mm256_loadu_ps(x.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, v: Self::F, out: &mut [f32; LANES]) {
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn load_bf16(self, x: &[u16; LANES]) -> Self::F {
            unsafe {
                let h = _mm_loadu_si128(x.as_ptr().cast::<__m128i>());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
        #[inline(always)]
        fn store_bf16(self, v: Self::F, out: &mut [u16; LANES]) {
            unsafe {
                let b = _mm256_castps_si256(v);
                let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
                let r = _mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
                let hi = _mm256_srli_epi32::<16>(r);
                // packus works within 128-bit halves; gather the two low quadwords.
                let packed = _mm256_packus_epi32(hi, hi);
                let ordered = _mm256_permute4x64_epi64::<0b1000>(packed);
                _mm_storeu_si128(
                    out.as_mut_ptr().cast::<__m128i>(),
                    _mm256_castsi256_si128(ordered),
                );
            }
        }
        #[inline(always)]
        fn add(self, a: Self::F, b: Self::F) -> Self::F {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: Self::F, b: Self::F) -> Self::F {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: Self::F, b: Self::F) -> Self::F {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn div(self, a: Self::F, b: Self::F) -> Self::F {
            unsafe { _mm256_div_ps(a, b) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: Self::F, b: Self::F) -> Self::F {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: Self::F, b: Self::F) -> Self::F {
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        fn abs(self, a: Self::F) -> Self::F {
            unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), a) }
        }
        #[inline(always)]
        fn shl23(self, t: Self::F) -> Self::F {
            unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_castps_si256(t))) }
        }
        #[inline(always)]
        fn split_exponent(self, x: Self::F) -> (Self::F, Self::F) {
            unsafe {
                let b = _mm256_castps_si256(x);
                let m = _mm256_or_si256(
                    _mm256_and_si256(b, _mm256_set1_epi32(0x007F_FFFF)),
                    _mm256_set1_epi32(0x3F80_0000),
                );
                let e = _mm256_sub_epi32(
                    _mm256_and_si256(_mm256_srli_epi32::<23>(b), _mm256_set1_epi32(0xFF)),
                    _mm256_set1_epi32(127),
                );
                (_mm256_castsi256_ps(m), _mm256_cvtepi32_ps(e))
            }
        }
        #[inline(always)]
        fn gt(self, a: Self::F, b: Self::F) -> Self::M {
            unsafe { _mm256_cmp_ps::<_CMP_GT_OQ>(a, b) }
        }
        #[inline(always)]
        fn lt(self, a: Self::F, b: Self::F) -> Self::M {
            unsafe { _mm256_cmp_ps::<_CMP_LT_OQ>(a, b) }
        }
        #[inline(always)]
        fn eq(self, a: Self::F, b: Self::F) -> Self::M {
            unsafe { _mm256_cmp_ps::<_CMP_EQ_OQ>(a, b) }
        }
        #[inline(always)]
        fn not_lt(self, a: Self::F, b: Self::F) -> Self::M {
            unsafe { _mm256_cmp_ps::<_CMP_NLT_UQ>(a, b) }
        }
        #[inline(always)]
        fn select(self, m: Self::M, a: Self::F, b: Self::F) -> Self::F {
            unsafe { _mm256_blendv_ps(b, a, m) }
        }
        #[inline(always)]
        fn sum_f64(self, v: Self::F) -> f64 {
            unsafe {
                // (v0+v4, v1+v5, v2+v6, v3+v7), then (h0+h2, h1+h3), as `Portable` does.
                let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let q = _mm_add_ps(h, _mm_movehl_ps(h, h));
                f64::from(_mm_cvtss_f32(q)) + f64::from(_mm_cvtss_f32(_mm_shuffle_ps::<1>(q, q)))
            }
        }
        #[inline(always)]
        fn max_lane(self, v: Self::F) -> f32 {
            unsafe {
                let h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let q = _mm_max_ps(h, _mm_movehl_ps(h, h));
                _mm_cvtss_f32(_mm_max_ps(q, _mm_shuffle_ps::<1>(q, q)))
            }
        }
    }
}

/// The AVX2 implementation when the CPU has it (tests measure both implementations).
#[cfg(test)]
pub(crate) fn detected_avx2() -> Option<impl Simd> {
    #[cfg(target_arch = "x86_64")]
    return Avx2::detect();
    #[cfg(not(target_arch = "x86_64"))]
    return None::<Portable>;
}
