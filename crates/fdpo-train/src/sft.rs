//! Supervised fine-tuning on the trainer's machinery (`fdpo sft`): the loss
//! is the mean negative log-likelihood per token over completion tokens (or
//! over every token with `completion_only_loss = false`).
//!
//! Data, one JSON object per line (TRL's SFT forms): `{prompt, completion}`
//! (strings, or lists of messages), `{text}`, or conversational
//! `{messages}` whose last assistant turn is the completion. Plain-text
//! completions and texts get EOS appended; the prompt is tokenised with
//! special tokens (the convention of `fdpo logprobs`). Sequences longer than
//! `max_length` keep their start; a prompt that alone fills `max_length` is
//! dropped and counted, as are empty completions.

use std::path::Path;

use candle_core::{DType, Device};
use fdpo_model::logprobs::{response_logprob_sums, PaddedBatch};
use fdpo_model::{CausalLm, ChatMessage, TextTokenizer};
use serde_json::Value;

use crate::config::TrainConfig;
use crate::data::DataError;
use crate::trainer::{
    begin_run, check_run, fit_to_context, BatchOutput, Objective, Observer, Outcome, Split, TrainError,
    Trainer,
};

/// One tokenised example: the loss covers `completion` (and `prompt` too
/// when the loss is on every token).
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    /// `id` from the file, else `line-N`.
    pub id: String,
    /// Prompt ids (empty for `{text}`).
    pub prompt: Vec<u32>,
    /// Completion ids.
    pub completion: Vec<u32>,
}

/// Examples read from a file, with what was skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SftData {
    /// Usable examples in file order.
    pub examples: Vec<SftExample>,
    /// Lines with an empty completion.
    pub skipped_empty: usize,
    /// Examples cut to `max_length`.
    pub truncated: usize,
    /// Examples whose prompt alone reaches `max_length`.
    pub dropped: usize,
}

fn messages(v: &Value, field: &str) -> Result<Vec<ChatMessage>, String> {
    serde_json::from_value(v.clone())
        .map_err(|_| format!("field `{field}`: expected a list of {{role, content}} messages"))
}

/// Reads and tokenises an SFT JSONL file.
pub fn read_sft(path: &Path, tokenizer: &TextTokenizer, max_length: usize) -> Result<SftData, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.into(), source })?;
    let eos = tokenizer.eos_id();
    let mut data = SftData::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let err = |message: String| DataError::Line { path: path.into(), line: n, message };
        let model_err = |source| DataError::Model { path: path.into(), line: n, source: Box::new(source) };
        let value: Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
        let id = match obj.get("id") {
            None | Some(Value::Null) => format!("line-{n}"),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        // (prompt messages, completion messages) for conversational forms.
        let conversation =
            match (obj.get("messages"), obj.get("prompt"), obj.get("completion"), obj.get("text")) {
                (Some(m), _, _, _) => {
                    let all = messages(m, "messages").map_err(&err)?;
                    let last = all
                        .iter()
                        .rposition(|m| m.role == "assistant")
                        .ok_or_else(|| err("field `messages`: no assistant message to learn".into()))?;
                    Some((all[..last].to_vec(), all[last..].to_vec()))
                }
                (None, Some(p @ Value::Array(_)), Some(c), _) => {
                    Some((messages(p, "prompt").map_err(&err)?, messages(c, "completion").map_err(&err)?))
                }
                _ => None,
            };
        let (prompt, mut completion) = if let Some((p, c)) = conversation {
            if c.iter().all(|m| m.content.trim().is_empty()) {
                data.skipped_empty += 1;
                continue;
            }
            let rendered_prompt = tokenizer.apply_chat_template(&p, true).map_err(model_err)?;
            let full = tokenizer.apply_chat_template(&[p, c].concat(), false).map_err(model_err)?;
            let tail = full.strip_prefix(&rendered_prompt).unwrap_or(&full);
            (
                tokenizer.encode(&rendered_prompt, false).map_err(model_err)?,
                tokenizer.encode(tail, false).map_err(model_err)?,
            )
        } else {
            let string = |name: &str| -> Result<Option<&str>, DataError> {
                match obj.get(name) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s)),
                    Some(other) => Err(err(format!("field `{name}`: expected a string, found {other}"))),
                }
            };
            match (string("prompt")?, string("completion")?, string("text")?) {
                (Some(p), Some(c), _) => {
                    if c.trim().is_empty() {
                        data.skipped_empty += 1;
                        continue;
                    }
                    let mut ids = tokenizer.encode(c, false).map_err(model_err)?;
                    ids.extend(eos);
                    (tokenizer.encode(p, true).map_err(model_err)?, ids)
                }
                (None, None, Some(t)) => {
                    if t.trim().is_empty() {
                        data.skipped_empty += 1;
                        continue;
                    }
                    let mut ids = tokenizer.encode(t, true).map_err(model_err)?;
                    ids.extend(eos);
                    (vec![], ids)
                }
                (Some(_), None, _) => return Err(err("missing field `completion`".into())),
                (None, Some(_), _) => return Err(err("missing field `prompt`".into())),
                _ => {
                    return Err(
                        err("expected fields `prompt` and `completion`, `text`, or `messages`".into()),
                    )
                }
            }
        };
        if prompt.len() + 1 > max_length {
            data.dropped += 1;
            continue;
        }
        if prompt.len() + completion.len() > max_length {
            completion.truncate(max_length - prompt.len());
            data.truncated += 1;
        }
        data.examples.push(SftExample { id, prompt, completion });
    }
    Ok(data)
}

