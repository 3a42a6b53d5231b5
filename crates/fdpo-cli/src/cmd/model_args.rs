//! Options shared by the commands that load a model, and JSONL reading with
//! `file:line: field` errors.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use fdpo_model::{CausalLm, ChatMessage, TextTokenizer};
use serde_json::{Map, Value};

/// Where the model is and what it runs on.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A local Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Working dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// A loaded model with its tokenizer.
pub struct Loaded {
    /// The model.
    pub model: CausalLm,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Where it runs.
    pub device: Device,
}

impl ModelArgs {
    /// Loads the model and tokenizer.
    pub fn load(&self) -> Result<Loaded> {
        let device = fdpo_model::device(&self.device)?;
        let dtype = fdpo_model::dtype(&self.dtype)?;
        let (model, _) = CausalLm::load(&self.model, dtype, &device)
            .with_context(|| format!("loading {}", self.model.display()))?;
        let tokenizer = TextTokenizer::load(&self.model)?;
        Ok(Loaded { model, tokenizer, device })
    }
}

/// Non-empty lines of a JSONL file, parsed, with their line numbers.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
        match value {
            Value::Object(obj) => out.push((i + 1, obj)),
            _ => bail!("{}:{}: expected a JSON object", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Text of `field` in a JSONL record: a string, or a list of chat messages
/// (rendered with the chat template; `generation_prompt` for prompts).
pub fn text_field(
    obj: &Map<String, Value>,
    field: &str,
    at: &str,
    tokenizer: &TextTokenizer,
    generation_prompt: bool,
) -> Result<Option<(String, bool)>> {
    match obj.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some((s.clone(), false))),
        Some(Value::Array(_)) => {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(obj[field].clone()).with_context(|| {
                    format!("{at}: field `{field}`: expected a list of {{role, content}} messages")
                })?;
            if generation_prompt {
                let text = tokenizer
                    .apply_chat_template(&messages, true)
                    .with_context(|| format!("{at}: field `{field}`"))?;
                Ok(Some((text, true)))
            } else {
                Ok(Some((messages.into_iter().map(|m| m.content).collect::<Vec<_>>().join(""), false)))
            }
        }
        Some(other) => bail!("{at}: field `{field}`: expected a string or a list of messages, found {other}"),
    }
}

/// Token ids of a prompt: with special tokens for plain text, without for a
/// rendered chat template (the template places them itself).
pub fn prompt_ids(tokenizer: &TextTokenizer, text: &str, templated: bool) -> Result<Vec<u32>> {
    Ok(tokenizer.encode(text, !templated)?)
}
