//! Bias audits of preference data and of judges (docs/DESIGN.md §4):
//! verbosity in preference data, a judge's verbosity against reference
//! labels (equal-opportunity gap), the length-controlled win rate
//! (AlpacaEval 2 style), position bias and self-preference (Zheng et al.
//! 2023).
//!
//! Lengths are whitespace words. Intervals are 95%: Wilson for a
//! proportion, Wald for a difference of proportions.

use std::collections::BTreeMap;

use serde::Serialize;

const Z: f64 = 1.959_963_984_540_054;

/// A proportion with its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Proportion {
    /// Successes / trials (NaN without trials).
    pub value: f64,
    /// Lower end of the Wilson interval.
    pub low: f64,
    /// Upper end of the Wilson interval.
    pub high: f64,
    /// Trials.
    pub n: usize,
}

impl Proportion {
    /// `successes` (may be fractional, for ties counted half) of `n`.
    pub fn wilson(successes: f64, n: usize) -> Proportion {
        if n == 0 {
            return Proportion { value: f64::NAN, low: f64::NAN, high: f64::NAN, n };
        }
        let nf = n as f64;
        let p = successes / nf;
        let denom = 1.0 + Z * Z / nf;
        let center = (p + Z * Z / (2.0 * nf)) / denom;
        let half = Z * (p * (1.0 - p) / nf + Z * Z / (4.0 * nf * nf)).sqrt() / denom;
        Proportion { value: p, low: (center - half).max(0.0), high: (center + half).min(1.0), n }
    }
}

/// A difference of two proportions with its 95% (Wald) interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Difference {
    /// p₁ − p₂.
    pub value: f64,
    /// Lower end.
    pub low: f64,
    /// Upper end.
    pub high: f64,
}

fn difference(a: &Proportion, b: &Proportion) -> Difference {
    let value = a.value - b.value;
    let se = (a.value * (1.0 - a.value) / a.n as f64 + b.value * (1.0 - b.value) / b.n as f64).sqrt();
    Difference { value, low: value - Z * se, high: value + Z * se }
}

/// Length of a text in whitespace words.
pub fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

/// Average ranks (1-based, ties share the mean rank).
fn ranks(xs: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut r = vec![0.0; xs.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && xs[order[j + 1]] == xs[order[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation (Pearson correlation of average ranks).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    sxy / (sxx * syy).sqrt()
}

/// Verbosity of preference data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerbosityReport {
    /// Pairs whose chosen and rejected lengths differ.
    pub pairs_with_length_difference: usize,
    /// Share of those pairs in which the chosen response is the longer.
    pub chosen_longer: Proportion,
    /// The same by bins of |length difference| (words): (label, share).
    pub by_length_difference: Vec<(String, Proportion)>,
    /// Spearman correlation between a response's length advantage and its
    /// being preferred, over both orientations of every pair.
    pub rank_correlation: f64,
}

/// Verbosity of preference pairs given as (chosen length, rejected length).
/// Bins of |Δ| have edges `bin_edges` (e.g. [1, 5, 20]: 1–4, 5–19, ≥20).
pub fn verbosity(lengths: &[(usize, usize)], bin_edges: &[usize]) -> VerbosityReport {
    let differing: Vec<(i64, bool)> =
        lengths.iter().filter(|(c, r)| c != r).map(|&(c, r)| ((c as i64 - r as i64).abs(), c > r)).collect();
    let longer = differing.iter().filter(|(_, l)| *l).count() as f64;
    let mut by_bin = Vec::new();
    for (k, &lo) in bin_edges.iter().enumerate() {
        let hi = bin_edges.get(k + 1).copied();
        let inside: Vec<&(i64, bool)> =
            differing.iter().filter(|(d, _)| *d >= lo as i64 && hi.is_none_or(|h| *d < h as i64)).collect();
        let label = match hi {
            Some(h) => format!("{lo}-{}", h - 1),
            None => format!(">={lo}"),
        };
        let wins = inside.iter().filter(|(_, l)| *l).count() as f64;
        by_bin.push((label, Proportion::wilson(wins, inside.len())));
    }
    // Both orientations: (Δ, 1) for chosen vs rejected, (−Δ, 0) the other way.
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for &(c, r) in lengths {
        let d = c as f64 - r as f64;
        x.extend([d, -d]);
        y.extend([1.0, 0.0]);
    }
    VerbosityReport {
        pairs_with_length_difference: differing.len(),
        chosen_longer: Proportion::wilson(longer, differing.len()),
        by_length_difference: by_bin,
        rank_correlation: if x.is_empty() { f64::NAN } else { spearman(&x, &y) },
    }
}

/// A verdict: which of a and b won (ties count half).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    /// Response a.
    A,
    /// Response b.
    B,
    /// Neither.
    Tie,
}

impl Winner {
    /// Parses `a`, `b` or `tie`.
    pub fn parse(s: &str) -> Option<Winner> {
        match s {
            "a" | "A" => Some(Winner::A),
            "b" | "B" => Some(Winner::B),
            "tie" | "Tie" | "TIE" => Some(Winner::Tie),
            _ => None,
        }
    }

    /// Score of a: 1, 0 or ½.
    pub fn score_a(self) -> f64 {
        match self {
            Winner::A => 1.0,
            Winner::B => 0.0,
            Winner::Tie => 0.5,
        }
    }
}

/// One judged pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// Length of a (words).
    pub len_a: usize,
    /// Length of b (words).
    pub len_b: usize,
    /// The judge's verdict with a shown first.
    pub winner: Winner,
    /// The verdict with b shown first (position audit), in terms of a/b.
    pub swapped_winner: Option<Winner>,
    /// Reference label (equal-opportunity audit).
    pub reference: Option<Winner>,
    /// The judge's name (self-preference audit).
    pub judge: Option<String>,
    /// The model that wrote a.
    pub a_model: Option<String>,
    /// The model that wrote b.
    pub b_model: Option<String>,
}

