//! Samples files: one `{"prompt": ..., "responses": [...]}` object per line
//! (other fields are kept but ignored). Errors name the file, line and field.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// One prompt and its sampled responses.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSet {
    /// The prompt (a string, or messages as JSON text).
    pub prompt: String,
    /// Whether `prompt` is a JSON list of chat messages.
    pub prompt_is_messages: bool,
    /// The responses, in file order.
    pub responses: Vec<String>,
    /// The line of the file it came from (1-based; 0 when not from a file).
    pub line: usize,
}

/// What is wrong with a samples file.
#[derive(Debug, thiserror::Error)]
pub enum SamplesError {
    /// Reading failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is wrong.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong, naming the field.
        message: String,
    },
    /// No prompts at all.
    #[error("{path}: no samples")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// Reads a samples file.
pub fn read_samples(path: &Path) -> Result<Vec<SampleSet>, SamplesError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| SamplesError::Io { path: path.into(), source })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| SamplesError::Line { path: path.into(), line: i + 1, message };
        let value: Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
        let (prompt, prompt_is_messages) = match obj.get("prompt") {
            Some(Value::String(s)) => (s.clone(), false),
            Some(v @ Value::Array(_)) => (v.to_string(), true),
            Some(other) => {
                return Err(err(format!("field `prompt`: expected a string or messages, found {other}")))
            }
            None => return Err(err("missing field `prompt`".into())),
        };
        let responses = match obj.get("responses") {
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(k, r)| {
                    r.as_str()
                        .map(String::from)
                        .ok_or_else(|| err(format!("field `responses[{k}]`: expected a string, found {r}")))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(err(format!("field `responses`: expected a list of strings, found {other}")))
            }
            None => return Err(err("missing field `responses`".into())),
        };
        if responses.is_empty() {
            return Err(err("field `responses`: the list is empty".into()));
        }
        out.push(SampleSet { prompt, prompt_is_messages, responses, line: i + 1 });
    }
    if out.is_empty() {
        return Err(SamplesError::Empty { path: path.into() });
    }
    Ok(out)
}
