//! The built-in task of `fdpo demo`: short film reviews from a small
//! probabilistic grammar, in the spirit of the IMDb sentiment experiments of
//! the DPO and f-DPO papers, small enough to train on a CPU.
//!
//! A prompt names a genre (`horror review :`); a response fills six slots,
//! `opener subject verb adjective connector adjective` (e.g. `frankly the
//! music was dull but great` without the article: `frankly music was dull
//! but great`). Each genre has a mood that tilts its adjectives, and its
//! own weights for the neutral slots, drawn from the seed, so the corpus has
//! real entropy (about 6–7 nats per response). After `but` the second
//! adjective leans against the mood. The true reward is the sentiment of
//! the response: adjectives score from −2 (`awful`) to 2 (`superb`),
//! weighted ½–½ after `and`, 0.3–0.7 after `but`.
//!
//! The grammar's responses are few (3·5·2·8·2·8 = 3,840 per prompt), so the
//! exact optimum of any divergence is computed over all of them.

use std::path::Path;

use candle_core::Tensor;
use fdpo_model::{ModelError, Weights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// Genres: one prompt each.
pub const GENRES: [&str; 8] =
    ["horror", "comedy", "drama", "western", "musical", "thriller", "romance", "documentary"];
/// First slot.
pub const OPENERS: [&str; 3] = ["honestly", "overall", "frankly"];
/// Second slot.
pub const SUBJECTS: [&str; 5] = ["plot", "acting", "music", "ending", "pacing"];
/// Third slot.
pub const VERBS: [&str; 2] = ["was", "felt"];
/// Fourth and sixth slots, with their sentiment.
pub const ADJECTIVES: [(&str, f64); 8] = [
    ("awful", -2.0),
    ("bad", -1.4),
    ("dull", -0.8),
    ("okay", 0.0),
    ("decent", 0.6),
    ("good", 1.2),
    ("great", 1.7),
    ("superb", 2.0),
];
/// Fifth slot.
pub const CONNECTORS: [&str; 2] = ["and", "but"];

/// Special tokens of the task's tokenizer, ids 0..4.
const SPECIALS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];

/// A response: one index per slot.
pub type Choice = [usize; 6];

/// One genre's weights.
#[derive(Debug, Clone, PartialEq)]
struct Genre {
    mood: f64,
    opener: Vec<f64>,
    subject: Vec<f64>,
    verb: Vec<f64>,
}

/// The task for a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewTask {
    genres: Vec<Genre>,
}

fn normalised(mut w: Vec<f64>) -> Vec<f64> {
    let total: f64 = w.iter().sum();
    w.iter_mut().for_each(|x| *x /= total);
    w
}

/// Adjective probabilities for a mood: ∝ exp(−(s − mood)²/(2·1.2²)).
fn adjective_weights(mood: f64) -> Vec<f64> {
    normalised(ADJECTIVES.iter().map(|(_, s)| (-(s - mood).powi(2) / (2.0 * 1.44)).exp()).collect())
}

fn draw(weights: &[f64], rng: &mut impl Rng) -> usize {
    let mut u: f64 = rng.random();
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.len() - 1
}

/// Probability of "and" as the connector.
const P_AND: f64 = 0.65;