/// Equal-opportunity gap of a judge against reference labels.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EqualOpportunity {
    /// Agreement with the reference when it prefers the longer response.
    pub agreement_reference_longer: Proportion,
    /// Agreement when the reference prefers the shorter response.
    pub agreement_reference_shorter: Proportion,
    /// The first minus the second.
    pub gap: Difference,
}

/// EO gap over judgements with a (non-tie) reference and unequal lengths.
pub fn equal_opportunity(judgements: &[Judgement]) -> Option<EqualOpportunity> {
    let (mut longer, mut shorter) = ((0.0, 0), (0.0, 0));
    for j in judgements {
        let Some(reference) = j.reference.filter(|r| *r != Winner::Tie) else { continue };
        if j.len_a == j.len_b {
            continue;
        }
        let reference_is_longer = (reference == Winner::A) == (j.len_a > j.len_b);
        let agree = if j.winner == reference {
            1.0
        } else if j.winner == Winner::Tie {
            0.5
        } else {
            0.0
        };
        let bucket = if reference_is_longer { &mut longer } else { &mut shorter };
        bucket.0 += agree;
        bucket.1 += 1;
    }
    if longer.1 == 0 || shorter.1 == 0 {
        return None;
    }
    let a = Proportion::wilson(longer.0, longer.1);
    let b = Proportion::wilson(shorter.0, shorter.1);
    Some(EqualOpportunity {
        agreement_reference_longer: a,
        agreement_reference_shorter: b,
        gap: difference(&a, &b),
    })
}

/// Raw and length-controlled win rate of a (the model) over b (the baseline).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthControlled {
    /// Mean score of a (ties ½).
    pub raw_win_rate: Proportion,
    /// σ(θ) of the fit P(a wins) = σ(θ + φ·tanh(Δlen/σ)), at Δlen = 0;
    /// None when not estimable (see `note`).
    pub length_controlled_win_rate: Option<f64>,
    /// θ (None when not estimable).
    pub theta: Option<f64>,
    /// φ, the weight of the length term (None when not estimable).
    pub phi: Option<f64>,
    /// σ: the standard deviation of Δlen = len(a) − len(b).
    pub sigma: f64,
    /// Why the length-controlled win rate is not estimable, when it is not.
    pub note: Option<String>,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The AlpacaEval-2-style length-controlled win rate: logistic regression
