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

fn validate(beta: f64, ref_logprobs: &[f64], rewards: &[f64]) -> Result<Vec<f64>, SolveError> {
    check_shapes(beta, ref_logprobs, rewards)?;
    Ok(normalise_ref_logprobs(ref_logprobs)?.0)
}

fn check_shapes(beta: f64, ref_logprobs: &[f64], rewards: &[f64]) -> Result<(), SolveError> {
    if !(beta.is_finite() && beta > 0.0) {
        return Err(SolveError::BadBeta(beta));
    }
    if ref_logprobs.len() != rewards.len() {
        return Err(SolveError::LengthMismatch { ref_len: ref_logprobs.len(), reward_len: rewards.len() });
    }
    if ref_logprobs.is_empty() {
        return Err(SolveError::Empty);
    }
    if let Some((index, &value)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(SolveError::BadReward { index, value });
    }
    Ok(())
}

/// The checked inputs of one prompt.
struct Prepared {
    /// π_ref(y), normalised (0 where it underflows f64).
    q: Vec<f64>,
    /// log of the total of the given reference values: log π_ref(y) is
    /// `ref_logprobs[y] - log_total`.
    log_total: f64,
    /// The best-rewarded response in the support, ties broken by larger π_ref.
    top: usize,
}

/// Checks β, the lengths, the rewards and the reference, normalises the
/// reference (one exponential per response) and finds the best response.
fn prepare(beta: f64, ref_logprobs: &[f64], rewards: &[f64]) -> Result<Prepared, SolveError> {
    check_shapes(beta, ref_logprobs, rewards)?;
    let mut max = f64::NEG_INFINITY;
    let mut top = None::<usize>;
    for (index, (&value, &r)) in ref_logprobs.iter().zip(rewards).enumerate() {
        if value.is_nan() || value == f64::INFINITY {
            return Err(SolveError::BadRefLogprob { index, value });
        }
        max = max.max(value);
        if value > f64::NEG_INFINITY {
            let better = match top {
                None => true,
                Some(t) => r > rewards[t] || (r == rewards[t] && value > ref_logprobs[t]),
            };
            if better {
                top = Some(index);
            }
        }
    }
    let top = top.ok_or(SolveError::NoSupport)?;
    let mut q = crate::memory::zeroed(ref_logprobs.len());
    let [sum] = chunked_sums(&mut q, |offset, chunk| {
        let mut sum = CompensatedSum::default();
        for (x, &l) in chunk.iter_mut().zip(&ref_logprobs[offset..]) {
            *x = exp_or_zero(l - max);
            sum.add(*x);
        }
        [sum.total()]
    });
    chunked_sums(&mut q, |_, chunk| {
        for x in chunk {
            *x /= sum;
        }
        []
    });
    Ok(Prepared { q, log_total: max + sum.ln(), top })
}

/// Responses per parallel work item; shorter inputs run on the calling thread.
const CHUNK: usize = 1 << 14;

/// Responses per inner block of a pass (buffers on the stack).
const BLOCK: usize = 256;

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

