//! Diversity of a set of texts that needs no model (docs/DESIGN.md §4):
//! distinct-n, expectation-adjusted distinct n-grams (EAD, Liu et al.
//! 2022, averaged over n = 1..5 as in Kirk et al. 2023) and self-BLEU
//! (BLEU-4 of each text against the others, NLTK's smoothing method 1).
//!
//! Texts are token sequences; callers choose the tokenisation (whitespace
//! words, or a model tokenizer's ids). Model-based metrics (sentence
//! embeddings, NLI, policy entropy) live with the models.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// Distinct and total n-grams of order `n` over all `texts`.
fn ngram_counts<T: Hash + Eq>(texts: &[Vec<T>], n: usize) -> (usize, usize) {
    let mut distinct: HashSet<&[T]> = HashSet::new();
    let mut total = 0;
    for t in texts {
        if t.len() >= n {
            for g in t.windows(n) {
                distinct.insert(g);
                total += 1;
            }
        }
    }
    (distinct.len(), total)
}

/// Whether any of `texts` has an n-gram of order `n` (a text of at least
/// `n` tokens): distinct-n and EAD of order n are undefined without one.
///
/// ```
/// let texts = vec![vec![1u32, 2], vec![3]];
/// assert!(fdpo_core::diversity::has_ngrams(&texts, 2));
/// assert!(!fdpo_core::diversity::has_ngrams(&texts, 3));
/// ```
pub fn has_ngrams<T>(texts: &[Vec<T>], n: usize) -> bool {
    texts.iter().any(|t| t.len() >= n)
}

/// distinct-n: distinct n-grams / total n-grams over all texts (0 when
/// there are none; see [`has_ngrams`]).
///
/// ```
/// let texts = vec![vec!["a", "b", "a"], vec!["a", "b"]];
/// // bigrams: ab, ba, ab → 2 distinct of 3.
/// assert!((fdpo_core::diversity::distinct_n(&texts, 2) - 2.0 / 3.0).abs() < 1e-15);
/// ```
pub fn distinct_n<T: Hash + Eq>(texts: &[Vec<T>], n: usize) -> f64 {
    let (distinct, total) = ngram_counts(texts, n);
    if total == 0 {
        0.0
    } else {
        distinct as f64 / total as f64
    }
}

/// EAD of order n: N / (V·(1 − ((V−1)/V)^C)) with N distinct and C total
/// n-grams and V the vocabulary size (the expected number of distinct
/// n-grams among C uniform draws is the denominator).
///
/// ```
/// // One n-gram: N = C = 1, expectation 1 → EAD 1.
/// let t = vec![vec![7u32]];
/// assert!((fdpo_core::diversity::ead_n(&t, 1, 50_257) - 1.0).abs() < 1e-12);
/// ```
pub fn ead_n<T: Hash + Eq>(texts: &[Vec<T>], n: usize, vocab_size: usize) -> f64 {
    let (distinct, total) = ngram_counts(texts, n);
    if total == 0 || vocab_size == 0 {
        return 0.0;
    }
    let v = vocab_size as f64;
    // 1 − ((V−1)/V)^C, computed as −expm1(C·log1p(−1/V)) without cancellation.
    let expected = v * -(total as f64 * (-1.0 / v).ln_1p()).exp_m1();
    distinct as f64 / expected
}

/// EAD averaged over n = 1..5.
pub fn ead<T: Hash + Eq>(texts: &[Vec<T>], vocab_size: usize) -> f64 {
    (1..=5).map(|n| ead_n(texts, n, vocab_size)).sum::<f64>() / 5.0
}

fn ngram_histogram<T: Hash + Eq>(t: &[T], n: usize) -> HashMap<&[T], usize> {
    let mut h = HashMap::new();
    if t.len() >= n {
        for g in t.windows(n) {
            *h.entry(g).or_insert(0) += 1;
        }
    }
    h
}

/// Sentence BLEU-4 of `hypothesis` against `references`, as NLTK's
/// `sentence_bleu(references, hypothesis, smoothing_function=method1)`:
/// clipped n-gram precisions (a zero numerator becomes 0.1, but no
/// matching unigram at all gives 0), uniform weights, brevity penalty
/// against the closest reference length.
pub fn sentence_bleu<T: Hash + Eq>(references: &[&[T]], hypothesis: &[T]) -> f64 {
    let hyp_len = hypothesis.len();
    if hyp_len == 0 || references.is_empty() {
        return 0.0;
    }
    let mut log_sum = 0.0;
    for n in 1..=4 {
        let hyp = ngram_histogram(hypothesis, n);
        // NLTK: denominator max(1, count), so a hypothesis shorter than n
        // gets a smoothed 0.1 for that order.
        let denominator = hyp.values().sum::<usize>().max(1);
        let mut max_ref: HashMap<&[T], usize> = HashMap::new();
        for r in references {
            for (g, c) in ngram_histogram(r, n) {
                let e = max_ref.entry(g).or_insert(0);
                *e = (*e).max(c);
            }
        }
        let clipped: usize = hyp.iter().map(|(g, c)| (*c).min(*max_ref.get(g).unwrap_or(&0))).sum();
        if n == 1 && clipped == 0 {
            // NLTK returns 0 outright when no unigram matches (before smoothing).
            return 0.0;
        }
        let numerator = if clipped == 0 { 0.1 } else { clipped as f64 };
        log_sum += 0.25 * (numerator / denominator as f64).ln();
    }
    // Closest reference length, ties to the shorter.
    let closest = references
        .iter()
        .map(|r| r.len())
        .min_by_key(|&l| ((l as i64 - hyp_len as i64).abs(), l))
        .unwrap_or(0);
    let brevity = if hyp_len > closest { 1.0 } else { (1.0 - closest as f64 / hyp_len as f64).exp() };
    brevity * log_sum.exp()
}

