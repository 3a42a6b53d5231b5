//! The exact optimum of max_π E_π[r] − β·D_f(π‖π_ref) on a finite response set.
//!
//! KKT (shared/DESIGN.md §1): π*(y) = π_ref(y)·(f')⁻¹((r(y) − λ)/β) with λ
//! the unique root of Σ_y π*(y) = 1. The normaliser λ sits *inside* (f')⁻¹;
//! only reverse KL lets it out (π_ref·exp(r/β)/Z, done here by log-sum-exp).
//!
//! How the root is found, robustly for 1e6 responses, |r| ≤ 1e3,
//! β ∈ [1e-4, 1e3] and π_ref down to 1e-300:
//! - rewards enter only as d_i = (r_i − r_top)/β ≤ 0, with "top" the
//!   best-rewarded response in the support of π_ref;
//! - the unknown is a positive scalar x: for f' bounded above (forward KL,
//!   α, JS) the gap x = sup f' − (r_top − λ)/β, so that the i-th response
//!   sits at gap x − d_i and ℓ_i = log u_i never loses precision near the
//!   supremum; for χPO x = (r_top − λ)/β itself;
//! - x is bracketed in closed form: Σπ ≤ e^{ℓ_top} (all ratios are at most
//!   the top's), so ℓ_top = 0 gives Σπ ≤ 1, and π_top alone reaches 1 at
//!   ℓ_top = −log π_ref(top);
//! - safeguarded Newton on log Σπ as a function of log x, falling back to
//!   bisection; then one compensated pass normalises and measures.

use crate::{log_sum_exp, CompensatedSum, Divergence};

/// Why a prompt could not be solved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SolveError {
    /// β must be finite and positive.
    #[error("beta must be finite and > 0, got {0}")]
    BadBeta(f64),
    /// No responses.
    #[error("the response list is empty")]
    Empty,
    /// Lengths of the two inputs differ.
    #[error("{ref_len} reference values but {reward_len} rewards")]
    LengthMismatch {
        /// Number of reference log-probabilities.
        ref_len: usize,
        /// Number of rewards.
        reward_len: usize,
    },
    /// A reward that is NaN or infinite.
    #[error("response {index}: reward must be finite, got {value}")]
    BadReward {
        /// Index of the response.
        index: usize,
        /// The value.
        value: f64,
    },
    /// A reference log-probability that is NaN or +∞.
    #[error("response {index}: reference log-probability must be a number below +inf, got {value}")]
    BadRefLogprob {
        /// Index of the response.
        index: usize,
        /// The value.
        value: f64,
    },
    /// Every response has zero reference probability.
    #[error("every response has zero reference probability")]
    NoSupport,
}

/// The optimum for one prompt, and what it scores.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptSolution {
    /// π*(y), in the order of the input responses; sums to 1.
    pub policy: Vec<f64>,
    /// log π*(y) (−∞ where π_ref is 0), precise where `policy` underflows.
    pub log_policy: Vec<f64>,
    /// The Lagrange multiplier λ of Σπ = 1 (reward units).
    pub lambda: f64,
    /// E_π*[r].
    pub reward: f64,
    /// H(π*) in nats.
    pub entropy: f64,
    /// D_f(π*‖π_ref).
    pub divergence_value: f64,
    /// E_π*[r] − β·D_f(π*‖π_ref).
    pub objective: f64,
    /// |Σπ − 1| at the root, before the final normalising pass.
    pub root_residual: f64,
    /// Root-finder iterations (0 for the reverse-KL closed form).
    pub iterations: usize,
}

/// What a policy scores under a reward and a divergence (see [`evaluate_policy`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyValue {
    /// E_π[r].
    pub reward: f64,
    /// H(π) in nats.
    pub entropy: f64,
    /// D_f(π‖π_ref).
    pub divergence_value: f64,
    /// E_π[r] − β·D_f(π‖π_ref).
    pub objective: f64,
}

