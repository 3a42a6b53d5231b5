//! Per-input and across-input diversity of a samples file (Kirk et al. 2023):
//! per-input, the metric on each prompt's K responses, then its mean and
//! standard deviation over prompts; across-input, the metric on the first
//! response of every prompt.

use fdpo_core::diversity::{distinct_n, ead, mean_std, self_bleu};
use serde::Serialize;

use crate::samples::SampleSet;

/// The metrics, in report order: (name, function of token sequences).
pub const METRICS: [&str; 6] = ["distinct-1", "distinct-2", "distinct-3", "distinct-4", "ead", "1-self-bleu"];

/// One metric of one file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricSummary {
    /// The metric's name (see [`METRICS`]).
    pub metric: String,
    /// Mean over prompts of the metric on that prompt's responses.
    pub per_input_mean: f64,
    /// Standard deviation over prompts.
    pub per_input_std: f64,
    /// The metric on the first response of every prompt.
    pub across_input: f64,
}

/// Evaluates `metric` on token sequences.
fn metric_value(metric: &str, texts: &[Vec<u32>], vocab_size: usize) -> f64 {
    match metric {
        "distinct-1" => distinct_n(texts, 1),
        "distinct-2" => distinct_n(texts, 2),
        "distinct-3" => distinct_n(texts, 3),
        "distinct-4" => distinct_n(texts, 4),
        "ead" => ead(texts, vocab_size),
        "1-self-bleu" => 1.0 - self_bleu(texts),
        other => unreachable!("unknown metric {other}"),
    }
}

/// Diversity of a samples file whose responses are already tokenised
/// (`tokens[i][k]` = ids of response k of prompt i).
pub fn diversity(tokens: &[Vec<Vec<u32>>], vocab_size: usize) -> Vec<MetricSummary> {
    METRICS
        .iter()
        .map(|&metric| {
            let per: Vec<f64> = tokens.iter().map(|k| metric_value(metric, k, vocab_size)).collect();
            let (mean, std) = mean_std(&per);
            let firsts: Vec<Vec<u32>> = tokens.iter().filter_map(|k| k.first().cloned()).collect();
            MetricSummary {
                metric: metric.into(),
                per_input_mean: mean,
                per_input_std: std,
                across_input: metric_value(metric, &firsts, vocab_size),
            }
        })
        .collect()
}

/// Mean per-token entropy (nats) of `model`'s next-token distribution over
/// each response, given its prompt (tokenised as the trainer does: prompt
/// with special tokens or rendered with the chat template, response
/// without): per-input mean and std over prompts of the mean over that
/// prompt's responses; across-input over the first responses.
pub fn policy_entropy(
    model: &fdpo_model::CausalLm,
    tokenizer: &fdpo_model::TextTokenizer,
    samples: &[SampleSet],
    device: &candle_core::Device,
) -> Result<MetricSummary, fdpo_model::ModelError> {
    let mut per = Vec::with_capacity(samples.len());
    let mut firsts = Vec::with_capacity(samples.len());
    for s in samples {
        let prompt_ids = if s.prompt_is_messages {
            let messages: Vec<fdpo_model::ChatMessage> =
                serde_json::from_str(&s.prompt).map_err(|e| fdpo_model::ModelError::Template {
                    path: "samples".into(),
                    message: format!("prompt messages: {e}"),
                })?;
            tokenizer.encode(&tokenizer.apply_chat_template(&messages, true)?, false)?
        } else {
            tokenizer.encode(&s.prompt, true)?
        };
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = s
            .responses
            .iter()
            .map(|r| Ok((prompt_ids.clone(), tokenizer.encode(r, false)?)))
            .collect::<Result<_, fdpo_model::ModelError>>()?;
        let scored = fdpo_model::logprobs::sequence_logprobs(model, &pairs, tokenizer.pad_id(), device)?;
        let entropies: Vec<f64> = scored.iter().filter(|x| x.tokens > 0).map(|x| x.entropy_mean).collect();
        per.push(mean_std(&entropies).0);
        if let Some(first) = scored.first().filter(|x| x.tokens > 0) {
            firsts.push(first.entropy_mean);
        }
    }
    let (mean, std) = mean_std(&per);
    Ok(MetricSummary {
        metric: "policy-entropy".into(),
        per_input_mean: mean,
        per_input_std: std,
        across_input: mean_std(&firsts).0,
    })
}

/// Sentence-embedding diversity (1 − mean pairwise cosine of the encoder's
/// unit embeddings): per-input over each prompt's responses, across-input
/// over the first responses.
pub fn embedding_diversity(
    encoder: &fdpo_model::encoder::SentenceEncoder,
    samples: &[SampleSet],
) -> Result<MetricSummary, fdpo_model::ModelError> {
    let mut per = Vec::with_capacity(samples.len());
    let mut firsts = Vec::with_capacity(samples.len());
    for s in samples {
        let e = encoder.embed(&s.responses)?;
        per.push(fdpo_model::encoder::embedding_diversity(&e));
        if let Some(first) = e.into_iter().next() {
            firsts.push(first);
        }
    }
    let (mean, std) = mean_std(&per);
    Ok(MetricSummary {
        metric: "embedding".into(),
        per_input_mean: mean,
        per_input_std: std,
        across_input: fdpo_model::encoder::embedding_diversity(&firsts),
    })
}

/// NLI diversity (Stasaski & Hearst 2022) with a BERT/RoBERTa NLI model:
/// per-input over each prompt's responses (all ordered pairs), across-input
/// over the first responses.
pub fn nli_diversity(
    nli: &fdpo_model::bert::NliClassifier,
    samples: &[SampleSet],
) -> Result<MetricSummary, fdpo_model::ModelError> {
    let per: Vec<f64> = samples.iter().map(|s| nli.diversity(&s.responses)).collect::<Result<_, _>>()?;
    let firsts: Vec<String> = samples.iter().filter_map(|s| s.responses.first().cloned()).collect();
    let (mean, std) = mean_std(&per);
    Ok(MetricSummary {
        metric: "nli".into(),
        per_input_mean: mean,
        per_input_std: std,
        across_input: nli.diversity(&firsts)?,
    })
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
            SampleSet {
                prompt: "p".into(),
                prompt_is_messages: false,
                responses: vec!["a b c g".into(), "a b c g".into()],
            },
            SampleSet {
                prompt: "q".into(),
                prompt_is_messages: false,
                responses: vec!["d e f h".into(), "d e f h".into()],
            },
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
}