/// The SFT objective.
pub struct SftObjective<'a> {
    /// The model.
    pub model: &'a CausalLm,
    /// Training examples.
    pub train: &'a [SftExample],
    /// Evaluation examples.
    pub eval: &'a [SftExample],
    /// Loss on completion tokens only.
    pub completion_only_loss: bool,
    /// Padding id.
    pub pad_id: u32,
    /// Where tensors live.
    pub device: Device,
}

impl Objective for SftObjective<'_> {
    fn len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train.len(),
            Split::Eval => self.eval.len(),
        }
    }

    fn batch(&self, split: Split, indices: &[usize]) -> Result<BatchOutput, TrainError> {
        let data = if split == Split::Train { self.train } else { self.eval };
        let rows: Vec<(&[u32], &[u32])> =
            indices.iter().map(|&i| (data[i].prompt.as_slice(), data[i].completion.as_slice())).collect();
        let batch = PaddedBatch::new(&rows, self.pad_id, !self.completion_only_loss, &self.device)?;
        let logits = self.model.forward(&batch.ids, Some(&batch.attention), None)?.to_dtype(DType::F32)?;
        let (sums, counts) = response_logprob_sums(&logits, &batch.ids, &batch.response)?;
        let count = counts.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
        let loss = (sums.sum_all()?.neg()? / count)?;
        let num_tokens = count;
        Ok(BatchOutput { loss, metrics: vec![("num_loss_tokens", num_tokens)], tokens: batch.tokens })
    }
}

/// What [`train_sft`] did besides training.
#[derive(Debug, Clone)]
pub struct SftSummary {
    /// How the run ended.
    pub outcome: Outcome,
    /// Training data as read.
    pub train_data: SftData,
    /// The step resumed from, if any.
    pub resumed_from: Option<usize>,
}

/// Runs SFT as `config` says (its f-DPO keys are ignored), writing the run
/// folder; with `resume`, from the last complete checkpoint.
pub fn train_sft(
    config: &TrainConfig,
    device: &Device,
    resume: bool,
    observer: &mut dyn Observer,
    stop_after: Option<usize>,
) -> Result<SftSummary, TrainError> {
    let checkpoint = check_run(config, resume)?;
    let config = &fit_to_context(config, false, observer)?;
    let tokenizer = TextTokenizer::load(&config.model)?;
    let read = |path: &Path, observer: &mut dyn Observer| -> Result<SftData, TrainError> {
        let data = read_sft(path, &tokenizer, config.max_length)?;
        if data.skipped_empty + data.truncated + data.dropped > 0 {
            observer.warn(&format!(
                "{}: {} examples used; {} skipped (empty completion), {} truncated to max_length, {} dropped (prompt reaches max_length)",
                path.display(),
                data.examples.len(),
                data.skipped_empty,
                data.truncated,
                data.dropped
            ));
        }
        Ok(data)
    };
    let train_data = read(&config.train_file, observer)?;
    let eval = match &config.eval_file {
        Some(p) => read(p, observer)?.examples,
        None => vec![],
    };
    let source = checkpoint.as_ref().map_or(config.model.clone(), |(_, dir)| dir.clone());
    let (model, weights) = CausalLm::load(&source, DType::F32, device)?;
    let objective = SftObjective {
        model: &model,
        train: &train_data.examples,
        eval: &eval,
        completion_only_loss: config.completion_only_loss,
        pad_id: tokenizer.pad_id(),
        device: device.clone(),
    };
    // Metadata (config.json, tokenizer) is copied from the model the run
    // started from: a resumed-from checkpoint may be pruned later.
    let mut trainer = Trainer::new(config, &weights, &config.model, train_data.examples.len())?;
    begin_run(config, resume)?;
    if let Some((_, dir)) = &checkpoint {
        trainer.resume_from(dir)?;
    }
    let outcome = trainer.run(&objective, observer, stop_after)?;
    Ok(SftSummary { outcome, train_data, resumed_from: checkpoint.map(|(s, _)| s) })
}