/// Self-BLEU: the mean over texts of BLEU-4 against all the other texts
/// (0 for fewer than two texts). Diversity is 1 − self-BLEU.
pub fn self_bleu<T: Hash + Eq>(texts: &[Vec<T>]) -> f64 {
    if texts.len() < 2 {
        return 0.0;
    }
    let total: f64 = (0..texts.len())
        .map(|i| {
            let refs: Vec<&[T]> =
                texts.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, t)| t.as_slice()).collect();
            sentence_bleu(&refs, &texts[i])
        })
        .sum();
    total / texts.len() as f64
}

/// Mean and (population) standard deviation.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &[&str]) -> Vec<Vec<String>> {
        s.iter().map(|t| t.split_whitespace().map(String::from).collect()).collect()
    }

    #[test]
    fn distinct_n_counts_by_hand() {
        let t = words(&["the cat sat", "the cat ran"]);
        assert!((distinct_n(&t, 1) - 4.0 / 6.0).abs() < 1e-15); // the cat sat ran / 6
        assert!((distinct_n(&t, 2) - 3.0 / 4.0).abs() < 1e-15); // the-cat ×2, cat-sat, cat-ran
        assert_eq!(distinct_n(&t, 4), 0.0);
    }

    /// EAD against the formula evaluated naively, and its limits: identical
    /// texts repeated lower it; for V → ∞ it tends to distinct-n.
    #[test]
    fn ead_matches_formula_and_limits() {
        let t = words(&["a b c d", "a b e f", "g h a b"]);
        let (n_d, c) = (8.0f64, 12.0f64);
        let v = 100.0f64;
        let want = n_d / (v * (1.0 - ((v - 1.0) / v).powf(c)));
        assert!((ead_n(&t, 1, 100) - want).abs() < 1e-12);
        assert!((ead_n(&t, 1, 1_000_000_000) - distinct_n(&t, 1)).abs() < 1e-6);
        let repeated = words(&["a b c d", "a b c d", "a b c d"]);
        assert!(ead(&repeated, 50_257) < ead(&t, 50_257));
    }

    /// NLTK's `sentence_bleu(refs, hyp, smoothing_function=
    /// SmoothingFunction().method1)`, written out by hand for these short
    /// cases; each agrees with NLTK 3.10 to the last digit.
    #[test]
    fn sentence_bleu_matches_nltk_method1() {
        let hyp: Vec<&str> = "the cat sat on the mat".split(' ').collect();
        let same = hyp.clone();
        assert!((sentence_bleu(&[same.as_slice()], &hyp) - 1.0).abs() < 1e-12);
        // No unigram in common: 0 before any smoothing.
        let other: Vec<&str> = "a b c d e f".split(' ').collect();
        assert_eq!(sentence_bleu(&[other.as_slice()], &hyp), 0.0);
        // One shared word: unigrams 1/6, higher orders smoothed 0.1/count.
        let one: Vec<&str> = "a b mat d e f".split(' ').collect();
        let want = (0.25f64
            * ((1.0f64 / 6.0).ln() + (0.1f64 / 5.0).ln() + (0.1f64 / 4.0).ln() + (0.1f64 / 3.0).ln()))
        .exp();
        assert!((sentence_bleu(&[one.as_slice()], &hyp) - want).abs() < 1e-12);
        // Brevity penalty: a 3-word hypothesis against a 6-word reference.
        let short: Vec<&str> = "the cat sat".split(' ').collect();
        let p = (0.25f64 * 0.1f64.ln()).exp(); // precisions 3/3, 2/2, 1/1, smoothed 0.1/1
        let bp = (1.0f64 - 6.0 / 3.0).exp();
        assert!((sentence_bleu(&[same.as_slice()], &short) - p * bp).abs() < 1e-12);
        assert!((p * bp - 0.20687381245863395).abs() < 1e-15, "NLTK's value");
    }

    /// Another implementation: NLTK 3.10,
    /// ```python
    /// texts = [t.split() for t in ["the film was good and great", "the plot was bad",
    ///          "a very good story really great", "the film was fine"]]
    /// sb = [sentence_bleu([t for j, t in enumerate(texts) if j != i], texts[i],
    ///       smoothing_function=SmoothingFunction().method1) for i in range(4)]
    /// sum(sb) / 4  # 0.1928259263602094
    /// ```
    #[test]
    fn self_bleu_matches_nltk() {
        let t = words(&[
            "the film was good and great",
            "the plot was bad",
            "a very good story really great",
            "the film was fine",
        ]);
        assert!((self_bleu(&t) - 0.1928259263602094).abs() < 1e-12, "{}", self_bleu(&t));
    }

    #[test]
    fn self_bleu_is_one_for_copies_and_low_for_disjoint_texts() {
        let copies = words(&["a b c d e", "a b c d e", "a b c d e"]);
        assert!((self_bleu(&copies) - 1.0).abs() < 1e-12);
        let disjoint = words(&["a b c d e", "f g h i j", "k l m n o"]);
        assert!(self_bleu(&disjoint) < 0.1);
        assert_eq!(self_bleu(&words(&["only one"])), 0.0);
    }
}