/// Checks the inputs and returns log π_ref normalised to sum to one, with
/// the log of the original total (0 when it was already normalised).
pub fn normalise_ref_logprobs(ref_logprobs: &[f64]) -> Result<(Vec<f64>, f64), SolveError> {
    if ref_logprobs.is_empty() {
        return Err(SolveError::Empty);
    }
    for (index, &value) in ref_logprobs.iter().enumerate() {
        if value.is_nan() || value == f64::INFINITY {
            return Err(SolveError::BadRefLogprob { index, value });
        }
    }
    let log_total = log_sum_exp(ref_logprobs);
    if log_total == f64::NEG_INFINITY {
        return Err(SolveError::NoSupport);
    }
    Ok((ref_logprobs.iter().map(|&l| l - log_total).collect(), log_total))
}

/// log π_ref normalised, and π_ref itself (0 where it underflows).
struct Reference {
    log_q: Vec<f64>,
    q: Vec<f64>,
}

fn validate(beta: f64, ref_logprobs: &[f64], rewards: &[f64]) -> Result<Vec<f64>, SolveError> {
    Ok(validate_reference(beta, ref_logprobs, rewards)?.log_q)
}

/// Checks β, the lengths, the rewards and the reference, and normalises the
/// reference with one exponential per response.
fn validate_reference(beta: f64, ref_logprobs: &[f64], rewards: &[f64]) -> Result<Reference, SolveError> {
    if !(beta.is_finite() && beta > 0.0) {
        return Err(SolveError::BadBeta(beta));
    }
    if ref_logprobs.len() != rewards.len() {
        return Err(SolveError::LengthMismatch { ref_len: ref_logprobs.len(), reward_len: rewards.len() });
    }
    if let Some((index, &value)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(SolveError::BadReward { index, value });
    }
    if ref_logprobs.is_empty() {
        return Err(SolveError::Empty);
    }
    let mut max = f64::NEG_INFINITY;
    for (index, &value) in ref_logprobs.iter().enumerate() {
        if value.is_nan() || value == f64::INFINITY {
            return Err(SolveError::BadRefLogprob { index, value });
        }
        max = max.max(value);
    }
    if max == f64::NEG_INFINITY {
        return Err(SolveError::NoSupport);
    }
    let mut q: Vec<f64> = ref_logprobs.to_vec();
    let [sum] = chunked_sums(&mut q, |_, chunk| {
        let mut sum = CompensatedSum::default();
        for x in chunk {
            *x = exp_or_zero(*x - max);
            sum.add(*x);
        }
        [sum.total()]
    });
    let log_total = max + sum.ln();
    let mut log_q = ref_logprobs.to_vec();
    chunked_sums(&mut log_q, |_, chunk| {
        for l in chunk {
            *l -= log_total;
        }
        []
    });
    chunked_sums(&mut q, |_, chunk| {
        for x in chunk {
            *x /= sum;
        }
        []
    });
    Ok(Reference { log_q, q })
}

/// Responses per parallel work item; shorter inputs run on the calling thread.
const CHUNK: usize = 1 << 14;

/// Runs `f(offset, chunk)` over consecutive chunks of `data` (in parallel
/// when there is more than one chunk) and adds up the N sums it returns,
/// with compensation across chunks.
fn chunked_sums<T: Send, const N: usize>(
    data: &mut [T],
    f: impl Fn(usize, &mut [T]) -> [f64; N] + Sync + Send,
) -> [f64; N] {
    use rayon::prelude::*;
    if data.len() <= CHUNK {
        return f(0, data);
    }
    let parts: Vec<[f64; N]> =
        data.par_chunks_mut(CHUNK).enumerate().map(|(c, chunk)| f(c * CHUNK, chunk)).collect();
    let mut out = [0.0; N];
    for (k, o) in out.iter_mut().enumerate() {
        *o = parts.iter().map(|p| p[k]).collect::<CompensatedSum>().total();
    }
    out
}

/// e^x, with the underflow to 0 taken without calling libm (whose
/// underflow path, setting errno, is several times slower).
#[inline]
fn exp_or_zero(x: f64) -> f64 {
    if x < -745.2 {
        0.0
    } else {
        x.exp()
    }
}

