//! Exact-lab instances: prompts, each with a finite list of responses carrying
//! a reference log-probability (or probability) and a reward.
//!
//! File format (JSON):
//! `{"prompts": [{"id": "p0", "responses": [{"text": "...", "ref_logprob": -1.2, "reward": 0.3}]}]}`.
//! `ref_prob` may replace `ref_logprob`; `id` and `text` are optional.
//! `ref_logprob` must be <= 0 and `ref_prob` >= 0. Reference values that do
//! not sum to one are normalised per prompt and the
//! loader reports which prompts it normalised. Every error names the prompt
//! index, the response index and the field.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::{json, Map, Value};

use crate::normalise_ref_logprobs;

/// One prompt of an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The prompt's id (`p<index>` when the file has none).
    pub id: String,
    /// Response texts ("" when the file has none).
    pub texts: Vec<String>,
    /// log π_ref(y|x), normalised to sum to one.
    pub ref_logprobs: Vec<f64>,
    /// r(x, y).
    pub rewards: Vec<f64>,
}

/// A set of prompts with finite response lists.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Instance {
    /// The prompts, in file order.
    pub prompts: Vec<Prompt>,
}

/// What is wrong with an instance file; the message names where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InstanceError {
    /// Not JSON at all.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// A field is wrong; `location` is e.g. `prompts[2].responses[0].reward`.
    #[error("{location}: {message}")]
    Field {
        /// Path of the offending field.
        location: String,
        /// What is wrong with it.
        message: String,
    },
}

fn field_error(location: impl Into<String>, message: impl Into<String>) -> InstanceError {
    InstanceError::Field { location: location.into(), message: message.into() }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn number(obj: &Map<String, Value>, key: &str, at: &str) -> Result<Option<f64>, InstanceError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(field_error(format!("{at}.{key}"), "must be a finite number")),
        },
        // NaN/Infinity, bare (as Python's json writes them, quoted by
        // `quote_non_finite`) or as strings.
        Some(Value::String(s)) if s.parse::<f64>().is_ok() => {
            Err(field_error(format!("{at}.{key}"), format!("must be a finite number, got {s}")))
        }
        Some(other) => {
            Err(field_error(format!("{at}.{key}"), format!("expected a number, found {}", type_name(other))))
        }
    }
}

/// The result of loading: the instance and the ids of prompts whose
/// reference values were normalised because they did not sum to one.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The validated instance.
    pub instance: Instance,
    /// Prompts whose reference values summed to something other than 1.
    pub normalised: Vec<String>,
}

/// Puts quotes around the bare `NaN`, `Infinity` and `-Infinity` tokens that
/// Python's `json` module writes (outside strings), so that the parse
/// succeeds and validation can name the field that holds them.
fn quote_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("NaN") && !text.contains("Infinity") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if let Some(token) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

