//! Tests of the kernels against the scalar f64 reference (`reference.rs`).
//!
//! Tolerances. The kernels read f32 (or bf16) logits and compute the long passes in f32 with
//! f64 accumulation of per-block sums, the O(K) work in f64. The reference sees the same
//! input values, converted exactly to f64. Error sources: `z / T` rounded to f32 (relative
//! 6e-8, i.e. up to ~1e-6 absolute on a scaled logit of 16), exp within a few ulp, and f32
//! block sums (at most 32 terms a lane before the f64 total, ~1e-6 relative). So a value is
//! within ~1e-5 absolute of the reference for the sizes here (scaled by its magnitude for
//! large values), and a gradient entry (a difference of probabilities, each <= 1/T) within
//! ~1e-5 absolute. The finite-difference reference gradient itself is good to ~1e-8
//! (h = 1e-5, truncation O(h^2), cancellation O(eps / h)). bf16 gradients are rounded to 8
//! significant bits on output: relative 2^-9, hence 4e-3 there.

use proptest::prelude::*;

use super::reference::{self, Target};
use super::simd::{self, LANES, Simd};
use super::*;

/// A small deterministic generator (splitmix64), so that one proptest seed drives a whole
/// case of arrays.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    /// `k` distinct values below `n`.
    fn distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }
}

fn all_divergences(rng: &mut Rng) -> Vec<Divergence> {
    let beta = rng.range(0.05, 0.95);
    let alpha = rng.range(0.05, 0.95);
    DIVERGENCE_NAMES.iter().map(|name| Divergence::parse(name, beta, alpha).unwrap()).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dtype {
    F32,
    Bf16,
}

const DTYPES: [Dtype; 2] = [Dtype::F32, Dtype::Bf16];

/// Round to the dtype's values (the reference sees exactly what the kernel reads).
fn round_to(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::F32 => x,
        Dtype::Bf16 => f32::from_bits(u32::from(simd::bf16_bits(x)) << 16),
    }
}

fn bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| simd::bf16_bits(v)).collect()
}

/// Kernel output: per-row values and the gradient (as f32).
struct Out {
    values: Vec<f32>,
    grad: Vec<f32>,
}

/// Buffers of one dtype, in the shape the public functions take.
enum Buf {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Buf {
    fn new(dtype: Dtype, x: &[f32]) -> Self {
        match dtype {
            Dtype::F32 => Buf::F32(x.to_vec()),
            Dtype::Bf16 => Buf::Bf16(bits(x)),
        }
    }
    fn zeros(dtype: Dtype, n: usize) -> Self {
        // Filled with a sentinel, so that a kernel that skips an entry is caught.
        match dtype {
            Dtype::F32 => Buf::F32(vec![f32::NAN; n]),
            Dtype::Bf16 => Buf::Bf16(vec![0x7FC0; n]),
        }
    }
    fn logits(&self) -> Logits<'_> {
        match self {
            Buf::F32(x) => Logits::F32(x),
            Buf::Bf16(x) => Logits::Bf16(x),
        }
    }
    fn grad(&mut self) -> GradOut<'_> {
        match self {
            Buf::F32(x) => GradOut::F32(x),
            Buf::Bf16(x) => GradOut::Bf16(x),
        }
    }
    fn to_f32(&self) -> Vec<f32> {
        match self {
            Buf::F32(x) => x.clone(),
            Buf::Bf16(x) => x.iter().map(|&b| f32::from_bits(u32::from(b) << 16)).collect(),
        }
    }
}

fn assert_close(what: &str, got: f64, want: f64, atol: f64, rtol: f64) {
    if got == want {
        return; // also equal infinities
    }
    let err = (got - want).abs();
    assert!(
        err <= atol + rtol * want.abs(),
        "{what}: got {got}, want {want} (error {err:e}, allowed {:e})",
        atol + rtol * want.abs()
    );
}

/// A top-K case: N rows of V logits, the teacher's top K by rank (ties allowed).
struct TopKCase {
    n: usize,
    v: usize,
    k: usize,
    z: Vec<f32>,
    ids: Vec<i64>,
    logprobs: Vec<f32>,
    valid: Vec<bool>,
}