/// Solves one prompt: π* for `divergence` and `beta`, given log π_ref
/// (normalised here if it does not sum to one) and rewards, one per response.
///
/// ```
/// use fdpo_core::{solve_prompt, Divergence};
/// let ref_logprobs = [0.5f64.ln(), 0.5f64.ln()];
/// let sol = solve_prompt(Divergence::ReverseKl, 1.0, &ref_logprobs, &[1.0, 0.0]).unwrap();
/// // Reverse KL: π* ∝ π_ref·exp(r/β).
/// let e = 1f64.exp();
/// assert!((sol.policy[0] - e / (e + 1.0)).abs() < 1e-15);
/// ```
pub fn solve_prompt(
    divergence: Divergence,
    beta: f64,
    ref_logprobs: &[f64],
    rewards: &[f64],
) -> Result<PromptSolution, SolveError> {
    let Reference { log_q, q } = validate_reference(beta, ref_logprobs, rewards)?;
    // The best-rewarded response in the support, ties broken by larger π_ref.
    let top = (0..log_q.len())
        .filter(|&i| log_q[i] > f64::NEG_INFINITY)
        .max_by(|&a, &b| rewards[a].total_cmp(&rewards[b]).then(log_q[a].total_cmp(&log_q[b])))
        .ok_or(SolveError::NoSupport)?;
    let r_top = rewards[top];
    // d_i = (r_i − r_top)/β ≤ 0 on the support.
    let d = |i: usize| ((rewards[i] - r_top) / beta).min(0.0);

    // Per response: ℓ_i = log u_i at the root (up to the final normalisation).
    let mut log_ratio = vec![0.0; log_q.len()];
    let (lambda, iterations) = match divergence.f_prime_sup() {
        None if divergence == Divergence::ReverseKl => {
            // ℓ_i = s + d_i − 1 with s = 1 − log Σ q_i e^{d_i} (all exponents ≤ 0).
            let [mass] = chunked_sums(&mut log_ratio, |offset, chunk| {
                let mut sum = CompensatedSum::default();
                for (j, l) in chunk.iter_mut().enumerate() {
                    let i = offset + j;
                    *l = d(i);
                    sum.add(q[i] * exp_or_zero(*l));
                }
                [sum.total()]
            });
            let s = 1.0 - mass.ln();
            chunked_sums(&mut log_ratio, |_, chunk| {
                for l in chunk {
                    *l += s - 1.0;
                }
                []
            });
            (r_top - beta * s, 0)
        }
        None => {
            // χPO: v_i = s + d_i, increasing in s; s ∈ [f'(1), f'(1/π_top)].
            // ℓ_i is the Halley iterate, warm-started from the last evaluation.
            let lo = divergence.f_prime_of_log(0.0);
            let hi = divergence.f_prime_of_log(-log_q[top]).max(lo);
            let kernel = |s: f64, i: usize, l: &mut f64, warm: bool| {
                let v = s + d(i);
                let (li, u) = Divergence::chi_po_ratio(v, warm.then_some(*l));
                *l = li;
                (u, 1.0 / (1.0 + u))
            };
            let top_ratio = |s: f64| Divergence::chi_po_ratio(s, None).1;
            let (s, iters) = find_root(&q, lo, hi, true, &mut log_ratio, top_ratio, kernel);
            (r_top - beta * s, iters)
        }
        Some(sup) => {
            // Gap chart: g_i = t − d_i, decreasing in t; t ∈ [gap(−log π_top), gap(0)].
            let gap_of = |l: f64| divergence.f_prime_gap_of_log(l).unwrap_or(f64::NAN);
            let lo = gap_of(-log_q[top]).max(f64::MIN_POSITIVE);
            let hi = gap_of(0.0).max(lo);
            let kernel =
                |t: f64, i: usize, _: &mut f64, _: bool| divergence.ratio_of_gap_with_slope(t - d(i));
            let top_ratio = |t: f64| divergence.ratio_of_gap_with_slope(t).0;
            let (t, iters) = find_root(&q, lo, hi, false, &mut log_ratio, top_ratio, kernel);
            // ℓ_i at the root, in the precise log form.
            chunked_sums(&mut log_ratio, |offset, chunk| {
                for (j, l) in chunk.iter_mut().enumerate() {
                    *l = divergence.log_ratio_of_gap(t - d(offset + j));
                }
                []
            });
            (r_top - beta * (sup - t), iters)
        }
    };

    // Final passes: log p_i = log q_i + ℓ_i (unnormalised), its total, then
    // normalise and measure in one pass, then shift the logs.
    let mut policy = vec![0.0; log_q.len()];
    let mut log_policy = log_ratio;
    let [total] = chunked_sums(&mut log_policy, |offset, chunk| {
        let mut sum = CompensatedSum::default();
        for (j, l) in chunk.iter_mut().enumerate() {
            let lq = log_q[offset + j];
            *l = if lq == f64::NEG_INFINITY { f64::NEG_INFINITY } else { lq + *l };
            sum.add(exp_or_zero(*l));
        }
        [sum.total()]
    });
    let root_residual = (total - 1.0).abs();
    let log_total = total.ln();
    let [reward, entropy, divergence_value] = chunked_sums(&mut policy, |offset, chunk| {
        let (mut reward, mut entropy, mut div) =
            (CompensatedSum::default(), CompensatedSum::default(), CompensatedSum::default());
        for (j, p) in chunk.iter_mut().enumerate() {
            let i = offset + j;
            let lp = log_policy[i] - log_total;
            *p = exp_or_zero(lp);
            if *p > 0.0 {
                reward.add(*p * rewards[i]);
                entropy.add(-*p * lp);
            }
            div.add(divergence.divergence_term_with(*p, q[i], lp, log_q[i]));
        }
        [reward.total(), entropy.total(), div.total()]
    });
    chunked_sums(&mut log_policy, |_, chunk| {
        for l in chunk {
            *l -= log_total;
        }
        []
    });
    Ok(PromptSolution {
        policy,
        log_policy,
        lambda,
        reward,
        entropy: entropy.max(0.0),
        divergence_value,
        objective: reward - beta * divergence_value,
        root_residual,
        iterations,
    })
}

