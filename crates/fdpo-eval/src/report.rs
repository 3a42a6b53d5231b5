//! Per-input and across-input diversity of a samples file (Kirk et al. 2023):
//! per-input, the metric on each prompt's K responses, then its mean and
//! standard deviation over prompts; across-input, the metric on the first
//! response of every prompt.
//!
//! A metric undefined for a prompt (see [`undefined_when`]: fewer than two
//! responses for the pairwise metrics, no n-grams of the order for
//! distinct-n and EAD) is left out of that metric's per-input mean and
//! standard deviation, and [`MetricSummary::prompts_counted`] says how many
//! prompts remained; an undefined across-input value is NaN (null in JSON).

use fdpo_core::diversity::{distinct_n, ead, has_ngrams, mean_std, self_bleu};
use serde::Serialize;

use crate::samples::SampleSet;

/// The metrics, in report order: (name, function of token sequences).
pub const METRICS: [&str; 6] = ["distinct-1", "distinct-2", "distinct-3", "distinct-4", "ead", "1-self-bleu"];

/// Texts a pairwise metric (self-BLEU, embedding, NLI) needs at least.
const PAIRWISE_MIN: usize = 2;

/// Highest n-gram order EAD averages over (n = 1..5, Kirk et al. 2023).
const EAD_MAX_ORDER: usize = 5;

/// One metric of one file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricSummary {
    /// The metric's name (see [`METRICS`]).
    pub metric: String,
    /// Mean over the counted prompts of the metric on that prompt's responses.
    pub per_input_mean: f64,
    /// Standard deviation over the counted prompts.
    pub per_input_std: f64,
    /// Prompts for which the metric is defined, and so counted in the mean
    /// and standard deviation.
    pub prompts_counted: usize,
    /// The metric on the first response of every prompt (NaN where undefined).
    pub across_input: f64,
}

impl MetricSummary {
    /// The summary of per-prompt values (None: undefined, left out) and the
    /// across-input value.
    fn new(metric: &str, per_prompt: &[Option<f64>], across_input: Option<f64>) -> MetricSummary {
        let counted: Vec<f64> = per_prompt.iter().flatten().copied().collect();
        let (mean, std) = mean_std(&counted);
        MetricSummary {
            metric: metric.into(),
            per_input_mean: mean,
            per_input_std: std,
            prompts_counted: counted.len(),
            across_input: across_input.unwrap_or(f64::NAN),
        }
    }
}

/// When `metric` is undefined for a set of responses (the reason printed
/// beside the number of prompts left out).
pub fn undefined_when(metric: &str) -> String {
    match metric {
        "ead" => format!(
            "no response of at least {EAD_MAX_ORDER} tokens, so no {EAD_MAX_ORDER}-grams for EAD's n = 1..{EAD_MAX_ORDER}"
        ),
        "1-self-bleu" | "embedding" | "nli" => format!("fewer than {PAIRWISE_MIN} responses"),
        "policy-entropy" => "no response tokens".into(),
        other => match other.strip_prefix("distinct-") {
            Some(n) => format!("no response of at least {n} tokens, so no {n}-grams"),
            None => unreachable!("unknown metric {other}"),
        },
    }
}

/// Evaluates `metric` on token sequences; None where it is undefined.
fn metric_value(metric: &str, texts: &[Vec<u32>], vocab_size: usize) -> Option<f64> {
    let distinct = |n: usize| has_ngrams(texts, n).then(|| distinct_n(texts, n));
    match metric {
        "distinct-1" => distinct(1),
        "distinct-2" => distinct(2),
        "distinct-3" => distinct(3),
        "distinct-4" => distinct(4),
        "ead" => has_ngrams(texts, EAD_MAX_ORDER).then(|| ead(texts, vocab_size)),
        "1-self-bleu" => (texts.len() >= PAIRWISE_MIN).then(|| 1.0 - self_bleu(texts)),
        other => unreachable!("unknown metric {other}"),
    }
}

/// Diversity of a samples file whose responses are already tokenised
/// (`tokens[i][k]` = ids of response k of prompt i); `vocab_size` ≥ 1.
pub fn diversity(tokens: &[Vec<Vec<u32>>], vocab_size: usize) -> Vec<MetricSummary> {
    let firsts: Vec<Vec<u32>> = tokens.iter().filter_map(|k| k.first().cloned()).collect();
    METRICS
        .iter()
        .map(|&metric| {
            let per: Vec<Option<f64>> = tokens.iter().map(|k| metric_value(metric, k, vocab_size)).collect();
            MetricSummary::new(metric, &per, metric_value(metric, &firsts, vocab_size))
        })
        .collect()
}