fn topk_case(seed: u64, max_v: usize) -> TopKCase {
    let mut rng = Rng(seed);
    let n = 1 + rng.below(3);
    let v = 1 + rng.below(max_v);
    let k = 1 + rng.below(v);
    let ties = rng.chance(0.3);
    let mut z = Vec::with_capacity(n * v);
    let mut ids = Vec::with_capacity(n * k);
    let mut logprobs = Vec::with_capacity(n * k);
    let mut valid = Vec::with_capacity(n);
    for _ in 0..n {
        let row_valid = !rng.chance(0.2);
        valid.push(row_valid);
        let t: Vec<f64> = (0..v)
            .map(|_| {
                let x = rng.range(-6.0, 6.0);
                if ties { x.round() } else { x }
            })
            .collect();
        let m = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + t.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| t[b].total_cmp(&t[a]));
        let top = &order[..k];
        // Masked (-inf) student logits outside the teacher's ids, keeping one finite entry
        // in the complement so that the loss stays finite.
        let keep = order.get(k).copied();
        for i in 0..v {
            let masked = !top.contains(&i) && Some(i) != keep && rng.chance(0.15);
            z.push(if masked { f32::NEG_INFINITY } else { rng.range(-8.0, 8.0) as f32 });
        }
        if row_valid {
            ids.extend(top.iter().map(|&i| i as i64));
            logprobs.extend(top.iter().map(|&i| (t[i] - lse) as f32));
        } else {
            // Garbage a kernel must not read.
            ids.extend((0..k).map(|_| -3));
            logprobs.extend((0..k).map(|_| f32::NAN));
        }
    }
    TopKCase { n, v, k, z, ids, logprobs, valid }
}

fn run_sparse(
    c: &TopKCase,
    dtype: Dtype,
    z: &[f32],
    config: &SparseKdConfig,
    with_grad: bool,
) -> Result<Out> {
    let student = Buf::new(dtype, z);
    let mut grad = Buf::zeros(dtype, c.n * c.v);
    let mut values = vec![f32::NAN; c.n];
    let g = if with_grad { Some(grad.grad()) } else { None };
    sparse_kd(student.logits(), c.v, &c.ids, &c.logprobs, c.k, &c.valid, config, &mut values, g)?;
    Ok(Out { values, grad: grad.to_f32() })
}

fn grad_rtol(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 1e-4,
        Dtype::Bf16 => 4e-3,
    }
}