/// Scores an arbitrary policy, given as log-probabilities over the same
/// responses: E_π[r], H(π), D_f(π‖π_ref) and the objective. Both inputs are
/// normalised first.
///
/// ```
/// use fdpo_core::{evaluate_policy, Divergence};
/// let q = [0.5f64.ln(), 0.5f64.ln()];
/// let v = evaluate_policy(Divergence::ReverseKl, 1.0, &q, &[1.0, 0.0], &q).unwrap();
/// assert!((v.reward - 0.5).abs() < 1e-15 && v.divergence_value == 0.0);
/// ```
pub fn evaluate_policy(
    divergence: Divergence,
    beta: f64,
    ref_logprobs: &[f64],
    rewards: &[f64],
    log_policy: &[f64],
) -> Result<PolicyValue, SolveError> {
    let log_q = validate(beta, ref_logprobs, rewards)?;
    if log_policy.len() != log_q.len() {
        return Err(SolveError::LengthMismatch { ref_len: log_policy.len(), reward_len: rewards.len() });
    }
    let (log_p, _) = normalise_ref_logprobs(log_policy)?;
    let (mut reward, mut entropy, mut div) =
        (CompensatedSum::default(), CompensatedSum::default(), CompensatedSum::default());
    for ((&lp, &lq), &r) in log_p.iter().zip(&log_q).zip(rewards) {
        let p = lp.exp();
        if p > 0.0 {
            reward.add(p * r);
            entropy.add(-p * lp);
        }
        div.add(divergence.divergence_term(lp, lq));
    }
    let (reward, divergence_value) = (reward.total(), div.total());
    Ok(PolicyValue {
        reward,
        entropy: entropy.total().max(0.0),
        divergence_value,
        objective: reward - beta * divergence_value,
    })
}