impl ReviewTask {
    /// The task of `seed`: each genre's mood in [−1, 1] and slot weights.
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut weights = |n: usize| normalised((0..n).map(|_| rng.random_range(0.5..1.5)).collect());
        let genres = (0..GENRES.len())
            .map(|_| {
                let opener = weights(OPENERS.len());
                let subject = weights(SUBJECTS.len());
                let verb = weights(VERBS.len());
                Genre { mood: 0.0, opener, subject, verb }
            })
            .collect::<Vec<_>>();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let genres = genres.into_iter().map(|g| Genre { mood: rng.random_range(-1.0..1.0), ..g }).collect();
        ReviewTask { genres }
    }

    /// The prompt of every genre, in order.
    pub fn prompts(&self) -> Vec<String> {
        GENRES.iter().map(|g| format!("{g} review :")).collect()
    }

    /// The second adjective's weights given the connector.
    fn second_weights(&self, genre: usize, connector: usize) -> Vec<f64> {
        let m = self.genres[genre].mood;
        adjective_weights(if connector == 0 { m } else { -m })
    }

    /// Draws a response for `genre`.
    pub fn sample(&self, genre: usize, rng: &mut impl Rng) -> Choice {
        let g = &self.genres[genre];
        let connector = usize::from(rng.random::<f64>() >= P_AND);
        [
            draw(&g.opener, rng),
            draw(&g.subject, rng),
            draw(&g.verb, rng),
            draw(&adjective_weights(g.mood), rng),
            connector,
            draw(&self.second_weights(genre, connector), rng),
        ]
    }

    /// The grammar's probability of `choice` for `genre`.
    pub fn probability(&self, genre: usize, c: &Choice) -> f64 {
        let g = &self.genres[genre];
        let connector = if c[4] == 0 { P_AND } else { 1.0 - P_AND };
        g.opener[c[0]]
            * g.subject[c[1]]
            * g.verb[c[2]]
            * adjective_weights(g.mood)[c[3]]
            * connector
            * self.second_weights(genre, c[4])[c[5]]
    }

    /// Every response of the grammar.
    pub fn enumerate() -> Vec<Choice> {
        let mut out = Vec::with_capacity(3840);
        for a in 0..OPENERS.len() {
            for b in 0..SUBJECTS.len() {
                for c in 0..VERBS.len() {
                    for d in 0..ADJECTIVES.len() {
                        for e in 0..CONNECTORS.len() {
                            for f in 0..ADJECTIVES.len() {
                                out.push([a, b, c, d, e, f]);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The response's words joined by spaces.
    pub fn text(c: &Choice) -> String {
        [OPENERS[c[0]], SUBJECTS[c[1]], VERBS[c[2]], ADJECTIVES[c[3]].0, CONNECTORS[c[4]], ADJECTIVES[c[5]].0]
            .join(" ")
    }

    /// The true reward of any text: the sentiment words' scores, weighted
    /// equally, except that those after the first `but` share 0.7 of the
    /// weight and those before it 0.3 (when both sides have some); 0 when
    /// the text has none.
    pub fn reward(text: &str) -> f64 {
        let words: Vec<&str> = text.split_whitespace().collect();
        let score = |w: &str| ADJECTIVES.iter().find(|(a, _)| *a == w).map(|(_, s)| *s);
        let but = words.iter().position(|w| *w == "but");
        let side = |ws: &[&str]| -> Vec<f64> { ws.iter().filter_map(|w| score(w)).collect() };
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        match but {
            Some(b) => {
                let (before, after) = (side(&words[..b]), side(&words[b + 1..]));
                match (before.is_empty(), after.is_empty()) {
                    (false, false) => 0.3 * mean(&before) + 0.7 * mean(&after),
                    (true, false) => mean(&after),
                    (false, true) => mean(&before),
                    (true, true) => 0.0,
                }
            }
            None => {
                let all = side(&words);
                if all.is_empty() {
                    0.0
                } else {
                    mean(&all)
                }
            }
        }
    }

    /// Every word of the task's vocabulary after the special tokens.
    fn words() -> Vec<&'static str> {
        let mut words = vec!["review", ":"];
        words.extend(GENRES);
        words.extend(OPENERS);
        words.extend(SUBJECTS);
        words.extend(VERBS);
        words.extend(ADJECTIVES.iter().map(|(w, _)| *w));
        words.extend(CONNECTORS);
        words
    }

    /// Vocabulary size (special tokens included).
    pub fn vocab_size() -> usize {
        SPECIALS.len() + Self::words().len()
    }

    /// Writes a word-level tokenizer (tokenizer.json, BOS added to prompts,
    /// whitespace splitting), tokenizer_config.json, generation_config.json
    /// and a Llama config.json of the given sizes into `dir`.
    pub fn write_model_files(dir: &Path, hidden: usize, layers: usize, heads: usize) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut vocab = serde_json::Map::new();
        for (i, w) in SPECIALS.iter().chain(Self::words().iter()).enumerate() {
            vocab.insert((*w).to_string(), i.into());
        }
        let added: Vec<_> = SPECIALS
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
            },
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        let write = |name: &str, value: serde_json::Value| {
            fdpo_core::write_atomic(
                &dir.join(name),
                serde_json::to_string_pretty(&value).expect("json").as_bytes(),
            )
        };
        write("tokenizer.json", tokenizer)?;
        write(
            "tokenizer_config.json",
            json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "model_max_length": 32, "tokenizer_class": "PreTrainedTokenizerFast"}),
        )?;
        write("generation_config.json", json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))?;
        write(
            "config.json",
            json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": Self::vocab_size(), "hidden_size": hidden, "intermediate_size": hidden * 8 / 3,
                "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
                "head_dim": hidden / heads, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "max_position_embeddings": 32, "tie_word_embeddings": false,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
                "attention_bias": false, "mlp_bias": false, "torch_dtype": "float32"
            }),
        )
    }
}