/// Compare the kernel's values and gradients with the reference for every row.
#[allow(clippy::too_many_arguments)]
fn check_rows(
    what: &str,
    out: &Out,
    dtype: Dtype,
    n: usize,
    v: usize,
    z: &[f32],
    valid: &[bool],
    target_of: impl Fn(usize) -> Target,
    div: Divergence,
    temperature: f64,
) {
    for r in 0..n {
        let zr: Vec<f64> = z[r * v..(r + 1) * v].iter().map(|&x| f64::from(x)).collect();
        let got_g = &out.grad[r * v..(r + 1) * v];
        if !valid[r] {
            assert_eq!(out.values[r], 0.0, "{what}: invalid row {r} value");
            assert!(got_g.iter().all(|&g| g == 0.0), "{what}: invalid row {r} grad");
            continue;
        }
        let target = target_of(r);
        let want = reference::loss(&zr, &target, div, temperature);
        assert_close(&format!("{what} row {r} value"), f64::from(out.values[r]), want, 1e-5, 2e-5);
        // An infinite loss (a teacher outcome the student gives probability 0, e.g. a rest
        // bucket with rounding mass when K == V) has no finite difference; its gradient must
        // still be finite.
        if !want.is_finite() {
            assert!(got_g.iter().all(|g| g.is_finite()), "{what} row {r}: grad not finite");
            continue;
        }
        if div == Divergence::Tvd && reference::min_gap_pq(&zr, &target, temperature) < 1e-3 {
            continue;
        }
        let want_g = reference::grad_fd(&zr, &target, div, temperature);
        for i in 0..v {
            assert!(got_g[i].is_finite(), "{what} row {r} grad[{i}] not finite");
            assert_close(
                &format!("{what} row {r} grad[{i}]"),
                f64::from(got_g[i]),
                want_g[i],
                1e-5,
                grad_rtol(dtype),
            );
            if zr[i] == f64::NEG_INFINITY {
                assert_eq!(got_g[i], 0.0, "{what}: masked logit {i} must get 0");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn sparse_matches_reference(seed in any::<u64>()) {
        let c = topk_case(seed, 40);
        let mut rng = Rng(seed ^ 0x5EED);
        for tail in [Tail::Bucket, Tail::Renormalize] {
            let t = if rng.chance(0.5) { 1.0 } else { rng.range(0.5, 2.5) };
            let tc = match tail {
                Tail::Bucket => t,
                Tail::Renormalize => rng.range(0.5, 2.5),
            };
            for div in all_divergences(&mut rng) {
                for dtype in DTYPES {
                    let z: Vec<f32> = c.z.iter().map(|&x| round_to(dtype, x)).collect();
                    let config = SparseKdConfig {
                        divergence: div,
                        tail,
                        temperature: t,
                        teacher_temperature: tc,
                    };
                    let out = run_sparse(&c, dtype, &z, &config, true).unwrap();
                    let what = format!("{} {tail:?} {dtype:?} T={t} Tc={tc}", div.name());
                    let target_of = |r: usize| Target::TopK {
                        ids: c.ids[r * c.k..(r + 1) * c.k].iter().map(|&i| i as usize).collect(),
                        logprobs: c.logprobs[r * c.k..(r + 1) * c.k]
                            .iter()
                            .map(|&l| f64::from(l))
                            .collect(),
                        tail,
                        teacher_temperature: tc,
                    };
                    check_rows(&what, &out, dtype, c.n, c.v, &z, &c.valid, target_of, div, t);
                    // Values without the gradient are the same numbers.
                    let values_only = run_sparse(&c, dtype, &z, &config, false).unwrap();
                    prop_assert_eq!(&values_only.values, &out.values);
                }
            }
        }
    }

    #[test]
    fn dense_matches_reference(seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let n = 1 + rng.below(3);
        let v = 1 + rng.below(40);
        let vt = 1 + rng.below(v);
        let t = if rng.chance(0.5) { 1.0 } else { rng.range(0.5, 2.5) };
        let mut z = Vec::new();
        let mut teacher = Vec::new();
        let mut valid = Vec::new();
        for _ in 0..n {
            valid.push(!rng.chance(0.2));
            let keep = rng.below(vt);
            for i in 0..v {
                // Masked entries are masked for both (the same vocabulary mask).
                let masked = i < vt && i != keep && rng.chance(0.15);
                z.push(if masked { f32::NEG_INFINITY } else { rng.range(-8.0, 8.0) as f32 });
                if i < vt {
                    teacher.push(if masked { f32::NEG_INFINITY } else { rng.range(-8.0, 8.0) as f32 });
                }
            }
        }
        for div in all_divergences(&mut rng) {
            for dtype in DTYPES {
                for tdtype in DTYPES {
                    let zr: Vec<f32> = z.iter().map(|&x| round_to(dtype, x)).collect();
                    let tr: Vec<f32> = teacher.iter().map(|&x| round_to(tdtype, x)).collect();
                    let student = Buf::new(dtype, &zr);
                    let tbuf = Buf::new(tdtype, &tr);
                    let mut grad = Buf::zeros(dtype, n * v);
                    let mut values = vec![f32::NAN; n];
                    let config = DenseKdConfig { divergence: div, temperature: t };
                    dense_kd(student.logits(), v, tbuf.logits(), vt, &valid, &config,
                             &mut values, Some(grad.grad())).unwrap();
                    let out = Out { values, grad: grad.to_f32() };
                    let what = format!("dense {} {dtype:?}/{tdtype:?} T={t}", div.name());
                    let target_of = |r: usize| Target::Dense {
                        logits: tr[r * vt..(r + 1) * vt].iter().map(|&x| f64::from(x)).collect(),
                    };
                    check_rows(&what, &out, dtype, n, v, &zr, &valid, target_of, div, t);
                }
            }
        }
    }

    #[test]
    fn sampled_matches_reference(seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let n = 1 + rng.below(3);
        let v = 1 + rng.below(40);
        let m = 1 + rng.below(8);
        let t = if rng.chance(0.5) { 1.0 } else { rng.range(0.5, 2.5) };
        let mut z = Vec::new();
        let mut ids = Vec::new();
        let mut counts = Vec::new();
        let mut logprobs = Vec::new();
        let mut valid = Vec::new();
        for _ in 0..n {
            valid.push(!rng.chance(0.2));
            let drawn = rng.distinct(v, m.min(v));
            for i in 0..v {
                let masked = !drawn.contains(&i) && rng.chance(0.15);
                z.push(if masked { f32::NEG_INFINITY } else { rng.range(-8.0, 8.0) as f32 });
            }
            for j in 0..m {
                match drawn.get(j) {
                    Some(&id) if j == 0 || rng.chance(0.8) => {
                        ids.push(id as i64);
                        counts.push(1 + rng.below(5) as i64);
                    }
                    _ => {
                        ids.push(-1);
                        counts.push(0);
                    }
                }
                logprobs.push(rng.range(-9.0, -0.01) as f32);
            }
        }
        for with_logprobs in [true, false] {
            for dtype in DTYPES {
                let zr: Vec<f32> = z.iter().map(|&x| round_to(dtype, x)).collect();
                let student = Buf::new(dtype, &zr);
                let mut grad = Buf::zeros(dtype, n * v);
                let mut values = vec![f32::NAN; n];
                let lp = if with_logprobs { Some(logprobs.as_slice()) } else { None };
                sampled_kd(student.logits(), v, &ids, &counts, lp, m, &valid, t, t,
                           &mut values, Some(grad.grad())).unwrap();
                let out = Out { values, grad: grad.to_f32() };
                let what = format!("sampled logprobs={with_logprobs} {dtype:?} T={t}");
                let target_of = |r: usize| Target::Sampled {
                    ids: ids[r * m..(r + 1) * m].to_vec(),
                    counts: counts[r * m..(r + 1) * m].to_vec(),
                    logprobs: with_logprobs.then(|| {
                        logprobs[r * m..(r + 1) * m].iter().map(|&x| f64::from(x)).collect()
                    }),
                };
                check_rows(&what, &out, dtype, n, v, &zr, &valid, target_of,
                           Divergence::ForwardKl, t);
            }
        }
    }
}

fn fwd_bucket() -> SparseKdConfig {
    SparseKdConfig {
        divergence: Divergence::ForwardKl,
        tail: Tail::Bucket,
        temperature: 1.0,
        teacher_temperature: 1.0,
    }
}

/// Rows longer than a block: the online max rises block after block (so the running sum is
/// rescaled), with -inf runs and ids spread over the row.
#[test]
fn long_rows_match_reference() {
    let mut rng = Rng(7);
    let v = 20_003;
    let k = 37;
    let z: Vec<f32> = (0..v)
        .map(|i| {
            if (5000..5400).contains(&i) {
                f32::NEG_INFINITY
            } else {
                (i as f64 * 1e-3 + rng.range(-2.0, 2.0)) as f32
            }
        })
        .collect();
    let ids: Vec<usize> = rng.distinct(v, k);
    let logprobs: Vec<f32> = (0..k).map(|j| -1.5 - 0.3 * j as f32).collect();
    let zr: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
    for (div, tail) in [
        (Divergence::ForwardKl, Tail::Bucket),
        (Divergence::ReverseKl, Tail::Bucket),
        (Divergence::Tvd, Tail::Bucket),
        (Divergence::ForwardKl, Tail::Renormalize),
    ] {
        let c = TopKCase {
            n: 1,
            v,
            k,
            z: z.clone(),
            ids: ids.iter().map(|&i| i as i64).collect(),
            logprobs: logprobs.clone(),
            valid: vec![true],
        };
        let config = SparseKdConfig { divergence: div, tail, ..fwd_bucket() };
        let out = run_sparse(&c, Dtype::F32, &z, &config, true).unwrap();
        let target = Target::TopK {
            ids: ids.clone(),
            logprobs: logprobs.iter().map(|&x| f64::from(x)).collect(),
            tail,
            teacher_temperature: 1.0,
        };
        let want = reference::loss(&zr, &target, div, 1.0);
        assert_close("long row value", f64::from(out.values[0]), want, 1e-5, 1e-5);
        // The exact gradient at a handful of places (a full finite difference is O(V^2)).
        let h = 1e-4;
        for &i in ids.iter().take(3).chain(&[0, 4999, 10_000, v - 1]) {
            let mut x = zr.clone();
            x[i] += h;
            let up = reference::loss(&x, &target, div, 1.0);
            x[i] -= 2.0 * h;
            let down = reference::loss(&x, &target, div, 1.0);
            let fd = (up - down) / (2.0 * h);
            assert_close(&format!("long row grad[{i}]"), f64::from(out.grad[i]), fd, 1e-7, 1e-4);
        }
        assert!(out.grad[5000..5400].iter().all(|&g| g == 0.0));
    }
}

/// The portable path (every non-x86 target) against the dispatched one (AVX2 here).
#[test]
fn portable_and_dispatched_agree() {
    let c = topk_case(99, 1);
    let _ = c;
    let mut rng = Rng(11);
    let v = 3001;
    let z: Vec<f32> = (0..v).map(|_| rng.range(-10.0, 10.0) as f32).collect();
    let t: Vec<f32> = (0..v).map(|_| rng.range(-10.0, 10.0) as f32).collect();
    let ids: Vec<i64> = rng.distinct(v, 50).iter().map(|&i| i as i64).collect();
    let logprobs: Vec<f32> = (0..50).map(|j| -2.0 - 0.1 * j as f32).collect();
    for div in all_divergences(&mut rng) {
        for tail in [Tail::Bucket, Tail::Renormalize] {
            let settings = sparse::TopKSettings {
                divergence: div,
                tail,
                temperature: 1.3,
                teacher_temperature: 1.3,
            };
            let mut results = Vec::new();
            for portable in [false, true] {
                let mut grad = vec![0.0f32; v];
                let mut scratch = sparse::Scratch::default();
                let row = sparse::TopKRow {
                    row: 0,
                    z: &z,
                    ids: &ids,
                    logprobs: &logprobs,
                    grad: Some(&mut grad),
                    settings,
                    scratch: &mut scratch,
                };
                let d = if portable {
                    simd::dispatch_portable(row).unwrap()
                } else {
                    simd::dispatch(row).unwrap()
                };
                results.push((d, grad));
            }
            assert_close("portable value", results[1].0, results[0].0, 1e-6, 1e-6);
            for i in 0..v {
                let (a, b) = (results[0].1[i], results[1].1[i]);
                assert_close("portable grad", f64::from(b), f64::from(a), 1e-8, 1e-5);
            }
        }
        let mut results = Vec::new();
        for portable in [false, true] {
            let mut grad = vec![0.0f32; v];
            let row = dense::DenseRow {
                row: 0,
                z: &z,
                t: &t[..2000],
                grad: Some(&mut grad),
                divergence: div,
                temperature: 0.7,
            };
            let d = if portable {
                simd::dispatch_portable(row).unwrap()
            } else {
                simd::dispatch(row).unwrap()
            };
            results.push((d, grad));
        }
        assert_close("portable dense value", results[1].0, results[0].0, 1e-6, 1e-5);
        for i in 0..v {
            let (a, b) = (results[0].1[i], results[1].1[i]);
            assert_close("portable dense grad", f64::from(b), f64::from(a), 1e-8, 1e-5);
        }
    }
}

/// Results must not depend on the number of threads (bit for bit).
#[test]
fn thread_count_does_not_change_results() {
    let mut rng = Rng(3);
    let (n, v, k) = (64, 1500, 16);
    let z: Vec<f32> = (0..n * v).map(|_| rng.range(-10.0, 10.0) as f32).collect();
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.extend(rng.distinct(v, k).iter().map(|&i| i as i64));
    }
    let logprobs: Vec<f32> = (0..n * k).map(|j| -1.0 - (j % k) as f32 * 0.2).collect();
    let valid: Vec<bool> = (0..n).map(|r| r % 7 != 3).collect();
    let c = TopKCase { n, v, k, z: z.clone(), ids, logprobs, valid };
    let mut runs = Vec::new();
    for threads_n in [1, 2, 3] {
        crate::threads::set_num_threads(threads_n).unwrap();
        let out = run_sparse(&c, Dtype::F32, &z, &fwd_bucket(), true).unwrap();
        runs.push(out);
    }
    for out in &runs[1..] {
        assert_eq!(
            out.values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            runs[0].values.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            out.grad.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            runs[0].grad.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}

/// Edge cases of the top-K targets.
#[test]
fn topk_edge_cases() {
    // K == V in the bucket mode: no complement, q_rest = 0.
    let z = [0.5f32, -1.0, 2.0];
    let c = TopKCase {
        n: 1,
        v: 3,
        k: 3,
        z: z.to_vec(),
        ids: vec![2, 0, 1],
        logprobs: vec![-0.3, -1.7, -2.5],
        valid: vec![true],
    };
    for div in all_divergences(&mut Rng(5)) {
        let config = SparseKdConfig { divergence: div, ..fwd_bucket() };
        let out = run_sparse(&c, Dtype::F32, &z, &config, true).unwrap();
        let zr: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
        let target = Target::TopK {
            ids: vec![2, 0, 1],
            logprobs: c.logprobs.iter().map(|&x| f64::from(x)).collect(),
            tail: Tail::Bucket,
            teacher_temperature: 1.0,
        };
        let want = reference::loss(&zr, &target, div, 1.0);
        assert_close("K == V value", f64::from(out.values[0]), want, 1e-6, 1e-5);
        let fd = reference::grad_fd(&zr, &target, div, 1.0);
        for (&g, &want) in out.grad.iter().zip(&fd) {
            assert_close("K == V grad", f64::from(g), want, 1e-6, 1e-4);
        }
    }
    // K = 1 and a single-entry vocabulary.
    let c = TopKCase {
        n: 1,
        v: 1,
        k: 1,
        z: vec![3.0],
        ids: vec![0],
        logprobs: vec![0.0],
        valid: vec![true],
    };
    let out = run_sparse(&c, Dtype::F32, &c.z, &fwd_bucket(), true).unwrap();
    assert_eq!(out.values[0], 0.0);
    assert_eq!(out.grad[0], 0.0);
}

fn err_arg(r: Result<()>) -> String {
    match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn bad_sparse_arguments_name_the_argument() {
    let z = vec![0.0f32; 8];
    let ids = vec![1i64, 2, 3, 0];
    let lp = vec![-1.0f32; 4];
    let valid = vec![true, true];
    let call = |z: &[f32], ids: &[i64], lp: &[f32], k: usize, config: &SparseKdConfig| {
        let mut values = vec![0.0; 2];
        let mut grad = vec![0.0; z.len()];
        sparse_kd(
            Logits::F32(z),
            4,
            ids,
            lp,
            k,
            &valid,
            config,
            &mut values,
            Some(GradOut::F32(&mut grad)),
        )
    };
    let ok = fwd_bucket();
    assert!(call(&z, &ids, &lp, 2, &ok).is_ok());
    assert_eq!(err_arg(call(&z[..7], &ids, &lp, 2, &ok)), "student_logits");
    assert_eq!(err_arg(call(&z, &ids[..3], &lp, 2, &ok)), "ids");
    assert_eq!(err_arg(call(&z, &ids, &lp[..3], 2, &ok)), "logprobs");
    assert_eq!(err_arg(call(&z, &[], &[], 0, &ok)), "ids");
    assert_eq!(err_arg(call(&z, &[1, 4, 0, 1], &lp, 2, &ok)), "ids");
    assert_eq!(err_arg(call(&z, &[1, -1, 0, 1], &lp, 2, &ok)), "ids");
    assert_eq!(err_arg(call(&z, &[1, 2, 3, 3], &lp, 2, &ok)), "ids");
    assert_eq!(err_arg(call(&z, &ids, &[-1.0, f32::NAN, -1.0, -1.0], 2, &ok)), "logprobs");
    assert_eq!(err_arg(call(&z, &ids, &[-1.0, f32::INFINITY, -1.0, -1.0], 2, &ok)), "logprobs");
    // The student logits with one entry set to `v`.
    let with = |i: usize, v: f32| {
        let mut x = z.clone();
        x[i] = v;
        x
    };
    let nan_z = with(6, f32::NAN);
    assert_eq!(err_arg(call(&nan_z, &ids, &lp, 2, &ok)), "student_logits");
    assert_eq!(err_arg(call(&with(1, f32::INFINITY), &ids, &lp, 2, &ok)), "student_logits");
    let all_masked = vec![f32::NEG_INFINITY; 8];
    assert_eq!(err_arg(call(&all_masked, &ids, &lp, 2, &ok)), "student_logits");
    let renorm = SparseKdConfig { tail: Tail::Renormalize, ..ok };
    // renormalize reads the logits at the target ids only: a NaN or +inf there is refused,
    // one elsewhere (row 1's ids are 3 and 0; index 6 is its id 2) is not read.
    assert!(call(&nan_z, &ids, &lp, 2, &renorm).is_ok());
    assert_eq!(err_arg(call(&with(7, f32::NAN), &ids, &lp, 2, &renorm)), "student_logits");
    assert_eq!(err_arg(call(&with(4, f32::INFINITY), &ids, &lp, 2, &renorm)), "student_logits");
    assert_eq!(err_arg(call(&z, &ids, &[f32::NEG_INFINITY; 4], 2, &renorm)), "logprobs");
    let hot = SparseKdConfig { temperature: 2.0, ..ok };
    assert_eq!(err_arg(call(&z, &ids, &lp, 2, &hot)), "temperature");
    for bad_t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let c = SparseKdConfig { temperature: bad_t, teacher_temperature: bad_t, ..renorm };
        assert_eq!(err_arg(call(&z, &ids, &lp, 2, &c)), "temperature");
        let c = SparseKdConfig { teacher_temperature: bad_t, ..renorm };
        assert_eq!(err_arg(call(&z, &ids, &lp, 2, &c)), "teacher_temperature");
    }
    // The grad buffer must match the student logits.
    let mut values = vec![0.0; 2];
    let mut short = vec![0.0f32; 7];
    let r = sparse_kd(
        Logits::F32(&z),
        4,
        &ids,
        &lp,
        2,
        &valid,
        &ok,
        &mut values,
        Some(GradOut::F32(&mut short)),
    );
    assert_eq!(err_arg(r), "grad");
    let mut wrong = vec![0u16; 8];
    let r = sparse_kd(
        Logits::F32(&z),
        4,
        &ids,
        &lp,
        2,
        &valid,
        &ok,
        &mut values,
        Some(GradOut::Bf16(&mut wrong)),
    );
    assert_eq!(err_arg(r), "grad");
    // The lowest bad row is reported, whatever the thread count.
    let two_bad = [1i64, 9, 1, 9];
    match call(&z, &two_bad, &lp, 2, &ok) {
        Err(Error::InvalidArgument { msg, .. }) => assert!(msg.starts_with("row 0"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_names_and_parameters() {
    assert_eq!(err_arg(Divergence::parse("kl", 0.5, 0.1).map(|_| ())), "divergence");
    assert_eq!(err_arg(Tail::parse("drop").map(|_| ())), "tail");
    for bad in [0.0, 1.0, -0.5, f64::NAN] {
        assert_eq!(err_arg(Divergence::parse("jsd", bad, 0.1).map(|_| ())), "beta");
        assert_eq!(err_arg(Divergence::parse("skew_forward_kl", 0.5, bad).map(|_| ())), "alpha");
        assert_eq!(err_arg(Divergence::parse("skew_reverse_kl", 0.5, bad).map(|_| ())), "alpha");
        // Parameters of other divergences are not read.
        assert!(Divergence::parse("forward_kl", bad, bad).is_ok());
    }
}

#[test]
fn bad_sampled_arguments_name_the_argument() {
    let z = vec![0.0f32; 8];
    let valid = vec![true, true];
    let call = |ids: &[i64], counts: &[i64], lp: Option<&[f32]>, t: f64, tc: f64| {
        let mut values = vec![0.0; 2];
        let mut grad = vec![0.0; 8];
        sampled_kd(
            Logits::F32(&z),
            4,
            ids,
            counts,
            lp,
            2,
            &valid,
            t,
            tc,
            &mut values,
            Some(GradOut::F32(&mut grad)),
        )
    };
    let ids = [0i64, -1, 2, 3];
    let counts = [3i64, 0, 1, 1];
    assert!(call(&ids, &counts, None, 1.0, 1.0).is_ok());
    assert!(call(&ids, &counts, Some(&[-1.0, f32::NAN, -2.0, -3.0]), 1.0, 1.0).is_ok());
    assert_eq!(err_arg(call(&ids, &counts, None, 2.0, 1.0)), "temperature");
    assert_eq!(err_arg(call(&ids[..3], &counts, None, 1.0, 1.0)), "ids");
    assert_eq!(err_arg(call(&ids, &counts[..3], None, 1.0, 1.0)), "counts");
    assert_eq!(err_arg(call(&ids, &[3, 0, 0, 0], None, 1.0, 1.0)), "counts");
    assert_eq!(err_arg(call(&ids, &[3, -1, 1, 1], None, 1.0, 1.0)), "counts");
    assert_eq!(err_arg(call(&[0, -1, 4, 3], &counts, None, 1.0, 1.0)), "ids");
    assert_eq!(err_arg(call(&[0, -1, 3, 3], &counts, None, 1.0, 1.0)), "ids");
    assert_eq!(err_arg(call(&ids, &counts, Some(&[-1.0; 3]), 1.0, 1.0)), "logprobs");
    let neg_inf = [f32::NEG_INFINITY, -1.0, -1.0, -1.0];
    assert_eq!(err_arg(call(&ids, &counts, Some(&neg_inf), 1.0, 1.0)), "logprobs");
}

#[test]
fn bad_dense_arguments_name_the_argument() {
    let z = vec![0.0f32; 8];
    let valid = vec![true, true];
    let call = |t: &[f32], tv: usize| {
        let mut values = vec![0.0; 2];
        let mut grad = vec![0.0; 8];
        let config = DenseKdConfig { divergence: Divergence::ReverseKl, temperature: 1.0 };
        dense_kd(
            Logits::F32(&z),
            4,
            Logits::F32(t),
            tv,
            &valid,
            &config,
            &mut values,
            Some(GradOut::F32(&mut grad)),
        )
    };
    assert!(call(&[0.0; 6], 3).is_ok());
    assert_eq!(err_arg(call(&[0.0; 10], 5)), "teacher_logits");
    assert_eq!(err_arg(call(&[0.0; 5], 3)), "teacher_logits");
    assert_eq!(err_arg(call(&[], 0)), "teacher_logits");
    assert_eq!(err_arg(call(&[0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0], 3)), "teacher_logits");
    assert_eq!(err_arg(call(&[f32::NEG_INFINITY; 6], 3)), "teacher_logits");
}

/// Error of `got` in units in the last place of the f32 nearest to `want`.
fn ulp_error(got: f32, want: f64) -> f64 {
    let w = (want as f32).abs();
    let ulp = f64::from(f32::from_bits(w.to_bits() + 1)) - f64::from(w);
    (f64::from(got) - want).abs() / ulp
}

/// Max ulp and relative error of `f` against `g` on every `stride`-th f32 whose magnitude
/// lies in `[lo, hi]` (negated when `negative`).
#[allow(clippy::too_many_arguments)]
fn sweep<S: Simd>(
    s: S,
    stride: u32,
    lo: f32,
    hi: f32,
    negative: bool,
    f: impl Fn(S::F) -> S::F,
    g: impl Fn(f64) -> f64,
) -> (f64, f64) {
    let (mut max_ulp, mut max_rel) = (0.0f64, 0.0f64);
    let mut bits = lo.to_bits();
    while bits <= hi.to_bits() {
        let mut batch = [0.0f32; LANES];
        for (i, b) in batch.iter_mut().enumerate() {
            let x = f32::from_bits((bits + stride * i as u32).min(hi.to_bits()));
            *b = if negative { -x } else { x };
        }
        bits += stride * LANES as u32;
        let mut out = [0.0f32; LANES];
        s.store(f(s.load(&batch)), &mut out);
        for i in 0..LANES {
            let want = g(f64::from(batch[i]));
            max_ulp = max_ulp.max(ulp_error(out[i], want));
            max_rel = max_rel.max(((f64::from(out[i]) - want) / want).abs());
        }
    }
    (max_ulp, max_rel)
}

fn measure_exp_ln<S: Simd>(s: S, name: &str) {
    let exp_f = |v| simd::exp_le_max(s, v);
    let ln_f = |v| simd::ln(s, v);
    let (eu1, er1) = sweep(s, 127, 1e-30, 86.0, true, exp_f, f64::exp);
    let (eu2, er2) = sweep(s, 127, 1e-30, 88.7, false, exp_f, f64::exp);
    let (lu, lr) = sweep(s, 509, f32::MIN_POSITIVE, f32::MAX, false, ln_f, f64::ln);
    let (lsu, _) = sweep(s, 509, 1e-45, f32::MIN_POSITIVE, false, ln_f, f64::ln);
    let (eu, er) = (eu1.max(eu2), er1.max(er2));
    println!(
        "{name}: exp max {eu:.2} ulp (relative {er:.2e}) on [-86, 88.7]; ln max {lu:.2} ulp \
         (relative {lr:.2e}) on normal inputs, {lsu:.2} ulp on subnormal ones"
    );
    assert!(eu <= 2.0, "{name} exp error {eu} ulp");
    assert!(lu <= 2.0 && lsu <= 2.0, "{name} ln error {lu} / {lsu} ulp");

    let mut out = [0.0f32; LANES];
    let special = [f32::NEG_INFINITY, -100.0, 0.0, -87.0, f32::NAN, -86.98, -0.0, 88.7];
    s.store(simd::exp_le_max(s, s.load(&special)), &mut out);
    assert_eq!(out[..4], [0.0, 0.0, 1.0, 0.0]);
    assert!(out[4].is_nan());
    assert_close("exp(-86.98)", f64::from(out[5]), f64::from(-86.98f32).exp(), 0.0, 1e-6);
    assert_eq!(out[6], 1.0);
    assert_close("exp(88.7)", f64::from(out[7]), f64::from(88.7f32).exp(), 0.0, 1e-6);
    let special = [0.0, -1.0, f32::INFINITY, f32::NAN, 1.0, -0.0, 1e-45, f32::MAX];
    s.store(simd::ln(s, s.load(&special)), &mut out);
    assert_eq!(out[0], f32::NEG_INFINITY);
    assert!(out[1].is_nan());
    assert_eq!(out[2], f32::INFINITY);
    assert!(out[3].is_nan());
    assert_eq!(out[4..6], [0.0, f32::NEG_INFINITY]);
    assert_close("ln(1e-45)", f64::from(out[6]), f64::from(1e-45f32).ln(), 0.0, 1e-6);
    assert_close("ln(max)", f64::from(out[7]), f64::from(f32::MAX).ln(), 0.0, 1e-6);
}

/// exp and ln against f64, for both implementations (every 127th f32 for exp, ~15M inputs; every 509th for ln, ~4M).
/// Run with `--nocapture` to see the measured errors.
#[test]
fn exp_ln_accuracy() {
    measure_exp_ln(simd::Portable, "portable");
    if let Some(avx) = simd::detected_avx2() {
        measure_exp_ln(avx, "avx2+fma");
    }
}

#[test]
fn bf16_round_trip() {
    for (x, want) in [
        (1.0f32, 0x3F80u16),
        (1.0 + 1.0 / 256.0, 0x3F80), // halfway, ties to even (down)
        (1.0 + 3.0 / 256.0, 0x3F82), // halfway, ties to even (up)
        (-2.5, 0xC020),
        (f32::NEG_INFINITY, 0xFF80),
    ] {
        assert_eq!(simd::bf16_bits(x), want, "{x}");
        let mut out = [0u16; LANES];
        simd::Portable.store_bf16(simd::Portable.splat(x), &mut out);
        assert_eq!(out[0], want);
        if let Some(avx) = simd::detected_avx2() {
            avx.store_bf16(avx.splat(x), &mut out);
            assert!(out.iter().all(|&b| b == want), "avx2 {x}");
            let back = avx.load_bf16(&[want; LANES]);
            let mut f = [0.0f32; LANES];
            avx.store(back, &mut f);
            assert_eq!(f[3].to_bits(), u32::from(want) << 16);
        }
    }
}

#[test]
fn scale_rows_matches_scalar_products() {
    let mut rng = Rng(21);
    let (n, v) = (5, 37);
    let x: Vec<f32> = (0..n * v).map(|_| rng.range(-3.0, 3.0) as f32).collect();
    let factors = [0.5f32, 1.0, -2.25, 0.0, 1e-3];
    let mut g = x.clone();
    scale_rows(GradOut::F32(&mut g), v, &factors).unwrap();
    for (i, (&got, &orig)) in g.iter().zip(&x).enumerate() {
        assert_eq!(got, orig * factors[i / v]);
    }
    let mut b = bits(&x);
    scale_rows(GradOut::Bf16(&mut b), v, &factors).unwrap();
    let orig = bits(&x);
    for (i, (&got, &o)) in b.iter().zip(&orig).enumerate() {
        let want = simd::bf16_bits(f32::from_bits(u32::from(o) << 16) * factors[i / v]);
        assert_eq!(got, want, "entry {i}");
    }
    let mut short = vec![0.0f32; n * v - 1];
    assert_eq!(err_arg(scale_rows(GradOut::F32(&mut short), v, &factors)), "grad");
    assert_eq!(err_arg(scale_rows(GradOut::F32(&mut g), 0, &factors)), "grad");
}