/// Finds x ∈ [lo, hi] (0 < lo ≤ hi) with Σ_i q_i·u_i(x) = 1 (q = π_ref).
///
/// `kernel(x, i, state_i, warm)` returns (u_i, dℓ_i/dx), monotone in x
/// (increasing when `increasing`), and may keep a per-response state in
/// `state_i` (χPO keeps its Halley iterate); `top_ratio(x)` is u of the
/// best response (d = 0), the largest of all ratios.
///
/// Works on F(τ) = log Σ q u as a function of τ = log x: safeguarded
/// Newton, bisection when a step leaves the bracket or stalls.
fn find_root<T, K>(
    q: &[f64],
    lo: f64,
    hi: f64,
    increasing: bool,
    state: &mut [f64],
    top_ratio: T,
    kernel: K,
) -> (f64, usize)
where
    T: Fn(f64) -> f64,
    K: Fn(f64, usize, &mut f64, bool) -> (f64, f64) + Sync + Send,
{
    let sign = if increasing { 1.0 } else { -1.0 };
    // G(τ) = sign·F(τ) is increasing; G(a) ≤ 0 ≤ G(b).
    let (mut a, mut b) = (lo.ln(), hi.ln());
    let eval = |tau: f64, warm: bool, state: &mut [f64]| -> (f64, f64) {
        let x = tau.exp();
        // Every u_i ≤ u_top and q_i ≤ 1: scaling by 1/max(u_top, 1) keeps each term ≤ 1.
        let scale = 1.0 / top_ratio(x).max(1.0);
        let [s, ds] = chunked_sums(state, |offset, chunk| {
            let (mut s, mut ds) = (0.0, 0.0);
            for (j, st) in chunk.iter_mut().enumerate() {
                let i = offset + j;
                let (u, dl) = kernel(x, i, st, warm);
                let w = q[i] * (u * scale);
                if w > 0.0 {
                    s += w;
                    ds += w * dl;
                }
            }
            [s, ds]
        });
        // F = log Σ q u; dF/dτ = x · (Σ w ℓ') / Σ w.
        (sign * (s.ln() - scale.ln()), sign * x * ds / s)
    };

    // Start where ℓ_top = 0 (π = π_ref when all rewards tie).
    let mut tau = if increasing { a } else { b };
    let mut iterations = 0;
    let mut prev_g = f64::INFINITY;
    while iterations < 400 {
        let (g, dg) = eval(tau, iterations > 0, state);
        iterations += 1;
        // |log Σπ| ≤ 1e-14: the final pass rescales the rest away exactly.
        if g.abs() <= 1e-14 {
            break;
        }
        if g < 0.0 {
            a = tau;
        } else if g > 0.0 {
            b = tau;
        }
        if b - a <= 4.0 * f64::EPSILON * a.abs().max(b.abs()).max(1.0) {
            break;
        }
        let newton = tau - g / dg;
        let stalled = g.is_nan() || g.abs() > 0.5 * prev_g;
        prev_g = g.abs();
        tau = if newton.is_finite() && newton > a && newton < b && !stalled { newton } else { 0.5 * (a + b) };
    }
    (tau.exp(), iterations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn divergences() -> Vec<Divergence> {
        vec![
            Divergence::ReverseKl,
            Divergence::ForwardKl,
            Divergence::Alpha { alpha: 0.3 },
            Divergence::Alpha { alpha: 0.7 },
            Divergence::JensenShannon,
            Divergence::ChiPo,
        ]
    }

    fn random_prompt(rng: &mut ChaCha8Rng, m: usize) -> (Vec<f64>, Vec<f64>) {
        let logits: Vec<f64> = (0..m).map(|_| rng.random_range(-3.0..3.0)).collect();
        let (log_q, _) = normalise_ref_logprobs(&logits).unwrap();
        let rewards = (0..m).map(|_| rng.random_range(-1.0..1.0)).collect();
        (log_q, rewards)
    }

    /// KKT: β f'(u_i) + λ = r_i for every response in the support.
    fn kkt_residual(div: Divergence, beta: f64, log_q: &[f64], rewards: &[f64], sol: &PromptSolution) -> f64 {
        log_q
            .iter()
            .zip(rewards)
            .zip(&sol.log_policy)
            .map(|((lq, r), lp)| (beta * div.f_prime_of_log(lp - lq) + sol.lambda - r).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn reverse_kl_is_the_softmax_closed_form() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for &beta in &[0.05, 0.3, 2.0] {
            let (log_q, rewards) = random_prompt(&mut rng, 12);
            let sol = solve_prompt(Divergence::ReverseKl, beta, &log_q, &rewards).unwrap();
            let w: Vec<f64> = log_q.iter().zip(&rewards).map(|(lq, r)| (lq + r / beta).exp()).collect();
            let z: f64 = w.iter().sum();
            for (p, wi) in sol.policy.iter().zip(&w) {
                assert!((p - wi / z).abs() < 1e-14, "beta={beta}: {p} vs {}", wi / z);
            }
        }
    }

    #[test]
    fn policy_sums_to_one_and_satisfies_kkt() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for div in divergences() {
            for &beta in &[1e-3, 0.1, 1.0, 100.0] {
                let (log_q, rewards) = random_prompt(&mut rng, 50);
                let sol = solve_prompt(div, beta, &log_q, &rewards).unwrap();
                let sum: CompensatedSum = sol.policy.iter().copied().collect();
                assert!((sum.total() - 1.0).abs() < 1e-12, "{div} β={beta}: Σπ = {}", sum.total());
                assert!(sol.root_residual < 1e-12, "{div} β={beta}: residual {}", sol.root_residual);
                let kkt = kkt_residual(div, beta, &log_q, &rewards, &sol);
                assert!(kkt < 1e-9 * (1.0 + sol.lambda.abs()), "{div} β={beta}: KKT residual {kkt}");
            }
        }
    }

    /// π* beats thousands of random feasible perturbations of itself.
    #[test]
    fn optimum_beats_random_perturbations() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for div in divergences() {
            let beta = 0.4;
            let (log_q, rewards) = random_prompt(&mut rng, 8);
            let sol = solve_prompt(div, beta, &log_q, &rewards).unwrap();
            for k in 0..2000 {
                let scale = [1e-1, 1e-2, 1e-4][k % 3];
                let log_p: Vec<f64> =
                    sol.log_policy.iter().map(|l| l + scale * rng.random_range(-1.0..1.0)).collect();
                let v = evaluate_policy(div, beta, &log_q, &rewards, &log_p).unwrap();
                assert!(
                    v.objective <= sol.objective + 1e-13,
                    "{div}: perturbation {k} scores {} > {}",
                    v.objective,
                    sol.objective
                );
            }
        }
    }

    /// Mirror descent (exponentiated gradient) on the simplex, a generic
    /// optimiser that knows nothing of (f')⁻¹ or λ, reaches the same optimum.
    #[test]
    fn optimum_matches_mirror_descent() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for div in divergences() {
            let beta = 0.5;
            let (log_q, rewards) = random_prompt(&mut rng, 6);
            let sol = solve_prompt(div, beta, &log_q, &rewards).unwrap();
            let mut log_p = log_q.clone();
            for _ in 0..20000 {
                // ∂J/∂π_i = r_i − β f'(π_i/q_i).
                let grad: Vec<f64> =
                    (0..6).map(|i| rewards[i] - beta * div.f_prime_of_log(log_p[i] - log_q[i])).collect();
                for i in 0..6 {
                    log_p[i] += 0.05 * grad[i].clamp(-50.0, 50.0);
                }
                let (norm, _) = normalise_ref_logprobs(&log_p).unwrap();
                log_p = norm;
            }
            let md = evaluate_policy(div, beta, &log_q, &rewards, &log_p).unwrap();
            assert!(
                sol.objective >= md.objective - 1e-12,
                "{div}: mirror descent {} > exact {}",
                md.objective,
                sol.objective
            );
            assert!(
                sol.objective - md.objective < 1e-8,
                "{div}: mirror descent {} far from {}",
                md.objective,
                sol.objective
            );
            for (a, b) in sol.log_policy.iter().zip(&log_p) {
                assert!((a.exp() - b.exp()).abs() < 1e-5, "{div}: {} vs {}", a.exp(), b.exp());
            }
        }
    }

    #[test]
    fn alpha_tends_to_the_two_kls() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (log_q, rewards) = random_prompt(&mut rng, 20);
        let beta = 0.3;
        let close = |a: &PromptSolution, b: &PromptSolution| {
            a.policy.iter().zip(&b.policy).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
        };
        let rkl = solve_prompt(Divergence::ReverseKl, beta, &log_q, &rewards).unwrap();
        let fkl = solve_prompt(Divergence::ForwardKl, beta, &log_q, &rewards).unwrap();
        let near0 = solve_prompt(Divergence::Alpha { alpha: 1e-6 }, beta, &log_q, &rewards).unwrap();
        let near1 = solve_prompt(Divergence::Alpha { alpha: 1.0 - 1e-6 }, beta, &log_q, &rewards).unwrap();
        assert!(close(&near0, &rkl) < 1e-5, "alpha→0: {}", close(&near0, &rkl));
        assert!(close(&near1, &fkl) < 1e-5, "alpha→1: {}", close(&near1, &fkl));
        // And α in between is genuinely different from both.
        let mid = solve_prompt(Divergence::Alpha { alpha: 0.5 }, beta, &log_q, &rewards).unwrap();
        assert!(close(&mid, &rkl) > 1e-3 && close(&mid, &fkl) > 1e-3);
    }

    #[test]
    fn equal_rewards_give_the_reference() {
        let log_q = [0.1f64.ln(), 0.2f64.ln(), 0.7f64.ln()];
        for div in divergences() {
            let sol = solve_prompt(div, 0.1, &log_q, &[0.5, 0.5, 0.5]).unwrap();
            for (p, lq) in sol.policy.iter().zip(&log_q) {
                assert!((p - lq.exp()).abs() < 1e-14, "{div}");
            }
            assert!(sol.divergence_value < 1e-15, "{div}");
        }
    }

    /// The robustness envelope of the issue: extreme β, rewards, tiny π_ref.
    #[test]
    fn extreme_inputs_stay_finite_and_normalised() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let m = 2000;
        for div in divergences() {
            for &beta in &[1e-4, 1e-2, 1.0, 1e3] {
                let mut log_q: Vec<f64> = (0..m).map(|_| rng.random_range(-690.0..0.0)).collect();
                // The best response is the rarest one.
                log_q[0] = 1e-300f64.ln();
                let mut rewards: Vec<f64> = (0..m).map(|_| rng.random_range(-1e3..1e3)).collect();
                rewards[0] = 1e3;
                let sol = solve_prompt(div, beta, &log_q, &rewards).unwrap();
                let sum: CompensatedSum = sol.policy.iter().copied().collect();
                assert!((sum.total() - 1.0).abs() < 1e-12, "{div} β={beta}: Σπ − 1 = {}", sum.total() - 1.0);
                for x in [sol.lambda, sol.reward, sol.entropy, sol.divergence_value, sol.objective] {
                    assert!(x.is_finite(), "{div} β={beta}: {sol:?}");
                }
                assert!(sol.policy.iter().all(|p| p.is_finite() && *p >= 0.0));
            }
        }
    }

    #[test]
    fn zero_reference_mass_gets_zero_policy_mass() {
        let log_q = [f64::NEG_INFINITY, 0.5f64.ln(), 0.5f64.ln()];
        for div in divergences() {
            let sol = solve_prompt(div, 0.1, &log_q, &[10.0, 0.0, 1.0]).unwrap();
            assert_eq!(sol.policy[0], 0.0, "{div}");
            assert!((sol.policy[1] + sol.policy[2] - 1.0).abs() < 1e-14);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let q = [0.0];
        assert_eq!(solve_prompt(Divergence::ReverseKl, 0.0, &q, &[1.0]), Err(SolveError::BadBeta(0.0)));
        assert_eq!(solve_prompt(Divergence::ReverseKl, 1.0, &[], &[]), Err(SolveError::Empty));
        assert!(matches!(
            solve_prompt(Divergence::ChiPo, 1.0, &q, &[f64::NAN]),
            Err(SolveError::BadReward { index: 0, .. })
        ));
        assert!(matches!(
            solve_prompt(Divergence::ChiPo, 1.0, &[f64::NAN], &[0.0]),
            Err(SolveError::BadRefLogprob { index: 0, .. })
        ));
        assert_eq!(
            solve_prompt(Divergence::ChiPo, 1.0, &[f64::NEG_INFINITY], &[0.0]),
            Err(SolveError::NoSupport)
        );
        assert!(matches!(
            solve_prompt(Divergence::ChiPo, 1.0, &q, &[0.0, 1.0]),
            Err(SolveError::LengthMismatch { .. })
        ));
    }
}