/// Sets every variable of a freshly built model from `seed`: matrices
/// N(0, 0.02²) (Box–Muller on ChaCha8), norm scales 1, biases 0 — so the
/// demo's reference is the same on every machine for a seed.
pub fn seeded_init(weights: &Weights, seed: u64) -> Result<(), ModelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in weights.vars() {
        let shape = var.dims().to_vec();
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if shape.len() == 1 {
            vec![1.0; n]
        } else {
            (0..n)
                .map(|_| {
                    let (u, v): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
                    (0.02 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
                .collect()
        };
        var.set(&Tensor::from_vec(values, shape, var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_and_a_distribution() {
        let (a, b) = (ReviewTask::new(7), ReviewTask::new(7));
        assert_eq!(a, b);
        assert_ne!(a, ReviewTask::new(8));
        let draws = |t: &ReviewTask| {
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            (0..50).map(|i| t.sample(i % 8, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draws(&a), draws(&b));
        let all = ReviewTask::enumerate();
        assert_eq!(all.len(), 3840);
        for g in 0..GENRES.len() {
            let total: f64 = all.iter().map(|c| a.probability(g, c)).sum();
            assert!((total - 1.0).abs() < 1e-12, "genre {g}: {total}");
            // Real entropy.
            let h: f64 = all.iter().map(|c| a.probability(g, c)).map(|p| -p * p.ln()).sum();
            assert!(h > 5.0, "genre {g}: entropy {h}");
        }
        // Empirical frequencies follow the probabilities.
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let target = all[0];
        let hits = (0..200_000).filter(|_| a.sample(0, &mut rng) == target).count() as f64 / 200_000.0;
        let p = a.probability(0, &target);
        assert!((hits - p).abs() < 4.0 * (p / 200_000.0).sqrt() + 1e-5, "{hits} vs {p}");
    }

    #[test]
    fn reward_is_the_weighted_sentiment() {
        assert_eq!(ReviewTask::reward("honestly plot was awful and superb"), 0.0);
        assert!(
            (ReviewTask::reward("honestly plot was awful but superb") - (0.3 * -2.0 + 0.7 * 2.0)).abs()
                < 1e-12
        );
        assert_eq!(ReviewTask::reward("plot was"), 0.0);
        assert_eq!(ReviewTask::reward("good good"), 1.2);
        let c = [0, 1, 0, 5, 1, 2];
        assert_eq!(ReviewTask::text(&c), "honestly acting was good but dull");
    }
}