/// of a's score on tanh(Δlen/σ), by Newton's method (a tiny ridge keeps it
/// finite when the data separate), evaluated at Δlen = 0.
///
/// When every pair has the same Δlen d ≠ 0 (σ = 0), the data say nothing
/// about Δlen = 0 (the intercept and the length term cannot be told apart),
/// so the rate, θ and φ are None with a note. When every Δlen is 0 the
/// length term is 0 and the rate is the raw win rate's fit.
pub fn length_controlled(judgements: &[Judgement]) -> Option<LengthControlled> {
    if judgements.is_empty() {
        return None;
    }
    let deltas: Vec<f64> = judgements.iter().map(|j| j.len_a as f64 - j.len_b as f64).collect();
    let n = deltas.len() as f64;
    let mean = deltas.iter().sum::<f64>() / n;
    let sigma = (deltas.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
    let y: Vec<f64> = judgements.iter().map(|j| j.winner.score_a()).collect();
    let raw_win_rate = Proportion::wilson(y.iter().sum(), y.len());
    if sigma == 0.0 && mean != 0.0 {
        return Some(LengthControlled {
            raw_win_rate,
            length_controlled_win_rate: None,
            theta: None,
            phi: None,
            sigma,
            note: Some(format!(
                "not estimable: every pair has the same length difference ({mean} words), so the \
                 win rate at equal length cannot be told apart from the length effect"
            )),
        });
    }
    // σ = 0 here only when every Δlen is 0: the length term is then 0.
    let t: Vec<f64> = deltas.iter().map(|d| if sigma > 0.0 { (d / sigma).tanh() } else { 0.0 }).collect();
    let (mut theta, mut phi) = (0.0, 0.0);
    let ridge = 1e-6;
    for _ in 0..100 {
        let (mut g0, mut g1, mut h00, mut h01, mut h11) = (-ridge * theta, -ridge * phi, ridge, 0.0, ridge);
        for (ti, yi) in t.iter().zip(&y) {
            let p = sigmoid(theta + phi * ti);
            let w = p * (1.0 - p);
            g0 += yi - p;
            g1 += (yi - p) * ti;
            h00 += w;
            h01 += w * ti;
            h11 += w * ti * ti;
        }
        let det = h00 * h11 - h01 * h01;
        if det <= 0.0 {
            break;
        }
        let (d0, d1) = ((h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det);
        theta += d0;
        phi += d1;
        if d0.abs().max(d1.abs()) < 1e-12 {
            break;
        }
    }
    Some(LengthControlled {
        raw_win_rate,
        length_controlled_win_rate: Some(sigmoid(theta)),
        theta: Some(theta),
        phi: Some(phi),
        sigma,
        note: None,
    })
}

/// Position bias of a judge over pairs judged in both orders.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionBias {
    /// Share of pairs whose verdict is the same in both orders.
    pub consistency: Proportion,
    /// Share of the 2n verdicts won by the response shown first (ties ½).
    pub first_position_preference: Proportion,
    /// Share won by the response shown second.
    pub second_position_preference: Proportion,
}

/// Position bias over judgements that carry `swapped_winner`.
pub fn position_bias(judgements: &[Judgement]) -> Option<PositionBias> {
    let both: Vec<(Winner, Winner)> =
        judgements.iter().filter_map(|j| j.swapped_winner.map(|s| (j.winner, s))).collect();
    if both.is_empty() {
        return None;
    }
    let consistent = both.iter().filter(|(w, s)| w == s).count() as f64;
    // Order 1 shows a first; order 2 shows b first.
    let first: f64 = both.iter().map(|(w, s)| w.score_a() + (1.0 - s.score_a())).sum();
    let n = both.len();
    Some(PositionBias {
        consistency: Proportion::wilson(consistent, n),
        first_position_preference: Proportion::wilson(first, 2 * n),
        second_position_preference: Proportion::wilson(2.0 * n as f64 - first, 2 * n),
    })
}

/// A judge's preference for its own model's outputs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SelfPreference {
    /// The judge (also a model's name).
    pub judge: String,
    /// Win rate of that model's outputs under this judge.
    pub own_judge_win_rate: Proportion,
    /// Win rate of the same model's outputs under the other judges.
    pub neutral_judges_win_rate: Proportion,
    /// The first minus the second.
    pub uplift: Difference,
}