impl Instance {
    /// Parses and validates an instance from JSON text.
    ///
    /// ```
    /// let text = r#"{"prompts": [{"responses": [
    ///     {"ref_prob": 2, "reward": 1}, {"ref_prob": 2, "reward": 0}]}]}"#;
    /// let loaded = fdpo_core::Instance::from_json(text).unwrap();
    /// assert_eq!(loaded.normalised, vec!["p0".to_string()]);
    /// assert!((loaded.instance.prompts[0].ref_logprobs[0] - 0.5f64.ln()).abs() < 1e-15);
    /// ```
    pub fn from_json(text: &str) -> Result<Loaded, InstanceError> {
        let text = quote_non_finite(text);
        let root: Value = serde_json::from_str(&text).map_err(|e| InstanceError::Json(e.to_string()))?;
        let root = root.as_object().ok_or_else(|| {
            field_error("(top level)", format!("expected an object, found {}", type_name(&root)))
        })?;
        let prompts = match root.get("prompts") {
            None => return Err(field_error("prompts", "missing field")),
            Some(Value::Array(a)) => a,
            Some(other) => {
                return Err(field_error("prompts", format!("expected an array, found {}", type_name(other))))
            }
        };
        if prompts.is_empty() {
            return Err(field_error("prompts", "the list of prompts is empty"));
        }
        let mut out = Instance::default();
        let mut normalised = Vec::new();
        for (p, prompt) in prompts.iter().enumerate() {
            let at = format!("prompts[{p}]");
            let obj = prompt.as_object().ok_or_else(|| {
                field_error(&at, format!("expected an object, found {}", type_name(prompt)))
            })?;
            let id = match obj.get("id") {
                None => format!("p{p}"),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(other) => {
                    return Err(field_error(
                        format!("{at}.id"),
                        format!("expected a string, found {}", type_name(other)),
                    ))
                }
            };
            let responses = match obj.get("responses") {
                None => return Err(field_error(format!("{at}.responses"), "missing field")),
                Some(Value::Array(a)) if a.is_empty() => {
                    return Err(field_error(format!("{at}.responses"), "the response list is empty"))
                }
                Some(Value::Array(a)) => a,
                Some(other) => {
                    return Err(field_error(
                        format!("{at}.responses"),
                        format!("expected an array, found {}", type_name(other)),
                    ))
                }
            };
            let mut parsed = Prompt { id, texts: vec![], ref_logprobs: vec![], rewards: vec![] };
            for (r, response) in responses.iter().enumerate() {
                let at = format!("{at}.responses[{r}]");
                let obj = response.as_object().ok_or_else(|| {
                    field_error(&at, format!("expected an object, found {}", type_name(response)))
                })?;
                let text = match obj.get("text") {
                    None => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => {
                        return Err(field_error(
                            format!("{at}.text"),
                            format!("expected a string, found {}", type_name(other)),
                        ))
                    }
                };
                let reward = number(obj, "reward", &at)?
                    .ok_or_else(|| field_error(format!("{at}.reward"), "missing field"))?;
                let log_prob = match (number(obj, "ref_logprob", &at)?, number(obj, "ref_prob", &at)?) {
                    (Some(_), Some(_)) => {
                        return Err(field_error(&at, "give either `ref_logprob` or `ref_prob`, not both"))
                    }
                    (None, None) => {
                        return Err(field_error(
                            format!("{at}.ref_logprob"),
                            "missing field (or give `ref_prob`)",
                        ))
                    }
                    (Some(l), None) if l > 0.0 => {
                        return Err(field_error(
                            format!("{at}.ref_logprob"),
                            format!("must be <= 0, got {l}"),
                        ))
                    }
                    (Some(l), None) => l,
                    (None, Some(prob)) if prob < 0.0 => {
                        return Err(field_error(
                            format!("{at}.ref_prob"),
                            format!("must be >= 0, got {prob}"),
                        ))
                    }
                    (None, Some(prob)) => prob.ln(),
                };
                parsed.texts.push(text);
                parsed.rewards.push(reward);
                parsed.ref_logprobs.push(log_prob);
            }
            let (log_q, log_total) = normalise_ref_logprobs(&parsed.ref_logprobs).map_err(|_| {
                field_error(format!("{at}.responses"), "every response has zero reference probability")
            })?;
            if log_total.abs() > 1e-9 {
                normalised.push(parsed.id.clone());
            }
            parsed.ref_logprobs = log_q;
            out.prompts.push(parsed);
        }
        Ok(Loaded { instance: out, normalised })
    }

    /// The instance as JSON in the file format (with `ref_logprob`).
    pub fn to_json(&self) -> Value {
        let prompts: Vec<Value> = self
            .prompts
            .iter()
            .map(|p| {
                let responses: Vec<Value> = (0..p.rewards.len())
                    .map(|i| json!({"text": p.texts[i], "ref_logprob": p.ref_logprobs[i], "reward": p.rewards[i]}))
                    .collect();
                json!({"id": p.id, "responses": responses})
            })
            .collect();
        json!({ "prompts": prompts })
    }