/// Why the policy entropy could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum EntropyError {
    /// A prompt or response could not be tokenised (file, line, field).
    #[error(transparent)]
    Data(#[from] fdpo_data::DataError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] fdpo_model::ModelError),
}

/// Mean per-token entropy (nats) of `model`'s next-token distribution over
/// each response, given its prompt, both tokenised by `fdpo_data`'s one
/// rule with responses scored as written (a samples file holds the
/// generated text, its EOS already stripped; a conversational prompt's
/// response is rendered by the template): per-input mean and std over
/// prompts of the mean over that prompt's responses; across-input over the
/// first responses.
pub fn policy_entropy(
    model: &fdpo_model::CausalLm,
    tokenizer: &fdpo_model::TextTokenizer,
    samples: &[SampleSet],
    device: &candle_core::Device,
) -> Result<MetricSummary, EntropyError> {
    let mut per: Vec<Option<f64>> = Vec::with_capacity(samples.len());
    let mut firsts = Vec::with_capacity(samples.len());
    for s in samples {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = s
            .responses
            .iter()
            .map(|r| {
                let t = fdpo_data::tokenize(
                    tokenizer,
                    &s.prompt,
                    &fdpo_data::Text::Plain(r.clone()),
                    "responses",
                    false,
                )
                .map_err(fdpo_data::DataError::tokenize(&s.at))?;
                Ok((t.prompt, t.response))
            })
            .collect::<Result<_, fdpo_data::DataError>>()?;
        let scored = fdpo_model::logprobs::sequence_logprobs(model, &pairs, tokenizer.pad_id(), device)?;
        let entropies: Vec<f64> = scored.iter().filter(|x| x.tokens > 0).map(|x| x.entropy_mean).collect();
        per.push((!entropies.is_empty()).then(|| mean_std(&entropies).0));
        if let Some(first) = scored.first().filter(|x| x.tokens > 0) {
            firsts.push(first.entropy_mean);
        }
    }
    Ok(MetricSummary::new("policy-entropy", &per, (!firsts.is_empty()).then(|| mean_std(&firsts).0)))
}

/// Sentence-embedding diversity (1 − mean pairwise cosine of the encoder's
/// unit embeddings): per-input over each prompt's responses, across-input
/// over the first responses.
pub fn embedding_diversity(
    encoder: &fdpo_model::encoder::SentenceEncoder,
    samples: &[SampleSet],
) -> Result<MetricSummary, fdpo_model::ModelError> {
    let mut per: Vec<Option<f64>> = Vec::with_capacity(samples.len());
    let mut firsts = Vec::with_capacity(samples.len());
    let pairwise =
        |e: &[Vec<f32>]| (e.len() >= PAIRWISE_MIN).then(|| fdpo_model::encoder::embedding_diversity(e));
    for s in samples {
        let e = encoder.embed(&s.responses)?;
        per.push(pairwise(&e));
        if let Some(first) = e.into_iter().next() {
            firsts.push(first);
        }
    }
    Ok(MetricSummary::new("embedding", &per, pairwise(&firsts)))
}

/// NLI diversity (Stasaski & Hearst 2022) with a BERT/RoBERTa NLI model:
/// per-input over each prompt's responses (all ordered pairs), across-input
/// over the first responses.
pub fn nli_diversity(
    nli: &fdpo_model::bert::NliClassifier,
    samples: &[SampleSet],
) -> Result<MetricSummary, fdpo_model::ModelError> {
    let pairwise = |texts: &[String]| {
        if texts.len() >= PAIRWISE_MIN {
            nli.diversity(texts).map(Some)
        } else {
            Ok(None)
        }
    };
    let per: Vec<Option<f64>> = samples.iter().map(|s| pairwise(&s.responses)).collect::<Result<_, _>>()?;
    let firsts: Vec<String> = samples.iter().filter_map(|s| s.responses.first().cloned()).collect();
    Ok(MetricSummary::new("nli", &per, pairwise(&firsts)?))
}