/// Self-preference of every judge that is also one of the compared models.
pub fn self_preference(judgements: &[Judgement]) -> Vec<SelfPreference> {
    let judges: BTreeMap<&str, ()> =
        judgements.iter().filter_map(|j| j.judge.as_deref()).map(|j| (j, ())).collect();
    let mut out = Vec::new();
    for judge in judges.keys() {
        // (own-judge score sum, count), (neutral score sum, count) of `judge`'s outputs.
        let (mut own, mut neutral) = ((0.0, 0), (0.0, 0));
        for j in judgements {
            let score = if j.a_model.as_deref() == Some(judge) && j.b_model.as_deref() != Some(judge) {
                j.winner.score_a()
            } else if j.b_model.as_deref() == Some(judge) && j.a_model.as_deref() != Some(judge) {
                1.0 - j.winner.score_a()
            } else {
                continue;
            };
            let bucket = if j.judge.as_deref() == Some(judge) { &mut own } else { &mut neutral };
            bucket.0 += score;
            bucket.1 += 1;
        }
        if own.1 == 0 || neutral.1 == 0 {
            continue;
        }
        let a = Proportion::wilson(own.0, own.1);
        let b = Proportion::wilson(neutral.0, neutral.1);
        out.push(SelfPreference {
            judge: judge.to_string(),
            own_judge_win_rate: a,
            neutral_judges_win_rate: b,
            uplift: difference(&a, &b),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn judgement(len_a: usize, len_b: usize, winner: Winner) -> Judgement {
        Judgement {
            len_a,
            len_b,
            winner,
            swapped_winner: None,
            reference: None,
            judge: None,
            a_model: None,
            b_model: None,
        }
    }

    /// Wilson interval against its closed form for 8 of 10 (R's prop.test
    /// without continuity correction gives 0.4902 – 0.9433).
    #[test]
    fn wilson_interval_matches_reference_values() {
        let p = Proportion::wilson(8.0, 10);
        assert!((p.low - 0.4901625).abs() < 1e-6 && (p.high - 0.9433178).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn spearman_handles_ties_and_reversal() {
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-15);
        // scipy.stats.spearmanr([1, 2, 2, 3], [1, 2, 3, 4]) = 0.9486832980505138
        assert!((spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]) - 0.9486832980505138).abs() < 1e-12);
    }

    #[test]
    fn verbosity_of_planted_preference_data() {
        // 8 of 10 differing pairs prefer the longer; 2 equal-length pairs ignored.
        let mut lengths = vec![(10, 5); 6];
        lengths.extend([(30, 2), (25, 1), (3, 9), (4, 40), (7, 7), (3, 3)]);
        let r = verbosity(&lengths, &[1, 10]);
        assert_eq!(r.pairs_with_length_difference, 10);
        assert!((r.chosen_longer.value - 0.8).abs() < 1e-15);
        assert_eq!(r.by_length_difference[0].0, "1-9");
        assert!((r.by_length_difference[0].1.value - 6.0 / 7.0).abs() < 1e-15); // 6×(5) + (6) in 1–9
        assert!((r.by_length_difference[1].1.value - 2.0 / 3.0).abs() < 1e-15); // 28, 24, 36
        assert!(r.rank_correlation > 0.3);
    }

    #[test]
    fn equal_opportunity_gap_by_hand() {
        let mut js = Vec::new();
        // Reference prefers the longer (a): judge agrees 3 of 4.
        for w in [Winner::A, Winner::A, Winner::A, Winner::B] {
            js.push(Judgement { reference: Some(Winner::A), ..judgement(20, 5, w) });
        }
        // Reference prefers the shorter (a): judge agrees 1 of 4.
        for w in [Winner::A, Winner::B, Winner::B, Winner::B] {
            js.push(Judgement { reference: Some(Winner::A), ..judgement(5, 20, w) });
        }
        let eo = equal_opportunity(&js).unwrap();
        assert!((eo.gap.value - 0.5).abs() < 1e-15);
        assert!(eo.gap.low < 0.5 && eo.gap.high > 0.5);
    }

    /// Planted answer: verdicts drawn from σ(θ + φ·tanh(Δ/σ)) recover θ.
    #[test]
    fn length_controlled_win_rate_recovers_planted_theta() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (theta, phi) = (-0.4, 1.5);
        let deltas: Vec<i64> = (0..40_000).map(|_| rng.random_range(-30..=30)).collect();
        let n = deltas.len() as f64;
        let mean = deltas.iter().sum::<i64>() as f64 / n;
        let sigma = (deltas.iter().map(|&d| (d as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let js: Vec<Judgement> = deltas
            .iter()
            .map(|&d| {
                let p = sigmoid(theta + phi * (d as f64 / sigma).tanh());
                let w = if rng.random::<f64>() < p { Winner::A } else { Winner::B };
                judgement((50 + d) as usize, 50, w)
            })
            .collect();
        let lc = length_controlled(&js).unwrap();
        let (got_theta, got_phi) = (lc.theta.unwrap(), lc.phi.unwrap());
        assert!((got_theta - theta).abs() < 0.05 && (got_phi - phi).abs() < 0.08, "{lc:?}");
        assert!((lc.length_controlled_win_rate.unwrap() - sigmoid(theta)).abs() < 0.015);
    }

    /// Every pair 5 words apart: nothing is observed at Δlen = 0, so the
    /// rate is not estimable (it used to come out of a σ clamped to 1e-9).
    /// Every pair of equal length: the rate is the raw 3 of 4 (θ = logit 0.75).
    #[test]
    fn length_controlled_win_rate_needs_length_variation() {
        let wins = [Winner::A, Winner::A, Winner::A, Winner::B];
        let apart: Vec<Judgement> = wins.iter().map(|&w| judgement(10, 5, w)).collect();
        let lc = length_controlled(&apart).unwrap();
        assert_eq!((lc.length_controlled_win_rate, lc.theta, lc.phi), (None, None, None));
        assert!(lc.note.as_deref().unwrap().starts_with("not estimable"), "{lc:?}");
        assert_eq!(lc.raw_win_rate.value, 0.75);
        let equal: Vec<Judgement> = wins.iter().map(|&w| judgement(5, 5, w)).collect();
        let lc = length_controlled(&equal).unwrap();
        assert!((lc.length_controlled_win_rate.unwrap() - 0.75).abs() < 1e-5, "{lc:?}");
        assert_eq!((lc.sigma, lc.phi, lc.note), (0.0, Some(0.0), None));
    }

    #[test]
    fn position_bias_by_hand() {
        // Pair 1: a wins in both orders (consistent). Pair 2: the first shown wins each time.
        let js = vec![
            Judgement { swapped_winner: Some(Winner::A), ..judgement(5, 5, Winner::A) },
            Judgement { swapped_winner: Some(Winner::B), ..judgement(5, 5, Winner::A) },
        ];
        let p = position_bias(&js).unwrap();
        assert!((p.consistency.value - 0.5).abs() < 1e-15);
        // First-shown wins: pair 1 order 1 (a), pair 1 order 2 (b first, a won: no),
        // pair 2 order 1 (a), pair 2 order 2 (b): 3 of 4.
        assert!((p.first_position_preference.value - 0.75).abs() < 1e-15);
    }

    #[test]
    fn self_preference_uplift_by_hand() {
        let mk = |judge: &str, winner| Judgement {
            judge: Some(judge.into()),
            a_model: Some("gpt".into()),
            b_model: Some("claude".into()),
            ..judgement(5, 5, winner)
        };
        // Judge "gpt" prefers gpt's outputs 4 of 4; judge "llama" 1 of 4.
        let mut js: Vec<Judgement> = (0..4).map(|_| mk("gpt", Winner::A)).collect();
        js.extend([Winner::A, Winner::B, Winner::B, Winner::B].map(|w| mk("llama", w)));
        let s = self_preference(&js);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].judge, "gpt");
        assert!((s[0].uplift.value - 0.75).abs() < 1e-15);
    }

    /// Synthetic judgements: every audit recovers a planted bias (its
    /// interval holds the planted value and excludes "no bias"), and on
    /// unbiased data its interval holds "no bias".
    #[test]
    fn planted_biases_are_recovered_and_unbiased_data_shows_none() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let n = 4000;
        let contains = |lo: f64, hi: f64, x: f64| lo <= x && x <= hi;

        // Verbosity: P(chosen is the longer) = 0.7 planted, 0.5 unbiased.
        for (p, biased) in [(0.7, true), (0.5, false)] {
            let lengths: Vec<(usize, usize)> = (0..n)
                .map(|_| {
                    let (long, short) = (rng.random_range(20..60), rng.random_range(1..19));
                    if rng.random::<f64>() < p {
                        (long, short)
                    } else {
                        (short, long)
                    }
                })
                .collect();
            let r = verbosity(&lengths, &[1]);
            let c = r.chosen_longer;
            assert!(contains(c.low, c.high, p), "{c:?}");
            assert_eq!(contains(c.low, c.high, 0.5), !biased, "{c:?}");
        }

        // Equal opportunity: agreement 0.9 vs 0.6 planted, 0.8 both unbiased.
        for ((p_long, p_short), biased) in [((0.9, 0.6), true), ((0.8, 0.8), false)] {
            let js: Vec<Judgement> = (0..n)
                .map(|k| {
                    let reference_longer = k % 2 == 0;
                    let agree = rng.random::<f64>() < if reference_longer { p_long } else { p_short };
                    let (len_a, len_b) = if reference_longer { (30, 10) } else { (10, 30) };
                    let winner = if agree { Winner::A } else { Winner::B };
                    Judgement { reference: Some(Winner::A), ..judgement(len_a, len_b, winner) }
                })
                .collect();
            let gap = equal_opportunity(&js).unwrap().gap;
            assert!(contains(gap.low, gap.high, p_long - p_short), "{gap:?}");
            assert_eq!(contains(gap.low, gap.high, 0.0), !biased, "{gap:?}");
        }

        // Position: the first shown wins with probability 0.7 planted; unbiased
        // judges see through the order (same verdict both ways).
        for (p_first, biased) in [(0.7, true), (0.5, false)] {
            let js: Vec<Judgement> = (0..n)
                .map(|_| {
                    let (w, s) = if biased {
                        let first = |rng: &mut ChaCha8Rng| rng.random::<f64>() < p_first;
                        (
                            if first(&mut rng) { Winner::A } else { Winner::B },
                            if first(&mut rng) { Winner::B } else { Winner::A },
                        )
                    } else {
                        let w = if rng.random::<f64>() < 0.5 { Winner::A } else { Winner::B };
                        (w, w)
                    };
                    Judgement { swapped_winner: Some(s), ..judgement(5, 5, w) }
                })
                .collect();
            let p = position_bias(&js).unwrap();
            let f = p.first_position_preference;
            assert!(contains(f.low, f.high, p_first), "{f:?}");
            assert_eq!(contains(f.low, f.high, 0.5), !biased, "{f:?}");
        }

        // Self-preference: judge "m" rates m's outputs 0.75 vs 0.5 by others (planted), 0.5 both.
        for (p_own, biased) in [(0.75, true), (0.5, false)] {
            let js: Vec<Judgement> = (0..n)
                .map(|k| {
                    let judge = if k % 2 == 0 { "m" } else { "other" };
                    let p = if judge == "m" { p_own } else { 0.5 };
                    let winner = if rng.random::<f64>() < p { Winner::A } else { Winner::B };
                    Judgement {
                        judge: Some(judge.into()),
                        a_model: Some("m".into()),
                        b_model: Some("rival".into()),
                        ..judgement(5, 5, winner)
                    }
                })
                .collect();
            let s = &self_preference(&js)[0];
            assert!(contains(s.uplift.low, s.uplift.high, p_own - 0.5), "{s:?}");
            assert_eq!(contains(s.uplift.low, s.uplift.high, 0.0), !biased, "{s:?}");
        }

        // Length-controlled win rate with no length effect equals the raw rate.
        let js: Vec<Judgement> = (0..n)
            .map(|_| {
                let w = if rng.random::<f64>() < 0.6 { Winner::A } else { Winner::B };
                judgement(rng.random_range(5..50), rng.random_range(5..50), w)
            })
            .collect();
        let lc = length_controlled(&js).unwrap();
        assert!(lc.phi.unwrap().abs() < 0.15, "{lc:?}");
        assert!((lc.length_controlled_win_rate.unwrap() - lc.raw_win_rate.value).abs() < 0.02, "{lc:?}");
    }
}
