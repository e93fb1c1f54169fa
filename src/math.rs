//! Elementary functions in `f32` written so that loops over slices vectorize:
//! no calls into libm (except `fmaf` for [`exp`]'s fused multiply-adds on an
//! x86-64 without FMA, where [`simd`] cannot use the instruction), no branches
//! the compiler cannot turn into selects.
//! libm's `expf` costs 20-50 ns a call on our machines and dominated softmax,
//! sigmoid and the vocabulary-wide cross-entropy; [`exp`] is within 2 ulp of the
//! correctly rounded result over the whole `f32` range (tested against `f64`).

/// Run `f` compiled for the widest vector unit this CPU offers: on x86-64 with
/// AVX-512 (F, BW, CD, DQ, VL) or else AVX2 and FMA (checked once at run time,
/// through pulp's dispatch), `f` is inlined into a function built for them, so
/// its loops use 16- or 8-lane registers; elsewhere `f` runs as built. The
/// compiler never reorders floating-point operations or fuses a multiply and
/// an add on its own, so results are the same bits either way. Measured on
/// Zen 4 (`exp` over 1 Mi values): 0.30 ns a value with AVX-512 against 0.58-0.70
/// with AVX2.
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(v4) = pulp::x86::V4::try_new() {
            return v4.vectorize(f);
        }
        if let Some(v3) = pulp::x86::V3::try_new() {
            return v3.vectorize(f);
        }
    }
    f()
}

/// [`simd`] at most 256 bits wide (AVX2 and FMA): for loops dominated by
/// square roots and divisions, which 512-bit registers do not speed up.
/// Measured on Zen 4 (the AdamW update, in cache): 0.51 ns a value with AVX2
/// against 1.10 with AVX-512.
#[inline(always)]
pub fn simd256<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        return v3.vectorize(f);
    }
    f()
}

/// Run `f` on a worker thread of rayon's global pool, the calling thread
/// waiting for it (directly, when the caller is a worker already). A parallel
/// loop started from outside the pool is handed over to a worker and its end
/// handed back, which costs tens of microseconds per loop (measured in
/// `docs/performance.md`); inside `f`, loops start on the worker's own queue. The training step makes
/// about a hundred such loops per layer, so code that starts several wraps
/// them in one `on_pool`.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() || rayon::current_num_threads() == 1 {
        return f();
    }
    rayon::scope(|_| f())
}

/// Whether this CPU has AVX-512F (std caches the answer). faer runs its 512-bit
/// GEMM kernels exactly then.
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The widest vector unit faer's GEMM kernels use on this CPU, for benchmark
/// reports: `"AVX-512"`, `"AVX2+FMA"`, or `"baseline"`.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            return "AVX-512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "AVX2+FMA";
        }
    }
    "baseline"
}