/// Whitespace words mapped to ids (a vocabulary built over all files), for
/// when no model tokenizer is given.
#[derive(Debug, Default)]
pub struct WordIds {
    ids: std::collections::HashMap<String, u32>,
}

impl WordIds {
    /// Ids of the whitespace-separated words of `text`.
    pub fn encode(&mut self, text: &str) -> Vec<u32> {
        text.split_whitespace()
            .map(|w| {
                let next = self.ids.len() as u32;
                *self.ids.entry(w.to_string()).or_insert(next)
            })
            .collect()
    }
}

/// Tokenises every response of `samples` with `encode`.
pub fn tokenize(samples: &[SampleSet], mut encode: impl FnMut(&str) -> Vec<u32>) -> Vec<Vec<Vec<u32>>> {
    samples.iter().map(|s| s.responses.iter().map(|r| encode(r)).collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identical responses per prompt: per-input distinct-n is that of one
    /// response repeated; across-input sees different prompts' responses.
    #[test]
    fn per_input_and_across_input_differ_as_they_should() {
        let mut words = WordIds::default();
        let samples = vec![
            SampleSet::new("p", vec!["a b c g".into(), "a b c g".into()]),
            SampleSet::new("q", vec!["d e f h".into(), "d e f h".into()]),
        ];
        let tokens = tokenize(&samples, |t| words.encode(t));
        let report = diversity(&tokens, 50_257);
        let d1 = &report[0];
        assert_eq!(d1.metric, "distinct-1");
        assert!((d1.per_input_mean - 0.5).abs() < 1e-15 && d1.per_input_std == 0.0);
        assert!((d1.across_input - 1.0).abs() < 1e-15);
        let bleu = report.iter().find(|m| m.metric == "1-self-bleu").unwrap();
        assert!(bleu.per_input_mean.abs() < 1e-12, "copies have self-BLEU 1");
        assert!(bleu.across_input > 0.99, "disjoint responses across prompts");
    }

    /// A prompt for which a metric is undefined is left out of that
    /// metric's mean and std (not counted as 0 or 1): p has two 5-word
    /// responses, q one 1-word response. Expected values by hand.
    #[test]
    fn undefined_prompts_are_left_out_of_the_per_input_mean() {
        let mut words = WordIds::default();
        let set = |p: &str, r: &[&str]| SampleSet::new(p, r.iter().map(|x| x.to_string()).collect());
        let samples = vec![set("p", &["a b c d e", "a b c d f"]), set("q", &["x"])];
        let report = diversity(&tokenize(&samples, |t| words.encode(t)), 50_257);
        let get = |name: &str| report.iter().find(|m| m.metric == name).unwrap();
        // distinct-1 is defined for both: p 6 of 10 unigrams, q 1 of 1.
        assert_eq!(get("distinct-1").prompts_counted, 2);
        assert!((get("distinct-1").per_input_mean - 0.8).abs() < 1e-15);
        // distinct-2: q has no bigrams; p has 5 distinct of 8.
        let d2 = get("distinct-2");
        assert_eq!((d2.prompts_counted, d2.per_input_mean, d2.per_input_std), (1, 0.625, 0.0));
        // EAD needs a 5-gram; self-BLEU two responses: only p counts.
        assert_eq!(get("ead").prompts_counted, 1);
        let bleu = get("1-self-bleu");
        assert_eq!(bleu.prompts_counted, 1);
        let tokens_p = tokenize(&samples[..1], |t| words.encode(t));
        assert_eq!(bleu.per_input_mean, 1.0 - self_bleu(&tokens_p[0]));
        // Across-input sees two first responses, so self-BLEU is defined there.
        assert!(bleu.across_input.is_finite());
        // With one prompt, across-input self-BLEU is undefined: NaN, null in JSON.
        let one = diversity(&tokenize(&samples[1..], |t| words.encode(t)), 50_257);
        let bleu = one.iter().find(|m| m.metric == "1-self-bleu").unwrap();
        assert!(bleu.per_input_mean.is_nan() && bleu.across_input.is_nan() && bleu.prompts_counted == 0);
        assert!(serde_json::to_value(bleu).unwrap()["across_input"].is_null());
        assert_eq!(undefined_when("distinct-3"), "no response of at least 3 tokens, so no 3-grams");
        assert_eq!(undefined_when("nli"), "fewer than 2 responses");
    }
}
