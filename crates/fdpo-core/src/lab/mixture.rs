//! Mixtures of policies on a finite response set, the exact lab's side of
//! the essay's "several strong models combined" (Wang et al. leave it out):
//!
//! - the arithmetic mixture Σᵢ wᵢπᵢ: sampling from a randomly chosen model,
//!   or (for one-token responses) an ensemble at decode time;
//! - the geometric mixture ∝ Πᵢ πᵢ^{wᵢ}, computed from log-probabilities
//!   (a product of experts).
//!
//! Weights are normalised to sum 1; both return a distribution.

/// Σᵢ wᵢπᵢ over responses; `policies[i][y]` are probabilities.
///
/// ```
/// let mix = fdpo_core::lab::mixture::arithmetic(&[&[1.0, 0.0], &[0.5, 0.5]], &[1.0, 3.0]);
/// assert_eq!(mix, vec![0.625, 0.375]);
/// ```
pub fn arithmetic(policies: &[&[f64]], weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    (0..policies[0].len())
        .map(|y| policies.iter().zip(weights).map(|(p, w)| w / total * p[y]).sum())
        .collect()
}

/// ∝ Πᵢ πᵢ(y)^{wᵢ} over responses, from log-probabilities (−∞ allowed:
/// a response any model excludes is excluded). Computed in logs with the
/// largest term factored out, so it does not underflow.
///
/// ```
/// let half = 0.5f64.ln();
/// let mix = fdpo_core::lab::mixture::geometric(&[&[0.0, f64::NEG_INFINITY], &[half, half]], &[0.5, 0.5]);
/// assert_eq!(mix, vec![1.0, 0.0]);
/// ```
pub fn geometric(log_policies: &[&[f64]], weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    let logs: Vec<f64> = (0..log_policies[0].len())
        .map(|y| {
            log_policies
                .iter()
                .zip(weights)
                .map(|(l, w)| if *w == 0.0 { 0.0 } else { w / total * l[y] })
                .sum()
        })
        .collect();
    let max = logs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let unnormalised: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
    let z: f64 = unnormalised.iter().sum();
    unnormalised.iter().map(|u| u / z).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{solve_prompt, Divergence};

    /// Under reverse KL π*_β ∝ π_ref·exp(r/β), so the geometric mixture of
    /// π*_{β₁} and π*_{β₂} with weights w, 1 − w is π*_{β'} with
    /// 1/β' = w/β₁ + (1 − w)/β₂: a closed form the solver gives directly.
    /// The arithmetic mixture of two optima keeps more entropy than the
    /// mean of theirs (entropy is concave) and sums to 1.
    #[test]
    fn geometric_mixture_of_reverse_kl_optima_is_an_optimum() {
        let ref_logprobs = vec![-0.3f64, -1.9, -2.5, -4.0, -1.2];
        let rewards = [0.2, 1.5, -0.7, 2.4, 0.9];
        let solve = |beta: f64| solve_prompt(Divergence::ReverseKl, beta, &ref_logprobs, &rewards).unwrap();
        let (a, b) = (solve(0.3), solve(2.0));
        let w = 0.4;
        let mix = geometric(&[&a.log_policy, &b.log_policy], &[w, 1.0 - w]);
        let want = solve(1.0 / (w / 0.3 + (1.0 - w) / 2.0));
        for (m, p) in mix.iter().zip(&want.policy) {
            assert!((m - p).abs() < 1e-12, "{mix:?} vs {:?}", want.policy);
        }
        let arith = arithmetic(&[&a.policy, &b.policy], &[w, 1.0 - w]);
        assert!((arith.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let entropy = |p: &[f64]| -p.iter().filter(|x| **x > 0.0).map(|x| x * x.ln()).sum::<f64>();
        assert!(entropy(&arith) > w * a.entropy + (1.0 - w) * b.entropy);
        // Brute force: each response's mixture probability by enumeration of the models.
        for ((m, pa), pb) in arith.iter().zip(&a.policy).zip(&b.policy) {
            assert!((m - (w * pa + (1.0 - w) * pb)).abs() < 1e-15);
        }
    }
}