    /// A seeded random instance: `prompts` prompts of `responses` responses.
    ///
    /// Reference log-probabilities are a softmax of N(0, 2²) logits, so the
    /// reference has a few likely and many rare responses, as a language
    /// model does; rewards are N(0, 1); texts are 1–12 words, so that length
    /// varies (the length-bias error model uses it).
    ///
    /// ```
    /// let a = fdpo_core::Instance::random(7, 3, 5);
    /// assert_eq!(a, fdpo_core::Instance::random(7, 3, 5));
    /// assert_eq!(a.prompts[2].rewards.len(), 5);
    /// ```
    pub fn random(seed: u64, prompts: usize, responses: usize) -> Instance {
        const WORDS: [&str; 12] = [
            "good", "bad", "fine", "great", "plot", "film", "acting", "very", "not", "really", "story", "end",
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let logit = Normal::new(0.0, 2.0).expect("valid normal");
        let reward = Normal::new(0.0, 1.0).expect("valid normal");
        let prompts = (0..prompts)
            .map(|p| {
                let logits: Vec<f64> = (0..responses).map(|_| logit.sample(&mut rng)).collect();
                let (ref_logprobs, _) =
                    normalise_ref_logprobs(&logits).expect("finite logits have positive mass");
                let rewards = (0..responses).map(|_| reward.sample(&mut rng)).collect();
                let texts = (0..responses)
                    .map(|_| {
                        let n = rng.random_range(1..=12);
                        (0..n).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect::<Vec<_>>().join(" ")
                    })
                    .collect();
                Prompt { id: format!("p{p}"), texts, ref_logprobs, rewards }
            })
            .collect();
        Instance { prompts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Instance::from_json(text).unwrap_err().to_string()
    }

    #[test]
    fn malformed_files_name_prompt_and_field() {
        assert!(err("{not json").starts_with("invalid JSON"));
        assert_eq!(err("[]"), "(top level): expected an object, found an array");
        assert_eq!(err("{}"), "prompts: missing field");
        assert_eq!(err(r#"{"prompts": []}"#), "prompts: the list of prompts is empty");
        let ok = r#"{"ref_prob": 0.5, "reward": 1}"#;
        assert_eq!(
            err(&format!(r#"{{"prompts": [{{"responses": [{ok}]}}, {{"responses": []}}]}}"#)),
            "prompts[1].responses: the response list is empty"
        );
        assert_eq!(
            err(&format!(r#"{{"prompts": [{{"responses": [{ok}, {{"ref_prob": -0.1, "reward": 1}}]}}]}}"#)),
            "prompts[0].responses[1].ref_prob: must be >= 0, got -0.1"
        );
        // A log-probability is at most 0 (it used to be accepted and renormalised).
        assert_eq!(
            err(r#"{"prompts": [{"responses": [{"ref_logprob": 0.5, "reward": 1}]}]}"#),
            "prompts[0].responses[0].ref_logprob: must be <= 0, got 0.5"
        );
        assert_eq!(
            err(r#"{"prompts": [{"responses": [{"ref_prob": 0.5}]}]}"#),
            "prompts[0].responses[0].reward: missing field"
        );
        assert_eq!(
            err(r#"{"prompts": [{"responses": [{"ref_prob": 0.5, "reward": "high"}]}]}"#),
            "prompts[0].responses[0].reward: expected a number, found a string"
        );
        assert_eq!(
            err(r#"{"prompts": [{"responses": [{"ref_prob": "NaN", "reward": 1}]}]}"#),
            "prompts[0].responses[0].ref_prob: must be a finite number, got NaN"
        );
        // Python's json.dumps writes NaN and Infinity bare.
        assert_eq!(
            err(
                r#"{"prompts": [{"responses": [{"ref_prob": 1, "reward": 0}, {"ref_prob": NaN, "reward": 1}]}]}"#
            ),
            "prompts[0].responses[1].ref_prob: must be a finite number, got NaN"
        );
        assert_eq!(
            err(r#"{"prompts": [{"responses": [{"ref_logprob": -Infinity, "reward": 1}]}]}"#),
            "prompts[0].responses[0].ref_logprob: must be a finite number, got -Infinity"
        );
        // The same words inside strings are left alone.
        let ok_text =
            r#"{"prompts": [{"responses": [{"text": "NaN \" Infinity", "ref_prob": 1, "reward": 0}]}]}"#;
        assert_eq!(Instance::from_json(ok_text).unwrap().instance.prompts[0].texts[0], "NaN \" Infinity");
        assert_eq!(
            err(r#"{"prompts": [{"responses": [{"reward": 1}]}]}"#),
            "prompts[0].responses[0].ref_logprob: missing field (or give `ref_prob`)"
        );
        assert_eq!(
            err(r#"{"prompts": [{"responses": [{"ref_prob": 0, "reward": 1}]}]}"#),
            "prompts[0].responses: every response has zero reference probability"
        );
        assert_eq!(
            err(r#"{"prompts": [{"responses": {"a": 1}}]}"#),
            "prompts[0].responses: expected an array, found an object"
        );
    }

    #[test]
    fn normalisation_is_reported_only_when_needed() {
        let text = r#"{"prompts": [
            {"id": "a", "responses": [{"ref_logprob": -0.6931471805599453, "reward": 0}, {"ref_prob": 0.5, "reward": 1}]},
            {"id": "b", "responses": [{"ref_prob": 3, "reward": 0}, {"ref_prob": 1, "reward": 1}]}]}"#;
        let loaded = Instance::from_json(text).unwrap();
        assert_eq!(loaded.normalised, vec!["b".to_string()]);
        let b = &loaded.instance.prompts[1];
        assert!((b.ref_logprobs[0].exp() - 0.75).abs() < 1e-15);
    }

    #[test]
    fn json_round_trip() {
        let inst = Instance::random(1, 2, 4);
        let back = Instance::from_json(&inst.to_json().to_string()).unwrap();
        assert!(back.normalised.is_empty());
        for (a, b) in inst.prompts.iter().zip(&back.instance.prompts) {
            assert_eq!(a.texts, b.texts);
            assert_eq!(a.rewards, b.rewards);
            for (x, y) in a.ref_logprobs.iter().zip(&b.ref_logprobs) {
                assert!((x - y).abs() < 1e-14);
            }
        }
    }
}