/// `e^x` for `f32`, within 2 ulp; `+inf` above 88.72, `0` below -103.97 (gradual
/// underflow in between), NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n * LN2_HI` is exact for |n| <= 2^8.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to the nearest integer (ties to even) and leaves
    // it in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let xc = x.clamp(-104.0, 89.0);
    // Fused multiply-adds (one rounding each; exact on every target: an FMA
    // instruction in [`simd`]'s code and on aarch64, libm's `fmaf` elsewhere)
    // halve the instructions of the dependent chain below.
    let t = xc.mul_add(LOG2E, SHIFTER);
    let n = t - SHIFTER;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc)); // |r| <= ln2 / 2
    // Taylor series of e^r to degree 7: truncation error < 1e-8 relative on |r| <= 0.347.
    let p = r
        .mul_add(1.0 / 5040.0, 1.0 / 720.0)
        .mul_add(r, 1.0 / 120.0)
        .mul_add(r, 1.0 / 24.0)
        .mul_add(r, 1.0 / 6.0)
        .mul_add(r, 0.5)
        .mul_add(r, 1.0)
        .mul_add(r, 1.0);
    // 2^n in two factors so that neither over- nor underflows for n in [-150, 129].
    let ni = (t.to_bits() as i32) - 0x4B40_0000;
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let y = p * s1 * s2;
    if x > 88.722_84 {
        f32::INFINITY
    } else if x < -103.972_08 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Sum of `x` in eight interleaved `f32` lanes (vectorizes; the order is fixed,
/// so the result is deterministic).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Sum of `x` accumulated in `f64`, in four interleaved lanes.
#[inline(always)]
pub fn sum_f64(x: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f64::from(v);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Sum of the `f32` products `a[i] * b[i]` accumulated in `f64`, in the lanes
/// of [`sum_f64`] (the sum a `reduce_sum` of `mul(a, b)` computes).
#[inline(always)]
pub fn sum_products_f64(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f64::from(x * y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *l += f64::from(x * y);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Sum of squares of `x` accumulated in `f64`, in four interleaved lanes.
#[inline(always)]
pub fn sum_squares_f64(x: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f64::from(v) * f64::from(v);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// `x[i] = e^(x[i] - shift)` in place; returns the sum of the results in the
/// lane order of [`sum`] (one pass instead of two).
#[inline(always)]
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c.iter_mut()) {
            *v = exp(*v - shift);
            *l += *v;
        }
    }
    let mut tail = 0.0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        tail += *v;
    }
    lanes.iter().sum::<f32>() + tail
}

/// Largest element of `x` as `f32::max` folds it (NaNs ignored), `-inf` if empty.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_shifted_sum_matches_exp_then_sum() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.71).sin() * 9.0).collect();
        let mut y = x.clone();
        let s = exp_shifted_sum(&mut y, 2.5);
        let want: Vec<f32> = x.iter().map(|&v| exp(v - 2.5)).collect();
        assert_eq!(y, want);
        assert_eq!(s, sum(&want));
        let exact: f64 = x.iter().map(|&v| (f64::from(v) - 2.5).exp()).sum();
        assert!((f64::from(s) - exact).abs() < 1e-5 * exact);
    }

    /// Distance in units in the last place between `got` and the f64 `want`.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if w == 0.0 || w.is_infinite() {
            return if got == w { 0.0 } else { f64::INFINITY };
        }
        let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
        ((got as f64) - want).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64_over_the_normal_range() {
        let mut worst = (0.0f64, 0.0f32);
        let mut x = -87.0f32;
        while x < 88.7 {
            let e = ulps(exp(x), (x as f64).exp());
            if e > worst.0 {
                worst = (e, x);
            }
            x += 0.000_37;
        }
        assert!(worst.0 <= 2.0, "worst {} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn exp_handles_the_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(1.0), std::f32::consts::E);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        // Largest finite result and gradual underflow agree with f64 closely.
        let big = 88.72f32;
        assert!(ulps(exp(big), (big as f64).exp()) <= 2.0);
        for x in [-88.0f32, -95.5, -100.0, -103.0] {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            // Subnormal results carry fewer bits: compare absolutely.
            assert!(
                (got - want).abs() <= 2.0 * 1.4e-45 + want * 1e-6,
                "{x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn sigmoid_matches_f64() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!(ulps(sigmoid(x), want) <= 3.0, "x = {x}");
        }
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
    }

    #[test]
    fn lane_reductions_match_sequential_ones() {
        let x: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 101) as f32 * 0.25 - 12.0)
            .collect();
        let exact: f64 = x.iter().map(|&v| v as f64).sum();
        // Quarter-integers below 2^20 add exactly in f32 and f64.
        assert_eq!(sum(&x) as f64, exact);
        assert_eq!(sum_f64(&x), exact);
        assert_eq!(max(&x), x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)));
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[1.0, f32::NAN, 3.0]), 3.0);
        assert_eq!(sum(&[1.5]), 1.5);
    }
}
