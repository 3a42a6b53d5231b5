//! The exact optimum of max_π E_π[r] − β·D_f(π‖π_ref) on a finite response set.
//!
//! KKT (docs/DESIGN.md §1): π*(y) = π_ref(y)·(f')⁻¹((r(y) − λ)/β) with λ
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

use crate::divergence::exp_or_zero;
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
    /// A policy to evaluate with another number of responses than the reference.
    #[error("the policy has {found} entries for {expected} responses")]
    PolicyLength {
        /// Responses of the prompt.
        expected: usize,
        /// Entries of the policy.
        found: usize,
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
    /// Root-finder evaluations over all responses, after the coarse solve on
    /// binned responses (0 for the reverse-KL closed form).
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
    // One parallel pass: the first bad value, the maximum, and the best
    // response of the support (larger reward, then larger π_ref, then the
    // earlier index).
    use rayon::prelude::*;
    let better = |a: Option<usize>, b: Option<usize>| match (a, b) {
        (None, x) | (x, None) => x,
        (Some(i), Some(j)) => {
            let key = |k: usize| (rewards[k], ref_logprobs[k]);
            if key(j) > key(i) || (key(j) == key(i) && j < i) {
                Some(j)
            } else {
                Some(i)
            }
        }
    };
    let scan = |range: std::ops::Range<usize>| {
        let (mut max, mut top, mut bad) = (f64::NEG_INFINITY, None, None);
        for i in range {
            let value = ref_logprobs[i];
            if value.is_nan() || value == f64::INFINITY {
                bad = Some(i);
                break;
            }
            max = max.max(value);
            if value > f64::NEG_INFINITY {
                top = better(top, Some(i));
            }
        }
        (max, top, bad)
    };
    let n = ref_logprobs.len();
    let (max, top, bad) =
        (0..n.div_ceil(CHUNK)).into_par_iter().map(|c| scan(c * CHUNK..((c + 1) * CHUNK).min(n))).reduce(
            || (f64::NEG_INFINITY, None, None),
            |x, y| (x.0.max(y.0), better(x.1, y.1), x.2.min(y.2).or(x.2).or(y.2)),
        );
    if let Some(index) = bad {
        return Err(SolveError::BadRefLogprob { index, value: ref_logprobs[index] });
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
    let (chart, iterations) = match chart {
        Chart::Solved { lo, hi, increasing, sup, .. } => {
            let chi_po = increasing;
            let top_ratio = |x: f64| {
                let (mut l, mut u, mut d1, mut d2) = ([0.0], [0.0], [0.0], [0.0]);
                ratio_block(divergence, chi_po, x, &[0.0], &mut l, false, &mut u, &mut d1, &mut d2);
                u[0]
            };
            // Coarse: the same root on responses binned by |d|; fine: from there.
            let bins = Bins::new(&q, d);
            let mut bin_state = vec![0.0; bins.mass.len()];
            let (start, _) = find_root(
                &bins.mass,
                lo,
                hi,
                None,
                false,
                increasing,
                &mut bin_state,
                top_ratio,
                |x, first, st, warm, u, d1, d2| {
                    let offsets = &bins.offset[first..first + st.len()];
                    ratio_block(divergence, chi_po, x, offsets, st, warm, u, d1, d2)
                },
            );
            // χPO: warm-start each response's Halley iterate from its bin's,
            // moved to first order: dℓ/dv = 1/(1 + u).
            if chi_po {
                let slope: Vec<f64> = bin_state.iter().map(|l| 1.0 / (1.0 + l.exp())).collect();
                chunked_sums(&mut state, |offset, chunk| {
                    for (j, st) in chunk.iter_mut().enumerate() {
                        let di = d(offset + j);
                        let b = bins.of(di);
                        *st = bin_state[b] + (di - bins.offset[b]) * slope[b];
                    }
                    []
                });
            }
            let (x, iters) = find_root(
                &q,
                lo,
                hi,
                Some(start),
                chi_po,
                increasing,
                &mut state,
                top_ratio,
                |x, first, st, warm, u, d1, d2| {
                    let mut offsets = [0.0; BLOCK];
                    for (j, o) in offsets[..st.len()].iter_mut().enumerate() {
                        *o = d(first + j);
                    }
                    ratio_block(divergence, chi_po, x, &offsets[..st.len()], st, warm, u, d1, d2)
                },
            );
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
        let mut l_block = [0.0; BLOCK];
        let mut u_block = [0.0; BLOCK];
        for (b, (block, log_block)) in chunk.chunks_mut(BLOCK).zip(log_chunk.chunks_mut(BLOCK)).enumerate() {
            let start = offset + b * BLOCK;
            let n = block.len();
            // ℓ_i and u_i = e^{ℓ_i} at the root (the state holds e^{d_i} for
            // reverse KL, the Halley iterate for χPO).
            match chart {
                Chart::ReverseKl { s } => {
                    for j in 0..n {
                        (l_block[j], u_block[j]) = (s + d(start + j) - 1.0, log_block[j] * rkl_factor);
                    }
                }
                Chart::Solved { x, increasing: true, .. } => {
                    l_block[..n].copy_from_slice(log_block);
                    let mut v = [0.0; BLOCK];
                    for (j, vj) in v[..n].iter_mut().enumerate() {
                        *vj = x + d(start + j);
                    }
                    Divergence::chi_po_ratio_block(&v[..n], &mut l_block[..n], &mut u_block[..n], true);
                }
                Chart::Solved { x, .. } => {
                    for j in 0..n {
                        (l_block[j], u_block[j]) = divergence.log_ratio_and_ratio_of_gap(x - d(start + j));
                    }
                }
            }
            // p̃_i, keeping q_i aside; then the sums.
            for (j, (p, lp)) in block.iter_mut().zip(log_block.iter_mut()).enumerate() {
                let qi = *p;
                q_block[j] = qi;
                let lq = ref_logprobs[start + j] - log_total;
                if lq == f64::NEG_INFINITY {
                    (*p, *lp) = (0.0, f64::NEG_INFINITY);
                    continue;
                }
                *lp = lq + l_block[j];
                let qu = qi * u_block[j];
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

/// (u, dℓ/dx, d²ℓ/dx²) for a block of responses at offsets `d` from the
/// top: χPO in v = x + d (Halley iterates in `state`, solved a block at a
/// time so the exponentials pipeline), the others in the gap g = x − d.
#[allow(clippy::too_many_arguments)]
#[inline]
fn ratio_block(
    divergence: Divergence,
    chi_po: bool,
    x: f64,
    d: &[f64],
    state: &mut [f64],
    warm: bool,
    u: &mut [f64],
    d1: &mut [f64],
    d2: &mut [f64],
) {
    let n = d.len();
    if chi_po {
        let mut v = [0.0; BLOCK];
        for (vj, dj) in v[..n].iter_mut().zip(d) {
            *vj = x + dj;
        }
        Divergence::chi_po_ratio_block(&v[..n], state, u, warm);
        for j in 0..n {
            let inv = 1.0 / (1.0 + u[j]);
            (d1[j], d2[j]) = (inv, -u[j] * inv * inv * inv);
        }
    } else {
        for j in 0..n {
            (u[j], d1[j], d2[j]) = divergence.ratio_of_gap_with_slopes(x - d[j]);
        }
    }
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

/// Responses binned by |d| for the coarse solve: responses whose |d| agree
/// to 8 mantissa bits (a factor 1 + 2⁻⁸) share a bin, represented by its
/// π_ref mass and q-weighted mean offset (so the binning error is second
/// order); |d| more than 2⁻⁶⁴ below the largest share bin 0 with the top.
struct Bins {
    /// π_ref mass of each non-empty bin.
    mass: Vec<f64>,
    /// q-weighted mean d of each non-empty bin.
    offset: Vec<f64>,
    /// Dense bin number → index into `mass`/`offset` (for non-empty bins).
    compact: Vec<u32>,
    /// Smallest key with a bin of its own.
    key_min: u64,
}

impl Bins {
    const SHIFT: u32 = 44;
    const DENSE: usize = 1 << 14;

    fn dense_bin(&self, d: f64) -> usize {
        Self::dense_of(d, self.key_min)
    }

    fn dense_of(d: f64, key_min: u64) -> usize {
        // + 0.0 turns −0.0 (sign bit set) into +0.0.
        let key = (-d + 0.0).to_bits() >> Self::SHIFT;
        if key < key_min {
            0
        } else {
            ((key - key_min) as usize + 1).min(Self::DENSE)
        }
    }

    /// Index into `mass`/`offset` of the bin holding offset `d`.
    fn of(&self, d: f64) -> usize {
        self.compact[self.dense_bin(d)] as usize
    }

    fn new(q: &[f64], d: impl Fn(usize) -> f64 + Sync) -> Bins {
        let largest = (0..q.len()).filter(|&i| q[i] > 0.0).map(|i| -d(i)).fold(0.0, f64::max);
        let key_max = largest.to_bits() >> Self::SHIFT;
        let key_min = key_max.saturating_sub(Self::DENSE as u64 - 1);
        let fill = |range: std::ops::Range<usize>| {
            let mut mass = vec![0.0; Self::DENSE + 1];
            let mut moment = vec![0.0; Self::DENSE + 1];
            for i in range {
                if q[i] > 0.0 {
                    let di = d(i);
                    let b = Self::dense_of(di, key_min);
                    mass[b] += q[i];
                    moment[b] += q[i] * di;
                }
            }
            (mass, moment)
        };
        let half = q.len() / 2;
        let ((mut mass, mut moment), (m2, o2)) = rayon::join(|| fill(0..half), || fill(half..q.len()));
        let mut compact = vec![0u32; Self::DENSE + 1];
        let mut bins = Bins { mass: vec![], offset: vec![], compact: vec![], key_min };
        for b in 0..=Self::DENSE {
            mass[b] += m2[b];
            moment[b] += o2[b];
            if mass[b] > 0.0 {
                compact[b] = bins.mass.len() as u32;
                bins.mass.push(mass[b]);
                bins.offset.push(moment[b] / mass[b]);
            }
        }
        bins.compact = compact;
        bins
    }
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
        return Err(SolveError::PolicyLength { expected: log_q.len(), found: log_policy.len() });
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
/// starting from `start` (default: the end where the top response has u = 1),
/// with `state` already holding a warm start when `warm_start`.
///
/// `kernel(x, first, state, warm, u, dℓ, d²ℓ)` fills, for the block of
/// responses from index `first` (as many as `state` holds), u_i, dℓ_i/dx
/// and d²ℓ_i/dx², monotone in x (increasing when `increasing`); it may keep
/// a per-response state (χPO keeps its Halley iterate). `top_ratio(x)` is u
/// of the best response (d = 0), the largest of all ratios.
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
    warm_start: bool,
    increasing: bool,
    state: &mut [f64],
    top_ratio: T,
    kernel: K,
) -> (f64, usize)
where
    T: Fn(f64) -> f64,
    K: Fn(f64, usize, &mut [f64], bool, &mut [f64], &mut [f64], &mut [f64]) + Sync + Send,
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
                let n = block.len();
                kernel(x, start, block, warm, &mut w[..n], &mut l1[..n], &mut l2[..n]);
                for (((wj, d1), d2), qj) in w.iter().zip(&l1).zip(&l2).zip(&q[start..start + n]) {
                    let term = qj * (wj * scale);
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
        let (g, g1, g2) = eval(tau, warm_start || iterations > 0, state);
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

    /// A million responses (the parallel, chunked path) at the ends of the
    /// β range: finite, normalised, and satisfying KKT where π* has mass.
    #[test]
    fn a_million_responses_at_extreme_beta() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let m = 1_000_000;
        let mut log_q: Vec<f64> = (0..m).map(|_| rng.random_range(-690.0..0.0)).collect();
        log_q[123_456] = 1e-300f64.ln();
        let mut rewards: Vec<f64> = (0..m).map(|_| rng.random_range(-1e3..1e3)).collect();
        rewards[123_456] = 1e3;
        for div in divergences() {
            for &beta in &[1e-4, 1e3] {
                let sol = solve_prompt(div, beta, &log_q, &rewards).unwrap();
                let sum: CompensatedSum = sol.policy.iter().copied().collect();
                assert!((sum.total() - 1.0).abs() < 1e-12, "{div} β={beta}: Σπ − 1 = {}", sum.total() - 1.0);
                assert!(sol.root_residual < 1e-12, "{div} β={beta}: {}", sol.root_residual);
                for x in [sol.lambda, sol.reward, sol.entropy, sol.divergence_value, sol.objective] {
                    assert!(x.is_finite(), "{div} β={beta}");
                }
                assert!(sol.policy.iter().all(|p| p.is_finite() && *p >= 0.0));
                // KKT on the responses that carry mass.
                let (norm_q, _) = normalise_ref_logprobs(&log_q).unwrap();
                for i in (0..m).filter(|&i| sol.policy[i] > 1e-6) {
                    let r = beta * div.f_prime_of_log(sol.log_policy[i] - norm_q[i]) + sol.lambda;
                    assert!(
                        (r - rewards[i]).abs() < 1e-8 * (1.0 + rewards[i].abs()),
                        "{div} β={beta}: KKT at {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_single_response_gets_all_the_mass() {
        for div in divergences() {
            let sol = solve_prompt(div, 0.3, &[-5.0], &[2.0]).unwrap();
            assert_eq!(sol.policy, vec![1.0], "{div}");
            assert!(sol.divergence_value.abs() < 1e-15 && (sol.reward - 2.0).abs() < 1e-15, "{div}");
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