/// [`chunked_sums`] over two slices of equal length, chunked alike.
fn chunked_sums2<const N: usize>(
    a: &mut [f64],
    b: &mut [f64],
    f: impl Fn(usize, &mut [f64], &mut [f64]) -> [f64; N] + Sync + Send,
) -> [f64; N] {
    use rayon::prelude::*;
    if a.len() <= CHUNK {
        return f(0, a, b);
    }
    let parts: Vec<[f64; N]> = a
        .par_chunks_mut(CHUNK)
        .zip(b.par_chunks_mut(CHUNK))
        .enumerate()
        .map(|(c, (x, y))| f(c * CHUNK, x, y))
        .collect();
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
    let Prepared { q, log_total, top } = prepare(beta, ref_logprobs, rewards)?;
    let r_top = rewards[top];
    let inv_beta = 1.0 / beta;
    // d_i = (r_i − r_top)/β ≤ 0 on the support.
    let d = |i: usize| ((rewards[i] - r_top) * inv_beta).min(0.0);
    let log_q_top = ref_logprobs[top] - log_total;

    // `state` holds χPO's Halley iterates between evaluations.
    let mut state = crate::memory::zeroed(q.len());
    let chart = match divergence.f_prime_sup() {
        None if divergence == Divergence::ReverseKl => {
            // s = 1 − log Σ q_i e^{d_i} (all exponents ≤ 0).
            // `state` keeps e^{d_i} for the final pass.
            let [mass] = chunked_sums(&mut state, |offset, chunk| {
                let mut sum = CompensatedSum::default();
                for (j, st) in chunk.iter_mut().enumerate() {
                    let i = offset + j;
                    *st = exp_or_zero(d(i));
                    sum.add(q[i] * *st);
                }
                [sum.total()]
            });
            Chart::ReverseKl { s: 1.0 - mass.ln() }
        }
        None => {
            // χPO: v_i = s + d_i, increasing in s; s ∈ [f'(1), f'(1/π_top)].
            let lo = divergence.f_prime_of_log(0.0);
            let hi = divergence.f_prime_of_log(-log_q_top).max(lo);
            Chart::Solved { x: 0.0, lo, hi, increasing: true, sup: 0.0 }
        }
        Some(sup) => {
            // Gap chart: g_i = t − d_i, decreasing in t; t ∈ [gap(−log π_top), gap(0)].
            let gap_of = |l: f64| divergence.f_prime_gap_of_log(l).unwrap_or(f64::NAN);
            let lo = gap_of(-log_q_top).max(f64::MIN_POSITIVE);
            let hi = gap_of(0.0).max(lo);
            Chart::Solved { x: 0.0, lo, hi, increasing: false, sup }
        }
    };
    // (u, dℓ/dx, d²ℓ/dx²) of a response at offset d from the top, for the root finder.
    let ratio = |x: f64, di: f64, st: &mut f64, warm: bool| -> (f64, f64, f64) {
        match chart {
            Chart::Solved { increasing: true, .. } => {
                let (l, u) = Divergence::chi_po_ratio(x + di, warm.then_some(*st));
                *st = l;
                let inv = 1.0 / (1.0 + u);
                (u, inv, -u * inv * inv * inv)
            }
            _ => divergence.ratio_of_gap_with_slopes(x - di),
        }
    };
    let (chart, iterations) = match chart {
        Chart::Solved { lo, hi, increasing, sup, .. } => {
            let top_ratio = |x: f64| ratio(x, 0.0, &mut 0.0, false).0;
            // Coarse: the same root on responses binned by |d|; fine: from there.
            let (bin_mass, bin_offset) = coarse_bins(&q, d);
            let mut bin_state = vec![0.0; bin_mass.len()];
            let (start, coarse_iters) = find_root(
                &bin_mass,
                lo,
                hi,
                None,
                increasing,
                &mut bin_state,
                top_ratio,
                |x, b, st, warm| ratio(x, bin_offset[b], st, warm),
            );
            let (x, iters) =
                find_root(&q, lo, hi, Some(start), increasing, &mut state, top_ratio, |x, i, st, warm| {
                    ratio(x, d(i), st, warm)
                });
            let _ = coarse_iters;
            (Chart::Solved { x, lo, hi, increasing, sup }, iters)
        }
        rkl => (rkl, 0),
    };
    let lambda = match chart {
        Chart::ReverseKl { s } => r_top - beta * s,
        Chart::Solved { x, increasing: true, .. } => r_top - beta * x,
        Chart::Solved { x, sup, .. } => r_top - beta * (sup - x),
    };

    // Final pass at the root: ℓ_i and the unnormalised p̃_i = q_i·u_i, with
    // every sum taken on p̃ and corrected by the total T afterwards (the
    // divergence terms use p̃ directly: |T − 1| ≤ ~1e-14).
    // The buffer of q becomes the policy: each q_i is read before p_i is written.
    let mut policy = q;
    let mut log_policy = state;
    // Reverse KL: u_i = e^{d_i}·e^{s−1}, with e^{d_i} left in `state`.
    let rkl_factor = match chart {
        Chart::ReverseKl { s } => (s - 1.0).exp(),
        Chart::Solved { .. } => f64::NAN,
    };
    let sums = chunked_sums2(&mut policy, &mut log_policy, |offset, chunk, log_chunk| {
        let mut total = CompensatedSum::default();
        let (mut reward, mut entropy, mut div) = (0.0, 0.0, 0.0);
        let mut q_block = [0.0; BLOCK];
        for (b, (block, log_block)) in chunk.chunks_mut(BLOCK).zip(log_chunk.chunks_mut(BLOCK)).enumerate() {
            let start = offset + b * BLOCK;
            // First ℓ_i and p̃_i (libm calls), keeping q_i aside; then the sums.
            for (j, (p, lp)) in block.iter_mut().zip(log_block.iter_mut()).enumerate() {
                let i = start + j;
                let qi = *p;
                q_block[j] = qi;
                let lq = ref_logprobs[i] - log_total;
                if lq == f64::NEG_INFINITY {
                    (*p, *lp) = (0.0, f64::NEG_INFINITY);
                    continue;
                }
                // ℓ_i and u_i = e^{ℓ_i} at the root.
                let (l, u) = match chart {
                    Chart::ReverseKl { s } => (s + d(i) - 1.0, *lp * rkl_factor),
                    Chart::Solved { x, increasing: true, .. } => {
                        Divergence::chi_po_ratio(x + d(i), Some(*lp))
                    }
                    Chart::Solved { x, .. } => divergence.log_ratio_and_ratio_of_gap(x - d(i)),
                };
                *lp = lq + l;
                let qu = qi * u;
                *p = if qu.is_finite() && qi >= f64::MIN_POSITIVE { qu } else { exp_or_zero(*lp) };
            }
            let range = start..start + block.len();
            for ((((&p, &lp), &qi), &lr), &r) in block
                .iter()
                .zip(log_block.iter())
                .zip(&q_block)
                .zip(&ref_logprobs[range.clone()])
                .zip(&rewards[range])
            {
                total.add(p);
                if p > 0.0 {
                    reward += p * r;
                    entropy -= p * lp;
                }
                div += divergence.divergence_term_with(p, qi, lp, lr - log_total);
            }
        }
        [total.total(), reward, entropy, div]
    });
    let [total, reward, entropy, divergence_value] = sums;
    let log_t = total.ln();
    let reward = reward / total;
    let entropy = entropy / total + log_t;
    chunked_sums2(&mut policy, &mut log_policy, |_, chunk, log_chunk| {
        for (p, lp) in chunk.iter_mut().zip(log_chunk.iter_mut()) {
            *p /= total;
            *lp -= log_t;
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
        root_residual: (total - 1.0).abs(),
        iterations,
    })
}

/// How π* is parameterised for a divergence (see the module comment).
#[derive(Debug, Clone, Copy)]
enum Chart {
    /// Closed form: ℓ_i = s + d_i − 1.
    ReverseKl { s: f64 },
    /// Root x of Σ q u = 1 in [lo, hi]: χPO's s (`increasing`), or the gap
    /// t to `sup` f' (decreasing).
    Solved { x: f64, lo: f64, hi: f64, increasing: bool, sup: f64 },
}

/// Bins of |d| for the coarse solve: responses whose |d| agree to 8
/// mantissa bits (a factor 1 + 2⁻⁸) share a bin, represented by its π_ref
/// mass and q-weighted mean offset (so the binning error is second order);
/// |d| more than 2⁻⁶⁴ below the largest go to one bin with the top. At most
/// 2¹⁴ + 1 bins. Returns (mass, mean d) of the non-empty bins.
fn coarse_bins(q: &[f64], d: impl Fn(usize) -> f64 + Sync) -> (Vec<f64>, Vec<f64>) {
    const SHIFT: u32 = 44;
    const BINS: usize = 1 << 14;
    let largest = (0..q.len()).filter(|&i| q[i] > 0.0).map(|i| -d(i)).fold(0.0, f64::max);
    let key_max = largest.to_bits() >> SHIFT;
    let key_min = key_max.saturating_sub(BINS as u64 - 1);
    let fill = |range: std::ops::Range<usize>| {
        let mut mass = vec![0.0; BINS + 1];
        let mut moment = vec![0.0; BINS + 1];
        for i in range {
            if q[i] > 0.0 {
                // + 0.0 turns −0.0 (sign bit set) into +0.0.
                let a = -d(i) + 0.0;
                let key = a.to_bits() >> SHIFT;
                let b = if key < key_min { 0 } else { ((key - key_min) as usize + 1).min(BINS) };
                mass[b] += q[i];
                moment[b] += q[i] * a;
            }
        }
        (mass, moment)
    };
    let half = q.len() / 2;
    let ((mut mass, mut moment), (m2, o2)) = rayon::join(|| fill(0..half), || fill(half..q.len()));
    for b in 0..=BINS {
        mass[b] += m2[b];
        moment[b] += o2[b];
    }
    (0..=BINS).filter(|&b| mass[b] > 0.0).map(|b| (mass[b], -moment[b] / mass[b])).unzip()
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

/// Finds x ∈ [lo, hi] (0 < lo ≤ hi) with Σ_i q_i·u_i(x) = 1 (q = π_ref),
/// starting from `start` (default: the end where the top response has u = 1).
///
/// `kernel(x, i, state_i, warm)` returns (u_i, dℓ_i/dx, d²ℓ_i/dx²), monotone
/// in x (increasing when `increasing`), and may keep a per-response state in
/// `state_i` (χPO keeps its Halley iterate); `top_ratio(x)` is u of the
/// best response (d = 0), the largest of all ratios.
///
/// Works on F(τ) = log Σ q u as a function of τ = log x: safeguarded
/// Halley steps, bisection when a step leaves the bracket or stalls. Once
/// |F| < 1e-6 the last Halley step is taken without another evaluation (its
/// error is ~|F|³; the caller's final pass measures |Σπ − 1| and normalises).
#[allow(clippy::too_many_arguments)]
fn find_root<T, K>(
    q: &[f64],
    lo: f64,
    hi: f64,
    start: Option<f64>,
    increasing: bool,
    state: &mut [f64],
    top_ratio: T,
    kernel: K,
) -> (f64, usize)
where
    T: Fn(f64) -> f64,
    K: Fn(f64, usize, &mut f64, bool) -> (f64, f64, f64) + Sync + Send,
{
    let sign = if increasing { 1.0 } else { -1.0 };
    // G(τ) = sign·F(τ) is increasing; G(a) ≤ 0 ≤ G(b).
    let (mut a, mut b) = (lo.ln(), hi.ln());
    let eval = |tau: f64, warm: bool, state: &mut [f64]| -> (f64, f64, f64) {
        let x = tau.exp();
        // Every u_i ≤ u_top and q_i ≤ 1: scaling by 1/max(u_top, 1) keeps each term ≤ 1.
        let scale = 1.0 / top_ratio(x).max(1.0);
        let [s, s1, s2] = chunked_sums(state, |offset, chunk| {
            // Blocks: first the kernel (libm calls) into small buffers, then
            // the sums, so that no accumulator lives across a call.
            let (mut s, mut s1, mut s2) = (0.0, 0.0, 0.0);
            let mut w = [0.0; BLOCK];
            let mut l1 = [0.0; BLOCK];
            let mut l2 = [0.0; BLOCK];
            for (b, block) in chunk.chunks_mut(BLOCK).enumerate() {
                let start = offset + b * BLOCK;
                for (j, st) in block.iter_mut().enumerate() {
                    let (u, d1, d2) = kernel(x, start + j, st, warm);
                    (w[j], l1[j], l2[j]) = (u * scale, d1, d2);
                }
                for (((wj, d1), d2), qj) in w.iter().zip(&l1).zip(&l2).zip(&q[start..start + block.len()]) {
                    let term = qj * wj;
                    if term > 0.0 {
                        s += term;
                        s1 += term * d1;
                        s2 += term * (d1 * d1 + d2);
                    }
                }
            }
            [s, s1, s2]
        });
        // F = log S; with m1 = S'/S and m2 = S''/S (derivatives in x):
        // dF/dτ = x·m1, d²F/dτ² = x·m1 + x²·(m2 − m1²).
        let (m1, m2) = (s1 / s, s2 / s);
        let f = s.ln() - scale.ln();
        (sign * f, sign * x * m1, sign * (x * m1 + x * x * (m2 - m1 * m1)))
    };

    let mut tau = match start {
        Some(x) if x > 0.0 => x.ln().clamp(a, b),
        _ if increasing => a,
        _ => b,
    };
    let mut iterations = 0;
    let mut prev_g = f64::INFINITY;
    while iterations < 400 {
        let (g, g1, g2) = eval(tau, iterations > 0, state);
        iterations += 1;
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
        let halley = tau - 2.0 * g * g1 / (2.0 * g1 * g1 - g * g2);
        let stalled = g.is_nan() || g.abs() > 0.5 * prev_g;
        prev_g = g.abs();
        let in_bracket = halley.is_finite() && halley > a && halley < b;
        tau = if in_bracket && !stalled { halley } else { 0.5 * (a + b) };
        if in_bracket && !stalled && g.abs() < 1e-6 {
            break;
        }
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
