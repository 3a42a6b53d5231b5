//! exp, sum and max over f32 slices in SIMD registers, for the fused
//! kernels' softmax, log-sum-exp, sigmoid and tanh. libm's `expf` is a call per element that
//! the compiler cannot vectorise (measured: 4–10% of a training step); this
//! one is branch-free, so a loop over a slice becomes vector code, and it is
//! compiled twice: for AVX2 + FMA (chosen at run time where the CPU has
//! them) and for the baseline target.
//!
//! Method (Cephes' `expf`): e^x = 2^n · e^r with n = round(x / ln 2) and
//! |r| ≤ ln 2 / 2, e^r by a degree-6 polynomial; relative error below
//! 2e-7 (a few ulp) on the whole range, checked against f64 in the tests.
//! Inputs below −87.3 give 0 (as `expf` underflows), above 88 saturate at
//! e^88; NaN stays NaN.

/// Partial results kept in separate lanes, so reductions vectorise (a
/// single running sum is a chain of dependent scalar adds).
const LANES: usize = 16;

/// Σ xs (summed in 16 lanes, then across them).
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// max xs (−∞ for none; NaNs are skipped, as by `f32::max`).
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// e^x for every element, in place.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { exp_avx2(xs) };
    }
    xs.iter_mut().for_each(|x| *x = exp::<false>(*x));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = exp::<true>(*x));
}

/// a·b + c, fused where the caller is compiled with FMA.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// e^x, branch-free.
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.336_55;
    let xc = x.clamp(-87.336_55, 88.0);
    let shifted = madd::<FMA>(xc, LOG2E, ROUND);
    let n = shifted - ROUND;
    // n as an integer from the bits (a cast `n as i32` saturates, which
    // the compiler cannot vectorise): the low mantissa bits of `shifted`.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = madd::<FMA>(n, -LN2_LO, madd::<FMA>(n, -LN2_HI, xc));
    let mut p = 1.987_569_1e-4;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let er = madd::<FMA>(p, r * r, r) + 1.0;
    let scale = f32::from_bits((n_int.wrapping_add(127) << 23) as u32);
    if underflow {
        0.0
    } else {
        er * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64's exp over the whole range, both compiled versions.
    #[test]
    fn exp_is_within_a_few_ulp_of_f64() {
        let xs: Vec<f32> = (0..200_001).map(|i| -87.0 + 175.0 * i as f32 / 200_000.0).collect();
        let check = |got: &[f32], what: &str| {
            for (x, y) in xs.iter().zip(got) {
                let want = (*x as f64).exp();
                let rel = ((*y as f64 - want) / want).abs();
                assert!(rel < 2e-7, "{what}: exp({x}) = {y}, want {want} (rel {rel:e})");
            }
        };
        let mut dispatched = xs.clone();
        exp_in_place(&mut dispatched);
        check(&dispatched, "dispatched");
        let portable: Vec<f32> = xs.iter().map(|&x| exp::<false>(x)).collect();
        check(&portable, "portable");
        let fused: Vec<f32> = xs.iter().map(|&x| exp::<true>(x)).collect();
        check(&fused, "mul_add");
    }

    #[test]
    fn sum_and_max_match_the_sequential_ones() {
        for n in [0, 1, 15, 16, 17, 100] {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 37 % 19) as f32 - 9.0) / 4.0).collect();
            let seq: f64 = xs.iter().map(|&x| x as f64).sum();
            assert!((sum(&xs) as f64 - seq).abs() < 1e-5, "sum of {n}");
            assert_eq!(max(&xs), xs.iter().copied().fold(f32::NEG_INFINITY, f32::max), "max of {n}");
        }
    }

    #[test]
    fn exp_edges() {
        let mut v = [0.0, -1e30, -100.0, f32::MIN / 2.0, f32::NAN, 1.0];
        exp_in_place(&mut v);
        assert_eq!(v[0], 1.0);
        assert_eq!(&v[1..4], &[0.0, 0.0, 0.0]);
        assert!(v[4].is_nan());
        assert!((v[5] - std::f32::consts::E).abs() < 1e-6);
    }
}
